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

"""The sparse digests: content only, any chunking, holes unread."""

import hashlib
import os
import random

import pytest
import xxhash

from imagebackend.common import digest

BLOCK = 64 * 1024
SCHEMES = ["sparse-64k-xxh3-padded", "sparse-64k-xxh3", "sparse-64k"]


def definition(data, scheme="sparse-64k-xxh3-padded"):
    """The digest of ``data`` as the scheme defines it: each non-zero
    64 KiB block (the last one padded with zeros to 64 KiB in the padded
    scheme, as it is in the others) after its offset.
    """
    h = hashlib.sha256() if scheme == "sparse-64k" else xxhash.xxh3_128()
    for offset in range(0, len(data), BLOCK):
        block = data[offset:offset + BLOCK]
        if any(block):
            if scheme.endswith("-padded"):
                block += bytes(BLOCK - len(block))
            h.update(offset.to_bytes(8, "big") + block)
    return h.hexdigest()


def content(seed=1):
    """Data blocks, zero blocks, a block that is zero but for one byte,
    and a short, non-zero tail.
    """
    rng = random.Random(seed)
    parts = [rng.randbytes(BLOCK), bytes(3 * BLOCK), rng.randbytes(100),
             bytes(BLOCK - 100), bytes(BLOCK - 1) + b"\x01",
             bytes(5 * BLOCK), rng.randbytes(7)]
    return b"".join(parts)


def feed(data, sizes, scheme=digest.SPARSE):
    h = digest.SparseDigest(scheme)
    pos = 0
    for size in sizes:
        h.update(data[pos:pos + size])
        pos += size
    h.update(data[pos:])
    return h.hexdigest()


def test_new_records_use_the_padded_scheme():
    assert digest.SPARSE == "sparse-64k-xxh3-padded"
    assert digest.SparseDigest().name == digest.SPARSE
    assert digest.SPARSE_XXH3 == "sparse-64k-xxh3"
    assert digest.SPARSE_SHA256 == "sparse-64k"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("sizes", [
    [], [1], [BLOCK], [BLOCK - 1, 2, 3], [17] * 50, [4 * BLOCK + 5, 1],
    [10 ** 6],
])
def test_any_chunking_gives_the_digest_of_the_definition(sizes, scheme):
    data = content()
    assert feed(data, sizes, scheme) == definition(data, scheme)


@pytest.mark.parametrize("length", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1,
                                    2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1])
def test_only_the_padded_scheme_ignores_zeros_after_a_short_last_block(
        length):
    data = content()[:length]
    grown = data + bytes(3 * BLOCK + 11)
    assert feed(grown, [BLOCK - 1]) == feed(data, [7]) == definition(data)
    old = digest.SPARSE_XXH3
    if length % BLOCK and any(data[length - length % BLOCK:]):
        assert feed(grown, [], old) != feed(data, [], old)
    else:
        assert feed(grown, [], old) == feed(data, [], old)
    assert feed(data, [], old) == definition(data, old)


def test_the_padded_scheme_differs_only_in_a_short_last_block():
    aligned = content()[:3 * BLOCK]
    assert definition(aligned) == definition(aligned, "sparse-64k-xxh3")
    assert feed(aligned, []) == feed(aligned, [], digest.SPARSE_XXH3)
    tail = content()
    assert len(tail) % BLOCK and any(tail[-(len(tail) % BLOCK):])
    assert feed(tail, []) != feed(tail, [], digest.SPARSE_XXH3)


def test_an_empty_input_hashes_nothing():
    for scheme in SCHEMES:
        empty = feed(b"", [], scheme)
        assert empty == definition(b"", scheme)
        assert feed(bytes(BLOCK + 1), [3], scheme) == empty
        h = digest.SparseDigest(scheme)
        h.zeros(5 * BLOCK + 3)
        assert h.hexdigest() == empty


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zeros_may_be_skipped_at_any_offset(scheme):
    data = content()
    expected = definition(data, scheme)
    zero_runs = [(BLOCK, 4 * BLOCK), (BLOCK + 50, 2 * BLOCK),
                 (4 * BLOCK + 100, 5 * BLOCK), (6 * BLOCK, 6 * BLOCK + 10)]
    for start, end in zero_runs:
        assert data[start:end] == bytes(end - start)
        h = digest.SparseDigest(scheme)
        h.update(data[:start])
        h.zeros(end - start)
        h.update(data[end:])
        assert h.hexdigest() == expected, (start, end)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_trailing_partial_block_of_zeros_adds_nothing(scheme):
    h = digest.SparseDigest(scheme)
    h.update(b"x" * BLOCK)
    h.zeros(10)
    assert h.hexdigest() == definition(b"x" * BLOCK, scheme)


