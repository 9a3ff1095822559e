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

"""Fixtures shared by the unit tests."""

import pytest

from imagebackend import cache
from tests import fakes


@pytest.fixture
def fake_qemu():
    """An autospec QemuImg whose convert writes an 8 MiB raw target."""
    return fakes.qemu()


@pytest.fixture
def img_cache(tmp_path, fake_qemu):
    """An image cache under ``tmp_path`` whose source serves one image,
    ``img`` (:data:`tests.fakes.RAW_IMAGE`).
    """
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={"img": fakes.RAW_IMAGE})
    return cache.ImageCache(conf, source, fake_qemu)
