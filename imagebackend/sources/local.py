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

"""Images from a local directory: the image id is a file name in it.

The directory is trusted, its files are not: an id must name a regular file
directly inside the directory, never through ``..``, an absolute path or a
symlink.  Each image's content identity is its length and
``sparse-64k-xxh3`` digest (:mod:`imagebackend.common.digest`: an XXH3-128 of
its non-zero blocks, so that holes are neither read nor hashed; the scheme
that does not pad a last, shorter block, which an identity with its length
does not need, so that images cached before the padded scheme keep their
identity).  It is computed once per version of the file and remembered in
``<base_dir>/.sources/local/<sha1 of the image id>.json``, keyed by the
file's device, inode, size, mtime and ctime; a file modified less than
``_RACY_SECONDS`` before it was hashed is hashed again next time, since a
second change within the filesystem's timestamp granularity would not
show.  The hash is computed while the image is downloaded, if it must be
downloaded anyway; only a cached copy to compare with makes the cache ask
for it beforehand (:meth:`LocalSource.resolve_identity`).  A remembered
hash is verified against the download.
"""

import errno
import inspect
import logging
import os
import stat
import time

from oslo_config import cfg

from imagebackend.common import config_check
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.sources import base

LOG = logging.getLogger(__name__)

_RACY_SECONDS = 2
# The memo's key for the digest (memos of other digests are not used).
_MEMO_KEY = content_digest.SPARSE_XXH3

OPTIONS = [
    cfg.StrOpt("path",
               default="/var/lib/imagebackend/images",
               help="Directory holding the image files served by the "
                    "'local' image source ([imagebackend] image_source = "
                    "local). The image id is the file name; only regular "
                    "files directly inside this directory are served "
                    "(no subdirectories, no symlinks, no '..'). Give an "
                    "absolute path (a relative one is taken from the "
                    "current working directory). Default: "
                    "/var/lib/imagebackend/images."),
    cfg.DictOpt("formats",
                default={},
                help="Declared disk formats of local images, as "
                     "'image_id:format' pairs (for example "
                     "'cirros.img:qcow2'). An image whose bytes are of "
                     "another format is refused, like a Glance image whose "
                     "disk_format lies. Images not listed are declared by "
                     "their file name extension when it is a known format "
                     "('.qcow2', '.raw', '.vmdk', '.vhd', '.vhdx', '.vdi', "
                     "'.iso'), otherwise not at all (the format is then "
                     "detected). Default: empty."),
]

_EXTENSION_FORMATS = {
    ".qcow2": "qcow2", ".raw": "raw", ".vmdk": "vmdk", ".vhd": "vhd",
    ".vhdx": "vhdx", ".vdi": "vdi", ".iso": "iso",
}


