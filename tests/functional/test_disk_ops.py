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
from imagebackend.cache import disk_records
from imagebackend.disk import operations as disk_ops
from imagebackend import exception
from tests.functional.fixtures import env as fenv
from tests.functional import test_qemu_img as qemu_tests

MiB = fenv.MiB
IMAGE = "guest.qcow2"

pytestmark = fenv.NEEDS_QEMU_IMG


@pytest.fixture
def dep(tmp_path):
    return fenv.with_qcow2(str(tmp_path), IMAGE, 32 * MiB)


def _ops(dep):
    """Disk operations as a library caller makes them (with records)."""
    conf = dep.conf()
    return disk_ops.DiskOperations(conf,
                                   records=disk_records.DiskRecords(conf))


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
                     "--input-format", "raw", check=False)
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
    moved = os.path.join(dep.instances, "moved", "base")
    os.mkdir(os.path.dirname(moved))
    shutil.move(disk.backing_file, moved)
    line = one_line_error(dep.cli("disk", "info", disk.path, check=False))
    assert "does not exist" in line and "--unsafe" in line
    # Out of the cache, nothing records its format: the caller gives it.
    line = one_line_error(dep.cli("disk", "rebase", disk.path, moved,
                                  "--unsafe", check=False))
    assert moved in line and "--backing-format" in line
    info = dep.cli_json("disk", "rebase", disk.path, moved, "--unsafe",
                        "--backing-format", "raw")
    assert info["backing_chain"] == [{"path": moved, "format": "raw",
                                      "virtual_size": 32 * MiB}]
    assert fenv.qemu_info(disk.path, "qcow2")["backing-filename-format"] == (
        "raw")
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_safe_rebase_keeps_what_the_guest_sees(dep):
    disk = make_disk(dep)
    empty = os.path.join(dep.instances, "empty.raw")
    with open(empty, "wb") as f:
        f.truncate(32 * MiB)
    seen = []
    info = _ops(dep).rebase(
        disk.path, empty, fmt="qcow2", backing_fmt="raw",
        progress=lambda *report: seen.append(report))
    assert info.backing_file == empty
    size = info.virtual_size
    assert seen[-1] == ("rebase", size, size)
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_resize_grows_and_refuses_to_shrink_unless_told(dep):
    disk = make_disk(dep)
    dep.reset_qemu_log()
    grown = dep.cli_json("disk", "resize", disk.path, "128M")
    assert grown["virtual_size"] == 128 * MiB
    # The chain was checked again afterwards, link by link and then as
    # qemu-img opens it, always with explicit formats.
    calls = dep.qemu_calls()
    assert calls[-1] == "info -f qcow2 --output=json --backing-chain %s" % (
        disk.path)
    assert [c.split()[:3] for c in calls if c.startswith("info")][-3:-1] == [
        ["info", "-f", "qcow2"], ["info", "-f", "raw"]]
    line = one_line_error(dep.cli("disk", "resize", disk.path, "96M",
                                  check=False))
    assert "--shrink" in line and disk.path in line
    assert fenv.qemu_info(disk.path, "qcow2")["virtual-size"] == 128 * MiB
    shrunk = dep.cli_json("disk", "resize", disk.path, "96M", "--shrink")
    assert shrunk["virtual_size"] == 96 * MiB
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")


def test_a_raw_disk_is_not_shrunk_unless_told(dep):
    # qemu-img itself shrinks a raw file without --shrink: only the
    # library's refusal keeps the guest's data past the new end.
    disk = make_disk(dep, backend="raw")
    assert os.path.getsize(disk.path) == 64 * MiB
    line = one_line_error(dep.cli("disk", "resize", disk.path, "48M",
                                  check=False))
    assert "--shrink" in line and disk.path in line
    assert os.path.getsize(disk.path) == 64 * MiB
    assert fenv.qemu_info(disk.path, "raw")["virtual-size"] == 64 * MiB
    shrunk = dep.cli_json("disk", "resize", disk.path, "48M", "--shrink")
    assert shrunk["virtual_size"] == 48 * MiB
    assert os.path.getsize(disk.path) == 48 * MiB


