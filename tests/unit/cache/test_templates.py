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

"""Overlay templates: naming, the checks on a copy, the fallback to
qemu-img on a bad template, and removal with the base.  qemu-img is a
fake that writes a small qcow2 overlay laid out as qemu-img lays one out.
"""

import os
import struct
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import results as cache_results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import templates
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from tests import fakes

MiB = 1024 * 1024
GiB = 1024 * MiB
CID = "a" * 40
L1_OFFSET = 3 * 65536


def overlay_bytes(backing_file, backing_fmt, size, *, l1_entry=0,
                  incompatible=0, extra_ext=b""):
    """A qcow2 v3 overlay as ``qemu-img create`` lays it out: header,
    header extensions, backing file name, and an empty L1 table at
    cluster 3.
    """
    backing = os.fsencode(backing_file)
    fmt = backing_fmt.encode()
    ext = struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt.ljust(8, b"\0")
    ext += extra_ext + struct.pack(">II", 0, 0)
    header_len = 104
    backing_offset = header_len + len(ext)
    l1_size = max(1, -(-size // (512 * MiB)))
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, backing_offset,
                         len(backing), 16, size, 0, l1_size, L1_OFFSET,
                         65536, 1, 0, 0)
    header += struct.pack(">QQQII", incompatible, 0, 0, 4, header_len)
    body = bytearray(L1_OFFSET + 8 * l1_size)
    body[:len(header)] = header
    body[header_len:header_len + len(ext)] = ext
    body[backing_offset:backing_offset + len(backing)] = backing
    struct.pack_into(">Q", body, L1_OFFSET, l1_entry)
    return bytes(body)


def fake_create(path, fmt, size, *, backing_file, backing_fmt,
                options=None):
    with open(path, "wb") as f:
        f.write(overlay_bytes(backing_file, backing_fmt, size))


@pytest.fixture
def c(tmp_path):
    conf = fakes.conf(tmp_path)
    q = mock.create_autospec(qemu_img.QemuImg, instance=True)
    q.create.side_effect = fake_create
    source = fakes.FakeSource(conf, images={"img": b"x" * MiB})
    return cache.ImageCache(conf, source, q)


@pytest.fixture
def base(c):
    entry, _ = c.get("img")
    return entry


def new_target(c, name="disk"):
    os.makedirs(c.instances_path, exist_ok=True)
    path = os.path.join(c.instances_path, name)
    open(path, "wb").close()
    return path


def read(path):
    with open(path, "rb") as f:
        return f.read()


def template_files(c):
    return sorted(n for n in os.listdir(c.base_dir) if templates.INFIX in n)


def make(c, base, target, size=GiB):
    return templates.Templates(c.store, c.qemu).make_overlay(
        base.path, "raw", target, size)


# -- names --------------------------------------------------------------------

@pytest.mark.parametrize("base_name", [CID, CID + "-2", CID + "_1024",
                                       CID + "-12_1073741824"])
def test_template_names_are_never_taken_for_cache_files(tmp_path,
                                                        base_name):
    spec = templates.spec_for(str(tmp_path), str(tmp_path / base_name),
                              "raw", GiB)
    name = spec.file_name()
    assert cache_layout.parse(name) is None
    assert cache_layout.parse(name + ".part-" + "0" * 12) is None
    parsed = templates.parse(name)
    assert (parsed.base, parsed.size, parsed.key, parsed.scratch) == (
        base_name, GiB, spec.key, False)
    assert templates.parse(name + ".part-" + "0" * 12).scratch
    assert parsed.cid == CID


@pytest.mark.parametrize("name", [
    CID, CID + ".json", CID + "_5.json", CID + ".part-" + "0" * 12,
    CID + ".template-0-" + "0" * 16, CID + ".template-5-" + "0" * 15,
    CID + ".template-5-" + "0" * 16 + ".json", "x" + CID[1:] + ".tmp",
    CID + ".corrupt.template-5-" + "0" * 16])
def test_other_names_are_not_templates(name):
    assert templates.parse(name) is None


def test_key_changes_with_every_argument(tmp_path):
    d = str(tmp_path)
    specs = [templates.spec_for(d, os.path.join(d, CID), "raw", GiB),
             templates.spec_for(d, os.path.join(d, CID + "-2"), "raw", GiB),
             templates.spec_for(d, os.path.join(d, CID), "qcow2", GiB),
             templates.spec_for(d, os.path.join(d, CID), "raw", 2 * GiB),
             templates.spec_for(d, os.path.join(d, CID), "raw", GiB,
                                {"cluster_size": 65536})]
    assert len({s.key for s in specs}) == len(specs)
    # Another directory spelling the same base name: another template.
    other = templates.spec_for("/elsewhere", "/elsewhere/" + CID, "raw",
                               GiB)
    assert other.key != specs[0].key


@pytest.mark.parametrize("backing", ["/elsewhere/" + CID, "BASE/" + CID +
                                     ".json", "BASE/not-a-base",
                                     "BASE/" + CID + ".corrupt"])
def test_no_template_for_a_file_that_is_not_a_cached_base(tmp_path,
                                                          backing):
    backing = backing.replace("BASE", str(tmp_path))
    assert templates.spec_for(str(tmp_path), backing, "raw", GiB) is None


# -- the overlay check --------------------------------------------------------

def spec(size=GiB):
    return templates.Spec("/c/_base/" + CID, "raw", size)


def test_the_overlay_qemu_img_writes_passes():
    assert templates.check_overlay(overlay_bytes("/c/_base/" + CID, "raw",
                                                 GiB), spec()) is None


@pytest.mark.parametrize("body, why", [
    (lambda: overlay_bytes("/c/_base/" + CID, "raw", 2 * GiB),
     "virtual size"),
    (lambda: overlay_bytes("/c/_base/" + "b" * 40, "raw", GiB),
     "another backing file"),
    (lambda: overlay_bytes("/c/_base/" + CID, "qcow2", GiB),
     "backing format"),
    (lambda: overlay_bytes("/c/_base/" + CID, "raw", GiB, l1_entry=1 << 62
                           | 5 * 65536), "clusters allocated"),
    (lambda: overlay_bytes("/c/_base/" + CID, "raw", GiB, incompatible=4),
     "external data file"),
    (lambda: overlay_bytes("/c/_base/" + CID, "raw", GiB, extra_ext=(
        struct.pack(">II", 0x44415441, 8) + b"/etc/pwd")), "backing format"),
    (lambda: b"QFI\xfb" + b"\0" * 100, "not a qcow2 header"),
    (lambda: overlay_bytes("/c/_base/" + CID, "raw", GiB)[:L1_OFFSET],
     "L1 table outside"),
    (lambda: b"\0" * 20, "shorter"),
])
def test_overlays_that_are_not_what_was_asked_for_fail(body, why):
    assert why in templates.check_overlay(body(), spec())


# -- making disks -------------------------------------------------------------

def test_first_disk_makes_the_template_and_later_ones_copy_it(c, base):
    expected = overlay_bytes(base.path, "raw", GiB)
    first = new_target(c, "one")
    assert make(c, base, first) is True
    assert read(first) == expected
    assert c.qemu.create.call_count == 1
    scratch = c.qemu.create.call_args.args[0]
    assert os.path.dirname(scratch) == c.base_dir
    assert templates.parse(os.path.basename(scratch)).scratch
    assert not os.path.exists(scratch)
    [name] = template_files(c)
    assert name == templates.spec_for(c.base_dir, base.path, "raw",
                                      GiB).file_name()
    assert read(os.path.join(c.base_dir, name))[:len(expected)] == expected
    second = new_target(c, "two")
    assert make(c, base, second) is True
    assert read(second) == expected
    assert c.qemu.create.call_count == 1
    # Another size is another template.
    third = new_target(c, "three")
    make(c, base, third, 2 * GiB)
    assert read(third) == overlay_bytes(base.path, "raw", 2 * GiB)
    assert c.qemu.create.call_count == 2
    assert len(template_files(c)) == 2


def damage_truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def damage_flip(path):
    # A byte of the L1 table: the header still looks right.
    with open(path, "r+b") as f:
        f.seek(L1_OFFSET + 3)
        f.write(b"\x07")


def damage_refcounts(path):
    # Outside everything the header check reads: only the digest sees it.
    with open(path, "r+b") as f:
        f.seek(2 * 65536 + 1)
        f.write(b"\x01")


def damage_garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(300000))


