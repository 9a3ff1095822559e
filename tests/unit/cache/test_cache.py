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

"""ImageCache logic with an in-memory source and a mocked qemu-img."""

import concurrent.futures
import dataclasses
import json
import os
import re
import threading
import time
from unittest import mock

from oslo_config import cfg
import pytest

from imagebackend import cache
from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.common import digest as content_digest
from imagebackend.common import fileio
from imagebackend import exception
from imagebackend import inspection
from tests import fakes

MiB = fakes.MiB
RAW = fakes.RAW_IMAGE
QCOW2 = fakes.QCOW2_IMAGE


@pytest.fixture
def qemu(fake_qemu):
    return fake_qemu


def make_cache(tmp_path, qemu, **kwargs):
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={"raw-img": RAW,
                                            "qcow2-img": QCOW2}, **kwargs)
    return cache.ImageCache(conf, source, qemu), source


def base_files(c):
    """The files of ``_base`` but the cache's hidden bookkeeping (the
    generation claims, which are kept for good).
    """
    if not os.path.isdir(c.base_dir):
        return []
    return sorted(n for n in os.listdir(c.base_dir) if not n.startswith("."))


def test_raw_image_is_published_by_rename_without_qemu(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    entry, hit = c.get("raw-img")
    assert hit is False
    assert entry.format == "raw"
    assert entry.virtual_size == len(RAW)
    with open(entry.path, "rb") as f:
        assert f.read() == RAW
    qemu.convert.assert_not_called()
    cid = content_digest.cache_id("raw-img")
    assert base_files(c) == [cid, cid + ".json"]
    assert entry.record["checksum"]["algo"] == "sha512"


def test_qcow2_image_is_converted_with_its_detected_format(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    entry, hit = c.get("qcow2-img")
    base = c.base_path(content_digest.cache_id("qcow2-img"))
    qemu.convert.assert_called_once()
    args, kwargs = qemu.convert.call_args
    assert re.fullmatch(re.escape(base) + r"\.part-[0-9a-f]{12}", args[0])
    assert re.fullmatch(re.escape(base) + r"\.converted-[0-9a-f]{12}",
                        args[2])
    assert (args[1], args[3]) == ("qcow2", "raw")
    assert kwargs == dict(target_cache="unsafe", durable=False,
                          progress=None, limits=True,
                          max_output_size=8 * MiB)
    assert entry.format == "raw"
    assert entry.record["source_format"] == "qcow2"
    assert base_files(c) == [os.path.basename(base),
                             os.path.basename(base) + ".json"]


def test_second_get_is_a_hit_and_does_not_download(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.get("raw-img")
    entry, hit = c.get("raw-img")
    assert hit is True
    assert source.opened == 1


def test_checksum_mismatch_leaves_nothing(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu,
                           checksums={"raw-img": "0" * 128})
    with pytest.raises(exception.ImageChecksumMismatch) as err:
        c.get("raw-img")
    assert "raw-img" in str(err.value)
    assert base_files(c) == []


def test_short_body_leaves_nothing(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu, truncate=1000)
    with pytest.raises(exception.ImageDownloadError) as err:
        c.get("raw-img")
    assert "received 1000 bytes" in str(err.value)
    assert base_files(c) == []


def test_failed_conversion_leaves_nothing(tmp_path, qemu):
    def fail(source, source_fmt, target, target_fmt, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half")
        raise exception.QemuImgError(operation="convert", path=source,
                                     exit_code=1, stderr="No space left")
    qemu.convert.side_effect = fail
    c, source = make_cache(tmp_path, qemu)
    with pytest.raises(exception.QemuImgError):
        c.get("qcow2-img")
    assert base_files(c) == []


def test_requested_size_below_header_size_refused_early(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    with pytest.raises(exception.InvalidImageSize):
        c.get("qcow2-img", requested_size=MiB)
    assert base_files(c) == []
    qemu.convert.assert_not_called()


def test_leftover_scratch_files_are_left_to_prune(tmp_path, qemu):
    """A fetch never touches scratch it did not make: another host that
    locks elsewhere may be writing it.
    """
    c, source = make_cache(tmp_path, qemu)
    c.store.ensure_dirs()
    base = c.base_path(content_digest.cache_id("raw-img"))
    with open(base + ".part", "wb") as f:
        f.write(b"crashed download")
    entry, hit = c.get("raw-img")
    with open(entry.path, "rb") as f:
        assert f.read() == RAW
    with open(base + ".part", "rb") as f:
        assert f.read() == b"crashed download"


def test_symlinked_base_is_refused(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.store.ensure_dirs()
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file")
    os.symlink(victim, c.base_path(content_digest.cache_id("raw-img")))
    with pytest.raises(exception.UnsafeCachePath):
        c.get("raw-img")
    assert victim.read_bytes() == b"host file"


def test_concurrent_gets_download_once(tmp_path, qemu):
    # A slow download, so the other gets arrive while it runs.
    c, source = make_cache(tmp_path, qemu, delay=0.05)
    barrier = threading.Barrier(8)
    events = []
    chunks = source._chunks

    def timed_chunks(data):
        events.append(("download", time.monotonic()))
        yield from chunks(data)
        events.append(("downloaded", time.monotonic()))

    def get(_):
        barrier.wait()
        events.append(("get", time.monotonic()))
        return c.get("qcow2-img")

    with mock.patch.object(source, "_chunks", timed_chunks):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(get, range(8)))
    assert sorted(hit for _, hit in results) == [False] + [True] * 7
    assert source.opened == 1
    assert qemu.convert.call_count == 1
    # The race happened: the other gets were asked while the one download
    # ran, and waited for it rather than downloading again.
    [start] = [t for what, t in events if what == "download"]
    [end] = [t for what, t in events if what == "downloaded"]
    overlapping = [t for what, t in events if what == "get" and t < end]
    assert len(overlapping) == 8 and start < end


@pytest.mark.parametrize("damage", [
    "missing", "not json", "symlink", "wrong types", "no checksum"])
def test_base_without_a_valid_record_is_never_trusted_again(
        tmp_path, qemu, damage):
    """Whatever happened to its record, a base is not re-recorded from its
    own bytes and stamped current: it is marked stale and the image is
    fetched again as a new generation.
    """
    c, source = make_cache(tmp_path, qemu)
    entry, _ = c.get("raw-img")
    record_path = entry.path + ".json"
    good = fileio.read_json(record_path)
    os.unlink(record_path)
    if damage == "not json":
        with open(record_path, "w") as f:
            f.write('{"image_id": "raw-img", "format": "ra')
    elif damage == "symlink":
        decoy = tmp_path / "decoy.json"
        decoy.write_text(json.dumps(good))
        os.symlink(decoy, record_path)
    elif damage == "wrong types":
        fileio.write_json_atomic(record_path, dict(
            good, virtual_size=str(good["virtual_size"])))
    elif damage == "no checksum":
        fileio.write_json_atomic(record_path, {
            key: value for key, value in good.items()
            if key != "checksum"})
    assert c.lookup("raw-img") is None
    again, hit = c.get("raw-img")
    assert (again.generation, hit) == (2, False)
    assert source.opened == 2
    assert read(again.path) == RAW
    old = cache_layout.read_record(record_path)
    assert old["stale"] is True and "checksum" not in old
    assert os.path.exists(entry.path)      # a disk may still use it
    if damage == "symlink":
        assert json.loads(decoy.read_text()) == good     # not followed
    rows = {r.generation: r for r in c.verify()}
    assert rows[1].status == "unverified"
    assert rows[2].status == "ok"


def test_list_reports_bases(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    assert c.entries() == []
    c.get("raw-img")
    rows = c.entries()
    assert len(rows) == 1
    assert rows[0].image_id == "raw-img"
    assert rows[0].virtual_size == len(RAW)
    assert rows[0].format == "raw"
    assert rows[0].to_dict()["file"] == rows[0].file


def test_lock_path_defaults_beside_base_and_can_be_overridden(tmp_path,
                                                              qemu):
    c, _ = make_cache(tmp_path, qemu)
    assert c.lock_dir == os.path.join(c.instances_path, "locks")
    assert os.path.dirname(c.base_dir) == os.path.dirname(c.lock_dir)
    conf = fakes.conf(tmp_path)
    conf.set_override("lock_path", str(tmp_path / "elsewhere"),
                      group="oslo_concurrency")
    c2 = cache.ImageCache(conf, fakes.FakeSource(conf), qemu)
    assert c2.lock_dir == str(tmp_path / "elsewhere")
    c2.store.ensure_dirs()
    assert os.path.isdir(tmp_path / "elsewhere")


def _registered(conf):
    """Every (group, option) registered on ``conf``."""
    found = set()
    for key in conf:
        value = conf[key]
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            found.update((key, name) for name in value)
        else:
            found.add((None, key))
    return found


def test_the_cache_registers_no_option_when_it_is_made(tmp_path, qemu):
    conf = fakes.conf(tmp_path)
    before = _registered(conf)
    groups = []

    def spy(real):
        def register(*args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            groups.append(getattr(group, "name", group))
            return real(*args, **kwargs)
        return register

    with mock.patch.object(conf, "register_opts",
                           spy(conf.register_opts)), \
            mock.patch.object(conf, "register_opt", spy(conf.register_opt)):
        cache.ImageCache(conf, fakes.FakeSource(conf), qemu)
    # Only reading lock_path registers oslo.concurrency's group
    # (imagebackend.common.lock_path), idempotently.
    assert set(groups) <= {"oslo_concurrency"}
    assert _registered(conf) == before


def test_register_opts_registers_the_cache_groups_only():
    conf = cfg.ConfigOpts()
    conf([])
    before = _registered(conf)
    cache.register_opts(conf)
    added = _registered(conf) - before
    assert {group for group, _ in added} == {"image_cache",
                                             "oslo_concurrency"}
    assert ("oslo_concurrency", "lock_path") in added
    assert conf.image_cache.max_size == "0"
    assert conf.image_cache.disk_dirs == []


# -- generations -------------------------------------------------------------

def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_changed_image_is_published_as_a_new_generation(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    source.images["raw-img"] = b"new content" + RAW[11:]
    second, hit = c.get("raw-img")
    cid = content_digest.cache_id("raw-img")
    assert hit is False
    assert (second.cache_id, second.generation) == (cid + "-2", 2)
    assert second.path == c.base_path(cid + "-2")
    assert read(second.path).startswith(b"new content")
    assert read(first.path) == RAW
    assert first.record["checksum"] != second.record["checksum"]
    old = fileio.read_json(first.path + ".json")
    assert old["stale"] is True
    assert old["stale_reason"] == "superseded by generation 2"
    assert c.get("raw-img") == (c.lookup("raw-img"), True)
    assert c.lookup("raw-img").generation == 2


def test_a_stale_generation_is_never_used_again(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.get("raw-img")
    source.images["raw-img"] = b"other" + RAW[5:]
    c.get("raw-img")
    source.images["raw-img"] = RAW          # back to the first content
    third, hit = c.get("raw-img")
    assert (third.generation, hit) == (3, False)
    assert read(third.path) == RAW
    assert source.opened == 3


def test_a_source_without_identity_keeps_using_its_base(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.get("raw-img")
    real = source.get_meta
    source.get_meta = lambda image_id: dataclasses.replace(
        real(image_id), identity=None, hash_algo=None, hash_value=None)
    source.images["raw-img"] = b"other" + RAW[5:]
    entry, hit = c.get("raw-img")
    assert (entry.generation, hit) == (1, True)


def test_a_generation_number_is_never_reused_even_when_all_is_pruned(
        tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    sized = c.sized_path(first.cache_id, 4 * MiB)
    with open(sized, "wb") as f:
        f.write(b"a disk may use this")
    os.unlink(first.path)
    source.images["raw-img"] = b"other" + RAW[5:]
    entry, _ = c.get("raw-img")
    assert entry.generation == 2
    # Every file of both generations goes (as prune would remove them).
    for name in base_files(c):
        os.unlink(os.path.join(c.base_dir, name))
    source.images["raw-img"] = RAW
    entry, _ = c.get("raw-img")
    assert entry.generation == 3
    assert base_files(c) == [entry.cache_id, entry.cache_id + ".json"]


def test_generation_claims_are_durable_and_never_followed(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.get("raw-img")
    cid = content_digest.cache_id("raw-img")
    claims = os.path.join(c.base_dir, ".generations", cid)
    assert os.listdir(claims) == ["1"]
    assert cache_generations.claim_generation(c.base_dir, cid, 1) == 2
    assert sorted(os.listdir(claims)) == ["1", "2"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(claims, str(elsewhere / cid))
    os.symlink(elsewhere / cid, claims)
    with pytest.raises(exception.UnsafeCachePath) as err:
        cache_generations.claim_generation(c.base_dir, cid, 1)
    assert claims in str(err.value)
    assert sorted(os.listdir(elsewhere / cid)) == ["1", "2"]


def test_invalidate_marks_stale_and_removes_what_nothing_uses(tmp_path,
                                                              qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    result = c.invalidate("raw-img")
    assert result.marked_stale == [first.path]
    assert [r.file for r in result.removed] == [first.path]
    assert result.to_dict()["marked_stale"] == [first.path]
    assert c.lookup("raw-img") is None
    entry, hit = c.get("raw-img")
    assert (entry.generation, hit) == (2, False)
    assert source.opened == 2


def test_invalidate_covers_a_base_without_record(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    os.unlink(first.path + ".json")
    with c.use("raw-img"):              # a disk is being made: kept
        result = c.invalidate("raw-img")
    assert result.removed == []
    assert fileio.read_json(first.path + ".json")["stale"] is True
    entry, hit = c.get("raw-img")       # not re-inspected and trusted
    assert (entry.generation, hit) == (2, False)


def test_prefetch_fetches_each_image_once_and_reports_failures(tmp_path,
                                                               qemu):
    c, source = make_cache(tmp_path, qemu)
    seen = []
    report = c.prefetch(["raw-img", "qcow2-img", "raw-img", "missing"],
                        parallel=3,
                        progress=lambda *args: seen.append(args))
    rows = report.images
    ids = [r.image_id for r in rows]
    assert ids == ["raw-img", "qcow2-img", "missing"]
    assert [r.cache_hit for r in rows[:2]] == [False, False]
    assert "missing" in rows[2].error
    assert report.failed
    assert set(rows[2].to_dict()) == {"image_id", "error", "seconds"}
    assert set(rows[0].to_dict()) == {"image_id", "file", "generation",
                                      "cache_hit", "seconds"}
    assert source.opened == 2
    # One protocol: (stage, done, total) in bytes, the stage labelled
    # with the image.
    assert ("download raw-img", len(RAW), len(RAW)) in seen
    again = c.prefetch(["raw-img"])
    assert again.images[0].cache_hit is True and not again.failed


def test_list_shows_generation_disks_and_staleness(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    source.images["raw-img"] = b"other" + RAW[5:]
    c.get("raw-img")
    rows = c.entries()
    assert [(r.generation, r.stale, r.disks) for r in rows] == [
        (1, True, 0), (2, False, 0)]


def test_unconverted_iso_base_survives_reinspection(tmp_path, qemu):
    iso = bytearray(2 * MiB)
    iso[0x8001:0x8006] = b"CD001"       # primary volume descriptor
    iso[0x8000] = 1
    iso[0x8050:0x8054] = (1024).to_bytes(4, "little")   # blocks
    iso[0x8080:0x8082] = (2048).to_bytes(2, "little")   # block size
    conf = fakes.conf(tmp_path)
    source = fakes.FakeSource(conf, images={"cd": bytes(iso)},
                              declared={"cd": "iso"})
    c = cache.ImageCache(conf, source, qemu)
    entry, _ = c.get("cd")
    assert entry.record["source_format"] == "iso"
    assert entry.format == "raw"
    record = dict(entry.record)
    record["inspection"] = dict(record["inspection"], version=0)
    fileio.write_json_atomic(entry.path + ".json", record)
    again, hit = c.get("cd")
    assert hit is True
    assert again.record["inspection"]["format"] == "iso"
    assert os.path.exists(entry.path)


# -- inspection-version bumps ---------------------------------------------

def _guest_header_converter(source, source_fmt, target, target_fmt,
                            **kwargs):
    # The guest's data starts with a qcow2 header naming a host file.
    header = bytearray(fakes.qcow2_header(MiB))
    name = b"/etc/shadow"
    header[8:16] = (512).to_bytes(8, "big")
    header[16:20] = len(name).to_bytes(4, "big")
    with open(target, "wb") as f:
        f.write(bytes(header) + name)
        f.truncate(8 * MiB)


def test_a_raw_base_is_never_reinspected_after_a_policy_bump(
        tmp_path, qemu, monkeypatch):
    qemu.convert.side_effect = _guest_header_converter
    c, source = make_cache(tmp_path, qemu)
    entry, _ = c.get("qcow2-img")
    assert entry.format == "raw"
    assert read(entry.path).startswith(b"QFI\xfb")
    before = read(entry.path + ".json")
    monkeypatch.setattr(inspection, "INSPECTION_VERSION",
                        inspection.INSPECTION_VERSION + 1)
    with mock.patch.object(inspection, "inspect_file",
                           autospec=True) as inspect_file:
        again, hit = c.get("qcow2-img")
    inspect_file.assert_not_called()
    assert (again.path, hit) == (entry.path, True)
    assert read(entry.path + ".json") == before
    assert base_files(c) == [entry.cache_id, entry.cache_id + ".json"]
    assert source.opened == 1


def test_a_non_raw_base_is_reinspected_as_its_recorded_format(
        tmp_path, qemu, monkeypatch):
    c, source = make_cache(tmp_path, qemu)
    c.conf.set_override("force_raw_images", False, group="imagebackend")
    entry, _ = c.get("qcow2-img")
    assert entry.format == "qcow2"
    monkeypatch.setattr(inspection, "INSPECTION_VERSION",
                        inspection.INSPECTION_VERSION + 1)
    real = inspection.inspect_file
    with mock.patch.object(inspection, "inspect_file", autospec=True,
                           side_effect=real) as inspect_file:
        again, hit = c.get("qcow2-img")
        assert inspect_file.call_args.kwargs["declared_format"] == "qcow2"
        assert (again.path, hit) == (entry.path, True)
        assert again.record["inspection"]["version"] == (
            inspection.INSPECTION_VERSION)
        c.get("qcow2-img")
        assert inspect_file.call_count == 1     # recorded as current
    assert again.record["checksum"] == entry.record["checksum"]


def test_a_refused_base_is_marked_stale_and_left_for_its_disks(
        tmp_path, qemu, monkeypatch):
    c, source = make_cache(tmp_path, qemu)
    c.conf.set_override("force_raw_images", False, group="imagebackend")
    entry, _ = c.get("qcow2-img")
    monkeypatch.setattr(inspection, "INSPECTION_VERSION",
                        inspection.INSPECTION_VERSION + 1)
    refusal = exception.UnsupportedFeature(image_id="qcow2-img",
                                           reason="new rule")
    with mock.patch.object(inspection, "inspect_file", autospec=True,
                           side_effect=refusal):
        with pytest.raises(exception.UnsupportedFeature):
            c.get("qcow2-img")
    assert base_files(c) == [entry.cache_id, entry.cache_id + ".json"]
    record = cache_layout.read_record(entry.path + ".json")
    assert record["stale"] is True
    assert "new rule" in record["stale_reason"]
    assert c.lookup("qcow2-img") is None


# -- configuration --------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "a/b", "/abs",
                                  "a\0b"])
def test_base_dir_name_must_be_a_plain_name(tmp_path, qemu, name):
    conf = fakes.conf(tmp_path, base_dir_name=name)
    with pytest.raises(exception.ConfigurationError) as err:
        cache.ImageCache(conf, None, qemu)
    assert ("[imagebackend] base_dir_name = %r" % name
            in err.value.exact_message)
    assert not os.path.exists(tmp_path / "instances")


@pytest.mark.parametrize("private", [".disks", ".sources", ".generations"])
def test_a_symlinked_private_directory_is_refused(tmp_path, qemu, private):
    c, source = make_cache(tmp_path, qemu)
    os.makedirs(c.base_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, os.path.join(c.base_dir, private))
    with pytest.raises(exception.UnsafeCachePath) as err:
        c.get("raw-img")
    assert os.path.join(c.base_dir, private) in str(err.value)
    assert os.listdir(elsewhere) == []


def test_a_failed_generation_claim_is_a_cache_error(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.store.ensure_dirs()
    # A file where the claims directory belongs.
    (tmp_path / "instances" / "_base" / ".generations").write_text("x")
    c.store._dirs_ready = True
    with pytest.raises(exception.UnsafeCachePath) as err:
        c.get("raw-img")
    assert ".generations" in str(err.value)
    assert base_files(c) == []
    os.unlink(tmp_path / "instances" / "_base" / ".generations")
    real_mkdir = os.mkdir

    def full(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:      # the claims directory, not the locks
            raise OSError(28, "No space left")
        return real_mkdir(path, mode)
    with mock.patch.object(os, "mkdir", autospec=True, side_effect=full):
        with pytest.raises(exception.CacheError) as err:
            c.get("raw-img")
    assert "No space left" in str(err.value)
    assert base_files(c) == []
    assert source.opened == 0


@pytest.mark.parametrize("image_id", ["bad\xff\udcff", "two\nlines", ""])
def test_an_id_no_image_can_have_is_refused_by_every_entry_point(
        tmp_path, qemu, image_id):
    c, _ = make_cache(tmp_path, qemu)
    calls = [lambda: c.get(image_id), lambda: c.lookup(image_id),
             lambda: c.invalidate(image_id), lambda: c.verify([image_id])]
    for call in calls:
        with pytest.raises(exception.InvalidImageId):
            call()
    with pytest.raises(exception.InvalidImageId):
        with c.use(image_id):
            pass
    assert not os.path.exists(c.base_dir)
    assert not os.path.exists(c.lock_dir)


def test_sized_base_is_built_under_a_scratch_name_never_its_final_one(
        tmp_path, qemu):
    # A reader that finds <cache_id>_<size> uses it at once, so the name
    # must appear only when the file is complete: the build sees a scratch
    # file and the final name absent.
    c, _ = make_cache(tmp_path, qemu)
    entry, _ = c.get("raw-img")
    size = 4 * MiB
    final = c.sized_path(entry.cache_id, size)
    seen = []

    def build(fd, tmp):
        seen.append((tmp, os.path.lexists(final), base_files(c)))
        os.ftruncate(fd, size)
        os.pwrite(fd, RAW, 0)

    assert c.publish_derived(final, os.path.basename(final), build) is False
    [(tmp, final_existed, names)] = seen
    assert final_existed is False
    assert os.path.basename(final) not in names
    assert tmp != final and os.path.dirname(tmp) == c.base_dir
    assert os.path.basename(tmp) != os.path.basename(final)
    # Published complete once the build returned; the scratch file is gone.
    with open(final, "rb") as f:
        assert f.read(len(RAW)) == RAW
    assert os.path.getsize(final) == size
    assert not os.path.lexists(tmp)
    record = fileio.read_json(final + ".json")
    assert record["kind"] == "sized" and record["size"] == size
