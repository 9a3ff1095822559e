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

import json
import multiprocessing
import os
import subprocess
import sys
import uuid

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.common import digest
from imagebackend import exception
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


def _base_images(cluster):
    return sorted(cluster.run("rbd", "ls", "bases").stdout.split())


def test_eight_concurrent_creates_import_once(ceph_cluster, tmp_path,
                                              images):
    images_dir, ids = images
    dep = _host(tmp_path, ceph_cluster, images_dir)
    names = ["par-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(8)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "imagebackend.cmd.main",
         "--config-file", dep.config_file, "disk", "create", ids["raw"],
         name, "--size", str(SIZE), "--backend", "rbd", "-f", "json"],
        env=dep.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for name in names]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["cache_hit"] for r in results) == [False] + [True] * 7
    cid = digest.cache_id(ids["raw"])
    assert {tuple(r["backing_chain"]) for r in results} == {
        ("bases/%s@snap" % cid,)}
    # One base, no temporary image left; the image was read once.
    assert [n for n in _base_images(ceph_cluster) if n.startswith(cid)] \
        == [cid]
    assert len([c for c in dep.qemu_calls() if c.startswith("info")]) <= 1
    disks = ceph_cluster.run("rbd", "ls", "disks").stdout.split()
    assert set(names) <= set(disks)
    assert not [d for d in disks if ".tmp-" in d]
    children = ceph_cluster.run("rbd", "children",
                                "bases/%s@snap" % cid).stdout.split()
    assert sorted(children) == sorted("disks/%s" % n for n in names)


def test_resize_and_refusals(ceph_cluster, tmp_path, images):
    images_dir, ids = images
    dep = _host(tmp_path, ceph_cluster, images_dir)
    backend = backends_base.load(dep.conf(), "rbd")
    name = "big-%s" % uuid.uuid4().hex[:8]
    disk = backend.create_image(ids["raw"], name, 3 * SIZE)
    info = json.loads(ceph_cluster.run("rbd", "info", "--format", "json",
                                       disk.path).stdout)
    assert info["size"] == 3 * SIZE
    # The same name again: refused, the first disk untouched.
    with pytest.raises(exception.TargetExists):
        backend.create_image(ids["raw"], name, SIZE)
    info = json.loads(ceph_cluster.run("rbd", "info", "--format", "json",
                                       disk.path).stdout)
    assert info["size"] == 3 * SIZE
    # Smaller than the image: refused, nothing made.
    small = "small-%s" % uuid.uuid4().hex[:8]
    with pytest.raises(exception.DiskSmallerThanImage):
        backend.create_image(ids["raw"], small, MiB)
    assert small not in ceph_cluster.run("rbd", "ls", "disks").stdout
    for bad in ("", "a/b/c", "x@snap", ".hidden", "other/" + small):
        with pytest.raises(exception.InvalidTarget):
            backend.create_image(ids["raw"], bad, SIZE)


def _create_on_host(config_file, image_id, name, size, queue):
    from imagebackend.backends import base as child_base
    from imagebackend import opts as child_opts
    conf = child_opts.new_conf(["--config-file", config_file])
    disk = child_base.load(conf, "rbd").create_image(image_id, name, size)
    queue.put(disk.to_dict())


def test_second_host_imports_nothing(ceph_cluster, tmp_path, images):
    images_dir, ids = images
    first = _host(tmp_path, ceph_cluster, images_dir, "host-a")
    second = _host(tmp_path, ceph_cluster, images_dir, "host-b")
    backends_base.load(first.conf(), "rbd").create_image(
        ids["qcow2"], "a-%s" % uuid.uuid4().hex[:8], SIZE)
    assert first.base_listing()     # the first host fetched it
    first.reset_qemu_log()
    # Another process with its own _base and lock directory.
    queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(
        target=_create_on_host,
        args=(second.config_file, ids["qcow2"],
              "b-%s" % uuid.uuid4().hex[:8], SIZE, queue))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(30)
    assert proc.exitcode == 0
    assert result["cache_hit"] is True
    assert "fetch" not in result["timings"]
    assert second.base_listing() == []
    assert second.qemu_calls() == []
