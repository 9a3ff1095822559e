#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""Conversions of users' images are checked first and bounded, and a
qemu-img child never outlives its caller -- with the real qemu-img and
images crafted here.
"""

import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import options as qemu_options
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
GiB = fenv.GiB


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def make_one_cluster_qcow2(path: str, entries: int = 4096) -> str:
    """A 384 KiB qcow2 whose first ``entries`` L2 entries all point at one
    data cluster: ``qemu-img check`` reports it corrupt, and a conversion
    would write that cluster ``entries`` times.
    """
    seed = path + ".seed.raw"
    with open(seed, "wb") as f:
        f.truncate(256 * MiB)
        f.write(b"one cluster, many times " * 2000)
    subprocess.run([fenv.REAL_QEMU_IMG, "convert", "-q", "-f", "raw", "-O",
                    "qcow2", "-o", "cluster_size=65536", seed, path],
                   check=True)
    os.unlink(seed)
    with open(path, "r+b") as f:
        header = f.read(104)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2_offset)
        first = f.read(8)
        f.seek(l2_offset)
        f.write(first * entries)
    return path


def test_a_qcow2_whose_l2_entries_share_one_cluster_is_refused(dep):
    """Issue 11 item 8: qemu-img check before conversion."""
    path = make_one_cluster_qcow2(os.path.join(dep.images, "evil.qcow2"))
    assert os.path.getsize(path) == 384 * 1024
    backend = backends_base.load(dep.conf(), "qcow2")
    target = os.path.join(dep.instances, "vm", "disk")
    with pytest.raises(exception.CorruptImageRefused) as err:
        backend.create_image("evil.qcow2", target, GiB)
    message = str(err.value)
    assert "evil.qcow2" in message and "qemu-img check" in message
    assert "corruption" in message
    assert dep.base_listing() == []
    assert not os.path.exists(target)
    # The check ran under the info limits, and no conversion started.
    calls = dep.qemu_calls()
    assert any(c.startswith("check -f qcow2") for c in calls)
    assert not any(c.startswith("convert") for c in calls)


def test_a_conversion_over_its_address_space_limit_names_image_and_option(
        dep):
    fenv.make_qcow2(os.path.join(dep.images, "big.qcow2"), 64 * MiB)
    dep.write_config(qemu_img={"convert_address_space_limit": 16})
    backend = backends_base.load(dep.conf(), "qcow2")
    target = os.path.join(dep.instances, "vm", "disk")
    with pytest.raises(exception.ImageLimitExceeded) as err:
        backend.create_image("big.qcow2", target, GiB)
    message = str(err.value)
    assert "big.qcow2" in message
    assert "[qemu_img] convert_address_space_limit" in message
    assert dep.base_listing() == []
    assert not os.path.exists(target)


def test_a_conversion_cannot_write_past_the_checked_virtual_size(tmp_path):
    """An image that lies about its size fails instead of filling the
    disk: the output is limited to the size it was checked to have.
    """
    source = fenv.make_qcow2(str(tmp_path / "s.qcow2"), 64 * MiB)
    target = str(tmp_path / "out.raw")
    qemu = qemu_img.QemuImg(binary=fenv.REAL_QEMU_IMG)
    with pytest.raises(exception.QemuImgOutputTooLarge) as err:
        qemu.convert(source, "qcow2", target, "raw", limits=True,
                     max_output_size=8 * MiB)
    limit = 8 * MiB + qemu_options.CONVERT_OUTPUT_SLACK
    assert "more than %d bytes" % limit in str(err.value)
    assert not os.path.exists(target)
    # The same conversion within its bound succeeds.
    qemu.convert(source, "qcow2", target, "raw", limits=True,
                 max_output_size=64 * MiB)
    assert os.path.getsize(target) == 64 * MiB


_SLOW_CONVERT = """
import sys
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import options as qemu_options
qemu = qemu_img.QemuImg(binary=sys.argv[1])
qemu.convert(sys.argv[2], "qcow2", sys.argv[3], "raw", rate_limit=65536)
"""


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _qemu_img_child(pid, timeout=30):
    """The child of ``pid`` running qemu-img, and its arguments, once it
    runs it: a child found earlier is still the caller's fork on its way
    (without its own process group yet), or in the middle of exec (its
    cmdline empty).

    :returns: ``(None, [])`` if none runs it within ``timeout`` seconds.
    """
    binary = os.path.realpath(fenv.REAL_QEMU_IMG)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(pid):
            try:
                exe = os.readlink("/proc/%d/exe" % child)
                with open("/proc/%d/cmdline" % child, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if exe == binary and len(argv) > 1:
                return child, argv
        time.sleep(0.05)
    return None, []


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_killed_caller_takes_its_qemu_img_child_with_it(tmp_path):
    """Issue 11 item 8: SIGKILL the caller mid-convert; qemu-img dies."""
    source = fenv.make_qcow2(str(tmp_path / "s.qcow2"), 64 * MiB)
    caller = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, fenv.REAL_QEMU_IMG, source,
         str(tmp_path / "out.raw")])
    try:
        child, argv = _qemu_img_child(caller.pid)
        assert child, "qemu-img never started"
        assert b"convert" in argv
        # It runs in a process group of its own.
        assert os.getpgid(child) == child != os.getpgid(caller.pid)
        caller.send_signal(signal.SIGKILL)
        caller.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "qemu-img outlived its caller"
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        for pid in _children(caller.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["binary", "path"])
def test_a_missing_qemu_img_is_one_line_naming_it_and_the_fix(dep, how):
    """Issue 11 item 10: no traceback, no misleading "write" error."""
    fenv.make_qcow2(os.path.join(dep.images, "a.qcow2"), 16 * MiB)
    env = dep.env()
    if how == "binary":
        missing = "/nonexistent/qemu-img"
        dep.write_config(qemu_img={"binary": missing})
    else:
        missing = "qemu-img"
        dep.sections["qemu_img"].pop("binary")
        dep.write_config()
        env["PATH"] = os.path.dirname(sys.executable)
    result = subprocess.run(
        [sys.executable, "-m", "imagebackend.cmd.main", "--config-file",
         dep.config_file, "disk", "create", "a.qcow2",
         os.path.join(dep.instances, "vm", "disk"), "--size", "32M"],
        env=env, capture_output=True, text=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "%s: No such file or directory" % missing in lines[0]
    assert "qemu-utils" in lines[0] and "[qemu_img] binary" in lines[0]
    assert "could not write" not in lines[0]
    assert dep.base_listing() == []
