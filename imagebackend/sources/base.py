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

"""The contract every image source implements.

A source answers two questions about an image id: what is it
(:meth:`ImageSource.get_meta`) and what are its bytes
(:meth:`ImageSource.open`).  Everything else -- writing the ``.part`` file,
verifying the checksum while the bytes stream, inspecting the format,
converting and publishing -- is done once, by the pipeline, for every
source.
"""

import abc
import dataclasses
import typing

from oslo_config import cfg

from imagebackend import exception
from imagebackend import textutils

#: the longest image id accepted, in characters.
MAX_IMAGE_ID_LENGTH = 255

_ALLOWED_IDS = ("an image id is 1 to %d characters of UTF-8 text without "
                "control characters (such as a newline or an escape), line "
                "separators or invisible format characters"
                % MAX_IMAGE_ID_LENGTH)


def check_image_id(image_id) -> str:
    """Refuse an image id no source may serve, before anything is done
    with it: one that is not text, is empty or too long, is not valid
    UTF-8 (bytes that are not text arrive as lone surrogates, which cannot
    be encoded to name a cache file), or holds a character that would
    forge a line or rewrite a terminal where the id is shown.

    Sources add their own rules (:meth:`ImageSource.check_id`).

    :returns: ``image_id``.
    :raises imagebackend.exception.InvalidImageId: it is refused; the
        message shows the id escaped and says what is allowed.
    """
    if not isinstance(image_id, str):
        raise exception.InvalidImageId(
            image_id=image_id,
            reason="it is of type %s, not str; %s" % (
                type(image_id).__name__, _ALLOWED_IDS))
    problem = None
    if not image_id or len(image_id) > MAX_IMAGE_ID_LENGTH:
        problem = "it has %d characters" % len(image_id)
    elif any(0xD800 <= ord(c) <= 0xDFFF for c in image_id):
        problem = "it is not valid UTF-8"
    elif any(textutils.is_unsafe_char(c) for c in image_id):
        problem = "it contains control or invisible characters"
    if problem:
        raise exception.InvalidImageId(image_id=image_id,
                                       reason="%s; %s" % (problem,
                                                          _ALLOWED_IDS))
    return image_id


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """What a source knows about one image before it is downloaded.

    :param image_id: the id the caller asked for.
    :param source: a short label of where the image lives, for messages and
        metadata (``"local:/srv/images"``, ``"glance"``).
    :param disk_format: the format the source declares (``raw``, ``qcow2``,
        ...), or ``None`` when it declares none.  The inspector refuses an
        image whose bytes are of another format.
    :param size: the number of bytes the download will yield, or ``None``
        when unknown.  A body of another length is refused.
    :param virtual_size: the disk size the source records, when it has one.
    :param checksum: an md5 hex digest of the bytes, when recorded.
    :param hash_algo: a :mod:`hashlib` algorithm name for ``hash_value``.
    :param hash_value: the hex digest of the bytes with ``hash_algo``.
    :param identity: a string that changes whenever the image's content
        changes (a content hash, or a hash plus an update time); the cache
        compares it to tell a changed image from an unchanged one.
    :param identity_deferred: True when ``identity`` is ``None`` only
        because computing it is costly (it means reading the whole image):
        the cache then asks :meth:`ImageSource.resolve_identity` for it
        when it has a cached copy to compare with, and otherwise takes it
        from the download (:meth:`ImageSource.identify_download`).
    """

    image_id: str
    source: str
    disk_format: str | None = None
    size: int | None = None
    virtual_size: int | None = None
    checksum: str | None = None
    hash_algo: str | None = None
    hash_value: str | None = None
    identity: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    identity_deferred: bool = False

    def expected_digest(self) -> tuple[str, str] | None:
        """The strongest (algorithm, hex digest) pair the source recorded.

        :returns: ``(algo, hexdigest)``, preferring ``hash_algo`` /
            ``hash_value`` over the md5 ``checksum``, or ``None`` when the
            source recorded neither.
        """
        if self.hash_algo and self.hash_value:
            return self.hash_algo, self.hash_value.lower()
        if self.checksum:
            return "md5", self.checksum.lower()
        return None


