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

"""Bases shared by content: one inode under every image id that holds the
same bytes.

Each image id keeps its own base name and its own record, exactly as if
nothing were shared; underneath, two names may be hard links to one file.
Removing, moving aside or marking one name stale never touches the
other's (a link count keeps the bytes while any name is left), and no
code writes to a published base, so one id's bytes cannot change through
another's.

Two ways a fetch comes to share:

* **After writing** (:func:`publish_shared`): a fetch that has its base's
  bytes in a checked scratch file looks up, in the index built from our
  records (:func:`index`), the bases recorded with the same content key
  (format, virtual size, and the digest we computed over the bytes we
  wrote: ``base_checksum`` for a converted base, ``checksum`` for one
  published as downloaded).  The key only picks candidates: the bytes of
  the scratch and of the candidate are then compared in full, so neither
  a weak digest, a collision nor a base changed after it was published
  can make two different contents share.  When they are equal the
  candidate's inode is published under the new name and the scratch is
  removed.
* **Instead of downloading** (:func:`link_same_image`): an image whose
  source records a strong hash (``sha256``, ``sha384`` or ``sha512``:
  Glance's ``os_hash_algo`` / ``os_hash_value``) equal to the download
  checksum *we* recorded for a cached base (after verifying the download
  against it), with the same declared format, size, conversion and
  inspection policy, is not downloaded: that base's inode is published
  under the new name, with a record of its own.  An md5 ``checksum`` never
  counts.  The candidate's size and modification time must still be those
  its record holds (a cheap check that nothing wrote to it since); a
  change that leaves both (a disk's bit rot) is what ``cache verify``
  finds, on every name sharing the bytes.

Only a published base with a valid record that is not stale is ever a
candidate; it is opened without following a symlink and linked by its
descriptor (the very inode that was checked), first under a scratch name
then with the no-replace publish of
:func:`imagebackend.cache.publish.publish_base`, so a crash leaves at most
a scratch link that ``cache prune`` removes like any scratch.
"""

import errno
import logging
import os
import stat
import time

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.cache import reinspect as cache_reinspect
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import store as cache_store
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio

LOG = logging.getLogger(__name__)

#: the source hash algorithms that may stand for an image's bytes.
STRONG_ALGOS = frozenset({"sha256", "sha384", "sha512"})
# Bytes compared at a time.
_CHUNK = 4 * 1024 * 1024
# Record fields a base shared instead of downloaded takes from the
# record of the base it shares: they describe the bytes.
_SHARED_FIELDS = ("source_format", "format", "converted", "size",
                  "virtual_size", "checksum", "base_checksum", "inspection",
                  "disk_format", "base_mtime_ns")


def content_key(record) -> tuple | None:
    """The key naming the bytes of the base ``record`` describes:
    ``(format, virtual size, digest algorithm, digest)``, from digests we
    computed over the bytes we wrote; ``None`` for a record that cannot
    be shared from (not valid, stale, or a converted base without a
    digest of its own bytes).
    """
    if not cache_layout.valid_record(record) or record.get("stale"):
        return None
    sparse = record.get("base_checksum")
    if sparse:
        algo = sparse.get("scheme") or content_digest.SPARSE_SHA256
        value = sparse["value"]
    elif record.get("converted"):
        return None
    else:
        algo = record["checksum"]["algo"]
        value = record["checksum"]["value"].lower()
    return record["format"], record["virtual_size"], algo, value


def index(base_dir: str) -> dict[tuple, list[str]]:
    """Content key -> the stems of the bases recorded with it (valid
    records, not stale, whose base is a regular file), built from the
    records in ``base_dir``.
    """
    found: dict[tuple, list[str]] = {}
    for f in cache_scan.scan(base_dir).bases:
        if f.kind != "base":
            continue
        key = content_key(f.record)
        if key is not None:
            found.setdefault(key, []).append(f.name.stem)
    return found


