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

"""The Glance source against a real Keystone and a real Glance.

The servers (``openstack_servers``, conftest.py) run once per test run on
127.0.0.1; each test uploads the images it needs.
"""

import hashlib
import os
import uuid

from oslo_config import cfg
import pytest

from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from imagebackend.sources import glance
from tests.contract import source as source_contract
from tests import fakes
from tests.functional.fixtures import env as fenv
from tests.functional.fixtures import server_procs

MiB = fenv.MiB


class SleepRecorder:
    """Stands in for time.sleep: the source's backoff, without the wait."""

    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)


@pytest.fixture
def servers(openstack_servers):
    return openstack_servers


@pytest.fixture
def sleep():
    return SleepRecorder()


@pytest.fixture
def make_source(tmp_path, servers, sleep):
    """Build a GlanceSource from a config file with these [glance] values
    (default: the demo user's password, Glance from the catalog).
    """
    def make(glance_opts=None, **kwargs):
        values = servers.demo.auth_options()
        values["num_retries"] = 1
        if glance_opts is not None:
            values = glance_opts
        path = tmp_path / "glance-source.conf"
        path.write_text("[glance]\n" + "".join(
            "%s = %s\n" % item for item in values.items()))
        conf = cfg.ConfigOpts()
        conf(["--config-file", str(path)], project="imagebackend",
             default_config_files=[])
        glance.GlanceSource.register_opts(conf)
        kwargs.setdefault("sleep", sleep)
        return glance.GlanceSource(conf, **kwargs)
    return make


@pytest.fixture(scope="module")
def qcow2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "guest.qcow2"
    return fenv.make_qcow2(str(path), size=64 * MiB)


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "guest.raw"
    return fenv.make_raw(str(path), size=16 * MiB)


@pytest.fixture(scope="module")
def qcow2_image(openstack_servers, qcow2_file):
    return openstack_servers.upload_image(qcow2_file, "qcow2")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def download(source, meta):
    chunks = list(source.open(meta))
    assert all(0 < len(c) <= source.chunk_size for c in chunks)
    return b"".join(chunks)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_catalog_password_auth_meta_and_bytes(servers, make_source, fmt,
                                              qcow2_file, raw_file):
    path = qcow2_file if fmt == "qcow2" else raw_file
    data = read(path)
    image_id = servers.upload_image(path, fmt)
    source = make_source()

    meta = source.get_meta(image_id)

    assert meta.image_id == image_id
    assert meta.disk_format == fmt
    assert meta.size == len(data)
    assert meta.virtual_size == fenv.qemu_info(path, fmt)["virtual-size"]
    assert meta.checksum == hashlib.md5(data).hexdigest()
    assert meta.expected_digest() == ("sha512",
                                      hashlib.sha512(data).hexdigest())
    assert meta.hash_value in meta.identity
    assert "glance" in meta.source
    body = download(source, meta)
    assert len(body) == len(data)
    assert hashlib.sha512(body).hexdigest() == meta.hash_value
    assert body == data


def test_session_passed_in_by_the_caller(servers, make_source, qcow2_image,
                                         qcow2_file):
    # No credentials in the configuration: the caller's session has them.
    source = make_source({}, session=servers.demo.session())
    meta = source.get_meta(qcow2_image)
    assert download(source, meta) == read(qcow2_file)


def test_api_servers_tried_in_turn(servers, make_source, sleep, qcow2_image):
    dead = "http://127.0.0.1:%d" % server_procs.free_port()
    opts = dict(servers.demo.auth_options(),
                api_servers="%s,%s" % (dead, servers.glance_url),
                num_retries=1)
    source = make_source(opts)

    meta = source.get_meta(qcow2_image)

    assert meta.image_id == qcow2_image
    assert sleep.delays == [source.retry_delay]


def test_closing_the_stream_early_is_clean(make_source, qcow2_image):
    source = make_source()
    meta = source.get_meta(qcow2_image)
    stream = source.open(meta)
    first = next(stream)
    stream.close()
    assert first
    # The source still works afterwards (the connection was released).
    assert len(download(source, meta)) == meta.size


def test_wrong_password_is_not_authorized_and_not_retried(
        servers, make_source, sleep, qcow2_image):
    opts = dict(servers.demo.auth_options(), password="not-the-password",
                num_retries=3)
    source = make_source(opts)

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(qcow2_image)

    message = str(err.value)
    assert qcow2_image in message
    assert "Keystone refused" in message
    assert "user 'demo'" in message and "project 'demo'" in message
    assert sleep.delays == []


def test_bogus_token_is_not_authorized(servers, make_source, qcow2_image):
    opts = {"auth_type": "token", "auth_url": servers.keystone_url,
            "token": "gAAAAABbogus-token", "project_name": "demo",
            "project_domain_name": "Default"}
    source = make_source(opts)

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(qcow2_image)

    assert qcow2_image in str(err.value)
    assert "token" in str(err.value)


