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

"""Format detection and safety policy for untrusted images.

Every byte of an image is untrusted until this module has looked at it.
:class:`StreamInspector` watches the bytes as they stream into the cache and
refuses an image as soon as the bytes seen so far prove it unsafe;
:func:`inspect_file` applies the same policy to a file already on disk.  The
parsing of each format is done by oslo.utils' format inspectors; this module
decides what the answers mean.

The policy, one rule per :class:`imagebackend.exception.UnsafeImage`
subclass:

* a qcow2 backing file, or a differencing VHD (:class:`BackingFileRefused`),
  a qcow2 external data file (:class:`DataFileRefused`);
* a VMDK whose subformat is not in ``[imagebackend] vmdk_allowed_types``, a
  VMDK descriptor without data of its own, or an extent naming a path or
  more than one extent (:class:`VMDKSubformatRefused`);
* QED, qcow version 1, declared formats that cannot be inspected
  (:class:`UnsupportedFormat`); unknown qcow2 incompatible features
  (:class:`UnsupportedFeature`);
* LUKS and encrypted qcow2 (:class:`EncryptedImageRefused`);
* content valid as more than one format (:class:`AmbiguousFormat`), except a
  hybrid ISO, whose boot record also reads as an MBR: that is ``iso``;
* content of another format than the declared one (:class:`FormatMismatch`),
  except a partition table (``gpt``) in an image declared ``raw``, which is
  raw;
* content starting with a format's signature that the inspector cannot
  parse, truncated or lying headers (:class:`InvalidImageFormat`);
* a virtual size above ``[imagebackend] max_image_virtual_size``
  (:class:`ImageTooLarge`), or above the requested disk size
  (:class:`imagebackend.exception.InvalidImageSize`).

Raw is what is left when no format matches.  An image that declares no
format and matches none is accepted as ``raw``: callers always give
qemu-img ``-f`` (:func:`qemu_format`), so qemu never probes such bytes for a
format.  A partition table whose MBR fails oslo.utils' checks is ordinary
raw data, not ``gpt``.  For ``raw``, ``gpt`` and ``iso`` the virtual size is
the byte count, which is what ``qemu-img -f raw`` presents.
"""

import dataclasses
import errno
import logging
import os
import stat

from oslo_config import cfg
from oslo_config import types
from oslo_utils import units

from imagebackend import exception
from imagebackend.inspection import rules
from imagebackend.inspection import signatures

LOG = logging.getLogger(__name__)

#: Bump whenever the policy or the inspection changes; cached bases recorded
#: with an older version are inspected again.
INSPECTION_VERSION = 1

GROUP = "imagebackend"

OPTIONS = [
    cfg.IntOpt(
        "max_image_virtual_size", default=units.Ti, min=1,
        help="The largest virtual disk size, in bytes, an image may declare "
             "in its header; larger images are refused before they are "
             "converted or used.  A hostile header can claim exabytes and "
             "make qemu-img allocate metadata for all of it.  The default "
             "is 1099511627776 (1 TiB).  The requested disk size of an "
             "instance is checked separately and must also not be smaller "
             "than the image's virtual size."),
    cfg.ListOpt(
        "vmdk_allowed_types",
        item_type=types.String(choices=rules.VMDK_SINGLE_FILE_TYPES,
                               ignore_case=True),
        default=list(rules.VMDK_SINGLE_FILE_TYPES),
        help="The VMDK subformats (createType) accepted.  Only the "
             "single-file subformats monolithicSparse and streamOptimized "
             "can be allowed: every other subformat keeps its data in other "
             "files, which qemu-img would open on this host.  The default "
             "allows both; an empty list refuses every VMDK image."),
]

