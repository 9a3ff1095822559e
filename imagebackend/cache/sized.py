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

"""Sized bases for the cached-base backend: ``_base/<stem>_<size>``, the
base grown to ``<size>`` bytes, made once per image and size under its own
lock and shared by every disk of that size.

A sized base is built in a scratch file of its own, fsynced, checked and
hashed; its own record (``<stem>_<size>.json``, kind ``sized``, with the
sparse digest of its bytes) is published first and the file then linked
into place, both without replacing anything (see
:mod:`imagebackend.cache.publish`), so it stays verifiable after its
original is pruned.
"""

import logging
import os
import time
import typing

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.cache import store as cache_store
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception

LOG = logging.getLogger(__name__)


class SizedBases:
    """Makes and publishes the sized bases of one cache.

    :param store: the cache's paths and locks.
    """

    def __init__(self, store: cache_store.Store) -> None:
        self.store = store

    def publish(self, final: str, lock_name: str,
                build: typing.Callable[[int, str], None]) -> bool:
        """Make sized base ``final`` (``<stem>_<size>``) once, under
        ``lock_name``, without ever replacing anything.

        It is built in a scratch file of its own, fsynced, checked (its
        size) and hashed (``sparse-64k-xxh3-padded``); its record
        ``<final>.json`` is published first and the file then linked
        into place, both without replacing: a sized base another process
        published meanwhile is adopted.

        :param build: called as ``build(fd, tmp_path)`` to fill a new
            temporary file.
        :returns: True if ``final`` already existed (a cache hit; its
            modification time, the last-used time, is refreshed).
        :raises imagebackend.exception.CacheError: it could not be
            published.
        """
        if self.store.check_regular(final):
            _utime_quietly(final)
            return True
        with self.store.lock(lock_name, what="sized base %s" % final):
            if self.store.check_regular(final):
                _utime_quietly(final)
                return True
            self.store.check_shared()
            tmp = cache_layout.scratch_name(final, ".part")
            try:
                with fileio.new_file(tmp) as fd:
                    build(fd, tmp)
                    os.fsync(fd)
                    published = self._publish_sized(final, tmp)
            finally:
                fileio.remove_quietly(tmp)
        return not published

    def _publish_sized(self, final: str, tmp: str) -> bool:
        """Record and publish the built sized base ``tmp`` as ``final``.

        :returns: False if an equal one was published meanwhile (adopted).
        """
        name = cache_layout.parse(os.path.basename(final))
        base_record = fileio.read_json(self.store.base_path(name.stem)
                                       + ".json") or {}
        fmt = base_record.get("format") or "raw"
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if fmt == "raw" and size != name.size:
                raise exception.CacheError(
                    path=self.store.base_dir,
                    reason="the sized base built for %s is %d bytes long, "
                           "not %d; check the filesystem and retry"
                           % (final, size, name.size))
            record = {
                "kind": "sized",
                "image_id": base_record.get("image_id"),
                "base": name.stem,
                "size": name.size,
                "format": fmt,
                "digest": {"scheme": content_digest.SPARSE,
                           "value": content_digest.file_digests(
                               fd)["sparse"]},
                "created_at": cache_layout.isotime(time.time()),
            }
            try:
                found = cache_publish.publish_record(final + ".json",
                                                     record)
                if found is None or _same_sized(found, record, fd):
                    if fileio.publish_fd(fd, tmp, final):
                        fileio.fsync_dir(self.store.base_dir)
                        return True
            except OSError as exc:
                raise cache_publish.publish_error(final, exc) from exc
        finally:
            os.close(fd)
        # Published meanwhile by a process locking elsewhere: use it if
        # it is what was built here.
        if self.store.check_regular(final) and (
                fmt != "raw" or os.lstat(final).st_size == name.size):
            LOG.info("Sized base %s was published by another process "
                     "meanwhile; using it", final)
            return False
        raise exception.CachePublishConflict(
            path=self.store.base_dir, image_id=record["image_id"],
            reason="the record of sized base %s describes other content "
                   "than was built" % final)


def _same_sized(found: dict, ours: dict, fd: int) -> bool:
    """Whether sized-base record ``found`` describes what ``ours`` (of the
    file open as ``fd``) does.
    """
    keys = ("kind", "image_id", "base", "size", "format")
    if any(found.get(key) != ours.get(key) for key in keys):
        return False
    # A raw sized base's bytes are fixed by its base; another qemu-img may
    # lay out a qcow2 one differently.
    if ours["format"] != "raw":
        return True
    theirs = found.get("digest")
    if not isinstance(theirs, dict) or not isinstance(theirs.get("scheme"),
                                                      str):
        return False
    if theirs["scheme"] != ours["digest"]["scheme"]:
        # Recorded by an earlier release: hash the file as it did.
        try:
            mine = content_digest.file_digests(fd, scheme=theirs["scheme"])
        except ValueError:
            return False
        return theirs.get("value") == mine["sparse"]
    return theirs == ours["digest"]


def _utime_quietly(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
