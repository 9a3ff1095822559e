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

"""The miss path step by step: the size precheck, the generation chosen,
the record written, the checks before publishing and their errors."""

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from unittest import mock

import pytest

from imagebackend import cache
from imagebackend.cache import fetch as cache_fetch
from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import publish as cache_publish
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend import inspection
from imagebackend.qemu import options as qemu_options
from imagebackend.qemu import results as qemu_results
from imagebackend.sources import base as source_base
from tests import fakes

# A stage that never drains would block a put forever: fail instead.
pytestmark = pytest.mark.timeout(120)

RAW = fakes.RAW_IMAGE
QCOW2 = fakes.QCOW2_IMAGE
MiB = fakes.MiB
SLACK = qemu_options.CONVERT_OUTPUT_SLACK


def make(tmp_path, qemu, **overrides):
    conf = fakes.conf(tmp_path, **overrides)
    source = fakes.FakeSource(conf, images={"raw-img": RAW,
                                            "qcow2-img": QCOW2})
    return cache.ImageCache(conf, source, qemu)


@pytest.fixture
def c(tmp_path, fake_qemu):
    return make(tmp_path, fake_qemu)


def cid_of(image_id):
    return content_digest.cache_id(image_id)


def meta(**changes):
    fields = dict(image_id="img", source="src")
    fields.update(changes)
    return source_base.ImageMeta(**fields)


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def leftovers(c):
    return sorted(n for n in os.listdir(c.base_dir)
                  if cache_layout.parse(n) is not None)


# -- precheck_size ------------------------------------------------------------

def test_no_requested_size_is_never_too_small():
    cache_fetch.precheck_size(meta(virtual_size=10 ** 15), None)


@pytest.mark.parametrize("fields,requested,refused", [
    (dict(virtual_size=100), 99, 100),
    (dict(virtual_size=100), 100, None),
    (dict(disk_format="raw", size=100), 99, 100),
    (dict(disk_format="raw", size=100), 100, None),
    (dict(disk_format="qcow2", size=100), 1, None),
    (dict(disk_format="raw", size=100, virtual_size=50), 60, None),
    (dict(disk_format="raw", size=50, virtual_size=100), 60, 100),
])
def test_the_size_the_source_records_is_checked_first(fields, requested,
                                                      refused):
    m = meta(**fields)
    if refused is None:
        cache_fetch.precheck_size(m, requested)
        return
    with pytest.raises(exception.DiskSmallerThanImage) as err:
        cache_fetch.precheck_size(m, requested)
    assert (err.value.image_id, err.value.virtual_size,
            err.value.requested_size) == ("img", refused, requested)


# -- _open_scratch ------------------------------------------------------------

def test_a_scratch_file_is_opened_read_only_and_close_on_exec(tmp_path):
    path = tmp_path / "s"
    path.write_bytes(b"data")
    fd = cache_fetch._open_scratch(str(path))
    try:
        assert os.read(fd, 10) == b"data"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind,why", [
    ("missing", "No such file or directory"),
    ("symlink", "Too many levels of symbolic links")])
def test_a_scratch_file_gone_or_replaced_is_a_disk_error(tmp_path, kind,
                                                         why):
    path = str(tmp_path / "s")
    if kind == "symlink":
        (tmp_path / "other").write_bytes(b"")
        os.symlink(str(tmp_path / "other"), path)
    with pytest.raises(exception.DiskOperationError) as err:
        cache_fetch._open_scratch(path)
    assert err.value.path == path
    assert err.value.reason == (
        "this fetch's scratch file cannot be opened (%s); something other "
        "than the cache changed it (a prune with a much shorter scratch "
        "age?); retry" % why)
    assert isinstance(err.value.__cause__, OSError)


# -- identify -----------------------------------------------------------------

def test_an_identity_is_resolved_only_when_deferred_and_a_base_is_cached(c):
    source = c.source
    resolved = meta(image_id="raw-img", identity="resolved")
    with mock.patch.object(source, "resolve_identity",
                           return_value=resolved) as resolve:
        known = meta(image_id="raw-img", identity="known")
        assert c.fetcher.identify(known) is known
        deferred = meta(image_id="raw-img", identity_deferred=True)
        assert c.fetcher.identify(deferred) is deferred     # nothing cached
        c.get("raw-img")
        os.unlink(c.base_path(cid_of("raw-img")))           # a record only
        assert c.fetcher.identify(deferred) is deferred
        resolve.assert_not_called()
    c.invalidate("raw-img")
    c.get("raw-img")
    with mock.patch.object(source, "resolve_identity",
                           return_value=resolved) as resolve:
        assert c.fetcher.identify(deferred) is resolved
    resolve.assert_called_once_with(deferred)


