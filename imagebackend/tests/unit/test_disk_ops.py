"""DiskOperations with QemuImg mocked: formats never guessed, backing
chains checked before qemu-img runs, refusals made before anything is
changed, and no partial output left behind."""

import copy
import datetime
import os
from unittest import mock

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import disk_ops
from imagebackend import exception
from imagebackend import qemu_img
from imagebackend.tests.unit import fakes

MiB = 1024 * 1024


def snap(id_, name):
    return qemu_img.Snapshot(
        id=id_, name=name, vm_state_size=0,
        date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
        clock=datetime.timedelta(0))


def image(fmt, size=8 * MiB, backing=None, backing_fmt=None, snapshots=(),
          raw=None):
    return qemu_img.ImageInfo(filename="(qemu's name)", format=fmt,
                              virtual_size=size, backing_file=backing,
                              backing_format=backing_fmt,
                              snapshots=list(snapshots), raw=raw or {})


class Disks:
    """Files in a directory and what the mocked ``qemu-img info`` says
    about each of them.
    """

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.infos = {}
        self.qemu = mock.create_autospec(qemu_img.QemuImg, instance=True)
        self.qemu.info.side_effect = self._info
        self.qemu.snapshot_list.side_effect = (
            lambda path, fmt: self._info(path, fmt).snapshots)
        self.qemu.snapshot_create.side_effect = self._snapshot_create
        self.ops = disk_ops.DiskOperations(qemu=self.qemu)

    def _info(self, path, fmt, **kwargs):
        return copy.deepcopy(self.infos[path])

    def qcow2(self, name, **kwargs):
        return self._add(name, fakes.qcow2_header(8 * MiB),
                         image("qcow2", **kwargs))

    def raw(self, name, data=b"guest data", **kwargs):
        return self._add(name, data, image("raw", **kwargs))

    def _add(self, name, data, info):
        path = str(self.dir / name)
        with open(path, "wb") as f:
            f.write(data)
        self.infos[path] = info
        return path

    def _snapshot_create(self, path, fmt, name):
        snapshots = self.infos[path].snapshots
        snapshots.append(snap(str(len(snapshots) + 1), name))

    def info_calls(self):
        return [c.args[:2] for c in self.qemu.info.call_args_list]


@pytest.fixture
def disks(tmp_path):
    return Disks(tmp_path)


# --- formats -----------------------------------------------------------------

def test_format_is_read_from_the_header(disks):
    assert disks.ops.detect_format(disks.qcow2("a.qcow2")) == "qcow2"
    assert disks.ops.detect_format(disks.raw("b.img")) == "raw"
    assert disks.ops.detect_format(disks.raw("empty", b"")) == "raw"
    disks.qemu.info.assert_not_called()


@pytest.mark.parametrize("header", [b"KDMV" + bytes(60), b"conectix",
                                    b"QED\x00", b"vhdxfile"])
def test_other_image_formats_are_not_instance_disks(disks, header):
    path = disks.raw("odd", header + bytes(512))
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        disks.ops.info(path)
    assert path in str(err.value)
    assert "--input-format raw" in str(err.value)
    disks.qemu.info.assert_not_called()


def test_a_given_format_wins_over_the_header(disks):
    # A raw disk whose guest wrote a qcow2 header naming a host file.
    path = disks.qcow2("raw-disk", backing="/etc/shadow", backing_fmt="raw")
    disks.infos[path] = image("raw")
    info = disks.ops.info(path, fmt="raw")
    assert (info.format, info.backing_file) == ("raw", None)
    assert disks.info_calls() == [(path, "raw")]


def test_only_qcow2_and_raw_can_be_given(disks):
    path = disks.raw("d")
    with pytest.raises(exception.UnsupportedDiskOperation):
        disks.ops.info(path, fmt="vmdk")
    disks.qemu.info.assert_not_called()


