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

"""Digests of cached bases: whole-stream and sparse."""

import errno
import hashlib
import os

import pytest

from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception
from tests import fakes

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
    assert entry.record["base_checksum"]["scheme"] == (
        "sparse-64k-xxh3-padded")
    with open(entry.path, "rb") as f:
        content = f.read()
    record = dict(entry.record, base_checksum={
        "algo": "sha256", "scheme": "sparse-64k",
        "value": fakes.sparse_digest(content, "sparse-64k")})
    fileio.write_json_atomic(entry.path + ".json", record)
    sized = c.sized_path(content_digest.cache_id("img"), len(content) + MiB)
    write(sized, len(content) + MiB, {0: content})
    assert [r.status for r in c.verify()] == ["ok", "ok"]

    for path in (sized, entry.path):
        with open(path, "r+b") as f:
            f.seek(3)
            f.write(b"\xff" if content[3:4] != b"\xff" else b"\x00")
        rows = {r.kind: r for r in c.verify()}
        assert rows["sized" if path == sized
                    else "base"].status == "corrupt", rows


def test_a_sized_base_verifies_against_its_own_record(
        make_cache, sized_record):
    c = make_cache()
    entry, _ = c.get("img")
    size = len(fakes.RAW_IMAGE) + MiB
    sized = c.sized_path(entry.cache_id, size)
    write(sized, size, {0: fakes.RAW_IMAGE})
    # An unconverted raw base records only the download's hash: once it
    # is gone, only the sized base's own record can vouch for it.
    os.unlink(entry.path)
    rows = c.verify()
    assert [(r.kind, r.status) for r in rows] == [
        ("sized", "unverified")]
    sized_record(sized, entry.cache_id, size)
    assert [r.status for r in c.verify()] == ["ok"]
    assert [(r.kind, r.image_id) for r in c.entries()] == [
        ("sized", "img")]
    with open(sized, "r+b") as f:
        f.seek(len(fakes.RAW_IMAGE) + 10)
        f.write(b"\x01")
    assert [r.status for r in c.verify()] == ["corrupt"]


@pytest.mark.parametrize("changes", [
    {"kind": "base"}, {"size": 5}, {"base": "f" * 40}, {"digest": "x"},
    {"image_id": None}])
def test_a_sized_record_that_does_not_describe_its_base_is_ignored(
        changes, make_cache, sized_record):
    c = make_cache()
    entry, _ = c.get("img")
    size = len(fakes.RAW_IMAGE) + MiB
    sized = c.sized_path(entry.cache_id, size)
    write(sized, size, {0: fakes.RAW_IMAGE})
    sized_record(sized, entry.cache_id, size, **changes)
    os.unlink(entry.path)
    assert [r.status for r in c.verify()] == ["unverified"]


def test_prune_removes_a_sized_base_with_its_record(make_cache, sized_record):
    c = make_cache()
    c.conf.set_override("remove_unused_resized_minimum_age_seconds", 0,
                        group="image_cache")
    entry, _ = c.get("img")
    size = len(fakes.RAW_IMAGE) + MiB
    sized = c.sized_path(entry.cache_id, size)
    write(sized, size, {0: fakes.RAW_IMAGE})
    sized_record(sized, entry.cache_id, size)
    assert [r.file for r in c.prune().removed] == [sized]
    assert not os.path.exists(sized + ".json")
    assert os.path.exists(entry.path + ".json")
    # A record left alone (a crash after the base went) goes too.
    fileio.write_json_atomic(sized + ".json", {"kind": "sized"})
    c.prune()
    assert not os.path.exists(sized + ".json")


def test_repair_marks_an_unverifiable_base_stale_and_never_moves_it(
        make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    os.unlink(entry.path + ".json")
    rows = c.verify(repair=True)
    assert [(r.status, r.action) for r in rows] == [
        ("unverified", "marked stale, left in place; new disks use a "
                       "fresh copy")]
    assert os.path.exists(entry.path)
    assert cache_layout.read_record(entry.path + ".json")["stale"] is True
    assert [r.action for r in c.verify(repair=True)] == [
        None]


def test_a_base_pruned_while_verify_reads_it_is_skipped(
        monkeypatch, make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    real = cache_verify.digests

    def pruned_meanwhile(path, *args, **kwargs):
        os.unlink(path)             # as a concurrent prune would
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_verify, "digests", pruned_meanwhile)
    assert c.verify().files == []
    assert not os.path.exists(entry.path)


def test_a_filesystem_error_is_a_library_error_naming_the_file(
        monkeypatch, make_cache):
    c = make_cache()
    entry, _ = c.get("img")

    def unreadable(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(cache_verify, "digests", unreadable)
    with pytest.raises(exception.CacheError) as err:
        c.verify()
    assert entry.path in str(err.value)
    assert "Input/output error" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
