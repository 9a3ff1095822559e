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

"""A hostile or broken Glance cannot make the library use unbounded
memory, bytes or time, leak its token, or cache what is not the image.

The Glance here is :class:`hostile_glance.HostileGlance` on 127.0.0.1;
each test chooses how it misbehaves.  Disks are made by the real pipeline
(``create_image`` of a backend, or ``imagebackend disk create`` in a child
process when its peak memory is measured) with a real ``_base`` on disk.
"""

import gzip
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import exception
from imagebackend import sources
from tests.functional.fixtures import env as fenv
from tests.functional.fixtures import hostile_glance as hg

MiB = fenv.MiB
GiB = fenv.GiB
#: the benchmark's bound on a download's peak memory.
RSS_LIMIT_KIB = 100 * 1024

BLOCK = random.Random(17).randbytes(MiB)
#: seconds a stalling server holds a request (or trickles a body over); a
#: call that gives up on its own timeout is done in half of that, however
#: loaded the machine, and one that waits for the server is not
STALL = 60


@pytest.fixture
def server():
    with hg.HostileGlance() as srv:
        yield srv


@pytest.fixture
def other_origin():
    """A second server on another port: another origin."""
    with hg.HostileGlance() as srv:
        yield srv


@pytest.fixture
def dep(tmp_path, server):
    return server.deployment(str(tmp_path))


@pytest.fixture(scope="module")
def big_image():
    """A 256 MiB image: (size, md5, sha512)."""
    return hg.digests(hg.repeat(BLOCK, 256 * MiB))


def data_route(total, content_type="application/octet-stream",
               length=True, headers=(), pace=0.0, block=BLOCK):
    """A data route sending ``total`` bytes of ``block`` repeated."""
    def route(answer):
        sent = list(headers)
        if content_type is not None:
            sent.append(("Content-Type", content_type))
        if length:
            sent.append(("Content-Length", str(total)))
        answer.start(200, sent)
        answer.body(hg.repeat(block, total), pace)
    return route


def image_for(server, total, block=BLOCK, **kwargs):
    """An image whose record matches ``total`` bytes of ``block``."""
    size, md5, sha512 = hg.digests(hg.repeat(block, total))
    return server.image(data=data_route(total, block=block, **kwargs),
                        size=size, checksum=md5, os_hash_algo="sha512",
                        os_hash_value=sha512)


def create(dep, image_id, size=GiB):
    """Make a raw disk with the real pipeline, in this process."""
    conf = dep.conf()
    backend = backends_base.load(conf, "raw",
                                 source=sources.load(conf, "glance"))
    target = os.path.join(dep.instances, "vm", "disk")
    return backend.create_image(image_id, target, size)


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1].  The command is
# started from this small process, not from pytest: a child's ru_maxrss
# starts at the RSS of the process it was forked from (and survives exec).
_MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def cli_measured(dep, *argv):
    """Run the command line in a child; returns ``(exit code, stdout,
    stderr, peak RSS in KiB)`` of that child.
    """
    out = os.path.join(dep.root, "cli.out")
    err = os.path.join(dep.root, "cli.err")
    rss = os.path.join(dep.root, "cli.rss")
    with open(out, "w") as fout, open(err, "w") as ferr:
        code = subprocess.call(
            [sys.executable, "-c", _MEASURE, rss, sys.executable, "-m",
             "imagebackend.cmd.main", "--config-file", dep.config_file]
            + list(argv), env=dep.env(), stdout=fout, stderr=ferr)
    with open(out) as fout, open(err) as ferr, open(rss) as frss:
        return code, fout.read(), ferr.read(), int(frss.read())


class ScratchWatcher:
    """Samples the size of every file in ``_base`` while a test runs and
    keeps the largest seen.
    """

    def __init__(self, base_dir):
        self.base_dir = base_dir
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                for entry in os.scandir(self.base_dir):
                    if entry.is_file(follow_symlinks=False):
                        self.largest = max(self.largest,
                                           entry.stat().st_size)
            except FileNotFoundError:
                pass
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


def assert_clean(message):
    """A one-line message with no control characters, of bounded length."""
    assert len(message) < 3000
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in message), (
        repr(message[:300]))


