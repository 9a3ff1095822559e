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

"""Pruning decisions (ages, LRU, space) and the removal protocol."""

import dataclasses
import os
import threading
import types
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend.cache import prune as cache_prune
from imagebackend.cache import results as cache_results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import usage as cache_usage
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from tests import fakes
from tests.unit.cache import test_usage

MiB = 1024 * 1024
NOW = 1_000_000.0


@dataclasses.dataclass
class F:
    """Just what the selection functions read of a cached file."""

    label: str
    kind: str = "base"
    last_used: float = NOW
    stale: bool = False
    allocated: int = MiB
    record: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self):
        return types.SimpleNamespace(name=self.label)

    @property
    def stale_reason(self):
        return self.record.get("stale_reason", "marked")


def labels(chosen):
    return [f.label for f, _ in chosen]


def test_ages_are_separate_for_original_and_sized_bases():
    files = [F("old-base", last_used=NOW - 500),
             F("young-base", last_used=NOW - 50),
             F("old-sized", "sized", last_used=NOW - 200),
             F("young-sized", "sized", last_used=NOW - 50)]
    chosen = cache_prune.expired(files, NOW, original_age=100,
                                 resized_age=100)
    assert labels(chosen) == ["old-base", "old-sized"]
    chosen = cache_prune.expired(files, NOW, original_age=1000,
                                 resized_age=100)
    assert labels(chosen) == ["old-sized"]
    assert "unused for 200 s (limit 100 s)" in chosen[0][1]
    assert labels(cache_prune.expired(files, NOW, 0, 0)) == [
        "old-base", "old-sized", "young-base", "young-sized"]


def test_stale_bases_go_whatever_their_age():
    files = [F("fresh-stale", stale=True,
               record={"stale_reason": "invalidated"}), F("fresh")]
    chosen = cache_prune.expired(files, NOW, 10 ** 6, 10 ** 6)
    assert labels(chosen) == ["fresh-stale"]
    assert chosen[0][1] == "stale (invalidated)"


def test_lru_orders_by_last_use_then_name():
    files = [F("c", last_used=3), F("b", last_used=1), F("a", last_used=3)]
    assert [f.label for f in cache_prune.lru(files)] == ["b", "a", "c"]


@pytest.mark.parametrize("size, free, max_size, min_free, need", [
    (10, 100, 0, 0, 0),         # no limits
    (10, 100, 4, 0, 6),         # over max_size
    (10, 100, 20, 0, 0),
    (10, 100, 0, 130, 30),      # below min_free_space
    (10, 100, 4, 103, 6),       # both: the larger need wins
    (10, 100, 9, 150, 50),
    (10, None, 0, 150, 0),      # free space unknown
])
def test_space_to_free(size, free, max_size, min_free, need):
    assert cache_prune.space_to_free(size, free, max_size, min_free) == need


def limits(conf, fs_size):
    return cache_prune.space_limits(cache_prune.Policy.from_conf(conf),
                                    fs_size)


def test_space_limits_take_suffixes_and_percentages(tmp_path):
    conf = fakes.conf(tmp_path)
    assert limits(conf, 1000) == (0, 0)
    conf.set_override("max_size", "2G", group="image_cache")
    conf.set_override("min_free_space", "10%", group="image_cache")
    assert limits(conf, 1000) == (2 << 30, 100)
    conf.set_override("min_free_space", "512M", group="image_cache")
    assert limits(conf, 1000)[1] == 512 * MiB


@pytest.mark.parametrize("option, value", [
    ("max_size", "lots"), ("max_size", "10%"), ("min_free_space", "150%"),
    ("min_free_space", "-1G"),
])
def test_bad_space_limits_name_the_option(tmp_path, option, value):
    conf = fakes.conf(tmp_path)
    conf.set_override(option, value, group="image_cache")
    with pytest.raises(exception.ConfigurationError) as err:
        limits(conf, 1000)
    assert "[image_cache] %s" % option in str(err.value)


# -- the removal protocol, on real files with a fake source ----------------

@pytest.fixture
def c(tmp_path):
    conf = fakes.conf(tmp_path)
    q = mock.create_autospec(qemu_img.QemuImg, instance=True)
    source = fakes.FakeSource(conf, images={"img": b"x" * MiB})
    return cache.ImageCache(conf, source, q)


def scanned(c, name):
    layout = cache_scan.scan(c.base_dir)
    return next(f for f in layout.bases if f.name.name == name)


