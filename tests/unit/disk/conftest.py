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

"""Fixtures shared by the disk tests."""

import pytest

from imagebackend.disk import trust as disk_trust
from tests import fakes


@pytest.fixture
def paths(tmp_path):
    """The cache's directories under ``tmp_path``, with ``_base``, the
    lock directory and an instance directory ``vm`` made.
    """
    instances = tmp_path / "instances"
    for sub in ("_base", "locks", "vm"):
        (instances / sub).mkdir(parents=True)
    return disk_trust.cache_paths(fakes.conf(tmp_path))
