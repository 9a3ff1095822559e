"""The local source's content identity: a hash computed once per version
of the file and remembered under the cache.
"""

import hashlib
import os
import time
from unittest import mock

import pytest

from imagebackend.sources import local
from imagebackend.tests.unit import fakes

DATA = b"local image " * 10000


@pytest.fixture
def source(tmp_path):
    conf = fakes.conf(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    local.LocalSource.register_opts(conf)
    conf.set_override("path", str(images), group="local_source")
    src = local.LocalSource(conf)
    src.chunk_size = 4096
    return src


def put(source, name, data, age=3600):
    path = os.path.join(source.directory, name)
    with open(path, "wb") as f:
        f.write(data)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_identity_is_the_content_hash_and_the_download_is_checked(source):
    put(source, "img.raw", DATA)
    meta = source.get_meta("img.raw")
    digest = hashlib.sha256(DATA).hexdigest()
    assert meta.identity == "sha256:" + digest
    assert meta.expected_digest() == ("sha256", digest)


def test_the_hash_is_computed_once_per_version_of_the_file(source):
    path = put(source, "img.raw", DATA)
    with mock.patch.object(local, "_read_chunks",
                           wraps=local._read_chunks) as reads:
        first = source.get_meta("img.raw").identity
        assert source.get_meta("img.raw").identity == first
        assert reads.call_count == 1
        os.utime(path)                      # touched: same bytes
        assert source.get_meta("img.raw").identity == first
        assert reads.call_count == 2
        put(source, "img.raw", DATA[::-1], age=7200)    # changed in place
        changed = source.get_meta("img.raw").identity
        assert changed == "sha256:" + hashlib.sha256(DATA[::-1]).hexdigest()
    memo = os.path.join(source.conf.imagebackend.instances_path, "_base",
                        ".sources", "local")
    assert len(os.listdir(memo)) == 1       # one record per image
    assert sorted(os.listdir(source.directory)) == ["img.raw"]


def test_a_file_modified_just_now_is_hashed_again(source):
    put(source, "img.raw", DATA, age=0)
    with mock.patch.object(local, "_read_chunks",
                           wraps=local._read_chunks) as reads:
        source.get_meta("img.raw")
        source.get_meta("img.raw")
    assert reads.call_count == 2
