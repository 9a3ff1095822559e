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
2. for a base in ``_base``, the format the cache records for it
   (:meth:`FormatRecords.base_record`; a caller's format that disagrees
   with the record is refused);
3. for a disk the library made, the cache's registry of disks
   (:meth:`FormatRecords.disk_format`);
4. otherwise :class:`~imagebackend.exception.DiskFormatUnknown`, naming
   the flag to pass.

The records come from whoever builds the disk operations, as an object
with the :class:`FormatRecords` interface
(:class:`imagebackend.cache.disk_records.DiskRecords` reads the image
cache's); without one (:class:`NoRecords`) nothing is taken from the cache
and the caller names every format.  Only the cache writes inside ``_base``
and the lock directory: :func:`refuse_cache_write` refuses any other
writer there, judging by real paths so that a symlink (or a hard link)
into them is refused too.
"""

import dataclasses
import os
import stat
import typing

from oslo_config import cfg

from imagebackend.common import lock_path
from imagebackend import exception
from imagebackend.inspection import signatures

#: The formats of instance disks (what the backends make).
DISK_FORMATS = ("qcow2", "raw")
#: Formats a backing file may have: those the cache can keep a base in
#: (qemu-img's names).
BACKING_FORMATS = signatures.QEMU_FORMAT_NAMES


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
        # Registered on ``conf`` if needed, as oslo.concurrency's
        # get_lock_path() does, without importing lockutils.
        lock_dir=os.path.abspath(lock_path.get_lock_path(conf)
                                 or os.path.join(instances, "locks")),
        disk_dirs=tuple(os.path.abspath(d)
                        for d in conf.image_cache.disk_dirs or []))


@dataclasses.dataclass(frozen=True)
class BaseRecord:
    """What the cache records about a base (or sized base) in ``_base``.

    :param format: the format recorded for it (qemu-img's name), or
        ``None`` when no valid record says.
    :param record: the file name of the record that should say it, for
        messages; ``None`` when no records are consulted.
    """

    format: str | None
    record: str | None = None


class FormatRecords(typing.Protocol):
    """What disk operations learn from the image cache: where it is and
    the formats it recorded.  Nothing read here comes from a header.
    """

    @property
    def paths(self) -> CachePaths:
        """The cache's directories, as the configuration sets them now."""

    def base_record(self, path: str) -> BaseRecord | None:
        """What the cache records about ``path`` if it is in ``_base``.

        :returns: ``None`` when ``path`` is not in ``_base`` (by its real
            path or its directory's).
        :raises exception.DiskOperationError: ``path`` is in ``_base`` but
            is not a base (a record, scratch, bookkeeping, a symlink), or
            is in the lock directory.
        :raises exception.DiskNotFound: it does not exist.
        """

    def disk_format(self, path: str) -> str | None:
        """The format of disk ``path`` (``qcow2`` or ``raw``) if the library
        made the file that is there now, else ``None``.
        """


class NoRecords:
    """:class:`FormatRecords` for disk operations given no cache records:
    every file in ``_base`` is a base without a record, and no disk is
    known, so the caller must name every format.

    :param conf: a ConfigOpts with the cache's directory options
        registered (:func:`imagebackend.opts.register_opts`).
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    @property
    def paths(self) -> CachePaths:
        return cache_paths(self.conf)

    def base_record(self, path: str) -> BaseRecord | None:
        if name_in_base(self.paths, path) is None:
            return None
        return BaseRecord(format=None)

    def disk_format(self, path: str) -> str | None:
        return None


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


def name_in_base(paths: CachePaths, path: str) -> str | None:
    """The file name ``path`` has in ``_base``, by its directory's real
    path or by its own (a symlink to a base names that base).

    :returns: ``None`` when ``path`` is not in ``_base``; ``""`` when it
        is deeper inside it (in the cache's bookkeeping).
    :raises exception.DiskOperationError: ``path`` is in the lock
        directory, which holds no disks.
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
        return os.path.basename(path)
    if os.path.dirname(real) == base:
        return os.path.basename(real)
    if inside(parent, base) or inside(real, base):
        return ""
    return None


def no_record(base: BaseRecord) -> str:
    """Which record is missing for ``base``, and what to do about it."""
    if base.record is None:
        return ("(these disk operations were given none of the cache's "
                "records, so nothing there is trusted)")
    return "(%s); 'imagebackend cache verify' checks it" % base.record


def known_format(records: FormatRecords, path: str, given: str | None, *,
                 flag: str, formats: tuple[str, ...] = DISK_FORMATS) -> str:
    """The format of existing image ``path``, from the caller or the
    cache's records (see this module's documentation), never from its
    header.

    :param records: what the cache records.
    :param given: the caller's format, or ``None``.
    :param flag: the command-line flag that gives it, for messages.
    :param formats: the formats allowed for a file outside ``_base``.
    :raises exception.DiskFormatUnknown: nothing says what it is.
    :raises exception.UnsupportedDiskOperation: a format not in
        ``formats``.
    :raises exception.InvalidDiskRequest: ``given`` contradicts the
        cache's record.
    """
    base = records.base_record(path)
    if base is not None:
        recorded = base.format
        if recorded is None:
            if given is None:
                raise exception.DiskFormatUnknown(
                    path=path, flag=flag, reason="it is in the image cache "
                    "but has no valid record %s" % no_record(base))
            formats = BACKING_FORMATS
        elif given not in (None, recorded):
            raise exception.InvalidDiskRequest(
                path=path, reason="the image cache records it as %s, not "
                "%s; leave out %s" % (recorded, given, flag))
        else:
            return recorded
    elif given is None:
        given = records.disk_format(path)
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


def open_disk(records: FormatRecords, path: str, fmt: str | None,
              operation: str, *, qcow2: bool = False,
              write: bool = False) -> tuple[str, str]:
    """The absolute path and the format of an existing disk, before
    ``operation`` runs on it.

    :param fmt: the caller's format, or ``None`` (see
        :func:`known_format`).
    :param qcow2: the operation needs a qcow2 disk.
    :param write: the operation changes the disk, so it must not be in
        ``_base`` or the lock directory.
    :raises exception.DiskNotFound: there is no such file.
    :raises exception.DiskOperationError: it is not a disk file.
    :raises exception.CachePathRefused: ``write`` into the cache.
    :raises exception.DiskFormatUnknown: nothing says its format.
    :raises exception.UnsupportedDiskOperation: a format the operation
        does not handle.
    """
    path = os.path.abspath(path)
    _check_disk_file(path)
    if write:
        refuse_cache_write(records.paths, path)
    try:
        fmt = known_format(records, path, fmt, flag="--input-format")
    except exception.UnsupportedDiskOperation as exc:
        raise exception.UnsupportedDiskOperation(
            path=path, operation=operation, fmt=exc.kwargs["fmt"],
            hint="; instance disks are qcow2 or raw") from exc
    if qcow2 and fmt != "qcow2":
        raise exception.UnsupportedDiskOperation(
            path=path, operation=operation, fmt=fmt,
            hint="; internal snapshots and backing files need a qcow2 "
                 "disk (extract it to qcow2 with 'imagebackend disk "
                 "extract', or use the qcow2 or cached-base backend)")
    return path, fmt


def _check_disk_file(path):
    """Refuse a ``path`` that does not exist or is not a disk file."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise exception.DiskNotFound(path=path) from exc
    except OSError as exc:
        raise exception.DiskOperationError(
            path=path, reason="cannot open it: %s" % exc.strerror) from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise exception.DiskOperationError(
            path=path, reason="it is not a disk image (not a regular file "
            "or a block device)")
