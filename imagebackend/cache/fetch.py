"""The cache's miss path: choosing a generation, then downloading,
converting and publishing it (or re-inspecting a base whose record is
missing), and prefetching.

Everything here but :func:`prefetch` runs under the image's lock, taken by
:meth:`imagebackend.cache.ImageCache.get`; the lock only saves duplicate
work, since a fetch writes and removes only scratch of its own and
publishes without replacing anything (see :func:`fetch`).
"""

import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import queue
import threading
import time
import typing

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception
from imagebackend import inspection
from imagebackend.qemu import img as qemu_img

if typing.TYPE_CHECKING:
    from imagebackend import cache

LOG = logging.getLogger(__name__)

#: chunks waiting to be hashed, or written, while the download goes on.
_QUEUE = 2


def same_identity(record: dict, identity: str | None) -> bool:
    """Whether a record describes the content the source now serves; an
    identity unknown on either side cannot tell, and counts as the same.
    (A source that only defers computing it is asked for it before any
    comparison: see :func:`identify`.)
    """
    recorded = record.get("identity")
    return identity is None or recorded is None or recorded == identity


def identify(c: "cache.ImageCache", meta):
    """``meta`` with its identity computed if the source deferred it and a
    base of the image is cached: an unknown identity would count as the
    same as the base's.  With nothing cached, the download computes it.
    """
    if not meta.identity_deferred:
        return meta
    found = cache_layout.generations(c.base_dir,
                                     cache_layout.cache_id(meta.image_id))
    if not any("base" in kinds for kinds in found.values()):
        return meta
    return c.source.resolve_identity(meta)


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


def needs_reinspection(record: dict) -> bool:
    """Whether a valid base record predates the current inspection
    policy and names a format that is inspected.  A raw base never is:
    its bytes are an image's guest data (any header in them is data), and
    qemu-img only ever reads it as raw.
    """
    if record.get("format") == "raw":
        return False
    inspected = record.get("inspection") or {}
    return inspected.get("version", 0) < inspection.INSPECTION_VERSION


def choose_stem(c: "cache.ImageCache", meta) -> tuple[str, bool]:
    """A base of the image to re-inspect (its valid record is from an
    older inspection policy and its format is not raw), or the name of a
    new generation to fetch, claimed durably so it is never used again.

    A base whose record is missing or not valid is never trusted again:
    it is marked stale here (no new disk uses it, prune removes it once
    nothing uses it) and a new generation is fetched.

    :returns: ``(stem, reinspect)``.
    """
    cid = cache_layout.cache_id(meta.image_id)
    found = cache_layout.generations(c.base_dir, cid)
    for gen in sorted(found, reverse=True):
        stem = cache_layout.stem(cid, gen)
        if "base" not in found[gen] or not c.check_regular(
                c.base_path(stem)):
            continue
        record_path = c.base_path(stem) + ".json"
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
                               "valid record, stale (%s); remove what is "
                               "at this path by hand" % (stem, exc)) from exc
            continue
        if (record["image_id"] == meta.image_id
                and not record.get("stale")
                and same_identity(record, meta.identity)
                and needs_reinspection(record)):
            return stem, True
    # Above every generation that may ever have been published (scratch
    # alone never was), every one a registered disk names, and every one
    # ever claimed.
    floor = max((gen for gen, kinds in found.items()
                 if kinds - {"scratch"}), default=0)
    for record in c.scanner.registry.records(cid):
        name = cache_layout.parse(os.path.basename(
            str(record.get("base") or "")))
        if name is not None and name.cid == cid:
            floor = max(floor, name.generation)
    try:
        gen = cache_layout.claim_generation(c.base_dir, cid, floor + 1)
    except OSError as exc:
        raise exception.CacheError(
            path=os.path.join(c.base_dir, cache_layout.GENERATIONS_DIR),
            reason="cannot claim a generation number for image %s (%s); "
                   "check the free space and permissions of the cache "
                   "directory" % (meta.image_id, exc)) from exc
    return cache_layout.stem(cid, gen), False