def _open_candidate(store: cache_store.Store, stem: str, key: tuple,
                    size: int | None = None):
    """Open base ``stem`` to share it: ``(fd, stat, record)``, or None
    when it is not (or no longer) a published base of a valid record
    that is not stale, with content key ``key``, ``size`` bytes long
    (when given) and unmodified since it was recorded (when its record
    holds its modification time).
    """
    path = store.base_path(stem)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        record = cache_layout.read_record(path + ".json")
        recorded_mtime = (record or {}).get("base_mtime_ns")
        if (stat.S_ISREG(st.st_mode)
                and os.path.samestat(st, os.lstat(path))
                and st.st_dev == os.lstat(store.base_dir).st_dev
                and content_key(record) == key
                and (size is None or st.st_size == size)
                and (recorded_mtime is None
                     or recorded_mtime == st.st_mtime_ns)):
            return fd, st, record
    except OSError:
        pass
    os.close(fd)
    return None


def same_bytes(fd_a: int, fd_b: int) -> bool:
    """Whether the open files ``fd_a`` and ``fd_b`` hold the same bytes:
    read in full from both, except ranges that are holes in both.
    """
    size = os.fstat(fd_a).st_size
    if os.fstat(fd_b).st_size != size:
        return False
    buf_a, buf_b = bytearray(_CHUNK), bytearray(_CHUNK)
    offset = 0
    while offset < size:
        offset = min(_seek(fd_a, offset, os.SEEK_DATA, size),
                     _seek(fd_b, offset, os.SEEK_DATA, size))
        # Up to where both files have a hole again.
        end = max(_seek(fd_a, offset, os.SEEK_HOLE, size),
                  _seek(fd_b, offset, os.SEEK_HOLE, size))
        want = min(_CHUNK, end - offset, size - offset)
        if want <= 0:
            break
        if want != len(buf_a):
            buf_a, buf_b = bytearray(want), bytearray(want)
        # Whole buffers compare with memcmp; a short read is a change.
        if (os.preadv(fd_a, [buf_a], offset) != want
                or os.preadv(fd_b, [buf_b], offset) != want
                or buf_a != buf_b):
            return False
        offset += want
    return True


def _seek(fd: int, offset: int, whence: int, size: int) -> int:
    """Where ``lseek(fd, offset, whence)`` (``SEEK_DATA``/``SEEK_HOLE``)
    lands: ``size`` past the last data, and where the filesystem cannot
    tell, ``offset`` for data and ``size`` for a hole (all data).
    """
    try:
        return min(os.lseek(fd, offset, whence), size)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        return offset if whence == os.SEEK_DATA else size


def _link_scratch(fd: int, final: str) -> str | None:
    """Give the open file ``fd`` a new scratch name beside ``final`` (by
    its descriptor, so exactly that inode); None where the filesystem
    cannot hard-link it.
    """
    scratch = cache_layout.scratch_name(final, ".part")
    directory, name = os.path.split(scratch)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # dst_dir_fd makes Python call linkat(..., AT_SYMLINK_FOLLOW): the
        # file /proc/self/fd/N refers to is linked, not the magic link.
        os.link("/proc/self/fd/%d" % fd, name, dst_dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK,
                         errno.ENOENT, errno.EINVAL, errno.ENOSYS,
                         errno.EOPNOTSUPP):
            LOG.debug("Cannot hard-link a shared base as %s (%s)",
                      scratch, exc)
            return None
        raise
    finally:
        os.close(dir_fd)
    return scratch


def _publish_link(store, stem, fd, record) -> dict | None:
    """Publish the open base ``fd`` (another id's) as generation ``stem``
    with ``record``; None when it cannot be linked.
    """
    scratch = _link_scratch(fd, store.base_path(stem))
    if scratch is None:
        return None
    # The scratch link has the shared file's age, so a prune may take it
    # for a crash's leftover and remove it meanwhile: harmless, since the
    # publish links the descriptor, and removing a name frees nothing.
    try:
        return cache_publish.publish_base(store, stem, fd, scratch, record)
    finally:
        # Gone once published; left only by a failure.
        fileio.remove_quietly(scratch)


