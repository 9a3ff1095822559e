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

"""What a warm create from Glance asks of Keystone and Glance, counted by
an HTTP proxy every request of the process goes through.

A warm create (the image's base is cached) reads the image's record once
and downloads nothing; the token is asked for once per process and
credential.  With ``auth_type = password`` (keystoneauth1's generic
plugin) the first request of a process also asks Keystone which identity
API ``auth_url`` serves (``GET auth_url``): that discovery is part of
authenticating with that plugin; ``v3password`` does without it.
"""

import os
import subprocess
import sys
import urllib.parse

import pytest

import imagebackend
from imagebackend.sources.glance import sessions
from tests.functional.fixtures import counting_proxy
from tests.functional.fixtures import env as fenv

pytestmark = pytest.mark.usefixtures("openstack_servers")


@pytest.fixture
def deployment(tmp_path, openstack_servers):
    dep = fenv.Deployment(str(tmp_path),
                          glance=openstack_servers.demo.auth_options())
    dep.write_config(imagebackend={"image_source": "glance"})
    return dep


@pytest.fixture
def image_id(deployment, openstack_servers, tmp_path):
    raw = fenv.make_raw(str(tmp_path / "image.raw"), 8 * fenv.MiB)
    image_id = openstack_servers.upload_image(raw, "raw",
                                              name="request-count")
    deployment.prefetch(image_id)
    return image_id


@pytest.fixture
def proxy(monkeypatch):
    with counting_proxy.CountingProxy() as proxy:
        for key, value in proxy.environ({}).items():
            monkeypatch.setenv(key, value)
        for key in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(key, raising=False)
        # This process starts with no token, as a new one would.
        sessions.forget_all()
        yield proxy
    sessions.forget_all()


def paths(requests, servers):
    """``(method, server, path)`` of each request."""
    names = {urllib.parse.urlsplit(servers.keystone_url).netloc: "keystone",
             urllib.parse.urlsplit(servers.glance_url).netloc: "glance"}
    out = []
    for method, url in requests:
        parts = urllib.parse.urlsplit(url)
        out.append((method, names.get(parts.netloc, parts.netloc),
                    parts.path))
    return out


def create(deployment, image_id, name):
    disk = imagebackend.load_backend(deployment.conf()).create_image(
        image_id, os.path.join(deployment.instances, name), fenv.GiB)
    assert disk.cache_hit
    return disk


def test_warm_creates_ask_one_token_per_process(deployment, image_id,
                                                proxy, openstack_servers):
    record = ("GET", "glance", "/v2/images/%s" % image_id)

    create(deployment, image_id, "first")
    first = paths(proxy.take(), openstack_servers)
    # A new backend and source, as a driver may build per request: the
    # process's token is reused.
    create(deployment, image_id, "second")
    second = paths(proxy.take(), openstack_servers)

    assert first == [("GET", "keystone", "/v3"),
                     ("POST", "keystone", "/v3/auth/tokens"),
                     record]
    assert second == [record]


def test_v3password_needs_no_identity_discovery(deployment, image_id, proxy,
                                                openstack_servers):
    deployment.write_config(glance={"auth_type": "v3password"})
    record = ("GET", "glance", "/v2/images/%s" % image_id)

    create(deployment, image_id, "first")
    first = paths(proxy.take(), openstack_servers)
    create(deployment, image_id, "second")
    second = paths(proxy.take(), openstack_servers)

    assert first == [("POST", "keystone", "/v3/auth/tokens"), record]
    assert second == [record]


def test_command_line_warm_create_reads_one_record(deployment, image_id,
                                                   proxy, openstack_servers):
    env = proxy.environ(deployment.env())
    target = os.path.join(deployment.instances, "cli")

    result = subprocess.run(
        [sys.executable, "-m", "imagebackend.cmd.main",
         "--config-file", deployment.config_file, "disk", "create",
         image_id, target, "--size", "1G"],
        env=env, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert os.path.exists(target)
    assert paths(proxy.take(), openstack_servers) == [
        ("GET", "keystone", "/v3"),
        ("POST", "keystone", "/v3/auth/tokens"),
        ("GET", "glance", "/v2/images/%s" % image_id)]
