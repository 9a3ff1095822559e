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

"""The local source's content identity: a hash computed once per version
of the file and remembered under the cache.
"""

import dataclasses
import errno
import os
import time
from unittest import mock

from oslo_config import cfg
import pytest

from imagebackend.common import digest as content_digest
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend import opts
from imagebackend import sources
from imagebackend.sources import glance
from imagebackend.sources import local
from tests import fakes

DATA = b"local image " * 10000


@pytest.fixture
def source(tmp_path):
    src = fakes.local_source(tmp_path, fakes.conf(tmp_path))
    src.chunk_size = 4096
    return src


def put(source, name, data, age=3600):
    path = os.path.join(source.directory, name)
    with open(path, "wb") as f:
        f.write(data)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_identity_is_deferred_until_asked_for_then_checked(source):
    put(source, "img.raw", DATA)
    with mock.patch.object(content_digest, "file_digests",
                           wraps=content_digest.file_digests) as reads:
        meta = source.get_meta("img.raw")
    assert reads.call_count == 0
    assert (meta.identity, meta.identity_deferred) == (None, True)
    assert meta.expected_digest() is None
    assert meta.size == len(DATA)
    resolved = source.resolve_identity(meta)
    digest = fakes.sparse_digest(DATA)
    assert resolved.identity == fakes.local_identity(DATA)
    assert not resolved.identity_deferred
    assert resolved.expected_digest() == ("sparse-64k-xxh3", digest)


def test_the_hash_is_computed_once_per_version_of_the_file(source):
    path = put(source, "img.raw", DATA)
    with mock.patch.object(content_digest, "file_digests",
                           wraps=content_digest.file_digests) as reads:
        first = source.resolve_identity(source.get_meta("img.raw")).identity
        assert source.get_meta("img.raw").identity == first
        assert reads.call_count == 1
        os.utime(path)                      # touched: same bytes
        meta = source.get_meta("img.raw")
        assert meta.identity_deferred
        assert source.resolve_identity(meta).identity == first
        assert reads.call_count == 2
        put(source, "img.raw", DATA[::-1], age=7200)    # changed in place
        changed = source.resolve_identity(
            source.get_meta("img.raw")).identity
        assert changed == fakes.local_identity(DATA[::-1])
    memo = os.path.join(source.conf.imagebackend.instances_path, "_base",
                        ".sources", "local")
    assert len(os.listdir(memo)) == 1       # one record per image
    assert sorted(os.listdir(source.directory)) == ["img.raw"]


def test_a_file_modified_just_now_is_hashed_again(source):
    put(source, "img.raw", DATA, age=0)
    meta = source.resolve_identity(source.get_meta("img.raw"))
    assert meta.identity == fakes.local_identity(DATA)
    again = source.get_meta("img.raw")
    assert (again.identity, again.identity_deferred) == (None, True)


def test_the_hash_of_a_download_is_remembered(source):
    put(source, "img.raw", DATA)
    meta = source.get_meta("img.raw")
    digest = fakes.sparse_digest(DATA)
    assert source.identify_download(meta, "sparse-64k-xxh3", digest) == (
        fakes.local_identity(DATA))
    with mock.patch.object(content_digest, "file_digests",
                           wraps=content_digest.file_digests) as reads:
        again = source.get_meta("img.raw")
    assert reads.call_count == 0
    assert again.identity == fakes.local_identity(DATA)
    assert again.expected_digest() == ("sparse-64k-xxh3", digest)


def test_a_file_changed_during_its_download_is_refused(source):
    put(source, "img.raw", DATA)
    meta = source.get_meta("img.raw")
    put(source, "img.raw", DATA[::-1], age=7200)
    with pytest.raises(exception.ImageDownloadError) as err:
        source.identify_download(meta, "sparse-64k-xxh3",
                                 fakes.sparse_digest(DATA))
    assert "img.raw changed while it was being read" in str(err.value)
    assert source.get_meta("img.raw").identity_deferred


def sparse(source, name, pieces, size):
    path = os.path.join(source.directory, name)
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("chunk_size", [4096, 5000, 1 << 20])
def test_a_sparse_file_streams_the_same_bytes_without_reading_holes(
        source, chunk_size):
    MiB = 1 << 20
    pieces = [(1, b"a" * 10), (MiB + 4095, b"b" * 8193),
              (3 * MiB + 123, os.urandom(70000))]
    expected = sparse(source, "img.raw", pieces, 7 * MiB + 11)
    source.chunk_size = chunk_size
    read = []

    def counting(real):
        def call(*args):
            data = real(*args)
            read.append(len(data))
            return data
        return call

    with mock.patch.object(os, "pread", autospec=True,
                           side_effect=counting(os.pread)), \
            mock.patch.object(os, "read", autospec=True,
                              side_effect=counting(os.read)):
        chunks = list(source.open(source.get_meta("img.raw")))
    assert b"".join(chunks) == expected
    assert max(len(c) for c in chunks) <= chunk_size
    assert sum(read) < MiB          # the 7 MiB of holes were not read
    # Holes come as views of the shared zeros, which cost no copy and
    # which the digest and the writer know for zeros without looking.
    holes = [c for c in chunks if isinstance(c, memoryview)]
    assert sum(len(c) for c in holes) > 6 * MiB
    assert all(c.obj is sparseio.HOLE for c in holes)


