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

"""SIGKILL at each step of a warm create (a copy of the overlay template,
made as a file without a name): before the intent record is durable,
before the disk is linked, before its record is marked done, and once it
is.  The disk is always outside every searched directory, so only the
registry protects its base.  Killed before the link: no file at all is
left beside the target, and nothing keeps the base (prune removes it; the
record goes once its grace has passed).  Killed after: the disk is
complete and its base survives prune.  Real qemu-img, real files.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from imagebackend import cache
from imagebackend.cache import registry as cache_registry
from imagebackend.common import digest as content_digest
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB

#: the child: a warm create killed (SIGKILL, by itself) at one step.
_KILL_AT = """
import os, signal, sys
from imagebackend.backends import base
from imagebackend.cache import registry
from imagebackend.common import fileio
step = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def before(cls, name):
    real = getattr(cls, name)
    def wrapped(*args, **kwargs):
        die()
    setattr(cls, name, wrapped)

def after(cls, name):
    real = getattr(cls, name)
    def wrapped(*args, **kwargs):
        real(*args, **kwargs)
        die()
    setattr(cls, name, wrapped)

if step == "record-not-durable":
    before(registry.Intent, "wait")
elif step == "before-link":
    before(fileio.Unnamed, "link")
elif step == "before-done":
    before(registry.Registry, "confirm")
elif step == "after-done":
    after(registry.Registry, "confirm")
from imagebackend.cmd import main
sys.exit(main.main(sys.argv[2:]))
"""

BEFORE_LINK = ["record-not-durable", "before-link"]
AFTER_LINK = ["before-done", "after-done"]


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path))
    fenv.make_raw(os.path.join(d.images, "guest.raw"), 64 * MiB)
    d.write_config(image_cache=fenv.AGES_ZERO)
    return d


def registry(dep):
    return cache.ImageCache(dep.conf()).scanner.registry


def records_of(dep, target):
    return [r for r in registry(dep).records() if r["disk"] == target]


def _killed_create(dep, backend, step):
    # The template exists: the create below is a warm copy.
    dep.cli("disk", "create", "guest.raw",
            os.path.join(dep.root, "elsewhere", "first", "disk"), "--size",
            "1G", "--backend", backend)
    dep.cli("disk", "delete",
            os.path.join(dep.root, "elsewhere", "first", "disk"))
    target = os.path.join(dep.root, "elsewhere", "vm", "disk")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT, step, "--config-file",
         dep.config_file, "disk", "create", "guest.raw", target, "--size",
         "1G", "--backend", backend], env=dep.env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return target


def _base_of(dep, backend):
    cid = content_digest.cache_id("guest.raw")
    name = cid if backend == "qcow2" else "%s_%d" % (cid, 1024 * MiB)
    return os.path.join(dep.base_dir, name)


@pytest.mark.parametrize("backend", ["qcow2", "cached-base"])
@pytest.mark.parametrize("step", BEFORE_LINK)
def test_killed_before_the_link_leaves_no_file_and_nothing_keeps_the_base(
        dep, backend, step):
    target = _killed_create(dep, backend, step)
    # Not even a hidden temporary file beside the target.
    assert os.listdir(os.path.dirname(target)) == []
    [record] = records_of(dep, target)
    assert (record["state"], record["tmp"]) == ("intent", None)
    assert registry(dep).find(target) is None
    # The record of an attempt that made no disk protects no base.
    base = _base_of(dep, backend)
    pruned = dep.cli_json("cache", "prune")
    assert base in {r["file"] for r in pruned["removed"]}, pruned
    assert not os.path.exists(base)
    # ...and goes itself once its grace has passed.
    reg = registry(dep)
    cid = content_digest.cache_id("guest.raw")
    assert reg.collect(cid, lambda path, st: set(), now=time.time()
                       + cache_registry.INTENT_GRACE + 1) == 1
    assert records_of(dep, target) == []
    # A retry makes the disk.
    dep.cli("disk", "create", "guest.raw", target, "--size", "1G",
            "--backend", backend)
    assert fenv.images_identical(os.path.join(dep.images, "guest.raw"),
                                 "raw", target, "qcow2")


@pytest.mark.parametrize("backend", ["qcow2", "cached-base"])
@pytest.mark.parametrize("step", AFTER_LINK)
def test_killed_once_the_copy_is_named_its_base_survives_prune(dep, backend,
                                                               step):
    target = _killed_create(dep, backend, step)
    assert os.listdir(os.path.dirname(target)) == ["disk"]
    found = registry(dep).find(target)
    assert found["state"] == ("intent" if step == "before-done" else "done")
    assert (found["format"], found["tmp"]) == ("qcow2", None)
    base = _base_of(dep, backend)
    pruned = dep.cli_json("cache", "prune")
    assert base not in {r["file"] for r in pruned["removed"]}, pruned
    assert fenv.qemu_info(target, "qcow2")["backing-filename"] == base
    assert os.path.exists(base)
    check = subprocess.run([fenv.REAL_QEMU_IMG, "check", "-f", "qcow2",
                            target], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert fenv.images_identical(os.path.join(dep.images, "guest.raw"),
                                 "raw", target, "qcow2")
    # The record stays (its disk exists), and the disk can be deleted.
    assert registry(dep).collect(
        content_digest.cache_id("guest.raw"), lambda path, st: {base},
        now=time.time() + cache_registry.INTENT_GRACE + 1) == 0
    dep.cli("disk", "delete", target)
    assert not os.path.exists(target)
