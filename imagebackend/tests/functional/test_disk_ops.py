"""Disk operations on disks made by the real pipeline, through the command
line (a child process) and the library, with the real qemu-img."""

import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import disk_ops
from imagebackend import exception
from imagebackend.tests.functional import env as fenv
from imagebackend.tests.functional import test_qemu_img as qemu_tests

MiB = fenv.MiB
IMAGE = "guest.qcow2"

pytestmark = pytest.mark.skipif(fenv.REAL_QEMU_IMG is None,
                                reason="qemu-img is not installed")


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path))
    fenv.make_qcow2(os.path.join(d.images, IMAGE), size=32 * MiB)
    return d


def make_disk(dep, name="disk", backend="qcow2", size=64 * MiB):
    target = os.path.join(dep.instances, name)
    return backends_base.load(dep.conf(), backend).create_image(
        IMAGE, target, size)


def image_path(dep):
    return os.path.join(dep.images, IMAGE)


def one_line_error(result):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagebackend: error: ")
    return lines[0]


def test_info_shows_the_backing_chain_of_a_pipeline_disk(dep):
    disk = make_disk(dep)
    info = dep.cli_json("disk", "info", disk.path)
    assert (info["path"], info["format"]) == (disk.path, "qcow2")
    assert info["virtual_size"] == 64 * MiB
    assert info["backing_file"] == disk.backing_file
    assert info["backing_chain"] == [{"path": disk.backing_file,
                                      "format": "raw",
                                      "virtual_size": 32 * MiB}]
    assert info["snapshots"] == []
    # qemu-img was always told the format, never asked to guess it.
    calls = [c for c in dep.qemu_calls() if c.startswith("info")]
    assert calls and all(" -f " in " %s " % c for c in calls)


def test_check_repairs_a_leaky_disk(dep):
    disk = make_disk(dep)
    qemu_tests.make_leak(disk.path)
    found = dep.cli("disk", "check", disk.path, check=False)
    assert found.returncode == 3, found.stderr
    assert re.search(r"^leaks +1$", found.stdout, re.MULTILINE)
    repaired = dep.cli_json("disk", "check", disk.path, "--repair", "leaks")
    assert (repaired["leaks_fixed"], repaired["leaks"]) == (1, 0)
    assert repaired["clean"] is True
    assert dep.cli("disk", "check", disk.path).returncode == 0
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_snapshot_create_list_apply_delete(dep, tmp_path):
    disk = make_disk(dep)
    created = dep.cli_json("disk", "snapshot", "create", disk.path, "clean")
    assert (created["action"], created["name"]) == ("created", "clean")
    other = str(tmp_path / "other.raw")
    fenv.write_pattern_raw(other, 64 * MiB, seed=7)
    qemu_tests.overwrite(disk.path, "qcow2", other)
    assert not fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                     "qcow2")
    listed = dep.cli_json("disk", "snapshot", "list", disk.path)
    assert [(s["id"], s["name"]) for s in listed] == [("1", "clean")]
    applied = dep.cli_json("disk", "snapshot", "apply", disk.path, "clean")
    assert applied["action"] == "applied"
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")
    dep.cli("disk", "snapshot", "delete", disk.path, "clean")
    assert dep.cli_json("disk", "snapshot", "list", disk.path) == []
    missing = dep.cli("disk", "snapshot", "apply", disk.path, "clean",
                      check=False)
    assert "no snapshot 'clean'" in one_line_error(missing)


def test_snapshot_of_a_raw_disk_is_a_clear_error(dep):
    disk = make_disk(dep, backend="raw")
    result = dep.cli("disk", "snapshot", "create", disk.path, "s1",
                     check=False)
    line = one_line_error(result)
    assert disk.path in line and "raw disks" in line
    assert "Traceback" not in result.stderr


def test_compressed_extract_is_smaller_with_the_same_content(dep):
    disk = make_disk(dep)
    plain = os.path.join(dep.root, "plain.qcow2")
    packed = os.path.join(dep.root, "packed.qcow2")
    out = dep.cli_json("disk", "extract", disk.path, plain)
    assert (out["path"], out["format"], out["compressed"]) == (
        plain, "qcow2", False)
    out = dep.cli_json("disk", "extract", disk.path, packed, "--compress")
    assert out["compressed"] is True
    assert os.path.getsize(packed) < os.path.getsize(plain)
    for extracted in (plain, packed):
        assert fenv.images_identical(disk.path, "qcow2", extracted, "qcow2")
        assert "backing-filename" not in fenv.qemu_info(extracted, "qcow2")
    assert not [n for n in os.listdir(dep.root) if n.endswith(".part")]


def test_extract_of_an_overlay_to_raw_stands_alone(dep):
    disk = make_disk(dep)
    out = os.path.join(dep.root, "flat.raw")
    result = dep.cli_json("disk", "extract", disk.path, out, "-O", "raw")
    assert (result["format"], result["virtual_size"]) == ("raw", 64 * MiB)
    os.unlink(disk.backing_file)      # the extract must not need it
    assert fenv.images_identical(image_path(dep), "qcow2", out, "raw")
    assert os.path.getsize(out) == 64 * MiB


