"""Names in ``_base``, and reading the whole cache directory at once.

A base's *stem* is its file name: ``<cache_id>`` for an image's first
generation, ``<cache_id>-<N>`` (N = 2, 3, ...) for the later ones.  Every
other file of that generation is named after the stem (see
:mod:`imagebackend.cache` for the layout).  This module only reads; the
cache, the pruner and the verifier decide what to do with what it finds.
"""

import dataclasses
import datetime
import errno
import hashlib
import logging
import os
import re
import secrets
import stat

from imagebackend.common import fileio
from imagebackend import exception
from imagebackend.inspection import signatures

LOG = logging.getLogger(__name__)

#: hex digits of the token that makes a scratch name unique per attempt.
SCRATCH_TOKEN_HEX = 12
NAME_RE = re.compile(
    r"^(?P<cid>[0-9a-f]{40})"
    r"(?:-(?P<gen>[2-9]|[1-9][0-9]+))?"
    r"(?:_(?P<size>[1-9][0-9]*))?"
    r"(?P<suffix>(?P<scratch>\.part|\.converted)(?:-[0-9a-f]{%d})?"
    r"|\.json|\.corrupt|\.refused)?$" % SCRATCH_TOKEN_HEX)
#: the kinds of scratch file: ``<name>.part-<token>`` (a download, or a
#: sized base being built) and ``<name>.converted-<token>`` (a conversion).
#: Names without the token are the scratch of earlier releases.
SCRATCH_SUFFIXES = (".part", ".converted")
#: scratch nobody has modified for this long (seconds) is left over from a
#: crash; only ``cache prune`` removes it, and only then.  Every attempt
#: writes its own scratch (its name is unique), and nothing a fetch does
#: leaves its scratch unmodified for long: a download writes continuously,
#: and the longest step that only reads one (a conversion) is bounded by
#: ``[qemu_img] convert_cpu_seconds_per_gib`` (30 s per GiB: under 9 hours
#: for the largest image allowed by default).  The age, not a lock, is what
#: keeps one host from removing the scratch of a fetch running on another
#: host that locks elsewhere.
SCRATCH_MINIMUM_AGE = 86400
ASIDE_SUFFIXES = (".corrupt", ".refused")
#: hidden directory in ``_base`` where the library records the disks it
#: created (see :mod:`imagebackend.cache.usage`).
DISKS_DIR = ".disks"
#: hidden directory in ``_base`` where image sources may remember small
#: facts about their images (such as content hashes).
SOURCES_DIR = ".sources"
#: hidden directory in ``_base`` holding, per image, one empty file per
#: generation number ever claimed (``.generations/<cache_id>/<N>``); never
#: pruned, so a generation number is never used twice.
GENERATIONS_DIR = ".generations"
#: the cache's private directories in ``_base``.
#: hidden directory in ``_base`` naming the lock directories its users
#: lock in (see :func:`imagebackend.cache.locks.check_shared`).
LOCK_DIRS_DIR = ".lock-dirs"
PRIVATE_DIRS = (DISKS_DIR, SOURCES_DIR, GENERATIONS_DIR, LOCK_DIRS_DIR)
#: a record larger than this is not one the cache wrote.
MAX_RECORD_BYTES = 1024 * 1024
#: formats a base's record may name (what qemu-img's ``-f`` takes).
RECORD_FORMATS = frozenset(signatures.QEMU_FORMAT_NAMES)


def cache_id(image_id: str) -> str:
    """The cache's name for an image: the sha1 of its id, in hex."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def stem(cid: str, generation: int) -> str:
    """The file name of generation ``generation`` of image ``cid``."""
    return cid if generation == 1 else "%s-%d" % (cid, generation)


@dataclasses.dataclass
class Name:
    """A file name in ``_base``, taken apart."""

    name: str
    cid: str
    generation: int
    size: int | None
    suffix: str

    @property
    def stem(self) -> str:
        return stem(self.cid, self.generation)

    @property
    def is_scratch(self) -> bool:
        """Whether this names scratch (a fetch's or a build's)."""
        return self.suffix.startswith(SCRATCH_SUFFIXES)

    @property
    def base_name(self) -> str:
        """The name without its suffix (a base or a sized base)."""
        return self.name[:len(self.name) - len(self.suffix)]


def parse(name: str) -> Name | None:
    """Take a name in ``_base`` apart; ``None`` if it is not the cache's."""
    match = NAME_RE.match(name)
    if match is None:
        return None
    size = match.group("size")
    return Name(name=name, cid=match.group("cid"),
                generation=int(match.group("gen") or 1),
                size=int(size) if size else None,
                suffix=match.group("suffix") or "")


