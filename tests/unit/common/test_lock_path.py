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

"""``[oslo_concurrency] lock_path`` without oslo_concurrency.lockutils:
the same options, the same value, and lockutils' own when it is loaded.
"""

import copy
import os
import subprocess
import sys

from oslo_concurrency import lockutils
from oslo_concurrency import opts as concurrency_opts
from oslo_config import cfg
import pytest

from imagebackend.common import lock_path

LOCKUTILS = "oslo_concurrency.lockutils"


def parsed(tmp_path, value=None):
    """A parsed ConfigOpts; ``value`` is lock_path in its config file."""
    path = tmp_path / "test.conf"
    path.write_text("[oslo_concurrency]\n" + (
        "lock_path = %s\n" % value if value else ""))
    conf = cfg.ConfigOpts()
    conf(["--config-file", str(path)])
    return conf


@pytest.fixture
def no_lockutils(monkeypatch):
    """lockutils not loaded (until ``monkeypatch.undo()``)."""
    monkeypatch.delitem(sys.modules, LOCKUTILS)
    return monkeypatch


def test_the_options_are_oslo_concurrencys_own_definitions():
    # What oslo.concurrency lists for the sample config (its _opts);
    # this fails when a new oslo.concurrency changes them.
    [(group, listed)] = concurrency_opts.list_opts()
    assert group == lock_path.GROUP
    assert listed == lock_path.OPTIONS
    # The control: oslo.config compares every attribute of an option.
    changed = copy.deepcopy(lock_path.OPTIONS)
    changed[1].help += " "
    assert listed != changed


def test_without_lockutils_the_copy_is_read_and_lockutils_accepts_it(
        no_lockutils, tmp_path):
    conf = parsed(tmp_path, "/srv/locks")
    assert lock_path.get_lock_path(conf) == "/srv/locks"
    assert LOCKUTILS not in sys.modules
    no_lockutils.undo()
    # lockutils registers its own definitions on the same ConfigOpts
    # without complaint, and reads the same value.
    assert lockutils.get_lock_path(conf) == "/srv/locks"
    assert lock_path.get_lock_path(conf) == "/srv/locks"


def test_with_lockutils_loaded_its_own_options_are_registered(
        monkeypatch, tmp_path):
    # A default given through lockutils.set_defaults (which changes its
    # option objects) is honoured, as lockutils.get_lock_path honours it.
    monkeypatch.setattr(lockutils._opts[1], "default", "/set/by/service")
    conf = parsed(tmp_path)
    assert lock_path.get_lock_path(conf) == "/set/by/service"
    # A config file still wins.
    assert lock_path.get_lock_path(parsed(tmp_path, "/srv/locks")) == (
        "/srv/locks")


def test_a_copy_registered_before_lockutils_was_loaded_stays(
        no_lockutils, tmp_path):
    conf = parsed(tmp_path)
    lock_path.register_opts(conf)
    no_lockutils.undo()
    # lockutils' definitions differ from the copy now: the copy stays,
    # and reading goes on without an error.
    no_lockutils.setattr(lockutils._opts[1], "default", "/set/later")
    assert lock_path.get_lock_path(conf) == lock_path.OPTIONS[1].default
    with pytest.raises(cfg.DuplicateOptError):
        lockutils.get_lock_path(conf)


@pytest.mark.parametrize("loaded", [True, False])
def test_another_definition_of_lock_path_is_refused(monkeypatch, loaded):
    if not loaded:
        monkeypatch.delitem(sys.modules, LOCKUTILS)
    conf = cfg.ConfigOpts()
    conf.register_opt(cfg.StrOpt("lock_path", default="/mine"),
                      group="oslo_concurrency")
    with pytest.raises(cfg.DuplicateOptError):
        lock_path.register_opts(conf)


# Under mutmut (tox -e mutation) the package is its trampolined copy in
# mutants/, which a new interpreter does not import as this one does;
# lock_path.py is not one of the mutated modules.
@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ,
                    reason="a new interpreter under mutmut")
def test_the_default_is_oslo_lock_path_as_lockutils_gives_it(tmp_path):
    # A new process: the copy is made when the module is imported, as
    # lockutils makes its own, from $OSLO_LOCK_PATH.
    program = (
        "import sys\n"
        "from oslo_config import cfg\n"
        "from imagebackend.common import lock_path\n"
        "conf = cfg.ConfigOpts()\n"
        "conf([])\n"
        "print(lock_path.get_lock_path(conf))\n"
        "print('oslo_concurrency.lockutils' in sys.modules)\n"
        "from oslo_concurrency import lockutils\n"
        "print(lockutils.get_lock_path(conf))\n")
    env = dict(os.environ, OSLO_LOCK_PATH=str(tmp_path / "env-locks"))
    result = subprocess.run([sys.executable, "-c", program], env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        str(tmp_path / "env-locks"), "False", str(tmp_path / "env-locks")]
