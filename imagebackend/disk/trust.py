# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""What disk operations may trust about an image file -- its format --
and where they may write, from the cache's records and the caller, never
from bytes a guest could have written.

A guest writes whatever it likes into a raw disk -- and so into a raw base
made from a snapshot of one -- including a qcow2 header naming a host file
as its backing file.  So no format here is ever read from a header.  The
format of a file comes from, in order (:func:`known_format`):

1. the caller (``fmt=`` / ``--input-format``; ``backing_fmt=`` /
   ``--backing-format`` for a new backing file);
2. for a base in ``_base`` (``<cache_id>[-N]``) the ``format`` of its
   record ``_base/<stem>.json``; a sized base (``<cache_id>[-N]_<size>``)
   has the format of its own record if it has one, else of its base's
   (a caller's format that disagrees with the record is refused);
3. for a disk the library made, the cache's registry of disks
   (:func:`registered_format`);
4. otherwise :class:`~imagebackend.exception.DiskFormatUnknown`, naming
   the flag to pass.

Records and the registry are read without following any symlink inside
``_base``.  Only the cache writes inside ``_base`` and the lock directory:
:func:`refuse_cache_write` refuses any other writer there, judging by real
paths so that a symlink (or a hard link) into them is refused too.
"""

import dataclasses
import json
import logging
import os
import re
import stat

from oslo_config import cfg

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import registry as cache_registry
from imagebackend import exception

LOG = logging.getLogger(__name__)

#: The formats of instance disks (what the backends make).
DISK_FORMATS = ("qcow2", "raw")
#: Formats a backing file may have: those the cache can keep a base in
#: (qemu-img's names).
BACKING_FORMATS = ("qcow2", "raw", "vdi", "vhdx", "vmdk", "vpc")
#: Records are small; anything larger is not one of ours.
_MAX_RECORD = 1024 * 1024
_CID_RE = re.compile(r"^[0-9a-f]{40}$")
_FOLLOW_NOTHING = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class CachePaths:
    """Where the image cache and the disks live (absolute paths)."""

    instances_path: str
    base_dir: str
    lock_dir: str
    disk_dirs: tuple[str, ...] = ()


def cache_paths(conf: cfg.ConfigOpts) -> CachePaths:
    """The cache's directories as ``conf`` sets them: ``_base`` is
    ``[imagebackend] base_dir_name`` inside ``instances_path``; locks go
    to ``[oslo_concurrency] lock_path``, by default
    ``<instances_path>/locks``.

    :param conf: a ConfigOpts with the ``[imagebackend]``,
        ``[oslo_concurrency]`` and ``[image_cache]`` options registered.
    """
    opts = conf.imagebackend
    instances = os.path.abspath(opts.instances_path)
    return CachePaths(
        instances_path=instances,
        base_dir=os.path.join(instances, opts.base_dir_name),
        lock_dir=os.path.abspath(conf.oslo_concurrency.lock_path
                                 or os.path.join(instances, "locks")),
        disk_dirs=tuple(os.path.abspath(d)
                        for d in conf.image_cache.disk_dirs or []))


# --- where a file is ---------------------------------------------------------

def inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both real paths)."""
    return path == root or path.startswith(os.path.join(root, ""))


def cache_area(paths: CachePaths, path: str) -> str | None:
    """Which cache directory ``path`` is in, by the real paths of its
    directory and of itself (so a symlink into the cache counts), or
    ``None``.  Hard links are not found here; see
    :func:`refuse_cache_write`.
    """
    places = (os.path.realpath(os.path.dirname(path)),
              os.path.realpath(path))
    for root, what in ((paths.base_dir, "the image cache"),
                       (paths.lock_dir, "the lock directory")):
        real = os.path.realpath(root)
        if any(inside(place, real) for place in places):
            return "%s %s" % (what, root)
    return None


def refuse_cache_write(paths: CachePaths, path: str) -> None:
    """Refuse to write ``path`` (or a file in its place) when it lies in
    ``_base`` or the lock directory -- only the cache writes there -- or
    is a hard link to a file in ``_base``.

    :raises exception.CachePathRefused: it does.
    """
    where = cache_area(paths, path)
    if where is None:
        where = _hard_link_into_cache(paths, path)
    if where is not None:
        raise exception.CachePathRefused(path=path, where=where)


def _hard_link_into_cache(paths, path):
    # qemu-img follows a symlink, so judge the file it would write.
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return None
        entries = list(os.scandir(paths.base_dir))
    except OSError:
        return None
    for entry in entries:
        try:
            other = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return "the image cache %s (it is a hard link to %s)" % (
                paths.base_dir, entry.path)
    return None


def cached_base(paths: CachePaths,
                path: str) -> cache_layout.Name | None:
    """The :class:`imagebackend.cache.layout.Name` of the base or sized
    base ``path`` is (by real path), ``None`` when it is not in the cache.

    :raises exception.DiskOperationError: ``path`` is in the cache but is
        not a base (a record, scratch, bookkeeping, a symlink), or is in
        the lock directory.
    """
    base = os.path.realpath(paths.base_dir)
    locks = os.path.realpath(paths.lock_dir)
    parent = os.path.realpath(os.path.dirname(path))
    real = os.path.realpath(path)
    if inside(parent, locks) or inside(real, locks):
        raise exception.DiskOperationError(
            path=path, reason="it is in the lock directory %s, which holds "
            "no disks" % paths.lock_dir)
    if parent == base:
        name = os.path.basename(path)
    elif os.path.dirname(real) == base:
        name = os.path.basename(real)
    elif inside(parent, base) or inside(real, base):
        name = None
    else:
        return None
    parsed = cache_layout.parse(name) if name else None
    if parsed is None or parsed.suffix:
        raise exception.DiskOperationError(
            path=path, reason="it is in the image cache %s but is not a "
            "base; only bases (<cache_id>[-N]) and sized bases "
            "(<cache_id>[-N]_<size>) there are images" % paths.base_dir)
    try:
        st = os.lstat(os.path.join(base, name))
    except FileNotFoundError as exc:
        raise exception.DiskNotFound(path=path) from exc
    if not stat.S_ISREG(st.st_mode):
        raise exception.DiskOperationError(
            path=path, reason="%s in the image cache is not a regular file; "
            "nothing in the cache is followed through a symlink" % name)
    return parsed


# --- formats -----------------------------------------------------------------

def _read_record(dir_fd, name):
    """The JSON object in regular file ``name`` under ``dir_fd``, read
    without following a symlink; ``None`` if missing or not a record.
    """
    try:
        fd = os.open(name, _FOLLOW_NOTHING, dir_fd=dir_fd)
    except OSError as exc:
        if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            LOG.warning("Ignoring record %s: %s", name, exc.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_RECORD:
            LOG.warning("Ignoring record %s: not a small regular file", name)
            return None
        data = os.read(fd, _MAX_RECORD + 1)
    except OSError as exc:
        LOG.warning("Ignoring unreadable record %s: %s", name, exc.strerror)
        return None
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except ValueError:
        LOG.warning("Ignoring record %s: not JSON", name)
        return None
    return record if isinstance(record, dict) else None


def _open_dir(name, dir_fd=None, follow=False):
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None


def base_format(paths: CachePaths, name: cache_layout.Name) -> str | None:
    """The format the cache records for base or sized base ``name``:
    the sized base's own record's, else its base's record's.

    :returns: ``None`` when no valid record says.
    """
    dir_fd = _open_dir(paths.base_dir, follow=True)
    if dir_fd is None:
        return None
    try:
        records = [name.base_name + ".json"]
        if name.size is not None:
            records.append(name.stem + ".json")
        for record_name in records:
            fmt = (_read_record(dir_fd, record_name) or {}).get("format")
            if fmt in BACKING_FORMATS:
                return fmt
    finally:
        os.close(dir_fd)
    return None


def registered_format(paths: CachePaths, disk: str) -> str | None:
    """The format the cache's registry of disks records for ``disk``, if
    the library made the file that is there now (see
    :meth:`imagebackend.cache.registry.Registry.find`: a record is tied to
    its file, so a file later put at a recorded path gets no format from
    it).  The registry is read without following any symlink.  This is
    the one place disk operations consult the registry.

    :returns: ``None`` when no record describes ``disk``.
    """
    record = cache_registry.Registry(paths.base_dir, []).find(disk)
    if record is None or record["format"] not in ("qcow2", "raw"):
        return None
    return record["format"]


def known_format(paths: CachePaths, path: str, given: str | None, *,
                 flag: str, formats: tuple[str, ...] = DISK_FORMATS) -> str:
    """The format of existing image ``path``, from the caller or the
    cache's records (see this module's documentation), never from its
    header.

    :param given: the caller's format, or ``None``.
    :param flag: the command-line flag that gives it, for messages.
    :param formats: the formats allowed for a file outside ``_base``.
    :raises exception.DiskFormatUnknown: nothing says what it is.
    :raises exception.UnsupportedDiskOperation: a format not in
        ``formats``.
    :raises exception.InvalidDiskRequest: ``given`` contradicts the
        cache's record.
    """
    name = cached_base(paths, path)
    if name is not None:
        recorded = base_format(paths, name)
        if recorded is None:
            if given is None:
                raise exception.DiskFormatUnknown(
                    path=path, flag=flag, reason="it is in the image cache "
                    "but has no valid record (%s.json); 'imagebackend cache "
                    "verify' checks it" % name.stem)
            formats = BACKING_FORMATS
        elif given not in (None, recorded):
            raise exception.InvalidDiskRequest(
                path=path, reason="the image cache records it as %s, not "
                "%s; leave out %s" % (recorded, given, flag))
        else:
            return recorded
    elif given is None:
        given = registered_format(paths, path)
        if given is None:
            raise exception.DiskFormatUnknown(
                path=path, flag=flag, reason="it is neither a base in the "
                "image cache nor a disk the library made, so nothing "
                "records its format (its header may have been written by a "
                "guest)")
    if given not in formats:
        raise exception.UnsupportedDiskOperation(
            path=path, operation="this operation", fmt=given,
            hint="; use one of %s" % ", ".join(formats))
    return given
