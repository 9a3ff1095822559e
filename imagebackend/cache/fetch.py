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

"""The cache's miss path: choosing a generation, then downloading,
converting and publishing it.

Everything here runs under the image's lock, taken by
:meth:`imagebackend.cache.ImageCache.get`; the lock only saves duplicate
work, since a fetch writes and removes only scratch of its own and
publishes without replacing anything (see :meth:`Fetcher.fetch`).
"""

import errno
import functools
import logging
import os
import time
import typing

from oslo_config import cfg

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import lookup as cache_lookup
from imagebackend.cache import registry as cache_registry
from imagebackend.cache import reinspect as cache_reinspect
from imagebackend.cache import store as cache_store
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend.common import progress as common_progress
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend import inspection
from imagebackend.qemu import options as qemu_options
from imagebackend.sources import base as source_base

LOG = logging.getLogger(__name__)


def precheck_size(meta, requested_size: int | None) -> None:
    """Refuse, before downloading, an image the source says is larger
    than the disk to be made.

    :raises imagebackend.exception.InvalidImageSize: it is.
    """
    if requested_size is None:
        return
    known = meta.virtual_size
    if known is None and meta.disk_format == "raw":
        known = meta.size
    if known is not None and known > requested_size:
        raise exception.DiskSmallerThanImage(
            image_id=meta.image_id, virtual_size=known,
            requested_size=requested_size)


