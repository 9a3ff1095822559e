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

"""The rbd backend on a real one-node Ceph (fixtures/ceph.py): bases
imported once per cluster, disks as clones whose bytes equal the image,
several processes and "hosts" at once, and a cluster that stops
mid-create.
"""

import os
import subprocess
import uuid

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.common import digest
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
SIZE = 64 * MiB


def _deployment(root, cluster, name="host-a"):
    """A compute host: its own instances directory, ``_base`` and lock
    directory, on the shared cluster.
    """
    dep = fenv.Deployment(os.path.join(str(root), name))
    dep.write_config(rbd=dict(cluster.rbd_conf(), pool="disks",
                              base_pool="bases"))
    return dep


@pytest.fixture
def images(tmp_path):
    """A qcow2 image and a raw image (with holes and data) in one local
    source directory shared by every host of a test.
    """
    shared = tmp_path / "images"
    shared.mkdir()
    ids = {"qcow2": "img-q-%s" % uuid.uuid4().hex[:8],
           "raw": "img-r-%s" % uuid.uuid4().hex[:8]}
    fenv.make_qcow2(str(shared / ids["qcow2"]), 32 * MiB, seed=5)
    fenv.make_raw(str(shared / ids["raw"]), 32 * MiB, seed=6)
    return shared, ids


def _host(tmp_path, cluster, images_dir, name="host-a"):
    dep = _deployment(tmp_path, cluster, name)
    dep.write_config(local_source={"path": str(images_dir)})
    return dep


def rbd_export(cluster, spec, path):
    cluster.run("rbd", "export", spec, str(path), timeout=120)
    return str(path)


def test_clone_bytes_equal_the_image(ceph_cluster, tmp_path, images):
    images_dir, ids = images
    dep = _host(tmp_path, ceph_cluster, images_dir)
    backend = backends_base.load(dep.conf(), "rbd")
    name = "vm-%s" % uuid.uuid4().hex[:8]
    disk = backend.create_image(ids["qcow2"], name, SIZE)
    cid = digest.cache_id(ids["qcow2"])
    assert disk.path == "disks/%s" % name
    assert disk.format == "raw"
    assert disk.backing_chain == ["bases/%s@snap" % cid]
    assert not disk.cache_hit
    libvirt = disk.libvirt_disk()
    assert libvirt.source_type == "network"
    assert libvirt.protocol == "rbd"
    assert libvirt.hosts == tuple(ceph_cluster.monitors)
    assert libvirt.auth_username == "admin"
    exported = rbd_export(ceph_cluster, disk.path, tmp_path / "out.raw")
    assert os.path.getsize(exported) == SIZE
    # The clone is the image, grown with zeros to the disk's size.
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                    str(images_dir / ids["qcow2"]), exported], check=True)
    info = ceph_cluster.run("rbd", "info", disk.path).stdout
    assert "parent: bases/%s@snap" % cid in info
