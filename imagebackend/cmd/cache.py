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

"""``imagebackend cache ...``: base-image cache commands.

The parser is built from this module alone, a command's arguments only
when the command is used; each command imports the cache (and, for
``prefetch``, the image source) when it runs.
"""

import argparse
import threading
import typing

from imagebackend.cmd import output

if typing.TYPE_CHECKING:
    from imagebackend import cache as image_cache

LIST_COLUMNS = ["image_id", "kind", "generation", "file", "size_on_disk",
                "virtual_size", "format", "last_used", "disks", "stale",
                "shared_with"]
PRUNE_COLUMNS = ["action", "kind", "file", "bytes", "reason"]
VERIFY_COLUMNS = ["status", "image_id", "kind", "generation", "file",
                  "detail", "action"]
PREFETCH_COLUMNS = ["image_id", "cache_hit", "generation", "file",
                    "seconds", "error"]


def add_commands(groups) -> None:
    groups.add_parser("cache", help="Inspect and manage the base-image "
                                    "cache.", build=_add_cache_commands)


def _add_cache_commands(parser) -> None:
    """Add the ``cache`` group's commands to its ``parser``; each
    command's parser gets a function that adds its arguments.
    """
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser(
        "list", help="List the cached bases.",
        description="One row per base and sized base: image id, kind, "
                    "generation, file, size on disk, virtual size, format, "
                    "last use, number of disks using it, stale or not, "
                    "and how many other bases share its bytes (hard links "
                    "of one file, stored once).", build=_list_arguments)
    commands.add_parser(
        "prune", help="Remove what the cache no longer needs.",
        description="Remove orphaned scratch files, stale and old unused "
                    "bases, and unused bases least recently used first "
                    "while the cache exceeds [image_cache] max_size or "
                    "free space is below min_free_space. A base any disk "
                    "uses is never removed.", build=_prune_arguments)
    commands.add_parser(
        "invalidate", help="Make the next use of an image fetch it again.",
        description="Mark every cached base of IMAGE_ID stale, so the next "
                    "disk made from it fetches the image again, and remove "
                    "the stale bases no disk uses.",
        build=_invalidate_arguments)
    commands.add_parser(
        "verify", help="Check cached bases against their records.",
        description="Re-hash bases (all, or those of the given images) "
                    "against their metadata records and run 'qemu-img "
                    "check' on non-raw ones. Exits 1 if any is corrupt or "
                    "cannot be verified (no valid record).",
        build=_verify_arguments)
    commands.add_parser(
        "prefetch", help="Fetch images into the cache ahead of use.",
        description="Download (and convert) images into the cache so that "
                    "the first disk made from them is fast. Each image is "
                    "downloaded once, even while disks are being made from "
                    "it. Exits 1 if any image fails.",
        build=_prefetch_arguments)


def _list_arguments(listing) -> None:
    output.add_format_argument(listing)
    listing.set_defaults(func=list_cache, columns=LIST_COLUMNS)


def _prune_arguments(prune) -> None:
    prune.add_argument("--dry-run", action="store_true",
                       help="Report what would be removed; remove nothing.")
    output.add_format_argument(prune)
    prune.set_defaults(func=prune_cache, columns=PRUNE_COLUMNS)


def _invalidate_arguments(invalidate) -> None:
    invalidate.add_argument("image_id", metavar="IMAGE_ID",
                            help="The image's id in the image source.")
    output.add_format_argument(invalidate)
    invalidate.set_defaults(func=invalidate_image, columns=PRUNE_COLUMNS)


def _verify_arguments(verify) -> None:
    verify.add_argument("image_ids", metavar="IMAGE_ID", nargs="*",
                        help="Images whose bases to verify (default: "
                             "every base in the cache).")
    verify.add_argument("--repair", action="store_true",
                        help="Move corrupt bases no disk uses aside and "
                             "mark corrupt and unverifiable ones stale, "
                             "so the next use fetches the image again; a "
                             "base a disk uses is never moved.")
    output.add_format_argument(verify)
    verify.set_defaults(func=verify_cache, columns=VERIFY_COLUMNS)


def _prefetch_arguments(prefetch) -> None:
    prefetch.add_argument("image_ids", metavar="IMAGE_ID", nargs="+",
                          help="The images to fetch, by their ids in the "
                               "image source.")
    prefetch.add_argument("--parallel", type=_positive, default=4,
                          metavar="N",
                          help="Images fetched at the same time (default "
                               "4).")
    output.add_format_argument(prefetch)
    prefetch.set_defaults(func=prefetch_images, columns=PREFETCH_COLUMNS)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError("%r is not a positive whole "
                                         "number" % value)
    return number


