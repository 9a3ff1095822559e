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

"""Pruning, exactly: the policy read from the options, the space limits,
the age boundaries, what each removal reports, the locks leftovers are
removed under, what collection removes and keeps, and invalidation.

Real cache directories in ``tmp_path``; only the clock and the
filesystem's size are fixed where an exact number is asserted.
"""

import contextlib
import os
import threading
import types
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.cache import prune as cache_prune
from imagebackend.cache import results as cache_results
from imagebackend.cache import scan as cache_scan
from imagebackend.common import digest as content_digest
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import img as qemu_img
from tests import fakes
from tests.unit.cache import test_prune
from tests.unit.cache import test_usage

MiB = 1024 * 1024
NOW = 2_000_000_000.0
DAY = cache_layout.SCRATCH_MINIMUM_AGE
TOKEN = "0123456789ab"
NEVER = 10 ** 9      # an age no test file reaches


@pytest.fixture
def c(tmp_path):
    conf = fakes.conf(tmp_path)
    q = mock.create_autospec(qemu_img.QemuImg, instance=True)
    source = fakes.FakeSource(conf, images={
        "a": b"a" * MiB, "b": b"b" * MiB, "c": b"c" * MiB})
    return cache.ImageCache(conf, source, q)


def cid(image_id):
    return content_digest.cache_id(image_id)


def fetched(c, *image_ids, last_used=None):
    """Fetch ``image_ids``; the i-th was last used ``last_used[i]``."""
    entries = []
    for i, image_id in enumerate(image_ids):
        entry, _ = c.get(image_id)
        if last_used is not None:
            os.utime(entry.path + ".json", (last_used[i], last_used[i]))
        entries.append(entry)
    return entries


def allocated(path):
    return os.stat(path).st_blocks * 512


def write(path, data, mtime=None):
    with open(path, "wb") as f:
        f.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def prune(c, *, dry_run=False, now=NOW, statvfs=None, **policy):
    """Prune ``c`` at time ``now`` (and on a filesystem ``statvfs`` says,
    if given); ages default to never.
    """
    policy.setdefault("original_age", NEVER)
    policy.setdefault("resized_age", NEVER)
    clock = types.SimpleNamespace(time=lambda: now)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(cache_prune, "time", clock))
        if statvfs is not None:
            stack.enter_context(mock.patch.object(
                os, "statvfs", return_value=statvfs))
        return c.pruner.prune(cache_prune.Policy(**policy), dry_run=dry_run)


def removed(report):
    return [(r.file, r.kind, r.reason, r.size) for r in report.removed]


def kept(report):
    return [(k.file, k.reason) for k in report.kept]


