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

"""Tests that kill mutants of imagebackend.inspection.rules that survived.

``tox -e mutation`` (doc/source/mutation.rst) found that the refusal tests
checked the exception class and rule but not what the message tells the
operator (which image, what was found, the fix), nor the attributes a
caller reads (``detected_format``), nor a few rules' edge cases.
"""

import logging
import struct
from unittest import mock

from oslo_utils.imageutils import format_inspector as fi
import pytest

from imagebackend import exception
from imagebackend.inspection import rules
from tests.unit.inspection import test_inspection as ti

# Case name of test_inspection.REFUSALS -> (detected_format kwarg, the
# reason of the message: what was found and the fix).
MESSAGES = {
    'backing': (
        'qcow2',
        'it is a qcow2 image with a backing file, which qemu-img '
        'would open on this host; upload a self-contained image '
        '(qemu-img convert -O qcow2 writes one)'),
    'backing-declared-raw': (
        'qcow2',
        'it is a qcow2 image with a backing file, which qemu-img '
        'would open on this host; upload a self-contained image '
        '(qemu-img convert -O qcow2 writes one)'),
    'data-file': (
        'qcow2',
        'it is a qcow2 image whose data is in an external data '
        'file, which qemu-img would open on this host; upload a '
        'self-contained image (qemu-img convert -O qcow2 writes '
        'one)'),
    'unknown-feature': (
        'qcow2',
        'its qcow2 header sets incompatible features that are not '
        'accepted (Unknown QCOW2 features found); convert it with '
        'qemu-img convert -O qcow2 -o compat=1.1,extended_l2=off'),
    'qcow-v1': (
        'qcow2',
        'it is a qcow image of version 1, only qcow2 versions 2 and'
        ' 3 are supported; convert it with qemu-img convert -O '
        'qcow2'),
    'qcow2-aes': (
        'qcow2',
        'it is an encrypted qcow2 image (AES encryption); upload an'
        ' unencrypted image'),
    'qcow2-luks': (
        'qcow2',
        'it is an encrypted qcow2 image (LUKS encryption); upload '
        'an unencrypted image'),
    'huge': (
        None,
        'its virtual size of 1152921504606846976 bytes exceeds '
        '[imagebackend] max_image_virtual_size (1099511627776 '
        'bytes); raise that option only if the image is genuine'),
    'truncated-qcow2': (
        'qcow2',
        'its content starts like a qcow2 image but the data ends '
        'inside its header; the image is truncated, corrupt or '
        'crafted: upload a valid copy'),
    'truncated-undeclared': (
        'qcow2',
        'its content starts like a qcow2 image but the data ends '
        'inside its header; the image is truncated, corrupt or '
        'crafted: upload a valid copy'),
    'truncated-vhd': (
        'vhd',
        'its content starts like a vhd image but the data ends '
        'inside its header; the image is truncated, corrupt or '
        'crafted: upload a valid copy'),
    'qcow2-as-raw': (
        'qcow2',
        'it is declared raw but its content is qcow2; correct the '
        "image's disk format or upload the right file"),
    'raw-as-qcow2': (
        None,
        'it is declared qcow2 but its content is not qcow2; correct'
        " the image's disk format or upload the right file"),
    'raw-as-vmdk': (
        None,
        'it is declared vmdk but its content is not vmdk; correct '
        "the image's disk format or upload the right file"),
    'iso-as-raw': (
        'iso',
        'it is declared raw but its content is iso; correct the '
        "image's disk format or upload the right file"),
    'gpt-as-iso': (
        'gpt',
        'it is declared iso but its content is gpt; correct the '
        "image's disk format or upload the right file"),
    'qcow2+gpt': (
        None,
        'its content is valid as each of gpt, qcow2 at once, which '
        'is how a crafted image hides one format inside another; '
        're-create it with qemu-img convert'),
    'qcow2+iso': (
        None,
        'its content is valid as each of iso, qcow2 at once, which '
        'is how a crafted image hides one format inside another; '
        're-create it with qemu-img convert'),
    'vmdk-flat-descriptor': (
        None,
        'it is a VMDK descriptor without data: its extents are '
        'other files, which qemu-img would open on this host; '
        'upload a single-file VMDK (monolithicSparse or '
        'streamOptimized) or convert it to qcow2'),
    'vmdk-descriptor-only': (
        None,
        'it is a VMDK descriptor without data: its extents are '
        'other files, which qemu-img would open on this host; '
        'upload a single-file VMDK (monolithicSparse or '
        'streamOptimized) or convert it to qcow2'),
    'vmdk-extent-path': (
        None,
        "its VMDK descriptor names the extent 'rw 2048 sparse "
        '"/etc/shadow"\', a path qemu-img would open on this host; '
        'upload a single-file VMDK or convert it to qcow2'),
    'vmdk-two-extents': (
        None,
        'its VMDK descriptor lists 2 extents where a single-file '
        'VMDK has one; convert it to qcow2'),
    'vmdk-flat': (
        None,
        "it is a VMDK of subformat 'monolithicflat', which "
        '[imagebackend] vmdk_allowed_types (monolithicsparse, '
        'streamoptimized) does not allow; convert it to qcow2'),
    'vmdk-bad-version': (
        'vmdk',
        'its content starts like a vmdk image but its header cannot'
        ' be parsed; the image is truncated, corrupt or crafted: '
        'upload a valid copy'),
    'vmdk-bad-footer': (
        'vmdk',
        'its VMDK footer is invalid (End-of-stream marker is '
        'invalid); the image is corrupt or crafted, re-create it'),
    'vhd-differencing': (
        'vhd',
        'it is a differencing VHD, which refers to a parent disk '
        'qemu-img would open on this host; upload a fixed or '
        'dynamic VHD, or convert it to qcow2'),
    'vhdx-bad-region': (
        'vhdx',
        'its content starts like a vhdx image but its header cannot'
        ' be parsed; the image is truncated, corrupt or crafted: '
        'upload a valid copy'),
    'qed': (
        'qed',
        'it is a QED image, which is not supported; convert it to '
        'qcow2 or raw'),
    'luks': (
        'luks',
        'it is a LUKS-encrypted image; upload an unencrypted image'),
    'declared-luks': (
        None,
        'it is declared luks; encrypted images cannot be used, '
        'upload an unencrypted image'),
    'declared-ploop': (
        None,
        "its declared format 'ploop' cannot be inspected safely "
        '(use one of aki, ami, ari, gpt, iso, qcow2, raw, vdi, vhd,'
        ' vhdx, vmdk, vpc); convert it to qcow2 or raw and correct '
        'its disk format'),
}


