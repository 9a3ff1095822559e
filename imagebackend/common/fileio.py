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

"""Small filesystem primitives the cache and the backends share.

Every write that another process may read goes to a temporary name first,
is fsynced, and is renamed into place, so no reader ever sees half a file.
Copies keep holes as holes.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import mmap
import os
import secrets
import stat
import tempfile
import threading

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
_libc = None
_DIRECT_IO: dict[str, bool] = {}
_DIRECT_IO_LOCK = threading.Lock()


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """Make the data and size of file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fdatasync_path(path: str) -> None:
    """Make the data and size of file ``path`` durable (not its times, so
    a file whose writer already flushed it costs no journal commit).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str, mode: int = 0o755) -> None:
    """Create ``path`` (and parents) if missing; refuse a symlink."""
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR,
                                 "not a directory (or a symlink)", path)


def remove_quietly(path: str) -> bool:
    """Remove ``path`` if it exists.

    :returns: True when a file was removed.
    """
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def write_json_atomic(path: str, data: dict, *, durable: bool = True) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file + rename.

    :param durable: fsync the file and its directory.  Records that only
        refresh a timestamp may skip it; losing one on a crash is harmless.
    """
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".",
                               suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if durable:
        fsync_dir(directory)


def read_json(path: str, limit: int = 1024 * 1024) -> dict | None:
    """Read a JSON record; ``None`` if it is missing, empty (a record
    being written in place), unreadable or not a JSON object.

    Records live where only the library writes, so a symlink or anything
    but a regular file there is ignored, never followed or opened in a
    way that could block (a FIFO); at most ``limit`` bytes are read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            LOG.warning("Ignoring record %s: it is a symlink, which is "
                        "never followed", path)
        else:
            LOG.warning("Ignoring unreadable metadata record %s: %s", path,
                        exc)
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                LOG.warning("Ignoring metadata record %s: not a regular "
                            "file", path)
                return None
            raw = f.read(limit + 1)
        if not raw:
            return None
        if len(raw) > limit:
            raise ValueError("larger than %d bytes" % limit)
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        LOG.warning("Ignoring unreadable metadata record %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


class SparseWriter:
    """Write a stream of chunks to a new, empty file descriptor, leaving
    zero blocks as holes.  Call :meth:`finish` to set the final length (a
    trailing hole needs an explicit truncate).

    Blocks are aligned to the file, not to the chunks, so the same holes
    are found however the stream is cut into chunks.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk).cast("B")
        length = len(view)
        origin = self.offset
        start = 0       # the first byte neither written nor skipped
        pos = 0
        while pos < length:
            end = min(pos + ZERO_BLOCK - (origin + pos) % ZERO_BLOCK, length)
            if all_zeros(view[pos:end]):
                if start < pos:
                    self._write_at(view[start:pos], origin + start)
                start = end
            pos = end
        if start < length:
            self._write_at(view[start:length], origin + start)
        self.offset = origin + length

    def _write_at(self, data: memoryview, offset: int) -> None:
        while data:
            written = os.pwrite(self.fd, data, offset)
            data = data[written:]
            offset += written

    def finish(self) -> int:
        os.ftruncate(self.fd, self.offset)
        return self.offset


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
    if _load_libc().fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def new_file(path: str, mode: int = 0o644):
    """Create ``path`` exclusively (never following a symlink) and yield its
    descriptor; on any error the file is removed.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)     # independent of the caller's umask
        yield fd
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    os.close(fd)


#: ``renameat2`` flag: fail with EEXIST instead of replacing the target.
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
#: errors of ``link`` that mean "no hard links on this filesystem".
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK)
#: the longest file name most filesystems take.
_NAME_MAX = 255


def temp_beside(final: str, mode: int = 0o644) -> str:
    """Create a new, empty file under a unique hidden name in the directory
    of ``final`` (``.<name>.<random>.tmp``), exclusively and without
    following a symlink, and return its path.

    The caller fills it and gives it its name with :func:`publish`.

    :raises OSError: the file cannot be created.
    """
    directory, name = os.path.split(final)
    suffix = ".%s.tmp" % secrets.token_hex(8)
    # Keep the whole name within NAME_MAX, whatever the final name's length.
    room = _NAME_MAX - 1 - len(suffix)
    stem = name.encode("utf-8", "surrogateescape")[:room]
    path = os.path.join(directory, "." + stem.decode("utf-8", "ignore")
                        + suffix)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)     # independent of the caller's umask
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    os.close(fd)
    return path


def publish(tmp: str, final: str) -> None:
    """Give the complete (fsynced) file ``tmp`` the name ``final`` unless
    that name exists, and make the new name durable.

    A hard link is made and ``tmp`` removed; where the filesystem has no
    hard links, ``renameat2(RENAME_NOREPLACE)`` is used, and only where
    that is missing too a rename after a last look (which a concurrent
    writer of the same name could still race).

    :raises FileExistsError: ``final`` exists; ``tmp`` is left as it was.
    :raises OSError: any other failure; ``final`` is not left behind and
        ``tmp`` may remain (the caller removes it).
    """
    st = os.lstat(tmp)
    try:
        os.link(tmp, final, follow_symlinks=False)
        linked = True
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        LOG.debug("No hard link for %s (%s); renaming instead", final, exc)
        rename_noreplace(tmp, final)
        linked = False
    try:
        if linked:
            os.unlink(tmp)
        fsync_dir(os.path.dirname(os.path.abspath(final)))
    except OSError:
        # Undo only our own name: the file there is still the one we made.
        remove_if_same(final, st)
        raise


# Errors of linkat() by descriptor that mean "no hard link here" (or no
# /proc to link through), not "the name exists": then a no-replace rename
# is tried instead.
_NO_FD_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV,
               errno.EMLINK, errno.ENOENT, errno.EACCES)


def publish_fd(fd: int, path: str, final: str) -> bool:
    """Give the open file ``fd`` (whose name is ``path``, in the same
    directory as ``final``) the name ``final`` unless ``final`` exists,
    never replacing anything and never after a look-then-rename.

    The file is linked by its descriptor, so what is published is exactly
    the inode the caller checked, whatever happened to ``path``; ``path`` is
    then removed.  Where the filesystem has no hard links,
    ``renameat2(RENAME_NOREPLACE)`` of ``path`` is used, after checking
    that ``path`` is still that inode.  Unlike :func:`publish`, there is
    no fallback that a concurrent writer could race, and the directory is
    not fsynced (the caller does it once).

    :returns: True when published, False when ``final`` exists (``path``
        is left for the caller to remove).
    :raises OSError: neither a hard link nor a no-replace rename is
        possible on this filesystem (``EINVAL``/``ENOSYS``), or another
        error.
    """
    directory, name = os.path.split(final)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY
                     | os.O_CLOEXEC)
    try:
        # dst_dir_fd makes Python call linkat(..., AT_SYMLINK_FOLLOW), which
        # links the file /proc/self/fd/N refers to.
        os.link("/proc/self/fd/%d" % fd, name, dst_dir_fd=dir_fd)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FD_LINK:
            raise
        LOG.debug("Cannot hard-link into %s (%s); renaming without "
                  "replacing instead", directory, exc)
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            raise OSError(errno.ESTALE, "scratch file was replaced",
                          path) from exc
        try:
            renameat2_noreplace(path, final)
        except FileExistsError:
            return False
        return True
    finally:
        os.close(dir_fd)
    remove_quietly(path)
    return True


def remove_if_same(path: str, st: os.stat_result) -> bool:
    """Remove ``path`` only if it is the file ``st`` describes.

    :returns: True when it was removed.
    """
    try:
        if not os.path.samestat(os.lstat(path), st):
            return False
    except FileNotFoundError:
        return False
    return remove_quietly(path)


def renameat2_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` atomically unless ``dst`` exists
    (``renameat2(RENAME_NOREPLACE)``), with no fallback.

    :raises FileExistsError: ``dst`` exists; nothing changed.
    :raises OSError: the primitive is missing (``ENOSYS``) or the
        filesystem lacks it (``EINVAL``, ``EOPNOTSUPP``), or another error.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", dst)
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                 _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    # OSError() gives FileExistsError for EEXIST.
    raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists: atomically where
    the filesystem can, else after a last look.

    :raises FileExistsError: ``dst`` exists.
    """
    try:
        renameat2_noreplace(src, dst)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    # Neither links nor an atomic no-replace rename on this filesystem.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _renameat2():
    lib = _load_libc()
    try:
        func = lib.renameat2
    except AttributeError:      # a C library older than glibc 2.28
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                     ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _load_libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int64, ctypes.c_int64]
    return _libc


def make_dirs(path: str, mode: int = 0o755) -> list[str]:
    """Create directory ``path`` and its missing parents; refuse a
    symlink or a non-directory at ``path``.

    :returns: the directories this call created, outermost first, for
        :func:`remove_made_dirs` to undo.
    :raises OSError: a directory cannot be created.
    """
    missing = []
    head = os.path.abspath(path)
    while not os.path.lexists(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    made = []
    try:
        for directory in reversed(missing):
            try:
                os.mkdir(directory, mode)
            except FileExistsError:
                continue        # someone else made it meanwhile: not ours
            made.append(directory)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR,
                                     "not a directory (or a symlink)", path)
    except BaseException:
        remove_made_dirs(made)
        raise
    return made


def remove_made_dirs(made: list[str]) -> None:
    """Remove the directories :func:`make_dirs` created, innermost first,
    each only if it is empty (another call may have put a file there).
    """
    for directory in reversed(made):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError as exc:
            LOG.debug("Leaving directory %s: %s", directory, exc)
            return      # its parents are not empty either


def remove_regular(path: str) -> None:
    """Remove a partial output, but never a device node or a directory."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            remove_quietly(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("Could not remove partial file %s: %s", path, exc)


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
        remove_quietly(path)


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