# -- choose_stem --------------------------------------------------------------

def test_a_first_fetch_claims_generation_one(c):
    c.store.ensure_dirs()
    cid = cid_of("raw-img")
    assert c.fetcher.choose_stem(meta(image_id="raw-img")) == (cid, False)
    assert cache_generations.claimed_generation(c.base_dir, cid) == 1
    # Claimed for good: the next choice is above it.
    assert c.fetcher.choose_stem(meta(image_id="raw-img")) == (
        cid + "-2", False)


def test_a_new_generation_is_above_every_published_one(c):
    c.store.ensure_dirs()
    cid = cid_of("img")
    for name in (cid + "-3.json", cid + "-6_1024", cid + "-9.part-" +
                 "0" * 12):
        open(c.base_path(name), "wb").close()
    # Scratch alone was never published: 9 does not count; the sized
    # base of 6 does.
    assert c.fetcher.choose_stem(meta()) == (cid + "-7", False)


def test_a_new_generation_is_above_every_one_a_disk_names(c):
    c.store.ensure_dirs()
    cid = cid_of("img")
    records = [{"base": os.path.join(c.base_dir, cid + "-4")},
               {"base": os.path.join(c.base_dir, cid_of("x") + "-9")},
               {"base": None}, {}]
    with mock.patch.object(c.fetcher.registry, "records",
                           return_value=records) as listed:
        assert c.fetcher.choose_stem(meta()) == (cid + "-5", False)
    listed.assert_called_once_with(cid)


def test_a_generation_claim_that_fails_names_the_claims_directory(c):
    c.store.ensure_dirs()
    with mock.patch.object(cache_generations, "claim_generation",
                           side_effect=OSError(errno.ENOSPC, "No space")):
        with pytest.raises(exception.CacheError) as err:
            c.fetcher.choose_stem(meta())
    assert err.value.path == os.path.join(c.base_dir,
                                          cache_layout.GENERATIONS_DIR)
    assert err.value.reason == (
        "cannot claim a generation number for image img ([Errno 28] No "
        "space); check the free space and permissions of the cache "
        "directory")


def test_a_base_without_a_valid_record_is_marked_stale_and_skipped(c):
    entry, _ = c.get("raw-img")
    with open(entry.path + ".json", "w") as f:
        f.write('{"image_id": "raw-img"}')          # not a valid record
    stem, again = c.fetcher.choose_stem(c.source.get_meta("raw-img"))
    assert (stem, again) == (entry.cache_id + "-2", False)
    with open(entry.path + ".json") as f:
        assert json.load(f) == {
            "image_id": "raw-img", "generation": 1, "stale": True,
            "stale_reason": "its record was missing or not valid; the "
                            "image is fetched again",
            "unverifiable": True}


def test_a_base_already_marked_stale_is_not_marked_again(c):
    entry, _ = c.get("raw-img")
    fileio.write_json_atomic(entry.path + ".json",
                             {"stale": True, "stale_reason": "before"})
    with mock.patch.object(cache_layout, "write_stale_record") as write:
        assert c.fetcher.choose_stem(c.source.get_meta("raw-img"))[0] == (
            entry.cache_id + "-2")
    write.assert_not_called()


def test_a_base_that_cannot_be_marked_stale_is_an_error_naming_it(c):
    entry, _ = c.get("raw-img")
    os.unlink(entry.path + ".json")
    with mock.patch.object(fileio, "write_json_atomic",
                           side_effect=OSError(errno.EROFS,
                                               "Read-only file system")):
        with pytest.raises(exception.CacheError) as err:
            c.fetcher.choose_stem(c.source.get_meta("raw-img"))
    assert err.value.path == entry.path + ".json"
    assert err.value.reason == (
        "cannot mark the base %s, which has no valid record, stale "
        "([Errno 30] Read-only file system); remove what is at this path "
        "by hand" % entry.cache_id)


