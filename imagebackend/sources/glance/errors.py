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

"""Turning glanceclient, keystoneauth1 and requests errors into the
library's, for the Glance source.

:func:`translate` decides, for one failed request, whether it is worth
another attempt (:class:`Retryable`) or which
:mod:`imagebackend.exception` error the caller sees.  Messages name the
credential that failed (:func:`describe_conf_auth`,
:func:`describe_plugin`) so an operator knows which option to fix.

The Glance HTTP layer (:mod:`imagebackend.sources.glance.client`) raises the
:class:`HTTPFailure` family defined here; :func:`translate` turns those
into the library's errors too.  Text Glance sent (error bodies, statuses,
URLs) goes through :func:`printable` before it reaches a message or a log
line: control characters are escaped and the length is bounded.
"""

import dataclasses
import re
import urllib.parse

from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc
from oslo_config import cfg
import requests

from imagebackend import exception
from imagebackend import textutils

_PASSWORD_PLUGINS = ("password", "v3password", "v2password")
_TOKEN_PLUGINS = ("token", "v3token", "v2token", "admin_token")
_LEADING_STATUS = re.compile(r"^\s*([1-5][0-9][0-9])\b")

#: how much server-provided text a message shows, in characters.
TEXT_LIMIT = 200
#: how much of an error body a message shows, in characters.
DETAILS_LIMIT = 1024


def printable(value, limit: int = TEXT_LIMIT) -> str:
    """Server- or tenant-provided text, safe for a message or a log line:
    ``textutils.printable`` (escaped, on one line, cut to
    about ``limit`` characters).  A value that is not text is shown as its
    ``repr``, escaped the same way.
    """
    if not isinstance(value, (str, bytes)):
        value = repr(value)
    return textutils.printable(value, limit)


def url_for_humans(url) -> str:
    """A URL for messages: scheme, host, port and path only (a query may
    hold a signature or a token), escaped and bounded.
    """
    try:
        parts = urllib.parse.urlsplit(str(url))
        shown = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "",
             ""))
    except ValueError:
        shown = str(url)
    return printable(shown)


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def is_image_id(value) -> bool:
    """Whether ``value`` is a Glance image id (a UUID, nothing around it:
    not even the newline a ``$`` would let through).
    """
    return isinstance(value, str) and bool(_UUID_RE.fullmatch(value))


