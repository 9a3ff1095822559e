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

"""The cache on a real filesystem with the real qemu-img, through the
command line: no symlink in ``_base`` or the lock directory is followed,
and nothing is pruned while a directory of disks cannot be read.
"""

import json
import os

import pytest

from imagebackend import cache
from imagebackend.cache import locks as cache_locks
from imagebackend.common import digest as content_digest
from imagebackend import sources
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
IMAGE = "guest.qcow2"
VICTIM = b"a host file the cache must never write or serve\n" * 64

pytestmark = fenv.NEEDS_QEMU_IMG


@pytest.fixture
def dep(tmp_path):
    return fenv.with_qcow2(str(tmp_path), IMAGE, 16 * MiB)


def _victim(dep):
    path = os.path.join(dep.root, "victim")
    with open(path, "wb") as f:
        f.write(VICTIM)
    return path


def _one_line_error(result):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result
    return lines[0]


def _create(dep, name="vm", check=False):
    target = os.path.join(dep.instances, name, "disk")
    return target, dep.cli("disk", "create", IMAGE, target, "--size", "1G",
                           "--backend", "qcow2", check=check)


def test_a_symlink_under_a_bases_name_is_refused(dep):
    victim = _victim(dep)
    os.makedirs(dep.base_dir)
    name = dep.base_path(IMAGE)
    os.symlink(victim, name)

    target, result = _create(dep)

    line = _one_line_error(result)
    assert name in line and "symlink" in line, line
    assert not os.path.exists(target)
    with open(victim, "rb") as f:
        assert f.read() == VICTIM
    assert os.path.islink(name)
    # Nothing named the victim: no disk backed by it, no qemu-img run on it.
    assert victim not in "\n".join(dep.qemu_calls())


@pytest.mark.parametrize("lock", ["fetch", "use"])
def test_a_symlink_at_a_lock_files_name_is_never_followed(dep, lock):
    victim = _victim(dep)
    lock_dir = os.path.join(dep.instances, "locks")
    os.makedirs(lock_dir)
    cid = content_digest.cache_id(IMAGE)
    if lock == "fetch":
        name = cache_locks.lock_file(lock_dir, cid)
    else:
        name = cache_locks.use_lock_file(lock_dir, cid)
    os.symlink(victim, name)

    target, result = _create(dep)

    line = _one_line_error(result)
    assert os.path.basename(name) in line, line
    with open(victim, "rb") as f:
        assert f.read() == VICTIM
    assert os.path.islink(name)
    assert not os.path.exists(target)
    assert dep.base_listing() == []


def test_nothing_is_removed_while_a_disk_directory_is_missing(dep):
    unmounted = os.path.join(dep.root, "unmounted")
    dep.write_config(image_cache={
        "remove_unused_original_minimum_age_seconds": 0,
        "disk_dirs": unmounted})
    conf = dep.conf()
    c = cache.ImageCache(conf, sources.load(conf))
    [row] = c.prefetch([IMAGE]).images
    base = dep.base_path(IMAGE)
    assert row.file == base and os.path.exists(base)

    # Its disks may be on the missing filesystem: nothing is pruned, and
    # the report says why (on the command line too).
    report = dep.cli_json("cache", "prune")
    assert report["removed"] == []
    assert [k["file"] for k in report["kept"]] == [base]
    assert "could not read %s" % unmounted in report["kept"][0]["reason"]
    assert c.invalidate(IMAGE).removed == []
    assert os.path.exists(base)

    # Mounted again (and empty): the unused base goes.
    os.makedirs(unmounted)
    assert [r.file for r in c.prune().removed] == [base]
    assert not os.path.exists(base)


def test_repair_marks_an_unverifiable_base_stale_and_never_moves_it(dep):
    conf = dep.conf()
    cache.ImageCache(conf, sources.load(conf)).prefetch([IMAGE])
    base = dep.base_path(IMAGE)
    os.unlink(base + ".json")           # nothing can vouch for it now

    result = dep.cli("cache", "verify", "--repair", "-f", "json",
                     check=False)

    assert result.returncode == 1, result
    [row] = json.loads(result.stdout)
    assert (row["file"], row["status"]) == (base, "unverified")
    assert row["action"].startswith("marked stale, left in place")
    assert os.path.exists(base) and not os.path.exists(base + ".corrupt")
    [listed] = dep.cli_json("cache", "list")
    assert (listed["file"], listed["stale"]) == (base, True)
