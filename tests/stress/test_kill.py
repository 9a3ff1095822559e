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

"""SIGKILL at random instants across every step of every backend.

Each kill interrupts ``imagebackend disk create`` -- on a cold cache (a new
image id: fetch, convert, cache, extend, overlay) or a warm one (extend,
overlay) -- at a random instant of a chosen step, measured on an unkilled
run first.  After every kill: TARGET is absent or complete, every file in
``_base`` under a final name holds its image's bytes and verifies, a retry
succeeds (or says TargetExists, only when TARGET is complete), and a prune
removes nothing a disk uses.  Targets alternate between ``instances_path``
and a directory the usage scanner never searches, where only the cache's
own record of the disk protects its base.
"""

import os

import pytest

from imagebackend.common import digest as content_digest
from tests.stress import faults
from tests.stress import harness

MiB = harness.MiB
BACKENDS = ("qcow2", "cached-base", "raw")
VIRTUAL = 64 * MiB
SIZES = (64 * MiB, 80 * MiB, 96 * MiB)
#: disks kept alive at any time (older ones are deleted, so prune has work).
KEEP = 3


@pytest.fixture(scope="module")
def source_image(tmp_path_factory):
    """A 64 MiB qcow2 image holding 40 MiB of random data, so that every
    step takes measurable time.
    """
    path = str(tmp_path_factory.mktemp("kill-image") / "source.qcow2")
    return harness.write_image(path, VIRTUAL, 40 * MiB, seed=7)


class _Run:
    """One backend's deployment, its images and its live disks."""

    def __init__(self, root, source, backend):
        self.dep = harness.Deployment(root)
        self.dep.write_config(image_cache=harness.AGES_ZERO)
        self.source = source
        self.backend = backend
        self.fmt = "raw" if backend == "raw" else "qcow2"
        self.outside = os.path.join(root, "outside")
        self.images = {}
        self.live = []

    def add_image(self, name):
        path = os.path.join(self.dep.images, name)
        os.link(self.source, path)
        self.images[content_digest.cache_id(name)] = self.source
        return name

    def target(self, i, inside):
        top = self.dep.instances if inside else self.outside
        return os.path.join(top, "vm%04d" % i, "disk")

    def argv(self, image_id, target, size):
        return ("disk", "create", image_id, target, "--size", size,
                "--backend", self.backend, "-f", "json")

    def watch(self, image_id, target):
        return faults.StepWatch(self.dep.base_dir, target,
                                content_digest.cache_id(image_id))


def _plan(i, line, rand, start):
    """Where kill ``i`` lands: the whole run (uniform) or one step seen on
    the unkilled run, at a uniform instant of that step's duration.  The
    kills go round the steps from a random ``start``, so that short runs
    cover different steps each time.
    """
    # Most of a run is the interpreter starting: the uniform draws cover
    # that, the others aim at the steps that write.
    steps = [s for s in faults.STEPS if s in line.seen and s != "startup"]
    choices = ["uniform"] + steps
    mode = choices[(i // 2 + start) % len(choices)]
    if mode == "uniform":
        return None, rand.uniform(0, line.wall)
    first, last = line.window(mode)
    return mode, rand.uniform(0, max(last - first, 0.002))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_random_instants_loses_nothing(tmp_path, source_image,
                                                  backend):
    n = harness.stress_n()
    rand = harness.rng("kill-" + backend)
    run = _Run(str(tmp_path), source_image, backend)
    dep = run.dep
    problems = harness.Problems("kill")
    warm = run.add_image("warm.qcow2")
    anchor = os.path.join(dep.instances, "anchor", "disk")
    dep.create(warm, anchor, VIRTUAL)

    # The unkilled runs the kill instants are drawn from.
    lines = {}
    for kind in ("cold", "warm"):
        image_id = run.add_image("calibrate.qcow2") if kind == "cold" \
            else warm
        target = os.path.join(dep.instances, "calibrate-" + kind, "disk")
        lines[kind] = faults.calibrate(
            dep, run.argv(image_id, target, SIZES[1]),
            run.watch(image_id, target))
        run.live.append(target)

    start = rand.randrange(len(faults.STEPS))
    for i in range(n):
        kind = "cold" if i % 2 == 0 else "warm"
        image_id = run.add_image("k%04d.qcow2" % i) if kind == "cold" \
            else warm
        size = rand.choice(SIZES)
        target = run.target(i, inside=i % 4 < 2)
        argv = run.argv(image_id, target, size)
        at_step, delay = _plan(i, lines[kind], rand, start)
        leader_only = i % 3 == 2
        kill = faults.run_and_kill(
            dep, argv, run.watch(image_id, target), at_step=at_step,
            delay=delay, leader_only=leader_only)
        step = kill.step or "completed"
        context = "kill %d (%s, %s cache, during %s%s)" % (
            i, backend, kind, step, ", leader only" if leader_only else "")
        ok = problems.extend(context, [
            "process %d outlived its killed caller" % pid
            for pid in kill.survivors])
        if kill.step is None and kill.returncode != 0:
            ok &= problems.extend(context, ["the unkilled create failed: "
                                            + kill.stderr.strip()])

        complete = False
        if os.path.lexists(target):
            found = harness.disk_problems(target, run.fmt, source_image, size)
            ok &= problems.extend(context + ": TARGET after the kill",
                                  found)
            complete = not found
        ok &= problems.extend(context, harness.base_problems(dep.base_dir,
                                                             run.images))
        ok &= problems.extend(context, harness.verify_problems(dep))

        existed = os.path.lexists(target)
        retry = dep.cli(*argv, check=False)
        if existed:
            if retry.returncode == 0 or "already exists" not in retry.stderr:
                ok &= problems.extend(context, [
                    "the retry over the existing TARGET did not say "
                    "TargetExists: %r" % retry.stderr.strip()])
            if not complete:
                os.unlink(target)       # recorded above; go on without it
        elif retry.returncode != 0:
            ok &= problems.extend(context, ["the retry failed: %s"
                                            % retry.stderr.strip()])
        else:
            ok &= problems.extend(context + ": the retry's disk",
                                  harness.disk_problems(
                                      target, run.fmt, source_image, size))
        if os.path.lexists(target):
            run.live.append(target)

        while len(run.live) > KEEP:
            os.unlink(run.live.pop(0))
        report = dep.cache().prune()
        for row in report.removed:
            harness.STATS.add("prune after kills", "%s removed" % row.kind)
        for disk in run.live + [anchor]:
            fmt = "qcow2" if disk == anchor or run.fmt == "qcow2" else "raw"
            image = source_image
            ok &= problems.extend(context + ": after prune",
                                  harness.disk_problems(disk, fmt, image))
        ok &= problems.extend(context + ": after prune",
                              harness.verify_problems(dep))
        harness.STATS.add("kills", "%s/%s/%s" % (backend, kind, step))
        if kill.step is not None:
            harness.STATS.add("kills survived" if ok else "kills broken",
                              step)
    problems.check()
