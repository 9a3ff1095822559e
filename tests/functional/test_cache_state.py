#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
#    implied. See the License for the specific language governing
#    permissions and limitations under the License.

"""The cache's own state can be trusted whatever guests write and whatever
happens to its records -- with real files and the real qemu-img.
"""

import hashlib
import json
import os
import socket
import subprocess
import time

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend import inspection
from tests.functional.fixtures import cli_runner
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
SIZE = 16 * MiB
DISK = 32 * MiB
AGES_ZERO = fenv.AGES_ZERO
QEMU_IMG = fenv.REAL_QEMU_IMG


def bump_inspection():
    """In a command-line process: the inspection policy one version
    newer, as after an upgrade that changes it.
    """
    inspection.INSPECTION_VERSION += 1


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def target(dep, name):
    return os.path.join(dep.instances, name, "disk")


def create(dep, image_id, name, backend="qcow2", size=DISK, path=None):
    return backends_base.load(dep.conf(), backend).create_image(
        image_id, path or target(dep, name), size)


def run(dep, *argv, bumped=False, timeout=120):
    """The command line in a child process (with the inspection policy
    bumped if asked); fails the test if it hangs.
    """
    return cli_runner.run(["--config-file", dep.config_file] + list(argv),
                          dep.env(), check=False, timeout=timeout,
                          prelude=bump_inspection if bumped else None)


def run_json(dep, *argv, **kwargs):
    result = run(dep, *argv, "-f", "json", **kwargs)
    return result.returncode, json.loads(result.stdout or "null")


def qcow2_header_naming(path, backing, size=MiB):
    """A qcow2 file made by the real qemu-img whose header names
    ``backing`` (never opened: ``-u``).
    """
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b",
                    backing, "-F", "raw", path, str(size)], check=True)
    with open(path, "rb") as f:
        return f.read()


def plant(disk, header):
    """Write ``header`` over the first bytes of ``disk``, as its guest
    could.
    """
    with open(disk, "r+b") as f:
        f.write(header)


def guest_image_with_header(dep, name, header_kind):
    """A qcow2 image whose guest data begins with a qcow2 or vmdk header:
    its converted raw base starts with that header.
    """
    inner = os.path.join(dep.root, "inner." + header_kind)
    if header_kind == "qcow2":
        qcow2_header_naming(inner, "/etc/hostname")
    else:
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "vmdk", inner,
                        "1M"], check=True)
    raw = os.path.join(dep.root, name + ".src.raw")
    fenv.write_pattern_raw(raw, SIZE, seed=3)
    with open(inner, "rb") as f:
        plant(raw, f.read())
    path = os.path.join(dep.images, name)
    subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2",
                    raw, path], check=True)
    return path, raw


def same(a, a_fmt, b, b_fmt="qcow2"):
    return fenv.images_identical(a, a_fmt, b, b_fmt)


def register_raw(dep, image_id, disk):
    """The registry's record of raw disk ``disk``, as the raw backend
    writes it: ``format`` raw.
    """
    cid = content_digest.cache_id(image_id)
    directory = os.path.join(dep.base_dir, ".disks", cid)
    os.makedirs(directory, exist_ok=True)
    key = hashlib.sha1(disk.encode("utf-8")).hexdigest()
    with open(os.path.join(directory, key + ".json"), "w") as f:
        json.dump({"disk": disk, "base": dep.base_path(image_id),
                   "image_id": image_id, "format": "raw",
                   "host": socket.gethostname(),
                   "created_at": time.time()}, f)


# -- item 4: generation numbers ----------------------------------------------

