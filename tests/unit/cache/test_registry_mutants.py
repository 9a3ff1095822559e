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

"""The registry of disks, exactly: the record written before a disk can
name a base, what is read back, which record is a disk's, and which
records collection removes.
"""

import errno
import hashlib
import json
import logging
import os
import re
import socket
import stat
import time

import pytest

from imagebackend.cache import registry as cache_registry
from imagebackend.common import fileio
from tests.unit.cache import test_registry

CID = test_registry.CID
GRACE = cache_registry.INTENT_GRACE
disk_file = test_registry.disk_file


#: the registry of ``tmp_path/instances``, as host ``this-host``.
reg = test_registry.reg


@pytest.fixture
def synced(monkeypatch):
    """The directories flushed, in order."""
    calls = []
    real = fileio.fsync_dir

    def spy(path):
        calls.append(path)
        real(path)

    monkeypatch.setattr(fileio, "fsync_dir", spy)
    return calls


def read(path):
    with open(path, "rb") as f:
        return f.read()


def intent(reg, disk, tmp, **kwargs):
    st = os.lstat(tmp) if os.path.exists(tmp) else None
    return reg.begin(CID, "img", str(disk), str(tmp), kwargs.get(
        "base", "/b/" + CID), kwargs.get("fmt", "qcow2"), st)


def rewrite(path, **changes):
    record = json.loads(read(path))
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


# -- construction and names -------------------------------------------------

def test_paths_are_absolute_and_the_host_is_this_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = cache_registry.Registry("i/_base", ["i", str(tmp_path / "j")])
    assert reg.base_dir == str(tmp_path / "i" / "_base")
    assert reg.directory == str(tmp_path / "i" / "_base" / ".disks")
    assert reg.roots == [str(tmp_path / "i") + "/",
                         str(tmp_path / "j") + "/"]
    assert reg.host == socket.gethostname()


def test_a_disk_key_is_the_sha1_of_its_path_bytes():
    assert cache_registry.Registry._key("/i/vm/disk") == hashlib.sha1(
        b"/i/vm/disk").hexdigest()
    # A path that is not UTF-8 keeps its bytes.
    assert cache_registry.Registry._key("/i/\udcff") == hashlib.sha1(
        b"/i/\xff").hexdigest()
    assert cache_registry.Registry._key("/i/\u00e9") == hashlib.sha1(
        "/i/\u00e9".encode("utf-8")).hexdigest()


# -- the record directory ----------------------------------------------------

def test_record_directories_are_made_durably_once(reg, synced):
    old = os.umask(0)           # the mode asked for, not the umask's
    try:
        directory = reg._cid_dir(CID)
    finally:
        os.umask(old)
    assert directory == os.path.join(reg.base_dir, ".disks", CID)
    for path in (reg.directory, directory):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o755
    assert synced == [reg.base_dir, reg.directory]
    del synced[:]
    assert reg._cid_dir(CID) == directory
    assert synced == []
    other = reg._cid_dir("d" * 40)
    assert synced == [reg.directory]
    assert sorted(os.listdir(reg.directory)) == [CID, "d" * 40]
    assert other == os.path.join(reg.directory, "d" * 40)


@pytest.mark.parametrize("where", ["top", "image"])
def test_a_record_directory_that_is_not_one_is_refused(reg, tmp_path,
                                                       where):
    target = tmp_path / "target"
    target.mkdir()
    if where == "top":
        bad = reg.directory
    else:
        os.mkdir(reg.directory)
        bad = os.path.join(reg.directory, CID)
    os.symlink(str(target), bad)
    with pytest.raises(NotADirectoryError) as err:
        reg._cid_dir(CID)
    assert err.value.errno == errno.ENOTDIR
    assert err.value.filename == bad
    assert err.value.strerror == (
        "not a directory (symlinks are never followed in the cache)")
    assert os.listdir(target) == []


# -- begin, confirm, rollback, add --------------------------------------------

