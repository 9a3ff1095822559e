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

"""Talking to Glance over HTTP with bounds Glance cannot move.

The Glance source reads image records and image data here, and creates,
uploads and deletes images, through its keystoneauth1 adapter rather than
through python-glanceclient, whose HTTP client reads and decodes in memory
any body whose Content-Type is not exactly ``application/octet-stream``,
and lets keystoneauth1 resend the token wherever a redirect points.
Whatever the server sends:

* every body is streamed, and read only up to a bound: a record up to
  :data:`RECORD_LIMIT`, an error body up to :data:`ERROR_LIMIT`, image data
  up to the size Glance recorded (plus one byte, to notice more);
* identity encoding is asked for, and a compressed body is refused before
  any of it is read (it could expand without limit);
* no byte for :attr:`Limits.stall_timeout` seconds, or fewer than
  :attr:`Limits.min_rate` bytes a second over :attr:`Limits.rate_window`
  seconds, ends the transfer;
* redirects of GETs are followed here, at most :data:`MAX_REDIRECTS` of
  them, to http(s) URLs only, and the token goes only to the origin of the
  Glance endpoint it was issued for;
* requests that change something (POST, PUT, DELETE) follow no redirect at
  all: a redirected request would carry the token, or the data, to where
  the server chose, and a half-done change is not worth that.  A redirect
  is an error naming the request and where it pointed;
* an upload's body is streamed from the file (never read whole), and a
  server that stops taking it for :attr:`Limits.stall_timeout` seconds
  ends it; an answer given before the whole body was sent is not success;
* only the success statuses of the request are ever taken as its answer.

Failures are raised as :class:`imagebackend.sources.glance.errors.
HTTPFailure` subclasses, whose text is already escaped; keystoneauth1
errors from finding the endpoint or getting a token (Keystone's) are left
as they are for :func:`glance_errors.translate`.
"""

import dataclasses
import http.client
import json
import logging
import re
import socket
import time
import typing
import urllib.parse

from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
import requests
import urllib3

from imagebackend.sources.glance import errors as glance_errors
from imagebackend import textutils

LOG = logging.getLogger(__name__)

#: the most redirects one request follows.
MAX_REDIRECTS = 5
#: the largest image record read, in bytes (Glance's are a few KiB).
RECORD_LIMIT = 1024 * 1024
#: how much of an error body is read, in bytes.
ERROR_LIMIT = 4096

#: the most asked of one read, and a chunk this long is handed on without
#: waiting for more: joining the pieces of a fast transfer into longer
#: chunks would copy every byte again, and reads of at most 1 MiB measured
#: faster than longer ones (their buffers are reused, not mapped afresh).
_ENOUGH = 1024 * 1024