@pytest.fixture
def conf():
    return ti.conf.__wrapped__()


@pytest.mark.parametrize("name,data,declared,expected", ti.REFUSALS,
                         ids=[r[0] for r in ti.REFUSALS])
def test_every_refusal_names_the_image_what_was_found_and_the_fix(
        conf, name, data, declared, expected):
    fmt, reason = MESSAGES[name]
    exc, _ = ti.stream(data, conf, declared_format=declared)
    assert type(exc) is expected
    assert str(exc) == "Image img-1 was refused (%s): %s" % (
        expected.rule, reason)
    assert exc.kwargs["image_id"] == "img-1"
    assert exc.kwargs.get("detected_format") == fmt


def test_a_unreadable_virtual_size_is_an_invalid_image():
    insp = mock.Mock()
    type(insp).virtual_size = mock.PropertyMock(
        side_effect=fi.ImageFormatError("no"))
    with pytest.raises(exception.InvalidImageFormat) as info:
        rules.virtual_size("img-9", "vdi", insp, b"")
    assert info.value.kwargs["image_id"] == "img-9"
    assert info.value.kwargs["detected_format"] == "vdi"
    assert str(info.value) == (
        "Image img-9 was refused (invalid-format): its content starts like "
        "a vdi image but its virtual size cannot be read; the image is "
        "truncated, corrupt or crafted: upload a valid copy")
    assert isinstance(info.value.__cause__, fi.ImageFormatError)