def damage_other_size(path):
    # A valid template of another size, renamed into place.
    body = overlay_bytes(path.split(".template-")[0], "raw", 2 * GiB)
    other = templates.Spec(path.split(".template-")[0], "raw", 2 * GiB)
    with open(path, "wb") as f:
        f.write(body + struct.pack(">8sQ32s", templates.TRAILER_MAGIC,
                                   len(body), other.digest(body)))


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip,
                                    damage_refcounts, damage_garbage,
                                    damage_other_size])
def test_a_damaged_template_never_makes_a_wrong_disk(c, base, damage):
    make(c, base, new_target(c, "one"))
    [name] = template_files(c)
    path = os.path.join(c.base_dir, name)
    damage(path)
    target = new_target(c, "two")
    assert make(c, base, target) is True
    assert read(target) == overlay_bytes(base.path, "raw", GiB)
    # Made again, once, under the same name.
    assert c.qemu.create.call_count == 2
    assert template_files(c) == [name]
    target = new_target(c, "three")
    make(c, base, target)
    assert c.qemu.create.call_count == 2
    assert read(target) == overlay_bytes(base.path, "raw", GiB)


def test_qemu_img_makes_the_disk_when_no_template_can_be_checked(c, base):
    def odd_create(path, fmt, size, **kwargs):
        fake_create(path, fmt, size, **kwargs)
        with open(path, "r+b") as f:      # an allocated cluster
            f.seek(L1_OFFSET)
            f.write(struct.pack(">Q", 1 << 63 | 4 * 65536))
    c.qemu.create.side_effect = odd_create
    target = new_target(c)
    assert make(c, base, target) is False
    assert template_files(c) == []
    calls = [call.args[0] for call in c.qemu.create.call_args_list]
    assert calls[-1] == target
    assert c.qemu.create.call_args.kwargs == {
        "backing_file": base.path, "backing_fmt": "raw", "options": None}


