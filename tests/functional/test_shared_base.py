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

"""One ``_base``, two lock directories: the cache stays correct without
its locks, refuses a split it can see, and bounds every wait -- with real
processes, files and qemu-img.
"""

import json
import logging
import multiprocessing
import os
import subprocess
import time

import pytest

from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend import exception
from imagebackend import sources
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
SIZE = 16 * MiB


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def _fetch_in_child(config_file, lock_path, image_id, size, barrier, queue,
                    detect_split):
    """Fetch ``image_id`` (and a sized base of it) through a cache that
    locks in ``lock_path``; report what happened.
    """
    from imagebackend.backends import base as child_backends
    from imagebackend.cache import lockdirs as child_lockdirs
    from imagebackend import exception as child_exc
    from imagebackend import opts
    if not detect_split:
        # Another host whose entry has expired: a split nobody can see.
        child_lockdirs.check_shared = lambda *args, **kwargs: None
    conf = opts.new_conf(["--config-file", config_file])
    conf.set_override("lock_path", lock_path, group="oslo_concurrency")
    backend = child_backends.load(conf, "cached-base")
    barrier.wait(30)
    started = time.time()
    try:
        entry, hit = backend.cache.get(image_id)
        sized = backend.prepare_base(entry, size)[0]
    except child_exc.ImageBackendException as exc:
        queue.put((("clean error", type(exc).__name__, exc.message),
                   started, time.time()))
        return
    except BaseException as exc:       # reported to the test
        queue.put((("unclean error", type(exc).__name__, repr(exc)),
                   started, time.time()))
        return
    queue.put((("ok", entry.path, sized), started, time.time()))


def race(dep, image_id, size, detect_split=False, config_files=None,
         overlaps=None):
    """Two processes with different lock directories fetch ``image_id``
    into one ``_base`` at the same instant.

    :param overlaps: if given, gets True appended if the two fetches
        really overlapped in time (each started before the other ended).
    """
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    queue = ctx.Queue()
    config_files = config_files or [dep.config_file] * 2
    procs = [ctx.Process(target=_fetch_in_child, args=(
        config_files[i], os.path.join(dep.root, "locks-%d" % i), image_id,
        size, barrier, queue, detect_split)) for i in range(2)]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    if overlaps is not None:
        overlaps.append(max(r[1] for r in reports)
                        < min(r[2] for r in reports))
    return [r[0] for r in reports]


@pytest.mark.parametrize("name", ["race.qcow2", "race.raw"])
def test_two_lock_directories_never_publish_a_corrupt_base(dep, name):
    """Issue 17 item 1: correctness never depends on the locks."""
    path = os.path.join(dep.images, name)
    (fenv.make_qcow2 if name.endswith(".qcow2") else fenv.make_raw)(
        path, SIZE)
    fmt = "qcow2" if name.endswith(".qcow2") else "raw"
    rounds = 12
    overlaps = []
    for round_ in range(rounds):
        results = race(dep, name, 2 * SIZE, overlaps=overlaps)
        unclean = [r for r in results if r[0] != "ok"]
        assert not unclean, "round %d: %r" % (round_, unclean)
        c = cache.ImageCache(dep.conf())
        rows = c.verify().files
        assert rows and all(r.status == "ok" for r in rows), rows
        for _, base, sized in results:
            assert fenv.images_identical(path, fmt, base, "raw")
            assert fenv.images_identical(path, fmt, sized, "raw")
            record = json.load(open(sized + ".json"))
            assert record["kind"] == "sized"
            assert record["size"] == 2 * SIZE
            assert record["base"] == os.path.basename(base)
            assert record["digest"]["scheme"] == "sparse-64k-xxh3-padded"
            assert record["digest"]["value"] == cache_verify.digests(
                sized)["sparse"]
        # Nothing half-made under a final name, no scratch left behind.
        names = dep.base_listing()
        assert not [n for n in names
                    if cache_layout.parse(n) is None
                    or cache_layout.parse(n).is_scratch], names
        # Start again from an empty cache.
        for n in names:
            os.unlink(os.path.join(dep.base_dir, n))
    # The race happened: in most rounds both fetches ran at once.
    assert sum(overlaps) > rounds // 2, overlaps


def test_different_bytes_published_at_once_get_their_own_generations(
        dep):
    """Two hosts see different content for one image id (it changed
    between their requests) and publish at the same instant: neither
    replaces the other, and each base holds its own bytes.
    """
    other_images = os.path.join(dep.root, "other-images")
    os.mkdir(other_images)
    mine = fenv.make_raw(os.path.join(dep.images, "img.raw"), SIZE, seed=1)
    theirs = fenv.make_raw(os.path.join(other_images, "img.raw"), SIZE,
                           seed=9)
    other_config = os.path.join(dep.root, "other.conf")
    with open(dep.config_file) as f:
        text = f.read().replace("path = %s\n" % dep.images,
                                "path = %s\n" % other_images)
    assert other_images in text
    with open(other_config, "w") as f:
        f.write(text)
    overlaps = []
    for round_ in range(6):
        results = race(dep, "img.raw", 2 * SIZE,
                       config_files=[dep.config_file, other_config],
                       overlaps=overlaps)
        assert [r[0] for r in results] == ["ok", "ok"], results
        bases = sorted(r[1] for r in results)
        assert bases[0] != bases[1]             # two generations
        contents = sorted((fenv.images_identical(mine, "raw", b, "raw"),
                           fenv.images_identical(theirs, "raw", b, "raw"))
                          for b in bases)
        assert contents == [(False, True), (True, False)], round_
        rows = cache.ImageCache(dep.conf()).verify().files
        assert {r.status for r in rows} == {"ok"}, rows
        for n in dep.base_listing():
            os.unlink(os.path.join(dep.base_dir, n))
    # The race happened: in most rounds both published at once.
    assert sum(overlaps) > 3, overlaps


