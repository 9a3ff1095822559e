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

"""What the scenarios share: a throw-away deployment, test images, process
and download counting, interleaved timing, and worker processes.
"""

import multiprocessing
import os
import queue
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback

import imagebackend
from imagebackend import opts
from imagebackend.sources import local

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
WORKER_TIMEOUT = 900
RAW_ID = "bench.raw"
QCOW2_ID = "bench.qcow2"
BIG_ID = "bench-big.raw"

# -- counting ------------------------------------------------------------

_SPAWN_EVENTS = ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork",
                 "os.forkpty", "os.system")
#: what this interpreter started, one "program sub-command" per process.
SPAWNS: list[str] = []
_hooked = False


def _audit(event, args):
    if event not in _SPAWN_EVENTS:
        return
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
        argv = args[1]
        argv = argv.split() if isinstance(argv, (str, bytes)) else list(argv)
        words = [os.path.basename(os.fsdecode(argv[0]))] + [
            os.fsdecode(a) for a in argv[1:2]]
        SPAWNS.append(" ".join(words))
    else:
        SPAWNS.append(event)


def install_spawn_counter() -> None:
    """Record in :data:`SPAWNS` every process this interpreter starts
    (an audit hook, installed once).
    """
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True


class CountingSource(local.LocalSource):
    """The local image source, logging each download to a file."""

    def __init__(self, conf, log_path):
        super().__init__(conf)
        self.log_path = log_path

    def open(self, meta):
        with open(self.log_path, "a") as f:     # O_APPEND: one line each
            f.write(meta.image_id + "\n")
        return super().open(meta)


def make_backend(config_file, name, downloads_log, wrapper=None):
    """A backend as a driver builds it; ``wrapper`` replaces qemu-img."""
    conf = opts.new_conf(["--config-file", config_file])
    if wrapper:
        conf.set_override("binary", wrapper, group="qemu_img")
    source = CountingSource(conf, downloads_log)
    return imagebackend.load_backend(conf, name, source=source)


# -- the deployment --------------------------------------------------------

class Bench:
    """Images, a config file and scratch directories under ``root``."""

    def __init__(self, root, args):
        self.root = root
        self.args = args
        self.images = os.path.join(root, "images")
        self.instances = os.path.join(root, "instances")
        self.base_dir = os.path.join(self.instances, "_base")
        self.disks = os.path.join(self.instances, "disks")
        self.floor = os.path.join(root, "floor")
        self.qemu_log = os.path.join(root, "qemu-img.log")
        self.downloads_log = os.path.join(root, "downloads.log")
        self.wrapper = os.path.join(root, "bin", "qemu-img")
        for d in (self.images, self.base_dir, self.floor,
                  os.path.dirname(self.wrapper)):
            os.makedirs(d, exist_ok=True)
        with open(self.wrapper, "w") as f:
            f.write("#!/bin/sh\nprintf '%%s\\n' \"$*\" >> '%s'\n"
                    "exec '%s' \"$@\"\n" % (self.qemu_log, QEMU_IMG))
        os.chmod(self.wrapper, 0o755)
        self.config_file = os.path.join(root, "imagebackend.conf")
        with open(self.config_file, "w") as f:
            f.write("[imagebackend]\ninstances_path = %s\n"
                    "image_source = local\n\n[local_source]\npath = %s\n\n"
                    "[qemu_img]\nbinary = %s\n"
                    % (self.instances, self.images, QEMU_IMG))

    def image(self, image_id):
        return os.path.join(self.images, image_id)

    def backend(self, name, counting=False):
        """A backend; with ``counting``, qemu-img runs through the wrapper
        that logs each run.
        """
        return make_backend(self.config_file, name, self.downloads_log,
                            self.wrapper if counting else None)

    def target(self, tag):
        return os.path.join(self.disks, str(tag), "disk")

    def floor_file(self, name):
        return os.path.join(self.floor, name)

    def clear(self, base=False):
        """Remove instance disks, floor outputs and, with ``base``,
        everything in the cache (a first use of every image).
        """
        shutil.rmtree(self.disks, ignore_errors=True)
        for d in [self.floor] + ([self.base_dir] if base else []):
            for entry in os.scandir(d):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    def qemu_runs(self):
        """qemu-img runs logged by the wrapper since the last call, by
        sub-command, with one full command line of each.
        """
        runs = {}
        for line in self.drain(self.qemu_log):
            command = line.split(" ", 1)[0]
            runs.setdefault(command, {"count": 0, "example": line})
            runs[command]["count"] += 1
        return runs

    def drain(self, log):
        """Lines logged to ``log`` since it was last read, and reset it."""
        try:
            with open(log) as f:
                lines = [line.rstrip("\n") for line in f]
            os.unlink(log)
        except FileNotFoundError:
            lines = []
        return lines

    def build_images(self):
        """The raw image (random data in scattered extents, the rest
        holes), its qcow2 conversion, qcow2 images of other random data
        under other ids (distinct bytes: the cache shares identical ones),
        and the big raw image of the memory scenario.
        """
        args = self.args
        write_sparse_raw(self.image(RAW_ID), args.size, args.data,
                         args.extent, seed=1)
        run(QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2",
            self.image(RAW_ID), self.image(QCOW2_ID))
        for i in range(args.images):
            scratch = self.image("bench-%d.raw-scratch" % i)
            write_sparse_raw(scratch, args.size, args.data, args.extent,
                             seed=10 + i)
            run(QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2",
                scratch, self.image("bench-%d.qcow2" % i))
            os.unlink(scratch)
        write_sparse_raw(self.image(BIG_ID), args.big_size,
                         args.big_size * args.data // args.size,
                         args.extent, seed=2)
        # Files in an image directory are not being written to: date them
        # an hour back, as a source may not trust what it learnt about a
        # file modified moments ago.
        past = time.time() - 3600
        for name in os.listdir(self.images):
            os.utime(self.image(name), (past, past))