def test_a_symlink_at_the_template_name_is_neither_followed_nor_removed(
        c, base, tmp_path):
    spec_ = templates.spec_for(c.base_dir, base.path, "raw", GiB)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"secret")
    link = os.path.join(c.base_dir, spec_.file_name())
    os.symlink(decoy, link)
    target = new_target(c)
    assert make(c, base, target) is False
    assert os.path.islink(link) and decoy.read_bytes() == b"secret"
    assert read(target) == overlay_bytes(base.path, "raw", GiB)


def test_a_base_outside_the_cache_gets_no_template(c, tmp_path):
    backing = str(tmp_path / "elsewhere.raw")
    target = new_target(c)
    assert templates.Templates(c.store, c.qemu).make_overlay(
        backing, "raw", target, GiB) is False
    c.qemu.create.assert_called_once_with(target, "qcow2", GiB,
                                          backing_file=backing,
                                          backing_fmt="raw", options=None)
    assert not os.path.exists(c.base_dir)


def test_a_failed_template_write_leaves_no_scratch_and_makes_the_disk(
        c, base):
    target = new_target(c)
    with mock.patch.object(templates.fileio, "publish_fd",
                           side_effect=OSError(28, "No space left")):
        assert make(c, base, target) is False
    assert template_files(c) == []
    assert read(target) == overlay_bytes(base.path, "raw", GiB)


# -- dropped with the base ----------------------------------------------------

