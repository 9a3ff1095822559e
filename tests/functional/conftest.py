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
