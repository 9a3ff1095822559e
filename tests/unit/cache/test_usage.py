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

"""Finding the disks that use cached bases: qcow2 headers read directly,
directory walks, backing chains and the registry of created disks.
"""

import os
from unittest import mock

import pytest

from imagebackend.cache import usage as cache_usage
from imagebackend.common import fileio
from tests import fakes

MiB = 1024 * 1024
CID = "a" * 40


def overlay(path, backing, version=3, length=None, offset=512):
    """A qcow2 header naming ``backing`` as its backing file."""
    header = bytearray(fakes.qcow2_header(MiB))
    header[4:8] = version.to_bytes(4, "big")
    name = backing.encode("utf-8")
    header[8:16] = offset.to_bytes(8, "big")
    header[16:20] = (len(name) if length is None else length).to_bytes(
        4, "big")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes(header) + name)
    return path


@pytest.mark.parametrize("version", [2, 3])
def test_backing_file_is_read_from_the_header(tmp_path, version):
    path = overlay(str(tmp_path / "disk"), "/x/_base/" + CID, version)
    assert cache_usage.read_backing_file(path) == "/x/_base/" + CID


def test_relative_backing_name_is_returned_as_stored(tmp_path):
    path = overlay(str(tmp_path / "disk"), "../_base/" + CID)
    assert cache_usage.read_backing_file(path) == "../_base/" + CID


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b"\0" * 4096),                 # raw
    lambda p: p.write_bytes(fakes.qcow2_header(MiB)),      # no backing
    lambda p: p.write_bytes(b"QFI\xfb"),                   # truncated
    lambda p: overlay(str(p), "b", version=1),             # unknown version
    lambda p: overlay(str(p), "b", length=1024),           # name too long
    lambda p: overlay(str(p), "b", offset=1 << 20),        # past the end
])
def test_no_backing_file_for_anything_else(tmp_path, make):
    path = tmp_path / "disk"
    make(path)
    assert cache_usage.read_backing_file(str(path)) is None


class Tree:
    """instances/_base with three bases, plus helpers."""

    def __init__(self, tmp_path):
        self.root = str(tmp_path)
        self.instances = os.path.join(self.root, "instances")
        self.base_dir = os.path.join(self.instances, "_base")
        self.locks = os.path.join(self.instances, "locks")
        os.makedirs(self.base_dir)
        os.makedirs(self.locks)
        for name in (CID, CID + "-2", CID + "_1048576", CID + ".part"):
            with open(os.path.join(self.base_dir, name), "wb") as f:
                f.write(b"\0" * 4096)

    def base(self, name=CID):
        return os.path.join(self.base_dir, name)

    def scanner(self, *extra):
        return cache_usage.UsageScanner(
            self.base_dir, [self.instances, *extra],
            [self.base_dir, self.locks])


def test_disks_are_found_by_walking_the_instances(tmp_path):
    t = Tree(tmp_path)
    a = overlay(os.path.join(t.instances, "vm1", "disk"), t.base())
    b = overlay(os.path.join(t.instances, "vm2", "disk"),
                "../_base/%s-2" % CID)
    c = overlay(os.path.join(t.instances, "vm3", "disk.local"),
                "file:" + t.base(CID + "_1048576"))
    raw = os.path.join(t.instances, "vm4", "disk")
    os.makedirs(os.path.dirname(raw))
    with open(raw, "wb") as f:
        f.write(b"\0" * 4096)
    usage = t.scanner().scan()
    assert usage.users == {CID: [a], CID + "-2": [b],
                           CID + "_1048576": [c]}


def test_only_backing_names_leading_into_base_are_uses(tmp_path):
    t = Tree(tmp_path)
    # A chain through a file outside the searched directories is not a
    # use: only the walk (or the registry) finds a disk.
    snap = overlay(os.path.join(t.root, "snapshots", "snap"), t.base())
    overlay(os.path.join(t.instances, "vm1", "disk"), snap)
    spec = overlay(os.path.join(t.instances, "vm2", "disk"),
                   'json:{"file": {"driver": "file", "filename": "%s"}}'
                   % t.base(CID + "-2"))
    # The name of a base spelled through another directory is not one.
    overlay(os.path.join(t.instances, "vm3", "disk"),
            os.path.join(t.root, "elsewhere", CID))
    overlay(os.path.join(t.instances, "vm4", "disk"),
            "nbd://127.0.0.1/_base/" + CID)
    usage = t.scanner().scan()
    assert usage.users == {CID + "-2": [spec]}
    assert usage.unreadable == []


