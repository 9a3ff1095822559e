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

"""DiskOperations in detail (QemuImg mocked, real files): the exact
refusals and what each command passes to qemu-img, what it checks again
afterwards and what it logs."""

import errno
import logging
import os
import re
from unittest import mock

import pytest

from imagebackend.common import fileio
from imagebackend.disk import operations as disk_ops
from imagebackend.disk import trust as disk_trust
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import results as qemu_results
from tests.unit.disk import test_operations as base_tests

MiB = base_tests.MiB
snap = base_tests.snap
image = base_tests.image
LOGGER = "imagebackend.disk.operations"


# The base tests' fixture: a directory of fake disks and their operations.
disks = base_tests.disks


def rechecks(disks):
    """How many times qemu-img was asked to open a whole chain."""
    return [c.kwargs.get("backing_chain")
            for c in disks.qemu.info.call_args_list].count(True)


def logged(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# --- construction ------------------------------------------------------------

def test_records_default_to_none_trusted(disks):
    ops = disk_ops.DiskOperations(disks.conf, qemu=disks.qemu)
    assert isinstance(ops.records, disk_trust.NoRecords)
    assert ops.records.conf is disks.conf
    assert ops.paths == disk_trust.cache_paths(disks.conf)
    assert ops.qemu is disks.qemu
    records = disks.ops.records
    ops = disk_ops.DiskOperations(disks.conf, records=records,
                                  qemu=disks.qemu)
    assert ops.records is records
    assert ops.conf is disks.conf


def test_a_qemu_is_made_from_the_configuration(disks):
    execute = mock.Mock()
    ops = disk_ops.DiskOperations(disks.conf, execute)
    assert isinstance(ops.qemu, qemu_img.QemuImg)


# --- every command names itself ----------------------------------------------

@pytest.mark.parametrize("operation,call", [
    ("info", lambda ops, p: ops.info(p, fmt="vmdk")),
    ("check", lambda ops, p: ops.check(p, fmt="vmdk")),
    ("resize", lambda ops, p: ops.resize(p, MiB, fmt="vmdk")),
    ("extract", lambda ops, p: ops.extract(p, p + ".out", fmt="vmdk")),
    ("snapshot list", lambda ops, p: ops.snapshot_list(p, fmt="vmdk")),
    ("snapshot create", lambda ops, p: ops.snapshot_create(p, "s",
                                                           fmt="vmdk")),
    ("snapshot apply", lambda ops, p: ops.snapshot_apply(p, "s",
                                                         fmt="vmdk")),
    ("snapshot delete", lambda ops, p: ops.snapshot_delete(p, "s",
                                                           fmt="vmdk")),
    ("rebase", lambda ops, p: ops.rebase(p, p, fmt="vmdk")),
])
def test_refusals_name_the_operation(disks, operation, call):
    path = disks.raw("d", registered=False)
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        call(disks.ops, path)
    assert str(err.value) == (
        "Disk %s: %s is not supported for vmdk disks; instance disks are "
        "qcow2 or raw." % (path, operation))
    assert disks.qemu.method_calls == []


@pytest.mark.parametrize("operation,call", [
    ("snapshot list", lambda ops, p: ops.snapshot_list(p)),
    ("snapshot create", lambda ops, p: ops.snapshot_create(p, "s")),
    ("snapshot apply", lambda ops, p: ops.snapshot_apply(p, "s")),
    ("snapshot delete", lambda ops, p: ops.snapshot_delete(p, "s")),
    ("rebase", lambda ops, p: ops.rebase(p, p)),
])
def test_qcow2_commands_name_themselves(disks, operation, call):
    path = disks.raw("d")
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        call(disks.ops, path)
    assert str(err.value).startswith(
        "Disk %s: %s is not supported for raw disks; internal snapshots"
        % (path, operation))


@pytest.mark.parametrize("call", [
    lambda ops, p, out: ops.info(p),
    lambda ops, p, out: ops.check(p),
    lambda ops, p, out: ops.snapshot_list(p),
    lambda ops, p, out: ops.extract(p, out),
])
def test_reading_a_base_is_allowed(disks, call):
    base = disks.base(fmt="qcow2")
    disks.qemu.check.return_value = qemu_results.CheckResult(
        filename=base, format="qcow2")
    disks.qemu.convert.side_effect = base_tests.converter(disks)
    call(disks.ops, base, str(disks.dir / "out"))
    assert disks.qemu.info.call_args_list[0].args == (base, "qcow2")


# --- check -------------------------------------------------------------------

def test_check_refuses_a_bad_mode_by_name(disks):
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.check("relative/disk", "everything")
    assert str(err.value) == ("Disk relative/disk: repair must be 'leaks' "
                              "or 'all', not 'everything'")


def test_check_without_repair_changes_nothing(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2")
    result = qemu_results.CheckResult(filename=top, format="qcow2")
    disks.qemu.check.return_value = result
    assert disks.ops.check(top) is result
    disks.qemu.check.assert_called_once_with(top, "qcow2", None)
    assert rechecks(disks) == 0
    assert [c.kwargs for c in disks.qemu.info.call_args_list] == [
        {"force_share": False}]
    assert logged(caplog) == []


def test_a_repair_is_checked_again_and_logged(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2")
    result = qemu_results.CheckResult(
        filename=top, format="qcow2", leaks_fixed=3, corruptions_fixed=2,
        leaks=1, corruptions=4)
    disks.qemu.check.return_value = result
    assert disks.ops.check(top, "all") is result
    disks.qemu.check.assert_called_once_with(top, "qcow2", "all")
    assert rechecks(disks) == 1
    assert logged(caplog) == [
        "Checked disk %s with repair=all: 3 leak(s) and 2 corruption(s) "
        "fixed, 1 and 4 remain" % top]


def test_a_repair_refused_afterwards_is_reported(disks):
    top = disks.qcow2("top.qcow2")

    def check(path, fmt, repair):
        disks.infos[path] = image("qcow2", backing="/etc/shadow",
                                  backing_fmt="raw")
        return qemu_results.CheckResult(filename=path, format=fmt)
    disks.qemu.check.side_effect = check
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.check(top, "leaks")
    assert str(err.value).startswith(
        "Disk %s: after check --repair its backing chain is refused" % top)


# --- snapshots ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "0", "42", "007"])
def test_a_snapshot_name_is_not_an_id(disks, name):
    top = disks.qcow2("top.qcow2")
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.snapshot_create(top, name)
    assert str(err.value) == (
        "Disk %s: %r cannot name a snapshot: give a name with at least one "
        "character that is not a digit (digits alone are taken for a "
        "snapshot id)" % (top, name))
    disks.qemu.info.assert_not_called()


@pytest.mark.parametrize("name", ["a", "1a", "a1", "2024-01-01", "4 2"])
def test_names_with_a_non_digit_are_names(disks, name):
    top = disks.qcow2("top.qcow2")
    assert disks.ops.snapshot_create(top, name).name == name


def test_snapshot_create_refuses_a_taken_name_exactly(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "old")])
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.snapshot_create(top, "old")
    assert str(err.value) == (
        "Disk %s: it already has a snapshot named 'old'; choose another "
        "name or delete that snapshot first" % top)


def test_snapshot_create_checks_and_logs(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a")])
    new = disks.ops.snapshot_create(top, "b")
    assert (new.id, new.name) == ("2", "b")
    assert rechecks(disks) == 1
    assert not any(c.kwargs["force_share"]
                   for c in disks.qemu.info.call_args_list)
    assert logged(caplog) == ["Created snapshot b of disk %s" % top]


def not_listed(top):
    return ("Disk %s: qemu-img reported success but snapshot 'new' is not "
            "listed; check the disk with 'imagebackend disk snapshot list'"
            % top)


@pytest.mark.parametrize("after", [
    [],                                          # nothing was made
    [snap("1", "old")],
    [snap("1", "new")],                          # an old id renamed
    [snap("1", "old"), snap("2", "new"), snap("3", "new")],
])
def test_a_snapshot_that_does_not_appear_is_an_error(disks, after):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "old")])

    def create(path, fmt, name):
        disks.infos[path].snapshots[:] = after
    disks.qemu.snapshot_create.side_effect = create
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.snapshot_create(top, "new")
    assert str(err.value) == not_listed(top)


