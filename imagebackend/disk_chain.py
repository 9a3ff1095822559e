"""An instance disk's format and backing chain, taken from records and
from the caller, never from bytes a guest could have written.

A guest writes whatever it likes into a raw disk -- and so into a raw base
made from a snapshot of one -- including a qcow2 header naming a host file
as its backing file.  So no format here is ever read from a header.  The
format of a file comes from, in order:

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

The backing chain is read one image at a time (:func:`read_chain`) with
``qemu-img info -f <format>`` and no ``--backing-chain``, so qemu-img opens
no backing file before it is checked (:func:`check_backing`): it must have
its format recorded in the image, be a regular local file that exists,
not lead back into the chain, and lie in a directory disks may use:

* anywhere under ``[imagebackend] instances_path`` or a directory of
  ``[image_cache] disk_dirs`` (by real path, so through symlinks too);
* directly in the directory of the disk at the top of the chain;
* in ``_base`` only a base or sized base (not a symlink) with a valid
  record whose format is the one the image records for it;
* never in the lock directory or in the cache's own bookkeeping
  (``_base/.disks``, records, scratch files).

An image with an external data file is refused.  A command run afterwards
on the disk makes qemu-img open the chain with these recorded formats only.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import stat

from oslo_config import cfg

from imagebackend import cache_layout
from imagebackend import exception
from imagebackend import qemu_img

LOG = logging.getLogger(__name__)

#: The formats of instance disks (what the backends make).
DISK_FORMATS = ("qcow2", "raw")
#: Formats a backing file may have: those the cache can keep a base in
#: (qemu-img's names).
BACKING_FORMATS = ("qcow2", "raw", "vdi", "vhdx", "vmdk", "vpc")
#: The deepest chain followed; deeper is a loop or a crafted image.
MAX_CHAIN = 16
#: Records are small; anything larger is not one of ours.
_MAX_RECORD = 1024 * 1024
# qemu takes "name:..." before any "/" as a protocol (nbd:, json:, ...).
_PROTOCOL_RE = re.compile(r"^[^/]*:")
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

def _inside(path, root):
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
        if any(_inside(place, real) for place in places):
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
    try:
        st = os.lstat(path)
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


def _cached_base(paths, path):
    """The :class:`imagebackend.cache_layout.Name` of the base or sized
    base ``path`` is (by real path), ``None`` when it is not in the cache.

    :raises exception.DiskOperationError: ``path`` is in the cache but is
        not a base (a record, scratch, bookkeeping, a symlink), or is in
        the lock directory.
    """
    base = os.path.realpath(paths.base_dir)
    locks = os.path.realpath(paths.lock_dir)
    parent = os.path.realpath(os.path.dirname(path))
    real = os.path.realpath(path)
    if _inside(parent, locks) or _inside(real, locks):
        raise exception.DiskOperationError(
            path=path, reason="it is in the lock directory %s, which holds "
            "no disks" % paths.lock_dir)
    if parent == base:
        name = os.path.basename(path)
    elif os.path.dirname(real) == base:
        name = os.path.basename(real)
    elif _inside(parent, base) or _inside(real, base):
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
    """The format the cache's registry of disks records for ``disk``, by
    its absolute path or else its real path.

    Records of today's qcow2 overlays carry no format and are qcow2.  The
    registry is read without following any symlink.  This is the one
    place disk operations consult the registry.

    :returns: ``None`` when no record names ``disk``.
    :raises exception.DiskFormatUnknown: records disagree.
    """
    candidates = [os.path.abspath(disk)]
    if os.path.realpath(disk) not in candidates:
        candidates.append(os.path.realpath(disk))
    for candidate in candidates:
        found = {str(record.get("format", "qcow2"))
                 for record in _registry_records(paths, candidate)}
        if len(found) > 1:
            raise exception.DiskFormatUnknown(
                path=disk, reason="the cache's registry of disks has "
                "records of it as %s" % " and as ".join(sorted(found)),
                flag="--input-format")
        if found:
            return found.pop()
    return None


def _registry_records(paths, disk):
    key = hashlib.sha1(disk.encode("utf-8", "surrogateescape")).hexdigest()
    base_fd = _open_dir(paths.base_dir, follow=True)
    if base_fd is None:
        return
    disks_fd = _open_dir(cache_layout.DISKS_DIR, base_fd)
    os.close(base_fd)
    if disks_fd is None:
        return
    try:
        for cid in sorted(os.listdir(disks_fd)):
            cid_fd = _open_dir(cid, disks_fd) if _CID_RE.match(cid) else None
            if cid_fd is None:
                continue
            try:
                record = _read_record(cid_fd, key + ".json")
            finally:
                os.close(cid_fd)
            if record is not None and record.get("disk") == disk:
                yield record
    finally:
        os.close(disks_fd)


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
    name = _cached_base(paths, path)
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


# --- the backing chain -------------------------------------------------------

def read_chain(qemu: qemu_img.QemuImg, path: str, fmt: str, *,
               paths: CachePaths, top: str | None = None,
               follow: bool = True,
               force_share: bool = False) -> qemu_img.ImageInfo:
    """Read disk ``path`` and its backing chain, one image at a time,
    checking every backing file before it is opened.

    :param path: an absolute path.
    :param fmt: the disk's format, as :func:`known_format` found it.
    :param paths: the cache's directories.
    :param top: the disk whose chain this is part of (its directory may
        hold backing files); default ``path``.
    :param follow: read the backing files too; without it only ``path`` is
        read (its backing file need not exist).
    :param force_share: read images another process (a running guest)
        has open for writing, for a report; without it such a disk is
        refused by qemu-img, as it must be before changing it.
    :returns: the :class:`imagebackend.qemu_img.ImageInfo` of ``path``;
        its ``chain`` is the chain read, ``path`` first, each image with
        the absolute path and the format it is opened with.
    :raises exception.DiskOperationError: the chain cannot be opened
        safely; the message says why and how to fix it.
    :raises exception.QemuImgError: qemu-img failed.
    """
    top = top or path
    chain = []
    seen = {file_id(path)}
    current, current_fmt = path, fmt
    while True:
        info = qemu.info(current, current_fmt, force_share=force_share)
        info.filename, info.format = current, current_fmt
        if info.data_file:
            raise exception.DiskOperationError(
                path=top, reason="%s keeps its data in the external file "
                "%s, which instance disks never do; it is not a disk these "
                "operations handle" % (current, info.data_file))
        chain.append(info)
        if not follow or info.backing_file is None:
            break
        if len(chain) >= MAX_CHAIN:
            raise exception.DiskOperationError(
                path=top, reason="its backing chain is deeper than %d "
                "images; flatten it with 'imagebackend disk extract'"
                % MAX_CHAIN)
        current, current_fmt = _backing(paths, top, current, info, seen)
    for depth, info in enumerate(chain):
        info.chain = chain[depth:]
    return chain[0]


def file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _backing(paths, top, image, info, seen):
    """The path and recorded format of the backing file of ``image``
    (described by ``info``), checked so that qemu-img opens it without
    guessing.
    """
    name = info.backing_file
    if _PROTOCOL_RE.match(name):
        raise exception.DiskOperationError(
            path=top, reason="the backing file of %s is %r, which is not a "
            "local file; refusing to let qemu-img open it" % (image, name))
    backing = os.path.join(os.path.dirname(image), name)
    if info.backing_format is None:
        raise exception.DiskOperationError(
            path=top, reason="%s has no recorded format, which qemu-img "
            "would have to guess; record it with 'imagebackend disk rebase "
            "%s %s --unsafe --backing-format FORMAT'" % (
                _what(top, image, backing), image, backing))
    check_backing(paths, top, image, backing, info.backing_format)
    key = file_id(backing)
    if key in seen:
        raise exception.DiskOperationError(
            path=top, reason="its backing chain loops: %s leads back to %s"
            % (image, backing))
    seen.add(key)
    return backing, info.backing_format


def _what(top, image, backing):
    return ("its backing file %s" % backing if image == top
            else "the backing file %s of %s" % (backing, image))


def check_backing(paths: CachePaths, top: str, image: str, backing: str,
                  fmt: str) -> None:
    """Refuse ``backing`` as the backing file of ``image``, recorded as
    ``fmt``, in the chain of disk ``top``, unless it is a file this
    module's documentation allows.

    :raises exception.DiskOperationError: it is not; the message says
        what was found and how to fix it.
    """
    what = _what(top, image, backing)
    fix = ("record another with 'imagebackend disk rebase %s NEW_BACKING "
           "--unsafe'" % image)
    if fmt not in BACKING_FORMATS:
        raise exception.DiskOperationError(
            path=top, reason="%s is recorded as %s, which cannot back a "
            "disk (use one of %s)" % (what, fmt, ", ".join(BACKING_FORMATS)))
    if not os.path.lexists(backing):
        raise exception.DiskOperationError(
            path=top, reason="%s does not exist; if it moved, %s" % (
                what, fix))
    try:
        name = _cached_base(paths, backing)
    except exception.DiskOperationError as exc:
        raise exception.DiskOperationError(
            path=top, reason="%s is refused: %s; %s" % (
                what, exc.kwargs.get("reason", "it is missing"), fix)
        ) from exc
    if name is not None:
        recorded = base_format(paths, name)
        if recorded is None:
            raise exception.DiskOperationError(
                path=top, reason="%s is in the image cache without a valid "
                "record, so its format is unknown; 'imagebackend cache "
                "verify' checks it" % what)
        if recorded != fmt:
            raise exception.DiskOperationError(
                path=top, reason="%s is recorded in %s as %s, but the image "
                "cache records it as %s; record the right format with "
                "'imagebackend disk rebase %s %s --unsafe'" % (
                    what, image, fmt, recorded, image, backing))
        return
    try:
        st = os.stat(backing)
    except OSError as exc:
        raise exception.DiskOperationError(
            path=top, reason="%s cannot be read (%s); %s" % (
                what, exc.strerror, fix)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise exception.DiskOperationError(
            path=top, reason="%s is not a regular file; %s" % (what, fix))
    real = os.path.realpath(backing)
    roots = [paths.instances_path] + list(paths.disk_dirs)
    own = {os.path.realpath(os.path.dirname(top)),
           os.path.dirname(os.path.realpath(top))}
    if (any(_inside(real, os.path.realpath(r)) for r in roots)
            or os.path.dirname(real) in own):
        return
    raise exception.DiskOperationError(
        path=top, reason="%s (really %s) is outside the directories backing "
        "files may be in: under %s, directly in the disk's directory %s, "
        "or under a directory of [image_cache] disk_dirs (%s); move it "
        "there or list its directory in disk_dirs, then %s" % (
            what, real, paths.instances_path, os.path.dirname(top),
            ", ".join(paths.disk_dirs) or "none", fix))