def test_loops_end_and_symlinked_directories_are_not_followed(tmp_path):
    t = Tree(tmp_path)
    a = os.path.join(t.instances, "vm1", "a")
    b = os.path.join(t.instances, "vm1", "b")
    overlay(a, b)
    overlay(b, a)
    outside = overlay(os.path.join(t.root, "outside", "disk"), t.base())
    os.symlink(os.path.dirname(outside), os.path.join(t.instances, "link"))
    assert t.scanner().scan().users == {}
    # ... but a directory named in disk_dirs is searched.
    usage = t.scanner(os.path.dirname(outside)).scan()
    assert usage.of(CID) == [outside]


def test_registered_disks_count_wherever_they_are(tmp_path):
    t = Tree(tmp_path)
    scanner = t.scanner()
    elsewhere = overlay(os.path.join(t.root, "elsewhere", "disk"), t.base())
    scanner.registry.add(CID, "img", elsewhere, t.base())
    gone = os.path.join(t.root, "gone", "disk")
    scanner.registry.add(CID, "img", gone, t.base(CID + "-2"))
    usage = scanner.scan()
    assert usage.users == {CID: [elsewhere]}
    assert scanner.users_of(CID, CID) == [elsewhere]
    assert scanner.users_of(CID, CID + "-2") == []


def test_another_hosts_record_of_an_invisible_disk_is_trusted(tmp_path):
    t = Tree(tmp_path)
    scanner = t.scanner()
    scanner.registry.host = "other-host"
    scanner.registry.add(CID, "img", "/local/to/other/disk",
                         t.base(CID + "-2"))
    scanner.registry.host = "this-host"
    assert scanner.scan().users == {
        CID + "-2": ["other-host:/local/to/other/disk"]}
    assert scanner.users_of(CID, CID + "-2") != []


def test_collect_removes_only_this_hosts_records_of_unused_disks(tmp_path):
    t = Tree(tmp_path)
    registry = t.scanner().registry
    registry.host = "other"
    registry.add(CID, "img", "/other/disk", t.base())
    registry.host = "mine"
    live = overlay(os.path.join(t.root, "live", "disk"), t.base())
    rebased = overlay(os.path.join(t.root, "rebased", "disk"),
                      "/nowhere/else")
    for disk in (live, rebased, "/deleted/disk"):
        registry.add(CID, "img", disk, t.base())
    chains = cache_usage.Chains(t.base_dir)
    assert registry.collect(CID, chains.bases_of) == 2
    left = sorted(r["disk"] for r in registry.records(CID))
    assert left == sorted([live, "/other/disk"])


