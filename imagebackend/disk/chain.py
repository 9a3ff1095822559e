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

"""An instance disk's backing chain, read without letting qemu-img guess
anything or open a file before it is checked.

The disk's own format comes from
:func:`imagebackend.disk.trust.known_format` (the caller or the cache's
records, never a header).  The chain is then
read one image at a time (:func:`read_chain`) with ``qemu-img info -f
<format>`` and no ``--backing-chain``, so qemu-img opens no backing file
before it is checked (:func:`check_backing`): it must have its format
recorded in the image, be a regular local file that exists, not lead back
into the chain, and lie in a directory disks may use:

* anywhere under ``[imagebackend] instances_path`` or a directory of
  ``[image_cache] disk_dirs`` (by real path, so through symlinks too);
* directly in the directory of the disk at the top of the chain;
* in ``_base`` only a base or sized base (not a symlink) with a valid
  record whose format is the one the image records for it;
* never in the lock directory or in the cache's own bookkeeping
  (``_base/.disks``, records, scratch files).

An image with an external data file is refused.  A command run afterwards
on the disk makes qemu-img open the chain with these recorded formats only;
after a command that changed the disk, :func:`recheck` reads and checks the
chain again and confirms that qemu-img opens exactly the files checked.
"""

import os
import re
import stat
import typing

from imagebackend.disk import trust as disk_trust
from imagebackend import exception

if typing.TYPE_CHECKING:
    # Annotations only: the cache's scan uses MAX_CHAIN without running
    # qemu-img.
    from imagebackend.qemu import img as qemu_img
    from imagebackend.qemu import results as qemu_results

#: The deepest chain followed; deeper is a loop or a crafted image.
MAX_CHAIN = 16
# qemu takes "name:..." before any "/" as a protocol (nbd:, json:, ...).
_PROTOCOL_RE = re.compile(r"^[^/]*:")


# --- the backing chain -------------------------------------------------------

def read_chain(qemu: "qemu_img.QemuImg", path: str, fmt: str, *,
               records: disk_trust.FormatRecords, top: str | None = None,
               follow: bool = True,
               force_share: bool = False) -> "qemu_results.ImageInfo":
    """Read disk ``path`` and its backing chain, one image at a time,
    checking every backing file before it is opened.

    :param path: an absolute path.
    :param fmt: the disk's format, as
        :func:`imagebackend.disk.trust.known_format` found it.
    :param records: what the image cache records.
    :param top: the disk whose chain this is part of (its directory may
        hold backing files); default ``path``.
    :param follow: read the backing files too; without it only ``path`` is
        read (its backing file need not exist).
    :param force_share: read images another process (a running guest)
        has open for writing, for a report; without it such a disk is
        refused by qemu-img, as it must be before changing it.
    :returns: the :class:`imagebackend.qemu.results.ImageInfo` of ``path``;
        its ``chain`` is the chain read, ``path`` first, each image with
        the absolute path and the format it is opened with.
    :raises exception.DiskOperationError: the chain cannot be opened
        safely; the message says why and how to fix it.
    :raises exception.QemuImgError: qemu-img failed.
    """
    top = top or path
    chain = []
    seen = {file_id(path)}
    current, current_fmt = path, fmt
    while True:
        info = qemu.info(current, current_fmt, force_share=force_share)
        info.filename, info.format = current, current_fmt
        if info.data_file:
            raise exception.DiskOperationError(
                path=top, reason="%s keeps its data in the external file "
                "%s, which instance disks never do; it is not a disk these "
                "operations handle" % (current, info.data_file))
        chain.append(info)
        if not follow or info.backing_file is None:
            break
        if len(chain) >= MAX_CHAIN:
            raise exception.DiskOperationError(
                path=top, reason="its backing chain is deeper than %d "
                "images; flatten it with 'imagebackend disk extract'"
                % MAX_CHAIN)
        current, current_fmt = _backing(records, top, current, info,
                                        seen)
    for depth, info in enumerate(chain):
        info.chain = chain[depth:]
    return chain[0]


