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

"""The template method, exactly: the Disk it returns, what each step is
given, the registry record tied to the published file, preallocation, the
errors of the extend step, and the defaults a backend is built with.
"""

import errno
import logging
import os
from unittest import mock

import pytest

from imagebackend.backends import base
from imagebackend.cache import disk_records
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.sources import local
from tests import fakes
from tests.unit.backends import test_backends

MiB = 1024 * 1024
RAW = test_backends.RAW
SIZE = 4 * MiB
qemu = test_backends.qemu
load = test_backends.load


def records_of(backend, target):
    return [r for r in backend.cache.scanner.registry.records()
            if r["disk"] == str(target)]


# -- the values describing a disk ---------------------------------------------

def test_disk_and_libvirt_values():
    disk = base.Disk(path="/vm/disk", format="qcow2", virtual_size=5,
                     image_id="img", backend="qcow2",
                     backing_chain=["/b1", "/b2"], cache_hit=True,
                     timings={"fetch": 1.5})
    assert disk.backing_file == "/b1"
    lv = disk.libvirt_disk()
    assert lv == base.LibvirtDisk(source_type="file", source_path="/vm/disk",
                                  driver_name="qemu", driver_type="qcow2",
                                  backing_chain=("/b1", "/b2"))
    assert lv.to_dict() == {"source_type": "file", "source_path": "/vm/disk",
                            "driver_name": "qemu", "driver_type": "qcow2",
                            "backing_chain": ["/b1", "/b2"]}
    assert disk.to_dict() == {
        "path": "/vm/disk", "format": "qcow2", "virtual_size": 5,
        "image_id": "img", "backend": "qcow2",
        "backing_chain": ["/b1", "/b2"], "cache_hit": True,
        "timings": {"fetch": 1.5}, "backing_file": "/b1"}
    raw = base.Disk(path="/vm/disk", format="raw", virtual_size=5,
                    image_id="img", backend="raw", backing_chain=[],
                    cache_hit=False, timings={})
    assert raw.backing_file is None
    assert raw.to_dict()["backing_file"] is None
    assert raw.libvirt_disk().backing_chain == ()


def test_copy_sparse_grown_keeps_content_and_holes_and_grows(tmp_path):
    src = tmp_path / "src"
    data = b"head" * 1024 + bytes(MiB) + b"tail" * 1024
    src.write_bytes(data)
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with mock.patch.object(base.os, "fsync", wraps=os.fsync) as fsync:
            base.copy_sparse_grown(str(src), fd, 3 * MiB)
        fsync.assert_called_once_with(fd)
    finally:
        os.close(fd)
    assert os.path.getsize(dst) == 3 * MiB
    assert dst.read_bytes() == data + bytes(3 * MiB - len(data))
    assert sparseio.allocated_bytes(str(dst)) < 2 * MiB


# -- what a backend is built with ---------------------------------------------

def test_a_backend_builds_its_own_qemu_img_and_source(tmp_path):
    conf = fakes.conf(tmp_path, image_source="local")
    local.LocalSource.register_opts(conf)
    (tmp_path / "images").mkdir()
    conf.set_override("path", str(tmp_path / "images"), group="local_source")
    backend = base.load(conf, "raw")
    assert type(backend.qemu) is qemu_img.QemuImg
    assert backend.qemu.conf is conf
    assert type(backend.source) is local.LocalSource
    assert backend.cache.qemu is backend.qemu
    assert backend.cache.source is backend.source
    assert backend.conf is conf


