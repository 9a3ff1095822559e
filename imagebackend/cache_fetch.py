"""The cache's miss path: choosing a generation, then downloading,
converting and publishing it (or re-inspecting a base whose record is
missing), and prefetching.

Everything here but :func:`prefetch` runs under the image's lock, taken by
:meth:`imagebackend.cache.ImageCache.get`.
"""

import concurrent.futures
import contextlib
import functools
import logging
import os
import queue
import threading
import time
import typing

from imagebackend import cache_layout
from imagebackend import cache_verify
from imagebackend import digest as content_digest
from imagebackend import exception
from imagebackend import fileutils
from imagebackend import inspect

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
        raise exception.InvalidImageSize(
            image_id=meta.image_id,
            reason="its virtual size is %d bytes, larger than the "
                   "requested disk of %d bytes; ask for at least %d "
                   "bytes" % (known, requested_size, known))


def choose_stem(c: "cache.ImageCache", meta) -> tuple[str, bool]:
    """A base of the image to re-inspect (its record is missing or from an
    older inspection policy), or the name of the next generation to fetch.

    :returns: ``(stem, reinspect)``.
    """
    cid = cache_layout.cache_id(meta.image_id)
    found = cache_layout.generations(c.base_dir, cid)
    for gen in sorted(found, reverse=True):
        stem = cache_layout.stem(cid, gen)
        if "base" not in found[gen] or not c.check_regular(
                c.base_path(stem)):
            continue
        record = fileutils.read_json(c.base_path(stem) + ".json")
        if record is None or (
                record.get("image_id") == meta.image_id
                and not record.get("stale")
                and same_identity(record, meta.identity)):
            return stem, True
    # A generation is taken while its base or any sized base of it is
    # left: a disk may still name it.
    taken = [gen for gen, kinds in found.items()
             if kinds & {"base", "sized"}]
    return cache_layout.stem(cid, max(taken, default=0) + 1), False


def fetch(c: "cache.ImageCache", meta, stem: str,
          requested_size: int | None, progress, timings: dict) -> dict:
    """Download, convert and publish generation ``stem``.

    :returns: its metadata record.
    """
    base = c.base_path(stem)
    part = base + ".part"
    converted = base + ".converted"
    c.remove_scratch(part)
    c.remove_scratch(converted)
    try:
        start = time.monotonic()
        digest, result, size = download(c, meta, part, requested_size,
                                        progress)
        identity = meta.identity
        if meta.identity_deferred:
            identity = c.source.identify_download(meta, *digest)
        timings["fetch"] = time.monotonic() - start
        fmt = inspect.qemu_format(result)
        source_file = part
        base_digest = None
        if _converts(c, result):
            start = time.monotonic()
            # Written through the page cache, sent to disk while qemu-img
            # writes it, and fsynced once at the end: the base is as
            # durable as with O_DIRECT, and the conversion much faster.
            c.qemu.convert(part, fmt, converted, "raw",
                           target_cache="unsafe", durable=False,
                           progress=_stage_progress(progress, "convert"))
            fileutils.remove_quietly(part)
            # The base's bytes are not the source's: record their own
            # digest so that 'cache verify' can check them.  It reads the
            # page cache while the last of the data goes to disk.
            try:
                with fileutils.Writeback(path=converted):
                    base_digest = cache_verify.sparse_digest(converted)
                fileutils.fsync_path(converted)
            except OSError as exc:
                raise exception.DiskOperationError(
                    path=converted, reason="could not read back or flush "
                    "the conversion of image %s (%s); check the filesystem "
                    "of %s (free space, I/O errors) and retry"
                    % (meta.image_id, exc, c.base_dir)) from exc
            timings["convert"] = time.monotonic() - start
            source_file, fmt = converted, "raw"
        virtual_size = result.virtual_size
        if fmt == "raw":
            virtual_size = os.stat(source_file).st_size
        gen = cache_layout.parse(stem).generation
        record = {
            "image_id": meta.image_id,
            "generation": gen,
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
        fileutils.write_json_atomic(base + ".json", record)
        os.rename(source_file, base)
        fileutils.fsync_dir(c.base_dir)
        timings["cache"] = time.monotonic() - start
    except BaseException:
        fileutils.remove_quietly(part)
        fileutils.remove_quietly(converted)
        raise
    LOG.info("Cached image %s as %s (%s, %d bytes virtual)",
             meta.image_id, base, fmt, virtual_size)
    _supersede(c, meta.image_id, gen)
    return record


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
            and inspect.qemu_format(result_or_format) != "raw")


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
    inspector = inspect.StreamInspector(
        meta.image_id, c.conf, declared_format=meta.disk_format,
        requested_size=requested_size)
    done = 0
    with fileutils.new_file(part) as fd:
        writer = fileutils.SparseWriter(fd)
        chunks = c.source.open(meta)
        # The bytes are received and inspected here, hashed in one thread
        # and written in another.
        hashing = _Stage(hasher.update, "hash")
        writing = _Stage(writer.write, "write")
        # A part to be published as it is goes to disk while it streams,
        # so that the fsync at the end has little left to write.
        writeback = (fileutils.Writeback(fd=fd) if _published_as_is(c, meta)
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
    """Inspect base ``stem`` again before trusting it (its record is
    missing or predates the current inspection policy).

    :returns: its new metadata record.
    :raises imagebackend.exception.UnsafeImage: the policy refuses it; it
        is renamed to ``<stem>.refused`` so the next use fetches afresh.
    """
    base = c.base_path(stem)
    record = fileutils.read_json(base + ".json") or {}
    fmt = _declared_base_format(record)
    if fmt is None and c.conf.imagebackend.force_raw_images:
        fmt = "raw"
    LOG.info("Re-inspecting cached base %s of image %s", base,
             meta.image_id)
    try:
        result = inspect.inspect_file(base, meta.image_id, c.conf,
                                      declared_format=fmt)
    except exception.UnsafeImage:
        os.rename(base, base + ".refused")
        raise
    record.update({
        "image_id": meta.image_id,
        "generation": cache_layout.parse(stem).generation,
        "source": record.get("source", meta.source),
        "identity": record.get("identity", meta.identity),
        "format": inspect.qemu_format(result),
        "virtual_size": result.virtual_size,
        "inspection": result.to_dict(),
    })
    record.setdefault("created_at",
                      cache_layout.isotime(os.stat(base).st_mtime))
    fileutils.write_json_atomic(base + ".json", record)
    return record


def _declared_base_format(record: dict) -> str | None:
    """The format a base must inspect as: the source's own format when
    the base is the downloaded file itself (an ISO stays an ISO, a GPT disk
    a GPT disk, though qemu-img reads both as raw), otherwise the format
    it was converted to.
    """
    fmt, source_fmt = record.get("format"), record.get("source_format")
    if fmt and source_fmt:
        try:
            if inspect.qemu_format(source_fmt) == fmt:
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
            return {"image_id": image_id, "error": exc.message,
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
