"""Names in ``_base``: stems, generations, records."""

import os

import pytest

from imagebackend import cache_layout

CID = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("name, gen, size, suffix", [
    (CID, 1, None, ""),
    (CID + "-2", 2, None, ""),
    (CID + "-17_1073741824", 17, 1073741824, ""),
    (CID + "_1048576.part", 1, 1048576, ".part"),
    (CID + "-3.converted", 3, None, ".converted"),
    (CID + "-3.json", 3, None, ".json"),
    (CID + ".corrupt", 1, None, ".corrupt"),
])
def test_names_are_taken_apart(name, gen, size, suffix):
    parsed = cache_layout.parse(name)
    assert (parsed.cid, parsed.generation, parsed.size, parsed.suffix) == (
        CID, gen, size, suffix)
    assert parsed.stem == cache_layout.stem(CID, gen)


@pytest.mark.parametrize("name", [
    CID + "-1", CID + "-0", CID + "-02", CID + "_0", CID.upper(),
    CID[:-1], CID + ".tmp", "locks", ".disks", CID + "-2-3",
])
def test_other_names_are_not_the_caches(name):
    assert cache_layout.parse(name) is None


def test_first_generation_keeps_the_plain_name():
    assert cache_layout.stem(CID, 1) == CID
    assert cache_layout.stem(CID, 12) == CID + "-12"


def test_generations_lists_what_each_generation_has(tmp_path):
    for name in (CID, CID + ".json", CID + "-2_1048576", CID + "-3.part",
                 CID + "-4.corrupt", "f" * 40):
        (tmp_path / name).write_bytes(b"")
    assert cache_layout.generations(str(tmp_path), CID) == {
        1: {"base", "record"}, 2: {"sized"}, 3: {"scratch"}, 4: {"aside"}}
    assert cache_layout.generations(str(tmp_path / "none"), CID) == {}


def test_updating_a_record_keeps_its_last_used_time(tmp_path):
    path = str(tmp_path / (CID + ".json"))
    (tmp_path / (CID + ".json")).write_text('{"image_id": "img"}')
    os.utime(path, (1000, 2000))
    assert cache_layout.mark_stale(path, "invalidated") is True
    assert cache_layout.mark_stale(path, "again") is False
    assert os.stat(path).st_mtime == 2000
    record = cache_layout.scan(str(tmp_path)).records[CID][0]
    assert record == {"image_id": "img", "stale": True,
                      "stale_reason": "invalidated"}
