"""Crafted images that the safety policy must refuse, and valid ones it
must accept, built with the real qemu-img and hand-written bytes.

Every builder takes a directory, writes its image (and any host file the
image tries to reach) there and returns a :class:`CorpusEntry` that says
how the policy must answer.  :func:`build_corpus` builds them all.  The
host files hold a random marker, so a test can show that no disk made from
a refused image contains it.
"""

import dataclasses
import os
import secrets
import struct

from oslo_concurrency import processutils

from imagebackend import exception

KiB = 1024
MiB = 1024 * KiB
# qcow2 header fields (big-endian).
_QCOW2_SIZE = 24
_QCOW2_INCOMPATIBLE = 72
# VMDK sparse header: the grain directory offset, and its "see the footer"
# value.
_VMDK_GD_OFFSET = 56
_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF


@dataclasses.dataclass
class CorpusEntry:
    """One image and the answer the policy must give.

    :param name: a short identifier, used as test id.
    :param path: the image file.
    :param declared_format: the disk format a source would declare.
    :param expected: the exception class the policy raises, or ``None``
        when the image is accepted.
    :param expected_format: the inspected format of an accepted image.
    :param virtual_size: the virtual size of an accepted image, in bytes.
    :param early: the refusal follows from the first bytes, so a stream is
        refused before all of it is read.
    :param canary: a host file the image makes qemu-img read, if any.
    :param marker: the bytes that fill ``canary``.
    """

    name: str
    path: str
    declared_format: str | None
    expected: type[exception.ImageBackendException] | None
    expected_format: str | None = None
    virtual_size: int | None = None
    early: bool = False
    canary: str | None = None
    marker: bytes | None = None


def qemu_img(*args: str) -> str:
    """Run the real qemu-img; returns its stdout.

    LUKS key setup times its PBKDF on the CPU clock, and on a loaded
    machine qemu-img can fail with "Unable to get accurate CPU usage":
    that run is repeated (a few times at most), anything else raised.
    """
    for attempt in range(5):
        try:
            out, _err = processutils.execute("qemu-img", *args)
            return out
        except processutils.ProcessExecutionError as exc:
            if ("accurate CPU usage" not in (exc.stderr or "")
                    or attempt == 4):
                raise
    raise AssertionError("not reached")


