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

"""The command line's start-up: ``imagebackend --help``, a subcommand's
``--help`` and every subcommand a user runs for real, on work small
enough that starting the process is what is measured, each a new
process, against the floor of a bare ``python -c "import
oslo_config.cfg"`` (every real command needs oslo.config) started the
same way, interleaved.

The real commands: on an empty cache, ``cache list``, ``cache prune
--dry-run``, ``cache verify`` and ``cache invalidate``; on a cache
holding one base, ``cache list``, ``cache prefetch`` of that image (a
hit: nothing downloaded), ``disk create`` from it (warm: no process) and
``disk delete`` of a disk the library made; on a small qcow2 disk, ``disk
info``, ``disk check``, ``disk snapshot list`` and ``disk resize`` to its
own size.  (``disk rebase``, ``disk extract`` and the snapshot changes
start as these do and then spend their time in qemu-img copying data.)

Every process starts from byte-code already written (one untimed round
first, with ``PYTHONDONTWRITEBYTECODE`` left out of the children's
environment), as an installed package does.  Wall time and the CPU time
(user + system) of each child are both reported; the row's library
column is the command with the highest median ratio, and the row is met
only when every command is within the target by the medians and by the
best runs.
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks import harness
import imagebackend
from imagebackend import opts

TARGET = 1.5
FLOOR = [sys.executable, "-c", "import oslo_config.cfg"]


def _cli():
    """How a user starts the command: the console script beside this
    Python when there is one, else ``python -m``.
    """
    script = os.path.join(os.path.dirname(sys.executable), "imagebackend")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "imagebackend.cmd.main"]


def _config(root, name, instances, images):
    """A config file ``name`` under ``root`` for a cache in
    ``instances`` and the local images in ``images``.
    """
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write("[imagebackend]\ninstances_path = %s\nimage_source = local\n"
                "\n[local_source]\npath = %s\n\n[qemu_img]\nbinary = %s\n"
                "\n[oslo_concurrency]\nlock_path = %s\n" % (
                    instances, images, harness.QEMU_IMG,
                    os.path.join(instances, "locks")))
    return path


class _Deployment:
    """An empty cache, a cache holding the base of one small image with
    ``count`` disks made from it (for ``disk delete``), and a small qcow2
    disk.
    """

    IMAGE = "small.qcow2"
    SIZE = 64 * harness.MiB

    def __init__(self, root, count):
        images = os.path.join(root, "images")
        self.warm_instances = os.path.join(root, "warm")
        for d in (images, os.path.join(root, "empty"), self.warm_instances):
            os.makedirs(d)
        self.empty = _config(root, "empty.conf", os.path.join(root, "empty"),
                             images)
        self.warm = _config(root, "warm.conf", self.warm_instances, images)
        image = os.path.join(images, self.IMAGE)
        raw = image + ".raw"
        harness.write_sparse_raw(raw, 16 * harness.MiB, harness.MiB,
                                 harness.MiB, 1)
        harness.run(harness.QEMU_IMG, "convert", "-q", "-f", "raw", "-O",
                    "qcow2", raw, image)
        os.unlink(raw)
        self.disk = os.path.join(root, "disk.qcow2")
        harness.run(harness.QEMU_IMG, "create", "-q", "-f", "qcow2",
                    self.disk, str(self.SIZE))
        # The base, its overlay template, and the disks to delete, made
        # by the library as a compute driver would make them.
        conf = opts.new_conf(["--config-file", self.warm])
        backend = imagebackend.load_backend(conf, "qcow2")
        for i in range(count):
            backend.create_image(self.IMAGE, self.made(i), self.SIZE)

    def made(self, i):
        """The disk ``disk delete`` removes in run ``i``."""
        return os.path.join(self.warm_instances, "made-%d" % i)

    def created(self, i):
        """The disk ``disk create`` makes in run ``i``."""
        return os.path.join(self.warm_instances, "created-%d" % i)

    def commands(self, cli):
        """Name -> a function of the run's number giving its argv."""
        def fixed(*argv):
            return lambda i: cli + list(argv)

        def on_empty(*argv):
            return fixed("--config-file", self.empty, *argv)

        def on_warm(*argv):
            return fixed("--config-file", self.warm, *argv)

        size = str(self.SIZE)
        disk = ["--input-format", "qcow2", self.disk]
        return {
            "--help": fixed("--help"),
            "disk info --help": fixed("disk", "info", "--help"),
            "cache list (empty cache)": on_empty("cache", "list"),
            "cache prune --dry-run (empty cache)": on_empty(
                "cache", "prune", "--dry-run"),
            "cache verify (empty cache)": on_empty("cache", "verify"),
            "cache invalidate (not cached)": on_empty(
                "cache", "invalidate", "other.qcow2"),
            "cache list (one base)": on_warm("cache", "list"),
            "cache prefetch (cached)": on_warm("cache", "prefetch",
                                               self.IMAGE),
            "disk create (warm qcow2)": lambda i: cli + [
                "--config-file", self.warm, "disk", "create", self.IMAGE,
                self.created(i), "--size", size],
            "disk delete": lambda i: cli + [
                "--config-file", self.warm, "disk", "delete", self.made(i)],
            "disk info (64 MiB qcow2)": on_warm("disk", "info", *disk),
            "disk check": on_warm("disk", "check", *disk),
            "disk snapshot list": on_warm("disk", "snapshot", "list", *disk),
            "disk resize (same size)": on_warm("disk", "resize", *disk[:2],
                                               self.disk, size),
        }


