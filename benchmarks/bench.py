#!/usr/bin/env python3
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

"""imagebackend against the floor: the cheapest way to produce the same bytes.

Every scenario is timed through what a compute driver calls --
``backend.create_image()`` on a backend built once in a long-lived process
-- and compared with its floor, the bare commands that produce the same
result, measured in the same run and interleaved with the library's runs
so that both see the same noise.  Medians are reported, with the ratio of
the library's median to the floor's, and the ratio of the best runs
(``best``); a target counts as met only when both ratios meet it, so that
a few stalled runs on either side cannot decide a row.

Page cache: warm on both sides.  Before every timed run, library or
floor, ``sync`` writes back what earlier runs left dirty (so no run pays
for another's writes) and the files the run reads are read once (so
neither side reads them from the disk).  The library makes what it caches
durable (fsync); the bare floors do not, so the scenarios that write data
also report a durable floor: the same commands followed by an fsync of
the file the library makes durable.

Processes: an audit hook counts every process the library starts during
the timed creates (``procs``), and one untimed create per scenario runs
qemu-img through a wrapper that logs every qemu-img run, at any depth.

    tox -e bench                            # default sizes, ~4 minutes
    tox -e bench -- --quick --repeat 1      # a smoke run
    tox -e bench -- --scenario warm-qcow2 --json results.json
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

if not __package__:
    # Run as a script (python benchmarks/bench.py): the directory above
    # benchmarks/ must be importable for the package imports below.
    sys.path.append(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks import scenarios  # noqa: E402
from imagebackend.qemu import sizes as qemu_sizes  # noqa: E402

GiB = harness.GiB
MiB = harness.MiB
KiB = harness.KiB


def parse_args(argv):
    size = qemu_sizes.parse_size
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=size, default=GiB,
                   help="virtual size of the test image (default 1G)")
    p.add_argument("--data", type=size, default=256 * MiB,
                   help="random data in it, in scattered extents "
                        "(default 256M)")
    p.add_argument("--extent", type=size, default=MiB,
                   help="size of each data extent (default 1M)")
    p.add_argument("--disk-size", type=size, default=10 * GiB,
                   help="virtual size of the instance disks (default 10G)")
    p.add_argument("--big-size", type=size, default=4 * GiB,
                   help="virtual size of the memory scenario's raw image, "
                        "with the same share of data (default 4G)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="processes in the concurrent scenarios "
                        "(default 16)")
    p.add_argument("--images", type=int, default=4,
                   help="distinct images in the concurrent-images "
                        "scenario (default 4)")
    p.add_argument("--repeat", type=int, default=7,
                   help="timed runs of each side of a scenario (default 7)")
    p.add_argument("--warm-repeat", type=int,
                   help="timed runs of each side of the warm scenarios, "
                        "which take milliseconds and need more runs to see "
                        "through noise (default 4x --repeat)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, and as many warm runs as --repeat, "
                        "for a smoke run")
    p.add_argument("--scenario", action="append",
                   choices=list(scenarios.SCENARIOS),
                   help="run only this scenario (repeatable)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the results as JSON to FILE ('-': "
                        "standard output; the table then goes to standard "
                        "error)")
    p.add_argument("--workdir", default="/var/tmp",
                   help="where to make the temporary images and disks; "
                        "pick a directory on the filesystem to measure "
                        "(default /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory")
    p.add_argument("--servers", metavar="FILE",
                   help="use the running Keystone and Glance FILE describes "
                        "(JSON, as the functional tests write it) for the "
                        "glance-download row instead of starting a pair")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.data, args.extent = 64 * MiB, 16 * MiB, 256 * KiB
        args.disk_size, args.big_size = GiB, 128 * MiB
        # A smoke run: as many warm runs as cold ones.
        args.warm_repeat = args.warm_repeat or args.repeat
    args.warm_repeat = args.warm_repeat or 4 * args.repeat
    if min(args.repeat, args.warm_repeat, args.images,
           args.concurrency) < 1:
        p.error("--repeat, --warm-repeat, --images and --concurrency must "
                "be positive")
    return args


def environment(args, load_before):
    version = subprocess.run([harness.QEMU_IMG, "--version"],
                             capture_output=True, text=True).stdout
    return {"python": platform.python_version(),
            "qemu_img": version.split("\n")[0],
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "load_average": {"before": load_before,
                             "after": os.getloadavg()},
            "page_cache": "warm", "workdir": args.workdir,
            "size": args.size, "data": args.data, "extent": args.extent,
            "disk_size": args.disk_size, "big_size": args.big_size,
            "concurrency": args.concurrency, "images": args.images,
            "repeat": args.repeat, "warm_repeat": args.warm_repeat}


def _fmt(value, spec="%.3f"):
    return "-" if value is None else spec % value


def table(results):
    head = ("scenario", "library s", "floor s", "ratio", "best",
            "2nd floor s", "ratio", "procs", "RSS MiB", "target", "met")
    lines = [head]
    for r in results:
        if "skipped" in r:
            lines.append((r["name"],) + ("-",) * 8 + (r["target"],
                                                      "skipped"))
            continue
        # The second floor: durable (fsynced), or verified (hashed).
        second = ("verified_floor" if "verified_floor_s" in r
                  else "durable_floor")
        lines.append((
            r["name"], _fmt(r["library_s"]["median"]),
            _fmt(r.get("floor_s", {}).get("median")),
            _fmt(r.get("ratio"), "%.2fx"),
            _fmt(r.get("best_ratio"), "%.2fx"),
            _fmt(r.get(second + "_s", {}).get("median")),
            _fmt(r.get("ratio_" + second), "%.2fx"),
            _fmt(r["processes"], "%g"), _fmt(r["peak_rss_mib"], "%.0f"),
            r["target"], "yes" if r["met"] else "NO"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    harness.install_spawn_counter()
    load_before = os.getloadavg()
    report = sys.stderr if args.json == "-" else sys.stdout
    root = tempfile.mkdtemp(prefix="imagebackend-bench-", dir=args.workdir)
    results = []
    try:
        bench = harness.Bench(root, args)
        steps = [("building images in %s" % root, bench.build_images)]
        steps += [(name, lambda f=func: results.append(f(bench)))
                  for name, func in scenarios.SCENARIOS.items()
                  if not args.scenario or name in args.scenario]
        for label, step in steps:
            print("%s ..." % label, end=" ", file=report, flush=True)
            start = time.monotonic()
            step()
            print("%.0f s" % (time.monotonic() - start), file=report,
                  flush=True)
    finally:
        if args.keep:
            print("Kept %s" % root, file=report)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)
    data = {"environment": environment(args, load_before),
            "scenarios": results}
    print(table(results), file=report)
    if args.json == "-":
        json.dump(data, sys.stdout, indent=1)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
