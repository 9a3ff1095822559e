#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""Keeping the base-image cache small: prune and invalidate.

:meth:`Pruner.prune` (``imagebackend cache prune``, or a periodic task)
removes, in this order:

1. scratch files (``.part-<hex>``, ``.converted-<hex>``) unmodified for
   ``cache_layout.SCRATCH_MINIMUM_AGE`` (a day) whose lock nobody holds --
   left over from a crash -- and temporary record files older than an hour;
2. bases nothing uses that are stale (superseded by a newer generation,
   invalidated, found corrupt, or without a valid record), whatever their
   age;
3. bases nothing uses whose last use is older than
   ``remove_unused_original_minimum_age_seconds`` (sized bases:
   ``remove_unused_resized_minimum_age_seconds``), and files moved aside
   by ``cache verify --repair`` older than the former;
4. while the cache is larger than ``max_size`` or its filesystem has less
   than ``min_free_space`` free, more unused bases, least recently used
   first;
5. records whose base is gone (a sized base's own record goes with it),
   overlay templates whose base is gone (a removed base takes its
   templates with it; see :mod:`imagebackend.cache.templates`),
   registry records of deleted disks, and lock files of images no longer
   cached.  The claims of generation numbers (``.generations``) are never
   removed, so a number is never used twice.

A base used by any disk (see :mod:`imagebackend.cache.usage`) is never
removed; what a guest writes in its disk never counts as a use, so it can
neither pin a base nor stop pruning.  Every removal happens under the
image's fetch lock and its use lock, both taken without waiting (a busy
image is skipped until the next run), after checking again that no disk
was made from the base and that it was not used since the scan -- so
pruning never races ``create_image``.
"""

import dataclasses
import logging
import os
import time
import typing

from oslo_config import cfg

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.cache import remove as cache_remove
from imagebackend.cache import results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import store as cache_store
from imagebackend.cache import usage as cache_usage
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import sizes as qemu_sizes

LOG = logging.getLogger(__name__)


#: temporary files of atomic record writes older than this are leftovers.
TEMP_FILE_AGE = 3600
_UNREADABLE = ("not removed: the search for disks could not read %s, so "
               "any base may be in use; fix that and prune again")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The ``[image_cache]`` values pruning follows (see
    :data:`imagebackend.cache.options.PRUNE_OPTIONS`).

    :param max_size: as configured: bytes or a size with a suffix.
    :param min_free_space: as configured: also a percentage.
    """

    original_age: int = 86400
    resized_age: int = 3600
    max_size: str = "0"
    min_free_space: str = "0"

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> "Policy":
        """The policy ``conf`` sets (its ``[image_cache]`` group)."""
        opts = conf.image_cache
        return cls(
            original_age=opts.remove_unused_original_minimum_age_seconds,
            resized_age=opts.remove_unused_resized_minimum_age_seconds,
            max_size=str(opts.max_size or "0"),
            min_free_space=str(opts.min_free_space or "0"))


# -- selection (pure) ---------------------------------------------------------

def lru(files: list) -> list:
    """``files`` least recently used first (ties by name)."""
    return sorted(files, key=lambda f: (f.last_used, f.name.name))


def expired(files: list, now: float, original_age: int,
            resized_age: int) -> list[tuple[typing.Any, str]]:
    """The unused ``files`` that go whatever the space: stale ones, and
    those unused for at least their kind's minimum age; oldest first.
    """
    chosen = []
    for f in lru(files):
        if f.stale:
            chosen.append((f, "stale (%s)" % f.stale_reason))
            continue
        limit = original_age if f.kind == "base" else resized_age
        age = now - f.last_used
        if age >= limit:
            chosen.append((f, "unused for %d s (limit %d s)"
                           % (age, limit)))
    return chosen


def space_to_free(cache_size: int, free: int | None, max_size: int,
                  min_free: int) -> int:
    """Bytes to remove to meet ``max_size`` and ``min_free`` (0 = no
    limit).
    """
    need = 0
    if max_size:
        need = max(need, cache_size - max_size)
    if min_free and free is not None:
        need = max(need, min_free - free)
    return need


