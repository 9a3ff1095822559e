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

"""Pruning overlay templates, exactly: the space they count, the age at
which scratch of a template goes, the reason and size each removal
reports, and the image lock a removal takes.

Real cache directories in ``tmp_path``; only the clock is fixed.
"""

import os

from imagebackend.cache import templates
from tests.unit.cache import test_prune_mutants as pm

CID = pm.cid("a")
DAY = pm.DAY
NOW = pm.NOW

c = pm.c


def template(c, base=CID, suffix="", data=b"t" * 8192, mtime=None):
    c.store.ensure_dirs()
    name = base + templates.INFIX + "1048576-" + "0" * 16 + suffix
    return pm.write(os.path.join(c.base_dir, name), data, mtime)


def test_templates_count_in_the_cache_size(c):
    kept = template(c, suffix=".part-" + pm.TOKEN, mtime=NOW - DAY + 1)
    report = pm.prune(c)
    assert report.removed == []
    assert os.path.exists(kept)
    assert report.cache_size == pm.allocated(kept) > 0


def test_template_scratch_goes_at_exactly_the_minimum_age(c):
    old = template(c, suffix=".part-" + pm.TOKEN, mtime=NOW - DAY)
    young = template(c, suffix=".part-" + "1" * 12, mtime=NOW - DAY + 1)
    size = pm.allocated(old)
    report = pm.prune(c)
    assert pm.removed(report) == [
        (old, "template", "orphaned (unmodified for %d s)" % DAY, size)]
    assert os.path.exists(young)
    assert report.bytes_freed == size


def test_a_template_whose_base_is_gone_says_so_with_its_size(c):
    orphan = template(c, mtime=NOW)
    size = pm.allocated(orphan)
    report = pm.prune(c)
    assert pm.removed(report) == [(orphan, "template", "its base is gone",
                                   size)]
    assert not os.path.exists(orphan)


def test_a_template_goes_only_under_its_image_lock(c):
    orphan = template(c, mtime=NOW)
    with pm.held(c.store.lock(CID)):
        report = pm.prune(c)
    assert report.removed == []
    assert os.path.exists(orphan)
    assert [r.file for r in pm.prune(c).removed] == [orphan]


def test_space_pruning_subtracts_only_what_each_removal_freed(c):
    a, b, d = pm.fetched(c, "a", "b", "c",
                         last_used=[NOW - 30, NOW - 20, NOW - 10])
    sizes = [pm.allocated(e.path) for e in (a, b, d)]
    # One byte more than the two oldest free: the third must go too.
    report = pm.prune(c, max_size=str(sizes[2] - 1))
    assert [r.file for r in report.removed] == [a.path, b.path, d.path]
    assert report.bytes_freed == sum(sizes)
    assert report.space_target_met is True