def record(t, disk_path, **fields):
    """Write a registry record of ``disk_path`` as the registry lays it
    out (``fields`` may override ``disk`` with a wrong type).
    """
    disk = disk_path
    scanner = t.scanner()
    path = os.path.join(scanner.registry.directory, CID,
                        scanner.registry._key(disk) + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {"disk": disk, "base": t.base(), "image_id": "img",
            "host": scanner.registry.host, "created_at": 0}
    data.update(fields)
    fileio.write_json_atomic(path, data)
    return path


def test_a_disk_recorded_raw_is_never_parsed_and_uses_nothing(tmp_path):
    t = Tree(tmp_path)
    raw = overlay(os.path.join(t.instances, "vm1", "disk"), t.base())
    record(t, raw, format="raw")
    with mock.patch.object(cache_usage, "read_backing_file",
                           autospec=True) as read:
        usage = t.scanner().scan()
        assert t.scanner().users_of(CID, CID) == []
    read.assert_not_called()
    assert usage.users == {}
    # Recorded qcow2 (or by an earlier release, without a format): used.
    record(t, raw, format="qcow2")
    assert t.scanner().scan().users == {CID: [raw]}
    record(t, raw)
    assert t.scanner().scan().users == {CID: [raw]}


def test_a_create_in_progress_uses_its_base_through_its_temp_file(
        tmp_path):
    t = Tree(tmp_path)
    disk = os.path.join(t.root, "elsewhere", "disk")
    tmp = overlay(disk + ".tmp-1234", "not-read")
    record(t, disk, format="qcow2", tmp=tmp, base=t.base(CID + "-2"))
    usage = t.scanner().scan()
    assert usage.users == {CID + "-2": [tmp]}
    assert t.scanner().users_of(CID, CID + "-2") == [tmp]
    os.unlink(tmp)
    assert t.scanner().scan().users == {}
    # A raw create in progress uses nothing.
    overlay(tmp, "not-read")
    record(t, disk, format="raw", tmp=tmp)
    assert t.scanner().scan().users == {}


@pytest.mark.parametrize("fields", [
    {"disk": 7}, {"format": ["qcow2"]}, {"tmp": 3, "disk": "/gone"},
    {"base": {"x": 1}, "disk": "/gone", "host": "other"}])
def test_records_of_the_wrong_shape_count_as_nothing(tmp_path, fields):
    t = Tree(tmp_path)
    record(t, "/some/disk", **fields)
    usage = t.scanner().scan()
    assert (usage.users, usage.unreadable) == ({}, [])


def test_an_unreadable_registered_disk_uses_its_recorded_base(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.root, "elsewhere", "disk"), t.base())
    record(t, disk, format="qcow2")
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           side_effect=PermissionError(13, "denied")):
        usage = t.scanner().scan()
    assert usage.users == {CID: [disk]}
    assert usage.unreadable == []


@pytest.mark.parametrize("name", [
    "/dev/zero", "fifo", "link", "/proc/self/mem", "/", "../vm2/disk",
    "nbd://localhost:10809/" + CID])
def test_planted_backing_names_are_no_use_and_never_unreadable(
        tmp_path, name):
    t = Tree(tmp_path)
    fifo = os.path.join(t.root, "fifo")
    os.mkfifo(fifo)
    real = os.path.join(t.root, "real")
    overlay(real, t.base())
    os.symlink(real, os.path.join(t.root, "link"))
    overlay(os.path.join(t.instances, "vm2", "disk"), "/dev/zero")
    planted = {"fifo": fifo, "link": os.path.join(t.root, "link")}
    name = planted.get(name, name)
    overlay(os.path.join(t.instances, "vm1", "disk"), name)
    usage = t.scanner().scan()
    assert (usage.users, usage.unreadable) == ({}, [])


def test_the_header_of_a_special_file_is_never_read(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    # Open for writing too, so a blocking open would not block: the
    # point is that nothing is read from it.
    keep = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(keep, fakes.qcow2_header(MiB))
        assert cache_usage.read_backing_file(fifo) is None
    finally:
        os.close(keep)
    path = overlay(str(tmp_path / "disk"), "b")
    other = os.lstat(fifo)
    assert cache_usage.read_backing_file(path, other) is None
    assert cache_usage.read_backing_file(path, os.lstat(path)) == "b"


def test_a_symlinked_registry_directory_is_refused_not_followed(tmp_path):
    t = Tree(tmp_path)
    elsewhere = os.path.join(t.root, "elsewhere")
    disk = overlay(os.path.join(t.root, "vm", "disk"), t.base())
    record(t, disk)
    os.rename(os.path.join(t.base_dir, ".disks"), elsewhere)
    os.symlink(elsewhere, os.path.join(t.base_dir, ".disks"))
    usage = t.scanner().scan()
    assert usage.users == {}
    # Nothing may be removed while the registry cannot be trusted.
    assert usage.unreadable == [os.path.join(t.base_dir, ".disks")]
    assert t.scanner().users_of(CID, CID) != []


def test_registry_records_are_never_followed_or_blocked_on(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.root, "vm", "disk"), t.base())
    path = record(t, disk)
    os.rename(path, os.path.join(t.root, "moved.json"))
    os.symlink(os.path.join(t.root, "moved.json"), path)
    fifo = os.path.join(os.path.dirname(path), "f" * 40 + ".json")
    os.mkfifo(fifo)
    usage = t.scanner().scan()      # would block on the FIFO if opened
    assert usage.users == {}
    assert t.scanner().users_of(CID, CID) == []