# --- item 2: memory -------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "application/octet-stream; charset=binary", None, "binary/octet-stream",
    "application/json"])
def test_data_is_streamed_whatever_the_content_type(server, dep, big_image,
                                                    content_type):
    size, md5, sha512 = big_image
    image_id = server.image(
        data=data_route(size, content_type=content_type), size=size,
        checksum=md5, os_hash_algo="sha512", os_hash_value=sha512)
    target = os.path.join(dep.instances, "disk")

    code, _out, err, rss = cli_measured(dep, "disk", "create", image_id,
                                        target, "--size", "1G",
                                        "--backend", "raw")

    assert code == 0, err
    assert rss < RSS_LIMIT_KIB, "peak RSS %d KiB" % rss
    assert os.path.getsize(target) == GiB
    with open(target, "rb") as f:
        assert hg.digests(iter(lambda: f.read(
            min(MiB, size - f.tell())) or None, None))[2] == sha512
    assert len(dep.base_listing()) == 2    # the base and its record
    assert not [n for n in dep.base_listing() if n.endswith(".part")]


def test_huge_record_is_refused_in_bounded_memory(server, dep):
    def meta(answer):
        answer.start(200, [("Content-Type", "application/json")])
        answer.body([b'{"id": "x", "name": "'] + list(
            hg.repeat(b"a" * MiB, 300 * MiB)) + [b'"}'])
    image_id = server.image(meta=meta)
    target = os.path.join(dep.instances, "disk")

    code, _out, err, rss = cli_measured(dep, "disk", "create", image_id,
                                        target, "--size", "1G")

    assert code == 1
    assert rss < RSS_LIMIT_KIB, "peak RSS %d KiB" % rss
    assert image_id in err
    assert "record" in err and "1048576 bytes" in err
    assert not os.path.exists(target)
    assert dep.base_listing() == []


def test_huge_error_body_is_bounded_and_escaped(server, dep):
    def meta(answer):
        answer.start(500, [("Content-Type", "text/html")])
        answer.body([b"<h1>oops\x1b[2J\nFORGED LINE\r\n"] + list(
            hg.repeat(b"x" * MiB, 8 * MiB)))
    image_id = server.image(meta=meta)

    with pytest.raises(exception.ImageSourceUnavailable) as err:
        create(dep, image_id)

    message = str(err.value)
    assert image_id in message
    assert "HTTP 500" in message
    assert "\\x1b[2J\\nFORGED LINE" in message     # escaped once
    assert_clean(message)
    assert dep.base_listing() == []


# --- item 3: bytes --------------------------------------------------------

def test_identity_encoding_is_asked_and_compression_refused(server, dep):
    body = gzip.compress(bytes(64 * MiB))
    size, md5, sha512 = hg.digests([body])
    image_id = server.image(
        data=data_route(size, block=body, headers=[
            ("Content-Encoding", "gzip")]),
        size=size, checksum=md5, os_hash_algo="sha512",
        os_hash_value=sha512)

    with ScratchWatcher(dep.base_dir) as scratch:
        with pytest.raises(exception.ImageSourceError) as err:
            create(dep, image_id)

    assert scratch.largest <= size
    data_requests = [r for r in server.requests if r.path.endswith("/file")]
    assert data_requests[0].headers["Accept-Encoding"] == "identity"
    assert "compressed" in str(err.value) and "gzip" in str(err.value)
    assert dep.base_listing() == []


