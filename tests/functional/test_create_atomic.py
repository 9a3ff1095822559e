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

"""Instance disks appear complete or not at all, whoever races or kills
the creation: concurrent creates of one target, SIGKILL at any instant,
a crash between naming the disk and confirming its record, and targets
the library must refuse.  Real qemu-img, real files.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import imagebackend
from imagebackend import cache
from imagebackend.cache import registry as cache_registry
from imagebackend.common import digest as content_digest
from tests.functional.fixtures import children
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
GiB = fenv.GiB
BACKENDS = ["qcow2", "cached-base", "raw"]
FORMATS = {"qcow2": "qcow2", "cached-base": "qcow2", "raw": "raw"}
AGES_ZERO = fenv.AGES_ZERO


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path))
    fenv.make_raw(os.path.join(d.images, "guest.raw"), 64 * MiB)
    return d


def registry(dep):
    return cache.ImageCache(dep.conf()).scanner.registry


def records_of(dep, path):
    return [r for r in registry(dep).records() if r["disk"] == path]


def leftovers(directory):
    """Hidden temporary files left in ``directory``."""
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# -- concurrent creates of one target -----------------------------------------

def _create_at_signal(config_file, backend, target, go, queue):
    from imagebackend.backends import base
    from imagebackend import exception
    from imagebackend import opts
    b = base.load(opts.new_conf(["--config-file", config_file]), backend)
    go.wait(60)
    started = time.time()
    try:
        b.create_image("guest.raw", target, GiB)
        outcome = "created"
    except exception.TargetExists:
        outcome = "TargetExists"
    except Exception as exc:    # reported to the test
        outcome = repr(exc)
    queue.put((outcome, started, time.time()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_of_many_concurrent_creates_of_a_target_wins(dep, backend):
    dep.prefetch("guest.raw")
    target = os.path.join(dep.instances, "vm", "disk")
    ctx = children.context()
    # Every child and this process meet at ``go``: no create starts
    # before the last child has imported and loaded its backend.
    queue, go = ctx.Queue(), ctx.Barrier(7)
    procs = [children.process(ctx, _create_at_signal,
                              (dep.config_file, backend, target, go, queue))
             for _ in range(6)]
    old_path = os.environ["PATH"]
    os.environ["PATH"] = dep.env()["PATH"]
    try:
        for p in procs:
            p.start()
        go.wait(120)
        reports = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
    finally:
        os.environ["PATH"] = old_path
    results = sorted(r[0] for r in reports)
    assert results == ["TargetExists"] * 5 + ["created"], results
    # The race happened: some losers started before the winner was done.
    [(_, _, won_at)] = [r for r in reports if r[0] == "created"]
    assert any(started < won_at for outcome, started, _ in reports
               if outcome == "TargetExists"), reports
    assert fenv.images_identical(os.path.join(dep.images, "guest.raw"),
                                 "raw", target, FORMATS[backend])
    assert leftovers(os.path.dirname(target)) == []
    [record] = records_of(dep, target)
    assert record["state"] == "done"
    assert registry(dep).find(target)["format"] == FORMATS[backend]


# -- SIGKILL ------------------------------------------------------------------

def _popen_create(dep, image_id, target, backend, size=GiB):
    return subprocess.Popen(
        [sys.executable, "-m", "imagebackend.cmd.main", "--config-file",
         dep.config_file, "disk", "create", image_id, target, "--size",
         str(size), "--backend", backend], env=dep.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_raw_create_killed_mid_copy_leaves_no_target_and_retry_works(dep):
    big = os.path.join(dep.images, "big.raw")
    # 256 MiB of data in 1 MiB extents spread over 2 GiB: a copy that
    # takes a while even in the kernel.
    fenv.write_pattern_raw(big, 2 * GiB, extents=256, extent_size=MiB)
    dep.prefetch("big.raw")
    vm = os.path.join(dep.instances, "vm")
    os.makedirs(vm)
    target = os.path.join(vm, "disk")
    proc = _popen_create(dep, "big.raw", target, "raw", 2 * GiB)
    # Its temporary file appears first, then its intent record (fsynced),
    # then the copy starts.
    deadline = time.monotonic() + 60
    while ((not os.listdir(vm) or not records_of(dep, target))
           and proc.poll() is None):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.05)        # well into the copy
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert not os.path.lexists(target)
    # It was killed while writing its temporary file.
    [tmp] = [os.path.join(vm, n) for n in os.listdir(vm)]
    [record] = records_of(dep, target)
    assert (record["state"], record["tmp"]) == ("intent", tmp)

    # Within the hour the creation may still be running: prune leaves
    # its files alone.  An hour later it is a crash's: its temporary file
    # and record go, and nothing else (the base is young).
    assert cache.ImageCache(dep.conf()).prune().removed == []
    assert os.path.exists(tmp) and os.path.exists(record["_path"])
    with open(record["_path"]) as f:
        stored = json.load(f)
    stored["created_at"] -= cache_registry.INTENT_GRACE + 60
    with open(record["_path"], "w") as f:
        json.dump(stored, f)
    assert cache.ImageCache(dep.conf()).prune().removed == []
    assert os.listdir(vm) == [] and records_of(dep, target) == []
    assert len(dep.base_listing()) == 2     # the base and its record

    retry = dep.cli("disk", "create", "big.raw", target, "--size", "2G",
                    "--backend", "raw", check=False)
    assert retry.returncode == 0, retry.stderr
    assert fenv.images_identical(big, "raw", target, "raw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_at_random_instants_a_target_is_complete_or_absent(
        dep, backend):
    image = os.path.join(dep.images, "guest.raw")
    dep.prefetch("guest.raw")
    start = time.monotonic()
    first = os.path.join(dep.instances, "timed", "disk")
    dep.cli("disk", "create", "guest.raw", first, "--size", "1G",
            "--backend", backend)
    took = time.monotonic() - start
    rng = random.Random(int(os.environ.get("IMAGEBACKEND_SEED", "11")))
    targets = []
    for i in range(int(os.environ.get("IMAGEBACKEND_KILLS", "4"))):
        target = os.path.join(dep.instances, "vm%d" % i, "disk")
        proc = _popen_create(dep, "guest.raw", target, backend)
        time.sleep(rng.uniform(0.2 * took, 1.1 * took))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if os.path.lexists(target):
            assert fenv.images_identical(image, "raw", target,
                                         FORMATS[backend]), (i, target)
        else:
            retry = dep.cli("disk", "create", "guest.raw", target,
                            "--size", "1G", "--backend", backend,
                            check=False)
            assert retry.returncode == 0, retry.stderr
            assert fenv.images_identical(image, "raw", target,
                                         FORMATS[backend])
        targets.append(target)
    # Whenever the kill came, the registry knows each disk's format.
    for target in targets:
        assert registry(dep).find(target)["format"] == FORMATS[backend]


_KILL_WHEN_NAMED = """
import os, signal, sys
target = sys.argv[1]
def hook(event, args):
    if event != "os.kill" and os.path.lexists(target):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from imagebackend.cmd import main