def test_begin_writes_the_whole_intent_durably(reg, tmp_path, synced,
                                               monkeypatch):
    monkeypatch.setattr(cache_registry.secrets, "token_hex",
                        lambda n: "0123456789abcdef"[:2 * n])
    monkeypatch.setattr(cache_registry.time, "time", lambda: 1234.5)
    monkeypatch.chdir(tmp_path)
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    st = os.lstat(tmp)
    old = os.umask(0o022)
    try:
        path = reg.begin(CID, "img", "vm/disk", tmp, "/b/" + CID, "qcow2",
                         st)
    finally:
        os.umask(old)
    disk = str(tmp_path / "vm" / "disk")
    assert path == os.path.join(reg.directory, CID, "%s-%s.json" % (
        hashlib.sha1(disk.encode()).hexdigest(), "0123456789abcdef"))
    record = {"disk": disk, "tmp": tmp, "base": "/b/" + CID,
              "format": "qcow2", "image_id": "img", "host": "this-host",
              "created_at": 1234.5, "state": "intent",
              "dev": st.st_dev, "ino": st.st_ino,
              "mark": "0123456789abcdef"}
    assert read(path) == json.dumps(record, sort_keys=True).encode() + b"\n"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o644
    assert synced[-1] == os.path.dirname(path)
    # The temporary file carries the record's token.
    assert os.getxattr(tmp, cache_registry.MARK_XATTR) == b"0123456789abcdef"


def test_each_record_name_is_the_disk_key_and_a_fresh_token(reg, tmp_path):
    disk = str(tmp_path / "disk")
    names = {os.path.basename(reg.begin(CID, "img", disk, None, None, "raw"))
             for _ in range(3)}
    assert len(names) == 3
    for name in names:
        assert re.fullmatch(r"%s-[0-9a-f]{16}\.json" % reg._key(disk), name)


def test_begin_without_a_file_records_no_inode_and_no_mark(reg, tmp_path):
    path = reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    record = json.loads(read(path))
    assert record["tmp"] is None and record["base"] is None
    assert record["format"] == "raw"
    assert "ino" not in record and "dev" not in record
    assert "mark" not in record