def check_new_backing(qemu: "qemu_img.QemuImg", path: str, new_backing: str,
                      backing_fmt: str | None, *,
                      records: disk_trust.FormatRecords) -> tuple[str, str]:
    """Check ``new_backing`` as the next backing file of qcow2 disk
    ``path``, and its own chain as part of the disk's, before anything
    changes.

    :param backing_fmt: the caller's format for it, or ``None`` for the
        one the cache records (see
        :func:`imagebackend.disk.trust.known_format`).
    :returns: its absolute path and its format.
    :raises exception.DiskFormatUnknown: nothing says its format.
    :raises exception.InvalidDiskRequest: it cannot back a disk, or it is
        the disk itself or has the disk in its own chain.
    :raises exception.DiskOperationError: it, or a file in its chain, may
        not back a disk.
    """
    new_backing = os.path.abspath(new_backing)
    if not os.path.lexists(new_backing):
        raise exception.DiskOperationError(
            path=path, reason="the new backing file %s does not exist"
            % new_backing)
    try:
        backing_fmt = disk_trust.known_format(
            records, new_backing, backing_fmt, flag="--backing-format",
            formats=disk_trust.BACKING_FORMATS)
    except exception.UnsupportedDiskOperation as exc:
        raise exception.InvalidDiskRequest(
            path=path, reason="the new backing file %s is a %s image, "
            "which cannot back a disk; use one of %s" % (
                new_backing, exc.kwargs["fmt"],
                ", ".join(disk_trust.BACKING_FORMATS))) from exc
    own = file_id(path)
    if file_id(new_backing) == own:
        raise _own_chain(path, new_backing)
    check_backing(records, path, path, new_backing, backing_fmt)
    new_chain = read_chain(qemu, new_backing, backing_fmt, records=records,
                           top=path)
    if own in {file_id(image.filename) for image in new_chain.chain}:
        raise _own_chain(path, new_backing)
    return new_backing, backing_fmt


def _own_chain(path, new_backing):
    return exception.InvalidDiskRequest(
        path=path, reason="%s cannot be its backing file: the disk would be "
        "in its own backing chain" % new_backing)


def recheck(qemu: "qemu_img.QemuImg", path: str, fmt: str, operation: str,
            *, records: disk_trust.FormatRecords,
            undo=None) -> "qemu_results.ImageInfo":
    """Read and check the chain of disk ``path`` again after ``operation``
    changed it, then have qemu-img open the whole chain with the recorded
    formats and confirm it opens the images checked.

    :param undo: called to revert the change when the chain is refused.
    :returns: the :class:`imagebackend.qemu.results.ImageInfo` of
        ``path``, as :func:`read_chain` returns it.
    :raises exception.DiskOperationError: the chain is refused; the
        message says whether the change was undone.
    """
    try:
        info = read_chain(qemu, path, fmt, records=records)
        _confirm(qemu, path, fmt, info)
        return info
    except (exception.DiskOperationError, exception.QemuImgError) as exc:
        if undo is None:
            outcome = "the change was kept; fix the chain as this says"
        else:
            try:
                undo()
                outcome = "the change was undone"
            except exception.ImageBackendException as undo_exc:
                outcome = ("undoing it failed too (%s); fix the chain as "
                           "this says" % undo_exc)
        raise exception.DiskOperationError(
            path=path, reason="after %s its backing chain is refused (%s); "
            "%s" % (operation, exc.kwargs.get("reason", exc), outcome)
        ) from exc


def _confirm(qemu, path, fmt, info):
    """Refuse unless ``qemu-img info --backing-chain`` of ``path`` lists
    the images of the checked ``info.chain``, with their formats.
    """
    opened = qemu.info(path, fmt, backing_chain=True,
                       force_share=False).chain
    expected = [(file_id(i.filename), i.format) for i in info.chain]
    found = [(file_id(os.path.join(os.path.dirname(path), i.filename)),
              i.format) for i in opened]
    if found != expected:
        raise exception.DiskOperationError(
            path=path, reason="qemu-img opens the chain %s, not the chain "
            "checked (%s); inspect it with 'qemu-img info -U "
            "--backing-chain -f %s %s'" % (
                " -> ".join("%s (%s)" % (i.filename, i.format)
                            for i in opened),
                " -> ".join("%s (%s)" % (i.filename, i.format)
                            for i in info.chain), fmt, path))


