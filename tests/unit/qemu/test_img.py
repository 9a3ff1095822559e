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

"""QemuImg with a mocked runner: the argv it builds, how it reads
qemu-img's answers, and how it fails."""

import contextlib
import errno
import json
import os
import resource
import signal
import threading
from unittest import mock

from oslo_concurrency import processutils
from oslo_config import cfg
import pytest

from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import options as qemu_options
from imagebackend.qemu import runner as runner_mod

GiB = 1024 ** 3

INFO_QCOW2 = {
    "backing-filename-format": "raw",
    "snapshots": [{"icount": 0, "vm-clock-nsec": 500000000, "name": "s1",
                   "date-sec": 1700000000, "date-nsec": 250000000,
                   "vm-clock-sec": 3, "id": "1", "vm-state-size": 0}],
    "virtual-size": 2 * GiB,
    "filename": "/i/disk",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {"type": "qcow2", "data": {
        "compat": "1.1", "lazy-refcounts": False, "refcount-bits": 16,
        "corrupt": False}},
    "full-backing-filename": "/i/_base/abc",
    "backing-filename": "/i/_base/abc",
    "dirty-flag": False,
}
INFO_RAW = {"virtual-size": GiB, "filename": "/i/_base/abc", "format": "raw",
            "actual-size": 4096, "dirty-flag": False}


def ok(stdout="", code=0):
    return runner_mod.ProcessResult(code, stdout, "")


def failed(code=1, stderr="qemu-img: boom\n"):
    return processutils.ProcessExecutionError(
        stdout="", stderr=stderr, exit_code=code, cmd="qemu-img ...")


@pytest.fixture(autouse=True)
def _clean_module_caches():
    qemu_img._VERSIONS.clear()
    sparseio._DIRECT_IO.clear()
    yield
    qemu_img._VERSIONS.clear()
    sparseio._DIRECT_IO.clear()


@pytest.fixture
def runner():
    fake = mock.create_autospec(runner_mod.Runner, instance=True)
    fake.execute.return_value = ok()
    fake.stream.return_value = ok()
    return fake


@pytest.fixture
def qemu(runner):
    return qemu_img.QemuImg(execute=runner)


def argv(runner, method="execute"):
    return getattr(runner, method).call_args.args[0]


# --- create ------------------------------------------------------------------

def test_create_overlay_passes_backing_file_and_format_as_options(
        qemu, runner):
    qemu.create("/i/disk", "qcow2", 2 * GiB, backing_file="/i/_base/a,b",
                backing_fmt="raw")
    assert argv(runner) == [
        "qemu-img", "create", "-f", "qcow2", "-o",
        "backing_file=/i/_base/a,,b,backing_fmt=raw", "/i/disk",
        str(2 * GiB)]


def test_create_spawns_one_process_and_never_asks_the_version(qemu, runner):
    qemu.create("/i/disk", "qcow2", GiB, backing_file="/b", backing_fmt="raw")
    assert runner.execute.call_count == 1
    assert not runner.stream.called


def test_create_backing_file_without_format_is_refused_unrun(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest) as err:
        qemu.create("/i/disk", "qcow2", GiB, backing_file="/b")
    assert isinstance(err.value, ValueError)
    assert "backing_fmt" in str(err.value)
    assert not runner.execute.called


