"""The base-image cache: ``<instances_path>/<base_dir_name>``.

Layout (``cache_id = sha1(image_id)``; a *stem* names one generation)::

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

Generations: every use compares the source's current identity of the image
(a content hash, or a hash plus an update time) with the record of the
newest usable generation.  When they differ, the image is fetched again
and published under a new generation number, and the older generations
are marked stale in their records.  A published base is never modified,
and never removed while a disk uses it, so existing overlays go on reading
exactly the bytes they were made from.  A stale base is never used for a
new disk; ``cache prune`` removes it once nothing uses it.  A generation
number is never used twice: it is claimed (an exclusive create of
``.generations/<cache_id>/<N>``, fsynced) before anything of it is
written, and the claims are never removed, so a disk left naming a pruned
generation can never find other bytes under that name.

Trust comes from records: a base is used only while its record is valid
(readable without following a symlink, the fields and types the cache
writes, a checksum to verify it against).  A base whose record is
missing or invalid is never re-recorded from its own bytes: it is marked
stale and the image fetched again as a new generation; ``cache verify``
reports it unverifiable.  A raw base is never inspected again (its bytes
are guest data and may look like any format); a non-raw base recorded
under an older inspection policy is inspected again with its recorded
format, and one the policy now refuses is marked stale, never moved.

Correctness never depends on the locks, which only save duplicate work
(two hosts may share ``_base`` while locking in different directories):
every attempt writes scratch files of its own (``<hex>`` is random), only
ever removes its own, and publishes a base, a sized base or a record with a
no-replace link of a file whose size and digest it just checked (see
:mod:`imagebackend.cache.publish`); a name taken meanwhile is adopted if it
holds the same bytes, and never replaced.  Scratch nobody has modified for
:data:`imagebackend.cache.layout.SCRATCH_MINIMUM_AGE` seconds is left over
from a crash, and only ``cache prune`` removes it.
The last-used time of a base is the modification time of its metadata
record, refreshed with ``utime`` on every use (a use never rewrites it);
that of a sized base is its own modification time.  No symlink is followed
in ``_base``: records, ``.disks``, ``.sources`` and ``.generations`` are
opened with ``O_NOFOLLOW`` or checked with ``lstat`` and refused.
"""

import contextlib
import dataclasses
import logging
import os
import stat
import time
import typing

from oslo_concurrency import opts as lock_opts
from oslo_config import cfg

from imagebackend.cache import fetch as cache_fetch
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.cache import prune as cache_prune
from imagebackend.cache import publish as cache_publish
from imagebackend.cache import usage as cache_usage
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.sources import base as source_base

LOG = logging.getLogger(__name__)

OPTIONS = [
    cfg.StrOpt("instances_path",
               default="/var/lib/imagebackend/instances",
               help="Directory under which instance disks and the shared "
                    "base-image cache live. The cache is the subdirectory "
                    "named by base_dir_name; inter-process locks go to a "
                    "'locks' subdirectory unless [oslo_concurrency] "
                    "lock_path is set. Disks anywhere under it keep the "
                    "bases they use from being pruned. Default: "
                    "/var/lib/imagebackend/instances."),
    cfg.StrOpt("base_dir_name",
               default="_base",
               help="Name of the base-image cache directory inside "
                    "instances_path: a plain name (no '/', not '.' or "
                    "'..'), checked before anything is created. Several "
                    "compute hosts may share it over a filesystem with "
                    "working POSIX locks; they must "
                    "then also share one lock directory (the default "
                    "'locks' beside it, or one [oslo_concurrency] lock_path "
                    "on that shared filesystem), or they download and "
                    "convert each image in duplicate. The cache records "
                    "which lock directory each host uses in "
                    "<base_dir_name>/.lock-dirs/ and refuses to start with "
                    "a different one. Default: _base."),
    cfg.BoolOpt("force_raw_images",
                default=True,
                help="Convert every non-raw image to raw when it is "
                     "cached. Raw bases cost disk space but make instance "
                     "disks faster and let the raw backend copy them "
                     "without qemu-img. When false, a base keeps the "
                     "format it was downloaded in. Default: true."),
    cfg.IntOpt("lock_wait_timeout",
               default=600, min=0,
               help="Longest wait, in seconds, for one of the cache's "
                    "locks without progress from its holder: an image "
                    "being downloaded and converted by another request "
                    "(the wait goes on while the holder's scratch file in "
                    "the cache keeps changing), a sized base being built, "
                    "or a base being pruned. A waiter logs a warning every "
                    "30 seconds naming the holder (host, pid and command, "
                    "recorded in the lock file), and when the time is up "
                    "the request fails with an error naming the image and "
                    "the holder. Raise it if a sound holder can go that "
                    "long without writing (a very slow image service). "
                    "0 waits without limit (not "
                    "recommended: a stuck process then blocks every "
                    "request for its image). Default: 600."),
]