def test_a_pruned_generation_number_is_never_reused(dep):
    """A disk the cache does not know about names generation 1; after
    prune removed it and the image changed, the next generation gets a
    new name, so that disk can never read other bytes under its old one.
    """
    dep.write_config(image_cache=AGES_ZERO)
    source = fenv.make_raw(os.path.join(dep.images, "g.raw"), SIZE, seed=1)
    run(dep, "cache", "prefetch", "g.raw")
    first = dep.base_path("g.raw")
    # Made by hand outside every searched directory, never recorded.
    orphan = os.path.join(dep.root, "elsewhere", "disk")
    os.makedirs(os.path.dirname(orphan))
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw",
                    "-b", first, orphan], check=True)
    code, report = run_json(dep, "cache", "prune")
    assert code == 0
    assert [r["file"] for r in report["removed"]] == [first]
    assert dep.base_listing() == []

    fenv.make_raw(source, SIZE, seed=2)
    disk = create(dep, "g.raw", "vm-new")
    assert disk.cache_hit is False
    assert disk.backing_file == dep.base_path("g.raw", 2)
    assert not os.path.exists(first)
    assert same(source, "raw", disk.path)
    claims = os.path.join(dep.base_dir, ".generations",
                          content_digest.cache_id("g.raw"))
    assert sorted(os.listdir(claims)) == ["1", "2"]
    # The claims survive any prune.
    run(dep, "cache", "invalidate", "g.raw")
    os.unlink(disk.path)
    run(dep, "cache", "prune")
    assert sorted(os.listdir(claims)) == ["1", "2"]


# -- item 5: re-inspection ---------------------------------------------------

@pytest.mark.parametrize("header_kind", ["qcow2", "vmdk"])
def test_a_raw_base_with_a_guest_header_survives_a_policy_bump(
        dep, header_kind):
    image, raw_bytes = guest_image_with_header(dep, "snap.qcow2",
                                               header_kind)
    first = create(dep, "snap.qcow2", "vm1")
    the_base = dep.base_path("snap.qcow2")
    assert first.backing_file == the_base
    assert same(raw_bytes, "raw", the_base, "raw")
    with open(the_base, "rb") as f:
        assert f.read(4) in (b"QFI\xfb", b"KDMV")

    result = run(dep, "disk", "create", "snap.qcow2", target(dep, "vm2"),
                 "--size", str(DISK), "--backend", "qcow2", bumped=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.listdir(dep.base_dir).count(
        os.path.basename(the_base) + ".refused") == 0
    assert same(raw_bytes, "raw", the_base, "raw")
    assert same(image, "qcow2", first.path)
    assert same(image, "qcow2", target(dep, "vm2"))
    assert fenv.qemu_info(target(dep, "vm2"), "qcow2")[
        "backing-filename"] == the_base
    code, rows = run_json(dep, "cache", "verify", "--repair", bumped=True)
    assert code == 0
    assert [(r["status"], r["action"]) for r in rows] == [("ok", None)]
    assert os.path.exists(the_base)


def test_a_refused_non_raw_base_in_use_is_marked_stale_not_moved(dep):
    """With bases kept in their format, a policy change that refuses a
    base a disk uses leaves it in place (marked stale) for that disk.
    """
    dep.write_config(imagebackend={"force_raw_images": "false"})
    image = os.path.join(dep.images, "d.vmdk")
    raw = os.path.join(dep.root, "d.raw")
    fenv.write_pattern_raw(raw, SIZE, seed=4)
    subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "vmdk",
                    "-o", "subformat=monolithicSparse", raw, image],
                   check=True)
    first = create(dep, "d.vmdk", "vm1")
    the_base = dep.base_path("d.vmdk")
    assert fenv.qemu_info(the_base, "vmdk")["format"] == "vmdk"
    # The new policy refuses every VMDK.
    dep.write_config(imagebackend={"force_raw_images": "false",
                                   "vmdk_allowed_types": ""})

    result = run(dep, "disk", "create", "d.vmdk", target(dep, "vm2"),
                 "--size", str(DISK), "--backend", "qcow2", bumped=True)
    assert result.returncode != 0
    assert "d.vmdk" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert os.path.exists(the_base)
    assert not os.path.exists(the_base + ".refused")
    assert not os.path.exists(target(dep, "vm2"))
    record = cache_layout.read_record(the_base + ".json")
    assert record["stale"] is True
    assert "re-inspection" in record["stale_reason"]
    assert same(raw, "raw", first.path)
    # Prune keeps it while the disk uses it.
    dep.write_config(image_cache=AGES_ZERO)
    code, report = run_json(dep, "cache", "prune")
    assert the_base not in [r["file"] for r in report["removed"]]
    assert same(raw, "raw", first.path)


# -- item 6: what guests write never counts as a use -------------------------