class HTTPFailure(Exception):
    """A request to Glance failed in a way the HTTP layer noticed.

    :param reason: what went wrong, in words (already escaped).
    :param url: the URL of the request, for messages.
    """

    #: whether another attempt may get past it.
    retryable = False

    def __init__(self, reason: str, url: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.url = url


class Unreachable(HTTPFailure):
    """No answer: the connection failed or timed out."""

    retryable = True


class TLSFailed(HTTPFailure):
    """The TLS handshake with Glance failed."""


class BadResponse(HTTPFailure):
    """An answer that is not what was asked for (a redirect loop, a
    redirect to another scheme, a compressed or oversized body, a record
    that is not JSON, ...).
    """


class HTTPStatus(HTTPFailure):
    """Glance answered with an error status.

    :param code: the HTTP status.
    :param details: the start of the error body, escaped and bounded.
    """

    def __init__(self, code: int, details: str, url: str | None = None):
        super().__init__("HTTP %d: %s" % (code, details), url)
        self.code = code
        self.details = details


class BodyFailure(HTTPFailure):
    """Reading a body failed part-way (it broke off, stalled, was too slow
    or too long).  ``retryable`` when the connection broke off.

    :param too_long: the body went past the bound it was read with.
    """

    def __init__(self, reason: str, url: str | None = None,
                 retryable: bool = False, too_long: bool = False) -> None:
        super().__init__(reason, url)
        self.retryable = retryable
        #: the body went past the bound it was read with.
        self.too_long = too_long


@dataclasses.dataclass(frozen=True)
class Retryable:
    """A failure another attempt may get past (connection, 5xx)."""

    reason: str
    #: which service failed, when it is not the Glance being asked.
    source: str | None = None


def _conf_value(conf, group, name):
    try:
        return conf[group][name]
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return None


def describe_conf_auth(conf: cfg.ConfigOpts, group: str) -> str:
    """Which configured credential is used, in words, for messages."""
    section = _conf_value(conf, group, "auth_section") or group
    auth_type = _conf_value(conf, section, "auth_type")

    def value(name):
        return _conf_value(conf, section, name)

    where = "[%s]" % section
    if not auth_type:
        return "no credentials (%s auth_type is not set)" % where
    project = value("project_name") or value("project_id")
    if auth_type in _PASSWORD_PLUGINS:
        text = "the %s password of user %r (domain %r)" % (
            where, value("username") or value("user_id"),
            value("user_domain_name") or value("user_domain_id"))
    elif auth_type == "v3applicationcredential":
        text = "the %s application credential %r" % (
            where, value("application_credential_id")
            or value("application_credential_name"))
    elif auth_type in _TOKEN_PLUGINS:
        text = "the %s token (auth_type %s)" % (where, auth_type)
    else:
        text = "the %s credentials of auth plugin %r" % (where, auth_type)
    if project:
        text += " for project %r" % project
    if value("auth_url"):
        text += " at %s" % value("auth_url")
    return text


def describe_plugin(auth, owner: str) -> str:
    """The same for an auth plugin handed in by a caller."""
    if auth is None:
        return "%s, which carries no credentials" % owner
    details = ["auth plugin %s" % type(auth).__name__]
    user = getattr(auth, "username", None) or getattr(auth, "_username",
                                                      None)
    for method in getattr(auth, "auth_methods", None) or []:
        user = user or getattr(method, "username", None)
    if user:
        details.append("user %r" % user)
    project = (getattr(auth, "project_name", None)
               or getattr(auth, "project_id", None))
    if project:
        details.append("project %r" % project)
    return "the credentials of %s (%s)" % (owner, ", ".join(details))


def translate(exc: Exception, *, image_id: str, where: str,
              credential: str, retry_server_errors: bool = True
              ) -> Retryable | exception.ImageBackendException:
    """Classify one failed request.

    :param exc: what glanceclient, keystoneauth1 or requests raised.
    :param image_id: the image the request was about, for messages.
    :param where: the Glance the request went to, for messages.
    :param credential: the credential in use, in words.
    :param retry_server_errors: whether a 5xx answer is worth another
        attempt (not for requests that may have changed something).
    :returns: a :class:`Retryable`, or the exception to raise.
    """
    if isinstance(exc, HTTPStatus):
        return _glance_status(exc.code, exc.details, image_id, where,
                              credential, retry_server_errors)
    if isinstance(exc, TLSFailed):
        return exception.ImageSourceError(
            image_id=image_id,
            reason="TLS with %s failed (%s); set [glance] cafile (or "
                   "certfile and keyfile) to match the server's "
                   "certificate" % (where, exc.reason))
    if isinstance(exc, HTTPFailure):
        if exc.retryable:
            return Retryable(exc.reason)
        return exception.ImageSourceError(image_id=image_id,
                                          reason=exc.reason)
    if isinstance(exc, glance_exc.HTTPException):
        return _glance_status(_status(exc), printable(exc.details,
                                                      DETAILS_LIMIT),
                              image_id, where, credential,
                              retry_server_errors)
    if isinstance(exc, (glance_exc.CommunicationError,
                        glance_exc.InvalidEndpoint)):
        return Retryable(textutils.compose("cannot connect (%s)", said(exc)))
    if isinstance(exc, ks_exc.SSLError):
        return exception.ImageSourceError(
            image_id=image_id,
            reason="TLS failed (%s); set [glance] cafile (or certfile and "
                   "keyfile) to match the server's certificate"
                   % said(exc))
    if isinstance(exc, (ks_exc.ConnectionError, ks_exc.DiscoveryFailure)):
        # glanceclient wraps failures to reach Glance: this one happened
        # while authenticating.
        return Retryable("cannot reach Keystone (%s)" % said(exc),
                         source="Keystone")
    if isinstance(exc, ks_exc.HttpError):
        return _keystone_http(exc, image_id, credential)
    if isinstance(exc, ks_exc.EndpointNotFound):
        return exception.ImageSourceError(
            image_id=image_id,
            reason="the Keystone catalog offers no Glance endpoint to %s "
                   "(%s); set [glance] service_type, valid_interfaces and "
                   "region_name to match the catalog, or endpoint_override"
                   % (credential, said(exc)))
    if isinstance(exc, ks_exc.AuthPluginException):
        return exception.ConfigurationError(
            reason="[glance] credentials are incomplete or wrong (%s)"
                   % said(exc))
    if isinstance(exc, requests.exceptions.ConnectionError):
        return Retryable(textutils.compose(
            "connection to %s failed (%s)", where, said(exc)))
    return exception.ImageSourceError(
        image_id=image_id,
        reason="request to %s failed: %s: %s" % (
            where, type(exc).__name__, said(exc)))


def said(exc) -> str:
    """A third-party error's text (which may quote a server), escaped and
    bounded.
    """
    return printable(str(exc), DETAILS_LIMIT)


def _status(exc):
    """The HTTP status of a glanceclient error, or None when unknown.

    glanceclient has classes for some codes only and reports the others
    (415, 429, 504, ...) as a bare HTTPException; Glance's error text
    starts with the status, so read it back from there.
    """
    if isinstance(exc.code, int):
        return exc.code
    match = _LEADING_STATUS.match(str(exc.details or ""))
    return int(match.group(1)) if match else None


def _glance_status(code, details, image_id, where, credential,
                   retry_server_errors):
    """An error status from Glance; ``details`` is already escaped."""
    if code == 404:
        return exception.ImageNotFound(
            image_id=image_id, source=where,
            hint="; check the id, and that the image is shared with the "
                 "project of %s" % credential)
    if code == 401:
        return exception.ImageNotAuthorized(
            image_id=image_id, source=where,
            reason=textutils.compose(
                "Glance refused the request made with %s (HTTP 401: %s). "
                "Its token is missing, expired or revoked; check that "
                "credential, and that Glance's own [keystone_authtoken] "
                "points at the same Keystone", credential, details))
    if code == 403:
        return exception.ImageNotAuthorized(
            image_id=image_id, source=where,
            reason=textutils.compose(
                "%s may not use this image (HTTP 403: %s); share the image "
                "with that project or use a credential of the owning "
                "project", credential, details))
    if code is None or code >= 500 or code == 429:
        reason = textutils.compose("Glance answered HTTP %s (%s)", code,
                                   details)
        if retry_server_errors:
            return Retryable(reason)
        return exception.ImageSourceError(image_id=image_id, reason=reason)
    return exception.ImageSourceError(
        image_id=image_id,
        reason=textutils.compose("%s refused the request with HTTP %s: %s",
                                 where, code, details))


def _keystone_http(exc, image_id, credential):
    """An HTTP error from Keystone while authenticating."""
    status = exc.http_status
    if status is not None and status >= 500:
        return Retryable(textutils.compose(
            "Keystone answered HTTP %s (%s)", status, said(exc)))
    if status in (401, 403, 404):
        return exception.ImageNotAuthorized(
            image_id=image_id, source="Keystone",
            reason="Keystone refused %s (HTTP %s: %s); fix that credential "
                   "in the [glance] options (or the session the caller "
                   "passed in)" % (credential, status,
                                   said(exc.message)))
    return exception.ImageSourceError(
        image_id=image_id,
        reason="Keystone refused to authenticate %s (HTTP %s: %s)" % (
            credential, status, said(exc.message)))