sys.exit(main.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_once_the_disk_is_named_its_base_survives_prune(dep,
                                                               backend):
    """Crash at the first instant the disk has its name (before its record
    is confirmed), outside every searched directory: the record written
    before the disk named its base keeps the base.
    """
    dep.write_config(image_cache=AGES_ZERO)
    target = os.path.join(dep.root, "elsewhere", "disk")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_WHEN_NAMED, target, "--config-file",
         dep.config_file, "disk", "create", "guest.raw", target, "--size",
         "1G", "--backend", backend], env=dep.env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert os.path.exists(target)
    pruned = dep.cli_json("cache", "prune")
    if backend != "raw":
        backing = fenv.qemu_info(target, "qcow2")["backing-filename"]
        assert backing not in {r["file"] for r in pruned["removed"]}
        assert os.path.exists(backing), pruned
    assert fenv.images_identical(os.path.join(dep.images, "guest.raw"),
                                 "raw", target, FORMATS[backend])
    # The record of the attempt (an intent: it was never confirmed) still
    # names the disk's format.
    found = registry(dep).find(target)
    assert (found["state"], found["format"]) == ("intent", FORMATS[backend])


# -- targets that are refused, failures that change nothing -------------------

def _state(dep):
    """Every file (records too), and every directory outside the cache's
    own bookkeeping (the cache and lock directories it makes for itself,
    the local source's identity records).
    """
    locks = os.path.join(dep.instances, "locks")
    sources = os.path.join(dep.base_dir, ".sources")    # the source's own
    found = set()
    for directory, dirs, files in os.walk(dep.root):
        if directory.startswith((locks, sources)):
            continue
        found.update(os.path.join(directory, n) for n in files)
        found.discard(dep.qemu_log)     # the test's own qemu-img log
        if not directory.startswith((dep.base_dir, locks)):
            found.add(directory + "/")
    return found