@dataclasses.dataclass
class CachedFile:
    """A base or sized base found in ``_base``."""

    name: Name
    path: str
    st: os.stat_result
    #: the generation's record (the original base's), ``{}`` if it has
    #: none that can be read
    record: dict
    record_mtime: float | None
    #: a sized base's own record (``<stem>_<size>.json``), if valid
    own_record: dict | None = None

    @property
    def kind(self) -> str:
        return "base" if self.name.size is None else "sized"

    @property
    def described(self) -> dict:
        """The record that describes this file best: a sized base's own
        record when its original's is gone.
        """
        if self.record or self.own_record is None:
            return self.record
        return self.own_record

    @property
    def cid(self) -> str:
        return self.name.cid

    @property
    def generation(self) -> int:
        return self.name.generation

    @property
    def image_id(self) -> str | None:
        image_id = self.described.get("image_id")
        return image_id if isinstance(image_id, str) else None

    @property
    def allocated(self) -> int:
        return self.st.st_blocks * 512

    @property
    def trusted(self) -> bool:
        """Whether the generation has a valid record (see
        :func:`valid_record`); a base without one is never used again.
        """
        return valid_record(self.record)

    @property
    def stale(self) -> bool:
        return bool(self.record.get("stale")) or not self.trusted

    @property
    def stale_reason(self) -> str:
        if not self.trusted and not self.record.get("stale"):
            return "it has no valid record"
        return str(self.record.get("stale_reason") or "marked")

    @property
    def last_used(self) -> float:
        """The record's mtime for a base (refreshed on every use), the
        file's mtime for a sized base.
        """
        if self.name.size is None and self.record_mtime is not None:
            return self.record_mtime
        return self.st.st_mtime


@dataclasses.dataclass
class Layout:
    """Everything :func:`scan` found in ``_base``."""

    base_dir: str
    bases: list[CachedFile] = dataclasses.field(default_factory=list)
    #: stem -> (record, record mtime), for every record file found; the
    #: record is ``{}`` when it cannot be read (it may not be
    #: :func:`valid_record`)
    records: dict = dataclasses.field(default_factory=dict)
    #: sized base name -> its own record (``{}`` if not valid), by file
    sized_records: dict = dataclasses.field(default_factory=dict)
    scratch: list[tuple[Name, str]] = dataclasses.field(default_factory=list)
    aside: list[tuple[Name, str, os.stat_result]] = dataclasses.field(
        default_factory=list)
    #: leftover temporary files of atomic JSON writes: (path, stat)
    temp: list[tuple[str, os.stat_result]] = dataclasses.field(
        default_factory=list)

    def cids(self) -> set[str]:
        """Every image with any file in the cache."""
        found = {f.cid for f in self.bases}
        found.update(parse(s).cid for s in self.records)
        found.update(parse(s).cid for s in self.sized_records)
        found.update(n.cid for n, _ in self.scratch)
        found.update(n.cid for n, _, _ in self.aside)
        return found

    def of_stem(self, stem_name: str) -> list[CachedFile]:
        return [f for f in self.bases if f.name.stem == stem_name]


