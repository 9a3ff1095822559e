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

"""The typed results of create_image, and the backends' raw copy."""

import json
import os

from imagebackend.backends import base

MiB = 1024 * 1024


def _disk(**kw):
    fields = dict(path="/srv/vm/disk", format="qcow2",
                  virtual_size=10 * MiB, image_id="img", backend="qcow2",
                  backing_chain=["/srv/_base/abc"], cache_hit=True,
                  timings={"fetch": 0.5})
    fields.update(kw)
    return base.Disk(**fields)


def test_libvirt_disk_holds_the_disk_elements_values():
    info = _disk().libvirt_disk()
    assert isinstance(info, base.LibvirtDisk)
    assert (info.source_type, info.source_path, info.driver_name,
            info.driver_type) == ("file", "/srv/vm/disk", "qemu", "qcow2")
    assert info.backing_chain == ("/srv/_base/abc",)
    assert info.to_dict() == {
        "source_type": "file", "source_path": "/srv/vm/disk",
        "driver_name": "qemu", "driver_type": "qcow2",
        "backing_chain": ["/srv/_base/abc"]}
    raw = _disk(format="raw", backend="raw", backing_chain=[])
    assert raw.libvirt_disk().driver_type == "raw"
    assert raw.libvirt_disk().backing_chain == ()


def test_a_disk_is_json_ready_with_its_nearest_backing_file():
    data = json.loads(json.dumps(_disk().to_dict()))
    assert data["backing_file"] == "/srv/_base/abc"
    assert data["virtual_size"] == 10 * MiB and data["cache_hit"] is True
    assert _disk(backing_chain=[]).to_dict()["backing_file"] is None


def test_copy_sparse_grown_copies_the_data_and_grows_the_file(tmp_path):
    src = tmp_path / "base"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(4 * MiB)
        f.write(b"tail")
    dst = tmp_path / "disk"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        base.copy_sparse_grown(str(src), fd, 16 * MiB)
    finally:
        os.close(fd)
    assert os.path.getsize(dst) == 16 * MiB
    with open(dst, "rb") as f:
        data = f.read()
    assert data[:4] == b"head" and data[4 * MiB:4 * MiB + 4] == b"tail"
    assert data[4 * MiB + 4:].count(0) == 12 * MiB - 4
    # The hole in the middle stays a hole.
    assert os.stat(dst).st_blocks * 512 < 4 * MiB
