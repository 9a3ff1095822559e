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

"""``imagebackend disk ...``: making instance disks (``create``) and the
operations on existing ones (``info``, ``check``, ``snapshot``,
``rebase``, ``extract``, ``resize``).

The parser is built from this module alone, a command's arguments only
when the command is used; each command imports the library code it runs
when it runs.  The choices below are those of the
library (a unit test compares them), written out so that ``--help`` and
argument errors need none of it.
"""

import argparse
import functools
import typing

from imagebackend.cmd import output

if typing.TYPE_CHECKING:
    from imagebackend.disk import operations as disk_ops
    from imagebackend.qemu import results as qemu_results

#: :data:`imagebackend.disk.trust.DISK_FORMATS`.
DISK_FORMATS = ("qcow2", "raw")
#: :data:`imagebackend.disk.trust.BACKING_FORMATS`.
BACKING_FORMATS = ("qcow2", "raw", "vdi", "vhdx", "vmdk", "vpc")
#: :data:`imagebackend.qemu.results.REPAIR_MODES`.
REPAIR_MODES = ("leaks", "all")
#: :data:`imagebackend.disk.operations.EXTRACT_FORMATS`.
EXTRACT_FORMATS = ("qcow2", "raw")
#: the ``imagebackend.backends`` entry points the ``--backend`` help names.
BACKENDS = ("raw", "qcow2", "cached-base", "rbd")

SNAPSHOT_COLUMNS = ["id", "name", "vm_state_size", "date", "clock"]
_SNAPSHOT_ACTIONS = (
    ("create", "Save the disk's current content as snapshot NAME.",
     "created"),
    ("apply", "Revert the disk to snapshot NAME (a name or an id); what "
              "was written since is lost.", "applied"),
    ("delete", "Delete snapshot NAME (a name or an id); the disk's "
               "current content is unchanged.", "deleted"),
)
_NOT_RUNNING = (" The disk must not be in use by a running guest (qemu-img "
                "refuses a disk another process has open for writing).")
_WRITES = (" A disk in the image cache or the lock directory (by its real "
           "path) is never changed.")


def add_commands(groups) -> None:
    groups.add_parser("disk", help="Make and manage instance disks.",
                      build=_add_disk_commands)


def _add_disk_commands(parser) -> None:
    """Add the ``disk`` group's commands to its ``parser``; each
    command's parser gets a function that adds its arguments.
    """
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser(
        "create", help="Make an instance disk from an image.",
        description="Fetch IMAGE_ID into the base-image cache (once) and "
                    "make the instance disk TARGET from it with the "
                    "configured backend.", build=_create_arguments)
    commands.add_parser(
        "delete", help="Remove an instance disk this library made.",
        description="Remove the disk TARGET and its record, if this library "
                    "made it (a file with a registry record, or an RBD "
                    "clone whose metadata says it made it); anything else "
                    "is refused and left alone.", build=_delete_arguments)
    _add_operations(commands)


def _create_arguments(create) -> None:
    create.add_argument("image_id", metavar="IMAGE_ID",
                        help="The image's id in the image source (for the "
                             "local source, its file name).")
    create.add_argument("target", metavar="TARGET",
                        help="Path of the disk file to create; must not "
                             "exist, and must be outside the image cache "
                             "and its lock directory. Missing parent "
                             "directories are made (and removed again if "
                             "the command fails). With the rbd backend: "
                             "the RBD image name in [rbd] pool.")
    create.add_argument("--size", required=True, type=_size,
                        help="Virtual size of the disk: bytes, or a number "
                             "with a K, M, G or T suffix (1024-based).")
    create.add_argument("--backend", metavar="NAME",
                        help="Backend to use instead of [imagebackend] "
                             "images_type: %s or %s." % (
                                 ", ".join(BACKENDS[:-1]), BACKENDS[-1]))
    output.add_format_argument(create)
    create.set_defaults(func=create_disk)


