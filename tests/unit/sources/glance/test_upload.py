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

"""Uploading a file to Glance, with the Glance HTTP client autospecced
and the source's request runner reduced to one attempt.
"""

import hashlib
import re
from unittest import mock

import pytest

from imagebackend import exception
from imagebackend.sources.glance import client as glance_client
from imagebackend.sources.glance import errors as glance_errors
from imagebackend.sources.glance import upload as glance_upload

IMAGE_ID = "6f1e0c39-3c0b-4e55-8d4e-1a2b3c4d5e6f"
DATA = bytes(range(256)) * 4096       # 1 MiB: several pieces
GLANCE = "http://glance.test:9292"


class Runner:
    """Stands in for GlanceSource._call: one attempt with endpoint None,
    records actions and their retry flags.
    """

    def __init__(self):
        self.actions = []

    def __call__(self, image_id, action, func, retry_server_errors=True,
                 retry=True):
        self.actions.append((image_id, action, retry_server_errors, retry))
        return func(None)


@pytest.fixture
def call():
    return Runner()


@pytest.fixture
def http():
    client = mock.create_autospec(glance_client.Client, instance=True)
    client.send_json.return_value = {"id": IMAGE_ID, "status": "queued"}
    client.get_json.return_value = {
        "id": IMAGE_ID, "status": "active", "size": len(DATA),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest()}
    client.sent = []

    def put(endpoint, path, body):
        assert path == "/v2/images/%s/file" % IMAGE_ID
        assert len(body) == len(DATA)
        client.sent.append(b"".join(body))
    client.put_file.side_effect = put
    return client


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "disk.raw"
    p.write_bytes(DATA)
    return str(p)


def test_upload_creates_streams_and_returns_the_id(call, http, path):
    progress = []

    image_id = glance_upload.upload(call, http, "guest", path, "raw",
                                    progress=lambda *a: progress.append(a))

    assert image_id == IMAGE_ID
    http.send_json.assert_called_once_with(
        None, "POST", "/v2/images",
        {"name": "guest", "disk_format": "raw", "container_format": "bare"},
        success=(200, 201))
    assert http.sent == [DATA]
    # Streamed in pieces, never read whole.
    assert len(progress) == len(DATA) // glance_client.FileBody.piece_size
    assert {(stage, total) for stage, _done, total in progress} == {
        ("upload", len(DATA))}
    assert progress[-1] == ("upload", len(DATA), len(DATA))
    http.delete.assert_not_called()


def test_create_is_not_retried_on_server_errors_and_data_never(
        call, http, path):
    glance_upload.upload(call, http, "guest", path, "raw",
                         container_format="ovf")

    flags = {action: (server, retry) for _id, action, server, retry
             in call.actions}
    assert flags["create the image"] == (False, True)
    assert flags["upload the image data"][1] is False


def test_failed_upload_is_deleted_in_one_attempt(call, http, path):
    http.put_file.side_effect = exception.ImageSourceError(
        image_id=IMAGE_ID, reason="upload broke")

    with pytest.raises(exception.ImageSourceError):
        glance_upload.upload(call, http, "guest", path, "raw")

    flags = {action: retry for _id, action, _server, retry in call.actions}
    assert flags["delete the failed upload"] is False


def test_a_resent_body_starts_again(call, http, path):
    progress = []

    def put(endpoint, url, body):
        next(iter(body))           # a first attempt, abandoned
        http.sent.append(b"".join(body))
    http.put_file.side_effect = put

    glance_upload.upload(call, http, "guest", path, "raw",
                         progress=lambda *a: progress.append(a))

    assert http.sent == [DATA]
    assert progress[-1] == ("upload", len(DATA), len(DATA))


@pytest.mark.parametrize("record,words", [
    ({"status": "queued"}, "queued"),
    ({"size": 1}, "1 bytes"),
    ({"os_hash_value": "0" * 128}, "sha512"),
    ({"size": "1048576"}, "size"),
    ({"size": True}, "size"),
    ({"status": None}, "status"),
    ({"os_hash_algo": 5}, "os_hash_algo"),
])
def test_glance_record_not_matching_what_was_sent(call, http, path, record,
                                                  words):
    http.get_json.return_value.update(record)

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert words in str(err.value)
    assert IMAGE_ID in str(err.value)
    http.delete.assert_called_once_with(None, "/v2/images/" + IMAGE_ID)


