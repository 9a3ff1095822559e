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

"""imagebackend.disk.chain in detail, on real files with a scripted
``qemu-img info``: what is read with which format, where a chain stops,
and the exact message of every refusal (the file, the reason, the fix)."""

import copy
import os

import pytest

from imagebackend.disk import chain as disk_chain
from imagebackend.disk import trust as disk_trust
from imagebackend import exception
from imagebackend.qemu import results as qemu_results

BACKING = ", ".join(disk_trust.BACKING_FORMATS)


def write(path, data=b"data"):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def image(backing=None, backing_fmt=None, size=1024, raw=None):
    return qemu_results.ImageInfo(
        filename="(qemu's name)", format="(qemu's guess)", virtual_size=size,
        backing_file=backing, backing_format=backing_fmt, raw=raw or {})


class Qemu:
    """``qemu-img info`` answering from ``images`` (path -> ImageInfo),
    recording each call; with ``backing_chain`` it follows the recorded
    backing files as qemu-img would (``opened`` replaces its answer).
    """

    def __init__(self):
        self.images = {}
        self.calls = []
        self.opened = None

    def info(self, path, fmt, *, backing_chain=False, force_share=False):
        self.calls.append((path, fmt, backing_chain, force_share))
        if backing_chain and self.opened is not None:
            chain = [copy.deepcopy(i) for i in self.opened]
        else:
            chain = []
            while True:
                info = copy.deepcopy(self.images[path])
                info.filename, info.format = path, fmt
                chain.append(info)
                if not backing_chain or info.backing_file is None:
                    break
                path = os.path.join(os.path.dirname(path), info.backing_file)
                fmt = info.backing_format
        chain[0].chain = chain if backing_chain else []
        return chain[0]


class Records:
    """FormatRecords with ``bases`` (path -> BaseRecord or exception)."""

    def __init__(self, paths, bases=None):
        self.paths = paths
        self.bases = bases or {}

    def base_record(self, path):
        found = self.bases.get(path)
        if isinstance(found, Exception):
            raise found
        return found

    def disk_format(self, path):
        return None


@pytest.fixture
def records(paths):
    return Records(paths)


@pytest.fixture
def qemu():
    return Qemu()


def vm(paths, name):
    return os.path.join(paths.instances_path, "vm", name)


def add(qemu, path, info=None):
    write(path)
    qemu.images[str(path)] = info or image()
    return str(path)


def refused(call, *args, **kwargs):
    with pytest.raises(exception.DiskOperationError) as err:
        call(*args, **kwargs)
    return str(err.value)


# --- reading a chain ---------------------------------------------------------

def test_read_chain_reads_each_image_with_its_recorded_format(
        paths, records, qemu):
    base = add(qemu, vm(paths, "base"))
    mid = add(qemu, vm(paths, "mid"), image("base", "raw"))
    top = add(qemu, vm(paths, "top"), image(mid, "qcow2"))
    info = disk_chain.read_chain(qemu, top, "qcow2", records=records)
    assert qemu.calls == [(top, "qcow2", False, False),
                          (mid, "qcow2", False, False),
                          (base, "raw", False, False)]
    assert [(i.filename, i.format) for i in info.chain] == [
        (top, "qcow2"), (mid, "qcow2"), (base, "raw")]
    assert info.chain[1].chain == info.chain[1:]
    assert info.chain[1].chain[0] is info.chain[1]
    assert info.chain[2].chain == info.chain[2:]
    assert (info.filename, info.format) == (top, "qcow2")


def test_read_chain_shares_only_when_asked(paths, records, qemu):
    add(qemu, vm(paths, "base"))
    top = add(qemu, vm(paths, "top"), image("base", "raw"))
    disk_chain.read_chain(qemu, top, "qcow2", records=records,
                          force_share=True)
    assert [c[3] for c in qemu.calls] == [True, True]


def test_read_chain_without_follow_reads_the_disk_only(paths, records,
                                                       qemu):
    top = add(qemu, vm(paths, "top"), image("gone", "raw"))
    info = disk_chain.read_chain(qemu, top, "qcow2", records=records,
                                 follow=False)
    assert qemu.calls == [(top, "qcow2", False, False)]
    assert info.chain == [info] and info.backing_file == "gone"


