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

"""Downloading into a scratch file: what is written, hashed, checked,
fsynced and cleaned up, called directly (not through the cache)."""

import errno
import hashlib
import os
import stat
import threading
from unittest import mock

import pytest

from imagebackend.cache import download as cache_download
from imagebackend import exception
from imagebackend import inspection
from imagebackend.sources import base as source_base
from tests import fakes

# A stage that never drains would block a put forever: fail instead.
pytestmark = pytest.mark.timeout(120)

RAW = fakes.RAW_IMAGE
QCOW2 = fakes.QCOW2_IMAGE


class Source:
    """A source serving ``chunks`` (a list, or a generator function of
    the meta), recording whether the stream was closed.
    """

    def __init__(self, chunks):
        self.chunks = chunks
        self.closed = 0

    def open(self, meta):
        return Stream(self, self.chunks(meta) if callable(self.chunks)
                      else iter(self.chunks))


class Stream:
    def __init__(self, source, chunks):
        self.source = source
        self.chunks = chunks

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.chunks)

    def close(self):
        self.source.closed += 1


def meta_for(data, **changes):
    fields = dict(image_id="img", source="test source", size=len(data),
                  hash_algo="sha512",
                  hash_value=hashlib.sha512(data).hexdigest())
    fields.update(changes)
    return source_base.ImageMeta(**fields)


def pieces(data, size=64 * 1024):
    return [data[i:i + size] for i in range(0, len(data), size)]


def helper_threads():
    return [t for t in threading.enumerate()
            if t.name in ("imagebackend-hash", "imagebackend-write")]


@pytest.fixture
def run(tmp_path):
    conf = fakes.conf(tmp_path)
    part = str(tmp_path / "img.part")

    def run(source, meta, converts=lambda r: False, progress=None):
        inspector = inspection.StreamInspector(
            meta.image_id, conf, declared_format=meta.disk_format)
        return cache_download.download(source, meta, part, inspector,
                                       converts, progress)

    run.part = part
    return run


@pytest.fixture
def fsynced():
    """The paths of the descriptors os.fsync was called on."""
    paths = []
    real = os.fsync

    def fsync(fd):
        paths.append(os.readlink("/proc/self/fd/%d" % fd))
        real(fd)

    with mock.patch.object(os, "fsync", side_effect=fsync):
        yield paths


def test_a_download_is_written_hashed_and_counted(run, fsynced):
    source = Source(pieces(RAW))
    (algo, digest), result, done = run(source, meta_for(RAW))
    assert (algo, digest) == ("sha512", hashlib.sha512(RAW).hexdigest())
    assert done == len(RAW)
    assert result.format == "raw"
    with open(run.part, "rb") as f:
        assert f.read() == RAW
    assert stat.S_IMODE(os.stat(run.part).st_mode) == 0o644
    # Published as it is: made durable before it is returned.
    assert fsynced == [run.part]
    assert source.closed == 1
    assert helper_threads() == []


def test_a_download_to_be_converted_is_not_fsynced(run, fsynced):
    seen = []

    def converts(result):
        seen.append(result)
        return True

    _, result, _ = run(Source(pieces(QCOW2)),
                       meta_for(QCOW2, disk_format="qcow2"), converts)
    assert result.format == "qcow2"
    # Asked first with the declared format, then with the inspection.
    assert seen == ["qcow2", result]
    assert fsynced == []


def test_every_chunk_is_reported_in_bytes(run):
    seen = []
    run(Source(pieces(RAW, 1000 * 1000)), meta_for(RAW),
        progress=lambda *args: seen.append(args))
    assert seen == [("download", 1000 * 1000, len(RAW)),
                    ("download", 2000 * 1000, len(RAW)),
                    ("download", len(RAW), len(RAW))]


def test_without_a_recorded_hash_the_download_is_hashed_with_sha256(run):
    meta = meta_for(RAW, hash_algo=None, hash_value=None)
    (algo, digest), _, _ = run(Source(pieces(RAW)), meta)
    assert (algo, digest) == ("sha256", hashlib.sha256(RAW).hexdigest())


def test_a_recorded_algorithm_without_a_value_is_still_used(run):
    meta = meta_for(RAW, hash_algo="sha1", hash_value=None)
    assert run(Source(pieces(RAW)), meta)[0] == (
        "sha1", hashlib.sha1(RAW).hexdigest())


def test_an_md5_checksum_is_checked(run):
    meta = meta_for(RAW, hash_algo=None, hash_value=None,
                    checksum=hashlib.md5(b"other").hexdigest())
    with pytest.raises(exception.ImageChecksumMismatch) as err:
        run(Source(pieces(RAW)), meta)
    assert err.value.algo == "md5"
    assert err.value.actual == hashlib.md5(RAW).hexdigest()


def test_an_unknown_hash_algorithm_is_refused_before_downloading(run):
    source = Source(pieces(RAW))
    meta = meta_for(RAW, hash_algo="nohash", hash_value="00")
    with pytest.raises(exception.ImageDownloadError) as err:
        run(source, meta)
    assert err.value.reason == (
        "the source records an unknown hash algorithm 'nohash'")
    assert err.value.image_id == "img"
    assert err.value.source == "test source"
    assert isinstance(err.value.__cause__, ValueError)
    assert not os.path.exists(run.part)
    assert source.closed == 0


def test_bytes_not_matching_the_recorded_hash_are_refused(run):
    meta = meta_for(RAW, hash_value="AB" * 64)
    with pytest.raises(exception.ImageChecksumMismatch) as err:
        run(Source(pieces(RAW)), meta)
    assert err.value.algo == "sha512"
    assert err.value.expected == "ab" * 64
    assert err.value.actual == hashlib.sha512(RAW).hexdigest()
    assert err.value.image_id == "img"
    assert err.value.source == "test source"
    assert not os.path.exists(run.part)
    assert helper_threads() == []