@pytest.fixture
def old_qcow2(tmp_path, fake_qemu):
    """Two generations of a qcow2 base kept as qcow2, recorded by an older
    inspection policy.
    """
    c = make(tmp_path, fake_qemu, force_raw_images=False)
    c.store.ensure_dirs()
    m = c.source.get_meta("qcow2-img")
    stems = []
    for _ in range(2):
        stem, again = c.fetcher.choose_stem(m)
        assert again is False
        c.fetcher.fetch(m, stem, None, None, {})
        stems.append(stem)
    for stem in stems:
        record = cache_layout.read_record(c.base_path(stem + ".json"))
        cache_layout.update_record(c.base_path(stem + ".json"), {
            "stale": False, "inspection": dict(record["inspection"],
                                               version=0)})
    return c, stems[0], stems[1]


def test_the_newest_base_from_an_older_policy_is_inspected_again(old_qcow2):
    c, first, second = old_qcow2
    assert second == first + "-2"
    m = c.source.get_meta("qcow2-img")
    assert c.fetcher.choose_stem(m) == (second, True)


@pytest.mark.parametrize("change", [
    {"image_id": "other"}, {"stale": True}, {"identity": "other"},
    {"format": "raw"}])
def test_a_base_not_to_inspect_again_is_passed_over(old_qcow2, change):
    c, first, second = old_qcow2
    cache_layout.update_record(c.base_path(second + ".json"), change)
    m = c.source.get_meta("qcow2-img")
    assert c.fetcher.choose_stem(m) == (first, True)


def test_a_record_without_its_base_is_not_inspected_again(old_qcow2):
    c, first, second = old_qcow2
    os.unlink(c.base_path(first))
    os.unlink(c.base_path(second))
    m = c.source.get_meta("qcow2-img")
    assert c.fetcher.choose_stem(m) == (first + "-3", False)


# -- fetch --------------------------------------------------------------------

def test_a_raw_fetch_records_exactly_what_it_checked(c, caplog):
    m = c.source.get_meta("raw-img")
    c.store.ensure_dirs()
    stem, _ = c.fetcher.choose_stem(m)
    timings = {}
    fds = open_fds()
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger=cache_fetch.__name__):
        record = c.fetcher.fetch(m, stem, None, None, timings)
    took = time.monotonic() - began
    assert open_fds() == fds
    created = record.pop("created_at")
    assert created.endswith("+00:00")
    assert record == {
        "image_id": "raw-img", "generation": 1, "source": m.source,
        "identity": m.identity, "source_format": "raw", "format": "raw",
        "converted": False, "size": len(RAW), "virtual_size": len(RAW),
        "checksum": {"algo": "sha512",
                     "value": hashlib.sha512(RAW).hexdigest()},
        "inspection": {"format": "raw", "virtual_size": len(RAW),
                       "version": inspection.INSPECTION_VERSION,
                       "file_size": len(RAW), "declared_format": None},
        "disk_format": m.disk_format,
        "base_mtime_ns": os.stat(c.base_path(stem)).st_mtime_ns}
    with open(c.base_path(stem + ".json")) as f:
        assert json.load(f) == dict(record, created_at=created)
    with open(c.base_path(stem), "rb") as f:
        assert f.read() == RAW
    assert sorted(timings) == ["cache", "fetch"]
    assert all(0 <= v <= took for v in timings.values())
    assert leftovers(c) == [stem, stem + ".json"]
    assert [r.getMessage() for r in caplog.records
            if r.name == cache_fetch.__name__] == [
        "Cached image raw-img as %s (raw, %d bytes virtual)"
        % (c.base_path(stem), len(RAW))]


def test_a_converted_fetch_records_the_base_and_its_digest(c):
    m = c.source.get_meta("qcow2-img")
    c.store.ensure_dirs()
    stem, _ = c.fetcher.choose_stem(m)
    timings = {}
    fds = open_fds()
    began = time.monotonic()
    record = c.fetcher.fetch(m, stem, None, None, timings)
    took = time.monotonic() - began
    assert open_fds() == fds
    assert (record["source_format"], record["format"]) == ("qcow2", "raw")
    assert record["converted"] is True
    assert record["size"] == len(QCOW2)
    assert record["virtual_size"] == 8 * MiB
    assert record["base_checksum"] == cache_verify.sparse_digest(
        c.base_path(stem))
    assert record["inspection"]["virtual_size"] == 8 * MiB
    assert sorted(timings) == ["cache", "convert", "fetch"]
    assert all(0 <= v <= took for v in timings.values())
    assert leftovers(c) == [stem, stem + ".json"]


