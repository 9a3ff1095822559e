#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""A full filesystem at every write of every backend.

``instances_path`` (and so ``_base``, the lock directory and the disks) is
a small loop-mounted ext4 filesystem (a tmpfs where loop devices are not
available), filled to levels spread over the space one create needs at its
peak, and then with no free inodes at all.  Every create then either
succeeds with a complete disk or fails cleanly -- non-zero exit, one line
naming the image or file, no traceback -- leaving nothing partial under a
final name; the cache still verifies, and once space is freed a retry
succeeds.
"""

import errno
import os
import shutil
import subprocess
import threading
import time

import pytest

from imagebackend.common import digest as content_digest
from tests.stress import harness

MiB = harness.MiB
BACKENDS = ("qcow2", "cached-base", "raw")
VIRTUAL = 32 * MiB
SIZE = 48 * MiB


def _mount(fs_dir, image_file):
    """Mount a 128 MiB ext4 (or tmpfs) on ``fs_dir``; returns its kind."""
    if os.geteuid() == 0 and shutil.which("mkfs.ext4"):
        with open(image_file, "wb") as f:
            f.truncate(128 * MiB)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N",
                               "2048", image_file], capture_output=True)
        if made.returncode == 0 and subprocess.run(
                ["mount", "-o", "loop", image_file, fs_dir],
                capture_output=True).returncode == 0:
            return "ext4"
    if os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=128m,nr_inodes=2048",
             "tmpfs", fs_dir], capture_output=True).returncode == 0:
        return "tmpfs"
    return None


@pytest.fixture
def small_fs(tmp_path):
    fs_dir = str(tmp_path / "fs")
    os.makedirs(fs_dir)
    kind = _mount(fs_dir, str(tmp_path / "fs.img"))
    if kind is None:
        pytest.skip("SKIPPED LOUDLY: cannot mount a small filesystem "
                    "(needs root and a loop device or tmpfs); the full-"
                    "filesystem tests did not run")
    try:
        yield fs_dir, kind
    finally:
        if subprocess.run(["umount", fs_dir],
                          capture_output=True).returncode != 0:
            time.sleep(1)
            subprocess.run(["umount", "-l", fs_dir], capture_output=True)


def _free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path, leave):
    """Fill the filesystem of ``path`` until ``leave`` bytes are free."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        want = _free(path) - leave
        if want > 0:
            try:
                os.posix_fallocate(fd, 0, want)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def _fill_inodes(path):
    """Use up every free inode of the filesystem of ``path``."""
    top = os.path.join(path, "inodes")
    os.makedirs(top, exist_ok=True)
    i = 0
    while True:
        try:
            os.close(os.open(os.path.join(top, str(i)),
                             os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return top
            raise
        i += 1


def _unfill(path):
    for entry in ("filler", "inodes"):
        full = os.path.join(path, entry)
        if os.path.isdir(full):
            shutil.rmtree(full)
        elif os.path.exists(full):
            os.unlink(full)


def _peak(dep, argv, fs_dir):
    """Bytes the filesystem lost at the worst instant of ``argv``."""
    before = _free(fs_dir)
    lowest = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            lowest[0] = min(lowest[0], _free(fs_dir))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        dep.cli(*argv)
    finally:
        done.set()
        sampler.join()
    return before - lowest[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_filesystem_fails_cleanly_and_loses_nothing(tmp_path, small_fs,
                                                         backend):
    fs_dir, fs_kind = small_fs
    n = harness.stress_n()
    rand = harness.rng("fullfs-" + backend)
    dep = harness.Deployment(str(tmp_path / "dep"))
    dep.instances = os.path.join(fs_dir, "instances")
    dep.base_dir = os.path.join(dep.instances, "_base")
    os.makedirs(dep.instances)
    dep.write_config(imagebackend={"instances_path": dep.instances},
                     image_cache=harness.AGES_ZERO)
    source = harness.write_image(os.path.join(str(tmp_path), "src.qcow2"),
                                 VIRTUAL, 12 * MiB, seed=5)
    fmt = "raw" if backend == "raw" else "qcow2"
    images = {}
    problems = harness.Problems("full filesystem")
    counter = [0]

    def new_image():
        counter[0] += 1
        name = "f%04d.qcow2" % counter[0]
        os.link(source, os.path.join(dep.images, name))
        images[content_digest.cache_id(name)] = source
        return name

    def argv(image_id, target):
        return ("disk", "create", image_id, target, "--size", SIZE,
                "--backend", backend)

    def reset():
        for entry in os.listdir(dep.instances):
            if entry.startswith("vm"):
                shutil.rmtree(os.path.join(dep.instances, entry))
        _unfill(fs_dir)
        dep.cache().prune()

    first = new_image()
    peaks = {
        "cold": _peak(dep, argv(first, os.path.join(dep.instances, "vm-c",
                                                    "disk")), fs_dir),
        "warm": _peak(dep, argv(first, os.path.join(dep.instances, "vm-w",
                                                    "disk")), fs_dir),
    }
    # Free space spread from none to a little more than a create's peak,
    # at seeded random offsets (the default run: one level in the middle
    # of the peak for each cache state), then no free inodes at all.
    levels = min(n, 24)
    plan = []
    for kind, peak in sorted(peaks.items()):
        if levels < 20:
            plan.append(("space", int(peak * rand.uniform(0.3, 0.7)), kind))
            continue
        step = peak * 1.1 / (levels - 1)
        plan += [("space", int(max(0, k * step + rand.uniform(-step, step)
                                   / 3)), kind) for k in range(levels)]
    plan += [("inodes", 0, "cold"), ("inodes", 0, "warm")]
    for i, (what, leave, kind) in enumerate(plan):
        reset()
        image_id = new_image()
        if kind == "warm":
            dep.cli("cache", "prefetch", image_id)
        target = os.path.join(dep.instances, "vm%d%s" % (i, kind),
                              "disk")
        if what == "space":
            _fill(fs_dir, leave)
        else:
            _fill_inodes(fs_dir)
        free = _free(fs_dir)
        context = "%s, %s cache, %s, %d bytes free" % (
            backend, kind, "no inodes" if what == "inodes" else
            "space", free)
        result = dep.cli(*argv(image_id, target), check=False)
        if result.returncode == 0:
            outcome = "succeeded"
            problems.extend(context, harness.disk_problems(
                target, fmt, source, SIZE))
        else:
            outcome = "failed cleanly"
            found = harness.clean_error_problems(
                result, (image_id, fs_dir))
            if os.path.lexists(target):
                found.append("the failed create left TARGET %s" % target)
            if not problems.extend(context, found):
                outcome = "failed badly"
        problems.extend(context, harness.base_problems(dep.base_dir,
                                                       images))
        problems.extend(context, harness.verify_problems(dep))
        harness.STATS.add("full filesystem (%s)" % fs_kind,
                          "%s %s" % (kind, outcome))
        _unfill(fs_dir)
        if result.returncode != 0:
            if os.path.lexists(target):
                os.unlink(target)
            retry = dep.cli(*argv(image_id, target), check=False)
            if retry.returncode != 0:
                problems.extend(context, ["the retry with space failed: "
                                          + retry.stderr.strip()])
            else:
                problems.extend(context + ": retry", harness.disk_problems(
                    target, fmt, source, SIZE))
    problems.check()
