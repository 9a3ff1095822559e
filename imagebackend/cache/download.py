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

"""Downloading an image into a scratch file of the cache in one pass:
received and inspected in the caller's thread, hashed in one helper
thread and written sparsely in another, so that the three overlap.
"""

import contextlib
import os
import queue
import threading
import typing

from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend.common import progress as common_progress
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend import inspection
from imagebackend.sources import base as source_base

#: chunks waiting to be hashed, or written, while the download goes on.
_QUEUE = 2


def download(source: source_base.ImageSource, meta, part: str,
             inspector: inspection.StreamInspector,
             converts: typing.Callable[[typing.Any], bool],
             progress: common_progress.Progress | None):
    """Stream the image ``meta`` from ``source`` into ``part``: inspected
    by ``inspector``, hashed and written sparsely in one pass, fsynced
    before returning when it is to be published as it is (a part to be
    converted is only read back, and the conversion makes its own output
    durable).

    :param converts: ``converts(inspection result or format name)``:
        whether a download of that format is converted before it is
        published.
    :param progress: called as ``progress("download", bytes received,
        bytes expected or None)``.
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
    done = 0
    with fileio.new_file(part) as fd:
        writer = sparseio.SparseWriter(fd)
        chunks = source.open(meta)
        # The bytes are received and inspected here, hashed in one thread
        # and written in another.
        hashing = _Stage(hasher.update, "hash")
        writing = _Stage(writer.write, "write")
        # A part to be published as it is goes to disk while it streams,
        # so that the fsync at the end has little left to write.
        writeback = (sparseio.Writeback(fd=fd)
                     if _published_as_is(converts, meta)
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
                        common_progress.report(progress, "download", done,
                                               meta.size)
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
        if not converts(result):
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


def _published_as_is(converts, meta) -> bool:
    """Whether an image will, by its declared format, be published as it
    is downloaded (the inspection decides in the end).
    """
    try:
        return not converts(meta.disk_format or "raw")
    except ValueError:
        return True
