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

"""Operations on existing instance disks: info, check, snapshots, rebase,
extract and resize.

:class:`DiskOperations` works on the qcow2 and raw files the backends
make.  Before any qemu-img command touches a disk, its format and backing
chain are established as :mod:`imagebackend.disk.trust` and
:mod:`imagebackend.disk.chain` describe: the format comes from the caller
or the cache's records (given to it by its caller, see
:class:`imagebackend.disk.trust.FormatRecords`), never from a header a
guest may have written, and every backing file is checked before qemu-img
opens it.  After an
operation that changes a disk the chain is read and checked again.
Nothing is ever written inside ``_base`` or the lock directory.
"""

import dataclasses
import logging
import os
import re
import secrets
import threading

from oslo_config import cfg

from imagebackend.common import fileio
from imagebackend.common import progress as progress_mod
from imagebackend.disk import chain as disk_chain
from imagebackend.disk import trust as disk_trust
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import results as qemu_results
from imagebackend.qemu import sizes as qemu_sizes

LOG = logging.getLogger(__name__)

#: Formats :meth:`DiskOperations.extract` writes.
EXTRACT_FORMATS = ("qcow2", "raw")

_DIGITS_RE = re.compile(r"^[0-9]+$")


class DiskOperations:
    """Inspect and change existing instance disks through qemu-img.

    Every method takes the disk's path and, as ``fmt``, its format
    (``qcow2`` or ``raw``) when the caller knows it.  Without ``fmt`` the
    format is the one the image cache records (``records``): a base or
    sized base in ``_base`` has its record's format, a disk the library
    made has its registry entry's; any other disk is refused with
    :class:`~imagebackend.exception.DiskFormatUnknown` (a guest can write
    any header into a raw disk, so a header never decides).

    Methods that change a disk (``check`` with ``repair``, the snapshot
    changes, ``rebase``, ``resize``) and ``extract``'s output refuse
    paths inside ``_base`` and the lock directory, judged by the real
    path, so a symlink (or a hard link) into them is refused too; only the
    cache writes there.  Reading a base in ``_base`` (``info``, ``check``
    without repair, ``snapshot_list``, ``extract``'s input) is allowed.

    A backing file must lie under ``[imagebackend] instances_path``, under
    a directory of ``[image_cache] disk_dirs``, directly in the disk's own
    directory, or be a recorded base in ``_base`` (see
    :mod:`imagebackend.disk.chain`); every link is checked before qemu-img
    opens it.  After a change the chain is checked again, and
    ``qemu-img info --backing-chain`` must open exactly the files checked;
    a refused rebase is undone.  Errors name the disk and the fix;
    whatever can be checked beforehand is checked before qemu-img changes
    anything.

    :param conf: a ConfigOpts with the library's options registered
        (:func:`imagebackend.opts.register_opts`); nothing is registered
        here.
    :param execute: runs the qemu-img commands, as
        :class:`imagebackend.qemu.img.QemuImg` takes it; ``None`` runs
        them directly.
    :param records: what the image cache records about formats
        (:class:`imagebackend.cache.disk_records.DiskRecords`); ``None``
        trusts nothing from the cache, so the caller names every format.
    :param qemu: a :class:`imagebackend.qemu.img.QemuImg` to share (a
        backend's) instead of making one from ``conf`` and ``execute``.
    """

    def __init__(self, conf: cfg.ConfigOpts, execute=None,
                 records: disk_trust.FormatRecords | None = None, *,
                 qemu: qemu_img.QemuImg | None = None) -> None:
        self.conf = conf
        self.qemu = qemu or qemu_img.QemuImg(conf, execute)
        self.records = (records if records is not None
                        else disk_trust.NoRecords(conf))

    @property
    def paths(self) -> disk_trust.CachePaths:
        """The cache's directories, as the configuration sets them now."""
        return self.records.paths

    # -- reading -------------------------------------------------------------

    def info(self, path: str, *, fmt: str | None = None
             ) -> qemu_results.ImageInfo:
        """What disk ``path`` is: format, virtual size, backing chain and
        snapshots.  It may be in use by a running guest.

        :returns: a :class:`imagebackend.qemu.results.ImageInfo` whose
            ``chain`` is the whole backing chain, this disk first, each
            image with the format it is opened with.
        :raises exception.DiskFormatUnknown: no ``fmt`` and no record of
            the disk's format.
        :raises exception.DiskOperationError: the disk or its chain is
            unusable (the message says why and how to fix it).
        :raises exception.QemuImgError: qemu-img failed.
        """
        path, fmt = self._open(path, fmt, "info")
        return self._chain(path, fmt, force_share=True)

    def check(self, path: str, repair: str | None = None, *,
              fmt: str | None = None) -> qemu_results.CheckResult:
        """Check the consistency of disk ``path``, and with ``repair`` fix
        it.  The disk must not be in use by a running guest.

        :param repair: ``None`` (only check), ``"leaks"`` (free leaked
            clusters: safe) or ``"all"`` (also fix corruptions, which may
            lose the data of the clusters concerned).  A base in ``_base``
            is only checked, never repaired.
        :returns: a :class:`imagebackend.qemu.results.CheckResult`; for a raw
            disk its ``supported`` is False.  Corruptions and leaks are
            results, not exceptions.
        :raises exception.InvalidDiskRequest: a bad ``repair`` value.
        :raises exception.CachePathRefused: ``repair`` of a file in
            ``_base`` or the lock directory.
        """
        refusal = qemu_results.repair_refusal(repair)
        if refusal:
            raise exception.InvalidDiskRequest(path=path, reason=refusal)
        path, fmt = self._open(path, fmt, "check", write=bool(repair))
        self._chain(path, fmt)
        result = self.qemu.check(path, fmt, repair)
        if repair:
            self._recheck(path, fmt, "check --repair")
            LOG.info("Checked disk %s with repair=%s: %d leak(s) and %d "
                     "corruption(s) fixed, %d and %d remain", path, repair,
                     result.leaks_fixed, result.corruptions_fixed,
                     result.leaks, result.corruptions)
        return result

    # -- snapshots -----------------------------------------------------------

    def snapshot_list(self, path: str, *, fmt: str | None = None
                      ) -> list[qemu_results.Snapshot]:
        """The internal snapshots of qcow2 disk ``path``, oldest first.
        It may be in use by a running guest.

        :raises exception.UnsupportedDiskOperation: a raw disk.
        """
        path, fmt = self._open(path, fmt, "snapshot list", qcow2=True)
        return self._chain(path, fmt, force_share=True).snapshots

    def snapshot_create(self, path: str, name: str, *,
                        fmt: str | None = None) -> qemu_results.Snapshot:
        """Save the current content of qcow2 disk ``path`` as snapshot
        ``name``.  The disk must not be in use by a running guest.

        :returns: the new :class:`imagebackend.qemu.results.Snapshot`.
        :raises exception.UnsupportedDiskOperation: a raw disk.
        :raises exception.InvalidDiskRequest: the disk already has a
            snapshot of that name, or the name is empty or all digits
            (qemu-img would take it for a snapshot id).
        """
        path, fmt = self._open(path, fmt, "snapshot create", qcow2=True,
                               write=True)
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
        after = self._recheck(path, fmt, "snapshot create")
        new = [snap for snap in after.snapshots
               if snap.name == name and snap.id not in old]
        if len(new) != 1:
            raise exception.DiskOperationError(
                path=path, reason="qemu-img reported success but snapshot "
                "%r is not listed; check the disk with 'imagebackend disk "
                "snapshot list'" % name)
        return new[0]

    def snapshot_apply(self, path: str, name: str, *,
                       fmt: str | None = None) -> qemu_results.Snapshot:
        """Revert qcow2 disk ``path`` to snapshot ``name`` (a name, or an
        id).  What was written since is lost.  The disk must not be in use
        by a running guest.

        :returns: the snapshot applied.
        :raises exception.SnapshotNotFound: no such snapshot.
        """
        path, fmt = self._open(path, fmt, "snapshot apply", qcow2=True,
                               write=True)
        snap, ref = self._find_snapshot(path, fmt, name, by_id=True)
        self.qemu.snapshot_apply(path, fmt, ref)
        LOG.info("Reverted disk %s to snapshot %s", path, snap.name)
        self._recheck(path, fmt, "snapshot apply")
        return snap

    def snapshot_delete(self, path: str, name: str, *,
                        fmt: str | None = None) -> qemu_results.Snapshot:
        """Delete snapshot ``name`` (a name, or an id) of qcow2 disk
        ``path``; the disk's current content is unchanged.

        :returns: the snapshot deleted.
        :raises exception.SnapshotNotFound: no such snapshot.
        """
        path, fmt = self._open(path, fmt, "snapshot delete", qcow2=True,
                               write=True)
        # qemu-img deletes by name only.
        snap, ref = self._find_snapshot(path, fmt, name, by_id=False)
        self.qemu.snapshot_delete(path, fmt, ref)
        LOG.info("Deleted snapshot %s of disk %s", snap.name, path)
        self._recheck(path, fmt, "snapshot delete")
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
               progress: progress_mod.Progress | None = None,
               cancel: threading.Event | None = None,
               fmt: str | None = None,
               backing_fmt: str | None = None) -> qemu_results.ImageInfo:
        """Make ``new_backing`` the backing file of qcow2 disk ``path``.

        The new backing file's path is recorded absolute, with its format:
        ``backing_fmt``, or else the one the cache records for it (a base
        in ``_base``, a disk the library made).  Its own backing chain is
        read and checked, as a part of this disk's chain, before anything
        changes; the disk's chain is checked again afterwards, and if that
        fails the old backing file is recorded back.

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
        :param backing_fmt: the new backing file's format.
        :returns: the disk's :meth:`info` afterwards.
        :raises exception.OperationCancelled: ``cancel`` was set.
        :raises exception.UnsupportedDiskOperation: a raw disk.
        :raises exception.DiskFormatUnknown: no ``backing_fmt`` and no
            record of the new backing file's format.
        :raises exception.InvalidDiskRequest: the new backing file is the
            disk itself or has the disk in its own chain.
        :raises exception.DiskOperationError: the new backing file, or a
            file in its chain, may not back a disk.
        """
        path, fmt = self._open(path, fmt, "rebase", qcow2=True, write=True)
        new_backing, backing_fmt = disk_chain.check_new_backing(
            self.qemu, path, new_backing, backing_fmt, records=self.records)
        # A safe rebase reads the old chain; an unsafe one must work when
        # the old backing file is gone.
        before = self._chain(path, fmt, follow=not unsafe)
        self.qemu.rebase(path, fmt, new_backing, backing_fmt, unsafe=unsafe,
                         progress=progress_mod.from_percent(
                             progress, "rebase", before.virtual_size),
                         cancel=cancel)
        LOG.info("Rebased disk %s onto %s (%s)%s", path, new_backing,
                 backing_fmt, " without copying data" if unsafe else "")

        def undo():
            # Record the old reference exactly as it was.  After a safe
            # rebase both backing files show the guest the same content
            # (the differences were copied in), so this changes nothing
            # the guest sees.
            self.qemu.rebase(path, fmt, before.backing_file,
                             before.backing_format, unsafe=True)
        return self._recheck(path, fmt, "rebase", undo=undo)

    def extract(self, path: str, output: str, output_fmt: str = "qcow2", *,
                compress: bool = False,
                progress: progress_mod.Progress | None = None,
                cancel: threading.Event | None = None,
                fmt: str | None = None) -> qemu_results.ImageInfo:
        """Write the guest-visible content of disk ``path`` -- its whole
        backing chain flattened -- to a new standalone image ``output``
        with no backing file, suitable for upload to an image service.

        Internal snapshots are not copied.  The image is written under a
        temporary name in ``output``'s directory, flushed to disk and only
        then given its name; on any failure or cancellation nothing is left
        behind.

        :param output: a new file, outside ``_base`` and the lock
            directory.
        :param output_fmt: ``qcow2`` or ``raw``.
        :param compress: compress the data (qcow2 only): smaller, slower to
            write, and slower for a guest to read until rewritten.
        :param progress: called as ``progress("extract", done, total)``
            with bytes of the virtual size.
        :param cancel: set it from another thread to stop.
        :returns: the :class:`imagebackend.qemu.results.ImageInfo` of
            ``output``.
        :raises exception.TargetExists: ``output`` exists; nothing was run.
        :raises exception.CachePathRefused: ``output`` is in ``_base`` or
            the lock directory; nothing was run.
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
        output = os.path.abspath(output)
        disk_trust.refuse_cache_write(self.paths, output)
        path, fmt = self._open(path, fmt, "extract")
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
                              progress=progress_mod.from_percent(
                                  progress, "extract", size),
                              cancel=cancel)
            result = self.qemu.info(tmp, output_fmt)
            _publish(tmp, output)
        except BaseException:
            fileio.remove_quietly(tmp)
            raise
        LOG.info("Extracted disk %s to %s (%s%s)", path, output, output_fmt,
                 ", compressed" if compress else "")
        return dataclasses.replace(result, filename=output)

    def resize(self, path: str, size: int | str, *, shrink: bool = False,
               fmt: str | None = None) -> qemu_results.ImageInfo:
        """Set the virtual size of disk ``path``.  The guest's partitions
        and filesystems are not changed.

        :param size: bytes, or a size string (see
            :func:`imagebackend.qemu.sizes.parse_size`).
        :param shrink: allow a smaller size; everything past the new end is
            lost.  Without it only growing is allowed.
        :returns: the disk's :meth:`info` afterwards.
        :raises exception.InvalidSize: ``size`` is not a size.
        :raises exception.InvalidDiskRequest: a smaller size without
            ``shrink``; nothing was changed.
        :raises exception.QemuImgError: qemu-img refused the size (qcow2
            sizes must be a multiple of 512 bytes).
        """
        size = qemu_sizes.parse_size(size)
        path, fmt = self._open(path, fmt, "resize", write=True)
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
        return self._recheck(path, fmt, "resize")

    # -- internals -----------------------------------------------------------

    def _open(self, path, fmt, operation, qcow2=False, write=False):
        return disk_trust.open_disk(self.records, path, fmt, operation,
                                    qcow2=qcow2, write=write)

    def _chain(self, path, fmt, follow=True, force_share=False, top=None):
        return disk_chain.read_chain(self.qemu, path, fmt,
                                     records=self.records, top=top,
                                     follow=follow, force_share=force_share)

    def _recheck(self, path, fmt, operation, undo=None):
        return disk_chain.recheck(self.qemu, path, fmt, operation,
                                  records=self.records, undo=undo)


def _publish(tmp, final):
    """Give ``tmp`` the name ``final`` unless something took it meanwhile,
    and make that durable (:func:`imagebackend.common.fileio.publish`).
    """
    try:
        fileio.publish(tmp, final)
    except FileExistsError as exc:
        raise exception.TargetExists(path=final) from exc
    except OSError as exc:
        raise _not_published(final, exc) from exc


def _not_published(final, exc):
    return exception.DiskOperationError(
        path=final, reason="could not give the extracted image its name "
        "(%s); nothing was kept" % exc)