def _fails_cleanly(dep, *argv):
    before = _state(dep)
    result = dep.cli("disk", "create", *argv, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagebackend: error:"), result.stderr
    assert _state(dep) == before
    return lines[0]


def test_targets_inside_the_cache_are_refused(dep):
    dep.prefetch("guest.raw")
    os.symlink(dep.base_dir, os.path.join(dep.instances, "vm-link"))
    for target in (os.path.join(dep.base_dir, "x"),
                   os.path.join(dep.base_dir, "new", "x"),
                   os.path.join(dep.base_dir,
                                content_digest.cache_id("guest.raw") + "-9"),
                   os.path.join(dep.instances, "locks", "x"),
                   os.path.join(dep.instances, "vm-link", "x")):
        message = _fails_cleanly(dep, "guest.raw", target, "--size", "1G")
        assert target in message
        assert "only the cache writes" in message
        assert os.path.join(dep.instances, "<instance>", "disk") in message


def test_a_trailing_slash_is_refused(dep):
    target = os.path.join(dep.instances, "vm") + "/"
    message = _fails_cleanly(dep, "guest.raw", target, "--size", "1G")
    assert target in message and "path of the disk file" in message


def test_a_size_the_filesystem_cannot_hold_is_refused(dep):
    size = 64 * 1024 ** 4
    probe = os.path.join(dep.root, "probe")
    with open(probe, "wb") as f:
        try:
            f.truncate(size)
        except OSError:
            pass
        else:
            pytest.skip("this filesystem holds %d-byte files" % size)
    os.unlink(probe)
    dep.prefetch("guest.raw")
    target = os.path.join(dep.instances, "new", "vm", "disk")
    message = _fails_cleanly(dep, "guest.raw", target, "--size", str(size),
                             "--backend", "raw")
    assert target in message and str(size) in message
    assert "smaller size" in message
    assert records_of(dep, target) == []


def test_a_failed_create_removes_the_directories_it_made(dep):
    target = os.path.join(dep.instances, "a", "b", "disk")
    message = _fails_cleanly(dep, "missing.raw", target, "--size", "1G")
    assert "missing.raw" in message


@pytest.fixture
def small_fs(tmp_path):
    """A 32 MiB ext4 filesystem, loop-mounted (root only)."""
    image = str(tmp_path / "small.img")
    mountpoint = str(tmp_path / "small")
    os.mkdir(mountpoint)
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", image],
                          capture_output=True)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop", image, mountpoint],
        capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot make and loop-mount a small ext4 filesystem")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", mountpoint], check=True)


@pytest.mark.parametrize("backend,preallocate", [("raw", "none"),
                                                 ("qcow2", "space")])
def test_a_full_filesystem_leaves_nothing_behind(dep, small_fs, backend,
                                                 preallocate):
    big = os.path.join(dep.images, "big.raw")
    fenv.write_pattern_raw(big, 64 * MiB, extents=48, extent_size=MiB)
    dep.prefetch("big.raw")
    if backend != "raw":
        # The cache's overlay template, like the base, made beforehand.
        imagebackend.load_backend(dep.conf(), backend).create_image(
            "big.raw", os.path.join(dep.instances, "first", "disk"), GiB)
    dep.write_config(imagebackend={"preallocate_images": preallocate})
    target = os.path.join(small_fs, "vm", "disk")
    message = _fails_cleanly(dep, "big.raw", target, "--size", "1G",
                             "--backend", backend)
    assert target in message
    assert sorted(os.listdir(small_fs)) == ["lost+found"]
    assert records_of(dep, target) == []
