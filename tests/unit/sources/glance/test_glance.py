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

"""The Glance source with its HTTP boundaries replaced.

Records and data go through :class:`imagebackend.sources.glance.client.Client`,
patched here (autospec) so that these tests cover retries, backoff,
endpoint rotation, record checks and error mapping without a network (the
client itself is tested in test_glance_http.py); uploads go through the
same client.
"""

import hashlib
import re
from unittest import mock

from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from oslo_config import cfg
import pytest
import requests

from imagebackend import exception
from imagebackend.sources import base
from imagebackend.sources import glance
from imagebackend.sources.glance import client as glance_client
from imagebackend.sources.glance import errors as glance_errors
from imagebackend.sources.glance import record as glance_record

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


def response(status=200, headers=None, url="http://glance.test:9292/v2/x"):
    resp = mock.create_autospec(requests.Response, instance=True)
    resp.status_code = status
    resp.headers = requests.structures.CaseInsensitiveDict(headers or {})
    resp.url = url
    return resp


class Sleep:
    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)


@pytest.fixture
def http():
    """Patch the Glance HTTP client; ``http.get_json`` answers records,
    ``http.get`` starts downloads, ``http.chunks`` yields bodies.
    """
    with mock.patch.object(glance.glance_client, "Client",
                           autospec=True) as patched:
        instance = patched.return_value
        instance.get_json.return_value = image_record()
        yield instance


@pytest.fixture
def sleep():
    return Sleep()


@pytest.fixture
def make_source(tmp_path, http, sleep):
    def make(values=None, **kwargs):
        values = dict(PASSWORD_AUTH if values is None else values)
        path = tmp_path / "imagebackend.conf"
        path.write_text("[glance]\n" + "".join(
            "%s = %s\n" % item for item in values.items()))
        conf = cfg.ConfigOpts()
        conf(["--config-file", str(path)], project="imagebackend",
             default_config_files=[])
        glance.GlanceSource.register_opts(conf)
        kwargs.setdefault("sleep", sleep)
        return glance.GlanceSource(conf, **kwargs)
    return make


def endpoints_asked(http):
    return [c.args[0] for c in http.get_json.call_args_list]


# --- metadata ---------------------------------------------------------------

def test_get_meta_describes_the_image(http, make_source):
    source = make_source()

    meta = source.get_meta(IMAGE_ID)

    http.get_json.assert_called_once_with(None, "/v2/images/%s" % IMAGE_ID)
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
    assert meta.extra["name"] == "guest"


def test_identity_changes_when_the_image_is_updated(http, make_source):
    source = make_source()
    http.get_json.side_effect = [
        image_record(), image_record(updated_at="2026-11-02T10:00:00Z")]

    assert (source.get_meta(IMAGE_ID).identity
            != source.get_meta(IMAGE_ID).identity)


def test_hash_unknown_to_hashlib_falls_back_to_md5(http, make_source):
    http.get_json.return_value = image_record(os_hash_algo="whirl-99")

    meta = make_source().get_meta(IMAGE_ID)

    assert meta.expected_digest() == ("md5", hashlib.md5(DATA).hexdigest())


def test_md5_alone_is_glances_legacy_checksum(http, make_source):
    http.get_json.return_value = image_record(os_hash_algo=None,
                                              os_hash_value=None)

    meta = make_source().get_meta(IMAGE_ID)

    assert meta.expected_digest() == ("md5", hashlib.md5(DATA).hexdigest())


@pytest.mark.parametrize("fields,named", [
    ({"os_hash_algo": "whirl-99", "checksum": None}, "whirl-99"),
    ({"os_hash_algo": "shake_128", "checksum": None}, "shake_128"),
    ({"os_hash_algo": None, "os_hash_value": None, "checksum": None},
     "neither os_hash_value nor checksum"),
    ({"os_hash_value": None, "checksum": None}, "os_hash_algo sha512"),
])
def test_unverifiable_image_is_refused(http, make_source, fields, named):
    http.get_json.return_value = image_record(**fields)

    with pytest.raises(exception.ImageUnsupported) as err:
        make_source().get_meta(IMAGE_ID)

    assert named in str(err.value)
    assert "allow_unverified_images" in str(err.value)


