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

from imagebackend.common import digest
from tests import fakes

BLOCK = 64 * 1024


def content(seed=1):
    """Data blocks, zero blocks, a block that is zero but for one byte,
    and a short, non-zero tail.
    """
    rng = random.Random(seed)
    parts = [rng.randbytes(BLOCK), bytes(3 * BLOCK), rng.randbytes(100),
             bytes(BLOCK - 100), bytes(BLOCK - 1) + b"\x01",
             bytes(5 * BLOCK), rng.randbytes(7)]
    return b"".join(parts)


def feed(data, sizes):
    h = digest.SparseDigest()
    pos = 0
    for size in sizes:
        h.update(data[pos:pos + size])
        pos += size
    h.update(data[pos:])
    return h.hexdigest()


@pytest.mark.parametrize("sizes", [
    [], [1], [BLOCK], [BLOCK - 1, 2, 3], [17] * 50, [4 * BLOCK + 5, 1],
    [10 ** 6],
])
def test_any_chunking_gives_the_digest_of_the_definition(sizes):
    data = content()
    assert feed(data, sizes) == fakes.sparse_digest(data)


def test_zeros_may_be_skipped_at_any_offset():
    data = content()
    expected = fakes.sparse_digest(data)
    zero_runs = [(BLOCK, 4 * BLOCK), (BLOCK + 50, 2 * BLOCK),
                 (4 * BLOCK + 100, 5 * BLOCK), (6 * BLOCK, 6 * BLOCK + 10)]
    for start, end in zero_runs:
        assert data[start:end] == bytes(end - start)
        h = digest.SparseDigest()
        h.update(data[:start])
        h.zeros(end - start)
        h.update(data[end:])
        assert h.hexdigest() == expected, (start, end)


def test_a_trailing_partial_block_of_zeros_adds_nothing():
    h = digest.SparseDigest()
    h.update(b"x" * BLOCK)
    h.zeros(10)
    assert h.hexdigest() == fakes.sparse_digest(b"x" * BLOCK)


def test_content_changes_change_the_digest_and_holes_do_not():
    data = bytearray(content())
    before = fakes.sparse_digest(bytes(data))
    assert feed(bytes(data), [BLOCK]) == before
    data[2 * BLOCK + 5] = 1             # inside what was a zero block
    assert feed(bytes(data), [BLOCK]) != before


def test_the_sha256_scheme_of_earlier_records_follows_its_definition():
    data = content()
    h = digest.new("sparse-64k")
    h.update(data[:BLOCK + 3])
    h.zeros(0)
    h.update(data[BLOCK + 3:])
    assert h.hexdigest() == fakes.sparse_digest(data, "sparse-64k")
    assert h.hexdigest() != fakes.sparse_digest(data)
    assert len(h.hexdigest()) == 64 and len(fakes.sparse_digest(data)) == 32


def test_new_knows_hashlib_and_sparse():
    assert isinstance(digest.new("sparse-64k-xxh3"), digest.SparseDigest)
    h = digest.new("sha512")
    h.update(b"abc")
    assert h.hexdigest() == hashlib.sha512(b"abc").hexdigest()
    with pytest.raises(ValueError):
        digest.new("no-such-hash")


def test_file_digests_read_only_data_and_match_full_hashes(tmp_path):
    data = content() + bytes(8 * BLOCK)
    path = tmp_path / "sparse.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, len(data))
        for offset in range(0, len(data), BLOCK):
            block = data[offset:offset + BLOCK]
            if block.count(0) != len(block):
                os.pwrite(fd, block, offset)
        found = digest.file_digests(fd, ["sha256", "sparse-64k-xxh3"])
    finally:
        os.close(fd)
    assert found["size"] == len(data)
    assert found["full"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert found["sparse"] == fakes.sparse_digest(data)
    assert found["full"]["sparse-64k-xxh3"] == found["sparse"]


def test_cache_id_is_sha1_of_the_image_id():
    assert (digest.cache_id("abc")
            == "a9993e364706816aba3e25717850c26c9cd0d89d")
    # Any text an id may hold, encoded as UTF-8.
    assert digest.cache_id("\u00e9") == hashlib.sha1(
        "\u00e9".encode("utf-8")).hexdigest()
