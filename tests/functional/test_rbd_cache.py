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

"""``disk delete`` and the cache commands on RBD bases, on the real Ceph:
a base with clones survives prune and invalidate; once its clones are
deleted it goes.  And ``disk delete`` for a file backend.
"""

import json
import os
import uuid

import pytest

from imagebackend.cmd import main as cli
from imagebackend.common import digest
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB


def run(capsys, dep, *argv):
    """Run the command line in this process: (exit status, JSON output);
    the error text is kept in ``run.err``.
    """
    code = cli.main(["--config-file", dep.config_file, *argv, "-f", "json"])
    captured = capsys.readouterr()
    run.err = captured.err
    return code, json.loads(captured.out) if captured.out.strip() else None


@pytest.fixture
def dep(tmp_path, ceph_cluster):
    dep = fenv.Deployment(str(tmp_path))
    dep.write_config(
        rbd=dict(ceph_cluster.rbd_conf(), pool="disks", base_pool="bases"),
        imagebackend={"images_type": "rbd"},
        image_cache={"remove_unused_original_minimum_age_seconds": 0})
    return dep


def test_base_with_clones_survives_prune_and_goes_after(
        capsys, dep, ceph_cluster):
    image_id = "img-%s" % uuid.uuid4().hex[:8]
    fenv.make_raw(os.path.join(dep.images, image_id), 8 * MiB)
    cid = digest.cache_id(image_id)
    names = ["c-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(2)]
    for name in names:
        code, _ = run(capsys, dep, "disk", "create", image_id, name,
                      "--size", "16M")
        assert code == 0
    code, rows = run(capsys, dep, "cache", "list")
    mine = [r for r in rows if r["kind"] == "rbd base"
            and r["image_id"] == image_id]
    assert len(mine) == 1
    assert mine[0]["disks"] == 2
    assert mine[0]["file"] == "bases/%s@snap" % cid
    # In use: kept, whatever its age.
    code, report = run(capsys, dep, "cache", "prune")
    assert code == 0
    kept = [r for r in report["rbd"]["kept"] if r["file"].endswith(cid)]
    assert kept and kept[0]["reason"] == "in use by 2 disks"
    assert cid in ceph_cluster.run("rbd", "ls", "bases").stdout.split()
    code, removed = run(capsys, dep, "disk", "delete", names[0])
    assert code == 0 and removed["path"] == "disks/" + names[0]
    assert removed["image_id"] == image_id
    run(capsys, dep, "cache", "prune")
    assert cid in ceph_cluster.run("rbd", "ls", "bases").stdout.split()
    run(capsys, dep, "disk", "delete", "disks/" + names[1])
    code, report = run(capsys, dep, "cache", "prune")
    assert [r["file"] for r in report["rbd"]["removed"]
            if r["file"].endswith(cid)] == ["bases/" + cid]
    assert cid not in ceph_cluster.run("rbd", "ls", "bases").stdout.split()
    # The next disk imports it again.
    code, disk = run(capsys, dep, "disk", "create", image_id,
                     "again-" + uuid.uuid4().hex[:6], "--size", "16M")
    assert code == 0 and disk["cache_hit"] is False


def test_invalidate_marks_stale_and_next_disk_imports_again(
        capsys, dep, ceph_cluster):
    image_id = "img-%s" % uuid.uuid4().hex[:8]
    fenv.make_raw(os.path.join(dep.images, image_id), 8 * MiB)
    cid = digest.cache_id(image_id)
    run(capsys, dep, "disk", "create", image_id, "v-" + cid[:8],
        "--size", "16M")
    code, result = run(capsys, dep, "cache", "invalidate", image_id)
    assert code == 0
    assert result["rbd"]["marked_stale"] == ["bases/" + cid]
    assert result["rbd"]["kept"][0]["reason"] == "in use by 1 disks"
    code, disk = run(capsys, dep, "disk", "create", image_id,
                     "w-" + cid[:8], "--size", "16M")
    assert disk["cache_hit"] is False
    assert disk["backing_chain"] == ["bases/%s-2@snap" % cid]


def test_delete_refuses_what_the_library_did_not_make(capsys, dep,
                                                      ceph_cluster):
    foreign = "foreign-%s" % uuid.uuid4().hex[:6]
    ceph_cluster.run("rbd", "create", "--size", "1M", "disks/" + foreign)
    code, _ = run(capsys, dep, "disk", "delete", foreign)
    assert code != 0
    assert "not a clone this library made" in run.err
    assert foreign in ceph_cluster.run("rbd", "ls", "disks").stdout.split()
    code, _ = run(capsys, dep, "disk", "delete", "missing-" + foreign)
    assert code != 0 and "does not exist" in run.err


def test_delete_a_file_disk(capsys, tmp_path):
    dep = fenv.Deployment(str(tmp_path))
    fenv.make_raw(os.path.join(dep.images, "img"), 8 * MiB)
    target = str(tmp_path / "vm" / "disk")
    code, disk = run(capsys, dep, "disk", "create", "img", target, "--size",
                     "16M", "--backend", "qcow2")
    assert code == 0 and os.path.exists(target)
    code, removed = run(capsys, dep, "disk", "delete", target, "--backend",
                        "qcow2")
    assert code == 0 and removed == {"path": target, "image_id": "img",
                                     "backend": "qcow2"}
    assert not os.path.exists(target)
    # Its registry record is gone with it: prune may now remove the base.
    stranger = tmp_path / "vm" / "other"
    stranger.write_bytes(b"mine")
    code, _ = run(capsys, dep, "disk", "delete", str(stranger))
    assert code != 0 and "not removed" in run.err
    assert stranger.read_bytes() == b"mine"


def test_verify_reads_bases_back(capsys, dep, ceph_cluster):
    image_id = "img-%s" % uuid.uuid4().hex[:8]
    # Data at the start, in the middle and in a last, partial chunk.
    fenv.write_pattern_raw(os.path.join(dep.images, image_id),
                           10 * MiB + 4096)
    cid = digest.cache_id(image_id)
    run(capsys, dep, "disk", "create", image_id, "v-" + cid[:8],
        "--size", "16M")
    code, rows = run(capsys, dep, "cache", "verify", image_id)
    mine = [r for r in rows if r["kind"] == "rbd base"]
    assert code == 0
    assert [(r["status"], r["file"]) for r in mine] == [
        ("ok", "bases/%s@snap" % cid)]
    # A record that does not match what the cluster holds.
    ceph_cluster.run("rbd", "image-meta", "set", "bases/" + cid,
                     "imagebackend.content_sha256", "0" * 64)
    code, rows = run(capsys, dep, "cache", "verify", image_id, "--repair")
    mine = [r for r in rows if r["kind"] == "rbd base"]
    assert code == 1
    assert mine[0]["status"] == "corrupt"
    assert mine[0]["action"] == "marked stale"
