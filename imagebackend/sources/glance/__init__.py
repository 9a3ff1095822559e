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

"""Images from OpenStack Glance, reached through keystoneauth1.

The source finds Glance in the Keystone catalog (or at ``[glance]
endpoint_override`` / ``api_servers``), reads an image's record and streams
its bytes through its keystoneauth1 adapter, with the bounds of
:mod:`imagebackend.sources.glance.client` (records and error bodies read up to
a small size, data streamed whatever its headers say and only up to the size
Glance recorded, stall and minimum-rate timeouts, redirects followed only
to http(s), the token only to Glance's own origin).  It yields the body as
it arrives and hashes nothing itself: the pipeline hashes the bytes once,
while writing them, against the hash Glance recorded (:class:`ImageMeta`);
an image with no hash this host can check is refused unless ``[glance]
allow_unverified_images`` is set.  Uploads (:mod:`imagebackend.sources.
glance_upload`) go through the same client: bounded answers, the file
streamed from disk, no redirect followed, the stall timeout on every send.

Sources built from the ``[glance]`` options share one keystoneauth1
session per process and credential (:mod:`imagebackend.sources.glance.
sessions`), so a token is asked for once per process, not once per source;
a token Glance refuses with HTTP 401 is dropped.

Connection failures and 5xx answers are retried ``[glance] num_retries``
times with exponential backoff, moving through ``api_servers`` in turn;
4xx answers are not retried.  Every keystoneauth1 and requests error
becomes an :mod:`imagebackend.exception` error naming the image and the
fix, and text Glance sent is escaped and bounded before it
reaches a message or a log line.
"""

import copy
import logging
import time
import typing

from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session
from oslo_config import cfg
from oslo_utils import units
import requests

from imagebackend.common import config_check
from imagebackend.common import progress as progress_mod
from imagebackend import exception
from imagebackend.sources import base
from imagebackend.sources.glance import client as glance_client
from imagebackend.sources.glance import errors as glance_errors
from imagebackend.sources.glance import record as glance_record
from imagebackend.sources.glance import sessions as glance_sessions
from imagebackend.sources.glance import upload as glance_upload
from imagebackend import textutils

LOG = logging.getLogger(__name__)

GROUP = "glance"

