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

"""The Glance HTTP client with the keystoneauth adapter replaced.

The adapter is an autospecced mock whose ``request`` returns real
``requests.Response`` objects over in-memory urllib3 responses, so the
redirect, status, encoding and body rules run on the real response code.
"""

import io
import json
import socket
from unittest import mock

from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
import pytest
import requests
import urllib3

from imagebackend.sources.glance import client as glance_client
from imagebackend.sources.glance import errors as glance_errors

GLANCE = "http://glance.test:9292"
TOKEN = {"X-Auth-Token": "secret-token"}


def response(status=200, body=b"", headers=None, url=None):
    resp = requests.Response()
    resp.status_code = status
    resp.headers = requests.structures.CaseInsensitiveDict(headers or {})
    resp.raw = urllib3.HTTPResponse(body=io.BytesIO(body), status=status,
                                    headers=headers or {},
                                    preload_content=False)
    resp.url = url
    return resp


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def adapter():
    adapter = mock.create_autospec(ks_adapter.Adapter, instance=True)
    adapter.auth = None
    adapter.session = mock.create_autospec(ks_session.Session,
                                           instance=True)
    adapter.session.auth = mock.Mock()
    adapter.session.get_auth_headers.return_value = dict(TOKEN)
    adapter.get_endpoint.return_value = GLANCE
    return adapter


def answers(adapter, *resps):
    """Make the adapter answer these responses in turn, each with the URL
    it was asked for.
    """
    queue = list(resps)

    def request(url, method, **kwargs):
        resp = queue.pop(0)
        if isinstance(resp, BaseException):
            raise resp
        resp.url = url
        return resp
    adapter.request.side_effect = request


def sent(adapter):
    """``(url, headers)`` of every request made."""
    return [(c.args[0], c.kwargs["headers"])
            for c in adapter.request.call_args_list]


def client(adapter, **limits):
    return glance_client.Client(adapter, glance_client.Limits(**limits),
                                clock=Clock())


# --- requests ---------------------------------------------------------------

def test_get_asks_for_identity_with_the_token_and_no_ksa_redirects(
        adapter):
    answers(adapter, response(body=b"data"))

    resp = client(adapter, stall_timeout=7).get(None, "/v2/images/x/file",
                                                "application/octet-stream")

    assert resp.status_code == 200
    [(url, headers)] = sent(adapter)
    assert url == GLANCE + "/v2/images/x/file"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["X-Auth-Token"] == "secret-token"
    kwargs = adapter.request.call_args.kwargs
    assert kwargs["redirect"] is False and kwargs["stream"] is True
    assert kwargs["authenticated"] is False and kwargs["raise_exc"] is False
    assert kwargs["log"] is False
    assert kwargs["timeout"] == (7, 7)


def test_endpoint_given_wins_and_version_suffix_is_dropped(adapter):
    answers(adapter, response(body=b"{}"))
    adapter.get_endpoint.return_value = GLANCE + "/v2/"

    client(adapter).get_json(None, "/v2/images/x")
    answers(adapter, response(body=b"{}"))
    client(adapter).get_json("http://other:9292", "/v2/images/x")

    assert [u for u, _ in sent(adapter)] == [
        GLANCE + "/v2/images/x", "http://other:9292/v2/images/x"]


def test_no_credentials_no_token(adapter):
    adapter.session.auth = None
    answers(adapter, response(body=b"{}"))

    client(adapter).get_json(None, "/v2/images/x")

    assert "X-Auth-Token" not in sent(adapter)[0][1]
    adapter.session.get_auth_headers.assert_not_called()


def test_same_origin_redirect_keeps_the_token(adapter):
    answers(adapter,
            response(302, headers={"Location": "/v2/elsewhere"}),
            response(body=b"data"))

    client(adapter).get(None, "/v2/images/x/file", "*/*")

    (_, first), (url, second) = sent(adapter)
    assert url == GLANCE + "/v2/elsewhere"
    assert second["X-Auth-Token"] == "secret-token"


@pytest.mark.parametrize("location", [
    "http://store.test:9292/data",      # another host
    "https://glance.test:9292/data",    # another scheme
    "http://glance.test:9393/data",     # another port
])
def test_cross_origin_redirect_drops_the_token(adapter, location):
    answers(adapter, response(307, headers={"Location": location}),
            response(body=b"data"))

    client(adapter).get(None, "/v2/images/x/file", "*/*")

    (_, first), (url, second) = sent(adapter)
    assert first["X-Auth-Token"] == "secret-token"
    assert url == location
    assert "X-Auth-Token" not in second
    assert second["Accept-Encoding"] == "identity"