def test_a_planted_header_in_a_registered_raw_disk_pins_nothing(dep):
    dep.write_config(image_cache=AGES_ZERO)
    fenv.make_raw(os.path.join(dep.images, "victim.raw"), SIZE, seed=1)
    fenv.make_raw(os.path.join(dep.images, "guest.raw"), SIZE, seed=2)
    run(dep, "cache", "prefetch", "victim.raw")
    victim = dep.base_path("victim.raw")
    disk = create(dep, "guest.raw", "vm-g", "raw").path
    register_raw(dep, "guest.raw", disk)
    header = qcow2_header_naming(os.path.join(dep.root, "h.qcow2"), victim)
    plant(disk, header)
    # Its own image's base stays in use by nothing either: raw disks are
    # copies.
    code, report = run_json(dep, "cache", "prune")
    assert code == 0
    removed = {r["file"] for r in report["removed"]}
    assert victim in removed
    assert dep.base_path("guest.raw") in removed
    assert report["kept"] == []
    with open(disk, "rb") as f:
        assert f.read(len(header)) == header     # never touched
    # The registry keeps the record while the disk exists.
    assert os.listdir(os.path.join(dep.base_dir, ".disks",
                                   content_digest.cache_id("guest.raw")))


@pytest.mark.parametrize("planted", [
    "/dev/zero", "fifo", "/proc/self/mem", "symlink", "directory"])
def test_a_planted_special_backing_name_neither_stops_nor_hangs_pruning(
        dep, planted):
    for name in ("p.raw", "q.raw"):
        fenv.make_raw(os.path.join(dep.images, name), SIZE)
    run(dep, "cache", "prefetch", "p.raw", "q.raw")
    if planted == "fifo":
        planted = os.path.join(dep.root, "fifo")
        os.mkfifo(planted)
    elif planted == "symlink":
        real = fenv.make_raw(os.path.join(dep.root, "real"), MiB)
        planted = os.path.join(dep.root, "link")
        os.symlink(real, planted)
    elif planted == "directory":
        planted = dep.root
    # A file in instances_path the registry does not know (an old raw
    # disk, say) whose guest wrote a header naming it.
    disk = target(dep, "vm-x")
    os.makedirs(os.path.dirname(disk))
    fenv.make_raw(disk, 4 * MiB)
    plant(disk, qcow2_header_naming(os.path.join(dep.root, "h"), planted))
    dep.write_config(image_cache={"max_size": "1"})
    started = time.monotonic()
    code, report = run_json(dep, "cache", "prune", timeout=60)
    assert code == 0
    assert time.monotonic() - started < 60
    assert sorted(r["file"] for r in report["removed"]) == sorted(
        [dep.base_path("p.raw"), dep.base_path("q.raw")])
    assert report["space_target_met"] is True
    assert report["kept"] == []


# -- item 7: records lost, unreadable, symlinked ------------------------------

@pytest.mark.parametrize("damage", ["missing", "invalid", "symlink",
                                    "wrong types"])
def test_a_base_without_a_valid_record_is_fetched_again(dep, damage):
    source = fenv.make_qcow2(os.path.join(dep.images, "r.qcow2"), SIZE)
    first = create(dep, "r.qcow2", "vm1")
    the_base = dep.base_path("r.qcow2")
    record_path = the_base + ".json"
    with open(record_path) as f:
        good = json.load(f)
    os.unlink(record_path)
    decoy = os.path.join(dep.root, "decoy.json")
    if damage == "invalid":
        with open(record_path, "w") as f:
            f.write("{not json")
    elif damage == "symlink":
        with open(decoy, "w") as f:
            json.dump(good, f)
        os.symlink(decoy, record_path)
    elif damage == "wrong types":
        with open(record_path, "w") as f:
            json.dump(dict(good, checksum="sha256:0"), f)
    # A corrupted base: nothing but a valid record could tell.
    with open(the_base, "r+b") as f:
        f.seek(5)
        f.write(b"X")

    code, rows = run_json(dep, "cache", "verify")
    assert code == 1
    assert [r["status"] for r in rows] == ["unverified"]
    second = create(dep, "r.qcow2", "vm2")
    assert second.cache_hit is False
    assert second.backing_file == dep.base_path("r.qcow2", 2)
    assert same(source, "qcow2", second.path)
    assert os.path.exists(the_base)         # vm1 still reads it
    assert first.backing_file == the_base
    if damage == "symlink":
        with open(decoy) as f:
            assert json.load(f) == good     # replaced, never followed
    code, rows = run_json(dep, "cache", "verify")
    assert code == 1
    assert {os.path.basename(r["file"]): r["status"] for r in rows} == {
        os.path.basename(the_base): "unverified",
        os.path.basename(second.backing_file): "ok"}
    code, rows = run_json(dep, "cache", "list")
    assert {r["generation"]: r["stale"] for r in rows} == {1: True,
                                                           2: False}


