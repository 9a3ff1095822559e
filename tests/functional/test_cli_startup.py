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

"""What the ``imagebackend`` command loads: each command imports only what
it uses.  The command runs in a child process that records, as it exits,
every module it imported.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.functional.fixtures import env as fenv

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable),
                              "imagebackend")

#: never needed without Glance.
GLANCE = ("glanceclient", "keystoneauth1", "requests",
          "imagebackend.sources.glance")
#: the backends stevedore loads by name; none is built by these commands.
BACKENDS = ("imagebackend.backends.qcow2", "imagebackend.backends.raw",
            "imagebackend.backends.cached_base")
#: what printing help needs none of: configuration, plugins, the cache,
#: the backends, the image sources, and the password-masking regexes of
#: oslo_utils.strutils (compiled when it is imported).
NOT_FOR_HELP = GLANCE + BACKENDS + (
    "oslo_config", "stevedore", "oslo_concurrency", "oslo_utils.strutils",
    "oslo_utils.imageutils", "imagebackend.opts", "imagebackend.cache",
    "imagebackend.backends", "imagebackend.sources", "imagebackend.disk",
    "imagebackend.qemu", "imagebackend.inspection")


#: runs a Python command line (``-m MODULE ARGS`` or ``SCRIPT ARGS``) as
#: python would, and at exit writes every module the process imported
#: (``sys.modules``) to the file named by $IMPORTED.  (``-X importtime``
#: misses the modules imported by importlib.import_module: those a
#: package's ``__getattr__`` or stevedore loads.)
_RECORDING = """
import atexit, json, os, runpy, sys


def record(path=os.environ.pop("IMPORTED")):
    with open(path, "w") as f:
        json.dump(sorted(sys.modules), f)


