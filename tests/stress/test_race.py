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

"""Races: many requests for one target, and creates of many images while
``cache prune``, ``cache invalidate`` and ``cache verify`` run in loops.

Every test proves its race happened -- the requests were all inside
``create_image`` before any disk existed, the pruner removed bases while
creates ran, invalidations overlapped creates of the same image -- and
fails if it did not, so it cannot pass by running things one after the
other.
"""

import concurrent.futures
import json
import os
import threading
import time

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.common import digest as content_digest
from imagebackend import exception
from imagebackend.sources import local
from tests.stress import harness

MiB = harness.MiB
BACKENDS = ("qcow2", "cached-base", "raw")
VIRTUAL = 16 * MiB
SIZES = (16 * MiB, 24 * MiB)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("race-image") / "source.qcow2")
    return harness.write_image(path, VIRTUAL, 8 * MiB, seed=11)


def _fmt(backend):
    return "raw" if backend == "raw" else "qcow2"


def _lock_holders(pids, lock_file):
    """The processes among ``pids`` with ``lock_file`` open (waiting for
    the lock, since the test holds it).
    """
    found = set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        try:
            names = os.listdir(fd_dir)
        except FileNotFoundError:
            continue
        for fd in names:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == lock_file:
                    found.add(pid)
            except OSError:
                continue
    return found


