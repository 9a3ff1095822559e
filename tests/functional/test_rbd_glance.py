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

"""Glance keeping its images in the same Ceph (its rbd store on the test
cluster): a raw image's disk is a clone of Glance's own snapshot, with no
download and no import.  The run's Glance is switched to its rbd store for
this module and switched back afterwards.
"""

import configparser
import os
import subprocess
import uuid

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.common import digest
from imagebackend import sources
from tests.functional.fixtures import env as fenv
from tests.functional.fixtures import server_procs

MiB = fenv.MiB
SIZE = 64 * MiB


def _write_rbd_store(path, original, cluster):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(original)
    parser["DEFAULT"]["enabled_backends"] = "fs:file,ceph:rbd"
    parser["DEFAULT"]["show_image_direct_url"] = "true"
    parser["glance_store"]["default_backend"] = "ceph"
    parser["ceph"] = {"rbd_store_pool": "images", "rbd_store_user": "admin",
                      "rbd_store_ceph_conf": cluster.conf_path,
                      "rbd_store_chunk_size": "4"}
    with open(path, "w") as f:
        parser.write(f)


def _glance_backend(tmp_path, srv, cluster):
    """A host whose rbd backend reads images from ``srv``'s Glance."""
    dep = fenv.Deployment(str(tmp_path), glance=dict(
        srv.demo.auth_options(), num_retries=1))
    dep.write_config(rbd=dict(cluster.rbd_conf(), pool="disks",
                              base_pool="bases"))
    conf = dep.conf()
    return dep, backends_base.load(conf, "rbd",
                                   source=sources.load(conf, "glance"))


@pytest.fixture(scope="module")
def glance_on_ceph(openstack_servers, ceph_cluster):
    srv = openstack_servers
    if srv.attached:
        pytest.skip("Glance is run by another process; it cannot be "
                    "switched to its rbd store here")
    # Glance's rbd store needs the Ceph bindings in the servers' venv.
    subprocess.run([str(server_procs.REPO_ROOT / "tools" / "ceph-bindings.sh"),
                    str(srv.venv / "bin" / "python")], check=True)
    conf_path = srv.glance_dir / "glance-api.conf"
    original = conf_path.read_text()
    srv.stop_glance()
    try:
        _write_rbd_store(conf_path, original, ceph_cluster)
        srv.start_glance()
        yield srv
    finally:
        srv.stop_glance()
        conf_path.write_text(original)
        srv.start_glance()


@pytest.fixture(scope="module")
def raw_image(glance_on_ceph, ceph_cluster, tmp_path_factory):
    path = fenv.make_raw(str(tmp_path_factory.mktemp("g") / "guest.raw"),
                         size=32 * MiB)
    image_id = glance_on_ceph.upload_image(path, "raw")
    # Glance stored it in the cluster, as an image named after its id.
    assert image_id in ceph_cluster.run("rbd", "ls", "images").stdout.split()
    return image_id, path


def test_disk_is_a_clone_of_glances_snapshot(glance_on_ceph, ceph_cluster,
                                             raw_image, tmp_path):
    image_id, path = raw_image
    dep, backend = _glance_backend(tmp_path, glance_on_ceph, ceph_cluster)
    name = "g-%s" % uuid.uuid4().hex[:8]
    disk = backend.create_image(image_id, name, SIZE)
    assert disk.backing_chain == ["images/%s@snap" % image_id]
    assert disk.cache_hit is True
    assert "fetch" not in disk.timings
    # Nothing downloaded, nothing imported.
    assert dep.base_listing() == []
    assert digest.cache_id(image_id) not in ceph_cluster.run(
        "rbd", "ls", "bases").stdout
    exported = str(tmp_path / "out.raw")
    ceph_cluster.run("rbd", "export", "disks/" + name, exported)
    assert os.path.getsize(exported) == SIZE
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", path,
                    exported], check=True)
    # A disk of the library: delete removes it, Glance's image stays.
    assert backend.delete_disk(name)["image_id"] == image_id
    assert name not in ceph_cluster.run("rbd", "ls", "disks").stdout
    assert image_id in ceph_cluster.run("rbd", "ls", "images").stdout


def test_other_cluster_is_not_cloned_from(glance_on_ceph, ceph_cluster,
                                          raw_image, tmp_path, monkeypatch):
    """Glance on another cluster (its fsid differs): the image is
    downloaded and imported as a base of this cluster.
    """
    from imagebackend.backends import rbd_cluster
    image_id, path = raw_image
    monkeypatch.setattr(rbd_cluster.Connection, "fsid",
                        lambda self: "00000000-0000-0000-0000-000000000000")
    dep, backend = _glance_backend(tmp_path, glance_on_ceph, ceph_cluster)
    disk = backend.create_image(image_id, "o-%s" % uuid.uuid4().hex[:8],
                                SIZE)
    cid = digest.cache_id(image_id)
    assert disk.backing_chain == ["bases/%s@snap" % cid]
    assert disk.cache_hit is False