def test_content_changes_change_the_digest_and_holes_do_not():
    data = bytearray(content())
    before = definition(bytes(data))
    assert feed(bytes(data), [BLOCK]) == before
    data[2 * BLOCK + 5] = 1             # inside what was a zero block
    assert feed(bytes(data), [BLOCK]) != before


def test_the_sha256_scheme_of_earlier_records_follows_its_definition():
    data = content()
    h = digest.new("sparse-64k")
    h.update(data[:BLOCK + 3])
    h.zeros(0)
    h.update(data[BLOCK + 3:])
    assert h.hexdigest() == definition(data, "sparse-64k")
    assert h.hexdigest() != definition(data)
    assert len(h.hexdigest()) == 64 and len(definition(data)) == 32


def test_new_knows_hashlib_and_sparse():
    for scheme in SCHEMES:
        assert digest.new(scheme).name == scheme
    h = digest.new("sha512")
    h.update(b"abc")
    assert h.hexdigest() == hashlib.sha512(b"abc").hexdigest()
    with pytest.raises(ValueError):
        digest.new("no-such-hash")


def sparse_file(path, data, size=None):
    """An open file of ``data`` grown to ``size``, zero blocks as holes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, len(data) if size is None else size)
    for offset in range(0, len(data), BLOCK):
        block = data[offset:offset + BLOCK]
        if block.count(0) != len(block):
            os.pwrite(fd, block, offset)
    return fd


@pytest.mark.parametrize("scheme", SCHEMES)
def test_file_digests_read_only_data_and_match_full_hashes(tmp_path,
                                                           scheme):
    data = content() + bytes(8 * BLOCK)
    fd = sparse_file(tmp_path / "sparse.raw", data)
    try:
        found = digest.file_digests(fd, ["sha256", scheme], scheme=scheme)
    finally:
        os.close(fd)
    assert found["size"] == len(data)
    assert found["full"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert found["sparse"] == definition(data, scheme)
    assert found["full"][scheme] == found["sparse"]


def test_file_digests_default_to_the_padded_scheme(tmp_path):
    data = content()
    fd = sparse_file(tmp_path / "f", data)
    try:
        found = digest.file_digests(fd)
    finally:
        os.close(fd)
    assert found == {"full": {}, "sparse": definition(data),
                     "size": len(data)}
    assert found["sparse"] != definition(data, "sparse-64k-xxh3")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("length", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1,
                                    11 * BLOCK + 7])
def test_a_grown_copy_hashes_as_its_original_over_its_length(
        tmp_path, scheme, length):
    """Under any scheme, the digest of a grown copy's first ``length``
    bytes is its original's, and any non-zero byte after them makes it
    None; the whole-file hashes still cover every byte.
    """
    data = content()[:length]
    fd = sparse_file(tmp_path / "grown", data, length + 2 * BLOCK + 1)
    try:
        found = digest.file_digests(fd, ["md5"], scheme=scheme,
                                    length=length)
        assert found["sparse"] == definition(data, scheme)
        assert found["size"] == length + 2 * BLOCK + 1
        assert found["full"]["md5"] == hashlib.md5(
            data + bytes(2 * BLOCK + 1)).hexdigest()
        for offset in (length, length + BLOCK + 3, length + 2 * BLOCK):
            os.pwrite(fd, b"\x01", offset)
            found = digest.file_digests(fd, scheme=scheme, length=length)
            assert found["sparse"] is None, offset
            os.pwrite(fd, b"\x00", offset)
        # A file shorter than the original is not a copy grown from it.
        found = digest.file_digests(fd, scheme=scheme,
                                    length=length + 2 * BLOCK + 2)
        assert found["sparse"] is None
    finally:
        os.close(fd)


def test_unknown_schemes_are_refused(tmp_path):
    fd = sparse_file(tmp_path / "f", b"x")
    try:
        with pytest.raises(ValueError):
            digest.file_digests(fd, scheme="sparse-64k-md5")
    finally:
        os.close(fd)


def test_cache_id_is_sha1_of_the_image_id():
    assert (digest.cache_id("abc")
            == "a9993e364706816aba3e25717850c26c9cd0d89d")
    # Any text an id may hold, encoded as UTF-8.
    assert digest.cache_id("\u00e9") == hashlib.sha1(
        "\u00e9".encode("utf-8")).hexdigest()
