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

"""The backend contract (tests/contract/backend.py), fast: the fake source
and a fake qemu-img at the runner boundary, on real files.
"""

import hashlib
import os

import pytest

from tests.contract import backend as contract
from tests import fakes

MiB = fakes.MiB
VSIZE = 4 * MiB


def _pattern(seed: bytes, length: int) -> bytes:
    return (seed * (length // len(seed) + 1))[:length]


#: a qcow2 image (as the fake qemu-img models it) and a raw image with a
#: hole, both of VSIZE guest bytes.
QCOW2 = fakes.fake_qcow2(VSIZE, _pattern(b"qcow2 guest data ", 300 * 1024))
RAW = (_pattern(b"raw guest data ", MiB) + bytes(2 * MiB)
       + _pattern(b"raw tail ", MiB))


class FakeWorld(contract.BackendWorld):
    """The fake source and qemu-img, the cache in ``tmp_path``."""

    image_vsize = VSIZE
    disk_size = 16 * MiB
    other_size = 32 * MiB

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.instances = str(tmp_path / "instances")
        self.base_dir = os.path.join(self.instances, "_base")
        self.images = {self.qcow2_image: QCOW2, self.raw_image: RAW}
        self.source = fakes.FakeSource(fakes.conf(tmp_path),
                                       images=self.images)
        self.runner = fakes.FakeQemuRunner()

    def conf(self, **overrides):
        return fakes.conf(self.tmp_path, **overrides)

    def backend_kwargs(self, conf):
        qemu, _runner = fakes.fake_qemu(conf, self.runner)
        return {"source": self.source, "qemu": qemu}

    def downloads(self):
        return self.source.opened

    def qemu_calls(self):
        return list(self.runner.calls)

    def reset_qemu_log(self):
        self.runner.calls.clear()

    def _image_guest(self, image_id):
        data = self.images[image_id]
        if data[:4] == b"QFI\xfb":
            path = str(self.tmp_path / "image.qcow2")
            with open(path, "wb") as f:
                f.write(data)
            return self.runner.guest_bytes(path, "qcow2")
        return data

    def same_content(self, image_id, path, fmt):
        image = self._image_guest(image_id)
        disk = self.runner.guest_bytes(path, fmt)
        return (disk[:len(image)] == image
                and disk[len(image):].count(0) == len(disk) - len(image))

    def disk_info(self, path, fmt):
        info = self.runner.info(path, fmt)
        return {"format": info["format"],
                "virtual_size": info["virtual-size"],
                "backing_file": info.get("backing-filename"),
                "backing_format": info.get("backing-filename-format")}

    def image_bytes(self, image_id):
        return self.images[image_id]

    def image_checksum(self, image_id):
        return {"algo": "sha512",
                "value": hashlib.sha512(self.images[image_id]).hexdigest()}

    def create_concurrently(self, backend_name, image_id, targets, size):
        def make():
            conf = self.conf()
            return contract.load_backend(conf, backend_name,
                                         **self.backend_kwargs(conf))
        # Slow enough that every request arrives during the download.
        self.source.delay = 0.01
        return contract.create_in_threads(make, image_id, targets, size)


@pytest.fixture
def backend_world(tmp_path):
    return FakeWorld(tmp_path)


class TestQcow2Contract(contract.Qcow2Hooks, contract.BackendContract):
    pass


class TestCachedBaseContract(contract.CachedBaseHooks,
                             contract.BackendContract):
    pass


class TestRawContract(contract.RawHooks, contract.BackendContract):
    pass
