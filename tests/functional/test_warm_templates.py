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

"""Warm qcow2 and cached-base disks are copies of an overlay template:
byte for byte what ``qemu-img create`` writes, no process started, the
template removed with its base, never half-made, made once however many
creates race.  Real qemu-img, real files.
"""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import imagebackend
from imagebackend import cache
from imagebackend.cache import templates
from tests.functional.fixtures import children
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
GiB = fenv.GiB
BACKENDS = ["qcow2", "cached-base"]
#: every process this interpreter starts (an audit hook; installed once).
SPAWNED: list[str] = []
_SPAWN_EVENTS = ("subprocess.Popen", "os.posix_spawn", "os.exec",
                 "os.fork", "os.forkpty", "os.spawn", "os.system",
                 "os.startfile")


def _audit(event, args):
    if event in _SPAWN_EVENTS:
        SPAWNED.append("%s %r" % (event, args[:2]))


sys.addaudithook(_audit)


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path))
    fenv.make_raw(os.path.join(d.images, "guest.raw"), 64 * MiB)
    return d


def image(dep):
    return os.path.join(dep.images, "guest.raw")


def disk_path(dep, name):
    return os.path.join(dep.instances, name, "disk")


def template_files(dep):
    return sorted(n for n in dep.base_listing() if templates.INFIX in n)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def qemu_img(*args):
    return subprocess.run([fenv.REAL_QEMU_IMG] + list(args),
                          capture_output=True, text=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_warm_disk_is_the_bytes_qemu_img_writes_and_starts_no_process(
        dep, backend):
    b = imagebackend.load_backend(dep.conf(), backend)
    first = b.create_image("guest.raw", disk_path(dep, "one"), GiB)
    assert len(template_files(dep)) == 1
    dep.reset_qemu_log()
    del SPAWNED[:]
    warm = b.create_image("guest.raw", disk_path(dep, "two"), GiB)
    assert SPAWNED == [] and dep.qemu_calls() == []
    assert warm.cache_hit and warm.backing_file == first.backing_file
    # The old way, by hand: qemu-img create over the same base.
    by_hand = os.path.join(dep.root, "by-hand.qcow2")
    made = qemu_img("create", "-q", "-f", "qcow2", "-o",
                    "backing_file=%s,backing_fmt=raw" % warm.backing_file,
                    by_hand, str(GiB))
    assert made.returncode == 0, made.stderr
    assert read(warm.path) == read(by_hand)
    assert read(first.path) == read(by_hand)
    assert os.stat(warm.path).st_size == os.stat(by_hand).st_size
    check = qemu_img("check", "-f", "qcow2", warm.path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert fenv.images_identical(image(dep), "raw", warm.path, "qcow2")
    info = fenv.qemu_info(warm.path, "qcow2")
    assert (info["virtual-size"], info["backing-filename"],
            info["backing-filename-format"]) == (GiB, first.backing_file,
                                                 "raw")


def test_guest_writes_to_one_copy_never_reach_another(dep):
    b = imagebackend.load_backend(dep.conf(), "qcow2")
    one = b.create_image("guest.raw", disk_path(dep, "one"), GiB)
    two = b.create_image("guest.raw", disk_path(dep, "two"), GiB)
    pattern = os.path.join(dep.root, "pattern.raw")
    fenv.write_pattern_raw(pattern, GiB, seed=9)
    wrote = qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", pattern,
                     one.path)
    assert wrote.returncode == 0, wrote.stderr
    assert fenv.images_identical(image(dep), "raw", two.path, "qcow2")
    three = b.create_image("guest.raw", disk_path(dep, "three"), GiB)
    assert fenv.images_identical(image(dep), "raw", three.path, "qcow2")
    assert qemu_img("check", "-f", "qcow2", one.path).returncode == 0


def test_a_damaged_template_is_made_again_and_the_disk_is_right(dep):
    b = imagebackend.load_backend(dep.conf(), "qcow2")
    b.create_image("guest.raw", disk_path(dep, "one"), GiB)
    [name] = template_files(dep)
    path = os.path.join(dep.base_dir, name)
    with open(path, "r+b") as f:        # someone writes in the L1 table
        f.seek(3 * 65536)
        f.write(b"\x80\0\0\0\0\x05\0\0")
    dep.reset_qemu_log()
    disk = b.create_image("guest.raw", disk_path(dep, "two"), GiB)
    assert [c.split()[0] for c in dep.qemu_calls()] == ["create"]
    assert template_files(dep) == [name]
    assert qemu_img("check", "-f", "qcow2", disk.path).returncode == 0
    assert fenv.images_identical(image(dep), "raw", disk.path, "qcow2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_and_invalidate_remove_the_templates(dep, backend):
    dep.write_config(image_cache=fenv.AGES_ZERO)
    b = imagebackend.load_backend(dep.conf(), backend)
    disk = b.create_image("guest.raw", disk_path(dep, "one"), 2 * GiB)
    b.create_image("guest.raw", disk_path(dep, "two"), 3 * GiB)
    assert len(template_files(dep)) == 2
    listed = dep.cli_json("cache", "list")
    assert templates.INFIX not in repr(listed)
    c = cache.ImageCache(dep.conf())
    # In use: kept (a cached-base's original base is not, and goes).
    assert [r.kind for r in c.prune().removed] == (
        [] if backend == "qcow2" else ["base"])
    assert len(template_files(dep)) == 2
    b.delete_disk(disk.path)
    b.delete_disk(disk_path(dep, "two"))
    removed = c.invalidate("guest.raw").removed
    assert sorted(r.kind for r in removed if r.kind == "template") == [
        "template"] * 2
    assert template_files(dep) == []
    # And prune, on the next generation's templates.
    b.create_image("guest.raw", disk_path(dep, "three"), 2 * GiB)
    assert len(template_files(dep)) == 1
    b.delete_disk(disk_path(dep, "three"))
    kinds = [r.kind for r in c.prune().removed]
    assert "template" in kinds
    assert template_files(dep) == [] and dep.base_listing() == []


def _slow_wrapper(dep, marker):
    """A qemu-img that, for a template, writes it completely and then
    waits before returning: a kill then finds a whole overlay under its
    scratch name.
    """
    wrapper = os.path.join(dep.bin, "qemu-img")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\n'%s' \"$@\" || exit $?\n"
                "case \"$*\" in *.template-*) touch '%s'; sleep 60;; esac\n"
                % (fenv.REAL_QEMU_IMG, marker))
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR)