def _delete_arguments(delete) -> None:
    delete.add_argument("target", metavar="TARGET",
                        help="The disk's path, or its RBD image name.")
    delete.add_argument("--backend", metavar="NAME",
                        help="The backend that made it, instead of "
                             "[imagebackend] images_type.")
    output.add_format_argument(delete)
    delete.set_defaults(func=delete_disk)


def _size(value: str) -> int:
    from imagebackend import exception
    from imagebackend.qemu import sizes as qemu_sizes

    try:
        return qemu_sizes.parse_size(value)
    except exception.InvalidSize as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def create_disk(args, conf) -> dict:
    from imagebackend.backends import base as backends_base

    backend = backends_base.load(conf, args.backend)
    bar = output.ProgressBar(args)
    try:
        disk = backend.create_image(args.image_id, args.target, args.size,
                                    progress=bar)
    finally:
        bar.close()
    return disk.to_dict()


def delete_disk(args, conf) -> dict:
    from imagebackend.backends import base as backends_base

    return backends_base.load(conf, args.backend).delete_disk(args.target)


def _add_operations(commands) -> None:
    """Add the operations on existing disks to the ``disk`` group's
    ``commands``.
    """
    commands.add_parser(
        "info", help="Show a disk's format, size, backing chain and "
                     "snapshots.",
        description="Show the format, virtual size, allocated size, "
                    "backing chain and internal snapshots of instance "
                    "disk PATH.", build=_info_arguments)
    commands.add_parser(
        "check", help="Check a disk's consistency, and repair it.",
        description="Run 'qemu-img check' on qcow2 disk PATH (raw disks "
                    "have nothing to check). Exits 0 when the disk is "
                    "consistent, 2 when corruptions remain and 3 when only "
                    "leaks remain, as qemu-img check does." + _NOT_RUNNING,
        build=_check_arguments)
    commands.add_parser(
        "snapshot", help="Create, apply, delete and list internal "
                         "snapshots of a qcow2 disk.",
        description="Internal snapshots are kept inside a qcow2 disk; raw "
                    "disks have none." + _NOT_RUNNING + _WRITES,
        build=_snapshot_actions)
    commands.add_parser(
        "rebase", help="Give a qcow2 disk another backing file.",
        description="Make NEW_BACKING the backing file of qcow2 disk PATH, "
                    "recording its absolute path and its format "
                    "(--backing-format, or else the format the image cache "
                    "records for it). NEW_BACKING and its own chain are "
                    "checked first, and the disk's chain again afterwards. "
                    "The guest sees the same content afterwards: whatever "
                    "differs between the old and the new backing file is "
                    "copied into the disk, with a progress bar on a "
                    "terminal." + _NOT_RUNNING + _WRITES,
        build=_rebase_arguments)
    commands.add_parser(
        "extract", help="Write a disk's content to a standalone image.",
        description="Write the content the guest sees on disk PATH -- its "
                    "backing chain flattened -- to a new image OUTPUT with "
                    "no backing file, suitable for upload to an image "
                    "service. Internal snapshots are not copied. OUTPUT "
                    "must not exist and may not be in the image cache or "
                    "the lock directory; it appears only once complete "
                    "and flushed to disk. A progress bar is drawn on a "
                    "terminal.", build=_extract_arguments)
    commands.add_parser(
        "resize", help="Change a disk's virtual size.",
        description="Set the virtual size of disk PATH. Only growing is "
                    "allowed unless --shrink is given; the guest's "
                    "partitions and filesystems are not changed." +
                    _NOT_RUNNING + _WRITES, build=_resize_arguments)


def _info_arguments(info) -> None:
    _disk_arguments(info)
    info.set_defaults(func=show_info)


def _check_arguments(check) -> None:
    _disk_arguments(check)
    check.add_argument("--repair", choices=REPAIR_MODES,
                       help="'leaks' frees leaked clusters (only wasted "
                            "space; safe); 'all' also repairs corruptions, "
                            "which can lose the data of the clusters "
                            "concerned. Refused for a file in the image "
                            "cache or the lock directory.")
    check.set_defaults(func=check_disk)


