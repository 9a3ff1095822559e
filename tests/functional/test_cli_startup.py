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
it uses.  The command runs in a child process under ``python -X
importtime``, which lists on stderr every module the process imported.
"""

import os
import subprocess
import sys

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


def imported(argv, env=None):
    """Run ``argv`` (a Python command line) under ``-X importtime``.

    :returns: (the completed process, the names of the modules imported).
    """
    result = subprocess.run(
        [sys.executable, "-X", "importtime"] + argv, env=env,
        capture_output=True, text=True, check=False)
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":       # the header line
                modules.add(name)
    assert modules, result.stderr[-2000:]
    return result, modules


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
#: processutils (a failure, or resource limits).
INSPECTION = ("oslo_utils.strutils", "oslo_utils.imageutils",
              "oslo_concurrency.processutils", "cryptography", "yaml")


def test_cache_list_loads_no_glance_no_backend_and_no_inspector(dep):
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", dep.config_file,
         "cache", "list"], env=dep.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "(none)\n"
    assert loaded(modules, GLANCE + BACKENDS + INSPECTION) == []


def test_disk_info_loads_no_glance_and_no_backend(dep, tmp_path):
    disk = fenv.make_qcow2(str(tmp_path / "disk.qcow2"))
    result, modules = imported(
        ["-m", "imagebackend.cmd.main", "--config-file", dep.config_file,
         "disk", "info", "--input-format", "qcow2", disk, "-f", "json"],
        env=dep.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"virtual_size": %d' % (64 * fenv.MiB) in result.stdout
    assert loaded(modules, GLANCE + BACKENDS) == []


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
    errors = [line for line in result.stderr.splitlines()
              if not line.startswith("import time:")]
    assert len(errors) == 1, errors
    assert "option [glance] region_name (set in %s)" % dep.config_file in (
        errors[0])
    assert "keystoneauth1" in modules