def fetch(c: "cache.ImageCache", meta, stem: str,
          requested_size: int | None, progress, timings: dict) -> dict:
    """Download, convert and publish generation ``stem`` (or, if another
    fetch published different content under that name meanwhile, the next
    free generation).

    Correctness does not depend on the image's lock (which only saves
    duplicate work): the scratch files have names unique to this attempt,
    only they are ever removed here, and the base is published with a
    no-replace link after its record (see :func:`_publish`).

    :returns: its metadata record (``generation`` names the base).
    """
    base = c.base_path(stem)
    part = cache_layout.scratch_name(base, ".part")
    converted = cache_layout.scratch_name(base, ".converted")
    fd = None
    try:
        start = time.monotonic()
        digest, result, size = download(c, meta, part, requested_size,
                                        progress)
        identity = meta.identity
        if meta.identity_deferred:
            identity = c.source.identify_download(meta, *digest)
        timings["fetch"] = time.monotonic() - start
        fmt = inspection.qemu_format(result)
        if fmt != "raw":
            _check(c, meta, part, fmt)
        source_file = part
        base_digest = None
        if _converts(c, result):
            start = time.monotonic()
            _convert(c, meta, part, fmt, converted, result.virtual_size,
                     progress)
            fileio.remove_quietly(part)
            # The base's bytes are not the source's: record their own
            # digest so that 'cache verify' can check them.  It reads the
            # page cache while the last of the data goes to disk, from the
            # very file that is then published.
            try:
                fd = _open_scratch(converted)
                with fileio.Writeback(path=converted):
                    base_digest = cache_verify.sparse_digest(converted)
                os.fsync(fd)
                if not os.path.samestat(os.fstat(fd),
                                        os.lstat(converted)):
                    raise OSError(errno.ESTALE, "replaced while it was "
                                  "being read", converted)
            except OSError as exc:
                raise exception.DiskOperationError(
                    path=converted, reason="could not read back or flush "
                    "the conversion of image %s (%s); check the filesystem "
                    "of %s (free space, I/O errors) and retry"
                    % (meta.image_id, exc, c.base_dir)) from exc
            timings["convert"] = time.monotonic() - start
            source_file, fmt = converted, "raw"
        else:
            fd = _open_scratch(part)
        virtual_size = result.virtual_size
        on_disk = os.fstat(fd).st_size
        if fmt == "raw":
            virtual_size = on_disk
        if (base_digest is None and on_disk != size) or (
                fmt == "raw" and result.virtual_size is not None
                and on_disk > result.virtual_size
                + qemu_img.CONVERT_OUTPUT_SLACK):
            raise exception.DiskOperationError(
                path=source_file, reason="it is %d bytes long, not what "
                "image %s was checked to be; check the filesystem of %s "
                "and retry" % (on_disk, meta.image_id, c.base_dir))
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
        }
        if base_digest is not None:
            record["base_checksum"] = base_digest
        start = time.monotonic()
        record = _publish(c, stem, fd, source_file, record)
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
             meta.image_id, c.base_path(cache_layout.stem(
                 cache_layout.parse(stem).cid, gen)), fmt, virtual_size)
    _supersede(c, meta.image_id, gen)
    return record


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


def _check(c, meta, path, fmt) -> None:
    """Refuse a non-raw image whose metadata ``qemu-img check`` finds
    corrupt (a crafted table can make a conversion expand without bound or
    read the wrong data), under the ``info`` resource limits.

    :raises imagebackend.exception.CorruptImageRefused: it is corrupt.
    :raises imagebackend.exception.ImageLimitExceeded: the check hit a
        resource limit.
    """
    try:
        result = c.qemu.check(path, fmt)
    except exception.QemuImgLimitExceeded as exc:
        raise exception.ImageLimitExceeded(
            image_id=meta.image_id,
            reason="qemu-img check of its %s metadata exceeded its %s "
                   "limit; the image is likely malicious or corrupt; raise "
                   "[qemu_img] %s only if you trust it"
                   % (fmt, exc.limit, exc.option)) from exc
    except exception.QemuImgNotFound:
        raise
    except exception.QemuImgError as exc:
        raise exception.CorruptImageRefused(
            image_id=meta.image_id, fmt=fmt,
            detail="errors it could not get past (%s)" % exc.stderr) from exc
    if result.supported and (result.corruptions or result.check_errors):
        raise exception.CorruptImageRefused(
            image_id=meta.image_id, fmt=fmt,
            detail="%d corruption(s) and %d error(s)"
                   % (result.corruptions, result.check_errors))


