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

"""More tests that kill mutants of imagebackend.inspection that survived.

``tox -e mutation`` (doc/source/mutation.rst) found a stream case no test
reached: a refusal that the first piece already proves while the last
inspector (VMDK) still reads a long descriptor.  The tests of a VMDK with a
footer so small that the whole image arrives in the last, short piece pin
down the case that makes the kept end's start equivalent when mutated (the
inspector then has the whole image before it waits for the end).
A VMDK subformat that the configuration forbids must be refused by the
very feed that completes a descriptor longer than one piece, even though
the VMDK inspector then goes on waiting for the footer.
"""

import struct

import pytest

from imagebackend import exception
from imagebackend import inspection
from tests.unit.inspection import test_inspection as ti

KiB = ti.KiB


@pytest.fixture
def conf():
    return ti.conf.__wrapped__()


def _vmdk_header(desc_sectors, version=1, gd_offset=21):
    # The descriptor is always at sector 1; its length is desc_sectors.
    return struct.pack("<4sIIQQQQIQQ", b"KDMV", version, 3, 2048, 128, 1,
                       desc_sectors, 512, 0, gd_offset).ljust(512, b"\0")


def _vmdk_long_descriptor():
    """A VMDK whose descriptor region ends 150 KiB into the image."""
    data = _vmdk_header(300) + ti.vmdk_descriptor()
    return data.ljust(256 * KiB, b"\0")


def test_a_mismatch_is_refused_while_the_last_inspector_still_reads(conf):
    data = _vmdk_long_descriptor()
    inspector = inspection.StreamInspector("img-1", conf,
                                           declared_format="qcow2")
    # The first piece decides every inspector but VMDK, the last one,
    # which waits for the rest of its descriptor: the qcow2 inspector's
    # "not qcow2" already contradicts the declared format.
    with pytest.raises(exception.FormatMismatch) as err:
        inspector.feed(data[:64 * KiB])
    assert err.value.kwargs == {
        "image_id": "img-1", "declared_format": "qcow2",
        "detected_format": None, "rule": "format-mismatch",
        "reason": "it is declared qcow2 but its content is not qcow2; "
                  "correct the image's disk format or upload the right "
                  "file"}
    assert inspector.bytes_seen == 64 * KiB


def test_the_long_descriptor_vmdk_is_a_vmdk(conf):
    # The image above is itself acceptable: the refusal is the declared
    # format's, not the content's.
    result = ti.inspect_bytes(_vmdk_long_descriptor(), conf)
    assert (result.format, result.virtual_size) == ("vmdk", 2048 * 512)


def _tiny_vmdk_with_footer(length):
    """A streamOptimized VMDK of ``length`` bytes, footer included."""
    head = _vmdk_header(1, 3, gd_offset=0xFFFFFFFFFFFFFFFF)
    data = (head + ti.vmdk_descriptor("streamOptimized")).ljust(
        length - 1536, b"\0")
    footer_marker = struct.pack("<QII", 0, 0, 3).ljust(512, b"\0")
    return data + footer_marker + _vmdk_header(1, 3) + bytes(512)


@pytest.mark.parametrize("length", (2560, 4096, 5000, 8192))
@pytest.mark.parametrize("chunk_size", (512, 64 * KiB))
def test_a_vmdk_shorter_than_a_piece_keeps_its_footer(conf, length,
                                                      chunk_size):
    # The whole image is the last, short piece: the inspectors see it only
    # in finish(), where the VMDK inspector turns to the footer and must
    # be given the image's last bytes however few there are.
    data = _tiny_vmdk_with_footer(length)
    assert len(data) == length
    result, fed = ti.stream(data, conf, chunk_size)
    assert fed == length
    assert (result.format, result.virtual_size, result.file_size) == (
        "vmdk", 2048 * 512, length)


def test_a_corrupt_footer_of_a_short_vmdk_is_refused(conf):
    data = bytearray(_tiny_vmdk_with_footer(5000))
    data[-1024] = ord("X")         # the footer's copy of the header
    result, _ = ti.stream(bytes(data), conf)
    assert type(result) is exception.InvalidImageFormat
    assert result.kwargs["image_id"] == "img-1"
    assert "footer" in result.kwargs["reason"]


def test_a_refused_subformat_is_refused_by_the_piece_ending_its_descriptor(
        conf):
    # A streamOptimized VMDK whose descriptor ends 150.5 KiB in, in the
    # third 64 KiB piece; only monolithicSparse is allowed.  Once that
    # piece completes the descriptor the VMDK inspector waits only for the
    # footer, and the subformat must be refused by that very feed(), not
    # by a later one or by finish().
    conf.set_override("vmdk_allowed_types", ["monolithicSparse"],
                      "imagebackend")
    data = (_vmdk_header(300, 3, gd_offset=0xFFFFFFFFFFFFFFFF)
            + ti.vmdk_descriptor("streamOptimized")).ljust(512 * KiB, b"\0")
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(data[:64 * KiB])
    inspector.feed(data[64 * KiB:128 * KiB])
    with pytest.raises(exception.VMDKSubformatRefused) as err:
        inspector.feed(data[128 * KiB:192 * KiB])
    assert err.value.kwargs["image_id"] == "img-1"
    assert "streamoptimized" in err.value.kwargs["reason"]
    assert inspector.bytes_seen == 192 * KiB