def test_killed_while_making_a_template_leaves_none_and_next_works(dep):
    dep.prefetch("guest.raw")
    marker = os.path.join(dep.root, "template-written")
    _slow_wrapper(dep, marker)
    target = disk_path(dep, "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebackend.cmd.main", "--config-file",
         dep.config_file, "disk", "create", "guest.raw", target, "--size",
         "1G", "--backend", "qcow2"], env=dep.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert template_files(dep) != []        # its scratch...
    assert all(templates.parse(n).scratch for n in template_files(dep))
    assert not os.path.lexists(target)
    dep._write_wrapper()
    dep.reset_qemu_log()
    disk = imagebackend.load_backend(dep.conf(), "qcow2").create_image(
        "guest.raw", disk_path(dep, "next"), GiB)
    assert [c.split()[0] for c in dep.qemu_calls()] == ["create"]
    finals = [n for n in template_files(dep)
              if not templates.parse(n).scratch]
    assert len(finals) == 1
    assert fenv.images_identical(image(dep), "raw", disk.path, "qcow2")
    assert qemu_img("check", "-f", "qcow2", disk.path).returncode == 0


def _create_at_barrier(config_file, target, go, queue):
    from imagebackend.backends import base
    from imagebackend import opts
    b = base.load(opts.new_conf(["--config-file", config_file]), "qcow2")
    go.wait(120)
    try:
        b.create_image("guest.raw", target, GiB)
        queue.put("created")
    except Exception as exc:    # reported to the test
        queue.put(repr(exc))


def test_eight_concurrent_creates_make_one_template(dep):
    dep.prefetch("guest.raw")
    dep.reset_qemu_log()
    ctx = children.context()
    queue, go = ctx.Queue(), ctx.Barrier(8)
    targets = [disk_path(dep, "vm%d" % i) for i in range(8)]
    procs = [children.process(ctx, _create_at_barrier,
                              (dep.config_file, t, go, queue))
             for t in targets]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
    assert outcomes == ["created"] * 8
    assert [c.split()[0] for c in dep.qemu_calls()] == ["create"]
    assert len(template_files(dep)) == 1
    first = read(targets[0])
    assert all(read(t) == first for t in targets[1:])
    assert fenv.images_identical(image(dep), "raw", targets[-1], "qcow2")
