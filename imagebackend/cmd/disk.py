"""``imagebackend disk ...``: instance-disk commands."""

import argparse

from imagebackend.backends import base as backends_base
from imagebackend.cmd import disk_ops as disk_ops_cmd
from imagebackend.cmd import output
from imagebackend import exception
from imagebackend.qemu import results as qemu_results


def add_commands(groups) -> None:
    parser = groups.add_parser("disk", help="Make and manage instance "
                                            "disks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    create = commands.add_parser(
        "create", help="Make an instance disk from an image.",
        description="Fetch IMAGE_ID into the base-image cache (once) and "
                    "make the instance disk TARGET from it with the "
                    "configured backend.")
    create.add_argument("image_id", metavar="IMAGE_ID")
    create.add_argument("target", metavar="TARGET",
                        help="Path of the disk file to create; must not "
                             "exist, and must be outside the image cache "
                             "and its lock directory. Missing parent "
                             "directories are made (and removed again if "
                             "the command fails).")
    create.add_argument("--size", required=True, type=_size,
                        help="Virtual size of the disk: bytes, or a number "
                             "with a K, M, G or T suffix (1024-based).")
    create.add_argument("--backend", metavar="NAME",
                        help="Backend to use instead of [imagebackend] "
                             "images_type: raw, qcow2 or cached-base.")
    output.add_format_argument(create)
    create.set_defaults(func=create_disk)

    disk_ops_cmd.add_commands(commands, _size)


def _size(value: str) -> int:
    try:
        return qemu_results.parse_size(value)
    except exception.InvalidSize as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def create_disk(args, conf) -> dict:
    backend = backends_base.load(conf, args.backend)
    bar = output.ProgressBar(args)
    try:
        disk = backend.create_image(args.image_id, args.target, args.size,
                                    progress=bar)
    finally:
        bar.close()
    return disk.to_dict()
