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

"""QemuImg against the real qemu-img, on real files in a temporary
directory."""

import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from unittest import mock

from oslo_config import cfg
import pytest

from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import options as qemu_options

QEMU_IMG = shutil.which("qemu-img")
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(QEMU_IMG is None,
                                reason="qemu-img is not installed")


@pytest.fixture
def qemu():
    return qemu_img.QemuImg()


def write_raw(path, size, pattern=b"imagebackend qemu-img test data "):
    """A raw image whose every byte is data (no holes, no zero blocks)."""
    block = (pattern * (MiB // len(pattern) + 1))[:MiB]
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return path


def identical(a, a_fmt, b, b_fmt):
    """An independent check, by qemu-img compare."""
    return subprocess.run([QEMU_IMG, "compare", "-q", "-f", a_fmt, "-F",
                           b_fmt, a, b]).returncode == 0


def overwrite(image, fmt, raw):
    """Write ``raw`` into the existing ``image``, keeping its snapshots."""
    subprocess.run([QEMU_IMG, "convert", "-n", "-f", "raw", "-O", fmt, raw,
                    image], check=True)


def make_leak(path):
    """Leak a cluster in a qcow2 file.

    A cluster appended to the file gets a reference count although
    nothing references it.
    """
    with open(path, "r+b") as f:
        header = f.read(104)
        cluster_size = 1 << struct.unpack(">I", header[20:24])[0]
        refcount_table = struct.unpack(">Q", header[48:56])[0]
        assert struct.unpack(">I", header[96:100])[0] == 4  # 16-bit counts
        f.seek(refcount_table)
        refcount_block = struct.unpack(">Q", f.read(8))[0]
        end = os.fstat(f.fileno()).st_size
        cluster = (end + cluster_size - 1) // cluster_size
        f.seek(cluster * cluster_size)
        f.write(bytes(cluster_size))
        f.seek(refcount_block + 2 * cluster)
        f.write(struct.pack(">H", 1))


# --- create ------------------------------------------------------------------

def test_create_overlay_records_its_backing_chain(qemu, tmp_path):
    base = write_raw(str(tmp_path / "base.raw"), 4 * MiB)
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", 64 * MiB, backing_file=base,
                backing_fmt="raw")
    info = qemu.info(disk, "qcow2", backing_chain=True)
    assert (info.format, info.virtual_size) == ("qcow2", 64 * MiB)
    assert (info.backing_file, info.backing_format) == (base, "raw")
    assert [(i.filename, i.format) for i in info.chain] == [
        (disk, "qcow2"), (base, "raw")]
    assert info.chain[1].virtual_size == 4 * MiB


def test_create_spawns_exactly_one_process(qemu, tmp_path):
    base = write_raw(str(tmp_path / "base.raw"), MiB)
    real_popen = subprocess.Popen
    with mock.patch("subprocess.Popen", side_effect=real_popen) as popen:
        qemu.create(str(tmp_path / "disk.qcow2"), "qcow2", 8 * MiB,
                    backing_file=base, backing_fmt="raw")
    assert popen.call_count == 1
    assert popen.call_args.args[0][:2] == ("qemu-img", "create")


def test_paths_with_commas_work_everywhere(qemu, tmp_path):
    directory = tmp_path / "a,b"
    directory.mkdir()
    base = write_raw(str(directory / "base,1.raw"), MiB)
    disk = str(directory / "disk,1.qcow2")
    qemu.create(disk, "qcow2", None, backing_file=base, backing_fmt="raw")
    qemu.snapshot_create(disk, "qcow2", "s,1")
    info = qemu.info(disk, "qcow2")
    assert info.backing_file == base
    assert info.virtual_size == MiB
    assert [s.name for s in info.snapshots] == ["s,1"]


# --- convert -----------------------------------------------------------------

def test_convert_qcow2_to_raw_keeps_the_content(qemu, tmp_path):
    source = write_raw(str(tmp_path / "src.raw"), 8 * MiB)
    qcow2 = str(tmp_path / "img.qcow2")
    raw = str(tmp_path / "img.raw")
    qemu.convert(source, "raw", qcow2, "qcow2")
    qemu.convert(qcow2, "qcow2", raw, "raw")
    assert qemu.info(raw, "raw").virtual_size == 8 * MiB
    assert identical(qcow2, "qcow2", raw, "raw")
    assert identical(source, "raw", raw, "raw")
    assert qemu.compare(qcow2, "qcow2", raw, "raw")


def test_convert_progress_climbs_to_100(qemu, tmp_path):
    source = write_raw(str(tmp_path / "src.raw"), 32 * MiB)
    seen = []
    qemu.convert(source, "raw", str(tmp_path / "out.qcow2"), "qcow2",
                 progress=seen.append)
    assert seen[-1] == 100.0
    assert seen == sorted(seen)
    assert any(value < 100.0 for value in seen)


def test_cancelling_a_convert_from_another_thread_keeps_nothing(qemu,
                                                                tmp_path):
    source = write_raw(str(tmp_path / "src.raw"), 64 * MiB)
    target = str(tmp_path / "out.raw")
    cancel = threading.Event()
    outcome = {}

    def convert():
        try:
            # Rate-limited so that it is still running when cancelled.
            qemu.convert(source, "raw", target, "raw", rate_limit=4 * MiB,
                         cancel=cancel)
        except exception.OperationCancelled as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=convert)
    start = time.monotonic()
    worker.start()
    while not os.path.exists(target) and time.monotonic() - start < 10:
        time.sleep(0.01)
    assert os.path.exists(target), "qemu-img never created its output"
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    assert "error" in outcome
    assert not os.path.exists(target)
    assert time.monotonic() - start < 10


