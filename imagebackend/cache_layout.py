"""Names in ``_base``, and reading the whole cache directory at once.

A base's *stem* is its file name: ``<cache_id>`` for an image's first
generation, ``<cache_id>-<N>`` (N = 2, 3, ...) for the later ones.  Every
other file of that generation is named after the stem (see
:mod:`imagebackend.cache` for the layout).  This module only reads; the
cache, the pruner and the verifier decide what to do with what it finds.
"""

import dataclasses
import datetime
import hashlib
import logging
import os
import re
import secrets
import stat

from imagebackend import fileutils

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
#: created (see :mod:`imagebackend.cache_usage`).
DISKS_DIR = ".disks"
#: hidden directory in ``_base`` where image sources may remember small
#: facts about their images (such as content hashes).
SOURCES_DIR = ".sources"


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
    record: dict
    record_mtime: float | None

    @property
    def kind(self) -> str:
        return "base" if self.name.size is None else "sized"

    @property
    def cid(self) -> str:
        return self.name.cid

    @property
    def generation(self) -> int:
        return self.name.generation

    @property
    def image_id(self) -> str | None:
        return self.record.get("image_id")

    @property
    def allocated(self) -> int:
        return self.st.st_blocks * 512

    @property
    def stale(self) -> bool:
        return bool(self.record.get("stale"))

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
    #: stem -> (record, record mtime), for every record found
    records: dict = dataclasses.field(default_factory=dict)
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
                record = fileutils.read_json(entry.path) or {}
                layout.records[name.stem] = (record, st.st_mtime)
        elif name.is_scratch:
            layout.scratch.append((name, entry.path))
        elif name.suffix in ASIDE_SUFFIXES:
            layout.aside.append((name, entry.path, st))
        else:
            found.append((name, entry.path, st))
    for name, path, st in found:
        record, mtime = layout.records.get(name.stem, ({}, None))
        layout.bases.append(CachedFile(name=name, path=path, st=st,
                                       record=record, record_mtime=mtime))
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
        ``record``, ``scratch``, ``aside``.
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
            kinds.add("record")
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
        st = os.stat(path)
    except FileNotFoundError:
        return None
    record = fileutils.read_json(path)
    if record is None:
        return None
    record.update(changes)
    fileutils.write_json_atomic(path, record)
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
    record = fileutils.read_json(record_path)
    if record is None or record.get("stale"):
        return False
    LOG.info("Marking cached base %s stale: %s",
             record_path[:-len(".json")], reason)
    update_record(record_path, {"stale": True, "stale_reason": reason})
    return True


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
            "format": f.record.get("format"),
            "last_used": isotime(f.last_used),
            "disks": len(users_of(f.name.name)) if users_of else 0,
            "stale": f.stale,
        })
    return found
