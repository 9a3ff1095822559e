"""Images from OpenStack Glance, reached through keystoneauth1.

The source finds Glance in the Keystone catalog (or at ``[glance]
endpoint_override`` / ``api_servers``), reads an image's record and streams
its bytes with python-glanceclient's v2 HTTP client.  It yields the body as
it arrives and verifies nothing itself: the pipeline hashes the bytes once,
while writing them, against the hash Glance recorded (:class:`ImageMeta`).

Connection failures and 5xx answers are retried ``[glance] num_retries``
times with exponential backoff, moving through ``api_servers`` in turn;
4xx answers are not retried.  Every glanceclient, keystoneauth1 and
requests error becomes an :mod:`imagebackend.exception` error naming the
image and the fix.
"""

import copy
import hashlib
import logging
import re
import time
import typing

from glanceclient import client as glance_client
from glanceclient import exc as glance_exc
from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session
from oslo_config import cfg
import requests

from imagebackend import exception
from imagebackend.sources import base
from imagebackend.sources import glance_errors
from imagebackend.sources import glance_upload

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

    :param conf: the configuration; the ``[glance]`` options are registered
        on it.
    :param session: an authenticated keystoneauth1 session to use instead of
        the ``[glance]`` auth and session options (the adapter options still
        apply).
    :param adapter: a keystoneauth1 adapter (session plus endpoint filter)
        to use instead of every ``[glance]`` keystoneauth option.
    :param sleep: the function that waits between retries.
    :raises imagebackend.exception.ConfigurationError: the ``[glance]``
        options do not describe a way to reach Glance.
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
        self.register_opts(conf)
        self._sleep = sleep
        self._adapter, self.credential = self._load_adapter(session, adapter)
        self._clients = {}

    @classmethod
    def register_opts(cls, conf: cfg.ConfigOpts) -> None:
        """Register the ``[glance]`` options (the auth plugin's own are
        registered when the plugin named by ``auth_type`` is loaded).
        """
        conf.register_opts(_GLANCE_OPTS + _ADAPTER_OPTS, group=GROUP)
        ks_loading.register_session_conf_options(conf, GROUP)
        ks_loading.register_auth_conf_options(conf, GROUP)

    # --- setup ------------------------------------------------------------

    def _load_adapter(self, session, adapter):
        if adapter is not None:
            return adapter, glance_errors.describe_plugin(
                adapter.auth or adapter.session.auth, "the caller's adapter")
        try:
            if session is None:
                auth = ks_loading.load_auth_from_conf_options(
                    self.conf, GROUP)
                session = ks_loading.load_session_from_conf_options(
                    self.conf, GROUP, auth=auth)
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

    def _endpoints(self) -> list[str | None]:
        """Endpoint overrides to use in turn (None: the adapter's own)."""
        if self._adapter.endpoint_override:
            return [None]
        return list(self.conf.glance.api_servers) or [None]

    def _client(self, endpoint: str | None):
        if endpoint not in self._clients:
            a = self._adapter
            self._clients[endpoint] = glance_client.Client(
                "2", session=a.session, auth=a.auth,
                service_type=a.service_type or "image",
                service_name=a.service_name, interface=a.interface,
                region_name=a.region_name,
                endpoint_override=endpoint or a.endpoint_override,
                connect_retries=a.connect_retries,
                status_code_retries=a.status_code_retries,
                global_request_id=a.global_request_id)
        return self._clients[endpoint]

    def describe(self) -> str:
        endpoints = [e for e in self._endpoints() if e]
        if self._adapter.endpoint_override:
            return "glance at %s" % self._adapter.endpoint_override
        if endpoints:
            return "glance at %s" % ", ".join(endpoints)
        return "glance (Keystone catalog, service type %r)" % (
            self._adapter.service_type or "image")

    # --- requests with retries --------------------------------------------

    def _call(self, image_id, action, func, retry_server_errors=True):
        """``func(client)`` with retries; errors become the library's."""
        endpoints = self._endpoints()
        attempts = self.conf.glance.num_retries + 1
        for attempt in range(1, attempts + 1):
            endpoint = endpoints[(attempt - 1) % len(endpoints)]
            where = ("glance at %s" % endpoint) if endpoint else (
                self.describe())
            try:
                return func(self._client(endpoint))
            except (glance_exc.BaseException, glance_exc.ClientException,
                    ks_exc.ClientException,
                    requests.exceptions.RequestException) as exc:
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
                        reason="%s while trying to %s; check that Glance "
                               "and Keystone are running and reachable, or "
                               "raise [glance] num_retries"
                               % (error.reason, action)) from exc
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
            format is not ``bare``.
        :raises imagebackend.exception.ImageSourceUnavailable: Glance or
            Keystone did not answer after ``[glance] num_retries``.
        """
        _check_id(image_id)
        image = dict(self._call(image_id, "read the image record",
                                lambda c: c.images.get(image_id)))
        status = image.get("status")
        if status != "active":
            raise exception.ImageNotActive(image_id=image_id, status=status)
        container = image.get("container_format")
        if container != "bare":
            raise exception.ImageUnsupported(
                image_id=image_id,
                reason="its container_format is %r; only 'bare' images (a "
                       "disk image with no container around it) can be "
                       "used. Unpack the disk and upload it as a new image "
                       "with container_format 'bare'." % container)
        hash_algo = image.get("os_hash_algo")
        hash_value = image.get("os_hash_value")
        if hash_algo and hash_value and not _hash_known(hash_algo):
            LOG.warning("Image %s: Glance hashed it with %s, which this "
                        "host's hashlib lacks; verifying the md5 checksum "
                        "instead", image_id, hash_algo)
            hash_algo = hash_value = None
        content = hash_value or image.get("checksum") or "size=%s" % (
            image.get("size"),)
        return base.ImageMeta(
            image_id=image_id,
            source=self.describe(),
            disk_format=image.get("disk_format"),
            size=image.get("size"),
            virtual_size=image.get("virtual_size"),
            checksum=image.get("checksum"),
            hash_algo=hash_algo if hash_value else None,
            hash_value=hash_value if hash_algo else None,
            identity="%s,updated_at=%s" % (content, image.get("updated_at")),
            extra={key: image.get(key) for key in (
                "name", "owner", "visibility", "updated_at",
                "os_hash_algo")},
        )

    def open(self, meta: base.ImageMeta) -> typing.Iterator[bytes]:
        """Start the download; the returned iterator yields the body in
        chunks of up to :attr:`chunk_size` bytes as they arrive.

        Closing the iterator early closes the HTTP connection.

        :raises imagebackend.exception.ImageNotFound: the image is gone.
        :raises imagebackend.exception.ImageNotAuthorized: as in get_meta.
        :raises imagebackend.exception.ImageSourceUnavailable: no answer
            after ``[glance] num_retries``.
        :raises imagebackend.exception.ImageDownloadError: (while
            iterating) the transfer broke off.
        """
        _check_id(meta.image_id)
        url = "/v2/images/%s/file" % meta.image_id
        # The HTTP client under glanceclient's images.data(): that one
        # would fetch the record again to check a hash the pipeline
        # already checks, and hides the response it would need to close.
        resp, _body = self._call(meta.image_id, "start the download",
                                 lambda c: c.http_client.get(url))
        if resp.status_code == 204:
            resp.close()
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=meta.source,
                reason="Glance holds no data for it")
        return self._stream(resp, meta)

    def _stream(self, resp, meta):
        try:
            yield from resp.iter_content(chunk_size=self.chunk_size)
        except (requests.exceptions.RequestException, OSError) as exc:
            raise exception.ImageDownloadError(
                image_id=meta.image_id, source=meta.source,
                reason="the connection to Glance broke off (%s)" % exc
            ) from exc
        finally:
            resp.close()

    # --- upload -----------------------------------------------------------

    def upload(self, name: str, path: str, disk_format: str,
               container_format: str = "bare",
               progress: typing.Callable[[int, int], None] | None = None
               ) -> str:
        """Create an image in Glance and upload a file as its data.

        :param name: the new image's name.
        :param path: the file to upload.
        :param disk_format: its format (``raw``, ``qcow2``, ...).
        :param container_format: Glance's container format.
        :param progress: called as ``progress(bytes_sent, total_bytes)``
            after each piece is read for sending.
        :returns: the new image's id, once Glance has it ``active``.
        :raises imagebackend.exception.ImageSourceError: the file cannot be
            read, Glance refused the image, or the upload failed (the
            half-made image is then deleted).
        """
        return glance_upload.upload(self._call, name, path, disk_format,
                                    container_format, progress)


_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


def _check_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not _UUID_RE.match(image_id):
        raise exception.InvalidImageId(
            image_id=image_id,
            reason="Glance image ids are UUIDs such as "
                   "'1b2c3d4e-0000-4000-8000-123456789abc'")


def _hash_known(algo: str) -> bool:
    try:
        hashlib.new(algo)
    except (ValueError, TypeError):
        return False
    return True