def _snapshot_actions(snapshot) -> None:
    actions = snapshot.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    actions.add_parser("list", help="List the snapshots.",
                       build=_snapshot_list_arguments)
    for action, text, done in _SNAPSHOT_ACTIONS:
        actions.add_parser(action, help=text, description=text,
                           build=functools.partial(_snapshot_arguments,
                                                   done=done))


def _snapshot_list_arguments(listing) -> None:
    _disk_arguments(listing)
    listing.set_defaults(func=list_snapshots, columns=SNAPSHOT_COLUMNS)


def _snapshot_arguments(parser, done) -> None:
    _disk_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="The snapshot's name.")
    parser.set_defaults(func=change_snapshot, action_done=done)


def _rebase_arguments(rebase) -> None:
    _disk_arguments(rebase)
    rebase.add_argument("new_backing", metavar="NEW_BACKING",
                        help="The new backing file.")
    rebase.add_argument("--backing-format", dest="backing_format",
                        choices=BACKING_FORMATS,
                        help="NEW_BACKING's format. Needed unless "
                             "NEW_BACKING is a base in the image cache "
                             "(its record's format is used) or a disk the "
                             "library made (its registry entry's); never "
                             "read from NEW_BACKING's header, which a guest "
                             "may have written.")
    rebase.add_argument("--unsafe", action="store_true",
                        help="Only rewrite the reference, copying no data: "
                             "for a backing file that was moved or renamed "
                             "(the old path need not exist). Wrong if the "
                             "new file's content differs.")
    rebase.set_defaults(func=rebase_disk)


def _resize_arguments(resize) -> None:
    _disk_arguments(resize)
    resize.add_argument("size", metavar="SIZE", type=_size,
                        help="The new virtual size: bytes, or a number "
                             "with a K, M, G or T suffix (1024-based).")
    resize.add_argument("--shrink", action="store_true",
                        help="Allow a smaller size. Everything past the "
                             "new end is lost: shrink the guest's "
                             "partitions first.")
    resize.set_defaults(func=resize_disk)


def _extract_arguments(extract) -> None:
    _disk_arguments(extract)
    extract.add_argument("output", metavar="OUTPUT",
                         help="Path of the image to write.")
    extract.add_argument("-O", "--image-format", dest="image_format",
                         choices=EXTRACT_FORMATS, default="qcow2",
                         help="Format of OUTPUT (default qcow2).")
    extract.add_argument("--compress", action="store_true",
                         help="Compress OUTPUT (qcow2 only): smaller, "
                              "slower to write.")
    extract.add_argument("--upload", metavar="NAME",
                         help="Then create image NAME in Glance (with the "
                              "[glance] credentials) and upload OUTPUT as "
                              "its data; the new image id is printed.")
    extract.add_argument("--disk-format", metavar="F",
                         help="Glance disk_format of the uploaded image "
                              "(default: the --image-format).")
    extract.set_defaults(func=extract_disk)


def _disk_arguments(parser) -> None:
    parser.add_argument("path", metavar="PATH", help="The instance disk.")
    parser.add_argument("--input-format", choices=DISK_FORMATS,
                        help="The disk's format. Needed unless PATH is a "
                             "base in the image cache (its record's format "
                             "is used) or a disk the library made (its "
                             "registry entry's); never read from the "
                             "disk's header, which a guest may have "
                             "written.")
    output.add_format_argument(parser)


def make_ops(conf) -> "disk_ops.DiskOperations":
    from imagebackend.cache import disk_records
    from imagebackend.disk import operations as disk_ops

    return disk_ops.DiskOperations(
        conf, records=disk_records.DiskRecords(conf))


def _json(args) -> bool:
    return getattr(args, "output_format", "text") == "json"


def show_info(args, conf) -> dict:
    info = make_ops(conf).info(args.path, fmt=args.input_format)
    return info_row(info, _json(args))


