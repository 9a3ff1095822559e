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

"""The cache's miss path: what is made durable, and when."""

import errno
import hashlib
import os
import re
import threading
import time
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend.cache import download as cache_download
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import results as qemu_results
from imagebackend.sources import local
from tests import fakes

# A download stage that never drains would block forever: fail instead.
pytestmark = pytest.mark.timeout(120)

RAW = fakes.RAW_IMAGE
QCOW2 = fakes.QCOW2_IMAGE


@pytest.fixture
def qemu(fake_qemu):
    return fake_qemu


@pytest.fixture
def synced():
    """The names of the files and directories fsynced, in order."""
    names = []
    real = os.fsync

    def fsync(fd):
        # Scratch names end in a token unique to the attempt: drop it.
        name = os.path.basename(os.readlink("/proc/self/fd/%d" % fd))
        names.append(re.sub(r"-[0-9a-f]{12}$", "", name))
        real(fd)

    with mock.patch.object(os, "fsync", autospec=True, side_effect=fsync):
        yield names


def make_cache(tmp_path, qemu, **overrides):
    conf = fakes.conf(tmp_path, **overrides)
    source = fakes.FakeSource(conf, images={"raw-img": RAW,
                                            "qcow2-img": QCOW2})
    return cache.ImageCache(conf, source, qemu)


def test_a_raw_download_is_fsynced_before_it_is_published(tmp_path, qemu,
                                                          synced):
    c = make_cache(tmp_path, qemu)
    entry, _ = c.get("raw-img")
    cid = content_digest.cache_id("raw-img")
    assert "_base" in synced[synced.index(cid + ".part"):]


@pytest.mark.parametrize("declared,force_raw,streamed", [
    ("raw", True, True), (None, True, True), ("raw", False, True),
    ("qcow2", True, False), ("qcow2", False, True)])
def test_a_part_to_be_published_goes_to_disk_while_it_streams(
        tmp_path, qemu, declared, force_raw, streamed):
    """Only what will be published as it is downloaded is written back
    during the download (a part to be converted is only read back).
    """
    conf = fakes.conf(tmp_path, force_raw_images=force_raw)
    data = QCOW2 if declared == "qcow2" else RAW
    source = fakes.FakeSource(conf, images={"img": data},
                              declared={"img": declared})
    c = cache.ImageCache(conf, source, qemu)
    with mock.patch.object(sparseio, "Writeback",
                           wraps=sparseio.Writeback) as writeback:
        c.get("img")
    on_part = [call for call in writeback.call_args_list
               if "fd" in call.kwargs]
    assert bool(on_part) == streamed


def test_a_download_to_be_converted_is_not_fsynced(tmp_path, qemu, synced):
    c = make_cache(tmp_path, qemu)
    entry, _ = c.get("qcow2-img")
    cid = content_digest.cache_id("qcow2-img")
    assert cid + ".part" not in synced
    # The conversion is fsynced before the rename that publishes it, and
    # the rename is durable.
    last_dir_sync = len(synced) - 1 - synced[::-1].index("_base")
    assert synced.index(cid + ".converted") < last_dir_sync
    # qemu-img does not flush (the cache does, overlapping the digest).
    qemu.convert.assert_called_once()
    assert qemu.convert.call_args.kwargs["target_cache"] == "unsafe"
    assert qemu.convert.call_args.kwargs["durable"] is False


def test_an_unconverted_non_raw_download_is_fsynced(tmp_path, qemu, synced):
    c = make_cache(tmp_path, qemu, force_raw_images=False)
    entry, _ = c.get("qcow2-img")
    assert entry.format == "qcow2"
    assert content_digest.cache_id("qcow2-img") + ".part" in synced
    qemu.convert.assert_not_called()


# -- a local source's identity, computed only when needed ---------------------

@pytest.fixture
def local_cache(tmp_path, qemu):
    conf = fakes.conf(tmp_path)
    source = fakes.local_source(tmp_path, conf)
    return cache.ImageCache(conf, source, qemu), source


def put(source, data, age=3600):
    path = os.path.join(source.directory, "img.raw")
    with open(path, "wb") as f:
        f.write(data)
    when = time.time() - age
    os.utime(path, (when, when))


def test_a_first_download_is_not_preceded_by_hashing(local_cache):
    c, source = local_cache
    put(source, RAW)
    with mock.patch.object(local.LocalSource, "resolve_identity",
                           autospec=True) as resolve, \
            mock.patch.object(local.LocalSource, "open", autospec=True,
                              side_effect=local.LocalSource.open) as opened:
        entry, hit = c.get("img.raw")
    assert not resolve.called
    assert opened.call_count == 1           # the file was read once
    assert entry.record["identity"] == fakes.local_identity(RAW)
    assert entry.record["checksum"] == {"algo": "sparse-64k-xxh3",
                                        "value": fakes.sparse_digest(RAW)}