def test_a_fetch_kept_in_its_format_records_its_virtual_size(
        tmp_path, fake_qemu):
    c = make(tmp_path, fake_qemu, force_raw_images=False)
    m = c.source.get_meta("qcow2-img")
    c.store.ensure_dirs()
    stem, _ = c.fetcher.choose_stem(m)
    record = c.fetcher.fetch(m, stem, None, None, {})
    assert (record["format"], record["converted"]) == ("qcow2", False)
    assert record["virtual_size"] == 8 * MiB
    assert os.path.getsize(c.base_path(stem)) == len(QCOW2)
    assert "base_checksum" not in record
    fake_qemu.check.assert_called_once()
    assert fake_qemu.check.call_args.args[1] == "qcow2"
    # ... the download's own scratch, before it is published
    checked = fake_qemu.check.call_args.args[0]
    assert os.path.dirname(checked) == c.base_dir
    assert os.path.basename(checked).startswith(stem + ".part-")


def test_a_deferred_identity_is_taken_from_the_download(c):
    m = dataclasses.replace(c.source.get_meta("raw-img"), identity=None,
                            identity_deferred=True)
    c.store.ensure_dirs()
    stem, _ = c.fetcher.choose_stem(m)
    with mock.patch.object(c.source, "identify_download",
                           return_value="from-download") as identify:
        record = c.fetcher.fetch(m, stem, None, None, {})
    identify.assert_called_once_with(m, "sha512",
                                     hashlib.sha512(RAW).hexdigest())
    assert record["identity"] == "from-download"


def test_a_fetch_supersedes_every_other_recorded_generation(c):
    first, _ = c.get("raw-img")
    c.store.ensure_dirs()
    cid = first.cache_id
    open(c.base_path(cid + "-7_1024"), "wb").close()    # no record: kept
    m = c.source.get_meta("raw-img")
    stem, _ = c.fetcher.choose_stem(m)
    assert stem == cid + "-8"
    with mock.patch.object(c.store, "mark_stale",
                           wraps=c.store.mark_stale) as mark:
        c.fetcher.fetch(m, stem, None, None, {})
    assert mark.call_args_list == [
        mock.call(cid, "superseded by generation 8")]
    assert cache_layout.read_record(first.path + ".json")["stale"] is True
    assert not cache_layout.read_record(c.base_path(stem + ".json")).get(
        "stale")


def test_the_generation_published_is_the_one_logged_and_kept(c, caplog):
    """Another fetch took the chosen name meanwhile: the log and the
    superseding follow the generation really published.
    """
    first, _ = c.get("raw-img")
    m = c.source.get_meta("raw-img")
    taken = dict(first.record, identity="other", generation=2)
    fileio.write_json_atomic(c.base_path(first.cache_id + "-2.json"), taken)
    with open(c.base_path(first.cache_id + "-2"), "wb") as f:
        f.write(b"other")
    with caplog.at_level(logging.INFO, logger=cache_fetch.__name__):
        record = c.fetcher.fetch(m, first.cache_id + "-2", None, None, {})
    assert record["generation"] == 3
    assert ("Cached image raw-img as %s (raw, %d bytes virtual)"
            % (c.base_path(first.cache_id + "-3"), len(RAW))) in [
        r.getMessage() for r in caplog.records]
    for gen in ("", "-2"):
        assert cache_layout.read_record(
            c.base_path(first.cache_id + gen + ".json"))["stale"] is True


@pytest.mark.parametrize("image_id", ["raw-img", "qcow2-img"])
def test_a_failed_publish_leaves_no_scratch_and_no_descriptor(c, image_id):
    m = c.source.get_meta(image_id)
    c.store.ensure_dirs()
    stem, _ = c.fetcher.choose_stem(m)
    fds = open_fds()
    with mock.patch.object(cache_publish, "publish_base",
                           side_effect=RuntimeError("boom")):
        with pytest.raises(RuntimeError):
            c.fetcher.fetch(m, stem, None, None, {})
    assert open_fds() == fds
    assert leftovers(c) == []


