"""The Glance source with glanceclient replaced at its boundary.

``glanceclient.client.Client`` is patched (autospec) to hand out a client
whose image controller and HTTP client are autospecced mocks, so these
tests cover retries, backoff, endpoint rotation and error mapping without
a network.
"""

import hashlib
from unittest import mock

from glanceclient.common import http as gc_http
from glanceclient import exc as glance_exc
from glanceclient.v2 import images as gc_images
from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from oslo_config import cfg
import pytest
import requests

from imagebackend import exception
from imagebackend.sources import base
from imagebackend.sources import glance

IMAGE_ID = "0b4d8a0e-5bd3-4a6c-9c1f-6f3a0d2b7e11"
DATA = b"imagebackend test image " * 1000
PASSWORD_AUTH = {
    "auth_type": "password",
    "auth_url": "http://keystone.test/v3",
    "username": "compute",
    "password": "secret",
    "project_name": "service",
    "user_domain_name": "Default",
    "project_domain_name": "Default",
}


def image_record(**overrides):
    record = {
        "id": IMAGE_ID, "name": "guest", "status": "active",
        "container_format": "bare", "disk_format": "qcow2",
        "size": len(DATA), "virtual_size": 1 << 30,
        "checksum": hashlib.md5(DATA).hexdigest(),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest(),
        "updated_at": "2026-11-01T10:00:00Z", "owner": "p1",
        "visibility": "private",
    }
    record.update(overrides)
    return record


def new_client():
    client = mock.Mock(spec=["images", "http_client"])
    client.images = mock.create_autospec(gc_images.Controller,
                                         instance=True)
    client.http_client = mock.create_autospec(gc_http.SessionClient,
                                              instance=True)
    return client


def response(chunks, status=200):
    resp = mock.create_autospec(requests.Response, instance=True)
    resp.status_code = status
    resp.iter_content.return_value = iter(chunks)
    return resp


class Sleep:
    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)


@pytest.fixture
def clients():
    """Patch glanceclient's Client: one fake client per endpoint override
    (``clients[None]`` is the catalog's).
    """
    made = {}

    def factory(version, **kwargs):
        assert version == "2"
        return made.setdefault(kwargs.get("endpoint_override"),
                               new_client())

    with mock.patch.object(glance.glance_client, "Client", autospec=True,
                           side_effect=factory) as patched:
        made["patched"] = patched
        yield made


@pytest.fixture
def sleep():
    return Sleep()


@pytest.fixture
def make_source(tmp_path, clients, sleep):
    def make(values=None, **kwargs):
        values = dict(PASSWORD_AUTH if values is None else values)
        path = tmp_path / "imagebackend.conf"
        path.write_text("[glance]\n" + "".join(
            "%s = %s\n" % item for item in values.items()))
        conf = cfg.ConfigOpts()
        conf(["--config-file", str(path)], project="imagebackend",
             default_config_files=[])
        kwargs.setdefault("sleep", sleep)
        return glance.GlanceSource(conf, **kwargs)
    return make


def catalog_client(clients, make_source):
    """A source finding Glance in the catalog, and the fake client it will
    use (made on first use).
    """
    return make_source(), clients.setdefault(None, new_client())


# --- metadata ---------------------------------------------------------------

def test_get_meta_describes_the_image(clients, make_source):
    source, client = catalog_client(clients, make_source)
    client.images.get.return_value = image_record()

    meta = source.get_meta(IMAGE_ID)

    client.images.get.assert_called_once_with(IMAGE_ID)
    assert meta.image_id == IMAGE_ID
    assert meta.disk_format == "qcow2"
    assert meta.size == len(DATA)
    assert meta.virtual_size == 1 << 30
    assert meta.checksum == hashlib.md5(DATA).hexdigest()
    assert meta.expected_digest() == ("sha512",
                                      hashlib.sha512(DATA).hexdigest())
    assert meta.identity == "%s,updated_at=2026-11-01T10:00:00Z" % (
        hashlib.sha512(DATA).hexdigest())
    assert meta.source.startswith("glance")


def test_identity_changes_when_the_image_is_updated(clients, make_source):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = [
        image_record(), image_record(updated_at="2026-11-02T10:00:00Z")]

    assert (source.get_meta(IMAGE_ID).identity
            != source.get_meta(IMAGE_ID).identity)