@pytest.mark.parametrize("fmt,size,ok", [
    ("vdi", 0, False), ("vdi", -1, False), ("vdi", 1, True),
    ("qcow2", 0, True),
])
def test_a_zero_virtual_size_is_refused_except_for_qcow2(fmt, size, ok):
    insp = mock.Mock(virtual_size=size)
    if ok:
        assert rules.virtual_size("img-9", fmt, insp, b"") == size
        return
    with pytest.raises(exception.InvalidImageFormat,
                       match="^Image img-9 was refused .*a %s image but its "
                             "header records no virtual size;" % fmt):
        rules.virtual_size("img-9", fmt, insp, b"")


@pytest.mark.parametrize("original,current,expected", [
    (4096, 8192, 8192), (8192, 4096, 8192), (4096, 4096, 4096),
])
def test_vhd_size_is_the_larger_of_original_and_current(original, current,
                                                        expected):
    head = bytes(48) + struct.pack(">Q", current)
    insp = mock.Mock(virtual_size=original)
    assert rules.virtual_size("img-9", "vhd", insp, head) == expected


def test_an_unknown_qcow2_encryption_method_is_named_by_number():
    head = ti.qcow2(crypt=7)
    policy = rules.Policy("img-9", head, ())
    with pytest.raises(exception.EncryptedImageRefused) as info:
        policy._check_qcow2_encryption()
    assert str(info.value) == (
        "Image img-9 was refused (encrypted): it is an encrypted qcow2 "
        "image (method 7 encryption); upload an unencrypted image")
    assert info.value.kwargs["detected_format"] == "qcow2"


@pytest.mark.parametrize("check", ["inner_qcow2", "passphrase"])
def test_an_encryption_safety_failure_is_an_encryption_refusal(check):
    policy = rules.Policy("img-9", b"", ())
    exc = policy._refusal("vmdk", {check: "x", "zzz": "y"})
    assert type(exc) is exception.EncryptedImageRefused
    assert exc.kwargs == {"image_id": "img-9", "detected_format": "vmdk",
                          "reason": "it is an encrypted image; upload an "
                                    "unencrypted image",
                          "rule": "encrypted"}


def test_the_generic_refusal_lists_every_failed_check_sorted():
    policy = rules.Policy("img-9", b"", ())
    exc = policy._refusal("vdi", {"zeta": "a", "alpha": "b"})
    assert type(exc) is exception.UnsafeImage
    assert exc.kwargs["detected_format"] == "vdi"
    assert str(exc) == ("Image img-9 was refused (unsafe-image): its vdi "
                        "content fails the safety checks alpha, zeta")


def test_the_most_specific_failure_is_reported_first():
    policy = rules.Policy("img-9", b"", ())
    exc = policy._refusal("qcow2", {"version": "v", "backing_file": "b",
                                    "data_file": "d"})
    assert type(exc) is exception.BackingFileRefused


def _vmdk_insp(desc, vtype, header=True):
    insp = mock.Mock(desc_text=desc, vmdktype=vtype)
    insp.has_region.side_effect = lambda name: header and name == "header"
    return insp


@pytest.mark.parametrize("desc,vtype", [
    ("", "monolithicsparse"), (None, "monolithicsparse"),
    ('RW 1 SPARSE "a"', ""), ('RW 1 SPARSE "a"', None),
])
def test_a_vmdk_without_descriptor_or_type_is_invalid(desc, vtype):
    policy = rules.Policy("img-9", b"", ("monolithicsparse",))
    with pytest.raises(exception.InvalidImageFormat) as info:
        policy.precheck("vmdk", _vmdk_insp(desc, vtype))
    assert str(info.value) == (
        "Image img-9 was refused (invalid-format): its content starts like "
        "a vmdk image but has no readable descriptor; the image is "
        "truncated, corrupt or crafted: upload a valid copy")


