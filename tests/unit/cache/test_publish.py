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

"""Publishing never replaces: records first, bases by no-replace link, a
name taken meanwhile adopted or skipped."""

import json
import os
from unittest import mock

import pytest

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.common import fileio
from imagebackend import exception
from tests import fakes

RAW = fakes.RAW_IMAGE


@pytest.fixture
def c(img_cache):
    return img_cache


def test_a_record_is_published_only_where_none_is(c):
    c.store.ensure_dirs()
    path = c.base_path("r.json")
    assert cache_publish.publish_record(path, {"a": 1}) is None
    assert cache_publish.publish_record(path, {"a": 2}) == {"a": 1}
    assert json.load(open(path)) == {"a": 1}
    assert not [n for n in os.listdir(c.base_dir) if n.endswith(".tmp")]


def _record(c, **changes):
    entry, _ = c.get("img")
    record = dict(entry.record, **changes)
    return entry, record


def test_a_base_published_meanwhile_with_the_same_bytes_is_adopted(c):
    entry, record = _record(c)
    path, fd = fakes.scratch_base(c, RAW)
    try:
        got = cache_publish.publish_base(c.store, entry.cache_id, fd, path,
                                         dict(record, created_at="later"))
    finally:
        os.close(fd)
    assert got["created_at"] == entry.record["created_at"]
    assert got["generation"] == 1
    assert not os.path.exists(path)
    assert json.load(open(entry.path + ".json")) == entry.record


def test_other_bytes_under_a_taken_name_go_to_the_next_generation(c):
    entry, record = _record(c)
    before = os.stat(entry.path)
    path, fd = fakes.scratch_base(c, b"other bytes")
    other = dict(record, identity="changed", virtual_size=11,
                 checksum={"algo": "sha512", "value": "0" * 128})
    try:
        got = cache_publish.publish_base(c.store, entry.cache_id, fd, path,
                                         other)
    finally:
        os.close(fd)
    assert got["generation"] == 2
    assert os.path.samestat(os.stat(entry.path), before)   # untouched
    with open(c.base_path(entry.cache_id + "-2"), "rb") as f:
        assert f.read() == b"other bytes"
    assert json.load(open(entry.path + ".json")) == entry.record


def test_a_stale_record_is_never_replaced(c):
    entry, record = _record(c)
    os.unlink(entry.path)           # moved aside, its record marked stale
    c.store.mark_stale(entry.cache_id, "corrupt")
    stale = json.load(open(entry.path + ".json"))
    path, fd = fakes.scratch_base(c, RAW)
    try:
        got = cache_publish.publish_base(c.store, entry.cache_id, fd, path,
                                         dict(record))
    finally:
        os.close(fd)
    assert got["generation"] == 2
    assert json.load(open(entry.path + ".json")) == stale
    assert not os.path.exists(entry.path)


def test_publishing_gives_up_cleanly_when_every_name_is_taken(c):
    entry, record = _record(c)
    path, fd = fakes.scratch_base(c, b"other bytes")
    other = dict(record, identity="changed")
    try:
        with mock.patch.object(cache_publish, "_adopt", return_value=None), \
                mock.patch.object(cache_publish, "publish_record",
                                  return_value={"identity": "theirs"}):
            with pytest.raises(exception.CachePublishConflict) as err:
                cache_publish.publish_base(c.store, entry.cache_id, fd,
                                           path, other)
    finally:
        os.close(fd)
    assert "img" in str(err.value) and "retry" in str(err.value)


def test_a_sized_base_gets_its_own_record_before_it_is_published(c):
    entry, _ = c.get("img")
    final = c.sized_path(entry.cache_id, 4 * fakes.MiB)
    seen = []
    real = fileio.publish_fd

    def spy(fd, path, name):
        if name == final:
            seen.append(os.path.exists(final + ".json"))
        return real(fd, path, name)

    def build(fd, tmp):
        os.write(fd, RAW[:4096])
        os.ftruncate(fd, 4 * fakes.MiB)

    with mock.patch.object(fileio, "publish_fd", side_effect=spy):
        assert c.publish_derived(final, os.path.basename(final),
                                 build) is False
    record = json.load(open(final + ".json"))
    assert seen == [True]
    assert record["kind"] == "sized" and record["image_id"] == "img"
    assert record["base"] == entry.cache_id
    assert record["size"] == 4 * fakes.MiB and record["format"] == "raw"
    content = RAW[:4096] + bytes(4 * fakes.MiB - 4096)
    assert record["digest"] == {
        "scheme": "sparse-64k-xxh3-padded",
        "value": fakes.sparse_digest(content, "sparse-64k-xxh3-padded")}
    assert not [n for n in os.listdir(c.base_dir)
                if cache_layout.parse(n) and cache_layout.parse(n).is_scratch]


def test_a_sized_base_published_meanwhile_is_adopted_not_replaced(c):
    entry, _ = c.get("img")
    final = c.sized_path(entry.cache_id, 4 * fakes.MiB)

    def build(fd, tmp):
        os.ftruncate(fd, 4 * fakes.MiB)
        # Another host (locking elsewhere) publishes it meanwhile.
        with open(final, "wb") as f:
            f.truncate(4 * fakes.MiB)
        theirs.append(os.stat(final))

    theirs = []
    assert c.publish_derived(final, os.path.basename(final), build) is True
    assert os.path.samestat(os.stat(final), theirs[0])