def test_begin_without_extended_attributes_records_no_mark(
        reg, tmp_path, monkeypatch, caplog):
    def unsupported(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    tmp = disk_file(tmp_path / ".disk.1.tmp")
    with caplog.at_level(logging.DEBUG, logger=cache_registry.__name__):
        path = intent(reg, tmp_path / "disk", tmp)
    record = json.loads(read(path))
    assert record["ino"] == os.lstat(tmp).st_ino
    assert "mark" not in record
    assert [r.getMessage() for r in caplog.records] == [
        "Cannot label %s with its registry token: [Errno %d] Operation not "
        "supported" % (tmp, errno.ENOTSUP)]


def test_set_mark_labels_only_the_file_itself(tmp_path):
    target = disk_file(tmp_path / "target")
    os.symlink(target, str(tmp_path / "link"))
    assert cache_registry._set_mark(str(tmp_path / "link"), "abc") is False
    assert os.listxattr(target) == []
    assert cache_registry._set_mark(target, "abc") is True
    assert os.getxattr(target, "user.imagebackend.record") == b"abc"


def test_begin_never_reuses_a_record_name(reg, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_registry.secrets, "token_hex",
                        lambda n: "a" * 16)
    first = reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    before = read(first)
    with pytest.raises(FileExistsError):
        reg.begin(CID, "img", str(tmp_path / "disk"), None, "/b", "qcow2")
    assert read(first) == before


def test_a_short_write_leaves_no_record(reg, tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write",
                        lambda fd, data: real(fd, data[:10]))
    with pytest.raises(OSError) as err:
        reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    monkeypatch.undo()
    assert err.value.errno == errno.EIO
    assert err.value.strerror == "short write"
    assert err.value.filename.startswith(os.path.join(reg.directory, CID))
    assert os.listdir(os.path.join(reg.directory, CID)) == []


def test_a_failed_flush_leaves_no_record(reg, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(os.path.join(reg.directory, CID)) == []


def test_confirm_marks_done_and_ties_the_record_to_the_disk(
        reg, tmp_path, monkeypatch):
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    disk = str(tmp_path / "vm" / "disk")
    path = intent(reg, disk, tmp)
    before = json.loads(read(path))
    os.rename(tmp, disk)
    synced, renamed = [], []
    real_rename = os.rename
    monkeypatch.setattr(os, "fsync", synced.append)
    monkeypatch.setattr(os, "rename", lambda *a: (renamed.append(a),
                                                  real_rename(*a)))
    reg.confirm(path, os.lstat(disk))
    monkeypatch.undo()
    # Not synced: rewritten through a hidden name of its own beside it.
    assert synced == []
    hidden = os.path.join(os.path.dirname(path),
                          "." + os.path.basename(path) + ".tmp")
    assert renamed == [(hidden, path)]
    assert sorted(os.listdir(os.path.dirname(path))) == [
        os.path.basename(path)]
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o644
    after = json.loads(read(path))
    st = os.lstat(disk)
    assert after == dict(before, state="done", tmp=None, dev=st.st_dev,
                         ino=st.st_ino)
    # Without a stat, the record keeps what it had.
    reg.confirm(path)
    assert json.loads(read(path)) == after


def test_confirm_of_a_record_that_is_gone_says_so(reg, tmp_path):
    path = intent(reg, tmp_path / "disk", tmp_path / ".disk.1.tmp")
    os.unlink(path)
    with pytest.raises(FileNotFoundError) as err:
        reg.confirm(path)
    assert (err.value.errno, err.value.strerror, err.value.filename) == (
        errno.ENOENT, "registry record is gone", path)
    assert not os.path.exists(path)


def test_rollback_removes_only_its_record_durably(reg, tmp_path, synced):
    keep = intent(reg, tmp_path / "disk", tmp_path / ".disk.1.tmp")
    path = intent(reg, tmp_path / "disk", tmp_path / ".disk.2.tmp")
    del synced[:]
    reg.rollback(path)
    assert synced == [os.path.dirname(path)]
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(keep)]
    reg.rollback(path)                  # already gone: nothing to flush
    assert synced == [os.path.dirname(path)]


def test_rollback_warns_when_the_removal_cannot_be_flushed(
        reg, tmp_path, monkeypatch, caplog):
    path = intent(reg, tmp_path / "disk", tmp_path / ".disk.1.tmp")

    def failing(directory):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fileio, "fsync_dir", failing)
    with caplog.at_level(logging.WARNING, logger=cache_registry.__name__):
        reg.rollback(path)
    assert not os.path.exists(path)
    assert [r.getMessage() for r in caplog.records] == [
        "Could not flush the removal of %s: [Errno 5] Input/output error"
        % path]


def test_add_records_a_done_disk(reg, tmp_path):
    path = reg.add(CID, "img", str(tmp_path / "disk"), "/b/" + CID)
    [record] = reg.records(CID)
    assert record["_path"] == path
    assert (record["state"], record["format"], record["tmp"],
            record["base"], record["image_id"], record["disk"]) == (
        "done", "qcow2", None, "/b/" + CID, "img", str(tmp_path / "disk"))
    assert "ino" not in record
    raw = reg.add(CID, "img2", str(tmp_path / "raw"), None, "raw")
    assert json.loads(read(raw))["format"] == "raw"


# -- reading -----------------------------------------------------------------

def test_cids_are_the_sorted_record_directories(reg, tmp_path):
    assert reg.cids() == []
    for cid in ("b" * 40, "a" * 40):
        reg.add(cid, "img", str(tmp_path / cid), None, "raw")
    assert reg.cids() == ["a" * 40, "b" * 40]