def test_the_new_snapshot_is_the_one_returned(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "old"),
                                              snap("2", "x")])

    def create(path, fmt, name):
        disks.infos[path].snapshots[:] = [snap("1", "old"), snap("3", "new"),
                                          snap("2", "x")]
    disks.qemu.snapshot_create.side_effect = create
    assert disks.ops.snapshot_create(top, "new").id == "3"


def test_apply_and_delete_check_again_and_log(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a"),
                                              snap("2", "b")])
    assert disks.ops.snapshot_apply(top, "a") == snap("1", "a")
    assert rechecks(disks) == 1
    assert disks.ops.snapshot_delete(top, "2") == snap("2", "b")
    assert rechecks(disks) == 2
    disks.qemu.snapshot_delete.assert_called_once_with(top, "qcow2", "b")
    assert logged(caplog) == [
        "Reverted disk %s to snapshot a" % top,
        "Deleted snapshot b of disk %s" % top]


def test_an_unknown_snapshot_names_them_all(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a"),
                                              snap("2", "b")])
    with pytest.raises(exception.SnapshotNotFound) as err:
        disks.ops.snapshot_delete(top, "c")
    assert str(err.value) == (
        "Disk %s has no snapshot 'c' (its snapshots: a, b); list them with "
        "'imagebackend disk snapshot list'." % top)
    bare = disks.qcow2("bare.qcow2")
    with pytest.raises(exception.SnapshotNotFound) as err:
        disks.ops.snapshot_apply(bare, "c")
    assert "(its snapshots: none)" in str(err.value)