def test_a_disk_registered_after_the_scan_keeps_its_base(c):
    entry, _ = c.get("img")
    f = scanned(c, entry.cache_id)
    assert c.scanner.scan().users == {}
    # A create finishes between the pruner's scan and its locks.
    disk = test_usage.overlay(
        os.path.join(c.instances_path, "..", "vm", "disk"), entry.path)
    c.register_disk(disk, entry, entry.path)
    report = cache_results.PruneReport()
    assert c.remover.remove_base(f, "test", report) is False
    assert report.kept[0].reason == "in use by %s" % os.path.abspath(disk)
    assert os.path.exists(entry.path)


def test_a_base_used_since_the_scan_is_kept(c):
    entry, _ = c.get("img")
    f = scanned(c, entry.cache_id)
    os.utime(entry.path + ".json", (NOW, NOW))
    report = cache_results.PruneReport()
    assert c.remover.remove_base(f, "test", report) is False
    assert report.kept[0].reason == "used since the scan"


def test_a_base_is_not_removed_while_a_disk_is_being_made(c):
    entry, _ = c.get("img")
    f = scanned(c, entry.cache_id)
    holding, release = threading.Event(), threading.Event()

    def create():
        with c.use("img"):
            holding.set()
            release.wait(10)
    thread = threading.Thread(target=create)
    thread.start()
    holding.wait(10)
    try:
        report = cache_results.PruneReport()
        assert c.remover.remove_base(f, "test", report) is False
        assert report.kept[0].reason.startswith("busy")
    finally:
        release.set()
        thread.join()
    report = cache_results.PruneReport()
    assert c.remover.remove_base(f, "unused", report) is True
    assert not os.path.exists(entry.path)
    assert not os.path.exists(entry.path + ".json")
    assert report.bytes_freed == f.allocated


def test_dry_run_removes_nothing(c):
    entry, _ = c.get("img")
    c.conf.set_override("remove_unused_original_minimum_age_seconds", 0,
                        group="image_cache")
    report = c.prune(dry_run=True)
    assert [r.file for r in report.removed] == [entry.path]
    assert os.path.exists(entry.path)
    report = c.prune()
    assert [r.file for r in report.removed] == [entry.path]
    assert not os.path.exists(entry.path)


def test_nothing_is_removed_while_a_disk_directory_is_missing(c, tmp_path):
    entry, _ = c.get("img")
    c.conf.set_override("remove_unused_original_minimum_age_seconds", 0,
                        group="image_cache")
    c.conf.set_override("disk_dirs", [str(tmp_path / "unmounted")],
                        group="image_cache")
    c2 = cache.ImageCache(c.conf, c.source, c.qemu)
    report = c2.prune()
    assert report.removed == []
    assert "could not read %s" % (tmp_path / "unmounted") in (
        report.kept[0].reason)
    assert os.path.exists(entry.path)
    assert c2.invalidate("img").removed == []
    os.mkdir(tmp_path / "unmounted")
    assert [r.file for r in c2.prune().removed] == [entry.path]


def test_the_record_of_an_existing_raw_disk_is_kept_and_never_parsed(c):
    entry, _ = c.get("img")
    cid = content_digest.cache_id("img")
    disk = os.path.join(c.instances_path, "vm", "disk")
    os.makedirs(os.path.dirname(disk))
    with open(disk, "wb") as f:
        f.write(b"\0" * MiB)        # a raw disk: no header at all
    registry = c.scanner.registry
    path = os.path.join(registry.directory, cid,
                        registry._key(disk) + ".json")
    os.makedirs(os.path.dirname(path))
    fileio.write_json_atomic(path, {
        "disk": disk, "base": entry.path, "image_id": "img",
        "format": "raw", "host": registry.host, "created_at": 0})
    with mock.patch.object(cache_usage, "read_backing_file",
                           autospec=True) as read:
        report = c.prune()
    read.assert_not_called()
    assert report.registry_records_removed == 0
    assert os.path.exists(path)
    os.unlink(disk)
    assert c.prune().registry_records_removed == 1
    assert not os.path.exists(path)


@pytest.mark.parametrize("damage", ["missing", "symlink", "not json"])
def test_a_base_without_a_valid_record_goes_once_nothing_uses_it(
        c, tmp_path, damage):
    entry, _ = c.get("img")
    record = entry.path + ".json"
    os.unlink(record)
    if damage == "symlink":
        (tmp_path / "decoy.json").write_text("{}")
        os.symlink(tmp_path / "decoy.json", record)
    elif damage == "not json":
        with open(record, "w") as f:
            f.write("{")
    report = c.prune()      # whatever its age
    assert [(r.file, r.reason) for r in report.removed] == [
        (entry.path, "stale (it has no valid record)")]
    assert (tmp_path / "decoy.json").exists() == (damage == "symlink")
