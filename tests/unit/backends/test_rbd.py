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

"""The rbd backend's logic on an in-memory Ceph (fake_ceph): what is
imported, cloned, named and refused.  The real cluster is in
tests/functional/test_rbd*.py.
"""

import builtins
import dataclasses
import datetime
import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

from imagebackend.backends import base
from imagebackend.backends import rbd as rbd_backend
from imagebackend.backends import rbd_cluster
from imagebackend.backends import rbd_import
from imagebackend.common import digest
from imagebackend import exception
from tests import fakes
from tests.unit.backends import fake_ceph

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

MiB = 1024 * 1024
CHUNK = rbd_import.CHUNK
BLOCK = rbd_import.BLOCK
# Data, a zero chunk, data: the zero chunk is never written.
RAW = b"A" * CHUNK + bytes(CHUNK) + b"B" * 1000
CID = digest.cache_id("img")


@pytest.fixture
def cluster():
    return fake_ceph.Cluster(pools=("disks", "bases"))


def make(tmp_path, cluster, images=None, **rbd_opts):
    conf = fakes.conf(tmp_path)
    conf.set_override("pool", "disks", group="rbd")
    conf.set_override("base_pool", "bases", group="rbd")
    conf.set_override("user", "nova", group="rbd")
    conf.set_override("secret_uuid", "0b5c1d6c-0000-4000-8000-000000000001",
                      group="rbd")
    for key, value in rbd_opts.items():
        conf.set_override(key, value, group="rbd")
    source = fakes.FakeSource(conf, images=images or {"img": RAW})
    return base.load(conf, "rbd", source=source, qemu=fakes.qemu(),
                     modules=cluster.modules()), source


def test_first_create_imports_base_then_clones(tmp_path, cluster):
    backend, source = make(tmp_path, cluster)
    disk = backend.create_image("img", "vm1", 16 * MiB)
    bases = cluster.pools["bases"]
    assert list(bases) == [CID]
    image = bases[CID]
    # Sparse: the zero chunk between the two data chunks is not written.
    assert sorted(image.writes) == [0, 2 * CHUNK]
    assert image.writes[0] == b"A" * CHUNK
    assert image.writes[2 * CHUNK] == b"B" * 1000
    assert image.size == len(RAW)
    assert image.snaps == {"snap": True}
    assert image.meta["imagebackend.image_id"] == "img"
    assert image.meta["imagebackend.virtual_size"] == str(len(RAW))
    assert image.meta["imagebackend.identity"]
    clone = cluster.pools["disks"]["vm1"]
    assert clone.parent == ("bases", CID, "snap")
    assert clone.size == 16 * MiB
    assert disk.path == "disks/vm1"
    assert disk.format == "raw"
    assert disk.backing_chain == ["bases/%s@snap" % CID]
    assert disk.cache_hit is False
    # Snapshot before rename: the final name never lacks its snapshot.
    calls = cluster.calls
    assert calls.index("protect_snap") < calls.index("rename")
    assert cluster.locks == {}
    assert source.opened == 1


def test_warm_create_downloads_nothing(tmp_path, cluster):
    backend, source = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    # Another host: its own cache directory, the same cluster.
    other, other_source = make(tmp_path / "other", cluster)
    cluster.calls.clear()
    disk = other.create_image("img", "vm2", 16 * MiB)
    assert disk.cache_hit is True
    assert other_source.opened == 0
    assert "create" not in cluster.calls and "write" not in cluster.calls
    assert "lock_exclusive" not in cluster.calls
    assert "fetch" not in disk.timings
    assert sorted(cluster.pools["disks"]) == ["vm1", "vm2"]


