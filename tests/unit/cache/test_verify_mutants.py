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

"""``cache verify``: exactly what each check reports, and that a repair
never moves or removes a base a disk uses.
"""

import hashlib
import logging
import os
from unittest import mock

import pytest

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import results as cache_results
from imagebackend.cache import scan as cache_scan
from imagebackend.cache import usage as cache_usage
from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception
from imagebackend.qemu import results as qemu_results
from tests import fakes
from tests.unit.cache import test_usage

MiB = 1024 * 1024
CID = content_digest.cache_id("img")
UNVERIFIED_BASE = (
    "it has no valid metadata record (missing, unreadable, a symlink or of "
    "the wrong shape), so nothing can vouch for its bytes; it is never used "
    "again, and 'cache prune' removes it once no disk uses it")
NO_CONVERTED_DIGEST = ("no digest of the converted base is recorded; "
                       "invalidate the image to fetch it again")
NO_SIZED_DIGEST = ("it has no valid record of its own, and its original "
                   "base's digest is not known; invalidate the image to "
                   "make it again")
#: a raw image whose length is a whole number of 64 KiB blocks, so that
#: a sized base grown from it has its sparse digest.
RAW = fakes.RAW_IMAGE + b"z" * (-len(fakes.RAW_IMAGE) % (64 * 1024))
MARKED = "marked stale, left in place; new disks use a fresh copy"
BUSY = "busy (a disk is being made from it); run again"

PADDED = "sparse-64k-xxh3-padded"


@pytest.fixture
def cache_images():
    """The fake source serves RAW (see the conftest's make_cache)."""
    return {"img": RAW}


def cached(c, name):
    """The :class:`CachedFile` the scan finds for file ``name``."""
    return next(f for f in cache_scan.scan(c.base_dir).bases
                if f.name.name == name)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(b"\x01" if byte != b"\x01" else b"\x02")


def sparse_of(path):
    with open(path, "rb") as f:
        return fakes.sparse_digest(f.read())


def sized_copy(c, entry, extra=MiB, data=None):
    """A raw sized base of ``entry``, ``extra`` bytes larger."""
    with open(entry.path, "rb") as f:
        content = f.read() if data is None else data
    size = os.path.getsize(entry.path) + extra
    path = c.sized_path(entry.cache_id, size)
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size)
    return path, size


def rows(verification):
    return [(r.kind, r.status, r.detail, r.action) for r in verification]


# -- digests -----------------------------------------------------------------

def test_digests_by_default_are_the_sparse_xxh3_digest_only(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"data" * 50000)
    assert cache_verify.digests(str(path)) == {
        "full": {}, "sparse": fakes.sparse_digest(b"data" * 50000, PADDED),
        "size": 200000}
    assert cache_verify.digests(str(path), ["md5"], sparse=False) == {
        "full": {"md5": hashlib.md5(b"data" * 50000).hexdigest()},
        "sparse": None, "size": 200000}
    assert cache_verify.digests(str(path), scheme="sparse-64k")[
        "sparse"] == fakes.sparse_digest(b"data" * 50000, "sparse-64k")