def test_unverifiable_image_is_allowed_by_the_option(http, make_source):
    http.get_json.return_value = image_record(
        os_hash_algo="whirl-99", checksum=None)
    source = make_source(dict(PASSWORD_AUTH, allow_unverified_images=True))

    with mock.patch.object(glance_record.LOG, "warning") as warning:
        meta = source.get_meta(IMAGE_ID)

    assert meta.expected_digest() is None
    # Allowed, never silently: each use is logged, naming the image.
    [call] = warning.call_args_list
    assert IMAGE_ID in call.args[0] % call.args[1:]
    assert (meta.image_id, meta.size) == (IMAGE_ID, len(DATA))


@pytest.mark.parametrize("fields,key", [
    ({"size": "1000"}, "size"),
    ({"size": True}, "size"),
    ({"size": -1}, "size"),
    ({"virtual_size": 1.5}, "virtual_size"),
    ({"status": ["active"]}, "status"),
    ({"container_format": {"a": 1}}, "container_format"),
    ({"disk_format": 3}, "disk_format"),
    ({"disk_format": "qcow2" * 100}, "disk_format"),
    ({"checksum": 5}, "checksum"),
    ({"checksum": "xyz"}, "checksum"),
    ({"os_hash_value": "ab" * 10}, "os_hash_value"),
    ({"os_hash_algo": ["sha512"]}, "os_hash_algo"),
    ({"updated_at": 12}, "updated_at"),
    ({"id": "11111111-2222-3333-4444-555555555555"}, "id"),
])
def test_malformed_record_is_a_library_error(http, make_source, fields,
                                             key):
    http.get_json.return_value = image_record(**fields)

    with pytest.raises(exception.ImageSourceError) as err:
        make_source().get_meta(IMAGE_ID)

    assert "%s is" % key in str(err.value)
    assert IMAGE_ID in str(err.value)


def test_record_text_is_escaped_and_bounded(http, make_source):
    http.get_json.return_value = image_record(
        status="killed\x1b]0;pwned\x07\n" + "z" * 5000)

    with pytest.raises(exception.ImageNotActive) as err:
        make_source().get_meta(IMAGE_ID)

    message = str(err.value)
    assert re.search(r"killed\\+x1b\]0;pwned\\+x07\\+n", message)
    assert len(message) < 400
    assert "\n" not in message and "\x1b" not in message


def test_other_string_values_are_bounded_not_refused(http, make_source):
    http.get_json.return_value = image_record(name="n" * 5000, owner=7)

    meta = make_source().get_meta(IMAGE_ID)

    assert meta.extra["name"] == "n" * 255
    assert meta.extra["owner"] is None


def test_empty_image_is_refused(http, make_source):
    http.get_json.return_value = image_record(size=0)

    with pytest.raises(exception.ImageUnsupported) as err:
        make_source().get_meta(IMAGE_ID)

    assert "0 bytes" in str(err.value)


def test_image_above_max_download_size_is_refused(http, make_source):
    source = make_source(dict(PASSWORD_AUTH, max_download_size=100))

    with pytest.raises(exception.ImageUnsupported) as err:
        source.get_meta(IMAGE_ID)

    assert "max_download_size (100 bytes)" in str(err.value)


@pytest.mark.parametrize("status", ["queued", "saving", "deactivated",
                                    "killed", "deleted"])
def test_inactive_image_is_refused(http, make_source, status):
    http.get_json.return_value = image_record(status=status)

    with pytest.raises(exception.ImageNotActive) as err:
        make_source().get_meta(IMAGE_ID)

    assert err.value.status == status
    assert IMAGE_ID in str(err.value)