def test_missing_disk_and_directory_are_clear_errors(disks, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(exception.DiskNotFound) as err:
        disks.ops.info(missing)
    assert isinstance(err.value, FileNotFoundError)
    assert missing in str(err.value)
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.check(str(tmp_path), fmt="raw")
    assert "not a regular file" in str(err.value)
    disks.qemu.info.assert_not_called()
    disks.qemu.check.assert_not_called()


# --- backing chains ----------------------------------------------------------

def test_info_reads_the_chain_with_recorded_formats(disks, tmp_path,
                                                    monkeypatch):
    base = disks.raw("base.raw", size=4 * MiB)
    mid = disks.qcow2("mid.qcow2", backing="base.raw", backing_fmt="raw")
    top = disks.qcow2("top.qcow2", backing=mid, backing_fmt="qcow2",
                      size=16 * MiB, snapshots=[snap("1", "s1")])
    monkeypatch.chdir("/")
    info = disks.ops.info(os.path.relpath(top))
    assert disks.info_calls() == [(top, "qcow2"), (mid, "qcow2"),
                                  (base, "raw")]
    assert [(i.filename, i.format) for i in info.chain] == [
        (top, "qcow2"), (mid, "qcow2"), (base, "raw")]
    assert info.virtual_size == 16 * MiB
    assert [s.name for s in info.snapshots] == ["s1"]


def test_only_reports_read_a_disk_a_guest_has_open(disks):
    top = disks.qcow2("top.qcow2")
    disks.ops.info(top)
    disks.ops.snapshot_list(top)
    assert [c.kwargs["force_share"] for c in disks.qemu.info.call_args_list
            ] == [True, True]
    disks.qemu.info.reset_mock()
    disks.ops.snapshot_create(top, "s1")
    disks.ops.resize(top, 16 * MiB)
    disks.ops.check(top)
    assert not any(c.kwargs["force_share"]
                   for c in disks.qemu.info.call_args_list)


def test_a_backing_file_without_recorded_format_is_never_opened(disks):
    base = disks.raw("base.raw")
    top = disks.qcow2("top.qcow2", backing=base, backing_fmt=None)
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.info(top)
    assert "no recorded format" in str(err.value)
    assert "imagebackend disk rebase %s %s --unsafe" % (top, base) in str(
        err.value)
    assert disks.info_calls() == [(top, "qcow2")]


@pytest.mark.parametrize("name", ["nbd://10.0.0.1/export",
                                  'json:{"file.driver": "http"}',
                                  "ssh:host:/disk"])
def test_a_backing_file_that_is_not_a_local_file_is_refused(disks, name):
    top = disks.qcow2("top.qcow2", backing=name, backing_fmt="raw")
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.check(top)
    assert "not a local file" in str(err.value)
    disks.qemu.check.assert_not_called()


def test_a_missing_backing_file_names_the_fix(disks):
    top = disks.qcow2("top.qcow2", backing="gone.raw", backing_fmt="raw")
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.resize(top, 16 * MiB)
    message = str(err.value)
    assert str(disks.dir / "gone.raw") in message
    assert "does not exist" in message and "--unsafe" in message
    disks.qemu.resize.assert_not_called()


def test_a_looping_chain_is_refused(disks):
    a = disks.qcow2("a.qcow2", backing="b.qcow2", backing_fmt="qcow2")
    disks.qcow2("b.qcow2", backing="a.qcow2", backing_fmt="qcow2")
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.info(a)
    assert "loops" in str(err.value)


def test_an_external_data_file_is_refused(disks):
    top = disks.qcow2("top.qcow2", raw={"format-specific": {
        "type": "qcow2", "data": {"data-file": "/dev/sda"}}})
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.extract(top, str(disks.dir / "out"))
    assert "/dev/sda" in str(err.value)
    disks.qemu.convert.assert_not_called()


# --- check -------------------------------------------------------------------

def test_check_passes_the_repair_mode(disks):
    top = disks.qcow2("top.qcow2")
    disks.qemu.check.return_value = qemu_img.CheckResult(
        filename=top, format="qcow2", leaks_fixed=2)
    result = disks.ops.check(top, "leaks")
    disks.qemu.check.assert_called_once_with(top, "qcow2", "leaks")
    assert result.leaks_fixed == 2


def test_check_refuses_an_unknown_repair_mode_before_running(disks):
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.check(top, "everything")
    assert isinstance(err.value, ValueError)
    disks.qemu.info.assert_not_called()
    disks.qemu.check.assert_not_called()


# --- snapshots ---------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda ops, p: ops.snapshot_create(p, "s1"),
    lambda ops, p: ops.snapshot_apply(p, "s1"),
    lambda ops, p: ops.snapshot_delete(p, "s1"),
    lambda ops, p: ops.snapshot_list(p),
    lambda ops, p: ops.rebase(p, p),
])
def test_raw_disks_have_no_snapshots_or_backing_files(disks, call):
    path = disks.raw("disk.raw")
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        call(disks.ops, path)
    assert "raw disks" in str(err.value) and path in str(err.value)
    assert "qcow2" in str(err.value)
    assert disks.qemu.method_calls == []


def test_snapshot_create_returns_the_new_snapshot(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "old")])
    new = disks.ops.snapshot_create(top, "before-upgrade")
    disks.qemu.snapshot_create.assert_called_once_with(top, "qcow2",
                                                       "before-upgrade")
    assert (new.id, new.name) == ("2", "before-upgrade")