def test_a_backing_file_is_relative_to_the_image_naming_it(
        paths, records, qemu, tmp_path):
    other = os.path.join(paths.instances_path, "other")
    base = add(qemu, os.path.join(other, "b"))
    add(qemu, vm(paths, "b"))
    mid = add(qemu, os.path.join(other, "mid"), image("b", "raw"))
    top = add(qemu, vm(paths, "top"), image(mid, "qcow2"))
    info = disk_chain.read_chain(qemu, top, "qcow2", records=records)
    assert info.chain[2].filename == base


def test_chains_are_at_most_sixteen_images(paths, records, qemu):
    def chain(length):
        names = [vm(paths, "%d-%d" % (length, i)) for i in range(length)]
        for name, below in zip(names, names[1:] + [None]):
            add(qemu, name, image(below and os.path.basename(below),
                                  below and "qcow2"))
        return names[0]
    assert disk_chain.MAX_CHAIN == 16
    top = chain(16)
    assert len(disk_chain.read_chain(qemu, top, "qcow2",
                                     records=records).chain) == 16
    top = chain(17)
    assert refused(disk_chain.read_chain, qemu, top, "qcow2",
                   records=records) == (
        "Disk %s: its backing chain is deeper than 16 images; flatten it "
        "with 'imagebackend disk extract'" % top)
    assert len(qemu.calls) == 16 + 16


def test_an_external_data_file_is_refused(paths, records, qemu):
    data = {"format-specific": {"data": {"data-file": "/dev/sda"}}}
    base = add(qemu, vm(paths, "base"), image(raw=data))
    top = add(qemu, vm(paths, "top"), image("base", "qcow2"))
    assert refused(disk_chain.read_chain, qemu, top, "qcow2",
                   records=records) == (
        "Disk %s: %s keeps its data in the external file /dev/sda, which "
        "instance disks never do; it is not a disk these operations "
        "handle" % (top, base))


def test_refusals_name_the_top_of_the_chain(paths, records, qemu):
    other = add(qemu, vm(paths, "other"))
    new = add(qemu, vm(paths, "new"), image("gone", "raw"))
    message = refused(disk_chain.read_chain, qemu, new, "qcow2",
                      records=records, top=other)
    assert message.startswith("Disk %s: the backing file %s of %s does "
                              "not exist" % (other, vm(paths, "gone"), new))


def test_a_loop_is_refused(paths, records, qemu):
    a = add(qemu, vm(paths, "a"), image("b", "qcow2"))
    b = add(qemu, vm(paths, "b"), image("a", "qcow2"))
    assert refused(disk_chain.read_chain, qemu, a, "qcow2",
                   records=records) == (
        "Disk %s: its backing chain loops: %s leads back to %s" % (a, b, a))
    self_loop = add(qemu, vm(paths, "self"), image("self", "qcow2"))
    assert refused(disk_chain.read_chain, qemu, self_loop, "qcow2",
                   records=records) == (
        "Disk %s: its backing chain loops: %s leads back to %s"
        % (self_loop, self_loop, self_loop))


def test_a_loop_below_the_disk_is_refused_as_a_loop(paths, records, qemu):
    a = add(qemu, vm(paths, "a"), image("b", "qcow2"))
    b = add(qemu, vm(paths, "b"), image("a", "qcow2"))
    top = add(qemu, vm(paths, "top"), image("a", "qcow2"))
    assert refused(disk_chain.read_chain, qemu, top, "qcow2",
                   records=records) == (
        "Disk %s: its backing chain loops: %s leads back to %s" % (top, b, a))
    assert len(qemu.calls) == 3


@pytest.mark.parametrize("name", ["nbd:host:1", "json:{}", "a:b",
                                  ":x", "file:/etc/passwd"])
def test_a_protocol_is_refused(paths, records, qemu, name):
    top = add(qemu, vm(paths, "top"), image(name, "raw"))
    assert refused(disk_chain.read_chain, qemu, top, "qcow2",
                   records=records) == (
        "Disk %s: the backing file of %s is %r, which is not a local file; "
        "refusing to let qemu-img open it" % (top, top, name))
    assert len(qemu.calls) == 1


