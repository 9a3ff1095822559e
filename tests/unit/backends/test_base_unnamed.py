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

"""The overlay step of a backend that copies its disks (``copy_disk``):
the disk is a file without a name until it is complete, and the order of
what is made durable -- intent record (its bytes and its name) and the
disk's data before the disk's name, the name before the call returns --
holds whatever the threads do.
"""

import errno
import logging
import os
import threading
from unittest import mock

import pytest

from imagebackend.backends import base
from imagebackend.cache import registry as cache_registry
from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception
from tests import fakes
from tests.unit.backends import test_backends

MiB = 1024 * 1024
SIZE = 4 * MiB
BODY = b"QFI\xfb copied overlay"
qemu = test_backends.qemu


class Copying(base.ImageBackend):
    """A backend whose disks are copies (``copy_disk``) unless a test says
    there is nothing to copy.
    """

    name = "copying"
    disk_format = "qcow2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copies = []
        self.created = []
        self.can_copy = True

    def copy_disk(self, base_path, base_format, fd, size):
        self.copies.append((base_path, base_format, fd, size))
        if not self.can_copy:
            return False
        os.pwrite(fd, BODY, 0)
        return True

    def create_disk(self, base_path, base_format, target, size):
        self.created.append(target)
        with open(target, "wb") as f:
            f.write(b"QFI\xfb made")


def copying(tmp_path, qemu, **overrides):
    conf = fakes.conf(tmp_path, **overrides)
    source = fakes.FakeSource(conf, images={"img": test_backends.RAW})
    return Copying(conf, source=source, qemu=qemu)


def records(backend):
    return list(backend.cache.scanner.registry.records())


def test_a_copy_is_named_once_complete_and_recorded_done(tmp_path, qemu):
    backend = copying(tmp_path, qemu)
    target = tmp_path / "vm" / "disk"
    target.parent.mkdir()
    disk = backend.create_image("img", str(target), SIZE)
    assert target.read_bytes() == BODY
    assert os.listdir(target.parent) == ["disk"]     # no temporary name
    assert backend.created == []
    [(base_path, fmt, _fd, size)] = backend.copies
    assert (base_path, fmt, size) == (disk.backing_file, "raw", SIZE)
    [record] = records(backend)
    st = os.stat(target)
    assert (record["state"], record["tmp"], record["ino"], record["dev"],
            record["disk"], record["base"], record["format"]) == (
        "done", None, st.st_ino, st.st_dev, str(target), disk.backing_file,
        "qcow2")
    assert os.getxattr(target, cache_registry.MARK_XATTR) == (
        record["mark"].encode())
    assert backend.cache.disk_record(str(target))["_path"] == record["_path"]


def test_the_order_of_what_is_made_durable(tmp_path, qemu, monkeypatch):
    """The record's bytes and name and the disk's data are durable before
    the disk is linked; the record is marked done only once the disk is
    named; the name is durable before create_image returns.
    """
    backend = copying(tmp_path, qemu)
    target = str(tmp_path / "disk")
    log, lock = [], threading.Lock()

    def note(what):
        with lock:
            log.append(what)

    def after(what, func):
        def wrapped(*args):
            result = func(*args)
            note(what)
            return result
        return wrapped

    def before(what, func):
        def wrapped(*args):
            note(what)
            return func(*args)
        return wrapped

    monkeypatch.setattr(cache_registry, "_sync_fd",
                        after("record bytes", cache_registry._sync_fd))
    real_fsync_dir = fileio.fsync_dir
    monkeypatch.setattr(fileio, "fsync_dir", lambda p: after(
        "dir " + p, real_fsync_dir)(p))
    monkeypatch.setattr(os, "fdatasync", after("disk data", os.fdatasync))
    monkeypatch.setattr(fileio.Unnamed, "link", _wrap_method(
        fileio.Unnamed.link, before, "link"))
    monkeypatch.setattr(fileio.Unnamed, "sync_name", _wrap_method(
        fileio.Unnamed.sync_name, after, "name"))
    monkeypatch.setattr(cache_registry.Registry, "confirm", _wrap_method(
        cache_registry.Registry.confirm, before, "done"))
    backend.create_image("img", target, SIZE)
    note("returned")
    record_dir = os.path.dirname(records(backend)[0]["_path"])
    link = log.index("link")
    assert log.index("record bytes") < link
    assert log.index("dir " + record_dir) < link
    assert log.index("disk data") < link
    assert link < log.index("done")
    assert log.index("name") < log.index("returned")
    assert log.count("link") == 1 and log.count("disk data") == 1


