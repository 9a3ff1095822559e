"""How glanceclient/keystoneauth1 failures are classified and described."""

from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1.identity import v3
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
import pytest

from imagebackend import exception
from imagebackend.sources import glance_errors

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