def check_disk(args, conf) -> dict:
    from imagebackend.qemu import img as qemu_img

    result = make_ops(conf).check(args.path, args.repair,
                                  fmt=args.input_format)
    if result.corruptions or result.check_errors:
        args.exit_status = qemu_img.CHECK_CORRUPTIONS
    elif result.leaks:
        args.exit_status = qemu_img.CHECK_LEAKS
    row = {"path": result.filename, "format": result.format,
           "supported": result.supported, "clean": result.clean}
    for key in ("corruptions", "leaks", "check_errors", "corruptions_fixed",
                "leaks_fixed", "image_end_offset"):
        row[key] = getattr(result, key)
    return row


def list_snapshots(args, conf) -> list[dict]:
    return [snapshot_row(snap) for snap in make_ops(conf).snapshot_list(
        args.path, fmt=args.input_format)]


def change_snapshot(args, conf) -> dict:
    method = getattr(make_ops(conf), "snapshot_" + args.action)
    snap = method(args.path, args.name, fmt=args.input_format)
    return dict({"path": args.path, "action": args.action_done},
                **snapshot_row(snap))


def rebase_disk(args, conf) -> dict:
    bar = output.ProgressBar(args)
    try:
        info = make_ops(conf).rebase(args.path, args.new_backing,
                                     unsafe=args.unsafe, progress=bar,
                                     fmt=args.input_format,
                                     backing_fmt=args.backing_format)
    finally:
        bar.close()
    return info_row(info, _json(args))


def extract_disk(args, conf) -> dict:
    from imagebackend import sources

    # Build the Glance source before the (long) extraction, so a
    # configuration mistake is reported before any work is done.
    glance = sources.load(conf, "glance") if args.upload else None
    bar = output.ProgressBar(args)
    try:
        image = make_ops(conf).extract(
            args.path, args.output, args.image_format,
            compress=args.compress, progress=bar, fmt=args.input_format)
        row = extract_row(args, image)
        if glance is not None:
            row["image_id"] = glance.upload(
                args.upload, args.output,
                args.disk_format or args.image_format,
                progress=bar)
            row["image_name"] = args.upload
    finally:
        bar.close()
    return row


def extract_row(args, image: "qemu_results.ImageInfo") -> dict:
    return {"path": image.filename, "format": image.format,
            "virtual_size": image.virtual_size,
            "actual_size": image.actual_size,
            "compressed": args.compress, "source": args.path}


def resize_disk(args, conf) -> dict:
    info = make_ops(conf).resize(args.path, args.size, shrink=args.shrink,
                                 fmt=args.input_format)
    return info_row(info, _json(args))


def info_row(info: "qemu_results.ImageInfo", structured: bool) -> dict:
    """A disk's :class:`imagebackend.qemu.results.ImageInfo` as output data.

    :param structured: backing files and snapshots as objects (JSON);
        otherwise as short strings for a text listing.
    """
    backing = info.chain[1:]
    if structured:
        chain = [{"path": b.filename, "format": b.format,
                  "virtual_size": b.virtual_size} for b in backing]
        snapshots = [snapshot_row(snap) for snap in info.snapshots]
    else:
        chain = ["%s (%s)" % (b.filename, b.format) for b in backing]
        snapshots = ["%s (id %s)" % (s.name, s.id) for s in info.snapshots]
    return {"path": info.filename, "format": info.format,
            "virtual_size": info.virtual_size,
            "actual_size": info.actual_size,
            "backing_file": backing[0].filename if backing else None,
            "backing_chain": chain, "snapshots": snapshots,
            "cluster_size": info.cluster_size, "dirty": info.dirty}


def snapshot_row(snap: "qemu_results.Snapshot") -> dict:
    return {"id": snap.id, "name": snap.name,
            "vm_state_size": snap.vm_state_size,
            "date": snap.date.isoformat(timespec="seconds"),
            "clock": snap.clock.total_seconds()}
