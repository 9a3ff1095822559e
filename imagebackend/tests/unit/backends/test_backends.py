"""Backend hooks with the qemu-img runner mocked."""

import os
from unittest import mock

import pytest

from imagebackend.backends import base
from imagebackend import cache
from imagebackend import exception
from imagebackend import qemu_img
from imagebackend.tests.unit import fakes

MiB = 1024 * 1024
RAW = b"disk" + bytes(MiB)


@pytest.fixture
def qemu():
    q = mock.create_autospec(qemu_img.QemuImg, instance=True)

    def create(path, fmt, size=None, **kwargs):
        with open(path, "wb") as f:
            f.write(b"QFI\xfb")
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
    base_path = backend.cache.base_path(cache.cache_id("img"))
    # Built under a hidden temporary name beside the target, then named.
    qemu.create.assert_called_once_with(mock.ANY, "qcow2", 10 * MiB,
                                        backing_file=base_path,
                                        backing_fmt="raw")
    tmp = qemu.create.call_args.args[0]
    assert os.path.dirname(tmp) == os.path.dirname(target)
    assert os.path.basename(tmp).startswith(".disk.")
    assert tmp.endswith(".tmp")
    assert os.listdir(os.path.dirname(target)) == ["disk"]
    assert disk.format == "qcow2"
    assert set(disk.timings) >= {"lookup", "fetch", "extend", "overlay"}


def test_cached_base_makes_one_sized_base_per_size(tmp_path, qemu):
    backend = load(tmp_path, qemu, "cached-base")
    for name in ("a", "b"):
        backend.create_image("img", str(tmp_path / name), 10 * MiB)
    sized = [n for n in os.listdir(backend.cache.base_dir) if "_" in n]
    assert len(sized) == 1 and sized[0].endswith("_%d" % (10 * MiB))
    path = os.path.join(backend.cache.base_dir, sized[0])
    assert os.path.getsize(path) == 10 * MiB
    with open(path, "rb") as f:
        assert f.read(len(RAW)) == RAW
    backing = [c.kwargs["backing_file"] for c in qemu.create.call_args_list]
    assert backing == [path, path]


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
