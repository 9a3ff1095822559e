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

"""Per-format rules of the image safety policy (see imagebackend.inspection).

This module turns what one oslo.utils format inspector found into a
verdict -- "is this format", "is not", or an
:class:`imagebackend.exception.UnsafeImage` -- and knows the few header
fields the inspectors do not check.  It keeps no state of its own; the
stream bookkeeping is in :mod:`imagebackend.inspection`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import struct

from imagebackend import exception
from imagebackend.inspection import signatures

LOG = logging.getLogger(__name__)


class _FormatInspector:
    """oslo.utils' ``format_inspector`` module, imported when an image is
    first inspected: importing it imports ``oslo_utils.strutils`` (about
    0.1 s of CPU to compile its patterns) and ``cryptography``, which a
    process that inspects nothing (the command line's ``cache list``)
    need not load.
    """

    def __getattr__(self, name: str):
        module = importlib.import_module(
            "oslo_utils.imageutils.format_inspector")
        return getattr(module, name)


fi = _FormatInspector()

# States of one inspector during a stream.
LIVE = "live"        # still reading
TAIL = "tail"        # only needs the end of the stream
DONE = "done"        # has all it needs
FAILED = "failed"    # raised while parsing: the bytes are not its format
SHORT = "short"      # the stream ended before it had all it needs


@functools.cache
def inspector_errors() -> tuple[type[BaseException], ...]:
    """The inspectors parse hostile bytes: a malformed header surfaces as
    any of these, and must mean "does not parse", never abort the
    download.
    """
    return (fi.ImageFormatError, fi.SafetyViolation, fi.SafetyCheckFailed,
            struct.error, ArithmeticError, LookupError, ValueError,
            TypeError, AttributeError, RuntimeError)


def __getattr__(name: str):
    if name == "INSPECTOR_ERRORS":
        return inspector_errors()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


#: The VMDK subformats whose data is inside the file itself.
VMDK_SINGLE_FILE_TYPES = ("monolithicSparse", "streamOptimized")

_QCOW2_CRYPT = {1: "AES", 2: "LUKS"}
_VHD_DIFFERENCING = 4
_VMDK_EXTENT_ACCESS = ("rw", "rdonly", "noaccess")

_FLATTEN = ("upload a self-contained image (qemu-img convert -O qcow2 "
            "writes one)")
# oslo.utils safety check name -> (our exception, reason), most specific
# first: when several checks fail, the first listed one is reported.
_FAILURES = (
    ("backing_file", exception.BackingFileRefused,
     "it is a qcow2 image with a backing file, which qemu-img would open on "
     "this host; " + _FLATTEN),
    ("data_file", exception.DataFileRefused,
     "it is a qcow2 image whose data is in an external data file, which "
     "qemu-img would open on this host; " + _FLATTEN),
    ("unknown_features", exception.UnsupportedFeature,
     "its qcow2 header sets incompatible features that are not accepted "
     "(%s); convert it with qemu-img convert -O qcow2 -o "
     "compat=1.1,extended_l2=off"),
    ("descriptor", exception.VMDKSubformatRefused,
     "its VMDK descriptor is refused (%s); convert it to a single-file "
     "monolithicSparse or streamOptimized VMDK, or to qcow2"),
    ("footer", exception.InvalidImageFormat,
     "its VMDK footer is invalid (%s); the image is corrupt or crafted, "
     "re-create it"),
    ("version", exception.EncryptedImageRefused,
     "it is a LUKS-encrypted image (%s); upload an unencrypted image"),
)


def canonical_declared(image_id: str, declared: str | None) -> str | None:
    """Map a declared disk format to the inspected format it must match.

    :raises imagebackend.exception.UnsafeImage: the declared format is one
        that is refused or cannot be inspected.
    """
    if declared is None or not str(declared).strip():
        return None
    name = str(declared).strip().lower()
    if name in signatures.DECLARED_FORMATS:
        return signatures.DECLARED_FORMATS[name]
    if name == "luks":
        raise exception.EncryptedImageRefused(
            image_id=image_id,
            reason="it is declared luks; encrypted images cannot be used, "
                   "upload an unencrypted image")
    raise exception.UnsupportedFormat(
        image_id=image_id, declared_format=declared,
        reason="its declared format %r cannot be inspected safely (use one "
               "of %s); convert it to qcow2 or raw and correct its disk "
               "format" % (declared,
                           ", ".join(sorted(signatures.DECLARED_FORMATS))))


class Probe:
    """One oslo.utils inspector, fed its part of a stream.

    :param name: the format name (a key of ``ALL_FORMATS``).
    :param inspector: a new inspector of that format.
    """

    __slots__ = ("name", "inspector", "state", "pos", "tail", "match",
                 "judged", "prechecked")

    def __init__(self, name: str, inspector: fi.FileInspector) -> None:
        self.name = name
        self.inspector = inspector
        self.state = LIVE
        self.pos = 0          # stream bytes given to (or skipped by) it
        self.tail = 0         # bytes of the end it still needs, in TAIL
        self.match = None     # the verdict, once judged
        self.judged = False
        self.prechecked = False

    def eat(self, data, start: int, slice_bytes: int,
            max_tail: int) -> bool:
        """Give the inspector the part of ``data`` it needs.

        ``data`` holds the stream bytes from offset ``start``; it is given
        in pieces of at most ``slice_bytes``, so that no inspector copies a
        large chunk into a region it then truncates.  An inspector that
        only needs the last ``max_tail`` bytes or fewer is put in TAIL.

        :returns: whether the state changed.
        """
        insp = self.inspector
        offset = self.pos - start
        try:
            while offset < len(data):
                if offset == 0 and len(data) <= slice_bytes:
                    piece = data
                else:
                    piece = data[offset:offset + slice_bytes]
                insp.eat_chunk(piece)
                offset += len(piece)
                self.pos = start + offset
                if insp.complete:
                    self.state = DONE
                    return True
                self.tail = self._tail_needed()
                if 0 < self.tail <= max_tail:
                    self.state = TAIL
                    return True
        except inspector_errors() as exc:
            LOG.debug("Not %s: %r", self.name, exc)
            self.state = FAILED
            return True
        return False

    def end(self, last_bytes: bytes, size: int) -> None:
        """The stream ended at ``size``; ``last_bytes`` are its last bytes.

        Gives a TAIL inspector the end it waits for, then tells the
        inspector the stream is over.
        """
        if self.state == TAIL:
            want = size - max(self.pos, size - self.tail)
            if want > 0:
                self.pos = size - want    # what lies before is skipped
                self.eat(last_bytes[-want:], self.pos, want, self.tail)
        if self.state in (LIVE, TAIL):
            self.state = SHORT
        if self.state != FAILED:
            try:
                self.inspector.finish()
                if self.inspector.complete:
                    self.state = DONE
            except inspector_errors():
                self.state = FAILED

    def _tail_needed(self):
        insp = self.inspector
        pending = [insp.region(name) for name in insp.context_info
                   if not insp.region(name).complete]
        if pending and all(isinstance(r, fi.EndCaptureRegion)
                           for r in pending):
            return max(r.length for r in pending)
        return 0


def virtual_size(image_id: str, fmt: str, insp: fi.FileInspector,
                 head: bytes) -> int:
    """The virtual size of an accepted non-raw image.

    :raises imagebackend.exception.InvalidImageFormat: the header records
        no usable size.
    """
    try:
        vsize = int(insp.virtual_size)
    except inspector_errors() as exc:
        raise _invalid(image_id, fmt, "its virtual size cannot be read") \
            from exc
    if fmt == "vhd":
        # The footer has an original and a current size; qemu uses the
        # current one, the inspector reads the original.
        vsize = max(vsize, struct.unpack_from(">Q", head, 48)[0])
    if vsize <= 0 and fmt != "qcow2":
        raise _invalid(image_id, fmt, "its header records no virtual size")
    return vsize


def _invalid(image_id, fmt, what):
    return exception.InvalidImageFormat(
        image_id=image_id, detected_format=fmt,
        reason="its content starts like a %s image but %s; the image is "
               "truncated, corrupt or crafted: upload a valid copy" % (
                   fmt, what))


def _safe_match(insp):
    try:
        return bool(insp.format_match)
    except inspector_errors():
        return False


class Policy:
    """Judge inspectors' findings for one image.

    :param image_id: the image, for messages.
    :param head: the first bytes of the stream (at least the headers).
    :param vmdk_types: allowed VMDK createTypes, lower case.
    """

    def __init__(self, image_id: str, head: bytes, vmdk_types) -> None:
        self.image_id = image_id
        self.head = head
        self.vmdk_types = vmdk_types

    def _has_magic(self, name):
        # Content that carries a format's signature but does not parse as
        # that format is refused rather than taken for raw.
        known = signatures.FORMATS.get(name)
        return known is not None and known.signed(self.head)

    def judge(self, name: str, insp: fi.FileInspector, state: str) -> bool:
        """Decide whether the content is format ``name``.

        :returns: True if it is, and every rule for the format passes.
        :raises imagebackend.exception.UnsafeImage: it is, and a rule
            refuses it; or it carries the format's signature but does not
            parse.
        """
        if state == FAILED:
            if self._has_magic(name):
                raise _invalid(self.image_id, name,
                               "its header cannot be parsed")
            return False
        match = _safe_match(insp)
        if state == SHORT:
            if match or self._has_magic(name):
                raise _invalid(self.image_id, name,
                               "the data ends inside its header")
            return False
        if not match:
            if self._has_magic(name):
                raise _invalid(self.image_id, name, "its header is invalid")
            return False
        return self._check(name, insp)

    def _check(self, name, insp):
        if name == "gpt":
            # Without a valid MBR this is just raw data ending a sector in
            # 0x55aa; qemu-img reads it as raw either way.
            try:
                insp.safety_check()
            except inspector_errors() as exc:
                LOG.debug("Image %s: not a partition table: %s",
                          self.image_id, exc)
                return False
            return True
        if name == "qed":
            raise exception.UnsupportedFormat(
                image_id=self.image_id, detected_format=name,
                reason="it is a QED image, which is not supported; convert "
                       "it to qcow2 or raw")
        if name == "luks":
            raise exception.EncryptedImageRefused(
                image_id=self.image_id, detected_format=name,
                reason="it is a LUKS-encrypted image; upload an unencrypted "
                       "image")
        if name not in signatures.QEMU_FORMATS:
            raise exception.UnsupportedFormat(
                image_id=self.image_id, detected_format=name,
                reason="it is a %s image, which is not supported; convert "
                       "it to qcow2 or raw" % name)
        if name == "qcow2":
            self._check_qcow2_version()
        elif name == "vmdk":
            self.precheck(name, insp)
        elif name == "vhd":
            self._check_vhd()
        self._safety_check(name, insp)
        if name == "qcow2":
            self._check_qcow2_encryption()
        return True

    def precheck(self, name: str, insp: fi.FileInspector) -> None:
        """Rules that need only the start of an image not yet complete.

        :raises imagebackend.exception.UnsafeImage: a rule refuses it.
        """
        if name != "vmdk":
            return
        if not insp.has_region("header"):
            raise exception.VMDKSubformatRefused(
                image_id=self.image_id,
                reason="it is a VMDK descriptor without data: its extents "
                       "are other files, which qemu-img would open on this "
                       "host; upload a single-file VMDK (monolithicSparse "
                       "or streamOptimized) or convert it to qcow2")
        desc = getattr(insp, "desc_text", None)
        vtype = getattr(insp, "vmdktype", None)
        if not desc or not vtype:
            raise _invalid(self.image_id, name, "has no readable descriptor")
        if vtype not in self.vmdk_types:
            raise exception.VMDKSubformatRefused(
                image_id=self.image_id, subformat=vtype,
                reason="it is a VMDK of subformat %r, which [imagebackend] "
                       "vmdk_allowed_types (%s) does not allow; convert it "
                       "to qcow2" % (vtype, ", ".join(
                           sorted(self.vmdk_types)) or "empty"))
        extents = [line for line in (x.strip() for x in desc.splitlines())
                   if line.split(" ")[0] in _VMDK_EXTENT_ACCESS]
        for line in extents:
            if "/" in line or "\\" in line:
                raise exception.VMDKSubformatRefused(
                    image_id=self.image_id,
                    reason="its VMDK descriptor names the extent %r, a path "
                           "qemu-img would open on this host; upload a "
                           "single-file VMDK or convert it to qcow2" %
                           line[:80])
        if len(extents) != 1:
            raise exception.VMDKSubformatRefused(
                image_id=self.image_id,
                reason="its VMDK descriptor lists %d extents where a "
                       "single-file VMDK has one; convert it to qcow2" %
                       len(extents))

    def _safety_check(self, name, insp):
        try:
            insp.safety_check()
        except fi.SafetyCheckFailed as exc:
            raise self._refusal(name, exc.failures) from exc
        except inspector_errors() as exc:
            raise _invalid(self.image_id, name,
                           "cannot be checked (%s)" % exc) from exc

    def _refusal(self, name, failures):
        for check, cls, reason in _FAILURES:
            if check in failures:
                if "%s" in reason:
                    reason = reason % failures[check]
                return cls(image_id=self.image_id, detected_format=name,
                           reason=reason)
        if any(check.startswith("inner_") or check == "passphrase"
               for check in failures):
            return exception.EncryptedImageRefused(
                image_id=self.image_id, detected_format=name,
                reason="it is an encrypted image; upload an unencrypted "
                       "image")
        return exception.UnsafeImage(
            image_id=self.image_id, detected_format=name,
            reason="its %s content fails the safety checks %s" % (
                name, ", ".join(sorted(failures))))

    def _check_qcow2_version(self):
        version = struct.unpack_from(">I", self.head, 4)[0]
        if version not in (2, 3):
            raise exception.UnsupportedFormat(
                image_id=self.image_id, detected_format="qcow2",
                reason="it is a qcow image of version %d, only qcow2 "
                       "versions 2 and 3 are supported; convert it with "
                       "qemu-img convert -O qcow2" % version)

    def _check_qcow2_encryption(self):
        method = struct.unpack_from(">I", self.head, 32)[0]
        if method:
            raise exception.EncryptedImageRefused(
                image_id=self.image_id, detected_format="qcow2",
                reason="it is an encrypted qcow2 image (%s encryption); "
                       "upload an unencrypted image" %
                       _QCOW2_CRYPT.get(method, "method %d" % method))

    def _check_vhd(self):
        if struct.unpack_from(">I", self.head, 60)[0] == _VHD_DIFFERENCING:
            raise exception.BackingFileRefused(
                image_id=self.image_id, detected_format="vhd",
                reason="it is a differencing VHD, which refers to a parent "
                       "disk qemu-img would open on this host; upload a "
                       "fixed or dynamic VHD, or convert it to qcow2")
