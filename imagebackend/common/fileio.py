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

import _thread
import contextlib
import errno
import json
import logging
import os
import secrets
import stat
import tempfile

LOG = logging.getLogger(__name__)

_libc = None


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


def real_path(path: str) -> str:
    """What ``os.path.realpath(path)`` returns, with the part of an
    absolute, normalized ``path`` that exists resolved by the kernel (one
    open and one read of its ``/proc/self/fd`` link, instead of a look at
    every component); the rest, which does not exist, cannot be a link and
    is appended as it is.  Any other path, or where ``/proc`` cannot tell,
    goes through ``os.path.realpath``.
    """
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        return os.path.realpath(path)
    head, missing = path, []
    while True:
        try:
            fd = os.open(head, os.O_PATH | os.O_CLOEXEC)
            break
        except (FileNotFoundError, NotADirectoryError):
            parent, name = os.path.split(head)
            if parent == head or os.path.lexists(head):
                # A dangling symlink, which realpath resolves.
                return os.path.realpath(path)
            missing.append(name)
            head = parent
        except OSError:
            return os.path.realpath(path)
    try:
        real = os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(" (deleted)"):
        # Out of this process's root, or removed meanwhile.
        return os.path.realpath(path)
    return os.path.join(real, *reversed(missing))


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
    Reading does not change the file's access time where the caller owns
    it: that would be a change of the inode (a journal entry, which waits
    for a commit in progress) that nothing here uses.
    """
    try:
        fd = _open_noatime(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
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
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                LOG.warning("Ignoring metadata record %s: not a regular "
                            "file", path)
                return None
            raw = _read_upto(fd, st.st_size, limit + 1)
        finally:
            os.close(fd)
        if not raw:
            return None
        if len(raw) > limit:
            raise ValueError("larger than %d bytes" % limit)
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        LOG.warning("Ignoring unreadable metadata record %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _read_upto(fd: int, expected: int, most: int) -> bytes:
    """At most ``most`` bytes of the open file ``fd``, read with a buffer
    of the ``expected`` size (plus one byte, to see more) first: a small
    record never costs a buffer of ``most`` bytes (for 1 MiB, a mapping
    made and unmapped, 70-150 us).
    """
    chunks, got = [], 0
    want = min(expected + 1, most)
    while want > 0:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        # More than expected (it grew since), or a short read: go on to
        # the end, a block at a time, up to the limit.
        want = min(most - got, _READ_BLOCK)
    return b"".join(chunks)


#: what :func:`_read_upto` reads at a time past the expected size.
_READ_BLOCK = 64 * 1024


def _open_noatime(path: str, flags: int) -> int:
    """``os.open(path, flags)``, with ``O_NOATIME`` unless the caller may
    not ask for it (a file someone else owns).
    """
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return os.open(path, flags)


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


#: errors of ``open(O_TMPFILE)`` that mean "no unnamed files here".
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


class Unnamed:
    """A new regular file without a name, in directory ``directory``
    (``O_TMPFILE``): nothing of it is left if it is closed, or the host
    crashes, before :meth:`link` names it.  Use :meth:`make`.

    :ivar fd: the file, open for reading and writing.
    """

    def __init__(self, fd: int, dir_fd: int, directory: str) -> None:
        self.fd, self.dir_fd, self.directory = fd, dir_fd, directory
        self.name: str | None = None

    @classmethod
    def make(cls, directory: str, mode: int = 0o644) -> "Unnamed | None":
        """:returns: the file, or ``None`` where the filesystem (or the
            kernel) makes no unnamed files.
        :raises OSError: ``directory`` cannot be opened, or another error.
        """
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY
                         | os.O_CLOEXEC)
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode,
                         dir_fd=dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            if exc.errno in _NO_TMPFILE:
                return None
            raise
        made = cls(fd, dir_fd, directory)
        try:
            # Independent of the caller's umask (and not changed when the
            # umask left it so: a change of the inode costs a journal
            # entry).
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)
        except BaseException:
            made.close()
            raise
        return made

    def link(self, name: str) -> None:
        """Name the complete (fdatasynced) file ``name`` in its directory
        unless that name exists; follow with :meth:`sync_name`.

        :raises FileExistsError: ``name`` exists; nothing changed.
        :raises OSError: any other failure; nothing changed.
        """
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names the very
        # inode this descriptor holds; it never replaces a name.
        os.link("/proc/self/fd/%d" % self.fd, name, dst_dir_fd=self.dir_fd)
        self.name = name

    def sync_name(self) -> None:
        """Make the name :meth:`link` gave durable.

        :raises OSError: it could not be; the name is removed again.
        """
        try:
            os.fsync(self.dir_fd)
        except OSError:
            remove_if_same(os.path.join(self.directory, self.name),
                           os.fstat(self.fd))
            raise

    def close(self) -> None:
        """Close the file (and remove it, if it has no name yet)."""
        os.close(self.fd)
        os.close(self.dir_fd)


class Background:
    """``func(*args)`` running in a thread of its own, for a wait that can
    overlap other work (an fsync: the interpreter runs other threads
    meanwhile).  Starting it does not wait for the thread to be scheduled.

    The threads are kept for the next call once their function returns
    (at most :data:`IDLE_THREADS` of them wait), so that a call costs a
    wake-up rather than a new thread; a child process made by ``fork``
    starts without any.

    :meth:`wait` returns its result or raises its exception.
    """

    def __init__(self, func, *args) -> None:
        self._func, self._args = func, args
        self._result = self._error = None
        self._done = _thread.allocate_lock()
        self._done.acquire()
        _Worker.take().run(self)

    def _run(self) -> None:
        try:
            self._result = self._func(*self._args)
        except BaseException as exc:   # handed to wait()
            self._error = exc

    def wait(self):
        """:returns: what the function returned.
        :raises BaseException: what the function raised.
        """
        with self._done:
            pass
        if self._error is not None:
            raise self._error
        return self._result


#: threads of :class:`Background` kept waiting for a next call, at most.
IDLE_THREADS = 4


class _Worker:
    """A thread that runs :class:`Background` calls, one at a time."""

    #: the workers waiting for a call (the list and its lock are made
    #: anew in a child process: their threads are not in it).
    idle: list = []
    lock = _thread.allocate_lock()

    def __init__(self) -> None:
        self._job = None
        self._go = _thread.allocate_lock()
        self._go.acquire()
        _thread.start_new_thread(self._loop, ())

    @classmethod
    def take(cls) -> "_Worker":
        """An idle worker, or a new one."""
        with cls.lock:
            if cls.idle:
                return cls.idle.pop()
        return cls()

    def run(self, job: Background) -> None:
        self._job = job
        self._go.release()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            job._run()
            with _Worker.lock:
                kept = len(_Worker.idle) < IDLE_THREADS
                if kept:
                    _Worker.idle.append(self)
            # Only now: the caller's next call may find this one idle.
            job._done.release()
            if not kept:
                return

    @classmethod
    def forget(cls) -> None:
        cls.idle = []
        cls.lock = _thread.allocate_lock()


os.register_at_fork(after_in_child=_Worker.forget)


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
    import ctypes

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
    import ctypes

    lib = load_libc()
    try:
        func = lib.renameat2
    except AttributeError:      # a C library older than glibc 2.28
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                     ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def load_libc():
    """The C library, for the calls Python's os module lacks."""
    global _libc
    if _libc is None:
        # ctypes is loaded by the first write that needs it: reading the
        # cache (the command line's cache list) needs none.
        import ctypes
        import ctypes.util

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
