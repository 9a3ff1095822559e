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

"""Uploading a file to Glance as a new image (``disk extract --upload``).

Three requests, all through the source's bounded HTTP client
(:mod:`imagebackend.sources.glance.client`), none through glanceclient:

1. ``POST /v2/images`` creates the image; its answer (at most
   :data:`glance_client.RECORD_LIMIT` bytes of JSON) must name an id that is
   a UUID before that id goes into any URL;
2. ``PUT /v2/images/<id>/file`` streams the file from disk, read once:
   the same read feeds the HTTP body, the progress report (``"upload"``,
   in bytes, :mod:`imagebackend.common.progress`) and a sha512;
3. ``GET /v2/images/<id>`` must then say ``active``, with the size sent
   and (when Glance computed a sha512) the same hash, so a corrupted or
   partial upload is caught without a second pass.

None of them follows a redirect (the token and the data would go where
the server chose): a redirect is an error naming the image and where it
pointed.  Creating is not retried after a server error (it may have made
the image) and the upload is never retried (Glance may hold part of it).
Any failure after the image was created deletes it, best effort: one
attempt, within the same time bounds.  Values of the wrong type in
Glance's answers are the library's errors, and text Glance sent is
escaped and bounded.
"""

import hashlib
import logging
import os
import typing

from imagebackend.common import progress as progress_mod
from imagebackend import exception
from imagebackend.sources.glance import client as glance_client
from imagebackend.sources.glance import errors as glance_errors
from imagebackend import textutils

LOG = logging.getLogger(__name__)

#: ``call(image_id, action, func, retry_server_errors=..., retry=...)``:
#: runs ``func(endpoint)`` with the source's retries and error mapping.
Call = typing.Callable[..., typing.Any]


def upload(call: Call, http: glance_client.Client, name: str, path: str,
           disk_format: str, container_format: str = "bare",
           progress: progress_mod.Progress | None = None) -> str:
    """Create an image named ``name`` and upload ``path`` as its data.

    :param call: the Glance source's request runner.
    :param http: the Glance source's HTTP client.
    :param progress: called as ``progress("upload", bytes_sent,
        total_bytes)`` after each piece is read for sending.
    :returns: the new image's id, once Glance has it ``active`` with the
        bytes sent.
    :raises imagebackend.exception.ImageSourceError: the file cannot be
        read, Glance refused the image, or the upload failed (the half-made
        image is then deleted).
    """
    # Escaped once here, for log lines too; marked so that messages do not
    # escape it again.
    label = textutils.Escaped("(new image '%s')"
                              % glance_errors.printable(name))
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise exception.ImageSourceError(
            image_id=label, reason="cannot read %s: %s; check the path" % (
                path, exc.strerror)) from exc
    with src:
        try:
            size = os.fstat(src.fileno()).st_size
        except OSError as exc:
            raise exception.ImageSourceError(
                image_id=label, reason="cannot read %s: %s" % (
                    path, exc.strerror)) from exc
        sent = _Sent(size, progress)
        body = glance_client.FileBody(src, size, sent.observe)
        # Creating is not idempotent: a 5xx may have made the image, so
        # only a failure to connect is tried again.
        image = call(label, "create the image",
                     lambda endpoint: _answer(
                         label, "create the image", lambda: http.send_json(
                             endpoint, "POST", "/v2/images",
                             {"name": name, "disk_format": disk_format,
                              "container_format": container_format},
                             success=(200, 201))),
                     retry_server_errors=False)
        image_id = _new_id(image, label)
        try:
            call(image_id, "upload the image data",
                 lambda endpoint: _answer(
                     image_id, "upload the data", lambda: _put(
                         http, endpoint, image_id, body, path)),
                 retry=False)
            _check_uploaded(call, http, image_id, sent)
        except BaseException:
            _delete_quietly(call, http, image_id)
            raise
    LOG.info("Uploaded %s (%d bytes) to Glance as image %s",
             path, size, image_id)
    return image_id


def _put(http, endpoint, image_id, body, path):
    try:
        http.put_file(endpoint, "/v2/images/%s/file" % image_id, body)
    except glance_client.FileReadError as exc:
        raise exception.ImageSourceError(
            image_id=image_id,
            reason="reading %s for the upload failed after %d bytes: %s; "
                   "check the file" % (path, body.sent, exc)) from exc