def test_revoked_token_is_refused_by_glance(servers, make_source,
                                            qcow2_image):
    token = servers.issue_token()
    servers.revoke_token(token)
    # admin_token sends the token as it is, so Glance (not Keystone) is
    # the one to refuse it.
    source = make_source({"auth_type": "admin_token", "token": token,
                          "endpoint": servers.glance_url})

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(qcow2_image)

    assert "Glance refused the request" in str(err.value)
    assert "HTTP 401" in str(err.value)


def test_missing_token_is_refused_by_glance(servers, make_source,
                                            qcow2_image):
    source = make_source({"endpoint_override": servers.glance_url})

    with pytest.raises(exception.ImageNotAuthorized) as err:
        source.get_meta(qcow2_image)

    assert "no credentials" in str(err.value)


def test_unknown_image_is_not_found(make_source):
    image_id = str(uuid.uuid4())

    with pytest.raises(exception.ImageNotFound) as err:
        make_source().get_meta(image_id)

    assert image_id in str(err.value)


def test_deactivated_image_is_refused(servers, make_source, raw_file):
    image_id = servers.upload_image(raw_file, "raw")
    servers.deactivate_image(image_id)

    with pytest.raises(exception.ImageNotActive) as err:
        make_source().get_meta(image_id)

    assert err.value.status == "deactivated"
    assert image_id in str(err.value)


def test_container_format_other_than_bare_is_refused(servers, make_source):
    image_id = servers.upload_image(b"\0" * 4096, "raw",
                                    container_format="ovf")

    with pytest.raises(exception.ImageUnsupported) as err:
        make_source().get_meta(image_id)

    assert "'ovf'" in str(err.value)
    assert "'bare'" in str(err.value)


def test_glance_stopped_is_unavailable_after_retries(
        servers, make_source, sleep, qcow2_image):
    opts = dict(servers.demo.auth_options(), num_retries=2)
    source = make_source(opts)
    meta = source.get_meta(qcow2_image)

    with servers.glance_stopped():
        with pytest.raises(exception.ImageSourceUnavailable) as err:
            source.open(meta)

    assert err.value.attempts == 3
    assert sleep.delays == [0.5, 1.0]
    assert qcow2_image in str(err.value)
    assert "3 attempt(s)" in str(err.value)


def test_upload_round_trip(servers, make_source, qcow2_file):
    source = make_source()
    progress = []
    size = os.path.getsize(qcow2_file)

    image_id = source.upload("uploaded", qcow2_file, "qcow2",
                             progress=lambda stage, done, total:
                             progress.append((stage, done, total)))

    assert progress[-1] == ("upload", size, size)
    assert {(stage, total) for stage, _, total in progress} == {
        ("upload", size)}
    assert [done for _, done, _ in progress] == sorted(
        done for _, done, _ in progress)
    meta = source.get_meta(image_id)
    assert meta.disk_format == "qcow2"
    assert servers.image_get(image_id)["name"] == "uploaded"
    assert download(source, meta) == read(qcow2_file)
    assert read(servers.image_store_file(image_id)) == read(qcow2_file)


def test_upload_refused_by_glance_leaves_no_image(servers, make_source,
                                                  raw_file):
    source = make_source()
    before = {image["id"] for image in
              servers.glance_client().images.list()}

    # Glance inspects the data: raw bytes declared as qcow2 are refused.
    with pytest.raises(exception.ImageSourceError) as err:
        source.upload("mislabelled", raw_file, "qcow2")

    assert "HTTP 415" in str(err.value)
    after = {image["id"] for image in servers.glance_client().images.list()}
    assert after == before


def test_upload_of_an_unknown_disk_format_is_refused(make_source, raw_file):
    with pytest.raises(exception.ImageSourceError) as err:
        make_source().upload("bad", raw_file, "no-such-format")

    assert "no-such-format" in str(err.value)


# -- the source contract (tests/contract/source.py) ---------------------------

class GlanceWorld(source_contract.SourceWorld):
    """The Glance source of the demo user against the real servers."""

    def __init__(self, servers, source, tmp_path):
        self.servers = servers
        self.source = source
        self.tmp_path = tmp_path

    def add_image(self, data):
        return self.servers.upload_image(data, "raw")

    def missing_id(self):
        return str(uuid.uuid4())

    def tamper(self, image_id):
        self.servers.tamper_image_file(image_id)

    def cache_conf(self):
        return fakes.conf(self.tmp_path)

    def qemu(self, conf):
        return qemu_img.QemuImg(conf)


class TestGlanceSourceContract(source_contract.SourceContract):

    @pytest.fixture
    def source_world(self, servers, make_source, tmp_path):
        return GlanceWorld(servers, make_source(), tmp_path)
