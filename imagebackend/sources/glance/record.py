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

"""Glance's record of an image, checked before any of it is believed.

:func:`image_meta` turns the JSON object Glance sent into an
:class:`imagebackend.sources.base.ImageMeta`: every value it uses is
checked for type (a size is a non-negative integer, a hash a hex string of
its algorithm's length, ...), the image must be active, bare, non-empty and
within ``[glance] max_download_size``, and it must carry a hash this host
can check (``os_hash_value`` of a :mod:`hashlib` algorithm, or Glance's
legacy md5 ``checksum``) unless ``[glance] allow_unverified_images``.
Server text reaches messages and log lines only through
:func:`imagebackend.sources.glance.errors.printable`.
"""

import hashlib
import logging
import string

from imagebackend import exception
from imagebackend.sources import base
from imagebackend.sources.glance import errors as glance_errors

LOG = logging.getLogger(__name__)


def image_meta(image_id: str, image: dict, *, source: str,
               max_download_size: int,
               allow_unverified: bool) -> base.ImageMeta:
    """The metadata of image ``image_id`` from Glance's record ``image``.

    :param source: the source's description, for :class:`ImageMeta`.
    :raises imagebackend.exception.ImageNotActive: it is not active.
    :raises imagebackend.exception.ImageUnsupported: not bare, empty,
        larger than ``max_download_size``, or unverifiable (unless
        ``allow_unverified``).
    :raises imagebackend.exception.ImageSourceError: a value has the wrong
        type or form.
    """
    record = _Record(image_id, image)
    if record.text("id") is not None and (
            record.text("id").lower() != image_id.lower()):
        raise record.malformed("id", "it is not the id asked for")
    status = record.text("status")
    if status != "active":
        raise exception.ImageNotActive(
            image_id=image_id, status=glance_errors.printable(status))
    container = record.text("container_format")
    if container != "bare":
        raise exception.ImageUnsupported(
            image_id=image_id,
            reason="its container_format is %s; only 'bare' images (a "
                   "disk image with no container around it) can be "
                   "used. Unpack the disk and upload it as a new image "
                   "with container_format 'bare'."
                   % _quoted(container))
    size = record.count("size")
    _check_size(image_id, size, max_download_size)
    checksum = record.hexdigest("checksum", "md5")
    hash_algo, hash_value = _usable_hash(record, checksum, allow_unverified)
    content = hash_value or checksum or "size=%s" % (size,)
    updated_at = record.text("updated_at")
    disk_format = record.text("disk_format")
    if disk_format is not None and len(disk_format) > 64:
        # Glance's names are a few letters; this one would go into
        # the inspector's messages.
        raise record.malformed("disk_format", "not a disk format name")
    return base.ImageMeta(
        image_id=image_id,
        source=source,
        disk_format=disk_format,
        size=size,
        virtual_size=record.count("virtual_size"),
        checksum=checksum,
        hash_algo=hash_algo,
        hash_value=hash_value,
        identity="%s,updated_at=%s" % (content, updated_at),
        extra={key: record.text(key, quiet=True) for key in (
            "name", "owner", "visibility", "updated_at",
            "os_hash_algo", "direct_url")},
    )


def _check_size(image_id, size, limit):
    """Refuse an empty image, or one larger than ``limit`` bytes."""
    if size == 0:
        raise exception.ImageUnsupported(
            image_id=image_id,
            reason="Glance records 0 bytes of data for it; an empty "
                   "image cannot be a disk. Upload the image's data "
                   "again")
    if size is not None and size > limit:
        raise exception.ImageUnsupported(
            image_id=image_id,
            reason="Glance records %d bytes for it, more than [glance] "
                   "max_download_size (%d bytes); raise that option to "
                   "use it" % (size, limit))


def _usable_hash(record, checksum, allow_unverified):
    """The (algorithm, hex digest) of Glance's multihash if this host
    can check it, else ``(None, None)`` when the md5 checksum will be
    checked instead.

    :raises imagebackend.exception.ImageUnsupported: nothing can be
        checked and unverified images are not allowed.
    """
    algo = record.text("os_hash_algo")
    value = record.text("os_hash_value")
    problem = None
    if algo and value:
        algo = algo.lower()
        if _hash_known(algo):
            return algo, record.hexdigest("os_hash_value", algo)
        problem = ("Glance hashed it with %s, which this host's "
                   "hashlib lacks" % glance_errors.printable(algo))
    elif algo or value:
        problem = ("Glance records os_hash_algo %s with os_hash_value "
                   "%s" % (glance_errors.printable(algo),
                           glance_errors.printable(value)))
    if checksum:
        if problem:
            LOG.warning("Image %s: %s; verifying its md5 checksum "
                        "instead", record.image_id, problem)
        return None, None
    if problem:
        problem += ", and it has no md5 checksum"
    else:
        problem = "Glance records neither os_hash_value nor checksum"
    if not allow_unverified:
        raise exception.ImageUnsupported(
            image_id=record.image_id,
            reason="its bytes cannot be verified (%s). Re-upload it so "
                   "that Glance records a hash (such as sha512), or set "
                   "[glance] allow_unverified_images to use unverified "
                   "images" % problem)
    LOG.warning("Image %s: its bytes cannot be verified (%s); using it "
                "unverified since [glance] allow_unverified_images is "
                "set", record.image_id, problem)
    return None, None


def _quoted(value) -> str:
    """Server text for a message: quoted if a string, always escaped."""
    if isinstance(value, str):
        return "'%s'" % glance_errors.printable(value)
    return glance_errors.printable(value)


def _hash_known(algo: str) -> bool:
    """Whether ``algo`` names a fixed-length :mod:`hashlib` algorithm."""
    if algo not in hashlib.algorithms_available:
        return False
    try:
        hashlib.new(algo).hexdigest()
    except (ValueError, TypeError):
        return False
    return True


class _Record:
    """Glance's record of an image, whose values are checked for type
    (and escaped in messages) as they are read.
    """

    def __init__(self, image_id: str, image: dict) -> None:
        self.image_id = image_id
        self._image = image

    def malformed(self, key, problem):
        return exception.ImageSourceError(
            image_id=self.image_id,
            reason="Glance's record of it is malformed: %s is %s, %s; "
                   "check the image (or the Glance serving it)"
                   % (key, glance_errors.printable(self._image.get(key)),
                      problem))

    def text(self, key, quiet=False):
        """A string value, or None; with ``quiet`` a value of another type
        is None too, and a long one is cut.
        """
        value = self._image.get(key)
        if value is None or isinstance(value, str):
            return value[:255] if quiet and value else value
        if quiet:
            return None
        raise self.malformed(key, "not a string")

    def count(self, key):
        """A non-negative integer value, or None."""
        value = self._image.get(key)
        if value is None:
            return None
        if type(value) is not int or value < 0:
            raise self.malformed(key, "not a number of bytes")
        return value

    def hexdigest(self, key, algo):
        """A hex digest of ``algo``, lower-cased, or None."""
        value = self.text(key)
        if not value:
            return None
        if (len(value) != 2 * hashlib.new(algo).digest_size
                or not set(value) <= set(string.hexdigits)):
            raise self.malformed(key, "not a hex %s digest" % algo)
        return value.lower()