def test_extract_never_overwrites(dep):
    disk = make_disk(dep)
    out = os.path.join(dep.root, "taken")
    with open(out, "wb") as f:
        f.write(b"keep me")
    line = one_line_error(dep.cli("disk", "extract", disk.path, out,
                                  check=False))
    assert out in line and "already exists" in line
    with open(out, "rb") as f:
        assert f.read() == b"keep me"


def test_unsafe_rebase_after_moving_the_backing_file(dep):
    disk = make_disk(dep)
    moved = os.path.join(dep.root, "moved-base")
    shutil.move(disk.backing_file, moved)
    line = one_line_error(dep.cli("disk", "info", disk.path, check=False))
    assert "does not exist" in line and "--unsafe" in line
    info = dep.cli_json("disk", "rebase", disk.path, moved, "--unsafe")
    assert info["backing_chain"] == [{"path": moved, "format": "raw",
                                      "virtual_size": 32 * MiB}]
    assert fenv.qemu_info(disk.path, "qcow2")["backing-filename-format"] == (
        "raw")
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_safe_rebase_keeps_what_the_guest_sees(dep):
    disk = make_disk(dep)
    empty = os.path.join(dep.root, "empty.raw")
    with open(empty, "wb") as f:
        f.truncate(32 * MiB)
    seen = []
    info = disk_ops.DiskOperations(dep.conf()).rebase(
        disk.path, empty, fmt="qcow2",
        progress=lambda *report: seen.append(report))
    assert info.backing_file == empty
    size = info.virtual_size
    assert seen[-1] == ("rebase", size, size)
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_resize_grows_and_refuses_to_shrink_unless_told(dep):
    disk = make_disk(dep)
    grown = dep.cli_json("disk", "resize", disk.path, "128M")
    assert grown["virtual_size"] == 128 * MiB
    line = one_line_error(dep.cli("disk", "resize", disk.path, "96M",
                                  check=False))
    assert "--shrink" in line and disk.path in line
    assert fenv.qemu_info(disk.path, "qcow2")["virtual-size"] == 128 * MiB
    shrunk = dep.cli_json("disk", "resize", disk.path, "96M", "--shrink")
    assert shrunk["virtual_size"] == 96 * MiB
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_a_header_written_by_a_guest_is_ignored_with_input_format(dep):
    disk = make_disk(dep, backend="raw")
    secret = os.path.join(dep.root, "host-secret")
    with open(secret, "wb") as f:
        f.write(b"host secret " * 1000)
    # The guest writes a qcow2 header naming a host file into its disk.
    header = os.path.join(dep.root, "header.qcow2")
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow2", "-b",
                    secret, "-F", "raw", header, "1M"], check=True)
    with open(header, "rb") as src, open(disk.path, "r+b") as dst:
        dst.write(src.read())
    fooled = dep.cli_json("disk", "info", disk.path)
    assert fooled["backing_file"] == secret
    info = dep.cli_json("disk", "info", disk.path, "--input-format", "raw")
    assert (info["format"], info["backing_file"]) == ("raw", None)
    out = os.path.join(dep.root, "out.qcow2")
    dep.cli("disk", "extract", disk.path, out, "--input-format", "raw")
    assert fenv.images_identical(disk.path, "raw", out, "qcow2")


def test_extract_reports_progress_and_cancels_cleanly(dep):
    disk = make_disk(dep)
    ops = disk_ops.DiskOperations(dep.conf())
    calls = []
    out = os.path.join(dep.root, "out.qcow2")
    ops.extract(disk.path, out, progress=lambda *a: calls.append(a),
                fmt="qcow2")
    assert calls[-1] == ("extract", 64 * MiB, 64 * MiB)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(exception.OperationCancelled):
        ops.extract(disk.path, os.path.join(dep.root, "cancelled.qcow2"),
                    cancel=cancel, fmt="qcow2")
    assert sorted(os.listdir(dep.root)) == sorted(
        ["bin", "images", "imagebackend.conf", "instances", "out.qcow2",
         "qemu-img.log"])


@pytest.mark.skipif(shutil.which("qemu-io") is None,
                    reason="qemu-io is not installed")
def test_a_disk_in_use_can_be_read_but_not_changed(dep):
    disk = make_disk(dep)

    # qemu-io keeps the disk open for writing, as a running guest's qemu
    # does, until its standard input closes.
    def hold():
        return subprocess.Popen(["qemu-io", "-f", "qcow2", disk.path],
                                stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    holder = hold()
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([fenv.REAL_QEMU_IMG, "info", "-f", "qcow2",
                              disk.path], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "qemu-io did not open it"
            if holder.poll() is not None:
                # It lost the race for the lock to the probe's info.
                holder = hold()
            time.sleep(0.05)
        assert dep.cli_json("disk", "info", disk.path)["format"] == "qcow2"
        assert dep.cli_json("disk", "snapshot", "list", disk.path) == []
        line = one_line_error(dep.cli("disk", "snapshot", "create",
                                      disk.path, "s1", check=False))
        assert "lock" in line and disk.path in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert fenv.qemu_info(disk.path, "qcow2").get("snapshots") is None
