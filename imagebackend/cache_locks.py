"""The cache's inter-process locks, and removing their files safely.

Two kinds of lock live in the cache's lock directory:

``imagebackend-<name>``
    An exclusive oslo.concurrency external lock (plus its in-process
    semaphore): one per image for fetch/convert/publish, one per sized
    base while it is built.
``imagebackend-use-<cache_id>``
    A shared/exclusive ``flock`` lock per image.  Every request that makes a
    disk from the image (or prefetches it) holds it shared from the moment
    it looks the base up until its disk exists and is recorded; the pruner
    takes it exclusively, without waiting, before it removes anything of
    that image.  ``flock`` locks belong to an open file, not to a process,
    so threads of one process exclude each other too.

Lock files of images that are gone are removed by the pruner.  Removing a
lock file is only safe if nobody can be left holding a lock on the removed
file while someone else locks its replacement, so every lock here checks,
once it holds the lock, that the path still names the file it locked, and
starts again if not; the file is only ever removed by a holder of its lock.
"""

import contextlib
import errno
import fcntl
import os
import time
import typing

from oslo_concurrency import lockutils

LOCK_PREFIX = "imagebackend-"
USE_PREFIX = LOCK_PREFIX + "use-"


class Busy(Exception):
    """A lock asked for without waiting is held by someone else."""


#: the longest pause between two tries of a held lock: a waiter starts at
#: most this late after the holder is done.  Every process creating a
#: disk of an image being downloaded waits on its lock; polling (rather
#: than blocking in the kernel) keeps green threads running, and a try is
#: one system call.
_POLL_MAX = 0.02


def lock_file(lock_dir: str, name: str) -> str:
    """The path of the exclusive lock ``name``."""
    return os.path.join(lock_dir, LOCK_PREFIX + name)


def use_lock_file(lock_dir: str, cid: str) -> str:
    """The path of image ``cid``'s use lock."""
    return os.path.join(lock_dir, USE_PREFIX + cid)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive(lock_dir: str, name: str, *,
              blocking: bool = True) -> typing.Iterator[None]:
    """Hold the exclusive lock ``name`` (threads and processes).

    :param blocking: False to raise :class:`Busy` instead of waiting.
    :raises Busy: ``blocking`` is False and the lock is held.
    """
    # The in-process semaphore first: POSIX record locks belong to the
    # process, so without it two threads would both "hold" the file lock.
    semaphore = lockutils.internal_lock(name)
    if not semaphore.acquire(blocking=blocking):
        raise Busy(name)
    try:
        ext = _acquire_external(lock_dir, name, blocking)
        try:
            yield
        finally:
            ext.release()
    finally:
        semaphore.release()


def _acquire_external(lock_dir, name, blocking):
    while True:
        ext = lockutils.external_lock(name, LOCK_PREFIX, lock_dir)
        if not ext.acquire(blocking=blocking, delay=0.005,
                           max_delay=_POLL_MAX):
            raise Busy(name)
        if _same_file(ext.lockfile.fileno(), ext.path):
            return ext
        # The file was removed as stale after we opened it: lock the new one.
        ext.release()


@contextlib.contextmanager
def flocked(path: str, *, shared: bool = False,
            blocking: bool = True) -> typing.Iterator[int]:
    """Hold a ``flock`` lock on ``path`` (created if missing).

    :param shared: a shared lock instead of an exclusive one.
    :param blocking: False to raise :class:`Busy` instead of waiting.
    :returns: (as the context value) the locked file descriptor.
    :raises Busy: ``blocking`` is False and a conflicting lock is held.
    """
    operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    delay = 0.005
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, operation)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if not blocking:
                raise Busy(path) from exc
            # Poll rather than block in the kernel, so that green threads
            # (eventlet) of the same process keep running meanwhile.
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            continue
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


def remove_lock_file(lock_dir: str, file_name: str) -> bool:
    """Remove one of the cache's lock files if nobody holds it.

    :param file_name: the file's name in ``lock_dir``
        (``imagebackend-...``).
    :returns: True when it was removed, False when it is held or gone.
    """
    path = os.path.join(lock_dir, file_name)
    if not os.path.lexists(path):
        return False
    try:
        if file_name.startswith(USE_PREFIX):
            with flocked(path, blocking=False):
                os.unlink(path)
        else:
            with exclusive(lock_dir, file_name[len(LOCK_PREFIX):],
                           blocking=False):
                os.unlink(path)
    except Busy:
        return False
    except FileNotFoundError:
        return False
    return True