#: the ``[image_cache]`` options: in-use tracking, pruning.
IMAGE_CACHE_OPTIONS = cache_usage.OPTIONS + cache_prune.OPTIONS
IMAGE_CACHE_GROUP = "image_cache"

ProgressCallback = typing.Callable[[str, int, typing.Optional[int]], None]
SCRATCH_SUFFIXES = cache_layout.SCRATCH_SUFFIXES


def lock_option_list() -> list[cfg.Opt]:
    """oslo.concurrency's ``[oslo_concurrency]`` options (``lock_path``)."""
    return lock_opts.list_opts()[0][1]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``[oslo_concurrency]`` and ``[image_cache]``; this module's
    ``[imagebackend]`` options are registered by
    :func:`imagebackend.opts.register_opts`.
    """
    conf.register_opts(lock_option_list(), group="oslo_concurrency")
    conf.register_opts(IMAGE_CACHE_OPTIONS, group=IMAGE_CACHE_GROUP)


#: ``cache_id(image_id)``: the cache's name for an image, the sha1 of its
#: id in hex.
cache_id = cache_layout.cache_id


@dataclasses.dataclass
class CacheEntry:
    """One published base image.

    :param cache_id: the base's file name in ``_base``: ``sha1(image_id)``
        for generation 1, ``sha1(image_id)-<N>`` for generation N.
    """

    image_id: str
    cache_id: str
    path: str
    format: str
    virtual_size: int
    record: dict
    generation: int = 1

    @property
    def last_used(self) -> float | None:
        try:
            return os.stat(self.path + ".json").st_mtime
        except FileNotFoundError:
            return None


class ImageCache:
    """Fetches, verifies, converts, publishes and looks after base images.

    :param conf: a ConfigOpts with the library's options registered.
    :param source: the :class:`~imagebackend.sources.base.ImageSource`;
        ``None`` for a cache that is only listed, pruned or verified.
    :param qemu: the :class:`~imagebackend.qemu.img.QemuImg` to run.
    """

    def __init__(self, conf: cfg.ConfigOpts,
                 source: source_base.ImageSource | None = None,
                 qemu: qemu_img.QemuImg | None = None) -> None:
        register_opts(conf)
        self.conf = conf
        self.source = source
        self.qemu = qemu or qemu_img.QemuImg(conf)
        opts = conf.imagebackend
        check_base_dir_name(opts.base_dir_name)
        self.instances_path = os.path.abspath(opts.instances_path)
        self.base_dir = os.path.join(self.instances_path, opts.base_dir_name)
        self.lock_dir = os.path.abspath(
            conf.oslo_concurrency.lock_path
            or os.path.join(self.instances_path, "locks"))
        self._shared_checked = 0.0
        self.scanner = cache_usage.UsageScanner(
            self.base_dir,
            [self.instances_path] + list(conf.image_cache.disk_dirs or []),
            [self.base_dir, self.lock_dir])
        self._dirs_ready = False

    # -- names and locks ---------------------------------------------------

    def base_path(self, cid: str) -> str:
        """The path of base ``cid`` (a stem: ``<cache_id>[-<N>]``)."""
        return os.path.join(self.base_dir, cid)

    def sized_path(self, cid: str, size: int) -> str:
        """The path of base ``cid`` grown to ``size`` bytes."""
        return os.path.join(self.base_dir, "%s_%d" % (cid, size))

    def ensure_dirs(self) -> None:
        """Create the cache and lock directories if missing, and refuse a
        lock directory other users of this cache do not share (see
        :func:`imagebackend.cache.locks.check_shared`).

        :raises imagebackend.exception.CacheError: a directory cannot be
            created.
        :raises imagebackend.exception.SplitLockDirectory: another
            configuration uses this cache with another lock directory.
        """
        if self._dirs_ready:
            return
        for path, option in ((self.base_dir, "[imagebackend] "
                              "instances_path and base_dir_name"),
                             (self.lock_dir, "[oslo_concurrency] lock_path")):
            try:
                fileio.ensure_dir(path)
            except OSError as exc:
                raise exception.CacheError(
                    path=path,
                    reason="cannot create the directory (%s); check %s and "
                           "the permissions and free space there"
                           % (exc.strerror or exc, option)) from exc
        cache_layout.check_private_dirs(self.base_dir)
        self._check_shared()
        self._dirs_ready = True

    def _check_shared(self, record: bool = False) -> None:
        """Check that the lock directory is the one every user of this
        cache locks in; with ``record``, also say that this configuration
        uses it (at most hourly: a running cache refreshes its entry).
        """
        now = time.monotonic()
        if (record and self._shared_checked
                and now - self._shared_checked
                < cache_locks.LOCK_DIR_REFRESH):
            return
        try:
            cache_locks.check_shared(self.base_dir, self.lock_dir,
                                     record=record)
        except OSError as exc:
            raise exception.CacheError(
                path=self.base_dir,
                reason="cannot check which lock directory uses it (%s); "
                       "check its free space and permissions"
                       % (exc.strerror or exc)) from exc
        if record:
            self._shared_checked = now

    @contextlib.contextmanager
    def lock(self, name: str, *, blocking: bool = True,
             what: str | None = None):
        """Hold the inter-process (and inter-thread) lock ``name``,
        waiting at most ``[imagebackend] lock_wait_timeout`` seconds
        without progress from the holder (its scratch files in ``_base``
        growing).

        :param what: what it protects, for messages ("image X").
        :raises imagebackend.cache.locks.Busy: ``blocking`` is False and
            the lock is held.
        :raises imagebackend.exception.LockWaitTimeout: the wait was too
            long; the error names the holder.
        :raises imagebackend.exception.LockFileError: the lock file cannot
            be created (a full lock directory).
        """
        self.ensure_dirs()
        with cache_locks.exclusive(
                self.lock_dir, name, blocking=blocking,
                timeout=self.conf.imagebackend.lock_wait_timeout,
                what=what,
                activity=lambda: self._scratch_activity(name)):
            yield

    def _scratch_activity(self, name: str) -> float | None:
        """When scratch of ``name`` (a stem or a sized base name) was
        last modified, or None: the progress of whoever holds its lock.
        """
        latest = None
        try:
            entries = os.scandir(self.base_dir)
        except OSError:
            return None
        with entries:
            for entry in entries:
                if not entry.name.startswith(name):
                    continue
                parsed = cache_layout.parse(entry.name)
                if parsed is None or not parsed.is_scratch:
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                latest = mtime if latest is None else max(latest, mtime)
        return latest

    @contextlib.contextmanager
    def use(self, image_id: str, *, exclusive: bool = False,
            blocking: bool = True):
        """Hold image ``image_id``'s use lock: shared while a disk is made
        from (or a prefetch fetches) one of its bases, so that the pruner,
        which takes it exclusively, never removes a base in between.  Waits
        at most ``[imagebackend] lock_wait_timeout`` seconds.

        :raises imagebackend.exception.LockWaitTimeout: the wait was too
            long.
        """
        source_base.check_image_id(image_id)
        self.ensure_dirs()
        path = cache_locks.use_lock_file(self.lock_dir, cache_id(image_id))
        with cache_locks.flocked(
                path, shared=not exclusive, blocking=blocking,
                timeout=self.conf.imagebackend.lock_wait_timeout,
                what="the use of image %s" % image_id):
            yield

    def check_regular(self, path: str) -> bool:
        """True if ``path`` is a regular file, False if it is missing;
        anything else (a symlink, a directory, a device) is refused.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise exception.UnsafeCachePath(
                path=path, reason="it is not a regular file (symlinks are "
                                  "never followed in the cache)")
        return True

    # -- lookup --------------------------------------------------------------

    def lookup(self, image_id: str) -> CacheEntry | None:
        """The newest usable generation of ``image_id``, without asking the
        source, locking or spawning anything; ``None`` when none is cached
        (missing, stale, or recorded under an older inspection policy).
        """
        source_base.check_image_id(image_id)
        return self._find(image_id, None)

    def _find(self, image_id, identity):
        cid = cache_id(image_id)
        entry = self._usable(image_id, cid, 1, identity)
        if entry is not None:
            return entry
        found = cache_layout.generations(self.base_dir, cid)
        for gen in sorted(found, reverse=True):
            if gen > 1 and "base" in found[gen]:
                entry = self._usable(image_id, cid, gen, identity)
                if entry is not None:
                    return entry
        return None

    def _usable(self, image_id, cid, gen, identity):
        stem = cache_layout.stem(cid, gen)
        path = self.base_path(stem)
        if not self.check_regular(path):
            return None
        # Only a valid record is trusted: one that is missing, a symlink
        # or of the wrong shape never makes a base usable.
        record = cache_layout.read_record(path + ".json")
        if (not cache_layout.valid_record(record)
                or record["image_id"] != image_id
                or record.get("stale")
                or not cache_fetch.same_identity(record, identity)):
            return None
        if cache_fetch.needs_reinspection(record):
            return None
        return self._entry(image_id, stem, record)

    def touch(self, entry: CacheEntry) -> None:
        """Record a use of ``entry`` (the record's mtime is last-used)."""
        try:
            os.utime(entry.path + ".json", follow_symlinks=False)
        except FileNotFoundError:
            pass

    def get(self, image_id: str, *, requested_size: int | None = None,
            progress: ProgressCallback | None = None,
            timings: dict | None = None) -> tuple[CacheEntry, bool]:
        """The cached base for ``image_id``, fetching it if needed.

        The source is always asked for the image's metadata first, so an
        image the source no longer serves (deleted, or not visible to these
        credentials) is never used from the cache, and an image whose
        content changed is fetched again as a new generation.  Callers that
        go on to use the base hold :meth:`use` around this call and the use.

        :param requested_size: the size of the disk to be made; an image
            whose virtual size is larger is refused (before it is fully
            downloaded where the format allows).
        :returns: ``(entry, cache_hit)``.
        :raises imagebackend.exception.ImageBackendException: on any
            failure, after removing every scratch file it made.
        """
        source_base.check_image_id(image_id)
        timings = timings if timings is not None else {}
        start = time.monotonic()
        meta = self.source.get_meta(image_id)
        timings["lookup"] = time.monotonic() - start
        cache_fetch.precheck_size(meta, requested_size)
        meta = cache_fetch.identify(self, meta)
        entry = self._find(image_id, meta.identity)
        if entry is not None:
            self.touch(entry)
            return entry, True
        self.ensure_dirs()
        with self.lock(cache_id(image_id), what="image %s" % image_id):
            meta = cache_fetch.identify(self, meta)
            entry = self._find(image_id, meta.identity)
            if entry is not None:       # another request published it
                self.touch(entry)
                return entry, True
            # Before writing into a cache that others may share: refuse a
            # lock directory they do not lock in.
            self._check_shared()
            stem, again = cache_fetch.choose_stem(self, meta)
            if again:
                record = cache_fetch.reinspect(self, meta, stem)
                return self._entry(image_id, stem, record), True
            record = cache_fetch.fetch(self, meta, stem, requested_size,
                                       progress, timings)
            self._check_shared(record=True)
            # Another fetch may have taken that generation meanwhile.
            stem = cache_layout.stem(cache_id(image_id),
                                     record["generation"])
            return self._entry(image_id, stem, record), False

    def _entry(self, image_id, stem, record):
        return CacheEntry(image_id=image_id, cache_id=stem,
                          path=self.base_path(stem), format=record["format"],
                          virtual_size=record["virtual_size"], record=record,
                          generation=cache_layout.parse(stem).generation)

    # -- publishing ----------------------------------------------------------

    def remove_scratch(self, path: str) -> None:
        """Remove a scratch file this process made (never another's: a
        fetch on a host locking elsewhere may be writing one beside it).
        """
        if self.check_regular(path):
            os.unlink(path)

    def mark_stale(self, stem: str, reason: str) -> bool:
        """Mark generation ``stem`` stale: no new disk will use it.

        :returns: True if it was not stale before.
        """
        return cache_layout.mark_stale(self.base_path(stem) + ".json",
                                       reason)

    def publish_derived(self, final: str, lock_name: str,
                        build: typing.Callable[[int, str], None]) -> bool:
        """Make sized base ``final`` (``<stem>_<size>``) once, under
        ``lock_name``, without ever replacing anything.

        It is built in a scratch file of its own, fsynced, checked (its
        size) and hashed (``sparse-64k-xxh3``); its record
        ``<final>.json`` is published first and the file then linked
        into place, both without replacing: a sized base another process
        published meanwhile is adopted.

        :param build: called as ``build(fd, tmp_path)`` to fill a new
            temporary file.
        :returns: True if ``final`` already existed (a cache hit; its
            modification time, the last-used time, is refreshed).
        :raises imagebackend.exception.CacheError: it could not be
            published.
        """
        if self.check_regular(final):
            _utime_quietly(final)
            return True
        with self.lock(lock_name, what="sized base %s" % final):
            if self.check_regular(final):
                _utime_quietly(final)
                return True
            self._check_shared()
            tmp = cache_layout.scratch_name(final, ".part")
            try:
                with fileio.new_file(tmp) as fd:
                    build(fd, tmp)
                    os.fsync(fd)
                    published = self._publish_sized(final, tmp)
            finally:
                fileio.remove_quietly(tmp)
        return not published

    def _publish_sized(self, final: str, tmp: str) -> bool:
        """Record and publish the built sized base ``tmp`` as ``final``.

        :returns: False if an equal one was published meanwhile (adopted).
        """
        name = cache_layout.parse(os.path.basename(final))
        base_record = fileio.read_json(self.base_path(name.stem)
                                       + ".json") or {}
        fmt = base_record.get("format") or "raw"
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if fmt == "raw" and size != name.size:
                raise exception.CacheError(
                    path=self.base_dir,
                    reason="the sized base built for %s is %d bytes long, "
                           "not %d; check the filesystem and retry"
                           % (final, size, name.size))
            record = {
                "kind": "sized",
                "image_id": base_record.get("image_id"),
                "base": name.stem,
                "size": name.size,
                "format": fmt,
                "digest": {"scheme": content_digest.SPARSE,
                           "value": content_digest.file_digests(
                               fd)["sparse"]},
                "created_at": cache_layout.isotime(time.time()),
            }
            try:
                found = cache_publish.publish_record(final + ".json",
                                                     record)
                if found is None or _same_sized(found, record):
                    if cache_publish.publish_fd(fd, tmp, final):
                        fileio.fsync_dir(self.base_dir)
                        return True
            except OSError as exc:
                raise cache_publish.publish_error(final, exc) from exc
        finally:
            os.close(fd)
        # Published meanwhile by a process locking elsewhere: use it if
        # it is what was built here.
        if self.check_regular(final) and (
                fmt != "raw" or os.lstat(final).st_size == name.size):
            LOG.info("Sized base %s was published by another process "
                     "meanwhile; using it", final)
            return False
        raise exception.CachePublishConflict(
            path=self.base_dir, image_id=record["image_id"],
            reason="the record of sized base %s describes other content "
                   "than was built" % final)

    def register_disk(self, disk: str, entry: CacheEntry,
                      backing_file: str | None, *, tmp: str | None = None,
                      disk_format: str = "qcow2",
                      st: os.stat_result | None = None) -> str:
        """Record, durably and before the disk exists, that the library is
        making ``disk`` (built as ``tmp``) of format ``disk_format`` over
        ``backing_file`` (a base of ``entry``; ``None`` for a disk without
        one), so that the base counts as in use wherever the disk lives and
        the disk's format is known from our record, not from its bytes.
        Follow with :meth:`confirm_disk` once the disk has its name, or
        :meth:`unregister_disk` if it never gets it.

        :param st: the stat of ``tmp``, tying the record to that file.
        :returns: a handle for :meth:`confirm_disk` / :meth:`unregister_disk`.
        :raises imagebackend.exception.CacheError: the record cannot be
            written.
        """
        try:
            return self.scanner.registry.begin(
                cache_id(entry.image_id), entry.image_id, disk, tmp,
                backing_file, disk_format, st)
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

    # -- reports and upkeep ---------------------------------------------------

    def prune(self, *,
              dry_run: bool = False) -> cache_prune.PruneReport:
        """Remove what the cache no longer needs; see
        :func:`imagebackend.cache.prune.prune`.  Safe to call from a
        periodic task while disks are being created.
        """
        return cache_prune.prune(self, dry_run=dry_run)

    def invalidate(self, image_id: str) -> dict:
        """Mark every base of ``image_id`` stale, so the next use fetches
        it again, and remove those nothing uses; see
        :func:`imagebackend.cache.prune.invalidate`.

        :raises imagebackend.exception.InvalidImageId: no image can have
            that id; nothing is changed.
        """
        source_base.check_image_id(image_id)
        return cache_prune.invalidate(self, image_id)

    def verify(self, image_ids: list[str] | None = None, *,
               repair: bool = False) -> list[dict]:
        """Re-check bases against their records; see
        :func:`imagebackend.cache.verify.verify`.

        :raises imagebackend.exception.InvalidImageId: no image can have
            one of ``image_ids``; nothing is checked.
        """
        for image_id in image_ids or ():
            source_base.check_image_id(image_id)
        return cache_verify.verify(self, image_ids, repair=repair)

    def prefetch(self, image_ids: list[str], *, parallel: int = 4,
                 progress: typing.Callable | None = None) -> list[dict]:
        """Fetch images into the cache ahead of use, ``parallel`` at a
        time; each image is downloaded once even while disks are being
        created from it.

        :param progress: called as ``progress(image_id, stage, done,
            total)`` during long steps.
        :returns: one dict per distinct image: ``image_id``, ``file``,
            ``generation``, ``cache_hit``, ``seconds``, or ``error``.
        """
        return cache_fetch.prefetch(self, image_ids, parallel=parallel,
                                    progress=progress)

    # Last: in the class body, ``list`` names this method from here on.
    def list(self) -> list[dict]:
        """One row per base and sized base in the cache: image id, kind,
        generation, file, size on disk, virtual size, format, last used,
        number of disks using it, stale or not.
        """
        layout = cache_layout.scan(self.base_dir)
        usage = self.scanner.scan() if layout.bases else None
        return cache_layout.rows(layout, usage.of if usage else None)


def check_base_dir_name(name) -> None:
    """Refuse an ``[imagebackend] base_dir_name`` that is not a plain
    directory name: the cache must sit directly inside instances_path.

    :raises imagebackend.exception.ConfigurationError: it is not.
    """
    if (not isinstance(name, str) or name in ("", ".", "..")
            or "/" in name or "\0" in name):
        raise exception.ConfigurationError(
            reason="[imagebackend] base_dir_name = %r is not a plain "
                   "directory name; give a name without '/' that is not "
                   "'.' or '..', such as the default '_base'" % (name,))


def _same_sized(found: dict, ours: dict) -> bool:
    """Whether sized-base record ``found`` describes what ``ours`` does."""
    keys = ("kind", "image_id", "base", "size", "format")
    if any(found.get(key) != ours.get(key) for key in keys):
        return False
    # A raw sized base's bytes are fixed by its base; another qemu-img may
    # lay out a qcow2 one differently.
    return ours["format"] != "raw" or found.get("digest") == ours["digest"]


def _utime_quietly(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