@pytest.mark.parametrize("name", ["old", "", "42"])
def test_snapshot_create_refuses_duplicate_and_id_like_names(disks, name):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "old")])
    with pytest.raises(exception.InvalidDiskRequest):
        disks.ops.snapshot_create(top, name)
    disks.qemu.snapshot_create.assert_not_called()


def test_snapshot_apply_and_delete_by_name_or_id(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a"),
                                              snap("2", "b")])
    assert disks.ops.snapshot_apply(top, "b").id == "2"
    disks.qemu.snapshot_apply.assert_called_with(top, "qcow2", "b")
    assert disks.ops.snapshot_delete(top, "1").name == "a"
    disks.qemu.snapshot_delete.assert_called_with(top, "qcow2", "a")


def test_a_snapshot_named_like_another_ones_id_is_applied_by_id(disks):
    # qemu-img apply looks ids up first: "2" would mean the second one.
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "2"),
                                              snap("2", "x")])
    assert disks.ops.snapshot_apply(top, "2").id == "1"
    disks.qemu.snapshot_apply.assert_called_once_with(top, "qcow2", "1")
    # qemu-img delete looks names up only; it cannot be named safely.
    with pytest.raises(exception.InvalidDiskRequest):
        disks.ops.snapshot_delete(top, "2")
    disks.qemu.snapshot_delete.assert_not_called()


def test_an_unknown_snapshot_lists_the_known_ones(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a"),
                                              snap("2", "b")])
    with pytest.raises(exception.SnapshotNotFound) as err:
        disks.ops.snapshot_apply(top, "c")
    assert isinstance(err.value, LookupError)
    assert "a, b" in str(err.value) and "'c'" in str(err.value)
    disks.qemu.snapshot_apply.assert_not_called()


# --- rebase ------------------------------------------------------------------

def test_rebase_records_an_absolute_path_and_the_detected_format(
        disks, monkeypatch):
    top = disks.qcow2("top.qcow2", backing="old.raw", backing_fmt="raw")
    disks.raw("old.raw")
    new = disks.qcow2("new.qcow2")
    monkeypatch.chdir(disks.dir)
    disks.ops.rebase("top.qcow2", "new.qcow2")
    disks.qemu.rebase.assert_called_once_with(top, "qcow2", new, "qcow2",
                                              unsafe=False, progress=None,
                                              cancel=None)


def test_unsafe_rebase_works_when_the_old_backing_file_is_gone(disks):
    top = disks.qcow2("top.qcow2", backing="gone.raw", backing_fmt="raw")
    new = disks.raw("moved.raw")

    def rebase(path, fmt, backing, backing_fmt, unsafe, **kwargs):
        disks.infos[path] = image("qcow2", backing=backing,
                                  backing_fmt=backing_fmt)
    disks.qemu.rebase.side_effect = rebase
    with pytest.raises(exception.DiskOperationError):
        disks.ops.rebase(top, new)          # a safe rebase reads "gone"
    disks.qemu.rebase.assert_not_called()
    info = disks.ops.rebase(top, new, unsafe=True)
    disks.qemu.rebase.assert_called_once_with(top, "qcow2", new, "raw",
                                              unsafe=True, progress=None,
                                              cancel=None)
    assert [(i.filename, i.format) for i in info.chain] == [
        (top, "qcow2"), (new, "raw")]


def test_rebase_refuses_a_chain_that_would_loop(disks):
    top = disks.qcow2("top.qcow2")
    over_top = disks.qcow2("over.qcow2", backing=top, backing_fmt="qcow2")
    for new in (top, over_top):
        with pytest.raises(exception.InvalidDiskRequest) as err:
            disks.ops.rebase(top, new, unsafe=True)
        assert "own backing chain" in str(err.value)
    disks.qemu.rebase.assert_not_called()


def test_rebase_onto_a_missing_file_names_it(disks):
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.rebase(top, str(disks.dir / "typo.raw"), unsafe=True)
    assert "typo.raw does not exist" in str(err.value)
    disks.qemu.rebase.assert_not_called()


# --- extract -----------------------------------------------------------------

def converter(disks, fail=None, also_create=None):
    def convert(source, source_fmt, target, target_fmt, progress=None,
                **kwargs):
        with open(target, "wb") as f:
            f.write(b"converted")
        disks.infos[target] = image(target_fmt, size=16 * MiB)
        if progress:
            progress(50.0)
            progress(100.0)
        if also_create:
            with open(also_create, "wb") as f:
                f.write(b"someone else's")
        if fail:
            raise fail
    return convert