def _write_sized_record(sized, image_id, stem, size):
    """The sized base's own record, as the cached-base backend writes it
    before publishing the sized base.
    """
    digest = cache_verify.digests(sized)["sparse"]
    with open(sized + ".json", "w") as f:
        json.dump({"kind": "sized", "image_id": image_id, "base": stem,
                   "size": size, "format": "raw",
                   "digest": {"scheme": "sparse-64k-xxh3", "value": digest},
                   "created_at": "2026-01-01T00:00:00+00:00"}, f)


def test_a_sized_base_stays_verifiable_after_its_original_is_pruned(dep):
    dep.write_config(image_cache=AGES_ZERO)
    fenv.make_raw(os.path.join(dep.images, "s.raw"), SIZE)
    disk = create(dep, "s.raw", "vm1", "cached-base")
    sized = disk.backing_file
    assert sized == dep.base_path("s.raw") + "_%d" % DISK
    _write_sized_record(sized, "s.raw", content_digest.cache_id("s.raw"), DISK)
    code, report = run_json(dep, "cache", "prune")
    assert [r["file"] for r in report["removed"]] == [dep.base_path("s.raw")]

    code, rows = run_json(dep, "cache", "verify")
    assert (code, [(r["file"], r["status"]) for r in rows]) == (
        0, [(sized, "ok")])
    code, rows = run_json(dep, "cache", "list")
    assert [(r["file"], r["kind"], r["image_id"]) for r in rows] == [
        (sized, "sized", "s.raw")]

    with open(sized, "r+b") as f:
        f.seek(MiB + 7)
        f.write(b"\xff")
    code, rows = run_json(dep, "cache", "verify")
    assert (code, [r["status"] for r in rows]) == (1, ["corrupt"])
    os.unlink(sized + ".json")
    code, rows = run_json(dep, "cache", "verify")
    assert (code, [r["status"] for r in rows]) == (1, ["unverified"])

    _write_sized_record(sized, "s.raw", content_digest.cache_id("s.raw"), DISK)
    os.unlink(disk.path)
    code, report = run_json(dep, "cache", "prune")
    # The sized base, and its overlay template with it.
    assert [(r["file"], r["kind"]) for r in report["removed"]][:1] == [
        (sized, "sized")]
    assert [r["kind"] for r in report["removed"]][1:] == ["template"]
    assert dep.base_listing() == []


# -- item 9: no symlink followed; base_dir_name ------------------------------

@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", ""])
def test_base_dir_name_must_be_a_plain_name(dep, name):
    fenv.make_raw(os.path.join(dep.images, "b.raw"), SIZE)
    dep.write_config(imagebackend={"base_dir_name": name})
    before = sorted(os.listdir(dep.root))
    result = run(dep, "disk", "create", "b.raw", target(dep, "vm"),
                 "--size", str(DISK))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "base_dir_name" in out and repr(name) in out
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(dep.root)) == before
    assert os.listdir(dep.instances) == []


@pytest.mark.parametrize("private", [".disks", ".sources", ".generations"])
def test_a_symlinked_private_directory_is_refused(dep, private):
    fenv.make_raw(os.path.join(dep.images, "b.raw"), SIZE)
    os.makedirs(dep.base_dir)
    outside = os.path.join(dep.root, "outside")
    os.makedirs(outside)
    os.symlink(outside, os.path.join(dep.base_dir, private))
    result = run(dep, "disk", "create", "b.raw", target(dep, "vm"),
                 "--size", str(DISK))
    assert result.returncode != 0
    assert os.path.join(dep.base_dir, private) in (result.stdout
                                                   + result.stderr)
    assert "Traceback" not in result.stderr
    assert os.listdir(outside) == []
    assert not os.path.exists(target(dep, "vm"))