# The inspectors see the stream in pieces of this size: small chunks are
# gathered first, so that neither their verdicts nor their cost depend on
# how the source chunks its bytes, and large chunks are cut, so that none of
# them copies a multi-MiB chunk into a region it then truncates.
_PIECE_BYTES = 64 * units.Ki
# The start of the stream kept for the header fields checked here.
_HEAD_BYTES = 64 * units.Ki
# The stream's last bytes, kept for inspectors that only need the end.
_TAIL_BYTES = 4 * units.Ki
_DECIDED = (rules.DONE, rules.FAILED, rules.SHORT)


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register :data:`OPTIONS` in group ``imagebackend`` (idempotent)."""
    conf.register_opts(OPTIONS, group=GROUP)


@dataclasses.dataclass
class InspectionResult:
    """What the inspection of one image found.

    :param format: the detected format (``raw``, ``qcow2``, ``vmdk``,
        ``vhd``, ``vhdx``, ``vdi``, ``iso``, ``gpt``).
    :param virtual_size: the disk size the image presents, in bytes.
    :param version: the :data:`INSPECTION_VERSION` that produced it.
    :param file_size: the number of bytes inspected.
    :param declared_format: the format the source declared, if any.
    """

    format: str
    virtual_size: int
    version: int = INSPECTION_VERSION
    file_size: int | None = None
    declared_format: str | None = None

    @property
    def current(self) -> bool:
        """Whether the current policy produced this result."""
        return self.version == INSPECTION_VERSION

    def to_dict(self) -> dict:
        """:returns: a JSON-able dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InspectionResult":
        """Read a result recorded by :meth:`to_dict`.

        A record without a version gets version 0, i.e. is not
        :attr:`current`.

        :raises ValueError: ``d`` is not such a record.
        """
        try:
            return cls(format=str(d["format"]),
                       virtual_size=int(d["virtual_size"]),
                       version=int(d.get("version") or 0),
                       file_size=(None if d.get("file_size") is None
                                  else int(d["file_size"])),
                       declared_format=d.get("declared_format"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError("not an inspection record: %r" % (d,)) from exc


def qemu_format(result_or_name: "InspectionResult | str") -> str:
    """The name qemu-img's ``-f`` takes for an inspected format.

    :param result_or_name: an :class:`InspectionResult` or a format name.
    :returns: e.g. ``vpc`` for ``vhd``, ``raw`` for ``gpt`` and ``iso``.
    :raises ValueError: the format is not one the policy accepts.
    """
    name = (result_or_name.format
            if isinstance(result_or_name, InspectionResult)
            else result_or_name)
    try:
        return signatures.QEMU_FORMATS[name]
    except KeyError:
        raise ValueError("no qemu-img format for %r" % (name,)) from None


def check_requested_size(image_id: str, result: InspectionResult,
                         requested_size: int | None) -> None:
    """Refuse a disk smaller than the image it is made from.

    :param requested_size: the disk size in bytes; ``None`` or 0 means "the
        image's own size" and always passes.
    :raises imagebackend.exception.InvalidImageSize: the image's virtual
        size is larger than ``requested_size``.
    """
    if requested_size and result.virtual_size > requested_size:
        raise exception.DiskSmallerThanImage(
            image_id=image_id, virtual_size=result.virtual_size,
            requested_size=requested_size)


class StreamInspector:
    """Inspect an image while its bytes stream past.

    Call :meth:`feed` with every chunk in order, then :meth:`finish`.  Both
    raise an :class:`imagebackend.exception.UnsafeImage` subclass as soon as
    the bytes seen prove the image unsafe; once raised, every later call
    raises the same refusal.  Only the start of the stream (and, for some
    VMDKs, its last few KiB) is kept; after the first chunks a feed costs a
    few operations, whatever the chunk size.

    :param image_id: the image, for messages.
    :param conf: options in ``[imagebackend]`` (registered if needed).
    :param declared_format: the disk format the source declares, Glance
        names accepted (``vhd``/``vpc``, ``ami``/``aki``/``ari`` are raw).
    :param requested_size: the size in bytes of the disk to be made from
        the image; see :func:`check_requested_size`.
    """

    def __init__(self, image_id: str, conf: cfg.ConfigOpts, *,
                 declared_format: str | None = None,
                 requested_size: int | None = None) -> None:
        register_opts(conf)
        self.image_id = image_id
        self._max_size = conf[GROUP].max_image_virtual_size
        self._vmdk_types = {t.lower() for t in conf[GROUP].vmdk_allowed_types}
        self._requested_size = requested_size
        self._declared_as = declared_format
        self._declared = None
        self._refusal = None
        try:
            self._declared = rules.canonical_declared(image_id,
                                                      declared_format)
        except exception.UnsafeImage as exc:
            self._refusal = exc     # raised by the first feed or finish
        self._size = 0
        self._head = b""
        self._pending = bytearray()
        self._tail = bytearray()    # the stream's end is _tail + _last
        self._last = b""
        self._tailing = False
        self._finished = False
        self._result = None
        self._probes = {name: rules.Probe(name, cls())
                        for name, cls in sorted(
                            rules.fi.ALL_FORMATS.items())
                        if name != "raw"}
        self._live = list(self._probes.values())
        self._idle = False

    @property
    def bytes_seen(self) -> int:
        """The number of stream bytes fed (or skipped) so far."""
        return self._size

    @property
    def wants_bytes(self) -> bool:
        """False once no inspector needs more than the end of the stream.

        A reader of a file may then :meth:`skip` to its last
        :attr:`tail_bytes` bytes.
        """
        return bool(self._live)

    @property
    def tail_bytes(self) -> int:
        """How many bytes of the end of the stream must still be fed."""
        return _TAIL_BYTES if self._tailing else 0

    def feed(self, chunk: bytes) -> None:
        """Inspect the next chunk of the stream.

        :param chunk: the next bytes (any bytes-like object).  It is not
            modified; a ``bytes`` chunk may be referenced until a later
            call, any other buffer is copied where needed, so a reader may
            reuse it.
        :raises imagebackend.exception.UnsafeImage: a subclass naming the
            rule the bytes seen so far break.
        """
        if self._idle:
            # Every inspector has decided: only the byte count matters.
            self._size += len(chunk)
            return
        if self._refusal is not None:
            raise self._refusal
        if self._finished:
            raise RuntimeError("feed() after finish()")
        n = len(chunk)
        self._size += n
        if self._tailing:
            if n >= _TAIL_BYTES and type(chunk) is bytes:
                # Immutable: keeping a reference costs no copy.
                self._last = chunk
                self._tail.clear()
            else:
                self._tail += self._last[-_TAIL_BYTES:]
                self._tail += chunk
                self._last = b""
                if len(self._tail) > 2 * _TAIL_BYTES:
                    del self._tail[:-_TAIL_BYTES]
        if not self._live:
            return
        if self._pending or n < _PIECE_BYTES:
            self._pending += chunk
            if len(self._pending) < _PIECE_BYTES:
                return
            chunk = bytes(self._pending)
            self._pending.clear()
        self._guarded(self._inspect, chunk)

    def skip(self, nbytes: int) -> None:
        """Account for ``nbytes`` of the stream that are not fed.

        Only allowed once :attr:`wants_bytes` is False; the last
        :attr:`tail_bytes` bytes of the stream must still be fed.
        """
        if self._live:
            raise RuntimeError("skip() while the inspectors need data")
        if nbytes > 0:
            self._size += nbytes
            self._tail.clear()
            self._last = b""

    def finish(self) -> InspectionResult:
        """Apply the whole policy after the last chunk.

        :returns: the :class:`InspectionResult`.
        :raises imagebackend.exception.UnsafeImage: a subclass naming the
            rule the image breaks.
        :raises imagebackend.exception.InvalidImageSize: the image is larger
            than ``requested_size``.
        """
        if self._refusal is not None:
            raise self._refusal
        if self._result is None:
            self._result = self._guarded(self._finish)
        return self._result

    # -- internals ---------------------------------------------------------

    def _guarded(self, func, *args):
        try:
            return func(*args)
        except (exception.UnsafeImage, exception.InvalidImageSize) as exc:
            self._refusal = exc
            self._idle = False
            LOG.warning("Image %s refused: %s", self.image_id, exc)
            raise

    def _inspect(self, data) -> None:
        """Give ``data``, the stream's last bytes, to the live inspectors."""
        if not self._head:
            self._head = bytes(data[:_HEAD_BYTES])
        start = self._size - len(data)
        changed = False
        for probe in self._live:
            changed |= probe.eat(data, start, _PIECE_BYTES, _TAIL_BYTES)
        self._live = [p for p in self._live if p.state == rules.LIVE]
        if not self._tailing and any(p.state == rules.TAIL
                                     for p in self._probes.values()):
            self._tailing = True
            self._tail[:] = data[-_TAIL_BYTES:]
            self._last = b""
        self._idle = not self._live and not self._tailing
        if changed:
            self._evaluate(False)

    def _finish(self) -> InspectionResult:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._inspect(data)
        for probe in self._probes.values():
            probe.end(bytes(self._tail) + self._last[-_TAIL_BYTES:],
                      self._size)
        self._live = []
        self._finished = True
        self._idle = False
        fmt = self._evaluate(True)
        result = InspectionResult(format=fmt,
                                  virtual_size=self._virtual_size(fmt),
                                  file_size=self._size,
                                  declared_format=self._declared_as)
        LOG.debug("Image %s: %s, virtual size %d bytes", self.image_id, fmt,
                  result.virtual_size)
        return result

    def _evaluate(self, final):
        """Apply every rule that the verdicts reached so far decide.

        :returns: the detected format, when ``final``.
        """
        policy = rules.Policy(self.image_id, self._head, self._vmdk_types)
        for probe in self._probes.values():
            if probe.state == rules.TAIL and not probe.prechecked:
                probe.prechecked = True
                policy.precheck(probe.name, probe.inspector)
            elif probe.state in _DECIDED and not probe.judged:
                probe.match = policy.judge(probe.name, probe.inspector,
                                           probe.state)
                probe.judged = True
        matches = sorted(p.name for p in self._probes.values() if p.match)
        if "iso" in matches and "gpt" in matches:
            matches.remove("gpt")     # a hybrid ISO's boot record
        if len(matches) > 1:
            raise exception.AmbiguousFormat(
                image_id=self.image_id, formats=matches,
                reason="its content is valid as each of %s at once, which "
                       "is how a crafted image hides one format inside "
                       "another; re-create it with qemu-img convert" %
                       ", ".join(matches))
        declared = self._declared
        found = matches[0] if matches else None
        if declared == "raw" and found not in (None, "gpt"):
            self._mismatch(found)
        if declared not in (None, "raw"):
            probe = self._probes[declared]
            if probe.judged and not probe.match:
                self._mismatch(found or ("raw" if final else None))
        if not final:
            if found is not None and signatures.QEMU_FORMATS[found] != "raw":
                self._virtual_size(found)   # refuse a huge header now
            return None
        if found is None or (found == "gpt" and declared == "raw"):
            return "raw"
        return found

    def _mismatch(self, found):
        raise exception.FormatMismatch(
            image_id=self.image_id, declared_format=self._declared_as,
            detected_format=found,
            reason="it is declared %s but its content is %s; correct the "
                   "image's disk format or upload the right file" % (
                       self._declared_as,
                       found or "not %s" % self._declared))

    def _virtual_size(self, fmt) -> int:
        if qemu_format(fmt) == "raw":
            vsize = self._size
        else:
            vsize = rules.virtual_size(self.image_id, fmt,
                                       self._probes[fmt].inspector,
                                       self._head)
        if vsize > self._max_size:
            raise exception.ImageTooLarge(
                image_id=self.image_id, virtual_size=vsize,
                reason="its virtual size of %d bytes exceeds [%s] "
                       "max_image_virtual_size (%d bytes); raise that "
                       "option only if the image is genuine" % (
                           vsize, GROUP, self._max_size))
        check_requested_size(self.image_id,
                             InspectionResult(format=fmt, virtual_size=vsize),
                             self._requested_size)
        return vsize


def inspect_file(path: str, image_id: str, conf: cfg.ConfigOpts, *,
                 declared_format: str | None = None,
                 requested_size: int | None = None) -> InspectionResult:
    """Apply the policy of :class:`StreamInspector` to a file on disk.

    The file is opened without following a symbolic link and must be a
    regular file.  Only the parts the inspectors need are read.

    :returns: the :class:`InspectionResult`.
    :raises imagebackend.exception.UnsafeCachePath: ``path`` is a symbolic
        link or not a regular file.
    :raises imagebackend.exception.CacheError: ``path`` cannot be read.
    :raises imagebackend.exception.UnsafeImage: as :class:`StreamInspector`.
    """
    inspector = StreamInspector(image_id, conf,
                                declared_format=declared_format,
                                requested_size=requested_size)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise exception.UnsafeCachePath(
                path=path, reason="it is a symbolic link") from exc
        raise exception.CacheError(
            path=path, reason="cannot open it: %s" % exc.strerror) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise exception.UnsafeCachePath(
                path=path, reason="it is not a regular file (mode %o)" % mode)
        with os.fdopen(fd, "rb", buffering=0) as f:
            fd = None
            _read_into(f, inspector)
    except OSError as exc:
        raise exception.CacheError(
            path=path, reason="cannot read it: %s" % exc.strerror) from exc
    finally:
        if fd is not None:
            os.close(fd)
    return inspector.finish()


def _read_into(f, inspector: StreamInspector) -> None:
    chunk_size = 4 * units.Mi
    while inspector.wants_bytes:
        chunk = f.read(chunk_size)
        if not chunk:
            return
        inspector.feed(chunk)
    end = os.fstat(f.fileno()).st_size
    pos = inspector.bytes_seen
    skip_to = max(pos, end - inspector.tail_bytes)
    if skip_to > pos:
        inspector.skip(skip_to - pos)
        f.seek(skip_to)
    while chunk := f.read(chunk_size):
        inspector.feed(chunk)