def _open_scratch(path: str) -> int:
    """Open this attempt's own scratch file to check and publish it.

    :raises imagebackend.exception.DiskOperationError: it is gone (only a
        prune that took it for a crash's leftover removes another's).
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise exception.DiskOperationError(
            path=path, reason="this fetch's scratch file cannot be opened "
            "(%s); something other than the cache changed it (a prune "
            "with a much shorter scratch age?); retry"
            % (exc.strerror or exc)) from exc


class Fetcher:
    """Fetches images into one cache.

    :param store: the cache's paths and locks.
    :param source: the image source.
    :param qemu: a function returning the
        :class:`~imagebackend.qemu.img.QemuImg` (check, convert), called
        when a fetch first runs qemu-img: a cache hit, which uses this
        module too, imports no qemu-img code.
    :param conf: the configuration: ``[imagebackend] force_raw_images``,
        ``reuse_by_source_hash`` and the inspection options.
    :param registry: the registry of disks, whose records name the
        generations disks use (never reused).
    """

    def __init__(self, store: cache_store.Store,
                 source: source_base.ImageSource,
                 qemu: typing.Callable[[], typing.Any],
                 conf: cfg.ConfigOpts,
                 registry: cache_registry.Registry) -> None:
        self.store = store
        self.source = source
        self._make_qemu = qemu
        self.conf = conf
        self.registry = registry

    @functools.cached_property
    def qemu(self):
        """The QemuImg, made when first needed."""
        return self._make_qemu()

    def identify(self, meta):
        """``meta`` with its identity computed if the source deferred it and a
        base of the image is cached: an unknown identity would count as the
        same as the base's.  With nothing cached, the download computes it.
        """
        if not meta.identity_deferred:
            return meta
        found = cache_generations.generations(
            self.store.base_dir, content_digest.cache_id(meta.image_id))
        if not any("base" in kinds for kinds in found.values()):
            return meta
        return self.source.resolve_identity(meta)

    def choose_stem(self, meta) -> tuple[str, bool]:
        """A base of the image to re-inspect (its valid record is from an
        older inspection policy and its format is not raw), or the name of a
        new generation to fetch, claimed durably so it is never used again.

        A base whose record is missing or not valid is never trusted again:
        it is marked stale here (no new disk uses it, prune removes it once
        nothing uses it) and a new generation is fetched.

        :returns: ``(stem, reinspect)``.
        """
        store = self.store
        cid = content_digest.cache_id(meta.image_id)
        found = cache_generations.generations(store.base_dir, cid)
        for gen in sorted(found, reverse=True):
            stem = cache_layout.stem(cid, gen)
            if "base" not in found[gen] or not store.check_regular(
                    store.base_path(stem)):
                continue
            record_path = store.base_path(stem) + ".json"
            record = cache_layout.read_record(record_path)
            if not cache_layout.valid_record(record):
                if not (record or {}).get("stale"):
                    try:
                        cache_layout.write_stale_record(
                            record_path, meta.image_id, gen,
                            "its record was missing or not valid; the image "
                            "is fetched again")
                    except OSError as exc:
                        raise exception.CacheError(
                            path=record_path,
                            reason="cannot mark the base %s, which has no "
                                   "valid record, stale (%s); remove what "
                                   "is at this path by hand"
                                   % (stem, exc)) from exc
                continue
            if (record["image_id"] == meta.image_id
                    and not record.get("stale")
                    and cache_lookup.same_identity(record, meta.identity)
                    and cache_reinspect.needs_reinspection(record)):
                return stem, True
        # Above every generation that may ever have been published (scratch
        # alone never was), every one a registered disk names, and every one
        # ever claimed.
        floor = max((gen for gen, kinds in found.items()
                     if kinds - {"scratch"}), default=0)
        for record in self.registry.records(cid):
            name = cache_layout.parse(os.path.basename(
                str(record.get("base") or "")))
            if name is not None and name.cid == cid:
                floor = max(floor, name.generation)
        try:
            gen = cache_generations.claim_generation(store.base_dir, cid,
                                                     floor + 1)
        except OSError as exc:
            raise exception.CacheError(
                path=os.path.join(store.base_dir,
                                  cache_layout.GENERATIONS_DIR),
                reason="cannot claim a generation number for image %s (%s); "
                       "check the free space and permissions of the cache "
                       "directory" % (meta.image_id, exc)) from exc
        return cache_layout.stem(cid, gen), False

    def fetch(self, meta, stem: str, requested_size: int | None,
              progress: common_progress.Progress | None, timings: dict
              ) -> dict:
        """Download, convert and publish generation ``stem`` (or, if another
        fetch published different content under that name meanwhile, the next
        free generation).

        Correctness does not depend on the image's lock (which only saves
        duplicate work): the scratch files have names unique to this attempt,
        only they are ever removed here, and the base is published with a
        no-replace link after its record (see
        :func:`imagebackend.cache.publish.publish_base`).

        :param progress: called as ``progress(stage, done, total)`` in bytes
            while it downloads (``download``) and converts (``convert``).

        :returns: its metadata record (``generation`` names the base).
        """
        # The miss path's modules: a cache hit (identify, choose_stem)
        # needs none of them.
        from imagebackend.cache import content as cache_content
        from imagebackend.cache import download as cache_download
        from imagebackend.cache import publish as cache_publish

        record = None
        if self.conf.imagebackend.reuse_by_source_hash:
            record = cache_content.link_same_image(
                self.store, meta, stem, requested_size, self._converts)
        if record is not None:
            self._supersede(meta.image_id, record["generation"])
            return record
        base = self.store.base_path(stem)
        part = cache_layout.scratch_name(base, ".part")
        converted = cache_layout.scratch_name(base, ".converted")
        fd = None
        try:
            start = time.monotonic()
            inspector = inspection.StreamInspector(
                meta.image_id, self.conf, declared_format=meta.disk_format,
                requested_size=requested_size)
            digest, result, size = cache_download.download(
                self.source, meta, part, inspector, self._converts, progress)
            identity = meta.identity
            if meta.identity_deferred:
                identity = self.source.identify_download(meta, *digest)
            timings["fetch"] = time.monotonic() - start
            fmt = inspection.qemu_format(result)
            if fmt != "raw":
                self._check(meta, part, fmt)
            source_file = part
            base_digest = None
            if self._converts(result):
                start = time.monotonic()
                self._convert(meta, part, fmt, converted, result.virtual_size,
                              progress)
                fileio.remove_quietly(part)
                fd, base_digest = self._read_back(meta, converted)
                timings["convert"] = time.monotonic() - start
                source_file, fmt = converted, "raw"
            else:
                fd = _open_scratch(part)
            virtual_size = result.virtual_size
            on_disk = os.fstat(fd).st_size
            if fmt == "raw":
                virtual_size = on_disk
            self._check_length(meta, source_file, fmt, on_disk, size,
                               result, converted=base_digest is not None)
            record = {
                "image_id": meta.image_id,
                "generation": cache_layout.parse(stem).generation,
                "source": meta.source,
                "identity": identity,
                "source_format": result.format,
                "format": fmt,
                "converted": base_digest is not None,
                "size": size,
                "virtual_size": virtual_size,
                "checksum": {"algo": digest[0], "value": digest[1]},
                "inspection": result.to_dict(),
                "created_at": cache_layout.isotime(time.time()),
                "disk_format": meta.disk_format,
                "base_mtime_ns": os.fstat(fd).st_mtime_ns,
            }
            if base_digest is not None:
                record["base_checksum"] = base_digest
            start = time.monotonic()
            record = (cache_content.publish_shared(self.store, stem, fd,
                                                   source_file, record)
                      or cache_publish.publish_base(self.store, stem, fd,
                                                    source_file, record))
            timings["cache"] = time.monotonic() - start
        except BaseException:
            # Only this attempt's own scratch: another fetch (on a host that
            # locks elsewhere) may be writing its own beside it.
            fileio.remove_quietly(part)
            fileio.remove_quietly(converted)
            raise
        finally:
            if fd is not None:
                os.close(fd)
        gen = record["generation"]
        LOG.info("Cached image %s as %s (%s, %d bytes virtual)",
                 meta.image_id, self.store.base_path(cache_layout.stem(
                     cache_layout.parse(stem).cid, gen)), fmt, virtual_size)
        self._supersede(meta.image_id, gen)
        return record

    def _read_back(self, meta, converted: str) -> tuple[int, dict]:
        """Open the conversion ``converted``, hash it and make it durable.

        The base's bytes are not the source's: their own digest is
        recorded so that 'cache verify' can check them.  It reads the page
        cache while the last of the data goes to disk, from the very file
        that is then published.

        :returns: ``(open descriptor, base_checksum record)``.
        :raises imagebackend.exception.DiskOperationError: it cannot be
            read back or flushed, or was replaced meanwhile.
        """
        from imagebackend.cache import verify as cache_verify

        fd = _open_scratch(converted)
        try:
            with sparseio.Writeback(path=converted):
                base_digest = cache_verify.sparse_digest(converted)
            os.fsync(fd)
            if not os.path.samestat(os.fstat(fd), os.lstat(converted)):
                raise OSError(errno.ESTALE, "replaced while it was being "
                              "read", converted)
        except OSError as exc:
            os.close(fd)
            raise exception.DiskOperationError(
                path=converted, reason="could not read back or flush the "
                "conversion of image %s (%s); check the filesystem of %s "
                "(free space, I/O errors) and retry"
                % (meta.image_id, exc, self.store.base_dir)) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd, base_digest

    def _check_length(self, meta, path, fmt, on_disk, size, result, *,
                      converted: bool) -> None:
        """Refuse file ``path`` (of format ``fmt``, ``on_disk`` bytes long)
        to publish if its length is not what was checked: a download
        (not ``converted``) of other than ``size`` bytes, or a raw base
        longer than the checked virtual size allows.

        :raises imagebackend.exception.DiskOperationError: it is.
        """
        if (not converted and on_disk != size) or (
                fmt == "raw" and result.virtual_size is not None
                and on_disk > result.virtual_size
                + qemu_options.CONVERT_OUTPUT_SLACK):
            raise exception.DiskOperationError(
                path=path, reason="it is %d bytes long, not what image %s "
                "was checked to be; check the filesystem of %s and retry"
                % (on_disk, meta.image_id, self.store.base_dir))

    def _check(self, meta, path, fmt) -> None:
        """Refuse a non-raw image whose metadata ``qemu-img check`` finds
        corrupt (a crafted table can make a conversion expand without bound or
        read the wrong data), under the ``info`` resource limits.

        :raises imagebackend.exception.CorruptImageRefused: it is corrupt.
        :raises imagebackend.exception.ImageLimitExceeded: the check hit a
            resource limit.
        """
        try:
            result = self.qemu.check(path, fmt)
        except exception.QemuImgLimitExceeded as exc:
            raise exception.ImageLimitExceeded(
                image_id=meta.image_id,
                reason="qemu-img check of its %s metadata exceeded its %s "
                       "limit; the image is likely malicious or corrupt; "
                       "raise [qemu_img] %s only if you trust it"
                       % (fmt, exc.limit, exc.option)) from exc
        except exception.QemuImgNotFound:
            raise
        except exception.QemuImgError as exc:
            raise exception.CorruptImageRefused(
                image_id=meta.image_id, fmt=fmt,
                detail="errors it could not get past (%s)"
                % exc.stderr) from exc
        if result.supported and (result.corruptions or result.check_errors):
            raise exception.CorruptImageRefused(
                image_id=meta.image_id, fmt=fmt,
                detail="%d corruption(s) and %d error(s)"
                       % (result.corruptions, result.check_errors))

    def _convert(self, meta, part, fmt, converted, virtual_size,
                 progress) -> None:
        """Convert the download to raw under the ``[qemu_img] convert_*``
        limits, its output bounded by the checked virtual size.
        """
        try:
            # Written through the page cache, sent to disk while qemu-img
            # writes it, and fsynced once at the end: the base is as durable
            # as with O_DIRECT, and the conversion much faster.
            self.qemu.convert(
                part, fmt, converted, "raw", target_cache="unsafe",
                durable=False,
                progress=common_progress.from_percent(progress, "convert",
                                                      virtual_size),
                limits=True, max_output_size=virtual_size)
        except exception.QemuImgOutputTooLarge as exc:
            raise exception.ImageLimitExceeded(
                image_id=meta.image_id,
                reason="converting it to raw wrote more than its checked "
                       "virtual size of %d bytes; it is corrupt or crafted, "
                       "upload a sound copy" % virtual_size) from exc
        except exception.QemuImgLimitExceeded as exc:
            raise exception.ImageLimitExceeded(
                image_id=meta.image_id,
                reason="converting it to raw exceeded the %s limit; it is "
                       "likely malicious or corrupt; raise [qemu_img] %s only "
                       "if you trust it" % (exc.limit, exc.option)) from exc

    def _supersede(self, image_id, current) -> None:
        """Mark every other generation of the image stale: new disks use
        generation ``current`` from now on.
        """
        cid = content_digest.cache_id(image_id)
        found = cache_generations.generations(self.store.base_dir, cid)
        for gen, kinds in found.items():
            if gen != current and "record" in kinds:
                self.store.mark_stale(cache_layout.stem(cid, gen),
                                      "superseded by generation %d"
                                      % current)

    def _converts(self, result_or_format) -> bool:
        """Whether a download inspected as ``result_or_format`` (or of that
        format) is converted to raw before it is published.
        """
        return (self.conf.imagebackend.force_raw_images
                and inspection.qemu_format(result_or_format) != "raw")
