"""Removing files from the cache without racing anyone.

Everything the pruner, invalidation and ``verify --repair`` remove goes
through here: under the image's fetch lock and its use lock, both taken
without waiting (a busy image is skipped until the next run), after
checking again that the file is the one that was scanned, that it was not
used since, and that no disk made since the scan uses it.
"""

import contextlib
import logging
import os
import stat
import typing

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.common import fileio

if typing.TYPE_CHECKING:
    from imagebackend import cache
    from imagebackend.cache import prune as cache_prune

LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive_image(c: "cache.ImageCache", cid: str):
    """Hold image ``cid``'s fetch lock and its use lock exclusively,
    without waiting.

    :raises imagebackend.cache.locks.Busy: a fetch or a disk creation of
        the image is in progress.
    """
    with c.lock(cid, blocking=False):
        with cache_locks.flocked(
                cache_locks.use_lock_file(c.lock_dir, cid),
                blocking=False):
            yield


def remove_base(c: "cache.ImageCache", f: cache_layout.CachedFile,
                reason: str, report: "cache_prune.PruneReport") -> bool:
    """Remove base or sized base ``f`` if, under the image's locks, it is
    still unused and unchanged since it was scanned.

    :returns: True when it was removed (or would be, on a dry run).
    """
    if report.dry_run:
        report.add(f.path, f.kind, reason, f.allocated, f.image_id)
        return True
    sized_lock = (c.lock(f.name.name, blocking=False) if f.kind == "sized"
                  else contextlib.nullcontext())
    try:
        with exclusive_image(c, f.cid), sized_lock:
            why_not = _still_removable(c, f)
            if why_not:
                report.keep(f, why_not)
                return False
            os.unlink(f.path)
            if f.kind == "sized":
                # Its own record describes these bytes only.
                fileio.remove_quietly(f.path + ".json")
            drop_record_if_alone(c, f.cid, f.name.stem)
            fileio.fsync_dir(c.base_dir)
    except cache_locks.Busy:
        report.keep(f, "busy: a fetch or a disk creation is in progress")
        return False
    except FileNotFoundError:
        return False
    LOG.info("Removed cached %s %s (%s)", f.kind, f.path, reason)
    report.add(f.path, f.kind, reason, f.allocated, f.image_id)
    return True


def _still_removable(c, f) -> str | None:
    """Why ``f`` must stay after all (checked under its locks), or None."""
    try:
        st = os.lstat(f.path)
    except FileNotFoundError:
        return "already gone"
    if not os.path.samestat(st, f.st):
        return "replaced since the scan"
    if f.kind == "sized":
        used_since = st.st_mtime != f.st.st_mtime
    else:
        # As the scan saw it: only a regular file is a record.
        try:
            st_record = os.lstat(f.path + ".json")
        except FileNotFoundError:
            st_record = None
        mtime = (st_record.st_mtime if st_record is not None
                 and stat.S_ISREG(st_record.st_mode) else None)
        used_since = mtime != f.record_mtime
    if used_since:
        return "used since the scan"
    users = c.scanner.users_of(f.cid, f.name.name)
    if users:
        return "in use by %s" % ", ".join(users)
    return None


def drop_record_if_alone(c, cid, stem) -> None:
    """Remove generation ``stem``'s record once neither its base nor any
    of its sized bases is left.
    """
    gen = cache_layout.parse(stem).generation
    kinds = cache_layout.generations(c.base_dir, cid).get(gen, set())
    if not kinds & {"base", "sized"}:
        fileio.remove_quietly(c.base_path(stem) + ".json")


def drop_sized_record_if_alone(c, sized_name: str) -> None:
    """Remove the own record of sized base ``sized_name`` if the sized
    base is gone, unless it is being built (its lock or the image's are
    held).
    """
    name = cache_layout.parse(sized_name)
    path = c.base_path(sized_name)
    try:
        with exclusive_image(c, name.cid), \
                c.lock(sized_name, blocking=False):
            if not os.path.lexists(path):
                fileio.remove_quietly(path + ".json")
    except cache_locks.Busy:
        pass


def remove_file(c, path, kind, reason, size, lock_name, report) -> None:
    """Remove a scratch or leftover file, under ``lock_name`` if given."""
    if report.dry_run:
        report.add(path, kind, reason, size)
        return
    lock = (c.lock(lock_name, blocking=False) if lock_name
            else contextlib.nullcontext())
    try:
        with lock:
            if not fileio.remove_quietly(path):
                return
    except cache_locks.Busy:
        return
    LOG.info("Removed %s %s (%s)", kind, path, reason)
    report.add(path, kind, reason, size)