_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_VERSION_SUFFIX = re.compile(r"/v[0-9]+(\.[0-9]+)?/?$")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Time bounds of every request to Glance.

    :param stall_timeout: seconds without a byte (while connecting,
        waiting for the answer or reading a body) before giving up.
    :param min_rate: bytes per second a body must average over each
        ``rate_window``; 0 means no minimum.
    :param rate_window: seconds over which the rate is averaged.
    :param connect_timeout: seconds to connect (default: the stall
        timeout).
    """

    stall_timeout: float = 60.0
    min_rate: int = 1024
    rate_window: float = 60.0
    connect_timeout: float | None = None


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, with the default port filled
    in: two URLs may share credentials only when these are equal.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class Client:
    """GETs from Glance through ``adapter``.

    :param adapter: the keystoneauth1 adapter (session, auth, endpoint
        filter) of the source.
    :param limits: the time bounds.
    :param clock: a monotonic clock (tests replace it).
    """

    def __init__(self, adapter: ks_adapter.Adapter, limits: Limits,
                 clock: typing.Callable[[], float] = time.monotonic) -> None:
        self._adapter = adapter
        self.limits = limits
        self._clock = clock

    # --- requests ---------------------------------------------------------

    def base_url(self, endpoint: str | None) -> str:
        """The Glance root URL: ``endpoint``, or the adapter's (its
        override, or the Keystone catalog's).

        :raises keystoneauth1.exceptions.ClientException: finding it in
            the catalog failed.
        """
        url = endpoint or self._adapter.get_endpoint()
        if not url:
            raise ks_exc.EndpointNotFound("no Glance endpoint")
        # A catalog may name the versioned root; paths here carry /v2.
        return _VERSION_SUFFIX.sub("", url.rstrip("/"))

    def _auth_headers(self) -> dict:
        if (self._adapter.auth or self._adapter.session.auth) is None:
            return {}
        headers = self._adapter.session.get_auth_headers(self._adapter.auth)
        if headers is None:
            raise ks_exc.AuthorizationFailure("no token for Glance")
        return headers

    def _headers(self, accept, content_type=None):
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def get(self, endpoint: str | None, path: str,
            accept: str) -> requests.Response:
        """GET ``path`` from Glance, following redirects.

        :param endpoint: a Glance URL, or ``None`` for the adapter's.
        :param path: the path below the Glance root (``/v2/...``).
        :param accept: the media type asked for.
        :returns: a ``200`` response, its body not read yet (the caller
            closes it).
        :raises glance_errors.HTTPFailure: no usable answer.
        :raises keystoneauth1.exceptions.ClientException: finding Glance
            or getting a token from Keystone failed.
        """
        url = self.base_url(endpoint) + path
        home = origin(url)
        credentials = self._auth_headers()
        for _hop in range(MAX_REDIRECTS + 1):
            if origin(url)[0] not in ("http", "https") or not origin(url)[1]:
                raise glance_errors.BadResponse(
                    "Glance redirected the request to %s, which is not an "
                    "http(s) URL; fix the Glance (or proxy) configuration"
                    % glance_errors.url_for_humans(url), url)
            headers = self._headers(accept)
            if origin(url) == home:
                headers.update(credentials)
            resp = self._send(url, "GET", headers)
            if resp.status_code not in _REDIRECTS:
                return self._checked(resp, url)
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise glance_errors.BadResponse(
                    "%s answered HTTP %d without a Location"
                    % (glance_errors.url_for_humans(url), resp.status_code),
                    url)
            url = urllib.parse.urljoin(url, location.strip())
            LOG.debug("Glance redirects to %s",
                      glance_errors.url_for_humans(url))
        raise glance_errors.BadResponse(
            "Glance redirected the request more than %d times (last to %s); "
            "fix the Glance (or proxy) configuration"
            % (MAX_REDIRECTS, glance_errors.url_for_humans(url)), url)

    def _send(self, url, method, headers, data=None, timeout=None):
        connect = self.limits.connect_timeout or self.limits.stall_timeout
        try:
            # Never keystoneauth's own redirects (they resend the token
            # anywhere), error parsing (it reads the whole body) or body
            # logging.
            return self._adapter.request(
                url, method, headers=headers, data=data,
                authenticated=False, redirect=False, raise_exc=False,
                log=False, stream=True,
                timeout=timeout or (connect, self.limits.stall_timeout))
        except ks_exc.SSLError as exc:
            raise glance_errors.TLSFailed(glance_errors.said(exc),
                                          url) from exc
        except ks_exc.ConnectTimeout as exc:
            raise glance_errors.Unreachable(textutils.compose(
                "no answer from %s within %s s ([glance] stall_timeout)",
                glance_errors.url_for_humans(url),
                self.limits.stall_timeout), url) from exc
        except ks_exc.UnknownConnectionError as exc:
            raise glance_errors.BadResponse(textutils.compose(
                "the request to %s failed: %s",
                glance_errors.url_for_humans(url), glance_errors.said(exc)),
                url) from exc
        except ks_exc.ConnectionError as exc:
            raise glance_errors.Unreachable(textutils.compose(
                "cannot connect to %s (%s)",
                glance_errors.url_for_humans(url), glance_errors.said(exc)),
                url) from exc

    def _checked(self, resp, url, success=(200, 204)):
        """``resp`` if its status is one of ``success``, with an identity
        body.
        """
        code = resp.status_code
        if code >= 400:
            try:
                details = self.read_all(resp, url, ERROR_LIMIT,
                                        truncate=True)
            except glance_errors.HTTPFailure:
                details = b""
            finally:
                resp.close()
            raise glance_errors.HTTPStatus(
                code, glance_errors.printable(
                    details, glance_errors.DETAILS_LIMIT) or "no details",
                url)
        if code not in success:
            resp.close()
            raise glance_errors.BadResponse(
                "%s answered HTTP %d, which is not the answer asked for"
                % (glance_errors.url_for_humans(url), code), url)
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            resp.close()
            raise glance_errors.BadResponse(
                "%s sent a compressed body (Content-Encoding %s) although "
                "identity was asked for; it is refused, since it could "
                "expand without limit. Configure Glance (or its proxy) "
                "not to compress" % (glance_errors.url_for_humans(url),
                                     glance_errors.printable(encoding)),
                url)
        return resp

    def get_json(self, endpoint: str | None, path: str) -> dict:
        """GET a JSON object of at most :data:`RECORD_LIMIT` bytes.

        :raises glance_errors.HTTPFailure: as :meth:`get`, or the body is
            too long or not a JSON object.
        """
        resp = self.get(endpoint, path, "application/json")
        return self._json_object(resp, resp.url or path)

    def _json_object(self, resp, url):
        """The body of ``resp``: a JSON object of at most
        :data:`RECORD_LIMIT` bytes.  Closes ``resp``.
        """
        try:
            body = self.read_all(resp, url, RECORD_LIMIT)
        finally:
            resp.close()
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:
            # RecursionError: a record nested a few thousand levels deep.
            raise glance_errors.BadResponse(
                "%s sent a record that is not JSON (%s)"
                % (glance_errors.url_for_humans(url),
                   glance_errors.printable(str(exc))), url) from exc
        if not isinstance(value, dict):
            raise glance_errors.BadResponse(
                "%s sent a record that is not a JSON object but %s"
                % (glance_errors.url_for_humans(url),
                   type(value).__name__), url)
        return value

    # --- requests that change something ---------------------------------

    def _not_redirected(self, resp, url, method):
        """``resp``, unless it is a redirect (never followed here)."""
        if resp.status_code not in _REDIRECTS:
            return resp
        location = resp.headers.get("Location") or ""
        resp.close()
        raise glance_errors.BadResponse(
            "%s answered the %s with HTTP %d, a redirect to %s; requests "
            "that send data to Glance follow no redirect (the token and "
            "the data would go where the server chose). Set [glance] "
            "endpoint_override or api_servers to the URL Glance serves "
            "at" % (glance_errors.url_for_humans(url), method,
                    resp.status_code,
                    glance_errors.url_for_humans(
                        urllib.parse.urljoin(url, location.strip()))
                    if location.strip() else "nowhere (no Location)"),
            url)

    def send_json(self, endpoint: str | None, method: str, path: str,
                  value: typing.Any,
                  success: typing.Collection[int] = (200, 201)) -> dict:
        """Send ``value`` as JSON; the answer is a JSON object of at most
        :data:`RECORD_LIMIT` bytes.  Redirects are not followed.

        :param success: the statuses that mean it worked.
        :raises glance_errors.HTTPFailure: no usable answer (a redirect,
            an error status, a body too long or not a JSON object).
        :raises keystoneauth1.exceptions.ClientException: as :meth:`get`.
        """
        url = self.base_url(endpoint) + path
        headers = self._headers("application/json", "application/json")
        headers.update(self._auth_headers())
        resp = self._send(url, method, headers, json.dumps(value).encode())
        resp = self._checked(self._not_redirected(resp, url, method), url,
                             success)
        return self._json_object(resp, url)

    def delete(self, endpoint: str | None, path: str) -> None:
        """DELETE ``path``; redirects are not followed, the answer's body
        is read up to :data:`ERROR_LIMIT` bytes.

        :raises glance_errors.HTTPFailure: no success answer.
        :raises keystoneauth1.exceptions.ClientException: as :meth:`get`.
        """
        url = self.base_url(endpoint) + path
        headers = self._headers("*/*")
        headers.update(self._auth_headers())
        resp = self._send(url, "DELETE", headers)
        self._drain(self._checked(self._not_redirected(resp, url, "DELETE"),
                                  url, (200, 202, 204)), url)

    def put_file(self, endpoint: str | None, path: str,
                 body: "FileBody") -> None:
        """PUT ``body`` (streamed from its file) as
        ``application/octet-stream``; redirects are not followed.

        Sending a piece, and waiting for the answer, may each take at most
        :attr:`Limits.stall_timeout` seconds.  Success is a 2xx answer
        after the whole body was sent.

        :raises glance_errors.HTTPFailure: the transfer stalled or broke
            off, or the answer is not a success (never ``retryable``: the
            server may have taken part of the data).
        :raises FileReadError: reading the file failed.
        :raises keystoneauth1.exceptions.ClientException: as :meth:`get`.
        """
        url = self.base_url(endpoint) + path
        shown = glance_errors.url_for_humans(url)
        headers = self._headers("*/*", "application/octet-stream")
        headers.update(self._auth_headers())
        body.clock = self._clock
        body.last_piece = self._clock()
        stall = self.limits.stall_timeout
        try:
            # The connect timeout is also the timeout of each send: the
            # stall timeout bounds both.
            resp = self._send(url, "PUT", headers, body,
                              timeout=(stall, stall))
        except (glance_errors.HTTPFailure, FileReadError) as exc:
            if body.failure is not None:
                raise body.failure from exc
            if not body.passes:
                # No byte of the body went out (connecting failed): the
                # reason is the connection's, but the caller does not
                # retry an upload.
                if isinstance(exc, glance_errors.Unreachable):
                    raise glance_errors.BadResponse(exc.reason,
                                                    url) from exc
                raise
            if body.finished:
                if isinstance(exc, glance_errors.Unreachable):
                    # Sent whole: the answer is what did not come.
                    raise glance_errors.BadResponse(
                        "%s gave no answer within %s s after the whole "
                        "upload (%d bytes) was sent; raise [glance] "
                        "stall_timeout if Glance is that slow to store it"
                        % (shown, stall, body.sent), url) from exc
                raise glance_errors.BadResponse(exc.reason, url) from exc
            if self._clock() - body.last_piece >= stall * 0.9:
                raise glance_errors.BodyFailure(
                    "%s took no more of the upload for %s s after %d of "
                    "%d bytes; raise [glance] stall_timeout if Glance is "
                    "that slow" % (shown, stall, body.sent, body.size),
                    url) from exc
            raise glance_errors.BodyFailure(
                "the connection to %s broke off after %d of %d bytes of "
                "the upload were sent (%s)"
                % (shown, body.sent, body.size, exc.reason), url) from exc
        resp = self._checked(self._not_redirected(resp, url, "PUT"), url,
                             (200, 201, 204))
        self._drain(resp, url)
        if not body.finished or body.sent != body.size:
            raise glance_errors.BadResponse(
                "%s answered HTTP %d after only %d of the %d bytes of the "
                "upload were sent; the upload did not land"
                % (shown, resp.status_code, body.sent, body.size), url)

    def _drain(self, resp, url):
        """Read (at most :data:`ERROR_LIMIT` bytes of) an answer nobody
        needs, and close it.
        """
        try:
            self.read_all(resp, url, ERROR_LIMIT, truncate=True)
        except glance_errors.BodyFailure as exc:
            LOG.debug("Ignoring the unread answer of %s: %s",
                      glance_errors.url_for_humans(url), exc.reason)
        finally:
            resp.close()

    # --- bodies -----------------------------------------------------------

    def read_all(self, resp: requests.Response, url: str, limit: int,
                 truncate: bool = False) -> bytes:
        """The whole body, if it is at most ``limit`` bytes.

        :param truncate: return the first ``limit`` bytes of a longer
            body instead of refusing it.
        :raises glance_errors.BodyFailure: it is longer (unless
            ``truncate``), or reading it failed.
        """
        pieces = []
        try:
            for piece in self.chunks(resp, url, limit, limit,
                                     what="a record of at most %d bytes"
                                     % limit):
                pieces.append(piece)
        except glance_errors.BodyFailure as exc:
            if not (truncate and exc.too_long):
                raise
        return b"".join(pieces)[:limit]

    def chunks(self, resp: requests.Response, url: str, limit: int,
               chunk_size: int, what: str = "") -> typing.Iterator[bytes]:
        """Yield the body of ``resp`` as it arrives, in chunks of at most
        ``chunk_size`` bytes (1 MiB or more, but for the last, when
        ``chunk_size`` allows).

        At most ``limit + 1`` bytes are read: one byte more than
        ``limit`` raises, before it is yielded.  Reads return whatever has
        arrived, so that the rate is checked while a trickle comes in.

        :param what: the limit in words, for the message (``"the 1000
            bytes Glance recorded"``).
        :raises glance_errors.BodyFailure: the body broke off, stalled, was
            too slow, or went past ``limit`` (``too_long`` set).
        """
        raw = resp.raw
        shown = glance_errors.url_for_humans(url)
        total = 0
        pieces = []
        pending = 0
        window_start = self._clock()
        window_bytes = 0
        while True:
            want = min(chunk_size - pending, _ENOUGH, limit + 1 - total)
            try:
                data = raw.read1(want, decode_content=False)
            except (urllib3.exceptions.ReadTimeoutError,
                    socket.timeout) as exc:
                raise glance_errors.BodyFailure(
                    "no data arrived from %s for %s s after %d bytes; "
                    "raise [glance] stall_timeout if Glance is that slow"
                    % (shown, self.limits.stall_timeout, total),
                    url) from exc
            except (urllib3.exceptions.HTTPError, http.client.HTTPException,
                    OSError) as exc:
                # urllib3 wraps the socket's error in a tuple: show the
                # words, not the nesting.
                detail = exc.args[0] if exc.args and isinstance(
                    exc.args[0], str) else str(exc)
                raise glance_errors.BodyFailure(
                    "the connection to %s broke off after %d bytes (%s)"
                    % (shown, total, glance_errors.printable(
                        detail, glance_errors.DETAILS_LIMIT)),
                    url, retryable=True) from exc
            if not data:
                break
            total += len(data)
            if total > limit:
                raise glance_errors.BodyFailure(
                    "%s sent more than %s" % (shown, what or "%d bytes"
                                              % limit), url, too_long=True)
            pieces.append(data)
            pending += len(data)
            window_bytes += len(data)
            now = self._clock()
            elapsed = now - window_start
            if elapsed >= self.limits.rate_window:
                if window_bytes < self.limits.min_rate * elapsed:
                    raise glance_errors.BodyFailure(
                        "%s sent %d bytes in the last %.0f s, less than "
                        "[glance] min_download_rate (%d bytes/s) averaged "
                        "over [glance] download_rate_window (%s s), after "
                        "%d bytes in all" % (
                            shown, window_bytes, elapsed,
                            self.limits.min_rate, self.limits.rate_window,
                            total), url)
                window_start, window_bytes = now, 0
            if pending >= min(chunk_size, _ENOUGH):
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces, pending = [], 0
        if pieces:
            yield b"".join(pieces)


class FileReadError(Exception):
    """Reading the file of an upload failed.

    :param error: the ``OSError``.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


class FileBody:
    """The body of an upload: ``size`` bytes read from the open binary file
    ``src`` in pieces of at most :attr:`piece_size` bytes, never whole.

    Each time it is iterated it starts again from the first byte (an HTTP
    library that resends it sends all of it).

    :param observe: called with each piece as it is handed on for sending,
        and with ``None`` when the body starts again from the first byte.
    """

    #: the most read at once; at most this much must be taken by the
    #: server within the stall timeout.
    piece_size = 256 * 1024

    def __init__(self, src: typing.BinaryIO, size: int,
                 observe: typing.Callable[[bytes | None], None] | None = None
                 ) -> None:
        self._src = src
        self.size = size
        self._observe = observe
        #: bytes handed on for sending in the latest pass.
        self.sent = 0
        #: whether the latest pass handed on the whole file.
        self.finished = False
        #: when the latest piece was handed on (the client's clock).
        self.last_piece = 0.0
        #: what ended the latest pass, if the body itself failed.
        self.failure: Exception | None = None
        #: how many times sending it started.
        self.passes = 0
        self.clock: typing.Callable[[], float] = time.monotonic

    def __len__(self) -> int:
        # requests sends a Content-Length for a body with a length.
        return self.size

    def __iter__(self) -> typing.Iterator[bytes]:
        return self._pieces()

    def _pieces(self):
        self.sent, self.finished, self.failure = 0, False, None
        self.passes += 1
        self.last_piece = self.clock()
        if self._observe is not None:
            self._observe(None)
        try:
            self._src.seek(0)
            while self.sent < self.size:
                piece = self._src.read(min(self.piece_size,
                                           self.size - self.sent))
                if not piece:
                    raise OSError(0, "the file ended after %d of its %d "
                                     "bytes (it shrank while being sent)"
                                  % (self.sent, self.size))
                self.sent += len(piece)
                if self._observe is not None:
                    self._observe(piece)
                self.last_piece = self.clock()
                yield piece
        except OSError as exc:
            # Raised as something no HTTP library takes for a network
            # error, so that it reaches the caller as it is.
            self.failure = FileReadError(exc)
            raise self.failure from exc
        self.finished = True
