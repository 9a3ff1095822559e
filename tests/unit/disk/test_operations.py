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

"""DiskOperations with QemuImg mocked: formats never guessed, backing
chains checked before qemu-img runs, refusals made before anything is
changed, and no partial output left behind."""

import copy
import datetime
import hashlib
import json
import os
from unittest import mock

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.cache import disk_records
from imagebackend.disk import operations as disk_ops
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import results as qemu_results
from imagebackend.qemu import runner as qemu_runner
from tests import fakes

MiB = 1024 * 1024


def snap(id_, name):
    return qemu_results.Snapshot(
        id=id_, name=name, vm_state_size=0,
        date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
        clock=datetime.timedelta(0))


def image(fmt, size=8 * MiB, backing=None, backing_fmt=None, snapshots=(),
          raw=None):
    return qemu_results.ImageInfo(filename="(qemu's name)", format=fmt,
                                  virtual_size=size, backing_file=backing,
                                  backing_format=backing_fmt,
                                  snapshots=list(snapshots), raw=raw or {})


class Disks:
    """Files in an instance directory and what the mocked ``qemu-img
    info`` says about each of them.  Disks are recorded in the cache's
    registry, as the library records the disks it makes, unless made with
    ``registered=False``.
    """

    def __init__(self, tmp_path):
        self.conf = fakes.conf(tmp_path)
        self.instances = tmp_path / "instances"
        self.base_dir = self.instances / "_base"
        self.dir = self.instances / "vm"
        self.dir.mkdir(parents=True)
        self.infos = {}
        self.qemu = mock.create_autospec(qemu_img.QemuImg, instance=True)
        self.qemu.info.side_effect = self._info
        self.qemu.snapshot_list.side_effect = (
            lambda path, fmt: self._info(path, fmt).snapshots)
        self.qemu.snapshot_create.side_effect = self._snapshot_create
        self.ops = disk_ops.DiskOperations(
            self.conf, records=disk_records.DiskRecords(self.conf),
            qemu=self.qemu)

    def _info(self, path, fmt, backing_chain=False, **kwargs):
        chain = []
        while True:
            info = copy.deepcopy(self.infos[path])
            info.filename, info.format = path, fmt
            chain.append(info)
            if not (backing_chain and info.backing_file):
                break
            path = os.path.join(os.path.dirname(path), info.backing_file)
            fmt = info.backing_format
        chain[0].chain = chain
        return chain[0]

    def qcow2(self, name, registered=True, **kwargs):
        return self._add(name, fakes.qcow2_header(8 * MiB),
                         image("qcow2", **kwargs), registered)

    def raw(self, name, data=b"guest data", registered=True, **kwargs):
        return self._add(name, data, image("raw", **kwargs), registered)

    def base(self, name="a" * 40, fmt="raw", data=b"base data",
             record=True, **kwargs):
        """A base in ``_base`` with its record."""
        self.base_dir.mkdir(exist_ok=True)
        path = self._add(self.base_dir / name, data, image(fmt, **kwargs),
                         registered=False)
        if record:
            stem = name.split("_")[0]
            write_json(self.base_dir / (stem + ".json"),
                       {"image_id": "img", "format": fmt})
        return path

    def _add(self, name, data, info, registered):
        path = str(self.dir / name)
        with open(path, "wb") as f:
            f.write(data)
        self.infos[path] = info
        if registered:
            self.register(path, info.format)
        return path

    def register(self, path, fmt=None, cid="c" * 40, **extra):
        """Record ``path`` in the registry as the library does."""
        record = dict({"disk": path, "base": "b", "image_id": "img",
                       "state": "done", "created_at": 1}, **extra)
        if os.path.exists(path):
            st = os.stat(path)
            record.update(dev=st.st_dev, ino=st.st_ino)
        record["format"] = fmt or "qcow2"
        key = hashlib.sha1(path.encode()).hexdigest()
        directory = self.base_dir / ".disks" / cid
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / (key + ".json"), record)

    def _snapshot_create(self, path, fmt, name):
        snapshots = self.infos[path].snapshots
        snapshots.append(snap(str(len(snapshots) + 1), name))

    def info_calls(self):
        return [c.args[:2] for c in self.qemu.info.call_args_list]


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture
def disks(tmp_path):
    return Disks(tmp_path)