@pytest.mark.parametrize("container", ["ovf", "ova", "docker", None])
def test_container_other_than_bare_is_refused(http, make_source,
                                              container):
    http.get_json.return_value = image_record(container_format=container)

    with pytest.raises(exception.ImageUnsupported) as err:
        make_source().get_meta(IMAGE_ID)

    assert str(container) in str(err.value)
    assert "'bare'" in str(err.value)


@pytest.mark.parametrize("image_id", ["", "../../v2/schemas", "abc",
                                      IMAGE_ID + "/file", IMAGE_ID + "\n",
                                      "\n" + IMAGE_ID, None, 7])
def test_malformed_id_is_refused_without_a_request(http, make_source,
                                                   image_id):
    with pytest.raises(exception.InvalidImageId) as err:
        make_source().get_meta(image_id)

    http.get_json.assert_not_called()
    assert "\n" not in str(err.value)


# --- retries ----------------------------------------------------------------

@pytest.mark.parametrize("failure", [
    glance_errors.HTTPStatus(503, "busy"),
    glance_errors.HTTPStatus(500, "oops"),
    glance_errors.HTTPStatus(504, "Gateway Time-out"),
    glance_errors.HTTPStatus(429, "slow down"),
    glance_errors.Unreachable("cannot connect"),
    glance_errors.BodyFailure("broke off", retryable=True),
    ks_exc.ConnectFailure("keystone refused the connection"),
    ks_exc.DiscoveryFailure("no identity versions"),
    ks_exc.ServiceUnavailable(),
])
def test_transient_failures_are_retried(http, make_source, sleep, failure):
    http.get_json.side_effect = [failure, failure, image_record()]

    meta = make_source().get_meta(IMAGE_ID)

    assert meta.image_id == IMAGE_ID
    assert http.get_json.call_count == 3
    assert sleep.delays == [0.5, 1.0]


def test_unavailable_after_num_retries(http, make_source, sleep):
    failure = glance_errors.Unreachable("connection refused")
    http.get_json.side_effect = failure

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        make_source().get_meta(IMAGE_ID)

    # Default num_retries is 3: four attempts, three waits.
    assert http.get_json.call_count == 4
    assert err.value.attempts == 4
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert "connection refused" in str(err.value)
    assert IMAGE_ID in str(err.value)
    assert err.value.__cause__ is failure


def test_backoff_is_capped(http, make_source, sleep):
    source = make_source(dict(PASSWORD_AUTH, num_retries=6))
    http.get_json.side_effect = glance_errors.HTTPStatus(503, "busy")

    with pytest.raises(exception.ImageSourceUnavailable):
        source.get_meta(IMAGE_ID)

    assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_zero_retries_means_one_attempt(http, make_source, sleep):
    source = make_source(dict(PASSWORD_AUTH, num_retries=0))
    http.get_json.side_effect = glance_errors.HTTPStatus(503, "busy")

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.get_meta(IMAGE_ID)

    assert http.get_json.call_count == 1
    assert err.value.attempts == 1
    assert sleep.delays == []


def test_keystone_unreachable_is_named(http, make_source):
    source = make_source(dict(PASSWORD_AUTH, num_retries=0))
    http.get_json.side_effect = ks_exc.ConnectFailure(
        "Unable to establish connection to http://keystone.test/v3")

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.get_meta(IMAGE_ID)

    assert "Keystone is unreachable" in str(err.value)


def test_glance_unreachable_does_not_blame_keystone(http, make_source):
    source = make_source(dict(PASSWORD_AUTH, num_retries=0))
    http.get_json.side_effect = glance_errors.Unreachable(
        "cannot connect to http://glance.test:9292/v2/images/x (refused)")

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.get_meta(IMAGE_ID)

    assert "Keystone is unreachable" not in str(err.value)
    assert "glance (Keystone catalog" in str(err.value)
    assert "http://glance.test:9292" in str(err.value)