def _convert(c, meta, part, fmt, converted, virtual_size, progress) -> None:
    """Convert the download to raw under the ``[qemu_img] convert_*``
    limits, its output bounded by the checked virtual size.
    """
    try:
        # Written through the page cache, sent to disk while qemu-img
        # writes it, and fsynced once at the end: the base is as durable
        # as with O_DIRECT, and the conversion much faster.
        c.qemu.convert(part, fmt, converted, "raw",
                       target_cache="unsafe", durable=False,
                       progress=_stage_progress(progress, "convert"),
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


#: how many generations a fetch tries before it gives up publishing.
_PUBLISH_TRIES = 5
# Record fields that say which bytes a base holds.
_CONTENT = ("image_id", "identity", "checksum", "source_format", "format",
            "virtual_size")


def _same_content(found: dict, ours: dict) -> bool:
    """Whether record ``found`` describes the bytes ``ours`` does (and
    may still be used).
    """
    if not found or found.get("stale"):
        return False
    if any(found.get(key) != ours.get(key) for key in _CONTENT):
        return False
    mine = (ours.get("base_checksum") or {}).get("value")
    theirs = (found.get("base_checksum") or {}).get("value")
    return mine is None or theirs is None or mine == theirs


def _publish(c, stem: str, fd: int, path: str, record: dict) -> dict:
    """Publish the checked file ``fd`` (named ``path``) with ``record`` as
    generation ``stem`` without ever replacing anything: the record first
    (no-replace), then the base (a no-replace link).  A name taken by
    another fetch of the same content is adopted; one taken by other
    content makes it try the next free generation.

    :returns: the record the published (or adopted) base has.
    :raises imagebackend.exception.CachePublishConflict: no generation
        could be published after a few tries.
    """
    cid = cache_layout.parse(stem).cid
    try:
        for _ in range(_PUBLISH_TRIES):
            base = c.base_path(stem)
            record["generation"] = cache_layout.parse(stem).generation
            found = None
            if not os.path.lexists(base):
                found = cache_publish.publish_record(base + ".json", record)
                if found is None or _same_content(found, record):
                    if cache_publish.publish_fd(fd, path, base):
                        fileio.fsync_dir(c.base_dir)
                        return found or record
            adopted = _adopt(c, base, record, found)
            if adopted is not None:
                fileio.remove_quietly(path)
                return adopted
            LOG.warning("Generation %s of image %s was published meanwhile "
                        "with other content (another host locking "
                        "elsewhere?); publishing the next generation",
                        stem, record["image_id"])
            stem = cache_layout.stem(cid, cache_layout.claim_generation(
                c.base_dir, cid, max(cache_layout.generations(
                    c.base_dir, cid), default=0) + 1))
    except OSError as exc:
        raise cache_publish.publish_error(c.base_path(stem), exc) from exc
    raise exception.CachePublishConflict(
        path=c.base_dir, image_id=record["image_id"],
        reason="other content was published under each of %d generation "
               "names while it was being fetched" % _PUBLISH_TRIES)


def _adopt(c, base, record, found) -> dict | None:
    """The record of the base another fetch published as ``base`` if it
    holds the bytes ``record`` describes, else None.

    :param found: the record that was there when ours was published, or
        ``None`` if ours was published (and the base then appeared without
        one: its bytes are checked in full).
    """
    existing = fileio.read_json(base + ".json")
    if found is not None and not _same_content(existing or {}, record):
        return None
    if not c.check_regular(base):
        return None
    st = os.lstat(base)
    if record["format"] == "raw" and st.st_size != record["virtual_size"]:
        return None
    if found is None and not _holds(base, record):
        c.mark_stale(os.path.basename(base),
                     "its base does not hold the bytes its record describes")
        return None
    LOG.info("Image %s was published as %s by another fetch meanwhile; "
             "using it", record["image_id"], base)
    return existing or record


def _holds(path: str, record: dict) -> bool:
    """Whether file ``path`` holds the bytes ``record`` describes."""
    if record.get("base_checksum"):
        found = cache_verify.digests(path)
        return found["sparse"] == record["base_checksum"]["value"]
    checksum = record["checksum"]
    try:
        found = cache_verify.digests(path, [checksum["algo"]], sparse=False)
    except ValueError:
        return False
    return found["full"][checksum["algo"]] == checksum["value"]


def _supersede(c, image_id, current) -> None:
    """Mark every other generation of the image stale: new disks use
    generation ``current`` from now on.
    """
    cid = cache_layout.cache_id(image_id)
    for gen, kinds in cache_layout.generations(c.base_dir, cid).items():
        if gen != current and "record" in kinds:
            c.mark_stale(cache_layout.stem(cid, gen),
                         "superseded by generation %d" % current)


def _converts(c, result_or_format) -> bool:
    """Whether a download inspected as ``result_or_format`` (or of that
    format) is converted to raw before it is published.
    """
    return (c.conf.imagebackend.force_raw_images
            and inspection.qemu_format(result_or_format) != "raw")


def _published_as_is(c, meta) -> bool:
    """Whether an image will, by its declared format, be published as it
    is downloaded (the inspection decides in the end).
    """
    try:
        return not _converts(c, meta.disk_format or "raw")
    except ValueError:
        return True


def download(c: "cache.ImageCache", meta, part: str,
             requested_size: int | None, progress):
    """Stream the image into ``part``: inspected, hashed and written
    sparsely in one pass, fsynced before returning when it is to be
    published as it is (a part to be converted is only read back, and the
    conversion makes its own output durable).

    :returns: ``((algo, hexdigest), inspection result, bytes)``.
    """
    expected = meta.expected_digest()
    algo = expected[0] if expected else (meta.hash_algo or "sha256")
    try:
        hasher = content_digest.new(algo)
    except ValueError as exc:
        raise exception.ImageDownloadError(
            image_id=meta.image_id, source=meta.source,
            reason="the source records an unknown hash algorithm %r"
                   % algo) from exc
    inspector = inspection.StreamInspector(
        meta.image_id, c.conf, declared_format=meta.disk_format,
        requested_size=requested_size)
    done = 0
    with fileio.new_file(part) as fd:
        writer = fileio.SparseWriter(fd)
        chunks = c.source.open(meta)
        # The bytes are received and inspected here, hashed in one thread
        # and written in another.
        hashing = _Stage(hasher.update, "hash")
        writing = _Stage(writer.write, "write")
        # A part to be published as it is goes to disk while it streams,
        # so that the fsync at the end has little left to write.
        writeback = (fileio.Writeback(fd=fd) if _published_as_is(c, meta)
                     else contextlib.nullcontext())
        try:
            with writeback:
                try:
                    for chunk in chunks:
                        chunk = _frozen(chunk)
                        inspector.feed(chunk)
                        hashing.put(chunk)
                        writing.put(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress("fetch", done, meta.size)
                except BaseException:
                    _close_all(hashing, writing, quiet=True)
                    raise
                _close_all(hashing, writing)
        except exception.ImageBackendException:
            # The source's own errors (ImageDownloadError is an OSError)
            # already name the image and what failed.
            raise
        except OSError as exc:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=meta.source,
                reason="writing %s failed: %s" % (part, exc)) from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if meta.size is not None and done != meta.size:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=meta.source,
                reason="received %d bytes, the source recorded %d"
                       % (done, meta.size))
        actual = hasher.hexdigest()
        if expected and actual != expected[1]:
            raise exception.ImageChecksumMismatch(
                image_id=meta.image_id, source=meta.source,
                algo=algo, expected=expected[1], actual=actual)
        result = inspector.finish()
        writer.finish()
        if not _converts(c, result):
            os.fsync(fd)
    return (algo, actual), result, done


