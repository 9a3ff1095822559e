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

"""An intent record made durable while the caller works (its bytes and
its name each in a thread), tied to a file without a name, and marked
done from what this process wrote.
"""

import errno
import json
import os
import threading
import time

import pytest

from imagebackend.cache import registry as cache_registry
from imagebackend.common import fileio
from tests.unit.cache import test_registry

CID = test_registry.CID
reg = test_registry.reg


def read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def test_the_record_is_written_before_start_returns_and_durable_by_wait(
        reg, tmp_path, monkeypatch):
    """start() returns with the record written but its syncs still
    running; wait() returns once both the record and its directory are
    synced, and not before.
    """
    reg._cid_dir(CID)           # made (and synced) before
    gate = threading.Event()
    done = []
    real_sync_fd, real_fsync_dir = cache_registry._sync_fd, fileio.fsync_dir

    def slow_sync_fd(fd):
        gate.wait(10)
        real_sync_fd(fd)
        done.append("bytes")

    def slow_fsync_dir(path):
        gate.wait(10)
        real_fsync_dir(path)
        done.append(path)
    monkeypatch.setattr(cache_registry, "_sync_fd", slow_sync_fd)
    monkeypatch.setattr(fileio, "fsync_dir", slow_fsync_dir)
    disk = str(tmp_path / "disk")
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        st = os.fstat(made.fd)
        intent = reg.start(CID, "img", disk, None, "/b/" + CID, "qcow2", st,
                           fd=made.fd)
        record = read_json(intent.path)
        assert done == []
        assert (record["state"], record["tmp"], record["ino"],
                record["dev"], record["disk"]) == (
            "intent", None, st.st_ino, st.st_dev, disk)
        # Labelled through the descriptor: the file has no name.
        assert os.getxattr(made.fd, cache_registry.MARK_XATTR) == (
            record["mark"].encode())
        gate.set()
        assert intent.wait() == intent.path
        assert sorted(done) == sorted(["bytes",
                                       os.path.dirname(intent.path)])
        made.link("disk")
    finally:
        made.close()
    assert reg.find(disk)["_path"] == intent.path


def test_begin_syncs_in_this_thread(reg, tmp_path, monkeypatch):
    threads = []
    real = cache_registry._sync_fd
    monkeypatch.setattr(cache_registry, "_sync_fd", lambda fd: (
        threads.append(threading.current_thread()), real(fd)))
    monkeypatch.setattr(fileio, "Background", None)     # never used
    reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    assert threads == [threading.current_thread()]