def _wrap_method(method, how, what):
    def wrapped(self, *args):
        return how(what, lambda *a: method(self, *a))(*args)
    return wrapped


def test_nothing_to_copy_makes_the_disk_the_default_way(tmp_path, qemu):
    backend = copying(tmp_path, qemu)
    backend.can_copy = False
    target = tmp_path / "vm" / "disk"
    target.parent.mkdir()
    backend.create_image("img", str(target), SIZE)
    assert len(backend.copies) == 1
    [tmp] = backend.created
    assert os.path.dirname(tmp) == str(target.parent) and tmp != str(target)
    assert target.read_bytes() == b"QFI\xfb made"
    # Only the record of the disk made: the copy's was removed.
    [record] = records(backend)
    assert (record["state"], record["ino"]) == ("done",
                                                os.stat(target).st_ino)
    assert os.listdir(target.parent) == ["disk"]


def test_a_backend_without_the_hook_never_makes_an_unnamed_file(tmp_path,
                                                                qemu):
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={"img": test_backends.RAW})
    backend = base.load(conf, "raw", source=source, qemu=qemu)
    with mock.patch.object(fileio.Unnamed, "make") as make:
        backend.create_image("img", str(tmp_path / "disk"), SIZE)
    make.assert_not_called()


def test_without_unnamed_files_the_default_way_makes_the_disk(tmp_path,
                                                              qemu):
    backend = copying(tmp_path, qemu)
    target = tmp_path / "disk"
    with mock.patch.object(fileio.Unnamed, "make", return_value=None):
        backend.create_image("img", str(target), SIZE)
    assert backend.copies == [] and len(backend.created) == 1
    assert target.read_bytes() == b"QFI\xfb made"
    assert [r["state"] for r in records(backend)] == ["done"]


@pytest.mark.parametrize("mode, calls", [("none", 0), ("space", 1)])
def test_preallocation_of_a_copy(tmp_path, qemu, mode, calls):
    backend = copying(tmp_path, qemu, preallocate_images=mode)
    with mock.patch.object(sparseio, "preallocate") as prealloc:
        backend.create_image("img", str(tmp_path / "disk"), SIZE)
    assert prealloc.call_count == calls
    if calls:
        [(_, _, fd, _)] = backend.copies
        prealloc.assert_called_once_with(fd, SIZE, keep_size=True)


def test_a_failed_copy_leaves_nothing(tmp_path, qemu):
    backend = copying(tmp_path, qemu)
    (tmp_path / "vm").mkdir()

    def fail(*args):
        os.pwrite(args[2], BODY, 0)
        raise OSError(errno.EIO, "I/O error")
    backend.copy_disk = fail
    with pytest.raises(exception.DiskOperationError) as err:
        backend.create_image("img", str(tmp_path / "vm" / "d"), SIZE)
    assert "I/O error" in str(err.value)
    assert os.listdir(tmp_path / "vm") == []
    assert records(backend) == []
    assert backend.created == []


def test_a_record_that_cannot_be_made_durable_names_nothing(
        tmp_path, qemu, monkeypatch):
    backend = copying(tmp_path, qemu)
    (tmp_path / "vm").mkdir()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache_registry, "_sync_fd", full)
    with mock.patch.object(fileio.Unnamed, "link") as link:
        with pytest.raises(exception.CacheError) as err:
            backend.create_image("img", str(tmp_path / "vm" / "d"), SIZE)
    link.assert_not_called()
    assert str(tmp_path / "vm" / "d") in str(err.value)
    assert "No space left" in str(err.value)
    assert os.listdir(tmp_path / "vm") == []
    assert records(backend) == []