def test_a_colon_after_a_slash_is_a_local_file(paths, records, qemu):
    base = add(qemu, vm(paths, "d/x:y"))
    top = add(qemu, vm(paths, "top"), image("d/x:y", "raw"))
    info = disk_chain.read_chain(qemu, top, "qcow2", records=records)
    assert info.chain[1].filename == base


def test_a_backing_file_without_a_format_is_never_opened(paths, records,
                                                         qemu):
    add(qemu, vm(paths, "base"))
    mid = add(qemu, vm(paths, "mid"), image("base"))
    top = add(qemu, vm(paths, "top"), image("mid", "qcow2"))
    base = vm(paths, "base")
    assert refused(disk_chain.read_chain, qemu, mid, "qcow2",
                   records=records) == (
        "Disk %s: its backing file %s has no recorded format, which "
        "qemu-img would have to guess; record it with 'imagebackend disk "
        "rebase %s %s --unsafe --backing-format FORMAT'"
        % (mid, base, mid, base))
    assert refused(disk_chain.read_chain, qemu, top, "qcow2",
                   records=records) == (
        "Disk %s: the backing file %s of %s has no recorded format, which "
        "qemu-img would have to guess; record it with 'imagebackend disk "
        "rebase %s %s --unsafe --backing-format FORMAT'"
        % (top, base, mid, mid, base))


def test_file_id(tmp_path):
    path = write(tmp_path / "f")
    st = os.stat(path)
    assert disk_chain.file_id(path) == (st.st_dev, st.st_ino)
    assert disk_chain.file_id(str(tmp_path / "missing")) is None


# --- checking one backing file -----------------------------------------------

def fix(image_path):
    return ("record another with 'imagebackend disk rebase %s NEW_BACKING "
            "--unsafe'" % image_path)


def test_a_backing_format_must_be_one_a_base_may_have(paths, records):
    top = write(vm(paths, "top"))
    backing = write(vm(paths, "b"))
    assert refused(disk_chain.check_backing, records, top, top, backing,
                   "nonsense") == (
        "Disk %s: its backing file %s is recorded as nonsense, which cannot "
        "back a disk (use one of %s)" % (top, backing, BACKING))
    for fmt in disk_trust.BACKING_FORMATS:
        disk_chain.check_backing(records, top, top, backing, fmt)


def test_a_missing_backing_file_names_the_fix(paths, records):
    top = write(vm(paths, "top"))
    mid = write(vm(paths, "mid"))
    gone = vm(paths, "gone")
    assert refused(disk_chain.check_backing, records, top, mid, gone,
                   "raw") == (
        "Disk %s: the backing file %s of %s does not exist; if it moved, %s"
        % (top, gone, mid, fix(mid)))


def test_a_dangling_symlink_cannot_be_read(paths, records):
    top = write(vm(paths, "top"))
    link = vm(paths, "link")
    os.symlink(vm(paths, "nowhere"), link)
    assert refused(disk_chain.check_backing, records, top, top, link,
                   "raw") == (
        "Disk %s: its backing file %s cannot be read (No such file or "
        "directory); %s" % (top, link, fix(top)))


def test_a_backing_file_that_is_not_a_file(paths, records):
    top = write(vm(paths, "top"))
    directory = vm(paths, "dir")
    os.mkdir(directory)
    assert refused(disk_chain.check_backing, records, top, top, directory,
                   "raw") == (
        "Disk %s: its backing file %s is not a regular file; %s"
        % (top, directory, fix(top)))


def test_a_refused_cache_file_says_why(paths):
    top = write(vm(paths, "top"))
    odd = write(os.path.join(paths.base_dir, "odd"))
    gone = write(os.path.join(paths.base_dir, "gone"))
    records = Records(paths, {
        odd: exception.DiskOperationError(path=odd, reason="it is odd"),
        gone: exception.DiskNotFound(path=gone)})
    assert refused(disk_chain.check_backing, records, top, top, odd,
                   "raw") == (
        "Disk %s: its backing file %s is refused: it is odd; %s"
        % (top, odd, fix(top)))
    assert refused(disk_chain.check_backing, records, top, top, gone,
                   "raw") == (
        "Disk %s: its backing file %s is refused: it is missing; %s"
        % (top, gone, fix(top)))