@pytest.mark.parametrize("failing", ["bytes", "name"])
def test_a_record_that_cannot_be_made_durable_is_removed(
        reg, tmp_path, monkeypatch, failing):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    reg._cid_dir(CID)
    if failing == "bytes":
        real = cache_registry._sync_fd
        monkeypatch.setattr(cache_registry, "_sync_fd",
                            lambda fd: (real(fd), full()))
    else:
        monkeypatch.setattr(fileio, "fsync_dir", full)
    intent = reg.start(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    with pytest.raises(OSError) as err:
        intent.wait()
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert not os.path.exists(intent.path)
    assert reg._written == {}


def test_the_record_descriptor_is_closed_even_if_its_sync_fails(
        monkeypatch, tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)

    def fails(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fsync", fails)
    with pytest.raises(OSError):
        cache_registry._sync_fd(fd)
    monkeypatch.undo()
    with pytest.raises(OSError) as err:
        os.fstat(fd)
    assert err.value.errno == errno.EBADF


def _unnamed_disk(reg, tmp_path):
    """An intent record of a disk made without a name, then linked as
    ``disk``: (record path, its bytes, the disk's path).
    """
    disk = str(tmp_path / "disk")
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        st = os.fstat(made.fd)
        path = reg.start(CID, "img", disk, None, "/b/" + CID, "qcow2", st,
                         fd=made.fd).wait()
        made.link("disk")
    finally:
        made.close()
    with open(path, "rb") as f:
        return path, f.read(), disk


def test_confirm_uses_the_record_this_process_wrote(reg, tmp_path,
                                                    monkeypatch):
    path, _, disk = _unnamed_disk(reg, tmp_path)
    written = read_json(path)
    opened = []
    real = fileio.read_json
    monkeypatch.setattr(fileio, "read_json", lambda *a, **k: (
        opened.append(a[0]), real(*a, **k))[1])
    reg.confirm(path, os.stat(disk))
    assert opened == []         # not read back
    assert reg._written == {}
    monkeypatch.undo()
    [found] = reg.records(CID)
    assert found == dict(written, state="done", _path=path)
    # A second confirm reads what is there (done by its label), and
    # rewrites it.
    monkeypatch.setattr(fileio, "read_json", lambda *a, **k: (
        opened.append(a[0]), real(*a, **k))[1])
    reg.confirm(path)
    assert opened == [path]
    assert read_json(path) == dict(written, state="done")


def test_confirm_labels_a_record_whose_state_alone_changes(
        reg, tmp_path, monkeypatch):
    """No file is made, renamed or written: the record keeps its bytes
    and gets the done label; it reads as done.
    """
    path, before, disk = _unnamed_disk(reg, tmp_path)
    inode = os.lstat(path).st_ino
    calls = []
    for name in ("open", "rename", "write", "fsync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _n=name, _r=real: (
            calls.append(_n), _r(*a))[1])
    reg.confirm(path, os.stat(disk))
    monkeypatch.undo()
    assert calls == []
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.lstat(path).st_ino == inode
    assert os.getxattr(path, cache_registry.STATE_XATTR) == b"done"
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    found = reg.find(disk)
    assert (found["_path"], found["state"], found["tmp"]) == (path, "done",
                                                              None)


def test_confirm_rewrites_a_record_it_cannot_label(reg, tmp_path,
                                                   monkeypatch):
    path, before, disk = _unnamed_disk(reg, tmp_path)

    def unsupported(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "setxattr", unsupported)
    reg.confirm(path, os.stat(disk))
    monkeypatch.undo()
    assert read_json(path) == dict(json.loads(before), state="done")
    assert cache_registry.STATE_XATTR not in os.listxattr(path)
    assert reg.find(disk)["state"] == "done"


def test_confirm_rewrites_a_record_of_another_file(reg, tmp_path):
    """The disk published is not the file the record names (a hook
    replaced it): the record is rewritten to name it, not labelled.
    """
    path, before, disk = _unnamed_disk(reg, tmp_path)
    os.rename(disk, str(tmp_path / "old"))
    with open(disk, "wb") as f:
        f.write(b"new")
    st = os.stat(disk)
    reg.confirm(path, st)
    assert read_json(path) == dict(json.loads(before), state="done",
                                   ino=st.st_ino, dev=st.st_dev)
    assert cache_registry.STATE_XATTR not in os.listxattr(path)


def test_confirm_without_a_stat_labels_the_record(reg, tmp_path):
    path, before, disk = _unnamed_disk(reg, tmp_path)
    reg.confirm(path)
    with open(path, "rb") as f:
        assert f.read() == before
    assert reg.find(disk)["state"] == "done"


def test_confirm_rewrites_a_record_with_a_temporary_name(reg, tmp_path):
    tmp = str(tmp_path / ".disk.1.tmp")
    path = reg.begin(CID, "img", str(tmp_path / "disk"), tmp, None, "raw")
    reg.confirm(path)
    assert (read_json(path)["state"], read_json(path)["tmp"]) == ("done",
                                                                  None)
    assert cache_registry.STATE_XATTR not in os.listxattr(path)


@pytest.mark.parametrize("label, state", [(b"done", "done"),
                                          (b"done\0", "intent"),
                                          (b"intent", "intent"),
                                          (b"DONE", "intent")])
def test_only_the_done_label_makes_an_intent_record_done(reg, tmp_path,
                                                         label, state):
    path = reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    os.setxattr(path, cache_registry.STATE_XATTR, label)
    assert [r["state"] for r in reg.records(CID)] == [state]


def test_a_label_never_undoes_a_done_record(reg, tmp_path):
    path = reg.begin(CID, "img", str(tmp_path / "disk"),
                     str(tmp_path / ".disk.1.tmp"), None, "raw")
    reg.confirm(path)
    os.setxattr(path, cache_registry.STATE_XATTR, b"intent")
    assert [r["state"] for r in reg.records(CID)] == ["done"]


def test_a_labelled_record_whose_disk_is_gone_is_collected_at_once(
        reg, tmp_path):
    path, _, disk = _unnamed_disk(reg, tmp_path)
    reg.confirm(path, os.stat(disk))
    os.unlink(disk)
    # Well within the grace of an intent record.
    assert reg.collect(CID, lambda p, st: [], now=time.time()) == 1
    assert not os.path.exists(path)


def test_an_unlabelled_intent_record_is_kept_within_its_grace(reg,
                                                              tmp_path):
    path, _, disk = _unnamed_disk(reg, tmp_path)
    os.unlink(disk)
    assert reg.collect(CID, lambda p, st: [], now=time.time()) == 0
    assert os.path.exists(path)


def test_confirm_of_a_record_removed_meanwhile_says_so(reg, tmp_path):
    path = reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    os.unlink(path)
    with pytest.raises(FileNotFoundError):
        reg.confirm(path)
    assert not os.path.exists(path)
    assert reg._written == {}


def test_confirm_leaves_no_hidden_file_when_the_rename_fails(
        reg, tmp_path, monkeypatch):
    # A temporary name to forget: the record is rewritten.
    path = reg.begin(CID, "img", str(tmp_path / "disk"),
                     str(tmp_path / ".disk.1.tmp"), None, "raw")
    before = read_json(path)

    def fails(src, dst):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "rename", fails)
    with pytest.raises(OSError):
        reg.confirm(path)
    monkeypatch.undo()
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    assert read_json(path) == before