def file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _backing(records, top, image, info, seen):
    """The path and recorded format of the backing file of ``image``
    (described by ``info``), checked so that qemu-img opens it without
    guessing.
    """
    name = info.backing_file
    if _PROTOCOL_RE.match(name):
        raise exception.DiskOperationError(
            path=top, reason="the backing file of %s is %r, which is not a "
            "local file; refusing to let qemu-img open it" % (image, name))
    backing = os.path.join(os.path.dirname(image), name)
    if info.backing_format is None:
        raise exception.DiskOperationError(
            path=top, reason="%s has no recorded format, which qemu-img "
            "would have to guess; record it with 'imagebackend disk rebase "
            "%s %s --unsafe --backing-format FORMAT'" % (
                _what(top, image, backing), image, backing))
    check_backing(records, top, image, backing, info.backing_format)
    key = file_id(backing)
    if key in seen:
        raise exception.DiskOperationError(
            path=top, reason="its backing chain loops: %s leads back to %s"
            % (image, backing))
    seen.add(key)
    return backing, info.backing_format


def _what(top, image, backing):
    return ("its backing file %s" % backing if image == top
            else "the backing file %s of %s" % (backing, image))


def check_backing(records: disk_trust.FormatRecords, top: str, image: str,
                  backing: str, fmt: str) -> None:
    """Refuse ``backing`` as the backing file of ``image``, recorded as
    ``fmt``, in the chain of disk ``top``, unless it is a file this
    module's documentation allows.

    :raises exception.DiskOperationError: it is not; the message says
        what was found and how to fix it.
    """
    what = _what(top, image, backing)
    fix = ("record another with 'imagebackend disk rebase %s NEW_BACKING "
           "--unsafe'" % image)
    if fmt not in disk_trust.BACKING_FORMATS:
        raise exception.DiskOperationError(
            path=top, reason="%s is recorded as %s, which cannot back a "
            "disk (use one of %s)" % (
                what, fmt, ", ".join(disk_trust.BACKING_FORMATS)))
    if not os.path.lexists(backing):
        raise exception.DiskOperationError(
            path=top, reason="%s does not exist; if it moved, %s" % (
                what, fix))
    try:
        base = records.base_record(backing)
    except exception.DiskOperationError as exc:
        raise exception.DiskOperationError(
            path=top, reason="%s is refused: %s; %s" % (
                what, exc.kwargs.get("reason", "it is missing"), fix)
        ) from exc
    if base is not None:
        recorded = base.format
        if recorded is None:
            raise exception.DiskOperationError(
                path=top, reason="%s is in the image cache without a valid "
                "record, so its format is unknown %s" % (
                    what, disk_trust.no_record(base)))
        if recorded != fmt:
            raise exception.DiskOperationError(
                path=top, reason="%s is recorded in %s as %s, but the image "
                "cache records it as %s; record the right format with "
                "'imagebackend disk rebase %s %s --unsafe'" % (
                    what, image, fmt, recorded, image, backing))
        return
    try:
        st = os.stat(backing)
    except OSError as exc:
        raise exception.DiskOperationError(
            path=top, reason="%s cannot be read (%s); %s" % (
                what, exc.strerror, fix)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise exception.DiskOperationError(
            path=top, reason="%s is not a regular file; %s" % (what, fix))
    paths = records.paths
    real = os.path.realpath(backing)
    roots = [paths.instances_path] + list(paths.disk_dirs)
    own = {os.path.realpath(os.path.dirname(top)),
           os.path.dirname(os.path.realpath(top))}
    if (any(disk_trust.inside(real, os.path.realpath(r)) for r in roots)
            or os.path.dirname(real) in own):
        return
    raise exception.DiskOperationError(
        path=top, reason="%s (really %s) is outside the directories backing "
        "files may be in: under %s, directly in the disk's directory %s, "
        "or under a directory of [image_cache] disk_dirs (%s); move it "
        "there or list its directory in disk_dirs, then %s" % (
            what, real, paths.instances_path, os.path.dirname(top),
            ", ".join(paths.disk_dirs) or "none", fix))