atexit.register(record)
if sys.argv[1] == "-m":
    sys.argv[:3] = [sys.argv[2]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    del sys.argv[0]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def imported(argv, env=None, tmp_dir=None):
    """Run ``argv`` (a Python command line) in a new interpreter.

    :returns: (the completed process, the names of every module it
        imported).
    """
    fd, path = tempfile.mkstemp(prefix="imported-", suffix=".json",
                                dir=tmp_dir)
    os.close(fd)
    try:
        env = dict(os.environ if env is None else env, IMPORTED=path)
        result = subprocess.run(
            [sys.executable, "-c", _RECORDING] + argv, env=env,
            capture_output=True, text=True, check=False)
        with open(path) as f:
            text = f.read()
    finally:
        os.unlink(path)
    assert text, result.stderr[-2000:]
    return result, set(json.loads(text))


def loaded(modules, prefixes):
    """The modules of ``modules`` that are, or are inside, ``prefixes``."""
    return sorted(m for m in modules
                  if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["disk", "info", "--help"],
    ["disk", "create", "--help"],
    ["disk", "extract", "--help"],
    ["cache", "list", "--help"],
    ["cache", "prefetch", "--help"],
])
def test_help_loads_no_library_code(argv):
    result, modules = imported(["-m", "imagebackend.cmd.main"] + argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")
    assert loaded(modules, NOT_FOR_HELP) == []
    assert {"imagebackend.cmd.disk", "imagebackend.cmd.cache"} <= modules


@pytest.mark.skipif(not os.path.exists(CONSOLE_SCRIPT),
                    reason="no imagebackend console script beside python")
def test_the_console_script_help_loads_no_library_code():
    result, modules = imported([CONSOLE_SCRIPT, "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: imagebackend")
    assert loaded(modules, NOT_FOR_HELP) == []


def test_an_argument_error_loads_no_library_code():
    result, modules = imported(["-m", "imagebackend.cmd.main", "disk",
                                "check", "d", "--repair", "everything"])
    assert result.returncode == 2
    assert "invalid choice: 'everything'" in result.stderr
    assert loaded(modules, NOT_FOR_HELP) == []


#: needed only to inspect an image or to run a command through
#: processutils (a failure, or an injected execute function).
INSPECTION = ("oslo_utils.strutils", "oslo_utils.imageutils",
              "oslo_concurrency.processutils", "cryptography", "yaml")
#: processutils, and the oslo_utils.strutils it imports: a command whose
#: qemu-img runs succeed needs neither, under resource limits too.
PROCESSUTILS = ("oslo_concurrency.processutils", "oslo_utils.strutils")
#: the cache's miss path: fetching, converting and publishing a base.
FETCH = ("imagebackend.cache.fetch", "imagebackend.cache.download",
         "imagebackend.cache.publish", "imagebackend.cache.content",
         "imagebackend.cache.prefetch")
#: the cache's upkeep: pruning, removing, verifying, sized bases.
UPKEEP = ("imagebackend.cache.prune", "imagebackend.cache.remove",
          "imagebackend.cache.verify", "imagebackend.cache.sized")
#: oslo.concurrency's lockutils and what it imports: lock_path is read,
#: and the cache's locks taken, without it (imagebackend.common.lock_path,
#: imagebackend.cache.locks).
LOCKUTILS = ("oslo_concurrency.lockutils", "debtcollector", "fasteners",
             "oslo_i18n", "oslo_utils.timeutils")
#: what runs qemu-img (and its results' dataclasses): a command that runs
#: none loads none of it.
QEMU = ("imagebackend.qemu.img", "imagebackend.qemu.runner",
        "imagebackend.qemu.running", "imagebackend.qemu.results",
        "imagebackend.disk.operations", "ctypes")
#: needed only for a fraction in a size, and to give a new lock directory
#: its identity.
RARE = ("decimal", "uuid")
#: the cache's miss path, once the Fetcher (which a hit uses) is made.
DOWNLOAD = ("imagebackend.cache.download", "imagebackend.cache.publish",
            "imagebackend.cache.content")
#: the image cache's facade, the backends and the image sources' code:
#: none of it is needed to work on an existing disk.
NOT_FOR_DISK_OPERATIONS = (GLANCE + PROCESSUTILS + FETCH + UPKEEP +
                           LOCKUTILS + RARE + (
                               "imagebackend.backends.base",
                               "imagebackend.cache.facade",
                               "imagebackend.sources.base",
                               "imagebackend.sources.local"))
IMAGE = "small.qcow2"


def test_cache_list_loads_no_glance_no_backend_and_no_inspector(dep):
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", dep.config_file,
         "cache", "list"], env=dep.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "(none)\n"
    assert loaded(modules, GLANCE + BACKENDS + INSPECTION + FETCH +
                  UPKEEP + LOCKUTILS + QEMU + RARE + (
                      "imagebackend.backends.base",)) == []


@pytest.fixture
def warm(tmp_path):
    """A cache holding the base of image ``IMAGE``, one disk made from
    it, and a qcow2 disk the library did not make.
    """
    deployment = fenv.with_qcow2(str(tmp_path / "dep"), IMAGE, 16 * fenv.MiB)
    deployment.made = os.path.join(deployment.instances, "made")
    deployment.new = os.path.join(deployment.instances, "new")
    deployment.cli("disk", "create", IMAGE, deployment.made,
                   "--size", str(64 * fenv.MiB))
    deployment.other = fenv.make_qcow2(str(tmp_path / "other.qcow2"))
    return deployment


#: what no command working on the cache alone (or on a cached image: the
#: base is raw, so verifying it runs no qemu-img) loads.
CACHE_ONLY = GLANCE + PROCESSUTILS + LOCKUTILS + QEMU + RARE
#: each real command, on the warm deployment, with what it must not load.
REAL_COMMANDS = {
    "cache list": (
        lambda d: ["cache", "list"],
        CACHE_ONLY + BACKENDS + FETCH + UPKEEP + (
            "imagebackend.backends.base",)),
    "cache prune --dry-run": (
        lambda d: ["cache", "prune", "--dry-run"],
        CACHE_ONLY + BACKENDS + FETCH + (
            "imagebackend.cache.verify", "imagebackend.cache.sized",
            "imagebackend.backends.base")),
    "cache verify": (
        lambda d: ["cache", "verify"],
        CACHE_ONLY + BACKENDS + FETCH + (
            "imagebackend.cache.prune", "imagebackend.cache.sized",
            "imagebackend.backends.base")),
    "cache invalidate": (
        # It takes the image's lock, without lockutils.
        lambda d: ["cache", "invalidate", "other.qcow2"],
        CACHE_ONLY + BACKENDS + FETCH + (
            "imagebackend.cache.verify", "imagebackend.cache.sized",
            "imagebackend.backends.base")),
    "cache prefetch (cached)": (
        lambda d: ["cache", "prefetch", IMAGE],
        CACHE_ONLY + BACKENDS + DOWNLOAD + (
            "imagebackend.cache.prune", "imagebackend.cache.remove",
            "imagebackend.cache.sized", "imagebackend.backends.base")),
    "disk create (warm)": (
        lambda d: ["disk", "create", IMAGE, d.new, "--size",
                   str(64 * fenv.MiB)],
        CACHE_ONLY + DOWNLOAD + (
            "imagebackend.backends.raw", "imagebackend.backends.cached_base",
            "imagebackend.backends.rbd", "imagebackend.cache.prune")),
    "disk delete": (
        lambda d: ["disk", "delete", d.made],
        CACHE_ONLY + FETCH + (
            "imagebackend.backends.raw", "imagebackend.backends.cached_base",
            "imagebackend.backends.rbd", "imagebackend.cache.prune")),
    "disk info": (
        lambda d: ["disk", "info", d.made],
        NOT_FOR_DISK_OPERATIONS),
    "disk check": (
        lambda d: ["disk", "check", "--input-format", "qcow2", d.other],
        NOT_FOR_DISK_OPERATIONS),
    "disk snapshot list": (
        lambda d: ["disk", "snapshot", "list", "--input-format", "qcow2",
                   d.other],
        NOT_FOR_DISK_OPERATIONS),
    "disk resize": (
        lambda d: ["disk", "resize", "--input-format", "qcow2", d.other,
                   str(128 * fenv.MiB)],
        NOT_FOR_DISK_OPERATIONS),
}


@pytest.mark.parametrize("name", sorted(REAL_COMMANDS))
def test_a_real_command_loads_only_what_it_uses(warm, name):
    argv, not_loaded = REAL_COMMANDS[name]
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", warm.config_file]
        + argv(warm), env=warm.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert loaded(modules, not_loaded) == []
    # The control: the command did load the library code it runs.
    assert "imagebackend.opts" in modules


def test_a_cache_miss_loads_what_a_hit_does_not(warm):
    # The other side of the lists above: a disk made from an image not
    # cached yet downloads, converts, publishes and takes the image's lock
    # (without lockutils), so the modules a hit leaves out are loaded here
    # by their real names.
    fenv.make_qcow2(os.path.join(warm.images, "cold.qcow2"), 16 * fenv.MiB)
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", warm.config_file,
         "disk", "create", "cold.qcow2", warm.new, "--size",
         str(64 * fenv.MiB)], env=warm.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(DOWNLOAD) | {"imagebackend.cache.fetch",
                            "imagebackend.qemu.img", "ctypes"} <= modules
    assert loaded(modules, GLANCE + ("oslo_concurrency.lockutils",)) == []


def test_disk_info_loads_no_glance_and_no_backend(dep, tmp_path):
    disk = fenv.make_qcow2(str(tmp_path / "disk.qcow2"))
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", dep.config_file,
         "disk", "info", "--input-format", "qcow2", disk, "-f", "json"],
        env=dep.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"virtual_size": %d' % (64 * fenv.MiB) in result.stdout
    # qemu-img info ran under its resource limits without processutils.
    assert loaded(modules, NOT_FOR_DISK_OPERATIONS + BACKENDS) == []


def test_a_glance_command_still_loads_glance(dep):
    # The other side: a command that uses Glance registers and checks its
    # options when it builds the source.
    dep.write_config(imagebackend={"image_source": "glance"},
                     glance={"region_name": "$nope"})
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", dep.config_file,
         "cache", "prefetch", "0ea1c1f2-4b4b-4d1e-8b5a-2f1f6c8a9e01"],
        env=dep.env())
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 1, errors
    assert "option [glance] region_name (set in %s)" % dep.config_file in (
        errors[0])
    assert "keystoneauth1" in modules
