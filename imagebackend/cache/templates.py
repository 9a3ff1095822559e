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

"""Overlay templates: a warm qcow2 disk is a copy, not a qemu-img run.

A new qcow2 overlay over a given base, size and creation options is the
same bytes every time.  The first disk over a base runs ``qemu-img
create`` once, into scratch in ``_base`` under the image's lock, and keeps
the result, fsynced and published without replacing anything, as a
template; later disks copy it (``copy_file_range``, a reflink where the
filesystem has them) and start no process.  The copy is byte for byte
what ``qemu-img create`` writes for the disk (same backing path and
format).  Names, which :func:`imagebackend.cache.layout.parse` never
matches::

    _base/<base>.template-<size>-<key>             a template
    _base/<base>.template-<size>-<key>.part-<hex>  scratch: one being made

``<base>`` is the base's or sized base's file name (so the generation is
in it), ``<key>`` 16 hex digits of the sha256 of the overlay format,
backing path and format, size and options.  A template ends with a
trailer (magic, length, sha256 of key and bytes).  Each copy is checked on
the copy -- trailer, digest, qcow2 header (:func:`check_overlay`) --
before the trailer is cut off; a copy that fails is never used: the
template is made again (a damaged one removed first) or, failing that,
``qemu-img create`` makes the disk.  Templates go with their base
(:func:`drop`); ``cache prune`` removes one whose base is gone.

A template that passed the check is remembered (its data blocks, a few
KiB) by the :class:`Templates` that copied it, with the identity of its
file (device, inode, size, modification and change times): as long as
the file at that name is the same file, later disks get the checked bytes
written from memory instead of a copy and a check of their own.  A
template that is replaced, removed or written to is no longer that file,
and is copied and checked again.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import stat
import struct
import typing

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import store as cache_store
from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception

LOG = logging.getLogger(__name__)

INFIX = ".template-"
#: the overlay format templates are made for.
FORMAT = "qcow2"
KEY_HEX = 16
TEMPLATE_RE = re.compile(
    r"^(?P<base>[0-9a-f]{40}(?:-(?:[2-9]|[1-9][0-9]+))?(?:_[1-9][0-9]*)?)"
    r"\.template-(?P<size>[1-9][0-9]*)-(?P<key>[0-9a-f]{%d})"
    r"(?P<scratch>\.part-[0-9a-f]{%d})?$"
    % (KEY_HEX, cache_layout.SCRATCH_TOKEN_HEX))
TRAILER_MAGIC = b"IBTMPL01"
_TRAILER = struct.Struct(">8sQ32s")
TRAILER_SIZE = _TRAILER.size
#: a template longer than this is not one the cache made (a qcow2 overlay
#: of 64 TiB with 64 KiB clusters is well under 2 MiB).
MAX_TEMPLATE_BYTES = 64 * 1024 * 1024

_QCOW2_MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
#: incompatible features a template may never have: dirty, corrupt,
#: external data file.
_REFUSED_FEATURES = 0b111
#: the unit of holes in a template.
_BLOCK = 4096
#: checked templates a :class:`Templates` remembers at most.
REMEMBERED = 64


@dataclasses.dataclass(frozen=True)
class TemplateName:
    """A template's (or its scratch's) file name, taken apart."""

    name: str
    #: the file name of the base its overlays name.
    base: str
    size: int
    key: str
    scratch: bool

    @property
    def cid(self) -> str:
        return self.base[:40]


def parse(name: str) -> TemplateName | None:
    """Take a template's file name apart; ``None`` if it is not one."""
    match = TEMPLATE_RE.match(name)
    if match is None:
        return None
    return TemplateName(name=name, base=match.group("base"),
                        size=int(match.group("size")),
                        key=match.group("key"),
                        scratch=match.group("scratch") is not None)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a template is made of: one qemu-img create's arguments."""

    backing_file: str
    backing_fmt: str
    size: int
    options: tuple = ()

    @functools.cached_property
    def description(self) -> bytes:
        """The canonical text of the key (hashed into name and digest)."""
        return json.dumps([FORMAT, self.backing_file, self.backing_fmt,
                           self.size, [list(o) for o in self.options]],
                          separators=(",", ":")).encode()

    @functools.cached_property
    def key(self) -> str:
        return hashlib.sha256(self.description).hexdigest()[:KEY_HEX]

    @property
    def cid(self) -> str:
        """The cache id of the image whose base this is."""
        return os.path.basename(self.backing_file)[:40]

    def file_name(self) -> str:
        return "%s%s%d-%s" % (os.path.basename(self.backing_file), INFIX,
                              self.size, self.key)

    def digest(self, body: bytes) -> bytes:
        return hashlib.sha256(self.description + body).digest()


