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

"""Refusals of the inspection policy the crafted corpus does not hold,
with images made by the real qemu-img, through the real pipeline: the
image is refused, nothing is cached and no disk is written.
"""

import os
import struct
import subprocess

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import exception
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
VHD_DIFFERENCING = 4

pytestmark = pytest.mark.skipif(fenv.REAL_QEMU_IMG is None,
                                reason="qemu-img is not installed")


def _qcow_version_1(path):
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "qcow", path,
                    "8M"], check=True)
    with open(path, "rb") as f:
        assert f.read(8) == b"QFI\xfb\0\0\0\x01"


def _differencing_vhd(path):
    """A dynamic VHD made by qemu-img whose footers (the copy at the start
    and the one at the end) say it is a differencing disk, whose parent
    qemu-img would look for on this host.
    """
    subprocess.run([fenv.REAL_QEMU_IMG, "create", "-q", "-f", "vpc", "-o",
                    "subformat=dynamic", path, "8M"], check=True)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for at in (0, size - 512):
            f.seek(at)
            footer = bytearray(f.read(512))
            assert footer[:8] == b"conectix"
            footer[60:64] = struct.pack(">I", VHD_DIFFERENCING)
            # Its checksum fixed, so that qemu-img takes it as it is.
            footer[64:68] = bytes(4)
            footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)
            f.seek(at)
            f.write(footer)


def _raw(path):
    fenv.make_raw(path, 8 * MiB)


@pytest.mark.parametrize("make,declared,refusal", [
    (_qcow_version_1, None, exception.UnsupportedFormat),
    (_differencing_vhd, "vhd", exception.BackingFileRefused),
    (_raw, "ploop", exception.UnsupportedFormat),
    (_raw, "luks", exception.EncryptedImageRefused),
], ids=["qcow-version-1", "vhd-differencing", "declared-ploop",
        "declared-luks"])
def test_an_image_the_policy_refuses_is_never_cached(tmp_path, make,
                                                     declared, refusal):
    dep = fenv.Deployment(str(tmp_path))
    image_id = "image.img"
    make(os.path.join(dep.images, image_id))
    if declared:
        dep.write_config(local_source={"formats": "%s:%s" % (image_id,
                                                             declared)})
    target = os.path.join(dep.instances, "vm", "disk")
    backend = backends_base.load(dep.conf(), "qcow2")
    dep.reset_qemu_log()

    with pytest.raises(refusal) as err:
        backend.create_image(image_id, target, fenv.GiB)

    assert err.value.rule == refusal.rule
    assert image_id in str(err.value)
    assert dep.base_listing() == []
    assert not os.path.exists(os.path.dirname(target))
    # Refused from the bytes alone: qemu-img never opened the image.
    assert dep.qemu_calls() == []