class LocalSource(base.ImageSource):
    """Serve images from ``[local_source] path``."""

    name = "local"
    OPTIONS = [("local_source", OPTIONS)]

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        config_check.check_options(conf, "local_source", OPTIONS)
        self.directory = os.path.abspath(conf.local_source.path)

    def describe(self) -> str:
        return "local:%s" % self.directory

    def check_id(self, image_id: str) -> None:
        """Refuse what :func:`imagebackend.sources.base.check_image_id`
        refuses, and anything but the plain name of a file directly inside
        the directory.

        :raises imagebackend.exception.InvalidImageId: it is refused.
        """
        super().check_id(image_id)
        if image_id in (".", "..") or "/" in image_id:
            raise exception.InvalidImageId(
                image_id=image_id,
                reason="a local image id is the plain name of a file "
                       "inside %s; it may not contain '/' or be '.' or "
                       "'..'" % self.directory)

    def _open_fd(self, image_id: str) -> int:
        """Open the image without following a symlink, relative to the
        directory (so a renamed-in symlink or '..' cannot escape it).
        """
        self.check_id(image_id)
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise exception.ImageSourceError(
                image_id=image_id,
                reason="cannot open the image directory %s (%s); set "
                       "[local_source] path" % (self.directory,
                                                exc.strerror)) from exc
        try:
            fd = os.open(image_id, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            raise exception.ImageNotFound(
                image_id=image_id, source=self.describe(),
                hint="; put the image file there or fix [local_source] "
                     "path") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise exception.InvalidImageId(
                    image_id=image_id,
                    reason="%s is a symlink; the local source serves only "
                           "regular files inside %s" % (
                               os.path.join(self.directory, image_id),
                               self.directory)) from exc
            raise exception.ImageSourceError(
                image_id=image_id,
                reason="cannot open %s: %s" % (
                    os.path.join(self.directory, image_id),
                    exc.strerror)) from exc
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise exception.InvalidImageId(
                image_id=image_id,
                reason="%s is not a regular file" % os.path.join(
                    self.directory, image_id))
        return fd

    def declared_format(self, image_id: str) -> str | None:
        formats = self.conf.local_source.formats or {}
        if image_id in formats:
            return formats[image_id]
        ext = os.path.splitext(image_id)[1].lower()
        return _EXTENSION_FORMATS.get(ext)

    def get_meta(self, image_id: str) -> base.ImageMeta:
        """Look an image up, with the identity remembered for this version
        of its file; when none is, the identity is deferred (hashing the
        file here would read it once more than the download does).
        """
        fd = self._open_fd(image_id)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return self._meta(image_id, st, self._remembered(image_id, st))

    def resolve_identity(self, meta: base.ImageMeta) -> base.ImageMeta:
        """The hash of the image file: remembered by now (another process
        may just have downloaded it), or else computed (and remembered).
        """
        if not meta.identity_deferred:
            return meta
        fd = self._open_fd(meta.image_id)
        try:
            st = os.fstat(fd)
            digest = self._remembered(meta.image_id, st)
            if digest is not None:
                return self._meta(meta.image_id, st, digest)
            digest = content_digest.file_digests(
                fd, scheme=content_digest.SPARSE_XXH3)["sparse"]
            if _version(os.fstat(fd)) == _version(st):
                self._remember(meta.image_id, st, digest)
        except OSError as exc:
            raise exception.ImageSourceError(
                image_id=meta.image_id,
                reason="reading %s to hash it failed: %s; check the file "
                       "and its disk" % (self._path(meta.image_id),
                                         exc.strerror or exc)) from exc
        finally:
            os.close(fd)
        return self._meta(meta.image_id, st, digest)

    def identify_download(self, meta: base.ImageMeta, algo: str,
                          hexdigest: str) -> str | None:
        """The downloaded bytes' sparse digest is the identity of the
        version of the file :meth:`get_meta` saw, if that is still the file
        there.

        :raises imagebackend.exception.ImageDownloadError: the file
            changed (or was replaced) since it was looked up.
        """
        if meta.identity is not None:
            return meta.identity
        fd = self._open_fd(meta.image_id)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if (algo != content_digest.SPARSE_XXH3
                or _version(st) != meta.extra.get("version")):
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=meta.source,
                reason="%s changed while it was being read; try again once "
                       "it is no longer being written" % os.path.join(
                           self.directory, meta.image_id))
        self._remember(meta.image_id, st, hexdigest)
        return _identity(st, hexdigest)

    def _meta(self, image_id, st, digest):
        return base.ImageMeta(
            image_id=image_id,
            source=self.describe(),
            disk_format=self.declared_format(image_id),
            size=st.st_size,
            hash_algo=content_digest.SPARSE_XXH3,
            hash_value=digest,
            identity=_identity(st, digest) if digest else None,
            identity_deferred=digest is None,
            extra={"version": _version(st)},
        )

    def _memo_path(self, image_id):
        imagebackend = self.conf.imagebackend
        return os.path.join(
            os.path.abspath(imagebackend.instances_path),
            imagebackend.base_dir_name,
            ".sources", "local",
            content_digest.cache_id(image_id) + ".json")

    def _remembered(self, image_id, st):
        known = fileio.read_json(self._memo_path(image_id)) or {}
        if known.get("key") == _version(st) and known.get(_MEMO_KEY):
            return known[_MEMO_KEY]
        return None

    def _remember(self, image_id, st, digest):
        """Remember ``digest`` as the hash of the version ``st`` of the
        file, unless it was modified so recently that a second change
        could leave the same version (timestamp granularity).
        """
        if time.time_ns() - st.st_mtime_ns <= _RACY_SECONDS * 10 ** 9:
            return
        memo = self._memo_path(image_id)
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            fileio.write_json_atomic(
                memo, {"image_id": image_id, "key": _version(st),
                       _MEMO_KEY: digest}, durable=False)
        except OSError as exc:
            LOG.debug("Cannot remember the hash of %s: %s", image_id, exc)

    def open(self, meta: base.ImageMeta):
        """Stream the image file.

        :raises imagebackend.exception.ImageDownloadError: (while
            iterating) reading it failed.
        """
        fd = self._open_fd(meta.image_id)
        return _Stream(fd, self._read(meta, fd))

    def _read(self, meta, fd):
        try:
            yield from _read_chunks(fd, self.chunk_size)
        except OSError as exc:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=self.describe(),
                reason="reading %s failed: %s" % (
                    self._path(meta.image_id),
                    exc.strerror or exc)) from exc

    def _path(self, image_id):
        return os.path.join(self.directory, image_id)


def _version(st: os.stat_result) -> str:
    """What changes whenever the file's content may have changed."""
    return "%d:%d:%d:%d:%d" % (st.st_dev, st.st_ino, st.st_size,
                               st.st_mtime_ns, st.st_ctime_ns)


def _identity(st: os.stat_result, hexdigest: str) -> str:
    # The sparse digest does not cover trailing zeros: add the length.
    return "%s:%d:%s" % (content_digest.SPARSE_XXH3, st.st_size,
                         hexdigest)


class _Stream:
    """The iterator :meth:`LocalSource.open` returns: its ``close()``
    closes the file even before the first chunk was asked for (a
    generator that never ran would not run its ``finally``).
    """

    def __init__(self, fd: int, chunks) -> None:
        self._fd = fd
        self._chunks = chunks

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        if inspect.getgeneratorstate(self._chunks) == inspect.GEN_CREATED:
            os.close(self._fd)
        self._chunks.close()


def _read_chunks(fd: int, chunk_size: int):
    """Yield the bytes of the open file ``fd``, at most ``chunk_size`` at
    a time, and close it.

    Only data extents are read: a hole yields views of
    :data:`imagebackend.common.sparseio.HOLE`, which cost no read and no copy,
    and which a sparse digest or writer knows for zeros without looking.
    Reading stops at the size the file had when it was opened (or where it
    ends, if it shrinks).
    """
    try:
        os.set_blocking(fd, True)
        size = os.fstat(fd).st_size
        for length, data in sparseio.read_regions(fd, size, chunk_size):
            if data is not None:
                yield data
            else:
                yield from sparseio.zero_chunks(length, chunk_size)
    finally:
        os.close(fd)