@contextlib.contextmanager
def held(cm):
    """Hold context manager ``cm`` in another thread meanwhile."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with cm:
            holding.set()
            release.wait(10)
    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join()


# -- the policy and the space limits ------------------------------------------

def test_policy_from_conf_reads_every_option(tmp_path):
    conf = fakes.conf(tmp_path)
    assert cache_prune.Policy.from_conf(conf) == cache_prune.Policy(
        original_age=86400, resized_age=3600, max_size="0",
        min_free_space="0")
    for name, value in [
            ("remove_unused_original_minimum_age_seconds", 7),
            ("remove_unused_resized_minimum_age_seconds", 5),
            ("max_size", "3G"), ("min_free_space", "9%")]:
        conf.set_override(name, value, group="image_cache")
    assert cache_prune.Policy.from_conf(conf) == cache_prune.Policy(
        original_age=7, resized_age=5, max_size="3G", min_free_space="9%")
    conf.set_override("max_size", "", group="image_cache")
    conf.set_override("min_free_space", "", group="image_cache")
    policy = cache_prune.Policy.from_conf(conf)
    assert (policy.max_size, policy.min_free_space) == ("0", "0")


@pytest.mark.parametrize("max_size, min_free, fs_size, expected", [
    (" 2G ", " 10% ", 1000, (2 << 30, 100)),
    ("", "", 1000, (0, 0)),
    (None, None, 1000, (0, 0)),
    ("1024", "0%", 1000, (1024, 0)),
    ("1K", "100%", 1000, (1024, 1000)),
    ("0", "12.5%", 1000, (0, 125)),
    ("0", "33%", 1001, (0, 330)),
])
def test_space_limits_exactly(max_size, min_free, fs_size, expected):
    policy = cache_prune.Policy(max_size=max_size, min_free_space=min_free)
    assert cache_prune.space_limits(policy, fs_size) == expected


@pytest.mark.parametrize("option, value, fix", [
    ("max_size", "lots", "suffix, or 0"),
    ("max_size", "10%", "suffix, or 0"),
    ("min_free_space", "100.5%", "suffix, a percentage, or 0"),
    ("min_free_space", "-1%", "suffix, a percentage, or 0"),
    ("min_free_space", "x%", "suffix, a percentage, or 0"),
    ("min_free_space", "1Q", "suffix, a percentage, or 0"),
])
def test_a_bad_space_limit_says_which_and_how_to_fix_it(option, value, fix):
    policy = cache_prune.Policy(**{option: value})
    with pytest.raises(exception.ConfigurationError) as err:
        cache_prune.space_limits(policy, 1000)
    assert str(err.value) == (
        "Invalid configuration: [image_cache] %s = %r is not a size; give "
        "bytes, a number with a K, M, G or T %s" % (option, value, fix))


# -- selection --------------------------------------------------------------

def test_an_age_equal_to_the_limit_is_old_enough():
    files = [test_prune.F("at", last_used=NOW - 100),
             test_prune.F("under", last_used=NOW - 99),
             test_prune.F("sized-at", "sized", last_used=NOW - 50),
             test_prune.F("sized-under", "sized", last_used=NOW - 49)]
    chosen = cache_prune.expired(files, NOW, 100, 50)
    assert [(f.label, why) for f, why in chosen] == [
        ("at", "unused for 100 s (limit 100 s)"),
        ("sized-at", "unused for 50 s (limit 50 s)")]


def test_a_stale_base_does_not_end_the_selection():
    files = [test_prune.F("stale", stale=True, last_used=NOW - 500),
             test_prune.F("old", last_used=NOW - 400),
             test_prune.F("stale-too", stale=True, last_used=NOW)]
    chosen = cache_prune.expired(files, NOW, 300, 300)
    assert [(f.label, why) for f, why in chosen] == [
        ("stale", "stale (marked)"),
        ("old", "unused for 400 s (limit 300 s)"),
        ("stale-too", "stale (marked)")]


# -- prune: what it measures and removes --------------------------------------

def fs(blocks, frsize, avail):
    return types.SimpleNamespace(f_blocks=blocks, f_frsize=frsize,
                                 f_bavail=avail)


def test_no_cache_directory_means_an_empty_report(c):
    report = prune(c, original_age=0)
    assert report == cache_results.PruneReport()
    assert not os.path.exists(c.base_dir)


def test_cache_size_counts_bases_scratch_and_moved_aside_files(c):
    a, = fetched(c, "a", last_used=[NOW])
    scratch = write(os.path.join(c.base_dir, "%s.part-%s" % (
        cid("b"), TOKEN)), b"s" * 8192, NOW)
    aside = write(os.path.join(c.base_dir, cid("c") + ".corrupt"),
                  b"x" * 3 * 4096, NOW)
    temp = write(os.path.join(c.base_dir, ".x.json.tmp"), b"t" * 4096, NOW)
    expected = (allocated(a.path) + sparseio.allocated_bytes(scratch)
                + allocated(aside))
    assert allocated(temp) > 0      # ... which is not counted
    report = prune(c, statvfs=fs(1000, 512, 300), dry_run=True)
    assert report.cache_size == expected
    assert report.free_space == 300 * 512
    assert report.removed == [] and report.space_target_met is True


def test_a_percentage_of_free_space_is_of_the_filesystems_size(c):
    a, b = fetched(c, "a", "b", last_used=[NOW - 2, NOW - 1])
    # 10% of 2000 blocks of 4096 bytes must be free; 200 blocks are, less
    # one base's worth.
    size_a = allocated(a.path)
    short = size_a // 4096
    report = prune(c, statvfs=fs(2000, 4096, 200 - short),
                   min_free_space="10%")
    assert removed(report) == [(a.path, "base", "least recently used; "
                                "freeing space", size_a)]
    assert report.space_target_met is True
    assert report.free_space == 200 * 4096
    assert os.path.exists(b.path)


def test_space_is_freed_lru_first_and_no_further_than_needed(c):
    a, b, d = fetched(c, "a", "b", "c",
                      last_used=[NOW - 30, NOW - 20, NOW - 10])
    size_a, size_b = allocated(a.path), allocated(b.path)
    size = sum(allocated(e.path) for e in (a, b, d))
    # Exactly one base too many.
    report = prune(c, max_size=str(size - size_a))
    assert [r.file for r in report.removed] == [a.path]
    assert report.space_target_met is True
    assert report.cache_size == size - size_a
    # One byte more than the next base: two more go.
    report = prune(c, max_size=str(size - size_a - size_b - 1))
    assert [r.file for r in report.removed] == [b.path, d.path]
    assert report.kept == []
    assert report.space_target_met is True


def test_the_space_target_is_unmet_when_only_bases_in_use_are_left(c):
    a, b = fetched(c, "a", "b", last_used=[NOW - 20, NOW - 10])
    disk = test_usage.overlay(os.path.join(c.instances_path, "vm", "disk"),
                              b.path)
    report = prune(c, max_size="1")
    assert [r.file for r in report.removed] == [a.path]
    assert kept(report) == [(b.path, "in use by 1 disk(s)")]
    assert report.space_target_met is False
    assert os.path.exists(disk) and os.path.exists(b.path)


def test_expired_bases_count_towards_the_space_to_free(c):
    a, b, d = fetched(c, "a", "b", "c",
                      last_used=[NOW - 300, NOW - 20, NOW - 10])
    size = sum(allocated(e.path) for e in (a, b, d))
    report = prune(c, original_age=100,
                   max_size=str(size - allocated(a.path)
                                - allocated(b.path)))
    assert [(r.file, r.reason) for r in report.removed] == [
        (a.path, "unused for 300 s (limit 100 s)"),
        (b.path, "least recently used; freeing space")]
    # Each base is tried once.
    assert report.kept == []
    assert os.path.exists(d.path)


def test_a_dry_run_neither_removes_nor_collects(c):
    a, = fetched(c, "a", last_used=[NOW])
    record = os.path.join(c.base_dir, cid("b") + ".json")
    write(record, b"{}")
    lock = os.path.join(c.store.lock_dir, cache_locks.LOCK_PREFIX + cid("b"))
    write(lock, b"")
    report = prune(c, original_age=0, dry_run=True)
    assert report.dry_run is True
    assert [r.file for r in report.removed] == [a.path]
    assert os.path.exists(a.path)
    assert os.path.exists(record) and os.path.exists(lock)
    assert report.lock_files_removed == 0
    report = prune(c, original_age=0)
    assert report.dry_run is False
    assert not os.path.exists(a.path)
    assert not os.path.exists(record) and not os.path.exists(lock)


# -- leftovers: scratch, temporary files, moved-aside files -------------------

def test_scratch_goes_at_exactly_the_minimum_age_with_its_size(c):
    c.store.ensure_dirs()
    old = write(os.path.join(c.base_dir, "%s.part-%s" % (cid("a"), TOKEN)),
                b"s" * 8192, NOW - DAY)
    young = write(os.path.join(c.base_dir, "%s.converted-%s" % (
        cid("b"), TOKEN)), b"s", NOW - DAY + 1)
    size = sparseio.allocated_bytes(old)
    report = prune(c)
    assert removed(report) == [(old, "scratch", "orphaned (unmodified for "
                                "%d s, its lock is free)" % DAY, size)]
    assert os.path.exists(young)
    assert report.bytes_freed == size


def test_scratch_is_removed_only_under_its_own_lock(c):
    c.store.ensure_dirs()
    sized = "%s_%d" % (cid("a"), MiB)
    original = write(os.path.join(c.base_dir, "%s.part-%s" % (
        cid("a"), TOKEN)), b"o", NOW - DAY)
    of_sized = write(os.path.join(c.base_dir, "%s.part-%s" % (
        sized, TOKEN)), b"s", NOW - DAY)
    with held(c.store.lock(cid("a"))):
        report = prune(c)
    assert [r.file for r in report.removed] == [of_sized]
    assert os.path.exists(original)
    write(of_sized, b"s", NOW - DAY)
    with held(c.store.lock(sized)):
        report = prune(c)
    assert [r.file for r in report.removed] == [original]
    assert os.path.exists(of_sized)


def test_temporary_record_files_go_after_an_hour(c):
    c.store.ensure_dirs()
    old = write(os.path.join(c.base_dir, ".old.json.tmp"), b"t" * 4096,
                NOW - cache_prune.TEMP_FILE_AGE)
    young = write(os.path.join(c.base_dir, ".young.json.tmp"), b"t",
                  NOW - cache_prune.TEMP_FILE_AGE + 1)
    size = allocated(old)
    report = prune(c)
    assert removed(report) == [(old, "temporary", "left over", size)]
    assert os.path.exists(young)


def test_moved_aside_files_go_at_the_original_age_under_the_image_lock(c):
    c.store.ensure_dirs()
    old = write(os.path.join(c.base_dir, cid("a") + ".corrupt"),
                b"x" * 4096, NOW - 500)
    young = write(os.path.join(c.base_dir, cid("b") + ".refused"), b"x",
                  NOW - 499)
    size = allocated(old)
    with held(c.store.lock(cid("a"))):
        report = prune(c, original_age=500, resized_age=1)
    assert report.removed == []
    report = prune(c, original_age=500, resized_age=1)
    assert removed(report) == [(old, "aside", "moved aside 500 s ago",
                                size)]
    assert os.path.exists(young)


def test_leftover_helpers(tmp_path):
    path = write(str(tmp_path / "f"), b"x" * 4096, NOW - 5)
    assert cache_prune._age(path, NOW) == 5
    assert cache_prune._age(str(tmp_path / "gone"), NOW) is None
    assert cache_prune._allocated(path) == sparseio.allocated_bytes(path)
    assert cache_prune._allocated(path) > 0
    assert cache_prune._allocated(str(tmp_path / "gone")) == 0


# -- collection ---------------------------------------------------------------

def test_records_without_bases_go_unless_their_image_is_busy(c):
    a, = fetched(c, "a", last_used=[NOW])
    c.store.ensure_dirs()
    orphan = write(os.path.join(c.base_dir, cid("b") + "-2.json"), b"{}")
    busy = write(os.path.join(c.base_dir, cid("c") + ".json"), b"{}")
    sized = "%s_%d" % (cid("a"), MiB)
    sized_record = write(os.path.join(c.base_dir, sized + ".json"), b"{}")
    with held(c.store.lock(cid("c"))):
        prune(c)
    assert not os.path.exists(orphan)
    assert not os.path.exists(sized_record)
    assert os.path.exists(busy)
    assert os.path.exists(a.path + ".json")
    prune(c)
    assert not os.path.exists(busy)


def test_registry_records_of_deleted_disks_are_counted_per_image(c):
    a, b = fetched(c, "a", "b", last_used=[NOW, NOW])
    registry = c.scanner.registry
    for entry in (a, b):
        registry.add(entry.cache_id, "x", "/deleted/%s" % entry.cache_id,
                     entry.path)
    live = test_usage.overlay(os.path.join(c.instances_path, "vm", "disk"),
                              a.path)
    registry.add(a.cache_id, "a", live, a.path)
    report = prune(c)
    assert report.registry_records_removed == 2
    assert [r["disk"] for r in registry.records()] == [live]
    with held(c.store.lock(a.cache_id)):
        os.unlink(live)
        assert prune(c).registry_records_removed == 0
    assert prune(c).registry_records_removed == 1


def test_lock_files_of_images_no_longer_cached_are_removed(c):
    a, = fetched(c, "a", last_used=[NOW])
    registered = cid("b")
    registry = c.scanner.registry
    registry.host, host = "other-host", registry.host
    registry.add(registered, "b", "/local/to/other/host", a.path)
    registry.host = host
    lock_dir = c.store.lock_dir
    names = {
        "gone": cache_locks.LOCK_PREFIX + cid("c"),
        "gone-use": cache_locks.USE_PREFIX + cid("c"),
        "gone-gen": cache_locks.LOCK_PREFIX + cid("c") + "-3",
        "cached": cache_locks.LOCK_PREFIX + a.cache_id,
        "cached-use": cache_locks.USE_PREFIX + a.cache_id,
        "registered": cache_locks.USE_PREFIX + registered,
        "scratch-like": cache_locks.LOCK_PREFIX + cid("c") + ".part",
        "other": "something-else"}
    for name in names.values():
        write(os.path.join(lock_dir, name), b"")
    report = prune(c)
    assert report.lock_files_removed == 3
    assert report.registry_records_removed == 0
    left = set(os.listdir(lock_dir))
    assert left >= {names[k] for k in ("cached", "cached-use", "registered",
                                       "scratch-like", "other")}
    assert not left & {names[k] for k in ("gone", "gone-use", "gone-gen")}


def test_a_missing_lock_directory_is_not_an_error(c):
    a, = fetched(c, "a", last_used=[NOW])
    with mock.patch.object(cache_prune.os, "listdir",
                           side_effect=FileNotFoundError(2, "gone")):
        report = prune(c, original_age=0)
    assert [r.file for r in report.removed] == [a.path]
    assert report.lock_files_removed == 0


@pytest.mark.parametrize("file_name, expected", [
    (cache_locks.LOCK_PREFIX + "a" * 40, "a" * 40),
    (cache_locks.LOCK_PREFIX + "b" * 40 + "-2", "b" * 40),
    (cache_locks.LOCK_PREFIX + "c" * 40 + "_1024", "c" * 40),
    (cache_locks.USE_PREFIX + "d" * 40, "d" * 40),
    (cache_locks.LOCK_PREFIX + "a" * 40 + ".part", None),
    (cache_locks.LOCK_PREFIX + "not-a-cache-id", None),
    (cache_locks.USE_PREFIX + "not-a-cache-id", None),
    ("a" * 40, None),
    ("x" + cache_locks.LOCK_PREFIX + "a" * 40, None),
])
def test_lock_cid(file_name, expected):
    assert cache_prune._lock_cid(file_name) == expected


# -- what is kept and why -----------------------------------------------------

def test_kept_reasons_name_the_users_or_what_could_not_be_read(c, tmp_path):
    a, = fetched(c, "a", last_used=[NOW])
    for vm in ("vm1", "vm2"):
        test_usage.overlay(os.path.join(c.instances_path, vm, "disk"),
                           a.path)
    assert kept(prune(c, original_age=0)) == [
        (a.path, "in use by 2 disk(s)")]
    layout = cache_scan.scan(c.base_dir)
    usage = types.SimpleNamespace(of=lambda name: [],
                                  unreadable=["/m1", "/m2"])
    report = cache_results.PruneReport()
    assert cache_prune._unused(layout.bases, usage, report) == []
    assert kept(report) == [(a.path, cache_prune._UNREADABLE % "/m1, /m2")]
    assert report.kept[0].reason == (
        "not removed: the search for disks could not read /m1, /m2, so any "
        "base may be in use; fix that and prune again")


# -- invalidation -------------------------------------------------------------

def test_invalidate_marks_every_generation_and_removes_the_unused(c):
    a, = fetched(c, "a")
    size = allocated(a.path)
    # A second generation, in use.
    gen2 = c.store.base_path(cache_layout.stem(a.cache_id, 2))
    write(gen2, b"g" * 4096)
    with open(a.path + ".json", "rb") as f:
        record = f.read()
    write(gen2 + ".json", record.replace(b'"generation": 1',
                                         b'"generation": 2'))
    disk = test_usage.overlay(os.path.join(c.instances_path, "vm", "disk"),
                              gen2)
    result = c.pruner.invalidate("a", a.cache_id)
    assert result.image_id == "a"
    assert result.marked_stale == [a.path, gen2]
    assert [(r.file, r.reason) for r in result.removed] == [
        (a.path, "invalidated")]
    assert result.bytes_freed == size
    assert [(k.file, k.reason) for k in result.kept] == [
        (gen2, "in use by 1 disk(s)")]
    assert not os.path.exists(a.path)
    gen2_record = cache_layout.read_record(gen2 + ".json")
    assert (gen2_record["stale"], gen2_record["stale_reason"]) == (
        True, "invalidated")
    assert os.path.exists(disk)
    # Marked once: a second invalidation marks nothing new.
    assert c.pruner.invalidate("a", a.cache_id).marked_stale == []


def test_invalidate_gives_a_base_without_a_valid_record_a_stale_one(c):
    a, = fetched(c, "a")
    test_usage.overlay(os.path.join(c.instances_path, "vm", "disk"), a.path)
    write(a.path + ".json", b"not json")
    result = c.pruner.invalidate("a", a.cache_id)
    assert result.marked_stale == [a.path]
    assert result.removed == []
    record = cache_layout.read_record(a.path + ".json")
    assert record == {"image_id": "a", "generation": 1, "stale": True,
                      "stale_reason": "invalidated", "unverifiable": True}


def test_invalidating_an_image_not_cached_searches_for_no_disk(c):
    fetched(c, "a")
    with mock.patch.object(c.scanner, "scan", autospec=True) as scan:
        result = c.pruner.invalidate("b", cid("b"))
    scan.assert_not_called()
    assert (result.marked_stale, result.removed, result.kept,
            result.bytes_freed) == ([], [], [], 0)


# -- the last survivors -------------------------------------------------------

def test_pruning_removes_unless_asked_for_a_dry_run(c):
    a, = fetched(c, "a", last_used=[NOW])
    with mock.patch.object(cache_prune, "time",
                           types.SimpleNamespace(time=lambda: NOW)):
        report = c.pruner.prune(cache_prune.Policy(original_age=0))
    assert report.dry_run is False
    assert not os.path.exists(a.path)


def test_one_byte_short_of_the_space_target_is_not_meeting_it(c):
    a, b = fetched(c, "a", "b", last_used=[NOW - 20, NOW - 10])
    size_b = allocated(b.path)
    test_usage.overlay(os.path.join(c.instances_path, "vm", "disk"), b.path)
    report = prune(c, max_size=str(size_b - 1))
    assert [r.file for r in report.removed] == [a.path]
    assert report.cache_size == size_b
    assert report.space_target_met is False


def test_young_scratch_does_not_end_the_search_for_old_scratch(c):
    c.store.ensure_dirs()
    young = write(os.path.join(c.base_dir, "%s.part-%s" % ("0" * 40, TOKEN)),
                  b"y", NOW)
    old = write(os.path.join(c.base_dir, "%s.part-%s" % ("f" * 40, TOKEN)),
                b"o", NOW - DAY)
    report = prune(c)
    assert [r.file for r in report.removed] == [old]
    assert os.path.exists(young)


def test_scratch_of_a_later_generation_is_under_the_images_lock(c):
    c.store.ensure_dirs()
    scratch = write(os.path.join(c.base_dir, "%s-2.part-%s" % (
        cid("a"), TOKEN)), b"o", NOW - DAY)
    with held(c.store.lock(cid("a"))):
        assert prune(c).removed == []
    assert [r.file for r in prune(c).removed] == [scratch]


def test_the_record_of_a_disk_rebased_away_from_the_cache_goes(c):
    a, = fetched(c, "a", last_used=[NOW])
    registry = c.scanner.registry
    disks = {}
    for vm, backing in (("vm1", a.path), ("vm2", "/nowhere/else")):
        disk = test_usage.overlay(
            os.path.join(c.instances_path, vm, "disk"), backing)
        path = registry.begin(a.cache_id, "a", disk, disk, a.path, "qcow2",
                              st=os.lstat(disk))
        registry.confirm(path, os.lstat(disk))
        disks[vm] = disk
    report = prune(c)
    assert report.registry_records_removed == 1
    assert [r["disk"] for r in registry.records()] == [disks["vm1"]]


def test_a_bad_percentage_is_the_cause_of_the_error():
    policy = cache_prune.Policy(min_free_space="150%")
    with pytest.raises(exception.ConfigurationError) as err:
        cache_prune.space_limits(policy, 1000)
    assert isinstance(err.value.__cause__, ValueError)
    assert err.value.__cause__.args == ("150%",)