def test_hash_unknown_to_hashlib_falls_back_to_md5(clients, make_source):
    source, client = catalog_client(clients, make_source)
    client.images.get.return_value = image_record(os_hash_algo="whirl-99")

    meta = source.get_meta(IMAGE_ID)

    assert meta.expected_digest() == ("md5", hashlib.md5(DATA).hexdigest())


@pytest.mark.parametrize("status", ["queued", "saving", "deactivated",
                                    "killed", "deleted"])
def test_inactive_image_is_refused(clients, make_source, status):
    source, client = catalog_client(clients, make_source)
    client.images.get.return_value = image_record(status=status)

    with pytest.raises(exception.ImageNotActive) as err:
        source.get_meta(IMAGE_ID)

    assert err.value.status == status
    assert IMAGE_ID in str(err.value)


@pytest.mark.parametrize("container", ["ovf", "ova", "docker", None])
def test_container_other_than_bare_is_refused(clients, make_source,
                                              container):
    source, client = catalog_client(clients, make_source)
    client.images.get.return_value = image_record(
        container_format=container)

    with pytest.raises(exception.ImageUnsupported) as err:
        source.get_meta(IMAGE_ID)

    assert repr(container) in str(err.value)
    assert "'bare'" in str(err.value)


@pytest.mark.parametrize("image_id", ["", "../../v2/schemas", "abc",
                                      IMAGE_ID + "/file"])
def test_malformed_id_is_refused_without_a_request(clients, make_source,
                                                   image_id):
    source, client = catalog_client(clients, make_source)

    with pytest.raises(exception.InvalidImageId):
        source.get_meta(image_id)

    client.images.get.assert_not_called()


# --- retries ----------------------------------------------------------------

@pytest.mark.parametrize("failure", [
    glance_exc.HTTPServiceUnavailable(),
    glance_exc.HTTPInternalServerError(),
    glance_exc.HTTPBadGateway(),
    glance_exc.HTTPException(details="504 Gateway Time-out"),
    glance_exc.CommunicationError("connection refused"),
    glance_exc.InvalidEndpoint("connect timeout"),
    ks_exc.ConnectFailure("keystone refused the connection"),
    ks_exc.DiscoveryFailure("no identity versions"),
    ks_exc.ServiceUnavailable(),
])
def test_transient_failures_are_retried(clients, make_source, sleep,
                                        failure):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = [failure, failure, image_record()]

    meta = source.get_meta(IMAGE_ID)

    assert meta.image_id == IMAGE_ID
    assert client.images.get.call_count == 3
    assert sleep.delays == [0.5, 1.0]


def test_unavailable_after_num_retries(clients, make_source, sleep):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = glance_exc.CommunicationError(
        "connection refused")

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.get_meta(IMAGE_ID)

    # Default num_retries is 3: four attempts, three waits.
    assert client.images.get.call_count == 4
    assert err.value.attempts == 4
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert "connection refused" in str(err.value)
    assert IMAGE_ID in str(err.value)
    assert isinstance(err.value.__cause__, glance_exc.CommunicationError)


def test_backoff_is_capped(clients, make_source, sleep):
    source, client = catalog_client(
        clients, lambda: make_source(dict(PASSWORD_AUTH, num_retries=6)))
    client.images.get.side_effect = glance_exc.HTTPServiceUnavailable()

    with pytest.raises(exception.ImageSourceUnavailable):
        source.get_meta(IMAGE_ID)

    assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_zero_retries_means_one_attempt(clients, make_source, sleep):
    source, client = catalog_client(
        clients, lambda: make_source(dict(PASSWORD_AUTH, num_retries=0)))
    client.images.get.side_effect = glance_exc.HTTPServiceUnavailable()

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.get_meta(IMAGE_ID)

    assert client.images.get.call_count == 1
    assert err.value.attempts == 1
    assert sleep.delays == []


def test_keystone_unreachable_is_named(clients, make_source):
    source, client = catalog_client(
        clients, lambda: make_source(dict(PASSWORD_AUTH, num_retries=0)))
    client.images.get.side_effect = ks_exc.ConnectFailure(
        "Unable to establish connection to http://keystone.test/v3")

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.get_meta(IMAGE_ID)

    assert "Keystone is unreachable" in str(err.value)


