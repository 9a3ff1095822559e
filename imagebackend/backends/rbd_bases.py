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

"""The rbd backend's bases in Ceph, kept as a cache: listing, pruning,
invalidating, and removing the temporary images that failed calls left.

A base with clones is in use (Ceph keeps the parent/child links, so this
holds for disks made on any host) and is never removed: librbd refuses to
unprotect its snapshot while a clone exists.  One without clones ages out
after ``[image_cache] remove_unused_original_minimum_age_seconds`` since
its last use, or at once when it is stale (invalidated).
"""

import datetime
import re
import time

from imagebackend.backends import rbd_cluster
from imagebackend.backends import rbd_import
from imagebackend import exception

KIND = "rbd base"
#: a base's name: the image's cache id, and its generation after the first.
_BASE_STEM = re.compile(r"\A([0-9a-f]{40})(-[0-9]+)?\Z")
#: a temporary image older than this (seconds) belongs to no running call:
#: an import renews its lock (and finishes) well within it.
TEMP_AGE = 2 * rbd_import.LOCK_DURATION


def bases(conn, pool: str) -> list[tuple[str, dict]]:
    """``(name, info)`` of every base of this library in ``pool``."""
    found = []
    for name in conn.images(pool):
        if rbd_cluster.is_temp(name):
            continue
        info = conn.base_info(pool, name)
        if info is not None and info.get("image_id"):
            found.append((name, info))
    return found


def last_used(info: dict) -> float:
    """When a base was last cloned (or imported), in seconds since the
    epoch; 0 when its record says neither.
    """
    for key in ("last_used", "imported_at"):
        try:
            return float(info[key])
        except (KeyError, ValueError):
            continue
    return 0.0


def rows(conn, pool: str) -> list[dict]:
    """The bases of ``pool`` as ``cache list`` rows."""
    listed = []
    for name, info in bases(conn, pool):
        stamp = last_used(info)
        listed.append({
            "image_id": info["image_id"], "kind": KIND,
            "generation": _generation(name),
            "file": "%s/%s@%s" % (pool, name, rbd_cluster.SNAP),
            "size_on_disk": None,
            "virtual_size": int(info.get("virtual_size") or info["size"]),
            "format": "raw",
            "last_used": datetime.datetime.fromtimestamp(
                stamp, datetime.timezone.utc).isoformat(timespec="seconds"),
            "disks": len(info["children"]),
            "stale": bool(info.get("stale"))})
    return listed


def prune(conn, pool: str, disk_pool: str, min_age: int, dry_run: bool,
          now: float | None = None) -> dict:
    """Remove the bases of ``pool`` without clones that are stale or
    unused for ``min_age`` seconds, and the old temporary images of
    ``pool`` and ``disk_pool``.

    :returns: ``{"removed": [row...], "kept": [row...]}``, rows with
        ``kind``, ``file``, ``bytes`` and ``reason``.
    """
    now = time.time() if now is None else now
    report = {"removed": [], "kept": []}
    for name, info in bases(conn, pool):
        row = {"kind": KIND, "file": "%s/%s" % (pool, name), "bytes": None}
        age = now - last_used(info)
        if info["children"]:
            reason = "in use by %d disks" % len(info["children"])
        elif not info.get("stale") and age < min_age:
            reason = "unused for %d s, kept until %d s" % (age, min_age)
        elif dry_run or conn.remove_base(pool, name):
            report["removed"].append(dict(
                row, reason="stale" if info.get("stale")
                else "unused for %d s" % age))
            continue
        else:
            reason = "a disk was cloned from it meanwhile"
        report["kept"].append(dict(row, reason=reason))
    for where in sorted({pool, disk_pool}):
        for name in conn.images(where):
            if not rbd_cluster.is_temp(name):
                continue
            age = now - conn.created(where, name)
            if age < TEMP_AGE:
                continue
            if not dry_run and not _remove_temp(conn, where, name, pool):
                report["kept"].append({
                    "kind": "rbd temporary", "file": "%s/%s" % (where, name),
                    "bytes": None, "reason": "an import holds its lock"})
                continue
            report["removed"].append({
                "kind": "rbd temporary", "file": "%s/%s" % (where, name),
                "bytes": None,
                "reason": "left by a failed call %d s ago" % age})
    return report


def _remove_temp(conn, where: str, name: str, base_pool: str) -> bool:
    """Remove temporary image ``where/name``; one of a base only while
    no import of that image holds its lock (a long import of a large
    image may be older than :data:`TEMP_AGE`).

    :returns: False when it was kept.
    """
    match = _BASE_STEM.match(name.split(rbd_cluster.TEMP_MARK)[0])
    if where != base_pool or match is None:
        conn.remove_quietly(where, name)
        return True
    try:
        with rbd_import.lock(conn, where, match.group(1), -1):
            conn.remove_quietly(where, name)
    except exception.LockWaitTimeout:
        return False
    return True


def invalidate(conn, pool: str, image_id: str) -> dict:
    """Mark every base of ``image_id`` stale (the next disk imports the
    image again) and remove those without clones.

    :returns: ``{"marked_stale": [...], "removed": [row...],
        "kept": [row...]}``.
    """
    report = {"marked_stale": [], "removed": [], "kept": []}
    for name, info in bases(conn, pool):
        if info["image_id"] != image_id:
            continue
        conn.set_meta(pool, name, {"stale": "1"})
        report["marked_stale"].append("%s/%s" % (pool, name))
        row = {"kind": KIND, "file": "%s/%s" % (pool, name), "bytes": None}
        if not info["children"] and conn.remove_base(pool, name):
            report["removed"].append(dict(row, reason="stale"))
        else:
            report["kept"].append(dict(row, reason="in use by %d disks"
                                       % len(info["children"])))
    return report


def _generation(name: str) -> int:
    _, _, tail = name.rpartition("-")
    return int(tail) if "-" in name and tail.isdigit() else 1


def verify(conn, pool: str, image_ids: list[str] | None,
           repair: bool) -> list[dict]:
    """Read every base of ``pool`` (of ``image_ids`` only, if given) back
    and compare its content digest with the one recorded at import.

    :param repair: mark a corrupt or unverified base stale, so the next
        disk imports the image again (its clones keep it).
    :returns: ``cache verify`` rows: ``status`` ok, corrupt or
        unverified.
    """
    checked = []
    for name, info in bases(conn, pool):
        if image_ids and info["image_id"] not in image_ids:
            continue
        recorded = info.get("content_sha256")
        row = {"image_id": info["image_id"], "kind": KIND,
               "generation": _generation(name),
               "file": "%s/%s@%s" % (pool, name, rbd_cluster.SNAP),
               "detail": "", "action": ""}
        if not recorded:
            row.update(status="unverified",
                       detail="no content digest in its record")
        else:
            found = rbd_import.read_digest(conn, pool, name)
            if found == recorded:
                row.update(status="ok")
            else:
                row.update(status="corrupt",
                           detail="content digest %s, recorded %s"
                                  % (found, recorded))
        if row["status"] != "ok" and repair and not info.get("stale"):
            conn.set_meta(pool, name, {"stale": "1"})
            row["action"] = "marked stale"
        checked.append(row)
    return checked