def test_api_servers_are_tried_in_turn(http, make_source, sleep):
    source = make_source(dict(
        PASSWORD_AUTH, api_servers="http://g1:9292,http://g2:9292"))
    http.get_json.side_effect = [
        glance_errors.Unreachable("g1 down"),
        glance_errors.HTTPStatus(503, "busy"),
        glance_errors.Unreachable("g1 down"),
        image_record()]

    meta = source.get_meta(IMAGE_ID)

    assert meta.image_id == IMAGE_ID
    # g1, g2 (503), g1 again, g2: each attempt moves to the next server.
    assert endpoints_asked(http) == ["http://g1:9292", "http://g2:9292",
                                     "http://g1:9292", "http://g2:9292"]
    assert sleep.delays == [0.5, 1.0, 2.0]


def test_endpoint_override_wins_over_api_servers(http, make_source):
    source = make_source(dict(PASSWORD_AUTH, api_servers="http://g1:9292",
                              endpoint_override="http://g0:9292"))

    source.get_meta(IMAGE_ID)

    # None: the adapter's own endpoint, which is the override.
    assert endpoints_asked(http) == [None]
    assert source._adapter.get_endpoint() == "http://g0:9292"


# --- errors that are not retried ---------------------------------------

def test_not_found(http, make_source, sleep):
    http.get_json.side_effect = glance_errors.HTTPStatus(404, "not found")

    with pytest.raises(exception.ImageNotFound) as err:
        make_source().get_meta(IMAGE_ID)

    assert http.get_json.call_count == 1
    assert sleep.delays == []
    assert IMAGE_ID in str(err.value)
    assert "'service'" in str(err.value)  # the project that looked


@pytest.mark.parametrize("code", [401, 403])
def test_glance_refusal_names_the_credential(http, make_source, sleep,
                                             code):
    http.get_json.side_effect = glance_errors.HTTPStatus(code, "no")

    with pytest.raises(exception.ImageNotAuthorized) as err:
        make_source().get_meta(IMAGE_ID)

    message = str(err.value)
    assert "HTTP %d" % code in message
    assert "user 'compute'" in message and "project 'service'" in message
    assert IMAGE_ID in message
    assert sleep.delays == []


@pytest.mark.parametrize("failure", [
    ks_exc.Unauthorized("The request you have made requires "
                        "authentication.", http_status=401),
    ks_exc.Forbidden(http_status=403),
    ks_exc.NotFound(http_status=404),
])
def test_keystone_refusal_names_the_credential(http, make_source, sleep,
                                               failure):
    http.get_json.side_effect = failure

    with pytest.raises(exception.ImageNotAuthorized) as err:
        make_source().get_meta(IMAGE_ID)

    message = str(err.value)
    assert "Keystone refused" in message
    assert "[glance] password of user 'compute'" in message
    assert "http://keystone.test/v3" in message
    assert http.get_json.call_count == 1
    assert sleep.delays == []


def test_application_credential_is_named(http, make_source):
    source = make_source({
        "auth_type": "v3applicationcredential",
        "auth_url": "http://keystone.test/v3",
        "application_credential_id": "ac-42",
        "application_credential_secret": "s3cret"})
    http.get_json.side_effect = ks_exc.Unauthorized(http_status=401)

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(IMAGE_ID)

    assert "application credential 'ac-42'" in str(err.value)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("failure", [
    glance_errors.HTTPStatus(400, "bad"),
    glance_errors.HTTPStatus(409, "conflict"),
    glance_errors.HTTPStatus(415, "Unsupported Media Type"),
    glance_errors.BadResponse("redirected more than 5 times"),
    glance_errors.BodyFailure("sent more than a record of at most 1 MiB",
                              too_long=True),
    glance_errors.BodyFailure("no data for 60 s ([glance] stall_timeout)"),
])
def test_other_failures_are_not_retried(http, make_source, sleep, failure):
    with_failure = failure
    http.get_json.side_effect = with_failure

    with pytest.raises(exception.ImageSourceError) as err:
        make_source().get_meta(IMAGE_ID)

    assert not isinstance(err.value, exception.ImageSourceUnavailable)
    assert http.get_json.call_count == 1
    assert sleep.delays == []
    assert err.value.__cause__ is failure