@pytest.mark.parametrize("served", [len(RAW) - 1, len(RAW) + 1])
def test_a_body_of_another_length_is_refused(run, served):
    data = (RAW + b"x")[:served]
    meta = meta_for(data, size=len(RAW))
    with pytest.raises(exception.ImageDownloadError) as err:
        run(Source(pieces(data)), meta)
    assert err.value.reason == "received %d bytes, the source recorded %d" % (
        served, len(RAW))
    assert (err.value.image_id, err.value.source) == ("img", "test source")
    assert not os.path.exists(run.part)


def test_a_body_of_unknown_length_is_taken_as_it_comes(run):
    meta = meta_for(RAW, size=None)
    assert run(Source(pieces(RAW)), meta)[2] == len(RAW)


def test_a_failed_write_names_the_part_and_removes_it(run):
    source = Source(pieces(RAW))
    with mock.patch.object(os, "pwrite", side_effect=OSError(
            errno.ENOSPC, "No space left on device")):
        with pytest.raises(exception.ImageDownloadError) as err:
            run(source, meta_for(RAW))
    assert err.value.reason == (
        "writing %s failed: [Errno 28] No space left on device" % run.part)
    assert (err.value.image_id, err.value.source) == ("img", "test source")
    assert isinstance(err.value.__cause__, OSError)
    assert not os.path.exists(run.part)
    assert source.closed == 1
    assert helper_threads() == []


def test_a_source_error_is_raised_as_it_is_even_after_a_failed_write(run):
    """The source's own error wins over a write error found while the
    stages are shut down (the source's names what failed first).
    """
    def chunks(meta):
        yield RAW[:4096]
        raise exception.ImageDownloadError(image_id="img", source="s",
                                           reason="connection reset")

    source = Source(chunks)
    with mock.patch.object(os, "pwrite", side_effect=OSError(
            errno.EIO, "I/O error")):
        with pytest.raises(exception.ImageDownloadError) as err:
            run(source, meta_for(RAW))
    assert err.value.reason == "connection reset"
    assert source.closed == 1
    assert not os.path.exists(run.part)
    assert helper_threads() == []


def test_a_refusal_by_the_inspector_passes_through(run):
    data = b"QFI\xfb" + bytes(4096)         # a qcow2 magic, declared raw
    meta = meta_for(data, disk_format="raw")
    with pytest.raises(exception.UnsafeImage):
        run(Source(pieces(data)), meta)
    assert not os.path.exists(run.part)
    assert helper_threads() == []


def test_the_stages_run_in_named_daemon_threads(run):
    seen = []

    def chunks(meta):
        yield RAW[:4096]
        seen.extend((t.name, t.daemon) for t in threading.enumerate()
                    if t.name.startswith("imagebackend-"))
        yield RAW[4096:]

    run(Source(chunks), meta_for(RAW))
    assert ("imagebackend-hash", True) in seen
    assert ("imagebackend-write", True) in seen


# -- the pieces ---------------------------------------------------------------

def test_bytes_are_passed_on_without_a_copy():
    data = b"abc" * 10
    assert cache_download._frozen(data) is data
    view = memoryview(data)[3:9]
    frozen = cache_download._frozen(view)
    assert type(frozen) is memoryview and frozen.obj is data
    assert frozen == b"abcabc"


def test_a_buffer_that_can_change_is_copied():
    buf = bytearray(b"abcdef")
    for chunk in (buf, memoryview(buf)[1:4]):
        frozen = cache_download._frozen(chunk)
        expected = bytes(chunk)
        buf[:] = b"zzzzzz"
        assert type(frozen) is bytes and frozen == expected
        buf[:] = b"abcdef"


class Closing:
    def __init__(self, error=None):
        self.error = error
        self.closed = False

    def close(self):
        self.closed = True
        if self.error:
            raise self.error


def test_closing_the_stages_closes_all_and_raises_the_first_error():
    first, second = ValueError("first"), OSError("second")
    stages = [Closing(), Closing(first), Closing(second)]
    with pytest.raises(ValueError) as err:
        cache_download._close_all(*stages)
    assert err.value is first
    assert all(s.closed for s in stages)


def test_closing_quietly_raises_nothing_but_closes_all():
    stages = [Closing(ValueError("x")), Closing()]
    cache_download._close_all(*stages, quiet=True)
    assert all(s.closed for s in stages)
    cache_download._close_all(Closing(), Closing())


def test_at_most_two_chunks_wait_for_a_stage():
    assert cache_download._QUEUE == 2
    stage = cache_download._Stage(lambda chunk: None, "hash")
    try:
        assert stage._queue.maxsize == 2
        assert stage._thread.daemon is True
        assert stage._thread.name == "imagebackend-hash"
    finally:
        stage.close()


@pytest.mark.parametrize("declared,expected", [
    ("raw", "raw"), (None, "raw"), ("qcow2", "qcow2")])
def test_published_as_is_asks_with_the_declared_format(declared, expected):
    asked = []

    def converts(fmt):
        asked.append(fmt)
        return fmt != "raw"

    meta = meta_for(b"", disk_format=declared)
    assert cache_download._published_as_is(converts, meta) is (
        expected == "raw")
    assert asked == [expected]


def test_an_unknown_declared_format_counts_as_published_as_is():
    def converts(fmt):
        raise ValueError("no qemu-img format for %r" % fmt)

    assert cache_download._published_as_is(
        converts, meta_for(b"", disk_format="weird")) is True


def test_a_source_may_return_a_plain_iterator(run):
    class Plain:
        def open(self, meta):
            return iter(pieces(RAW))

    assert run(Plain(), meta_for(RAW))[2] == len(RAW)