@pytest.mark.parametrize("length", [True, False])
def test_body_longer_than_recorded_is_cut_at_the_size(server, dep, length):
    recorded = 3 * MiB
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, recorded))
    # The body is much longer than the record says (with or without a
    # Content-Length that admits it).
    route = data_route(256 * MiB, length=length)
    image_id = server.image(data=route, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with ScratchWatcher(dep.base_dir) as scratch:
        with pytest.raises(exception.ImageDownloadError) as err:
            create(dep, image_id)

    assert scratch.largest <= recorded
    # The client stopped reading: the server could not push it all.
    assert server.body_bytes_sent < 64 * MiB
    assert image_id in str(err.value)
    assert "%d bytes" % recorded in str(err.value)
    assert dep.base_listing() == []


def test_no_recorded_size_stops_at_max_download_size(server, dep):
    dep.write_config(glance={"max_download_size": 2 * MiB,
                             "allow_unverified_images": "true"})
    image_id = server.image(data=data_route(256 * MiB, length=False),
                            size=None)

    with ScratchWatcher(dep.base_dir) as scratch:
        with pytest.raises(exception.ImageDownloadError) as err:
            create(dep, image_id)

    assert scratch.largest <= 2 * MiB
    assert server.body_bytes_sent < 64 * MiB
    assert "max_download_size" in str(err.value)
    assert dep.base_listing() == []


def test_recorded_size_above_max_download_size_is_refused(server, dep):
    dep.write_config(glance={"max_download_size": MiB})
    image_id = image_for(server, 2 * MiB)

    with pytest.raises(exception.ImageUnsupported) as err:
        create(dep, image_id)

    assert "max_download_size" in str(err.value)
    assert not [r for r in server.requests if r.path.endswith("/file")]


def test_zero_byte_image_is_refused(server, dep):
    size, md5, sha512 = hg.digests([b""])
    image_id = server.image(data=data_route(0), size=0, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with pytest.raises(exception.ImageUnsupported) as err:
        create(dep, image_id)

    assert "0 bytes" in str(err.value)
    assert dep.base_listing() == []


def test_empty_body_without_recorded_size_is_refused(server, dep):
    dep.write_config(glance={"allow_unverified_images": "true"})
    image_id = server.image(data=data_route(0, length=False), size=None)

    with pytest.raises(exception.ImageDownloadError) as err:
        create(dep, image_id)

    assert "0 bytes" in str(err.value)
    assert dep.base_listing() == []


# --- item 4: time ---------------------------------------------------------

def test_stalled_download_fails_after_the_stall_timeout(server, dep):
    dep.write_config(glance={"stall_timeout": 1})
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, 8 * MiB))

    def stalls(answer):
        answer.start(200, [("Content-Length", str(size))])
        answer.body(hg.repeat(BLOCK, MiB))
        answer.stall(STALL)
    image_id = server.image(data=stalls, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    start = time.monotonic()
    with pytest.raises(exception.ImageDownloadError) as err:
        create(dep, image_id)

    assert time.monotonic() - start < STALL / 2
    message = str(err.value)
    assert image_id in message and "stall_timeout" in message
    assert server.url in message
    assert dep.base_listing() == []


def test_trickling_download_fails_below_the_minimum_rate(server, dep):
    dep.write_config(glance={"stall_timeout": 10, "min_download_rate": 1024,
                             "download_rate_window": 2})
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, 8 * MiB))

    def trickles(answer):
        answer.start(200, [("Content-Length", str(size))])
        answer.body(hg.repeat(b"x", STALL), pace=1.0)    # 1 byte/s
    image_id = server.image(data=trickles, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    start = time.monotonic()
    with pytest.raises(exception.ImageDownloadError) as err:
        create(dep, image_id)

    assert time.monotonic() - start < STALL / 2
    message = str(err.value)
    assert image_id in message and "min_download_rate" in message
    assert dep.base_listing() == []


# --- item 6: redirects ----------------------------------------------------

def test_token_is_not_sent_to_another_origin(server, other_origin, dep):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, 4 * MiB))
    elsewhere = "/elsewhere/data"
    other_origin.routes[elsewhere] = data_route(size)

    def redirect(answer):
        answer.start(302, [("Location", other_origin.url + elsewhere),
                           ("Content-Length", "0")])
    image_id = server.image(data=redirect, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    disk = create(dep, image_id)

    assert disk.cache_hit is False
    assert [r.path for r in other_origin.requests] == [elsewhere]
    assert other_origin.tokens_received() == []
    # Glance itself did get the token.
    assert hg.TOKEN in server.tokens_received()


def test_redirect_loop_is_refused_and_nothing_cached(server, dep):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, MiB))

    def loop(answer):
        answer.start(302, [("Location", answer.path),
                           ("Content-Length", "0")])
    image_id = server.image(data=loop, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with pytest.raises(exception.ImageSourceError) as err:
        create(dep, image_id)

    assert "redirected the request more than 5 times" in str(err.value)
    assert len([r for r in server.requests
                if r.path.endswith("/file")]) == 6
    assert dep.base_listing() == []


def test_redirect_loop_of_an_unverified_image_caches_nothing(server, dep):
    # No size, no hash: only the status code tells a 302 from the image.
    dep.write_config(glance={"allow_unverified_images": "true"})

    def loop(answer):
        answer.start(302, [("Location", answer.path),
                           ("Content-Length", "0")])
    image_id = server.image(data=loop, size=None)

    with pytest.raises(exception.ImageSourceError):
        create(dep, image_id)

    assert dep.base_listing() == []
    assert not os.path.exists(os.path.join(dep.instances, "vm", "disk"))


def test_redirect_to_a_file_url_is_named(server, dep):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, MiB))

    def to_file(answer):
        answer.start(302, [("Location", "file:///etc/passwd"),
                           ("Content-Length", "0")])
    image_id = server.image(data=to_file, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with pytest.raises(exception.ImageSourceError) as err:
        create(dep, image_id)

    message = str(err.value)
    assert "file:///etc/passwd" in message and "http(s)" in message
    assert "Keystone" not in message
    assert dep.base_listing() == []


def test_error_status_after_redirect_is_not_cached(server, other_origin,
                                                   dep):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, MiB))
    other_origin.routes["/gone"] = lambda answer: answer.json(
        {"message": "gone"}, status=410)

    def redirect(answer):
        answer.start(307, [("Location", other_origin.url + "/gone"),
                           ("Content-Length", "0")])
    image_id = server.image(data=redirect, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with pytest.raises(exception.ImageSourceError) as err:
        create(dep, image_id)

    assert "HTTP 410" in str(err.value)
    assert dep.base_listing() == []


@pytest.mark.parametrize("status", [203, 206])
def test_a_success_status_other_than_200_is_not_the_image(server, dep,
                                                          status):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, MiB))

    def partial(answer):
        # The whole image, with the right length: only the status says
        # it is not the image.
        answer.start(status, [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(size))])
        answer.body(hg.repeat(BLOCK, size))
    image_id = server.image(data=partial, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with pytest.raises(exception.ImageSourceError) as err:
        create(dep, image_id)

    assert "HTTP %d" % status in str(err.value)
    assert dep.base_listing() == []
    assert not os.path.exists(os.path.join(dep.instances, "vm", "disk"))


# --- item 7: verification -------------------------------------------------

@pytest.mark.parametrize("fields,named", [
    ({"os_hash_algo": "whirl-99", "os_hash_value": "ab" * 32,
      "checksum": None}, "whirl-99"),
    ({"os_hash_algo": None, "os_hash_value": None, "checksum": None},
     "neither os_hash_value nor checksum"),
])
def test_unverifiable_image_is_refused(server, dep, fields, named):
    size = MiB
    image_id = server.image(data=data_route(size), size=size, **fields)

    with pytest.raises(exception.ImageUnsupported) as err:
        create(dep, image_id)

    message = str(err.value)
    assert named in message and "allow_unverified_images" in message
    assert not [r for r in server.requests if r.path.endswith("/file")]
    assert dep.base_listing() == []


def test_unverifiable_image_is_used_when_allowed(server, dep):
    dep.write_config(glance={"allow_unverified_images": "true"})
    size, _md5, sha512 = hg.digests(hg.repeat(BLOCK, MiB))
    image_id = server.image(data=data_route(size), size=size,
                            os_hash_algo="whirl-99", os_hash_value="ab" * 32,
                            checksum=None)

    disk = create(dep, image_id)

    assert disk.cache_hit is False
    # The disk holds exactly the bytes served, grown to the size asked.
    assert os.path.getsize(disk.path) == GiB
    assert _sha512_of(disk.path, size) == sha512
    assert [r.path for r in server.requests
            if r.path.endswith("/file")] == ["/v2/images/%s/file" % image_id]


def _sha512_of(path, size):
    """The sha512 of the first ``size`` bytes of file ``path``."""
    with open(path, "rb") as f:
        return hg.digests(iter(lambda: f.read(
            min(MiB, size - f.tell())) or None, None))[2]


def test_md5_only_image_is_verified_against_it(server, dep):
    size, md5, _sha512 = hg.digests(hg.repeat(BLOCK, MiB))
    image_id = server.image(data=data_route(size), size=size,
                            checksum="0" * 32)
    with pytest.raises(exception.ImageChecksumMismatch):
        create(dep, image_id)
    assert dep.base_listing() == []

    good = server.image(data=data_route(size), size=size, checksum=md5)
    disk = create(dep, good)
    assert disk.cache_hit is False
    assert _sha512_of(disk.path, size) == _sha512


# --- items 8 and 9: text and errors ------------------------------------

def test_server_text_in_errors_is_escaped_and_bounded(server, dep):
    status = "queued\x1b[31m\nERROR forged line " + "z" * 10000
    image_id = server.image(data=data_route(MiB), size=MiB, status=status)

    with pytest.raises(exception.ImageNotActive) as err:
        create(dep, image_id)

    message = str(err.value)
    assert re.search(r"queued\\+x1b\[31m\\+nERROR forged line", message)
    assert_clean(message)


def test_connection_broken_mid_body_is_a_download_failure(server, dep):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, 16 * MiB))

    def breaks(answer):
        answer.start(200, [("Content-Length", str(size))])
        answer.body(hg.repeat(BLOCK, 5 * MiB))
        answer.reset()
    image_id = server.image(data=breaks, size=size, checksum=md5,
                            os_hash_algo="sha512", os_hash_value=sha512)

    with pytest.raises(exception.ImageDownloadError) as err:
        create(dep, image_id)

    message = str(err.value)
    assert image_id in message and server.url in message
    assert "broke off" in message
    assert "writing" not in message
    assert message.count("download failed") == 1
    assert_clean(message)
    assert dep.base_listing() == []


