"""Turning glanceclient, keystoneauth1 and requests errors into the
library's, for the Glance source.

:func:`translate` decides, for one failed request, whether it is worth
another attempt (:class:`Retryable`) or which
:mod:`imagebackend.exception` error the caller sees.  Messages name the
credential that failed (:func:`describe_conf_auth`,
:func:`describe_plugin`) so an operator knows which option to fix.
"""

import dataclasses
import re

from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc
from oslo_config import cfg
import requests

from imagebackend import exception

_PASSWORD_PLUGINS = ("password", "v3password", "v2password")
_TOKEN_PLUGINS = ("token", "v3token", "v2token", "admin_token")
_LEADING_STATUS = re.compile(r"^\s*([1-5][0-9][0-9])\b")


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
    if isinstance(exc, glance_exc.HTTPException):
        return _glance_http(exc, image_id, where, credential,
                            retry_server_errors)
    if isinstance(exc, (glance_exc.CommunicationError,
                        glance_exc.InvalidEndpoint)):
        return Retryable("cannot connect (%s)" % exc)
    if isinstance(exc, ks_exc.SSLError):
        return exception.ImageSourceError(
            image_id=image_id,
            reason="TLS failed (%s); set [glance] cafile (or certfile and "
                   "keyfile) to match the server's certificate" % exc)
    if isinstance(exc, (ks_exc.ConnectionError, ks_exc.DiscoveryFailure)):
        # glanceclient wraps failures to reach Glance: this one happened
        # while authenticating.
        return Retryable("cannot reach Keystone (%s)" % exc,
                         source="Keystone")
    if isinstance(exc, ks_exc.HttpError):
        return _keystone_http(exc, image_id, credential)
    if isinstance(exc, ks_exc.EndpointNotFound):
        return exception.ImageSourceError(
            image_id=image_id,
            reason="the Keystone catalog offers no Glance endpoint to %s "
                   "(%s); set [glance] service_type, valid_interfaces and "
                   "region_name to match the catalog, or endpoint_override"
                   % (credential, exc))
    if isinstance(exc, ks_exc.AuthPluginException):
        return exception.ConfigurationError(
            reason="[glance] credentials are incomplete or wrong (%s)"
                   % exc)
    if isinstance(exc, requests.exceptions.ConnectionError):
        return Retryable("connection to %s failed (%s)" % (where, exc))
    return exception.ImageSourceError(
        image_id=image_id,
        reason="request to %s failed: %s: %s" % (
            where, type(exc).__name__, exc))


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


def _glance_http(exc, image_id, where, credential, retry_server_errors):
    code = _status(exc)
    if code == 404:
        return exception.ImageNotFound(
            image_id=image_id, source=where,
            hint="; check the id, and that the image is shared with the "
                 "project of %s" % credential)
    if code == 401:
        return exception.ImageNotAuthorized(
            image_id=image_id, source=where,
            reason="Glance refused the request made with %s (HTTP 401: "
                   "%s). Its token is missing, expired or revoked; check "
                   "that credential, and that Glance's own "
                   "[keystone_authtoken] points at the same Keystone"
                   % (credential, exc.details))
    if code == 403:
        return exception.ImageNotAuthorized(
            image_id=image_id, source=where,
            reason="%s may not use this image (HTTP 403: %s); share the "
                   "image with that project or use a credential of the "
                   "owning project" % (credential, exc.details))
    if code is None or code >= 500 or code == 429:
        reason = "Glance answered HTTP %s (%s)" % (code, exc.details)
        if retry_server_errors:
            return Retryable(reason)
        return exception.ImageSourceError(image_id=image_id, reason=reason)
    return exception.ImageSourceError(
        image_id=image_id,
        reason="%s refused the request with HTTP %s: %s" % (
            where, code, exc.details))


def _keystone_http(exc, image_id, credential):
    """An HTTP error from Keystone while authenticating."""
    status = exc.http_status
    if status is not None and status >= 500:
        return Retryable("Keystone answered HTTP %s (%s)" % (status, exc))
    if status in (401, 403, 404):
        return exception.ImageNotAuthorized(
            image_id=image_id, source="Keystone",
            reason="Keystone refused %s (HTTP %s: %s); fix that credential "
                   "in the [glance] options (or the session the caller "
                   "passed in)" % (credential, status, exc.message))
    return exception.ImageSourceError(
        image_id=image_id,
        reason="Keystone refused to authenticate %s (HTTP %s: %s)" % (
            credential, status, exc.message))
