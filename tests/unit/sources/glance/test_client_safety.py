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

"""Image data is streamed whatever the server says it is: a Content-Type
never makes the client read a body whole.
"""

import io
from unittest import mock

from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import session as ks_session
import pytest
import requests
import urllib3

from imagebackend.sources.glance import client as glance_client

GLANCE = "http://glance.test:9292"
MiB = 1024 * 1024
CHUNK = 4096
DATA = bytes(range(256)) * (4 * MiB // 256)


def _adapter(body, headers):
    adapter = mock.create_autospec(ks_adapter.Adapter, instance=True)
    adapter.auth = None
    adapter.session = mock.create_autospec(ks_session.Session,
                                           instance=True)
    adapter.session.auth = mock.Mock()
    adapter.session.get_auth_headers.return_value = {"X-Auth-Token": "t"}
    adapter.get_endpoint.return_value = GLANCE

    def request(url, method, **kwargs):
        resp = requests.Response()
        resp.status_code = 200
        resp.headers = requests.structures.CaseInsensitiveDict(headers)
        resp.raw = urllib3.HTTPResponse(body=body, status=200,
                                        headers=headers,
                                        preload_content=False)
        resp.url = url
        return resp
    adapter.request.side_effect = request
    return adapter


@pytest.mark.parametrize("content_type", [
    "application/octet-stream", "application/json",
    "text/plain; charset=utf-8", "text/html", None])
def test_data_is_streamed_whatever_the_content_type(content_type):
    body = io.BytesIO(DATA)
    headers = {"Content-Length": str(len(DATA))}
    if content_type:
        headers["Content-Type"] = content_type
    adapter = _adapter(body, headers)
    c = glance_client.Client(adapter, glance_client.Limits(),
                             clock=lambda: 0.0)

    resp = c.get(None, "/v2/images/x/file", "application/octet-stream")
    assert adapter.request.call_args.kwargs["stream"] is True
    assert body.tell() == 0         # nothing read before it is asked for
    chunks = c.chunks(resp, GLANCE + "/v2/images/x/file", len(DATA), CHUNK)
    first = next(chunks)

    # One chunk was read, not the body.
    assert first == DATA[:len(first)] and 0 < len(first) <= CHUNK
    assert body.tell() <= CHUNK
    assert first + b"".join(chunks) == DATA
