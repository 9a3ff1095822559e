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

"""How glanceclient/keystoneauth1 failures are classified and described."""

import re

from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1.identity import v3
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
import pytest

from imagebackend import exception
from imagebackend.sources.glance import errors as glance_errors

IMAGE_ID = "0b4d8a0e-5bd3-4a6c-9c1f-6f3a0d2b7e11"


def translate(exc, retry_server_errors=True):
    return glance_errors.translate(
        exc, image_id=IMAGE_ID, where="glance at http://g:9292",
        credential="the test credential",
        retry_server_errors=retry_server_errors)


def conf_with(tmp_path, values):
    path = tmp_path / "c.conf"
    path.write_text("[glance]\n" + "".join(
        "%s = %s\n" % item for item in values.items()))
    conf = cfg.ConfigOpts()
    conf(["--config-file", str(path)], default_config_files=[])
    ks_loading.register_auth_conf_options(conf, "glance")
    if values.get("auth_type"):
        ks_loading.load_auth_from_conf_options(conf, "glance")
    return conf


@pytest.mark.parametrize("details,retryable", [
    ("504 Gateway Time-out: the upstream did not answer", True),
    ("429 Too Many Requests", True),
    ("gateway exploded", True),          # no status at all: try again
    ("415 Unsupported Media Type: disk_format does not match", False),
    ("410 Gone", False),
])
def test_status_glanceclient_has_no_class_for(details, retryable):
    result = translate(glance_exc.HTTPException(details=details))

    assert isinstance(result, glance_errors.Retryable) is retryable
    if not retryable:
        assert isinstance(result, exception.ImageSourceError)
        assert "HTTP %s" % details[:3] in str(result)


def test_server_error_when_retries_are_not_wanted():
    result = translate(glance_exc.HTTPBadGateway(), retry_server_errors=False)

    assert isinstance(result, exception.ImageSourceError)
    assert "502" in str(result)


def test_keystone_connection_failure_names_keystone():
    result = translate(ks_exc.ConnectFailure("refused"))

    assert isinstance(result, glance_errors.Retryable)
    assert result.source == "Keystone"


def test_glance_connection_failure_names_no_other_source():
    result = translate(glance_exc.CommunicationError("refused"))

    assert isinstance(result, glance_errors.Retryable)
    assert result.source is None


def test_password_credential_is_described(tmp_path):
    conf = conf_with(tmp_path, {
        "auth_type": "password", "auth_url": "http://k:5000/v3",
        "username": "nova", "password": "s3cret",
        "user_domain_name": "Default", "project_name": "service"})

    text = glance_errors.describe_conf_auth(conf, "glance")

    assert text == ("the [glance] password of user 'nova' (domain "
                    "'Default') for project 'service' at http://k:5000/v3")


def test_auth_section_is_followed(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[glance]\nauth_section = keystone\n"
                    "[keystone]\nauth_type = v3applicationcredential\n"
                    "auth_url = http://k/v3\n"
                    "application_credential_id = compute-host\n"
                    "application_credential_secret = s3cret\n")
    conf = cfg.ConfigOpts()
    conf(["--config-file", str(path)], default_config_files=[])
    ks_loading.register_auth_conf_options(conf, "glance")
    ks_loading.load_auth_from_conf_options(conf, "glance")

    text = glance_errors.describe_conf_auth(conf, "glance")

    assert "[keystone] application credential 'compute-host'" in text
    assert "s3cret" not in text


def test_no_credentials_are_described(tmp_path):
    conf = conf_with(tmp_path, {})

    assert "auth_type is not set" in glance_errors.describe_conf_auth(
        conf, "glance")


def test_plugin_from_a_caller_is_described():
    auth = v3.Password(auth_url="http://k/v3", username="nova",
                       password="s3cret", project_name="service",
                       user_domain_id="default",
                       project_domain_id="default")

    text = glance_errors.describe_plugin(auth, "the caller's session")

    assert text == ("the credentials of the caller's session (auth plugin "
                    "Password, user 'nova', project 'service')")
    assert "s3cret" not in text


# --- server text ------------------------------------------------------------

@pytest.mark.parametrize("value,shown", [
    ("plain text", "plain text"),
    ("line\nbreak\r\x1b[31mred\x07", "line\\nbreak\\r\\x1b[31mred\\x07"),
    ("back\\slash", "back\\\\slash"),
    ("sep\u2028arator\x85", "sep\\u2028arator\\x85"),
    (b"by\x00tes", "by\\x00tes"),
    (["a", 1], "['a', 1]"),
    (None, "None"),
])
def test_printable_escapes_what_could_forge_output(value, shown):
    assert glance_errors.printable(value) == shown


def test_printable_bounds_the_length():
    text = glance_errors.printable("\n" * 10000, limit=50)

    assert text.startswith("\\n" * 25)
    assert text.endswith("... (9975 more characters)")


def test_url_for_humans_drops_credentials_and_query():
    assert glance_errors.url_for_humans(
        "https://user:pw@store.test:8080/obj?X-Amz-Signature=abc") == (
        "https://store.test:8080/obj")


@pytest.mark.parametrize("value,ok", [
    ("0b4d8a0e-5bd3-4a6c-9c1f-6f3a0d2b7e11", True),
    ("0B4D8A0E-5BD3-4A6C-9C1F-6F3A0D2B7E11", True),
    ("0b4d8a0e-5bd3-4a6c-9c1f-6f3a0d2b7e11\n", False),
    ("0b4d8a0e5bd34a6c9c1f6f3a0d2b7e11", False),
    (None, False),
])
def test_image_id_check(value, ok):
    assert glance_errors.is_image_id(value) is ok


@pytest.mark.parametrize("failure,expected", [
    (glance_errors.HTTPStatus(404, "gone"), exception.ImageNotFound),
    (glance_errors.HTTPStatus(401, "no"), exception.ImageNotAuthorized),
    (glance_errors.HTTPStatus(410, "gone"), exception.ImageSourceError),
    (glance_errors.BadResponse("loop"), exception.ImageSourceError),
    (glance_errors.TLSFailed("bad cert"), exception.ImageSourceError),
    (glance_errors.BodyFailure("stalled"), exception.ImageSourceError),
])
def test_http_failures_become_library_errors(failure, expected):
    result = translate(failure)

    assert type(result) is expected
    assert IMAGE_ID in str(result)


@pytest.mark.parametrize("failure", [
    glance_errors.HTTPStatus(503, "busy"),
    glance_errors.Unreachable("cannot connect to http://g:9292"),
    glance_errors.BodyFailure("broke off", retryable=True),
])
def test_http_failures_worth_retrying(failure):
    result = translate(failure)

    assert isinstance(result, glance_errors.Retryable)
    assert result.source is None


def test_http_status_not_retried_when_not_wanted():
    result = translate(glance_errors.HTTPStatus(502, "bad gateway"),
                       retry_server_errors=False)

    assert isinstance(result, exception.ImageSourceError)
    assert "HTTP 502" in str(result)


def test_glanceclient_details_are_escaped_and_bounded():
    result = translate(glance_exc.HTTPBadRequest(
        details="400 Bad\x1b[2J\n" + "x" * 100000))

    assert re.search(r"400 Bad\\+x1b\[2J\\+n", str(result))
    assert "\x1b" not in str(result) and "\n" not in str(result)
    assert len(str(result)) < glance_errors.DETAILS_LIMIT + 200
