"""Uploading a file to Glance, with glanceclient's image controller
autospecced and the source's request runner reduced to one attempt.
"""

import hashlib
import re
from unittest import mock

from glanceclient.v2 import images as gc_images
import pytest

from imagebackend import exception
from imagebackend.sources import glance_upload

IMAGE_ID = "6f1e0c39-3c0b-4e55-8d4e-1a2b3c4d5e6f"
DATA = bytes(range(256)) * 64


class Runner:
    """Stands in for GlanceSource._call: one attempt, records actions."""

    def __init__(self):
        self.client = mock.Mock(spec=["images"])
        self.client.images = mock.create_autospec(gc_images.Controller,
                                                  instance=True)
        self.actions = []

    def __call__(self, image_id, action, func, retry_server_errors=True):
        self.actions.append((image_id, action, retry_server_errors))
        return func(self.client)


@pytest.fixture
def call():
    runner = Runner()
    runner.client.images.create.return_value = {"id": IMAGE_ID}
    runner.client.images.get.return_value = {
        "id": IMAGE_ID, "status": "active", "size": len(DATA),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest()}
    return runner


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "disk.raw"
    p.write_bytes(DATA)
    return str(p)


def read_all(piece=1000):
    """An images.upload side effect that reads the body like glanceclient
    (in pieces) and keeps it.
    """
    sent = []

    def upload(image_id, reader, image_size=None):
        assert image_id == IMAGE_ID
        assert image_size == len(DATA)
        while True:
            chunk = reader.read(piece)
            if not chunk:
                break
            sent.append(chunk)
    return upload, sent


def test_upload_creates_sends_and_returns_the_id(call, path):
    upload, sent = read_all()
    call.client.images.upload.side_effect = upload
    progress = []

    image_id = glance_upload.upload(call, "guest", path, "raw",
                                    progress=lambda *a: progress.append(a))

    assert image_id == IMAGE_ID
    call.client.images.create.assert_called_once_with(
        name="guest", disk_format="raw", container_format="bare")
    assert b"".join(sent) == DATA
    assert progress[-1] == (len(DATA), len(DATA))
    assert [done for done, _ in progress] == sorted(
        done for done, _ in progress)
    call.client.images.delete.assert_not_called()


def test_create_and_upload_do_not_retry_server_errors(call, path):
    call.client.images.upload.side_effect = read_all()[0]

    glance_upload.upload(call, "guest", path, "raw", container_format="ovf")

    retry = {action: flag for _id, action, flag in call.actions}
    assert retry["create the image"] is False
    assert retry["upload the image data"] is False
    call.client.images.create.assert_called_once_with(
        name="guest", disk_format="raw", container_format="ovf")


@pytest.mark.parametrize("record,words", [
    ({"status": "queued"}, "queued"),
    ({"size": 1}, "1 bytes"),
    ({"os_hash_value": "0" * 128}, "sha512"),
])
def test_glance_record_not_matching_what_was_sent(call, path, record,
                                                  words):
    call.client.images.upload.side_effect = read_all()[0]
    call.client.images.get.return_value.update(record)

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, "guest", path, "raw")

    assert words in str(err.value)
    assert IMAGE_ID in str(err.value)
    call.client.images.delete.assert_called_once_with(IMAGE_ID)


def test_other_hash_algorithm_is_not_compared(call, path):
    call.client.images.upload.side_effect = read_all()[0]
    call.client.images.get.return_value.update(
        os_hash_algo="sha256", os_hash_value="whatever")

    assert glance_upload.upload(call, "guest", path, "raw") == IMAGE_ID


def test_failed_upload_deletes_the_image(call, path):
    error = exception.ImageSourceUnavailable(
        image_id=IMAGE_ID, source="glance", attempts=1, reason="down")
    call.client.images.upload.side_effect = error

    with pytest.raises(exception.ImageSourceUnavailable):
        glance_upload.upload(call, "guest", path, "raw")

    call.client.images.delete.assert_called_once_with(IMAGE_ID)


def test_failed_delete_does_not_hide_the_upload_error(call, path):
    call.client.images.upload.side_effect = exception.ImageSourceError(
        image_id=IMAGE_ID, reason="upload broke")
    call.client.images.delete.side_effect = exception.ImageSourceError(
        image_id=IMAGE_ID, reason="delete broke")

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, "guest", path, "raw")

    assert "upload broke" in str(err.value)


def test_interrupted_upload_deletes_the_image(call, path):
    call.client.images.upload.side_effect = KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        glance_upload.upload(call, "guest", path, "raw")

    call.client.images.delete.assert_called_once_with(IMAGE_ID)


def test_missing_file_creates_nothing(call, tmp_path):
    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, "guest", str(tmp_path / "nope"), "raw")

    assert "nope" in str(err.value)
    call.client.images.create.assert_not_called()


def test_format_refused_by_glanceclient_schema(call, path):
    call.client.images.create.side_effect = TypeError(
        "Unable to set 'disk_format' to 'qcow3'. Reason: not one of ...\n"
        "Failed validating 'enum'")

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, "guest", path, "qcow3")

    assert "qcow3" in str(err.value)
    assert "Failed validating" not in str(err.value)
    call.client.images.upload.assert_not_called()


@pytest.mark.parametrize("answer", [
    {"id": IMAGE_ID + "\n"}, {"id": "../../v2/schemas"}, {"id": 7}, {},
    "not an object"])
def test_new_image_id_that_is_not_a_uuid_is_refused(call, path, answer):
    call.client.images.create.return_value = answer

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, "guest", path, "raw")

    assert "\n" not in str(err.value)
    call.client.images.upload.assert_not_called()


def test_status_of_the_upload_is_escaped(call, path):
    call.client.images.upload.side_effect = read_all()[0]
    call.client.images.get.return_value.update(
        status="killed\x1b[2J\nforged" + "z" * 5000)

    with pytest.raises(exception.ImageSourceError) as err:
        glance_upload.upload(call, "guest", path, "raw")

    assert re.search(r"killed\\+x1b\[2J\\+nforged", str(err.value))
    assert "\x1b" not in str(err.value)
    assert len(str(err.value)) < 600