def test_a_download_is_checked_against_its_recorded_length(c):
    m = c.source.get_meta("raw-img")
    c.store.ensure_dirs()
    stem, _ = c.fetcher.choose_stem(m)
    real = cache_fetch._open_scratch

    def grown(path):
        with open(path, "ab") as f:     # a byte appended behind its back
            f.write(b"x")
        return real(path)

    with mock.patch.object(cache_fetch, "_open_scratch", side_effect=grown):
        with pytest.raises(exception.DiskOperationError) as err:
            c.fetcher.fetch(m, stem, None, None, {})
    assert err.value.reason.startswith(
        "it is %d bytes long" % (len(RAW) + 1))
    assert err.value.path.startswith(c.base_path(stem) + ".part-")
    assert leftovers(c) == []


# -- _read_back ---------------------------------------------------------------

def converted_file(tmp_path, data=b"converted" * 1000):
    path = str(tmp_path / "x.converted")
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_a_conversion_is_read_back_durably_from_the_published_file(c,
                                                                   tmp_path):
    path = converted_file(tmp_path)
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
        return real_fsync(fd)

    with mock.patch.object(sparseio, "Writeback",
                           wraps=sparseio.Writeback) as writeback, \
            mock.patch.object(os, "fsync", side_effect=fsync):
        fd, digest = c.fetcher._read_back(meta(), path)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(path))
    finally:
        os.close(fd)
    writeback.assert_called_once_with(path=path)
    assert events == [("fsync", path)]
    assert digest == cache_verify.sparse_digest(path)


def test_a_conversion_replaced_while_read_back_is_refused(c, tmp_path):
    path = converted_file(tmp_path)
    real = cache_verify.sparse_digest

    def swap(p):
        result = real(p)
        os.unlink(p)
        converted_file(tmp_path, b"swapped")
        return result

    fds = open_fds()
    with mock.patch.object(cache_verify, "sparse_digest", side_effect=swap):
        with pytest.raises(exception.DiskOperationError) as err:
            c.fetcher._read_back(meta(), path)
    assert open_fds() == fds
    assert err.value.path == path
    assert err.value.reason == (
        "could not read back or flush the conversion of image img ([Errno "
        "%d] replaced while it was being read: %r); check the filesystem "
        "of %s (free space, I/O errors) and retry"
        % (errno.ESTALE, path, c.base_dir))