def _answer(image_id, action, request):
    """``request()``, with an error status told as the answer of the URL
    asked (which a bare status would not name).  What another attempt may
    get past (a failure to connect), 401 and 403 (the message names the
    credential) and TLS failures (it names the options) are left for the
    source's error mapping.
    """
    try:
        return request()
    except glance_errors.HTTPStatus as exc:
        if exc.code in (401, 403):
            raise
        reason = "%s refused to %s with HTTP %d: %s" % (
            glance_errors.url_for_humans(exc.url), action, exc.code,
            exc.details)
        cause = exc
    except glance_errors.HTTPFailure as exc:
        if exc.retryable or isinstance(exc, glance_errors.TLSFailed):
            raise
        reason, cause = exc.reason, exc
    # The HTTP layer's reasons are escaped already: marked so, the
    # message does not escape them a second time.
    raise exception.ImageSourceError(
        image_id=image_id, reason=textutils.Escaped(reason)) from cause


def _new_id(image, label):
    """The id Glance gave the new image, if it is one."""
    image_id = image.get("id")
    if image_id is None:
        raise exception.ImageSourceError(
            image_id=label,
            reason="Glance's answer to creating it names no image id; "
                   "check the Glance serving it")
    if not glance_errors.is_image_id(image_id):
        # It would go into URLs (and messages) from here on.
        raise exception.ImageSourceError(
            image_id=label,
            reason=textutils.Escaped(
                "Glance answered an image id that is not a UUID: %s; "
                "check the Glance serving it"
                % glance_errors.printable(image_id)))
    return image_id


def _check_uploaded(call, http, image_id, sent):
    image = call(image_id, "read the uploaded image",
                 lambda endpoint: http.get_json(
                     endpoint, "/v2/images/%s" % image_id))
    status = image.get("status")
    size = image.get("size")
    algo = image.get("os_hash_algo")
    value = image.get("os_hash_value")
    for key, found, kinds in (("status", status, (str,)),
                              ("size", size, (int, type(None))),
                              ("os_hash_algo", algo, (str, type(None))),
                              ("os_hash_value", value, (str, type(None)))):
        if not isinstance(found, kinds) or isinstance(found, bool):
            raise exception.ImageSourceError(
                image_id=image_id,
                reason=textutils.Escaped(
                    "Glance's record of the upload has %s %s, which is not "
                    "a %s; it was deleted, check the Glance serving it"
                    % (key, glance_errors.printable(found),
                       kinds[0].__name__)))
    problem = None
    if status != "active":
        problem = "it is %s, not active" % glance_errors.printable(status)
    elif size != sent.total:
        problem = "Glance stored %s bytes of the %d sent" % (
            glance_errors.printable(size), sent.total)
    elif algo == sent.algo and value != sent.hexdigest():
        problem = "Glance's %s differs from the bytes sent" % sent.algo
    if problem:
        raise exception.ImageSourceError(
            image_id=image_id,
            # Every piece of it is escaped already.
            reason=textutils.Escaped(
                "the upload went wrong (%s); it was deleted, upload again"
                % problem))


def _delete_quietly(call, http, image_id):
    # One attempt: the error being reported waits for it, and its time is
    # bounded by [glance] stall_timeout.
    try:
        call(image_id, "delete the failed upload",
             lambda endpoint: http.delete(endpoint,
                                          "/v2/images/%s" % image_id),
             retry=False)
    except exception.ImageBackendException as exc:
        LOG.warning("Image %s: could not delete the failed upload: %s",
                    image_id, exc)


class _Sent:
    """What the upload's body handed on: reports progress and hashes it."""

    algo = "sha512"

    def __init__(self, total, progress):
        self.total = total
        self._progress = progress
        self.done = 0
        self._hash = hashlib.new(self.algo)

    def observe(self, piece):
        """One more piece (``None``: starting again from the first byte)."""
        if piece is None:
            self.done = 0
            self._hash = hashlib.new(self.algo)
            return
        self.done += len(piece)
        self._hash.update(piece)
        progress_mod.report(self._progress, "upload", self.done, self.total)

    def hexdigest(self):
        return self._hash.hexdigest()
