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

"""The instance disk's place: checking a target before anything is made,
its directories, its temporary name and its no-replace publish, and the
errors that name it.

A target is a file path outside the image cache and its lock directory
(compared as real paths, so a symlinked directory into ``_base`` is refused
too), not ending in ``/``, ``.`` or ``..``.  Directories a call creates are
removed again if it fails.
"""

import contextlib
import errno
import os

from imagebackend.common import fileio
from imagebackend import exception

#: the largest disk size that any file can have (``off_t``).
MAX_DISK_SIZE = 2 ** 63 - 1
#: what to do about an error while making a disk, by errno.
_OS_HINTS = {
    errno.ENOSPC: "; free space on its filesystem or choose another",
    errno.EDQUOT: "; raise the quota or choose another filesystem",
    errno.EACCES: "; check the permissions of its directory",
    errno.EPERM: "; check the permissions of its directory",
    errno.EROFS: "; its filesystem is read-only, choose another",
    errno.ENAMETOOLONG: "; choose a shorter name",
}


def normalize(target) -> str:
    """``target`` as an absolute path.

    :raises imagebackend.exception.InvalidTarget: it is empty, not a path,
        or names a directory (ends in ``/``, ``.`` or ``..``).
    """
    try:
        target = os.fsdecode(target)
    except TypeError as exc:
        raise exception.InvalidTarget(
            path=repr(target), reason="it is not a path") from exc
    if not target:
        raise exception.InvalidTarget(
            path="''", reason="the path is empty; give the path of the disk "
                              "file to create")
    name = os.path.basename(target)
    if name in ("", ".", ".."):
        raise exception.InvalidTarget(
            path=target,
            reason="it names a directory (it ends in %r); give the path of "
                   "the disk file itself, such as %s"
                   % (name or os.sep, os.path.join(
                       target.rstrip(os.sep) or os.sep, "disk")))
    return os.path.abspath(target)


def check_size(image_id: str, size) -> None:
    """:raises imagebackend.exception.InvalidImageSize: ``size`` is not a
    positive number of bytes that a file can have.
    """
    if (not isinstance(size, int) or isinstance(size, bool) or size <= 0
            or size > MAX_DISK_SIZE):
        raise exception.InvalidImageSize(
            image_id=image_id,
            reason="the requested disk size must be a positive number of "
                   "bytes up to %d, not %r" % (MAX_DISK_SIZE, size))


def check_place(target: str, cache) -> None:
    """Refuse a ``target`` (absolute) inside ``cache``'s directories, or
    one that exists.

    :param cache: the :class:`imagebackend.cache.ImageCache`.
    :raises imagebackend.exception.InvalidTarget: it is inside the cache or
        its lock directory.
    :raises imagebackend.exception.TargetExists: it exists.
    """
    real = os.path.join(fileio.real_path(os.path.dirname(target)),
                        os.path.basename(target))
    for area, what in ((cache.base_dir, "the image cache"),
                       (cache.lock_dir, "the cache's lock directory")):
        if _within(real, fileio.real_path(area)) or _within(target, area):
            raise exception.InvalidTarget(
                path=target,
                reason="it is inside %s %s, where only the cache writes; "
                       "put instance disks anywhere else, such as %s"
                       % (what, area, os.path.join(cache.instances_path,
                                                   "<instance>", "disk")))
    if os.path.lexists(target):
        raise exception.TargetExists(path=target)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(os.path.join(directory, ""))


def make_parent(target: str) -> list[str]:
    """Make ``target``'s missing directories.

    :returns: those made, for ``fileio.remove_made_dirs``.
    :raises imagebackend.exception.InvalidTarget: they cannot be made.
    """
    try:
        return fileio.make_dirs(os.path.dirname(target))
    except OSError as exc:
        raise exception.InvalidTarget(
            path=target,
            reason="its directory cannot be created: %s" % exc) from exc


def new_temp(target: str, made: list[str]) -> str:
    """A new, empty file of the caller's own beside ``target``; see
    :func:`imagebackend.common.fileio.temp_beside`.

    :param made: the directories this call made; extended if it has to
        make them again.
    """
    try:
        return fileio.temp_beside(target)
    except FileNotFoundError:
        # A concurrent call that made the directory failed and removed it
        # again: make it once more, as ours now.
        made += make_parent(target)
        return fileio.temp_beside(target)


def publish(tmp: str, target: str) -> None:
    """Give ``tmp`` the name ``target`` unless it is taken.

    :raises imagebackend.exception.TargetExists: it is taken.
    :raises OSError: see :func:`imagebackend.common.fileio.publish`.
    """
    try:
        fileio.publish(tmp, target)
    except FileExistsError as exc:
        raise exception.TargetExists(path=target) from exc


@contextlib.contextmanager
def errors(image_id: str, target: str, size: int):
    """Turn an operating-system error while making ``target`` into the
    library's own, naming the disk and the fix; a qemu-img failure on the
    temporary file names ``target`` instead.
    """
    try:
        yield
    except exception.QemuImgError as exc:
        made = exc.kwargs.get("path")
        if (type(exc) is not exception.QemuImgError
                or not isinstance(made, str)
                or not made.startswith(os.path.join(os.path.dirname(target),
                                                    "."))):
            raise
        kwargs = {key: str(value).replace(made, target)
                  for key, value in exc.kwargs.items()}
        kwargs["path"] = target
        raise exception.DiskNotCreated(**kwargs) from exc
    except exception.ImageBackendException:
        raise
    except OSError as exc:
        if exc.errno in (errno.EFBIG, errno.EINVAL):
            raise exception.InvalidImageSize(
                image_id=image_id,
                reason="the filesystem holding %s refused a disk of %d bytes "
                       "(%s); ask for a smaller size or put the disk on "
                       "another filesystem"
                       % (target, size, exc.strerror)) from exc
        raise exception.DiskOperationError(
            path=target,
            reason="it could not be created (%s); nothing was kept%s"
                   % (exc.strerror or exc, _OS_HINTS.get(exc.errno, ""))
        ) from exc
