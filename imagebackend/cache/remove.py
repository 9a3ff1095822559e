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

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.cache import results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import store as cache_store
from imagebackend.cache import templates as cache_templates
from imagebackend.common import fileio

LOG = logging.getLogger(__name__)


class Remover:
    """Removes files of the cache under the image's locks.

    :param store: the cache's paths and locks.
    :param users_of: ``users_of(cid, base name)`` -> the registered disks
        of the image that use that base now (the last check before a
        removal).
    """

    def __init__(self, store: cache_store.Store,
                 users_of: typing.Callable[[str, str], list[str]]) -> None:
        self.store = store
        self.users_of = users_of

    def remove_base(self, f: cache_scan.CachedFile, reason: str,
                    report: results.PruneReport) -> bool:
        """Remove base or sized base ``f`` if, under the image's locks, it
        is still unused and unchanged since it was scanned.

        :returns: True when it was removed (or would be, on a dry run).
        """
        if report.dry_run:
            report.add(f.path, f.kind, reason,
                       f.allocated if f.st.st_nlink == 1 else 0, f.image_id)
            for path, st in cache_templates.of_base(self.store.base_dir,
                                                    f.name.name):
                report.add(path, "template", "its base would be removed",
                           st.st_blocks * 512, f.image_id)
            return True
        store = self.store
        sized_lock = (store.lock(f.name.name, blocking=False)
                      if f.kind == "sized" else contextlib.nullcontext())
        try:
            with store.exclusive_image(f.cid), sized_lock:
                why_not = self._still_removable(f)
                if why_not:
                    report.keep(f, why_not)
                    return False
                # Bytes another name still links to are not freed.
                freed = f.allocated if os.lstat(f.path).st_nlink == 1 else 0
                os.unlink(f.path)
                if f.kind == "sized":
                    # Its own record describes these bytes only.
                    fileio.remove_quietly(f.path + ".json")
                self.drop_record_if_alone(f.cid, f.name.stem)
                templates = cache_templates.drop(store.base_dir,
                                                 f.name.name)
                fileio.fsync_dir(store.base_dir)
        except cache_locks.Busy:
            report.keep(f, "busy: a fetch or a disk creation is in "
                           "progress")
            return False
        except FileNotFoundError:
            return False
        LOG.info("Removed cached %s %s (%s)", f.kind, f.path, reason)
        report.add(f.path, f.kind, reason, freed, f.image_id)
        for path, size in templates:
            report.add(path, "template", "its base was removed", size,
                       f.image_id)
        return True

    def _still_removable(self, f) -> str | None:
        """Why ``f`` must stay after all (checked under its locks), or
        None.
        """
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
        users = self.users_of(f.cid, f.name.name)
        if users:
            return "in use by %s" % ", ".join(users)
        return None

    def drop_record_if_alone(self, cid: str, stem: str) -> None:
        """Remove generation ``stem``'s record once neither its base nor
        any of its sized bases is left.
        """
        gen = cache_layout.parse(stem).generation
        kinds = cache_generations.generations(
            self.store.base_dir, cid).get(gen, set())
        if not kinds & {"base", "sized"}:
            fileio.remove_quietly(self.store.base_path(stem) + ".json")

    def drop_sized_record_if_alone(self, sized_name: str) -> None:
        """Remove the own record of sized base ``sized_name`` if the sized
        base is gone, unless it is being built (its lock or the image's
        are held).
        """
        name = cache_layout.parse(sized_name)
        path = self.store.base_path(sized_name)
        try:
            with self.store.exclusive_image(name.cid), \
                    self.store.lock(sized_name, blocking=False):
                if not os.path.lexists(path):
                    fileio.remove_quietly(path + ".json")
        except cache_locks.Busy:
            pass

    def remove_file(self, path: str, kind: str, reason: str, size: int,
                    lock_name: str | None,
                    report: results.PruneReport) -> None:
        """Remove a scratch or leftover file, under ``lock_name`` if
        given (without waiting: a busy one is left for the next run).
        """
        if report.dry_run:
            report.add(path, kind, reason, size)
            return
        lock = (self.store.lock(lock_name, blocking=False) if lock_name
                else contextlib.nullcontext())
        try:
            with lock:
                if not fileio.remove_quietly(path):
                    return
        except cache_locks.Busy:
            return
        LOG.info("Removed %s %s (%s)", kind, path, reason)
        report.add(path, kind, reason, size)
