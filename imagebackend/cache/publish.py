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
refuses when it can tell, see :func:`imagebackend.cache.locks.check_shared`,
but cannot always tell).  So every name is published with a primitive that
fails when the name exists -- a hard link of the open file (the very inode
whose size and digest were just checked), or where the filesystem has no
hard links, ``renameat2(RENAME_NOREPLACE)`` -- and a publisher that finds
the name taken compares what is there with what it made, adopts it or gives
up; it never replaces it.  Records are published the same way, before the
file they describe, so a base never appears under a record that describes
other bytes.
"""

import errno
import json
import logging
import os
import tempfile

from imagebackend.common import fileio
from imagebackend import exception

LOG = logging.getLogger(__name__)

# Errors of linkat() that mean "no hard link here", not "the name exists":
# then a no-replace rename is tried instead.
_NO_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV,
            errno.EMLINK, errno.ENOENT, errno.EACCES)


def rename_noreplace(path: str, final: str) -> bool:
    """Rename ``path`` to ``final`` unless ``final`` exists, atomically
    (never with a look-then-rename: another host may be publishing too).

    :returns: False when ``final`` exists (nothing changed).
    :raises OSError: the filesystem cannot rename without replacing
        (``EINVAL``/``ENOSYS``), or another error.
    """
    try:
        fileio.renameat2_noreplace(path, final)
    except FileExistsError:
        return False
    return True


def publish_fd(fd: int, path: str, final: str) -> bool:
    """Give the open file ``fd`` (whose name is ``path``, in the same
    directory as ``final``) the name ``final``, unless ``final`` exists.

    The file is linked by its descriptor, so what is published is exactly
    the inode the caller checked, whatever happened to ``path``; ``path`` is
    then removed.  The directory is not fsynced (the caller does it once).

    :returns: True when published, False when ``final`` exists (``path``
        is left for the caller to remove).
    :raises OSError: neither a hard link nor a no-replace rename is
        possible on this filesystem, or another error.
    """
    directory, name = os.path.split(final)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY
                     | os.O_CLOEXEC)
    try:
        # dst_dir_fd makes Python call linkat(..., AT_SYMLINK_FOLLOW), which
        # links the file /proc/self/fd/N refers to.
        os.link("/proc/self/fd/%d" % fd, name, dst_dir_fd=dir_fd)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        LOG.debug("Cannot hard-link into %s (%s); renaming without "
                  "replacing instead", directory, exc)
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            raise OSError(errno.ESTALE, "scratch file was replaced",
                          path) from exc
        return rename_noreplace(path, final)
    finally:
        os.close(dir_fd)
    fileio.remove_quietly(path)
    return True


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
        if publish_fd(fd, tmp, path):
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
