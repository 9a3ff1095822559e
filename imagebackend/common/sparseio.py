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

"""Sparse copies and writes: holes stay holes, and dirty pages are written
back as a copy goes, so the final fsync is short.

Streams and copies the cache and the backends make of images are mostly
zeros; everything here skips them (``lseek`` over a zero block) instead of
writing them, and reads only the data extents of a sparse file.
"""

import contextlib
import errno
import logging
import mmap
import os
import secrets
import threading

from imagebackend.common import fileio

LOG = logging.getLogger(__name__)

#: granularity at which streamed data is checked for zeros; a zero block is
#: skipped with lseek so it stays a hole in the written file.
ZERO_BLOCK = 64 * 1024
_ZEROS = bytes(ZERO_BLOCK)
#: zeros that stand for a hole: a reader that knows where a file's holes
#: are hands out views of it, which :func:`all_zeros` recognises without
#: comparing a byte (``bytes`` are immutable, so a view of it is zeros).
HOLE = bytes(4 * 1024 * 1024)

_FALLOC_FL_KEEP_SIZE = 0x01
_DIRECT_IO: dict[str, bool] = {}
_DIRECT_IO_LOCK = threading.Lock()


class SparseWriter:
    """Write a stream of chunks to a new, empty file descriptor, leaving
    zero blocks as holes.  Call :meth:`finish` to set the final length (a
    trailing hole needs an explicit truncate).

    Blocks are aligned to the file, not to the chunks, so the same holes
    are found however the stream is cut into chunks.

    :param block: the size of the zero blocks left as holes (a multiple
        of the filesystem's block size).
    """

    def __init__(self, fd: int, block: int = ZERO_BLOCK) -> None:
        self.fd = fd
        self.block = block
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk).cast("B")
        length = len(view)
        origin = self.offset
        start = 0       # the first byte neither written nor skipped
        pos = 0
        while pos < length:
            end = min(pos + self.block - (origin + pos) % self.block,
                      length)
            if all_zeros(view[pos:end]):
                if start < pos:
                    self._write_at(view[start:pos], origin + start)
                start = end
            pos = end
        if start < length:
            self._write_at(view[start:length], origin + start)
        self.offset = origin + length

    def _write_at(self, data: memoryview, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def finish(self) -> int:
        os.ftruncate(self.fd, self.offset)
        return self.offset


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` into ``fd`` at ``offset`` (``pwrite`` may
    write less than it was given).
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def data_extents(fd: int, size: int):
    """Yield ``(offset, length)`` of the data regions of an open file,
    up to ``size``; where holes cannot be found, the rest is all data.
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:    # only a hole remains
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size - offset
                return
            raise
        if start >= size:                   # data beyond what is wanted
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def read_regions(fd: int, size: int, chunk_size: int):
    """Walk the open file ``fd`` up to ``size``, reading only its data.

    Yields ``(length, data)``: ``data`` is at most ``chunk_size`` bytes
    read from the file, or ``None`` for a hole of ``length`` zero bytes.
    A read that finds the end of the file (it shrank under the reader)
    ends the walk, so the caller sees fewer than ``size`` bytes.
    """
    pos = 0
    for start, length in data_extents(fd, size):
        if start > pos:
            yield start - pos, None
        pos = start
        while pos < start + length:
            chunk = os.pread(fd, min(chunk_size, start + length - pos), pos)
            if not chunk:
                return
            yield len(chunk), chunk
            pos += len(chunk)
    if size > pos:
        yield size - pos, None


def zero_chunks(length: int, chunk_size: int = len(HOLE)):
    """Yield ``length`` zero bytes as views of :data:`HOLE`, at most
    ``chunk_size`` (and never more than ``HOLE``) at a time.
    """
    hole = memoryview(HOLE)
    while length > 0:
        piece = hole[:min(chunk_size, length)]
        yield piece
        length -= len(piece)


def all_zeros(data) -> bool:
    """Whether ``data`` (bytes or a byte memoryview) holds only zeros;
    compared a block at a time with memcmp (``bytes.startswith``), as
    comparing memoryviews with ``==`` goes byte by byte.
    """
    view = memoryview(data).cast("B")
    if view.obj is HOLE:
        return True
    for i in range(0, len(view), ZERO_BLOCK):
        if not _ZEROS.startswith(view[i:i + ZERO_BLOCK]):
            return False
    return True


def sparse_copy(src: str, dst_fd: int, writeback: bool = True) -> int:
    """Copy file ``src`` into the open, empty file ``dst_fd``, keeping holes.

    Only the data extents are copied, with ``os.copy_file_range`` (a
    reflink or in-kernel copy where the filesystem offers one).

    :param writeback: send the copy to disk while it is made
        (:class:`Writeback`), for a caller that fsyncs it afterwards.
    :returns: the number of bytes in the copy (the source's length).
    """
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(src_fd).st_size
        with (Writeback(fd=dst_fd) if writeback
              else contextlib.nullcontext()):
            _copy_extents(src_fd, dst_fd, size)
        os.ftruncate(dst_fd, size)
        return size
    finally:
        os.close(src_fd)


def _copy_extents(src_fd: int, dst_fd: int, size: int) -> None:
    for start, length in data_extents(src_fd, size):
        copied = 0
        while copied < length:
            n = _copy_range(src_fd, dst_fd, start + copied, length - copied)
            if n == 0:      # the source shrank under us
                break
            copied += n


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    try:
        return os.copy_file_range(src_fd, dst_fd, count, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                             errno.EINVAL):
            raise
    # Filesystems without copy_file_range between these two files.
    data = os.pread(src_fd, min(count, 8 * 1024 * 1024), offset)
    return os.pwrite(dst_fd, data, offset)


def allocated_bytes(path: str) -> int:
    """Bytes actually allocated on disk for ``path``."""
    return os.stat(path, follow_symlinks=False).st_blocks * 512


def preallocate(fd: int, size: int, *, keep_size: bool = False) -> None:
    """Reserve ``size`` bytes of disk space for an open file.

    :param keep_size: reserve without changing the file's length (for a
        qcow2 file, whose length must stay the end of its metadata).
    """
    if not keep_size:
        os.posix_fallocate(fd, 0, size)
        return
    if fileio.load_libc().fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        import ctypes   # loaded by load_libc()

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def direct_io_supported(directory: str) -> bool:
    """Whether files in ``directory`` can be written with ``O_DIRECT``.

    Probed once per directory (by writing one aligned block to a temporary
    file) and remembered for the life of the process.
    """
    directory = os.path.realpath(directory)
    with _DIRECT_IO_LOCK:
        if directory not in _DIRECT_IO:
            answer = _probe_direct_io(directory)
            if answer is None:
                return False
            _DIRECT_IO[directory] = answer
        return _DIRECT_IO[directory]


def _probe_direct_io(directory):
    """Return True or False, or None when the directory cannot tell.

    A directory that is missing or not writable cannot tell; that answer
    is not remembered.
    """
    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(directory,
                        ".direct-io-probe-%s" % secrets.token_hex(8))
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_DIRECT,
                     0o600)
    except OSError as exc:
        LOG.debug("O_DIRECT probe in %s: %s", directory, exc)
        return False if exc.errno == errno.EINVAL else None
    buf = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned, as O_DIRECT needs
    try:
        os.write(fd, buf)
        return True
    except OSError as exc:
        LOG.debug("O_DIRECT probe in %s: %s", directory, exc)
        return False if exc.errno == errno.EINVAL else None
    finally:
        buf.close()
        os.close(fd)
        fileio.remove_quietly(path)


class Writeback:
    """Push a new file's data to disk while it is still being written, so
    that the fsync that makes it durable at the end waits only for the last
    pages instead of all of them.

    A helper thread watches the file's allocated size and calls
    ``fdatasync`` each time it has grown by ``batch`` bytes, until the
    ``with`` block ends; each call writes what accumulated since the one
    before, so the disk works alongside the writer.  Counting bytes rather
    than time bounds how often a slow stream makes the filesystem commit
    its journal (which other files' writes may wait behind).  The file is
    given as an open descriptor (``fd``), or as a path another process will
    create (``path``: opened read-only once it appears).  The caller still
    fsyncs at the end: leaving the block makes nothing durable by itself.
    A write error found by a background flush is raised when the block
    ends, as the final fsync might not report it again; a file that cannot
    be flushed this way (``EINVAL``) is just left alone.

    :param batch: bytes of new data between two flushes.
    :param interval: seconds between two looks at the file's size.
    """

    def __init__(self, fd: int | None = None, path: str | None = None, *,
                 batch: int = 16 * 1024 * 1024,
                 interval: float = 0.01) -> None:
        if (fd is None) == (path is None):
            raise ValueError("give either fd or path")
        self._fd = fd
        self._path = path
        self._batch = batch
        self._interval = interval
        self._stop = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="imagebackend-writeback")

    def __enter__(self) -> "Writeback":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def _run(self) -> None:
        fd, own = self._fd, False
        flushed = 0
        try:
            while not self._stop.is_set():
                if fd is None:
                    fd = self._open()
                    own = fd is not None
                if fd is not None:
                    allocated = os.fstat(fd).st_blocks * 512
                    if allocated - flushed >= self._batch:
                        os.fdatasync(fd)
                        flushed = allocated
                self._stop.wait(self._interval)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS):
                self._error = exc
        finally:
            if own:
                os.close(fd)

    def _open(self) -> int | None:
        try:
            # Non-blocking, so that a FIFO in the way cannot hang the thread.
            return os.open(self._path,
                           os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            LOG.debug("Cannot flush %s while it is written: %s", self._path,
                      exc)
            self._stop.set()
            return None