def canary_file(directory: str, name: str = "canary.raw",
                size: int = 8 * MiB) -> tuple[str, bytes]:
    """A host file filled with a unique marker.

    :returns: (absolute path, marker).
    """
    marker = b"CANARY-" + secrets.token_hex(16).encode() + b"\n"
    path = os.path.abspath(os.path.join(directory, name))
    _write(path, (marker * (size // len(marker) + 1))[:size])
    return path, marker


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _random_raw(directory, name="data.raw", size=8 * MiB):
    path = os.path.join(directory, name)
    _write(path, os.urandom(size))
    return path


def _qcow2_with_data(directory, name, size=8 * MiB):
    """A valid qcow2 holding random data, larger than one 4 MiB chunk."""
    raw = _random_raw(directory, name + ".src", size)
    path = os.path.join(directory, name)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)
    return path


def _blank(directory, name, fmt, size="8M", *options):
    path = os.path.join(directory, name)
    qemu_img("create", "-f", fmt, *options, path, size)
    return path


def _mbr(ostype=0xEE, lba=1, sectors=2047):
    """A boot sector with one partition entry and the 0x55aa signature."""
    entry = struct.pack("<B3BB3BII", 0, 0, 2, 0, ostype, 0xFE, 0xFF, 0xFF,
                        lba, sectors)
    return entry + bytes(48) + b"\x55\xaa"      # bytes 446..511


def _pvd(blocks):
    """An ISO 9660 primary volume descriptor (for offset 32 KiB)."""
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[80:88] = struct.pack("<I", blocks) + struct.pack(">I", blocks)
    pvd[128:132] = struct.pack("<H", 2048) + struct.pack(">H", 2048)
    return bytes(pvd)


def _vmdk_descriptor(create_type, extent):
    return ("# Disk DescriptorFile\nversion=1\nCID=fffffffe\n"
            "parentCID=ffffffff\ncreateType=\"%s\"\n\n"
            "# Extent description\n%s\n\n# The Disk Data Base\n#DDB\n\n"
            "ddb.virtualHWVersion = \"4\"\n" % (create_type, extent)).encode()


# --- refused --------------------------------------------------------------

def qcow2_backing_file(directory: str, declared: str = "qcow2",
                       name: str = "backing.qcow2") -> CorpusEntry:
    canary, marker = canary_file(directory, name + ".canary", 16 * MiB)
    # 8 MiB of data of its own (more than one chunk), and 8 MiB more that
    # read through to the backing file.
    path = _qcow2_with_data(directory, name)
    qemu_img("resize", "-f", "qcow2", path, "16M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", canary, "-F", "raw", path)
    return CorpusEntry(name, path, declared, exception.BackingFileRefused,
                       early=True, canary=canary, marker=marker)


def qcow2_backing_file_declared_raw(directory: str) -> CorpusEntry:
    entry = qcow2_backing_file(directory, "raw", "backing-as-raw.qcow2")
    entry.name = "backing-as-raw.qcow2"
    return entry


def qcow2_data_file(directory: str) -> CorpusEntry:
    name = "data-file.qcow2"
    canary = os.path.abspath(os.path.join(directory, name + ".canary"))
    path = _blank(directory, name, "qcow2", "8M", "-o",
                  "data_file=%s,data_file_raw=on" % canary)
    # qemu-img created the data file; fill it with the marker afterwards.
    _, marker = canary_file(directory, os.path.basename(canary))
    return CorpusEntry(name, path, "qcow2", exception.DataFileRefused,
                       early=True, canary=canary, marker=marker)


def vmdk_flat_descriptor(directory: str) -> CorpusEntry:
    """A text-only monolithicFlat VMDK whose extent is a host file."""
    name = "flat-descriptor.vmdk"
    canary, marker = canary_file(directory, name + ".canary", MiB)
    path = os.path.join(directory, name)
    _write(path, _vmdk_descriptor("monolithicFlat",
                                  'RW 2048 FLAT "%s" 0' % canary))
    return CorpusEntry(name, path, "vmdk", exception.VMDKSubformatRefused,
                       canary=canary, marker=marker)


def vmdk_descriptor_relative_extent(directory: str) -> CorpusEntry:
    """A text-only VMDK whose extent is a neighbour file, named without
    any slash (e.g. another base image in the same cache directory).
    """
    name = "relative-extent.vmdk"
    canary, marker = canary_file(directory, name + ".canary.raw", MiB)
    extent = os.path.join(directory, name + ".extent")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o",
             "subformat=monolithicSparse", canary, extent)
    path = os.path.join(directory, name)
    _write(path, _vmdk_descriptor(
        "twoGbMaxExtentSparse",
        'RW 2048 SPARSE "%s"' % os.path.basename(extent)))
    return CorpusEntry(name, path, "vmdk", exception.VMDKSubformatRefused,
                       canary=extent, marker=marker)


def vmdk_sparse_extent_path(directory: str) -> CorpusEntry:
    """A single-file VMDK whose embedded descriptor names a host path."""
    name = "extent-path.vmdk"
    canary, _ = canary_file(directory, name + ".canary", MiB)
    path = os.path.join(directory, name)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o",
             "subformat=monolithicSparse", _random_raw(directory, size=MiB),
             path)
    descriptor = _vmdk_descriptor("monolithicSparse",
                                  'RW 2048 SPARSE "%s"' % canary)
    _patch(path, 0x200, descriptor.ljust(20 * 512, b"\0"))
    return CorpusEntry(name, path, "vmdk", exception.VMDKSubformatRefused,
                       early=True)


def vmdk_subformat_monolithic_flat_header(directory: str) -> CorpusEntry:
    """A sparse-header VMDK that claims the monolithicFlat subformat."""
    name = "flat-header.vmdk"
    path = os.path.join(directory, name)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o",
             "subformat=monolithicSparse", _random_raw(directory, size=MiB),
             path)
    descriptor = _vmdk_descriptor("monolithicFlat", 'RW 2048 FLAT "x" 0')
    _patch(path, 0x200, descriptor.ljust(20 * 512, b"\0"))
    return CorpusEntry(name, path, "vmdk", exception.VMDKSubformatRefused,
                       early=True)


def qcow2_truncated(directory: str, declared: str | None = "qcow2"
                    ) -> CorpusEntry:
    name = "truncated-%s.qcow2" % (declared or "undeclared")
    path = _blank(directory, name, "qcow2")
    with open(path, "r+b") as f:
        f.truncate(200)
    return CorpusEntry(name, path, declared, exception.InvalidImageFormat)


