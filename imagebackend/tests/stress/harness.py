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

"""What the stress tests share: a deployment whose command line runs this
tree's code, images with real data, the invariants every test checks, a
kill runner that sees which step it interrupted, and the figures printed at
the end of the run.

``IMAGEBACKEND_STRESS_N`` sets how hard each test tries (kills per backend,
processes racing, fill levels...): small in the default run, 100 in
``tox -e stress``.  ``IMAGEBACKEND_STRESS_SEED`` replays a run (the seed
used is printed in the summary).
"""

import collections
import ctypes
import ctypes.util
import dataclasses
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time

from imagebackend import cache
from imagebackend.tests.functional import env as fenv

MiB = fenv.MiB
QEMU_IMG = fenv.REAL_QEMU_IMG
#: the root of the tree under test: child processes import its code.
TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
#: a base, generation or sized base: the only names that must be complete.
FINAL_RE = re.compile(
    r"^(?P<cid>[0-9a-f]{40})(?:-[0-9]+)?(?:_(?P<size>[0-9]+))?$")
AGES_ZERO = {"remove_unused_original_minimum_age_seconds": 0,
             "remove_unused_resized_minimum_age_seconds": 0}


def stress_n(default: int = 3) -> int:
    """How hard to try: ``IMAGEBACKEND_STRESS_N`` (at least 1)."""
    try:
        return max(1, int(os.environ.get("IMAGEBACKEND_STRESS_N", default)))
    except ValueError:
        return default


def rng(name: str) -> random.Random:
    """A random generator for test ``name``, replayable from the run's
    seed.
    """
    return random.Random("%s/%s" % (SEED, name))


SEED = os.environ.get("IMAGEBACKEND_STRESS_SEED") or str(
    random.SystemRandom().randrange(10 ** 9))


