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

"""Bases shared by content: the key, the byte comparison, and what a
fetch shares or refuses to share, with an in-memory source."""

import dataclasses
import errno
import hashlib
import json
import logging
import os
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend.cache import content as cache_content
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.common import digest as content_digest
from imagebackend import exception
from imagebackend import inspection
from tests import fakes

RAW = fakes.RAW_IMAGE
OTHER = b"another" + RAW[7:]


class HashlessSource(fakes.FakeSource):
    """Records only an md5 checksum, as old Glance images do."""

    def get_meta(self, image_id):
        meta = super().get_meta(image_id)
        return dataclasses.replace(
            meta, hash_algo=None, hash_value=None,
            checksum=hashlib.md5(self.images[image_id]).hexdigest())


def make(tmp_path, qemu, images, source=fakes.FakeSource, declared=None):
    conf = fakes.conf(tmp_path)
    declared = {i: "raw" for i in images} if declared is None else declared
    return cache.ImageCache(conf, source(conf, images=images,
                                         declared=declared), qemu)


def base(c, image_id, generation=1):
    return c.base_path(cache_layout.stem(content_digest.cache_id(image_id),
                                         generation))


def record(c, image_id):
    return cache_layout.read_record(base(c, image_id) + ".json")


def inode(path):
    st = os.lstat(path)
    return st.st_ino, st.st_nlink


def names(c):
    return sorted(n for n in os.listdir(c.base_dir)
                  if cache_layout.parse(n) is not None)


# -- the key ------------------------------------------------------------------

def valid(**changes):
    rec = {"image_id": "i", "format": "raw", "virtual_size": 10,
           "checksum": {"algo": "sha512", "value": "AB"}}
    rec.update(changes)
    return rec


@pytest.mark.parametrize("rec,key", [
    (valid(), ("raw", 10, "sha512", "ab")),
    (valid(base_checksum={"scheme": "sparse-64k-xxh3", "value": "c"},
           converted=True), ("raw", 10, "sparse-64k-xxh3", "c")),
    # records of earlier releases name no scheme: theirs was SHA-256
    (valid(base_checksum={"value": "c"}), ("raw", 10, "sparse-64k", "c")),
    (valid(converted=True), None),
    (valid(stale=True), None),
    (valid(checksum=None), None),
    (valid(format="vmdk-ish"), None),
    ({}, None),
    (None, None),
])
def test_the_content_key_comes_from_valid_records_only(rec, key):
    assert cache_content.content_key(rec) == key


# -- comparing bytes ---------------------------------------------------------

@pytest.mark.parametrize("a,b,same", [
    (b"", b"", True),
    (b"x" * 10, b"x" * 10, True),
    (bytes(9 * 1024 * 1024), bytes(9 * 1024 * 1024), True),
    (bytes(9 * 1024 * 1024), bytes(9 * 1024 * 1024 - 1) + b"\1", False),
    (b"\1" + bytes(9 * 1024 * 1024), bytes(9 * 1024 * 1024 + 1), False),
    (b"x" * 10, b"x" * 11, False),
])
def test_same_bytes_reads_both_files_in_full(tmp_path, a, b, same):
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    fd_a = os.open(tmp_path / "a", os.O_RDONLY)
    fd_b = os.open(tmp_path / "b", os.O_RDONLY)
    try:
        assert cache_content.same_bytes(fd_a, fd_b) is same
    finally:
        os.close(fd_a)
        os.close(fd_b)


def sparse(path, size, data):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("a,b,same", [
    # zeros written as data where the other has a hole
    ({0: b"x", 8 << 20: bytes(1 << 20)}, {0: b"x"}, True),
    ({0: b"x"}, {0: b"x", 5 << 20: bytes(4096)}, True),
    # data where the other has a hole, far from any other data
    ({0: b"x"}, {0: b"x", 9 << 20: b"y"}, False),
    ({12 << 20: b"y"}, {}, False),
    ({}, {}, True),
    # the same data behind holes of different lengths
    ({3 << 20: b"y" * 9000}, {(3 << 20) + 4096: b"y" * (9000 - 4096),
                              3 << 20: b"y" * 4096}, True),
])
def test_holes_and_zeros_compare_equal(tmp_path, a, b, same):
    size = 16 << 20
    fd_a = sparse(tmp_path / "a", size, a)
    fd_b = sparse(tmp_path / "b", size, b)
    try:
        assert cache_content.same_bytes(fd_a, fd_b) is same
        assert cache_content.same_bytes(fd_b, fd_a) is same
    finally:
        os.close(fd_a)
        os.close(fd_b)


