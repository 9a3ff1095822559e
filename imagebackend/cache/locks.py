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

"""The cache's inter-process locks, and removing their files safely.

Two kinds of lock live in the cache's lock directory:

``imagebackend-<name>``
    An exclusive POSIX record lock (``lockf``, as oslo.concurrency's
    external locks take), plus an in-process semaphore: one per image for
    fetch/convert/publish, one per sized base while it is built.
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

Locks only save duplicate work: the cache publishes nothing that depends on
them (see :mod:`imagebackend.cache.publish`).  Still, every user of one
``_base`` must lock in one directory they all share, or they download and
convert in duplicate; :func:`imagebackend.cache.lockdirs.check_shared`
refuses a configuration it can tell is split.

A waiter logs while it waits and gives up after ``timeout`` seconds with an
error naming what it waited for and who holds it: an exclusive holder
writes its host, pid and command into the lock file while it holds it.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import typing
import weakref

from imagebackend import exception

LOG = logging.getLogger(__name__)

LOCK_PREFIX = "imagebackend-"
USE_PREFIX = LOCK_PREFIX + "use-"


class Busy(exception.ImageBackendException):
    """A lock asked for without waiting is held by someone else.

    The cache catches it where it skips a busy image; a caller that sees
    it may retry later.
    """

    msg_fmt = ("The lock %(name)s is held by another process or thread; "
               "try again once it is done.")


#: the longest pause between two tries of a held lock: a waiter starts at
#: most this late after the holder is done.  Every process creating a
#: disk of an image being downloaded waits on its lock; polling (rather
#: than blocking in the kernel) keeps green threads running, and a try is
#: one system call.
_POLL_MAX = 0.02
#: a waiter logs after waiting this long (seconds), then every
#: LOG_INTERVAL seconds.
LOG_FIRST = 5.0
LOG_INTERVAL = 30.0
# At most this much of a lock file is read for its holder.
_HOLDER_MAX = 2048


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


def _open(path: str) -> int:
    """Open (create) lock file ``path``, never through a symlink.

    :raises imagebackend.exception.LockFileError: it cannot be created
        (a full or read-only lock directory, a symlink, permissions).
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                       | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise exception.LockFileError(
            path=os.path.dirname(path), name=os.path.basename(path),
            reason=exc.strerror or str(exc)) from exc


def printable_field(text, limit: int = 200) -> str:
    """``text`` read from a lock file or a lock-directory entry, safe for
    one line of a message.
    """
    text = str(text)[:limit]
    return text.encode("unicode_escape").decode("ascii")


def _write_holder(fd: int) -> None:
    """Record who holds the lock in its file (best effort: a full disk
    must not stop the work the lock protects).
    """
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "command": " ".join(sys.argv)[:512],
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError as exc:
        LOG.debug("Could not record the holder of a lock: %s", exc)


def _clear_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass


