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

"""The image safety policy, on images built byte by byte in memory."""

import contextlib
import json
import os
import signal
import struct
from unittest import mock
import uuid

from oslo_config import cfg
from oslo_utils.imageutils import format_inspector as fi
import pytest

from imagebackend import exception
from imagebackend import inspection

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CHUNK_SIZES = (1, 7, 511, 64 * KiB, 4 * MiB)


# --- image builders -------------------------------------------------------

def qcow2(size=GiB, version=3, backing=False, incompatible=0, crypt=0,
          pad=192 * KiB):
    header = struct.pack(">4sIQIIQIIQQII", b"QFI\xfb", version,
                         0x200 if backing else 0, 8 if backing else 0, 16,
                         size, crypt, 1, 0x30000, 0x10000, 1, 0)
    header += struct.pack(">QQQ", 0, 0, 0)
    header = header[:72] + struct.pack(">Q", incompatible) + \
        struct.pack(">QQII", 0, 0, 4, 104)
    if backing:
        header = header.ljust(0x200, b"\0") + b"/etc/hos"
    return header.ljust(pad, b"\0")


def mbr(partitions=((0xEE, 1),), boot=0):
    sector = bytearray(512)
    for i, (ostype, lba) in enumerate(partitions):
        entry = struct.pack("<B3BB3BII", boot, 0, 2, 0, ostype, 0xff, 0xff,
                            0xff, lba, 2048)
        sector[446 + 16 * i:462 + 16 * i] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def iso(blocks=64, boot_record=b""):
    data = bytearray(blocks * 2048)
    data[:len(boot_record)] = boot_record
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[80:88] = struct.pack("<I", blocks) + struct.pack(">I", blocks)
    pvd[128:132] = struct.pack("<H", 2048) + struct.pack(">H", 2048)
    data[32 * KiB:34 * KiB] = pvd
    return bytes(data)


def vmdk_descriptor(create_type="monolithicSparse",
                    extents=('RW 2048 SPARSE "disk.vmdk"',)):
    return ("# Disk DescriptorFile\nversion=1\nCID=12345678\n"
            "parentCID=ffffffff\ncreateType=\"%s\"\n\n# Extent description\n"
            "%s\n\n# The Disk Data Base\n#DDB\n\n"
            "ddb.virtualHWVersion = \"4\"\n" % (
                create_type, "\n".join(extents))).encode()


def vmdk_header(sectors=2048, version=1, gd_offset=21):
    return struct.pack("<4sIIQQQQIQQ", b"KDMV", version, 3, sectors, 128, 1,
                       20, 512, 0, gd_offset).ljust(512, b"\0")


def vmdk(create_type="monolithicSparse", sectors=2048, version=1,
         extents=('RW 2048 SPARSE "disk.vmdk"',), pad=64 * KiB):
    data = vmdk_header(sectors, version) + vmdk_descriptor(create_type,
                                                           extents)
    return data.ljust(pad, b"\0")


def vmdk_with_footer(sectors=2048, body=2 * MiB):
    """A streamOptimized VMDK whose header defers to a footer at the end."""
    head = vmdk_header(sectors, 3, gd_offset=0xFFFFFFFFFFFFFFFF)
    data = (head + vmdk_descriptor("streamOptimized")).ljust(
        0x200 + 20 * 512, b"\0").ljust(body, b"\x01")
    footer_marker = struct.pack("<QII", 0, 0, 3).ljust(512, b"\0")
    eos_marker = bytes(512)
    return data + footer_marker + vmdk_header(sectors, 3) + eos_marker


def vhd(size=4 * GiB, disk_type=3):
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    footer[40:56] = struct.pack(">QQ", size, size)
    footer[60:64] = struct.pack(">I", disk_type)
    return bytes(footer).ljust(64 * KiB, b"\0")


def vdi(size=8 * GiB):
    header = bytearray(512)
    header[0x40:0x44] = struct.pack("<I", 0xBEDA107F)
    header[0x170:0x178] = struct.pack("<Q", size)
    return bytes(header).ljust(64 * KiB, b"\0")