@pytest.mark.parametrize("backend", ["qcow2", "cached-base", "raw"])
def test_a_cache_hit_on_a_qcow2_image_refuses_a_smaller_disk(dep, backend):
    # An image written a minute ago, as images are: the local source
    # remembers a file's hash in _base/.sources only once the file is 2 s
    # old, so with a fresh one that memo appeared during the first create
    # or, on a loaded machine, during the refused second one.
    old = time.time() - 60
    os.utime(image_path(dep), (old, old))
    make_disk(dep, "a", backend=backend, size=32 * MiB)
    listing = sorted(os.listdir(dep.base_dir))
    target = os.path.join(dep.instances, "b")
    with pytest.raises(exception.DiskSmallerThanImage) as err:
        make_disk(dep, "b", backend=backend, size=16 * MiB)
    assert str(32 * MiB) in str(err.value)
    assert not os.path.lexists(target)
    assert sorted(os.listdir(dep.base_dir)) == listing


def test_extract_reports_progress_and_cancels_cleanly(dep):
    disk = make_disk(dep)
    ops = _ops(dep)
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


# --- formats come from records and callers, never from guest bytes --------

SECRET = b"host secret, never for a guest " * 64


def plant_secret(dep):
    """A host file a guest would like to read."""
    secret = os.path.join(dep.root, "host-secret")
    with open(secret, "wb") as f:
        f.write(SECRET)
    return secret


def guest_qcow2_header(dep, secret):
    """The first bytes a guest writes to make its raw disk look like a
    qcow2 image backed by ``secret``.
    """
    header = os.path.join(dep.root, "header.qcow2")
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow2", "-b",
                    secret, "-F", "raw", header, "1M"], check=True)
    with open(header, "rb") as f:
        data = f.read()
    os.unlink(header)
    return data


def write_at_start(path, data):
    with open(path, "r+b") as f:
        f.write(data)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def raw_base_with_guest_header(dep, secret):
    """A cached raw base converted from a snapshot whose guest data begins
    with a qcow2 header naming ``secret``; returns its path.
    """
    guest = os.path.join(dep.root, "guest-data.raw")
    fenv.write_pattern_raw(guest, 32 * MiB, seed=9)
    write_at_start(guest, guest_qcow2_header(dep, secret))
    subprocess.run([fenv.REAL_QEMU_IMG, "convert", "-q", "-f", "raw", "-O",
                    "qcow2", guest, os.path.join(dep.images, "snap.qcow2")],
                   check=True)
    os.unlink(guest)
    disk = backends_base.load(dep.conf(), "qcow2").create_image(
        "snap.qcow2", os.path.join(dep.instances, "snap-user"), 32 * MiB)
    base = disk.backing_file
    assert os.path.dirname(base) == dep.base_dir
    assert fenv.qemu_info(base, "raw")["format"] == "raw"
    return base


def test_rebase_onto_a_raw_base_records_the_format_of_its_record(dep):
    secret = plant_secret(dep)
    base = raw_base_with_guest_header(dep, secret)
    disk = make_disk(dep, size=32 * MiB)
    info = dep.cli_json("disk", "rebase", disk.path, base)
    assert info["backing_chain"] == [{"path": base, "format": "raw",
                                      "virtual_size": 32 * MiB}]
    assert fenv.qemu_info(disk.path, "qcow2")["backing-filename-format"] == (
        "raw")
    # The guest still sees its own image, and nothing reaches the secret.
    assert fenv.images_identical(image_path(dep), "qcow2", disk.path,
                                 "qcow2")
    shown = dep.cli_json("disk", "info", disk.path)
    assert [link["path"] for link in shown["backing_chain"]] == [base]
    out = os.path.join(dep.root, "out.raw")
    dep.cli("disk", "extract", disk.path, out, "-O", "raw")
    assert fenv.images_identical(image_path(dep), "qcow2", out, "raw")
    assert SECRET[:64] not in file_bytes(out)
    assert secret not in "\n".join(dep.qemu_calls())


def test_a_backing_format_that_contradicts_the_base_record_is_refused(dep):
    base = raw_base_with_guest_header(dep, plant_secret(dep))
    disk = make_disk(dep, size=32 * MiB)
    before = file_bytes(disk.path)
    line = one_line_error(dep.cli("disk", "rebase", disk.path, base,
                                  "--backing-format", "qcow2", "--unsafe",
                                  check=False))
    assert base in line and "records it as raw" in line
    assert file_bytes(disk.path) == before