def test_the_hash_of_a_first_download_is_remembered(local_cache):
    c, source = local_cache
    put(source, RAW)
    c.get("img.raw")
    meta = source.get_meta("img.raw")
    assert meta.identity == fakes.local_identity(RAW)
    with mock.patch.object(local.LocalSource, "open",
                           autospec=True) as opened:
        entry, hit = c.get("img.raw")
    assert hit is True
    assert not opened.called


@pytest.mark.parametrize("age", [3600, 0])
def test_a_file_changed_after_a_cached_use_is_fetched_again(local_cache,
                                                            age):
    c, source = local_cache
    put(source, RAW, age=age)
    first, _ = c.get("img.raw")
    changed = b"new content" + RAW[11:]     # same size
    put(source, changed, age=age + 60)
    second, hit = c.get("img.raw")
    assert (second.generation, hit) == (2, False)
    with open(second.path, "rb") as f:
        assert f.read() == changed
    assert second.record["identity"] == (
        fakes.local_identity(changed))
    third, hit = c.get("img.raw")
    assert (third.generation, hit) == (2, True)


def test_an_unchanged_file_without_a_remembered_hash_is_a_hit(local_cache):
    c, source = local_cache
    put(source, RAW, age=0)                 # too recent to be remembered
    c.get("img.raw")
    assert source.get_meta("img.raw").identity_deferred
    entry, hit = c.get("img.raw")
    assert (entry.generation, hit) == (1, True)


# -- hashing beside the download ----------------------------------------------

def hash_threads():
    """The download's helper threads still running."""
    return [t for t in threading.enumerate()
            if t.name in ("imagebackend-hash", "imagebackend-write",
                          "imagebackend-writeback")]


def test_a_file_rewritten_during_its_download_is_refused(local_cache):
    c, source = local_cache
    put(source, RAW)
    real_open = local.LocalSource.open

    def open_then_touch(self, meta):
        chunks = real_open(self, meta)
        put(source, RAW, age=60)          # same bytes, another version
        return chunks

    with mock.patch.object(local.LocalSource, "open", autospec=True,
                           side_effect=open_then_touch):
        with pytest.raises(exception.ImageDownloadError) as err:
            c.get("img.raw")
    assert "img.raw changed while it was being read" in str(err.value)
    assert "try again" in str(err.value)
    assert [n for n in os.listdir(c.base_dir)
            if n.startswith(content_digest.cache_id("img.raw"))] == []


def test_a_stage_sees_every_chunk_in_order():
    chunks = [os.urandom(n) for n in (1, 4096, 70000, 0, 5)] * 20
    hasher = hashlib.sha256()
    stage = cache_download._Stage(hasher.update, "hash")
    for chunk in chunks:
        stage.put(chunk)
    stage.close()
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert hash_threads() == []


def test_at_most_two_chunks_wait_for_a_stage():
    release = threading.Event()
    started = threading.Event()

    def slow(chunk):
        started.set()
        release.wait(10)

    stage = cache_download._Stage(slow, "hash")
    fed = []

    def feed():
        for i in range(10):
            stage.put(b"x")
            fed.append(i)

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert started.wait(10)
    time.sleep(0.2)
    assert len(fed) == 1 + cache_download._QUEUE       # one being worked on
    release.set()
    feeder.join(10)
    stage.close()
    assert len(fed) == 10


def test_a_failing_stage_stops_the_download_and_never_blocks_it():
    calls = []

    def broken(chunk):
        calls.append(chunk)
        raise ValueError("bad chunk")

    stage = cache_download._Stage(broken, "write")
    with pytest.raises(ValueError):
        for _ in range(100):
            stage.put(b"x")
    with pytest.raises(ValueError):
        stage.close()
    assert len(calls) == 1
    assert hash_threads() == []


def test_a_source_refilling_one_buffer_still_caches_its_bytes(
        tmp_path, qemu):
    class Refilling(fakes.FakeSource):
        def open(self, meta):
            buf = bytearray(4096)
            data = self.images[meta.image_id]
            for i in range(0, len(data), len(buf)):
                piece = data[i:i + len(buf)]
                buf[:len(piece)] = piece
                yield memoryview(buf)[:len(piece)]

    conf = fakes.conf(tmp_path)
    data = bytes(range(256)) * 4096 + b"tail"
    c = cache.ImageCache(conf, Refilling(conf, images={"img": data}), qemu)
    entry, _ = c.get("img")
    with open(entry.path, "rb") as f:
        assert f.read() == data
    assert entry.record["checksum"]["value"] == hashlib.sha512(
        data).hexdigest()