# --- formats -----------------------------------------------------------------

def test_a_disk_the_library_made_has_its_registry_format(disks):
    top = disks.qcow2("top.qcow2", registered=False)
    disks.register(top)
    assert disks.ops.info(top).format == "qcow2"
    raw = disks.raw("disk.raw", data=fakes.qcow2_header(MiB))
    assert disks.ops.info(raw).format == "raw"
    assert disks.info_calls() == [(top, "qcow2"), (raw, "raw")]


def test_commands_run_through_the_given_runner(disks):
    runner = mock.create_autospec(qemu_runner.Runner, instance=True)
    runner.execute.return_value = qemu_runner.ProcessResult(
        0, json.dumps({"filename": "x", "format": "qcow2",
                       "virtual-size": MiB}), "")
    ops = disk_ops.DiskOperations(disks.conf, runner)
    top = disks.qcow2("top.qcow2", registered=False)
    assert ops.info(top, fmt="qcow2").virtual_size == MiB
    assert runner.execute.call_args.args[0][1:] == [
        "info", "-f", "qcow2", "--output=json", "-U", top]


def test_without_the_cache_records_the_caller_names_every_format(disks):
    ops = disk_ops.DiskOperations(disks.conf, qemu=disks.qemu)
    top = disks.qcow2("top.qcow2")
    base = disks.base(fmt="raw")
    for path in (top, base):
        with pytest.raises(exception.DiskFormatUnknown):
            ops.info(path)
    assert disks.qemu.method_calls == []
    assert ops.info(top, fmt="qcow2").format == "qcow2"
    assert ops.info(base, fmt="raw").format == "raw"
    # Writing into the cache is refused all the same.
    with pytest.raises(exception.CachePathRefused):
        ops.resize(base, 16 * MiB, fmt="raw")


@pytest.mark.parametrize("header", [fakes.qcow2_header(MiB),
                                    b"KDMV" + bytes(60), b"conectix",
                                    b"QED\x00", b"vhdxfile", b"guest data"])
def test_no_header_ever_chooses_a_format(disks, header):
    path = disks.raw("odd", header + bytes(512), registered=False)
    for call in (disks.ops.info, disks.ops.check, disks.ops.snapshot_list,
                 lambda p: disks.ops.resize(p, 16 * MiB),
                 lambda p: disks.ops.extract(p, str(disks.dir / "out"))):
        with pytest.raises(exception.DiskFormatUnknown) as err:
            call(path)
        assert isinstance(err.value, ValueError)
        assert path in str(err.value)
        assert "--input-format qcow2 or --input-format raw" in str(err.value)
    assert disks.qemu.method_calls == []
    assert disks.ops.info(path, fmt="raw").format == "raw"


