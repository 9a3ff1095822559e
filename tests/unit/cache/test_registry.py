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

"""The registry of disks the library made: one record per attempt, intent
first, read and written without following symlinks.
"""

import json
import os
import time

import pytest

from imagebackend.cache import registry as cache_registry
from imagebackend.cache import usage as cache_usage

CID = "c" * 40


@pytest.fixture
def reg(tmp_path):
    base_dir = tmp_path / "instances" / "_base"
    base_dir.mkdir(parents=True)
    registry = cache_registry.Registry(str(base_dir),
                                       [str(tmp_path / "instances")])
    registry.host = "this-host"
    return registry


def disk_file(path, data=b"QFI\xfb" + bytes(60)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def begin(reg, disk, tmp=None, base="/b/" + CID, fmt="qcow2"):
    st = os.lstat(tmp) if tmp and os.path.exists(tmp) else None
    return reg.begin(CID, "img", str(disk), tmp and str(tmp), base, fmt, st)


def age(path, seconds):
    record = json.load(open(path))
    record["created_at"] -= seconds
    with open(path, "w") as f:
        json.dump(record, f)


def content(path):
    with open(path, "rb") as f:
        return f.read()


def uses_base(path, st):
    return {CID}


def uses_none(path, st):
    return set()


def test_each_attempt_has_its_own_record(reg, tmp_path):
    disk = tmp_path / "vm" / "disk"
    first = begin(reg, disk, tmp_path / "vm" / ".disk.1.tmp")
    second = begin(reg, disk, tmp_path / "vm" / ".disk.2.tmp")
    assert first != second
    assert os.path.dirname(first) == os.path.join(reg.directory, CID)
    reg.rollback(first)
    assert [r["_path"] for r in reg.records(CID)] == [second]


def test_records_have_every_key(reg, tmp_path):
    begin(reg, tmp_path / "disk", tmp_path / ".disk.x.tmp")
    [record] = reg.records()
    assert set(record) >= {"disk", "tmp", "base", "format", "image_id",
                           "host", "created_at", "state", "_path"}
    assert record["state"] == "intent"
    assert record["tmp"] == str(tmp_path / ".disk.x.tmp")


def test_a_record_from_before_intents_reads_as_a_done_qcow2_record(
        reg, tmp_path):
    disk = disk_file(tmp_path / "disk", b"\0" * 64)
    os.makedirs(os.path.join(reg.directory, CID))
    with open(os.path.join(reg.directory, CID, reg._key(disk) + ".json"),
              "w") as f:
        json.dump({"disk": disk, "base": "/b", "image_id": "img",
                   "host": "h", "created_at": 1.0}, f)
    [record] = reg.records()
    assert (record["state"], record["format"], record["tmp"]) == (
        "done", "qcow2", None)
    # Not tied to a file: it never names the format of what is there now.
    assert reg.find(disk) is None


def test_find_never_follows_a_symlink_at_a_recorded_path(reg, tmp_path):
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    disk = str(tmp_path / "vm" / "disk")
    path = begin(reg, disk, tmp)
    os.rename(tmp, disk)
    reg.confirm(path, os.lstat(disk))
    assert reg.find(disk)["_path"] == path
    os.rename(disk, str(tmp_path / "vm" / "moved"))
    os.symlink(str(tmp_path / "vm" / "moved"), disk)
    assert reg.find(disk) is None


def test_collect_keeps_records_while_the_disk_or_its_temp_exists(
        reg, tmp_path):
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    building = begin(reg, tmp_path / "vm" / "disk", tmp)
    # Its temporary file is not the attempt's any more: left alone.
    os.unlink(tmp)
    disk_file(tmp, b"another")
    made = disk_file(tmp_path / "vm2" / "disk")
    published = begin(reg, made, tmp_path / "vm2" / ".disk.2.tmp")
    raw = disk_file(tmp_path / "vm3" / "disk", b"\0" * 64)
    raw_record = reg.add(CID, "img", raw, None, "raw")
    gone = begin(reg, tmp_path / "vm4" / "disk",
                 tmp_path / "vm4" / ".disk.4.tmp")
    for path in (building, published, gone):
        age(path, cache_registry.INTENT_GRACE + 1)
    assert reg.collect(CID, uses_base) == 1
    assert {r["_path"] for r in reg.records(CID)} == {
        building, published, raw_record}
    # The qcow2 disk no longer uses a base (flattened): its record goes;
    # the raw disk uses none, and is still the library's raw disk.
    assert reg.collect(CID, uses_none) == 1
    assert {r["_path"] for r in reg.records(CID)} == {building, raw_record}
    os.unlink(raw)
    os.unlink(tmp)
    assert reg.collect(CID, uses_base) == 2
    assert list(reg.records()) == []


def test_collect_keeps_a_young_intent_whatever_its_files(reg, tmp_path):
    path = begin(reg, tmp_path / "disk", tmp_path / ".disk.1.tmp")
    assert reg.collect(CID, uses_base) == 0
    assert reg.collect(CID, uses_base,
                       now=time.time() + cache_registry.INTENT_GRACE + 1) == 1
    assert not os.path.exists(path)


def test_collect_leaves_other_hosts_records(reg, tmp_path):
    # Records are read in the order of their names (the key of the disk's
    # path first): the other host's two come before this host's, so a
    # collect that stopped at them would never reach this host's record.
    disks = sorted((str(tmp_path / ("gone%d" % i)) for i in range(3)),
                   key=reg._key)
    reg.host = "other"
    theirs = [reg.add(CID, "img", disk, "/b/" + CID) for disk in disks[:2]]
    kept = {path: content(path) for path in theirs}
    reg.host = "this-host"
    mine = reg.add(CID, "img", disks[2], "/b/" + CID)
    assert sorted(os.listdir(os.path.dirname(mine))) == sorted(
        os.path.basename(path) for path in theirs + [mine])
    assert reg.collect(CID, uses_base) == 1
    assert sorted(os.listdir(os.path.dirname(mine))) == sorted(
        os.path.basename(path) for path in theirs)
    assert {path: content(path) for path in theirs} == kept
    assert [(r["disk"], r["host"], r["base"], r["state"])
            for r in reg.records(CID)] == [
        (disk, "other", "/b/" + CID, cache_registry.DONE)
        for disk in disks[:2]]


def test_a_record_of_a_replaced_file_is_collected_and_not_found(
        reg, tmp_path):
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp", b"\0" * 64)
    disk = str(tmp_path / "vm" / "disk")
    path = begin(reg, disk, tmp, base=None, fmt="raw")
    os.rename(tmp, disk)
    reg.confirm(path, os.lstat(disk))
    assert reg.find(disk)["format"] == "raw"
    os.unlink(disk)
    disk_file(disk, b"QFI\xfb" + bytes(60))      # another file, same name
    keep = os.open(disk, os.O_RDONLY)            # pin its inode number
    try:
        assert reg.find(disk) is None
        assert reg.collect(CID, uses_base) == 1
    finally:
        os.close(keep)


def test_find_prefers_done_and_takes_an_intent_only_for_its_file(
        reg, tmp_path):
    disk = str(tmp_path / "vm" / "disk")
    assert reg.find(disk) is None                # no file
    # An attempt that crashed after publishing (same inode as its temp).
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    crashed = begin(reg, disk, tmp, fmt="qcow2")
    os.link(tmp, disk)
    # A losing attempt of another format: its temp is another file.
    other_tmp = disk_file(tmp_path / "vm" / ".disk.2.tmp", b"\0" * 64)
    begin(reg, disk, other_tmp, base=None, fmt="raw")
    found = reg.find(disk)
    assert (found["_path"], found["format"]) == (crashed, "qcow2")
    done = begin(reg, disk, tmp)
    reg.confirm(done, os.lstat(disk))
    assert reg.find(disk)["_path"] == done
    # Found through a symlinked directory too.
    os.symlink(str(tmp_path / "vm"), str(tmp_path / "link"))
    assert reg.find(str(tmp_path / "link" / "disk"))["_path"] == done
    assert reg.find(str(tmp_path / "elsewhere")) is None


def test_symlinked_records_and_directories_are_not_followed(reg, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with open(outside / ("a" * 40 + "-1.json"), "w") as f:
        json.dump({"disk": "/d", "base": "/b", "state": "done"}, f)
    os.makedirs(reg.directory)
    os.symlink(str(outside), os.path.join(reg.directory, CID))
    os.makedirs(os.path.join(reg.directory, "d" * 40))
    os.symlink(str(outside / ("a" * 40 + "-1.json")),
               os.path.join(reg.directory, "d" * 40, "b" * 40 + "-1.json"))
    assert list(reg.records()) == []
    with pytest.raises(NotADirectoryError):
        begin(reg, tmp_path / "disk")
    assert os.listdir(outside) == ["a" * 40 + "-1.json"]


def test_a_recorded_raw_disk_is_never_read_for_a_backing_file(tmp_path):
    base_dir = tmp_path / "instances" / "_base"
    base_dir.mkdir(parents=True)
    (base_dir / CID).write_bytes(b"\0" * 4096)
    scanner = cache_usage.UsageScanner(str(base_dir),
                                       [str(tmp_path / "instances")],
                                       [str(base_dir)])
    # The guest of a raw disk outside instances_path wrote a qcow2 header
    # naming the base: the registry knows the disk is raw.
    header = bytearray(512)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (3).to_bytes(4, "big")
    name = str(base_dir / CID).encode()
    header[8:16] = (512).to_bytes(8, "big")
    header[16:20] = len(name).to_bytes(4, "big")
    raw = disk_file(tmp_path / "elsewhere" / "disk", bytes(header) + name)
    scanner.registry.add(CID, "img", raw, None, "raw")
    assert scanner.scan().users == {}
    assert scanner.users_of(CID, CID) == []


def test_collect_removes_the_temp_file_of_a_dead_attempt(reg, tmp_path):
    # Died before publishing: its temporary file, then its record, go.
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    died = begin(reg, tmp_path / "vm" / "disk", tmp)
    # Died between the link and the unlink: only the second name goes.
    tmp2 = disk_file(tmp_path / "vm2" / ".disk.2.tmp")
    disk2 = str(tmp_path / "vm2" / "disk")
    named = begin(reg, disk2, tmp2)
    os.link(tmp2, disk2)
    later = time.time() + cache_registry.INTENT_GRACE + 1
    assert reg.collect(CID, uses_base, now=later) == 1
    assert not os.path.exists(died) and not os.path.exists(tmp)
    assert os.listdir(tmp_path / "vm") == []
    assert os.listdir(tmp_path / "vm2") == ["disk"]
    assert reg.find(disk2)["_path"] == named
    # A young intent's files are never touched.
    tmp3 = disk_file(tmp_path / "vm3" / ".disk.3.tmp")
    begin(reg, tmp_path / "vm3" / "disk", tmp3)
    assert reg.collect(CID, uses_base) == 0
    assert os.path.exists(tmp3)


def test_collect_removes_no_file_a_record_names_oddly(reg, tmp_path):
    victim = disk_file(tmp_path / "elsewhere" / "precious")
    for tmp in (victim, disk_file(tmp_path / "vm" / "visible.tmp"),
                disk_file(tmp_path / "vm" / ".hidden-but-not-tmp")):
        begin(reg, tmp_path / "vm" / "disk", tmp)
    later = time.time() + cache_registry.INTENT_GRACE + 1
    reg.collect(CID, uses_base, now=later)
    assert os.path.exists(victim)
    assert sorted(os.listdir(tmp_path / "vm")) == [".hidden-but-not-tmp",
                                                   "visible.tmp"]