def write_sparse_raw(path, virtual, data, extent, seed):
    """A raw file of ``virtual`` bytes holding ``data`` bytes of random
    data in extents of ``extent`` bytes at random places; the rest holes.
    """
    rng = random.Random(seed)
    slots = max(1, virtual // extent)
    chosen = sorted(rng.sample(range(slots), min(slots, data // extent)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, virtual)
        for slot in chosen:
            os.pwrite(fd, rng.randbytes(extent), slot * extent)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- primitives of the floors -----------------------------------------------

def read_once(path):
    """Read ``path`` to the end, as the cheapest download would."""
    buf = bytearray(4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def overlay(backing, target, size):
    """The bare qcow2 overlay command."""
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
        "backing_file=%s,backing_fmt=raw" % backing, target, str(size))


# -- timing ------------------------------------------------------------------

def settle(inputs=()):
    """Write back what earlier runs left dirty, and read ``inputs`` into
    the page cache, so that every run starts alike.
    """
    os.sync()
    for path in inputs:
        read_once(path)


def measure(repeat, library, floors, reset, inputs=()):
    """Time ``library(i)`` and each floor ``repeat`` times, interleaved
    (the order flips every round).  ``reset()`` and :func:`settle` run,
    untimed, before every run.

    :returns: (library seconds, spawned commands of each library run,
        {floor name: seconds}).
    """
    lib, spawned, floor_times = [], [], {name: [] for name in floors}
    for i in range(repeat):
        order = [("library", library)] + list(floors.items())
        if i % 2:
            order.reverse()
        for name, func in order:
            reset()
            settle(inputs)
            first = len(SPAWNS)
            start = time.perf_counter()
            func(i)
            elapsed = time.perf_counter() - start
            if name == "library":
                lib.append(elapsed)
                spawned.append(SPAWNS[first:])
            else:
                floor_times[name].append(elapsed)
    return lib, spawned, floor_times


def summary(runs):
    return {"median": statistics.median(runs), "min": min(runs),
            "runs": [round(r, 6) for r in runs]}


def row(name, what, floor_is, target, lib, spawned, floors, **extra):
    """One scenario's result; ``floors`` maps ``floor`` (and optionally
    ``durable floor``) to run times.
    """
    result = {"name": name, "what": what, "floor_is": floor_is,
              "target": target, "library_s": summary(lib),
              "processes": statistics.median(len(s) for s in spawned),
              "spawned": spawned[-1], "peak_rss_mib": None}
    for key, runs in floors.items():
        key = key.replace(" ", "_")
        result[key + "_s"] = summary(runs)
        suffix = "" if key == "floor" else "_" + key
        result["ratio" + suffix] = (
            result["library_s"]["median"] / result[key + "_s"]["median"])
        result["best_ratio" + suffix] = (
            result["library_s"]["min"] / result[key + "_s"]["min"])
    result.update(extra)
    return result


def within(result, limit):
    """Whether the library is within ``limit`` times the floor, both by
    the ratio of the medians and by the ratio of the best runs.

    On a machine whose disk or memory stalls now and then, a few slow
    runs of the floor can pull its median up and make a slow library look
    fast (or the reverse); the best runs see through that.  Asking both
    keeps a row from being met by noise.
    """
    return result["ratio"] <= limit and result["best_ratio"] <= limit


# -- worker processes --------------------------------------------------------

def _worker(config_file, backend_name, downloads_log, wrapper, jobs, go,
            results):
    """One compute process: build the backend, wait, make its disks."""
    try:
        install_spawn_counter()
        del SPAWNS[:]           # a forked worker inherits its parent's
        backend = make_backend(config_file, backend_name, downloads_log,
                               wrapper)
        results.put({"ready": True})
        if not go.wait(WORKER_TIMEOUT):
            raise RuntimeError("never told to start")
        start = time.monotonic()
        hits = [backend.create_image(image_id, target, size).cache_hit
                for image_id, target, size in jobs]
        results.put({"hits": hits, "spawned": list(SPAWNS),
                     "start": start, "end": time.monotonic(),
                     "maxrss": resource.getrusage(
                         resource.RUSAGE_SELF).ru_maxrss * KiB,
                     "children_maxrss": resource.getrusage(
                         resource.RUSAGE_CHILDREN).ru_maxrss * KiB})
    except BaseException:
        results.put({"error": traceback.format_exc()})


def _collect(procs, results, count):
    """``count`` messages from the workers; a failure, or a worker that
    died without a word, raises.
    """
    messages = []
    deadline = time.monotonic() + WORKER_TIMEOUT
    while len(messages) < count:
        try:
            message = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError("a worker died (exit status %s) or timed "
                                   "out" % dead) from None
            continue
        if "error" in message:
            raise RuntimeError("a worker failed:\n" + message["error"])
        messages.append(message)
    return messages


def run_workers(bench, backend_name, job_lists, counting=False,
                method="fork"):
    """Start one process per job list (``(image_id, target, size)``
    tuples); time from the moment they all start creating until the last
    one is done.  How far the workers' creates ran at once is measured
    from when each began and ended (one clock for all processes):
    ``overlap_s``, from the last start to the first end (negative if some
    worker began only after another was done), and ``overlapping``, how
    many workers had begun before the first was done.

    :param counting: run qemu-img through the logging wrapper.
    :param method: the multiprocessing start method; ``spawn`` gives each
        worker a fresh interpreter, whose peak RSS is then its own.
    """
    ctx = multiprocessing.get_context(method)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(
        bench.config_file, backend_name, bench.downloads_log,
        bench.wrapper if counting else None, jobs, go, results))
        for jobs in job_lists]
    for p in procs:
        p.start()
    try:
        _collect(procs, results, len(procs))
        start = time.monotonic()
        go.set()
        done = _collect(procs, results, len(procs))
    finally:
        for p in procs:
            if p.exitcode is None and not go.is_set():
                p.terminate()
            p.join(WORKER_TIMEOUT)
    spawned = [cmd for d in done for cmd in d["spawned"]]
    first_end = min(d["end"] for d in done)
    return {"seconds": max(d["end"] for d in done) - start,
            "overlap_s": first_end - max(d["start"] for d in done),
            "overlapping": sum(d["start"] < first_end for d in done),
            "spawned": spawned,
            "conversions": sum(c == "qemu-img convert" for c in spawned),
            "downloads": bench.drain(bench.downloads_log),
            "cache_misses": sum(not h for d in done for h in d["hits"]),
            "peak_rss": max(d["maxrss"] for d in done),
            "qemu_img_peak_rss": max(d["children_maxrss"] for d in done)}


def size_text(n):
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor and n % factor == 0:
            return "%d %s" % (n // factor, unit)
    return "%d B" % n
