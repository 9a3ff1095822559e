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

"""The :class:`ImageCache` facade over the collaborators it owns (see
:mod:`imagebackend.cache`, which names it ``imagebackend.cache.ImageCache``).
"""

import contextlib
import functools
import logging
import os
import time
import typing

from oslo_config import cfg

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import lookup as cache_lookup
from imagebackend.cache import reinspect as cache_reinspect
from imagebackend.cache import results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import store as cache_store
from imagebackend.cache import usage as cache_usage
from imagebackend.common import digest as content_digest
from imagebackend.common import progress as common_progress
from imagebackend import exception
from imagebackend.sources import base as source_base

LOG = logging.getLogger(__name__)


class ImageCache:
    """Fetches, verifies, converts, publishes and looks after base images.

    :param conf: a ConfigOpts with the library's options registered
        (:func:`imagebackend.opts.register_opts`).
    :param source: the :class:`~imagebackend.sources.base.ImageSource`;
        ``None`` for a cache that is only listed, pruned or verified.
    :param qemu: the :class:`~imagebackend.qemu.img.QemuImg` to run; by
        default one made from ``conf`` when first needed.
    :raises imagebackend.exception.ConfigurationError: ``base_dir_name``
        is not a plain directory name.
    """

    def __init__(self, conf: cfg.ConfigOpts,
                 source: source_base.ImageSource | None = None,
                 qemu=None) -> None:
        # ``qemu`` is not annotated: listing the cache imports no qemu-img
        # code.
        self.conf = conf
        self.source = source
        if qemu is not None:
            self.qemu = qemu
        self.store = cache_store.Store.from_conf(conf)
        base_dir = self.store.base_dir
        roots = [self.store.instances_path] + list(
            conf.image_cache.disk_dirs or [])
        self.scanner = cache_usage.UsageScanner(
            base_dir, roots, [base_dir, self.store.lock_dir])

    # The other collaborators are made, and their modules imported, when
    # first used: listing the cache (the command line's "cache list")
    # needs none of them.  They keep no state but the objects given to
    # them, so two threads that make one at once get equivalent ones.

    @functools.cached_property
    def fetcher(self):
        """The :class:`~imagebackend.cache.fetch.Fetcher`, made when a
        base is first looked up (deleting a disk needs none); None for a
        cache made without a source.
        """
        if self.source is None:
            return None
        from imagebackend.cache import fetch as cache_fetch

        return cache_fetch.Fetcher(self.store, self.source,
                                   lambda: self.qemu, self.conf,
                                   self.scanner.registry)

    @functools.cached_property
    def qemu(self):
        """The :class:`~imagebackend.qemu.img.QemuImg` given, else one
        made from ``conf`` when first needed (listing runs no qemu-img).
        """
        from imagebackend.qemu import img as qemu_img

        return qemu_img.QemuImg(self.conf)

    @functools.cached_property
    def sized(self):
        """Sized bases: :class:`~imagebackend.cache.sized.SizedBases`."""
        from imagebackend.cache import sized as cache_sized

        return cache_sized.SizedBases(self.store)

    @functools.cached_property
    def remover(self):
        """Removals: :class:`~imagebackend.cache.remove.Remover`."""
        from imagebackend.cache import remove as cache_remove

        return cache_remove.Remover(self.store, self.scanner.users_of)

    @functools.cached_property
    def pruner(self):
        """Pruning and invalidation:
        :class:`~imagebackend.cache.prune.Pruner`.
        """
        from imagebackend.cache import prune as cache_prune

        return cache_prune.Pruner(self.store, self.scanner, self.remover)

    @functools.cached_property
    def verifier(self):
        """Verification: :class:`~imagebackend.cache.verify.Verifier`."""
        from imagebackend.cache import verify as cache_verify

        return cache_verify.Verifier(self.store, lambda: self.qemu,
                                     self.scanner)

    # -- names and locks ---------------------------------------------------

    @property
    def instances_path(self) -> str:
        return self.store.instances_path

    @property
    def base_dir(self) -> str:
        return self.store.base_dir

    @property
    def lock_dir(self) -> str:
        return self.store.lock_dir

    def base_path(self, cid: str) -> str:
        """The path of base ``cid`` (a stem: ``<cache_id>[-<N>]``)."""
        return self.store.base_path(cid)

    def sized_path(self, cid: str, size: int) -> str:
        """The path of base ``cid`` grown to ``size`` bytes."""
        return self.store.sized_path(cid, size)

    @contextlib.contextmanager
    def use(self, image_id: str, *, exclusive: bool = False,
            blocking: bool = True):
        """Hold image ``image_id``'s use lock: shared while a disk is made
        from (or a prefetch fetches) one of its bases, so that the pruner,
        which takes it exclusively, never removes a base in between.  Waits
        at most ``[imagebackend] lock_wait_timeout`` seconds.

        :raises imagebackend.exception.InvalidImageId: no image can have
            that id.
        :raises imagebackend.exception.LockWaitTimeout: the wait was too
            long.
        """
        source_base.check_image_id(image_id)
        with self.store.use(content_digest.cache_id(image_id),
                            exclusive=exclusive, blocking=blocking,
                            what="the use of image %s" % image_id):
            yield

    # -- lookup --------------------------------------------------------------

    def lookup(self, image_id: str) -> cache_lookup.CacheEntry | None:
        """The newest usable generation of ``image_id``, without asking the
        source, locking or spawning anything; ``None`` when none is cached
        (missing, stale, or recorded under an older inspection policy).
        """
        source_base.check_image_id(image_id)
        return self._find(image_id, None)

    def _find(self, image_id, identity):
        return cache_lookup.find(self.store, image_id,
                                 content_digest.cache_id(image_id), identity)

    def touch(self, entry: cache_lookup.CacheEntry) -> None:
        """Record a use of ``entry`` (the record's mtime is last-used)."""
        try:
            os.utime(entry.path + ".json", follow_symlinks=False)
        except FileNotFoundError:
            pass

    def get(self, image_id: str, *, requested_size: int | None = None,
            progress: common_progress.Progress | None = None,
            timings: dict | None = None
            ) -> tuple[cache_lookup.CacheEntry, bool]:
        """The cached base for ``image_id``, fetching it if needed.

        The source is always asked for the image's metadata first, so an
        image the source no longer serves (deleted, or not visible to these
        credentials) is never used from the cache, and an image whose
        content changed is fetched again as a new generation.  Callers that
        go on to use the base hold :meth:`use` around this call and the use.

        :param requested_size: the size of the disk to be made; an image
            whose virtual size is larger is refused (before it is fully
            downloaded where the format allows).
        :param progress: called as ``progress(stage, done, total)`` in
            bytes while the image is downloaded (``download``) and
            converted (``convert``).
        :returns: ``(entry, cache_hit)``.
        :raises imagebackend.exception.ImageBackendException: on any
            failure, after removing every scratch file it made.
        """
        from imagebackend.cache import fetch as cache_fetch

        source_base.check_image_id(image_id)
        fetcher = self._fetcher()
        timings = timings if timings is not None else {}
        start = time.monotonic()
        meta = self.source.get_meta(image_id)
        timings["lookup"] = time.monotonic() - start
        cache_fetch.precheck_size(meta, requested_size)
        meta = fetcher.identify(meta)
        entry = self._find(image_id, meta.identity)
        if entry is not None:
            self.touch(entry)
            return entry, True
        self.store.ensure_dirs()
        cid = content_digest.cache_id(image_id)
        with self.store.lock(cid, what="image %s" % image_id):
            meta = fetcher.identify(meta)
            entry = self._find(image_id, meta.identity)
            if entry is not None:       # another request published it
                self.touch(entry)
                return entry, True
            # Before writing into a cache that others may share: refuse a
            # lock directory they do not lock in.
            self.store.check_shared()
            stem, again = fetcher.choose_stem(meta)
            if again:
                record = cache_reinspect.reinspect(
                    self.store, self.conf, meta, stem,
                    lambda name: self.scanner.users_of(cid, name))
                return cache_lookup.entry(self.store, image_id, stem,
                                          record), True
            record = fetcher.fetch(meta, stem, requested_size, progress,
                                   timings)
            self.store.check_shared(record=True)
            # Another fetch may have taken that generation meanwhile.
            stem = cache_layout.stem(cid, record["generation"])
            return cache_lookup.entry(self.store, image_id, stem,
                                      record), False

    def _fetcher(self):
        """The :class:`~imagebackend.cache.fetch.Fetcher`, if this cache
        has a source to fetch from.
        """
        if self.fetcher is None:
            raise exception.ConfigurationError(
                reason="this image cache was made without an image source, "
                       "so it can list, prune and verify but not fetch; "
                       "give ImageCache a source")
        return self.fetcher

    # -- disks made from bases -----------------------------------------------

    def publish_derived(self, final: str, lock_name: str,
                        build: typing.Callable[[int, str], None]) -> bool:
        """Make sized base ``final`` once, under ``lock_name``; see
        :meth:`imagebackend.cache.sized.SizedBases.publish`.

        :returns: True if ``final`` already existed (a cache hit).
        :raises imagebackend.exception.CacheError: it could not be
            published.
        """
        return self.sized.publish(final, lock_name, build)

    def register_disk(self, disk: str, entry: cache_lookup.CacheEntry,
                      backing_file: str | None, *, tmp: str | None = None,
                      disk_format: str = "qcow2",
                      st: os.stat_result | None = None,
                      fd: int | None = None, wait: bool = True):
        """Record, durably and before the disk exists, that the library is
        making ``disk`` (built as ``tmp``) of format ``disk_format`` over
        ``backing_file`` (a base of ``entry``; ``None`` for a disk without
        one), so that the base counts as in use wherever the disk lives and
        the disk's format is known from our record, not from its bytes.
        Follow with :meth:`confirm_disk` once the disk has its name, or
        :meth:`unregister_disk` if it never gets it.

        :param st: the stat of ``tmp`` (or of the unnamed file ``fd``),
            tying the record to that file.
        :param wait: False: the record is made durable in a thread of its
            own, and a callable is returned at once that waits for it and
            returns the handle (raising as this method does); call it
            before the disk gets its name.
        :returns: a handle for :meth:`confirm_disk` / :meth:`unregister_disk`.
        :raises imagebackend.exception.CacheError: the record cannot be
            written.
        """
        with self._record_errors(disk):
            intent = self.scanner.registry.start(
                content_digest.cache_id(entry.image_id), entry.image_id,
                disk, tmp, backing_file, disk_format, st, fd=fd,
                background=not wait)
        if wait:
            return intent.path
        return functools.partial(self._record_made, disk, intent)

    def _record_made(self, disk, intent):
        with self._record_errors(disk):
            return intent.wait()

    @contextlib.contextmanager
    def _record_errors(self, disk):
        try:
            yield
        except OSError as exc:
            raise exception.CacheError(
                path=self.base_dir,
                reason="cannot record disk %s in the cache (%s); check the "
                       "free space and permissions of the cache directory"
                       % (disk, exc)) from exc

    def confirm_disk(self, handle: str,
                     st: os.stat_result | None = None) -> None:
        """Mark the disk of ``handle`` (from :meth:`register_disk`) made.

        A failure is only logged: the intent record already protects the
        base and names the disk's format.
        """
        try:
            self.scanner.registry.confirm(handle, st)
        except OSError as exc:
            LOG.warning("Could not mark registry record %s done (%s); its "
                        "intent record stands", handle, exc)

    def unregister_disk(self, handle: str) -> None:
        """Remove the record ``handle`` of an attempt that made no disk
        (only that attempt's record).
        """
        self.scanner.registry.rollback(handle)

    def disk_record(self, disk: str) -> dict | None:
        """The registry record of the disk file ``disk`` if the library
        made it (see :meth:`imagebackend.cache.registry.Registry.find`),
        else None.
        """
        return self.scanner.registry.find(disk)

    def forget_disk(self, record: dict) -> None:
        """Remove ``record`` (from :meth:`disk_record`) once its disk is
        removed.
        """
        self.scanner.registry.rollback(record["_path"])

    # -- reports and upkeep ---------------------------------------------------

    def prune(self, *, dry_run: bool = False) -> results.PruneReport:
        """Remove what the cache no longer needs, by the ``[image_cache]``
        options as they are now; see :mod:`imagebackend.cache.prune`.
        Safe to call from a periodic task while disks are being created.

        :param dry_run: report what would be removed; remove nothing.
        :raises imagebackend.exception.ConfigurationError: a size option
            is invalid.
        :raises imagebackend.exception.CacheError: the filesystem failed.
        """
        from imagebackend.cache import prune as cache_prune

        policy = cache_prune.Policy.from_conf(self.conf)
        with self._upkeep_errors("pruning"):
            return self.pruner.prune(policy, dry_run=dry_run)

    def invalidate(self, image_id: str) -> results.Invalidation:
        """Mark every base of ``image_id`` stale, so the next use fetches
        it again, and remove those nothing uses.  Waits for a fetch of the
        image in progress to finish first.

        :raises imagebackend.exception.InvalidImageId: no image can have
            that id; nothing is changed.
        """
        source_base.check_image_id(image_id)
        with self._upkeep_errors("invalidating image %s" % image_id):
            return self.pruner.invalidate(image_id,
                                          content_digest.cache_id(image_id))

    def verify(self, image_ids: list[str] | None = None, *,
               repair: bool = False) -> results.Verification:
        """Re-check bases (all, or those of ``image_ids``) against their
        records; see :mod:`imagebackend.cache.verify`.

        :param repair: move corrupt bases nothing uses aside, and mark
            corrupt and unverifiable ones stale.
        :raises imagebackend.exception.InvalidImageId: no image can have
            one of ``image_ids``; nothing is checked.
        """
        for image_id in image_ids or ():
            source_base.check_image_id(image_id)
        wanted = None
        if image_ids:
            wanted = {content_digest.cache_id(i): i for i in image_ids}
        with self._upkeep_errors("verifying"):
            return self.verifier.verify(wanted, repair=repair)

    def prefetch(self, image_ids: list[str], *, parallel: int = 4,
                 progress: common_progress.Progress | None = None
                 ) -> results.Prefetch:
        """Fetch images into the cache ahead of use, ``parallel`` at a
        time, each under its use lock like a disk creation, so that each
        image is downloaded once even while disks are being made from it.

        :param progress: called as ``progress(stage, done, total)`` in
            bytes, the stage labelled with the image id:
            ``"download <image id>"``.
        :returns: see :func:`imagebackend.cache.prefetch.prefetch`.
        """
        def fetch_one(image_id, labelled):
            with self.use(image_id):
                return self.get(image_id, progress=labelled)

        from imagebackend.cache import prefetch as cache_prefetch

        return cache_prefetch.prefetch(image_ids, fetch_one,
                                       parallel=parallel, progress=progress)

    def entries(self) -> list[results.CachedBase]:
        """Every base and sized base in the cache: image id, kind,
        generation, file, size on disk, virtual size, format, last used,
        number of disks using it, stale or not.
        """
        with self._upkeep_errors("listing"):
            layout = cache_scan.scan(self.base_dir)
            usage = self.scanner.scan() if layout.bases else None
            return cache_scan.listing(layout, usage.of if usage else None)

    @contextlib.contextmanager
    def _upkeep_errors(self, what: str):
        """Report a filesystem error of an upkeep call as a
        :class:`~imagebackend.exception.CacheError` naming the cache (the
        library's own errors pass unchanged).
        """
        try:
            yield
        except exception.ImageBackendException:
            raise
        except OSError as exc:
            raise exception.CacheError(
                path=self.base_dir,
                reason="%s the cache failed on %s (%s); check the "
                       "permissions and the filesystem there, then retry"
                       % (what, exc.filename or "the cache directory",
                          exc.strerror or exc)) from exc