def test_confirm_of_a_short_write_leaves_the_intent(reg, tmp_path,
                                                    monkeypatch):
    path = reg.begin(CID, "img", str(tmp_path / "disk"),
                     str(tmp_path / ".disk.1.tmp"), None, "raw")
    before = read_json(path)
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:5]))
    with pytest.raises(OSError) as err:
        reg.confirm(path)
    monkeypatch.undo()
    assert (err.value.errno, err.value.strerror) == (errno.EIO,
                                                     "short write")
    assert err.value.filename == os.path.join(
        os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    assert read_json(path) == before


def test_rollback_forgets_the_record_written(reg, tmp_path):
    path = reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    assert list(reg._written) == [path]
    reg.rollback(path)
    assert reg._written == {}
    assert not os.path.exists(path)


def test_a_label_through_a_descriptor(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert cache_registry._set_mark(fd, "0123") is True
    finally:
        os.close(fd)
    assert os.getxattr(path, cache_registry.MARK_XATTR) == b"0123"
    assert cache_registry._set_mark(-1, "0123") is False


@pytest.mark.parametrize("failing", ["bytes", "name"])
def test_begin_removes_a_record_it_cannot_make_durable(reg, tmp_path,
                                                       monkeypatch, failing):
    reg._cid_dir(CID)           # made (and synced) before
    calls = []

    def full(arg):
        calls.append(arg)
        raise OSError(errno.ENOSPC, "No space left on device")
    if failing == "bytes":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr(fileio, "fsync_dir", full)
    with pytest.raises(OSError) as err:
        reg.begin(CID, "img", str(tmp_path / "disk"), None, None, "raw")
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert calls       # and the rollback flushed its removal too
    assert os.listdir(os.path.join(reg.directory, CID)) == []
    assert reg._written == {}


def test_confirm_never_labels_the_file_a_symlink_points_at(reg, tmp_path):
    path, _, disk = _unnamed_disk(reg, tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(b"{}")
    os.unlink(path)
    os.symlink(elsewhere, path)
    reg.confirm(path, os.stat(disk))
    assert cache_registry.STATE_XATTR not in os.listxattr(elsewhere)
    assert elsewhere.read_bytes() == b"{}"
    # Rewritten in its place instead.
    assert not os.path.islink(path)
    assert read_json(path)["state"] == "done"