def test_precheck_ignores_other_formats():
    insp = mock.Mock()
    rules.Policy("img-9", b"", ()).precheck("qcow2", insp)
    assert insp.mock_calls == []


def test_precheck_asks_for_the_header_region():
    insp = _vmdk_insp('rw 1 sparse "a.vmdk"', "monolithicsparse")
    rules.Policy("img-9", b"", ("monolithicsparse",)).precheck("vmdk", insp)
    insp.has_region.assert_called_once_with("header")


@pytest.mark.parametrize("line", [
    'RW 1 SPARSE "a/b.vmdk"', 'RDONLY 1 SPARSE "a\\b.vmdk"',
    'NOACCESS 1 SPARSE "/x"',
])
def test_every_extent_access_mode_is_checked_for_paths(line):
    policy = rules.Policy("img-9", b"", ("monolithicsparse",))
    with pytest.raises(exception.VMDKSubformatRefused) as info:
        policy.precheck("vmdk", _vmdk_insp(line.lower(), "monolithicsparse"))
    assert str(info.value).startswith(
        "Image img-9 was refused (vmdk-subformat): its VMDK descriptor "
        "names the extent '" + line.lower().split(" ")[0] + " 1 sparse")
    assert str(info.value).endswith(
        "', a path qemu-img would open on this host; upload a single-file "
        "VMDK or convert it to qcow2")
    assert line.lower().split('"')[1].replace("\\", "") in \
        str(info.value).replace("\\", "")


def test_a_long_extent_line_is_cut_in_the_message():
    line = 'rw 1 sparse "/' + "a" * 200 + '"'
    policy = rules.Policy("img-9", b"", ("monolithicsparse",))
    with pytest.raises(exception.VMDKSubformatRefused) as info:
        policy.precheck("vmdk", _vmdk_insp(line, "monolithicsparse"))
    assert repr(line[:80]) in str(info.value)
    assert repr(line[:81]) not in str(info.value)


@pytest.mark.parametrize("desc", ["", "# no extent\nddb.x = 1"])
def test_a_vmdk_without_an_extent_is_refused(desc):
    policy = rules.Policy("img-9", b"", ("monolithicsparse",))
    with pytest.raises(exception.VMDKSubformatRefused,
                       match="lists 0 extents"):
        policy.precheck("vmdk", _vmdk_insp(desc + "\n", "monolithicsparse"))


def test_an_empty_allow_list_says_empty():
    policy = rules.Policy("img-9", b"", ())
    with pytest.raises(exception.VMDKSubformatRefused) as info:
        policy.precheck("vmdk", _vmdk_insp('rw 1 sparse "a"',
                                           "monolithicsparse"))
    assert info.value.kwargs["subformat"] == "monolithicsparse"
    assert str(info.value).endswith(
        "it is a VMDK of subformat 'monolithicsparse', which [imagebackend] "
        "vmdk_allowed_types (empty) does not allow; convert it to qcow2")


@pytest.mark.parametrize("version,ok", [(1, False), (2, True), (3, True),
                                        (4, False)])
def test_only_qcow2_versions_2_and_3(version, ok):
    policy = rules.Policy("img-9", ti.qcow2(version=version), ())
    if ok:
        assert policy._check_qcow2_version() is None
        return
    with pytest.raises(exception.UnsupportedFormat) as info:
        policy._check_qcow2_version()
    assert info.value.kwargs["detected_format"] == "qcow2"
    assert "version %d," % version in str(info.value)


@pytest.mark.parametrize("disk_type,refused", [(2, False), (3, False),
                                               (4, True)])
