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

"""Which disks use which cached bases -- without a database and without
running qemu-img.

A base is in use when a disk names it as its backing file.  Guests write
the content of their disks, so only these count as users:

- disks in the registry of disks the library created, one small JSON
  record per disk in ``_base/.disks/<cache_id>/``, which also covers disks
  made outside the searched directories.  A record carries the disk's
  ``format``: a disk recorded ``raw`` uses nothing and is never parsed
  (its first bytes are guest data).  A record whose disk is missing but
  whose ``tmp`` (the temporary file of a create in progress) exists uses
  the ``base`` it names.  A record of another host whose disk this host
  cannot see uses the ``base`` it names (the disk may be local to that
  host);
- other files found by walking ``instances_path`` (except the cache and
  lock directories) and every directory in ``[image_cache] disk_dirs``,
  without following symlinks: regular files only (``lstat``, opened with
  ``O_NOFOLLOW | O_NONBLOCK`` and checked again with ``fstat``), whose
  qcow2 header is read directly (a few bytes).

Only a backing name that leads straight into ``_base`` (after resolving
a relative name against the disk's directory, by name: the backing file
itself is never opened) is a use of the base it names; a name elsewhere,
a special file, a chain through files outside ``_base`` or a protocol
(``nbd://...``) is simply not a use of any base, and never stops pruning.
``json:{...}`` specifications count through their ``filename`` values.
"""

import dataclasses
import json
import logging
import os
import stat
import time

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import registry as cache_registry
from imagebackend.disk import chain as disk_chain
from imagebackend import exception
from imagebackend.inspection import signatures

LOG = logging.getLogger(__name__)


#: qemu refuses backing file names longer than this.
MAX_BACKING_NAME = 1023


