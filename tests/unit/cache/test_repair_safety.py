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

"""``verify --repair`` moves aside only what nothing uses."""

import os

import pytest

from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from tests import fakes
from tests.unit.cache import test_usage
from tests.unit.sources import test_source_contract

UNUSED, USED = "unused-img", "used-img"


@pytest.mark.parametrize("known", ["registered", "found on disk"])
def test_repair_moves_aside_only_the_corrupt_base_nothing_uses(tmp_path,
                                                               known):
    conf = fakes.conf(tmp_path)
    c = cache.ImageCache(conf, fakes.FakeSource(
        conf, images={UNUSED: fakes.RAW_IMAGE,
                      USED: fakes.RAW_IMAGE[::-1]}), fakes.qemu())
    unused, _ = c.get(UNUSED)
    used, _ = c.get(USED)
    disk = os.path.join(conf.imagebackend.instances_path, "vm", "disk")
    test_usage.overlay(disk, used.path)
    if known == "registered":
        c.register_disk(disk, used, used.path)
    assert {r.status for r in c.verify()} == {"ok"}
    test_source_contract.flip(unused.path, 5)
    test_source_contract.flip(used.path, 5)
    assert {(r.file, r.status, r.action) for r in c.verify()} == {
        (unused.path, "corrupt", None), (used.path, "corrupt", None)}

    rows = {r.file: r for r in c.verify(repair=True)}

    assert rows[unused.path].action == (
        "moved aside to %s.corrupt" % unused.path)
    assert not os.path.exists(unused.path)
    assert os.path.exists(unused.path + ".corrupt")
    # The base a disk reads stays where the disk's header points.
    assert rows[used.path].action.startswith("in use by %s: left in place"
                                             % disk)
    assert os.path.exists(used.path)
    assert not os.path.exists(used.path + ".corrupt")
    for entry in (unused, used):
        record = cache_layout.read_record(entry.path + ".json")
        assert record["stale"] is True
    # Stale, so a new request fetches each image again.
    again, _ = c.get(USED)
    assert again.path != used.path
    assert os.path.exists(used.path)