def test_default_port_is_the_same_origin():
    assert glance_client.origin("http://g/x") == glance_client.origin(
        "HTTP://G:80/y")
    assert glance_client.origin("https://g/x") != glance_client.origin(
        "http://g:443/x")


def test_redirects_are_limited(adapter):
    answers(adapter, *[response(302, headers={"Location": "/loop"})
                       for _ in range(glance_client.MAX_REDIRECTS + 1)])

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).get(None, "/v2/images/x/file", "*/*")

    assert "more than 5 times" in err.value.reason
    assert adapter.request.call_count == 6


@pytest.mark.parametrize("location", ["file:///etc/passwd",
                                      "ftp://glance.test/x",
                                      "javascript:alert(1)"])
def test_redirect_to_another_scheme_is_refused(adapter, location):
    answers(adapter, response(302, headers={"Location": location}))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).get(None, "/v2/images/x/file", "*/*")

    assert "not an http(s) URL" in err.value.reason
    assert adapter.request.call_count == 1


def test_redirect_without_location_is_refused(adapter):
    answers(adapter, response(301))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).get(None, "/v2/images/x/file", "*/*")

    assert "without a Location" in err.value.reason


def test_error_body_is_read_up_to_a_bound_and_escaped(adapter):
    body = b"\x1b[2Jboom\n" + b"x" * (8 * 1024 * 1024)
    answers(adapter, response(500, body=body))

    with pytest.raises(glance_errors.HTTPStatus) as err:
        client(adapter).get(None, "/v2/images/x", "application/json")

    assert err.value.code == 500
    assert err.value.details.startswith("\\x1b[2Jboom\\n")
    marker = " ... (9999999 more characters)"
    assert len(err.value.details) <= glance_errors.DETAILS_LIMIT + len(marker)
    assert err.value.retryable is False     # translate() decides for 5xx


@pytest.mark.parametrize("status", [201, 206, 300, 304])
def test_other_success_statuses_are_not_the_data(adapter, status):
    answers(adapter, response(status, body=b"x"))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).get(None, "/v2/images/x/file", "*/*")

    assert "HTTP %d" % status in err.value.reason


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_compressed_body_is_refused(adapter, encoding):
    answers(adapter, response(body=b"x",
                              headers={"Content-Encoding": encoding}))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).get(None, "/v2/images/x/file", "*/*")

    assert "compressed" in err.value.reason


@pytest.mark.parametrize("encoding", ["Identity", " identity ", "", None])
def test_identity_encoding_is_accepted(adapter, encoding):
    headers = {} if encoding is None else {"Content-Encoding": encoding}
    answers(adapter, response(body=b"x" * 5000, headers=headers))
    c = client(adapter)

    resp = c.get(None, "/x", "*/*")

    # Handed over unread, and read as it was sent.
    assert resp.raw.tell() == 0
    assert b"".join(c.chunks(resp, GLANCE + "/x", 5000, 4096)) == (
        b"x" * 5000)


@pytest.mark.parametrize("failure,kind,retryable", [
    (ks_exc.ConnectFailure("refused"), glance_errors.Unreachable, True),
    (ks_exc.ConnectTimeout("timed out"), glance_errors.Unreachable, True),
    (ks_exc.SSLError("bad cert"), glance_errors.TLSFailed, False),
    (ks_exc.UnknownConnectionError("bad url", None),
     glance_errors.BadResponse, False),
])
def test_connection_failures_are_glances(adapter, failure, kind,
                                         retryable):
    answers(adapter, failure)

    with pytest.raises(kind) as err:
        client(adapter).get(None, "/x", "*/*")

    assert err.value.retryable is retryable
    assert "Keystone" not in err.value.reason


def test_keystone_failures_are_left_for_translate(adapter):
    adapter.get_endpoint.side_effect = ks_exc.ConnectFailure("keystone")

    with pytest.raises(ks_exc.ConnectFailure):
        client(adapter).get(None, "/x", "*/*")


# --- records ----------------------------------------------------------------

def test_record_is_parsed(adapter):
    answers(adapter, response(body=json.dumps({"id": "x"}).encode(),
                              headers={"Content-Type": "text/plain"}))

    assert client(adapter).get_json(None, "/v2/images/x") == {"id": "x"}