def publish_shared(store: cache_store.Store, stem: str, fd: int, path: str,
                   record: dict) -> dict | None:
    """Publish generation ``stem`` as a link to a cached base holding the
    same bytes as this fetch's checked scratch file ``fd`` (named
    ``path``), if there is one; the scratch is then removed.

    :param record: the new generation's own record (its digests were
        computed over the scratch's bytes).
    :returns: the published record, or None when no cached base holds the
        same bytes (the caller publishes its scratch).
    """
    key = content_key(record)
    if key is None:
        return None
    own_cid = cache_layout.parse(stem).cid
    size = os.fstat(fd).st_size
    for other in index(store.base_dir).get(key, ()):
        if cache_layout.parse(other).cid == own_cid:
            continue
        opened = _open_candidate(store, other, key, size)
        if opened is None:
            continue
        cand_fd, st, _ = opened
        try:
            if not same_bytes(fd, cand_fd):
                LOG.warning("Cached base %s is recorded with the content "
                            "of image %s but holds other bytes; not "
                            "sharing it ('cache verify' checks it)",
                            store.base_path(other), record["image_id"])
                continue
            shared = dict(record, base_mtime_ns=st.st_mtime_ns,
                          shared_from=other)
            published = _publish_link(store, stem, cand_fd, shared)
        finally:
            os.close(cand_fd)
        if published is None:
            return None
        fileio.remove_quietly(path)
        LOG.info("Image %s holds the same bytes as cached base %s: "
                 "sharing them", record["image_id"], store.base_path(other))
        return published
    return None


def link_same_image(store: cache_store.Store, meta, stem: str,
                    requested_size: int | None, converts) -> dict | None:
    """Publish generation ``stem`` of image ``meta`` without downloading
    it, as a link to a cached base whose recorded download checksum is the
    strong hash the source records for ``meta`` (see the module
    docstring).

    :param converts: ``converts(format)``: whether a download of that
        format is converted now.
    :returns: the published record, or None when no cached base matches
        (the caller downloads).
    """
    algo = (meta.hash_algo or "").lower()
    if (algo not in STRONG_ALGOS or not meta.hash_value
            or meta.identity_deferred or not meta.disk_format):
        return None
    value = meta.hash_value.lower()
    own_cid = cache_layout.parse(stem).cid
    for f in cache_scan.scan(store.base_dir).bases:
        record = f.record
        if (f.kind != "base" or f.cid == own_cid
                or not _matches(record, meta, algo, value, requested_size,
                                converts)):
            continue
        key = content_key(record)
        size = record["virtual_size"] if record["format"] == "raw" else None
        opened = _open_candidate(store, f.name.stem, key, size)
        if opened is None:
            continue
        cand_fd, _, found = opened
        try:
            if not _matches(found, meta, algo, value, requested_size,
                            converts):
                continue
            fields = {k: found[k] for k in _SHARED_FIELDS if k in found}
            record = dict(fields, image_id=meta.image_id,
                          generation=cache_layout.parse(stem).generation,
                          source=meta.source, identity=meta.identity,
                          shared_from=f.name.stem,
                          created_at=cache_layout.isotime(time.time()))
            published = _publish_link(store, stem, cand_fd, record)
        finally:
            os.close(cand_fd)
        if published is not None:
            LOG.info("Image %s has the %s of cached base %s: sharing it "
                     "instead of downloading", meta.image_id, algo,
                     store.base_path(f.name.stem))
        return published
    return None


def _matches(record, meta, algo, value, requested_size, converts) -> bool:
    """Whether ``record`` describes the bytes image ``meta`` would be
    cached as: the same strong download checksum, declared format and
    size, converted as a fetch would convert it now, under the current
    inspection policy, and no larger than the disk to be made.
    """
    if content_key(record) is None:
        return False
    checksum = record["checksum"]
    if (checksum["algo"].lower() != algo
            or checksum["value"].lower() != value
            or record.get("disk_format") != meta.disk_format
            or (meta.size is not None and record.get("size") != meta.size)
            or cache_reinspect.needs_reinspection(record)):
        return False
    if requested_size is not None and record["virtual_size"] > requested_size:
        return False
    try:
        return bool(record.get("converted")) == bool(
            converts(record.get("source_format") or ""))
    except ValueError:
        return False
