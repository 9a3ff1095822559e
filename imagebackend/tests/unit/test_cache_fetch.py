"""The cache's miss path: what is made durable, and when."""

import hashlib
import os
import threading
import time
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend import cache_fetch
from imagebackend import exception
from imagebackend.sources import local
from imagebackend.tests.unit import fakes

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
        names.append(os.path.basename(os.readlink("/proc/self/fd/%d" % fd)))
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
    cid = cache.cache_id("raw-img")
    assert "_base" in synced[synced.index(cid + ".part"):]


def test_a_download_to_be_converted_is_not_fsynced(tmp_path, qemu, synced):
    c = make_cache(tmp_path, qemu)
    entry, _ = c.get("qcow2-img")
    cid = cache.cache_id("qcow2-img")
    assert cid + ".part" not in synced
    assert "_base" in synced            # the rename is still durable
    qemu.convert.assert_called_once()
    assert qemu.convert.call_args.kwargs["target_cache"] == "writeback"


def test_an_unconverted_non_raw_download_is_fsynced(tmp_path, qemu, synced):
    c = make_cache(tmp_path, qemu, force_raw_images=False)
    entry, _ = c.get("qcow2-img")
    assert entry.format == "qcow2"
    assert cache.cache_id("qcow2-img") + ".part" in synced
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
    assert entry.record["checksum"] == {"algo": "sparse-64k",
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
    return [t for t in threading.enumerate()
            if t.name == "imagebackend-hash"]


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
            if n.startswith(cache.cache_id("img.raw"))] == []


def test_the_background_hash_is_the_hash_of_every_chunk_in_order():
    chunks = [os.urandom(n) for n in (1, 4096, 70000, 0, 5)] * 20
    hasher = cache_fetch._BackgroundHash(hashlib.sha256())
    for chunk in chunks:
        hasher.update(chunk)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert hash_threads() == []


def test_at_most_two_chunks_wait_to_be_hashed():
    release = threading.Event()
    started = threading.Event()

    class Slow:
        def update(self, chunk):
            started.set()
            release.wait(10)

    hasher = cache_fetch._BackgroundHash(Slow())
    fed = []

    def feed():
        for i in range(10):
            hasher.update(b"x")
            fed.append(i)

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert started.wait(10)
    time.sleep(0.2)
    assert len(fed) == 1 + cache_fetch._HASH_QUEUE    # one being hashed
    release.set()
    feeder.join(10)
    hasher.close()
    assert len(fed) == 10


def test_a_failing_hash_is_raised_and_never_blocks_the_download():
    class Broken:
        def update(self, chunk):
            raise ValueError("bad chunk")

    hasher = cache_fetch._BackgroundHash(Broken())
    for _ in range(10):
        hasher.update(b"x")
    with pytest.raises(ValueError):
        hasher.hexdigest()


def test_a_refused_download_leaves_no_hash_thread(tmp_path, qemu):
    c = make_cache(tmp_path, qemu)
    with pytest.raises(exception.InvalidImageSize):
        c.get("qcow2-img", requested_size=fakes.MiB)
    assert hash_threads() == []
