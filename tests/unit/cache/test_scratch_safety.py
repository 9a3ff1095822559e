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

"""Pruning removes a crash's scratch, and no scratch a fetch may still
write.
"""

import os
import time

from imagebackend import cache
from imagebackend.cache import layout as cache_layout
from imagebackend.common import digest as content_digest
from tests import fakes


def _scratch(c, image_id, suffix, age):
    path = c.base_path(content_digest.cache_id(image_id)) + suffix
    with open(path, "wb") as f:
        f.write(b"half a download")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_scratch_is_removed_only_when_old_and_its_lock_free(tmp_path):
    conf = fakes.conf(tmp_path)
    c = cache.ImageCache(conf, fakes.FakeSource(conf, images={}),
                         fakes.qemu())
    c.store.ensure_dirs()
    old = cache_layout.SCRATCH_MINIMUM_AGE + 60
    # A day old, with nobody holding its lock: a crash's.
    orphans = [_scratch(c, "gone", ".part-0123456789ab", old),
               _scratch(c, "gone2", ".converted-0123456789ab", old)]
    # Younger than a day: a host that locks elsewhere may be writing it.
    young = _scratch(c, "young", ".part-0123456789ab",
                     cache_layout.SCRATCH_MINIMUM_AGE - 60)
    # Old, but its fetch lock is held: a fetch is still at it.
    busy = _scratch(c, "busy", ".part-0123456789ab", old)

    assert sorted(r.file for r in c.prune(dry_run=True).removed) == sorted(
        orphans + [busy])
    assert all(os.path.exists(p) for p in orphans + [busy])
    with c.store.lock(content_digest.cache_id("busy")):
        report = c.prune()
    assert sorted(r.file for r in report.removed) == sorted(orphans)
    assert {r.kind for r in report.removed} == {"scratch"}
    assert not any(os.path.exists(p) for p in orphans)
    assert os.path.exists(young) and os.path.exists(busy)

    assert [r.file for r in c.prune().removed] == [busy]
    assert os.path.exists(young)
