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

"""Publishing a file in ``_base`` without ever replacing one.

Correctness of the cache must not depend on its locks: two hosts sharing
``_base`` may lock in different directories (a misconfiguration the cache
refuses when it can tell, see
:func:`imagebackend.cache.lockdirs.check_shared`, but cannot always
tell).  So every name is published with a primitive that
fails when the name exists -- a hard link of the open file (the very inode
whose size and digest were just checked), or where the filesystem has no
hard links, ``renameat2(RENAME_NOREPLACE)`` -- and a publisher that finds
the name taken compares what is there with what it made, adopts it or gives
up; it never replaces it (the primitive is
:func:`imagebackend.common.fileio.publish_fd`).  Records are published the
same way, before the file they describe, so a base never appears under a
record that describes other bytes.  :func:`publish_base` publishes a
fetched base this way.
"""

import errno
import json
import logging
import os
import tempfile

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import store as cache_store
from imagebackend.cache import verify as cache_verify
from imagebackend.common import fileio
from imagebackend import exception

LOG = logging.getLogger(__name__)


def publish_record(path: str, record: dict) -> dict | None:
    """Publish JSON ``record`` as ``path`` unless a record is there.

    :returns: ``None`` when ours was published, else the record found
        there (``{}`` if it cannot be read).
    :raises OSError: it could not be written.
    """
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".",
                               suffix=".json.tmp")
    try:
        data = (json.dumps(record, indent=1, sort_keys=True)
                + "\n").encode()
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        if fileio.publish_fd(fd, tmp, path):
            return None
    finally:
        os.close(fd)
        fileio.remove_quietly(tmp)
    return fileio.read_json(path) or {}


def publish_error(path: str, exc: OSError) -> exception.CacheError:
    """The error for a publish that failed with ``exc``."""
    if exc.errno in (errno.EINVAL, errno.ENOSYS):
        reason = ("its filesystem supports neither hard links nor renaming "
                  "without replacing, so the cache cannot publish %s "
                  "safely there; put the cache on a filesystem that does "
                  "(any local filesystem, NFS, CephFS)"
                  % os.path.basename(path))
    else:
        reason = ("publishing %s failed (%s); check the free space and "
                  "permissions of the cache directory"
                  % (os.path.basename(path), exc.strerror or exc))
    return exception.CacheError(path=os.path.dirname(path), reason=reason)


#: how many generations a fetch tries before it gives up publishing.
_PUBLISH_TRIES = 5
# Record fields that say which bytes a base holds.
_CONTENT = ("image_id", "identity", "checksum", "source_format", "format",
            "virtual_size")


def _same_content(found: dict, ours: dict) -> bool:
    """Whether record ``found`` describes the bytes ``ours`` does (and
    may still be used).
    """
    if not found or found.get("stale"):
        return False
    if any(found.get(key) != ours.get(key) for key in _CONTENT):
        return False
    mine = (ours.get("base_checksum") or {}).get("value")
    theirs = (found.get("base_checksum") or {}).get("value")
    return mine is None or theirs is None or mine == theirs


def publish_base(store: cache_store.Store, stem: str, fd: int, path: str,
                 record: dict) -> dict:
    """Publish the checked file ``fd`` (named ``path``) with ``record`` as
    generation ``stem`` without ever replacing anything: the record first
    (no-replace), then the base (a no-replace link).  A name taken by
    another fetch of the same content is adopted; one taken by other
    content makes it try the next free generation.

    :returns: the record the published (or adopted) base has.
    :raises imagebackend.exception.CachePublishConflict: no generation
        could be published after a few tries.
    """
    cid = cache_layout.parse(stem).cid
    try:
        for _ in range(_PUBLISH_TRIES):
            base = store.base_path(stem)
            record["generation"] = cache_layout.parse(stem).generation
            # Taken before ours could be published: the record there
            # decides (none, or a stale one, never makes it adoptable).
            found = {}
            if not os.path.lexists(base):
                found = publish_record(base + ".json", record)
                if found is None or _same_content(found, record):
                    if fileio.publish_fd(fd, path, base):
                        fileio.fsync_dir(store.base_dir)
                        return found or record
            adopted = _adopt(store, base, record, found)
            if adopted is not None:
                fileio.remove_quietly(path)
                return adopted
            LOG.warning("Generation %s of image %s was published meanwhile "
                        "with other content (another host locking "
                        "elsewhere?); publishing the next generation",
                        stem, record["image_id"])
            stem = cache_layout.stem(cid, cache_generations.claim_generation(
                store.base_dir, cid, max(cache_generations.generations(
                    store.base_dir, cid), default=0) + 1))
    except OSError as exc:
        raise publish_error(store.base_path(stem), exc) from exc
    raise exception.CachePublishConflict(
        path=store.base_dir, image_id=record["image_id"],
        reason="other content was published under each of %d generation "
               "names while it was being fetched" % _PUBLISH_TRIES)


def _adopt(store, base, record, found) -> dict | None:
    """The record of the base another fetch published as ``base`` if it
    holds the bytes ``record`` describes, else None.

    :param found: the record that was there when ours was published
        (``{}`` if the base was there before it could be), or ``None`` if
        ours was published (and the base then appeared without one: its
        bytes are checked in full).
    """
    existing = fileio.read_json(base + ".json")
    if found is not None and not _same_content(existing or {}, record):
        return None
    if not store.check_regular(base):
        return None
    st = os.lstat(base)
    if record["format"] == "raw" and st.st_size != record["virtual_size"]:
        return None
    if found is None and not _holds(base, record):
        store.mark_stale(
            os.path.basename(base),
            "its base does not hold the bytes its record describes")
        return None
    LOG.info("Image %s was published as %s by another fetch meanwhile; "
             "using it", record["image_id"], base)
    return existing or record


def _holds(path: str, record: dict) -> bool:
    """Whether file ``path`` holds the bytes ``record`` describes."""
    if record.get("base_checksum"):
        found = cache_verify.digests(path)
        return found["sparse"] == record["base_checksum"]["value"]
    checksum = record["checksum"]
    try:
        found = cache_verify.digests(path, [checksum["algo"]], sparse=False)
    except ValueError:
        return False
    return found["full"][checksum["algo"]] == checksum["value"]