def test_a_conversion_that_cannot_be_read_back_leaves_nothing(tmp_path,
                                                              qemu):
    c = make_cache(tmp_path, qemu)
    with mock.patch.object(cache_verify, "sparse_digest", autospec=True,
                           side_effect=OSError(errno.EIO, "I/O error")):
        with pytest.raises(exception.DiskOperationError) as info:
            c.get("qcow2-img")
    message = str(info.value)
    assert "qcow2-img" in message and "I/O error" in message
    assert "retry" in message
    assert [n for n in os.listdir(c.base_dir) if not n.startswith(".")] == []


def test_a_failed_write_is_a_download_error_naming_the_part(tmp_path, qemu):
    c = make_cache(tmp_path, qemu)
    real = os.pwrite

    def pwrite(fd, data, offset):
        if offset > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    with mock.patch.object(os, "pwrite", side_effect=pwrite):
        with pytest.raises(exception.ImageDownloadError) as info:
            c.get("raw-img")
    assert ".part-" in str(info.value)
    assert "No space left" in str(info.value)
    assert os.listdir(c.base_dir) == [] or not [
        n for n in os.listdir(c.base_dir) if not n.startswith(".")]
    assert hash_threads() == []


def test_a_refused_download_leaves_no_hash_thread(tmp_path, qemu):
    c = make_cache(tmp_path, qemu)
    with pytest.raises(exception.InvalidImageSize):
        c.get("qcow2-img", requested_size=fakes.MiB)
    assert hash_threads() == []


# -- qemu-img check before conversion -----------------------------------------

@pytest.mark.parametrize("force_raw", [True, False])
def test_a_corrupt_non_raw_image_is_refused_before_conversion(
        tmp_path, qemu, force_raw):
    c = make_cache(tmp_path, qemu, force_raw_images=force_raw)
    qemu.check.return_value = qemu_results.CheckResult(
        filename="", format="qcow2", exit_code=2, corruptions=4095)
    with pytest.raises(exception.CorruptImageRefused) as err:
        c.get("qcow2-img")
    assert "qcow2-img" in str(err.value) and "4095" in str(err.value)
    qemu.convert.assert_not_called()
    assert [n for n in os.listdir(c.base_dir) if not n.startswith(".")] == []


def test_a_check_that_cannot_finish_refuses_the_image(tmp_path, qemu):
    c = make_cache(tmp_path, qemu)
    qemu.check.side_effect = exception.QemuImgError(
        operation="check", path="p", exit_code=1, stderr="Check failed")
    with pytest.raises(exception.CorruptImageRefused) as err:
        c.get("qcow2-img")
    assert "Check failed" in str(err.value)
    assert [n for n in os.listdir(c.base_dir) if not n.startswith(".")] == []


def test_a_raw_image_is_not_checked(tmp_path, qemu):
    c = make_cache(tmp_path, qemu)
    c.get("raw-img")
    qemu.check.assert_not_called()


def test_progress_is_one_protocol_in_bytes(tmp_path, qemu):
    """The download reports bytes received of the image's size, and the
    conversion qemu-img's percentages as bytes of the virtual size.
    """
    def converting(source, source_fmt, target, target_fmt, *, progress,
                   **kwargs):
        for percent in (0.0, 50.0, 100.0):
            progress(percent)
        with open(target, "wb") as f:
            f.truncate(8 * fakes.MiB)

    qemu.convert.side_effect = converting
    c = make_cache(tmp_path, qemu)
    seen = []
    c.get("qcow2-img", progress=lambda *args: seen.append(args))
    downloads = [s for s in seen if s[0] == "download"]
    assert downloads[-1] == ("download", len(QCOW2), len(QCOW2))
    assert all(done <= total for _, done, total in downloads)
    size = 8 * fakes.MiB            # the image's virtual size
    assert [s for s in seen if s[0] == "convert"] == [
        ("convert", 0, size), ("convert", size // 2, size),
        ("convert", size, size)]
    # Silence costs nothing: no callback is handed to qemu-img.
    qemu.convert.side_effect = fakes.qemu().convert.side_effect
    c.get("qcow2-img")
    c.invalidate("qcow2-img")
    c.get("qcow2-img")
    assert qemu.convert.call_args.kwargs["progress"] is None