@pytest.mark.parametrize("fields,key", [
    ({"size": "1048576"}, "size"),
    ({"status": ["active"]}, "status"),
    ({"checksum": 5}, "checksum"),
    ({"os_hash_value": {"a": 1}}, "os_hash_value"),
    ({"virtual_size": -1}, "virtual_size"),
    ({"size": True}, "size"),
    ({"disk_format": 7}, "disk_format"),
])
def test_wrongly_typed_record_is_a_library_error(server, dep, fields, key):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, MiB))
    values = dict(size=size, checksum=md5, os_hash_algo="sha512",
                  os_hash_value=sha512)
    values.update(fields)
    image_id = server.image(data=data_route(size), **values)

    with pytest.raises(exception.ImageSourceError) as err:
        create(dep, image_id)

    assert key in str(err.value) and image_id in str(err.value)
    assert_clean(str(err.value))
    assert dep.base_listing() == []


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json\x1b[2J", b"",
                                  b"[" * 200000])
def test_record_that_is_not_a_json_object_is_refused(server, dep, body):
    def meta(answer):
        answer.start(200, [("Content-Type", "application/json"),
                           ("Content-Length", str(len(body)))])
        answer.body(body)
    image_id = server.image(meta=meta)

    with pytest.raises(exception.ImageSourceError) as err:
        create(dep, image_id)

    assert image_id in str(err.value)
    assert_clean(str(err.value))