def test_an_overlay_recording_a_raw_base_as_qcow2_is_refused(dep):
    # As a rebase that trusted the header would have left it.
    secret = plant_secret(dep)
    base = raw_base_with_guest_header(dep, secret)
    fooled = os.path.join(dep.instances, "fooled.qcow2")
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow2", "-b",
                    base, "-F", "qcow2", fooled], check=True)
    dep.reset_qemu_log()
    for argv in (("info", fooled), ("extract", fooled,
                                    os.path.join(dep.root, "out"))):
        line = one_line_error(dep.cli("disk", *argv, "--input-format",
                                      "qcow2", check=False))
        assert "records it as raw" in line
        assert "imagebackend disk rebase %s %s --unsafe" % (fooled,
                                                            base) in line
    assert not os.path.exists(os.path.join(dep.root, "out"))
    assert secret not in "\n".join(dep.qemu_calls())
    # The fix the message gives works, with the format of the record.
    dep.cli("disk", "rebase", fooled, base, "--unsafe", "--input-format",
            "qcow2")
    assert fenv.qemu_info(fooled, "qcow2")["backing-filename-format"] == (
        "raw")


@pytest.mark.parametrize("made_by", ["raw-backend", "other-tool"])
def test_a_guest_header_in_a_raw_disk_is_never_followed(dep, made_by):
    secret = plant_secret(dep)
    if made_by == "raw-backend":
        path = make_disk(dep, backend="raw").path
    else:
        path = fenv.make_raw(os.path.join(dep.instances, "plain.img"))
    write_at_start(path, guest_qcow2_header(dep, secret))
    before = file_bytes(path)
    out = os.path.join(dep.root, "out.qcow2")
    dep.reset_qemu_log()
    if made_by == "raw-backend":
        # The registry records the disk as raw: it is read as the bytes
        # the guest wrote, never through the header.
        info = dep.cli_json("disk", "info", path)
        assert (info["format"], info["backing_file"]) == ("raw", None)
        line = one_line_error(dep.cli("disk", "snapshot", "create", path,
                                      "s1", check=False))
        assert path in line
        dep.cli("disk", "extract", path, out)
        assert fenv.images_identical(path, "raw", out, "qcow2")
        assert file_bytes(path) == before
        assert secret not in "\n".join(dep.qemu_calls())
        return
    for argv in (("info", path), ("check", path), ("extract", path, out),
                 ("resize", path, "128M"),
                 ("snapshot", "create", path, "s1")):
        result = dep.cli("disk", *argv, check=False)
        line = one_line_error(result)
        assert path in line and "--input-format" in line, argv
    assert dep.qemu_calls() == []
    assert file_bytes(path) == before
    assert not os.path.exists(out)
    # Told the format, it is read as bytes, as the guest wrote them.
    info = dep.cli_json("disk", "info", path, "--input-format", "raw")
    assert (info["format"], info["backing_file"]) == ("raw", None)
    dep.cli("disk", "extract", path, out, "--input-format", "raw")
    assert fenv.images_identical(path, "raw", out, "qcow2")
    assert secret not in "\n".join(dep.qemu_calls())


def test_a_chain_leaving_the_allowed_directories_is_refused(dep):
    secret = plant_secret(dep)
    overlay = os.path.join(dep.instances, "vm", "disk")
    os.makedirs(os.path.dirname(overlay))
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow2", "-b",
                    secret, "-F", "raw", overlay, "1M"], check=True)
    out = os.path.join(dep.root, "out.raw")
    dep.reset_qemu_log()
    for argv in (("info", overlay, "--input-format", "qcow2"),
                 ("extract", overlay, out, "--input-format", "qcow2")):
        line = one_line_error(dep.cli("disk", *argv, check=False))
        assert secret in line and "outside the directories" in line
        assert "disk_dirs" in line
    assert not os.path.exists(out)
    assert secret not in "\n".join(dep.qemu_calls())
    # Listed in [image_cache] disk_dirs, its directory is allowed.
    dep.write_config(image_cache={"disk_dirs": dep.root})
    info = dep.cli_json("disk", "info", overlay, "--input-format", "qcow2")
    assert info["backing_file"] == secret


