"""Digests of cached bases: whole-stream and sparse."""

import hashlib

from imagebackend import cache_verify

KiB = 1024
MiB = 1024 * KiB


def write(path, size, data):
    """A sparse file of ``size`` bytes with ``data`` = {offset: bytes}."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)
    with open(path, "rb") as f:
        return f.read()


def test_whole_stream_digest_reads_holes_as_zeros(tmp_path):
    path = str(tmp_path / "f")
    content = write(path, 5 * MiB + 3, {10: b"head", 3 * MiB + 7: b"mid",
                                        5 * MiB: b"end"})
    found = cache_verify.digests(path, ["sha256", "md5"])
    assert found["full"] == {"sha256": hashlib.sha256(content).hexdigest(),
                             "md5": hashlib.md5(content).hexdigest()}
    assert found["size"] == len(content)


def test_sparse_digest_ignores_allocation_and_trailing_zeros(tmp_path):
    data = {100: b"x" * 70 * KiB, 2 * MiB: b"y"}
    write(str(tmp_path / "a"), 3 * MiB, data)
    write(str(tmp_path / "grown"), 8 * MiB, data)
    zeros = {**data, MiB: bytes(256 * KiB)}     # allocated zeros
    write(str(tmp_path / "allocated"), 3 * MiB, zeros)
    digests = {name: cache_verify.digests(str(tmp_path / name))["sparse"]
               for name in ("a", "grown", "allocated")}
    assert len(set(digests.values())) == 1


def test_a_flipped_byte_changes_both_digests(tmp_path):
    path = str(tmp_path / "f")
    write(path, 2 * MiB, {0: b"data" * 1000})
    before = cache_verify.digests(path, ["sha256"])
    for offset in (5, MiB + 5):         # in data, and in a hole
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01")
        after = cache_verify.digests(path, ["sha256"])
        assert after["full"] != before["full"]
        assert after["sparse"] != before["sparse"]
        before = after