def test_image_id_followed_by_a_newline_is_refused(server, dep):
    image_id = image_for(server, MiB)

    with pytest.raises(exception.InvalidImageId):
        create(dep, image_id + "\n")

    assert not [r for r in server.requests if r.path.startswith(
        "/v2/images/")]


# --- uploads (disk extract --upload, GlanceSource.upload) ---------------

UPLOAD_NAME = "up\x1b[2Jload"


def upload_file(dep, size, name="upload.raw"):
    """A file of ``size`` bytes of :data:`BLOCK`, and its sha512."""
    path = os.path.join(dep.root, name)
    with open(path, "wb") as f:
        for piece in hg.repeat(BLOCK, size):
            f.write(piece)
    return path, hg.digests(hg.repeat(BLOCK, size))[2]


def upload(dep, path, name=UPLOAD_NAME):
    conf = dep.conf()
    return sources.load(conf, "glance").upload(name, path, "raw")


def huge_json(answer, status=200):
    answer.start(status, [("Content-Type", "application/json")])
    answer.body([b'{"id": "x", "name": "'] + list(
        hg.repeat(b"a" * MiB, 300 * MiB)) + [b'"}'])


def huge_error(answer, status=500):
    answer.start(status, [("Content-Type", "text/html")])
    answer.body([b"<h1>oops\x1b[2J\nFORGED LINE\r\n"] + list(
        hg.repeat(b"x" * MiB, 8 * MiB)))


