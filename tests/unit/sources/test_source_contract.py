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

"""The source contract (tests/contract/source.py) against the local source
and against the fake source the unit tests use, so the fake cannot drift.
"""

import itertools
import os

import pytest

from tests.contract import source as contract
from tests import fakes


class LocalWorld(contract.SourceWorld):
    """The local source over ``tmp_path/images``."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.conf = fakes.conf(tmp_path)
        self.source = fakes.local_source(tmp_path, self.conf)
        self._names = ("image%d.raw" % n for n in itertools.count())

    def add_image(self, data):
        image_id = next(self._names)
        with open(os.path.join(self.source.directory, image_id), "wb") as f:
            f.write(data)
        return image_id

    def missing_id(self):
        return "missing.raw"

    def tamper(self, image_id):
        flip(os.path.join(self.source.directory, image_id))

    def cache_conf(self):
        return self.conf

    def qemu(self, conf):
        return fakes.fake_qemu(conf)[0]


class FakeWorld(contract.SourceWorld):
    """tests/fakes.FakeSource."""

    def __init__(self, tmp_path):
        self.conf = fakes.conf(tmp_path)
        self.source = fakes.FakeSource(self.conf)
        self._ids = ("image-%d" % n for n in itertools.count())

    def add_image(self, data):
        image_id = next(self._ids)
        self.source.images[image_id] = data
        self.source.declared[image_id] = "raw"
        return image_id

    def missing_id(self):
        return "missing"

    def tamper(self, image_id):
        data = bytearray(self.source.images[image_id])
        data[0] ^= 0xFF
        self.source.images[image_id] = bytes(data)

    def cache_conf(self):
        return self.conf

    def qemu(self, conf):
        return fakes.fake_qemu(conf)[0]


def flip(path, offset=0):
    """Change one byte of the file ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


class TestLocalSourceContract(contract.SourceContract):

    @pytest.fixture
    def source_world(self, tmp_path):
        return LocalWorld(tmp_path)


class TestFakeSourceContract(contract.SourceContract):

    @pytest.fixture
    def source_world(self, tmp_path):
        return FakeWorld(tmp_path)