def holder(path: str) -> str:
    """Who holds lock file ``path``, as recorded in it, for a message."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return "an unknown process"
    try:
        data = os.read(fd, _HOLDER_MAX)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    try:
        info = json.loads(data)
        return "pid %s on host %s (%s) since %s" % (
            printable_field(info["pid"], 20),
            printable_field(info["host"], 100),
            printable_field(info["command"]),
            printable_field(info["since"], 40))
    except (ValueError, KeyError, TypeError):
        return "an unknown process (it records no holder)"


class _Wait:
    """Logs while a lock is waited for, and says when to give up."""

    def __init__(self, path: str, what: str | None,
                 timeout: float | None,
                 activity: typing.Callable[[], float | None] | None = None
                 ) -> None:
        self.path = path
        self.what = what or os.path.basename(path)
        self.timeout = timeout or None
        self.activity = activity
        self.start = self.since = time.monotonic()
        self.next_log = self.start + LOG_FIRST

    def remaining(self) -> float | None:
        if self.timeout is None:
            return None
        return max(0.0, self.since + self.timeout - time.monotonic())

    def check(self, who: typing.Callable[[], str]) -> None:
        """Log if it is time to; raise if the wait is over.

        :raises imagebackend.exception.LockWaitTimeout: it is.
        """
        now = time.monotonic()
        waited = now - self.start
        if self.timeout is not None and now - self.since >= self.timeout:
            # A holder that is still writing is slow, not stuck: the
            # timeout counts from its last sign of progress.
            last = self.activity() if self.activity else None
            idle = time.time() - last if last is not None else None
            if idle is not None and idle < self.timeout:
                self.since = now - max(0.0, idle)
                return
            raise exception.LockWaitTimeout(
                path=os.path.dirname(self.path), what=self.what,
                waited=waited, holder=who(), timeout=self.timeout)
        if now >= self.next_log:
            self.next_log = now + LOG_INTERVAL
            LOG.warning("Waiting for the lock on %s (%s) for %d s; it is "
                        "held by %s", self.what, self.path, waited, who())


class _Semaphores:
    """One semaphore per lock file, for the threads of this process, kept
    while a thread holds or waits for it: what oslo.concurrency's
    ``lockutils.internal_lock`` gives, without importing lockutils (with
    debtcollector, fasteners and oslo.i18n, about a tenth of the command
    line's start-up) for the one thing used from it.
    """

    def __init__(self) -> None:
        self._semaphores: weakref.WeakValueDictionary[
            str, threading.Semaphore] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, name: str) -> threading.Semaphore:
        """The semaphore of ``name``, made if no thread holds one."""
        with self._lock:
            semaphore = self._semaphores.get(name)
            if semaphore is None:
                semaphore = threading.Semaphore()
                self._semaphores[name] = semaphore
            return semaphore


_SEMAPHORES = _Semaphores()


def _in_process():
    return "another thread of this process (pid %d)" % os.getpid()


@contextlib.contextmanager
def exclusive(lock_dir: str, name: str, *, blocking: bool = True,
              timeout: float | None = None, what: str | None = None,
              activity: typing.Callable[[], float | None] | None = None
              ) -> typing.Iterator[None]:
    """Hold the exclusive lock ``name`` (threads and processes).

    :param blocking: False to raise :class:`Busy` instead of waiting.
    :param timeout: seconds to wait at most (None or 0: no limit) without
        progress from the holder.
    :param what: what the lock protects, for messages ("image X").
    :param activity: returns when the holder last made progress (a
        ``time.time()`` value, such as the modification time of the file
        it writes) or None; while that is within ``timeout``, the wait
        goes on.
    :raises Busy: ``blocking`` is False and the lock is held.
    :raises imagebackend.exception.LockWaitTimeout: ``timeout`` passed.
    :raises imagebackend.exception.LockFileError: the lock file cannot be
        created.
    """
    path = lock_file(lock_dir, name)
    wait = _Wait(path, what, timeout, activity)
    # The in-process semaphore first: POSIX record locks belong to the
    # process, so without it two threads would both "hold" the file lock.
    # It is named after the file, so caches locking in different
    # directories do not wait for each other.
    semaphore = _SEMAPHORES.get(path)
    if not blocking:
        if not semaphore.acquire(blocking=False):
            raise Busy(name=name)
    else:
        while not semaphore.acquire(timeout=_slice(wait)):
            wait.check(_in_process)
    try:
        fd = _acquire_file(path, fcntl.lockf, fcntl.LOCK_EX, blocking, wait)
        try:
            _write_holder(fd)
            yield
        finally:
            _clear_holder(fd)
            os.close(fd)
    finally:
        semaphore.release()


def _slice(wait: _Wait) -> float:
    """How long to block before the next log line or the timeout."""
    until_log = max(0.01, wait.next_log - time.monotonic())
    remaining = wait.remaining()
    return until_log if remaining is None else max(
        0.01, min(until_log, remaining))


def _acquire_file(path, lock, operation, blocking, wait) -> int:
    """Lock file ``path`` with ``lock`` (``fcntl.lockf`` or ``flock``),
    polling; start again when the file was removed (as stale) and
    replaced after it was opened.

    :returns: the locked descriptor.
    """
    delay = 0.005
    fd = _open(path)
    try:
        while True:
            try:
                lock(fd, operation | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN,
                                     errno.EACCES):
                    raise
                if not blocking:
                    raise Busy(name=path) from exc
                wait.check(lambda: holder(path))
                # Poll rather than block in the kernel, so that green
                # threads (eventlet) of the same process keep running
                # meanwhile; the file stays open while we wait.
                time.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
                if _same_file(fd, path):
                    continue
            else:
                if _same_file(fd, path):
                    return fd
            # Removed (as stale) and replaced meanwhile: lock the new one.
            os.close(fd)
            fd = -1
            fd = _open(path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


@contextlib.contextmanager
def flocked(path: str, *, shared: bool = False, blocking: bool = True,
            timeout: float | None = None,
            what: str | None = None) -> typing.Iterator[int]:
    """Hold a ``flock`` lock on ``path`` (created if missing).

    :param shared: a shared lock instead of an exclusive one.
    :param blocking: False to raise :class:`Busy` instead of waiting.
    :param timeout: seconds to wait at most (None or 0: no limit).
    :param what: what the lock protects, for messages.
    :returns: (as the context value) the locked file descriptor.
    :raises Busy: ``blocking`` is False and a conflicting lock is held.
    :raises imagebackend.exception.LockWaitTimeout: ``timeout`` passed.
    :raises imagebackend.exception.LockFileError: the lock file cannot be
        created.
    """
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    wait = _Wait(path, what, timeout)
    fd = _acquire_file(path, fcntl.flock, operation, blocking, wait)
    try:
        if not shared:
            _write_holder(fd)
        yield fd
    finally:
        if not shared:
            _clear_holder(fd)
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