def qcow2_truncated_undeclared(directory: str) -> CorpusEntry:
    return qcow2_truncated(directory, None)


def qcow2_huge(directory: str) -> CorpusEntry:
    """A qcow2 whose header claims a 1 EiB disk."""
    path = _blank(directory, "huge.qcow2", "qcow2")
    _patch(path, _QCOW2_SIZE, struct.pack(">Q", 1 << 60))
    return CorpusEntry("huge.qcow2", path, "qcow2", exception.ImageTooLarge,
                       early=True)


def qcow2_unknown_feature(directory: str) -> CorpusEntry:
    path = _blank(directory, "unknown-feature.qcow2", "qcow2")
    _patch(path, _QCOW2_INCOMPATIBLE, struct.pack(">Q", 1 << 5))
    return CorpusEntry("unknown-feature.qcow2", path, "qcow2",
                       exception.UnsupportedFeature, early=True)


def polyglot_qcow2_gpt(directory: str) -> CorpusEntry:
    """A valid qcow2 that is also a valid MBR-partitioned disk."""
    path = _qcow2_with_data(directory, "polyglot-gpt.qcow2")
    _patch(path, 446, _mbr(ostype=0x83, lba=2048, sectors=8192))
    return CorpusEntry("polyglot-gpt.qcow2", path, "qcow2",
                       exception.AmbiguousFormat, early=True)


def polyglot_qcow2_iso(directory: str) -> CorpusEntry:
    """A valid qcow2 that is also an ISO 9660 image."""
    path = _qcow2_with_data(directory, "polyglot-iso.qcow2")
    _patch(path, 32 * KiB, _pvd(4096))
    return CorpusEntry("polyglot-iso.qcow2", path, "qcow2",
                       exception.AmbiguousFormat, early=True)


def qcow2_declared_raw(directory: str) -> CorpusEntry:
    path = _qcow2_with_data(directory, "qcow2-as-raw.qcow2")
    return CorpusEntry("qcow2-as-raw.qcow2", path, "raw",
                       exception.FormatMismatch, early=True)


def raw_declared_qcow2(directory: str) -> CorpusEntry:
    path = _random_raw(directory, "raw-as-qcow2.raw")
    return CorpusEntry("raw-as-qcow2.raw", path, "qcow2",
                       exception.FormatMismatch, early=True)


def luks(directory: str) -> CorpusEntry:
    path = _blank(directory, "encrypted.luks", "luks", "8M", "--object",
                  "secret,id=sec0,data=corpus-secret", "-o",
                  "key-secret=sec0,iter-time=10")
    return CorpusEntry("encrypted.luks", path, "raw",
                       exception.EncryptedImageRefused, early=True)


def qcow2_encrypted(directory: str) -> CorpusEntry:
    path = _blank(directory, "encrypted.qcow2", "qcow2", "8M", "--object",
                  "secret,id=sec0,data=corpus-secret", "-o",
                  "encrypt.format=luks,encrypt.key-secret=sec0,"
                  "encrypt.iter-time=10")
    return CorpusEntry("encrypted.qcow2", path, "qcow2",
                       exception.EncryptedImageRefused, early=True)


def qed(directory: str) -> CorpusEntry:
    path = _blank(directory, "image.qed", "qed")
    return CorpusEntry("image.qed", path, None, exception.UnsupportedFormat,
                       early=True)


# --- accepted -------------------------------------------------------------