@pytest.mark.parametrize("body,words", [
    (b"[1]", "not a JSON object"),
    (b"\x1b[2J not json", "not JSON"),
    (b"[" * 200000, "not JSON"),
    (b"{" + b" " * glance_client.RECORD_LIMIT + b"}", "at most 1048576"),
])
def test_bad_record_is_refused(adapter, body, words):
    answers(adapter, response(body=body))

    with pytest.raises(glance_errors.HTTPFailure) as err:
        client(adapter).get_json(None, "/v2/images/x")

    assert words in err.value.reason
    assert "\x1b" not in err.value.reason


# --- bodies -----------------------------------------------------------------

class FakeRaw:
    """A response body: ``reads`` is a list of what each read returns
    (bytes, or an exception to raise); records what was asked.
    """

    def __init__(self, reads, clock=None, step=0.0):
        self.reads = list(reads)
        self.asked = []
        self.returned = 0
        self.clock = clock
        self.step = step

    def read1(self, amt, decode_content=None):
        assert decode_content is False
        self.asked.append(amt)
        if self.clock is not None:
            self.clock.now += self.step
        if not self.reads:
            return b""
        item = self.reads.pop(0)
        if isinstance(item, BaseException):
            raise item
        if len(item) > amt:
            self.reads.insert(0, item[amt:])
        self.returned += len(item[:amt])
        return item[:amt]


def chunks_of(raw, limit, chunk_size=4096, **limits):
    resp = mock.Mock(raw=raw)
    c = glance_client.Client(mock.Mock(), glance_client.Limits(**limits),
                             clock=raw.clock or Clock())
    return c.chunks(resp, GLANCE + "/v2/images/x/file", limit, chunk_size,
                    "the %d bytes Glance recorded" % limit)


def test_body_is_read_whole_within_the_limit():
    raw = FakeRaw([b"a" * 3000, b"b" * 3000, b"c" * 100])

    assert b"".join(chunks_of(raw, limit=6100)) == (
        b"a" * 3000 + b"b" * 3000 + b"c" * 100)


def test_reading_stops_one_byte_past_the_limit():
    raw = FakeRaw([b"x" * 1000] * 1000)

    with pytest.raises(glance_errors.BodyFailure) as err:
        list(chunks_of(raw, limit=2500))

    assert err.value.too_long
    assert "more than the 2500 bytes Glance recorded" in err.value.reason
    # Each read asks no more than the limit and one byte: never beyond.
    assert raw.asked == [2501, 1501, 501]
    assert raw.returned == 2501


def test_stall_is_reported_with_the_option():
    raw = FakeRaw([b"x" * 10,
                   urllib3.exceptions.ReadTimeoutError(None, "/", "t")])

    with pytest.raises(glance_errors.BodyFailure) as err:
        list(chunks_of(raw, limit=100, stall_timeout=5))

    assert "for 5 s after 10 bytes" in err.value.reason
    assert "stall_timeout" in err.value.reason
    assert not err.value.retryable


@pytest.mark.parametrize("failure", [
    urllib3.exceptions.ProtocolError("Connection broken"),
    ConnectionResetError(104, "reset"),
])
def test_broken_body_is_reported_with_the_url(failure):
    raw = FakeRaw([b"x" * 10, failure])

    with pytest.raises(glance_errors.BodyFailure) as err:
        list(chunks_of(raw, limit=100))

    assert "%s/v2/images/x/file broke off after 10 bytes" % GLANCE in (
        err.value.reason)
    assert err.value.retryable


def test_socket_timeout_is_a_stall():
    raw = FakeRaw([socket.timeout("timed out")])

    with pytest.raises(glance_errors.BodyFailure) as err:
        list(chunks_of(raw, limit=100))

    assert "stall_timeout" in err.value.reason


def test_trickle_below_the_minimum_rate_fails_after_the_window():
    clock = Clock()
    # One byte a second.
    raw = FakeRaw([b"x"] * 100, clock=clock, step=1.0)

    with pytest.raises(glance_errors.BodyFailure) as err:
        list(chunks_of(raw, limit=1000, min_rate=10, rate_window=5))

    assert "min_download_rate (10 bytes/s)" in err.value.reason
    assert "download_rate_window (5 s)" in err.value.reason
    assert clock.now == 5.0


