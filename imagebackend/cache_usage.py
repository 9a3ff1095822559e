"""Which disks use which cached bases -- without a database and without
running qemu-img.

A base is in use when a disk has it in its backing chain.  Disks are found
two ways:

- by walking ``instances_path`` (except the cache and lock directories) and
  every directory in ``[image_cache] disk_dirs``, without following
  symlinks, and reading the backing-file field of each qcow2 header found
  (a few bytes per file, read directly);
- from the registry of disks the library created, one small JSON record per
  disk in ``_base/.disks/<cache_id>/``, which also covers disks made outside
  those directories.  A record names the host that wrote it; a record of
  another host whose disk this host cannot see counts as a use of the base
  it names (the disk may be local to that host).

Backing chains are followed through intermediate qcow2 files, relative
backing names are resolved against the overlay's directory, and a backing
specification that is not a plain path (``json:{...}``) counts as using
every base whose name appears in it.
"""

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import time

from oslo_config import cfg

from imagebackend import cache_layout
from imagebackend import fileutils

LOG = logging.getLogger(__name__)

GROUP = "image_cache"

OPTIONS = [
    cfg.ListOpt("disk_dirs",
                default=[],
                help="More directories holding instance disks, beside "
                     "[imagebackend] instances_path, which is always "
                     "searched. A cached base used as the backing file of "
                     "any qcow2 file under these directories (searched "
                     "recursively, symlinks not followed) is never removed "
                     "by 'imagebackend cache prune' or by invalidation. "
                     "Disks the library created are also recorded in the "
                     "cache itself, so list a directory here only for disks "
                     "made by other tools. Default: empty."),
]

QCOW2_MAGIC = b"QFI\xfb"
#: qemu refuses backing file names longer than this.
MAX_BACKING_NAME = 1023
_MAX_CHAIN = 16
_BASE_NAME_RE = re.compile(r"[0-9a-f]{40}(?:-[0-9]+)?(?:_[0-9]+)?")