def test_a_given_format_wins_over_the_header(disks):
    # A raw disk whose guest wrote a qcow2 header naming a host file.
    path = disks.qcow2("raw-disk", backing="/etc/shadow", backing_fmt="raw",
                       registered=False)
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
    disks.qemu.check.return_value = qemu_results.CheckResult(
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

def test_rebase_records_an_absolute_path_and_the_recorded_format(
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

@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize_grows_and_shrinks_only_when_told(disks, fmt):
    # Raw disks too: qemu-img shrinks a raw file without --shrink, so the
    # refusal here is all that stands between a typo and lost data.
    top = getattr(disks, fmt)("top." + fmt, size=8 * MiB)
    disks.ops.resize(top, "16M")
    disks.qemu.resize.assert_called_once_with(top, fmt, 16 * MiB,
                                              shrink=False)
    disks.qemu.resize.reset_mock()
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.resize(top, 4 * MiB)
    assert "shrink" in str(err.value) and top in str(err.value)
    disks.qemu.resize.assert_not_called()
    disks.ops.resize(top, 4 * MiB, shrink=True)
    disks.qemu.resize.assert_called_once_with(top, fmt, 4 * MiB,
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


# --- the cache's records, and nothing written into the cache -----------------

def test_a_base_is_read_with_its_record_format(disks):
    base = disks.base(fmt="qcow2")
    assert disks.ops.info(base).format == "qcow2"
    disks.qemu.check.return_value = qemu_results.CheckResult(
        filename=base, format="qcow2")
    disks.ops.check(base)
    disks.qemu.check.assert_called_once_with(base, "qcow2", None)
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.info(base, fmt="raw")
    assert "records it as qcow2" in str(err.value)


def test_a_base_without_a_valid_record_needs_its_format(disks):
    base = disks.base(record=False, data=fakes.qcow2_header(MiB))
    with pytest.raises(exception.DiskFormatUnknown) as err:
        disks.ops.info(base)
    assert "no valid record" in str(err.value)
    assert disks.ops.info(base, fmt="raw").format == "raw"


def test_a_sized_base_has_its_base_format(disks):
    disks.base("a" * 40, fmt="raw")
    sized = disks.base("a" * 40 + "_%d" % (16 * MiB), fmt="raw",
                       record=False)
    assert disks.ops.info(sized).format == "raw"


@pytest.mark.parametrize("change", [
    lambda ops, p, d: ops.resize(p, 16 * MiB),
    lambda ops, p, d: ops.snapshot_create(p, "s1"),
    lambda ops, p, d: ops.snapshot_apply(p, "s1"),
    lambda ops, p, d: ops.snapshot_delete(p, "s1"),
    lambda ops, p, d: ops.check(p, "leaks"),
    lambda ops, p, d: ops.rebase(p, d, unsafe=True),
])
def test_a_base_is_never_changed(disks, tmp_path, change):
    base = disks.base(fmt="qcow2", snapshots=[snap("1", "s1")])
    other = disks.qcow2("other.qcow2")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "cache").symlink_to(disks.base_dir)
    (outside / "one-base").symlink_to(base)
    for path in (base, str(outside / "cache" / os.path.basename(base)),
                 str(outside / "one-base")):
        with pytest.raises(exception.CachePathRefused) as err:
            change(disks.ops, path, other)
        assert isinstance(err.value, PermissionError)
        assert "Refusing to write %s" % path in str(err.value)
        assert str(disks.base_dir) in str(err.value)
    assert disks.qemu.method_calls == []


def test_a_hard_link_to_a_base_is_never_changed(disks):
    base = disks.base(fmt="qcow2")
    link = str(disks.dir / "link")
    os.link(base, link)
    with pytest.raises(exception.CachePathRefused) as err:
        disks.ops.resize(link, 16 * MiB, fmt="qcow2")
    assert "hard link to %s" % base in str(err.value)
    disks.qemu.resize.assert_not_called()


def test_extract_never_writes_into_the_cache_or_the_locks(disks, tmp_path):
    top = disks.qcow2("top.qcow2")
    locks = disks.instances / "locks"
    (disks.base_dir / ".disks").mkdir(parents=True, exist_ok=True)
    locks.mkdir()
    (tmp_path / "into-locks").symlink_to(locks)
    for out in (disks.base_dir / ("f" * 40), disks.base_dir / ".disks" / "x",
                locks / "x", tmp_path / "into-locks" / "x"):
        with pytest.raises(exception.CachePathRefused) as err:
            disks.ops.extract(top, str(out))
        assert str(out) in str(err.value)
    disks.qemu.convert.assert_not_called()


def test_the_lock_directory_follows_oslo_concurrency(disks, tmp_path):
    locks = tmp_path / "elsewhere-locks"
    locks.mkdir()
    disks.conf.set_override("lock_path", str(locks),
                            group="oslo_concurrency")
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.CachePathRefused) as err:
        disks.ops.extract(top, str(locks / "x"))
    assert "the lock directory %s" % locks in str(err.value)


# --- chains are checked again after a change ---------------------------------

def test_a_rebase_refused_afterwards_is_undone(disks, tmp_path):
    top = disks.qcow2("top.qcow2", backing="old.raw", backing_fmt="raw")
    disks.raw("old.raw")
    new = disks.raw("new.raw")
    outside = str(tmp_path / "host-file")
    with open(outside, "wb") as f:
        f.write(b"host")

    def rebase(path, fmt, backing, backing_fmt, unsafe, **kwargs):
        # As if the disk had been changed under us to name a host file.
        disks.infos[path] = image("qcow2", backing=outside,
                                  backing_fmt="raw")
    disks.qemu.rebase.side_effect = rebase
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.rebase(top, new)
    message = str(err.value)
    assert "after rebase" in message and outside in message
    assert "the change was undone" in message
    assert disks.qemu.rebase.call_args_list == [
        mock.call(top, "qcow2", new, "raw", unsafe=False, progress=None,
                  cancel=None),
        mock.call(top, "qcow2", "old.raw", "raw", unsafe=True)]


def test_a_resize_is_checked_afterwards(disks, tmp_path):
    top = disks.qcow2("top.qcow2")

    def resize(path, fmt, size, shrink):
        disks.infos[path] = image("qcow2", backing="/etc/shadow",
                                  backing_fmt="raw")
    disks.qemu.resize.side_effect = resize
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.resize(top, 16 * MiB)
    assert "after resize" in str(err.value)
    assert "/etc/shadow" in str(err.value)


def test_rebase_checks_the_new_backing_chain_first(disks, tmp_path):
    top = disks.qcow2("top.qcow2")
    new = disks.qcow2("new.qcow2", backing="/etc/shadow", backing_fmt="raw")
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.rebase(top, new, unsafe=True)
    assert "/etc/shadow" in str(err.value)
    assert "outside the directories" in str(err.value)
    disks.qemu.rebase.assert_not_called()


def test_rebase_takes_the_new_backing_format_from_the_cache(disks):
    top = disks.qcow2("top.qcow2")
    base = disks.base(fmt="raw", data=fakes.qcow2_header(MiB))
    disks.ops.rebase(top, base, unsafe=True)
    disks.qemu.rebase.assert_called_once_with(top, "qcow2", base, "raw",
                                              unsafe=True, progress=None,
                                              cancel=None)
    unknown = disks.raw("unknown", registered=False)
    with pytest.raises(exception.DiskFormatUnknown) as err:
        disks.ops.rebase(top, unknown, unsafe=True)
    assert "--backing-format" in str(err.value)
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.rebase(top, base, unsafe=True, backing_fmt="qcow2")
    assert "records it as raw" in str(err.value)
    disks.ops.rebase(top, unknown, unsafe=True, backing_fmt="raw")
    assert disks.qemu.rebase.call_count == 2


def test_qemu_must_open_the_chain_that_was_checked(disks):
    top = disks.qcow2("top.qcow2", backing="old.raw", backing_fmt="raw")
    disks.raw("old.raw")
    other = disks.raw("other.raw")
    new = disks.raw("new.raw")
    checked = disks._info

    def info(path, fmt, backing_chain=False, **kwargs):
        found = checked(path, fmt, backing_chain=backing_chain)
        if backing_chain:
            # qemu-img resolved the backing file differently.
            found.chain[1].filename = other
        return found
    disks.qemu.info.side_effect = info
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.rebase(top, new, unsafe=True)
    message = str(err.value)
    assert "qemu-img opens the chain" in message and other in message
    assert "the change was undone" in message
    assert disks.qemu.rebase.call_args_list[-1] == mock.call(
        top, "qcow2", "old.raw", "raw", unsafe=True)
    assert [c.kwargs.get("backing_chain") for c in
            disks.qemu.info.call_args_list].count(True) == 1