def test_cids_of_a_directory_that_is_not_one_are_none(reg, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / CID).mkdir()
    os.symlink(str(tmp_path / "elsewhere"), reg.directory)
    assert reg.cids() == []
    os.unlink(reg.directory)
    with open(reg.directory, "w"):
        pass
    assert reg.cids() == []


def test_records_skips_what_is_not_a_record(reg, tmp_path):
    real = reg.add(CID, "img", str(tmp_path / "disk"), None, "raw")
    directory = os.path.dirname(real)
    for name, content in (("notes.txt", {"disk": "/x"}),
                          (".hidden.json", {"disk": "/x"}),
                          ("list.json", [1, 2]),
                          ("nodisk.json", {"base": "/b"}),
                          ("numdisk.json", {"disk": 5})):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f)
    # Read before the real record's directory: skipped, not the end.
    with open(os.path.join(reg.directory, "a" * 40), "w") as f:
        f.write("a file where a directory belongs")
    assert [r["_path"] for r in reg.records()] == [real]
    assert [r["_path"] for r in reg.records(CID)] == [real]


def test_records_of_one_image_or_one_disk(reg, tmp_path):
    a = reg.add(CID, "img", str(tmp_path / "a"), None, "raw")
    b = reg.add(CID, "img", str(tmp_path / "b"), None, "raw")
    other = reg.add("d" * 40, "img2", str(tmp_path / "a"), None, "raw")
    assert sorted(r["_path"] for r in reg.records()) == sorted([a, b, other])
    assert sorted(r["_path"] for r in reg.records(CID)) == sorted([a, b])
    assert [r["_path"] for r in reg.records("d" * 40)] == [other]
    assert [r["_path"] for r in reg.records("e" * 40)] == []
    key = reg._key(str(tmp_path / "a"))
    assert sorted(r["_path"] for r in reg.records(key=key)) == sorted(
        [a, other])
    assert [r["_path"] for r in reg.records(CID, key)] == [a]
    # Another disk's record read first is skipped, not the end.
    first = os.path.join(os.path.dirname(a), "0" * 40 + "-0.json")
    with open(first, "w") as f:
        json.dump({"disk": "/elsewhere"}, f)
    assert [r["_path"] for r in reg.records(CID, key)] == [a]


def test_records_go_on_past_an_image_directory_that_went(reg, tmp_path,
                                                         monkeypatch):
    path = reg.add(CID, "img", str(tmp_path / "a"), None, "raw")
    # Removed between the listing and the read (a collect): skipped.
    monkeypatch.setattr(reg, "cids", lambda: ["0" * 40, CID])
    assert [r["_path"] for r in reg.records()] == [path]


def test_records_come_in_name_order(reg, tmp_path, monkeypatch):
    tokens = iter(["b" * 16, "a" * 16, "c" * 16])
    monkeypatch.setattr(cache_registry.secrets, "token_hex",
                        lambda n: next(tokens))
    paths = [reg.add(CID, "img", str(tmp_path / "disk"), None, "raw")
             for _ in range(3)]
    assert [r["_path"] for r in reg.records()] == sorted(paths)