def receive_then(reply):
    """An upload route that reads the whole body, then answers
    ``reply(answer)``.
    """
    def route(answer):
        answer.receive()
        reply(answer)
    return route


def cli_upload(dep, disk_size=4 * MiB):
    """``disk extract DISK OUTPUT -O raw --upload NAME`` (DISK a real
    qcow2 of ``disk_size`` bytes) in a child whose peak RSS is measured;
    returns what :func:`cli_measured` does.
    """
    disk = fenv.make_qcow2(os.path.join(dep.instances, "vm-disk"),
                           disk_size)
    output = os.path.join(dep.root, "extracted.raw")
    return cli_measured(dep, "disk", "extract", disk, output, "-O", "raw",
                        "--input-format", "qcow2",
                        "--upload", "cli-upload")


#: how the start of :func:`huge_error`'s body appears in a message.
SHOWN_ERROR = "<h1>oops\\x1b[2J\\nFORGED LINE\\r\\nxxx"


@pytest.mark.parametrize("step,route,words", [
    ("create", huge_json, "1048576 bytes"),
    ("create", huge_error, "HTTP 500: " + SHOWN_ERROR),
    ("upload", receive_then(huge_error), "HTTP 500: " + SHOWN_ERROR),
    ("upload", receive_then(lambda answer: huge_error(answer, status=413)),
     "HTTP 413: " + SHOWN_ERROR),
])
def test_upload_answers_are_read_in_bounded_memory(server, dep, step, route,
                                                   words):
    image_id = server.upload_target(**{step: route})

    code, _out, err, rss = cli_upload(dep)

    assert code == 1, err
    assert rss < RSS_LIMIT_KIB, "peak RSS %d KiB" % rss
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert words in line and server.url in line
    assert_clean(line)
    if step == "create":
        assert "cli-upload" in line
        assert not server.requests_of("PUT")
    else:
        assert image_id in line
        assert server.deleted == [image_id]


def test_upload_of_a_big_file_is_streamed_from_disk(server, dep):
    size = 192 * MiB
    image_id = server.upload_target()

    code, out, err, rss = cli_upload(dep, disk_size=size)

    assert code == 0, err
    assert rss < RSS_LIMIT_KIB, "peak RSS %d KiB" % rss
    assert image_id in out
    assert server.stored[image_id][0] == size
    assert server.deleted == []


def test_upload_answer_with_a_huge_body_is_not_read_whole(server, dep):
    image_id = str(uuid.uuid4())

    def upload_route(answer):
        server.stored[image_id] = answer.receive()
        huge_json(answer)
    server.upload_target(upload=upload_route, image_id=image_id)

    code, out, err, rss = cli_upload(dep)

    assert code == 0, err
    assert rss < RSS_LIMIT_KIB, "peak RSS %d KiB" % rss
    assert image_id in out


@pytest.mark.parametrize("status", [302, 307, 308])
def test_redirected_create_sends_nothing_elsewhere(server, other_origin, dep,
                                                   status):
    path, _sha512 = upload_file(dep, MiB)
    other_origin.upload_target()

    def redirect(answer):
        answer.start(status, [("Location", other_origin.url + "/v2/images"),
                              ("Content-Length", "0")])
    server.upload_target(create=redirect)

    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    assert other_origin.tokens_received() == []
    assert other_origin.requests == []
    message = str(err.value)
    assert "redirect" in message and server.url in message
    assert other_origin.url in message
    assert "up\\x1b[2Jload" in message
    assert_clean(message)
    assert not server.requests_of("PUT")


