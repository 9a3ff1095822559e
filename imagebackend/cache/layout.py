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

"""Names in ``_base``, and the records that describe what they hold.

A base's *stem* is its file name: ``<cache_id>`` for an image's first
generation, ``<cache_id>-<N>`` (N = 2, 3, ...) for the later ones.  Every
other file of that generation is named after the stem.

The layout (``cache_id`` is
:func:`imagebackend.common.digest.cache_id`, the sha1 of the image id)::

    _base/<cache_id>             generation 1 of an image: a complete,
                                 verified base; it only appears by rename
    _base/<cache_id>-<N>         generation N (2, 3, ...) of the same image
    _base/<stem>.json            the generation's metadata record (written
                                 before the base is renamed into place)
    _base/<stem>_<size>          a sized base for the cached-base backend:
                                 the base grown to <size> bytes (decimal)
    _base/<stem>_<size>.json     the sized base's own record ("kind":
                                 "sized", its digest), written before the
                                 sized base is published, so it stays
                                 verifiable after its original is pruned
    _base/<stem>.part-<hex>      scratch: a download in progress
    _base/<stem>.converted-<hex> scratch: a conversion in progress
    _base/<stem>_<size>.part-<hex>  scratch: a sized base being built
    _base/<base>.template-<size>-<key>
                                 an overlay template of base or sized base
                                 <base> (:mod:`imagebackend.cache.templates`);
                                 :func:`parse` never matches it
    _base/<name>.corrupt         moved aside by ``cache verify --repair``
    _base/<name>.refused         moved aside by earlier releases
    _base/.disks/<cache_id>/     the disks the library made from the image,
                                 one record per creation attempt
                                 (:mod:`imagebackend.cache.registry`)
    _base/.generations/<cache_id>/<N>
                                 one empty file per generation number ever
                                 claimed; never pruned
    _base/.sources/              small facts image sources remember
    _base/.lock-dirs/            which lock directories use this _base
    locks/                       inter-process lock files (beside _base)

A generation's record is read without following a symlink and checked
(:func:`valid_record`) before anything trusts it.  Reading the whole
directory at once is :mod:`imagebackend.cache.scan`; generation numbers
are :mod:`imagebackend.cache.generations`.
"""

import dataclasses
import datetime
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
#: hidden directory in ``_base`` naming the lock directories its users
#: lock in (see :func:`imagebackend.cache.lockdirs.check_shared`).
LOCK_DIRS_DIR = ".lock-dirs"
#: the cache's private directories in ``_base``.
PRIVATE_DIRS = (DISKS_DIR, SOURCES_DIR, GENERATIONS_DIR, LOCK_DIRS_DIR)
#: a record larger than this is not one the cache wrote.
MAX_RECORD_BYTES = 1024 * 1024
#: formats a base's record may name (what qemu-img's ``-f`` takes).
RECORD_FORMATS = frozenset(signatures.QEMU_FORMAT_NAMES)


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