def test_rate_above_the_minimum_passes_and_zero_turns_it_off():
    clock = Clock()
    raw = FakeRaw([b"x" * 100] * 50, clock=clock, step=1.0)
    assert len(b"".join(chunks_of(raw, limit=5000, min_rate=50,
                                  rate_window=5))) == 5000

    raw = FakeRaw([b"x"] * 50, clock=Clock(), step=1.0)
    raw.clock = Clock()
    assert len(b"".join(chunks_of(raw, limit=5000, min_rate=0,
                                  rate_window=5))) == 50


def test_small_pieces_are_joined_into_chunks():
    raw = FakeRaw([b"x" * 100] * 100)

    chunks = list(chunks_of(raw, limit=10000, chunk_size=4096))

    assert [len(c) for c in chunks] == [4096, 4096, 1808]


# --- requests that change something ----------------------------------------

def consuming(adapter, *resps, pieces=None):
    """Like :func:`answers`, but each request first sends its body (all
    of it, or ``pieces`` pieces of it) like an HTTP library would.
    """
    queue = list(resps)

    def request(url, method, data=None, **kwargs):
        if data is not None and not isinstance(data, bytes):
            for count, _piece in enumerate(data, 1):
                if pieces is not None and count >= pieces:
                    break
        resp = queue.pop(0)
        if isinstance(resp, BaseException):
            raise resp
        resp.url = url
        return resp
    adapter.request.side_effect = request


#: files :func:`file_body` opened, closed after each test
_OPENED = []


@pytest.fixture(autouse=True)
def _close_opened():
    """Close what the test's :func:`file_body` opened.  Left to the
    garbage collector (the mocks that saw a body are cyclic), a file would
    be closed during some later test of the worker: under the feet of a
    test that compares this process's open descriptors before and after.
    """
    yield
    while _OPENED:
        _OPENED.pop().close()


def file_body(tmp_path, size=3 * 256 * 1024 + 5):
    path = tmp_path / "disk"
    path.write_bytes(b"d" * size)
    seen = []
    _OPENED.append(open(path, "rb"))
    return glance_client.FileBody(_OPENED[-1], size, seen.append), seen


def test_send_json_posts_with_the_token_and_follows_no_redirect(adapter):
    answers(adapter, response(201, body=b'{"id": "x"}'))

    value = client(adapter).send_json(None, "POST", "/v2/images",
                                      {"name": "n"})

    assert value == {"id": "x"}
    [(url, headers)] = sent(adapter)
    assert url == GLANCE + "/v2/images"
    assert headers["X-Auth-Token"] == "secret-token"
    assert headers["Content-Type"] == "application/json"
    kwargs = adapter.request.call_args.kwargs
    assert json.loads(kwargs["data"]) == {"name": "n"}
    assert kwargs["redirect"] is False and kwargs["stream"] is True


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_send_json_does_not_follow_redirects(adapter, status):
    answers(adapter, response(status, headers={
        "Location": "http://elsewhere.test/v2/images?sig=secret\x1b"}))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).send_json(None, "POST", "/v2/images", {})

    assert len(sent(adapter)) == 1
    assert "redirect to http://elsewhere.test/v2/images" in err.value.reason
    assert "secret" not in err.value.reason
    assert GLANCE in err.value.reason


def test_send_json_answer_is_bounded(adapter):
    answers(adapter, response(201, body=b"{" + b" " * (
        glance_client.RECORD_LIMIT + 10) + b"}"))

    with pytest.raises(glance_errors.BodyFailure) as err:
        client(adapter).send_json(None, "POST", "/v2/images", {})

    assert err.value.too_long


def test_send_json_error_body_is_bounded(adapter):
    answers(adapter, response(500, body=b"\x1b" + b"x" * 100000))

    with pytest.raises(glance_errors.HTTPStatus) as err:
        client(adapter).send_json(None, "POST", "/v2/images", {})

    assert err.value.code == 500
    assert err.value.details.startswith("\\x1b")
    assert len(err.value.details) < 2000


def test_send_json_other_status_is_not_the_answer(adapter):
    answers(adapter, response(202, body=b"{}"))

    with pytest.raises(glance_errors.BadResponse):
        client(adapter).send_json(None, "POST", "/v2/images", {})


def test_delete_follows_no_redirect(adapter):
    answers(adapter, response(302, headers={"Location": "/x"}))

    with pytest.raises(glance_errors.BadResponse):
        client(adapter).delete(None, "/v2/images/x")

    assert len(sent(adapter)) == 1