def _guid(text):
    return uuid.UUID(text).bytes_le


def vhdx(size=16 * GiB, region_signature=b"regi"):
    data = bytearray(384 * KiB)
    data[0:8] = b"vhdxfile"
    table = 192 * KiB
    data[table:table + 16] = region_signature + struct.pack("<III", 0, 1, 0)
    data[table + 16:table + 48] = (
        _guid(fi.VHDXInspector.METAREGION) +
        struct.pack("<QII", 256 * KiB, 64 * KiB, 1))
    meta = 256 * KiB
    data[meta:meta + 12] = b"metadata" + struct.pack("<HH", 0, 1)
    data[meta + 32:meta + 60] = (
        _guid(fi.VHDXInspector.VIRTUAL_DISK_SIZE) +
        struct.pack("<III", 64 * KiB, 8, 0))
    data[meta + 64 * KiB:meta + 64 * KiB + 8] = struct.pack("<Q", size)
    return bytes(data)


RAW = b"\x00" * (300 * KiB) + b"some data" * 1000
LUKS = b"LUKS\xba\xbe" + struct.pack(">H", 1) + bytes(64 * KiB)
QED = b"QED\x00" + bytes(64 * KiB)


# --- helpers --------------------------------------------------------------

@pytest.fixture
def conf():
    c = cfg.ConfigOpts()
    inspection.register_opts(c)
    c([])
    return c


def stream(data, conf, chunk_size=64 * KiB, **kwargs):
    """Feed ``data``; return (result or exception, bytes fed)."""
    inspector = inspection.StreamInspector("img-1", conf, **kwargs)
    fed = 0
    try:
        for offset in range(0, len(data), chunk_size):
            chunk = data[offset:offset + chunk_size]
            inspector.feed(chunk)
            fed += len(chunk)
        return inspector.finish(), fed
    except exception.ImageBackendException as exc:
        return exc, fed


def inspect_bytes(data, conf, **kwargs):
    result, _ = stream(data, conf, **kwargs)
    if isinstance(result, Exception):
        raise result
    return result


@contextlib.contextmanager
def chunk_sizes(cls, method):
    """Record the length of every chunk given to ``cls.method``."""
    sizes = []
    real = getattr(cls, method)

    def recording(self, chunk):
        sizes.append(len(chunk))
        return real(self, chunk)

    with mock.patch.object(cls, method, autospec=True,
                           side_effect=recording):
        yield sizes


# --- accepted images ------------------------------------------------------

@pytest.mark.parametrize("data,declared,fmt,vsize", [
    (qcow2(size=3 * GiB), "qcow2", "qcow2", 3 * GiB),
    (qcow2(size=GiB, version=2), None, "qcow2", GiB),
    (RAW, "raw", "raw", len(RAW)),
    (RAW, None, "raw", len(RAW)),
    (RAW, "ami", "raw", len(RAW)),
    (mbr() + bytes(MiB), "raw", "raw", MiB + 512),
    (mbr() + bytes(MiB), None, "gpt", MiB + 512),
    (iso(), "iso", "iso", 64 * 2048),
    (iso(boot_record=mbr(((0x83, 64),))), "iso", "iso", 64 * 2048),
    (vmdk(), "vmdk", "vmdk", MiB),
    (vmdk_with_footer(), "vmdk", "vmdk", MiB),
    (vhd(), "vhd", "vhd", 4 * GiB),
    (vhd(), "vpc", "vhd", 4 * GiB),
    (vdi(), "vdi", "vdi", 8 * GiB),
    (vhdx(), "vhdx", "vhdx", 16 * GiB),
    (b"", None, "raw", 0),
])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_accepted_images_whatever_the_chunk_size(conf, data, declared, fmt,
                                                 vsize, chunk_size):
    if chunk_size == 1 and len(data) > 400 * KiB:
        chunk_size = 4093
    result, _ = stream(data, conf, chunk_size, declared_format=declared)
    assert result == inspection.InspectionResult(
        format=fmt, virtual_size=vsize, version=inspection.INSPECTION_VERSION,
        file_size=len(data), declared_format=declared)