@pytest.mark.parametrize("elsewhere", [True, False])
def test_redirected_upload_is_an_error_and_the_image_deleted(
        server, other_origin, dep, elsewhere):
    path, _sha512 = upload_file(dep, 4 * MiB)
    target = other_origin if elsewhere else server
    target.routes[("PUT", "/moved")] = receive_then(
        lambda answer: answer.start(204))

    def redirect(answer):
        answer.start(307, [("Location", target.url + "/moved"),
                           ("Content-Length", "0")])
    image_id = server.upload_target(upload=redirect)

    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    assert other_origin.tokens_received() == []
    assert other_origin.requests == []
    message = str(err.value)
    assert image_id in message and server.url in message
    assert "redirect" in message
    assert_clean(message)
    assert [r.path for r in server.requests_of("PUT")] == [
        "/v2/images/%s/file" % image_id]
    assert server.deleted == [image_id]


@pytest.mark.parametrize("answer_value", [
    {"id": "../../../v2/images/other"}, {"id": 7}, {"id": ["x"]},
    {"id": str(uuid.uuid4()) + "\n"}, [1, 2], "text", {}])
def test_created_image_id_is_checked_before_use(server, dep, answer_value):
    path, _sha512 = upload_file(dep, MiB)
    server.upload_target(
        create=lambda answer: answer.json(answer_value, status=201))

    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    assert "up\\x1b[2Jload" in str(err.value)
    assert_clean(str(err.value))
    assert [r.method for r in server.requests] == ["POST"]


@pytest.mark.parametrize("fields,key", [
    ({"status": ["active"]}, "status"),
    ({"size": "4194304"}, "size"),
    ({"size": True}, "size"),
    ({"os_hash_value": {"a": 1}}, "os_hash_value"),
    ({"status": "saving"}, "saving"),
    ({"size": 4 * MiB - 1}, "4194303 bytes"),
    ({"status": "killed\x1b[31m\nforged" + "z" * 10000}, "killed\\x1b[31m"),
])
def test_final_record_is_checked(server, dep, fields, key):
    path, sha512 = upload_file(dep, 4 * MiB)
    image_id = None

    def meta(answer):
        value = hg.record(image_id, size=4 * MiB, sha512=sha512)
        value.update(fields)
        answer.json(value)
    image_id = server.upload_target(meta=meta)

    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    message = str(err.value)
    assert key in message and image_id in message
    assert_clean(message)
    assert server.deleted == [image_id]


def test_answer_before_the_whole_upload_is_not_success(server, dep):
    size = 64 * MiB
    path, sha512 = upload_file(dep, size)
    image_id = None

    def early(answer):
        answer.receive(limit=MiB)
        answer.start(204)
        answer.reset()

    def meta(answer):
        # The record lies: all bytes stored, with the right hash.
        answer.json(hg.record(image_id, size=size, sha512=sha512))
    image_id = server.upload_target(upload=early, meta=meta)

    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    message = str(err.value)
    assert image_id in message and server.url in message
    assert_clean(message)
    assert server.deleted == [image_id]


@pytest.mark.parametrize("when", ["taking the body", "answering"])
def test_stalled_upload_fails_after_the_stall_timeout(server, dep, when):
    dep.write_config(glance={"stall_timeout": 1})
    path, _sha512 = upload_file(dep, 64 * MiB)

    def stalls(answer):
        if when == "answering":
            answer.receive()
        answer.stall(STALL)
    image_id = server.upload_target(upload=stalls)

    start = time.monotonic()
    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    assert time.monotonic() - start < STALL / 2
    message = str(err.value)
    assert image_id in message and "stall_timeout" in message
    assert server.url in message
    assert_clean(message)
    assert server.deleted == [image_id]


def test_stalled_create_fails_after_the_stall_timeout(server, dep):
    dep.write_config(glance={"stall_timeout": 1})
    path, _sha512 = upload_file(dep, MiB)
    server.upload_target(create=lambda answer: answer.stall(STALL))

    start = time.monotonic()
    with pytest.raises(exception.ImageSourceError) as err:
        upload(dep, path)

    assert time.monotonic() - start < STALL / 2
    message = str(err.value)
    assert "up\\x1b[2Jload" in message and "stall_timeout" in message
    assert not server.requests_of("PUT")
