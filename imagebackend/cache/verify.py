#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""Checking cached bases against their records: ``cache verify``.

Each base's record keeps the checksum of the bytes the source served
(``checksum``: algorithm and value).  A base renamed straight from the
download holds exactly those bytes and is re-hashed with that algorithm.
A converted base holds other bytes, so its record also keeps
``base_checksum``: a hash over the base file's non-zero 64 KiB blocks,
each prefixed with its offset (scheme ``sparse-64k-xxh3-padded``, or
``sparse-64k-xxh3`` or ``sparse-64k`` in records of earlier releases: see
:mod:`imagebackend.common.digest`).  Holes and zero blocks are skipped, so the
digest is cheap for sparse files and the same for a raw base and any sized
base grown from it, which is how raw sized bases are verified (under an
earlier scheme, over the first bytes of the sized base, as many as its
original has, and the rest must be zeros).  Non-raw bases also go through
``qemu-img check``.

A sized base has a record of its own (``<stem>_<size>.json``, kind
``sized``) with the sparse digest of its bytes, so it stays verifiable
after its original is pruned; without it, it is checked against its
original's digest while that is known, and is otherwise unverifiable.

A base without a valid record (missing, not JSON, a symlink, fields of the
wrong type, no checksum) is ``unverified``: it is never used again (see
:mod:`imagebackend.cache`).  ``cache verify`` exits non-zero for it as for
a corrupt one.

With ``repair``, under the image's fetch lock and use lock: a corrupt base
nothing uses is moved aside (renamed to ``<name>.corrupt``, its overlay
templates removed) and its generation marked stale, so the next use
fetches the image again; a
corrupt base in use is only marked stale (moving it would break the disks
using it, which are reported).  An unverifiable base is marked stale and
never moved.
"""

import functools
import logging
import os
import typing

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.cache import results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import store as cache_store
from imagebackend.cache import templates as cache_templates
from imagebackend.cache import usage as cache_usage
from imagebackend.common import digest
from imagebackend import exception
from imagebackend import inspection

LOG = logging.getLogger(__name__)

# The hash under the sparse scheme base_checksum records are written with.
_SPARSE_HASH = "xxh3_128"


def digests(path: str, algos: typing.Sequence[str] = (),
            sparse: bool = True, scheme: str = digest.SPARSE,
            length: int | None = None) -> dict:
    """Hash file ``path`` (never through a symlink) in one pass, reading
    only its data extents: see :func:`imagebackend.common.digest.file_digests`.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return digest.file_digests(fd, algos, sparse, scheme, length)
    finally:
        os.close(fd)


def sparse_digest(path: str) -> dict:
    """The ``base_checksum`` record of file ``path``."""
    return {"algo": _SPARSE_HASH, "scheme": digest.SPARSE,
            "value": digests(path)["sparse"]}


def _recorded_sparse(record: dict) -> tuple[str, str] | None:
    """``(scheme, value)`` of a record's ``base_checksum``, if any."""
    checksum = record.get("base_checksum") or {}
    if checksum.get("value") is None:
        return None
    return checksum.get("scheme") or digest.SPARSE_SHA256, checksum["value"]


def _converted(record: dict) -> bool:
    if "converted" in record:
        return bool(record["converted"])
    try:
        return inspection.qemu_format(record.get("source_format") or
                                      "raw") != record.get("format")
    except ValueError:
        return True


