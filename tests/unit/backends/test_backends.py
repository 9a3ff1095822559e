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

"""Backend hooks with the qemu-img runner mocked.

What every backend promises is in the contract suite
(tests/contract/backend.py, run by test_backend_contract.py).
"""

import errno
import os
from unittest import mock

import pytest

from imagebackend.backends import base
from imagebackend.common import digest as content_digest
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from tests import fakes
from tests.unit.cache import test_templates

MiB = 1024 * 1024
RAW = b"disk" + bytes(MiB)


@pytest.fixture
def qemu():
    q = mock.create_autospec(qemu_img.QemuImg, instance=True)

    def create(path, fmt, size=None, **kwargs):
        with open(path, "wb") as f:
            # An overlay as qemu-img lays it out, so that it can serve as
            # an overlay template.
            f.write(test_templates.overlay_bytes(
                kwargs["backing_file"], kwargs["backing_fmt"], size)
                if kwargs.get("backing_file") else b"QFI\xfb")
    q.create.side_effect = create
    return q


def load(tmp_path, qemu, name, **overrides):
    conf = fakes.conf(tmp_path, **overrides)
    source = fakes.FakeSource(conf, images={"img": RAW})
    return base.load(conf, name, source=source, qemu=qemu)


def test_qcow2_overlay_names_backing_file_and_format(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    target = str(tmp_path / "vm" / "disk")
    disk = backend.create_image("img", target, 10 * MiB)
    base_path = backend.cache.base_path(content_digest.cache_id("img"))
    # qemu-img makes the overlay template once; the disk is its copy.
    qemu.create.assert_called_once_with(mock.ANY, "qcow2", 10 * MiB,
                                        backing_file=base_path,
                                        backing_fmt="raw", options=None)
    template = qemu.create.call_args.args[0]
    assert os.path.dirname(template) == backend.cache.base_dir
    with open(target, "rb") as f:
        assert f.read() == test_templates.overlay_bytes(base_path, "raw",
                                                        10 * MiB)
    assert os.listdir(os.path.dirname(target)) == ["disk"]
    assert disk.format == "qcow2"
    assert set(disk.timings) >= {"lookup", "fetch", "extend", "overlay"}


def test_cached_base_makes_one_sized_base_per_size(tmp_path, qemu):
    backend = load(tmp_path, qemu, "cached-base")
    for name in ("a", "b"):
        backend.create_image("img", str(tmp_path / name), 10 * MiB)
    sized = [n for n in os.listdir(backend.cache.base_dir)
             if "_" in n and not n.endswith(".json")
             and ".template-" not in n]
    assert len(sized) == 1 and sized[0].endswith("_%d" % (10 * MiB))
    path = os.path.join(backend.cache.base_dir, sized[0])
    assert os.path.getsize(path) == 10 * MiB
    with open(path, "rb") as f:
        assert f.read(len(RAW)) == RAW
    # One overlay template per sized base: both disks are its copies.
    backing = [c.kwargs["backing_file"] for c in qemu.create.call_args_list]
    assert backing == [path]


def test_raw_backend_copies_without_qemu(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    target = tmp_path / "disk"
    disk = backend.create_image("img", str(target), 4 * MiB)
    assert qemu.method_calls == []
    assert target.stat().st_size == 4 * MiB
    assert target.read_bytes()[:len(RAW)] == RAW
    assert disk.backing_chain == []


def test_failed_overlay_removes_the_target(tmp_path, qemu):
    def half(path, fmt, size=None, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise exception.QemuImgError(operation="create", path=path,
                                     exit_code=1, stderr="disk full")
    qemu.create.side_effect = half
    backend = load(tmp_path, qemu, "qcow2")
    target = tmp_path / "disk"
    with pytest.raises(exception.QemuImgError):
        backend.create_image("img", str(target), 4 * MiB)
    assert not target.exists()


def test_size_must_be_a_positive_integer(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    for size in (0, -1, 1.5, "1G"):
        with pytest.raises(exception.InvalidImageSize):
            backend.create_image("img", str(tmp_path / "d"), size)


def test_unknown_backend_lists_the_choices(tmp_path, qemu):
    with pytest.raises(exception.BackendNotFound) as err:
        load(tmp_path, qemu, "lvm")
    assert "cached-base, qcow2, raw" in str(err.value)


# -- atomic creation, the registry, refused targets ---------------------------

def records_of(backend, target):
    return [r for r in backend.cache.scanner.registry.records()
            if r["disk"] == str(target)]


def test_intent_is_recorded_before_the_overlay_names_a_base(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    target = tmp_path / "vm" / "disk"
    base_path = backend.cache.base_path(content_digest.cache_id("img"))
    seen = []

    def create(path, fmt, size=None, **kwargs):
        seen.extend(records_of(backend, target))
        with open(path, "wb") as f:
            f.write(test_templates.overlay_bytes(base_path, "raw", size))
    qemu.create.side_effect = create
    backend.create_image("img", str(target), 10 * MiB)
    assert [(r["state"], r["base"], r["format"], r["image_id"])
            for r in seen] == [("intent", base_path, "qcow2", "img")]
    # The disk under its hidden temporary name beside the target.
    tmp = seen[0]["tmp"]
    assert os.path.dirname(tmp) == os.path.dirname(target)
    assert os.path.basename(tmp).startswith(".disk.")
    [done] = records_of(backend, target)
    assert done["state"] == "done" and done["tmp"] is None
    assert done["ino"] == os.stat(target).st_ino
    assert done["_path"] == seen[0]["_path"]
    assert backend.cache.scanner.registry.find(str(target))["format"] == (
        "qcow2")


def test_raw_disks_are_recorded_without_a_base(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    target = tmp_path / "disk"
    backend.create_image("img", str(target), 4 * MiB)
    [record] = records_of(backend, target)
    assert (record["format"], record["base"], record["state"]) == (
        "raw", None, "done")
    assert backend.cache.scanner.registry.find(str(target))["format"] == (
        "raw")


def test_failed_overlay_removes_its_temp_file_and_record(tmp_path, qemu):
    def half(path, fmt, size=None, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise exception.QemuImgError(operation="create", path=path,
                                     exit_code=1, stderr="disk full")
    qemu.create.side_effect = half
    backend = load(tmp_path, qemu, "qcow2")
    (tmp_path / "vm").mkdir()
    with pytest.raises(exception.QemuImgError) as err:
        backend.create_image("img", str(tmp_path / "vm" / "disk"), 4 * MiB)
    # The message names the disk asked for, not the temporary file.
    assert isinstance(err.value, exception.DiskNotCreated)
    assert str(tmp_path / "vm" / "disk") in str(err.value)
    assert ".tmp" not in str(err.value)
    assert os.listdir(tmp_path / "vm") == []
    assert list(backend.cache.scanner.registry.records()) == []


def test_prune_during_a_creation_keeps_its_record_and_base(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    conf = backend.conf
    conf.set_override("remove_unused_original_minimum_age_seconds", 0,
                      group="image_cache")
    target = tmp_path / "elsewhere" / "disk"
    reports = []

    def create(path, fmt, size=None, **kwargs):
        with open(path, "wb") as f:
            f.write(b"QFI\xfb")
        reports.append(backend.cache.prune())
    qemu.create.side_effect = create
    disk = backend.create_image("img", str(target), 4 * MiB)
    assert reports[0].removed == []
    assert reports[0].registry_records_removed == 0
    assert os.path.exists(disk.backing_file)
    assert [r["state"] for r in records_of(backend, target)] == ["done"]


def test_target_inside_the_cache_or_lock_directory_is_refused(tmp_path,
                                                              qemu):
    backend = load(tmp_path, qemu, "raw")
    backend.cache.store.ensure_dirs()
    base_dir = backend.cache.base_dir
    os.symlink(base_dir, str(tmp_path / "link"))
    targets = [os.path.join(base_dir, "x"), base_dir,
               os.path.join(base_dir, ".disks", "x"),
               os.path.join(backend.cache.lock_dir, "x"),
               str(tmp_path / "link" / "x"),
               str(tmp_path / "link" / "new" / "x")]
    for target in targets:
        with pytest.raises(exception.InvalidTarget) as err:
            backend.create_image("img", target, 4 * MiB)
        assert "only the cache writes" in str(err.value)
        assert target in str(err.value)
    assert os.listdir(base_dir) == []
    assert os.listdir(backend.cache.lock_dir) == []


@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_a_target_naming_a_directory_is_refused(tmp_path, qemu, suffix):
    backend = load(tmp_path, qemu, "raw")
    target = str(tmp_path / "vm") + suffix
    with pytest.raises(exception.InvalidTarget) as err:
        backend.create_image("img", target, 4 * MiB)
    assert "give the path of the disk file" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_failure_removes_only_the_directories_it_made(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    (tmp_path / "keep").mkdir()
    with pytest.raises(exception.ImageNotFound):
        backend.create_image(
            "missing", str(tmp_path / "keep" / "a" / "b" / "disk"), 4 * MiB)
    assert os.listdir(tmp_path / "keep") == []
    with pytest.raises(exception.ImageNotFound):
        backend.create_image("missing", str(tmp_path / "new" / "disk"),
                             4 * MiB)
    assert not (tmp_path / "new").exists()


def test_a_size_beyond_any_file_is_refused_up_front(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    with pytest.raises(exception.InvalidImageSize) as err:
        backend.create_image("img", str(tmp_path / "vm" / "disk"), 2 ** 63)
    assert str(2 ** 63) in str(err.value)
    assert not (tmp_path / "vm").exists()


def test_a_size_the_filesystem_refuses_is_a_clear_error(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    target = tmp_path / "vm" / "disk"
    size = 64 * 1024 ** 4
    real = os.ftruncate

    def ftruncate(fd, length):
        if length == size:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real(fd, length)
    with mock.patch("os.ftruncate", side_effect=ftruncate):
        with pytest.raises(exception.InvalidImageSize) as err:
            backend.create_image("img", str(target), size)
    message = str(err.value)
    assert str(target) in message and str(size) in message
    assert "smaller size" in message
    assert not (tmp_path / "vm").exists()
    assert list(backend.cache.scanner.registry.records()) == []


def test_a_full_filesystem_is_a_clear_error(tmp_path, qemu):
    backend = load(tmp_path, qemu, "raw")
    target = tmp_path / "vm" / "disk"
    with mock.patch("imagebackend.common.sparseio.sparse_copy",
                    side_effect=OSError(errno.ENOSPC, "No space left")):
        with pytest.raises(exception.DiskOperationError) as err:
            backend.create_image("img", str(target), 4 * MiB)
    assert str(target) in str(err.value)
    assert "free space" in str(err.value)
    assert not (tmp_path / "vm").exists()


@pytest.mark.parametrize("force_raw", [True, False])
@pytest.mark.parametrize("name", ["qcow2", "cached-base", "raw"])
def test_a_cache_hit_on_a_qcow2_image_refuses_a_smaller_disk(
        tmp_path, name, force_raw):
    # The source gives no virtual size for a qcow2 image, so on a cache hit
    # only the cached base's own size can refuse the disk (for a raw image
    # the source's byte count refuses it before the cache is consulted).
    conf = fakes.conf(tmp_path, force_raw_images=force_raw)
    image = fakes.fake_qcow2(8 * MiB, b"guest data")
    source = fakes.FakeSource(conf, images={"q": image})
    qemu_obj, _ = fakes.fake_qemu(conf)
    backend = base.load(conf, name, source=source, qemu=qemu_obj)
    first = backend.create_image("q", str(tmp_path / "vm" / "a"), 8 * MiB)
    assert first.cache_hit is False
    listing = sorted(os.listdir(backend.cache.base_dir))
    target = tmp_path / "vm" / "b"
    with pytest.raises(exception.DiskSmallerThanImage) as err:
        backend.create_image("q", str(target), 4 * MiB)
    assert str(8 * MiB) in str(err.value) and str(4 * MiB) in str(err.value)
    assert source.opened == 1
    assert not target.exists()
    assert sorted(os.listdir(backend.cache.base_dir)) == listing
