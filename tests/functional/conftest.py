"""Fixtures shared by the functional tests."""

import pytest

from tests.functional.fixtures import server_procs
from tests.functional.fixtures import servers as servers_mod


@pytest.fixture(scope="session")
def openstack_servers():
    """A real Keystone and Glance on 127.0.0.1, started once per test run
    (the first test that asks for them pays the ~10 s start) and stopped,
    with every process they spawned, when the run ends.

    Skips only when the servers' virtualenv cannot be installed
    (tools/glance-servers/setup-venv.sh failed); a server that fails to
    start is an error.
    """
    try:
        venv = server_procs.ensure_venv()
    except server_procs.ServersUnavailable as exc:
        pytest.skip("Keystone and Glance are not available: %s" % exc)
    with servers_mod.servers_in_tempdir(venv) as servers:
        yield servers
