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
``--help`` and two cheap real commands, each a new process, against the
floor of a bare ``python -c "import oslo_config.cfg"`` (every real
command needs oslo.config) started the same way, interleaved.

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


def _deployment(root):
    """A config file whose cache is empty, and a small qcow2 disk."""
    os.makedirs(os.path.join(root, "instances"))
    os.makedirs(os.path.join(root, "images"))
    config = os.path.join(root, "imagebackend.conf")
    with open(config, "w") as f:
        f.write("[imagebackend]\ninstances_path = %s\nimage_source = local\n"
                "\n[local_source]\npath = %s\n\n[qemu_img]\nbinary = %s\n"
                "\n[oslo_concurrency]\nlock_path = %s\n" % (
                    os.path.join(root, "instances"),
                    os.path.join(root, "images"), harness.QEMU_IMG,
                    os.path.join(root, "locks")))
    disk = os.path.join(root, "disk.qcow2")
    harness.run(harness.QEMU_IMG, "create", "-q", "-f", "qcow2", disk,
                str(64 * harness.MiB))
    return config, disk


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
    config, disk = _deployment(root)
    cli = _cli()
    commands = {
        "--help": cli + ["--help"],
        "disk info --help": cli + ["disk", "info", "--help"],
        "cache list (empty cache)": cli + ["--config-file", config, "cache",
                                           "list"],
        "disk info (64 MiB qcow2)": cli + ["--config-file", config, "disk",
                                           "info", "--input-format",
                                           "qcow2", disk],
    }
    runs = dict({"floor": FLOOR}, **commands)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for argv in runs.values():
        _time(argv, env)        # untimed: byte-code written, files cached
    times = {name: ([], []) for name in runs}
    for i in range(2 * bench.args.repeat):
        order = list(runs.items())
        if i % 2:
            order.reverse()
        for name, argv in order:
            wall, cpu = _time(argv, env)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    floor_wall, floor_cpu = times.pop("floor")
    per_command = {name: _summary(wall, cpu, floor_wall, floor_cpu)
                   for name, (wall, cpu) in times.items()}
    worst = max(per_command, key=lambda n: per_command[n]["ratio"])
    result = harness.row(
        "cli-startup",
        "new process: imagebackend %s (slowest of %s)" % (
            worst, ", ".join(commands)),
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