def spec_for(base_dir: str, backing_file: str, backing_fmt: str, size: int,
             options: dict | None = None) -> Spec | None:
    """The template of an overlay over ``backing_file``, or ``None`` when
    that is not a base or sized base in ``base_dir`` (then there is none).
    """
    directory, name = os.path.split(backing_file)
    parsed = cache_layout.parse(name)
    if (directory != base_dir or parsed is None or parsed.suffix
            or not isinstance(size, int) or size <= 0):
        return None
    return Spec(backing_file, backing_fmt, size,
                tuple(sorted((str(k), str(v))
                             for k, v in (options or {}).items())))


def check_overlay(body: bytes, spec: Spec) -> str | None:
    """Why ``body`` is not a new, empty qcow2 overlay as ``spec``
    describes, or ``None`` when it is one: magic, version, virtual size,
    backing file and its format, and no encryption, snapshot, external
    data file, refused feature bit or allocated cluster.
    """
    if len(body) < _HEADER.size:
        return "shorter than a qcow2 header"
    (magic, version, backing_offset, backing_len, cluster_bits, size,
     crypt, l1_size, l1_offset, _rt_offset, _rt_clusters, snapshots,
     _snap_offset) = _HEADER.unpack_from(body)
    if magic != _QCOW2_MAGIC or version not in (2, 3):
        return "not a qcow2 header"
    if size != spec.size:
        return "virtual size %d, not %d" % (size, spec.size)
    backing = body[backing_offset:backing_offset + backing_len]
    if backing != os.fsencode(spec.backing_file):
        return "another backing file"
    if crypt or snapshots or not 9 <= cluster_bits <= 21:
        return "encrypted, with snapshots or an unknown cluster size"
    header_len = _HEADER.size
    if version == 3:
        if len(body) < _HEADER.size + _HEADER_V3.size:
            return "a truncated version 3 header"
        incompatible, _c, _a, _order, header_len = _HEADER_V3.unpack_from(
            body, _HEADER.size)
        if incompatible & _REFUSED_FEATURES:
            return "dirty, corrupt or with an external data file"
    found_fmt = _backing_format(body, header_len, backing_offset)
    if found_fmt != spec.backing_fmt:
        return "backing format %r, not %r" % (found_fmt, spec.backing_fmt)
    l1 = body[l1_offset:l1_offset + 8 * l1_size]
    if len(l1) != 8 * l1_size or l1.count(0) != len(l1):
        return "clusters allocated (or an L1 table outside the file)"
    return None


def _backing_format(body, offset, end):
    """The backing format header extension's value; ``None`` if there is
    none, ``"(data file)"`` if an external data file is named.
    """
    found = None
    while offset + _EXT.size <= min(end, len(body)):
        kind, length = _EXT.unpack_from(body, offset)
        if kind == 0:
            return found
        value = body[offset + _EXT.size:offset + _EXT.size + length]
        if kind == _EXT_DATA_FILE:
            return "(data file)"
        if kind == _EXT_BACKING_FORMAT:
            found = value.decode("ascii", "replace")
        offset += _EXT.size + (length + 7) // 8 * 8
    return found


def _rewrite_sparse(fd: int, body: bytes) -> None:
    """Make the open file ``fd`` hold ``body`` with every zero block a
    hole: most of an empty overlay is zeros, and a copy of a sparse
    template writes (and syncs) only its few blocks of data.
    """
    os.ftruncate(fd, 0)
    writer = sparseio.SparseWriter(fd, block=_BLOCK)
    writer.write(body)
    writer.finish()


@dataclasses.dataclass(frozen=True)
class Checked:
    """A template's bytes as its copy passed the check: its length and
    data blocks (zero blocks are holes), and what they were checked
    against.
    """

    #: :func:`identity` of the template's file when it was copied.
    identity: tuple
    #: :attr:`Spec.description` of the spec it was checked against.
    description: bytes
    #: the overlay's length (without the trailer).
    length: int
    #: ``(offset, bytes)`` of each run of data blocks.
    runs: tuple

    @classmethod
    def of(cls, st: os.stat_result, spec: Spec, body: bytes) -> "Checked":
        """The checked ``body`` of the template file ``st`` of ``spec``."""
        runs, start = [], None
        for pos in range(0, len(body) + _BLOCK, _BLOCK):
            data = pos < len(body) and not sparseio.all_zeros(
                body[pos:pos + _BLOCK])
            if data and start is None:
                start = pos
            elif not data and start is not None:
                runs.append((start, body[start:pos]))
                start = None
        return cls(identity(st), spec.description, len(body), tuple(runs))

    def write(self, fd: int) -> None:
        """Make the open, empty file ``fd`` hold the overlay (zero blocks
        as holes).

        :raises OSError: it could not be written.
        """
        os.ftruncate(fd, self.length)
        for offset, data in self.runs:
            sparseio.pwrite_all(fd, data, offset)