def scan(base_dir: str) -> Layout:
    """Read ``base_dir`` once: bases, records, scratch and moved-aside
    files.  Symlinks and other non-regular files are ignored.
    """
    layout = Layout(base_dir=base_dir)
    try:
        entries = sorted(os.scandir(base_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return layout
    found = []
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".json.tmp"):
            st = _regular(entry)
            if st is not None:
                layout.temp.append((entry.path, st))
            continue
        name = parse(entry.name)
        if name is None:
            continue
        st = _regular(entry)
        if st is None:
            continue
        if name.suffix == ".json":
            if name.size is None:
                record = read_record(entry.path) or {}
                layout.records[name.stem] = (record, st.st_mtime)
            else:
                record = read_record(entry.path)
                if not valid_sized_record(record, name):
                    record = {}
                layout.sized_records[name.base_name] = record
        elif name.is_scratch:
            layout.scratch.append((name, entry.path))
        elif name.suffix in ASIDE_SUFFIXES:
            layout.aside.append((name, entry.path, st))
        else:
            found.append((name, entry.path, st))
    for name, path, st in found:
        record, mtime = layout.records.get(name.stem, ({}, None))
        own = layout.sized_records.get(name.name) if name.size else None
        layout.bases.append(CachedFile(name=name, path=path, st=st,
                                       record=record, record_mtime=mtime,
                                       own_record=own or None))
    return layout


def _regular(entry: os.DirEntry) -> os.stat_result | None:
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def generations(base_dir: str, cid: str) -> dict[int, set[str]]:
    """The generations of image ``cid`` with any file in ``base_dir``.

    :returns: generation -> the kinds of file it has: ``base``, ``sized``,
        ``record``, ``sized_record``, ``scratch``, ``aside``.
    """
    found: dict[int, set[str]] = {}
    try:
        names = os.listdir(base_dir)
    except FileNotFoundError:
        return found
    for entry in names:
        if not entry.startswith(cid):
            continue
        name = parse(entry)
        if name is None or name.cid != cid:
            continue
        kinds = found.setdefault(name.generation, set())
        if name.suffix == ".json":
            kinds.add("record" if name.size is None else "sized_record")
        elif name.is_scratch:
            kinds.add("scratch")
        elif name.suffix in ASIDE_SUFFIXES:
            kinds.add("aside")
        else:
            kinds.add("base" if name.size is None else "sized")
    return found


def update_record(path: str, changes: dict) -> dict | None:
    """Change fields of a metadata record, keeping its mtime (which is the
    base's last-used time).

    :returns: the new record, or ``None`` when there is no record.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    record = read_record(path)
    if record is None:
        return None
    record.update(changes)
    fileio.write_json_atomic(path, record)
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    except FileNotFoundError:
        pass
    return record


def mark_stale(record_path: str, reason: str) -> bool:
    """Mark the generation whose record is ``record_path`` stale: no new
    disk will use it.

    :returns: True if it was not stale before.
    """
    record = read_record(record_path)
    if record is None or record.get("stale"):
        return False
    LOG.info("Marking cached base %s stale: %s",
             record_path[:-len(".json")], reason)
    update_record(record_path, {"stale": True, "stale_reason": reason})
    return True


def check_private_dirs(base_dir: str) -> None:
    """Refuse a symlink (or anything but a directory) where the cache
    keeps its private directories (``.disks``, ``.sources``,
    ``.generations`` and their subdirectories): the cache would write
    through it.

    :raises imagebackend.exception.UnsafeCachePath: one is.
    """
    for name in PRIVATE_DIRS:
        top = os.path.join(base_dir, name)
        if not _check_dir(top):
            continue
        try:
            entries = list(os.scandir(top))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_symlink():
                _check_dir(entry.path)


def _check_dir(path: str) -> bool:
    """True if ``path`` is a directory, False if it is missing.

    :raises imagebackend.exception.UnsafeCachePath: it is anything else.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise exception.UnsafeCachePath(
            path=path, reason="the cache keeps a directory of its own "
                              "there, and never follows a symlink")
    return True


def write_stale_record(record_path: str, image_id: str, generation: int,
                       reason: str) -> None:
    """Give a base whose record is missing or not valid a record that
    says stale: its bytes are never trusted again (no new disk uses it,
    ``cache verify`` reports it unverifiable, ``cache prune`` removes it
    once nothing uses it).  Replaces whatever is at ``record_path``
    (a symlink there is replaced, never followed).
    """
    LOG.warning("Cached base %s has no valid record: marking it stale "
                "(%s)", record_path[:-len(".json")], reason)
    fileio.write_json_atomic(record_path, {
        "image_id": image_id, "generation": generation, "stale": True,
        "stale_reason": reason, "unverifiable": True})


# -- records: read without following symlinks, and checked ----------------

def read_record(path: str) -> dict | None:
    """Read the JSON record ``path``, never through a symlink and never
    from anything but a regular file of at most
    :data:`MAX_RECORD_BYTES` (:func:`imagebackend.common.fileio.read_json`).

    :returns: the record, or ``None`` when it is missing, a symlink, not a
        regular file, too large, or not a JSON object.
    """
    return fileio.read_json(path, limit=MAX_RECORD_BYTES)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _digest_ok(value, keys) -> bool:
    return (isinstance(value, dict)
            and all(isinstance(value.get(k), str) and value[k]
                    for k in keys))


def valid_record(record) -> bool:
    """Whether ``record`` is a base's record the cache can trust: the
    fields every use reads have the types the cache writes, and it holds
    a checksum to verify the base against.
    """
    if not isinstance(record, dict):
        return False
    if not (isinstance(record.get("image_id"), str)
            and record.get("format") in RECORD_FORMATS
            and _is_int(record.get("virtual_size"))
            and record["virtual_size"] >= 0
            and _digest_ok(record.get("checksum"), ("algo", "value"))):
        return False
    if "base_checksum" in record and not _digest_ok(
            record["base_checksum"], ("value",)):
        return False
    inspection = record.get("inspection", {})
    if not isinstance(inspection, dict) or not _is_int(
            inspection.get("version", 0)):
        return False
    return all(record.get(key) is None or isinstance(record[key], str)
               for key in ("identity", "source_format", "source"))


def valid_sized_record(record, name: "Name") -> bool:
    """Whether ``record`` is the own record of sized base ``name``
    (written before the sized base is published): it names that base and
    size and holds the digest of the sized base's bytes.
    """
    return (isinstance(record, dict)
            and record.get("kind") == "sized"
            and isinstance(record.get("image_id"), str)
            and record.get("base") == name.stem
            and _is_int(record.get("size")) and record["size"] == name.size
            and record.get("format") in RECORD_FORMATS
            and _digest_ok(record.get("digest"), ("scheme", "value")))


# -- generation numbers: claimed once, never reused ------------------------

def _open_dir(parent_fd: int | None, path: str, create: bool) -> int | None:
    """Open directory ``path`` (relative to ``parent_fd`` if given)
    without following a symlink; ``None`` if it is missing and not to be
    created.

    :raises imagebackend.exception.UnsafeCachePath: it is a symlink or
        not a directory.
    """
    if create:
        try:
            os.mkdir(path, 0o755, dir_fd=parent_fd)
            if parent_fd is not None:
                os.fsync(parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise exception.UnsafeCachePath(
                path=path, reason="it is a symlink or not a directory (the "
                                  "cache never follows symlinks)") from exc
        raise


def _generation_dir(base_dir: str, cid: str, create: bool) -> int | None:
    base_fd = _open_dir(None, base_dir, False)
    if base_fd is None:
        return None
    try:
        try:
            top = _open_dir(base_fd, GENERATIONS_DIR, create)
        except exception.UnsafeCachePath as exc:
            raise exception.UnsafeCachePath(
                path=os.path.join(base_dir, GENERATIONS_DIR),
                reason=exc.kwargs["reason"]) from exc
    finally:
        os.close(base_fd)
    if top is None:
        return None
    try:
        try:
            return _open_dir(top, cid, create)
        except exception.UnsafeCachePath as exc:
            raise exception.UnsafeCachePath(
                path=os.path.join(base_dir, GENERATIONS_DIR, cid),
                reason=exc.kwargs["reason"]) from exc
    finally:
        os.close(top)


def claimed_generation(base_dir: str, cid: str) -> int:
    """The highest generation number ever claimed for image ``cid``
    (0 if none).

    :raises imagebackend.exception.UnsafeCachePath: the claims directory
        is a symlink or not a directory.
    """
    fd = _generation_dir(base_dir, cid, create=False)
    if fd is None:
        return 0
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    return max((int(n) for n in names if n.isdigit() and len(n) < 10),
               default=0)


def claim_generation(base_dir: str, cid: str, floor: int) -> int:
    """Claim a generation number for image ``cid`` no lower than ``floor``
    and higher than any claimed before, durably, before anything of that
    generation is written.  The claim is an exclusive create, so two
    claimers never get the same number, even without a shared lock.

    :returns: the number claimed.
    """
    fd = _generation_dir(base_dir, cid, create=True)
    try:
        number = max(floor, 1)
        for name in os.listdir(fd):
            if name.isdigit() and len(name) < 10:
                number = max(number, int(name) + 1)
        while True:
            try:
                claim = os.open(str(number), os.O_WRONLY | os.O_CREAT
                                | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                0o644, dir_fd=fd)
            except FileExistsError:
                number += 1
                continue
            os.close(claim)
            os.fsync(fd)
            return number
    finally:
        os.close(fd)


def scratch_name(final: str, kind: str = ".part") -> str:
    """A new scratch path for ``final`` (a path in ``_base``), unique to
    this attempt: ``<final><kind>-<12 hex digits>``.

    :param kind: one of :data:`SCRATCH_SUFFIXES`.
    """
    if kind not in SCRATCH_SUFFIXES:
        raise ValueError("not a kind of scratch: %r" % (kind,))
    return "%s%s-%s" % (final, kind,
                        secrets.token_hex(SCRATCH_TOKEN_HEX // 2))


def isotime(ts: float) -> str:
    """``ts`` (seconds since the epoch) as an ISO 8601 UTC time."""
    return datetime.datetime.fromtimestamp(
        ts, datetime.timezone.utc).isoformat(timespec="seconds")


def rows(layout: Layout, users_of=None) -> list[dict]:
    """The ``cache list`` rows of ``layout``.

    :param users_of: ``users_of(file name)`` -> the disks using that base.
    """
    found = []
    for f in layout.bases:
        found.append({
            "image_id": f.image_id,
            "kind": f.kind,
            "generation": f.generation,
            "file": f.path,
            "size_on_disk": f.allocated,
            "virtual_size": (f.name.size if f.kind == "sized"
                             else f.record.get("virtual_size")),
            "format": f.described.get("format"),
            "last_used": isotime(f.last_used),
            "disks": len(users_of(f.name.name)) if users_of else 0,
            "stale": f.stale,
        })
    return found
