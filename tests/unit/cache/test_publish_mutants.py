#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""Publishing, case by case: the exact record written, what is adopted,
what sends a fetch to the next generation, and the errors it raises."""

import errno
import hashlib
import json
import logging
import os
from unittest import mock

import pytest

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.cache import verify as cache_verify
from imagebackend.common import fileio
from imagebackend import exception
from tests import fakes

RAW = fakes.RAW_IMAGE


@pytest.fixture
def c(img_cache):
    return img_cache


@pytest.fixture
def entry(c):
    return c.get("img")[0]


def publish(c, stem, data, record):
    path, fd = fakes.scratch_base(c, data)
    try:
        return cache_publish.publish_base(c.store, stem, fd, path, record), \
            path
    finally:
        os.close(fd)


def record_of(data, **changes):
    record = {"image_id": "img", "identity": "id-1",
              "checksum": {"algo": "sha512",
                           "value": hashlib.sha512(data).hexdigest()},
              "source_format": "raw", "format": "raw",
              "virtual_size": len(data), "created_at": "now"}
    record.update(changes)
    return record


def next_stem(stem, gen):
    return cache_layout.stem(cache_layout.parse(stem).cid, gen)


# -- records ------------------------------------------------------------------

def test_a_record_is_written_whole_sorted_and_readable(c):
    c.store.ensure_dirs()
    path = c.base_path("r.json")
    written = []
    real = os.write

    def write(fd, data):
        # A short write each time: the rest must still be written.
        written.append(len(data))
        return real(fd, bytes(data[:3]))

    old = os.umask(0o077)
    try:
        with mock.patch.object(os, "write", side_effect=write):
            assert cache_publish.publish_record(
                path, {"b": 1, "a": [2]}) is None
    finally:
        os.umask(old)
    with open(path) as f:
        assert f.read() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    assert len(written) > 1
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(c.base_dir) == ["r.json"]


def test_a_record_is_fsynced_under_a_hidden_name_then_linked(c):
    c.store.ensure_dirs()
    path = c.base_path("r.json")
    events = []
    real_fsync, real_publish = os.fsync, fileio.publish_fd

    def fsync(fd):
        events.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
        return real_fsync(fd)

    def publish_fd(fd, tmp, final):
        events.append(("publish", tmp, final))
        return real_publish(fd, tmp, final)

    with mock.patch.object(os, "fsync", side_effect=fsync), \
            mock.patch.object(fileio, "publish_fd", side_effect=publish_fd):
        cache_publish.publish_record(path, {"a": 1})
    tmp = events[0][1]
    assert events == [("fsync", tmp), ("publish", tmp, path)]
    assert os.path.dirname(tmp) == c.base_dir
    assert os.path.basename(tmp).startswith(".")
    assert tmp.endswith(".json.tmp")


def test_an_unreadable_record_in_the_way_is_an_empty_record(c):
    c.store.ensure_dirs()
    path = c.base_path("r.json")
    open(path, "wb").close()            # empty: not a record
    assert cache_publish.publish_record(path, {"a": 1}) == {}
    assert os.path.getsize(path) == 0
    assert os.listdir(c.base_dir) == ["r.json"]


def test_a_record_that_cannot_be_written_leaves_nothing(c):
    c.store.ensure_dirs()
    path = c.base_path("r.json")
    with mock.patch.object(os, "fsync", side_effect=OSError(
            errno.EIO, "I/O error")):
        with pytest.raises(OSError):
            cache_publish.publish_record(path, {"a": 1})
    assert os.listdir(c.base_dir) == []


# -- errors -------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_a_filesystem_without_no_replace_publishing_is_named(code):
    err = cache_publish.publish_error("/c/_base/abc", OSError(code, "x"))
    assert type(err) is exception.CacheError
    assert err.path == "/c/_base"
    assert err.reason == (
        "its filesystem supports neither hard links nor renaming without "
        "replacing, so the cache cannot publish abc safely there; put the "
        "cache on a filesystem that does (any local filesystem, NFS, "
        "CephFS)")


def test_another_publish_failure_names_the_cause_and_the_fix():
    err = cache_publish.publish_error(
        "/c/_base/abc", OSError(errno.ENOSPC, "No space left on device"))
    assert err.path == "/c/_base"
    assert err.reason == (
        "publishing abc failed (No space left on device); check the free "
        "space and permissions of the cache directory")
    err = cache_publish.publish_error("/c/_base/abc", OSError("odd"))
    assert err.reason.startswith("publishing abc failed (odd); ")


# -- what counts as the same content ------------------------------------------

OURS = {"image_id": "img", "identity": "i", "checksum": {"v": 1},
        "source_format": "qcow2", "format": "raw", "virtual_size": 10,
        "created_at": "ours", "base_checksum": {"value": "abc"}}


def test_a_record_of_the_same_content_is_the_same():
    found = dict(OURS, created_at="theirs", generation=3)
    assert cache_publish._same_content(found, OURS) is True


@pytest.mark.parametrize("key", ["image_id", "identity", "checksum",
                                 "source_format", "format", "virtual_size"])
def test_any_content_field_differing_is_other_content(key):
    assert cache_publish._same_content(dict(OURS, **{key: "other"}),
                                       OURS) is False


def test_no_record_or_a_stale_one_is_never_the_same():
    assert cache_publish._same_content({}, OURS) is False
    assert cache_publish._same_content(None, OURS) is False
    assert cache_publish._same_content(dict(OURS, stale=True),
                                       OURS) is False


@pytest.mark.parametrize("mine,theirs,same", [
    ("abc", "abc", True), ("abc", "abd", False), ("abc", None, True),
    (None, "abd", True), (None, None, True)])
def test_base_digests_are_compared_when_both_have_one(mine, theirs, same):
    ours = dict(OURS, base_checksum={"value": mine} if mine else None)
    found = dict(OURS, base_checksum={"value": theirs} if theirs else None)
    assert cache_publish._same_content(found, ours) is same


# -- publish_base -------------------------------------------------------------

def test_a_free_name_gets_the_record_then_the_base_then_a_dir_fsync(c):
    c.store.ensure_dirs()
    cid = "f" * 40
    data = b"bytes of the base"
    events = []
    real_publish, real_fsync_dir = fileio.publish_fd, fileio.fsync_dir

    def publish_fd(fd, tmp, final):
        events.append(os.path.basename(final))
        return real_publish(fd, tmp, final)

    def fsync_dir(path):
        events.append(("fsync_dir", path))
        return real_fsync_dir(path)

    with mock.patch.object(fileio, "publish_fd", side_effect=publish_fd), \
            mock.patch.object(fileio, "fsync_dir", side_effect=fsync_dir):
        got, path = publish(c, cid + "-3", data, record_of(data))
    assert events == [cid + "-3.json", cid + "-3", ("fsync_dir", c.base_dir)]
    assert got == dict(record_of(data), generation=3)
    with open(c.base_path(cid + "-3.json")) as f:
        assert json.load(f) == got
    with open(c.base_path(cid + "-3"), "rb") as f:
        assert f.read() == data
    assert not os.path.exists(path)


def test_a_record_published_meanwhile_for_the_same_content_is_kept(c):
    """Another fetch published its record and not yet its base: ours is
    linked under its record, which is what is returned.
    """
    c.store.ensure_dirs()
    cid = "e" * 40
    data = b"the same bytes"
    theirs = dict(record_of(data), generation=1, created_at="before")
    fileio.write_json_atomic(c.base_path(cid + ".json"), theirs)
    got, path = publish(c, cid, data, record_of(data))
    assert got == theirs
    with open(c.base_path(cid), "rb") as f:
        assert f.read() == data
    with open(c.base_path(cid + ".json")) as f:
        assert json.load(f) == theirs


def test_a_base_appearing_with_other_bytes_is_marked_stale_and_skipped(
        c, caplog):
    c.store.ensure_dirs()
    cid = "d" * 40
    data = b"our bytes"
    real = fileio.publish_fd

    def publish_fd(fd, tmp, final):
        if final == c.base_path(cid):
            with open(final, "wb") as f:    # another host, meanwhile
                f.write(b"not ours!")
        return real(fd, tmp, final)

    with mock.patch.object(fileio, "publish_fd", side_effect=publish_fd), \
            caplog.at_level(logging.WARNING, logger=cache_publish.__name__):
        got, path = publish(c, cid, data, record_of(data))
    assert got["generation"] == 2
    with open(c.base_path(cid + "-2"), "rb") as f:
        assert f.read() == data
    first = cache_layout.read_record(c.base_path(cid + ".json"))
    assert first["stale"] is True
    assert first["stale_reason"] == (
        "its base does not hold the bytes its record describes")
    with open(c.base_path(cid), "rb") as f:
        assert f.read() == b"not ours!"
    assert [r.getMessage() for r in caplog.records] == [
        "Generation %s of image img was published meanwhile with other "
        "content (another host locking elsewhere?); publishing the next "
        "generation" % cid]


def test_a_base_appearing_with_our_bytes_is_adopted(c, caplog):
    c.store.ensure_dirs()
    cid = "a" * 40
    data = b"our bytes"
    real = fileio.publish_fd

    def publish_fd(fd, tmp, final):
        if final == c.base_path(cid):
            with open(final, "wb") as f:
                f.write(data)
            theirs.append(os.stat(final))
        return real(fd, tmp, final)

    theirs = []
    with mock.patch.object(fileio, "publish_fd", side_effect=publish_fd), \
            caplog.at_level(logging.INFO, logger=cache_publish.__name__):
        got, path = publish(c, cid, data, record_of(data))
    assert got == dict(record_of(data), generation=1)
    assert os.path.samestat(os.stat(c.base_path(cid)), theirs[0])
    assert not os.path.exists(path)
    assert sorted(os.listdir(c.base_dir)) == [cid, cid + ".json"]
    assert ("Image img was published as %s by another fetch meanwhile; "
            "using it" % c.base_path(cid)) in [
                r.getMessage() for r in caplog.records]


def test_a_raw_base_of_another_size_is_not_adopted(c, entry):
    with open(entry.path, "ab") as f:      # its record says otherwise
        f.write(b"x")
    got, _ = publish(c, entry.cache_id, RAW, dict(entry.record))
    assert got["generation"] == 2
    assert os.path.getsize(c.base_path(entry.cache_id + "-2")) == len(RAW)


def test_a_non_raw_base_is_not_checked_by_its_size(c, entry):
    """A qcow2 base's length is not its virtual size: a same record
    there is adopted whatever its length.
    """
    record = dict(entry.record, format="qcow2", source_format="qcow2",
                  virtual_size=123)
    fileio.write_json_atomic(entry.path + ".json", dict(record))
    got, path = publish(c, entry.cache_id, RAW, dict(record))
    assert got["generation"] == 1
    assert not os.path.exists(path)


def test_a_name_taken_by_a_symlink_is_refused(c, entry):
    os.unlink(entry.path)
    os.symlink("/etc/passwd", entry.path)
    with pytest.raises(exception.UnsafeCachePath):
        publish(c, entry.cache_id, RAW, dict(entry.record))


def test_a_taken_name_without_a_record_sends_it_on(c, entry):
    os.unlink(entry.path + ".json")
    got, _ = publish(c, entry.cache_id, RAW, dict(entry.record))
    assert got["generation"] == 2
    assert not os.path.exists(entry.path + ".json")


def test_a_taken_name_with_a_stale_record_is_never_adopted(c, entry):
    """Even holding the very bytes: a stale base is used by no new disk."""
    c.store.mark_stale(entry.cache_id, "superseded")
    got, _ = publish(c, entry.cache_id, RAW, dict(entry.record))
    assert got["generation"] == 2
    assert "stale" not in got
    assert cache_layout.read_record(entry.path + ".json")["stale"] is True


def test_other_bytes_go_to_one_above_the_highest_generation(c, entry):
    # Generation 4 was claimed by someone (its record only).
    fileio.write_json_atomic(c.base_path(entry.cache_id + "-4.json"),
                             {"image_id": "img"})
    got, _ = publish(c, entry.cache_id, b"other",
                     dict(entry.record, identity="changed"))
    assert got["generation"] == 5
    assert os.path.exists(c.base_path(entry.cache_id + "-5"))


def test_each_try_is_a_new_generation_and_it_gives_up_after_five(c):
    c.store.ensure_dirs()
    cid = "c" * 40
    assert cache_generations.claim_generation(c.base_dir, cid, 1) == 1
    stems = []

    def publish_record(path, record):
        stems.append((os.path.basename(path), record["generation"]))
        return {"identity": "theirs"}

    with mock.patch.object(cache_publish, "publish_record",
                           side_effect=publish_record), \
            mock.patch.object(cache_publish, "_adopt", return_value=None):
        with pytest.raises(exception.CachePublishConflict) as err:
            publish(c, cid, b"other", record_of(b"other"))
    assert stems == [(cid + ".json", 1)] + [
        ("%s-%d.json" % (cid, n), n) for n in range(2, 6)]
    assert err.value.path == c.base_dir
    assert err.value.image_id == "img"
    assert err.value.reason == (
        "other content was published under each of 5 generation names "
        "while it was being fetched")


def test_a_publish_failure_names_the_base(c):
    c.store.ensure_dirs()
    cid = "b" * 40
    with mock.patch.object(fileio, "publish_fd", side_effect=OSError(
            errno.EINVAL, "Invalid argument")):
        with pytest.raises(exception.CacheError) as err:
            publish(c, cid + "-2", b"x", record_of(b"x"))
    assert err.value.path == c.base_dir
    assert "cannot publish %s-2 safely" % cid in err.value.reason
    assert isinstance(err.value.__cause__, OSError)


# -- whether a file holds a record's bytes ------------------------------------

def test_holds_compares_the_base_digest_when_there_is_one(tmp_path):
    path = str(tmp_path / "b")
    with open(path, "wb") as f:
        f.write(RAW)
    record = {"base_checksum": cache_verify.sparse_digest(path),
              "checksum": {"algo": "sha512", "value": "wrong"}}
    assert cache_publish._holds(path, record) is True
    record["base_checksum"] = dict(record["base_checksum"], value="0" * 32)
    assert cache_publish._holds(path, record) is False


def test_holds_compares_the_download_digest_otherwise(tmp_path):
    path = str(tmp_path / "b")
    with open(path, "wb") as f:
        f.write(RAW)
    record = {"checksum": {"algo": "sha256",
                           "value": hashlib.sha256(RAW).hexdigest()}}
    assert cache_publish._holds(path, record) is True
    record["checksum"]["value"] = hashlib.sha256(b"x").hexdigest()
    assert cache_publish._holds(path, record) is False
    record["base_checksum"] = None
    assert cache_publish._holds(path, record) is False


def test_holds_is_false_for_an_unknown_algorithm(tmp_path):
    path = str(tmp_path / "b")
    with open(path, "wb") as f:
        f.write(RAW)
    assert cache_publish._holds(
        path, {"checksum": {"algo": "nohash", "value": "0"}}) is False


def test_a_same_content_record_is_trusted_without_hashing_its_base(c,
                                                                   entry):
    """The other fetch checked those bytes: only a base whose record is
    ours (published by us, the base appearing after) is hashed.
    """
    with open(entry.path, "r+b") as f:
        f.write(b"X")                   # same length, other bytes
    with mock.patch.object(cache_verify, "digests",
                           wraps=cache_verify.digests) as digests:
        got, _ = publish(c, entry.cache_id, RAW, dict(entry.record))
    assert got == entry.record
    digests.assert_not_called()
    assert not cache_layout.read_record(entry.path + ".json").get("stale")