def test_only_a_differencing_vhd_is_refused(disk_type, refused):
    policy = rules.Policy("img-9", ti.vhd(disk_type=disk_type), ())
    if not refused:
        assert policy._check_vhd() is None
        return
    with pytest.raises(exception.BackingFileRefused) as info:
        policy._check_vhd()
    assert info.value.kwargs["detected_format"] == "vhd"


def test_a_safety_check_that_crashes_is_an_invalid_image():
    insp = mock.Mock()
    insp.safety_check.side_effect = struct.error("short")
    with pytest.raises(exception.InvalidImageFormat) as info:
        rules.Policy("img-9", b"", ())._safety_check("vdi", insp)
    assert str(info.value) == (
        "Image img-9 was refused (invalid-format): its content starts like "
        "a vdi image but cannot be checked (short); the image is truncated, "
        "corrupt or crafted: upload a valid copy")
    assert isinstance(info.value.__cause__, struct.error)


def test_a_failing_inspector_is_logged_at_debug(caplog):
    probe = rules.Probe("vdi", mock.Mock())
    probe.inspector.eat_chunk.side_effect = ValueError("bad")
    with caplog.at_level(logging.DEBUG, logger=rules.LOG.name):
        assert probe.eat(b"abc", 0, 4096, 512) is True
    assert probe.state == rules.FAILED
    assert "Not vdi: ValueError('bad')" in caplog.text


def test_header_fields_are_read_unsigned():
    # A crafted header with the top bit set must be reported as the
    # unsigned number qemu reads, not a negative one.
    head = bytearray(ti.qcow2())
    struct.pack_into(">I", head, 4, 0xFFFFFFFF)
    struct.pack_into(">I", head, 32, 0x80000001)
    policy = rules.Policy("img-9", bytes(head), ())
    with pytest.raises(exception.UnsupportedFormat,
                       match="version 4294967295,"):
        policy._check_qcow2_version()
    with pytest.raises(exception.EncryptedImageRefused,
                       match=r"\(method 2147483649 encryption\)"):
        policy._check_qcow2_encryption()


def test_vhd_current_size_is_unsigned():
    head = bytes(48) + struct.pack(">Q", 1 << 63)
    insp = mock.Mock(virtual_size=4096)
    assert rules.virtual_size("img-9", "vhd", insp, head) == 1 << 63


def test_a_gpt_without_valid_partitions_is_logged_with_the_image(caplog):
    insp = mock.Mock()
    insp.safety_check.side_effect = fi.SafetyViolation("no MBR")
    with caplog.at_level(logging.DEBUG, logger=rules.LOG.name):
        assert rules.Policy("img-9", b"", ())._check("gpt", insp) is False
    assert [r.getMessage() for r in caplog.records] == [
        "Image img-9: not a partition table: no MBR"]


class _BareVmdkInspector:
    """An inspector that never parsed a descriptor: no desc_text at all."""

    def has_region(self, name):
        return name == "header"


def test_an_inspector_without_descriptor_attributes_is_invalid():
    policy = rules.Policy("img-9", b"", ("monolithicsparse",))
    with pytest.raises(exception.InvalidImageFormat,
                       match="has no readable descriptor"):
        policy.precheck("vmdk", _BareVmdkInspector())


def test_an_inspector_without_a_type_is_invalid():
    insp = _BareVmdkInspector()
    insp.desc_text = 'rw 1 sparse "a.vmdk"'
    policy = rules.Policy("img-9", b"", ("monolithicsparse",))
    with pytest.raises(exception.InvalidImageFormat,
                       match="has no readable descriptor"):
        policy.precheck("vmdk", insp)


def test_a_format_qemu_img_is_not_trusted_with_is_unsupported():
    # e.g. a format oslo.utils learns to inspect before this project
    # decides to let qemu-img open it.
    with pytest.raises(exception.UnsupportedFormat) as info:
        rules.Policy("img-9", b"", ())._check("ploop", mock.Mock())
    assert info.value.kwargs["image_id"] == "img-9"
    assert info.value.kwargs["detected_format"] == "ploop"
    assert str(info.value) == (
        "Image img-9 was refused (unsupported-format): it is a ploop image, "
        "which is not supported; convert it to qcow2 or raw")