def test_a_split_lock_directory_is_refused(dep):
    fenv.make_raw(os.path.join(dep.images, "a.raw"), SIZE)
    fenv.make_raw(os.path.join(dep.images, "b.raw"), SIZE, seed=5)
    fenv.make_raw(os.path.join(dep.images, "c.raw"), SIZE, seed=6)
    first = cache.ImageCache(dep.conf(), sources.load(dep.conf()))
    first.get("a.raw")
    # The same lock directory (another process, or another host sharing
    # it) is fine.
    again = cache.ImageCache(dep.conf(), sources.load(dep.conf()))
    again.get("b.raw")
    conf = dep.conf()
    elsewhere = os.path.join(dep.root, "host-local-locks")
    conf.set_override("lock_path", elsewhere, group="oslo_concurrency")
    split = cache.ImageCache(conf, sources.load(conf))
    with pytest.raises(exception.SplitLockDirectory) as err:
        split.get("c.raw")
    message = str(err.value)
    assert first.lock_dir in message and elsewhere in message
    assert "lock_path" in message and dep.base_dir in message
    assert split.lookup("c.raw") is None        # nothing was written


def test_a_split_seen_only_after_both_published_is_still_refused(dep):
    fenv.make_raw(os.path.join(dep.images, "a.raw"), SIZE)
    overlaps = []
    results = race(dep, "a.raw", 2 * SIZE, detect_split=True,
                   overlaps=overlaps)
    assert overlaps == [True], "the two fetches did not overlap"
    kinds = sorted(r[0] for r in results)
    assert "unclean error" not in kinds
    refused = [r for r in results if r[0] == "clean error"]
    assert refused and all(r[1] == "SplitLockDirectory" for r in refused)
    c = cache.ImageCache(dep.conf())
    assert all(r.status == "ok" for r in c.verify())


# -- bounded waits --------------------------------------------------------

#: seconds a holder keeps the lock unless released; a bounded wait ends
#: in half of that, however loaded the machine
HOLD = 60


def _hold_lock(lock_dir, name, ready, release):
    with cache_locks.exclusive(lock_dir, name):
        ready.set()
        release.wait(HOLD)


def test_a_held_lock_is_waited_for_with_log_lines_then_refused(
        dep, caplog, monkeypatch):
    """Issue 17 item 4: the wait is bounded, logged, and names the
    holder.
    """
    fenv.make_raw(os.path.join(dep.images, "a.raw"), SIZE)
    dep.write_config(imagebackend={"lock_wait_timeout": 2})
    c = cache.ImageCache(dep.conf(), sources.load(dep.conf()))
    c.store.ensure_dirs()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(
        c.lock_dir, content_digest.cache_id("a.raw"), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        monkeypatch.setattr(cache_locks, "LOG_FIRST", 0.3)
        monkeypatch.setattr(cache_locks, "LOG_INTERVAL", 0.5)
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="imagebackend"):
            with pytest.raises(exception.LockWaitTimeout) as err:
                c.get("a.raw")
        waited = time.monotonic() - start
    finally:
        release.set()
        holder.join(30)
    assert 2 <= waited < HOLD / 2
    message = str(err.value)
    assert "image a.raw" in message
    assert "pid %d" % holder.pid in message
    assert "lock_wait_timeout" in message
    waits = [r for r in caplog.records if "Waiting for the lock" in
             r.getMessage()]
    assert len(waits) >= 2
    assert "pid %d" % holder.pid in waits[0].getMessage()
    assert dep.base_listing() == []


@pytest.fixture
def full_lock_dir(tmp_path):
    """A tmpfs lock directory with no inode left."""
    path = tmp_path / "locks"
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=8",
                        "tmpfs", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip("cannot mount a tmpfs: %s" % exc)
    try:
        i = 0
        while True:
            try:
                open(path / ("filler-%d" % i), "w").close()
            except OSError:
                break
            i += 1
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_lock_directory_is_a_clear_error(dep, full_lock_dir):
    fenv.make_raw(os.path.join(dep.images, "a.raw"), SIZE)
    conf = dep.conf()
    conf.set_override("lock_path", full_lock_dir, group="oslo_concurrency")
    c = cache.ImageCache(conf, sources.load(conf))
    with pytest.raises(exception.LockFileError) as err:
        c.get("a.raw")
    message = str(err.value)
    assert full_lock_dir in message
    assert "lock_path" in message
    assert "No space left on device" in message
    assert dep.base_listing() == []
