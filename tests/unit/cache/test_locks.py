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

"""The cache's locks exclude threads and processes, and their files can be
removed safely.
"""

import errno
import gc
import json
import logging
import os
import socket
import threading
import time
from unittest import mock

import pytest

from imagebackend.cache import lockdirs
from imagebackend.cache import locks as cache_locks
from imagebackend import exception


def in_thread(func):
    """Run ``func`` in another thread; return what it returned or raised."""
    result = {}

    def run():
        try:
            result["value"] = func()
        except cache_locks.Busy as exc:
            result["value"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    return result["value"]


def try_exclusive(lock_dir, name):
    with cache_locks.exclusive(lock_dir, name, blocking=False):
        return "got it"


def try_flock(path, shared):
    with cache_locks.flocked(path, shared=shared, blocking=False):
        return "got it"


def test_exclusive_lock_excludes_other_threads(tmp_path):
    with cache_locks.exclusive(str(tmp_path), "img"):
        assert isinstance(in_thread(lambda: try_exclusive(str(tmp_path),
                                                          "img")),
                          cache_locks.Busy)
        assert in_thread(lambda: try_exclusive(str(tmp_path),
                                               "other")) == "got it"
    assert in_thread(lambda: try_exclusive(str(tmp_path), "img")) == "got it"


def test_locks_of_two_directories_do_not_exclude_each_other(tmp_path):
    # The in-process semaphore is named after the lock file.
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    with cache_locks.exclusive(str(one), "img", blocking=False):
        assert in_thread(lambda: try_exclusive(str(two), "img")) == "got it"


def test_a_semaphore_is_kept_while_used_and_forgotten_after(tmp_path):
    semaphores = cache_locks._Semaphores()
    held = semaphores.get("a")
    assert semaphores.get("a") is held
    assert semaphores.get("b") is not held
    assert list(semaphores._semaphores) == ["a"]
    del held
    gc.collect()
    # Nobody holds or waits for it: the map does not grow with every
    # image ever locked.
    assert list(semaphores._semaphores) == []


def test_a_caller_catching_library_errors_catches_a_held_lock(tmp_path):
    """A lock asked for without waiting, and held, is an
    ImageBackendException naming the lock: no third-party or bare error
    escapes to a caller.
    """
    lock_dir = str(tmp_path)
    path = cache_locks.use_lock_file(lock_dir, "c" * 40)

    def take(lock):
        try:
            with lock:
                return "got it"
        except exception.ImageBackendException as exc:
            return exc

    with cache_locks.exclusive(lock_dir, "img"):
        caught = in_thread(lambda: take(
            cache_locks.exclusive(lock_dir, "img", blocking=False)))
    assert isinstance(caught, cache_locks.Busy)
    assert "img" in caught.message and "try again" in caught.message
    with cache_locks.flocked(path):
        caught = in_thread(lambda: take(
            cache_locks.flocked(path, shared=True, blocking=False)))
    assert isinstance(caught, cache_locks.Busy)
    assert path in caught.message


def test_use_lock_is_shared_by_creators_and_excludes_the_pruner(tmp_path):
    path = cache_locks.use_lock_file(str(tmp_path), "c" * 40)
    with cache_locks.flocked(path, shared=True):
        assert in_thread(lambda: try_flock(path, True)) == "got it"
        assert isinstance(in_thread(lambda: try_flock(path, False)),
                          cache_locks.Busy)
    with cache_locks.flocked(path):
        assert isinstance(in_thread(lambda: try_flock(path, True)),
                          cache_locks.Busy)


@pytest.mark.parametrize("file_name", ["imagebackend-" + "c" * 40,
                                       "imagebackend-use-" + "c" * 40])
def test_a_lock_file_is_removed_only_when_nobody_holds_it(tmp_path,
                                                          file_name):
    lock_dir = str(tmp_path)
    path = os.path.join(lock_dir, file_name)
    if "use-" in file_name:
        held = cache_locks.flocked(path, shared=True)
    else:
        held = cache_locks.exclusive(lock_dir, "c" * 40)
    with held:
        assert in_thread(lambda: cache_locks.remove_lock_file(
            lock_dir, file_name)) is False
        assert os.path.exists(path)
    assert cache_locks.remove_lock_file(lock_dir, file_name) is True
    assert not os.path.exists(path)
    assert cache_locks.remove_lock_file(lock_dir, file_name) is False


def test_a_locker_of_a_removed_file_moves_to_the_new_one(tmp_path):
    path = cache_locks.use_lock_file(str(tmp_path), "c" * 40)
    # A creator opened the file, then the pruner removed it as stale.
    stale_fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert cache_locks.remove_lock_file(str(tmp_path),
                                            os.path.basename(path))
        with cache_locks.flocked(path, shared=True) as fd:
            assert os.path.samestat(os.fstat(fd), os.stat(path))
            assert not os.path.samestat(os.fstat(fd), os.fstat(stale_fd))
    finally:
        os.close(stale_fd)


def test_a_blocking_shared_lock_waits_for_the_exclusive_holder(tmp_path):
    path = cache_locks.use_lock_file(str(tmp_path), "c" * 40)
    order = []

    def creator():
        with cache_locks.flocked(path, shared=True):
            order.append("creator")
    with cache_locks.flocked(path):
        thread = threading.Thread(target=creator)
        thread.start()
        thread.join(0.2)
        order.append("pruner done")
    thread.join(10)
    assert order == ["pruner done", "creator"]


# -- bounded waits, holders, full directories ---------------------------------

def test_a_thread_waits_at_most_the_timeout_naming_this_process(tmp_path):
    lock_dir = str(tmp_path)
    with cache_locks.exclusive(lock_dir, "img"):
        start = time.monotonic()
        err = in_thread(lambda: _timed_out(lambda: cache_locks.exclusive(
            lock_dir, "img", timeout=0.3, what="image x")))
        waited = time.monotonic() - start
    assert isinstance(err, exception.LockWaitTimeout)
    assert 0.3 <= waited < 5
    assert "image x" in str(err) and "this process" in str(err)
    assert "lock_wait_timeout" in str(err)


def _timed_out(lock):
    try:
        with lock():
            return "got it"
    except exception.LockWaitTimeout as exc:
        return exc


def test_an_exclusive_holder_is_recorded_in_its_file_until_release(
        tmp_path):
    path = cache_locks.lock_file(str(tmp_path), "img")
    with cache_locks.exclusive(str(tmp_path), "img"):
        described = cache_locks.holder(path)
        assert "pid %d" % os.getpid() in described
        assert socket.gethostname() in described
    assert os.path.getsize(path) == 0


def test_a_holder_record_is_escaped_and_bounded(tmp_path):
    path = str(tmp_path / "imagebackend-x")
    with open(path, "w") as f:
        json.dump({"host": "h\x1b[2J", "pid": 7, "since": "t",
                   "command": "evil\nFORGED LINE" + "x" * 5000}, f)
    described = cache_locks.holder(path)
    assert "\n" not in described and "\x1b" not in described
    assert len(described) < 600
    with open(path, "w") as f:
        f.write("not json")
    assert "unknown" in cache_locks.holder(path)


def test_a_waiter_logs_at_a_bounded_interval(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cache_locks, "LOG_FIRST", 0.1)
    monkeypatch.setattr(cache_locks, "LOG_INTERVAL", 0.2)
    path = cache_locks.use_lock_file(str(tmp_path), "c" * 40)
    with cache_locks.flocked(path):
        with caplog.at_level(logging.WARNING):
            err = in_thread(lambda: _timed_out(lambda: cache_locks.flocked(
                path, shared=True, timeout=1.0, what="the use of image y")))
    assert isinstance(err, exception.LockWaitTimeout)
    lines = [r.getMessage() for r in caplog.records
             if "Waiting for the lock" in r.getMessage()]
    assert 3 <= len(lines) <= 7
    assert "the use of image y" in lines[0]
    assert "pid %d" % os.getpid() in lines[0]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_lock_directory_is_a_library_error(tmp_path, code):
    real = os.open

    def full(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and "imagebackend-" in str(path):
            raise OSError(code, os.strerror(code), path)
        return real(path, flags, *args, **kwargs)

    with mock.patch.object(os, "open", side_effect=full):
        with pytest.raises(exception.LockFileError) as err:
            with cache_locks.exclusive(str(tmp_path), "img"):
                pass
    assert str(tmp_path) in str(err.value)
    assert os.strerror(code) in str(err.value)
    assert "[Errno" not in str(err.value)


# -- one lock directory per _base ---------------------------------------------

def test_lock_directories_sharing_a_base_must_be_one(tmp_path):
    base = str(tmp_path / "_base")
    os.mkdir(base)
    shared, other = str(tmp_path / "locks"), str(tmp_path / "local")
    os.mkdir(shared)
    os.mkdir(other)
    lockdirs.check_shared(base, shared)          # nothing recorded yet
    lockdirs.check_shared(base, shared, record=True)
    lockdirs.check_shared(base, shared, record=True)
    with pytest.raises(exception.SplitLockDirectory) as err:
        lockdirs.check_shared(base, other)
    assert shared in str(err.value) and other in str(err.value)
    # Another host sharing the same directory has the same identity.
    with mock.patch.object(socket, "gethostname", return_value="other"):
        lockdirs.check_shared(base, shared, record=True)


def test_an_entry_not_refreshed_for_a_day_is_ignored(tmp_path):
    base = str(tmp_path / "_base")
    os.mkdir(base)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    os.mkdir(old)
    os.mkdir(new)
    lockdirs.check_shared(base, old, record=True)
    # Refreshed within the day, the old entry splits the cache ...
    sooner = time.time() + lockdirs.LOCK_DIR_ENTRY_AGE - 60
    with mock.patch.object(time, "time", return_value=sooner):
        with pytest.raises(exception.SplitLockDirectory):
            lockdirs.check_shared(base, new)
    # ... a day later it is a directory nobody uses any more.
    later = time.time() + lockdirs.LOCK_DIR_ENTRY_AGE + 60
    with mock.patch.object(time, "time", return_value=later):
        lockdirs.check_shared(base, new, record=True)
        lockdirs.check_shared(base, new)
    # The new directory is the one recorded now: the old one is refused.
    with mock.patch.object(time, "time", return_value=later):
        with pytest.raises(exception.SplitLockDirectory) as err:
            lockdirs.check_shared(base, old)
    assert new in str(err.value)


def test_a_holder_making_progress_is_waited_for_past_the_timeout(tmp_path):
    lock_dir = str(tmp_path)
    progress = {"last": time.time()}
    release = threading.Event()

    def hold():
        with cache_locks.exclusive(lock_dir, "img"):
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    try:
        def keep_writing():
            for _ in range(8):          # ~0.8 s of progress
                progress["last"] = time.time()
                time.sleep(0.1)
            release.set()

        writer = threading.Thread(target=keep_writing)
        writer.start()
        start = time.monotonic()
        with cache_locks.exclusive(lock_dir, "img", timeout=0.3,
                                   activity=lambda: progress["last"]):
            waited = time.monotonic() - start
        writer.join(10)
    finally:
        release.set()
        holder.join(10)
    assert waited >= 0.6                # past the timeout, not refused


def test_a_holder_without_progress_is_timed_out(tmp_path):
    lock_dir = str(tmp_path)
    last = time.time() - 60
    with cache_locks.exclusive(lock_dir, "img"):
        err = in_thread(lambda: _timed_out(lambda: cache_locks.exclusive(
            lock_dir, "img", timeout=0.3, activity=lambda: last)))
    assert isinstance(err, exception.LockWaitTimeout)