def read_backing_file(path: str,
                      expected: os.stat_result | None = None) -> str | None:
    """The backing-file name in the header of qcow2 file ``path``.

    Only a regular file is read: it is opened without following a symlink
    and without blocking (a FIFO or device never hangs the reader), and
    checked with ``fstat`` to be a regular file -- the same one as
    ``expected``, when given.

    :returns: the name exactly as stored (it may be relative), or ``None``
        when ``path`` is not such a regular file, is not a qcow2 file, has
        no backing file, or has a header qemu would refuse.
    :raises OSError: ``path`` cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (
                expected is not None and not os.path.samestat(st, expected)):
            return None
        return parse_backing_file(lambda n, off: os.pread(fd, n, off))
    finally:
        os.close(fd)


def parse_backing_file(pread) -> str | None:
    """Read the backing-file name of a qcow2 image through ``pread(count,
    offset)``; see :func:`read_backing_file`.
    """
    head = pread(20, 0)
    if len(head) < 20 or not signatures.QCOW2.signed(head):
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
    """Resolves the backing files of disks to the bases of ``base_dir``
    they name; one per scan (it remembers what it has read).
    """

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir)
        # The same directory, as a backing name may spell it.
        self._dirs = {self.base_dir, os.path.realpath(self.base_dir)}
        self.unreadable: list[str] = []
        self._bases: dict[tuple[int, int], str] = {}
        self._names: set[str] = set()
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
                self._names.add(entry.name)

    def bases_of(self, path: str, st: os.stat_result) -> set[str]:
        """The bases disk ``path`` (found with ``lstat`` as ``st``) names
        as its backing file; one it cannot read is noted in
        :attr:`unreadable`.
        """
        try:
            return self.read_bases(path, st)
        except OSError as exc:
            LOG.warning("Cannot read the header of %s: %s", path, exc)
            self.unreadable.append(path)
            return set()

    def read_bases(self, path: str, st: os.stat_result) -> set[str]:
        """As :meth:`bases_of`, but raise what prevents reading.

        :raises OSError: the disk exists but cannot be read.
        """
        key = (st.st_dev, st.st_ino)
        if key in self._bases:
            return {self._bases[key]}
        if key not in self._memo:
            try:
                backing = read_backing_file(path, st)
            except FileNotFoundError:
                backing = None      # deleted while we looked
            self._memo[key] = (set() if backing is None
                               else self.resolve(path, backing))
        return self._memo[key]

    def resolve(self, disk: str, backing: str) -> set[str]:
        """The bases of ``base_dir`` the backing name ``backing`` of
        ``disk`` leads straight to (by name; nothing is opened).
        """
        if backing.startswith("json:"):
            try:
                spec = json.loads(backing[len("json:"):])
            except ValueError:
                return set()
            found = set()
            for name in _filenames(spec):
                found |= self.resolve(disk, name)
            return found
        if backing.startswith("file:"):
            backing = backing[len("file:"):]
        elif "://" in backing:
            return set()
        target = os.path.normpath(os.path.join(os.path.dirname(disk),
                                               backing))
        name = os.path.basename(target)
        if os.path.dirname(target) in self._dirs and name in self._names:
            return {name}
        return set()


def _filenames(spec, depth: int = 0):
    """The ``filename`` strings of a ``json:`` backing specification."""
    if depth > disk_chain.MAX_CHAIN:
        return
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key == "filename" and isinstance(value, str):
                yield value
            else:
                yield from _filenames(value, depth + 1)
    elif isinstance(spec, list):
        for value in spec:
            yield from _filenames(value, depth + 1)


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
        self.registry = cache_registry.Registry(base_dir, self.roots)

    def scan(self) -> Usage:
        """Search the registry and every root."""
        usage = Usage(scanned_at=time.time())
        chains = Chains(self.base_dir)
        # Registered disks first: a disk the registry knows (as raw or
        # as qcow2) is never parsed again by the walk.
        seen: set[tuple[int, int]] = set()
        for record in self._records(None, usage.unreadable):
            self._registered(chains, record, usage, seen)
        for root in self.roots:
            for path, st in self._walk(root, usage.unreadable):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                for name in chains.bases_of(path, st):
                    usage.add(name, path)
        usage.unreadable += chains.unreadable
        return usage

    def users_of(self, cid: str, name: str) -> list[str]:
        """Registered disks of image ``cid`` that use base ``name`` now
        (the pruner's last check, under the image's locks).
        """
        chains = Chains(self.base_dir)
        usage = Usage()
        unreadable: list[str] = []
        for record in self._records(cid, unreadable):
            self._registered(chains, record, usage, set())
        # A disk whose header cannot be read may use the base.
        return usage.of(name) + ["%s (unreadable)" % path
                                 for path in unreadable + chains.unreadable]

    def raw_disks(self) -> set[tuple[int, int]]:
        """``(st_dev, st_ino)`` of the existing disks the registry records
        as raw (never parsed: a guest writes their every byte).
        """
        found = set()
        for record in self._records(None, []):
            if record.get("format") == "raw" and isinstance(
                    record.get("disk"), str):
                st = _lstat(record["disk"])
                if st is not None and stat.S_ISREG(st.st_mode):
                    found.add((st.st_dev, st.st_ino))
        return found

    def _records(self, cid, unreadable):
        """The registry's records, after refusing a symlink where the
        registry keeps its directories.
        """
        try:
            cache_layout.check_private_dirs(self.base_dir)
        except exception.UnsafeCachePath as exc:
            LOG.warning("%s", exc.message)
            unreadable.append(self.registry.directory)
            return
        yield from self.registry.records(cid)

    def _registered(self, chains, record, usage, seen) -> None:
        path, fmt = record.get("disk"), record.get("format", "qcow2")
        if not isinstance(path, str) or not isinstance(fmt, str):
            LOG.warning("Ignoring invalid disk record %s",
                        record.get("_path"))
            return
        st = _lstat(path)
        if st is not None and stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return
            seen.add(key)
            if fmt == "raw":
                return      # guest data from the first byte: no header
            try:
                names = chains.read_bases(path, st)
            except OSError as exc:
                # The record is evidence enough that it uses its base.
                LOG.warning("Cannot read the header of disk %s: %s", path,
                            exc)
                names = self._recorded_base(record)
            for name in names:
                usage.add(name, path)
            return
        if fmt == "raw":
            return
        tmp = record.get("tmp")
        if isinstance(tmp, str) and _is_regular(tmp):
            # A create in progress (or interrupted): its disk will name,
            # or already names, the recorded base.
            for name in self._recorded_base(record):
                usage.add(name, tmp)
            return
        if record.get("host") != self.registry.host:
            # Perhaps on that host's local disk: trust the record.
            for name in self._recorded_base(record):
                usage.add(name, "%s:%s" % (record.get("host"), path))

    def _recorded_base(self, record) -> set[str]:
        """The base of ``_base`` a record names, if it names one."""
        base = record.get("base")
        if not isinstance(base, str):
            return set()
        name = cache_layout.parse(os.path.basename(base))
        if name is None or name.suffix:
            return set()
        return {name.name}

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


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (OSError, ValueError):
        return None


def _is_regular(path: str) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISREG(st.st_mode)
