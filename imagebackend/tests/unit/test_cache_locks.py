"""The cache's locks exclude threads and processes, and their files can be
removed safely.
"""

import os
import threading

import pytest

from imagebackend import cache_locks


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
