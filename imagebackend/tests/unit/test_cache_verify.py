"""Digests of cached bases: whole-stream and sparse."""

import hashlib

from imagebackend import cache
from imagebackend import cache_verify
from imagebackend import fileutils
from imagebackend.tests.unit import fakes

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


def test_records_of_the_sha256_scheme_are_still_verified(tmp_path):
    """A converted base recorded by an earlier release (``sparse-64k``,
    over SHA-256) and a raw sized base of it verify against that digest,
    and a flipped byte in either is found.
    """
    c = cache.ImageCache(
        fakes.conf(tmp_path), fakes.FakeSource(
            fakes.conf(tmp_path), images={"img": fakes.QCOW2_IMAGE}),
        fakes.qemu())
    entry, _ = c.get("img")
    assert entry.record["base_checksum"]["scheme"] == "sparse-64k-xxh3"
    with open(entry.path, "rb") as f:
        content = f.read()
    record = dict(entry.record, base_checksum={
        "algo": "sha256", "scheme": "sparse-64k",
        "value": fakes.sparse_digest(content, "sparse-64k")})
    fileutils.write_json_atomic(entry.path + ".json", record)
    sized = c.sized_path(cache.cache_id("img"), len(content) + MiB)
    write(sized, len(content) + MiB, {0: content})
    assert [r["status"] for r in cache_verify.verify(c)] == ["ok", "ok"]

    for path in (sized, entry.path):
        with open(path, "r+b") as f:
            f.seek(3)
            f.write(b"\xff" if content[3:4] != b"\xff" else b"\x00")
        rows = {r["kind"]: r for r in cache_verify.verify(c)}
        assert rows["sized" if path == sized else "base"][
            "status"] == "corrupt", rows