# -- one target, many requests ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_creates_of_one_target_exactly_one_wins(tmp_path, image,
                                                           backend):
    """N processes ask for one TARGET.  The test holds the image's fetch
    lock until every one of them waits for it (so each has passed its own
    checks of TARGET while it did not exist), then lets them go: exactly
    one succeeds, the others get TargetExists, and the disk is intact.
    """
    n = harness.stress_n()
    procs = 4 if n < 20 else 8
    rounds = max(1, n // 20)
    dep = harness.Deployment(str(tmp_path))
    dep.write_config(image_cache=harness.AGES_ZERO)
    problems = harness.Problems("one target")
    c = dep.cache()
    for r in range(rounds):
        image_id = "one-%d.qcow2" % r
        os.link(image, os.path.join(dep.images, image_id))
        top = dep.instances if r % 2 == 0 else os.path.join(dep.root, "out")
        target = os.path.join(top, "vm%d" % r, "disk")
        cid = content_digest.cache_id(image_id)
        lock_file = os.path.join(c.lock_dir, "imagebackend-" + cid)
        argv = ("disk", "create", image_id, target, "--size", SIZES[1],
                "--backend", backend)
        with c.store.lock(cid):
            running = [dep.popen(*argv) for _ in range(procs)]
            deadline = time.monotonic() + 120
            waiting = set()
            while time.monotonic() < deadline and len(waiting) < procs:
                # Waiters poll the lock (open, try, close, sleep), so one
                # is seen with the file open only now and then: gather.
                waiting |= _lock_holders([p.pid for p in running],
                                         lock_file)
                if any(p.poll() is not None for p in running):
                    break
                time.sleep(0.01)
            absent = not os.path.lexists(target)
        results = [(p.wait(timeout=300), p.communicate()[1])
                   for p in running]
        context = "round %d (%s)" % (r, backend)
        if len(waiting) < procs or not absent:
            problems.extend(context, [
                "the race was not set up: %d of %d requests reached the "
                "image lock before TARGET existed (%s)"
                % (len(waiting), procs, [e for _, e in results])])
            continue
        harness.STATS.add("races", "%d requests for one target" % procs)
        winners = [e for rc, e in results if rc == 0]
        losers = [e for rc, e in results if rc != 0]
        if len(winners) != 1:
            problems.extend(context, ["%d of %d requests succeeded"
                                      % (len(winners), procs)])
        for err in losers:
            if "already exists" not in err:
                problems.extend(context, ["a losing request did not say "
                                          "TargetExists: %r" % err.strip()])
            problems.extend(context, harness.clean_error_problems(
                type("R", (), {"returncode": 1, "stderr": err})(),
                (target,)))
        problems.extend(context, harness.disk_problems(
            target, _fmt(backend), image, SIZES[1]))
        stray = set(os.listdir(os.path.dirname(target))) - {"disk"}
        problems.extend(context, ["left behind: %s" % sorted(stray)]
                        if stray else [])
        c.prune()
        problems.extend(context + ": after prune", harness.disk_problems(
            target, _fmt(backend), image, SIZES[1]))
    problems.check()


class _GatedSource(local.LocalSource):
    """The local source, holding the first ``parties`` metadata requests
    until all of them have arrived: every request is then inside
    ``create_image``, past its own checks of TARGET.
    """

    def __init__(self, conf, parties, target):
        super().__init__(conf)
        self.parties = parties
        self.target = target
        self.arrived = 0
        self.target_existed = None
        self.cond = threading.Condition()

    def get_meta(self, image_id):
        with self.cond:
            self.arrived += 1
            if self.arrived == self.parties:
                self.target_existed = os.path.lexists(self.target)
                self.cond.notify_all()
            elif self.arrived < self.parties:
                self.cond.wait_for(lambda: self.arrived >= self.parties,
                                   timeout=60)
        return super().get_meta(image_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_threads_one_target_exactly_one_wins(tmp_path, image,
                                                        backend):
    """The same race between threads of one process (a compute driver)."""
    n = harness.stress_n()
    parties = 4 if n < 20 else 8
    rounds = max(1, n // 20)
    dep = harness.Deployment(str(tmp_path))
    problems = harness.Problems("one target")
    for r in range(rounds):
        image_id = "one-%d.qcow2" % r
        os.link(image, os.path.join(dep.images, image_id))
        target = os.path.join(dep.root, "out", "vm%d" % r, "disk")
        conf = dep.conf()
        source = _GatedSource(conf, parties, target)

        def create():
            backend_obj = backends_base.load(conf, backend, source=source)
            return backend_obj.create_image(image_id, target, SIZES[1])

        with concurrent.futures.ThreadPoolExecutor(parties) as pool:
            futures = [pool.submit(create) for _ in range(parties)]
            outcomes = []
            for future in futures:
                # Any exception is an outcome to judge below (a builtin
                # one escaping the library is itself a broken promise).
                try:
                    outcomes.append(future.result(timeout=300))
                except Exception as exc:
                    outcomes.append(exc)
        context = "round %d (%s, threads)" % (r, backend)
        if source.arrived < parties or source.target_existed is not False:
            problems.extend(context, ["the race was not set up"])
            continue
        harness.STATS.add("races", "%d threads for one target" % parties)
        winners = [o for o in outcomes if isinstance(o, backends_base.Disk)]
        others = [o for o in outcomes if o not in winners]
        if len(winners) != 1:
            problems.extend(context, ["%d of %d requests succeeded"
                                      % (len(winners), parties)])
        problems.extend(context, [
            "a losing request raised %r, not TargetExists" % o
            for o in others if not isinstance(o, exception.TargetExists)])
        problems.extend(context, harness.disk_problems(
            target, _fmt(backend), image, SIZES[1]))
    problems.check()


# -- many images, with the cache's upkeep running -----------------------------

class _Mixer:
    """Creates disks of several images with every backend, from threads
    (the library) and a child process (the command line), deleting some
    disks as it goes, while prune, invalidate and verify run in loops.
    One image is rewritten from time to time, so that generations change
    under the disks made from the older ones.
    """

    def __init__(self, root, image):
        self.dep = harness.Deployment(root)
        self.dep.write_config(image_cache=harness.AGES_ZERO)
        self.versions = {}          # image id -> [files of its versions]
        for name in ("a.qcow2", "b.qcow2", "c.qcow2"):
            os.link(image, os.path.join(self.dep.images, name))
            self.versions[name] = [image]
        changing = "changing.raw"
        self.changing = changing
        self.versions[changing] = []
        self.rewrite()
        self.ids = sorted(self.versions)
        self.lock = threading.Lock()
        self.events = []            # (kind, image_id, start, end, data)
        self.live = []              # (target, format, image version file)
        self.problems = harness.Problems("races")
        self.stop = threading.Event()
        self.count = 0
        self.refused_changing = 0

    def rewrite(self):
        """Give ``changing.raw`` new content (by rename, as an uploader
        replacing a file would), keeping a copy of every version.
        """
        versions = self.versions[self.changing]
        version = os.path.join(self.dep.root, "changing-v%d.raw"
                               % len(versions))
        harness.write_image(version, VIRTUAL, 4 * MiB,
                            seed=100 + len(versions))
        tmp = os.path.join(self.dep.images, ".changing.tmp")
        os.link(version, tmp)
        os.rename(tmp, os.path.join(self.dep.images, self.changing))
        with getattr(self, "lock", threading.Lock()):
            versions.append(version)

    def _event(self, kind, image_id, start, data, end=None):
        with self.lock:
            self.events.append((kind, image_id, start,
                                end or time.monotonic(), data))

    def created(self, image_id, target, fmt, start):
        """Check a new disk against the versions of its image; it must
        hold one of them, and keep holding that one.
        """
        with self.lock:
            candidates = list(self.versions[image_id])
        end = time.monotonic()
        match = [v for v in reversed(candidates)
                 if harness.same_content(v, harness.image_format(v),
                                         target, fmt)]
        self._event("create", image_id, start, {"ok": True}, end)
        if not match:
            self.problems.extend("create " + target, [
                "the new disk holds no version of image %s" % image_id])
            return
        with self.lock:
            self.live.append((target, fmt, match[0]))

    def creator(self, index, via_cli, wanted):
        rand = harness.rng("race-creator-%d" % index)
        while not self.stop.is_set():
            with self.lock:
                if self.count >= wanted:
                    return
                self.count += 1
                i = self.count
            image_id = rand.choice(self.ids)
            backend = rand.choice(BACKENDS)
            top = (self.dep.instances if rand.random() < 0.5
                   else os.path.join(self.dep.root, "out"))
            target = os.path.join(top, "c%d-%d" % (index, i), "disk")
            size = rand.choice(SIZES)
            start = time.monotonic()
            error = None
            if via_cli:
                result = self.dep.cli("disk", "create", image_id, target,
                                      "--size", size, "--backend", backend,
                                      check=False)
                if result.returncode != 0:
                    error = result.stderr.strip()
            else:
                try:
                    backends_base.load(self.dep.conf(),
                                       backend).create_image(
                        image_id, target, size)
                except exception.ImageDownloadError as exc:
                    error = "download failed: " + exc.message
                except exception.ImageBackendException as exc:
                    error = exc.message
            if (error is not None and image_id == self.changing
                    and ("download failed" in error
                         or "the downloaded bytes do not match" in error)
                    and not os.path.lexists(target)):
                # The file changed while it was read (or between its
                # digest and its read): a clean refusal the caller
                # retries, not a broken promise.
                with self.lock:
                    self.refused_changing += 1
                self._event("create", image_id, start, {"ok": False})
            elif error is not None:
                self._event("create", image_id, start, {"ok": False})
                self.problems.extend("create %s of %s (%s)" % (
                    target, image_id, backend), ["failed: %s" % error])
            else:
                self.created(image_id, target, _fmt(backend), start)
            self.delete_some(rand)

    def delete_some(self, rand):
        """Delete an older disk half of the time, so bases fall out of
        use while others are being made from them.
        """
        with self.lock:
            if len(self.live) < 4 or rand.random() < 0.5:
                return
            target, _, _ = self.live.pop(rand.randrange(len(self.live) - 2))
        os.unlink(target)

    def maintainer(self, kind):
        rand = harness.rng("race-" + kind)
        while not self.stop.is_set():
            image_id = None
            start = time.monotonic()
            if kind == "prune":
                argv = ("cache", "prune", "-f", "json")
            elif kind == "invalidate":
                image_id = rand.choice(self.ids)
                argv = ("cache", "invalidate", image_id, "-f", "json")
            elif kind == "verify":
                argv = ("cache", "verify", "-f", "json")
            else:
                argv = None
                self.rewrite()
            data = {}
            if argv is not None:
                result = self.dep.cli(*argv, check=False)
                try:
                    data = json.loads(result.stdout)
                except ValueError:
                    data = None
                # verify exits 1 when it finds corruption: its rows are
                # judged below.
                failed = result.returncode != 0 and not (
                    kind == "verify" and result.returncode == 1
                    and isinstance(data, list))
                if failed or data is None:
                    self.problems.extend("cache %s" % kind, [
                        "exit code %d: %s" % (result.returncode,
                                              result.stderr.strip())])
                    data = {}
            self._event(kind, image_id, start, data)
            self.stop.wait(rand.uniform(0.05, 0.3 if kind != "rewrite"
                                        else 1.5))

    def overlapping(self, kind, same_image=False, did=None):
        """Events of ``kind`` that did something (``did(data)``) while a
        create ran (of the same image, with ``same_image``).
        """
        with self.lock:
            events = list(self.events)
        creates = [e for e in events if e[0] == "create"]
        found = 0
        for e in events:
            if e[0] != kind or (did is not None and not did(e[4])):
                continue
            if any(c[2] < e[3] and e[2] < c[3]
                   and (not same_image or c[1] == e[1]) for c in creates):
                found += 1
        return found


def _removed_bases(data):
    rows = data.get("removed", []) if isinstance(data, dict) else []
    return [r for r in rows if r.get("kind") in ("base", "sized")]


def _corrupt_rows(data):
    return [r for r in data if r.get("status") not in ("ok", "unverified")] \
        if isinstance(data, list) else []


def test_creates_race_prune_invalidate_verify(tmp_path, image):
    n = harness.stress_n()
    wanted = max(16, 2 * n)
    mix = _Mixer(str(tmp_path), image)
    upkeep = [threading.Thread(target=mix.maintainer, args=(kind,))
              for kind in ("prune", "invalidate", "verify", "rewrite")]
    for t in upkeep:
        t.start()

    def races():
        return {
            "prune removed a base while a create ran": mix.overlapping(
                "prune", did=lambda d: _removed_bases(d)),
            "invalidate overlapped a create of its image": mix.overlapping(
                "invalidate", same_image=True,
                did=lambda d: d.get("marked_stale")),
            "verify ran while a create ran": mix.overlapping("verify"),
            "image rewritten while a create ran": mix.overlapping(
                "rewrite"),
        }

    # Keep going (up to 4x the creates asked for) until every race has
    # happened at least once.
    limit = 4 * wanted
    target_count = wanted
    while True:
        creators = [threading.Thread(target=mix.creator,
                                     args=(i, i == 2, target_count))
                    for i in range(3)]
        for t in creators:
            t.start()
        for t in creators:
            t.join()
        if all(races().values()) or target_count >= limit:
            break
        target_count += wanted // 2
    mix.stop.set()
    for t in upkeep:
        t.join()

    found = races()
    for name, count in found.items():
        harness.STATS.add("races", name, count)
    harness.STATS.add("races", "creates refused: image changed while read",
                      mix.refused_changing)
    harness.STATS.add("races", "disks created under upkeep", sum(
        1 for e in mix.events if e[0] == "create" and e[4].get("ok")))
    for kind in ("prune", "invalidate", "verify"):
        harness.STATS.add("upkeep runs during creates", kind, sum(
            1 for e in mix.events if e[0] == kind))
    problems = mix.problems
    problems.extend("races", ["never happened: %s" % name
                              for name, count in found.items() if not count])
    problems.extend("verify during the run", [
        "%s reported %s: %s" % (r["file"], r["status"], r["detail"])
        for e in mix.events if e[0] == "verify" for r in _corrupt_rows(e[4])])

    # Nothing lost: every disk still reads the version it was made from,
    # also after one more prune.
    for when in ("after the run", "after a final prune"):
        for target, fmt, version in mix.live:
            problems.extend("%s: %s" % (when, target), harness.disk_problems(
                target, fmt, version))
        mix.dep.cache().prune()
    problems.extend("at the end", harness.verify_problems(mix.dep))
    problems.check()