def test_delete_reads_a_bounded_answer(adapter):
    answers(adapter, response(200, body=b"x" * 10 * glance_client.ERROR_LIMIT))

    client(adapter).delete(None, "/v2/images/x")

    assert adapter.request.call_args.args[1] == "DELETE"


def test_put_file_streams_the_body_in_pieces(adapter, tmp_path):
    body, seen = file_body(tmp_path)
    consuming(adapter, response(204))

    client(adapter, stall_timeout=9).put_file(None, "/v2/images/x/file",
                                              body)

    assert body.finished and body.sent == body.size
    assert seen[0] is None
    assert [len(p) for p in seen[1:]] == [256 * 1024] * 3 + [5]
    kwargs = adapter.request.call_args.kwargs
    assert kwargs["data"] is body and len(body) == body.size
    assert kwargs["timeout"] == (9, 9)
    assert kwargs["redirect"] is False
    [(_url, headers)] = sent(adapter)
    assert headers["Content-Type"] == "application/octet-stream"


def test_put_file_answer_before_the_whole_body_is_not_success(adapter,
                                                              tmp_path):
    body, _seen = file_body(tmp_path)
    consuming(adapter, response(204), pieces=2)

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).put_file(None, "/v2/images/x/file", body)

    assert "did not land" in err.value.reason


def test_put_file_redirect_is_not_followed(adapter, tmp_path):
    body, _seen = file_body(tmp_path)
    consuming(adapter, response(307, headers={
        "Location": "http://elsewhere.test/store"}))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).put_file(None, "/v2/images/x/file", body)

    assert "elsewhere.test" in err.value.reason
    assert len(sent(adapter)) == 1


def test_put_file_stall_while_sending_names_the_option(adapter, tmp_path):
    body, _seen = file_body(tmp_path)
    clock = Clock()

    def request(url, method, data=None, **kwargs):
        next(iter(data))
        clock.now += 5      # the next send blocked this long
        raise ks_exc.ConnectTimeout("timed out")
    adapter.request.side_effect = request
    http = glance_client.Client(adapter, glance_client.Limits(stall_timeout=5),
                                clock=clock)

    with pytest.raises(glance_errors.BodyFailure) as err:
        http.put_file(None, "/v2/images/x/file", body)

    assert "stall_timeout" in err.value.reason
    assert "262144 of 786437 bytes" in err.value.reason
    assert not err.value.retryable


def test_put_file_no_answer_after_the_body_names_the_option(adapter,
                                                            tmp_path):
    body, _seen = file_body(tmp_path)
    consuming(adapter, ks_exc.ConnectTimeout("timed out"))

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter, stall_timeout=4).put_file(None, "/v2/images/x/file",
                                                  body)

    assert "no answer within 4 s" in err.value.reason
    assert "stall_timeout" in err.value.reason
    assert not err.value.retryable


def test_put_file_connection_broken_mid_body(adapter, tmp_path):
    body, _seen = file_body(tmp_path)

    def request(url, method, data=None, **kwargs):
        next(iter(data))
        raise ks_exc.ConnectFailure("reset by peer")
    adapter.request.side_effect = request

    with pytest.raises(glance_errors.BodyFailure) as err:
        client(adapter).put_file(None, "/v2/images/x/file", body)

    assert "broke off after 262144 of 786437 bytes" in err.value.reason
    assert not err.value.retryable


def test_put_file_read_error_is_the_files(adapter, tmp_path):
    body, _seen = file_body(tmp_path)
    body._src.close()
    body._src = mock.Mock(spec=["seek", "read"])
    body._src.read.side_effect = OSError(5, "Input/output error")
    consuming(adapter, response(204))

    with pytest.raises(glance_client.FileReadError) as err:
        client(adapter).put_file(None, "/v2/images/x/file", body)

    assert "Input/output error" in str(err.value)


def test_file_that_shrank_is_a_read_error(tmp_path):
    body, _seen = file_body(tmp_path)
    body.size += 10

    with pytest.raises(glance_client.FileReadError) as err:
        list(body)

    assert "shrank" in str(err.value)


def test_put_file_that_cannot_connect_says_so(adapter, tmp_path):
    body, _seen = file_body(tmp_path)
    adapter.request.side_effect = ks_exc.ConnectFailure("refused")

    with pytest.raises(glance_errors.BadResponse) as err:
        client(adapter).put_file(None, "/v2/images/x/file", body)

    assert "cannot connect" in err.value.reason
    assert "stall_timeout" not in err.value.reason
    assert not err.value.retryable
