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

"""The registry of disks the library made: one small JSON record per
creation attempt under ``_base/.disks/<cache_id>/``, written before the
disk names a base and read without following symlinks.  It tells the
usage scanner which bases disks anywhere use, and tells disk operations a
disk's format from our record instead of from the disk's bytes.
"""

import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import stat
import time

from imagebackend.cache import layout as cache_layout
from imagebackend.common import fileio

LOG = logging.getLogger(__name__)

#: an attempt's intent record younger than this is never collected, even
#: if its files look gone (a creation in progress always holds the image's
#: use lock, which collection takes exclusively; this covers a host whose
#: locks are split or missing).
INTENT_GRACE = 3600
#: record states: written before the disk is made, and once it is named.
INTENT = "intent"
DONE = "done"
#: the extended attribute naming a disk's registry token.
MARK_XATTR = "user.imagebackend.record"
#: the extended attribute that marks an intent record done without
#: rewriting it (its value: :data:`DONE`).
STATE_XATTR = "user.imagebackend.state"
_RECORD_KEYS = ("disk", "tmp", "base", "format", "image_id", "host",
                "created_at", "state")


class Registry:
    """The record of disks the library created, one file per attempt:
    ``_base/.disks/<cache_id>/<sha1 of the disk path>-<token>.json``.

    A creation writes an *intent* record (durably) before anything that
    names a base has a name (a disk is built under a temporary name made
    after the record is durable, or as a file without a name while the
    record is made durable: :meth:`start`), publishes the disk, then marks
    its own record *done* -- or removes only its own record on failure.
    So a base is never without a record of the disk that may use it, and
    a losing concurrent request for one target never touches the winner's
    record.  Raw disks are recorded too (format
    ``raw``, base ``None``): their content is guest data, never a header
    to follow.

    A record is marked done by a rewrite, or -- when nothing else in it
    changes (no temporary name to forget, the same file), and where the
    filesystem has extended attributes -- by :data:`STATE_XATTR` on the
    record's own file, a change that creates no file and writes no data.

    Every record read through :meth:`records` has the keys ``disk``,
    ``tmp``, ``base``, ``format``, ``image_id``, ``host``, ``created_at``,
    ``state`` and ``_path`` (its file); done records may add ``dev`` and
    ``ino`` (the disk's file).  Records are read and written without
    following a symlink.

    :param roots: the directories the scanner searches.
    """

    def __init__(self, base_dir: str, roots: list[str]) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.directory = os.path.join(self.base_dir, cache_layout.DISKS_DIR)
        self.roots = [os.path.join(os.path.abspath(r), "") for r in roots]
        self.host = socket.gethostname()
        #: the records this process wrote and has not confirmed or
        #: removed yet, by path.
        self._written: dict[str, dict] = {}

    @staticmethod
    def _key(disk: str) -> str:
        return hashlib.sha1(
            disk.encode("utf-8", "surrogateescape")).hexdigest()

    def _cid_dir(self, cid: str) -> str:
        """The record directory of image ``cid``, made if missing (and
        durably: a record in a directory that is lost is lost too).

        :raises OSError: it cannot be made, or is not a real directory.
        """
        directory = os.path.join(self.directory, cid)
        try:
            if stat.S_ISDIR(os.lstat(directory).st_mode):
                return directory
        except FileNotFoundError:
            pass
        made = []
        for path in (self.directory, directory):
            try:
                os.mkdir(path, 0o755)
                made.append(path)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise NotADirectoryError(
                    errno.ENOTDIR, "not a directory (symlinks are never "
                    "followed in the cache)", path)
        for path in made:
            fileio.fsync_dir(os.path.dirname(path))
        return directory

    def begin(self, cid: str, image_id: str, disk: str, tmp: str | None,
              base: str | None, fmt: str,
              st: os.stat_result | None = None) -> str:
        """Durably record the intent to make ``disk`` (now being built as
        ``tmp``) of format ``fmt`` over ``base`` (``None`` for a disk
        without a backing file) of image ``cid``.

        :param st: the stat of ``tmp``, to tie the record to that file.
        :returns: the record's path, for :meth:`confirm` and
            :meth:`rollback`.
        :raises OSError: the record cannot be written.
        """
        return self.start(cid, image_id, disk, tmp, base, fmt, st,
                          background=False).wait()

    def start(self, cid: str, image_id: str, disk: str, tmp: str | None,
              base: str | None, fmt: str, st: os.stat_result | None = None,
              *, fd: int | None = None, background: bool = True
              ) -> "Intent":
        """Write the intent record of :meth:`begin`, and make it durable in
        a thread of its own (``background``), so that the caller can build
        the disk meanwhile; the caller waits (:meth:`Intent.wait`) before
        the disk gets a name.

        :param st: the stat of the file being built (``tmp``, or the
            unnamed file ``fd`` when ``tmp`` is ``None``), to tie the record
            to it.
        :param fd: that file, open (labelled through it rather than
            ``tmp``).
        :raises OSError: the record cannot be written (nothing is left).
        """
        disk = os.path.abspath(disk)
        token = secrets.token_hex(8)
        path = os.path.join(self._cid_dir(cid), "%s-%s.json" % (
            self._key(disk), token))
        record = {"disk": disk, "tmp": tmp, "base": base, "format": fmt,
                  "image_id": image_id, "host": self.host,
                  "created_at": time.time(), "state": INTENT}
        if st is not None:
            record.update(dev=st.st_dev, ino=st.st_ino)
            if _set_mark(tmp if fd is None else fd, token):
                record["mark"] = token
        # A new name per attempt, so no rename is needed: a reader sees an
        # empty file (skipped) until the one write has put all of it.
        data = _encode(record)
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                      | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.write(out, data) != len(data):
                raise OSError(errno.EIO, "short write", path)
        except BaseException:
            os.close(out)
            fileio.remove_quietly(path)
            raise
        self._written[path] = record
        directory = os.path.dirname(path)
        if not background:
            try:
                _sync_fd(out)
                fileio.fsync_dir(directory)
            except BaseException:
                self.rollback(path)
                raise
            return Intent(self, path, [])
        # Its bytes and its name, each durable in a thread of its own.
        return Intent(self, path, [fileio.Background(_sync_fd, out),
                                   fileio.Background(fileio.fsync_dir,
                                                     directory)])

    def confirm(self, path: str, st: os.stat_result | None = None) -> None:
        """Mark the attempt recorded in ``path`` done (its disk exists).

        Not fsynced: an intent record whose disk exists already counts as
        a use and names the disk's format, so losing this on a crash is
        harmless.  Where only the state changes, the record is labelled
        done (:data:`STATE_XATTR`) instead of rewritten.

        :param st: the stat of the published disk.
        :raises OSError: the record cannot be rewritten.
        """
        # The record as this process wrote it (no one else rewrites an
        # attempt's record), else as it reads now.
        record = self._written.pop(path, None)
        if record is None or not os.path.lexists(path):
            record = self._read(path)
        if record is None:
            raise FileNotFoundError(errno.ENOENT, "registry record is gone",
                                    path)
        if (record["state"] == INTENT and record["tmp"] is None
                and (st is None or (record.get("dev"), record.get("ino"))
                     == (st.st_dev, st.st_ino))
                and _label_done(path)):
            return
        record["state"] = DONE
        record["tmp"] = None
        if st is not None:
            record.update(dev=st.st_dev, ino=st.st_ino)
        # Through a name of this attempt's own beside it, and a rename.
        tmp = os.path.join(os.path.dirname(path),
                           ".%s.tmp" % os.path.basename(path))
        with fileio.new_file(tmp) as fd:
            data = _encode(record)
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write", tmp)
        try:
            os.rename(tmp, path)
        except BaseException:
            fileio.remove_quietly(tmp)
            raise

    def rollback(self, path: str) -> None:
        """Remove the record of a failed attempt (this attempt's only)."""
        self._written.pop(path, None)
        if fileio.remove_quietly(path):
            try:
                fileio.fsync_dir(os.path.dirname(path))
            except OSError as exc:
                LOG.warning("Could not flush the removal of %s: %s", path,
                            exc)

    def add(self, cid: str, image_id: str, disk: str, base: str | None,
            fmt: str = "qcow2") -> str:
        """Record ``disk``, made over ``base`` of image ``cid`` by some
        other means, as done.

        :raises OSError: the record cannot be written.
        """
        path = self.begin(cid, image_id, disk, None, base, fmt)
        self.confirm(path)
        return path

    def cids(self) -> list[str]:
        try:
            if not stat.S_ISDIR(os.lstat(self.directory).st_mode):
                return []
            return sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []

    def records(self, cid: str | None = None, key: str | None = None):
        """Yield every record (of image ``cid`` only, if given; of the disk
        whose :meth:`_key` is ``key`` only, if given), each with ``_path``
        set to its file.
        """
        for one in ([cid] if cid else self.cids()):
            directory = os.path.join(self.directory, one)
            try:
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    continue
                names = sorted(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if not name.endswith(".json") or name.startswith("."):
                    continue
                if key is not None and not name.startswith(key):
                    continue
                path = os.path.join(directory, name)
                record = self._read(path)
                if record is not None:
                    record["_path"] = path
                    yield record

    @staticmethod
    def _read(path: str) -> dict | None:
        record = fileio.read_json(path, limit=64 * 1024)
        if record is None or not isinstance(record.get("disk"), str):
            return None
        if "state" not in record:
            # Written before intents existed: after the disk was made, and
            # only for qcow2 overlays.
            record["state"] = DONE
            record.setdefault("format", "qcow2")
        for name in _RECORD_KEYS:
            record.setdefault(name, None)
        if record["state"] == INTENT and _labelled_done(path):
            record["state"] = DONE
        return record

    def find(self, disk_path: str) -> dict | None:
        """The record of the disk at ``disk_path``, if the library made it:
        the newest *done* record whose disk is still that file, else the
        newest intent record whose attempt published the file there.  Only
        records tied to their file (inode, and a label where the filesystem
        has extended attributes) count, so a file put at a recorded path by
        anything else is never taken for the library's disk.  Read-only.

        :returns: the record (see :meth:`records`), or ``None``: the file
            was not made by the library, or is not the file it made.
        """
        try:
            st = os.stat(disk_path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        names = {os.path.abspath(disk_path), os.path.realpath(disk_path)}
        found = [r for name in names
                 for r in self.records(key=self._key(name))
                 if r["disk"] == name and _names_file(r, st)]
        for state in (DONE, INTENT):
            mine = [r for r in found if r["state"] == state]
            if mine:
                return max(mine, key=lambda r: _number(r["created_at"]))
        return None

    def collect(self, cid: str, bases_of, now: float | None = None) -> int:
        """Remove this host's records of image ``cid`` that no longer
        describe a disk: neither the disk nor the attempt's temporary file
        exists (or the disk is another file now), or a qcow2 disk no longer
        uses a base.  An intent record younger than :data:`INTENT_GRACE`
        is kept whatever its files look like; an older one belongs to an
        attempt that died, whose temporary file is removed first.

        The caller holds the image's use lock exclusively, so no creation
        of the image (which holds it shared from before its intent record
        until its record is done or removed) is in progress.

        :param bases_of: ``bases_of(path, stat)`` -> bases the disk uses.
        :returns: the number of records removed.
        """
        now = time.time() if now is None else now
        removed = 0
        for record in list(self.records(cid)):
            if record["host"] != self.host:
                continue
            if record["state"] != DONE:
                if now - _number(record["created_at"]) < INTENT_GRACE:
                    continue
                self._remove_dead_temp(record)
            if self._describes_a_disk(record, bases_of):
                continue
            if fileio.remove_quietly(record["_path"]):
                removed += 1
        try:
            os.rmdir(os.path.join(self.directory, cid))
        except OSError:
            pass        # not empty, or already gone
        return removed

    @staticmethod
    def _remove_dead_temp(record) -> None:
        """Remove the temporary file of an attempt that died (its intent
        is old and, as the image's use lock is held exclusively, no
        creation is running): scratch, like a ``.part`` in the cache.  Only
        the very file the record names -- beside its disk, hidden, with the
        attempt's inode and label -- is removed; if the attempt had already
        published it, that removes a second name, not the disk.
        """
        tmp, disk = record["tmp"], record["disk"]
        if not isinstance(tmp, str) or os.path.dirname(tmp) != (
                os.path.dirname(disk)):
            return
        name = os.path.basename(tmp)
        if not (name.startswith(".") and name.endswith(".tmp")):
            return
        try:
            st = os.lstat(tmp)
        except OSError:
            return
        if (not stat.S_ISREG(st.st_mode)
                or not isinstance(record.get("ino"), int)
                or not _is_its_disk(dict(record, disk=tmp), st)):
            return
        if fileio.remove_quietly(tmp):
            LOG.info("Removed %s, left by a disk creation that did not "
                     "finish", tmp)

    @staticmethod
    def _describes_a_disk(record, bases_of) -> bool:
        tmp = record["tmp"]
        if isinstance(tmp, str) and os.path.lexists(tmp):
            return True
        disk = record["disk"]
        try:
            st = os.lstat(disk)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not _is_its_disk(record, st):
            return False
        if record["format"] == "raw":
            return True
        return bool(bases_of(disk, st))


class Intent:
    """An intent record written by :meth:`Registry.start`, perhaps still
    being made durable.

    :ivar path: the record's path.
    """

    def __init__(self, registry: Registry, path: str, syncs: list) -> None:
        self.path, self._registry, self._syncs = path, registry, syncs

    def wait(self) -> str:
        """Wait until the record is durable.

        :returns: its path, for :meth:`Registry.confirm` and
            :meth:`Registry.rollback`.
        :raises OSError: it could not be made durable; it is removed.
        """
        failed = None
        for sync in self._syncs:
            try:
                sync.wait()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            self._registry.rollback(self.path)
            raise failed
        return self.path


def _sync_fd(fd: int) -> None:
    """fsync the open file ``fd``, then close it."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _names_file(record: dict, st: os.stat_result) -> bool:
    """Whether ``record`` is tied to a file, which is the regular file at
    its disk path (not a symlink), and that file is ``st``.
    """
    if not isinstance(record.get("ino"), int):
        return False
    try:
        here = os.lstat(record["disk"])
    except OSError:
        return False
    return (stat.S_ISREG(here.st_mode) and os.path.samestat(here, st)
            and _is_its_disk(record, here))


def _set_mark(path: str | int, token: str) -> bool:
    """Label the new file ``path`` with its record's token (an extended
    attribute), so that a record is never taken for another file that got
    the same name and a reused inode number.

    :returns: False where the filesystem has no extended attributes.
    """
    try:
        if isinstance(path, int):
            os.setxattr(path, MARK_XATTR, token.encode())
        else:
            os.setxattr(path, MARK_XATTR, token.encode(),
                        follow_symlinks=False)
        return True
    except OSError as exc:
        LOG.debug("Cannot label %s with its registry token: %s", path, exc)
        return False


def _label_done(path: str) -> bool:
    """Mark the record ``path`` done by :data:`STATE_XATTR`.

    :returns: False where that cannot be done (no extended attributes on
        this filesystem, or the record is not a regular file): the caller
        rewrites the record instead.
    """
    try:
        os.setxattr(path, STATE_XATTR, DONE.encode(), follow_symlinks=False)
        return True
    except OSError as exc:
        LOG.debug("Cannot label registry record %s done: %s", path, exc)
        return False


def _labelled_done(path: str) -> bool:
    """Whether the record ``path`` carries the done label."""
    try:
        return os.getxattr(path, STATE_XATTR,
                           follow_symlinks=False) == DONE.encode()
    except OSError:
        return False


def _is_its_disk(record: dict, st: os.stat_result) -> bool:
    """Whether the file at the record's disk path, whose stat is ``st``, is
    the file the record's attempt made (as far as the record says which).
    """
    if isinstance(record.get("ino"), int) and (
            record["ino"] != st.st_ino or record.get("dev") != st.st_dev):
        return False
    mark = record.get("mark")
    if isinstance(mark, str):
        try:
            found = os.getxattr(record["disk"], MARK_XATTR,
                                follow_symlinks=False)
        except OSError:
            return False
        return found == mark.encode()
    return True


def _encode(record: dict) -> bytes:
    """A record's bytes: one line of JSON (the C encoder's)."""
    return json.dumps(record, sort_keys=True).encode() + b"\n"


def _number(value) -> float:
    return value if isinstance(value, (int, float)) else 0.0