def _tail_probe(pos, tail):
    probe = rules.Probe("vhd", mock.Mock(complete=False, context_info={}))
    probe.state = rules.TAIL
    probe.pos = pos
    probe.tail = tail
    return probe


LAST = bytes(range(256)) * 4


@pytest.mark.parametrize("pos,tail,want", [
    (100, 512, 512),     # the tail starts after what it was given
    (700, 512, 300),     # it was given part of the tail already
    (999, 512, 1),       # one byte is missing
])
def test_a_tail_probe_gets_exactly_the_end_it_lacks(pos, tail, want):
    probe = _tail_probe(pos, tail)
    probe.end(LAST, 1000)
    probe.inspector.eat_chunk.assert_called_once_with(LAST[-want:])
    assert probe.pos == 1000
    assert probe.state == rules.SHORT
    probe.inspector.finish.assert_called_once_with()


def test_a_tail_probe_that_has_everything_is_given_nothing_more():
    probe = _tail_probe(1000, 512)
    probe.end(LAST, 1000)
    probe.inspector.eat_chunk.assert_not_called()
    assert probe.pos == 1000


def test_an_inspector_failing_at_the_end_is_failed():
    probe = rules.Probe("vdi", mock.Mock(complete=False))
    probe.inspector.finish.side_effect = ValueError("short")
    probe.end(b"", 0)
    assert probe.state == rules.FAILED


def test_an_inspector_complete_at_the_end_is_done():
    probe = rules.Probe("vdi", mock.Mock(complete=True))
    probe.end(b"", 0)
    assert probe.state == rules.DONE


def test_a_failed_inspector_is_not_finished():
    probe = rules.Probe("vdi", mock.Mock(complete=True))
    probe.state = rules.FAILED
    probe.end(b"", 0)
    probe.inspector.finish.assert_not_called()
    assert probe.state == rules.FAILED


@pytest.mark.parametrize("pos,start,slice_bytes,pieces", [
    (10, 10, 4096, [b"0123456789abcdef"]),
    (11, 10, 4096, [b"123456789abcdef"]),
    (12, 10, 4096, [b"23456789abcdef"]),
    (10, 10, 6, [b"012345", b"6789ab", b"cdef"]),
    (11, 10, 15, [b"123456789abcdef"]),
])
def test_eat_gives_each_byte_once_from_where_the_probe_is(pos, start,
                                                          slice_bytes,
                                                          pieces):
    probe = rules.Probe("vdi", mock.Mock(complete=False, context_info={}))
    probe.pos = pos
    assert probe.eat(b"0123456789abcdef", start, slice_bytes, 0) is False
    assert [c.args[0] for c in probe.inspector.eat_chunk.call_args_list] \
        == pieces
    assert probe.pos == start + 16


def test_the_format_inspector_module_is_oslo_utils_one():
    # rules.fi imports oslo.utils' module when first read and hands out
    # its very objects.
    assert rules.fi.ALL_FORMATS is fi.ALL_FORMATS
    assert rules.fi.ImageFormatError is fi.ImageFormatError
    with pytest.raises(AttributeError, match="no_such_name"):
        rules.fi.no_such_name


def test_inspector_errors_is_still_readable_as_a_module_constant():
    errors = rules.INSPECTOR_ERRORS
    assert errors is rules.inspector_errors()
    assert errors == (fi.ImageFormatError, fi.SafetyViolation,
                      fi.SafetyCheckFailed, struct.error, ArithmeticError,
                      LookupError, ValueError, TypeError, AttributeError,
                      RuntimeError)


def test_an_unknown_module_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError) as err:
        rules.no_such_name
    assert str(err.value) == (
        "module 'imagebackend.inspection.rules' has no attribute "
        "'no_such_name'")
    assert not hasattr(rules, "inspector_errors_")