def space_limits(policy: Policy, fs_size: int) -> tuple[int, int]:
    """``(max_size, min_free_space)`` of ``policy`` in bytes, on a
    filesystem of ``fs_size`` bytes.

    :raises imagebackend.exception.ConfigurationError: a value is not a
        size.
    """
    limits = []
    for name in ("max_size", "min_free_space"):
        value = str(getattr(policy, name) or "0").strip()
        try:
            if value.endswith("%") and name == "min_free_space":
                percent = float(value[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError(value)
                limits.append(int(fs_size * percent / 100))
            else:
                limits.append(qemu_sizes.parse_size(value))
        except (ValueError, exception.InvalidSize) as exc:
            raise exception.ConfigurationError(
                reason="[image_cache] %s = %r is not a size; give bytes, a "
                       "number with a K, M, G or T suffix%s, or 0"
                       % (name, value, ", a percentage"
                          if name == "min_free_space" else "")) from exc
    return limits[0], limits[1]


class Pruner:
    """Prunes and invalidates one cache.

    :param store: the cache's paths and locks.
    :param scanner: finds the disks that use bases.
    :param remover: removes files under the image's locks.
    """

    def __init__(self, store: cache_store.Store,
                 scanner: cache_usage.UsageScanner,
                 remover: cache_remove.Remover) -> None:
        self.store = store
        self.scanner = scanner
        self.remover = remover

    def prune(self, policy: Policy, *,
              dry_run: bool = False) -> results.PruneReport:
        """Remove what the cache no longer needs (see the module
        docstring).

        :param policy: the ages and space limits to prune by.
        :param dry_run: report what would be removed; remove nothing.
        :raises imagebackend.exception.ConfigurationError: a size option
            is invalid.
        """
        base_dir = self.store.base_dir
        report = results.PruneReport(dry_run=dry_run)
        layout = cache_scan.scan(base_dir)
        if not os.path.isdir(base_dir):
            return report
        vfs = os.statvfs(base_dir)
        max_size, min_free = space_limits(policy,
                                          vfs.f_blocks * vfs.f_frsize)
        report.free_space = vfs.f_bavail * vfs.f_frsize
        # Bases sharing their bytes (hard links) take the space once.
        report.cache_size = (cache_scan.allocated_once(layout.bases)
                             + sum(_allocated(p) for _, p in layout.scratch)
                             + sum(st.st_blocks * 512
                                   for _, _, st in layout.aside)
                             + sum(st.st_blocks * 512
                                   for _, _, st in layout.templates))
        usage = self.scanner.scan()
        now = time.time()
        self._leftovers(layout, now, policy.original_age, report)
        unused = _unused(layout.bases, usage, report)
        gone = set()
        for f, reason in expired(unused, now, policy.original_age,
                                 policy.resized_age):
            if self.remover.remove_base(f, reason, report):
                gone.add(f.path)
        need = space_to_free(report.cache_size, report.free_space,
                             max_size, min_free)
        for f in lru([f for f in unused if f.path not in gone]):
            if need <= 0:
                break
            freed = report.bytes_freed
            if self.remover.remove_base(f, "least recently used; freeing "
                                        "space", report):
                # A name whose bytes another base shares frees nothing.
                need -= report.bytes_freed - freed
        report.space_target_met = need <= 0
        if not dry_run:
            self._collect(layout, report)
        return report

    def _leftovers(self, layout, now, aside_age, report) -> None:
        """Orphaned scratch, old temporary files, old moved-aside files,
        overlay templates whose base is gone.
        """
        remove_file = self.remover.remove_file
        for name, path in layout.scratch:
            # Another host may lock elsewhere: only old scratch is a
            # crash's.
            age = _age(path, now)
            if age is None or age < cache_layout.SCRATCH_MINIMUM_AGE:
                continue
            lock_name = name.base_name if name.size else name.cid
            remove_file(path, "scratch", "orphaned (unmodified for %d s, "
                        "its lock is free)" % age, _allocated(path),
                        lock_name, report)
        for path, st in layout.temp:
            if now - st.st_mtime >= TEMP_FILE_AGE:
                remove_file(path, "temporary", "left over",
                            st.st_blocks * 512, None, report)
        for name, path, st in layout.aside:
            if now - st.st_mtime >= aside_age:
                remove_file(path, "aside", "moved aside %d s ago"
                            % (now - st.st_mtime), st.st_blocks * 512,
                            name.cid, report)
        for name, path, st in layout.templates:
            if name.scratch:
                if now - st.st_mtime < cache_layout.SCRATCH_MINIMUM_AGE:
                    continue
                reason = "orphaned (unmodified for %d s)" % (
                    now - st.st_mtime)
            elif os.path.lexists(os.path.join(layout.base_dir, name.base)):
                continue
            else:
                reason = "its base is gone"
            remove_file(path, "template", reason, st.st_blocks * 512,
                        name.cid, report)

    def _collect(self, layout, report) -> None:
        """Records without bases, registry records of deleted disks, and
        lock files of images that are gone.
        """
        store = self.store
        for stem in layout.records:
            cid = cache_layout.parse(stem).cid
            try:
                with store.exclusive_image(cid):
                    self.remover.drop_record_if_alone(cid, stem)
            except cache_locks.Busy:
                pass
        for sized in layout.sized_records:
            self.remover.drop_sized_record_if_alone(sized)
        registry = self.scanner.registry
        chains = cache_usage.Chains(store.base_dir)
        raw = self.scanner.raw_disks()

        def bases_of(path, st):
            # A disk recorded as raw is never parsed; its record stays
            # while the disk exists, so the walk never parses it either.
            if (st.st_dev, st.st_ino) in raw:
                return {"(a raw disk)"}
            return chains.bases_of(path, st)

        for cid in registry.cids():
            try:
                with store.exclusive_image(cid):
                    report.registry_records_removed += registry.collect(
                        cid, bases_of)
            except cache_locks.Busy:
                pass
        remaining = cache_scan.scan(store.base_dir).cids()
        remaining.update(registry.cids())
        try:
            names = sorted(os.listdir(store.lock_dir))
        except FileNotFoundError:
            return
        for file_name in names:
            cid = _lock_cid(file_name)
            if cid is not None and cid not in remaining:
                if cache_locks.remove_lock_file(store.lock_dir, file_name):
                    report.lock_files_removed += 1

    def invalidate(self, image_id: str, cid: str) -> results.Invalidation:
        """Mark every generation of ``image_id`` (cache id ``cid``) stale,
        so that the next use fetches the image again, and remove the bases
        nothing uses.  Waits for a fetch of the image in progress to
        finish first.
        """
        store = self.store
        marked = []
        with store.lock(cid):
            found = cache_generations.generations(store.base_dir, cid)
            for gen, kinds in sorted(found.items()):
                stem = cache_layout.stem(cid, gen)
                path = store.base_path(stem) + ".json"
                if "base" in kinds and not cache_layout.valid_record(
                        cache_layout.read_record(path)):
                    # Never trusted again whatever happens to the record:
                    # give it one that says stale.
                    cache_layout.write_stale_record(path, image_id, gen,
                                                    "invalidated")
                    marked.append(store.base_path(stem))
                elif store.mark_stale(stem, "invalidated"):
                    marked.append(store.base_path(stem))
        report = results.PruneReport()
        layout = cache_scan.scan(store.base_dir)
        mine = [f for f in layout.bases if f.cid == cid]
        usage = self.scanner.scan() if mine else None
        for f in _unused(mine, usage, report) if mine else ():
            self.remover.remove_base(f, "invalidated", report)
        return results.Invalidation(
            image_id=image_id, marked_stale=marked, removed=report.removed,
            kept=report.kept, bytes_freed=report.bytes_freed)


def _age(path: str, now: float) -> float | None:
    """Seconds since ``path`` was last modified; None if it is gone."""
    try:
        return now - os.lstat(path).st_mtime
    except FileNotFoundError:
        return None


def _allocated(path: str) -> int:
    try:
        return sparseio.allocated_bytes(path)
    except FileNotFoundError:
        return 0


def _lock_cid(file_name: str) -> str | None:
    """The image a lock file of the cache belongs to, or None."""
    if file_name.startswith(cache_locks.USE_PREFIX):
        name = cache_layout.parse(file_name[len(cache_locks.USE_PREFIX):])
    elif file_name.startswith(cache_locks.LOCK_PREFIX):
        name = cache_layout.parse(file_name[len(cache_locks.LOCK_PREFIX):])
    else:
        return None
    return name.cid if name is not None and not name.suffix else None


def _unused(bases, usage, report):
    """The bases no disk uses; the others are reported as kept.

    When some disk directory could not be read, no base counts as unused:
    a disk in it may be using any of them.
    """
    unused = []
    for f in bases:
        users = usage.of(f.name.name)
        if users:
            report.keep(f, "in use by %d disk(s)" % len(users))
        elif usage.unreadable:
            report.keep(f, _UNREADABLE % ", ".join(usage.unreadable))
        else:
            unused.append(f)
    return unused
