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

"""The cache looks after itself: changed images, pruning, verify,
invalidate, prefetch -- with real files and the real qemu-img.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from imagebackend.common import digest as content_digest
from imagebackend import sources
from tests.functional.fixtures import children
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
SIZE = 16 * MiB
DISK = 32 * MiB
AGES_ZERO = fenv.AGES_ZERO


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def image(dep, name, seed=None):
    """Image ``name``; by default its bytes are its own (ids holding the
    same bytes would share one base).
    """
    if seed is None:
        seed = 10 + zlib.crc32(name.encode())
    path = os.path.join(dep.images, name)
    if name.endswith(".qcow2"):
        return fenv.make_qcow2(path, SIZE, seed=seed)
    return fenv.make_raw(path, SIZE, seed=seed)


def fmt(path):
    return "qcow2" if path.endswith(".qcow2") else "raw"


def target(dep, name):
    return os.path.join(dep.instances, name, "disk")


def create(dep, image_id, name, backend="qcow2", size=DISK, path=None):
    return backends_base.load(dep.conf(), backend).create_image(
        image_id, path or target(dep, name), size)


def converts(dep, image_id):
    cid = content_digest.cache_id(image_id)
    return [c for c in dep.qemu_calls()
            if c.startswith("convert") and cid in c]


def same(a, a_fmt, b, b_fmt="qcow2"):
    return fenv.images_identical(a, a_fmt, b, b_fmt)


# -- changed images -----------------------------------------------------------

@pytest.mark.parametrize("backend", ["qcow2", "cached-base"])
def test_changed_image_is_a_new_generation_old_disk_keeps_old_bytes(
        dep, backend):
    source = image(dep, "guest.raw", seed=1)
    old_copy = shutil.copyfile(source, os.path.join(dep.root, "old.raw"))
    old = create(dep, "guest.raw", "vm-old", backend)
    fenv.make_raw(source, SIZE, seed=2)         # rewritten in place
    new = create(dep, "guest.raw", "vm-new", backend)
    again = create(dep, "guest.raw", "vm-again", backend)

    suffix = "_%d" % DISK if backend == "cached-base" else ""
    assert old.backing_file == dep.base_path("guest.raw", 1) + suffix
    assert new.backing_file == dep.base_path("guest.raw", 2) + suffix
    assert new.cache_hit is False and again.cache_hit is True
    assert again.backing_file == new.backing_file
    assert same(old_copy, "raw", old.path)
    assert same(source, "raw", new.path)
    assert not same(old.path, "qcow2", new.path)
    # The old generation's bytes were never touched.
    assert same(old_copy, "raw", dep.base_path("guest.raw", 1), "raw")

    rows = {os.path.basename(r["file"]): r
            for r in dep.cli_json("cache", "list")}
    first, second = (os.path.basename(dep.base_path("guest.raw", g))
                     for g in (1, 2))
    assert rows[first]["generation"] == 1 and rows[first]["stale"] is True
    assert rows[second]["generation"] == 2
    assert rows[second]["stale"] is False
    disks = {name: row["disks"] for name, row in rows.items()}
    if backend == "qcow2":
        assert disks == {first: 1, second: 2}
    else:
        assert disks == {first: 0, first + suffix: 1, second: 0,
                         second + suffix: 2}
    assert {"image_id", "generation", "file", "size_on_disk", "virtual_size",
            "format", "last_used", "disks", "stale"} <= set(rows[first])


# -- prune --------------------------------------------------------------------

def test_prune_with_zero_ages_removes_exactly_the_unused_bases(dep):
    manual = os.path.join(dep.root, "manual")
    dep.write_config(image_cache=dict(AGES_ZERO, disk_dirs=manual))
    for name in ("a.raw", "b.qcow2", "c.raw", "d.raw", "e.qcow2"):
        image(dep, name)
    disks = {
        # found by walking instances_path
        "a.raw": create(dep, "a.raw", "vm-a").path,
        # uses the sized base; the original is unused
        "b.qcow2": create(dep, "b.qcow2", "vm-b", "cached-base").path,
        # outside every searched directory: found through the registry
        "c.raw": create(dep, "c.raw", None, path=os.path.join(
            dep.root, "elsewhere", "disk")).path,
    }
    dep.prefetch("d.raw", "e.qcow2")
    # made by another tool, with a relative backing file, in disk_dirs
    hand = os.path.join(manual, "vm-d", "disk")
    os.makedirs(os.path.dirname(hand))
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow2",
                    "-F", "raw", "-b", os.path.relpath(
                        dep.base_path("d.raw"), os.path.dirname(hand)),
                    hand], check=True)
    disks["d.raw"] = hand
    unused = {dep.base_path("b.qcow2"), dep.base_path("e.qcow2")}
    allocated = sum(os.stat(p).st_blocks * 512 for p in unused)

    dry = dep.cli_json("cache", "prune", "--dry-run")
    assert {r["file"] for r in dry["removed"]} == unused
    assert all(os.path.exists(p) for p in unused)

    report = dep.cli_json("cache", "prune")
    assert {r["file"] for r in report["removed"]} == unused
    assert report["bytes_freed"] == allocated
    assert not any(os.path.exists(p) for p in unused)
    # A record goes with the last file of its generation: b's sized base
    # is still there.
    assert not os.path.exists(dep.base_path("e.qcow2") + ".json")
    assert os.path.exists(dep.base_path("b.qcow2") + ".json")
    for image_id in ("a.raw", "c.raw", "d.raw"):
        assert os.path.exists(dep.base_path(image_id))
    assert os.path.exists(dep.base_path("b.qcow2") + "_%d" % DISK)
    for image_id, disk in disks.items():
        assert same(os.path.join(dep.images, image_id), fmt(image_id), disk)
    assert dep.cli_json("cache", "prune")["removed"] == []


def _create_in_child(config_file, jobs, queue):
    from imagebackend.backends import base as child_base
    from imagebackend import opts
    conf = opts.new_conf(["--config-file", config_file])
    queue.put(_run_jobs(lambda: conf, child_base, jobs))


def _run_jobs(conf, backends, jobs):
    def one(job):
        image_id, path, backend, size = job
        try:
            backends.load(conf(), backend).create_image(image_id, path, size)
        except Exception as exc:    # reported to the test
            return "%s: %r" % (path, exc)
        return None
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return [e for e in pool.map(one, jobs) if e]


def _prune_in_child(config_file, stop, ready, queue):
    from imagebackend import cache as child_cache
    from imagebackend import opts
    c = child_cache.ImageCache(opts.new_conf(["--config-file",
                                              config_file]))
    queue.put(_prune_until(c, stop, ready))


def _prune_until(c, stop, ready):
    """Prune until ``stop``; returns the runs and (wall time, file) of
    every removal (wall time: compared across processes).
    """
    runs, removed = 0, []
    while not stop.is_set():
        report = c.prune()
        now = time.time()
        removed += [(now, r.file) for r in report.removed]
        runs += 1
        ready.set()
        time.sleep(0.02)
    return runs, removed


def _litter_until(dep, image_id, stop):
    """Fetch ``image_id``, which no disk uses, again each time a pruner
    removed it, until ``stop``: the pruners always have something unused
    to remove while the creates run.

    :returns: how many times it was fetched.
    """
    conf = dep.conf()
    c = cache.ImageCache(conf, sources.load(conf))
    cid = content_digest.cache_id(image_id)
    fetched = 0
    while not stop.is_set():
        with c.use(image_id):
            c.get(image_id)
        fetched += 1
        while not stop.is_set() and any(
                n.startswith(cid) for n in os.listdir(dep.base_dir)):
            time.sleep(0.01)
    return fetched


def test_prune_racing_sixteen_creates_removes_nothing_in_use(dep):
    dep.write_config(image_cache=AGES_ZERO)
    image(dep, "x.qcow2")
    image(dep, "y.raw")
    image(dep, "junk.raw", seed=3)
    jobs = []
    for i in range(16):
        backend = ("qcow2", "raw", "cached-base")[i % 3]
        jobs.append(("x.qcow2" if i % 2 else "y.raw",
                     target(dep, "vm%02d" % i), backend,
                     DISK if i % 4 else SIZE))
    ctx = children.context()
    queue, stop, ready = ctx.Queue(), ctx.Event(), ctx.Event()
    pruner = children.process(ctx, _prune_in_child,
                              (dep.config_file, stop, ready, queue))
    creators = [children.process(ctx, _create_in_child,
                                 (dep.config_file, jobs[n:n + 4], queue))
                for n in (0, 4)]
    local_stop, local_ready = threading.Event(), threading.Event()
    local_pruner = concurrent.futures.ThreadPoolExecutor(1).submit(
        _prune_until, cache.ImageCache(dep.conf()), local_stop, local_ready)
    pruner.start()
    # Both pruners are looping before the first create starts, so every
    # create races them.
    assert ready.wait(60) and local_ready.wait(60)
    litter_stop = threading.Event()
    started = time.time()
    litter = concurrent.futures.ThreadPoolExecutor(1).submit(
        _litter_until, dep, "junk.raw", litter_stop)
    for p in creators:
        p.start()
    errors = _run_jobs(dep.conf, backends_base, jobs[8:])
    errors += sum((queue.get(timeout=60) for _ in creators), [])
    ended = time.time()
    litter_stop.set()
    fetched = litter.result(timeout=60)
    stop.set()
    local_stop.set()
    runs, removed = queue.get(timeout=60)
    for p in creators + [pruner]:
        p.join(60)
    local_runs, local_removed = local_pruner.result(timeout=60)

    assert errors == []
    assert [p.exitcode for p in creators + [pruner]] == [0, 0, 0]
    assert runs >= 1 and local_runs >= 1
    backing = set()
    for image_id, path, backend, size in jobs:
        assert same(os.path.join(dep.images, image_id), fmt(image_id), path,
                    "raw" if backend == "raw" else "qcow2"), path
        if backend != "raw":
            info = fenv.qemu_info(path, "qcow2")
            assert os.path.exists(info["backing-filename"]), path
            backing.add(info["backing-filename"])
    # The race happened: while the creates ran, the pruners removed the
    # unused image's base again and again ...
    junk = content_digest.cache_id("junk.raw")
    during = [f for t, f in removed + local_removed
              if started <= t <= ended]
    assert fetched >= 2
    assert any(os.path.basename(f).startswith(junk) for f in during), (
        removed, local_removed)
    # ... and whatever they removed, no disk was using it.
    assert not backing & {f for _, f in removed + local_removed}
    final = cache.ImageCache(dep.conf()).prune()
    assert not backing & {r.file for r in final.removed}


def test_space_eviction_removes_least_recently_used_first(dep):
    for name in ("p.raw", "q.raw", "r.raw", "s.raw"):
        image(dep, name)
    conf = dep.conf()
    c = cache.ImageCache(conf, sources.load(conf))
    c.prefetch(["p.raw", "q.raw", "r.raw", "s.raw"])
    create(dep, "q.raw", "vm-q")
    now = time.time()
    for age, image_id in ((400, "q.raw"), (300, "r.raw"), (200, "s.raw"),
                          (100, "p.raw")):
        os.utime(dep.base_path(image_id) + ".json", (now - age, now - age))
    # Bases of as many bytes, but not always of as many blocks: a fifth
    # extent, where the filesystem splits one, takes a block of its own.
    allocated = {image_id: os.stat(dep.base_path(image_id)).st_blocks * 512
                 for image_id in ("p.raw", "q.raw", "r.raw", "s.raw")}
    one = allocated["p.raw"]
    conf.set_override("max_size", str(int(2.5 * one)), group="image_cache")

    report = cache.ImageCache(conf).prune()
    # q is the oldest but in use; r then s are the least recently used.
    assert [r.file for r in report.removed] == [dep.base_path("r.raw"),
                                                dep.base_path("s.raw")]
    assert report.bytes_freed == allocated["r.raw"] + allocated["s.raw"]
    assert report.space_target_met is True
    assert os.path.exists(dep.base_path("q.raw"))
    assert os.path.exists(dep.base_path("p.raw"))

    conf.set_override("max_size", "1", group="image_cache")
    report = cache.ImageCache(conf).prune()
    assert [r.file for r in report.removed] == [dep.base_path("p.raw")]
    assert report.space_target_met is False


def test_orphaned_scratch_and_lock_files_go_unless_their_lock_is_held(dep):
    c = cache.ImageCache(dep.conf())
    c.store.ensure_dirs()
    orphans = [dep.base_path("gone.raw") + ".part",
               dep.base_path("gone.qcow2", 3) + ".converted",
               dep.base_path("x.raw") + "_%d.part" % DISK]
    busy = dep.base_path("busy.raw") + ".part"
    # A fetch on a host that locks elsewhere: its lock is free here, but
    # its scratch is recent, so it stays.
    running = dep.base_path("elsewhere.raw") + ".part-0123456789ab"
    old = time.time() - cache_layout.SCRATCH_MINIMUM_AGE - 60
    for path in orphans + [busy, running]:
        with open(path, "wb") as f:
            f.write(b"half a download")
        if path != running:
            os.utime(path, (old, old))
    gone = content_digest.cache_id("old.raw")
    stale_locks = [os.path.join(c.lock_dir, "imagebackend-" + gone),
                   os.path.join(c.lock_dir, "imagebackend-use-" + gone)]
    for path in stale_locks:
        open(path, "w").close()
    busy_lock = os.path.join(c.lock_dir, "imagebackend-" +
                             content_digest.cache_id("busy.raw"))

    # A download in progress:
    with c.store.lock(content_digest.cache_id("busy.raw")):
        report = dep.cli_json("cache", "prune")
        assert os.path.exists(busy) and os.path.exists(busy_lock)
    assert sorted(r["file"] for r in report["removed"]) == sorted(orphans)
    assert all(r["kind"] == "scratch" for r in report["removed"])
    assert not any(os.path.exists(p) for p in orphans)
    assert os.path.exists(running)
    # Only the held lock's file is left (the others' images are gone).
    assert [n for n in os.listdir(c.lock_dir) if not n.startswith(".")] \
        == [os.path.basename(busy_lock)]

    report = dep.cli_json("cache", "prune")
    assert [r["file"] for r in report["removed"]] == [busy]
    assert not os.path.exists(busy_lock)


# -- verify, invalidate, prefetch ---------------------------------------------

def _flip_byte(path, offset=100):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _verify(dep, *argv):
    result = dep.cli("cache", "verify", "-f", "json", *argv, check=False)
    return result.returncode, {os.path.basename(r["file"]): r
                               for r in json.loads(result.stdout)}


def test_verify_detects_a_flipped_byte_and_repair_moves_it_aside(dep):
    raw, qcow2 = image(dep, "r.raw"), image(dep, "q.qcow2")
    dep.prefetch("r.raw", "q.qcow2")
    in_use = create(dep, "q.qcow2", "vm-q", "cached-base")
    code, rows = _verify(dep)
    assert code == 0
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert len(rows) == 3               # two bases and a sized base

    r_base, q_base = dep.base_path("r.raw"), dep.base_path("q.qcow2")
    _flip_byte(r_base)
    _flip_byte(q_base)
    _flip_byte(in_use.backing_file, 2 * MiB)
    code, rows = _verify(dep)
    assert code == 1
    assert {r["status"] for r in rows.values()} == {"corrupt"}
    assert rows[os.path.basename(r_base)]["action"] is None

    code, rows = _verify(dep, "r.raw", "q.qcow2", "--repair")
    assert code == 1
    assert "moved aside" in rows[os.path.basename(r_base)]["action"]
    assert not os.path.exists(r_base)
    assert os.path.exists(r_base + ".corrupt")
    # Unused, so moved aside too; the sized base a disk uses stays.
    assert os.path.exists(q_base + ".corrupt")
    sized = rows[os.path.basename(in_use.backing_file)]
    assert "in use by %s" % in_use.path in sized["action"]
    assert os.path.exists(in_use.backing_file)

    again = create(dep, "r.raw", "vm-r", "qcow2")
    assert again.cache_hit is False
    # A new generation: the name of the one moved aside is never reused.
    assert again.backing_file == dep.base_path("r.raw", 2)
    assert same(raw, "raw", again.path)
    fresh = create(dep, "q.qcow2", "vm-q2", "cached-base")
    assert fresh.cache_hit is False
    assert fresh.backing_file == dep.base_path("q.qcow2", 2) + "_%d" % DISK
    assert same(qcow2, "qcow2", fresh.path)
    code, rows = _verify(dep, "r.raw")
    # Generation 1's stale record is left (never replaced), so the fresh
    # copy is generation 2.
    assert code == 0 and list(rows) == [
        os.path.basename(dep.base_path("r.raw", 2))]


def test_invalidate_makes_the_next_create_fetch_again(dep):
    qcow2, raw = image(dep, "g.qcow2"), image(dep, "h.raw")
    old = create(dep, "g.qcow2", "vm-g")
    dep.prefetch("h.raw")
    assert len(converts(dep, "g.qcow2")) == 1

    result = dep.cli_json("cache", "invalidate", "g.qcow2")
    assert result["marked_stale"] == [dep.base_path("g.qcow2")]
    assert result["removed"] == []
    assert [k["file"] for k in result["kept"]] == [dep.base_path("g.qcow2")]
    result = dep.cli_json("cache", "invalidate", "h.raw")
    assert [r["file"] for r in result["removed"]] == [dep.base_path("h.raw")]
    assert result["bytes_freed"] > 0
    assert not os.path.exists(dep.base_path("h.raw"))

    new = create(dep, "g.qcow2", "vm-g2")
    assert new.cache_hit is False
    assert new.backing_file == dep.base_path("g.qcow2", 2)
    assert len(converts(dep, "g.qcow2")) == 2
    assert same(qcow2, "qcow2", new.path)
    assert same(qcow2, "qcow2", old.path)
    h = create(dep, "h.raw", "vm-h")
    assert h.cache_hit is False
    # Generation numbers are never reused, even once nothing of one is
    # left.
    assert h.backing_file == dep.base_path("h.raw", 2)
    assert same(raw, "raw", h.path)


def test_prefetch_in_parallel_downloads_each_image_once(dep):
    names = ["i0.qcow2", "i1.qcow2", "i2.qcow2"]
    for n, name in enumerate(names):
        image(dep, name, seed=n)
    prefetch = subprocess.Popen(
        [sys.executable, "-m", "imagebackend.cmd.main",
         "--config-file", dep.config_file, "cache", "prefetch",
         *names, names[0], "--parallel", "3", "-f", "json"],
        env=dep.env(), stdout=subprocess.PIPE, text=True)
    # The creates start once the prefetch is fetching (its first scratch
    # file is there), so they race it rather than find everything cached.
    cids = [content_digest.cache_id(name) for name in names]
    deadline = time.monotonic() + 60
    while prefetch.poll() is None and time.monotonic() < deadline and not (
            os.path.isdir(dep.base_dir) and any(
                n.startswith(tuple(cids)) for n in os.listdir(dep.base_dir))):
        time.sleep(0.002)
    prefetching = prefetch.poll() is None
    jobs = [(name, target(dep, "%s-%d" % (name, i)), "qcow2", DISK)
            for name in names for i in range(2)]
    errors = _run_jobs(dep.conf, backends_base, jobs)
    out, _ = prefetch.communicate(timeout=60)
    assert prefetch.returncode == 0
    assert errors == []
    assert prefetching, "the prefetch was done before the creates started"
    rows = json.loads(out)
    assert [r["image_id"] for r in rows] == names
    assert all(r.get("error") is None for r in rows)
    for name in names:
        assert len(converts(dep, name)) == 1, name
    for name, path, _, _ in jobs:
        assert same(os.path.join(dep.images, name), "qcow2", path)


def test_a_sized_base_appears_complete_or_not_at_all(dep):
    # A reader that finds _base/<cache_id>_<size> uses it at once: watch
    # the name while cached-base builds it and check every sighting.
    fenv.make_raw(os.path.join(dep.images, "big.raw"), 128 * MiB, seed=4)
    conf = dep.conf()
    cache.ImageCache(conf, sources.load(conf)).prefetch(["big.raw"])
    size = 256 * MiB
    final = dep.base_path("big.raw") + "_%d" % size
    name = os.path.basename(final)
    stop, sightings = threading.Event(), []

    def watch():
        while not stop.is_set():
            if name in os.listdir(dep.base_dir):
                try:
                    st = os.stat(final)
                except FileNotFoundError:
                    continue
                sightings.append((st.st_size,
                                  os.path.exists(final + ".json")))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        disk = create(dep, "big.raw", "vm", backend="cached-base", size=size)
    finally:
        stop.set()
        watcher.join(30)
    assert disk.backing_file == final
    assert sightings, "the watcher never saw the sized base"
    assert set(sightings) == {(size, True)}, sorted(set(sightings))
    assert same(os.path.join(dep.images, "big.raw"), "raw", disk.path)