def _time(argv, env):
    """Wall and CPU seconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime
           + after.ru_stime - before.ru_stime)
    return wall, cpu


def _summary(wall, cpu, floor_wall, floor_cpu):
    return {"wall_s": harness.summary(wall), "cpu_s": harness.summary(cpu),
            "ratio": statistics.median(wall) / statistics.median(floor_wall),
            "best_ratio": min(wall) / min(floor_wall),
            "cpu_ratio": statistics.median(cpu) / statistics.median(
                floor_cpu)}


def cli_startup(bench):
    root = os.path.join(bench.root, "cli-startup")
    # A smoke run (--quick) times each command once, without the untimed
    # round: it checks that every command runs, not how fast.
    quick = bench.args.quick
    runs = bench.args.repeat if quick else 2 * bench.args.repeat
    deployment = _Deployment(root, runs + 1)
    cli = _cli()
    commands = deployment.commands(cli)
    floor = {"floor": lambda i: FLOOR}
    everything = dict(floor, **commands)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Untimed: byte-code written, files cached (run number ``runs``: the
    # last disk to delete, a disk name no timed run creates).
    for argv in everything.values() if not quick else ():
        _time(argv(runs), env)
    times = {name: ([], []) for name in everything}
    for i in range(runs):
        order = list(everything.items())
        if i % 2:
            order.reverse()
        for name, argv in order:
            wall, cpu = _time(argv(i), env)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    floor_wall, floor_cpu = times.pop("floor")
    per_command = {name: _summary(wall, cpu, floor_wall, floor_cpu)
                   for name, (wall, cpu) in times.items()}
    worst = max(per_command, key=lambda n: per_command[n]["ratio"])
    result = harness.row(
        "cli-startup",
        "new process: imagebackend %s (slowest of %d: %s)" % (
            worst, len(commands), ", ".join(commands)),
        "python -c 'import oslo_config.cfg'",
        "<= %gx floor, every command" % TARGET,
        times[worst][0], [[cli[0]]] * len(times[worst][0]),
        {"floor": floor_wall}, commands=per_command,
        floor_cpu_s=harness.summary(floor_cpu),
        command_line=" ".join(cli))
    result["met"] = all(c["ratio"] <= TARGET and c["best_ratio"] <= TARGET
                        for c in per_command.values())
    shutil.rmtree(root, ignore_errors=True)
    return result