def test_a_base_must_have_the_recorded_format(paths):
    top = write(vm(paths, "top"))
    base = write(os.path.join(paths.base_dir, "a" * 40))
    records = Records(paths, {base: disk_trust.BaseRecord("raw", "r.json")})
    disk_chain.check_backing(records, top, top, base, "raw")
    assert refused(disk_chain.check_backing, records, top, top, base,
                   "qcow2") == (
        "Disk %s: its backing file %s is recorded in %s as qcow2, but the "
        "image cache records it as raw; record the right format with "
        "'imagebackend disk rebase %s %s --unsafe'"
        % (top, base, top, top, base))
    records.bases[base] = disk_trust.BaseRecord(None, "r.json")
    assert refused(disk_chain.check_backing, records, top, top, base,
                   "raw") == (
        "Disk %s: its backing file %s is in the image cache without a valid "
        "record, so its format is unknown (r.json); 'imagebackend cache "
        "verify' checks it" % (top, base))


def test_a_recorded_base_is_allowed_wherever_the_cache_is(tmp_path):
    # A _base outside instances_path (base_dir_name cannot do that, but a
    # symlinked _base can): the record decides, not the directory.
    paths = disk_trust.CachePaths(str(tmp_path / "instances"),
                                  str(tmp_path / "cache"),
                                  str(tmp_path / "locks"))
    top = write(tmp_path / "instances" / "vm" / "top")
    base = write(tmp_path / "cache" / ("a" * 40))
    records = Records(paths, {base: disk_trust.BaseRecord("raw", "r")})
    disk_chain.check_backing(records, top, top, base, "raw")


def test_where_a_backing_file_may_be(paths, records, tmp_path):
    top = write(vm(paths, "top"))
    disk_chain.check_backing(records, top, top,
                             write(os.path.join(paths.instances_path, "x")),
                             "raw")
    disk_chain.check_backing(records, top, top,
                             write(vm(paths, "deep/er/x")), "raw")
    elsewhere = write(tmp_path / "elsewhere" / "x")
    assert refused(disk_chain.check_backing, records, top, top, elsewhere,
                   "raw") == (
        "Disk %s: its backing file %s (really %s) is outside the "
        "directories backing files may be in: under %s, directly in the "
        "disk's directory %s, or under a directory of [image_cache] "
        "disk_dirs (none); move it there or list its directory in "
        "disk_dirs, then %s" % (top, elsewhere, elsewhere,
                                paths.instances_path, os.path.dirname(top),
                                fix(top)))
    listed = disk_trust.CachePaths(
        paths.instances_path, paths.base_dir, paths.lock_dir,
        (str(tmp_path / "d1"), str(tmp_path / "d2")))
    message = refused(disk_chain.check_backing, Records(listed), top, top,
                      elsewhere, "raw")
    assert "disk_dirs (%s, %s); move" % listed.disk_dirs in message
    disk_chain.check_backing(Records(listed), top, top,
                             write(tmp_path / "d2" / "sub" / "x"), "raw")


