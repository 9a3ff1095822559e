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
tree's code, images with real data, the invariants every test checks, and
the figures printed at the end of the run (the faults themselves are in
:mod:`tests.stress.faults`).

``IMAGEBACKEND_STRESS_N`` sets how hard each test tries (kills per backend,
processes racing, fill levels...): small in the default run, 100 in
``tox -e stress``.  ``IMAGEBACKEND_STRESS_SEED`` replays a run (the seed
used is printed in the summary).
"""

import collections
import os
import random
import re
import subprocess
import sys
import threading

import imagebackend
from imagebackend import cache
from tests.functional.fixtures import env as fenv

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


SEED_ENV = "IMAGEBACKEND_STRESS_SEED"
SEED = os.environ.get(SEED_ENV) or str(
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

    def merge(self, data: dict) -> None:
        """Add the figures of another process (:meth:`to_dict` there)."""
        if data["seed"] != SEED:
            raise ValueError("figures of seed %s cannot join those of seed "
                             "%s" % (data["seed"], SEED))
        with self._lock:
            for section, counts in data["counts"].items():
                self.counts[section].update(counts)
            self.problems.update(data["problems"])

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
    """:class:`tests.functional.fixtures.env.Deployment` whose child
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

    def create(self, image_id: str, target: str, size: int):
        """Set-up: a disk made through the library in this process, as
        ``disk create`` with the default backend makes it, without the
        second or so of CPU a command-line process costs.  For tests whose
        subject comes after.
        """
        return imagebackend.load_backend(self.conf()).create_image(
            image_id, target, size)


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

def qemu_img(*args) -> subprocess.CompletedProcess:
    """Run the real qemu-img (never the one under test's wrapper)."""
    return subprocess.run([QEMU_IMG] + list(args), capture_output=True,
                          text=True, timeout=300)


def same_content(a: str, a_fmt: str, b: str, b_fmt: str) -> bool:
    """Whether the guest sees the same bytes in ``a`` and ``b`` (a longer
    one may only add zeros).
    """
    return qemu_img("compare", "-q", "-f", a_fmt, "-F", b_fmt, a,
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
    info = qemu_img("info", "-U", "--backing-chain", "--output", "json",
                    "-f", fmt, path)
    if info.returncode != 0:
        return ["%s: its backing chain does not open: %s"
                % (path, info.stderr.strip())]
    if fmt == "qcow2":
        check = qemu_img("check", "-q", "-f", "qcow2", path)
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
    return ["verify: %s is %s (%s)" % (row.file, row.status, row.detail)
            for row in dep.cache().verify() if row.status != "ok"]


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
