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

"""``delete_disk`` of the file backends: only a disk the library made
(a registry record tied to that file) is removed, with its record.
"""

import os

import pytest

from imagebackend.backends import base
from imagebackend import exception
from tests import fakes

MiB = 1024 * 1024


@pytest.fixture(params=["qcow2", "raw", "cached-base"])
def backend(request, tmp_path):
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={"img": b"data" + bytes(MiB)})
    qemu, _ = fakes.fake_qemu(conf)
    return base.load(conf, request.param, source=source, qemu=qemu)


def test_delete_removes_the_disk_and_its_record(backend, tmp_path):
    target = str(tmp_path / "vm" / "disk")
    backend.create_image("img", target, 4 * MiB)
    assert backend.cache.disk_record(target) is not None
    assert backend.delete_disk(target) == {
        "path": target, "image_id": "img", "backend": backend.name}
    assert not os.path.exists(target)
    assert backend.cache.disk_record(target) is None
    assert list(backend.cache.scanner.registry.records()) == []


def test_a_file_the_library_did_not_make_is_kept(backend, tmp_path):
    stranger = tmp_path / "vm" / "other"
    stranger.parent.mkdir()
    stranger.write_bytes(b"not ours")
    with pytest.raises(exception.DiskOperationError) as caught:
        backend.delete_disk(str(stranger))
    assert "not removed" in str(caught.value)
    assert stranger.read_bytes() == b"not ours"


def test_a_replaced_file_is_not_the_library_disk(backend, tmp_path):
    target = tmp_path / "vm" / "disk"
    backend.create_image("img", str(target), 4 * MiB)
    # Something else put another file under that name.
    os.unlink(target)
    target.write_bytes(b"someone else's")
    with pytest.raises(exception.DiskOperationError):
        backend.delete_disk(str(target))
    assert target.read_bytes() == b"someone else's"


def test_a_missing_disk_is_not_found(backend, tmp_path):
    with pytest.raises(exception.DiskNotFound):
        backend.delete_disk(str(tmp_path / "nothing"))