# -- no download: a strong hash the cache recorded ---------------------------

def test_an_image_with_a_cached_strong_hash_is_not_downloaded(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, hit_a = c.get("a")
    second, hit_b = c.get("b")

    assert (hit_a, hit_b) == (False, False)
    assert c.source.opened == 1
    assert os.path.samestat(os.lstat(first.path), os.lstat(second.path))
    assert inode(second.path)[1] == 2
    rec = record(c, "b")
    assert rec["image_id"] == "b" and rec["shared_from"] == os.path.basename(
        first.path)
    assert rec["identity"] == c.source.get_meta("b").identity
    assert rec["checksum"] == record(c, "a")["checksum"]
    assert record(c, "a")["image_id"] == "a"
    # The next use of either id is a plain cache hit.
    assert c.get("b")[1] is True and c.get("a")[1] is True
    assert c.source.opened == 1
    assert names(c) == sorted(os.path.basename(p) + s for p in
                              (first.path, second.path) for s in ("", ".json"))


def test_reuse_by_source_hash_off_downloads_then_shares_by_bytes(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    c.conf.set_override("reuse_by_source_hash", False, "imagebackend")
    first, _ = c.get("a")
    second, _ = c.get("b")

    assert c.source.opened == 2
    assert record(c, "b")["shared_from"] == os.path.basename(first.path)
    assert os.path.samestat(os.lstat(first.path), os.lstat(second.path))


def test_an_md5_checksum_alone_never_skips_a_download(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW}, HashlessSource)
    first, _ = c.get("a")
    second, _ = c.get("b")

    assert c.source.opened == 2
    assert record(c, "b")["checksum"]["algo"] == "md5"
    # The bytes, compared in full after the download, are still shared.
    assert os.path.samestat(os.lstat(first.path), os.lstat(second.path))


@pytest.mark.parametrize("declared", [
    {"a": "raw"},                       # b declares no format
    {"a": "raw", "b": "ami"},           # another declared format
])
def test_another_declared_format_downloads(tmp_path, fake_qemu, declared):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW}, declared=declared)
    c.get("a")
    c.get("b")
    assert c.source.opened == 2


def test_a_disk_smaller_than_the_cached_base_downloads_and_is_refused(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    c.get("a")
    with pytest.raises(exception.InvalidImageSize):
        c.get("b", requested_size=len(RAW) - 1)
    assert not os.path.exists(base(c, "b"))


@pytest.mark.parametrize("spoil", ["stale", "no record", "bad record",
                                   "written", "symlink", "old record"])
def test_a_base_that_is_not_trusted_is_never_linked(tmp_path, fake_qemu,
                                                    spoil):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, _ = c.get("a")
    path = first.path
    if spoil == "stale":
        c.store.mark_stale(os.path.basename(path), "test")
    elif spoil == "no record":
        os.unlink(path + ".json")
    elif spoil == "bad record":
        with open(path + ".json", "w") as f:
            f.write('{"image_id": "a"}')
    elif spoil == "written":
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.write(b"X")
    elif spoil == "symlink":
        os.rename(path, path + "-elsewhere")
        os.symlink(path + "-elsewhere", path)
    elif spoil == "old record":
        # Written before records held the declared format.
        rec = record(c, "a")
        del rec["disk_format"]
        with open(path + ".json", "w") as f:
            f.write(json.dumps(rec))

    second, _ = c.get("b")

    assert c.source.opened == 2
    if spoil in ("written", "symlink", "stale", "no record", "bad record"):
        # Not linked after the download either: its bytes differ or it
        # cannot be trusted.
        assert inode(second.path)[1] == 1
    with open(second.path, "rb") as f:
        assert f.read() == RAW


def test_a_base_written_to_after_publishing_is_not_shared_by_bytes(
        tmp_path, fake_qemu, caplog):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW}, HashlessSource)
    first, _ = c.get("a")
    st = os.lstat(first.path)
    with open(first.path, "r+b") as f:
        f.write(b"X")
    # Even with its time put back, the bytes are compared.
    os.utime(first.path, ns=(st.st_atime_ns, st.st_mtime_ns))

    with caplog.at_level(logging.WARNING):
        second, _ = c.get("b")

    assert inode(second.path)[1] == 1
    assert "holds other bytes" in caplog.text
    with open(second.path, "rb") as f:
        assert f.read() == RAW