def test_any_other_failure_of_a_read_back_closes_its_descriptor(c,
                                                                tmp_path):
    path = converted_file(tmp_path)
    fds = open_fds()
    with mock.patch.object(cache_verify, "sparse_digest",
                           side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            c.fetcher._read_back(meta(), path)
    assert open_fds() == fds


# -- _check_length ------------------------------------------------------------

def result(fmt="raw", virtual_size=1000):
    return inspection.InspectionResult(format=fmt, virtual_size=virtual_size)


@pytest.mark.parametrize("fmt,on_disk,size,virtual,converted,ok", [
    ("raw", 1000, 1000, 1000, False, True),
    ("raw", 1001, 1000, 1000, False, False),
    ("raw", 999, 1000, 1000, False, False),
    ("raw", 1000 + SLACK, 7, 1000, True, True),
    ("raw", 1001 + SLACK, 7, 1000, True, False),
    ("raw", 1001 + SLACK, 7, None, True, True),
    ("qcow2", 5000 + SLACK, 5000 + SLACK, 1000, False, True),
])
def test_a_file_is_published_only_at_the_length_it_was_checked(
        c, fmt, on_disk, size, virtual, converted, ok):
    check = lambda: c.fetcher._check_length(         # noqa: E731
        meta(), "/p", fmt, on_disk, size, result(fmt, virtual),
        converted=converted)
    if ok:
        check()
        return
    with pytest.raises(exception.DiskOperationError) as err:
        check()
    assert err.value.path == "/p"
    assert err.value.reason == (
        "it is %d bytes long, not what image img was checked to be; check "
        "the filesystem of %s and retry" % (on_disk, c.base_dir))


# -- _check -------------------------------------------------------------------

def test_qemu_img_check_is_run_on_the_file_as_its_format(c, fake_qemu):
    fake_qemu.check.return_value = qemu_results.CheckResult(
        filename="p", format="qcow2", leaks=7)
    c.fetcher._check(meta(), "/p", "qcow2")         # leaks are harmless
    fake_qemu.check.assert_called_once_with("/p", "qcow2")


@pytest.mark.parametrize("corruptions,errors", [(2, 0), (0, 3), (1, 1)])
def test_corruptions_or_check_errors_refuse_the_image(c, fake_qemu,
                                                      corruptions, errors):
    fake_qemu.check.return_value = qemu_results.CheckResult(
        filename="p", format="qcow2", corruptions=corruptions,
        check_errors=errors)
    with pytest.raises(exception.CorruptImageRefused) as err:
        c.fetcher._check(meta(), "/p", "qcow2")
    assert (err.value.image_id, err.value.fmt) == ("img", "qcow2")
    assert err.value.detail == "%d corruption(s) and %d error(s)" % (
        corruptions, errors)


def test_a_format_without_checks_passes(c, fake_qemu):
    fake_qemu.check.return_value = qemu_results.CheckResult(
        filename="p", format="vpc", supported=False, corruptions=1)
    c.fetcher._check(meta(), "/p", "vpc")


def test_a_check_over_its_limits_refuses_the_image(c, fake_qemu):
    fake_qemu.check.side_effect = exception.QemuImgLimitExceeded(
        operation="check", path="/p", exit_code=-9, stderr="",
        limit="memory", option="info_memory_limit")
    with pytest.raises(exception.ImageLimitExceeded) as err:
        c.fetcher._check(meta(), "/p", "qcow2")
    assert err.value.image_id == "img"
    assert err.value.reason == (
        "qemu-img check of its qcow2 metadata exceeded its memory limit; "
        "the image is likely malicious or corrupt; raise [qemu_img] "
        "info_memory_limit only if you trust it")


def test_a_check_that_fails_refuses_the_image_with_its_stderr(c, fake_qemu):
    fake_qemu.check.side_effect = exception.QemuImgError(
        operation="check", path="/p", exit_code=1, stderr="bad L1 table")
    with pytest.raises(exception.CorruptImageRefused) as err:
        c.fetcher._check(meta(), "/p", "qcow2")
    assert err.value.detail == "errors it could not get past (bad L1 table)"
    assert (err.value.image_id, err.value.fmt) == ("img", "qcow2")


def test_a_missing_qemu_img_is_not_a_corrupt_image(c, fake_qemu):
    missing = exception.QemuImgNotFound(operation="check", path="/p",
                                        exit_code=None, stderr="",
                                        reason="not on PATH")
    fake_qemu.check.side_effect = missing
    with pytest.raises(exception.QemuImgNotFound) as err:
        c.fetcher._check(meta(), "/p", "qcow2")
    assert err.value is missing


# -- _convert -----------------------------------------------------------------

def test_a_conversion_is_bounded_and_reports_progress(c, fake_qemu):
    seen = []
    c.fetcher._convert(meta(), "/part", "qcow2", "/conv", 4 * MiB,
                       lambda *args: seen.append(args))
    fake_qemu.convert.assert_called_once()
    call = fake_qemu.convert.call_args
    assert call.args == ("/part", "qcow2", "/conv", "raw")
    progress = call.kwargs.pop("progress")
    assert call.kwargs == {"target_cache": "unsafe", "durable": False,
                           "limits": True, "max_output_size": 4 * MiB}
    progress(50.0)
    assert seen == [("convert", 2 * MiB, 4 * MiB)]


def test_a_conversion_writing_too_much_is_refused(c, fake_qemu):
    fake_qemu.convert.side_effect = exception.QemuImgOutputTooLarge(
        operation="convert", path="/part", exit_code=1, stderr="",
        limit="output", option="-", size=4 * MiB)
    with pytest.raises(exception.ImageLimitExceeded) as err:
        c.fetcher._convert(meta(), "/part", "qcow2", "/conv", 4 * MiB, None)
    assert err.value.image_id == "img"
    assert err.value.reason == (
        "converting it to raw wrote more than its checked virtual size of "
        "%d bytes; it is corrupt or crafted, upload a sound copy" % (4 * MiB))


def test_a_conversion_over_its_limits_is_refused(c, fake_qemu):
    fake_qemu.convert.side_effect = exception.QemuImgLimitExceeded(
        operation="convert", path="/part", exit_code=-9, stderr="",
        limit="CPU time", option="convert_cpu_time")
    with pytest.raises(exception.ImageLimitExceeded) as err:
        c.fetcher._convert(meta(), "/part", "qcow2", "/conv", 4 * MiB, None)
    assert err.value.image_id == "img"
    assert err.value.reason == (
        "converting it to raw exceeded the CPU time limit; it is likely "
        "malicious or corrupt; raise [qemu_img] convert_cpu_time only if "
        "you trust it")


# -- _converts ----------------------------------------------------------------

def test_only_non_raw_formats_are_converted_and_only_when_forced(tmp_path,
                                                                 fake_qemu):
    forced = make(tmp_path, fake_qemu).fetcher
    assert forced._converts("qcow2") is True
    assert forced._converts(result("qcow2")) is True
    assert forced._converts("raw") is False
    assert forced._converts(result("gpt")) is False     # read as raw
    kept = make(tmp_path / "k", fake_qemu, force_raw_images=False).fetcher
    assert not kept._converts("qcow2")


# -- what the download is inspected against ----

def test_the_declared_format_and_requested_size_reach_the_inspection(
        tmp_path, fake_qemu):
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={"lying": QCOW2, "img": QCOW2},
                              declared={"lying": "raw", "img": "qcow2"})
    c = cache.ImageCache(conf, source, fake_qemu)
    c.store.ensure_dirs()
    m = source.get_meta("lying")
    with pytest.raises(exception.UnsafeImage) as err:
        c.fetcher.fetch(m, c.fetcher.choose_stem(m)[0], None, None, {})
    assert err.value.image_id == "lying"
    m = source.get_meta("img")
    stem = c.fetcher.choose_stem(m)[0]
    with pytest.raises(exception.InvalidImageSize):
        c.fetcher.fetch(m, stem, 8 * MiB - 1, None, {})
    assert c.fetcher.fetch(m, stem, 8 * MiB, None, {})["virtual_size"] == (
        8 * MiB)
    assert leftovers(c) == [stem, stem + ".json"]


