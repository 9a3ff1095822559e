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

"""Importing a base into Ceph once per cluster: the cluster-wide lock on a
base's lock object, and the sparse import under a temporary name,
snapshotted, protected and renamed last.
"""

import contextlib
import hashlib
import logging
import os
import struct
import time
import uuid

from imagebackend.backends import rbd_cluster
from imagebackend import exception

LOG = logging.getLogger(__name__)

#: the name of the cluster-wide lock taken on a base's lock object.
LOCK_NAME = "imagebackend-import"
#: a lock not renewed for this long (seconds) expires: its holder died.
LOCK_DURATION = 300
#: the holder of a lock renews it at least this often (seconds).
LOCK_RENEW = 60
#: librados' flag that renews a lock this client holds.
_LOCK_FLAG_RENEW = 1
#: the bytes read and written at a time (librbd's default object size).
CHUNK = 4 * 1024 * 1024
#: the unit of zero detection: only the runs of blocks that hold data
#: are written.
BLOCK = 64 * 1024
#: asynchronous writes in flight at most.
IN_FLIGHT = 16


@contextlib.contextmanager
def lock(conn, pool: str, name: str, wait: int):
    """Hold the cluster-wide lock on image ``name``'s lock object in
    ``pool``: one host at a time, on any host.  It expires
    :data:`LOCK_DURATION` seconds after it was last renewed, so a
    holder that died does not block the others for longer.

    :param wait: seconds to wait for it (0: no limit; negative: try
        once).
    :returns: (as the context) a function that renews the lock; call
        it often, it renews at most every :data:`LOCK_RENEW` seconds.
    :raises imagebackend.exception.LockWaitTimeout: not had in time.
    """
    ioctx = conn.ioctx(pool)
    key = "imagebackend_lock.%s" % name
    cookie = uuid.uuid4().hex
    start = time.monotonic()
    delay = 0.02
    desc = "host %s pid %d" % (os.uname().nodename, os.getpid())
    while True:
        with conn.errors("locking %s/%s" % (pool, key)):
            try:
                ioctx.lock_exclusive(key, LOCK_NAME, cookie, desc=desc,
                                     duration=LOCK_DURATION)
                break
            except (conn.rados.ObjectBusy, conn.rados.ObjectExists):
                pass
        waited = time.monotonic() - start
        if wait < 0 or (wait and waited > wait):
            raise exception.LockWaitTimeout(
                path="%s/%s" % (pool, key), what="base %s" % name,
                waited=waited, holder="another host or process",
                timeout=wait)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    renewed = [time.monotonic()]

    def renew():
        if time.monotonic() - renewed[0] < LOCK_RENEW:
            return
        with conn.errors("renewing the lock %s/%s" % (pool, key)):
            ioctx.lock_exclusive(key, LOCK_NAME, cookie, desc=desc,
                                 duration=LOCK_DURATION,
                                 flags=_LOCK_FLAG_RENEW)
        renewed[0] = time.monotonic()

    failed = True
    try:
        yield renew
        failed = False
    finally:
        try:
            with conn.errors("unlocking %s/%s" % (pool, key)):
                ioctx.unlock(key, LOCK_NAME, cookie)
        except exception.RbdError as exc:
            # It expires by itself; an error in flight says more.
            LOG.warning("Could not release the lock %s/%s: %s",
                        pool, key, exc)
            if not failed:
                raise


def import_base(conn, pool: str, name: str, path: str, size: int,
                meta: dict[str, str], renew=None) -> bool:
    """Import the raw file ``path`` as base ``pool/name`` of ``size``
    bytes, all-zero chunks and holes left unwritten, with ``meta`` as
    its metadata, snapshot ``snap`` protected: under a temporary
    name, renamed last.

    :param renew: called between chunks (see :func:`lock`).
    :returns: False when ``pool/name`` appeared meanwhile (another
        host's import, after this host's lock expired); this import is
        then removed.
    :raises imagebackend.exception.RbdError: it failed (the temporary
        image is removed if the cluster still answers).
    """
    ioctx = conn.ioctx(pool)
    tmp = rbd_cluster.temp_name(name)
    with conn.errors("creating image %s/%s" % (pool, tmp)):
        conn.rbd.RBD().create(ioctx, tmp, size, old_format=False,
                              features=conn.rbd.RBD_FEATURE_LAYERING)
    try:
        with conn.errors("importing %s into %s/%s" % (path, pool, tmp)):
            with conn.rbd.Image(ioctx, tmp) as image:
                digest = write_sparse(image, path, renew or (lambda: None))
                image.flush()
                meta = dict(meta, content_sha256=digest)
                for key, value in sorted(meta.items()):
                    image.metadata_set(rbd_cluster.META_PREFIX + key,
                                       str(value))
                image.create_snap(rbd_cluster.SNAP)
                image.protect_snap(rbd_cluster.SNAP)
        with conn.errors("renaming %s/%s to %s" % (pool, tmp, name)):
            try:
                conn.rbd.RBD().rename(ioctx, tmp, name)
            except conn.rbd.ImageExists:
                conn.remove_quietly(pool, tmp)
                return False
    except BaseException:
        conn.remove_quietly(pool, tmp)
        raise
    return True


