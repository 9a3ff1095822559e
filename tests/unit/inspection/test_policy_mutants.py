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

"""More tests that kill mutants of imagebackend.inspection.rules.

``tox -e mutation`` (doc/source/mutation.rst) found two rules of
:meth:`imagebackend.inspection.rules.Policy.judge` that no test reached,
because oslo.utils' inspectors of today never take those paths: an
inspector that has read its whole header yet says "not my format" while
the header carries the format's signature, and an inspector whose
``format_match`` itself raises.  Both must be decided here, not left to
what a later oslo.utils version happens to do; the inspectors are stubs.
"""

import struct

import pytest

from imagebackend import exception
from imagebackend.inspection import rules
from tests.unit.inspection import test_inspection as ti

ALL_VMDK = ("monolithicsparse", "streamoptimized")


class _Inspector:
    """A finished inspector with a given answer to format_match."""

    def __init__(self, match):
        self._match = match
        self.safety_checked = False

    @property
    def format_match(self):
        if isinstance(self._match, Exception):
            raise self._match
        return self._match

    def safety_check(self):
        self.safety_checked = True


# One signed format of each kind: magic at offset 0, at 0x40 (vdi), and a
# format qemu-img is never given (qed).
SIGNED = {
    "qcow2": ti.qcow2(pad=64 * ti.KiB),
    "vdi": ti.vdi(),
    "vhdx": ti.vhdx()[:64 * ti.KiB],
    "qed": ti.QED,
}


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_a_signed_header_its_inspector_rejects_is_invalid(name):
    policy = rules.Policy("img-7", SIGNED[name], ALL_VMDK)
    insp = _Inspector(False)
    with pytest.raises(exception.InvalidImageFormat) as err:
        policy.judge(name, insp, rules.DONE)
    assert err.value.kwargs == {
        "image_id": "img-7", "detected_format": name,
        "rule": "invalid-format",
        "reason": "its content starts like a %s image but its header is "
                  "invalid; the image is truncated, corrupt or crafted: "
                  "upload a valid copy" % name}
    assert not insp.safety_checked


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_an_unsigned_header_its_inspector_rejects_is_not_the_format(name):
    # The same answer about raw bytes only means "not this format".
    policy = rules.Policy("img-7", ti.RAW, ALL_VMDK)
    assert policy.judge(name, _Inspector(False), rules.DONE) is False


@pytest.mark.parametrize("error", (ValueError("bad"), struct.error("short"),
                                   IndexError(3), AttributeError("data")))
@pytest.mark.parametrize("name", ("vdi", "vhdx", "qcow2"))
def test_a_format_match_that_raises_is_no_match(name, error):
    policy = rules.Policy("img-7", ti.RAW, ALL_VMDK)
    insp = _Inspector(error)
    assert policy.judge(name, insp, rules.DONE) is False
    assert not insp.safety_checked
    # Nor does it make a stream that ended early a truncated image.
    assert policy.judge(name, insp, rules.SHORT) is False


def test_a_format_match_that_raises_on_a_signed_header_is_invalid():
    policy = rules.Policy("img-7", SIGNED["vdi"], ALL_VMDK)
    with pytest.raises(exception.InvalidImageFormat) as err:
        policy.judge("vdi", _Inspector(ValueError("bad")), rules.DONE)
    assert err.value.kwargs["detected_format"] == "vdi"
    assert "but its header is invalid;" in err.value.kwargs["reason"]


@pytest.mark.parametrize("declared", (None, "", "   ", "\t\n"))
def test_a_blank_declared_format_declares_nothing(declared):
    # Glance may send an empty disk_format: the content alone decides.
    assert rules.canonical_declared("img-7", declared) is None


def test_an_unsupported_declared_format_is_named_in_the_refusal():
    with pytest.raises(exception.UnsupportedFormat) as err:
        rules.canonical_declared("img-7", "Ploop")
    assert err.value.kwargs == {
        "image_id": "img-7", "declared_format": "Ploop",
        "rule": "unsupported-format",
        "reason": "its declared format 'Ploop' cannot be inspected safely "
                  "(use one of aki, ami, ari, gpt, iso, qcow2, raw, vdi, "
                  "vhd, vhdx, vmdk, vpc); convert it to qcow2 or raw and "
                  "correct its disk format"}