_GLANCE_OPTS = [
    cfg.ListOpt("api_servers",
                default=[],
                help="Glance API URLs (such as 'http://glance1:9292') used "
                     "instead of looking Glance up in the Keystone catalog. "
                     "They are tried in turn: a connection error or a 5xx "
                     "answer from one moves the next attempt to the next "
                     "URL (see num_retries). Ignored when endpoint_override "
                     "is set. Credentials ([glance] auth_type and the "
                     "plugin's options) are still used for tokens when "
                     "set; without them requests carry no token. Default: "
                     "empty (use the catalog)."),
    cfg.IntOpt("num_retries",
               default=3,
               min=0,
               help="How many times a request to Glance or Keystone is "
                    "retried after a connection error or a 5xx answer, "
                    "waiting 0.5 s, then 1 s, 2 s, ... (at most 8 s) "
                    "between attempts; 4xx answers (not found, not "
                    "authorized, ...) are never retried. 0 means one "
                    "attempt only. A download that breaks off once bytes "
                    "have started to arrive is not retried: it fails and "
                    "nothing is cached. keystoneauth's own connect_retries "
                    "and status_code_retries, if set, apply inside each "
                    "attempt. Default: 3."),
    cfg.IntOpt("stall_timeout",
               default=60,
               min=1,
               help="Seconds a request to Glance may go without receiving "
                    "a byte (while connecting, waiting for the answer or "
                    "reading a record or image data) before it fails. A "
                    "stall before the answer is retried like a connection "
                    "error (see num_retries); a stall in the image data "
                    "fails the download, naming this option. An upload "
                    "fails when Glance takes no more of it (or no 256 KiB "
                    "piece of it) within this time, or does not answer "
                    "this long after the last byte; it is not retried. "
                    "The session option timeout, when set, bounds only "
                    "the time to connect, except for uploads, where this "
                    "option bounds connecting too. Default: 60."),
    cfg.IntOpt("min_download_rate",
               default=1024,
               min=0,
               help="The fewest bytes per second a body from Glance (image "
                    "data or a record) must average over each "
                    "download_rate_window seconds; a slower transfer fails, "
                    "naming this option, so that a trickling server cannot "
                    "hold a download (and the image's lock) for as long as "
                    "it likes. 0 turns the check off (stall_timeout still "
                    "applies). Default: 1024 (1 KiB/s)."),
    cfg.IntOpt("download_rate_window",
               default=60,
               min=1,
               help="The seconds over which min_download_rate is averaged: "
                    "a slow start or a pause shorter than this (and than "
                    "stall_timeout) is tolerated. Default: 60."),
    cfg.IntOpt("max_download_size",
               default=units.Ti,
               min=1,
               help="The most bytes an image download from Glance may "
                    "yield. An image whose recorded size is larger is "
                    "refused before the download; for an image with no "
                    "recorded size the download stops, and fails, at this "
                    "many bytes (an image with a recorded size stops at "
                    "that size). Keep it at least [imagebackend] "
                    "max_image_virtual_size for raw images. Default: "
                    "1099511627776 (1 TiB)."),
    cfg.BoolOpt("allow_unverified_images",
                default=False,
                help="Whether to use an image whose bytes cannot be checked "
                     "against a hash Glance recorded: one with no "
                     "os_hash_value and no checksum, or whose os_hash_algo "
                     "this host's hashlib lacks and that has no md5 "
                     "checksum either. Such an image is refused by default, "
                     "since a corrupted or tampered download would be "
                     "cached as it is; allowing it logs a warning each "
                     "time its record is read. (An image with only "
                     "Glance's legacy md5 "
                     "checksum is verified against it.) Default: false."),
]


def _adapter_opts() -> list[cfg.Opt]:
    opts = copy.deepcopy(
        ks_loading.get_adapter_conf_options(include_deprecated=False))
    for opt in opts:
        if opt.dest == "service_type":
            opt.default = "image"
        elif opt.dest == "valid_interfaces":
            opt.default = ["internal", "public"]
    return opts


_ADAPTER_OPTS = _adapter_opts()

#: auth plugins whose options are listed in the sample configuration; any
#: other keystoneauth1 plugin works too (its options are registered when
#: ``auth_type`` names it).
SAMPLE_AUTH_PLUGINS = ("password", "v3applicationcredential", "token")


def _sample_opts() -> list[cfg.Opt]:
    """Every option of the [glance] group, each name once, for the sample
    configuration (the auth plugin options of the common plugins).
    """
    opts = list(_GLANCE_OPTS)
    opts += ks_loading.get_session_conf_options()
    opts += ks_loading.get_auth_common_conf_options()
    for plugin in SAMPLE_AUTH_PLUGINS:
        opts += ks_loading.get_auth_plugin_conf_options(plugin)
    opts += _ADAPTER_OPTS
    unique = {}
    for opt in opts:
        unique.setdefault(opt.dest, opt)
    return list(unique.values())


