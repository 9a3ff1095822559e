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

    @classmethod
    def register_opts(cls, conf: cfg.ConfigOpts) -> None:
        for group, opts in cls.OPTIONS:
            conf.register_opts(opts, group=group)

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
        shared zeros of :data:`imagebackend.fileutils.HOLE`): the cache
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
            :func:`imagebackend.digest.new` names it.
        :returns: the identity, or ``None`` when the source cannot tell.
        :raises imagebackend.exception.ImageDownloadError: the image
            changed while it was downloaded.
        """
        return None

    def describe(self) -> str:
        """A one-line description of where images come from."""
        return self.name