def test_gpt_with_an_invalid_mbr_is_plain_raw(conf):
    data = mbr(boot=0x12) + bytes(MiB)
    assert inspect_bytes(data, conf).format == "raw"


# --- refusals -------------------------------------------------------------

REFUSALS = [
    ("backing", qcow2(backing=True), "qcow2",
     exception.BackingFileRefused),
    ("backing-declared-raw", qcow2(backing=True), "raw",
     exception.BackingFileRefused),
    ("data-file", qcow2(incompatible=0x4), "qcow2",
     exception.DataFileRefused),
    ("unknown-feature", qcow2(incompatible=0x20), "qcow2",
     exception.UnsupportedFeature),
    ("qcow-v1", qcow2(version=1), None, exception.UnsupportedFormat),
    ("qcow2-aes", qcow2(crypt=1), "qcow2", exception.EncryptedImageRefused),
    ("qcow2-luks", qcow2(crypt=2), "qcow2",
     exception.EncryptedImageRefused),
    ("huge", qcow2(size=1 << 60), "qcow2", exception.ImageTooLarge),
    ("truncated-qcow2", qcow2()[:100], "qcow2",
     exception.InvalidImageFormat),
    ("truncated-undeclared", qcow2()[:100], None,
     exception.InvalidImageFormat),
    ("truncated-vhd", vhd()[:200], None, exception.InvalidImageFormat),
    ("qcow2-as-raw", qcow2(), "raw", exception.FormatMismatch),
    ("raw-as-qcow2", RAW, "qcow2", exception.FormatMismatch),
    ("raw-as-vmdk", RAW, "vmdk", exception.FormatMismatch),
    ("iso-as-raw", iso(), "raw", exception.FormatMismatch),
    ("gpt-as-iso", mbr() + bytes(MiB), "iso", exception.FormatMismatch),
    ("qcow2+gpt", qcow2()[:446] + mbr(((0x83, 2048),))[446:] +
     bytes(MiB), "qcow2", exception.AmbiguousFormat),
    ("qcow2+iso", qcow2()[:32 * KiB] + iso()[32 * KiB:], "qcow2",
     exception.AmbiguousFormat),
    ("vmdk-flat-descriptor", vmdk_descriptor(
        "monolithicFlat", ('RW 2048 FLAT "/etc/shadow" 0',)), "vmdk",
     exception.VMDKSubformatRefused),
    ("vmdk-descriptor-only", vmdk_descriptor(), "vmdk",
     exception.VMDKSubformatRefused),
    ("vmdk-extent-path", vmdk(extents=('RW 2048 SPARSE "/etc/shadow"',)),
     "vmdk", exception.VMDKSubformatRefused),
    ("vmdk-two-extents", vmdk(extents=('RW 2048 SPARSE "a.vmdk"',
                                       'RW 2048 SPARSE "b.vmdk"')),
     "vmdk", exception.VMDKSubformatRefused),
    ("vmdk-flat", vmdk("monolithicFlat"), "vmdk",
     exception.VMDKSubformatRefused),
    ("vmdk-bad-version", vmdk(version=9), None,
     exception.InvalidImageFormat),
    ("vmdk-bad-footer", vmdk_with_footer()[:-1] + b"\x01", "vmdk",
     exception.InvalidImageFormat),
    ("vhd-differencing", vhd(disk_type=4), "vhd",
     exception.BackingFileRefused),
    ("vhdx-bad-region", vhdx(region_signature=b"junk"), "vhdx",
     exception.InvalidImageFormat),
    ("qed", QED, None, exception.UnsupportedFormat),
    ("luks", LUKS, None, exception.EncryptedImageRefused),
    ("declared-luks", RAW, "luks", exception.EncryptedImageRefused),
    ("declared-ploop", RAW, "ploop", exception.UnsupportedFormat),
]