def test_templates_are_scanned_apart_and_never_listed(c, base):
    make(c, base, new_target(c))
    layout = cache_scan.scan(c.base_dir)
    assert [f.path for f in layout.bases] == [base.path]
    [(name, path, _)] = layout.templates
    assert name.base == os.path.basename(base.path)
    assert [e.file for e in c.entries()] == [base.path]


def test_drop_removes_only_the_templates_of_that_base(c, base, tmp_path):
    make(c, base, new_target(c, "a"))
    make(c, base, new_target(c, "b"), 2 * GiB)
    keep = [base.path + "-2" + templates.INFIX + "1-" + "0" * 16,
            base.path + "_5" + templates.INFIX + "1-" + "0" * 16,
            base.path + templates.INFIX + "1-" + "0" * 16 + ".part-"
            + "0" * 12]
    for path in keep:
        open(path, "wb").close()
    removed = templates.drop(c.base_dir, os.path.basename(base.path))
    assert len(removed) == 2
    assert sorted(template_files(c)) == sorted(os.path.basename(p)
                                               for p in keep)


def test_removing_a_base_removes_its_templates(c, base):
    make(c, base, new_target(c))
    [f] = cache_scan.scan(c.base_dir).bases
    report = cache_results.PruneReport()
    assert c.remover.remove_base(f, "test", report) is True
    assert template_files(c) == []
    assert [r.kind for r in report.removed] == ["base", "template"]


def test_invalidate_removes_the_templates_with_the_base(c, base):
    disk = new_target(c)
    make(c, base, disk)
    # While a disk uses the base, the base and its templates stay.
    result = c.invalidate("img")
    assert [k.file for k in result.kept] == [base.path]
    assert len(template_files(c)) == 1
    os.unlink(disk)
    result = c.invalidate("img")
    assert template_files(c) == []
    assert [r.kind for r in result.removed] == ["base", "template"]


def test_prune_removes_templates_whose_base_is_gone_and_old_scratch(
        c, base):
    make(c, base, new_target(c))
    [name] = template_files(c)
    orphan = os.path.join(c.base_dir, "b" * 40 + templates.INFIX
                          + "5-" + "0" * 16)
    old_scratch = os.path.join(c.base_dir, name + ".part-" + "1" * 12)
    new_scratch = os.path.join(c.base_dir, name + ".part-" + "2" * 12)
    for path in (orphan, old_scratch, new_scratch):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
    os.utime(old_scratch, (1, 1))
    report = c.prune()
    removed = {r.file for r in report.removed if r.kind == "template"}
    assert removed == {orphan, old_scratch}
    assert sorted(template_files(c)) == sorted([name, os.path.basename(
        new_scratch)])


def test_verify_repair_moving_a_base_aside_removes_its_templates(c, base):
    disk = new_target(c)
    make(c, base, disk)
    os.unlink(disk)
    with open(base.path, "r+b") as f:
        f.write(b"corrupt")
    c.verify(repair=True)
    assert os.path.exists(base.path + ".corrupt")
    assert template_files(c) == []


def test_a_qemu_img_failure_names_the_disk_not_the_template(c, base):
    c.qemu.create.side_effect = exception.QemuImgError(
        operation="create", path="x", exit_code=1, stderr="no space")
    target = new_target(c)
    with pytest.raises(exception.QemuImgError):
        make(c, base, target)
    assert [call.args[0] for call in c.qemu.create.call_args_list][-1] == (
        target)
    assert template_files(c) == []


def test_a_dry_run_reports_the_templates_it_would_remove(c, base):
    make(c, base, new_target(c))
    [f] = cache_scan.scan(c.base_dir).bases
    report = cache_results.PruneReport(dry_run=True)
    assert c.remover.remove_base(f, "test", report) is True
    [name] = template_files(c)
    assert [(os.path.basename(r.file), r.kind) for r in report.removed] == [
        (os.path.basename(base.path), "base"), (name, "template")]
    assert report.removed[1].size > 0