def test_api_servers_are_tried_in_turn(clients, make_source, sleep):
    source = make_source(dict(
        PASSWORD_AUTH, api_servers="http://g1:9292,http://g2:9292"))
    g1 = clients.setdefault("http://g1:9292", new_client())
    g2 = clients.setdefault("http://g2:9292", new_client())
    g1.images.get.side_effect = glance_exc.CommunicationError("g1 down")
    g2.images.get.side_effect = [glance_exc.HTTPServiceUnavailable(),
                                 image_record()]

    meta = source.get_meta(IMAGE_ID)

    assert meta.image_id == IMAGE_ID
    # g1, g2 (503), g1 again, g2: each attempt moves to the next server.
    assert g1.images.get.call_count == 2
    assert g2.images.get.call_count == 2
    assert sleep.delays == [0.5, 1.0, 2.0]


def test_endpoint_override_wins_over_api_servers(clients, make_source):
    source = make_source(dict(PASSWORD_AUTH, api_servers="http://g1:9292",
                              endpoint_override="http://g0:9292"))
    client = clients.setdefault("http://g0:9292", new_client())
    client.images.get.return_value = image_record()

    source.get_meta(IMAGE_ID)

    kwargs = clients["patched"].call_args.kwargs
    assert kwargs["endpoint_override"] == "http://g0:9292"
    assert "http://g1:9292" not in clients


# --- errors that are not retried ---------------------------------------

def test_not_found(clients, make_source, sleep):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = glance_exc.HTTPNotFound()

    with pytest.raises(exception.ImageNotFound) as err:
        source.get_meta(IMAGE_ID)

    assert client.images.get.call_count == 1
    assert sleep.delays == []
    assert IMAGE_ID in str(err.value)
    assert "'service'" in str(err.value)  # the project that looked


@pytest.mark.parametrize("failure,words", [
    (glance_exc.HTTPUnauthorized(), "HTTP 401"),
    (glance_exc.HTTPForbidden(), "HTTP 403"),
])
def test_glance_refusal_names_the_credential(clients, make_source, sleep,
                                             failure, words):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = failure

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(IMAGE_ID)

    message = str(err.value)
    assert words in message
    assert "user 'compute'" in message and "project 'service'" in message
    assert IMAGE_ID in message
    assert sleep.delays == []


@pytest.mark.parametrize("failure", [
    ks_exc.Unauthorized("The request you have made requires "
                        "authentication.", http_status=401),
    ks_exc.Forbidden(http_status=403),
    ks_exc.NotFound(http_status=404),
])
def test_keystone_refusal_names_the_credential(clients, make_source, sleep,
                                               failure):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = failure

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(IMAGE_ID)

    message = str(err.value)
    assert "Keystone refused" in message
    assert "[glance] password of user 'compute'" in message
    assert "http://keystone.test/v3" in message
    assert client.images.get.call_count == 1
    assert sleep.delays == []


def test_application_credential_is_named(clients, make_source):
    source = make_source({
        "auth_type": "v3applicationcredential",
        "auth_url": "http://keystone.test/v3",
        "application_credential_id": "ac-42",
        "application_credential_secret": "s3cret"})
    client = clients.setdefault(None, new_client())
    client.images.get.side_effect = ks_exc.Unauthorized(http_status=401)

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(IMAGE_ID)

    assert "application credential 'ac-42'" in str(err.value)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("failure", [
    glance_exc.HTTPBadRequest(),
    glance_exc.HTTPConflict(),
    glance_exc.HTTPException(details="415 Unsupported Media Type"),
])
def test_other_client_errors_are_not_retried(clients, make_source, sleep,
                                             failure):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = failure

    with pytest.raises(exception.ImageSourceError) as err:
        source.get_meta(IMAGE_ID)

    assert not isinstance(err.value, exception.ImageSourceUnavailable)
    assert client.images.get.call_count == 1
    assert sleep.delays == []


