"""Uploading a file to Glance as a new image (``disk extract --upload``).

The upload reads the file once: the same read feeds the HTTP body, the
progress callback and a sha512 that is compared with the hash Glance
records, so a corrupted upload is caught without a second pass.  A failed
upload deletes the image it created.
"""

import hashlib
import logging
import os
import typing

from imagebackend import exception
from imagebackend.sources import glance_errors

LOG = logging.getLogger(__name__)

#: ``call(image_id, action, func, retry_server_errors=...)``: runs
#: ``func(glanceclient_client)`` with the source's retries and error
#: mapping.
Call = typing.Callable[..., typing.Any]


def upload(call: Call, name: str, path: str, disk_format: str,
           container_format: str = "bare",
           progress: typing.Callable[[int, int], None] | None = None
           ) -> str:
    """Create an image named ``name`` and upload ``path`` as its data.

    :param call: the Glance source's request runner.
    :returns: the new image's id, once Glance has it ``active``.
    :raises imagebackend.exception.ImageSourceError: the file cannot be
        read, Glance refused the image, or the upload failed (the half-made
        image is then deleted).
    """
    label = "(new image %r)" % name
    try:
        size = os.path.getsize(path)
        src = open(path, "rb")
    except OSError as exc:
        raise exception.ImageSourceError(
            image_id=label, reason="cannot read %s: %s" % (
                path, exc.strerror)) from exc
    with src:
        # Creating is not idempotent: a 5xx may have made the image, so
        # only a failure to connect is tried again.
        image = call(label, "create the image",
                     lambda c: _create(c, label, name=name,
                                       disk_format=disk_format,
                                       container_format=container_format),
                     retry_server_errors=False)
        image_id = _new_id(image, label)
        reader = _UploadReader(src, size, progress)
        try:
            call(image_id, "upload the image data",
                 lambda c: c.images.upload(image_id, reader.rewound(),
                                           image_size=size),
                 retry_server_errors=False)
            _check_uploaded(call, image_id, reader)
        except BaseException:
            _delete_quietly(call, image_id)
            raise
    LOG.info("Uploaded %s (%d bytes) to Glance as image %s",
             path, size, image_id)
    return image_id


def _new_id(image, label):
    """The id Glance gave the new image, if it is one."""
    try:
        image_id = image["id"]
    except (KeyError, TypeError, IndexError) as exc:
        raise exception.ImageSourceError(
            image_id=label,
            reason="Glance's answer to creating it names no image id"
        ) from exc
    if not glance_errors.is_image_id(image_id):
        # It would go into URLs (and messages) from here on.
        raise exception.ImageSourceError(
            image_id=label,
            reason="Glance answered an image id that is not a UUID: %s; "
                   "check the Glance serving it"
                   % glance_errors.printable(image_id))
    return image_id


def _create(client, label, **fields):
    try:
        return client.images.create(**fields)
    except TypeError as exc:
        # glanceclient checks the fields against Glance's schema itself.
        raise exception.ImageSourceError(
            image_id=label,
            reason="Glance does not accept the image: %s"
                   % glance_errors.printable(
                       (str(exc).splitlines() or [""])[0],
                       glance_errors.DETAILS_LIMIT)) from exc


def _check_uploaded(call, image_id, reader):
    image = call(image_id, "read the uploaded image",
                 lambda c: c.images.get(image_id))
    try:
        image = dict(image)
    except (TypeError, ValueError) as exc:
        raise exception.ImageSourceError(
            image_id=image_id,
            reason="Glance's record of the upload is not an object: %s"
                   % glance_errors.printable(image)) from exc
    problem = None
    if image.get("status") != "active":
        problem = "it is %s, not active" % glance_errors.printable(
            image.get("status"))
    elif image.get("size") != reader.sent:
        problem = "Glance stored %s bytes of the %d sent" % (
            glance_errors.printable(image.get("size")), reader.sent)
    elif (image.get("os_hash_algo") == reader.algo
          and image.get("os_hash_value") != reader.hexdigest()):
        problem = "Glance's %s differs from the bytes sent" % reader.algo
    if problem:
        raise exception.ImageSourceError(
            image_id=image_id,
            reason="the upload went wrong (%s); it was deleted, upload "
                   "again" % problem)


def _delete_quietly(call, image_id):
    try:
        call(image_id, "delete the failed upload",
             lambda c: c.images.delete(image_id))
    except exception.ImageBackendException as exc:
        LOG.warning("Image %s: could not delete the failed upload: %s",
                    image_id, exc)


class _UploadReader:
    """The file object glanceclient reads the body from: reports progress
    and hashes what was sent.
    """

    algo = "sha512"

    def __init__(self, src, total, progress):
        self._src = src
        self._total = total
        self._progress = progress
        self.sent = 0
        self._hash = hashlib.new(self.algo)

    def rewound(self):
        """Start again from the first byte (for a retried upload)."""
        self._src.seek(0)
        self.sent = 0
        self._hash = hashlib.new(self.algo)
        return self

    def read(self, size=-1):
        chunk = self._src.read(size)
        self.sent += len(chunk)
        self._hash.update(chunk)
        if chunk and self._progress is not None:
            self._progress(self.sent, self._total)
        return chunk

    def hexdigest(self):
        return self._hash.hexdigest()