def test_other_hash_algorithm_is_not_compared(call, http, path):
    # The sha512 of what was sent cannot be compared with a sha256: the
    # upload stands (nothing deleted), its bytes being the file's.
    http.get_json.return_value.update(os_hash_algo="sha256",
                                      os_hash_value="whatever")

    assert glance_upload.upload(call, http, "guest", path, "raw") == IMAGE_ID
    assert http.sent == [DATA]
    http.delete.assert_not_called()
    # The same value recorded as a sha512 is compared, and refused.
    http.get_json.return_value.update(os_hash_algo="sha512")
    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")
    assert "sha512 differs from the bytes sent" in str(err.value)
    http.delete.assert_called_once_with(None, "/v2/images/" + IMAGE_ID)


def test_failed_upload_deletes_the_image(call, http, path):
    http.put_file.side_effect = exception.ImageSourceUnavailable(
        image_id=IMAGE_ID, source="glance", attempts=1, reason="down")

    with pytest.raises(exception.ImageSourceUnavailable):
        glance_upload.upload(call, http, "guest", path, "raw")

    http.delete.assert_called_once_with(None, "/v2/images/" + IMAGE_ID)


def test_failed_delete_does_not_hide_the_upload_error(call, http, path):
    http.put_file.side_effect = exception.ImageSourceError(
        image_id=IMAGE_ID, reason="upload broke")
    http.delete.side_effect = exception.ImageSourceError(
        image_id=IMAGE_ID, reason="delete broke")

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert "upload broke" in str(err.value)


def test_interrupted_upload_deletes_the_image(call, http, path):
    http.put_file.side_effect = KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        glance_upload.upload(call, http, "guest", path, "raw")

    http.delete.assert_called_once_with(None, "/v2/images/" + IMAGE_ID)


def test_error_status_names_the_url_asked(call, http, path):
    http.put_file.side_effect = glance_errors.HTTPStatus(
        413, "too big", GLANCE + "/v2/images/%s/file" % IMAGE_ID)

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert "HTTP 413: too big" in str(err.value)
    assert GLANCE + "/v2/images/" in str(err.value)
    http.delete.assert_called_once()


def test_escaped_server_text_is_not_escaped_twice(call, http, path):
    http.send_json.side_effect = glance_errors.BadResponse(
        glance_errors.printable("bad\x1b[2J\nanswer"), GLANCE)

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert "bad\\x1b[2J\\nanswer" in str(err.value)


def test_failures_worth_another_attempt_are_left_to_the_source(
        call, http, path):
    http.send_json.side_effect = glance_errors.Unreachable("down", GLANCE)

    with pytest.raises(glance_errors.Unreachable):
        glance_upload.upload(call, http, "guest", path, "raw")


def test_credential_errors_are_left_for_the_source(call, http, path):
    http.send_json.side_effect = glance_errors.HTTPStatus(
        401, "no", GLANCE + "/v2/images")

    with pytest.raises(glance_errors.HTTPStatus):
        glance_upload.upload(call, http, "guest", path, "raw")


def test_file_read_error_is_named(call, http, path):
    def put(endpoint, url, body):
        raise glance_client.FileReadError(OSError(5, "Input/output error"))
    http.put_file.side_effect = put

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert path in str(err.value) and "Input/output" in str(err.value)
    http.delete.assert_called_once()


def test_missing_file_creates_nothing(call, http, tmp_path):
    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", str(tmp_path / "nope"),
                             "raw")

    assert "nope" in str(err.value)
    http.send_json.assert_not_called()


@pytest.mark.parametrize("answer", [
    {"id": IMAGE_ID + "\n"}, {"id": "../../v2/schemas"}, {"id": 7}, {}])
def test_new_image_id_that_is_not_a_uuid_is_refused(call, http, path,
                                                    answer):
    http.send_json.return_value = answer

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert "\n" not in str(err.value)
    http.put_file.assert_not_called()


def test_status_of_the_upload_is_escaped_once(call, http, path):
    http.get_json.return_value.update(
        status="killed\x1b[2J\nforged" + "z" * 5000)

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "guest", path, "raw")

    assert re.search(r"killed\\x1b\[2J\\nforged", str(err.value))
    assert "\x1b" not in str(err.value)
    assert len(str(err.value)) < 600


def test_name_is_escaped_in_messages(call, http, path):
    http.send_json.return_value = {"id": "x"}

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, http, "gu\x1best", path, "raw")

    assert "(new image 'gu\\x1best')" in str(err.value)
