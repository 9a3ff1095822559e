"""An instance disk's format and backing chain, read without letting
qemu-img guess anything.

* A disk's format is the one its caller gives, or else the one its header
  declares (:func:`detect_format`): ``qcow2`` when it starts with the
  qcow2 signature, ``raw`` when it starts with no image signature at all;
  other image formats are not instance disks.
* The backing chain is read one image at a time (:func:`read_chain`) with
  ``qemu-img info`` without ``--backing-chain``, which opens no backing
  file.  Every backing file must have its format recorded, be a plain
  local file that exists and not lead back into the chain; an image with
  an external data file is refused.  A command run afterwards on the disk
  makes qemu-img open the chain with recorded formats only.

A guest writes whatever it likes into a raw disk, including a qcow2 header
naming a host file as its backing file.  Detection cannot tell such a disk
from a real qcow2 disk, so callers that know a disk's format -- the
:class:`imagebackend.backends.base.Disk` that created it records it --
should give it.
"""

import os
import re
import stat

from imagebackend import exception
from imagebackend import qemu_img

#: The formats of instance disks (what the backends make).
DISK_FORMATS = ("qcow2", "raw")
#: Formats a backing file may have: those the cache can keep a base in
#: (qemu-img's names).
BACKING_FORMATS = ("qcow2", "raw", "vdi", "vhdx", "vmdk", "vpc")
#: The deepest chain followed; deeper is a loop or a crafted image.
MAX_CHAIN = 16

# Header signatures, qemu-img's format name -> (offset, bytes).  Anything
# without one is raw: with "-f raw" qemu-img reads bytes as bytes.
_MAGIC = {
    "qcow2": (0, b"QFI\xfb"), "vmdk": (0, b"KDMV"), "vpc": (0, b"conectix"),
    "vhdx": (0, b"vhdxfile"), "vdi": (0x40, b"\x7f\x10\xda\xbe"),
    "qed": (0, b"QED\x00"), "luks": (0, b"LUKS\xba\xbe"),
}
_HEAD_BYTES = 512
# qemu takes "name:..." before any "/" as a protocol (nbd:, json:, ...).
_PROTOCOL_RE = re.compile(r"^[^/]*:")


def header_format(path: str) -> str:
    """The format the first bytes of ``path`` declare (qemu-img's name).

    :returns: ``raw`` when they declare none.
    :raises exception.DiskNotFound: ``path`` does not exist.
    :raises exception.DiskOperationError: ``path`` cannot be read, or is
        neither a regular file nor a block device.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise exception.DiskNotFound(path=path) from exc
    except OSError as exc:
        raise exception.DiskOperationError(
            path=path, reason="cannot open it: %s" % exc.strerror) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise exception.DiskOperationError(
                path=path, reason="it is not a disk image (not a regular "
                "file or a block device)")
        head = os.pread(fd, _HEAD_BYTES, 0)
    except OSError as exc:
        raise exception.DiskOperationError(
            path=path, reason="cannot read it: %s" % exc.strerror) from exc
    finally:
        os.close(fd)
    for fmt, (offset, magic) in _MAGIC.items():
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return "raw"


def detect_format(path: str) -> str:
    """The format of instance disk ``path``, from its header.

    :returns: ``qcow2`` or ``raw``.
    :raises exception.UnsupportedDiskOperation: the header is one of
        another image format.
    :raises exception.DiskNotFound: see :func:`header_format`.
    """
    found = header_format(path)
    if found not in DISK_FORMATS:
        raise exception.UnsupportedDiskOperation(
            path=path, operation="disk operations", fmt=found,
            hint="; instance disks are qcow2 or raw. If this is a raw disk "
                 "whose guest wrote that header, give its format "
                 "explicitly (fmt='raw', --input-format raw)")
    return found


def read_chain(qemu: qemu_img.QemuImg, path: str, fmt: str, *,
               follow: bool = True,
               force_share: bool = False) -> qemu_img.ImageInfo:
    """Read disk ``path`` and its backing chain, one image at a time.

    :param path: an absolute path.
    :param fmt: the disk's format.
    :param follow: read the backing files too; without it only ``path`` is
        read (its backing file need not exist).
    :param force_share: read images another process (a running guest)
        has open for writing, for a report; without it such a disk is
        refused by qemu-img, as it must be before changing it.
    :returns: the :class:`imagebackend.qemu_img.ImageInfo` of ``path``;
        its ``chain`` is the chain read, ``path`` first, each image with
        the absolute path and the format it is opened with.
    :raises exception.DiskOperationError: the chain cannot be opened
        safely; the message says why and how to fix it.
    :raises exception.QemuImgError: qemu-img failed.
    """
    chain = []
    seen = {file_id(path)}
    current, current_fmt = path, fmt
    while True:
        info = qemu.info(current, current_fmt, force_share=force_share)
        info.filename, info.format = current, current_fmt
        if info.data_file:
            raise exception.DiskOperationError(
                path=path, reason="%s keeps its data in the external file "
                "%s, which instance disks never do; it is not a disk these "
                "operations handle" % (current, info.data_file))
        chain.append(info)
        if not follow or info.backing_file is None:
            break
        if len(chain) >= MAX_CHAIN:
            raise exception.DiskOperationError(
                path=path, reason="its backing chain is deeper than %d "
                "images; flatten it with 'imagebackend disk extract'"
                % MAX_CHAIN)
        current, current_fmt = _backing(path, current, info, seen)
    for depth, info in enumerate(chain):
        info.chain = chain[depth:]
    return chain[0]


def file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _backing(path, image, info, seen):
    """The path and recorded format of the backing file of ``image``
    (described by ``info``), checked so that qemu-img opens it without
    guessing.
    """
    name = info.backing_file
    if _PROTOCOL_RE.match(name):
        raise exception.DiskOperationError(
            path=path, reason="the backing file of %s is %r, which is not a "
            "local file; refusing to let qemu-img open it" % (image, name))
    backing = os.path.join(os.path.dirname(image), name)
    what = ("its backing file %s" % backing if image == path
            else "the backing file %s of %s" % (backing, image))
    if info.backing_format is None:
        raise exception.DiskOperationError(
            path=path, reason="%s has no recorded format, which qemu-img "
            "would have to guess; record it with 'imagebackend disk rebase "
            "%s %s --unsafe'" % (what, image, backing))
    if info.backing_format not in BACKING_FORMATS:
        raise exception.DiskOperationError(
            path=path, reason="%s is recorded as %s, which cannot back a "
            "disk (use one of %s)" % (what, info.backing_format,
                                      ", ".join(BACKING_FORMATS)))
    try:
        header_format(backing)
    except exception.DiskNotFound as exc:
        raise exception.DiskOperationError(
            path=path, reason="%s does not exist; if it moved, record its "
            "new place with 'imagebackend disk rebase %s NEW_BACKING "
            "--unsafe'" % (what, image)) from exc
    key = file_id(backing)
    if key in seen:
        raise exception.DiskOperationError(
            path=path, reason="its backing chain loops: %s leads back to %s"
            % (image, backing))
    seen.add(key)
    return backing, info.backing_format