def read_backing_file(path: str) -> str | None:
    """The backing-file name in the header of qcow2 file ``path``.

    :returns: the name exactly as stored (it may be relative), or ``None``
        when ``path`` is not a qcow2 file, has no backing file, or has a
        header qemu would refuse.
    :raises OSError: ``path`` cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC)
    try:
        return parse_backing_file(lambda n, off: os.pread(fd, n, off))
    finally:
        os.close(fd)


def parse_backing_file(pread) -> str | None:
    """Read the backing-file name of a qcow2 image through ``pread(count,
    offset)``; see :func:`read_backing_file`.
    """
    head = pread(20, 0)
    if len(head) < 20 or head[:4] != QCOW2_MAGIC:
        return None
    if int.from_bytes(head[4:8], "big") not in (2, 3):
        return None
    offset = int.from_bytes(head[8:16], "big")
    length = int.from_bytes(head[16:20], "big")
    if offset == 0 or length == 0 or length > MAX_BACKING_NAME:
        return None
    name = pread(length, offset)
    if len(name) != length:
        return None
    return name.decode("utf-8", "surrogateescape")


@dataclasses.dataclass
class Usage:
    """Disks using each base, by base file name."""

    users: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    scanned_at: float = 0.0
    #: what the search could not read; while it is not empty, any base may
    #: be in use and none may be removed.
    unreadable: list[str] = dataclasses.field(default_factory=list)

    def of(self, name: str) -> list[str]:
        return self.users.get(name, [])

    def add(self, name: str, disk: str) -> None:
        disks = self.users.setdefault(name, [])
        if disk not in disks:
            disks.append(disk)


class Chains:
    """Resolves backing chains to the bases of ``base_dir`` they end in;
    one per scan (it remembers what it has read).
    """

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.unreadable: list[str] = []
        self._bases: dict[tuple[int, int], str] = {}
        self._memo: dict[tuple[int, int], set[str]] = {}
        try:
            entries = list(os.scandir(base_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            name = cache_layout.parse(entry.name)
            if name is None or name.suffix:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                self._bases[(st.st_dev, st.st_ino)] = entry.name

    def bases_of(self, path: str, st: os.stat_result,
                 depth: int = 0) -> set[str]:
        """The bases in the backing chain of disk ``path``."""
        key = (st.st_dev, st.st_ino)
        if key in self._bases:
            return {self._bases[key]}
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = set()     # a loop in the chain ends here
        try:
            backing = read_backing_file(path)
        except FileNotFoundError:
            backing = None      # deleted while we looked
        except OSError as exc:
            LOG.warning("Cannot read the header of %s: %s", path, exc)
            self.unreadable.append(path)
            backing = None
        found = set()
        if backing is not None and depth < _MAX_CHAIN:
            found = self._resolve(path, backing, depth)
        self._memo[key] = found
        return found

    def _resolve(self, path, backing, depth):
        if backing.startswith("file:"):
            backing = backing[len("file:"):]
        if backing.startswith("json:") or "://" in backing:
            return {name for name in _BASE_NAME_RE.findall(backing)
                    if os.path.lexists(os.path.join(self.base_dir, name))}
        target = os.path.join(os.path.dirname(path), backing)
        try:
            st = os.stat(target)
        except OSError:
            return set()
        if not stat.S_ISREG(st.st_mode):
            return set()
        return self.bases_of(target, st, depth + 1)


class UsageScanner:
    """Finds the disks that use bases in ``base_dir``.

    :param base_dir: the cache directory.
    :param roots: directories to search for disks.
    :param skip: directories never searched (the cache, the locks).
    """

    def __init__(self, base_dir: str, roots: list[str],
                 skip: list[str]) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.roots = [os.path.abspath(r) for r in roots]
        self.skip = {os.path.abspath(s) for s in skip}
        self.registry = Registry(base_dir, self.roots)

    def scan(self) -> Usage:
        """Search every root and the registry."""
        usage = Usage(scanned_at=time.time())
        chains = Chains(self.base_dir)
        seen: set[tuple[int, int]] = set()
        for root in self.roots:
            for path, st in self._walk(root, usage.unreadable):
                seen.add((st.st_dev, st.st_ino))
                for name in chains.bases_of(path, st):
                    usage.add(name, path)
        for record in self.registry.records():
            self._registered(chains, record, usage, seen)
        usage.unreadable += chains.unreadable
        return usage

    def users_of(self, cid: str, name: str) -> list[str]:
        """Registered disks of image ``cid`` that use base ``name`` now
        (the pruner's last check, under the image's locks).
        """
        chains = Chains(self.base_dir)
        usage = Usage()
        for record in self.registry.records(cid):
            self._registered(chains, record, usage, set())
        # A disk whose header cannot be read may use the base.
        return usage.of(name) + ["%s (unreadable)" % path
                                 for path in chains.unreadable]

    def _registered(self, chains, record, usage, seen) -> None:
        path = record.get("disk")
        if not isinstance(path, str) or record.get("format") == "raw":
            return      # a raw disk's bytes are the guest's, never a header
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            if record.get("host") != self.registry.host:
                # Perhaps on that host's local disk: trust the record.
                base = os.path.basename(str(record.get("base", "")))
                usage.add(base, "%s:%s" % (record.get("host"), path))
            return
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        for name in chains.bases_of(path, st):
            usage.add(name, path)

    def _walk(self, root, unreadable):
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                if directory == root and root != self.roots[0]:
                    # A configured directory that is missing may be a
                    # filesystem not mounted right now.
                    LOG.warning("Disk directory %s does not exist", root)
                    unreadable.append(root)
                continue
            except OSError as exc:
                LOG.warning("Cannot search %s for disks: %s", directory,
                            exc)
                unreadable.append(directory)
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if os.path.abspath(entry.path) not in self.skip:
                        stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode) and st.st_size >= 20:
                    yield entry.path, st


#: an attempt's intent record younger than this is never collected, even
#: if its files look gone (a creation in progress always holds the image's
#: use lock, which collection takes exclusively; this covers a host whose
#: locks are split or missing).
INTENT_GRACE = 3600
#: record states: written before the disk is made, and once it is named.
INTENT = "intent"
DONE = "done"
#: the extended attribute naming a disk's registry token.
MARK_XATTR = "user.imagebackend.record"
_RECORD_KEYS = ("disk", "tmp", "base", "format", "image_id", "host",
                "created_at", "state")


class Registry:
    """The record of disks the library created, one file per attempt:
    ``_base/.disks/<cache_id>/<sha1 of the disk path>-<token>.json``.

    A creation writes an *intent* record (durably) before it makes
    anything that names a base, makes the disk under a temporary name,
    publishes it, then marks its own record *done* -- or removes only its
    own record on failure.  So a base is never without a record of the
    disk that may use it, and a losing concurrent request for one target
    never touches the winner's record.  Raw disks are recorded too (format
    ``raw``, base ``None``): their content is guest data, never a header
    to follow.

    Every record read through :meth:`records` has the keys ``disk``,
    ``tmp``, ``base``, ``format``, ``image_id``, ``host``, ``created_at``,
    ``state`` and ``_path`` (its file); done records may add ``dev`` and
    ``ino`` (the disk's file).  Records are read and written without
    following a symlink.

    :param roots: the directories the scanner searches.
    """

    def __init__(self, base_dir: str, roots: list[str]) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.directory = os.path.join(self.base_dir, cache_layout.DISKS_DIR)
        self.roots = [os.path.join(os.path.abspath(r), "") for r in roots]
        self.host = socket.gethostname()

    @staticmethod
    def _key(disk: str) -> str:
        return hashlib.sha1(
            disk.encode("utf-8", "surrogateescape")).hexdigest()

    def _cid_dir(self, cid: str) -> str:
        """The record directory of image ``cid``, made if missing (and
        durably: a record in a directory that is lost is lost too).

        :raises OSError: it cannot be made, or is not a real directory.
        """
        directory = os.path.join(self.directory, cid)
        try:
            if stat.S_ISDIR(os.lstat(directory).st_mode):
                return directory
        except FileNotFoundError:
            pass
        made = []
        for path in (self.directory, directory):
            try:
                os.mkdir(path, 0o755)
                made.append(path)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise NotADirectoryError(
                    errno.ENOTDIR, "not a directory (symlinks are never "
                    "followed in the cache)", path)
        for path in made:
            fileutils.fsync_dir(os.path.dirname(path))
        return directory

    def begin(self, cid: str, image_id: str, disk: str, tmp: str | None,
              base: str | None, fmt: str,
              st: os.stat_result | None = None) -> str:
        """Durably record the intent to make ``disk`` (now being built as
        ``tmp``) of format ``fmt`` over ``base`` (``None`` for a disk
        without a backing file) of image ``cid``.

        :param st: the stat of ``tmp``, to tie the record to that file.
        :returns: the record's path, for :meth:`confirm` and
            :meth:`rollback`.
        :raises OSError: the record cannot be written.
        """
        disk = os.path.abspath(disk)
        token = secrets.token_hex(8)
        path = os.path.join(self._cid_dir(cid), "%s-%s.json" % (
            self._key(disk), token))
        record = {"disk": disk, "tmp": tmp, "base": base, "format": fmt,
                  "image_id": image_id, "host": self.host,
                  "created_at": time.time(), "state": INTENT}
        if st is not None:
            record.update(dev=st.st_dev, ino=st.st_ino)
            if _set_mark(tmp, token):
                record["mark"] = token
        # A new name per attempt, so no rename is needed: a reader sees an
        # empty file (skipped) until the one write has put all of it.
        data = json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write", path)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            fileutils.remove_quietly(path)
            raise
        os.close(fd)
        fileutils.fsync_dir(os.path.dirname(path))
        return path

    def confirm(self, path: str, st: os.stat_result | None = None) -> None:
        """Mark the attempt recorded in ``path`` done (its disk exists).

        Not fsynced: an intent record whose disk exists already counts as
        a use and names the disk's format, so losing this on a crash is
        harmless.

        :param st: the stat of the published disk.
        :raises OSError: the record cannot be rewritten.
        """
        record = self._read(path)
        if record is None:
            raise FileNotFoundError(errno.ENOENT, "registry record is gone",
                                    path)
        record["state"] = DONE
        record["tmp"] = None
        if st is not None:
            record.update(dev=st.st_dev, ino=st.st_ino)
        fileutils.write_json_atomic(path, record, durable=False)

    def rollback(self, path: str) -> None:
        """Remove the record of a failed attempt (this attempt's only)."""
        if fileutils.remove_quietly(path):
            try:
                fileutils.fsync_dir(os.path.dirname(path))
            except OSError as exc:
                LOG.warning("Could not flush the removal of %s: %s", path,
                            exc)

    def add(self, cid: str, image_id: str, disk: str, base: str | None,
            fmt: str = "qcow2") -> str:
        """Record ``disk``, made over ``base`` of image ``cid`` by some
        other means, as done.

        :raises OSError: the record cannot be written.
        """
        path = self.begin(cid, image_id, disk, None, base, fmt)
        self.confirm(path)
        return path

    def cids(self) -> list[str]:
        try:
            if not stat.S_ISDIR(os.lstat(self.directory).st_mode):
                return []
            return sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []

    def records(self, cid: str | None = None, key: str | None = None):
        """Yield every record (of image ``cid`` only, if given; of the disk
        whose :meth:`_key` is ``key`` only, if given), each with ``_path``
        set to its file.
        """
        for one in ([cid] if cid else self.cids()):
            directory = os.path.join(self.directory, one)
            try:
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    continue
                names = sorted(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if not name.endswith(".json") or name.startswith("."):
                    continue
                if key is not None and not name.startswith(key):
                    continue
                path = os.path.join(directory, name)
                record = self._read(path)
                if record is not None:
                    record["_path"] = path
                    yield record

    @staticmethod
    def _read(path: str) -> dict | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            LOG.warning("Ignoring registry record %s: %s", path, exc)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                LOG.warning("Ignoring registry record %s: not a regular "
                            "file", path)
                return None
            data = os.read(fd, 64 * 1024)
        finally:
            os.close(fd)
        if not data:
            return None     # an intent being written
        try:
            record = json.loads(data)
        except ValueError as exc:
            LOG.warning("Ignoring unreadable registry record %s: %s", path,
                        exc)
            return None
        if not isinstance(record, dict) or not isinstance(
                record.get("disk"), str):
            return None
        if "state" not in record:
            # Written before intents existed: after the disk was made, and
            # only for qcow2 overlays.
            record["state"] = DONE
            record.setdefault("format", "qcow2")
        for name in _RECORD_KEYS:
            record.setdefault(name, None)
        return record

    def find(self, disk_path: str) -> dict | None:
        """The record of the disk at ``disk_path``, if the library made it:
        the newest *done* record whose disk is still that file, else the
        newest intent record whose attempt published the file there.  Only
        records tied to their file (inode, and a label where the filesystem
        has extended attributes) count, so a file put at a recorded path by
        anything else is never taken for the library's disk.  Read-only.

        :returns: the record (see :meth:`records`), or ``None``: the file
            was not made by the library, or is not the file it made.
        """
        try:
            st = os.stat(disk_path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        names = {os.path.abspath(disk_path), os.path.realpath(disk_path)}
        found = [r for name in names
                 for r in self.records(key=self._key(name))
                 if r["disk"] == name and _names_file(r, st)]
        for state in (DONE, INTENT):
            mine = [r for r in found if r["state"] == state]
            if mine:
                return max(mine, key=lambda r: _number(r["created_at"]))
        return None

    def collect(self, cid: str, bases_of, now: float | None = None) -> int:
        """Remove this host's records of image ``cid`` that no longer
        describe a disk: neither the disk nor the attempt's temporary file
        exists (or the disk is another file now), or a qcow2 disk no longer
        uses a base.  An intent record younger than :data:`INTENT_GRACE`
        is kept whatever its files look like; an older one belongs to an
        attempt that died, whose temporary file is removed first.

        The caller holds the image's use lock exclusively, so no creation
        of the image (which holds it shared from before its intent record
        until its record is done or removed) is in progress.

        :param bases_of: ``bases_of(path, stat)`` -> bases the disk uses.
        :returns: the number of records removed.
        """
        now = time.time() if now is None else now
        removed = 0
        for record in list(self.records(cid)):
            if record["host"] != self.host:
                continue
            if record["state"] != DONE:
                if now - _number(record["created_at"]) < INTENT_GRACE:
                    continue
                self._remove_dead_temp(record)
            if self._describes_a_disk(record, bases_of):
                continue
            if fileutils.remove_quietly(record["_path"]):
                removed += 1
        try:
            os.rmdir(os.path.join(self.directory, cid))
        except OSError:
            pass        # not empty, or already gone
        return removed

    @staticmethod
    def _remove_dead_temp(record) -> None:
        """Remove the temporary file of an attempt that died (its intent
        is old and, as the image's use lock is held exclusively, no
        creation is running): scratch, like a ``.part`` in the cache.  Only
        the very file the record names -- beside its disk, hidden, with the
        attempt's inode and label -- is removed; if the attempt had already
        published it, that removes a second name, not the disk.
        """
        tmp, disk = record["tmp"], record["disk"]
        if not isinstance(tmp, str) or os.path.dirname(tmp) != (
                os.path.dirname(disk)):
            return
        name = os.path.basename(tmp)
        if not (name.startswith(".") and name.endswith(".tmp")):
            return
        try:
            st = os.lstat(tmp)
        except OSError:
            return
        if (not stat.S_ISREG(st.st_mode)
                or not isinstance(record.get("ino"), int)
                or not _is_its_disk(dict(record, disk=tmp), st)):
            return
        if fileutils.remove_quietly(tmp):
            LOG.info("Removed %s, left by a disk creation that did not "
                     "finish", tmp)

    @staticmethod
    def _describes_a_disk(record, bases_of) -> bool:
        tmp = record["tmp"]
        if isinstance(tmp, str) and os.path.lexists(tmp):
            return True
        disk = record["disk"]
        try:
            st = os.lstat(disk)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not _is_its_disk(record, st):
            return False
        if record["format"] == "raw":
            return True
        return bool(bases_of(disk, st))


def _names_file(record: dict, st: os.stat_result) -> bool:
    """Whether ``record`` is tied to a file, which is the regular file at
    its disk path (not a symlink), and that file is ``st``.
    """
    if not isinstance(record.get("ino"), int):
        return False
    try:
        here = os.lstat(record["disk"])
    except OSError:
        return False
    return (stat.S_ISREG(here.st_mode) and os.path.samestat(here, st)
            and _is_its_disk(record, here))


def _set_mark(path: str, token: str) -> bool:
    """Label the new file ``path`` with its record's token (an extended
    attribute), so that a record is never taken for another file that got
    the same name and a reused inode number.

    :returns: False where the filesystem has no extended attributes.
    """
    try:
        os.setxattr(path, MARK_XATTR, token.encode(), follow_symlinks=False)
        return True
    except OSError as exc:
        LOG.debug("Cannot label %s with its registry token: %s", path, exc)
        return False


def _is_its_disk(record: dict, st: os.stat_result) -> bool:
    """Whether the file at the record's disk path, whose stat is ``st``, is
    the file the record's attempt made (as far as the record says which).
    """
    if isinstance(record.get("ino"), int) and (
            record["ino"] != st.st_ino or record.get("dev") != st.st_dev):
        return False
    mark = record.get("mark")
    if isinstance(mark, str):
        try:
            found = os.getxattr(record["disk"], MARK_XATTR,
                                follow_symlinks=False)
        except OSError:
            return False
        return found == mark.encode()
    return True


def _number(value) -> float:
    return value if isinstance(value, (int, float)) else 0.0