def test_a_record_too_large_is_ignored(reg, tmp_path):
    directory = reg._cid_dir(CID)
    body = {"disk": "/d", "state": "done", "pad": ""}
    empty = len(json.dumps(body).encode())
    for name, size in (("fits.json", 64 * 1024),
                       ("large.json", 64 * 1024 + 10)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(dict(body, pad="x" * (size - empty)), f)
        assert os.path.getsize(os.path.join(directory, name)) == size
    assert [os.path.basename(r["_path"]) for r in reg.records()] == [
        "fits.json"]


def test_a_record_read_has_every_key(reg, tmp_path):
    directory = reg._cid_dir(CID)
    with open(os.path.join(directory, "intent.json"), "w") as f:
        json.dump({"disk": "/d", "state": "intent"}, f)
    with open(os.path.join(directory, "old.json"), "w") as f:
        json.dump({"disk": "/e", "format": "raw"}, f)
    found = {os.path.basename(r["_path"]): r for r in reg.records()}
    assert found["intent.json"] == {
        "disk": "/d", "tmp": None, "base": None, "format": None,
        "image_id": None, "host": None, "created_at": None,
        "state": "intent", "_path": os.path.join(directory, "intent.json")}
    # Written before intents existed: done; its own format kept.
    assert (found["old.json"]["state"], found["old.json"]["format"]) == (
        "done", "raw")


# -- find ---------------------------------------------------------------------

def made(reg, tmp_path, vm="vm", fmt="qcow2", created_at=None):
    """A disk made as the library makes one; its record's path."""
    tmp = disk_file(tmp_path / vm / ".disk.1.tmp")
    disk = str(tmp_path / vm / "disk")
    path = intent(reg, disk, tmp, fmt=fmt)
    os.rename(tmp, disk)
    reg.confirm(path, os.lstat(disk))
    if created_at is not None:
        rewrite(path, created_at=created_at)
    return disk, path


def test_find_takes_the_newest_done_record(reg, tmp_path, monkeypatch):
    # Record names (and so the order they are read in) put the newest
    # neither first nor last.
    tokens = iter(["1" * 16, "3" * 16, "0" * 16])
    monkeypatch.setattr(cache_registry.secrets, "token_hex",
                        lambda n: next(tokens))
    disk, old = made(reg, tmp_path, created_at=100)
    st = os.lstat(disk)
    newer = reg.begin(CID, "img", disk, None, None, "raw")
    reg.confirm(newer, st)
    rewrite(newer, created_at=200)
    oldest = reg.begin(CID, "img", disk, None, None, "vmdk")
    reg.confirm(oldest, st)
    rewrite(oldest, created_at=50)
    assert reg.find(disk)["_path"] == newer
    rewrite(newer, created_at="yesterday")      # not a time: oldest of all
    assert reg.find(disk)["_path"] == old


def test_find_takes_the_newest_intent_when_none_is_done(
        reg, tmp_path, monkeypatch):
    tokens = iter(["b" * 16, "a" * 16])
    monkeypatch.setattr(cache_registry.secrets, "token_hex",
                        lambda n: next(tokens))
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    disk = str(tmp_path / "vm" / "disk")
    first = intent(reg, disk, tmp, fmt="raw")
    second = intent(reg, disk, tmp, fmt="qcow2")
    os.link(tmp, disk)
    # The second attempt relabelled the file: as where there are no labels.
    rewrite(first, created_at=20, mark=None)
    rewrite(second, created_at=10, mark=None)
    assert reg.find(disk)["_path"] == first
    rewrite(first, created_at=5)
    assert reg.find(disk)["_path"] == second


def test_find_prefers_a_done_record_to_a_newer_intent(reg, tmp_path):
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    disk = str(tmp_path / "vm" / "disk")
    done = intent(reg, disk, tmp, fmt="raw")
    later = intent(reg, disk, tmp, fmt="qcow2")
    os.rename(tmp, disk)
    reg.confirm(done, os.lstat(disk))
    # Both tied to the file (no labels here); the intent is newer.
    rewrite(done, created_at=10, mark=None)
    rewrite(later, created_at=20, mark=None)
    found = reg.find(disk)
    assert (found["_path"], found["format"]) == (done, "raw")


def test_find_is_none_for_what_is_not_a_regular_file(reg, tmp_path):
    disk, path = made(reg, tmp_path)
    os.unlink(disk)
    os.mkdir(disk)
    assert reg.find(disk) is None
    assert reg.find(str(tmp_path / "nothing")) is None


def test_find_needs_the_record_tied_to_that_inode(reg, tmp_path):
    disk, path = made(reg, tmp_path)
    st = os.lstat(disk)
    rewrite(path, ino=st.st_ino + 1)
    assert reg.find(disk) is None
    rewrite(path, ino=st.st_ino, dev=st.st_dev + 1)
    assert reg.find(disk) is None
    rewrite(path, ino=str(st.st_ino), dev=st.st_dev)
    assert reg.find(disk) is None
    rewrite(path, ino=st.st_ino)
    assert reg.find(disk)["_path"] == path


def test_find_needs_the_label_where_the_record_has_one(reg, tmp_path):
    disk, path = made(reg, tmp_path)
    assert json.loads(read(path))["mark"]
    os.setxattr(disk, cache_registry.MARK_XATTR, b"another")
    assert reg.find(disk) is None
    os.removexattr(disk, cache_registry.MARK_XATTR)
    assert reg.find(disk) is None
    rewrite(path, mark=None)            # a filesystem without labels
    assert reg.find(disk)["_path"] == path


def test_find_never_takes_another_disks_record(reg, tmp_path):
    disk, path = made(reg, tmp_path)
    # A record whose key matches but names another path.
    other = os.path.join(os.path.dirname(path),
                         os.path.basename(path).replace(".json", "0.json"))
    record = json.loads(read(path))
    with open(other, "w") as f:
        json.dump(dict(record, disk=disk + "2", created_at=1e12), f)
    assert reg.find(disk)["_path"] == path


def test_is_its_disk_reads_the_label_of_the_record_disk(tmp_path):
    disk = disk_file(tmp_path / "disk")
    st = os.lstat(disk)
    record = {"disk": disk, "ino": st.st_ino, "dev": st.st_dev,
              "mark": "tok"}
    assert cache_registry._is_its_disk(record, st) is False
    os.setxattr(disk, cache_registry.MARK_XATTR, b"tok")
    assert cache_registry._is_its_disk(record, st) is True
    assert cache_registry._is_its_disk(dict(record, mark=None), st) is True
    assert cache_registry._is_its_disk(dict(record, dev=None), st) is False
    link = str(tmp_path / "link")
    os.symlink(disk, link)
    assert cache_registry._is_its_disk(dict(record, disk=link), st) is False
    assert cache_registry._is_its_disk({"disk": disk}, st) is True


def test_names_file_needs_the_regular_file_at_the_disk_path(tmp_path):
    disk = disk_file(tmp_path / "disk")
    st = os.lstat(disk)
    record = {"disk": disk, "ino": st.st_ino, "dev": st.st_dev}
    assert cache_registry._names_file(record, st) is True
    assert cache_registry._names_file({"disk": disk}, st) is False
    other = disk_file(tmp_path / "other")
    assert cache_registry._names_file(record, os.lstat(other)) is False
    assert cache_registry._names_file(
        dict(record, disk=str(tmp_path / "gone")), st) is False


@pytest.mark.parametrize("value, expected", [
    (5, 5), (2.5, 2.5), ("7", 0.0), (None, 0.0), ([1], 0.0)])
def test_number(value, expected):
    assert cache_registry._number(value) == expected


# -- collect ------------------------------------------------------------------

def test_collect_takes_the_time_now_by_default(reg, tmp_path, monkeypatch):
    path = intent(reg, tmp_path / "vm" / "disk", tmp_path / "vm" / ".x.tmp")
    rewrite(path, created_at=1000.0)
    monkeypatch.setattr(cache_registry.time, "time",
                        lambda: 1000.0 + GRACE - 1)
    assert reg.collect(CID, test_registry.uses_base) == 0
    monkeypatch.setattr(cache_registry.time, "time",
                        lambda: 1000.0 + GRACE)
    assert reg.collect(CID, test_registry.uses_base) == 1


def test_an_intent_is_collected_exactly_when_its_grace_is_over(reg,
                                                               tmp_path):
    path = intent(reg, tmp_path / "vm" / "disk", tmp_path / "vm" / ".x.tmp")
    rewrite(path, created_at=1000.0)
    assert reg.collect(CID, test_registry.uses_base,
                       now=1000.0 + GRACE - 0.5) == 0
    assert os.path.exists(path)
    assert reg.collect(CID, test_registry.uses_base,
                       now=1000.0 + GRACE) == 1
    assert not os.path.exists(path)


def test_an_intent_without_a_time_is_old(reg, tmp_path):
    path = intent(reg, tmp_path / "vm" / "disk", tmp_path / "vm" / ".x.tmp")
    rewrite(path, created_at="now")
    assert reg.collect(CID, test_registry.uses_base, now=GRACE + 1) == 1


def test_collect_goes_on_past_records_it_keeps(reg, tmp_path, monkeypatch):
    tokens = iter(["0" * 16, "1" * 16, "2" * 16])
    monkeypatch.setattr(cache_registry.secrets, "token_hex",
                        lambda n: next(tokens))
    gone = str(tmp_path / "gone")
    reg.host = "other"
    theirs = reg.add(CID, "img", gone, None, "raw")
    reg.host = "this-host"
    young = reg.begin(CID, "img", gone, None, None, "raw")
    dead = reg.add(CID, "img", gone, None, "raw")
    # Read in that order: another host's, a young intent, then a dead one.
    assert [r["_path"] for r in reg.records(CID)] == [theirs, young, dead]
    assert reg.collect(CID, test_registry.uses_base) == 1
    assert [r["_path"] for r in reg.records(CID)] == [theirs, young]


def test_collect_removes_the_emptied_image_directory(reg, tmp_path):
    reg.add(CID, "img", str(tmp_path / "gone"), None, "raw")
    keep = reg.add("d" * 40, "img2", str(tmp_path / "gone"), None, "raw")
    assert reg.collect(CID, test_registry.uses_base) == 1
    assert os.listdir(reg.directory) == ["d" * 40]
    assert reg.collect(CID, test_registry.uses_base) == 0
    assert os.path.exists(keep)


def test_collect_keeps_a_record_whose_temp_is_a_symlink(reg, tmp_path):
    tmp = tmp_path / "vm" / ".disk.1.tmp"
    path = intent(reg, tmp_path / "vm" / "disk", tmp)
    os.makedirs(tmp_path / "vm")
    os.symlink(str(tmp_path / "nowhere"), str(tmp))
    assert reg.collect(CID, test_registry.uses_base,
                       now=time.time() + GRACE + 1) == 0
    assert os.path.exists(path) and os.path.islink(tmp)


def test_collect_keeps_a_done_qcow2_record_while_it_uses_a_base(
        reg, tmp_path):
    disk, path = made(reg, tmp_path)
    asked = []

    def bases_of(p, st):
        asked.append((p, st.st_ino))
        return {CID}

    assert reg.collect(CID, bases_of) == 0
    assert asked == [(disk, os.lstat(disk).st_ino)]
    assert reg.collect(CID, test_registry.uses_none) == 1
    assert not os.path.exists(path) and os.path.exists(disk)


def test_collect_drops_the_record_of_a_disk_that_is_now_a_symlink(
        reg, tmp_path):
    disk, path = made(reg, tmp_path, fmt="raw")
    os.rename(disk, disk + ".moved")
    os.symlink(disk + ".moved", disk)
    assert reg.collect(CID, test_registry.uses_base) == 1


def test_collect_drops_the_record_of_a_disk_with_another_label(
        reg, tmp_path):
    disk, path = made(reg, tmp_path, fmt="raw")
    os.setxattr(disk, cache_registry.MARK_XATTR, b"other")
    assert reg.collect(CID, test_registry.uses_base) == 1
    assert os.path.exists(disk)


def test_collect_removes_a_dead_temp_only_if_it_is_the_attempts(
        reg, tmp_path, caplog):
    later = time.time() + GRACE + 1
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    path = intent(reg, tmp_path / "vm" / "disk", tmp)
    os.setxattr(tmp, cache_registry.MARK_XATTR, b"not the token")
    assert reg.collect(CID, test_registry.uses_base, now=later) == 0
    assert os.path.exists(tmp) and os.path.exists(path)
    rewrite(path, mark=None, ino=None)     # not tied to a file: kept
    assert reg.collect(CID, test_registry.uses_base, now=later) == 0
    assert os.path.exists(tmp)
    rewrite(path, ino=os.lstat(tmp).st_ino)
    with caplog.at_level(logging.INFO, logger=cache_registry.__name__):
        assert reg.collect(CID, test_registry.uses_base, now=later) == 1
    assert not os.path.exists(tmp) and not os.path.exists(path)
    assert "Removed %s, left by a disk creation that did not finish" % (
        tmp) in [r.getMessage() for r in caplog.records]


def test_collect_never_removes_a_temp_that_is_a_directory(reg, tmp_path):
    tmp = tmp_path / "vm" / ".disk.1.tmp"
    path = intent(reg, tmp_path / "vm" / "disk", tmp)
    os.makedirs(tmp)
    st = os.lstat(tmp)
    rewrite(path, ino=st.st_ino, dev=st.st_dev)
    assert reg.collect(CID, test_registry.uses_base,
                       now=time.time() + GRACE + 1) == 0
    assert os.path.isdir(tmp)


@pytest.mark.parametrize("name", ["disk.1.tmp", ".disk.1.tmpx", ".disk.1"])
def test_collect_never_removes_a_temp_not_named_as_one(reg, tmp_path, name):
    tmp = disk_file(tmp_path / "vm" / name)
    intent(reg, tmp_path / "vm" / "disk", tmp)
    reg.collect(CID, test_registry.uses_base, now=time.time() + GRACE + 1)
    assert os.path.exists(tmp)


def test_remove_dead_temp_needs_a_temp_beside_its_disk(tmp_path):
    tmp = disk_file(tmp_path / "vm" / ".disk.1.tmp")
    st = os.lstat(tmp)
    record = {"tmp": tmp, "disk": str(tmp_path / "other" / "disk"),
              "ino": st.st_ino, "dev": st.st_dev}
    cache_registry.Registry._remove_dead_temp(record)
    assert os.path.exists(tmp)
    cache_registry.Registry._remove_dead_temp(dict(record, tmp=None))
    cache_registry.Registry._remove_dead_temp(dict(
        record, disk=str(tmp_path / "vm" / "disk"), ino=float(st.st_ino)))
    assert os.path.exists(tmp)
    cache_registry.Registry._remove_dead_temp(dict(
        record, disk=str(tmp_path / "vm" / "disk")))
    assert not os.path.exists(tmp)
    # Gone already: nothing to do, no error.
    cache_registry.Registry._remove_dead_temp(dict(
        record, disk=str(tmp_path / "vm" / "disk")))


def test_describes_a_disk(tmp_path):
    describes = cache_registry.Registry._describes_a_disk
    disk = disk_file(tmp_path / "disk")
    st = os.lstat(disk)
    record = {"tmp": None, "disk": disk, "format": "qcow2",
              "ino": st.st_ino, "dev": st.st_dev}
    assert describes(record, test_registry.uses_base) is True
    assert describes(record, test_registry.uses_none) is False
    assert describes(dict(record, format="raw"),
                     test_registry.uses_none) is True
    assert describes(dict(record, ino=st.st_ino + 1),
                     test_registry.uses_base) is False
    assert describes(dict(record, disk=str(tmp_path / "gone")),
                     test_registry.uses_base) is False
    assert describes(dict(record, disk=str(tmp_path / "gone"), tmp=disk),
                     test_registry.uses_none) is True
    assert describes(dict(record, tmp=str(tmp_path / "gone")),
                     test_registry.uses_none) is False
    os.mkdir(tmp_path / "dir")
    assert describes(dict(record, disk=str(tmp_path / "dir"), ino=None),
                     test_registry.uses_base) is False