def test_digests_never_read_through_a_symlink(tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    os.symlink(str(tmp_path / "f"), str(tmp_path / "link"))
    with pytest.raises(OSError):
        cache_verify.digests(str(tmp_path / "link"))


def test_digests_open_read_only_not_inherited_and_close(tmp_path,
                                                        monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"data")
    seen = []
    real = content_digest.file_digests

    def spy(fd, *args):
        seen.append((fd, os.get_inheritable(fd),
                     os.get_blocking(fd)))
        import fcntl
        seen.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        return real(fd, *args)

    monkeypatch.setattr(content_digest, "file_digests", spy)
    cache_verify.digests(str(path))
    (fd, inheritable, _), mode = seen
    assert inheritable is False
    assert mode == os.O_RDONLY
    with pytest.raises(OSError):
        os.fstat(fd)                    # closed


def test_a_failing_digest_still_closes_the_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"data")
    opened = []

    def failing(fd, *args):
        opened.append(fd)
        raise ValueError("unknown")

    monkeypatch.setattr(content_digest, "file_digests", failing)
    with pytest.raises(ValueError):
        cache_verify.digests(str(path))
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_sparse_digest_is_the_record_written_for_a_converted_base(
        tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    assert cache_verify.sparse_digest(str(path)) == {
        "algo": "xxh3_128", "scheme": PADDED,
        "value": fakes.sparse_digest(b"x" * 1000, PADDED)}


@pytest.mark.parametrize("record, expected", [
    ({}, None),
    ({"base_checksum": None}, None),
    ({"base_checksum": {}}, None),
    ({"base_checksum": {"scheme": "sparse-64k-xxh3"}}, None),
    ({"base_checksum": {"value": "v"}}, ("sparse-64k", "v")),
    ({"base_checksum": {"value": "v", "scheme": None}}, ("sparse-64k", "v")),
    ({"base_checksum": {"value": "v", "scheme": "sparse-64k-xxh3"}},
     ("sparse-64k-xxh3", "v")),
])
def test_the_recorded_sparse_digest(record, expected):
    assert cache_verify._recorded_sparse(record) == expected


@pytest.mark.parametrize("record, expected", [
    ({"converted": 1, "source_format": "raw", "format": "raw"}, True),
    ({"converted": 0, "source_format": "qcow2", "format": "raw"}, False),
    ({"source_format": "qcow2", "format": "raw"}, True),
    ({"source_format": "qcow2", "format": "qcow2"}, False),
    ({"source_format": "raw", "format": "raw"}, False),
    ({"source_format": None, "format": "raw"}, False),
    ({"format": "raw"}, False),
    ({"format": "qcow2"}, True),
    ({"source_format": "vhd", "format": "vpc"}, False),
    ({"source_format": "nonsense", "format": "nonsense"}, True),
])
def test_whether_a_record_describes_a_converted_base(record, expected):
    assert cache_verify._converted(record) is expected


# -- check_base ---------------------------------------------------------------

def test_an_untrusted_base_is_unverified_and_never_hashed(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    os.unlink(entry.path + ".json")
    with mock.patch.object(cache_verify, "digests") as digests:
        assert c.verifier.check_base(cached(c, CID)) == (
            "unverified", UNVERIFIED_BASE, None)
    digests.assert_not_called()


def test_a_good_raw_base_is_ok_with_its_sparse_digest(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    assert c.verifier.check_base(cached(c, CID)) == (
        "ok", "", (PADDED, fakes.sparse_digest(RAW, PADDED)))
    c.qemu.check.assert_not_called()        # nothing to check in raw


def test_a_recorded_checksum_in_capitals_still_matches(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    record = dict(entry.record, checksum={
        "algo": "sha512", "value": entry.record["checksum"]["value"].upper()})
    fileio.write_json_atomic(entry.path + ".json", record)
    assert c.verifier.check_base(cached(c, CID))[:2] == ("ok", "")


def test_a_flipped_byte_of_a_raw_base_names_both_hashes(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    with open(entry.path, "rb") as f:
        actual = hashlib.sha512(f.read()).hexdigest()
    assert c.verifier.check_base(cached(c, CID)) == (
        "corrupt", "its sha512 is %s, the image's is %s" % (
            actual, entry.record["checksum"]["value"]), None)


def test_a_raw_base_of_the_wrong_length_says_both_lengths(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    with open(entry.path, "ab") as f:
        f.write(b"more")
    with open(entry.path, "rb") as f:
        actual = hashlib.sha512(f.read()).hexdigest()
    length = len(RAW)
    assert c.verifier.check_base(cached(c, CID)) == (
        "corrupt", "its sha512 is %s, the image's is %s; it is %d bytes "
        "long, the record says %d" % (
            actual, entry.record["checksum"]["value"], length + 4, length),
        None)


def test_an_unknown_hash_algorithm_is_unverified(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    fileio.write_json_atomic(entry.path + ".json", dict(
        entry.record, checksum={"algo": "rot13", "value": "abc"}))
    assert c.verifier.check_base(cached(c, CID)) == (
        "unverified", "its record names an unknown hash algorithm 'rot13'",
        None)


def test_an_unknown_sparse_scheme_is_unverified(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    fileio.write_json_atomic(entry.path + ".json", dict(
        entry.record, base_checksum={"algo": "x", "scheme": "sparse-1k",
                                     "value": "abc"}))
    assert c.verifier.check_base(cached(c, CID)) == (
        "unverified", "its record names an unknown hash algorithm "
        "'sparse-1k'", None)


def test_a_converted_base_is_checked_by_its_sparse_digest(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    recorded = entry.record["base_checksum"]["value"]
    with mock.patch.object(cache_verify, "digests",
                           wraps=cache_verify.digests) as digests:
        assert c.verifier.check_base(cached(c, CID)) == (
            "ok", "", (PADDED, recorded))
    # The download's hash is of other bytes: never computed.
    digests.assert_called_once_with(entry.path, [], sparse=True,
                                    scheme=PADDED)
    flip(entry.path, 10)
    assert c.verifier.check_base(cached(c, CID)) == (
        "corrupt", "its content digest is %s, the record says %s"
        % (sparse_of(entry.path), recorded), None)


def test_a_converted_base_of_the_old_scheme_keeps_its_scheme(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    with open(entry.path, "rb") as f:
        old = fakes.sparse_digest(f.read(), "sparse-64k")
    fileio.write_json_atomic(entry.path + ".json", dict(
        entry.record, base_checksum={"algo": "sha256", "value": old}))
    assert c.verifier.check_base(cached(c, CID)) == (
        "ok", "", ("sparse-64k", old))


def test_a_converted_base_without_its_digest_is_unverified(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    record = dict(entry.record)
    del record["base_checksum"]
    fileio.write_json_atomic(entry.path + ".json", record)
    assert c.verifier.check_base(cached(c, CID)) == (
        "unverified", NO_CONVERTED_DIGEST, None)


def test_a_qcow2_base_is_hashed_and_checked_by_qemu_img(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE},
                   force_raw_images=False)
    entry, _ = c.get("img")
    assert entry.record["format"] == "qcow2"
    c.qemu.check.reset_mock()
    with mock.patch.object(cache_verify, "digests",
                           wraps=cache_verify.digests) as digests:
        # No sparse digest of a qcow2 file: nothing grows from it.
        assert c.verifier.check_base(cached(c, CID)) == ("ok", "", None)
    digests.assert_called_once_with(entry.path, ["sha512"], sparse=False,
                                    scheme=PADDED)
    c.qemu.check.assert_called_once_with(entry.path, "qcow2")
    c.qemu.check.return_value = qemu_results.CheckResult(
        filename=entry.path, format="qcow2", corruptions=2, check_errors=1)
    assert c.verifier.check_base(cached(c, CID)) == (
        "corrupt", "qemu-img check found 2 corruption(s) and 1 error(s)",
        None)
    c.qemu.check.return_value = qemu_results.CheckResult(
        filename=entry.path, format="qcow2", check_errors=3)
    assert c.verifier.check_base(cached(c, CID))[:2] == (
        "corrupt", "qemu-img check found 0 corruption(s) and 3 error(s)")
    c.qemu.check.side_effect = exception.QemuImgError(
        operation="check", path=entry.path, exit_code=1, stderr="boom")
    assert c.verifier.check_base(cached(c, CID)) == (
        "corrupt", "qemu-img check failed: qemu-img check failed on %s "
        "(exit code 1): boom" % entry.path, None)


def test_a_converted_qcow2_base_without_its_digest_stays_unverified(
        make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE},
                   force_raw_images=False)
    entry, _ = c.get("img")
    record = dict(entry.record, converted=True)
    fileio.write_json_atomic(entry.path + ".json", record)
    c.qemu.check.return_value = qemu_results.CheckResult(
        filename=entry.path, format="qcow2", corruptions=1)
    assert c.verifier.check_base(cached(c, CID)) == (
        "unverified", NO_CONVERTED_DIGEST + "; qemu-img check found 1 "
        "corruption(s) and 0 error(s)", None)


# -- check_sized -------------------------------------------------------------

def test_a_sized_base_is_checked_against_its_original_digest(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    f = cached(c, os.path.basename(path))
    expected = ("sparse-64k-xxh3", fakes.sparse_digest(RAW))
    assert c.verifier.check_sized(f, expected) == ("ok", "")
    assert c.verifier.check_sized(f, ("sparse-64k-xxh3", "0" * 32)) == (
        "corrupt", "its content differs from what its original base's "
                   "record records")
    assert c.verifier.check_sized(f, ("sparse-1k", "0")) == (
        "unverified", "its record names an unknown digest scheme "
                      "'sparse-1k'")
    assert c.verifier.check_sized(f, None) == ("unverified",
                                               NO_SIZED_DIGEST)
    c.qemu.check.assert_not_called()


def test_a_sized_base_of_the_wrong_length_is_corrupt(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    os.truncate(path, size + 7)
    f = cached(c, os.path.basename(path))
    expected = ("sparse-64k-xxh3", fakes.sparse_digest(RAW))
    assert c.verifier.check_sized(f, expected) == (
        "corrupt", "it is %d bytes long, its name says %d" % (size + 7,
                                                              size))


def test_a_sized_base_with_its_own_record_uses_only_that(
        make_cache, sized_record):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    sized_record(path, CID, size)
    f = cached(c, os.path.basename(path))
    assert c.verifier.check_sized(f, ("sparse-64k-xxh3", "0" * 32)) == (
        "ok", "")
    assert c.verifier.check_sized(f, None) == ("ok", "")
    sized_record(path, CID, size, value="0" * 32)
    f = cached(c, os.path.basename(path))
    expected = ("sparse-64k-xxh3", fakes.sparse_digest(RAW))
    assert c.verifier.check_sized(f, expected) == (
        "corrupt", "its content differs from what its own record records")
    sized_record(path, CID, size, scheme="sparse-64k",
                 value=fakes.sparse_digest(RAW, "sparse-64k"))
    assert c.verifier.check_sized(cached(c, os.path.basename(path)),
                                  None) == ("ok", "")


def test_every_problem_of_a_sized_base_is_reported(make_cache, sized_record):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    sized_record(path, CID, size, value="0" * 32)
    os.truncate(path, size + 7)
    assert c.verifier.check_sized(cached(c, os.path.basename(path)),
                                  None) == (
        "corrupt", "its content differs from what its own record records; "
        "it is %d bytes long, its name says %d" % (size + 7, size))


def test_an_unconverted_base_digest_is_of_the_current_scheme(make_cache):
    """Whatever sparse digest its record carries, a base verified by the
    download's hash is digested with the current scheme.
    """
    c = make_cache()
    entry, _ = c.get("img")
    fileio.write_json_atomic(entry.path + ".json", dict(
        entry.record, base_checksum={
            "algo": "sha256", "scheme": "sparse-64k",
            "value": fakes.sparse_digest(RAW, "sparse-64k")}))
    assert c.verifier.check_base(cached(c, CID)) == (
        "ok", "", (PADDED, fakes.sparse_digest(RAW, PADDED)))


def test_a_qcow2_sized_base_is_checked_by_qemu_img(make_cache, sized_record):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry, data=fakes.qcow2_header(MiB))
    sized_record(path, CID, size, fmt="qcow2")
    f = cached(c, os.path.basename(path))
    # Its length is the qcow2 file's, not the disk size its name says.
    assert f.record["format"] == "raw"
    assert c.verifier.check_sized(f, None) == ("ok", "")
    c.qemu.check.assert_called_once_with(path, "qcow2")
    c.qemu.check.return_value = qemu_results.CheckResult(
        filename=path, format="qcow2", corruptions=4)
    assert c.verifier.check_sized(f, None) == (
        "corrupt", "qemu-img check found 4 corruption(s) and 0 error(s)")


def test_a_sized_base_of_a_qcow2_original_needs_its_own_record(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE},
                   force_raw_images=False)
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    f = cached(c, os.path.basename(path))
    assert c.verifier.check_sized(f, ("sparse-64k-xxh3", "0")) == (
        "unverified", NO_SIZED_DIGEST)


def test_a_sized_base_whose_original_has_no_record_counts_as_raw(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    os.unlink(entry.path + ".json")
    f = cached(c, os.path.basename(path))
    assert f.record == {}
    expected = ("sparse-64k-xxh3", fakes.sparse_digest(RAW))
    assert c.verifier.check_sized(f, expected) == ("ok", "")


# -- verify -------------------------------------------------------------------

def test_verify_reports_every_file_once_with_its_fields(make_cache):
    c = make_cache(images={"img": RAW, "other": RAW + b"x"})
    entry, _ = c.get("img")
    other, _ = c.get("other")
    path, size = sized_copy(c, entry)
    found = c.verify()
    assert isinstance(found, cache_results.Verification)
    expected = [("img", "base", 1, entry.path, "ok", "", None),
                ("img", "sized", 1, path, "ok", "", None),
                ("other", "base", 1, other.path, "ok", "", None)]
    assert sorted((r.image_id, r.kind, r.generation, r.file, r.status,
                   r.detail, r.action) for r in found) == sorted(expected)
    only = c.verify(["img", "absent"])
    assert [(r.image_id, r.kind, r.generation, r.file, r.status, r.detail)
            for r in only] == [
        ("img", "base", 1, entry.path, "ok", ""),
        ("img", "sized", 1, path, "ok", ""),
        ("absent", None, None, None, "not cached", "")]


def test_a_sized_base_is_verified_after_its_original_whatever_the_names(
        monkeypatch, make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    layout = cache_scan.scan(c.base_dir)
    layout.bases.reverse()
    assert [f.kind for f in layout.bases] == ["sized", "base"]
    monkeypatch.setattr(cache_scan, "scan", lambda base_dir: layout)
    assert [(r.kind, r.status) for r in c.verify()] == [
        ("base", "ok"), ("sized", "ok")]


def test_sized_bases_are_reported_in_name_order(monkeypatch, make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    small, _ = sized_copy(c, entry, extra=MiB)
    large, _ = sized_copy(c, entry, extra=3 * MiB)
    layout = cache_scan.scan(c.base_dir)
    layout.bases.sort(key=lambda f: f.name.name, reverse=True)
    monkeypatch.setattr(cache_scan, "scan", lambda base_dir: layout)
    assert [r.file for r in c.verify()] == sorted(
        [entry.path, small, large], key=lambda p: (
            p != entry.path, os.path.basename(p)))


def test_every_base_is_reported_before_any_sized_base(make_cache):
    c = make_cache(images={"img": RAW, "other": RAW + b"x"})
    paths = []
    for image_id in ("img", "other"):
        entry, _ = c.get(image_id)
        paths.append((entry.path, sized_copy(c, entry)[0]))
    assert CID < content_digest.cache_id("other")
    assert [r.file for r in c.verify()] == [
        paths[0][0], paths[1][0], paths[0][1], paths[1][1]]


def test_a_sized_base_of_a_corrupt_original_uses_the_recorded_digest(
        make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    flip(entry.path, 10)        # the original: corrupt, not the sized base
    assert [(r.kind, r.status) for r in c.verify()] == [
        ("base", "corrupt"), ("sized", "ok")]
    flip(path, 10)
    assert [(r.kind, r.status) for r in c.verify()] == [
        ("base", "corrupt"), ("sized", "corrupt")]


def test_a_sized_base_of_a_converted_original_that_is_gone_verifies(
        make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    os.unlink(entry.path)
    assert rows(c.verify()) == [("sized", "ok", "", None)]
    # An untrusted record vouches for nothing, whatever digest it holds.
    record = dict(entry.record)
    del record["checksum"]
    fileio.write_json_atomic(entry.path + ".json", record)
    assert rows(c.verify()) == [("sized", "unverified", NO_SIZED_DIGEST,
                                 None)]


def test_a_file_gone_while_read_is_skipped_but_another_error_raised(
        monkeypatch, caplog, make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    real = cache_verify.digests

    def vanished(p, *args, **kwargs):
        raise FileNotFoundError(2, "No such file", p)

    monkeypatch.setattr(cache_verify, "digests", vanished)
    with pytest.raises(exception.CacheError) as err:
        c.verify()
    assert entry.path in str(err.value)

    def sized_gone(p, *args, **kwargs):
        if p == path:
            os.unlink(p)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(cache_verify, "digests", sized_gone)
    with caplog.at_level(logging.INFO, logger=cache_verify.__name__):
        assert [(r.kind, r.status) for r in c.verify()] == [("base", "ok")]
    assert [r.getMessage() for r in caplog.records] == [
        "Cached sized %s was removed while it was being verified" % path]

    # The sized bases after a base that went are still verified.
    path, size = sized_copy(c, entry)

    def base_gone(p, *args, **kwargs):
        if p == entry.path:
            os.unlink(p)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(cache_verify, "digests", base_gone)
    assert rows(c.verify()) == [("sized", "unverified", NO_SIZED_DIGEST,
                                 None)]


def test_a_corrupt_file_is_logged_with_what_was_found(caplog, make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    with caplog.at_level(logging.WARNING, logger=cache_verify.__name__):
        [row] = c.verify()
    assert [r.getMessage() for r in caplog.records
            if r.name == cache_verify.__name__] == [
        "Cached base %s is corrupt: %s" % (entry.path, row.detail)]


# -- repair -------------------------------------------------------------------

def test_repair_moves_an_unused_corrupt_base_aside_and_marks_it_stale(
        caplog, make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    with caplog.at_level(logging.WARNING, logger=cache_verify.__name__):
        [row] = c.verify(repair=True)
    assert (row.status, row.action) == (
        "corrupt", "moved aside to %s.corrupt" % entry.path)
    assert not os.path.exists(entry.path)
    assert os.path.exists(entry.path + ".corrupt")
    record = cache_layout.read_record(entry.path + ".json")
    assert (record["stale"], record["stale_reason"]) == (True, "corrupt")
    assert "Moved corrupt cached base %s aside to %s.corrupt" % (
        entry.path, entry.path) in [r.getMessage() for r in caplog.records]
    # The next use fetches a new generation.
    again, hit = c.get("img")
    assert (again.generation, hit) == (2, False)


def test_repair_never_moves_a_corrupt_base_a_disk_uses(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    disks = [test_usage.overlay(os.path.join(c.instances_path, vm, "disk"),
                                entry.path) for vm in ("vm1", "vm2")]
    flip(entry.path, 3)
    [row] = c.verify(repair=True)
    assert row.action == (
        "in use by %s: left in place, marked stale; new disks use a fresh "
        "copy" % ", ".join(sorted(disks)))
    assert os.path.exists(entry.path)
    assert not os.path.exists(entry.path + ".corrupt")
    assert cache_layout.read_record(entry.path + ".json")[
        "stale_reason"] == "corrupt"


def test_repair_never_moves_a_corrupt_sized_base_a_disk_uses(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    disk = test_usage.overlay(os.path.join(c.instances_path, "vm", "disk"),
                              path)
    flip(path, 3)
    found = c.verify(repair=True)
    assert rows(found) == [
        ("base", "ok", "", None),
        ("sized", "corrupt", "its content differs from what its original "
         "base's record records", "in use by %s: left in place, marked "
         "stale; new disks use a fresh copy" % disk)]
    assert os.path.exists(path)
    assert cache_layout.read_record(entry.path + ".json")[
        "stale_reason"] == "corrupt"


def test_repair_of_a_corrupt_sized_base_moves_only_it(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    path, size = sized_copy(c, entry)
    flip(path, 3)
    found = c.verify(repair=True)
    assert [r.action for r in found] == [None, "moved aside to %s.corrupt"
                                         % path]
    assert os.path.exists(entry.path) and not os.path.exists(path)
    assert os.path.exists(path + ".corrupt")


def test_repair_asks_again_under_the_locks_who_uses_the_base(make_cache):
    """A disk made after the usage scan (before the locks) keeps the base
    where it is.
    """
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    disk = os.path.join(c.instances_path, "vm", "disk")
    real_scan = c.scanner.scan

    def scan_then_a_disk_is_made():
        usage = real_scan()
        test_usage.overlay(disk, entry.path)
        c.register_disk(disk, entry, entry.path)
        return usage

    with mock.patch.object(c.scanner, "scan", scan_then_a_disk_is_made), \
            mock.patch.object(c.scanner, "users_of",
                              wraps=c.scanner.users_of) as users_of:
        [row] = c.verify(repair=True)
    users_of.assert_called_once_with(CID, CID)
    assert row.action.startswith("in use by %s: left in place" % disk)
    assert os.path.exists(entry.path)


def test_repair_counts_an_unreadable_disk_as_a_user(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    usage = cache_usage.Usage(users={}, unreadable=["/i/vm1/disk",
                                                    "/i/vm2/disk"])
    with mock.patch.object(c.scanner, "scan", return_value=usage), \
            mock.patch.object(c.scanner, "users_of", return_value=[]):
        [row] = c.verify(repair=True)
    assert row.action == (
        "in use by an unknown disk (cannot read /i/vm1/disk, /i/vm2/disk): "
        "left in place, marked stale; new disks use a fresh copy")
    assert os.path.exists(entry.path)


def test_repair_names_the_known_users_even_if_some_disk_is_unreadable(
        make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    usage = cache_usage.Usage(users={CID: ["/i/vm/disk"]},
                              unreadable=["/i/other"])
    with mock.patch.object(c.scanner, "scan", return_value=usage):
        [row] = c.verify(repair=True)
    assert row.action.startswith("in use by /i/vm/disk: left in place")


def test_repair_scans_for_disks_only_when_something_is_corrupt(make_cache):
    c = make_cache()
    c.get("img")
    with mock.patch.object(c.scanner, "scan") as scan:
        assert rows(c.verify(repair=True)) == [("base", "ok", "", None)]
    scan.assert_not_called()


def test_repair_of_a_base_being_used_is_busy_and_moves_nothing(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    with c.store.use(CID):          # a disk is being made from it
        [row] = c.verify(repair=True)
    assert row.action == BUSY
    assert os.path.exists(entry.path)
    assert not cache_layout.read_record(entry.path + ".json").get("stale")


def test_repair_marks_a_trusted_unverifiable_base_stale_in_place(make_cache):
    c = make_cache(images={"img": fakes.QCOW2_IMAGE})
    entry, _ = c.get("img")
    record = dict(entry.record)
    del record["base_checksum"]
    fileio.write_json_atomic(entry.path + ".json", record)
    assert rows(c.verify(repair=True)) == [
        ("base", "unverified", NO_CONVERTED_DIGEST, MARKED)]
    assert os.path.exists(entry.path)
    assert cache_layout.read_record(entry.path + ".json") == dict(
        record, stale=True, stale_reason="unverifiable")
    # Already stale: nothing more to do.
    assert rows(c.verify(repair=True)) == [
        ("base", "unverified", NO_CONVERTED_DIGEST, None)]


def test_repair_gives_an_unrecorded_base_a_stale_record(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    os.unlink(entry.path + ".json")
    assert rows(c.verify(repair=True)) == [
        ("base", "unverified", UNVERIFIED_BASE, MARKED)]
    assert cache_layout.read_record(entry.path + ".json") == {
        "image_id": "", "generation": 1, "stale": True,
        "stale_reason": "unverifiable: no valid record",
        "unverifiable": True}
    assert os.path.exists(entry.path)


def test_repair_keeps_the_image_id_of_an_untrusted_record(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    record = dict(entry.record)
    del record["checksum"]
    fileio.write_json_atomic(entry.path + ".json", record)
    assert [r.action for r in c.verify(repair=True)] == [MARKED]
    assert cache_layout.read_record(entry.path + ".json") == {
        "image_id": "img", "generation": 1, "stale": True,
        "stale_reason": "unverifiable: no valid record",
        "unverifiable": True}


def test_repair_of_an_unverifiable_base_being_used_is_busy(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    os.unlink(entry.path + ".json")
    with c.store.use(CID):
        assert [r.action for r in c.verify(repair=True)] == [BUSY]
    assert not os.path.exists(entry.path + ".json")


def test_repair_of_a_not_cached_image_does_nothing(make_cache):
    c = make_cache()
    found = c.verify(["img"], repair=True)
    assert [(r.status, r.action) for r in found] == [("not cached", None)]


def test_the_verifier_repairs_nothing_unless_asked(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    assert [(r.status, r.action) for r in c.verifier.verify()] == [
        ("corrupt", None)]
    assert os.path.exists(entry.path)
    assert not cache_layout.read_record(entry.path + ".json").get("stale")


def test_without_repair_nothing_is_changed(make_cache):
    c = make_cache()
    entry, _ = c.get("img")
    flip(entry.path, 3)
    with open(entry.path + ".json", "rb") as f:
        before = f.read()
    assert [(r.status, r.action) for r in c.verify()] == [("corrupt", None)]
    with open(entry.path + ".json", "rb") as f:
        assert f.read() == before
    assert os.path.exists(entry.path)