def test_a_name_is_found_before_an_id(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "x"),
                                              snap("2", "1")])
    # "1" names the second; it is then passed by its id, "2".
    assert disks.ops.snapshot_apply(top, "1").id == "2"
    disks.qemu.snapshot_apply.assert_called_once_with(top, "qcow2", "2")
    # By id when no name matches.
    assert disks.ops.snapshot_apply(top, "x").id == "1"
    disks.qemu.snapshot_apply.assert_called_with(top, "qcow2", "x")


def test_an_id_is_used_when_no_name_matches(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a"),
                                              snap("2", "b")])
    assert disks.ops.snapshot_apply(top, "2").name == "b"
    disks.qemu.snapshot_apply.assert_called_once_with(top, "qcow2", "b")


def test_two_snapshots_of_one_name_are_refused(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "x"), snap("2", "y"),
                                              snap("3", "x")])
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.snapshot_apply(top, "x")
    assert str(err.value) == (
        "Disk %s: 2 snapshots are named 'x' (ids 1, 3), and qemu-img cannot "
        "be told which one is meant" % top)
    disks.qemu.snapshot_apply.assert_not_called()


def test_a_snapshot_that_cannot_be_named_is_refused(disks):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "2"),
                                              snap("2", "1")])
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.snapshot_apply(top, "2")
    assert str(err.value) == (
        "Disk %s: snapshot 2 (id 1) has a name that is also another "
        "snapshot's name or id, so qemu-img cannot be told which one is "
        "meant; delete the other one first" % top)
    disks.qemu.snapshot_apply.assert_not_called()


def test_a_unique_name_is_passed_as_the_name(disks):
    # Its id is another one's name: by name is still unambiguous.
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "a"),
                                              snap("2", "1")])
    assert disks.ops.snapshot_delete(top, "a").id == "1"
    disks.qemu.snapshot_delete.assert_called_once_with(top, "qcow2", "a")


# --- rebase ------------------------------------------------------------------