def identity(st: os.stat_result) -> tuple:
    """What tells one file at a name from another, or from itself
    after a write: device, inode, size, modification and change times.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def of_base(base_dir: str, base_name: str
            ) -> list[tuple[str, os.stat_result]]:
    """The templates (regular files, not scratch) of base ``base_name``
    (a file name in ``base_dir``): (path, stat) each.
    """
    found = []
    prefix = base_name + INFIX
    try:
        entries = list(os.scandir(base_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        name = (parse(entry.name) if entry.name.startswith(prefix)
                else None)
        if name is None or name.scratch or name.base != base_name:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((entry.path, st))
    return found


def drop(base_dir: str, base_name: str) -> list[tuple[str, int]]:
    """Remove the templates of base ``base_name`` (a file name in
    ``base_dir``), never their scratch; for the caller that removes or
    moves aside that base, under the image's locks.

    :returns: (path, allocated bytes) of each template removed.
    """
    removed = []
    for path, st in of_base(base_dir, base_name):
        if fileio.remove_if_same(path, st):
            LOG.info("Removed overlay template %s with its base", path)
            removed.append((path, st.st_blocks * 512))
    return removed


class Templates:
    """Makes qcow2 overlays by copying templates kept in ``_base``.

    :param store: the cache's paths and locks.
    :param qemu: the :class:`~imagebackend.qemu.img.QemuImg` that makes
        a template (and a disk when no template can serve).
    :param make_qemu: instead of ``qemu``, a function returning it,
        called when qemu-img first runs: copying a template runs none.
    """

    # ``qemu`` is not annotated: the cache's scan uses this module and
    # imports no qemu-img code.
    def __init__(self, store: cache_store.Store, qemu=None, *,
                 make_qemu: typing.Callable[[], typing.Any] | None = None
                 ) -> None:
        if (qemu is None) == (make_qemu is None):
            raise TypeError("give Templates qemu or make_qemu")
        self.store = store
        if qemu is not None:
            self.qemu = qemu
        self._make_qemu = make_qemu
        #: the templates whose copy passed the check, by path.
        self._checked: dict[str, Checked] = {}

    @functools.cached_property
    def qemu(self):
        """The QemuImg given, else the one ``make_qemu`` returns."""
        return self._make_qemu()

    def make_overlay(self, backing_file: str, backing_fmt: str,
                     target: str, size: int,
                     options: dict | None = None) -> bool:
        """Fill ``target`` (a new, empty file of the caller's) with a qcow2
        overlay of ``size`` bytes over ``backing_file``, exactly as
        ``qemu-img create -f qcow2 -o backing_file=...,backing_fmt=...
        target size`` would.

        :returns: True if it is a copy of a template (made now or
            earlier), False if qemu-img made it directly.
        :raises imagebackend.exception.QemuImgError: qemu-img failed.
        """
        spec = spec_for(self.store.base_dir, backing_file, backing_fmt,
                        size, options)
        if spec is not None:
            path = os.path.join(self.store.base_dir, spec.file_name())
            bad = self._copy(path, spec, target)
            if bad is True:
                return True
            try:
                built = self._build(path, spec, bad)
            except (OSError, exception.QemuImgError) as exc:
                # qemu-img runs again below, for the disk itself: its
                # error, if any, then names the disk.
                LOG.warning("Cannot make overlay template %s (%s); making "
                            "%s with qemu-img", path, exc, target)
                built = False
            if built and self._copy(path, spec, target) is True:
                return True
        self.qemu.create(target, FORMAT, size, backing_file=backing_file,
                         backing_fmt=backing_fmt, options=options)
        return False

    def copy_overlay(self, backing_file: str, backing_fmt: str, fd: int,
                     size: int, options: dict | None = None) -> bool:
        """Fill ``fd`` (a new, empty file of the caller's, open for reading
        and writing) with the overlay :meth:`make_overlay` makes, if a
        template of it is there and passes the check; never starts a
        process and never makes a template.

        :returns: whether ``fd`` holds the overlay (else it is empty).
        """
        spec = spec_for(self.store.base_dir, backing_file, backing_fmt,
                        size, options)
        if spec is None:
            return False
        path = os.path.join(self.store.base_dir, spec.file_name())
        return self._copy_into(path, spec, fd) is True

    def _copy(self, path, spec, target):
        """Copy template ``path`` into the file ``target`` and check the
        copy (see :meth:`_copy_into`).
        """
        fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return self._copy_into(path, spec, fd)
        finally:
            os.close(fd)

    def _copy_into(self, path, spec, fd):
        """Copy template ``path`` into the open file ``fd`` and check the
        copy.

        A template file that passed the check before, and is still the
        same file, is not copied again: its checked bytes are written.

        :returns: True when ``fd`` holds the overlay; else the stat of a
            template that failed the check (``None`` when there is no
            regular file to copy); ``fd`` is then emptied.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TEMPLATE_BYTES:
            LOG.warning("Ignoring overlay template %s: not a regular file "
                        "of at most %d bytes", path, MAX_TEMPLATE_BYTES)
            return st if stat.S_ISREG(st.st_mode) else None
        known = self._checked.get(path)
        fresh = (known is None or known.identity != identity(st)
                 or known.description != spec.description)
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        try:
            if not fresh:
                known.write(fd)
                return True
            sparseio.sparse_copy(path, fd, writeback=False)
        except OSError as exc:
            # Gone meanwhile, or unreadable: qemu-img makes the disk if it
            # cannot be made again.
            LOG.debug("Cannot copy overlay template %s: %s", path, exc)
            os.ftruncate(fd, 0)
            return None
        why = self._check_copy(fd, spec)
        if why is None:
            self._remember(path, st, spec, fd)
            return True
        os.ftruncate(fd, 0)
        LOG.warning("Overlay template %s is damaged (%s); making it again",
                    path, why)
        return st

    def _remember(self, path, st, spec, fd):
        """Keep the checked copy in ``fd`` of template ``path`` (``st``
        before the copy) for the next disks, if the file at ``path`` is
        still ``st``: the copy was made from that file.
        """
        try:
            now = os.lstat(path)
            body = os.pread(fd, os.fstat(fd).st_size, 0)
        except OSError as exc:
            LOG.debug("Not remembering overlay template %s: %s", path, exc)
            return
        if identity(now) != identity(st):
            return
        if path not in self._checked and len(self._checked) >= REMEMBERED:
            # Forget the one remembered first.
            del self._checked[next(iter(self._checked))]
        self._checked[path] = Checked.of(st, spec, body)

    @staticmethod
    def _check_copy(fd, spec):
        """Check the copied template ``fd`` and cut its trailer off.

        :returns: why it cannot be used, or ``None`` when it can.
        """
        length = os.fstat(fd).st_size - TRAILER_SIZE
        if length <= 0 or length > MAX_TEMPLATE_BYTES:
            return "too short or too long"
        magic, body_len, digest = _TRAILER.unpack(
            os.pread(fd, TRAILER_SIZE, length))
        if magic != TRAILER_MAGIC or body_len != length:
            return "no valid trailer"
        body = os.pread(fd, length, 0)
        if len(body) != length or spec.digest(body) != digest:
            return "its digest does not match"
        why = check_overlay(body, spec)
        if why is None:
            os.ftruncate(fd, length)
        return why

    def _build(self, path, spec, bad):
        """Make template ``path`` under the image's lock, unless another
        request made it meanwhile; a damaged one (``bad``, as it was
        stat'ed) is removed first.

        :returns: whether a template is there now to copy.
        :raises OSError: the template could not be written.
        """
        with self.store.lock(spec.cid, what="overlay template %s" % path):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None:
                if bad is None or not os.path.samestat(st, bad):
                    # Made meanwhile (or not ours to touch).
                    return stat.S_ISREG(st.st_mode)
                fileio.remove_if_same(path, bad)
                fileio.fsync_dir(self.store.base_dir)
            self.store.check_shared()
            tmp = cache_layout.scratch_name(path, ".part")
            try:
                self.qemu.create(tmp, FORMAT, spec.size,
                                 backing_file=spec.backing_file,
                                 backing_fmt=spec.backing_fmt,
                                 options=dict(spec.options) or None)
                return self._seal(tmp, path, spec)
            finally:
                fileio.remove_quietly(tmp)

    def _seal(self, tmp, path, spec):
        """Check the overlay qemu-img made in ``tmp``, append its trailer,
        fsync it and publish it as ``path`` without replacing anything.

        :returns: False if qemu-img made an overlay that cannot be checked
            (no template is kept).
        """
        fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            length = os.fstat(fd).st_size
            body = os.pread(fd, min(length, MAX_TEMPLATE_BYTES + 1), 0)
            why = (check_overlay(body, spec)
                   if len(body) == length <= MAX_TEMPLATE_BYTES
                   else "an unexpected length")
            if why is not None:
                LOG.warning("Not keeping a template of the overlay qemu-img "
                            "made for %s (%s)", spec.backing_file, why)
                return False
            _rewrite_sparse(fd, body)
            os.pwrite(fd, _TRAILER.pack(TRAILER_MAGIC, length,
                                        spec.digest(body)), length)
            os.fsync(fd)
            if fileio.publish_fd(fd, tmp, path):
                fileio.fsync_dir(self.store.base_dir)
                LOG.info("Made overlay template %s", path)
        finally:
            os.close(fd)
        return True
