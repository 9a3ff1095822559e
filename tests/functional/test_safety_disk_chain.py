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

"""Disk operations refuse chains qemu-img must not open, with images made
by the real qemu-img inside the allowed directories (so only the chain
itself is wrong), through the command line.
"""

import os
import struct
import subprocess

import pytest

from imagebackend import exception
from tests.functional.fixtures import env as fenv
from tests.functional import test_disk_ops as disk_tests

MiB = fenv.MiB
#: the qcow2 header extension that records the backing file's format.
BACKING_FORMAT_EXTENSION = struct.pack(">I", 0xE2792ACA)

pytestmark = pytest.mark.skipif(fenv.REAL_QEMU_IMG is None,
                                reason="qemu-img is not installed")


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def qemu_img(*argv):
    subprocess.run([fenv.REAL_QEMU_IMG] + list(argv), check=True)


def _refused(dep, *argv):
    """Run ``disk ARGV``; return its one-line error."""
    return disk_tests.one_line_error(dep.cli("disk", *argv, check=False))


def _refused_by_the_library(dep, operations):
    """Call each of ``operations`` (functions of a
    :class:`~imagebackend.disk.operations.DiskOperations`, as a library
    caller makes it); returns the message of each refusal.
    """
    ops = disk_tests._ops(dep)
    messages = []
    for operation in operations:
        with pytest.raises(exception.DiskOperationError) as err:
            operation(ops)
        messages.append(str(err.value))
    return messages


def test_a_backing_file_without_a_recorded_format_is_never_opened(dep):
    """A raw disk a guest made look like qcow2 (backed by a host file)
    must not be probed as the backing file of an overlay that does not
    record its format.
    """
    secret = disk_tests.plant_secret(dep)
    vm = os.path.join(dep.instances, "vm")
    os.makedirs(vm)
    guest = os.path.join(vm, "guest.raw")
    fenv.write_pattern_raw(guest, 8 * MiB)
    disk_tests.write_at_start(guest, disk_tests.guest_qcow2_header(
        dep, secret))
    top = os.path.join(vm, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", guest, "-F", "raw", top,
             "8M")
    # Forget the backing format, as images of old tools do: qemu-img
    # would then probe ``guest`` and find the guest's qcow2 header.
    header = bytearray(disk_tests.file_bytes(top)[:64 * 1024])
    at = header.find(BACKING_FORMAT_EXTENSION)
    assert at > 0
    disk_tests.write_at_start(top, bytes(header[:at]) + b"\0\0\xbe\xef")
    assert "backing-filename-format" not in fenv.qemu_info(top, "qcow2")
    out = os.path.join(dep.root, "out.raw")
    before = disk_tests.file_bytes(top)
    dep.reset_qemu_log()

    line = _refused(dep, "extract", top, out, "-O", "raw", "--input-format",
                    "qcow2")
    assert "no recorded format" in line and top in line, line
    assert "disk rebase %s %s --unsafe" % (top, guest) in line, line
    for message in _refused_by_the_library(dep, [
            lambda ops: ops.info(top, fmt="qcow2"),
            lambda ops: ops.resize(top, 16 * MiB, fmt="qcow2")]):
        assert "no recorded format" in message and top in message
    assert not os.path.exists(out)
    assert disk_tests.file_bytes(top) == before
    # qemu-img never opened the backing file, let alone the host file.
    calls = "\n".join(dep.qemu_calls())
    assert guest not in calls and secret not in calls


def test_a_disk_with_an_external_data_file_is_refused(dep):
    vm = os.path.join(dep.instances, "vm")
    os.makedirs(vm)
    disk = os.path.join(vm, "disk")
    # The data file lies beside the disk, in an allowed directory: what
    # is refused is that qemu-img would read and write a file the
    # header names.
    data = os.path.join(vm, "data.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=%s,data_file_raw=on" % data, disk, "1M")
    with open(data, "wb") as f:
        f.write(disk_tests.SECRET)
    out = os.path.join(dep.root, "out.raw")
    dep.reset_qemu_log()

    line = _refused(dep, "extract", disk, out, "-O", "raw",
                    "--input-format", "qcow2")
    assert data in line, line
    for message in _refused_by_the_library(dep, [
            lambda ops: ops.resize(disk, 2 * MiB, fmt="qcow2"),
            lambda ops: ops.check(disk, "all", fmt="qcow2")]):
        assert data in message
    assert not os.path.exists(out)
    assert disk_tests.file_bytes(data) == disk_tests.SECRET
    assert not any(c.startswith(("convert", "resize", "check"))
                   for c in dep.qemu_calls())


def test_a_looping_chain_is_refused(dep):
    vm = os.path.join(dep.instances, "vm")
    os.makedirs(vm)
    a, b = os.path.join(vm, "a.qcow2"), os.path.join(vm, "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", b, "-F", "qcow2",
             a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", a, "-F", "qcow2",
             b, "1M")
    before = disk_tests.file_bytes(a), disk_tests.file_bytes(b)
    out = os.path.join(dep.root, "out.raw")

    line = _refused(dep, "info", a, "--input-format", "qcow2")
    assert "loops" in line and a in line, line
    for message in _refused_by_the_library(dep, [
            lambda ops: ops.extract(a, out, fmt="qcow2"),
            lambda ops: ops.resize(a, 2 * MiB, fmt="qcow2")]):
        assert "loops" in message and a in message
    assert not os.path.exists(out)
    assert (disk_tests.file_bytes(a), disk_tests.file_bytes(b)) == before

    # A rebase that would close a loop is refused before anything changes.
    c = os.path.join(vm, "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", c, "1M")
    d = os.path.join(vm, "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", c, "-F", "qcow2", d, "1M")
    before = disk_tests.file_bytes(c)
    [message] = _refused_by_the_library(dep, [
        lambda ops: ops.rebase(c, d, unsafe=True, backing_fmt="qcow2",
                               fmt="qcow2")])
    assert "loop" in message and c in message
    assert disk_tests.file_bytes(c) == before