def write_sparse(image, path: str, renew) -> str:
    """Write the data extents of file ``path`` into ``image``, by
    :data:`BLOCK`-aligned blocks: holes are not read, all-zero blocks
    are not written.

    :returns: the content digest (:func:`add_block` over every block
        written, in order), which :func:`read_digest` computes again from
        the image.
    """
    digest = hashlib.sha256()
    writer = _Writer(image)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for start, piece in _pieces(
                _file_extents(fd, size),
                lambda offset, length: os.pread(fd, length, offset), size):
            for offset, run in _runs(digest, piece, start):
                writer.write(run, offset)
            renew()
        writer.drain()
    finally:
        os.close(fd)
        writer.drain(check=False)
    return digest.hexdigest()


def _file_extents(fd: int, size: int):
    """The ``(offset, end)`` of each data extent of file ``fd``."""
    offset = 0
    while offset < size:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:             # ENXIO: only a hole is left
            return
        end = os.lseek(fd, offset, os.SEEK_HOLE)
        yield offset, end
        offset = end


def _pieces(extents, read, size: int):
    """``(offset, bytes)`` read with ``read(offset, length)`` covering
    ``extents`` (sorted) widened to whole blocks, each block once, at most
    :data:`CHUNK` bytes a piece.
    """
    done = 0
    for offset, end in extents:
        start = max(done, offset - offset % BLOCK)
        stop = min(-(-end // BLOCK) * BLOCK, size)
        while start < stop:
            piece = read(start, min(CHUNK, stop - start))
            if not piece:
                return
            yield start, piece
            start += len(piece)
        done = max(done, start)


def _runs(digest, piece: bytes, start: int):
    """Add the non-zero blocks of ``piece`` (at block-aligned ``start``)
    to ``digest``; yield ``(offset, bytes)`` of each run of them.
    """
    run_start = None
    for pos in range(0, len(piece) + BLOCK, BLOCK):
        end = min(pos + BLOCK, len(piece))
        zero = pos >= len(piece) or piece.count(0, pos, end) == end - pos
        if not zero:
            add_block(digest, start + pos, piece[pos:end])
            if run_start is None:
                run_start = pos
        elif run_start is not None:
            yield start + run_start, piece[run_start:pos]
            run_start = None


class _Writer:
    """Asynchronous writes into an image, at most :data:`IN_FLIGHT` at a
    time (as ``rbd import`` does): one round trip per write would make a
    many-extent image slow.
    """

    def __init__(self, image) -> None:
        self.image = image
        self.pending: list = []

    def write(self, data: bytes, offset: int) -> None:
        if len(self.pending) >= IN_FLIGHT:
            self._wait(self.pending.pop(0), True)
        self.pending.append((self.image.aio_write(data, offset, None),
                             offset, len(data)))

    def drain(self, check: bool = True) -> None:
        """Wait for every write; with ``check``, raise the first error."""
        while self.pending:
            self._wait(self.pending.pop(0), check)

    @staticmethod
    def _wait(pending, check: bool) -> None:
        completion, offset, length = pending
        completion.wait_for_complete_and_cb()
        ret = completion.get_return_value()
        if check and ret < 0:
            raise OSError(-ret, "%s (a write of %d bytes at offset %d)"
                          % (os.strerror(-ret), length, offset))


def add_block(digest, offset: int, block: bytes) -> None:
    """Add the non-zero block at ``offset`` to a content digest."""
    digest.update(struct.pack(">QI", offset, len(block)))
    digest.update(block)


def read_digest(conn, pool: str, name: str) -> str:
    """The content digest of base ``pool/name``'s snapshot, read back
    from the cluster (only the extents that hold data are read).
    """
    with conn.errors("reading base %s/%s" % (pool, name)):
        with conn.rbd.Image(conn.ioctx(pool), name,
                            snapshot=rbd_cluster.SNAP,
                            read_only=True) as image:
            size = image.size()
            extents = []

            def extent(offset, length, exists):
                if exists:
                    extents.append((offset, offset + length))
            image.diff_iterate(0, size, None, extent)
            digest = hashlib.sha256()
            for start, piece in _pieces(sorted(extents), image.read, size):
                for _ in _runs(digest, piece, start):
                    pass
    return digest.hexdigest()
