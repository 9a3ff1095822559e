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

"""The local directory source: it keeps the source contract, and refuses
ids that escape its directory.
"""

import itertools
import os

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend import sources
from tests.contract import source as source_contract
from tests.functional.fixtures import env as fenv


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path))
    fenv.make_raw(os.path.join(d.images, "ok.raw"))
    with open(os.path.join(d.root, "secret"), "wb") as f:
        f.write(b"host secret canary\n" * 100)
    return d


@pytest.mark.parametrize("image_id", [
    "../secret", "..", ".", "/etc/passwd", "sub/ok.raw", "", "a\0b",
])
def test_ids_outside_the_directory_are_refused(dep, image_id):
    backend = backends_base.load(dep.conf(), "qcow2")
    target = os.path.join(dep.instances, "vm", "disk")
    with pytest.raises(exception.InvalidImageId):
        backend.create_image(image_id, target, fenv.GiB)
    assert dep.base_listing() == []
    assert not os.path.exists(target)


def test_symlink_out_of_the_directory_is_refused(dep):
    os.symlink(os.path.join(dep.root, "secret"),
               os.path.join(dep.images, "link.raw"))
    backend = backends_base.load(dep.conf(), "raw")
    target = os.path.join(dep.instances, "vm", "disk")
    with pytest.raises(exception.InvalidImageId) as err:
        backend.create_image("link.raw", target, fenv.GiB)
    assert "symlink" in str(err.value)
    assert dep.base_listing() == []
    assert not os.path.exists(target)


def test_directory_and_fifo_are_refused(dep):
    os.mkdir(os.path.join(dep.images, "adir"))
    os.mkfifo(os.path.join(dep.images, "afifo"))
    backend = backends_base.load(dep.conf(), "raw")
    for image_id in ("adir", "afifo"):
        with pytest.raises(exception.InvalidImageId):
            backend.create_image(image_id,
                                 os.path.join(dep.instances, image_id),
                                 fenv.GiB)
    assert dep.base_listing() == []


# -- the source contract (tests/contract/source.py) ---------------------------

class LocalWorld(source_contract.SourceWorld):
    """The local source as a deployment configures it (entry point, config
    file), the real qemu-img.
    """

    def __init__(self, root):
        self.dep = fenv.Deployment(root)
        self.source = sources.load(self.dep.conf())
        self._names = ("image%d.raw" % n for n in itertools.count())

    def add_image(self, data):
        image_id = next(self._names)
        with open(os.path.join(self.dep.images, image_id), "wb") as f:
            f.write(data)
        return image_id

    def missing_id(self):
        return "missing.raw"

    def tamper(self, image_id):
        path = os.path.join(self.dep.images, image_id)
        with open(path, "r+b") as f:
            byte = f.read(1)
            f.seek(0)
            f.write(bytes([byte[0] ^ 0xFF]))

    def cache_conf(self):
        return self.dep.conf()

    def qemu(self, conf):
        return qemu_img.QemuImg(conf)


class TestLocalSourceContract(source_contract.SourceContract):

    @pytest.fixture
    def source_world(self, tmp_path):
        return LocalWorld(str(tmp_path))