class ImageSource(abc.ABC):
    """Base class of image sources (stevedore namespace
    ``imagebackend.sources``).

    Subclasses set :attr:`name` and :attr:`OPTIONS` and implement
    :meth:`get_meta` and :meth:`open`.

    A source never registers options: :func:`imagebackend.opts.register_opts`
    (or the caller, through :meth:`register_opts`) does, before the source
    is built.

    :param conf: a ConfigOpts with this source's options registered.
    :raises imagebackend.exception.ConfigurationError: they are not.
    """

    #: the name used in ``[imagebackend] image_source``.
    name: str = ""
    #: ``(group, [options])`` pairs this source reads; registered on the
    #: ConfigOpts before the source is built and listed for the sample.
    OPTIONS: list[tuple[str, list[cfg.Opt]]] = []

    #: bytes asked for per read while streaming.
    chunk_size = 4 * 1024 * 1024

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        missing = [(group, opt.dest) for group, opts in self.required_opts()
                   for opt in opts
                   if group not in conf or opt.dest not in conf[group]]
        if missing:
            raise exception.ConfigurationError(
                reason="the options of the %r image source are not "
                       "registered ([%s] %s, ...); call "
                       "imagebackend.opts.register_opts(conf) or %s."
                       "register_opts(conf) before building it" % (
                           self.name, missing[0][0], missing[0][1],
                           type(self).__name__))

    def check_id(self, image_id: str) -> None:
        """Refuse an image id this source must not look up, before
        anything is done with it.  Subclasses that add rules call this
        first.

        :raises imagebackend.exception.InvalidImageId: it is refused.
        """
        check_image_id(image_id)

    @classmethod
    def register_opts(cls, conf: cfg.ConfigOpts) -> None:
        """Register the options this source reads on ``conf``
        (idempotent).
        """
        for group, opts in cls.OPTIONS:
            conf.register_opts(opts, group=group)

    @classmethod
    def required_opts(cls) -> list[tuple[str, list[cfg.Opt]]]:
        """``(group, [options])`` that must be registered before the
        source is built: those :meth:`register_opts` registers.
        """
        return cls.OPTIONS

    @abc.abstractmethod
    def get_meta(self, image_id: str) -> ImageMeta:
        """Look an image up.

        :raises imagebackend.exception.ImageNotFound: no such image.
        :raises imagebackend.exception.InvalidImageId: the id is malformed
            or names something the source must not serve.
        :raises imagebackend.exception.ImageSourceError: any other failure.
        """

    @abc.abstractmethod
    def open(self, meta: ImageMeta) -> typing.Iterator[bytes]:
        """Stream an image's bytes, in chunks of at most a few MiB.

        Chunks should be ``bytes``, or views of ``bytes`` (such as the
        shared zeros of :data:`imagebackend.common.sparseio.HOLE`): the cache
        hands them to helper threads as they are, and copies a chunk of
        any other buffer first, in case the source refills it.  The
        iterator must not hold the whole image in memory.
        It may be closed early (``close()``), which must release any
        connection or file handle.

        :raises imagebackend.exception.ImageDownloadError: the transfer
            failed part-way.
        """

    def resolve_identity(self, meta: ImageMeta) -> ImageMeta:
        """Compute an identity that :meth:`get_meta` deferred.

        Only called for a ``meta`` with ``identity_deferred`` set.

        :returns: the image's metadata with ``identity`` set (and the
            digest the download must match, when the source has one).
        :raises imagebackend.exception.ImageBackendException: as
            :meth:`get_meta`.
        """
        return meta

    def identify_download(self, meta: ImageMeta, algo: str,
                          hexdigest: str) -> str | None:
        """The identity of the bytes just downloaded for a ``meta`` whose
        identity was deferred, given their digest; a source may remember
        it so that the next :meth:`get_meta` need not compute it.

        :param algo: the algorithm of ``hexdigest``, as
            :func:`imagebackend.common.digest.new` names it.
        :returns: the identity, or ``None`` when the source cannot tell.
        :raises imagebackend.exception.ImageDownloadError: the image
            changed while it was downloaded.
        """
        return None

    def describe(self) -> str:
        """A one-line description of where images come from."""
        return self.name