def test_extract_publishes_a_complete_image_under_its_name(disks):
    top = disks.qcow2("top.qcow2", size=16 * MiB, backing="b.raw",
                      backing_fmt="raw")
    disks.raw("b.raw")
    out = str(disks.dir / "out" / "image.qcow2")
    os.mkdir(disks.dir / "out")
    disks.qemu.convert.side_effect = converter(disks)
    calls = []
    info = disks.ops.extract(top, out, compress=True,
                             progress=lambda *a: calls.append(a))
    args, kwargs = disks.qemu.convert.call_args
    assert args[:2] == (top, "qcow2") and args[3] == "qcow2"
    assert os.path.dirname(args[2]) == os.path.dirname(out)
    assert kwargs["compress"] is True
    assert os.listdir(disks.dir / "out") == ["image.qcow2"]
    with open(out, "rb") as f:
        assert f.read() == b"converted"
    assert (info.filename, info.format) == (out, "qcow2")
    assert calls == [("extract", 8 * MiB, 16 * MiB),
                     ("extract", 16 * MiB, 16 * MiB)]


def test_extract_never_overwrites(disks):
    top = disks.qcow2("top.qcow2")
    out = disks.raw("out.qcow2", b"precious")
    with pytest.raises(exception.TargetExists):
        disks.ops.extract(top, out)
    disks.qemu.convert.assert_not_called()
    # Taken while converting: the other file stays, ours goes.
    race = str(disks.dir / "race.qcow2")
    disks.qemu.convert.side_effect = converter(disks, also_create=race)
    with pytest.raises(exception.TargetExists):
        disks.ops.extract(top, race)
    with open(race, "rb") as f:
        assert f.read() == b"someone else's"
    assert sorted(os.listdir(disks.dir)) == ["out.qcow2", "race.qcow2",
                                             "top.qcow2"]


def test_a_failed_extract_leaves_nothing(disks):
    top = disks.qcow2("top.qcow2")
    disks.qemu.convert.side_effect = converter(
        disks, fail=exception.OperationCancelled(operation="Conversion",
                                                 path=top))
    with pytest.raises(exception.OperationCancelled):
        disks.ops.extract(top, str(disks.dir / "out.qcow2"))
    assert os.listdir(disks.dir) == ["top.qcow2"]


@pytest.mark.parametrize("kwargs", [{"output_fmt": "vmdk"},
                                    {"output_fmt": "raw", "compress": True}])
def test_extract_refuses_bad_requests_before_running(disks, kwargs):
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.InvalidDiskRequest):
        disks.ops.extract(top, str(disks.dir / "out"), **kwargs)
    assert disks.qemu.method_calls == []


def test_extract_into_a_missing_directory(disks):
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.InvalidTarget):
        disks.ops.extract(top, str(disks.dir / "no" / "out"))
    disks.qemu.convert.assert_not_called()


# --- resize ------------------------------------------------------------------

def test_resize_grows_and_shrinks_only_when_told(disks):
    top = disks.qcow2("top.qcow2", size=8 * MiB)
    disks.ops.resize(top, "16M")
    disks.qemu.resize.assert_called_once_with(top, "qcow2", 16 * MiB,
                                              shrink=False)
    disks.qemu.resize.reset_mock()
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.resize(top, 4 * MiB)
    assert "shrink" in str(err.value) and top in str(err.value)
    disks.qemu.resize.assert_not_called()
    disks.ops.resize(top, 4 * MiB, shrink=True)
    disks.qemu.resize.assert_called_once_with(top, "qcow2", 4 * MiB,
                                              shrink=True)


def test_resize_to_the_same_size_changes_nothing(disks):
    top = disks.qcow2("top.qcow2", size=8 * MiB)
    assert disks.ops.resize(top, 8 * MiB).virtual_size == 8 * MiB
    disks.qemu.resize.assert_not_called()


def test_resize_refuses_a_bad_size(disks):
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.InvalidSize):
        disks.ops.resize(top, "12Q")
    disks.qemu.resize.assert_not_called()


# --- the backend API ---------------------------------------------------------

def test_backends_offer_disk_operations_with_their_runner(tmp_path):
    qemu = mock.create_autospec(qemu_img.QemuImg, instance=True)
    conf = fakes.conf(tmp_path)
    backend = backends_base.load(conf, "qcow2", qemu=qemu,
                                 source=fakes.FakeSource(conf))
    path = str(tmp_path / "disk")
    with open(path, "wb") as f:
        f.write(fakes.qcow2_header(MiB))
    qemu.info.return_value = image("qcow2", size=MiB)
    assert backend.disk_ops.info(path, fmt="qcow2").virtual_size == MiB
    qemu.info.assert_called_once_with(path, "qcow2", force_share=True)
    assert backend.disk_ops is backend.disk_ops