class Verifier:
    """Checks the bases of one cache against their records, and repairs.

    :param store: the cache's paths and locks.
    :param qemu: a function returning the
        :class:`~imagebackend.qemu.img.QemuImg` that runs ``qemu-img
        check`` on non-raw bases, called when the first one is checked (a
        cache of raw bases, or an empty one, imports no qemu-img code).
    :param scanner: finds the disks that use a corrupt base.
    """

    def __init__(self, store: cache_store.Store,
                 qemu: typing.Callable[[], typing.Any],
                 scanner: cache_usage.UsageScanner) -> None:
        self.store = store
        self._make_qemu = qemu
        self.scanner = scanner

    @functools.cached_property
    def qemu(self):
        """The QemuImg, made when first needed."""
        return self._make_qemu()

    def check_base(self, f: cache_scan.CachedFile
                   ) -> tuple[str, str, tuple[str, str] | None]:
        """Verify original base ``f``.

        :returns: ``(status, detail, (scheme, sparse digest) or None)``;
            status is ``ok``, ``corrupt`` or ``unverified``.
        """
        record = f.record
        if not f.trusted:
            return ("unverified", "it has no valid metadata record (missing, "
                    "unreadable, a symlink or of the wrong shape), so nothing "
                    "can vouch for its bytes; it is never used again, and "
                    "'cache prune' removes it once no disk uses it", None)
        fmt = record["format"]
        checksum = record.get("checksum") or {}
        converted = _converted(record)
        algos = [] if converted or not checksum.get("value") else [
            checksum.get("algo") or "sha256"]
        recorded = _recorded_sparse(record) if not algos else None
        scheme = recorded[0] if recorded else digest.SPARSE
        try:
            found = digests(f.path, algos, sparse=fmt == "raw", scheme=scheme)
        except ValueError:
            return ("unverified", "its record names an unknown hash algorithm "
                    "%r" % (algos[0] if algos else scheme), None)
        problems = []
        status = "ok"
        if algos:
            actual = found["full"][algos[0]]
            if actual != checksum["value"].lower():
                problems.append("its %s is %s, the image's is %s"
                                % (algos[0], actual, checksum["value"]))
        elif recorded is None:
            status = "unverified"
            problems.append("no digest of the converted base is recorded; "
                            "invalidate the image to fetch it again")
        elif found["sparse"] != recorded[1]:
            problems.append("its content digest is %s, the record says %s"
                            % (found["sparse"], recorded[1]))
        if fmt == "raw" and record.get("virtual_size") not in (None,
                                                               found["size"]):
            problems.append("it is %d bytes long, the record says %d"
                            % (found["size"], record["virtual_size"]))
        problems += self._qemu_check(f.path, fmt)
        if problems and status == "ok":
            status = "corrupt"
        sparse = None
        if status == "ok" and found["sparse"] is not None:
            sparse = (scheme, found["sparse"])
        return status, "; ".join(problems), sparse

    def check_sized(self, f: cache_scan.CachedFile,
                    expected: tuple[str, str] | None) -> tuple[str, str]:
        """Verify sized base ``f`` against the digest in its own record, or
        else its original's sparse digest ``expected`` (``(scheme, value)``).
        """
        own = f.own_record
        fmt = (own or f.record).get("format") or "raw"
        length = None
        if own is not None:
            expected = (own["digest"]["scheme"], own["digest"]["value"])
        elif fmt != "raw" or expected is None:
            return ("unverified", "it has no valid record of its own, and "
                    "its original base's digest is not known; invalidate the "
                    "image to make it again")
        else:
            # The original's digest covers the original's length (a
            # scheme of earlier records does not pad its last block).
            length = f.record.get("virtual_size")
        try:
            found = digests(f.path, scheme=expected[0], length=length)
        except ValueError:
            return ("unverified", "its record names an unknown digest scheme "
                    "%r" % expected[0])
        problems = []
        if found["sparse"] != expected[1]:
            problems.append("its content differs from what its %s records"
                            % ("own record" if own is not None
                               else "original base's record"))
        if fmt == "raw" and found["size"] != f.name.size:
            problems.append("it is %d bytes long, its name says %d"
                            % (found["size"], f.name.size))
        problems += self._qemu_check(f.path, fmt)
        return ("corrupt" if problems else "ok"), "; ".join(problems)

    def _qemu_check(self, path, fmt) -> list[str]:
        if fmt == "raw":
            return []
        try:
            result = self.qemu.check(path, fmt)
        except exception.QemuImgError as exc:
            return ["qemu-img check failed: %s" % exc.message]
        if result.corruptions or result.check_errors:
            return ["qemu-img check found %d corruption(s) and %d error(s)"
                    % (result.corruptions, result.check_errors)]
        return []

    def verify(self, wanted: dict[str, str] | None = None, *,
               repair: bool = False) -> results.Verification:
        """Verify the bases of the images ``wanted`` (cache id -> image id;
        default: every base).

        :returns: one :class:`~imagebackend.cache.results.VerifiedFile` per
            file, and one per wanted image that is not cached.
        """
        layout = cache_scan.scan(self.store.base_dir)
        files = [f for f in layout.bases if wanted is None or f.cid in wanted]
        rows: list = []
        sparse: dict = {}
        shared = cache_scan.sharers(layout.bases)
        for f in sorted(files, key=lambda f: (f.kind != "base", f.name.name)):
            try:
                if f.kind == "base":
                    status, detail, found = self.check_base(f)
                    if found is not None:
                        sparse[f.name.stem] = found
                else:
                    # A raw sized base has its original's sparse digest: the
                    # one just verified, or else the one recorded for a
                    # converted base.
                    expected = (sparse.get(f.name.stem)
                                or (_recorded_sparse(f.record) if f.trusted
                                    else None))
                    status, detail = self.check_sized(f, expected)
            except FileNotFoundError:
                if os.path.lexists(f.path):
                    raise
                # Pruned (or invalidated) while we read it: nothing to verify.
                LOG.info("Cached %s %s was removed while it was being "
                         "verified", f.kind, f.path)
                continue
            if status == "corrupt":
                if shared.get(f.path):
                    detail += ("; its bytes are shared with %d other "
                               "base(s) (hard links), each verified on its "
                               "own record" % shared[f.path])
                LOG.warning("Cached %s %s is corrupt: %s", f.kind, f.path,
                            detail)
            rows.append((results.VerifiedFile(
                image_id=f.image_id, kind=f.kind, generation=f.generation,
                file=f.path, status=status, detail=detail), f))
        present = {f.cid for f in files}
        for cid, image_id in (wanted or {}).items():
            if cid not in present:
                rows.append((results.VerifiedFile(
                    image_id=image_id, kind=None, generation=None, file=None,
                    status="not cached"), None))
        if repair:
            self._repair_all(rows)
        return results.Verification(files=[row for row, _ in rows])

    def _repair_all(self, rows) -> None:
        """Repair the corrupt files of ``rows`` (``(VerifiedFile,
        CachedFile)`` pairs), then mark the unverifiable ones stale.
        """
        corrupt = [(row, f) for row, f in rows if row.status == "corrupt"]
        if corrupt:
            usage = self.scanner.scan()
            for row, f in corrupt:
                users = usage.of(f.name.name)
                if usage.unreadable and not users:
                    users = ["an unknown disk (cannot read %s)"
                             % ", ".join(usage.unreadable)]
                row.action = self._repair(f, users)
        for row, f in rows:
            if row.status == "unverified" and f is not None:
                row.action = self._mark_unverifiable(f)

    def _mark_unverifiable(self, f) -> str | None:
        """Mark the generation of an unverifiable file stale, under the
        image's locks; nothing is moved.
        """
        if f.record.get("stale"):
            return None     # already never used again
        try:
            with self.store.exclusive_image(f.cid):
                record_path = self.store.base_path(f.name.stem) + ".json"
                if f.trusted:
                    self.store.mark_stale(f.name.stem, "unverifiable")
                else:
                    cache_layout.write_stale_record(
                        record_path, f.image_id or "", f.generation,
                        "unverifiable: no valid record")
        except cache_locks.Busy:
            return "busy (a disk is being made from it); run again"
        return "marked stale, left in place; new disks use a fresh copy"

    def _repair(self, f, users) -> str:
        try:
            with self.store.exclusive_image(f.cid):
                users = users or self.scanner.users_of(f.cid, f.name.name)
                self.store.mark_stale(f.name.stem, "corrupt")
                if users:
                    return ("in use by %s: left in place, marked stale; new "
                            "disks use a fresh copy" % ", ".join(users))
                aside = f.path + ".corrupt"
                os.rename(f.path, aside)
                # Overlays of a base that is gone are never made again.
                cache_templates.drop(self.store.base_dir, f.name.name)
        except cache_locks.Busy:
            return "busy (a disk is being made from it); run again"
        LOG.warning("Moved corrupt cached %s %s aside to %s", f.kind, f.path,
                    aside)
        return "moved aside to %s" % aside