def test_a_backend_uses_what_it_is_given(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    assert backend.qemu is qemu
    assert backend.cache.qemu is qemu
    assert type(backend.source) is fakes.FakeSource
    assert backend.cache.source is backend.source


def test_disk_ops_run_through_the_backends_qemu_img(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    ops = backend.disk_ops
    assert ops is backend.disk_ops
    assert ops.qemu is qemu
    assert ops.conf is backend.conf
    assert type(ops.records) is disk_records.DiskRecords


def test_load_defaults_to_the_configured_backend(tmp_path, qemu):
    conf = fakes.conf(tmp_path, images_type="cached-base")
    source = fakes.FakeSource(conf, images={"img": RAW})
    backend = base.load(conf, source=source, qemu=qemu)
    assert backend.name == "cached-base"
    assert base.load(conf, "raw", source=source, qemu=qemu).name == "raw"


# -- the template method ------------------------------------------------------

@pytest.mark.parametrize("name, fmt", [("qcow2", "qcow2"), ("raw", "raw")])
def test_the_disk_returned_says_exactly_what_was_made(tmp_path, qemu, name,
                                                      fmt):
    backend = load(tmp_path, qemu, name)
    base_path = backend.cache.base_path(content_digest.cache_id("img"))
    chain = [base_path] if name == "qcow2" else []
    first = str(tmp_path / "vm" / "a")
    disk = backend.create_image("img", first, SIZE)
    assert (disk.path, disk.format, disk.virtual_size, disk.image_id,
            disk.backend, disk.backing_chain, disk.cache_hit) == (
        first, fmt, SIZE, "img", name, chain, False)
    for step in ("extend", "overlay"):
        assert 0 <= disk.timings[step] < 60
    disk = backend.create_image("img", str(tmp_path / "vm" / "b"), 2 * SIZE)
    assert (disk.virtual_size, disk.cache_hit) == (2 * SIZE, True)


def test_a_created_disk_is_logged(tmp_path, qemu, caplog):
    backend = load(tmp_path, qemu, "qcow2")
    caplog.set_level(logging.INFO, logger=base.__name__)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    backend.create_image("img", a, SIZE)
    backend.create_image("img", b, SIZE)
    messages = [r.getMessage() for r in caplog.records
                if r.name == base.__name__]
    assert messages == [
        "Created qcow2 disk %s (%d bytes) from image img" % (a, SIZE),
        "Created qcow2 disk %s (%d bytes) from image img (cache hit)"
        % (b, SIZE)]


def test_the_cache_is_asked_for_the_size_and_progress(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    seen = []
    with mock.patch.object(backend.cache, "get",
                           wraps=backend.cache.get) as get:
        backend.create_image("img", str(tmp_path / "d"), SIZE,
                             progress=lambda *a: seen.append(a))
    get.assert_called_once_with("img", requested_size=SIZE,
                                progress=mock.ANY, timings=mock.ANY)
    assert get.call_args.kwargs["progress"] is not None
    assert seen and all(s[0].startswith(("download", "fetch", "convert"))
                        for s in seen)


def test_a_disk_of_exactly_the_images_size_is_made(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    disk = backend.create_image("img", str(tmp_path / "d"), len(RAW))
    assert disk.virtual_size == len(RAW)
    assert os.path.getsize(tmp_path / "d") == len(RAW)


def test_an_impossible_image_id_changes_nothing(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    with pytest.raises(exception.InvalidImageId):
        backend.create_image("bad\nid", str(tmp_path / "vm" / "d"), SIZE)
    assert sorted(os.listdir(tmp_path)) == []


class Hooked(base.ImageBackend):
    """A backend whose hooks a test sets."""

    name = "hooked"
    disk_format = "qcow2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.on_create = None

    def create_disk(self, base_path, base_format, target, size):
        self.calls.append((base_path, base_format, target, size))
        if self.on_create is not None:
            self.on_create(target)


def hooked(tmp_path, qemu, **overrides):
    conf = fakes.conf(tmp_path, **overrides)
    source = fakes.FakeSource(conf, images={"img": RAW})
    return Hooked(conf, source=source, qemu=qemu)


def test_the_default_extend_hook_gives_the_cached_base(tmp_path, qemu):
    backend = hooked(tmp_path, qemu)
    target = str(tmp_path / "vm" / "disk")
    disk = backend.create_image("img", target, SIZE)
    base_path = backend.cache.base_path(content_digest.cache_id("img"))
    [(given_base, given_fmt, tmp, size)] = backend.calls
    assert (given_base, given_fmt, size) == (base_path, "raw", SIZE)
    assert os.path.dirname(tmp) == os.path.dirname(target)
    assert tmp != target
    assert disk.backing_chain == [base_path]
    assert disk.backend == "hooked"


def test_the_record_is_tied_to_the_file_being_made(tmp_path, qemu):
    backend = hooked(tmp_path, qemu)
    target = tmp_path / "disk"
    seen = []
    backend.on_create = lambda tmp: seen.append(
        (os.lstat(tmp).st_ino, records_of(backend, target)))
    with mock.patch.object(backend.cache, "register_disk",
                           wraps=backend.cache.register_disk) as register:
        backend.create_image("img", str(target), SIZE)
    [(ino, [intent])] = seen
    assert (intent["state"], intent["ino"]) == ("intent", ino)
    assert register.call_count == 1
    [done] = records_of(backend, target)
    assert (done["state"], done["ino"]) == ("done", os.stat(target).st_ino)


def test_a_hook_that_replaces_the_file_gets_the_record_moved(tmp_path, qemu):
    backend = hooked(tmp_path, qemu)
    target = tmp_path / "disk"

    def replace(tmp):
        other = tmp + ".new"
        with open(other, "wb") as f:
            f.write(b"QFI\xfb replaced")
        os.rename(other, tmp)
    backend.on_create = replace
    backend.create_image("img", str(target), SIZE)
    [done] = records_of(backend, target)
    assert (done["state"], done["ino"]) == ("done", os.stat(target).st_ino)
    assert done["base"] == backend.cache.base_path(
        content_digest.cache_id("img"))
    assert (done["format"], done["image_id"]) == ("qcow2", "img")
    assert target.read_bytes() == b"QFI\xfb replaced"


def test_the_disk_is_flushed_before_it_is_named(tmp_path, qemu):
    backend = hooked(tmp_path, qemu)
    target = str(tmp_path / "disk")
    order = []
    with mock.patch.object(fileio, "fdatasync_path",
                           side_effect=lambda p: order.append(("sync", p))), \
            mock.patch.object(base.disk_target, "publish",
                              side_effect=lambda t, d: order.append(
                                  ("publish", t, d))):
        backend.create_image("img", target, SIZE)
    [(_, _, tmp, _)] = backend.calls
    assert order == [("sync", tmp), ("publish", tmp, target)]


@pytest.mark.parametrize("mode, expected", [("none", []),
                                            ("space", [SIZE])])
def test_preallocation_only_when_configured(tmp_path, qemu, mode, expected):
    backend = hooked(tmp_path, qemu, preallocate_images=mode)
    sizes = []
    with mock.patch.object(backend, "preallocate",
                           side_effect=lambda t, s: sizes.append((t, s))):
        backend.create_image("img", str(tmp_path / "disk"), SIZE)
    assert [s for _, s in sizes] == expected
    assert [t for t, _ in sizes] == [c[2] for c in backend.calls][
        :len(expected)]


def test_a_failed_record_leaves_no_temporary_file(tmp_path, qemu):
    backend = hooked(tmp_path, qemu)
    (tmp_path / "vm").mkdir()
    with mock.patch.object(backend.cache, "register_disk",
                           side_effect=exception.CacheError(
                               path="p", reason="r")), \
            mock.patch.object(backend.cache, "unregister_disk") as unreg:
        with pytest.raises(exception.CacheError):
            backend.create_image("img", str(tmp_path / "vm" / "d"), SIZE)
    unreg.assert_not_called()
    assert os.listdir(tmp_path / "vm") == []
    assert backend.calls == []


def test_a_failed_hook_unregisters_its_own_record(tmp_path, qemu):
    backend = hooked(tmp_path, qemu)

    def fail(tmp):
        raise OSError(errno.EIO, "I/O error")
    backend.on_create = fail
    (tmp_path / "vm").mkdir()
    with mock.patch.object(backend.cache, "unregister_disk",
                           wraps=backend.cache.unregister_disk) as unreg:
        with pytest.raises(exception.DiskOperationError) as err:
            backend.create_image("img", str(tmp_path / "vm" / "d"), SIZE)
    assert unreg.call_count == 1
    assert str(tmp_path / "vm" / "d") in str(err.value)
    assert "I/O error" in str(err.value)
    assert os.listdir(tmp_path / "vm") == []
    assert list(backend.cache.scanner.registry.records()) == []


@pytest.mark.parametrize("error, kind, words", [
    (errno.EFBIG, exception.InvalidImageSize,
     ["Image img:", "refused a disk of %d bytes" % SIZE,
      "ask for a smaller size"]),
    (errno.ENOSPC, exception.DiskOperationError,
     ["it could not be created"]),
])
def test_errors_of_the_extend_hook_name_the_disk(tmp_path, qemu, error,
                                                 kind, words):
    backend = hooked(tmp_path, qemu)
    target = str(tmp_path / "vm" / "disk")
    with mock.patch.object(backend, "prepare_base",
                           side_effect=OSError(error, os.strerror(error))):
        with pytest.raises(kind) as err:
            backend.create_image("img", target, SIZE)
    assert target in str(err.value)
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "vm").exists()


@pytest.mark.parametrize("step, hook_ran", [
    ("temp_beside", False), ("fdatasync_path", True)])
def test_errors_making_recording_or_flushing_name_the_disk(tmp_path, qemu,
                                                           step, hook_ran):
    backend = hooked(tmp_path, qemu)
    target = str(tmp_path / "vm" / "disk")
    with mock.patch.object(fileio, step,
                           side_effect=OSError(errno.EFBIG, "too big")):
        with pytest.raises(exception.InvalidImageSize) as err:
            backend.create_image("img", target, SIZE)
    assert str(err.value).startswith("Image img: ")
    assert target in str(err.value) and str(SIZE) in str(err.value)
    assert bool(backend.calls) is hook_ran
    assert list(backend.cache.scanner.registry.records()) == []


# -- preallocation ------------------------------------------------------------

@pytest.mark.parametrize("name, keep_size", [("qcow2", True),
                                             ("raw", False)])
def test_preallocate_reserves_space_keeping_only_an_overlays_size(
        tmp_path, qemu, name, keep_size):
    backend = load(tmp_path, qemu, name)
    path = tmp_path / "disk"
    path.write_bytes(b"QFI\xfb")
    with mock.patch.object(sparseio, "preallocate",
                           wraps=sparseio.preallocate) as pre:
        backend.preallocate(str(path), SIZE)
    assert pre.call_args.args[1:] == (SIZE,)
    assert pre.call_args.kwargs == {"keep_size": keep_size}
    assert os.path.getsize(path) == (4 if keep_size else SIZE)
    assert sparseio.allocated_bytes(str(path)) >= SIZE
    assert path.read_bytes()[:4] == b"QFI\xfb"


def test_preallocate_never_follows_a_symlink(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    real = tmp_path / "real"
    real.write_bytes(b"")
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OSError) as err:
        backend.preallocate(str(tmp_path / "link"), SIZE)
    assert err.value.errno == errno.ELOOP
    assert real.stat().st_size == 0


def test_preallocate_opens_for_writing_and_closes(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    path = tmp_path / "disk"
    path.write_bytes(b"")
    fds = []
    real_open = os.open

    def opening(*args):
        fds.append(real_open(*args))
        return fds[-1]
    with mock.patch.object(base.os, "open", side_effect=opening) as opened, \
            mock.patch.object(base.os, "close", wraps=os.close) as closed:
        backend.preallocate(str(path), SIZE)
    opened.assert_called_once_with(str(path), os.O_WRONLY | os.O_NOFOLLOW)
    closed.assert_called_once_with(fds[0])


# -- more of what the caller is told ------------------------------------------

def test_a_size_that_is_not_a_size_names_the_image(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    with pytest.raises(exception.InvalidImageSize) as err:
        backend.create_image("img", str(tmp_path / "vm" / "d"), 0)
    assert str(err.value) == (
        "Image img: the requested disk size must be a positive number of "
        "bytes up to %d, not 0" % (2 ** 63 - 1))


def test_a_disk_smaller_than_a_cached_image_is_refused_exactly(tmp_path):
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={
        "q": fakes.fake_qcow2(8 * MiB, b"guest data")})
    qemu_obj, _ = fakes.fake_qemu(conf)
    backend = base.load(conf, "qcow2", source=source, qemu=qemu_obj)
    backend.create_image("q", str(tmp_path / "a"), 8 * MiB)
    with pytest.raises(exception.DiskSmallerThanImage) as err:
        backend.create_image("q", str(tmp_path / "b"), 8 * MiB - 512)
    assert str(err.value) == (
        "Image q: its virtual size is %d bytes, larger than the requested "
        "disk of %d bytes; request a disk of at least %d bytes (a larger "
        "flavor)." % (8 * MiB, 8 * MiB - 512, 8 * MiB))


class RawHooked(Hooked):
    """Like the raw backend: no backing file."""

    name = "raw-hooked"
    disk_format = "raw"
    uses_backing_file = False


@pytest.mark.parametrize("cls", [Hooked, RawHooked])
def test_the_moved_record_names_the_temporary_file_until_published(
        tmp_path, qemu, cls):
    conf = fakes.conf(tmp_path)
    backend = cls(conf, source=fakes.FakeSource(conf, images={"img": RAW}),
                  qemu=qemu)
    target = tmp_path / "disk"

    def replace(tmp):
        with open(tmp + ".new", "wb") as f:
            f.write(b"new")
        os.rename(tmp + ".new", tmp)
    backend.on_create = replace
    during = []
    unregister = backend.cache.unregister_disk

    def unregistering(handle):
        during.append(records_of(backend, target))
        unregister(handle)
    with mock.patch.object(backend.cache, "unregister_disk",
                           side_effect=unregistering):
        backend.create_image("img", str(target), SIZE)
    [records] = during
    [(_, _, tmp, _)] = backend.calls
    base_path = (backend.cache.base_path(content_digest.cache_id("img"))
                 if cls.uses_backing_file else None)
    new = [r for r in records if r.get("ino") == os.stat(target).st_ino]
    assert [(r["state"], r["tmp"], r["format"], r["base"]) for r in new] == [
        ("intent", tmp, cls.disk_format, base_path)]
    [done] = records_of(backend, target)
    assert (done["format"], done["base"]) == (cls.disk_format, base_path)


def test_directories_made_again_meanwhile_are_removed_on_failure(
        tmp_path, qemu):
    backend = hooked(tmp_path, qemu)
    target = tmp_path / "new" / "disk"
    real = fileio.temp_beside
    calls = []

    def vanished(final, *args):
        calls.append(final)
        if len(calls) == 1:
            # Another request that made the directory failed and removed
            # it.
            os.rmdir(os.path.dirname(final))
            raise FileNotFoundError(errno.ENOENT, "gone", final)
        return real(final, *args)

    def fail(tmp):
        raise exception.QemuImgError(operation="create", path="/x",
                                     exit_code=1, stderr="no")
    backend.on_create = fail
    with mock.patch.object(fileio, "temp_beside", side_effect=vanished):
        with pytest.raises(exception.QemuImgError):
            backend.create_image("img", str(target), SIZE)
    assert len(calls) == 2
    assert not (tmp_path / "new").exists()