@pytest.mark.parametrize("failure,expected", [
    (ks_exc.EndpointNotFound("no image endpoint"),
     exception.ImageSourceError),
    (ks_exc.SSLError("certificate verify failed"),
     exception.ImageSourceError),
    (ks_exc.MissingAuthPlugin("no plugin"), exception.ConfigurationError),
    (ks_exc.BadRequest(http_status=400), exception.ImageSourceError),
    (ks_exc.InvalidResponse("not json"), exception.ImageSourceError),
    (requests.exceptions.ConnectionError("reset"),
     exception.ImageSourceUnavailable),
    (requests.exceptions.InvalidURL("bad url"), exception.ImageSourceError),
    (glance_exc.SSLConfigurationError("bad cert"),
     exception.ImageSourceError),
])
def test_no_third_party_exception_escapes(clients, make_source, failure,
                                          expected):
    source, client = catalog_client(clients, make_source)
    client.images.get.side_effect = failure

    with pytest.raises(expected) as err:
        source.get_meta(IMAGE_ID)

    assert err.value.__cause__ is failure


# --- download ---------------------------------------------------------------

def meta_for(data=DATA):
    return base.ImageMeta(image_id=IMAGE_ID, source="glance",
                          size=len(data))


def test_open_streams_the_body_in_chunks(clients, make_source):
    source, client = catalog_client(clients, make_source)
    resp = response([DATA[:100], DATA[100:]])
    client.http_client.get.return_value = (resp, None)

    chunks = list(source.open(meta_for()))

    assert b"".join(chunks) == DATA
    client.http_client.get.assert_called_once_with(
        "/v2/images/%s/file" % IMAGE_ID)
    resp.iter_content.assert_called_once_with(chunk_size=source.chunk_size)
    resp.close.assert_called_once_with()


def test_open_closed_early_closes_the_response(clients, make_source):
    source, client = catalog_client(clients, make_source)
    resp = response([b"a", b"b", b"c"])
    client.http_client.get.return_value = (resp, None)

    stream = source.open(meta_for())
    assert next(stream) == b"a"
    stream.close()

    resp.close.assert_called_once_with()


def test_open_retries_before_the_body_starts(clients, make_source, sleep):
    source, client = catalog_client(clients, make_source)
    resp = response([DATA])
    client.http_client.get.side_effect = [
        glance_exc.HTTPServiceUnavailable(), (resp, None)]

    assert b"".join(source.open(meta_for())) == DATA
    assert sleep.delays == [0.5]


@pytest.mark.parametrize("failure", [
    requests.exceptions.ChunkedEncodingError("connection broken"),
    requests.exceptions.ConnectionError("read timed out"),
])
def test_broken_body_is_a_download_error(clients, make_source, failure):
    source, client = catalog_client(clients, make_source)

    def body():
        yield DATA[:100]
        raise failure

    resp = response([])
    resp.iter_content.return_value = body()
    client.http_client.get.return_value = (resp, None)
    stream = source.open(meta_for())

    assert next(stream) == DATA[:100]
    with pytest.raises(exception.ImageDownloadError) as err:
        next(stream)

    assert IMAGE_ID in str(err.value)
    assert err.value.__cause__ is failure
    resp.close.assert_called_once_with()


def test_open_without_data(clients, make_source):
    source, client = catalog_client(clients, make_source)
    resp = response([], status=204)
    client.http_client.get.return_value = (resp, None)

    with pytest.raises(exception.ImageDownloadError):
        source.open(meta_for())

    resp.close.assert_called_once_with()


# --- upload (the module's own tests are in test_glance_upload.py) -------

def test_upload_goes_through_the_retrying_client(clients, make_source,
                                                 tmp_path, sleep):
    path = tmp_path / "disk.qcow2"
    path.write_bytes(DATA)
    source, client = catalog_client(clients, make_source)
    client.images.create.return_value = {"id": IMAGE_ID}
    sent = []

    def upload(image_id, reader, image_size=None):
        if not sent:
            sent.append(reader.read(100))  # partly sent, then...
            raise glance_exc.CommunicationError("connection reset")
        sent.append(reader.read(len(DATA) + 1))
    client.images.upload.side_effect = upload
    client.images.get.return_value = image_record()

    assert source.upload("guest", str(path), "qcow2") == IMAGE_ID
    # The retry starts again from the first byte.
    assert sent[-1] == DATA
    assert sleep.delays == [0.5]