def test_a_disk_dir_reached_through_a_symlink(paths, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    listed = disk_trust.CachePaths(paths.instances_path, paths.base_dir,
                                   paths.lock_dir, (str(tmp_path / "link"),))
    top = write(vm(paths, "top"))
    disk_chain.check_backing(Records(listed), top, top, write(real / "x"),
                             "raw")


def test_the_disk_directory_by_either_real_path(paths, records, tmp_path):
    # The disk is named through a symlinked directory...
    real_dir = tmp_path / "real-dir"
    real_dir.mkdir()
    os.symlink(real_dir, tmp_path / "dir-link")
    top = write(real_dir / "top")
    disk_chain.check_backing(records, str(tmp_path / "dir-link" / "top"),
                             top, write(real_dir / "b"), "raw")
    # ...or is itself a symlink to a disk elsewhere.
    here = tmp_path / "here"
    there = tmp_path / "there"
    here.mkdir()
    there.mkdir()
    real_top = write(there / "top")
    os.symlink(real_top, here / "top")
    link_top = str(here / "top")
    disk_chain.check_backing(records, link_top, link_top,
                             write(here / "b"), "raw")
    disk_chain.check_backing(records, link_top, link_top,
                             write(there / "b"), "raw")
    with pytest.raises(exception.DiskOperationError):
        disk_chain.check_backing(records, link_top, link_top,
                                 write(tmp_path / "b"), "raw")


# --- a new backing file ------------------------------------------------------

def test_check_new_backing_returns_its_path_and_format(paths, records,
                                                       qemu, monkeypatch):
    top = add(qemu, vm(paths, "top"))
    base = add(qemu, vm(paths, "base"))
    new = add(qemu, vm(paths, "new"), image("base", "raw"))
    monkeypatch.chdir(os.path.dirname(new))
    assert disk_chain.check_new_backing(qemu, top, "new", "qcow2",
                                        records=records) == (new, "qcow2")
    assert qemu.calls == [(new, "qcow2", False, False),
                          (base, "raw", False, False)]


def test_a_new_backing_file_must_exist(paths, records, qemu):
    top = add(qemu, vm(paths, "top"))
    new = vm(paths, "typo")
    assert refused(disk_chain.check_new_backing, qemu, top, new, "raw",
                   records=records) == (
        "Disk %s: the new backing file %s does not exist" % (top, new))


def test_a_new_backing_file_needs_a_base_format(paths, records, qemu):
    top = add(qemu, vm(paths, "top"))
    new = add(qemu, vm(paths, "new"))
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disk_chain.check_new_backing(qemu, top, new, "nonsense",
                                     records=records)
    assert str(err.value) == (
        "Disk %s: the new backing file %s is a nonsense image, which cannot "
        "back a disk; use one of %s" % (top, new, BACKING))
    assert isinstance(err.value.__cause__, exception.UnsupportedDiskOperation)
    with pytest.raises(exception.DiskFormatUnknown) as err:
        disk_chain.check_new_backing(qemu, top, new, None, records=records)
    assert "--backing-format qcow2 or --backing-format raw" in str(err.value)
    assert disk_chain.check_new_backing(qemu, top, new, "vmdk",
                                        records=records) == (new, "vmdk")


def test_a_new_backing_file_is_checked_as_part_of_the_disk(paths, records,
                                                           qemu, tmp_path):
    top = add(qemu, vm(paths, "top"))
    outside = add(qemu, tmp_path / "outside")
    message = refused(disk_chain.check_new_backing, qemu, top, outside,
                      "raw", records=records)
    assert message.startswith("Disk %s: its backing file %s (really %s) is "
                              "outside" % (top, outside, outside))
    assert qemu.calls == []
    new = add(qemu, vm(paths, "new"), image(outside, "raw"))
    message = refused(disk_chain.check_new_backing, qemu, top, new, "qcow2",
                      records=records)
    assert message.startswith("Disk %s: the backing file %s of %s (really "
                              "%s) is outside" % (top, outside, new, outside))


def test_a_disk_cannot_back_itself(paths, records, qemu):
    top = add(qemu, vm(paths, "top"))
    link = vm(paths, "hard-link")
    os.link(top, link)
    over = add(qemu, vm(paths, "over"), image("hard-link", "qcow2"))
    qemu.images[link] = image()
    for new in (top, link, over):
        with pytest.raises(exception.InvalidDiskRequest) as err:
            disk_chain.check_new_backing(qemu, top, new, "qcow2",
                                         records=records)
        assert str(err.value) == (
            "Disk %s: %s cannot be its backing file: the disk would be in "
            "its own backing chain" % (top, new))


# --- after a change ----------------------------------------------------------

def test_recheck_confirms_what_qemu_opens(paths, records, qemu):
    base = add(qemu, vm(paths, "base"))
    top = add(qemu, vm(paths, "top"), image("base", "raw"))
    info = disk_chain.recheck(qemu, top, "qcow2", "resize", records=records)
    assert [(i.filename, i.format) for i in info.chain] == [
        (top, "qcow2"), (base, "raw")]
    assert qemu.calls == [(top, "qcow2", False, False),
                          (base, "raw", False, False),
                          (top, "qcow2", True, False)]


def test_qemu_names_backing_files_relative_to_the_disk(paths, records, qemu,
                                                       tmp_path,
                                                       monkeypatch):
    add(qemu, vm(paths, "base"))
    top = add(qemu, vm(paths, "top"), image("base", "raw"))
    opened = [image(), image()]
    opened[0].filename, opened[0].format = top, "qcow2"
    opened[1].filename, opened[1].format = "base", "raw"
    qemu.opened = opened
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "base")        # not the one qemu-img means
    disk_chain.recheck(qemu, top, "qcow2", "resize", records=records)