class GlanceSource(base.ImageSource):
    """Download (and upload) images from OpenStack Glance.

    :param conf: the configuration, with the ``[glance]`` options
        registered (:meth:`register_opts`).
    :param session: an authenticated keystoneauth1 session to use instead of
        the ``[glance]`` auth and session options (the adapter options still
        apply).
    :param adapter: a keystoneauth1 adapter (session plus endpoint filter)
        to use instead of every ``[glance]`` keystoneauth option.
    :param sleep: the function that waits between retries.
    :raises imagebackend.exception.ConfigurationError: the ``[glance]``
        options are not registered, or do not describe a way to reach
        Glance.
    :raises imagebackend.exception.ConfigValueError: a ``[glance]`` value
        cannot be read.
    """

    name = "glance"
    OPTIONS = [(GROUP, _sample_opts())]

    #: the first wait between retries, doubled after each failure.
    retry_delay = 0.5
    #: the longest wait between retries.
    max_retry_delay = 8.0

    def __init__(self, conf: cfg.ConfigOpts,
                 session: ks_session.Session | None = None,
                 adapter: ks_adapter.Adapter | None = None,
                 sleep: typing.Callable[[float], None] = time.sleep) -> None:
        super().__init__(conf)
        # A value that cannot be read is reported now, naming the option
        # and the file, not as oslo.config's error part-way through.
        config_check.check_options(conf, GROUP, _GLANCE_OPTS)
        self._sleep = sleep
        self._adapter, self.credential = self._load_adapter(session, adapter)
        group = conf.glance
        self._http = glance_client.Client(self._adapter, glance_client.Limits(
            stall_timeout=group.stall_timeout,
            min_rate=group.min_download_rate,
            rate_window=group.download_rate_window,
            connect_timeout=group.timeout))

    @classmethod
    def register_opts(cls, conf: cfg.ConfigOpts) -> None:
        """Register the ``[glance]`` options (the auth plugin's own are
        registered when the plugin named by ``auth_type`` is loaded).
        """
        conf.register_opts(_GLANCE_OPTS + _ADAPTER_OPTS, group=GROUP)
        ks_loading.register_session_conf_options(conf, GROUP)
        ks_loading.register_auth_conf_options(conf, GROUP)

    @classmethod
    def required_opts(cls) -> list[tuple[str, list[cfg.Opt]]]:
        # OPTIONS also lists common auth plugins' options (for the
        # sample), which are registered only when auth_type names them.
        return [(GROUP, _GLANCE_OPTS + _ADAPTER_OPTS)]

    # --- setup ------------------------------------------------------------

    def _load_adapter(self, session, adapter):
        if adapter is not None:
            return adapter, glance_errors.describe_plugin(
                adapter.auth or adapter.session.auth, "the caller's adapter")
        try:
            if session is None:
                # One token per process and credential, not one per
                # source.
                session = glance_sessions.shared(self.conf, GROUP)
                credential = glance_errors.describe_conf_auth(
                    self.conf, GROUP)
            else:
                credential = glance_errors.describe_plugin(
                    session.auth, "the caller's session")
            adapter = ks_loading.load_adapter_from_conf_options(
                self.conf, GROUP, session=session)
        except (ks_exc.ClientException, cfg.Error, TypeError) as exc:
            raise exception.ConfigurationError(
                reason="[glance] options: %s" % exc) from exc
        if (adapter.auth or adapter.session.auth) is None and not (
                adapter.endpoint_override or self.conf.glance.api_servers):
            raise exception.ConfigurationError(
                reason="[glance] gives no way to reach Glance: set auth_type "
                       "and its credentials to find Glance in the Keystone "
                       "catalog, or endpoint_override or api_servers")
        return adapter, credential

    def _forget_token(self) -> None:
        auth = self._adapter.auth or self._adapter.session.auth
        if auth is not None:
            auth.invalidate()

    def _endpoints(self) -> list[str | None]:
        """Endpoint overrides to use in turn (None: the adapter's own)."""
        if self._adapter.endpoint_override:
            return [None]
        return list(self.conf.glance.api_servers) or [None]

    def describe(self) -> str:
        endpoints = [e for e in self._endpoints() if e]
        if self._adapter.endpoint_override:
            return "glance at %s" % self._adapter.endpoint_override
        if endpoints:
            return "glance at %s" % ", ".join(endpoints)
        return "glance (Keystone catalog, service type %r)" % (
            self._adapter.service_type or "image")

    # --- requests with retries --------------------------------------------

    def _call(self, image_id, action, func, retry_server_errors=True,
              retry=True):
        """``func(endpoint)`` with retries, ``endpoint`` being the Glance
        URL to use (``None``: the adapter's); errors become the library's.

        :param retry: whether to try again at all (not for an upload,
            which the failed attempt may have started storing).
        """
        endpoints = self._endpoints()
        attempts = self.conf.glance.num_retries + 1 if retry else 1
        for attempt in range(1, attempts + 1):
            endpoint = endpoints[(attempt - 1) % len(endpoints)]
            where = ("glance at %s" % endpoint) if endpoint else (
                self.describe())
            try:
                return func(endpoint)
            except (ks_exc.ClientException,
                    requests.exceptions.RequestException,
                    glance_errors.HTTPFailure) as exc:
                if (isinstance(exc, glance_errors.HTTPStatus)
                        and exc.code == 401):
                    # The token was refused (revoked, or Keystone forgot
                    # it): the next request asks for a new one rather
                    # than offering it again for as long as the process
                    # keeps its session.
                    self._forget_token()
                error = glance_errors.translate(
                    exc, image_id=image_id, where=where,
                    credential=self.credential,
                    retry_server_errors=retry_server_errors)
                if not isinstance(error, glance_errors.Retryable):
                    raise error from exc
                if attempt == attempts:
                    raise exception.ImageSourceUnavailable(
                        image_id=image_id, source=error.source or where,
                        attempts=attempts,
                        reason=textutils.compose(
                            "%s while trying to %s; check that Glance and "
                            "Keystone are running and reachable, or raise "
                            "[glance] num_retries", error.reason,
                            action)) from exc
                delay = min(self.retry_delay * 2 ** (attempt - 1),
                            self.max_retry_delay)
                LOG.warning("Image %s: %s failed on attempt %d of %d (%s); "
                            "retrying in %.1f s", image_id, action, attempt,
                            attempts, error.reason, delay)
                self._sleep(delay)

    # --- the source contract ----------------------------------------------

    def get_meta(self, image_id: str) -> base.ImageMeta:
        """Look an image up in Glance.

        :raises imagebackend.exception.InvalidImageId: not a UUID.
        :raises imagebackend.exception.ImageNotFound: no such image.
        :raises imagebackend.exception.ImageNotAuthorized: Keystone refused
            the credentials or Glance refused the token or the access.
        :raises imagebackend.exception.ImageNotActive: the image is not
            ``active`` (still uploading, deactivated, deleted, ...).
        :raises imagebackend.exception.ImageUnsupported: its container
            format is not ``bare``, it is empty or larger than ``[glance]
            max_download_size``, or Glance records no hash this host can
            check (unless ``[glance] allow_unverified_images``).
        :raises imagebackend.exception.ImageSourceError: Glance's record
            is malformed (too long, not JSON, values of the wrong type).
        :raises imagebackend.exception.ImageSourceUnavailable: Glance or
            Keystone did not answer after ``[glance] num_retries``.
        """
        _check_id(image_id)
        image = self._call(
            image_id, "read the image record",
            lambda endpoint: self._http.get_json(
                endpoint, "/v2/images/%s" % image_id))
        return glance_record.image_meta(
            image_id, image, source=self.describe(),
            max_download_size=self.conf.glance.max_download_size,
            allow_unverified=self.conf.glance.allow_unverified_images)

    def open(self, meta: base.ImageMeta) -> typing.Iterator[bytes]:
        """Start the download; the returned iterator yields the body in
        chunks of up to :attr:`chunk_size` bytes as they arrive, and stops
        with an error as soon as Glance sends more than it recorded (or,
        with no recorded size, more than ``[glance] max_download_size``).

        Closing the iterator early closes the HTTP connection.

        :raises imagebackend.exception.ImageNotFound: the image is gone.
        :raises imagebackend.exception.ImageNotAuthorized: as in get_meta.
        :raises imagebackend.exception.ImageSourceError: Glance's answer is
            not the image's data (a redirect loop or to another scheme, a
            compressed body, another status than 200).
        :raises imagebackend.exception.ImageSourceUnavailable: no answer
            after ``[glance] num_retries``.
        :raises imagebackend.exception.ImageDownloadError: Glance holds no
            data, announces another size than it recorded, or (while
            iterating) the transfer broke off, stalled, was too slow or
            too long.
        """
        _check_id(meta.image_id)
        path = "/v2/images/%s/file" % meta.image_id
        resp = self._call(meta.image_id, "start the download",
                          lambda endpoint: self._http.get(
                              endpoint, path, "application/octet-stream"))
        try:
            limit, what = self._download_limit(meta, resp)
        except BaseException:
            resp.close()
            raise
        return _Download(resp, self._stream(resp, meta, limit, what))

    def _download_limit(self, meta, resp):
        """The most bytes the body may have, and that bound in words."""
        url = glance_errors.url_for_humans(resp.url)
        if resp.status_code == 204:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=url,
                reason="Glance holds no data for it")
        if meta.size is not None:
            limit = meta.size
            what = "the %d bytes Glance recorded for the image" % limit
        else:
            limit = self.conf.glance.max_download_size
            what = ("[glance] max_download_size (%d bytes), for an image "
                    "with no recorded size" % limit)
        length = resp.headers.get("Content-Length")
        if length is not None:
            length = length.strip()
            if not length.isdigit() or (
                    meta.size is not None and int(length) != meta.size) or (
                    int(length) > limit):
                raise exception.ImageDownloadError(
                    image_id=meta.image_id, source=url,
                    reason="Glance announces a body of %s bytes "
                           "(Content-Length), but the image may have at "
                           "most %s" % (glance_errors.printable(length),
                                        what))
        return limit, what

    def _stream(self, resp, meta, limit, what):
        url = resp.url
        done = 0
        try:
            for chunk in self._http.chunks(resp, url, limit,
                                           self.chunk_size, what):
                done += len(chunk)
                yield chunk
        except glance_errors.BodyFailure as exc:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=self.describe(),
                reason=exc.reason) from exc
        finally:
            resp.close()
        shown = glance_errors.url_for_humans(url)
        if done == 0:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=self.describe(),
                reason="%s sent no data (0 bytes); an empty image cannot "
                       "be a disk" % shown)
        if meta.size is not None and done < meta.size:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=self.describe(),
                reason="%s ended the body after %d of the %d bytes Glance "
                       "recorded" % (shown, done, meta.size))

    # --- upload -----------------------------------------------------------

    def upload(self, name: str, path: str, disk_format: str,
               container_format: str = "bare",
               progress: progress_mod.Progress | None = None) -> str:
        """Create an image in Glance and upload a file as its data.

        :param name: the new image's name.
        :param path: the file to upload.
        :param disk_format: its format (``raw``, ``qcow2``, ...).
        :param container_format: Glance's container format.
        :param progress: called as ``progress("upload", bytes_sent,
            total_bytes)`` after each piece is read for sending (the
            protocol of :mod:`imagebackend.common.progress`).
        :returns: the new image's id, once Glance has it ``active`` with
            the size (and, when Glance computed one, the sha512) sent.
        :raises imagebackend.exception.ImageSourceError: the file cannot be
            read, Glance refused the image or redirected a request, its
            answers are malformed, or the upload failed or stalled for
            ``[glance] stall_timeout`` seconds (the half-made image is then
            deleted).
        :raises imagebackend.exception.ImageSourceUnavailable: Glance or
            Keystone could not be reached to create the image, after
            ``[glance] num_retries``.
        """
        return glance_upload.upload(self._call, self._http, name, path,
                                    disk_format, container_format, progress)


def _check_id(image_id: str) -> None:
    base.check_image_id(image_id)
    if not glance_errors.is_image_id(image_id):
        raise exception.InvalidImageId(
            # Shown with %r, which escapes; only the length needs a bound.
            image_id=image_id[:100] if isinstance(image_id, str)
            else image_id,
            reason="Glance image ids are UUIDs such as "
                   "'1b2c3d4e-0000-4000-8000-123456789abc'")


class _Download:
    """The iterator :meth:`GlanceSource.open` returns: its ``close()``
    closes the response even before the first chunk was asked for.
    """

    def __init__(self, resp, chunks) -> None:
        self._resp = resp
        self._chunks = chunks

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._resp.close()