def test_create_without_size_or_backing_file_is_refused(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.create("/i/disk", "raw")
    assert not runner.execute.called


def test_create_takes_size_strings_options_and_preallocation(qemu, runner):
    qemu.create("/i/disk", "qcow2", "10G",
                options={"cluster_size": 65536, "lazy_refcounts": True},
                preallocation="metadata")
    assert argv(runner) == [
        "qemu-img", "create", "-f", "qcow2", "-o",
        "cluster_size=65536,lazy_refcounts=on,preallocation=metadata",
        "/i/disk", str(10 * GiB)]


def test_create_refuses_an_option_given_twice(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.create("/i/disk", "qcow2", GiB, preallocation="full",
                    options={"preallocation": "off"})
    assert not runner.execute.called


@pytest.mark.parametrize("fmt", ["", "qcow2,backing_file=/etc/shadow",
                                 "raw -o x", None])
def test_a_malformed_format_never_reaches_qemu_img(qemu, runner, fmt):
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.create("/i/disk", fmt, GiB)
    assert not runner.execute.called


def test_create_failure_names_the_file_and_qemu_img_reason(qemu, runner):
    runner.execute.side_effect = failed(
        1, "qemu-img: /i/disk: Could not create '/i/disk': Permission "
           "denied\n")
    with pytest.raises(exception.QemuImgError) as err:
        qemu.create("/i/disk", "raw", GiB)
    assert err.value.exit_code == 1
    assert err.value.path == "/i/disk"
    assert "Permission denied" in str(err.value)
    assert isinstance(err.value.__cause__, processutils.ProcessExecutionError)


# --- convert -----------------------------------------------------------------

@pytest.fixture
def fsynced():
    """Paths passed to os.fsync (through /proc/self/fd)."""
    paths = []
    real = os.fsync

    def spy(fd):
        paths.append(os.readlink("/proc/self/fd/%d" % fd))
        return real(fd)

    with mock.patch.object(os, "fsync", side_effect=spy):
        yield paths


def _writes_target(target, result=None, exc=None):
    def side_effect(argv, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        if exc is not None:
            raise exc
        return result or ok()
    return side_effect


def test_convert_uses_o_direct_where_the_directory_supports_it(
        qemu, runner, tmp_path, fsynced):
    target = str(tmp_path / "out.raw")
    runner.execute.side_effect = _writes_target(target)
    with mock.patch.object(sparseio, "direct_io_supported",
                           return_value=True) as probe:
        qemu.convert("/src.qcow2", "qcow2", target, "raw")
    probe.assert_called_once_with(str(tmp_path))
    assert argv(runner) == ["qemu-img", "convert", "-f", "qcow2", "-O",
                            "raw", "-t", "none", "/src.qcow2", target]
    # O_DIRECT data needs no fsync; the new directory entry does.
    assert fsynced == [str(tmp_path)]


def test_convert_falls_back_to_writeback_and_fsyncs_file_and_directory(
        qemu, runner, tmp_path, fsynced):
    target = str(tmp_path / "out.raw")
    runner.execute.side_effect = _writes_target(target)
    with mock.patch.object(sparseio, "direct_io_supported",
                           return_value=False):
        qemu.convert("/src.qcow2", "qcow2", target, "raw")
    assert argv(runner)[argv(runner).index("-t") + 1] == "writeback"
    assert fsynced == [target, str(tmp_path)]


def test_convert_never_leaves_qemu_img_default_unsafe_cache(qemu, runner,
                                                            tmp_path):
    runner.execute.side_effect = _writes_target(str(tmp_path / "o"))
    qemu.convert("/s", "raw", str(tmp_path / "o"), "raw")
    assert "-t" in argv(runner)


def test_convert_with_an_explicit_unsafe_cache_still_fsyncs(
        qemu, runner, tmp_path, fsynced):
    target = str(tmp_path / "out.raw")
    runner.execute.side_effect = _writes_target(target)
    qemu.convert("/s", "raw", target, "raw", target_cache="unsafe")
    assert "unsafe" in argv(runner)
    assert target in fsynced


def test_convert_not_durable_leaves_the_fsync_to_the_caller(
        qemu, runner, tmp_path, fsynced):
    target = str(tmp_path / "out.raw")
    runner.execute.side_effect = _writes_target(target)
    qemu.convert("/s", "raw", target, "raw", target_cache="unsafe",
                 durable=False)
    assert fsynced == []
    assert os.path.exists(target)


@pytest.mark.parametrize("cache,written_back", [
    ("writeback", True), ("unsafe", True), ("none", False)])
def test_convert_through_the_page_cache_writes_back_while_it_runs(
        qemu, runner, tmp_path, cache, written_back):
    target = str(tmp_path / "out.raw")
    runner.execute.side_effect = _writes_target(target)
    with mock.patch.object(sparseio, "Writeback",
                           wraps=sparseio.Writeback) as writeback:
        qemu.convert("/s", "raw", target, "raw", target_cache=cache)
    if written_back:
        writeback.assert_called_once_with(path=target)
    else:
        writeback.assert_not_called()


def test_convert_passes_every_tuning_flag(qemu, runner, tmp_path):
    target = str(tmp_path / "out.qcow2")
    qemu.convert("/s.raw", "raw", target, "qcow2", target_cache="none",
                 source_cache="writeback", sparse_size=4096, compress=True,
                 parallel=8, out_of_order=True, rate_limit=1 << 20,
                 options={"cluster_size": 2 * 1024 * 1024})
    assert argv(runner) == [
        "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-t", "none",
        "-T", "writeback", "-S", "4096", "-m", "8", "-r", str(1 << 20),
        "-c", "-W", "-o", "cluster_size=2097152", "/s.raw", target]


def test_compression_is_refused_for_a_raw_target(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest) as err:
        qemu.convert("/s", "qcow2", "/t", "raw", compress=True)
    assert "qcow2" in str(err.value)
    assert not runner.execute.called


def test_a_failed_convert_removes_the_partial_target(qemu, runner, tmp_path):
    target = str(tmp_path / "out.raw")
    runner.execute.side_effect = _writes_target(
        target, exc=failed(1, "qemu-img: error while writing at byte 0: No "
                              "space left on device\n"))
    with pytest.raises(exception.QemuImgError) as err:
        qemu.convert("/src", "qcow2", target, "raw", target_cache="none")
    assert not os.path.exists(target)
    assert "No space left on device" in str(err.value)


def test_a_failed_convert_never_removes_a_device_or_fifo(qemu, runner,
                                                         tmp_path):
    target = str(tmp_path / "fifo")
    os.mkfifo(target)
    runner.execute.side_effect = failed()
    with pytest.raises(exception.QemuImgError):
        qemu.convert("/src", "qcow2", target, "raw", target_cache="none")
    assert os.path.exists(target)


def test_progress_is_parsed_from_pieces_and_ends_at_100(qemu, runner,
                                                        tmp_path):
    def stream(argv, on_output, cancel, **kwargs):
        for piece in ["    (0.00/10", "0%)\r    (33.3", "3/100%)\r",
                      "    (33.33/100%)\r    (100.00/100%)\r\n"]:
            on_output(piece)
        return ok()

    runner.stream.side_effect = stream
    seen = []
    qemu.convert("/s", "qcow2", str(tmp_path / "t"), "raw",
                 target_cache="none", progress=seen.append)
    assert seen == [0.0, 33.33, 100.0]
    assert "-p" in argv(runner, "stream")
    assert not runner.execute.called


def test_progress_reports_100_on_success_even_if_qemu_img_did_not(
        qemu, runner, tmp_path):
    runner.stream.side_effect = (
        lambda argv, on_output, cancel, **kw: on_output("(50.00/100%)\r")
        or ok())
    seen = []
    qemu.convert("/s", "qcow2", str(tmp_path / "t"), "raw",
                 target_cache="none", progress=seen.append)
    assert seen == [50.0, 100.0]


def test_a_cancelled_convert_raises_and_keeps_nothing(qemu, runner,
                                                      tmp_path):
    target = str(tmp_path / "out.raw")
    cancel = threading.Event()
    runner.stream.side_effect = _writes_target(
        target, result=runner_mod.ProcessResult(-15, "", "", cancelled=True))
    seen = []
    with pytest.raises(exception.OperationCancelled):
        qemu.convert("/src", "qcow2", target, "raw", target_cache="none",
                     progress=seen.append, cancel=cancel)
    assert runner.stream.call_args.args[2] is cancel
    assert not os.path.exists(target)
    assert 100.0 not in seen


def test_a_progress_callback_error_stops_and_cleans_up(qemu, runner,
                                                       tmp_path):
    target = str(tmp_path / "out.raw")

    def stream(argv, on_output, cancel, **kwargs):
        open(target, "wb").close()
        on_output("(10.00/100%)\r")
        return ok()

    def progress(value):
        raise RuntimeError("display gone")

    runner.stream.side_effect = stream
    with pytest.raises(RuntimeError):
        qemu.convert("/s", "qcow2", target, "raw", target_cache="none",
                     progress=progress)
    assert not os.path.exists(target)


# --- the O_DIRECT probe ------------------------------------------------------

def test_resize_passes_bytes_and_flags(qemu, runner):
    qemu.resize("/i/disk", "raw", "1G", shrink=True, preallocation="falloc")
    assert argv(runner) == ["qemu-img", "resize", "-f", "raw", "--shrink",
                            "--preallocation=falloc", "/i/disk", str(GiB)]


def test_resize_error_shows_the_reason_not_the_warning(qemu, runner):
    runner.execute.side_effect = failed(1, (
        "qemu-img: Use the --shrink option to perform a shrink operation.\n"
        "qemu-img: warning: Shrinking an image will delete all data beyond "
        "the shrunken image's end.\n"))
    with pytest.raises(exception.QemuImgError) as err:
        qemu.resize("/i/disk", "raw", 1024)
    assert err.value.stderr == ("Use the --shrink option to perform a "
                                "shrink operation.")


def test_rebase_argv_safe_unsafe_and_removing_the_backing_file(qemu, runner):
    qemu.rebase("/i/disk", "qcow2", "/new/base", "raw")
    assert argv(runner) == ["qemu-img", "rebase", "-f", "qcow2", "-b",
                            "/new/base", "-F", "raw", "/i/disk"]
    qemu.rebase("/i/disk", "qcow2", "/new/base", "raw", unsafe=True)
    assert argv(runner)[4] == "-u"
    qemu.rebase("/i/disk", "qcow2", None, None)
    assert argv(runner) == ["qemu-img", "rebase", "-f", "qcow2", "-b", "",
                            "/i/disk"]


def test_rebase_onto_a_file_needs_its_format(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.rebase("/i/disk", "qcow2", "/new/base", None)
    assert not runner.execute.called


def test_commit_and_amend_argv(qemu, runner):
    qemu.commit("/i/top", "qcow2", base="/i/base", drop=True)
    assert argv(runner) == ["qemu-img", "commit", "-f", "qcow2", "-b",
                            "/i/base", "-d", "/i/top"]
    qemu.amend("/i/top", "qcow2", {"compat": "1.1"})
    assert argv(runner) == ["qemu-img", "amend", "-f", "qcow2", "-o",
                            "compat=1.1", "/i/top"]
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.amend("/i/top", "qcow2", {})


# --- snapshots ---------------------------------------------------------------

@pytest.mark.parametrize("method,flag", [("snapshot_create", "-c"),
                                         ("snapshot_apply", "-a"),
                                         ("snapshot_delete", "-d")])
def test_snapshot_commands_name_the_format_through_image_opts(
        qemu, runner, method, flag):
    getattr(qemu, method)("/i/a,b.qcow2", "qcow2", "before-upgrade")
    assert argv(runner) == ["qemu-img", "snapshot", "--image-opts", flag,
                            "before-upgrade",
                            "driver=qcow2,file.filename=/i/a,,b.qcow2"]


def test_snapshot_needs_a_name(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.snapshot_create("/i/d", "qcow2", "")


def test_snapshot_list_reads_info_json(qemu, runner):
    runner.execute.return_value = ok(json.dumps(INFO_QCOW2))
    snaps = qemu.snapshot_list("/i/disk", "qcow2")
    assert argv(runner)[1:5] == ["info", "-f", "qcow2", "--output=json"]
    assert [(s.id, s.name, s.vm_state_size) for s in snaps] == [
        ("1", "s1", 0)]
    assert snaps[0].date.timestamp() == 1700000000.25
    assert snaps[0].clock.total_seconds() == 3.5


# --- info ----------------------------------------------------------------

def test_info_reads_the_json_into_an_image_info(qemu, runner):
    runner.execute.return_value = ok(json.dumps(INFO_QCOW2))
    info = qemu.info("/i/disk", "qcow2")
    assert argv(runner) == ["qemu-img", "info", "-f", "qcow2",
                            "--output=json", "/i/disk"]
    assert (info.filename, info.format, info.virtual_size,
            info.actual_size) == ("/i/disk", "qcow2", 2 * GiB, 200704)
    assert (info.backing_file, info.backing_format) == ("/i/_base/abc",
                                                        "raw")
    assert info.cluster_size == 65536
    assert info.format_specific["compat"] == "1.1"
    assert not info.encrypted and not info.dirty
    assert info.data_file is None
    assert info.raw == INFO_QCOW2
    assert info.chain == []


def test_info_backing_chain_lists_every_image_top_first(qemu, runner):
    runner.execute.return_value = ok(json.dumps([INFO_QCOW2, INFO_RAW]))
    info = qemu.info("/i/disk", "qcow2", backing_chain=True,
                     force_share=True)
    assert "--backing-chain" in argv(runner)
    assert "-U" in argv(runner)
    assert [i.filename for i in info.chain] == ["/i/disk", "/i/_base/abc"]
    assert info.chain[0] is info
    assert info.chain[1].backing_file is None


@contextlib.contextmanager
def in_child():
    """Let a preexec_fn run here as in a child: nothing it sets sticks."""
    with mock.patch("resource.setrlimit", autospec=True) as setrlimit, \
            mock.patch("os.setpgid", autospec=True) as setpgid, \
            mock.patch.object(runner_mod, "_LIBC") as libc, \
            mock.patch("os.getppid", autospec=True,
                       return_value=os.getpid()):
        yield setrlimit, setpgid
    libc.prctl.assert_called_once_with(1, signal.SIGKILL, 0, 0, 0)


def test_info_runs_under_the_configured_limits(runner):
    conf = cfg.ConfigOpts()
    qemu_options.register_opts(conf)
    conf.set_override("info_address_space_limit", 512, group="qemu_img")
    conf.set_override("info_cpu_time_limit", 10, group="qemu_img")
    runner.execute.return_value = ok(json.dumps(INFO_RAW))
    qemu_img.QemuImg(conf, execute=runner).info("/i/b", "raw")
    preexec_fn = runner.execute.call_args.kwargs["preexec_fn"]
    with in_child() as (setrlimit, setpgid):
        preexec_fn()
    assert setrlimit.call_args_list == [
        mock.call(resource.RLIMIT_AS, (512 << 20, 512 << 20)),
        mock.call(resource.RLIMIT_CPU, (10, 10))]
    setpgid.assert_called_once_with(0, 0)


def test_info_without_limits_still_dies_with_its_caller(qemu, runner):
    runner.execute.return_value = ok(json.dumps(INFO_RAW))
    qemu.info("/i/b", "raw", limits=False)
    preexec_fn = runner.execute.call_args.kwargs["preexec_fn"]
    with in_child() as (setrlimit, setpgid):
        preexec_fn()
    assert not setrlimit.called
    setpgid.assert_called_once_with(0, 0)


def test_a_warm_path_create_starts_without_a_preexec_fn(qemu, runner):
    qemu.create("/i/d", "qcow2", backing_file="/i/b", backing_fmt="raw")
    assert runner.execute.call_args.kwargs["preexec_fn"] is None


def test_info_killed_for_cpu_time_names_the_option(qemu, runner):
    runner.execute.side_effect = failed(-9, "")
    with pytest.raises(exception.QemuImgLimitExceeded) as err:
        qemu.info("/evil", "qcow2")
    assert "info_cpu_time_limit" in str(err.value)
    assert "CPU time (30 s)" in str(err.value)


def test_info_out_of_address_space_names_the_option(qemu, runner):
    runner.execute.side_effect = failed(
        -6, "qemu: qemu_thread_create: Resource temporarily unavailable\n")
    with pytest.raises(exception.QemuImgLimitExceeded) as err:
        qemu.info("/evil", "qcow2")
    assert "info_address_space_limit" in str(err.value)
    assert "1024 MiB" in str(err.value)


def test_a_killed_command_without_limits_is_a_plain_error(qemu, runner):
    runner.execute.side_effect = failed(-9, "")
    with pytest.raises(exception.QemuImgError) as err:
        qemu.info("/i/b", "raw", limits=False)
    assert not isinstance(err.value, exception.QemuImgLimitExceeded)


def test_info_on_a_missing_file_is_a_clear_library_error(qemu, runner):
    runner.execute.side_effect = failed(1, (
        "qemu-img: Could not open '/i/gone': Could not open '/i/gone': No "
        "such file or directory\n"))
    with pytest.raises(exception.QemuImgError) as err:
        qemu.info("/i/gone", "qcow2")
    assert str(err.value) == (
        "qemu-img info failed on /i/gone (exit code 1): Could not open "
        "'/i/gone': No such file or directory")


@pytest.mark.parametrize("stdout", ["not json", "{}", "[]",
                                    '{"filename": "x"}'])
def test_unexpected_info_output_is_a_qemu_img_error(qemu, runner, stdout):
    runner.execute.return_value = ok(stdout)
    with pytest.raises(exception.QemuImgError) as err:
        qemu.info("/i/b", "raw", backing_chain=stdout == "[]")
    assert "unexpected output" in str(err.value)


# --- check -------------------------------------------------------------------

CHECK_LEAKY = {"image-end-offset": 17170432, "total-clusters": 256,
               "check-errors": 0, "leaks": 1, "allocated-clusters": 256,
               "filename": "/i/d", "format": "qcow2"}


def test_check_reports_leaks_as_a_result_not_an_error(qemu, runner):
    runner.execute.return_value = ok(json.dumps(CHECK_LEAKY), code=3)
    result = qemu.check("/i/d", "qcow2")
    assert argv(runner) == ["qemu-img", "check", "-f", "qcow2",
                            "--output=json", "/i/d"]
    assert set(runner.execute.call_args.kwargs["ok_codes"]) == {0, 2, 3, 63}
    assert (result.leaks, result.corruptions, result.exit_code) == (1, 0, 3)
    assert result.image_end_offset == 17170432
    assert not result.clean


def test_check_repair_reports_what_it_fixed(qemu, runner):
    runner.execute.return_value = ok(json.dumps(
        {"check-errors": 0, "leaks-fixed": 1, "corruptions-fixed": 2,
         "image-end-offset": 1, "filename": "/i/d", "format": "qcow2"}))
    result = qemu.check("/i/d", "qcow2", repair="all")
    assert argv(runner)[-3:] == ["-r", "all", "/i/d"]
    assert (result.leaks_fixed, result.corruptions_fixed) == (1, 2)
    assert result.clean


def test_check_on_a_format_without_checks_says_so(qemu, runner):
    runner.execute.return_value = runner_mod.ProcessResult(
        63, "", "qemu-img: This image format does not support checks\n")
    result = qemu.check("/i/d", "raw")
    assert not result.supported
    assert not result.clean


def test_check_refuses_an_unknown_repair_mode(qemu, runner):
    with pytest.raises(exception.QemuImgInvalidRequest) as err:
        qemu.check("/i/d", "qcow2", repair="everything")
    assert "repair must be 'leaks' or 'all', not 'everything'" in str(
        err.value)
    runner.execute.assert_not_called()


# --- compare, measure, map ---------------------------------------------------

def test_compare_reads_the_exit_code(qemu, runner):
    runner.execute.return_value = ok(code=1)
    assert not qemu.compare("/a", "raw", "/b", "qcow2", strict=True)
    assert argv(runner) == ["qemu-img", "compare", "-f", "raw", "-F",
                            "qcow2", "-s", "/a", "/b"]
    runner.execute.return_value = ok(code=0)
    assert qemu.compare("/a", "raw", "/b", "qcow2")


def test_measure_a_file_and_a_size(qemu, runner):
    runner.execute.return_value = ok('{"required": 10, '
                                     '"fully-allocated": 20}')
    assert qemu.measure("/a", "raw", "qcow2") == (10, 20, None)
    assert argv(runner) == ["qemu-img", "measure", "--output=json", "-O",
                            "qcow2", "-f", "raw", "/a"]
    qemu.measure(None, None, "qcow2", size="1G")
    assert argv(runner)[-2:] == ["--size", str(GiB)]


def test_map_entries(qemu, runner):
    runner.execute.return_value = ok(
        '[{ "start": 0, "length": 4096, "depth": 1, "present": true, '
        '"zero": false, "data": true, "offset": 0}, { "start": 4096, '
        '"length": 61440, "depth": 0, "present": false, "zero": true, '
        '"data": false}]')
    entries = qemu.map("/i/d", "qcow2")
    assert [(e.start, e.length, e.depth, e.data, e.offset)
            for e in entries] == [(0, 4096, 1, True, 0),
                                  (4096, 61440, 0, False, None)]


# --- the program itself --------------------------------------------------

def test_version_is_asked_once_per_binary(runner):
    runner.execute.return_value = ok(
        "qemu-img version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)\nCopyright\n")
    first = qemu_img.QemuImg(execute=runner)
    assert first.version() == (8, 2, 2)
    assert first.version() == (8, 2, 2)
    assert qemu_img.QemuImg(execute=runner).version() == (8, 2, 2)
    assert runner.execute.call_count == 1
    qemu_img.QemuImg(execute=runner, binary="/opt/qemu-img").version()
    assert argv(runner) == ["/opt/qemu-img", "--version"]


def test_an_unreadable_version_is_an_error(qemu, runner):
    runner.execute.return_value = ok("something else")
    with pytest.raises(exception.QemuImgError):
        qemu.version()


def test_supported_formats_and_create_options(qemu, runner):
    runner.execute.return_value = ok(
        "usage: qemu-img ...\n\nSupported formats: blkdebug qcow2 raw vmdk"
        "\n\nSee <https://qemu.org/contribute/report-a-bug>\n")
    assert qemu.supported_formats() == ["blkdebug", "qcow2", "raw", "vmdk"]
    runner.execute.return_value = ok(
        "Supported qcow2 options:\n"
        "  backing_file=<str>     - File name of a base image\n"
        "  data_file_raw=<bool (on/off)> - The external data file must "
        "stay valid as a raw image\n\n"
        "The protocol level may support further options.\n")
    assert qemu.create_options_help("qcow2") == [
        ("backing_file", "str", "File name of a base image"),
        ("data_file_raw", "bool (on/off)",
         "The external data file must stay valid as a raw image")]
    assert argv(runner) == ["qemu-img", "create", "-f", "qcow2", "-o",
                            "help"]


# --- runners and errors ------------------------------------------------------

def test_a_missing_binary_is_qemu_img_not_found(qemu, runner):
    runner.execute.side_effect = FileNotFoundError(
        errno.ENOENT, "No such file or directory")
    with pytest.raises(exception.QemuImgNotFound) as err:
        qemu.create("/i/d", "raw", 1)
    assert isinstance(err.value, FileNotFoundError)
    assert "apt-get install qemu-utils" in str(err.value)


def test_other_os_errors_are_qemu_img_errors(qemu, runner):
    runner.execute.side_effect = PermissionError(errno.EACCES, "denied")
    with pytest.raises(exception.QemuImgError) as err:
        qemu.create("/i/d", "raw", 1)
    assert "denied" in str(err.value)


def test_an_execute_function_is_wrapped_in_a_runner():
    execute = mock.create_autospec(processutils.execute,
                                   return_value=("", ""))
    qemu_img.QemuImg(execute=execute).create("/i/d", "raw", 512)
    assert execute.call_args.args == ("qemu-img", "create", "-f", "raw",
                                      "/i/d", "512")


def test_the_binary_comes_from_the_configuration(runner):
    conf = cfg.ConfigOpts()
    qemu_options.register_opts(conf)
    conf.set_override("binary", "/usr/local/bin/qemu-img", group="qemu_img")
    qemu_img.QemuImg(conf, execute=runner).create("/i/d", "raw", 512)
    assert argv(runner)[0] == "/usr/local/bin/qemu-img"


def test_options_are_listed_for_the_sample_config():
    names = {opt.name for opt in qemu_options.OPTIONS}
    assert names == {"binary", "info_address_space_limit",
                     "info_cpu_time_limit", "convert_address_space_limit",
                     "convert_cpu_seconds_per_gib"}
    for opt in qemu_options.OPTIONS:
        assert opt.help.endswith(".") and str(opt.default) in opt.help


# --- conversion limits -------------------------------------------------------

MiB = 1024 * 1024


@pytest.mark.parametrize("virtual_size,cpu", [
    (MiB, 60),                      # the floor
    (10 * 1024 * MiB, 300),         # 30 s per GiB
    (10 * 1024 * MiB + 1, 330),     # a started GiB counts
])
def test_a_limited_conversion_runs_under_cpu_space_and_size_limits(
        qemu, runner, tmp_path, virtual_size, cpu):
    qemu.convert("/i/s", "qcow2", str(tmp_path / "t"), "raw", limits=True,
                 max_output_size=virtual_size)
    preexec_fn = runner.execute.call_args.kwargs["preexec_fn"]
    with in_child() as (setrlimit, _setpgid):
        preexec_fn()
    limit = virtual_size + qemu_options.CONVERT_OUTPUT_SLACK
    assert setrlimit.call_args_list == [
        mock.call(resource.RLIMIT_AS, (4096 << 20, 4096 << 20)),
        mock.call(resource.RLIMIT_CPU, (cpu, cpu)),
        mock.call(resource.RLIMIT_FSIZE, (limit, limit))]


@pytest.mark.parametrize("code,stderr,error,option", [
    (-9, "", exception.QemuImgLimitExceeded, "convert_cpu_seconds_per_gib"),
    (-6, "", exception.QemuImgLimitExceeded, "convert_address_space_limit"),
    (-25, "", exception.QemuImgOutputTooLarge, None),
])
def test_a_conversion_over_a_limit_says_which(qemu, runner, tmp_path, code,
                                              stderr, error, option):
    runner.execute.side_effect = failed(code, stderr)
    target = tmp_path / "t"
    with pytest.raises(error) as err:
        qemu.convert("/i/s", "qcow2", str(target), "raw", limits=True,
                     max_output_size=MiB)
    assert type(err.value) is error
    if option:
        assert "[qemu_img] %s" % option in str(err.value)
    assert not target.exists()


def test_a_check_runs_under_the_info_limits(qemu, runner):
    runner.execute.return_value = ok(json.dumps(
        {"filename": "/i/x", "format": "qcow2", "check-errors": 0}))
    qemu.check("/i/x", "qcow2")
    preexec_fn = runner.execute.call_args.kwargs["preexec_fn"]
    with in_child() as (setrlimit, _setpgid):
        preexec_fn()
    assert setrlimit.call_args_list == [
        mock.call(resource.RLIMIT_AS, (1024 << 20, 1024 << 20)),
        mock.call(resource.RLIMIT_CPU, (30, 30))]