@pytest.mark.parametrize("failure,expected", [
    (ks_exc.EndpointNotFound("no image endpoint"),
     exception.ImageSourceError),
    (ks_exc.SSLError("certificate verify failed"),
     exception.ImageSourceError),
    (glance_errors.TLSFailed("certificate verify failed"),
     exception.ImageSourceError),
    (ks_exc.MissingAuthPlugin("no plugin"), exception.ConfigurationError),
    (ks_exc.BadRequest(http_status=400), exception.ImageSourceError),
    (ks_exc.InvalidResponse("not json"), exception.ImageSourceError),
    (requests.exceptions.ConnectionError("reset"),
     exception.ImageSourceUnavailable),
    (requests.exceptions.InvalidURL("bad url"), exception.ImageSourceError),
])
def test_no_third_party_exception_escapes(http, make_source, failure,
                                          expected):
    http.get_json.side_effect = failure

    with pytest.raises(expected) as err:
        make_source().get_meta(IMAGE_ID)

    assert err.value.__cause__ is failure


# --- download ---------------------------------------------------------------

def meta_for(size=len(DATA)):
    return base.ImageMeta(image_id=IMAGE_ID, source="glance", size=size)


def test_open_streams_the_body_in_chunks(http, make_source):
    source = make_source()
    resp = response(headers={"Content-Length": str(len(DATA))})
    http.get.return_value = resp
    http.chunks.return_value = iter([DATA[:100], DATA[100:]])

    chunks = list(source.open(meta_for()))

    assert b"".join(chunks) == DATA
    http.get.assert_called_once_with(
        None, "/v2/images/%s/file" % IMAGE_ID, "application/octet-stream")
    # Read up to the recorded size, in the source's chunk size.
    args = http.chunks.call_args.args
    assert args[0] is resp and args[2:4] == (len(DATA), source.chunk_size)
    resp.close.assert_called_with()


def test_without_recorded_size_the_bound_is_max_download_size(
        http, make_source):
    source = make_source(dict(PASSWORD_AUTH, max_download_size=5000))
    http.get.return_value = response()
    http.chunks.return_value = iter([b"x" * 10])

    assert list(source.open(meta_for(size=None))) == [b"x" * 10]
    assert http.chunks.call_args.args[2] == 5000
    assert "max_download_size" in http.chunks.call_args.args[4]


@pytest.mark.parametrize("length,size", [("999999", len(DATA)),
                                         ("12abc", len(DATA)),
                                         ("6000", None)])
def test_content_length_beyond_the_bound_is_refused(http, make_source,
                                                    length, size):
    source = make_source(dict(PASSWORD_AUTH, max_download_size=5000))
    resp = response(headers={"Content-Length": length})
    http.get.return_value = resp

    with pytest.raises(exception.ImageDownloadError) as err:
        source.open(meta_for(size=size))

    assert "Content-Length" in str(err.value)
    resp.close.assert_called_with()
    http.chunks.assert_not_called()


def test_open_closed_early_closes_the_response(http, make_source):
    source = make_source()
    resp = response()
    http.get.return_value = resp
    http.chunks.return_value = iter([b"a", b"b", b"c"])

    stream = source.open(meta_for())
    assert next(stream) == b"a"
    stream.close()

    resp.close.assert_called_with()


def test_open_closed_before_the_first_chunk_closes_the_response(
        http, make_source):
    source = make_source()
    resp = response()
    http.get.return_value = resp

    source.open(meta_for()).close()

    resp.close.assert_called_with()


def test_open_retries_before_the_body_starts(http, make_source, sleep):
    source = make_source()
    http.get.side_effect = [glance_errors.HTTPStatus(503, "busy"),
                            response()]
    http.chunks.return_value = iter([DATA])

    assert b"".join(source.open(meta_for())) == DATA
    assert sleep.delays == [0.5]


