"""Operations on existing instance disks: info, check, snapshots, rebase,
extract and resize.

:class:`DiskOperations` works on the qcow2 and raw files the backends
make.  Before any qemu-img command touches a disk, its format and backing
chain are read as :mod:`imagebackend.disk_chain` describes, so qemu-img
never guesses a format; a caller that knows the disk's format should give
it (``fmt``).
"""

import dataclasses
import logging
import os
import re
import secrets
import threading
import typing

from oslo_config import cfg

from imagebackend import disk_chain
from imagebackend import exception
from imagebackend import fileutils
from imagebackend import qemu_img

LOG = logging.getLogger(__name__)

#: Formats :meth:`DiskOperations.extract` writes.
EXTRACT_FORMATS = ("qcow2", "raw")

ProgressCallback = typing.Callable[[str, int, int | None], None]

_DIGITS_RE = re.compile(r"^[0-9]+$")


class DiskOperations:
    """Inspect and change existing instance disks through qemu-img.

    Every method takes the disk's path and, as ``fmt``, its format
    (``qcow2`` or ``raw``) when the caller knows it; ``None`` reads it
    from the disk's header (:mod:`imagebackend.disk_chain` says why a
    known format is better).  Errors name the disk and the fix; whatever
    can be checked beforehand is checked before qemu-img changes anything.

    :param conf: a ConfigOpts with the ``[qemu_img]`` options (they are
        registered on it); ``None`` uses the defaults.
    :param qemu: the qemu-img runner; ``None`` makes one from ``conf``.
    """

    def __init__(self, conf: cfg.ConfigOpts | None = None,
                 qemu: qemu_img.QemuImg | None = None) -> None:
        self.qemu = qemu or qemu_img.QemuImg(conf)

    # -- reading -------------------------------------------------------------

    def detect_format(self, path: str) -> str:
        """The format of disk ``path``, from its header; see
        :func:`imagebackend.disk_chain.detect_format`.
        """
        return disk_chain.detect_format(os.path.abspath(path))

    def info(self, path: str, *, fmt: str | None = None
             ) -> qemu_img.ImageInfo:
        """What disk ``path`` is: format, virtual size, backing chain and
        snapshots.  It may be in use by a running guest.

        :returns: a :class:`imagebackend.qemu_img.ImageInfo` whose
            ``chain`` is the whole backing chain, this disk first, each
            image with the format it is opened with.
        :raises exception.DiskOperationError: the disk or its chain is
            unusable (the message says why and how to fix it).
        :raises exception.QemuImgError: qemu-img failed.
        """
        path, fmt = self._open(path, fmt, "info")
        return self._chain(path, fmt, force_share=True)

    def check(self, path: str, repair: str | None = None, *,
              fmt: str | None = None) -> qemu_img.CheckResult:
        """Check the consistency of disk ``path``, and with ``repair`` fix
        it.  The disk must not be in use by a running guest.

        :param repair: ``None`` (only check), ``"leaks"`` (free leaked
            clusters: safe) or ``"all"`` (also fix corruptions, which may
            lose the data of the clusters concerned).
        :returns: a :class:`imagebackend.qemu_img.CheckResult`; for a raw
            disk its ``supported`` is False.  Corruptions and leaks are
            results, not exceptions.
        :raises exception.InvalidDiskRequest: a bad ``repair`` value.
        """
        if repair not in (None, "leaks", "all"):
            raise exception.InvalidDiskRequest(
                path=path, reason="repair must be 'leaks' or 'all', not %r"
                % (repair,))
        path, fmt = self._open(path, fmt, "check")
        self._chain(path, fmt)
        result = self.qemu.check(path, fmt, repair)
        if repair:
            LOG.info("Checked disk %s with repair=%s: %d leak(s) and %d "
                     "corruption(s) fixed, %d and %d remain", path, repair,
                     result.leaks_fixed, result.corruptions_fixed,
                     result.leaks, result.corruptions)
        return result

    # -- snapshots -----------------------------------------------------------

    def snapshot_list(self, path: str, *, fmt: str | None = None
                      ) -> list[qemu_img.Snapshot]:
        """The internal snapshots of qcow2 disk ``path``, oldest first.
        It may be in use by a running guest.

        :raises exception.UnsupportedDiskOperation: a raw disk.
        """
        path, fmt = self._open(path, fmt, "snapshot list", qcow2=True)
        return self._chain(path, fmt, force_share=True).snapshots

    def snapshot_create(self, path: str, name: str, *,
                        fmt: str | None = None) -> qemu_img.Snapshot:
        """Save the current content of qcow2 disk ``path`` as snapshot
        ``name``.  The disk must not be in use by a running guest.

        :returns: the new :class:`imagebackend.qemu_img.Snapshot`.
        :raises exception.UnsupportedDiskOperation: a raw disk.
        :raises exception.InvalidDiskRequest: the disk already has a
            snapshot of that name, or the name is empty or all digits
            (qemu-img would take it for a snapshot id).
        """
        path, fmt = self._open(path, fmt, "snapshot create", qcow2=True)
        if not name or _DIGITS_RE.match(name):
            raise exception.InvalidDiskRequest(
                path=path, reason="%r cannot name a snapshot: give a name "
                "with at least one character that is not a digit (digits "
                "alone are taken for a snapshot id)" % (name,))
        before = self._chain(path, fmt).snapshots
        if any(snap.name == name for snap in before):
            raise exception.InvalidDiskRequest(
                path=path, reason="it already has a snapshot named %r; "
                "choose another name or delete that snapshot first" % name)
        self.qemu.snapshot_create(path, fmt, name)
        LOG.info("Created snapshot %s of disk %s", name, path)
        old = {snap.id for snap in before}
        new = [snap for snap in self.qemu.snapshot_list(path, fmt)
               if snap.name == name and snap.id not in old]
        if len(new) != 1:
            raise exception.DiskOperationError(
                path=path, reason="qemu-img reported success but snapshot "
                "%r is not listed; check the disk with 'imagebackend disk "
                "snapshot list'" % name)
        return new[0]

    def snapshot_apply(self, path: str, name: str, *,
                       fmt: str | None = None) -> qemu_img.Snapshot:
        """Revert qcow2 disk ``path`` to snapshot ``name`` (a name, or an
        id).  What was written since is lost.  The disk must not be in use
        by a running guest.

        :returns: the snapshot applied.
        :raises exception.SnapshotNotFound: no such snapshot.
        """
        path, fmt = self._open(path, fmt, "snapshot apply", qcow2=True)
        snap, ref = self._find_snapshot(path, fmt, name, by_id=True)
        self.qemu.snapshot_apply(path, fmt, ref)
        LOG.info("Reverted disk %s to snapshot %s", path, snap.name)
        return snap

    def snapshot_delete(self, path: str, name: str, *,
                        fmt: str | None = None) -> qemu_img.Snapshot:
        """Delete snapshot ``name`` (a name, or an id) of qcow2 disk
        ``path``; the disk's current content is unchanged.

        :returns: the snapshot deleted.
        :raises exception.SnapshotNotFound: no such snapshot.
        """
        path, fmt = self._open(path, fmt, "snapshot delete", qcow2=True)
        # qemu-img deletes by name only.
        snap, ref = self._find_snapshot(path, fmt, name, by_id=False)
        self.qemu.snapshot_delete(path, fmt, ref)
        LOG.info("Deleted snapshot %s of disk %s", snap.name, path)
        return snap

    def _find_snapshot(self, path, fmt, name, by_id):
        """The snapshot ``name`` means, and the string that names it to
        qemu-img without ambiguity.

        ``name`` is a snapshot's name, or else its id.  qemu-img looks a
        string up as an id or a name, depending on the command and the
        version, so the string passed must not be another snapshot's
        name or id.
        """
        snaps = self._chain(path, fmt).snapshots
        found = ([s for s in snaps if s.name == name]
                 or [s for s in snaps if s.id == name])
        if not found:
            raise exception.SnapshotNotFound(
                path=path, name=name,
                names=", ".join(s.name for s in snaps) or "none")
        if len(found) > 1:
            raise exception.InvalidDiskRequest(
                path=path, reason="%d snapshots are named %r (ids %s), and "
                "qemu-img cannot be told which one is meant" % (
                    len(found), name, ", ".join(s.id for s in found)))
        snap = found[0]
        others = [s for s in snaps if s.id != snap.id]
        if not any(snap.name in (s.name, s.id) for s in others):
            return snap, snap.name
        if by_id and not any(s.name == snap.id for s in others):
            return snap, snap.id
        raise exception.InvalidDiskRequest(
            path=path, reason="snapshot %s (id %s) has a name that is also "
            "another snapshot's name or id, so qemu-img cannot be told "
            "which one is meant; delete the other one first" % (
                snap.name, snap.id))

    # -- changing the chain --------------------------------------------------

    def rebase(self, path: str, new_backing: str, *, unsafe: bool = False,
               progress: ProgressCallback | None = None,
               cancel: threading.Event | None = None,
               fmt: str | None = None) -> qemu_img.ImageInfo:
        """Make ``new_backing`` the backing file of qcow2 disk ``path``.

        The new backing file's format is read from its header and recorded
        explicitly; its path is recorded absolute.

        :param unsafe: only rewrite the reference, copying no data: for a
            backing file that moved or was renamed (the old one need not
            exist).  Without it, qemu-img keeps the guest-visible content
            by copying into the disk whatever differs between the old and
            the new backing file, so both must be readable.
        :param progress: called as ``progress("rebase", done, total)``
            with bytes of the virtual size, while data is compared and
            copied.
        :param cancel: set it from another thread to stop; the disk then
            keeps its old backing file and its content.
        :returns: the disk's :meth:`info` afterwards.
        :raises exception.OperationCancelled: ``cancel`` was set.
        :raises exception.UnsupportedDiskOperation: a raw disk.
        :raises exception.InvalidDiskRequest: the new backing file is the
            disk itself or has the disk in its own chain.
        """
        path, fmt = self._open(path, fmt, "rebase", qcow2=True)
        new_backing = os.path.abspath(new_backing)
        try:
            backing_fmt = disk_chain.header_format(new_backing)
        except exception.DiskNotFound as exc:
            raise exception.DiskOperationError(
                path=path, reason="the new backing file %s does not exist"
                % new_backing) from exc
        if backing_fmt not in disk_chain.BACKING_FORMATS:
            raise exception.InvalidDiskRequest(
                path=path, reason="the new backing file %s is a %s image, "
                "which cannot back a disk; use one of %s" % (
                    new_backing, backing_fmt,
                    ", ".join(disk_chain.BACKING_FORMATS)))
        own = disk_chain.file_id(path)
        if disk_chain.file_id(new_backing) == own or (
                backing_fmt == "qcow2" and own in {
                    disk_chain.file_id(image.filename)
                    for image in self._chain(new_backing, "qcow2").chain}):
            raise exception.InvalidDiskRequest(
                path=path, reason="%s cannot be its backing file: the disk "
                "would be in its own backing chain" % new_backing)
        # A safe rebase reads the old chain; an unsafe one must work when
        # the old backing file is gone.
        size = self._chain(path, fmt, follow=not unsafe).virtual_size
        self.qemu.rebase(path, fmt, new_backing, backing_fmt, unsafe=unsafe,
                         progress=_in_bytes(progress, "rebase", size),
                         cancel=cancel)
        LOG.info("Rebased disk %s onto %s (%s)%s", path, new_backing,
                 backing_fmt, " without copying data" if unsafe else "")
        return self._chain(path, fmt)

    def extract(self, path: str, output: str, output_fmt: str = "qcow2", *,
                compress: bool = False,
                progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None,
                fmt: str | None = None) -> qemu_img.ImageInfo:
        """Write the guest-visible content of disk ``path`` -- its whole
        backing chain flattened -- to a new standalone image ``output``
        with no backing file, suitable for upload to an image service.

        Internal snapshots are not copied.  The image is written under a
        temporary name in ``output``'s directory, flushed to disk and only
        then given its name; on any failure or cancellation nothing is left
        behind.

        :param output_fmt: ``qcow2`` or ``raw``.
        :param compress: compress the data (qcow2 only): smaller, slower to
            write, and slower for a guest to read until rewritten.
        :param progress: called as ``progress("extract", done, total)``
            with bytes of the virtual size.
        :param cancel: set it from another thread to stop.
        :returns: the :class:`imagebackend.qemu_img.ImageInfo` of
            ``output``.
        :raises exception.TargetExists: ``output`` exists; nothing was run.
        :raises exception.InvalidDiskRequest: a bad format or compression
            request; nothing was run.
        :raises exception.OperationCancelled: ``cancel`` was set.
        """
        if output_fmt not in EXTRACT_FORMATS:
            raise exception.InvalidDiskRequest(
                path=path, reason="cannot extract to format %r; use %s" % (
                    output_fmt, " or ".join(EXTRACT_FORMATS)))
        if compress and output_fmt != "qcow2":
            raise exception.InvalidDiskRequest(
                path=path, reason="compression needs qcow2 output, not %s"
                % output_fmt)
        path, fmt = self._open(path, fmt, "extract")
        output = os.path.abspath(output)
        if os.path.lexists(output):
            raise exception.TargetExists(path=output)
        directory, name = os.path.split(output)
        if not os.path.isdir(directory):
            raise exception.InvalidTarget(
                path=output, reason="its directory does not exist")
        size = self._chain(path, fmt).virtual_size
        tmp = os.path.join(directory, ".%s.%s.part" % (
            name, secrets.token_hex(4)))
        try:
            self.qemu.convert(path, fmt, tmp, output_fmt, compress=compress,
                              progress=_in_bytes(progress, "extract", size),
                              cancel=cancel)
            result = self.qemu.info(tmp, output_fmt)
            _publish(tmp, output)
        except BaseException:
            fileutils.remove_quietly(tmp)
            raise
        LOG.info("Extracted disk %s to %s (%s%s)", path, output, output_fmt,
                 ", compressed" if compress else "")
        return dataclasses.replace(result, filename=output)

    def resize(self, path: str, size: int | str, *, shrink: bool = False,
               fmt: str | None = None) -> qemu_img.ImageInfo:
        """Set the virtual size of disk ``path``.  The guest's partitions
        and filesystems are not changed.

        :param size: bytes, or a size string (see
            :func:`imagebackend.qemu_img.parse_size`).
        :param shrink: allow a smaller size; everything past the new end is
            lost.  Without it only growing is allowed.
        :returns: the disk's :meth:`info` afterwards.
        :raises exception.InvalidSize: ``size`` is not a size.
        :raises exception.InvalidDiskRequest: a smaller size without
            ``shrink``; nothing was changed.
        :raises exception.QemuImgError: qemu-img refused the size (qcow2
            sizes must be a multiple of 512 bytes).
        """
        size = qemu_img.parse_size(size)
        path, fmt = self._open(path, fmt, "resize")
        current = self._chain(path, fmt)
        if size == current.virtual_size:
            LOG.info("Disk %s already has %d bytes", path, size)
            return current
        if size < current.virtual_size and not shrink:
            raise exception.InvalidDiskRequest(
                path=path, reason="resizing it to %d bytes would shrink it "
                "from %d bytes and lose everything past the new end; shrink "
                "only after shrinking the guest's partitions, and say so "
                "explicitly (shrink=True, --shrink)" % (
                    size, current.virtual_size))
        self.qemu.resize(path, fmt, size,
                         shrink=size < current.virtual_size)
        LOG.info("Resized disk %s from %d to %d bytes", path,
                 current.virtual_size, size)
        return self._chain(path, fmt)

    # -- internals -----------------------------------------------------------

    def _open(self, path, fmt, operation, qcow2=False):
        """The absolute path and the format of an existing disk."""
        path = os.path.abspath(path)
        if fmt is None:
            fmt = self.detect_format(path)
        else:
            disk_chain.header_format(path)     # exists, and is a file
            if fmt not in disk_chain.DISK_FORMATS:
                raise exception.UnsupportedDiskOperation(
                    path=path, operation=operation, fmt=fmt,
                    hint="; instance disks are qcow2 or raw")
        if qcow2 and fmt != "qcow2":
            raise exception.UnsupportedDiskOperation(
                path=path, operation=operation, fmt=fmt,
                hint="; internal snapshots and backing files need a qcow2 "
                     "disk (extract it to qcow2 with 'imagebackend disk "
                     "extract', or use the qcow2 or cached-base backend)")
        return path, fmt

    def _chain(self, path, fmt, follow=True, force_share=False):
        return disk_chain.read_chain(self.qemu, path, fmt, follow=follow,
                                     force_share=force_share)


def _in_bytes(progress, stage, size):
    """A qemu-img percentage callback that calls ``progress`` in bytes."""
    if progress is None:
        return None

    def report(percent):
        progress(stage, int(size * percent / 100), size)
    return report


def _publish(tmp, final):
    """Give ``tmp`` the name ``final`` unless something took it meanwhile,
    and make that durable (:func:`imagebackend.fileutils.publish`).
    """
    try:
        fileutils.publish(tmp, final)
    except FileExistsError as exc:
        raise exception.TargetExists(path=final) from exc
    except OSError as exc:
        raise _not_published(final, exc) from exc


def _not_published(final, exc):
    return exception.DiskOperationError(
        path=final, reason="could not give the extracted image its name "
        "(%s); nothing was kept" % exc)