def test_rebase_checks_the_new_backing_chain_before_changing(dep):
    secret = plant_secret(dep)
    disk = make_disk(dep)
    leads_out = os.path.join(dep.instances, "leads-out.qcow2")
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow2", "-b",
                    secret, "-F", "raw", leads_out, "64M"], check=True)
    before = file_bytes(disk.path)
    # A file no record describes needs its format from the caller.
    line = one_line_error(dep.cli("disk", "rebase", disk.path, leads_out,
                                  "--unsafe", check=False))
    assert leads_out in line and "--backing-format" in line
    assert file_bytes(disk.path) == before
    line = one_line_error(dep.cli("disk", "rebase", disk.path, leads_out,
                                  "--backing-format", "qcow2", "--unsafe",
                                  check=False))
    assert secret in line and "outside the directories" in line
    assert file_bytes(disk.path) == before


# --- nothing is written inside _base or the lock directory -----------------

@pytest.fixture
def qcow2_base(tmp_path):
    """A deployment keeping bases as qcow2, and its base of IMAGE."""
    d = fenv.with_qcow2(str(tmp_path), IMAGE, 32 * MiB,
                        imagebackend={"force_raw_images": "false"})
    disk = make_disk(d)
    assert fenv.qemu_info(disk.backing_file, "qcow2")["format"] == "qcow2"
    return d, disk.backing_file


def test_nothing_changes_a_base_through_disk_operations(qcow2_base):
    dep, base = qcow2_base
    os.symlink(dep.base_dir, os.path.join(dep.root, "cache-link"))
    os.symlink(base, os.path.join(dep.instances, "base-link"))
    via_dir = os.path.join(dep.root, "cache-link", os.path.basename(base))
    via_file = os.path.join(dep.instances, "base-link")
    hard = os.path.join(dep.instances, "base-hard-link")
    os.link(base, hard)
    before = file_bytes(base)
    listing = sorted(os.listdir(dep.base_dir))
    dep.reset_qemu_log()
    for path in (base, via_dir, via_file, hard):
        for argv in (("resize", path, "64M"),
                     ("snapshot", "create", path, "s1"),
                     ("snapshot", "delete", path, "s1"),
                     ("snapshot", "apply", path, "s1"),
                     ("check", path, "--repair", "leaks"),
                     ("rebase", path, base, "--unsafe")):
            line = one_line_error(dep.cli("disk", *argv, check=False))
            assert "Refusing to write %s" % path in line, argv
            assert "the image cache %s" % dep.base_dir in line
    assert dep.qemu_calls() == []
    assert file_bytes(base) == before
    assert sorted(os.listdir(dep.base_dir)) == listing


def test_extract_never_writes_into_the_cache_or_the_locks(qcow2_base):
    dep, base = qcow2_base
    disk = make_disk(dep, name="disk2")
    os.symlink(dep.base_dir, os.path.join(dep.root, "cache-link"))
    locks = os.path.join(dep.instances, "locks")
    assert os.path.isdir(locks)
    listings = {d: sorted(os.listdir(d)) for d in (dep.base_dir, locks)}
    for out, where in (
            (os.path.join(dep.base_dir, "f" * 40), dep.base_dir),
            (os.path.join(dep.root, "cache-link", "new"), dep.base_dir),
            (os.path.join(dep.base_dir, ".disks", "x"), dep.base_dir),
            (os.path.join(locks, "out"), locks)):
        line = one_line_error(dep.cli("disk", "extract", disk.path, out,
                                      check=False))
        assert "Refusing to write %s" % out in line and where in line
    assert {d: sorted(os.listdir(d)) for d in listings} == listings


def test_a_base_can_be_read_with_the_format_of_its_record(qcow2_base):
    dep, base = qcow2_base
    info = dep.cli_json("disk", "info", base)
    assert (info["format"], info["virtual_size"]) == ("qcow2", 32 * MiB)
    assert dep.cli_json("disk", "check", base)["clean"] is True
    assert dep.cli_json("disk", "snapshot", "list", base) == []
    out = os.path.join(dep.root, "copy.qcow2")
    dep.cli("disk", "extract", base, out)
    assert fenv.images_identical(base, "qcow2", out, "qcow2")
    # A record's format is not overridden by a caller's.
    line = one_line_error(dep.cli("disk", "info", base, "--input-format",
                                  "raw", check=False))
    assert "records it as qcow2" in line