def valid_qcow2(directory: str) -> CorpusEntry:
    raw = _random_raw(directory, "valid.qcow2.src", 6 * MiB)
    path = os.path.join(directory, "valid.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    qemu_img("resize", "-f", "qcow2", path, "16M")
    os.unlink(raw)
    return CorpusEntry("valid.qcow2", path, "qcow2", None, "qcow2", 16 * MiB)


def valid_raw(directory: str) -> CorpusEntry:
    path = _random_raw(directory, "valid.raw", 5 * MiB + 512)
    return CorpusEntry("valid.raw", path, "raw", None, "raw", 5 * MiB + 512)


def valid_raw_undeclared(directory: str) -> CorpusEntry:
    path = _random_raw(directory, "undeclared.raw", 3 * MiB)
    return CorpusEntry("undeclared.raw", path, None, None, "raw", 3 * MiB)


def valid_raw_gpt(directory: str) -> CorpusEntry:
    """A raw disk with a protective MBR: raw, not gpt, when declared raw."""
    path = os.path.join(directory, "partitioned.raw")
    _write(path, bytes(446) + _mbr() + os.urandom(4 * MiB - 512))
    return CorpusEntry("partitioned.raw", path, "raw", None, "raw", 4 * MiB)


def valid_iso_hybrid(directory: str) -> CorpusEntry:
    """An ISO whose first sector is also an MBR, as bootable ISOs are."""
    path = os.path.join(directory, "hybrid.iso")
    size = 2 * MiB
    _write(path, bytes(446) + _mbr(ostype=0x17, lba=0, sectors=4096) +
           bytes(32 * KiB - 512) + _pvd(size // 2048) +
           bytes(size - 34 * KiB))
    return CorpusEntry("hybrid.iso", path, "iso", None, "iso", size)


def _valid_vmdk(directory, subformat):
    raw = _random_raw(directory, subformat + ".src", 3 * MiB)
    path = os.path.join(directory, subformat + ".vmdk")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o",
             "subformat=" + subformat, raw, path)
    os.unlink(raw)
    return CorpusEntry(subformat + ".vmdk", path, "vmdk", None, "vmdk",
                       3 * MiB)


def valid_vmdk_stream(directory: str) -> CorpusEntry:
    return _valid_vmdk(directory, "streamOptimized")


def valid_vmdk_sparse(directory: str) -> CorpusEntry:
    return _valid_vmdk(directory, "monolithicSparse")


def valid_vmdk_stream_footer(directory: str) -> CorpusEntry:
    """A streamOptimized VMDK whose header defers to a footer, as VMware
    writes them: only the end of the stream completes its inspection.
    """
    entry = _valid_vmdk(directory, "streamOptimized")
    path = os.path.join(directory, "footer.vmdk")
    os.rename(entry.path, path)
    with open(path, "rb") as f:
        header = f.read(512)
    _patch(path, _VMDK_GD_OFFSET, struct.pack("<Q", _VMDK_GD_AT_END))
    with open(path, "ab") as f:
        f.write(struct.pack("<QII", 0, 0, 3).ljust(512, b"\0"))  # footer
        f.write(header)
        f.write(bytes(512))                          # end-of-stream
    return dataclasses.replace(entry, name="footer.vmdk", path=path)


def valid_vhd(directory: str) -> CorpusEntry:
    path = _blank(directory, "dynamic.vhd", "vpc", "16M", "-o",
                  "force_size=on")
    return CorpusEntry("dynamic.vhd", path, "vhd", None, "vhd", 16 * MiB)


def valid_vhdx(directory: str) -> CorpusEntry:
    path = _blank(directory, "image.vhdx", "vhdx", "16M")
    return CorpusEntry("image.vhdx", path, "vhdx", None, "vhdx", 16 * MiB)


def valid_vdi(directory: str) -> CorpusEntry:
    path = _blank(directory, "image.vdi", "vdi", "16M")
    return CorpusEntry("image.vdi", path, "vdi", None, "vdi", 16 * MiB)


BUILDERS = (
    qcow2_backing_file, qcow2_backing_file_declared_raw, qcow2_data_file,
    vmdk_flat_descriptor, vmdk_descriptor_relative_extent,
    vmdk_sparse_extent_path, vmdk_subformat_monolithic_flat_header,
    qcow2_truncated, qcow2_truncated_undeclared, qcow2_huge,
    qcow2_unknown_feature, polyglot_qcow2_gpt, polyglot_qcow2_iso,
    qcow2_declared_raw, raw_declared_qcow2, luks, qcow2_encrypted, qed,
    valid_qcow2, valid_raw, valid_raw_undeclared, valid_raw_gpt,
    valid_iso_hybrid, valid_vmdk_stream, valid_vmdk_sparse,
    valid_vmdk_stream_footer, valid_vhd, valid_vhdx, valid_vdi,
)


def build_corpus(directory: str) -> list[CorpusEntry]:
    """Build every corpus image in ``directory`` (which must exist)."""
    entries = []
    for builder in BUILDERS:
        sub = os.path.join(directory, builder.__name__)
        os.mkdir(sub)
        entries.append(builder(sub))
    return entries