def test_different_bytes_never_share(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": OTHER})
    first, _ = c.get("a")
    second, _ = c.get("b")
    assert c.source.opened == 2
    assert inode(first.path)[1] == inode(second.path)[1] == 1
    assert not os.path.samestat(os.lstat(first.path), os.lstat(second.path))


def test_an_older_generation_of_the_same_image_is_not_a_candidate(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW})
    first, _ = c.get("a")
    c.invalidate("a")           # removed: nothing uses it
    again, _ = c.get("a")
    assert c.source.opened == 2
    assert inode(again.path)[1] == 1


# -- linking: crash safety and filesystems without hard links ---------------

def test_a_failed_publish_leaves_no_name_and_no_scratch_link(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, _ = c.get("a")
    before = names(c)
    with mock.patch.object(cache_publish, "publish_base",
                           side_effect=OSError(errno.EIO, "boom")):
        with pytest.raises(OSError):
            c.get("b")
    assert names(c) == before
    assert inode(first.path)[1] == 1


def test_without_hard_links_each_id_keeps_its_own_copy(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, _ = c.get("a")
    real_link = os.link

    def no_links(src, dst, **kwargs):
        if str(src).startswith("/proc/self/fd/") and ".part-" in str(dst):
            raise OSError(errno.EPERM, "no hard links here")
        return real_link(src, dst, **kwargs)

    with mock.patch.object(os, "link", no_links):
        second, _ = c.get("b")
    assert c.source.opened == 2
    assert inode(second.path)[1] == 1
    with open(second.path, "rb") as f:
        assert f.read() == RAW


# -- per id upkeep on shared bytes -------------------------------------------

def test_removing_one_id_keeps_the_bytes_of_the_other(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, _ = c.get("a")
    second, _ = c.get("b")

    result = c.invalidate("a")

    assert [r.file for r in result.removed] == [first.path]
    # The other name still links the bytes: nothing was freed.
    assert result.bytes_freed == 0
    assert not os.path.exists(first.path)
    assert inode(second.path)[1] == 1
    with open(second.path, "rb") as f:
        assert f.read() == RAW
    assert c.lookup("b").path == second.path
    assert c.get("b")[1] is True


def test_listing_and_prune_count_shared_bytes_once(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW, "c": OTHER})
    paths = [c.get(i)[0].path for i in ("a", "b", "c")]
    rows = {r.file: r for r in c.entries()}
    assert [rows[p].shared_with for p in paths] == [1, 1, 0]
    one = os.lstat(paths[0]).st_blocks * 512
    other = os.lstat(paths[2]).st_blocks * 512

    report = c.prune(dry_run=True)

    assert report.cache_size == one + other


def test_space_pruning_counts_only_what_a_removal_frees(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    paths = [c.get(i)[0].path for i in ("a", "b")]
    size = os.lstat(paths[0]).st_blocks * 512
    # Too large by one byte: only removing both names frees anything.
    c.conf.set_override("max_size", str(size - 1), group="image_cache")

    report = c.prune()

    assert sorted(r.file for r in report.removed) == sorted(paths)
    assert report.bytes_freed == size
    assert report.space_target_met


def test_verify_reports_every_id_of_shared_bytes(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, _ = c.get("a")
    second, _ = c.get("b")
    assert {r.image_id: r.status for r in c.verify()} == {"a": "ok",
                                                          "b": "ok"}
    with open(first.path, "r+b") as f:
        f.write(b"X")

    found = c.verify(repair=True)

    assert {r.image_id: r.status for r in found} == {"a": "corrupt",
                                                     "b": "corrupt"}
    assert all("shared with 1 other base(s)" in r.detail for r in found)
    # Each name was moved aside on its own; the bytes were not changed.
    for path in (first.path, second.path):
        assert not os.path.exists(path)
        with open(path + ".corrupt", "rb") as f:
            assert f.read() == b"X" + RAW[1:]


def test_converted_bases_share_by_their_own_digest(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": fakes.QCOW2_IMAGE,
                                   "b": fakes.QCOW2_IMAGE}, declared={})
    first, _ = c.get("a")
    second, _ = c.get("b")
    assert record(c, "b")["converted"] is True
    assert os.path.samestat(os.lstat(first.path), os.lstat(second.path))
    assert record(c, "b")["base_checksum"] == record(c, "a")["base_checksum"]
    assert inspection.INSPECTION_VERSION == record(c, "b")["inspection"][
        "version"]


class WeakHashSource(fakes.FakeSource):
    """Records a hash of an algorithm that may not stand for the bytes."""

    algo = "md5"

    def get_meta(self, image_id):
        meta = super().get_meta(image_id)
        value = hashlib.new(self.algo, self.images[image_id]).hexdigest()
        return dataclasses.replace(meta, hash_algo=self.algo,
                                   hash_value=value, identity=value)


@pytest.mark.parametrize("algo", ["md5", "sha1"])
def test_a_weak_source_hash_never_skips_a_download(tmp_path, fake_qemu,
                                                   algo):
    source = type("Weak", (WeakHashSource,), {"algo": algo})
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW}, source)
    c.get("a")
    c.get("b")
    assert record(c, "b")["checksum"]["algo"] == algo
    assert c.source.opened == 2


@pytest.mark.parametrize("change,opens", [
    (None, True),
    ("key", False),
    ("size", False),
    ("stale", False),
    ("symlink", False),
])
def test_a_candidate_is_opened_only_as_recorded(tmp_path, fake_qemu, change,
                                                opens):
    c = make(tmp_path, fake_qemu, {"a": RAW})
    entry, _ = c.get("a")
    stem = os.path.basename(entry.path)
    key = cache_content.content_key(record(c, "a"))
    size = len(RAW)
    if change == "key":
        key = key[:3] + ("0" * 128,)
    elif change == "size":
        size += 1
    elif change == "stale":
        c.store.mark_stale(stem, "test")
    elif change == "symlink":
        os.rename(entry.path, entry.path + "-x")
        os.symlink(entry.path + "-x", entry.path)

    opened = cache_content._open_candidate(c.store, stem, key, size)

    assert (opened is not None) is opens
    if opened is not None:
        fd, st, rec = opened
        os.close(fd)
        assert os.path.samestat(st, os.lstat(entry.path))
        assert rec["image_id"] == "a"


def test_a_base_cached_under_another_conversion_policy_is_not_linked(
        tmp_path, fake_qemu):
    images = {"a": fakes.QCOW2_IMAGE, "b": fakes.QCOW2_IMAGE}
    declared = {"a": "qcow2", "b": "qcow2"}
    c = make(tmp_path, fake_qemu, images, declared=declared)
    c.conf.set_override("force_raw_images", False, group="imagebackend")
    first, _ = c.get("a")
    assert record(c, "a")["format"] == "qcow2"
    c.conf.set_override("force_raw_images", True, group="imagebackend")

    second, _ = c.get("b")

    assert c.source.opened == 2
    assert record(c, "b")["format"] == "raw"
    assert not os.path.samestat(os.lstat(first.path), os.lstat(second.path))


def test_a_new_generation_may_share_another_ids_bytes(tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": OTHER})
    old, _ = c.get("a")
    other, _ = c.get("b")
    c.source.images["a"] = OTHER        # the image changed

    new, hit = c.get("a")

    assert not hit and new.path == base(c, "a", 2)
    assert c.source.opened == 2         # b's bytes, not downloaded
    assert os.path.samestat(os.lstat(new.path), os.lstat(other.path))
    assert record(c, "a")["stale"] is True      # generation 1
    with open(old.path, "rb") as f:
        assert f.read() == RAW
    assert inode(old.path)[1] == 1


def test_a_corrupt_shared_base_says_why_and_that_its_bytes_are_shared(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW})
    first, _ = c.get("a")
    c.get("b")
    with open(first.path, "r+b") as f:
        f.write(b"X")
    found = hashlib.sha512(b"X" + RAW[1:]).hexdigest()
    expected = hashlib.sha512(RAW).hexdigest()

    details = {r.image_id: r.detail for r in c.verify()}

    assert details == dict.fromkeys(("a", "b"), (
        "its sha512 is %s, the image's is %s; its bytes are shared with 1 "
        "other base(s) (hard links), each verified on its own record"
        % (found, expected)))


class SizelessSource(fakes.FakeSource):
    """Records no size, so only the cached base's own record tells it."""

    def get_meta(self, image_id):
        return dataclasses.replace(super().get_meta(image_id), size=None,
                                   virtual_size=None)


def test_a_cached_base_larger_than_the_disk_is_never_linked(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, {"a": RAW, "b": RAW},
             source=SizelessSource)
    c.get("a")
    with pytest.raises(exception.InvalidImageSize):
        c.get("b", requested_size=len(RAW) - 1)
    assert not os.path.exists(base(c, "b"))
