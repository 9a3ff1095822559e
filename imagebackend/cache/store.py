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
"""The cache's directories and locks: paths in ``_base``, making the
directories, the inter-process locks (a lock factory for every part of the
cache), and the few checks every part makes before it touches a file.

Every collaborator of :class:`imagebackend.cache.ImageCache` that reads or
writes ``_base`` is given a :class:`Store`, never the cache itself.
"""

import contextlib
import os
import stat
import time

from oslo_config import cfg

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import lockdirs
from imagebackend.cache import locks as cache_locks
from imagebackend.common import fileio
from imagebackend.disk import trust as disk_trust
from imagebackend import exception


def check_base_dir_name(name) -> None:
    """Refuse an ``[imagebackend] base_dir_name`` that is not a plain
    directory name: the cache must sit directly inside instances_path.

    :raises imagebackend.exception.ConfigurationError: it is not.
    """
    if (not isinstance(name, str) or name in ("", ".", "..")
            or "/" in name or "\0" in name):
        raise exception.ConfigurationError(
            reason="[imagebackend] base_dir_name = %r is not a plain "
                   "directory name; give a name without '/' that is not "
                   "'.' or '..', such as the default '_base'" % (name,))


class Store:
    """Paths and locks of one cache.

    :param instances_path: the directory the cache lives in (absolute).
    :param base_dir: the cache directory, ``_base`` (absolute).
    :param lock_dir: the lock directory (absolute).
    :param lock_timeout: the longest wait, in seconds, for a lock without
        progress from its holder (0 or None: no limit).
    """

    def __init__(self, instances_path: str, base_dir: str, lock_dir: str,
                 lock_timeout: float | None) -> None:
        self.instances_path = instances_path
        self.base_dir = base_dir
        self.lock_dir = lock_dir
        self.lock_timeout = lock_timeout
        self._shared_checked = 0.0
        self._dirs_ready = False

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> "Store":
        """The store ``conf`` describes: ``_base`` is ``[imagebackend]
        base_dir_name`` inside ``instances_path``; locks go to
        ``[oslo_concurrency] lock_path``, by default
        ``<instances_path>/locks``.

        :raises imagebackend.exception.ConfigurationError:
            ``base_dir_name`` is not a plain directory name.
        """
        opts = conf.imagebackend
        check_base_dir_name(opts.base_dir_name)
        # One owner of where things are: the disk layer's view, which
        # disk operations use too without the cache.
        paths = disk_trust.cache_paths(conf)
        return cls(paths.instances_path, paths.base_dir, paths.lock_dir,
                   opts.lock_wait_timeout)

    # -- names ---------------------------------------------------------------

    def base_path(self, cid: str) -> str:
        """The path of base ``cid`` (a stem: ``<cache_id>[-<N>]``)."""
        return os.path.join(self.base_dir, cid)

    def sized_path(self, cid: str, size: int) -> str:
        """The path of base ``cid`` grown to ``size`` bytes."""
        return os.path.join(self.base_dir, "%s_%d" % (cid, size))

    def check_regular(self, path: str) -> bool:
        """True if ``path`` is a regular file, False if it is missing.

        :raises imagebackend.exception.UnsafeCachePath: it is anything
            else (a symlink, a directory, a device): nothing in the cache
            is followed through a symlink.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise exception.UnsafeCachePath(
                path=path, reason="it is not a regular file (symlinks are "
                                  "never followed in the cache)")
        return True

    def remove_scratch(self, path: str) -> None:
        """Remove a scratch file this process made (never another's: a
        fetch on a host locking elsewhere may be writing one beside it).
        """
        if self.check_regular(path):
            os.unlink(path)

    def mark_stale(self, stem: str, reason: str) -> bool:
        """Mark generation ``stem`` stale: no new disk will use it.

        :returns: True if it was not stale before.
        """
        return cache_layout.mark_stale(self.base_path(stem) + ".json",
                                       reason)

    # -- directories ---------------------------------------------------------

    def ensure_dirs(self) -> None:
        """Create the cache and lock directories if missing, and refuse a
        lock directory other users of this cache do not share (see
        :func:`imagebackend.cache.lockdirs.check_shared`).

        :raises imagebackend.exception.CacheError: a directory cannot be
            created.
        :raises imagebackend.exception.SplitLockDirectory: another
            configuration uses this cache with another lock directory.
        """
        if self._dirs_ready:
            return
        for path, option in ((self.base_dir, "[imagebackend] "
                              "instances_path and base_dir_name"),
                             (self.lock_dir, "[oslo_concurrency] lock_path")):
            try:
                fileio.ensure_dir(path)
            except OSError as exc:
                raise exception.CacheError(
                    path=path,
                    reason="cannot create the directory (%s); check %s and "
                           "the permissions and free space there"
                           % (exc.strerror or exc, option)) from exc
        cache_layout.check_private_dirs(self.base_dir)
        self.check_shared()
        self._dirs_ready = True

    def check_shared(self, record: bool = False) -> None:
        """Check that the lock directory is the one every user of this
        cache locks in; with ``record``, also say that this configuration
        uses it (at most hourly: a running cache refreshes its entry).

        :raises imagebackend.exception.SplitLockDirectory: it is not.
        :raises imagebackend.exception.CacheError: the entries cannot be
            read or written.
        """
        now = time.monotonic()
        if (record and self._shared_checked
                and now - self._shared_checked < lockdirs.LOCK_DIR_REFRESH):
            return
        try:
            lockdirs.check_shared(self.base_dir, self.lock_dir,
                                  record=record)
        except OSError as exc:
            raise exception.CacheError(
                path=self.base_dir,
                reason="cannot check which lock directory uses it (%s); "
                       "check its free space and permissions"
                       % (exc.strerror or exc)) from exc
        if record:
            self._shared_checked = now

    # -- locks ---------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, blocking: bool = True,
             what: str | None = None):
        """Hold the inter-process (and inter-thread) lock ``name``,
        waiting at most :attr:`lock_timeout` seconds without progress from
        the holder (its scratch files in ``_base`` growing).

        :param what: what it protects, for messages ("image X").
        :raises imagebackend.cache.locks.Busy: ``blocking`` is False and
            the lock is held.
        :raises imagebackend.exception.LockWaitTimeout: the wait was too
            long; the error names the holder.
        :raises imagebackend.exception.LockFileError: the lock file cannot
            be created (a full lock directory).
        """
        self.ensure_dirs()
        with cache_locks.exclusive(
                self.lock_dir, name, blocking=blocking,
                timeout=self.lock_timeout, what=what,
                activity=lambda: self.scratch_activity(name)):
            yield

    @contextlib.contextmanager
    def use(self, cid: str, *, exclusive: bool = False,
            blocking: bool = True, what: str | None = None):
        """Hold image ``cid``'s use lock: shared while a disk is made
        from one of its bases, exclusive while the pruner removes one.

        :raises imagebackend.cache.locks.Busy: ``blocking`` is False and
            a conflicting lock is held.
        :raises imagebackend.exception.LockWaitTimeout: the wait was too
            long.
        """
        self.ensure_dirs()
        with cache_locks.flocked(
                cache_locks.use_lock_file(self.lock_dir, cid),
                shared=not exclusive, blocking=blocking,
                timeout=self.lock_timeout, what=what):
            yield

    @contextlib.contextmanager
    def exclusive_image(self, cid: str):
        """Hold image ``cid``'s fetch lock and its use lock exclusively,
        without waiting (before removing or moving anything of it).

        :raises imagebackend.cache.locks.Busy: a fetch or a disk creation
            of the image is in progress.
        """
        with self.lock(cid, blocking=False):
            with cache_locks.flocked(
                    cache_locks.use_lock_file(self.lock_dir, cid),
                    blocking=False):
                yield

    def scratch_activity(self, name: str) -> float | None:
        """When scratch of ``name`` (a stem or a sized base name) was
        last modified, or None: the progress of whoever holds its lock.
        """
        latest = None
        try:
            entries = os.scandir(self.base_dir)
        except OSError:
            return None
        with entries:
            for entry in entries:
                if not entry.name.startswith(name):
                    continue
                parsed = cache_layout.parse(entry.name)
                if parsed is None or not parsed.is_scratch:
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                latest = mtime if latest is None else max(latest, mtime)
        return latest