@pytest.mark.parametrize("name,data,declared,expected", REFUSALS,
                         ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_refusals_whatever_the_chunk_size(conf, name, data, declared,
                                          expected, chunk_size):
    if chunk_size == 1 and len(data) > 400 * KiB:
        chunk_size = 4093
    exc, _ = stream(data, conf, chunk_size, declared_format=declared)
    assert type(exc) is expected
    assert exc.rule == expected.rule
    assert "img-1" in str(exc) and expected.rule in str(exc)


@pytest.mark.parametrize("name,data,declared,expected", REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_inspect_file_applies_the_same_policy(conf, tmp_path, name, data,
                                              declared, expected):
    path = tmp_path / "image"
    path.write_bytes(data)
    with pytest.raises(expected):
        inspection.inspect_file(str(path), "img-1", conf,
                                declared_format=declared)


@pytest.mark.parametrize("data,declared,expected", [
    (qcow2(backing=True, pad=8 * MiB), "qcow2",
     exception.BackingFileRefused),
    (qcow2(incompatible=0x4, pad=8 * MiB), "qcow2",
     exception.DataFileRefused),
    (qcow2(pad=8 * MiB), "raw", exception.FormatMismatch),
    (qcow2(size=1 << 60, pad=8 * MiB), "qcow2", exception.ImageTooLarge),
    (RAW + bytes(8 * MiB), "qcow2", exception.FormatMismatch),
    (LUKS + bytes(8 * MiB), None, exception.EncryptedImageRefused),
])
@pytest.mark.parametrize("chunk_size", (1, 4 * KiB, 64 * KiB, MiB))
def test_refused_before_the_whole_image_is_fed(conf, data, declared,
                                               expected, chunk_size):
    exc, fed = stream(data, conf, chunk_size, declared_format=declared)
    assert type(exc) is expected
    assert fed < 512 * KiB


def test_huge_header_refused_early_against_the_requested_size(conf):
    exc, fed = stream(qcow2(size=20 * GiB, pad=8 * MiB), conf,
                      declared_format="qcow2", requested_size=10 * GiB)
    assert isinstance(exc, exception.InvalidImageSize)
    assert fed < 8 * MiB


def test_oslo_exceptions_are_chained_not_raised(conf):
    exc, _ = stream(qcow2(backing=True), conf, declared_format="qcow2")
    assert isinstance(exc.__cause__, fi.SafetyCheckFailed)


def test_an_unknown_oslo_safety_check_is_a_generic_refusal(conf):
    failure = fi.SafetyCheckFailed({"new_check": fi.SafetyViolation("no")})
    with mock.patch.object(fi.QcowInspector, "safety_check", autospec=True,
                           side_effect=failure):
        exc, _ = stream(qcow2(), conf, declared_format="qcow2")
    assert type(exc) is exception.UnsafeImage
    assert "new_check" in str(exc)
    assert exc.__cause__ is failure


def test_an_inspector_crashing_on_non_matching_data_is_ignored(conf):
    with mock.patch.object(fi.VHDXInspector, "post_process", autospec=True,
                           side_effect=KeyError("bug")):
        result = inspect_bytes(qcow2(), conf, declared_format="qcow2")
    assert result.format == "qcow2"


def test_a_refusal_is_raised_again_by_every_later_call(conf):
    inspector = inspection.StreamInspector("img-1", conf,
                                           declared_format="qcow2")
    with pytest.raises(exception.BackingFileRefused) as first:
        inspector.feed(qcow2(backing=True))
    with pytest.raises(exception.BackingFileRefused) as again:
        inspector.feed(bytes(4 * MiB))
    assert again.value is first.value
    with pytest.raises(exception.BackingFileRefused):
        inspector.finish()


def test_declared_format_refusal_comes_from_the_first_feed(conf):
    inspector = inspection.StreamInspector("img-1", conf,
                                           declared_format="ploop")
    with pytest.raises(exception.UnsupportedFormat, match="ploop"):
        inspector.feed(b"x")


def test_feed_after_finish_is_a_programming_error(conf):
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(RAW)
    assert inspector.finish() is inspector.finish()
    with pytest.raises(RuntimeError):
        inspector.feed(b"more")


def test_skip_is_refused_while_inspectors_need_data(conf):
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(b"x" * 100)
    assert inspector.wants_bytes
    with pytest.raises(RuntimeError):
        inspector.skip(10)


# --- options and size rules -----------------------------------------------

def test_max_image_virtual_size_option(conf):
    conf.set_override("max_image_virtual_size", 2 * GiB, "imagebackend")
    assert inspect_bytes(qcow2(size=2 * GiB), conf).virtual_size == 2 * GiB
    with pytest.raises(exception.ImageTooLarge, match="2147483648 bytes"):
        inspect_bytes(qcow2(size=2 * GiB + 1), conf)


def test_raw_images_are_limited_by_their_length(conf):
    conf.set_override("max_image_virtual_size", 512 * KiB, "imagebackend")
    assert inspect_bytes(bytes(512 * KiB), conf).virtual_size == 512 * KiB
    with pytest.raises(exception.ImageTooLarge):
        inspect_bytes(bytes(512 * KiB + 1), conf)


def test_vmdk_allowed_types_narrows_the_subformats(conf):
    conf.set_override("vmdk_allowed_types", ["monolithicSparse"],
                      "imagebackend")
    assert inspect_bytes(vmdk(), conf).format == "vmdk"
    with pytest.raises(exception.VMDKSubformatRefused,
                       match="streamoptimized"):
        inspect_bytes(vmdk("streamOptimized"), conf)
    exc, fed = stream(vmdk_with_footer(body=8 * MiB), conf)
    assert isinstance(exc, exception.VMDKSubformatRefused)
    assert fed < 8 * MiB


def test_vmdk_allowed_types_cannot_allow_multi_file_subformats(conf):
    with pytest.raises(ValueError):
        conf.set_override("vmdk_allowed_types", ["monolithicFlat"],
                          "imagebackend")


def test_empty_vmdk_allow_list_refuses_every_vmdk(conf):
    conf.set_override("vmdk_allowed_types", [], "imagebackend")
    with pytest.raises(exception.VMDKSubformatRefused):
        inspect_bytes(vmdk(), conf)


def test_options_are_listed_in_the_imagebackend_group(conf):
    assert {o.name for o in inspection.OPTIONS} == {
        "max_image_virtual_size", "vmdk_allowed_types"}
    assert conf.imagebackend.max_image_virtual_size == 1024 * GiB
    assert conf.imagebackend.vmdk_allowed_types == [
        "monolithicSparse", "streamOptimized"]
    assert all(len(o.help) > 80 for o in inspection.OPTIONS)


@pytest.mark.parametrize("requested,ok", [
    (None, True), (0, True), (GiB, True), (2 * GiB, True), (GiB - 1, False)])
def test_check_requested_size(requested, ok):
    result = inspection.InspectionResult(format="qcow2", virtual_size=GiB)
    if ok:
        inspection.check_requested_size("img-1", result, requested)
    else:
        with pytest.raises(exception.InvalidImageSize, match="img-1"):
            inspection.check_requested_size("img-1", result, requested)


def test_requested_size_is_checked_by_finish(conf):
    with pytest.raises(exception.InvalidImageSize):
        inspect_bytes(RAW, conf, requested_size=len(RAW) - 1)
    assert inspect_bytes(RAW, conf, requested_size=len(RAW)).format == "raw"


# --- results and names ----------------------------------------------------

def test_result_round_trips_through_json():
    result = inspection.InspectionResult(format="vmdk", virtual_size=GiB,
                                         file_size=123, declared_format="vmdk")
    again = inspection.InspectionResult.from_dict(
        json.loads(json.dumps(result.to_dict())))
    assert again == result
    assert again.current


def test_result_without_a_version_is_not_current():
    old = inspection.InspectionResult.from_dict({"format": "raw",
                                                 "virtual_size": 10})
    assert old.version == 0
    assert not old.current


@pytest.mark.parametrize("record", [{}, {"format": "raw"},
                                    {"format": "raw", "virtual_size": "x"}])
def test_malformed_record_is_a_value_error(record):
    with pytest.raises(ValueError):
        inspection.InspectionResult.from_dict(record)


@pytest.mark.parametrize("name,qemu", [
    ("raw", "raw"), ("gpt", "raw"), ("iso", "raw"), ("qcow2", "qcow2"),
    ("vmdk", "vmdk"), ("vhd", "vpc"), ("vhdx", "vhdx"), ("vdi", "vdi")])
def test_qemu_format(name, qemu):
    assert inspection.qemu_format(name) == qemu
    assert inspection.qemu_format(
        inspection.InspectionResult(format=name, virtual_size=1)) == qemu


def test_qemu_format_of_a_refused_format_is_an_error():
    with pytest.raises(ValueError):
        inspection.qemu_format("qed")


# --- inspect_file ---------------------------------------------------------

def test_inspect_file_refuses_a_symlink(conf, tmp_path):
    (tmp_path / "target").write_bytes(RAW)
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(exception.UnsafeCachePath, match="symbolic link"):
        inspection.inspect_file(str(tmp_path / "link"), "img-1", conf)


class _Blocked(Exception):
    """Raised by the watchdog of a test that must not block."""


def _blocked(signum, frame):
    raise _Blocked("the call blocked for 5 s")


def test_inspect_file_refuses_a_fifo_without_blocking(conf, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    # Opening a FIFO that has no writer blocks unless O_NONBLOCK is given:
    # a watchdog turns such a hang into a failure.
    previous = signal.signal(signal.SIGALRM, _blocked)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        with pytest.raises(exception.UnsafeCachePath, match="regular file"):
            inspection.inspect_file(str(tmp_path / "fifo"), "img-1", conf)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_inspect_file_refuses_a_directory(conf, tmp_path):
    with pytest.raises(exception.UnsafeCachePath, match="regular file"):
        inspection.inspect_file(str(tmp_path), "img-1", conf)


def test_inspect_file_of_a_missing_file(conf, tmp_path):
    with pytest.raises(exception.CacheError, match="No such file"):
        inspection.inspect_file(str(tmp_path / "nothing"), "img-1", conf)


@pytest.mark.parametrize("head,size,fmt", [
    (RAW, 6 * GiB, "raw"),
    (qcow2(size=50 * GiB), 3 * GiB, "qcow2"),
    (vmdk_with_footer()[:64 * KiB], None, "vmdk"),
])
def test_inspect_file_reads_only_what_the_inspectors_need(
        conf, tmp_path, head, size, fmt):
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.write(head)
        if size is None:     # a VMDK whose footer ends a sparse file
            footer = vmdk_with_footer()[-1536:]
            f.seek(5 * GiB)
            f.write(footer)
            size = f.tell()
        else:
            f.truncate(size)
    with chunk_sizes(inspection.StreamInspector, "feed") as fed:
        result = inspection.inspect_file(str(path), "img-1", conf)
    assert result.format == fmt
    assert result.file_size == size
    assert sum(fed) <= 2 * 4 * MiB


@pytest.mark.parametrize("data,fmt", [
    (vmdk_with_footer(), "vmdk"), (qcow2(size=GiB, pad=MiB), "qcow2"),
    (RAW, "raw")])
# With 8193-byte chunks the VMDK footer straddles the last two chunks.
@pytest.mark.parametrize("chunk_size", (1000, 8193, 64 * KiB, 256 * KiB))
@pytest.mark.parametrize("kind", ("bytearray", "memoryview"))
def test_a_reused_read_buffer_is_not_kept(conf, data, fmt, chunk_size, kind):
    """Chunks read into one buffer (readinto) are copied where kept."""
    inspector = inspection.StreamInspector("img-1", conf)
    buf = bytearray(chunk_size)
    for offset in range(0, len(data), chunk_size):
        n = len(data[offset:offset + chunk_size])
        buf[:n] = data[offset:offset + chunk_size]
        if kind == "bytearray":
            inspector.feed(buf if n == chunk_size else buf[:n])
        else:
            inspector.feed(memoryview(buf)[:n])
        buf[:] = b"\xff" * chunk_size      # the reader reuses it
    assert inspector.finish().format == fmt
