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

"""Generation numbers of an image: which ones have files in ``_base``,
and claiming a new one, once and durably, so it is never used twice.

A claim is an empty file ``_base/.generations/<cache_id>/<N>``, made with
an exclusive create before anything of generation N is written, and never
removed (so a disk left naming a pruned generation can never find other
bytes under that name).  Claiming needs no lock: two claimers never get
the same number.
"""

import errno
import os

from imagebackend.cache import layout as cache_layout
from imagebackend import exception


def generations(base_dir: str, cid: str) -> dict[int, set[str]]:
    """The generations of image ``cid`` with any file in ``base_dir``.

    :returns: generation -> the kinds of file it has: ``base``, ``sized``,
        ``record``, ``sized_record``, ``scratch``, ``aside``.
    """
    found: dict[int, set[str]] = {}
    try:
        names = os.listdir(base_dir)
    except FileNotFoundError:
        return found
    for entry in names:
        if not entry.startswith(cid):
            continue
        name = cache_layout.parse(entry)
        if name is None or name.cid != cid:
            continue
        kinds = found.setdefault(name.generation, set())
        if name.suffix == ".json":
            kinds.add("record" if name.size is None else "sized_record")
        elif name.is_scratch:
            kinds.add("scratch")
        elif name.suffix in cache_layout.ASIDE_SUFFIXES:
            kinds.add("aside")
        else:
            kinds.add("base" if name.size is None else "sized")
    return found


def _open_dir(parent_fd: int | None, path: str, create: bool) -> int | None:
    """Open directory ``path`` (relative to ``parent_fd`` if given)
    without following a symlink; ``None`` if it is missing and not to be
    created.

    :raises imagebackend.exception.UnsafeCachePath: it is a symlink or
        not a directory.
    """
    if create:
        try:
            os.mkdir(path, 0o755, dir_fd=parent_fd)
            if parent_fd is not None:
                os.fsync(parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise exception.UnsafeCachePath(
                path=path, reason="it is a symlink or not a directory (the "
                                  "cache never follows symlinks)") from exc
        raise


def _generation_dir(base_dir: str, cid: str, create: bool) -> int | None:
    base_fd = _open_dir(None, base_dir, False)
    if base_fd is None:
        return None
    try:
        try:
            top = _open_dir(base_fd, cache_layout.GENERATIONS_DIR, create)
        except exception.UnsafeCachePath as exc:
            raise exception.UnsafeCachePath(
                path=os.path.join(base_dir, cache_layout.GENERATIONS_DIR),
                reason=exc.kwargs["reason"]) from exc
    finally:
        os.close(base_fd)
    if top is None:
        return None
    try:
        try:
            return _open_dir(top, cid, create)
        except exception.UnsafeCachePath as exc:
            raise exception.UnsafeCachePath(
                path=os.path.join(base_dir, cache_layout.GENERATIONS_DIR, cid),
                reason=exc.kwargs["reason"]) from exc
    finally:
        os.close(top)


def claimed_generation(base_dir: str, cid: str) -> int:
    """The highest generation number ever claimed for image ``cid``
    (0 if none).

    :raises imagebackend.exception.UnsafeCachePath: the claims directory
        is a symlink or not a directory.
    """
    fd = _generation_dir(base_dir, cid, create=False)
    if fd is None:
        return 0
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    return max((int(n) for n in names if n.isdigit() and len(n) < 10),
               default=0)


def claim_generation(base_dir: str, cid: str, floor: int) -> int:
    """Claim a generation number for image ``cid`` no lower than ``floor``
    and higher than any claimed before, durably, before anything of that
    generation is written.  The claim is an exclusive create, so two
    claimers never get the same number, even without a shared lock.

    :returns: the number claimed.
    """
    fd = _generation_dir(base_dir, cid, create=True)
    try:
        number = max(floor, 1)
        for name in os.listdir(fd):
            if name.isdigit() and len(name) < 10:
                number = max(number, int(name) + 1)
        while True:
            try:
                claim = os.open(str(number), os.O_WRONLY | os.O_CREAT
                                | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                0o644, dir_fd=fd)
            except FileExistsError:
                number += 1
                continue
            os.close(claim)
            os.fsync(fd)
            return number
    finally:
        os.close(fd)