def test_rebase_reports_progress_of_the_virtual_size(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2", size=16 * MiB)
    new = disks.raw("new.raw")
    cancel = mock.Mock()

    def rebase(path, fmt, backing, backing_fmt, unsafe=False,
               progress=None, cancel=None):
        progress(25.0)
        disks.infos[path] = image("qcow2", size=16 * MiB, backing=backing,
                                  backing_fmt=backing_fmt)
    disks.qemu.rebase.side_effect = rebase
    calls = []
    info = disks.ops.rebase(top, new, progress=lambda *a: calls.append(a),
                            cancel=cancel)
    assert calls == [("rebase", 4 * MiB, 16 * MiB)]
    assert disks.qemu.rebase.call_args.kwargs["cancel"] is cancel
    assert (info.filename, info.backing_file) == (top, new)
    assert [i.filename for i in info.chain] == [top, new]
    assert rechecks(disks) == 1
    assert logged(caplog) == ["Rebased disk %s onto %s (raw)" % (top, new)]


def test_an_unsafe_rebase_logs_it(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2")
    new = disks.raw("new.raw")
    disks.ops.rebase(top, new, unsafe=True)
    assert logged(caplog) == [
        "Rebased disk %s onto %s (raw) without copying data" % (top, new)]


def test_an_undone_rebase_records_the_old_format(disks, tmp_path):
    top = disks.qcow2("top.qcow2", backing="old.qcow2", backing_fmt="qcow2")
    disks.qcow2("old.qcow2")
    new = disks.raw("new.raw")

    def rebase(path, fmt, backing, backing_fmt, unsafe=False, **kwargs):
        disks.infos[path] = image("qcow2", backing="/etc/shadow",
                                  backing_fmt="raw")
    disks.qemu.rebase.side_effect = rebase
    with pytest.raises(exception.DiskOperationError):
        disks.ops.rebase(top, new, unsafe=True)
    assert disks.qemu.rebase.call_args == mock.call(
        top, "qcow2", "old.qcow2", "qcow2", unsafe=True)


# --- extract -----------------------------------------------------------------

def test_extract_refusals_are_exact(disks):
    top = disks.qcow2("top.qcow2")
    out = str(disks.dir / "out")
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.extract(top, out, "vmdk")
    assert str(err.value) == ("Disk %s: cannot extract to format 'vmdk'; "
                              "use qcow2 or raw" % top)
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.extract(top, out, "raw", compress=True)
    assert str(err.value) == ("Disk %s: compression needs qcow2 output, "
                              "not raw" % top)
    missing = str(disks.dir / "no" / "out")
    with pytest.raises(exception.InvalidTarget) as err:
        disks.ops.extract(top, missing)
    assert str(err.value) == ("Invalid target %s: its directory does not "
                              "exist" % missing)
    assert disks.qemu.method_calls == []


def test_the_cache_is_refused_before_the_disk_is_opened(disks):
    disks.base_dir.mkdir()
    with pytest.raises(exception.CachePathRefused):
        disks.ops.extract(str(disks.dir / "missing"),
                          str(disks.base_dir / "x"))


def test_extract_never_replaces_a_symlink(disks, tmp_path):
    top = disks.qcow2("top.qcow2")
    link = disks.dir / "dangling"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(exception.TargetExists) as err:
        disks.ops.extract(top, str(link))
    assert str(err.value).startswith("Target %s already exists" % link)
    assert not os.path.lexists(tmp_path / "nowhere")
    disks.qemu.convert.assert_not_called()


@pytest.mark.parametrize("output_fmt,compress", [("raw", False),
                                                 ("qcow2", False),
                                                 ("qcow2", True)])
def test_extract_writes_a_temporary_file_then_the_name(disks, monkeypatch,
                                                       caplog, output_fmt,
                                                       compress):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2", size=4 * MiB)
    disks.qemu.convert.side_effect = base_tests.converter(disks)
    cancel = mock.Mock()
    monkeypatch.chdir(disks.dir)
    calls = []
    info = disks.ops.extract("top.qcow2", "out.img", output_fmt,
                             compress=compress, cancel=cancel,
                             progress=lambda *a: calls.append(a))
    out = str(disks.dir / "out.img")
    args, kwargs = disks.qemu.convert.call_args
    tmp = args[2]
    assert (args[0], args[1], args[3]) == (top, "qcow2", output_fmt)
    assert os.path.dirname(tmp) == str(disks.dir)
    assert re.fullmatch(r"\.out\.img\.[0-9a-f]{8}\.part",
                        os.path.basename(tmp))
    assert kwargs["compress"] is compress
    assert kwargs["cancel"] is cancel
    assert calls == [("extract", 2 * MiB, 4 * MiB),
                     ("extract", 4 * MiB, 4 * MiB)]
    disks.qemu.info.assert_called_with(tmp, output_fmt)
    assert info == qemu_results.ImageInfo(
        filename=out, format=output_fmt, virtual_size=16 * MiB,
        snapshots=[], raw={})
    assert sorted(os.listdir(disks.dir)) == ["out.img", "top.qcow2"]
    assert logged(caplog) == ["Extracted disk %s to %s (%s%s)" % (
        top, out, output_fmt, ", compressed" if compress else "")]


def test_extract_without_progress_asks_for_none(disks):
    top = disks.qcow2("top.qcow2")
    disks.qemu.convert.side_effect = base_tests.converter(disks)
    disks.ops.extract(top, str(disks.dir / "out"))
    assert disks.qemu.convert.call_args.kwargs["progress"] is None
    assert disks.qemu.convert.call_args.kwargs["compress"] is False
    assert disks.qemu.convert.call_args.args[3] == "qcow2"


def test_an_interrupted_extract_leaves_nothing(disks):
    top = disks.qcow2("top.qcow2")
    disks.qemu.convert.side_effect = base_tests.converter(
        disks, fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        disks.ops.extract(top, str(disks.dir / "out"))
    assert os.listdir(disks.dir) == ["top.qcow2"]


def test_a_failed_publish_leaves_nothing(disks, monkeypatch):
    top = disks.qcow2("top.qcow2")
    disks.qemu.convert.side_effect = base_tests.converter(disks)
    out = str(disks.dir / "out")

    def publish(tmp, final):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fileio, "publish", publish)
    with pytest.raises(exception.DiskOperationError) as err:
        disks.ops.extract(top, out)
    assert type(err.value) is exception.DiskOperationError
    assert str(err.value) == (
        "Disk %s: could not give the extracted image its name ([Errno 5] "
        "Input/output error); nothing was kept" % out)
    assert isinstance(err.value.__cause__, OSError)
    assert os.listdir(disks.dir) == ["top.qcow2"]


def test_a_name_taken_while_publishing_is_target_exists(disks, monkeypatch):
    top = disks.qcow2("top.qcow2")
    disks.qemu.convert.side_effect = base_tests.converter(disks)
    out = str(disks.dir / "out")

    def publish(tmp, final):
        raise FileExistsError(errno.EEXIST, "File exists")
    monkeypatch.setattr(fileio, "publish", publish)
    with pytest.raises(exception.TargetExists) as err:
        disks.ops.extract(top, out)
    assert err.value.kwargs == {"path": out}
    assert isinstance(err.value.__cause__, FileExistsError)
    assert os.listdir(disks.dir) == ["top.qcow2"]


# --- resize ------------------------------------------------------------------

def test_a_bad_size_is_refused_before_the_disk_is_opened(disks):
    with pytest.raises(exception.InvalidSize):
        disks.ops.resize(str(disks.dir / "missing"), "12Q")


def test_the_shrink_refusal_is_exact(disks):
    top = disks.raw("top.raw", size=8 * MiB)
    with pytest.raises(exception.InvalidDiskRequest) as err:
        disks.ops.resize(top, 8 * MiB - 512)
    assert str(err.value) == (
        "Disk %s: resizing it to %d bytes would shrink it from %d bytes and "
        "lose everything past the new end; shrink only after shrinking the "
        "guest's partitions, and say so explicitly (shrink=True, --shrink)"
        % (top, 8 * MiB - 512, 8 * MiB))
    disks.qemu.resize.assert_not_called()


def test_growing_with_shrink_allowed_does_not_shrink(disks):
    top = disks.qcow2("top.qcow2", size=8 * MiB)
    disks.ops.resize(top, 8 * MiB + 512, shrink=True)
    disks.qemu.resize.assert_called_once_with(top, "qcow2", 8 * MiB + 512,
                                              shrink=False)


def test_resize_checks_again_and_logs(disks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    top = disks.qcow2("top.qcow2", size=8 * MiB)

    def resize(path, fmt, size, shrink):
        disks.infos[path] = image("qcow2", size=size)
    disks.qemu.resize.side_effect = resize
    info = disks.ops.resize(top, 16 * MiB)
    assert (info.filename, info.virtual_size) == (top, 16 * MiB)
    assert rechecks(disks) == 1
    assert disks.ops.resize(top, "16M").virtual_size == 16 * MiB
    assert rechecks(disks) == 1
    assert logged(caplog) == [
        "Resized disk %s from %d to %d bytes" % (top, 8 * MiB, 16 * MiB),
        "Disk %s already has %d bytes" % (top, 16 * MiB)]


def test_resize_writes_only_outside_the_cache(disks):
    base = disks.base(fmt="raw")
    with pytest.raises(exception.CachePathRefused):
        disks.ops.resize(base, 16 * MiB)


# --- every qemu-img call uses the format established first ---------------

@pytest.mark.parametrize("call", [
    lambda ops, p: ops.info(p),
    lambda ops, p: ops.check(p, "leaks"),
    lambda ops, p: ops.snapshot_list(p),
    lambda ops, p: ops.snapshot_create(p, "new"),
    lambda ops, p: ops.snapshot_apply(p, "s1"),
    lambda ops, p: ops.snapshot_delete(p, "s1"),
    lambda ops, p: ops.resize(p, 16 * MiB),
    lambda ops, p: ops.rebase(p, p + ".new", unsafe=True),
    lambda ops, p: ops.extract(p, p + ".out"),
])
def test_qemu_opens_the_disk_with_its_recorded_format(disks, call):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "s1")])
    disks.raw("top.qcow2.new")
    disks.qemu.check.return_value = qemu_results.CheckResult(
        filename=top, format="qcow2")
    disks.qemu.convert.side_effect = base_tests.converter(disks)
    call(disks.ops, top)
    opened = [c.args[:2] for c in disks.qemu.info.call_args_list
              if c.args[0] == top]
    assert opened and all(fmt == "qcow2" for _, fmt in opened)