class _Stage:
    """Calls ``func`` on each chunk given to :meth:`put`, in order, from a
    helper thread, so that its work overlaps the caller's (hashing and
    writing both release the GIL).  At most ``_QUEUE`` chunks wait, which
    bounds the memory it holds.  After an error ``func`` is not called
    again, and :meth:`put` and :meth:`close` raise it.
    """

    def __init__(self, func, name: str) -> None:
        self._func = func
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="imagebackend-" + name)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._func(chunk)
                except Exception as exc:
                    # Keep draining, so that put() never blocks.
                    self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait for every chunk given so far to be done (idempotent).

        :raises Exception: what ``func`` raised, if it failed.
        """
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


def _frozen(chunk):
    """``chunk``, or a copy of it if it could change: the stages may still
    be reading it while the source produces the next one (a source ought
    to yield ``bytes``, but one that refills a buffer must not corrupt a
    base).
    """
    if type(chunk) is bytes:
        return chunk
    view = memoryview(chunk)
    if type(view.obj) is bytes:
        return view
    return bytes(view)


def _close_all(*stages, quiet: bool = False) -> None:
    """Close every stage, even after one failed; raise the first error
    unless ``quiet`` (another error is on its way).
    """
    error = None
    for stage in stages:
        try:
            stage.close()
        except Exception as exc:
            error = error or exc
    if error is not None and not quiet:
        raise error


def reinspect(c: "cache.ImageCache", meta, stem: str) -> dict:
    """Inspect non-raw base ``stem`` again, as the format its record
    names, before trusting it under the current inspection policy.

    Nothing is moved: a base the policy now refuses may be in use by
    disks, which must go on reading it.  It is marked stale instead (no
    new disk uses it; ``cache prune`` removes it once nothing does).

    :returns: its updated metadata record.
    :raises imagebackend.exception.UnsafeImage: the policy refuses it.
    """
    base = c.base_path(stem)
    record = cache_layout.read_record(base + ".json")
    if not cache_layout.valid_record(record):
        raise exception.CacheError(
            path=base, reason="its record changed while it was being "
                              "re-inspected; retry")
    if not needs_reinspection(record):
        return record
    LOG.info("Re-inspecting cached base %s of image %s as %s", base,
             meta.image_id, record["format"])
    try:
        result = inspection.inspect_file(
            base, meta.image_id, c.conf,
            declared_format=_declared_base_format(record))
        if inspection.qemu_format(result) != record["format"]:
            raise exception.FormatMismatch(
                image_id=meta.image_id,
                reason="cached base %s is recorded as %s but inspects as "
                       "%s" % (base, record["format"], result.format))
    except exception.UnsafeImage as exc:
        c.mark_stale(stem, "refused on re-inspection: %s" % exc.message)
        users = c.scanner.users_of(
            cache_layout.cache_id(meta.image_id), stem)
        LOG.warning("Cached base %s of image %s is refused by the current "
                    "inspection policy; marked stale, left in place for "
                    "the disks using it (%s)", base, meta.image_id,
                    ", ".join(users) or "none known")
        raise
    inspected = dict(result.to_dict(),
                     version=inspection.INSPECTION_VERSION)
    changes = {"virtual_size": result.virtual_size,
               "inspection": inspected}
    return cache_layout.update_record(base + ".json", changes) or dict(
        record, **changes)


def _declared_base_format(record: dict) -> str | None:
    """The format a base must inspect as: the source's own format when
    the base is the downloaded file itself (an ISO stays an ISO, a GPT disk
    a GPT disk, though qemu-img reads both as raw), otherwise the format
    it was converted to.
    """
    fmt, source_fmt = record.get("format"), record.get("source_format")
    if fmt and source_fmt:
        try:
            if inspection.qemu_format(source_fmt) == fmt:
                return source_fmt
        except ValueError:
            pass
    return fmt


def prefetch(c: "cache.ImageCache", image_ids: list[str], *,
             parallel: int = 4,
             progress: typing.Callable | None = None) -> list[dict]:
    """Fetch images into the cache ahead of use, ``parallel`` at a time,
    each under its use lock like a disk creation, so that each image is
    downloaded once even while disks are being made from it.

    :param progress: called as ``progress(image_id, stage, done, total)``
        during long steps.
    :returns: one dict per distinct image: ``image_id``, ``file``,
        ``generation``, ``cache_hit``, ``seconds``, or ``error``.
    """
    def one(image_id):
        start = time.monotonic()
        report = None
        if progress is not None:
            report = functools.partial(progress, image_id)
        try:
            with c.use(image_id):
                entry, hit = c.get(image_id, progress=report)
        except exception.ImageBackendException as exc:
            LOG.warning("Prefetching image %s failed: %s", image_id,
                        exc.message)
            return {"image_id": image_id, "error": exc.exact_message,
                    "seconds": time.monotonic() - start}
        return {"image_id": image_id, "file": entry.path,
                "generation": entry.generation, "cache_hit": hit,
                "seconds": time.monotonic() - start}

    ids = list(dict.fromkeys(image_ids))
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(one, ids))


def _stage_progress(progress, stage):
    if progress is None:
        return None

    def report(percent):
        progress(stage, int(percent * 100), 10000)
    return report