def test_a_failed_disk_flush_waits_for_the_record_and_removes_it(
        tmp_path, qemu, monkeypatch):
    backend = copying(tmp_path, qemu)
    (tmp_path / "vm").mkdir()
    synced = []
    real = cache_registry._sync_fd
    monkeypatch.setattr(cache_registry, "_sync_fd",
                        lambda fd: (real(fd), synced.append(fd)))

    def fails(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fdatasync", fails)
    with pytest.raises(exception.DiskOperationError):
        backend.create_image("img", str(tmp_path / "vm" / "d"), SIZE)
    assert len(synced) == 1
    assert os.listdir(tmp_path / "vm") == []
    assert records(backend) == []


def test_a_target_taken_meanwhile_is_left_alone(tmp_path, qemu):
    backend = copying(tmp_path, qemu)
    target = tmp_path / "disk"
    real = backend.copy_disk

    def other_wins(*args):
        target.write_bytes(b"the winner's")
        return real(*args)
    backend.copy_disk = other_wins
    with pytest.raises(exception.TargetExists) as err:
        backend.create_image("img", str(target), SIZE)
    assert err.value.kwargs["path"] == str(target)
    assert str(target) in str(err.value)
    assert target.read_bytes() == b"the winner's"
    assert records(backend) == []
    assert sorted(os.listdir(tmp_path)) == ["disk", "instances"]


def test_a_name_that_cannot_be_made_durable_is_removed(tmp_path, qemu,
                                                       monkeypatch):
    backend = copying(tmp_path, qemu)
    (tmp_path / "vm").mkdir()
    target = tmp_path / "vm" / "d"
    real = os.fsync

    def fails_on_the_disks_directory(fd):
        if os.path.samestat(os.fstat(fd), os.stat(tmp_path / "vm")):
            raise OSError(errno.EIO, "I/O error")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fails_on_the_disks_directory)
    with pytest.raises(exception.DiskOperationError) as err:
        backend.create_image("img", str(target), SIZE)
    assert str(target) in str(err.value)
    assert os.listdir(tmp_path / "vm") == []
    assert records(backend) == []


@pytest.mark.parametrize("when", ["before", "while"])
def test_a_directory_removed_meanwhile_is_made_again(tmp_path, qemu, when):
    """A concurrent call that made the target's directory fails and
    removes it: it looked empty, as an unnamed file is no entry.  The disk
    is made the default way, in the directory made again.
    """
    backend = copying(tmp_path, qemu)
    target = tmp_path / "vm" / "disk"
    real_make, real_copy = fileio.Unnamed.make, backend.copy_disk

    def removed_before(directory, *args):
        os.rmdir(directory)
        return real_make(directory, *args)

    def removed_while(*args):
        os.rmdir(target.parent)
        return real_copy(*args)
    if when == "before":
        patch = mock.patch.object(fileio.Unnamed, "make", removed_before)
    else:
        patch = mock.patch.object(backend, "copy_disk", removed_while)
    with patch:
        disk = backend.create_image("img", str(target), SIZE)
    assert disk.path == str(target)
    assert target.read_bytes() == b"QFI\xfb made"
    assert os.listdir(target.parent) == ["disk"]
    [record] = records(backend)
    assert (record["state"], record["ino"]) == ("done",
                                                os.stat(target).st_ino)


def test_the_default_copy_hook_copies_nothing(tmp_path, qemu):
    backend = copying(tmp_path, qemu)
    assert base.ImageBackend.copy_disk(backend, "/b", "raw", 0, SIZE) is (
        False)


def test_a_failed_copy_whose_record_also_failed_logs_it(
        tmp_path, qemu, monkeypatch, caplog):
    backend = copying(tmp_path, qemu)
    (tmp_path / "vm").mkdir()

    def full(fd):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache_registry, "_sync_fd", full)

    def fail(*args):
        raise OSError(errno.EIO, "I/O error")
    backend.copy_disk = fail
    caplog.set_level(logging.DEBUG, logger="imagebackend.backends.base")
    with pytest.raises(exception.DiskOperationError) as err:
        backend.create_image("img", str(tmp_path / "vm" / "d"), SIZE)
    assert "I/O error" in str(err.value)
    [message] = [r.getMessage() for r in caplog.records
                 if r.name == "imagebackend.backends.base"
                 and r.levelno == logging.DEBUG]
    assert message.startswith("Disk record not made durable: Image cache ")
    assert ("cannot record disk %s in the cache ([Errno 28] No space left "
            "on device)" % (tmp_path / "vm" / "d")) in message
    assert os.listdir(tmp_path / "vm") == []
    assert records(backend) == []


class RawCopying(Copying):
    """A backend whose disks are raw copies (no backing file)."""

    name = "raw-copying"
    disk_format = "raw"
    uses_backing_file = False


def test_a_raw_copy_is_recorded_raw_and_preallocated_to_its_size(
        tmp_path, qemu):
    conf = fakes.conf(tmp_path, preallocate_images="space")
    source = fakes.FakeSource(conf, images={"img": test_backends.RAW})
    backend = RawCopying(conf, source=source, qemu=qemu)
    target = tmp_path / "disk"
    with mock.patch.object(sparseio, "preallocate") as prealloc:
        disk = backend.create_image("img", str(target), SIZE)
    [(_, _, fd, _)] = backend.copies
    prealloc.assert_called_once_with(fd, SIZE, keep_size=False)
    [record] = records(backend)
    assert (record["format"], record["base"], record["state"]) == (
        "raw", None, "done")
    assert disk.backing_chain == []