def test_libvirt_disk_is_a_network_disk(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    disk = backend.create_image("img", "vm1", 16 * MiB)
    info = disk.libvirt_disk()
    assert info.source_type == "network"
    assert info.protocol == "rbd"
    assert info.source_path == "disks/vm1"
    assert info.hosts == ("192.0.2.1:6789", "192.0.2.2:6789")
    assert info.auth_username == "nova"
    assert info.secret_type == "ceph"
    assert info.secret_uuid == "0b5c1d6c-0000-4000-8000-000000000001"
    assert info.to_dict()["hosts"] == ["192.0.2.1:6789", "192.0.2.2:6789"]
    assert disk.to_dict()["monitors"] == ["192.0.2.1:6789", "192.0.2.2:6789"]


def test_existing_name_is_never_replaced(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    with pytest.raises(exception.TargetExists):
        backend.create_image("img", "vm1", 32 * MiB)
    assert cluster.pools["disks"]["vm1"].size == 16 * MiB


def test_name_taken_between_check_and_rename(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    # Someone makes "vm2" after this call checked the name.
    original_rename = fake_ceph._RBD.rename

    def racing_rename(self, ioctx, src, dest):
        if ioctx.pool == "disks" and dest == "vm2":
            cluster.pools["disks"]["vm2"] = fake_ceph.Image(1)
        return original_rename(self, ioctx, src, dest)
    fake_ceph._RBD.rename = racing_rename
    try:
        with pytest.raises(exception.TargetExists):
            backend.create_image("img", "vm2", 16 * MiB)
    finally:
        fake_ceph._RBD.rename = original_rename
    # The other's image is kept; this call's temporary clone is gone.
    assert cluster.pools["disks"]["vm2"].size == 1
    assert sorted(cluster.pools["disks"]) == ["vm1", "vm2"]


def test_failed_resize_removes_the_temporary_clone(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    cluster.fail["resize"] = cluster.rbd_errors["Error"]("no space", 28)
    with pytest.raises(exception.RbdError) as caught:
        backend.create_image("img", "vm2", 32 * MiB)
    assert "resizing disks/vm2.tmp-" in str(caught.value)
    assert not isinstance(caught.value, exception.RbdUnavailable)
    assert sorted(cluster.pools["disks"]) == ["vm1"]


def test_timeout_is_unavailable_and_reconnects(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    cluster.fail["clone"] = cluster.rbd_errors["TimedOut"]("timed out")
    with pytest.raises(exception.RbdUnavailable) as caught:
        backend.create_image("img", "vm2", 16 * MiB)
    assert "connect_timeout" in str(caught.value)
    assert cluster.connected == 0       # the broken connection was closed
    backend.create_image("img", "vm2", 16 * MiB)
    assert cluster.connected == 1
    assert sorted(cluster.pools["disks"]) == ["vm1", "vm2"]


def test_failed_import_leaves_no_base_and_releases_the_lock(tmp_path,
                                                            cluster):
    backend, _ = make(tmp_path, cluster)
    cluster.fail["protect_snap"] = cluster.rbd_errors["Error"]("nope", 1)
    with pytest.raises(exception.RbdError):
        backend.create_image("img", "vm1", 16 * MiB)
    assert cluster.pools["bases"] == {}
    assert cluster.pools["disks"] == {}
    assert cluster.locks == {}
    # The next request imports it.
    backend.create_image("img", "vm1", 16 * MiB)
    assert list(cluster.pools["bases"]) == [CID]


def test_lock_held_elsewhere_times_out(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.conf.set_override("lock_wait_timeout", 1, group="imagebackend")
    cluster.locks[("bases", "imagebackend_lock.%s" % CID)] = "other host"
    with pytest.raises(exception.LockWaitTimeout) as caught:
        backend.create_image("img", "vm1", 16 * MiB)
    assert "bases/imagebackend_lock.%s" % CID in str(caught.value)
    assert cluster.pools["bases"] == {} and cluster.pools["disks"] == {}


def test_base_published_by_another_host_meanwhile(tmp_path, cluster):
    """This host's lock expired and another host published the base
    first: this import yields to it (same content) and removes its own.
    """
    backend, _ = make(tmp_path, cluster)
    other, _ = make(tmp_path / "other", cluster)
    original_rename = fake_ceph._RBD.rename
    done = []

    def rename_after_other(self, ioctx, src, dest):
        if ioctx.pool == "bases" and not done:
            done.append(True)
            other_lock = dict(cluster.locks)
            cluster.locks.clear()
            other.create_image("img", "other-vm", 16 * MiB)
            cluster.locks.update(other_lock)
        return original_rename(self, ioctx, src, dest)
    fake_ceph._RBD.rename = rename_after_other
    try:
        disk = backend.create_image("img", "vm1", 16 * MiB)
    finally:
        fake_ceph._RBD.rename = original_rename
    assert list(cluster.pools["bases"]) == [CID]
    assert disk.backing_chain == ["bases/%s@snap" % CID]
    assert sorted(cluster.pools["disks"]) == ["other-vm", "vm1"]


def test_changed_image_is_a_new_generation(tmp_path, cluster):
    backend, source = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    source.images["img"] = b"C" * 5000
    disk = backend.create_image("img", "vm2", 16 * MiB)
    assert sorted(cluster.pools["bases"]) == [CID, CID + "-2"]
    assert disk.backing_chain == ["bases/%s-2@snap" % CID]
    assert cluster.pools["bases"][CID + "-2"].writes == {0: b"C" * 5000}
    assert cluster.pools["bases"][CID + "-2"].meta[
        "imagebackend.identity"] == hashlib.sha512(b"C" * 5000).hexdigest()


def test_foreign_image_under_the_base_name_is_never_used(tmp_path, cluster):
    cluster.pools["bases"][CID] = fake_ceph.Image(1)    # no snapshot
    backend, _ = make(tmp_path, cluster)
    disk = backend.create_image("img", "vm1", 16 * MiB)
    assert disk.backing_chain == ["bases/%s-2@snap" % CID]
    assert cluster.pools["bases"][CID].writes == {}


def test_image_larger_than_disk_is_refused(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    with pytest.raises(exception.DiskSmallerThanImage):
        backend.create_image("img", "vm1", MiB)
    assert cluster.pools["disks"] == {}


@pytest.mark.parametrize("target", [
    "", "a/b/c", "x@snap", ".hidden", "other/vm", "has space", "bad\nname",
    "vm.tmp-0123", "x" * 201, b"bytes"])
def test_bad_names_are_refused_before_anything(tmp_path, cluster, target):
    backend, source = make(tmp_path, cluster)
    with pytest.raises(exception.InvalidTarget):
        backend.create_image("img", target, 16 * MiB)
    assert source.opened == 0 and cluster.pools["bases"] == {}


def test_pool_prefix_of_the_disk_pool_is_accepted(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    assert backend.create_image("img", "disks/vm1", 16 * MiB).path \
        == "disks/vm1"


def test_base_pool_defaults_to_the_disk_pool(tmp_path):
    cluster = fake_ceph.Cluster(pools=("rbd",))
    backend, _ = make(tmp_path, cluster, pool="rbd", base_pool=None)
    disk = backend.create_image("img", "vm1", 16 * MiB)
    assert sorted(cluster.pools["rbd"]) == sorted([CID, "vm1"])
    assert disk.backing_chain == ["rbd/%s@snap" % CID]


def test_missing_bindings_name_the_packages(monkeypatch):
    real_import = builtins.__import__

    def no_ceph(name, *args, **kwargs):
        if name in ("rados", "rbd"):
            raise ImportError("No module named %r" % name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ceph)
    with pytest.raises(exception.RbdBindingsMissing) as caught:
        rbd_cluster.bindings()
    assert "python3-rados" in str(caught.value)
    assert "python3-rbd" in str(caught.value)
    assert isinstance(caught.value, exception.ConfigurationError)


def test_options_are_listed_for_the_sample_config():
    from imagebackend import opts
    groups = dict(opts.list_opts())
    assert sorted(o.name for o in groups["rbd"]) == sorted(
        ["pool", "base_pool", "ceph_conf", "user", "secret_uuid",
         "connect_timeout"])
    assert rbd_backend.RbdBackend.name == "rbd"


class _Recorder:
    def __init__(self):
        self.writes = {}

    def aio_write(self, data, offset, oncomplete):
        self.writes[offset] = bytes(data)
        return fake_ceph._Completion(len(data))


def test_written_zero_chunks_are_skipped(tmp_path):
    path = tmp_path / "raw"
    # Zeros written out (allocated, not a hole), between data.
    path.write_bytes(b"x" * 10 + bytes(2 * CHUNK - 10) + b"y" * 7)
    image = _Recorder()
    rbd_import.write_sparse(image, str(path), lambda: None)
    assert sorted(image.writes) == [0, 2 * CHUNK]
    assert image.writes[0] == b"x" * 10 + bytes(BLOCK - 10)
    assert image.writes[2 * CHUNK] == b"y" * 7


def test_only_blocks_with_data_are_written(tmp_path):
    path = tmp_path / "raw"
    data = bytearray(CHUNK)
    data[0:3] = b"abc"                          # block 0
    data[BLOCK:BLOCK + 2] = b"de"               # block 1: one run 0-1
    data[5 * BLOCK + 9] = 1                     # block 5 alone
    data[-1] = 2                                # the last block
    path.write_bytes(bytes(data))
    image = _Recorder()
    digest = rbd_import.write_sparse(image, str(path), lambda: None)
    assert {o: len(d) for o, d in image.writes.items()} == {
        0: 2 * BLOCK, 5 * BLOCK: BLOCK, CHUNK - BLOCK: BLOCK}
    # What was written is the file, and the digest is of the whole chunk.
    rebuilt = bytearray(CHUNK)
    for offset, chunk in image.writes.items():
        rebuilt[offset:offset + len(chunk)] = chunk
    assert rebuilt == data
    expected = hashlib.sha256()
    for offset in (0, BLOCK, 5 * BLOCK, CHUNK - BLOCK):
        rbd_import.add_block(expected, offset,
                             bytes(data[offset:offset + BLOCK]))
    assert digest == expected.hexdigest()


def test_holes_are_not_read(tmp_path):
    path = tmp_path / "raw"
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(64 * CHUNK)
        f.seek(64 * CHUNK - 3)
        f.write(b"end")
    image = _Recorder()
    renewed = []
    rbd_import.write_sparse(image, str(path), lambda: renewed.append(1))
    assert image.writes[0].startswith(b"head")
    assert image.writes[max(image.writes)].endswith(b"end")
    # Only the data extents' chunks were read (a hole is not scanned).
    assert len(renewed) <= 4


# -- Glance on the same cluster --------------------------------------------

def _glance_meta(source, url, disk_format="raw"):
    real = source.get_meta

    def get_meta(image_id):
        meta = real(image_id)
        return dataclasses.replace(meta, disk_format=disk_format,
                                   extra=dict(meta.extra, direct_url=url))
    source.get_meta = get_meta


def _glance_image(cluster, protected=True):
    cluster.pools["images"] = {"gid": fake_ceph.Image(len(RAW))}
    cluster.pools["images"]["gid"].snaps["snap"] = protected


def test_glance_snapshot_on_this_cluster_is_cloned(tmp_path):
    cluster = fake_ceph.Cluster(pools=("disks", "bases"))
    _glance_image(cluster)
    backend, source = make(tmp_path, cluster)
    _glance_meta(source, "rbd://fsid-1/images/gid/snap")
    disk = backend.create_image("img", "vm1", 16 * MiB)
    assert disk.backing_chain == ["images/gid@snap"]
    assert disk.cache_hit is True
    assert source.opened == 0
    assert cluster.pools["bases"] == {}
    assert cluster.pools["disks"]["vm1"].parent == ("images", "gid", "snap")
    # Glance's image is not written to (no last-use record).
    assert cluster.pools["images"]["gid"].meta == {}
    # The clone is the library's: delete removes it.
    assert backend.delete_disk("vm1")["image_id"] == "img"
    assert cluster.pools["disks"] == {}


@pytest.mark.parametrize("url,protected", [
    ("rbd://other-fsid/images/gid/snap", True),     # another cluster
    ("rbd://fsid-1/images/gid/snap", False),        # not protected
    ("rbd://fsid-1/images/gid/nosnap", True),       # no such snapshot
    ("rbd://fsid-1/images/gid", True),              # malformed
    ("rbd://fsid-1/images/g@x/snap", True),
    ("file:///var/lib/glance/images/gid", True),
])
def test_glance_location_not_usable_imports(tmp_path, url, protected):
    cluster = fake_ceph.Cluster(pools=("disks", "bases"))
    _glance_image(cluster, protected)
    backend, source = make(tmp_path, cluster)
    _glance_meta(source, url)
    disk = backend.create_image("img", "vm1", 16 * MiB)
    assert disk.backing_chain == ["bases/%s@snap" % CID]
    assert source.opened == 1


def test_glance_snapshot_of_a_non_raw_image_is_not_cloned(tmp_path):
    cluster = fake_ceph.Cluster(pools=("disks", "bases"))
    _glance_image(cluster)
    backend, source = make(tmp_path, cluster)
    _glance_meta(source, "rbd://fsid-1/images/gid/snap", "qcow2")
    # Fetched and inspected instead (these bytes are not qcow2: refused).
    with pytest.raises(exception.UnsafeImage):
        backend.create_image("img", "vm1", 16 * MiB)
    assert source.opened == 1
    assert cluster.pools["disks"] == {}


# -- delete and the bases as a cache ----------------------------------------

def test_delete_only_removes_clones_it_made(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    cluster.pools["disks"]["stranger"] = fake_ceph.Image(
        MiB, parent=("bases", CID, "snap"))
    with pytest.raises(exception.DiskOperationError):
        backend.delete_disk("stranger")
    with pytest.raises(exception.DiskNotFound):
        backend.delete_disk("nothing")
    assert backend.delete_disk("disks/vm1") == {
        "path": "disks/vm1", "image_id": "img", "backend": "rbd"}
    assert sorted(cluster.pools["disks"]) == ["stranger"]


def test_prune_keeps_bases_with_clones_and_ages_out_the_rest(tmp_path,
                                                             cluster):
    backend, _ = make(tmp_path, cluster)
    backend.conf.set_override("remove_unused_original_minimum_age_seconds",
                              3600, group="image_cache")
    backend.create_image("img", "vm1", 16 * MiB)
    report = backend.prune_bases()
    assert report["removed"] == []
    assert report["kept"][0]["reason"] == "in use by 1 disks"
    backend.delete_disk("vm1")
    report = backend.prune_bases()
    assert report["removed"] == []
    assert report["kept"][0]["reason"].startswith("unused for ")
    cluster.pools["bases"][CID].meta["imagebackend.last_used"] = str(
        time.time() - 7200)
    assert [r["file"] for r in backend.prune_bases(dry_run=True)[
        "removed"]] == ["bases/" + CID]
    assert CID in cluster.pools["bases"]
    assert [r["file"] for r in backend.prune_bases()["removed"]] == [
        "bases/" + CID]
    assert cluster.pools["bases"] == {}


def test_prune_removes_old_temporary_images_only(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    old = datetime.datetime.utcnow() - datetime.timedelta(hours=1)
    cluster.pools["disks"]["vm.tmp-aaaa"] = fake_ceph.Image(1, created=old)
    cluster.pools["bases"]["x.tmp-bbbb"] = fake_ceph.Image(1)   # running
    removed = backend.prune_bases()["removed"]
    assert [r["file"] for r in removed] == ["disks/vm.tmp-aaaa"]
    assert list(cluster.pools["bases"]) == ["x.tmp-bbbb"]


def test_invalidate_then_next_disk_imports_a_new_generation(tmp_path,
                                                            cluster):
    backend, source = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    report = backend.invalidate_bases("img")
    assert report["marked_stale"] == ["bases/" + CID]
    assert report["kept"][0]["reason"] == "in use by 1 disks"
    disk = backend.create_image("img", "vm2", 16 * MiB)
    assert disk.backing_chain == ["bases/%s-2@snap" % CID]
    rows = backend.list_bases()
    assert [(r["generation"], r["stale"], r["disks"]) for r in rows] == [
        (1, True, 1), (2, False, 1)]


def test_verify_reads_back_and_repair_marks_corrupt_stale(tmp_path, cluster):
    backend, _ = make(tmp_path, cluster)
    backend.create_image("img", "vm1", 16 * MiB)
    rows = backend.verify_bases()
    assert [(r["status"], r["file"]) for r in rows] == [
        ("ok", "bases/%s@snap" % CID)]
    # One byte of the base changes in the cluster.
    image = cluster.pools["bases"][CID]
    image.writes[0] = b"Z" + image.writes[0][1:]
    rows = backend.verify_bases(["img"], repair=True)
    assert rows[0]["status"] == "corrupt"
    assert rows[0]["action"] == "marked stale"
    assert image.meta["imagebackend.stale"] == "1"
    assert backend.verify_bases(["other"]) == []
    disk = backend.create_image("img", "vm2", 16 * MiB)
    assert disk.backing_chain == ["bases/%s-2@snap" % CID]


@pytest.mark.parametrize("code,error", [
    (errno.EIO, exception.RbdError),
    (errno.ETIMEDOUT, exception.RbdUnavailable)])
def test_failed_asynchronous_write_fails_the_import(tmp_path, cluster, code,
                                                    error):
    backend, _ = make(tmp_path, cluster)
    cluster.fail["aio_write"] = code
    with pytest.raises(error) as caught:
        backend.create_image("img", "vm1", 16 * MiB)
    assert "importing" in str(caught.value)
    assert cluster.pools["bases"] == {} and cluster.locks == {}


def test_prune_keeps_an_old_temporary_base_while_its_import_runs(tmp_path,
                                                                 cluster):
    backend, _ = make(tmp_path, cluster)
    old = datetime.datetime.utcnow() - datetime.timedelta(hours=1)
    tmp = CID + "-2" + rbd_cluster.TEMP_MARK + "cccc"
    cluster.pools["bases"][tmp] = fake_ceph.Image(1, created=old)
    # A long import of that image holds its lock (on another host).
    cluster.locks[("bases", "imagebackend_lock.%s" % CID)] = "importer"
    report = backend.prune_bases()
    assert report["removed"] == []
    assert report["kept"][0]["reason"] == "an import holds its lock"
    assert tmp in cluster.pools["bases"]
    del cluster.locks[("bases", "imagebackend_lock.%s" % CID)]
    assert [r["file"] for r in backend.prune_bases()["removed"]] == [
        "bases/" + tmp]
    assert cluster.locks == {}


@pytest.mark.parametrize("close_first", [False, True])
def test_a_connection_left_open_is_shut_down_before_the_interpreter_exits(
        close_first):
    # A process that exits with its client still connected can crash in
    # librados' threads; the connection closes itself at exit, once.
    script = textwrap.dedent("""
        from imagebackend.backends import rbd_cluster
        from tests.unit.backends import fake_ceph

        cluster = fake_ceph.Cluster(pools=("rbd",))
        conn = rbd_cluster.Connection("/etc/ceph/ceph.conf", None, 5,
                                      modules=cluster.modules())
        shutdown = conn.client.shutdown
        conn.client.shutdown = lambda: (print("shutdown"), shutdown())
        if %r:
            conn.close()
            conn.close()
        print("connected", cluster.connected)
    """ % close_first)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (
        ["shutdown", "connected", "0"] if close_first
        else ["connected", "1", "shutdown"])
