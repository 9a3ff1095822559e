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

"""Names in ``_base``: stems, generations, records."""

import os

import pytest

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import scan as cache_scan

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
    assert cache_generations.generations(str(tmp_path), CID) == {
        1: {"base", "record"}, 2: {"sized"}, 3: {"scratch"}, 4: {"aside"}}
    assert cache_generations.generations(str(tmp_path / "none"), CID) == {}


def test_updating_a_record_keeps_its_last_used_time(tmp_path):
    path = str(tmp_path / (CID + ".json"))
    (tmp_path / (CID + ".json")).write_text('{"image_id": "img"}')
    os.utime(path, (1000, 2000))
    assert cache_layout.mark_stale(path, "invalidated") is True
    assert cache_layout.mark_stale(path, "again") is False
    assert os.stat(path).st_mtime == 2000
    record = cache_scan.scan(str(tmp_path)).records[CID][0]
    assert record == {"image_id": "img", "stale": True,
                      "stale_reason": "invalidated"}


def test_scratch_names_are_unique_per_attempt_and_recognised(tmp_path):
    final = str(tmp_path / (CID + "-2_1048576"))
    names = {cache_layout.scratch_name(final, kind)
             for kind in (".part", ".converted") for _ in range(50)}
    assert len(names) == 100
    for path in names:
        name = cache_layout.parse(os.path.basename(path))
        assert name.is_scratch
        assert (name.generation, name.size) == (2, 1048576)
        assert name.base_name == CID + "-2_1048576"
    for legacy in (CID + ".part", CID + "-3.converted"):
        assert cache_layout.parse(legacy).is_scratch
    for other in (CID + ".json", CID + ".corrupt", CID):
        assert not cache_layout.parse(other).is_scratch
    for bad in (CID + ".part-123", CID + ".part-0123456789AB",
                CID + ".part-0123456789abc"):
        assert cache_layout.parse(bad) is None
    with pytest.raises(ValueError):
        cache_layout.scratch_name(final, ".json")


def test_a_scan_lists_new_scratch_as_scratch(tmp_path):
    for name in (CID, CID + ".json", CID + ".part-0123456789ab",
                 CID + "_4096.part-ba9876543210"):
        (tmp_path / name).write_bytes(b"")
    layout = cache_scan.scan(str(tmp_path))
    assert sorted(n.name for n, _ in layout.scratch) == [
        CID + ".part-0123456789ab", CID + "_4096.part-ba9876543210"]
    assert [f.name.name for f in layout.bases] == [CID]
