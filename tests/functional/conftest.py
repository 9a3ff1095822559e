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

"""Fixtures shared by the functional tests."""

import os
import pathlib
import warnings

import pytest

from tests.functional.fixtures import ceph as ceph_mod
from tests.functional.fixtures import corpus
from tests.functional.fixtures import parallel
from tests.functional.fixtures import server_procs
from tests.functional.fixtures import servers as servers_mod

#: where the reasons for skipped server tests are kept for the summary.
_SKIPPED_SERVERS = pytest.StashKey[list]()


def in_ci(environ=os.environ) -> bool:
    """Whether this run is a CI run, where nothing may be skipped quietly.

    tox does not pass ``CI`` into a test environment unless its passenv
    names it; it keeps the caller's value under its own name, read too.
    """
    value = (environ.get("CI")
             or environ.get("__TOX_ENVIRONMENT_VARIABLE_ORIGINAL_CI") or "")
    return value.strip().lower() not in ("", "0", "false", "no")


def servers_unavailable(config, reason: str, environ=os.environ):
    """Stop a test that needs Keystone and Glance that cannot be set up.

    Under CI every such test fails: a broken setup must not turn the Glance
    tests into a green run.  Elsewhere they are skipped, loudly: a pytest
    warning and a line in the terminal summary say what was skipped.

    :raises pytest.fail.Exception: under CI.
    :raises pytest.skip.Exception: otherwise.
    """
    message = "Keystone and Glance are not available: %s" % reason
    if in_ci(environ):
        pytest.fail("%s (CI=true: the Glance tests must run, not skip)"
                    % message, pytrace=False)
    config.stash.setdefault(_SKIPPED_SERVERS, []).append(message)
    warnings.warn(pytest.PytestWarning(
        "SKIPPING every test that needs Keystone and Glance: " + message))
    pytest.skip(message)


def pytest_configure(config):
    parallel.start(config)


def pytest_unconfigure(config):
    parallel.finish(config)


def pytest_collection_modifyitems(config, items):
    parallel.group_items(config, items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return parallel.scheduler(config, log)
    return None


def pytest_sessionfinish(session):
    # On a pytest-xdist worker: hand the skip notice to the controller,
    # which prints the summary.
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["skipped_servers"] = session.config.stash.get(
            _SKIPPED_SERVERS, [])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    skipped = getattr(node, "workeroutput", {}).get("skipped_servers")
    if skipped:
        node.config.stash.setdefault(_SKIPPED_SERVERS, []).extend(skipped)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = config.stash.get(_SKIPPED_SERVERS, [])
    if skipped:
        terminalreporter.write_sep(
            "!", "Keystone/Glance tests SKIPPED (set CI=true to fail)",
            red=True, bold=True)
        terminalreporter.write_line(skipped[0], red=True)


@pytest.fixture(scope="session")
def openstack_servers(request):
    """A real Keystone and Glance on 127.0.0.1, started once per test run
    (the first test that asks for them pays the ~10 s start) and stopped,
    with every process they spawned, when the run ends.

    When the servers' virtualenv cannot be installed
    (tools/glance-servers/setup-venv.sh failed), every test that needs
    them fails under CI and is skipped loudly elsewhere (see
    :func:`servers_unavailable`); a server that fails to start is an
    error.  Under pytest-xdist, the tests that use them run on one
    worker (fixtures/parallel.py).
    """
    parallel.claim(request.config, "openstack_servers")
    try:
        venv = server_procs.ensure_venv()
    except server_procs.ServersUnavailable as exc:
        servers_unavailable(request.config, str(exc))
    with servers_mod.servers_in_tempdir(venv) as servers:
        yield servers


@pytest.fixture(scope="session")
def ceph_cluster(request):
    """A real one-monitor, one-OSD Ceph on 127.0.0.1 (fixtures/ceph.py),
    started once per run by the first test that asks for it (about 2 s)
    and stopped by pid at the end.
    """
    parallel.claim(request.config, "ceph_cluster")
    with ceph_mod.session_cluster(in_ci()) as cluster:
        yield cluster


def _file_states(directory: pathlib.Path) -> dict:
    """Every file under ``directory`` with its size and modification
    time: what any write, truncation or replacement changes.
    """
    return {str(path.relative_to(directory)):
            (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in sorted(directory.rglob("*"))}


@pytest.fixture(scope="session")
def crafted_corpus(request, tmp_path_factory):
    """The crafted-image corpus (fixtures/corpus.py), built once per test
    run and shared by every test that reads it.

    The tests only read it; a test that changed, added or removed one of
    its files would change what later tests see, so the run ends with an
    error naming the files if that happened.

    :returns: a tuple of :class:`corpus.CorpusEntry`, in builder order.
    """
    parallel.claim(request.config, "crafted_corpus")
    directory = tmp_path_factory.mktemp("corpus")
    entries = tuple(corpus.build_corpus(str(directory)))
    before = _file_states(directory)
    yield entries
    after = _file_states(directory)
    changed = sorted(name for name in before.keys() | after.keys()
                     if before.get(name) != after.get(name))
    if changed:
        pytest.fail("a test changed the shared corpus in %s: %s"
                    % (directory, ", ".join(changed)), pytrace=False)