class Stats:
    """Figures gathered by the tests, printed when the run ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = (
            collections.defaultdict(collections.Counter))
        self.problems: dict[str, int] = collections.Counter()

    def add(self, section: str, key: str, count: int = 1) -> None:
        with self._lock:
            self.counts[section][key] += count

    def failed(self, section: str, count: int) -> None:
        with self._lock:
            self.problems[section] += count

    def to_dict(self) -> dict:
        with self._lock:
            return {"seed": SEED, "n": stress_n(),
                    "counts": {s: dict(sorted(c.items()))
                               for s, c in sorted(self.counts.items())},
                    "problems": dict(self.problems)}


STATS = Stats()


class Problems:
    """Broken invariants found by a test, reported together at its end so
    that one run gives every figure; the test fails if there is any.
    """

    def __init__(self, section: str) -> None:
        self.section = section
        self.items: list[str] = []

    def extend(self, context: str, found) -> bool:
        found = list(found)
        self.items += ["%s: %s" % (context, p) for p in found]
        return not found

    def check(self) -> None:
        if self.items:
            STATS.failed(self.section, len(self.items))
        shown = self.items[:25]
        more = len(self.items) - len(shown)
        assert not self.items, "%d broken invariant(s):\n%s%s" % (
            len(self.items), "\n".join(shown),
            "\n... and %d more" % more if more else "")


# -- the deployment -----------------------------------------------------------

class Deployment(fenv.Deployment):
    """:class:`imagebackend.tests.functional.env.Deployment` whose child
    processes import the code of this tree, with helpers to start the
    command line in its own process group.
    """

    def env(self) -> dict:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (TREE, env.get("PYTHONPATH")) if p)
        return env

    def argv(self, *args) -> list[str]:
        return [sys.executable, "-m", "imagebackend.cmd.main",
                "--config-file", self.config_file] + [str(a) for a in args]

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=self.env(), cwd=TREE,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def cli(self, *argv, check=True):
        return subprocess.run(self.argv(*argv), env=self.env(), cwd=TREE,
                              capture_output=True, text=True, check=check,
                              timeout=600)

    def cache(self) -> cache.ImageCache:
        return cache.ImageCache(self.conf())


def write_image(path: str, virtual: int, data: int, seed: int = 1,
                head: bytes = b"") -> str:
    """An image of ``virtual`` bytes with ``data`` bytes of random (so
    incompressible) data spread over it in 1 MiB extents, starting with
    ``head``; qcow2 if ``path`` ends with ``.qcow2``, else raw.
    """
    raw = path + ".src" if path.endswith(".qcow2") else path
    gen = random.Random(seed)
    extents = max(1, data // MiB)
    step = virtual // extents
    with open(raw, "wb") as f:
        f.truncate(virtual)
        for i in range(extents):
            f.seek(i * step)
            f.write(gen.randbytes(min(MiB, data)))
        if head:
            f.seek(0)
            f.write(head)
    if raw != path:
        subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O",
                        "qcow2", raw, path], check=True)
        os.unlink(raw)
    return path


def image_format(path: str) -> str:
    return "qcow2" if path.endswith(".qcow2") else "raw"


# -- invariants ---------------------------------------------------------------

def _qemu(*args) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG] + list(args), capture_output=True,
                          text=True, timeout=300)


def same_content(a: str, a_fmt: str, b: str, b_fmt: str) -> bool:
    """Whether the guest sees the same bytes in ``a`` and ``b`` (a longer
    one may only add zeros).
    """
    return _qemu("compare", "-q", "-f", a_fmt, "-F", b_fmt, a,
                 b).returncode == 0


def disk_problems(path: str, fmt: str, image: str, size: int | None = None
                  ) -> list[str]:
    """What is wrong with instance disk ``path`` made from ``image``: its
    backing chain must open, qcow2 must pass ``qemu-img check``, and the
    guest must see exactly the image's bytes.
    """
    if not os.path.lexists(path):
        return ["%s is missing" % path]
    problems = []
    info = _qemu("info", "-U", "--backing-chain", "--output", "json",
                 "-f", fmt, path)
    if info.returncode != 0:
        return ["%s: its backing chain does not open: %s"
                % (path, info.stderr.strip())]
    if fmt == "qcow2":
        check = _qemu("check", "-q", "-f", "qcow2", path)
        if check.returncode != 0:
            problems.append("%s fails qemu-img check: %s"
                            % (path, (check.stdout + check.stderr).strip()))
    if size is not None and fmt == "raw" and os.path.getsize(path) != size:
        problems.append("%s is %d bytes, not %d" % (
            path, os.path.getsize(path), size))
    if not same_content(image, image_format(image), path, fmt):
        problems.append("%s does not hold the image %s"
                        % (path, os.path.basename(image)))
    return problems


def final_files(base_dir: str) -> list[str]:
    """The names in ``base_dir`` that the cache promises are complete."""
    try:
        return sorted(n for n in os.listdir(base_dir) if FINAL_RE.match(n))
    except FileNotFoundError:
        return []


def base_problems(base_dir: str, images: dict[str, str]) -> list[str]:
    """Every complete-by-name file in ``_base`` must hold its image's bytes
    (``images``: cache id -> image file), independent of the cache's own
    records; a sized base must have the size in its name.
    """
    problems = []
    for name in final_files(base_dir):
        path = os.path.join(base_dir, name)
        match = FINAL_RE.match(name)
        if not os.path.isfile(path) or os.path.islink(path):
            problems.append("%s is not a regular file" % path)
            continue
        if match.group("size") and int(match.group("size")) != \
                os.path.getsize(path):
            problems.append("sized base %s is %d bytes" % (
                path, os.path.getsize(path)))
        image = images.get(match.group("cid"))
        if image is not None and not same_content(
                path, "raw", image, image_format(image)):
            problems.append("%s under a final name does not hold image %s"
                            % (path, os.path.basename(image)))
    return problems


def verify_problems(dep: Deployment) -> list[str]:
    """``ImageCache.verify`` must find every base and sized base ``ok``."""
    return ["verify: %s is %s (%s)" % (row["file"], row["status"],
                                       row["detail"])
            for row in dep.cache().verify() if row["status"] != "ok"]


def clean_error_problems(result, names: tuple[str, ...] = ()) -> list[str]:
    """A failed command must exit non-zero with one line naming what
    failed, and no traceback.

    :param names: the line must contain one of these (the image, a path).
    """
    problems = []
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        return ["expected a failure, got exit code 0"]
    if "Traceback" in result.stderr:
        problems.append("a traceback was printed: %s" % result.stderr[-400:])
    elif len(lines) != 1 or not lines[0].startswith("imagebackend: error: "):
        problems.append("not a one-line error: %r" % result.stderr[-400:])
    elif lines[0].startswith("imagebackend: error: [Errno"):
        problems.append("a bare system error, naming no image or fix: %r"
                        % lines[0])
    elif names and not any(n in lines[0] for n in names):
        problems.append("the error names none of %s: %r" % (names, lines[0]))
    return problems


# -- killing a command at a chosen step ------------------------------------

#: the steps of a create, in the order they happen, as seen on disk.
STEPS = ("startup", "fetch", "convert", "cache", "prepare", "extend",
         "overlay", "published")
_RANK = {s: i for i, s in enumerate(STEPS)}


@dataclasses.dataclass
class StepWatch:
    """Tells which step of creating ``target`` from image ``cid`` is in
    progress, from the files it left so far.  It knows nothing of the
    scratch names beyond their usual words (``part``, ``conver``), so it
    keeps working when the names change.
    """

    base_dir: str
    target: str
    cid: str

    def __post_init__(self) -> None:
        self.before_base = set(self._list(self.base_dir))
        self.before_dir = set(self._list(os.path.dirname(self.target)))

    @staticmethod
    def _list(path):
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def step(self) -> str:
        tdir = set(self._list(os.path.dirname(self.target)))
        name = os.path.basename(self.target)
        if tdir - self.before_dir - {name}:
            return "overlay"
        if name in tdir:
            return "published"
        new = [n for n in set(self._list(self.base_dir)) - self.before_base
               if self.cid in n]
        scratch = [n for n in new if not FINAL_RE.match(n)
                   and not n.endswith((".json", ".json.tmp"))]
        if any("conver" in n for n in scratch):
            return "convert"
        if any(re.search(r"%s(-[0-9]+)?_[0-9]+" % self.cid, n)
               for n in scratch):
            return "extend"
        if scratch:
            return "fetch"
        finals = [n for n in new if FINAL_RE.match(n)]
        if finals:
            return "prepare"
        if any(n.endswith((".json", ".json.tmp")) for n in new):
            return "cache"
        return "startup"


@dataclasses.dataclass
class Timeline:
    """When each step was seen during a run, relative to its start."""

    wall: float = 0.0
    seen: dict = dataclasses.field(default_factory=dict)

    def window(self, step: str) -> tuple[float, float]:
        return self.seen[step]


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group.
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def calibrate(dep: Deployment, argv, watch: StepWatch) -> Timeline:
    """Run ``argv`` to the end, noting when each step was seen."""
    line = Timeline()
    proc = dep.popen(*argv)
    start = time.monotonic()
    while proc.poll() is None:
        now = time.monotonic() - start
        step = watch.step()
        first, _ = line.seen.get(step, (now, now))
        line.seen[step] = (first, now)
        time.sleep(0.001)
    out, err = proc.communicate()
    line.wall = time.monotonic() - start
    assert proc.returncode == 0, err
    return line


@dataclasses.dataclass
class Kill:
    """The outcome of :func:`run_and_kill`."""

    step: str | None            # None: the command ended first
    returncode: int | None = None
    survivors: list = dataclasses.field(default_factory=list)
    stderr: str = ""


def run_and_kill(dep: Deployment, argv, watch: StepWatch, *, at_step=None,
                 delay: float = 0.0, leader_only: bool = False) -> Kill:
    """Start ``argv``; once step ``at_step`` is seen (or at once), wait
    ``delay`` seconds and SIGKILL it -- the whole process group, as a host
    crash would, or with ``leader_only`` just the command, as the OOM
    killer would (then no child may outlive it).  The group is stopped
    first so the step in progress can be read at the instant of the kill.
    """
    proc = dep.popen(*argv)
    if at_step is not None:
        while proc.poll() is None and _RANK[watch.step()] < _RANK[at_step]:
            time.sleep(0.0005)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(min(0.001, max(0.0, end - time.monotonic())))
    try:
        os.killpg(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass
    if proc.poll() is not None:
        _, err = proc.communicate()
        _cont(proc.pid)
        return Kill(step=None, returncode=proc.returncode, stderr=err)
    step = watch.step()
    survivors = []
    if leader_only:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _cont(proc.pid)
        deadline = time.monotonic() + 3
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = group_members(proc.pid)
    _kill_group(proc.pid)
    proc.communicate()
    return Kill(step=step, returncode=proc.returncode, survivors=survivors)


def _cont(pgid):
    try:
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


# -- watching a file being opened -------------------------------------------

_IN_ACCESS = 0x1
_IN_OPEN = 0x20
_IN_NONBLOCK = 0o4000
_libc = None


def _inotify():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


class OpenWatch:
    """Counts opens and reads of files (by any process) with inotify: the
    proof that a host secret was never read on a tenant's behalf.
    """

    def __init__(self, *paths: str) -> None:
        libc = _inotify()
        self.fd = libc.inotify_init1(_IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.paths = {}
        for path in paths:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(path),
                                        _IN_OPEN | _IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "cannot watch", path)
            self.paths[wd] = path
        self.events: list[str] = []

    def opened(self) -> list[str]:
        """The watched files opened or read since the last call."""
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data,
                                                         offset)
                offset += 16 + length
                found.append("%s (%s)" % (self.paths.get(wd, wd),
                                          "open" if mask & _IN_OPEN
                                          else "read"))
        self.events += found
        return found

    def close(self) -> None:
        os.close(self.fd)
