"""ImageCache logic with an in-memory source and a mocked qemu-img."""

import concurrent.futures
import dataclasses
import os
import re

import pytest

from imagebackend import cache
from imagebackend import exception
from imagebackend import fileutils
from imagebackend.tests.unit import fakes

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
    """The files in ``_base``, without hidden bookkeeping (``.lock-dirs``,
    ``.disks``).
    """
    return sorted(n for n in os.listdir(c.base_dir)
                  if not n.startswith(".")) if os.path.isdir(c.base_dir) \
        else []


def test_cache_id_is_sha1_of_the_image_id():
    assert cache.cache_id("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"


def test_raw_image_is_published_by_rename_without_qemu(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    entry, hit = c.get("raw-img")
    assert hit is False
    assert entry.format == "raw"
    assert entry.virtual_size == len(RAW)
    with open(entry.path, "rb") as f:
        assert f.read() == RAW
    qemu.convert.assert_not_called()
    cid = cache.cache_id("raw-img")
    assert base_files(c) == [cid, cid + ".json"]
    assert entry.record["checksum"]["algo"] == "sha512"


def test_qcow2_image_is_converted_with_its_detected_format(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    entry, hit = c.get("qcow2-img")
    base = c.base_path(cache.cache_id("qcow2-img"))
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
    c.ensure_dirs()
    base = c.base_path(cache.cache_id("raw-img"))
    with open(base + ".part", "wb") as f:
        f.write(b"crashed download")
    entry, hit = c.get("raw-img")
    with open(entry.path, "rb") as f:
        assert f.read() == RAW
    with open(base + ".part", "rb") as f:
        assert f.read() == b"crashed download"


def test_symlinked_base_is_refused(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    c.ensure_dirs()
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file")
    os.symlink(victim, c.base_path(cache.cache_id("raw-img")))
    with pytest.raises(exception.UnsafeCachePath):
        c.get("raw-img")
    assert victim.read_bytes() == b"host file"


def test_concurrent_gets_download_once(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: c.get("qcow2-img"), range(8)))
    assert sorted(hit for _, hit in results) == [False] + [True] * 7
    assert source.opened == 1
    assert qemu.convert.call_count == 1


def test_base_without_record_is_reinspected(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    entry, _ = c.get("raw-img")
    os.unlink(entry.path + ".json")
    again, hit = c.get("raw-img")
    assert hit is True
    assert again.format == "raw"
    assert os.path.exists(entry.path + ".json")
    assert source.opened == 1


def test_list_reports_bases(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    assert c.list() == []
    c.get("raw-img")
    rows = c.list()
    assert len(rows) == 1
    assert rows[0]["image_id"] == "raw-img"
    assert rows[0]["virtual_size"] == len(RAW)
    assert rows[0]["format"] == "raw"


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
    c2.ensure_dirs()
    assert os.path.isdir(tmp_path / "elsewhere")


# -- generations -------------------------------------------------------------

def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_changed_image_is_published_as_a_new_generation(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    source.images["raw-img"] = b"new content" + RAW[11:]
    second, hit = c.get("raw-img")
    cid = cache.cache_id("raw-img")
    assert hit is False
    assert (second.cache_id, second.generation) == (cid + "-2", 2)
    assert second.path == c.base_path(cid + "-2")
    assert read(second.path).startswith(b"new content")
    assert read(first.path) == RAW
    assert first.record["checksum"] != second.record["checksum"]
    old = fileutils.read_json(first.path + ".json")
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


def test_a_generation_name_is_reused_only_when_nothing_of_it_is_left(
        tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    sized = c.sized_path(first.cache_id, 4 * MiB)
    with open(sized, "wb") as f:
        f.write(b"a disk may use this")
    os.unlink(first.path)
    source.images["raw-img"] = b"other" + RAW[5:]
    entry, _ = c.get("raw-img")
    assert entry.generation == 2        # the sized base still names gen 1
    for path in (sized, entry.path, first.path + ".json",
                 entry.path + ".json"):
        os.unlink(path)
    source.images["raw-img"] = RAW
    entry, _ = c.get("raw-img")
    assert entry.generation == 1


def test_invalidate_marks_stale_and_removes_what_nothing_uses(tmp_path,
                                                              qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    result = c.invalidate("raw-img")
    assert result["marked_stale"] == [first.path]
    assert [r["file"] for r in result["removed"]] == [first.path]
    assert c.lookup("raw-img") is None
    entry, hit = c.get("raw-img")
    assert (entry.generation, hit) == (1, False)
    assert source.opened == 2


def test_invalidate_covers_a_base_without_record(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    os.unlink(first.path + ".json")
    with c.use("raw-img"):              # a disk is being made: kept
        result = c.invalidate("raw-img")
    assert result["removed"] == []
    assert fileutils.read_json(first.path + ".json")["stale"] is True
    entry, hit = c.get("raw-img")       # not re-inspected and trusted
    assert (entry.generation, hit) == (2, False)


def test_prefetch_fetches_each_image_once_and_reports_failures(tmp_path,
                                                               qemu):
    c, source = make_cache(tmp_path, qemu)
    seen = []
    rows = c.prefetch(["raw-img", "qcow2-img", "raw-img", "missing"],
                      parallel=3,
                      progress=lambda *args: seen.append(args[:2]))
    ids = [r["image_id"] for r in rows]
    assert ids == ["raw-img", "qcow2-img", "missing"]
    assert [r.get("cache_hit") for r in rows[:2]] == [False, False]
    assert "missing" in rows[2]["error"]
    assert source.opened == 2
    assert ("raw-img", "fetch") in seen
    assert c.prefetch(["raw-img"])[0]["cache_hit"] is True


def test_list_shows_generation_disks_and_staleness(tmp_path, qemu):
    c, source = make_cache(tmp_path, qemu)
    first, _ = c.get("raw-img")
    source.images["raw-img"] = b"other" + RAW[5:]
    c.get("raw-img")
    rows = c.list()
    assert [(r["generation"], r["stale"], r["disks"]) for r in rows] == [
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
    fileutils.write_json_atomic(entry.path + ".json", record)
    again, hit = c.get("cd")
    assert hit is True
    assert again.record["inspection"]["format"] == "iso"
    assert os.path.exists(entry.path)