def opened_wrongly(qemu, top, base, other):
    opened = [image(), image()]
    opened[0].filename, opened[0].format = top, "qcow2"
    opened[1].filename, opened[1].format = other, "raw"
    qemu.opened = opened


def test_qemu_opening_another_chain_is_refused(paths, records, qemu):
    base = add(qemu, vm(paths, "base"))
    other = add(qemu, vm(paths, "other"))
    top = add(qemu, vm(paths, "top"), image("base", "raw"))
    opened_wrongly(qemu, top, base, other)
    with pytest.raises(exception.DiskOperationError) as err:
        disk_chain.recheck(qemu, top, "qcow2", "resize", records=records)
    assert str(err.value.__cause__).startswith(
        "Disk %s: qemu-img opens the chain " % top)
    assert str(err.value) == (
        "Disk %s: after resize its backing chain is refused (qemu-img opens "
        "the chain %s (qcow2) -> %s (raw), not the chain checked (%s "
        "(qcow2) -> %s (raw)); inspect it with 'qemu-img info -U "
        "--backing-chain -f qcow2 %s'); the change was kept; fix the chain "
        "as this says" % (top, top, other, top, base, top))


def test_qemu_opening_another_format_is_refused(paths, records, qemu):
    base = add(qemu, vm(paths, "base"))
    top = add(qemu, vm(paths, "top"), image("base", "raw"))
    opened_wrongly(qemu, top, base, base)
    qemu.opened[1].format = "qcow2"
    message = refused(disk_chain.recheck, qemu, top, "qcow2", "resize",
                      records=records)
    assert "opens the chain %s (qcow2) -> %s (qcow2)" % (top, base) in message


def test_a_refused_change_is_undone(paths, records, qemu):
    top = add(qemu, vm(paths, "top"), image("gone", "raw"))
    undone = []
    message = refused(disk_chain.recheck, qemu, top, "qcow2", "rebase",
                      records=records, undo=lambda: undone.append(1))
    assert undone == [1]
    assert message == (
        "Disk %s: after rebase its backing chain is refused (its backing "
        "file %s does not exist; if it moved, %s); the change was undone"
        % (top, vm(paths, "gone"), fix(top)))


def test_an_undo_that_fails_says_so(paths, records, qemu):
    top = add(qemu, vm(paths, "top"), image("gone", "raw"))

    def undo():
        raise exception.QemuImgError(operation="rebase", path=top,
                                     exit_code=1, stderr="boom")
    message = refused(disk_chain.recheck, qemu, top, "qcow2", "rebase",
                      records=records, undo=undo)
    assert message.endswith(
        "; undoing it failed too (qemu-img rebase failed on %s (exit code "
        "1): boom); fix the chain as this says" % top)


def test_a_qemu_failure_is_a_refusal(paths, records, qemu):
    top = add(qemu, vm(paths, "top"))
    error = exception.QemuImgError(operation="info", path=top, exit_code=1,
                                   stderr="locked")

    def info(*args, **kwargs):
        raise error
    qemu.info = info
    with pytest.raises(exception.DiskOperationError) as err:
        disk_chain.recheck(qemu, top, "qcow2", "resize", records=records)
    assert err.value.__cause__ is error
    assert str(err.value) == (
        "Disk %s: after resize its backing chain is refused (qemu-img info "
        "failed on %s (exit code 1): locked); the change was kept; fix the "
        "chain as this says" % (top, top))