@pytest.mark.parametrize("operation,call", [
    ("snapshot create", lambda ops, p: ops.snapshot_create(p, "new")),
    ("snapshot apply", lambda ops, p: ops.snapshot_apply(p, "s1")),
    ("snapshot delete", lambda ops, p: ops.snapshot_delete(p, "s1")),
    ("check --repair", lambda ops, p: ops.check(p, "leaks")),
    ("resize", lambda ops, p: ops.resize(p, 16 * MiB)),
])
def test_a_change_refused_afterwards_names_the_operation(disks, operation,
                                                         call):
    top = disks.qcow2("top.qcow2", snapshots=[snap("1", "s1")])

    def change(path, *args, **kwargs):
        # As if the disk had been changed under us to name a host file.
        disks.infos[path] = image("qcow2", backing="/etc/shadow",
                                  backing_fmt="raw",
                                  snapshots=[snap("1", "s1"),
                                             snap("2", "new")])
        return qemu_results.CheckResult(filename=path, format="qcow2")
    for method in ("snapshot_create", "snapshot_apply", "snapshot_delete",
                   "check", "resize"):
        getattr(disks.qemu, method).side_effect = change
    with pytest.raises(exception.DiskOperationError) as err:
        call(disks.ops, top)
    assert str(err.value).startswith(
        "Disk %s: after %s its backing chain is refused (its backing file "
        "/etc/shadow (really /etc/shadow) is outside" % (top, operation))
    assert str(err.value).endswith("; the change was kept; fix the chain "
                                   "as this says")


def test_the_qemu_made_here_follows_the_configuration(disks):
    disks.conf.set_override("binary", "/opt/qemu/bin/qemu-img",
                            group="qemu_img")
    ops = disk_ops.DiskOperations(disks.conf, mock.Mock())
    assert ops.qemu.binary == "/opt/qemu/bin/qemu-img"
    assert ops.qemu.conf is disks.conf