def test_convert_where_o_direct_is_refused_writes_back_and_syncs(
        qemu, tmp_path):
    # Some filesystems (older tmpfs, some network filesystems) refuse
    # O_DIRECT; the probe's answer is what matters here.
    source = write_raw(str(tmp_path / "src.raw"), 4 * MiB)
    target = str(tmp_path / "out.qcow2")
    real_fsync = os.fsync
    with mock.patch.object(sparseio, "direct_io_supported",
                           return_value=False), \
            mock.patch("os.fsync", side_effect=real_fsync) as fsync:
        qemu.convert(source, "raw", target, "qcow2")
    assert fsync.call_count == 2        # the image and its directory
    assert identical(source, "raw", target, "qcow2")


def test_o_direct_is_detected_on_the_test_directory(tmp_path):
    # Whatever the answer, it must be usable: qemu-img accepts the cache
    # mode chosen from it (exercised by the conversions above); here, the
    # probe leaves nothing behind.
    sparseio.direct_io_supported(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_compressed_convert_is_smaller_with_the_same_content(qemu,
                                                             tmp_path):
    source = write_raw(str(tmp_path / "src.raw"), 16 * MiB)
    plain = str(tmp_path / "plain.qcow2")
    packed = str(tmp_path / "packed.qcow2")
    qemu.convert(source, "raw", plain, "qcow2")
    qemu.convert(source, "raw", packed, "qcow2", compress=True)
    assert os.path.getsize(packed) < os.path.getsize(plain) // 4
    assert identical(source, "raw", packed, "qcow2")
    assert qemu.check(packed, "qcow2").compressed_clusters


def test_compression_to_raw_is_a_clear_error(qemu, tmp_path):
    with pytest.raises(exception.QemuImgInvalidRequest):
        qemu.convert(str(tmp_path / "a"), "raw", str(tmp_path / "b"), "raw",
                     compress=True)


def test_a_failing_convert_leaves_no_target(qemu, tmp_path):
    not_qcow2 = write_raw(str(tmp_path / "src.raw"), MiB)
    target = str(tmp_path / "out.raw")
    with pytest.raises(exception.QemuImgError) as err:
        qemu.convert(not_qcow2, "qcow2", target, "raw")
    assert "qcow2" in str(err.value)
    assert not os.path.exists(target)


# --- resize, rebase, commit --------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize_grows_the_disk(qemu, tmp_path, fmt):
    disk = str(tmp_path / ("disk." + fmt))
    qemu.create(disk, fmt, 8 * MiB)
    qemu.resize(disk, fmt, "24M")
    assert qemu.info(disk, fmt).virtual_size == 24 * MiB


def test_shrinking_needs_to_be_asked_for(qemu, tmp_path):
    disk = str(tmp_path / "disk.raw")
    qemu.create(disk, "raw", 8 * MiB)
    with pytest.raises(exception.QemuImgError) as err:
        qemu.resize(disk, "raw", 4 * MiB)
    assert "--shrink" in str(err.value)
    qemu.resize(disk, "raw", 4 * MiB, shrink=True)
    assert os.path.getsize(disk) == 4 * MiB


def test_unsafe_rebase_repairs_a_moved_backing_file(qemu, tmp_path):
    base = write_raw(str(tmp_path / "base.raw"), 4 * MiB)
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", None, backing_file=base, backing_fmt="raw")
    moved = str(tmp_path / "moved" / "base.raw")
    os.mkdir(os.path.dirname(moved))
    os.rename(base, moved)
    with pytest.raises(exception.QemuImgError):
        qemu.info(disk, "qcow2", backing_chain=True)
    qemu.rebase(disk, "qcow2", moved, "raw", unsafe=True)
    info = qemu.info(disk, "qcow2", backing_chain=True)
    assert info.backing_file == moved
    assert identical(disk, "qcow2", moved, "raw")


@pytest.mark.parametrize("size", [4 * MiB, 32 * MiB])
def test_commit_writes_the_overlay_into_its_base(qemu, tmp_path, size):
    base = str(tmp_path / "base.qcow2")
    qemu.create(base, "qcow2", size)
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", None, backing_file=base, backing_fmt="qcow2")
    data = write_raw(str(tmp_path / "data.raw"), size)
    overwrite(disk, "qcow2", data)
    assert not identical(base, "qcow2", data, "raw")
    seen = []
    qemu.commit(disk, "qcow2", progress=seen.append)
    assert seen[-1] == 100.0 and seen == sorted(seen)
    assert identical(base, "qcow2", data, "raw")


def test_safe_rebase_reports_progress_and_keeps_the_content(
        qemu, tmp_path):
    base = write_raw(str(tmp_path / "base.raw"), 32 * MiB)
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", None, backing_file=base, backing_fmt="raw")
    empty = str(tmp_path / "empty.raw")
    with open(empty, "wb") as f:
        f.truncate(32 * MiB)
    seen = []
    qemu.rebase(disk, "qcow2", empty, "raw", progress=seen.append)
    assert seen[-1] == 100.0 and seen == sorted(seen)
    assert qemu.info(disk, "qcow2").backing_file == empty
    assert identical(disk, "qcow2", base, "raw")


def test_a_cancelled_rebase_keeps_the_old_backing_file(qemu, tmp_path):
    # Big enough that copying it into the disk outlasts the runner's poll.
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", None, backing_file=base, backing_fmt="raw")
    empty = str(tmp_path / "empty.raw")
    with open(empty, "wb") as f:
        f.truncate(256 * MiB)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(exception.OperationCancelled) as err:
        qemu.rebase(disk, "qcow2", empty, "raw", cancel=cancel)
    assert disk in str(err.value)
    assert qemu.info(disk, "qcow2").backing_file == base
    assert identical(disk, "qcow2", base, "raw")


def test_amend_changes_a_format_option(qemu, tmp_path):
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", MiB, options={"lazy_refcounts": False})
    qemu.amend(disk, "qcow2", {"lazy_refcounts": True})
    info = qemu.info(disk, "qcow2")
    assert info.format_specific["lazy-refcounts"] is True


# --- check and snapshots -----------------------------------------------------

def test_check_finds_and_repairs_leaks(qemu, tmp_path):
    disk = str(tmp_path / "leaky.qcow2")
    qemu.convert(write_raw(str(tmp_path / "d.raw"), 4 * MiB), "raw", disk,
                 "qcow2")
    assert qemu.check(disk, "qcow2").clean
    make_leak(disk)
    found = qemu.check(disk, "qcow2")
    assert (found.leaks, found.corruptions, found.exit_code) == (1, 0, 3)
    assert not found.clean
    repaired = qemu.check(disk, "qcow2", repair="leaks")
    assert (repaired.leaks_fixed, repaired.leaks) == (1, 0)
    assert qemu.check(disk, "qcow2").clean


def test_check_of_a_raw_image_is_not_supported(qemu, tmp_path):
    result = qemu.check(write_raw(str(tmp_path / "d.raw"), MiB), "raw")
    assert not result.supported


def test_snapshot_create_list_apply_delete(qemu, tmp_path):
    before = write_raw(str(tmp_path / "before.raw"), 2 * MiB, b"before ")
    after = write_raw(str(tmp_path / "after.raw"), 2 * MiB, b"after! ")
    disk = str(tmp_path / "disk.qcow2")
    qemu.convert(before, "raw", disk, "qcow2")
    qemu.snapshot_create(disk, "qcow2", "clean")
    overwrite(disk, "qcow2", after)
    assert identical(disk, "qcow2", after, "raw")
    snaps = qemu.snapshot_list(disk, "qcow2")
    assert [(s.id, s.name, s.vm_state_size) for s in snaps] == [
        ("1", "clean", 0)]
    assert abs(snaps[0].date.timestamp() - time.time()) < 600
    qemu.snapshot_apply(disk, "qcow2", "clean")
    assert identical(disk, "qcow2", before, "raw")
    qemu.snapshot_delete(disk, "qcow2", "clean")
    assert qemu.snapshot_list(disk, "qcow2") == []


def test_snapshot_of_a_raw_image_is_refused_by_qemu_img(qemu, tmp_path):
    disk = write_raw(str(tmp_path / "d.raw"), MiB)
    with pytest.raises(exception.QemuImgError) as err:
        qemu.snapshot_create(disk, "raw", "s")
    assert "not supported" in str(err.value)


# --- info and its limits -----------------------------------------------------

def test_info_runs_under_the_default_limits(qemu, tmp_path):
    base = write_raw(str(tmp_path / "base.raw"), MiB)
    disk = str(tmp_path / "disk.qcow2")
    qemu.create(disk, "qcow2", 100 * 1024 * MiB, backing_file=base,
                backing_fmt="raw")
    info = qemu.info(disk, "qcow2", backing_chain=True, limits=True)
    assert info.virtual_size == 100 * 1024 * MiB


def _conf(**limits):
    conf = cfg.ConfigOpts()
    qemu_options.register_opts(conf)
    for name, value in limits.items():
        conf.set_override(name, value, group="qemu_img")
    return conf


def test_info_over_its_address_space_limit_is_stopped(tmp_path):
    disk = str(tmp_path / "disk.qcow2")
    qemu = qemu_img.QemuImg(_conf(info_address_space_limit=16))
    qemu.create(disk, "qcow2", MiB)
    with pytest.raises(exception.QemuImgLimitExceeded) as err:
        qemu.info(disk, "qcow2")
    assert "info_address_space_limit" in str(err.value)
    assert qemu.info(disk, "qcow2", limits=False).virtual_size == MiB


def test_info_over_its_cpu_time_limit_is_killed(tmp_path):
    # A stand-in for a qemu-img stuck on a crafted image.
    # It gives up after 20 s, so that a broken limit fails the test
    # instead of hanging it.
    spinner = tmp_path / "spinning-qemu-img"
    spinner.write_text("#!%s\nimport time\nend = time.time() + 20\n"
                       "while time.time() < end:\n    pass\n"
                       % sys.executable)
    spinner.chmod(spinner.stat().st_mode | stat.S_IXUSR)
    qemu = qemu_img.QemuImg(_conf(info_cpu_time_limit=1),
                            binary=str(spinner))
    start = time.monotonic()
    with pytest.raises(exception.QemuImgLimitExceeded) as err:
        qemu.info(str(tmp_path / "evil.qcow2"), "qcow2")
    assert "info_cpu_time_limit" in str(err.value)
    assert time.monotonic() - start < 20


#: a stand-in for qemu-img: records the process state it was started in
#: (its resource limits, process group, parent-death signal, and the
#: signals it ignores: read by the shell, since Python ignores some
#: itself as it starts) in the file named by its environment, then prints
#: the info of a 1 MiB raw image.
_REPORTING_QEMU_IMG = """#!/bin/sh
grep '^SigIgn:' /proc/$$/status > "$REPORT.sigign"
exec %s - "$@" <<'END'
import ctypes, json, os, resource, sys
def limit(name):
    soft, hard = resource.getrlimit(getattr(resource, name))
    return [soft, hard]
sig = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
with open(os.environ["REPORT"] + ".sigign") as f:
    ignored = int(f.read().split()[1], 16)
with open(os.environ["REPORT"], "w") as report:
    json.dump({"as": limit("RLIMIT_AS"), "cpu": limit("RLIMIT_CPU"),
               "fsize": limit("RLIMIT_FSIZE"), "pid": os.getpid(),
               "pgid": os.getpgid(0), "pdeathsig": sig.value,
               "ignored": ignored}, report)
print(json.dumps({"filename": sys.argv[-1], "format": "raw",
                  "virtual-size": 1048576, "actual-size": 4096,
                  "dirty-flag": False}))
END
"""


def _ignores(report, signum):
    return bool(report["ignored"] & (1 << signum - 1))


@pytest.mark.parametrize("address_space,cpu_time", [(1024, 30), (77, 3)])
def test_info_really_runs_under_its_limits(tmp_path, monkeypatch,
                                           address_space, cpu_time):
    # What the child process gets, reported by the child itself: the
    # configured limits (soft and hard), a process group of its own, death
    # with its caller, and the default action of the signals Python
    # ignores (so a write past a file size limit kills it).
    stand_in = tmp_path / "reporting-qemu-img"
    stand_in.write_text(_REPORTING_QEMU_IMG % sys.executable)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("REPORT", str(tmp_path / "report.json"))
    qemu = qemu_img.QemuImg(
        _conf(info_address_space_limit=address_space,
              info_cpu_time_limit=cpu_time), binary=str(stand_in))
    info = qemu.info(str(tmp_path / "disk.raw"), "raw")
    assert info.virtual_size == MiB
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["as"] == [address_space * MiB] * 2
    assert report["cpu"] == [cpu_time] * 2
    assert report["fsize"] == [resource.RLIM_INFINITY] * 2
    assert report["pgid"] == report["pid"] != os.getpgid(0)
    assert report["pdeathsig"] == signal.SIGKILL
    assert not _ignores(report, signal.SIGPIPE)
    assert not _ignores(report, signal.SIGXFSZ)
    # Without limits (limits=False), the child inherits this process's.
    qemu.info(str(tmp_path / "disk.raw"), "raw", limits=False)
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["as"] == list(resource.getrlimit(resource.RLIMIT_AS))
    assert report["cpu"] == list(resource.getrlimit(resource.RLIMIT_CPU))


def test_a_conversion_really_runs_under_its_limits(tmp_path, monkeypatch):
    stand_in = tmp_path / "reporting-qemu-img"
    stand_in.write_text(_REPORTING_QEMU_IMG % sys.executable)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("REPORT", str(tmp_path / "report.json"))
    qemu = qemu_img.QemuImg(
        _conf(convert_address_space_limit=3000,
              convert_cpu_seconds_per_gib=7), binary=str(stand_in))
    target = str(tmp_path / "out.raw")
    qemu.convert(str(tmp_path / "in.qcow2"), "qcow2", target, "raw",
                 limits=True, max_output_size=5 * 1024 ** 3,
                 durable=False)
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["as"] == [3000 * MiB] * 2
    assert report["cpu"] == [qemu_options.CONVERT_MIN_CPU_TIME] * 2
    assert report["fsize"] == [
        5 * 1024 ** 3 + qemu_options.CONVERT_OUTPUT_SLACK] * 2
    assert report["pgid"] == report["pid"]
    assert report["pdeathsig"] == signal.SIGKILL
    assert not _ignores(report, signal.SIGXFSZ)


def test_info_on_a_missing_file_is_a_clear_error(qemu, tmp_path):
    missing = str(tmp_path / "missing.qcow2")
    with pytest.raises(exception.QemuImgError) as err:
        qemu.info(missing, "qcow2")
    assert err.value.path == missing
    assert err.value.exit_code == 1
    assert "No such file or directory" in str(err.value)
    assert str(err.value).count(missing) == 2   # the path, and the reason


def test_a_missing_binary_says_how_to_install_it(tmp_path):
    qemu = qemu_img.QemuImg(binary=str(tmp_path / "no-qemu-img"))
    with pytest.raises(exception.QemuImgNotFound) as err:
        qemu.create(str(tmp_path / "d"), "raw", MiB)
    assert "qemu-utils" in str(err.value)


# --- measure, map, version, formats ------------------------------------------

def test_measure_and_map(qemu, tmp_path):
    source = str(tmp_path / "src.raw")
    qemu.create(source, "raw", 8 * MiB)
    with open(source, "r+b") as f:
        f.write(b"x" * MiB)
    measured = qemu.measure(source, "raw", "qcow2")
    assert MiB < measured.required < 2 * MiB
    assert measured.fully_allocated > 8 * MiB
    assert qemu.measure(None, None, "qcow2",
                        size=8 * MiB).required < MiB
    entries = qemu.map(source, "raw")
    assert entries[0].start == 0 and entries[0].data
    assert sum(e.length for e in entries) == 8 * MiB
    assert any(e.zero and not e.data for e in entries)


def test_version_formats_and_create_options(qemu):
    out = subprocess.run([QEMU_IMG, "--version"], capture_output=True,
                         text=True, check=True).stdout
    version = qemu.version()
    assert ".".join(map(str, version)) in out
    assert version >= (7, 0, 0)
    assert {"qcow2", "raw"} <= set(qemu.supported_formats())
    names = [option.name for option in qemu.create_options_help("qcow2")]
    assert "cluster_size" in names and "backing_fmt" in names