def test_a_file_without_holes_streams_as_it_is(source):
    data = os.urandom(3 * 4096 + 17)
    put(source, "img.raw", data)
    assert b"".join(source.open(source.get_meta("img.raw"))) == data
    put(source, "empty.raw", b"")
    assert list(source.open(source.get_meta("empty.raw"))) == []


def test_a_hash_remembered_since_the_lookup_is_not_computed_again(source):
    put(source, "img.raw", DATA)
    early = source.get_meta("img.raw")      # another process downloads now
    digest = fakes.sparse_digest(DATA)
    source.identify_download(source.get_meta("img.raw"),
                             "sparse-64k-xxh3", digest)
    with mock.patch.object(content_digest, "file_digests",
                           wraps=content_digest.file_digests) as reads:
        resolved = source.resolve_identity(early)
    assert reads.call_count == 0
    assert resolved.identity == fakes.local_identity(DATA)


@pytest.mark.parametrize("image_id", [
    "img.raw\n",                # an id followed by a newline
    "img\x1b[31m.raw",
    "img\x85.raw",              # C1
    "img\u202e.raw",            # a bidi override
    "img\udcff.raw",            # bytes that are not UTF-8
    "",
    "x" * 256,
])
def test_an_unusable_id_is_refused_before_anything_is_done(source, image_id):
    put(source, "img.raw", DATA)
    memo_dir = os.path.dirname(source._memo_path("img.raw"))
    with pytest.raises(exception.InvalidImageId) as err:
        source.get_meta(image_id)
    message = str(err.value)
    assert "an image id is 1 to 255 characters of UTF-8 text" in message
    assert message.isprintable()
    message.encode("utf-8")     # no surrogate left to fail on
    assert err.value.image_id == image_id
    for call in (source.open, source.resolve_identity):
        meta = source.get_meta("img.raw")
        with pytest.raises(exception.InvalidImageId):
            call(dataclasses.replace(meta, image_id=image_id,
                                     identity_deferred=True))
    assert not os.path.exists(memo_dir)


def test_the_refused_id_is_shown_escaped(source):
    with pytest.raises(exception.InvalidImageId) as err:
        source.get_meta("img.raw\nimagebackend: error: forged")
    assert str(err.value).startswith(
        "Invalid image id 'img.raw\\nimagebackend: error: forged': it "
        "contains control or invisible characters; ")
    with pytest.raises(exception.InvalidImageId) as err:
        source.get_meta("\udcffimg")
    assert str(err.value).startswith(
        "Invalid image id '\\xffimg': it is not valid UTF-8; ")


@pytest.mark.parametrize("image_id", [b"img.raw", None, 7])
def test_an_id_that_is_not_a_str_is_refused(source, image_id):
    put(source, "img.raw", DATA)
    with pytest.raises(exception.InvalidImageId) as err:
        source.get_meta(image_id)
    assert "not str" in str(err.value)


@pytest.mark.parametrize("image_id", ["..", ".", "sub/img.raw", "/etc/x"])
def test_a_path_is_not_a_local_id(source, image_id):
    with pytest.raises(exception.InvalidImageId) as err:
        source.get_meta(image_id)
    assert "plain name of a file" in str(err.value)


def test_a_substitution_error_in_its_options_names_option_and_file(
        tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[local_source]\npath = $nope/images\n")
    # new_conf registers the configured source's options and reads them.
    with pytest.raises(exception.ConfigValueError) as err:
        local.LocalSource(opts.new_conf(["--config-file", str(path)]))
    message = str(err.value)
    assert "[local_source] path" in message and str(path) in message
    assert "$nope" in message


@pytest.mark.parametrize("cls", [local.LocalSource, glance.GlanceSource])
def test_a_source_registers_no_options_and_says_what_to_call(cls):
    conf = cfg.ConfigOpts()
    conf([], project="imagebackend", default_config_files=[])
    before = set(conf)
    with pytest.raises(exception.ConfigurationError) as err:
        cls(conf)
    assert "%s.register_opts(conf)" % cls.__name__ in str(err.value)
    assert "imagebackend.opts.register_opts(conf)" in str(err.value)
    assert set(conf) == before


def test_loading_a_source_registers_its_options(tmp_path):
    conf = cfg.ConfigOpts()
    conf([], project="imagebackend", default_config_files=[])
    source = sources.load(conf, "local")
    assert isinstance(source, local.LocalSource)
    assert conf.local_source.path == "/var/lib/imagebackend/images"


def test_a_read_error_while_streaming_is_a_download_error(source):
    put(source, "img.raw", b"data" * 4096)
    meta = source.get_meta("img.raw")
    stream = source.open(meta)
    with mock.patch("imagebackend.common.sparseio.read_regions",
                    side_effect=OSError(errno.EIO, "Input/output error")):
        with pytest.raises(exception.ImageDownloadError) as err:
            next(stream)
    assert "img.raw" in str(err.value)
    assert "Input/output error" in str(err.value)


def test_a_read_error_while_hashing_is_a_source_error(source):
    put(source, "img.raw", b"data" * 4096)
    meta = source.get_meta("img.raw")
    assert meta.identity_deferred
    with mock.patch("imagebackend.common.digest.file_digests",
                    side_effect=OSError(errno.EIO, "Input/output error")):
        with pytest.raises(exception.ImageSourceError) as err:
            source.resolve_identity(meta)
    assert "img.raw" in str(err.value)
    assert "Input/output error" in str(err.value)
