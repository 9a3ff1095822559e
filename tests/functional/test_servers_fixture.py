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

"""The ``openstack_servers`` fixture when Keystone and Glance cannot be set
up: every Glance test fails under CI, and is skipped loudly elsewhere.

A pytest run in a child process, with a plugin that makes the servers'
setup fail, runs one Glance test file.
"""

import os
import subprocess
import sys

import pytest

from tests.functional import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GLANCE_TESTS = os.path.join("tests", "functional", "test_glance_source.py")

_PLUGIN = '''
from tests.functional.fixtures import server_procs


def _broken():
    raise server_procs.ServersUnavailable("setup-venv.sh failed (test)")


server_procs.ensure_venv = _broken
'''


def run_glance_tests(tmp_path, **env):
    (tmp_path / "break_servers.py").write_text(_PLUGIN)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CI", "__TOX_ENVIRONMENT_VARIABLE_ORIGINAL_CI")}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), ROOT] + ([environ["PYTHONPATH"]]
                                 if environ.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "break_servers",
         "-p", "no:cacheprovider", "-rfEs", GLANCE_TESTS],
        cwd=ROOT, env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300, check=False)


def test_under_ci_a_failed_server_setup_fails_every_glance_test(tmp_path):
    result = run_glance_tests(tmp_path, CI="true")
    assert result.returncode == 1, result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert "error" in summary and "skipped" not in summary, summary
    assert "setup-venv.sh failed (test)" in result.stdout
    assert "CI=true" in result.stdout


def test_outside_ci_the_skip_is_announced(tmp_path):
    result = run_glance_tests(tmp_path)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.strip().splitlines()
    assert "skipped" in lines[-1] and "error" not in lines[-1], lines[-1]
    assert any("Keystone/Glance tests SKIPPED" in line for line in lines)
    assert any("PytestWarning: SKIPPING every test that needs Keystone"
               in line for line in lines), result.stdout


@pytest.mark.parametrize("value,expected", [
    ("true", True), ("1", True), ("yes", True), ("", False),
    ("false", False), ("0", False)])
def test_what_counts_as_ci(value, expected):
    assert conftest.in_ci({"CI": value}) is expected
    assert conftest.in_ci(
        {"__TOX_ENVIRONMENT_VARIABLE_ORIGINAL_CI": value}) is expected
    assert conftest.in_ci({}) is False