def test_broken_body_is_a_download_error(http, make_source):
    source = make_source()
    failure = glance_errors.BodyFailure(
        "the connection to http://g/v2/images/x/file broke off after 100 "
        "bytes", retryable=True)

    def body():
        yield DATA[:100]
        raise failure

    resp = response()
    http.get.return_value = resp
    http.chunks.return_value = body()
    stream = source.open(meta_for())

    assert next(stream) == DATA[:100]
    with pytest.raises(exception.ImageDownloadError) as err:
        next(stream)

    assert IMAGE_ID in str(err.value)
    assert "http://g/v2/images/x/file broke off" in str(err.value)
    assert err.value.__cause__ is failure
    resp.close.assert_called_with()


def test_short_body_is_a_download_error(http, make_source):
    source = make_source()
    http.get.return_value = response()
    http.chunks.return_value = iter([DATA[:10]])

    with pytest.raises(exception.ImageDownloadError) as err:
        list(source.open(meta_for()))

    assert "after 10 of the %d bytes" % len(DATA) in str(err.value)


def test_empty_body_without_recorded_size_is_refused(http, make_source):
    source = make_source()
    http.get.return_value = response()
    http.chunks.return_value = iter([])

    with pytest.raises(exception.ImageDownloadError) as err:
        list(source.open(meta_for(size=None)))

    assert "0 bytes" in str(err.value)


def test_open_without_data(http, make_source):
    source = make_source()
    resp = response(status=204)
    http.get.return_value = resp

    with pytest.raises(exception.ImageDownloadError):
        source.open(meta_for())

    resp.close.assert_called_once_with()


def test_download_id_is_checked(http, make_source):
    meta = base.ImageMeta(image_id=IMAGE_ID + "\n", source="glance")

    with pytest.raises(exception.InvalidImageId):
        make_source().open(meta)

    http.get.assert_not_called()


def test_limits_come_from_the_options(http, make_source):
    make_source(dict(PASSWORD_AUTH, stall_timeout=7, min_download_rate=9,
                     download_rate_window=11, timeout=3))

    limits = glance.glance_client.Client.call_args.args[1]
    assert limits == glance_client.Limits(stall_timeout=7, min_rate=9,
                                          rate_window=11, connect_timeout=3)


# --- upload (the module's own tests are in test_glance_upload.py) -------

def upload_source(http, make_source, tmp_path):
    path = tmp_path / "disk.qcow2"
    path.write_bytes(DATA)
    http.send_json.return_value = {"id": IMAGE_ID, "status": "queued"}

    def put(endpoint, url, body):
        for _piece in body:
            pass
    http.put_file.side_effect = put
    http.get_json.return_value = image_record()
    return make_source(), str(path)


def test_upload_goes_through_the_bounded_client(http, make_source,
                                                tmp_path, sleep):
    source, path = upload_source(http, make_source, tmp_path)

    assert source.upload("guest", path, "qcow2") == IMAGE_ID
    http.send_json.assert_called_once_with(
        None, "POST", "/v2/images",
        {"name": "guest", "disk_format": "qcow2",
         "container_format": "bare"}, success=(200, 201))
    [put] = http.put_file.call_args_list
    assert put.args[:2] == (None, "/v2/images/%s/file" % IMAGE_ID)
    http.get_json.assert_called_once_with(None, "/v2/images/" + IMAGE_ID)
    http.delete.assert_not_called()


def test_create_is_retried_after_a_connection_failure(http, make_source,
                                                      tmp_path, sleep):
    source, path = upload_source(http, make_source, tmp_path)
    http.send_json.side_effect = [
        glance_errors.Unreachable("cannot connect"),
        {"id": IMAGE_ID}]

    assert source.upload("guest", path, "qcow2") == IMAGE_ID
    assert sleep.delays == [0.5]


def test_upload_data_is_never_retried(http, make_source, tmp_path, sleep):
    source, path = upload_source(http, make_source, tmp_path)
    http.put_file.side_effect = glance_errors.Unreachable("reset")

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        source.upload("guest", path, "qcow2")

    assert err.value.attempts == 1
    assert sleep.delays == []
    http.delete.assert_called_once_with(None, "/v2/images/" + IMAGE_ID)


