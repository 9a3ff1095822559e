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
import logging
import os
import re
import stat
import time

from oslo_config import cfg

from imagebackend import cache_layout
from imagebackend import cache_registry

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

#: the registry of disks the library made (kept here for callers that
#: know it as ``cache_usage.Registry``).
Registry = cache_registry.Registry

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
