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

"""One keystoneauth1 session (and token) per process and credential."""

from unittest import mock

from keystoneauth1.identity.generic import password as generic_password
from oslo_config import cfg
import pytest

from imagebackend import exception
from imagebackend.sources import glance
from imagebackend.sources.glance import errors as glance_errors
from imagebackend.sources.glance import sessions
from tests.unit.sources.glance import test_glance

IMAGE_ID = test_glance.IMAGE_ID
PASSWORD_AUTH = test_glance.PASSWORD_AUTH


@pytest.fixture
def make_conf(tmp_path):
    def make(text):
        path = tmp_path / ("c%d.conf" % len(list(tmp_path.iterdir())))
        path.write_text(text)
        conf = cfg.ConfigOpts()
        conf(["--config-file", str(path)], project="imagebackend",
             default_config_files=[])
        glance.GlanceSource.register_opts(conf)
        return conf
    return make


def glance_section(values):
    return "[glance]\n" + "".join("%s = %s\n" % item
                                  for item in values.items())


def test_sources_with_the_same_credentials_share_one_session(make_conf):
    first = glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))
    second = glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))

    assert first._adapter.session is second._adapter.session
    assert first._adapter.session.auth is second._adapter.session.auth


@pytest.mark.parametrize("changed", [
    {"password": "other"},
    {"username": "other"},
    {"project_name": "other"},
    {"auth_url": "http://keystone.other/v3"},
    {"insecure": "true"},
    {"timeout": "5"},
])
def test_other_credentials_or_session_options_get_their_own(make_conf,
                                                            changed):
    first = glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))
    second = glance.GlanceSource(make_conf(glance_section(
        dict(PASSWORD_AUTH, **changed))))

    assert first._adapter.session is not second._adapter.session
    assert first._adapter.session.auth is not second._adapter.session.auth


def test_auth_section_values_decide(make_conf):
    def conf(password):
        values = {k: v for k, v in PASSWORD_AUTH.items() if k != "auth_type"}
        values["password"] = password
        return make_conf("[glance]\nauth_section = creds\n[creds]\n"
                         "auth_type = password\n" + "".join(
                             "%s = %s\n" % item for item in values.items()))

    a, b, c = (glance.GlanceSource(conf(p)) for p in ("one", "one", "two"))

    assert a._adapter.session is b._adapter.session
    assert a._adapter.session is not c._adapter.session
    assert c._adapter.session.auth._password == "two"


def test_a_forked_child_shares_nothing_with_its_parent(make_conf):
    before = glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))

    sessions._after_fork()          # what os.fork() runs in the child
    after = glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))

    assert after._adapter.session is not before._adapter.session


def test_a_callers_session_is_not_shared(make_conf):
    glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))
    given = mock.Mock(auth=None)

    source = glance.GlanceSource(make_conf(glance_section(
        {"endpoint_override": "http://glance.test:9292"})), session=given)

    assert source._adapter.session is given


@pytest.mark.parametrize("code, forgets", [(401, True), (403, False),
                                           (404, False)])
def test_a_refused_token_is_forgotten(make_conf, code, forgets):
    source = glance.GlanceSource(make_conf(glance_section(PASSWORD_AUTH)))
    with mock.patch.object(source._http, "get_json", autospec=True,
                           side_effect=glance_errors.HTTPStatus(code, "no")), \
            mock.patch.object(generic_password.Password, "invalidate",
                              autospec=True) as invalidate:
        with pytest.raises(exception.ImageBackendException):
            source.get_meta(IMAGE_ID)

    if forgets:
        invalidate.assert_called_once_with(source._adapter.session.auth)
    else:
        invalidate.assert_not_called()