def test_upload_server_error_is_not_retried(http, make_source, tmp_path,
                                            sleep):
    source, path = upload_source(http, make_source, tmp_path)
    http.send_json.side_effect = glance_errors.HTTPStatus(
        500, "boom", "http://glance.test:9292/v2/images")

    with pytest.raises(exception.ImageSourceError) as err:
        source.upload("guest", path, "qcow2")

    assert "HTTP 500" in str(err.value)
    assert "http://glance.test:9292/v2/images" in str(err.value)
    assert sleep.delays == []
    http.put_file.assert_not_called()


def test_no_way_to_reach_glance_is_a_configuration_error(make_source):
    with pytest.raises(exception.ConfigurationError) as err:
        make_source({})

    assert "auth_type" in str(err.value)
    assert "endpoint_override" in str(err.value)


def test_unknown_auth_plugin_is_a_configuration_error(make_source):
    with pytest.raises(exception.ConfigurationError) as err:
        make_source({"auth_type": "no-such-plugin"})

    assert "no-such-plugin" in str(err.value)


def test_an_unreadable_value_names_the_option_and_the_file(make_source):
    with pytest.raises(exception.ConfigValueError) as err:
        make_source({"endpoint_override": "http://glance.test:9292",
                     "stall_timeout": "soon"})

    assert "[glance] stall_timeout" in str(err.value)
    assert "imagebackend.conf" in str(err.value)


def test_endpoint_without_credentials_is_allowed(make_source):
    source = make_source({"endpoint_override": "http://glance.test:9292"})

    assert source.get_meta(IMAGE_ID).image_id == IMAGE_ID
    assert "http://glance.test:9292" in source.describe()


def http_adapter():
    """The keystoneauth adapter the source handed its HTTP client."""
    return glance.glance_client.Client.call_args.args[0]


def test_catalog_lookup_defaults(make_source):
    make_source()

    adapter = http_adapter()
    assert adapter.service_type == "image"
    assert adapter.interface == ["internal", "public"]
    assert adapter.endpoint_override is None
    assert adapter.session.auth.auth_url == "http://keystone.test/v3"


def test_session_from_the_caller(http, make_source):
    session = ks_session.Session(auth=mock.Mock(spec=["get_headers"]))
    source = make_source({"region_name": "R2"}, session=session)
    http.get_json.side_effect = glance_errors.HTTPStatus(403, "no")

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(IMAGE_ID)

    assert http_adapter().session is session
    assert http_adapter().region_name == "R2"
    assert "caller's session" in str(err.value)


def test_adapter_from_the_caller(make_source):
    session = ks_session.Session()
    adapter = ks_adapter.Adapter(session, service_type="image",
                                 interface="internal", region_name="R3",
                                 endpoint_override="http://g:9292")
    source = make_source({"region_name": "ignored"}, adapter=adapter)

    source.get_meta(IMAGE_ID)

    assert http_adapter() is adapter


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
                 "region_name", "endpoint_override", "stall_timeout",
                 "min_download_rate", "download_rate_window",
                 "max_download_size", "allow_unverified_images"):
        assert name in names
    by_name = {opt.dest: opt for opt in opts}
    assert by_name["service_type"].default == "image"
    assert all(opt.help for opt in opts)


def test_options_can_be_registered_twice(tmp_path, http, make_source):
    # A second source on the same ConfigOpts (and another auth plugin's
    # options registered meanwhile) must not clash, and must read the same
    # configured values.
    source = make_source({"region_name": "R7", **PASSWORD_AUTH})
    glance.GlanceSource.register_opts(source.conf)
    second = glance.GlanceSource(source.conf, sleep=Sleep())

    assert second.conf.glance.region_name == "R7"
    assert http_adapter().region_name == "R7"
    assert (http_adapter().session.auth.auth_url
            == PASSWORD_AUTH["auth_url"])
    assert second.get_meta(IMAGE_ID).image_id == IMAGE_ID
    assert glance.glance_client.Client.call_count == 2