def make_cache(conf, with_source: bool = False
               ) -> "image_cache.ImageCache":
    """The cache; ``with_source`` for commands that fetch."""
    from imagebackend import cache as image_cache

    source = None
    if with_source:
        from imagebackend import sources

        source = sources.load(conf)
    # The cache makes its QemuImg from ``conf`` when a command first runs
    # qemu-img: listing runs none.
    return image_cache.ImageCache(conf, source)


def rbd_backend(conf):
    """The rbd backend when it is the configured one: its bases live in
    Ceph, and the cache commands cover them too.
    """
    if conf.imagebackend.images_type != "rbd":
        return None
    from imagebackend.backends import base as backends_base

    return backends_base.load(conf, "rbd")


def list_cache(args, conf) -> list[dict]:
    rows = [entry.to_dict() for entry in make_cache(conf).entries()]
    rbd = rbd_backend(conf)
    return rows + (rbd.list_bases() if rbd is not None else [])


def _json(args) -> bool:
    return getattr(args, "output_format", "text") == "json"


def _removal_rows(result, dry_run=False) -> list[dict]:
    verb = "would remove" if dry_run else "removed"
    rows = [dict(row, action=verb) for row in result["removed"]]
    rows += [dict(row, action="kept", bytes=None) for row in result["kept"]
             if not row["reason"].startswith("in use by ")]
    return rows


def prune_cache(args, conf):
    report = make_cache(conf).prune(dry_run=args.dry_run).to_dict()
    rbd = rbd_backend(conf)
    if rbd is not None:
        report["rbd"] = rbd.prune_bases(dry_run=args.dry_run)
    if _json(args):
        return report
    rows = _removal_rows(report, args.dry_run)
    if rbd is not None:
        rows += _removal_rows(report["rbd"], args.dry_run)
    summary = "cache now %d bytes" % report["cache_size"]
    if report["free_space"] is not None:
        summary += ", %d bytes free" % report["free_space"]
    if not report["space_target_met"]:
        summary += "; max_size/min_free_space not met: the rest is in use"
    rows.append({"action": "total", "bytes": report["bytes_freed"],
                 "reason": summary})
    return rows


def invalidate_image(args, conf):
    result = make_cache(conf).invalidate(args.image_id).to_dict()
    rbd = rbd_backend(conf)
    parts = [result]
    if rbd is not None:
        result["rbd"] = rbd.invalidate_bases(args.image_id)
        parts.append(result["rbd"])
    if _json(args):
        return result
    rows = []
    for part in parts:
        rows += [{"action": "marked stale", "file": path}
                 for path in part["marked_stale"]]
        rows += _removal_rows(part)
        rows += [dict(row, action="kept") for row in part["kept"]
                 if row["reason"].startswith("in use by ")]
    rows.append({"action": "total", "bytes": result["bytes_freed"]})
    return rows


def verify_cache(args, conf) -> list[dict]:
    report = make_cache(conf).verify(args.image_ids or None,
                                     repair=args.repair)
    rows = [checked.to_dict() for checked in report.files]
    rbd = rbd_backend(conf)
    rbd_rows = [] if rbd is None else rbd.verify_bases(
        args.image_ids or None, repair=args.repair)
    if report.failed or any(row["status"] != "ok" for row in rbd_rows):
        args.exit_status = 1
    return rows + rbd_rows


def prefetch_images(args, conf) -> list[dict]:
    cache = make_cache(conf, with_source=True)
    bar = output.ProgressBar(args)
    progress = _PrefetchProgress(bar, len(set(args.image_ids)))
    try:
        report = cache.prefetch(args.image_ids, parallel=args.parallel,
                                progress=progress)
    finally:
        bar.close()
    if report.failed:
        args.exit_status = 1
    return [image.to_dict() for image in report.images]


class _PrefetchProgress:
    """Adds the downloads running in parallel into one progress line,
    labelled with the number of images started.  Called with the stages
    the cache labels with their image (``"download <image id>"``, see
    :func:`imagebackend.common.progress.labelled`).
    """

    def __init__(self, bar, count: int) -> None:
        self.bar = bar
        self.count = count
        self.done: dict[str, tuple[int, int | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        operation, _, image_id = stage.partition(" ")
        if operation != "download":
            return
        with self._lock:
            self.done[image_id] = (done, total)
            totals = [t for _, t in self.done.values()]
            known = None if None in totals else sum(totals)
            self.bar("%d/%d" % (len(self.done), self.count),
                     sum(d for d, _ in self.done.values()), known)