def test_upload_server_error_is_not_retried(clients, make_source, tmp_path,
                                            sleep):
    path = tmp_path / "disk.qcow2"
    path.write_bytes(DATA)
    source, client = catalog_client(clients, make_source)
    client.images.create.return_value = {"id": IMAGE_ID}
    client.images.upload.side_effect = glance_exc.HTTPInternalServerError()

    with pytest.raises(exception.ImageSourceError):
        source.upload("guest", str(path), "qcow2")

    # Data may have reached Glance: no second attempt, the image goes.
    assert client.images.upload.call_count == 1
    client.images.delete.assert_called_once_with(IMAGE_ID)
    assert sleep.delays == []


# --- configuration ----------------------------------------------------------

def test_no_way_to_reach_glance_is_a_configuration_error(make_source):
    with pytest.raises(exception.ConfigurationError) as err:
        make_source({})

    assert "auth_type" in str(err.value)
    assert "endpoint_override" in str(err.value)


def test_unknown_auth_plugin_is_a_configuration_error(make_source):
    with pytest.raises(exception.ConfigurationError) as err:
        make_source({"auth_type": "no-such-plugin"})

    assert "no-such-plugin" in str(err.value)


def test_endpoint_without_credentials_is_allowed(clients, make_source):
    source = make_source({"endpoint_override": "http://glance.test:9292"})
    client = clients.setdefault("http://glance.test:9292", new_client())
    client.images.get.return_value = image_record()

    assert source.get_meta(IMAGE_ID).image_id == IMAGE_ID
    assert "http://glance.test:9292" in source.describe()


def test_catalog_lookup_defaults(clients, make_source):
    source = make_source()
    client = clients.setdefault(None, new_client())
    client.images.get.return_value = image_record()

    source.get_meta(IMAGE_ID)

    kwargs = clients["patched"].call_args.kwargs
    assert kwargs["service_type"] == "image"
    assert kwargs["interface"] == ["internal", "public"]
    assert kwargs["endpoint_override"] is None
    assert kwargs["session"].auth.auth_url == "http://keystone.test/v3"


def test_session_from_the_caller(clients, make_source):
    session = ks_session.Session(auth=mock.Mock(spec=["get_headers"]))
    source = make_source({"region_name": "R2"}, session=session)
    client = clients.setdefault(None, new_client())
    client.images.get.side_effect = glance_exc.HTTPForbidden()

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(IMAGE_ID)

    kwargs = clients["patched"].call_args.kwargs
    assert kwargs["session"] is session
    assert kwargs["region_name"] == "R2"
    assert "caller's session" in str(err.value)


def test_adapter_from_the_caller(clients, make_source):
    session = ks_session.Session()
    adapter = ks_adapter.Adapter(session, service_type="image",
                                 interface="internal", region_name="R3",
                                 endpoint_override="http://g:9292")
    source = make_source({"region_name": "ignored"}, adapter=adapter)
    client = clients.setdefault("http://g:9292", new_client())
    client.images.get.return_value = image_record()

    source.get_meta(IMAGE_ID)

    kwargs = clients["patched"].call_args.kwargs
    assert kwargs["session"] is session
    assert kwargs["region_name"] == "R3"
    assert kwargs["endpoint_override"] == "http://g:9292"


def test_sample_options_list_every_group_option_once():
    [(group, opts)] = glance.GlanceSource.OPTIONS
    names = [opt.dest for opt in opts]

    assert group == "glance"
    assert len(names) == len(set(names))
    for name in ("api_servers", "num_retries", "auth_type", "auth_section",
                 "auth_url", "username", "password", "project_name",
                 "application_credential_id",
                 "application_credential_secret", "token", "cafile",
                 "insecure", "timeout", "service_type", "valid_interfaces",
                 "region_name", "endpoint_override"):
        assert name in names
    by_name = {opt.dest: opt for opt in opts}
    assert by_name["service_type"].default == "image"
    assert all(opt.help for opt in opts)


def test_options_can_be_registered_twice(tmp_path, make_source, clients):
    # A second source on the same ConfigOpts (and another auth plugin's
    # options registered meanwhile) must not clash.
    source = make_source()
    glance.GlanceSource.register_opts(source.conf)
    glance.GlanceSource(source.conf, sleep=Sleep())