def test_an_invalid_newest_record_does_not_hide_an_older_base(old_qcow2):
    c, first, second = old_qcow2
    with open(c.base_path(second + ".json"), "w") as f:
        f.write("{}")
    m = c.source.get_meta("qcow2-img")
    assert c.fetcher.choose_stem(m) == (first, True)
    assert cache_layout.read_record(c.base_path(second + ".json"))["stale"]


def test_a_base_gone_since_it_was_listed_is_passed_over(old_qcow2):
    c, first, second = old_qcow2
    real = c.store.check_regular

    def check_regular(path):
        return False if path == c.base_path(second) else real(path)

    m = c.source.get_meta("qcow2-img")
    with mock.patch.object(c.store, "check_regular",
                           side_effect=check_regular):
        assert c.fetcher.choose_stem(m) == (first, True)


def converting_to(length):
    def convert(source, source_fmt, target, target_fmt, **kwargs):
        with open(target, "wb") as f:
            f.truncate(length)
    return convert


def test_a_conversion_records_the_length_it_wrote(c, fake_qemu):
    fake_qemu.convert.side_effect = converting_to(8 * MiB + 4096)
    m = c.source.get_meta("qcow2-img")
    c.store.ensure_dirs()
    record = c.fetcher.fetch(m, c.fetcher.choose_stem(m)[0], None, None, {})
    assert record["virtual_size"] == 8 * MiB + 4096
    assert record["inspection"]["virtual_size"] == 8 * MiB


def test_a_conversion_longer_than_checked_is_refused(c, fake_qemu):
    fake_qemu.convert.side_effect = converting_to(8 * MiB + SLACK + 1)
    m = c.source.get_meta("qcow2-img")
    c.store.ensure_dirs()
    stem = c.fetcher.choose_stem(m)[0]
    with pytest.raises(exception.DiskOperationError) as err:
        c.fetcher.fetch(m, stem, None, None, {})
    assert err.value.path.startswith(c.base_path(stem) + ".converted-")
    assert "qcow2-img" in err.value.reason
    assert leftovers(c) == []


def test_a_conversion_refused_through_fetch_names_the_image(c, fake_qemu):
    fake_qemu.convert.side_effect = exception.QemuImgOutputTooLarge(
        operation="convert", path="/p", exit_code=1, stderr="",
        limit="output", option="-", size=1)
    m = c.source.get_meta("qcow2-img")
    c.store.ensure_dirs()
    with pytest.raises(exception.ImageLimitExceeded) as err:
        c.fetcher.fetch(m, c.fetcher.choose_stem(m)[0], None, None, {})
    assert err.value.image_id == "qcow2-img"
