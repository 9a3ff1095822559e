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

"""A base and the sized base grown from it with zeros: the sparse digest
of the one is the digest of the other, whatever the base's length, and a
sized base without a record of its own verifies against its original.
"""

import json
import os
import random

import pytest

from imagebackend import cache
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest
from imagebackend import exception
from tests import fakes

BLOCK = 64 * 1024
MiB = 1024 * 1024
# A length at the boundaries of the digest's blocks, and the data it ends
# with: the last byte of the file is never zero.
LENGTHS = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 1, 3 * BLOCK,
           3 * BLOCK + 1, 5 * BLOCK + 4321]


def data_of(length, seed=7):
    """``length`` bytes: data, a zero block, more data; the last is 0xff."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(length))
    data[BLOCK:2 * BLOCK] = bytes(len(data[BLOCK:2 * BLOCK]))
    if length:
        data[-1] = 0xff
    return bytes(data)


def write_sparse(path, data, size):
    """``data`` grown to ``size`` bytes; its zero blocks left as holes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in range(0, len(data), BLOCK):
            chunk = data[offset:offset + BLOCK]
            if chunk.count(0) != len(chunk):
                os.pwrite(fd, chunk, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("extra", [1, BLOCK - 1, BLOCK, 7 * BLOCK + 3])
def test_a_base_and_its_grown_copy_have_one_digest(tmp_path, length, extra):
    data = data_of(length)
    write_sparse(tmp_path / "base", data, length)
    write_sparse(tmp_path / "grown", data, length + extra)
    base = cache_verify.digests(str(tmp_path / "base"))
    grown = cache_verify.digests(str(tmp_path / "grown"))
    assert (base["size"], grown["size"]) == (length, length + extra)
    assert base["sparse"] == grown["sparse"]


def image_cache(tmp_path, image):
    conf = fakes.conf(tmp_path)
    return cache.ImageCache(conf, fakes.FakeSource(
        conf, images={"img": image}), fakes.qemu())


def grow(c, entry, size):
    """Sized base ``size`` of ``entry``, made the way the cached-base
    backend makes it (its own record and all).
    """
    final = c.sized_path(entry.cache_id, size)

    def build(fd, tmp):
        with open(entry.path, "rb") as f:
            os.pwrite(fd, f.read(), 0)
        os.ftruncate(fd, size)

    assert c.publish_derived(final, os.path.basename(final), build) is False
    return final


@pytest.mark.parametrize("length", [BLOCK - 1, BLOCK + 1, 2 * MiB + 6010])
def test_a_sized_base_without_its_own_record_verifies(tmp_path, length):
    """A sized base an earlier release made (no record of its own) is
    checked against its original's digest: a good one is ok, a changed
    one is corrupt.
    """
    c = image_cache(tmp_path, data_of(length))
    entry, _ = c.get("img")
    sized = grow(c, entry, length + 3 * MiB + 512)
    os.unlink(sized + ".json")
    rows = c.verify()
    assert [(r.kind, r.status, r.detail) for r in rows] == [
        ("base", "ok", ""), ("sized", "ok", "")]

    for offset in (length - 1, length + 5):     # its data; its zeros
        before = fakes.flip_byte(sized, offset)
        rows = c.verify()
        assert [(r.kind, r.status) for r in rows] == [
            ("base", "ok"), ("sized", "corrupt")], offset
        fakes.put_byte(sized, offset, before)
        assert [r.status for r in c.verify()] == ["ok", "ok"]


def test_a_sized_base_records_the_digest_of_its_original(tmp_path):
    c = image_cache(tmp_path, data_of(BLOCK + 1))
    entry, _ = c.get("img")
    sized = grow(c, entry, 4 * MiB)
    with open(sized + ".json") as f:
        recorded = json.load(f)
    assert recorded["digest"] == {
        "scheme": digest.SPARSE,
        "value": cache_verify.digests(entry.path)["sparse"]}


@pytest.mark.parametrize("scheme", ["sparse-64k-xxh3", "sparse-64k"])
@pytest.mark.parametrize("length", [BLOCK - 1, BLOCK, BLOCK + 1])
def test_records_of_earlier_schemes_verify_a_grown_copy(tmp_path, scheme,
                                                        length):
    """A converted base's record of an earlier release (a scheme without
    padding) vouches for a sized base without its own record, while the
    base is there and after it is pruned; a changed byte is found.
    """
    data = data_of(length)
    c = image_cache(tmp_path, data)
    entry, _ = c.get("img")
    sized = grow(c, entry, length + MiB)
    os.unlink(sized + ".json")
    with open(entry.path + ".json") as f:
        record = json.load(f)
    record.update(converted=True, base_checksum={
        "algo": "xxh3_128" if scheme.endswith("xxh3") else "sha256",
        "scheme": scheme, "value": fakes.sparse_digest(data, scheme)})
    with open(entry.path + ".json", "w") as f:
        json.dump(record, f)
    assert [(r.kind, r.status) for r in c.verify()] == [
        ("base", "ok"), ("sized", "ok")]
    os.rename(entry.path, entry.path + ".gone")
    assert [(r.kind, r.status) for r in c.verify()] == [("sized", "ok")]
    for offset in (length - 1, length, length + MiB - 1):
        before = fakes.flip_byte(sized, offset)
        assert [(r.kind, r.status) for r in c.verify()] == [
            ("sized", "corrupt")], offset
        fakes.put_byte(sized, offset, before)
    os.rename(entry.path + ".gone", entry.path)
    assert [r.status for r in c.verify()] == ["ok", "ok"]


@pytest.mark.parametrize("scheme", ["sparse-64k-xxh3", "sparse-64k"])
def test_a_sized_record_of_an_earlier_scheme_is_adopted_if_it_matches(
        tmp_path, scheme):
    """The record of a sized base an earlier release published (its file
    not yet linked, or never) describes what is built here when its digest,
    under its scheme, is the built file's: the built file is published
    under it.  Another digest is other content.
    """
    length = 3 * BLOCK + 1
    data = data_of(length)
    c = image_cache(tmp_path, data)
    entry, _ = c.get("img")
    size = length + MiB
    final = c.sized_path(entry.cache_id, size)
    theirs = {"kind": "sized", "image_id": "img",
              "base": os.path.basename(entry.path),
              "size": size, "format": "raw",
              "digest": {"scheme": scheme, "value": "0" * 32},
              "created_at": "2026-01-01T00:00:00+00:00"}
    with open(final + ".json", "w") as f:
        json.dump(theirs, f)
    with pytest.raises(exception.CachePublishConflict):
        grow(c, entry, size)
    assert not os.path.exists(final)

    theirs["digest"]["value"] = fakes.sparse_digest(
        data + bytes(MiB), scheme)
    with open(final + ".json", "w") as f:
        json.dump(theirs, f)
    grow(c, entry, size)
    with open(final, "rb") as f:
        assert f.read() == data + bytes(MiB)
    with open(final + ".json") as f:
        assert json.load(f) == theirs
    assert [r.status for r in c.verify()] == ["ok", "ok"]
