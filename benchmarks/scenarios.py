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

"""The scenarios: each times the library against its floor and returns a
result row (see :func:`benchmarks.harness.row`).

Every scenario goes through the local image source.  "Cold" means a first
use of the image: the cache directory is emptied before every run,
including what the source remembers there about its images.
"""

import os
import shutil
import statistics
import subprocess

from benchmarks import content_scenarios
from benchmarks import glance_scenarios
from benchmarks import harness
from benchmarks import rbd_scenarios
from benchmarks import startup_scenarios
import imagebackend
from imagebackend import opts
from imagebackend.sources import glance

MiB = harness.MiB


def _warm(bench, backend_name, name):
    """A disk of a cached image: the first create (untimed) made the
    overlay template, so every timed one is a copy and starts no process.
    """
    args = bench.args
    backend = bench.backend(backend_name)
    backend.create_image(harness.RAW_ID, bench.target("populate"),
                         args.disk_size)
    bench.clear()
    bench.drain(bench.qemu_log)
    disk = bench.backend(backend_name, counting=True).create_image(
        harness.RAW_ID, bench.target("count"), args.disk_size)
    qemu_runs = bench.qemu_runs()
    floor_disk = bench.floor_file("disk")
    lib, spawned, floors = harness.measure(
        args.warm_repeat,
        lambda i: backend.create_image(harness.RAW_ID, bench.target(i),
                                       args.disk_size),
        {"floor": lambda i: harness.overlay(disk.backing_file, floor_disk,
                                            args.disk_size)},
        bench.clear)
    result = harness.row(
        name, "%s disk of %s, base cached" % (
            backend_name, harness.size_text(args.disk_size)),
        "qemu-img create -f qcow2 -o backing_file=BASE,backing_fmt=raw",
        "<= 0.25x floor, 0 processes", lib, spawned, floors,
        qemu_img_runs=qemu_runs)
    # A warm create copies the overlay template: no process at all, in
    # any run (the counted one included).
    result["met"] = (harness.within(result, 0.25) and not qemu_runs
                     and all(len(s) == 0 for s in spawned))
    return result


def warm_qcow2(bench):
    return _warm(bench, "qcow2", "warm-qcow2")


def warm_cached_base(bench):
    return _warm(bench, "cached-base", "warm-cached-base")


def _cold(bench, image_id, name, what, floor_is, floor, limit):
    """A qcow2 disk from an image not in the cache; ``floor(i, durable)``
    does the same job with bare commands, making the base durable if
    ``durable``.  The target holds against the durable floor, since the
    library makes its base durable (both ratios, median and best).
    """
    args = bench.args
    backend = bench.backend("qcow2")
    bench.clear(base=True)
    bench.drain(bench.qemu_log)
    bench.backend("qcow2", counting=True).create_image(
        image_id, bench.target("count"), args.disk_size)
    qemu_runs = bench.qemu_runs()
    steps = []

    def library(i):
        steps.append(backend.create_image(image_id, bench.target(i),
                                          args.disk_size).timings)

    lib, spawned, floors = harness.measure(
        args.repeat, library,
        {"floor": lambda i: floor(i, False),
         "durable floor": lambda i: floor(i, True)},
        lambda: bench.clear(base=True), [bench.image(image_id)])
    # Where the library's time goes: the median of each step it times.
    step_s = {step: statistics.median(t.get(step, 0.0) for t in steps)
              for step in sorted({k for t in steps for k in t})}
    result = harness.row(name, what, floor_is,
                         "<= %sx durable floor" % limit, lib, spawned,
                         floors, qemu_img_runs=qemu_runs, step_s=step_s)
    result["met"] = (result["ratio_durable_floor"] <= limit
                     and result["best_ratio_durable_floor"] <= limit)
    return result


def cold_qcow2_image(bench):
    image = bench.image(harness.QCOW2_ID)
    base = bench.floor_file("base")

    def floor(i, durable):
        if durable:
            # O_DIRECT writes, flushed when qemu-img closes the file.
            harness.run(harness.QEMU_IMG, "convert", "-t", "none", "-f",
                        "qcow2", "-O", "raw", image, base)
        else:
            harness.read_once(image)
            harness.run(harness.QEMU_IMG, "convert", "-f", "qcow2", "-O",
                        "raw", image, base)
        harness.overlay(base, bench.floor_file("disk"), bench.args.disk_size)

    return _cold(bench, harness.QCOW2_ID, "cold-qcow2-image",
                 "qcow2 image -> raw base -> qcow2 disk, first use",
                 "read the image + qemu-img convert -O raw + qemu-img "
                 "create; durable: qemu-img convert -t none -O raw + "
                 "qemu-img create", floor, 1.15)


def cold_raw_image(bench):
    image = bench.image(harness.RAW_ID)
    base = bench.floor_file("base")

    def floor(i, durable):
        harness.run("cp", image, base)
        if durable:
            harness.fsync_path(base)

    return _cold(bench, harness.RAW_ID, "cold-raw-image",
                 "raw image -> raw base -> qcow2 disk, first use",
                 "cp IMAGE BASE; durable: cp + fsync BASE", floor, 1.1)


def raw_backend(bench):
    args = bench.args
    backend = bench.backend("raw")
    base = bench.backend("qcow2").create_image(
        harness.RAW_ID, bench.target("populate"),
        args.disk_size).backing_file
    bench.clear()
    bench.drain(bench.qemu_log)
    bench.backend("raw", counting=True).create_image(
        harness.RAW_ID, bench.target("count"), args.disk_size)
    qemu_runs = bench.qemu_runs()
    copy = bench.floor_file("disk")
    allocated = {}

    def library(i):
        target = bench.target(i)
        backend.create_image(harness.RAW_ID, target, args.disk_size)
        allocated["disk"] = os.stat(target).st_blocks * 512

    def floor(i, durable):
        harness.run("cp", "--sparse=always", base, copy)
        if durable:
            harness.fsync_path(copy)
        allocated["floor"] = os.stat(copy).st_blocks * 512

    lib, spawned, floors = harness.measure(
        args.repeat, library,
        {"floor": lambda i: floor(i, False),
         "durable floor": lambda i: floor(i, True)},
        bench.clear, [base])
    allocated["base"] = os.stat(base).st_blocks * 512
    result = harness.row(
        "raw-backend", "raw disk of %s from the cached base"
        % harness.size_text(args.disk_size),
        "cp --sparse=always BASE DISK", "<= 1.1x floor, allocated <= base",
        lib, spawned, floors, qemu_img_runs=qemu_runs,
        allocated_bytes=allocated)
    result["met"] = (harness.within(result, 1.1)
                     and allocated["disk"] <= allocated["base"])
    return result


def _concurrent(bench, name, what, floor_is, target, library_jobs,
                floor_jobs, limit):
    args = bench.args
    images = sorted({job[0] for jobs in library_jobs for job in jobs})
    inputs = [bench.image(i) for i in images]
    bench.clear(base=True)
    bench.drain(bench.downloads_log)
    counted = harness.run_workers(bench, "qcow2", library_jobs,
                                  counting=True)
    qemu_runs = bench.qemu_runs()
    lib, floor = [], []
    for i in range(args.repeat):
        for kind in (("library", "floor") if i % 2 == 0
                     else ("floor", "library")):
            bench.clear(base=True)
            harness.settle(inputs)
            if kind == "floor":
                floor.append(harness.run_workers(bench, "qcow2", floor_jobs))
            else:
                lib.append(harness.run_workers(bench, "qcow2",
                                               library_jobs))
    checks = [counted] + lib
    result = harness.row(
        name, what, floor_is, target, [r["seconds"] for r in lib],
        [r["spawned"] for r in lib], {"floor": [r["seconds"] for r in floor]},
        qemu_img_runs=qemu_runs,
        downloads=max(len(r["downloads"]) for r in checks),
        conversions=max(r["conversions"] for r in checks),
        cache_misses=max(r["cache_misses"] for r in checks),
        qemu_img_peak_rss_mib=max(r["qemu_img_peak_rss"] for r in lib) / MiB,
        overlap_s=min(r["overlap_s"] for r in checks),
        overlapping=min(r["overlapping"] for r in checks))
    result["spawned"] = sorted(set(result["spawned"]))
    result["met"] = (harness.within(result, limit)
                     and result["downloads"] == len(images)
                     and result["conversions"] == len(images))
    return result


def concurrent_one_image(bench):
    n = bench.args.concurrency
    size = bench.args.disk_size
    jobs = [[(harness.QCOW2_ID, bench.target(k), size)] for k in range(n)]
    return _concurrent(
        bench, "concurrent-one-image",
        "%d processes create disks of one uncached qcow2 image at once" % n,
        "one cold create (same harness, one process)",
        "<= 1.3x floor, 1 download, 1 conversion", jobs, [jobs[0]], 1.3)


def concurrent_images(bench):
    n = bench.args.concurrency
    size = bench.args.disk_size
    ids = ["bench-%d.qcow2" % i for i in range(bench.args.images)]
    jobs = [[(ids[k % len(ids)], bench.target(k), size)] for k in range(n)]
    sequence = [[(image_id, bench.target("seq-%d" % i), size)
                 for i, image_id in enumerate(ids)]]
    return _concurrent(
        bench, "concurrent-images",
        "%d processes create disks of %d uncached qcow2 images at once"
        % (n, len(ids)),
        "the %d cold creates one after another (one process)" % len(ids),
        "<= 1.0x floor, 1 download and conversion per image",
        jobs, sequence, 1.0)


def memory(bench):
    args = bench.args
    size = max(args.disk_size, args.big_size)
    runs = []
    for _ in range(args.repeat):
        bench.clear(base=True)
        harness.settle([bench.image(harness.BIG_ID)])
        runs.append(harness.run_workers(
            bench, "qcow2", [[(harness.BIG_ID, bench.target("big"), size)]],
            method="spawn"))
    peak = max(r["peak_rss"] for r in runs) / MiB
    return {
        "name": "memory",
        "what": "peak RSS of a fresh process creating a qcow2 disk from a "
                "%s raw image, first use" % harness.size_text(args.big_size),
        "floor_is": None, "target": "peak RSS <= 100 MiB",
        "library_s": harness.summary([r["seconds"] for r in runs]),
        "processes": statistics.median(len(r["spawned"]) for r in runs),
        "spawned": runs[-1]["spawned"], "peak_rss_mib": peak,
        "qemu_img_peak_rss_mib": max(
            r["qemu_img_peak_rss"] for r in runs) / MiB,
        "met": peak <= 100}


def glance_download(bench):
    """The Glance source's download (streamed into ``.part``, inspected,
    hash verified, fsynced, published) against two floors fetching the
    same image file from the same Glance, with Keystone tokens on every
    side: ``curl -o FILE URL`` alone, and the verified floor ``curl URL |
    tee FILE | sha512sum`` (a download is verified: SHA-512 is Glance's
    usual hash).  The target is the verified floor's throughput; the
    plain-curl ratio is reported beside it.

    It needs the servers' virtualenv of the functional tests
    (``tools/glance-servers/setup-venv.sh``, installed on first use); the
    row says so and is skipped when that cannot be installed.
    """
    row = {"name": "glance-download",
           "target": ">= 1.0x verified floor's throughput"}
    tools = {name: shutil.which(name)
             for name in ("curl", "tee", "sha512sum", "bash")}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        return dict(row, skipped="%s not installed (apt-get install curl "
                                 "coreutils bash)" % ", ".join(missing))
    args = bench.args
    image = bench.image(harness.RAW_ID)
    with glance_scenarios.running_servers(bench) as (srv, skipped):
        if skipped:
            return dict(row, skipped=skipped)
        image_id = srv.upload_image(image, "raw", name="bench")
        stored = str(srv.image_store_file(image_id))
        conf = opts.new_conf(["--config-file", bench.config_file])
        glance.GlanceSource.register_opts(conf)
        source = glance.GlanceSource(conf, session=srv.demo.session())
        backend = imagebackend.load_backend(conf, "qcow2", source=source)
        url = "%s/v2/images/%s/file" % (srv.glance_url, image_id)
        copy = bench.floor_file("download")
        sums = []

        def floor(i):
            # A fresh token per run, as the library's session may reuse
            # one: neither side pays Keystone inside the timed run.
            harness.run(tools["curl"], "-sSf", "-o", copy, "-H",
                        "X-Auth-Token: %s" % tokens[i], url)

        def verified(i):
            out = subprocess.run(
                [tools["bash"], "-o", "pipefail", "-c",
                 '"$1" -sSf -H "X-Auth-Token: $2" "$3" | "$4" "$5" | '
                 '"$6"', "verified-floor", tools["curl"], tokens[i], url,
                 tools["tee"], copy, tools["sha512sum"]],
                check=True, stdout=subprocess.PIPE, text=True).stdout
            sums.append(out.split()[0])

        tokens = [srv.issue_token(srv.demo) for _ in range(args.repeat)]
        backend.cache.get(image_id)         # the session authenticates
        lib, spawned, floors = harness.measure(
            args.repeat, lambda i: backend.cache.get(image_id),
            {"floor": floor, "verified floor": verified},
            lambda: bench.clear(base=True), [stored])
        recorded = srv.image_get(image_id).get("os_hash_value")
    size = os.path.getsize(image)
    result = harness.row(
        "glance-download", "download of a %s raw image from Glance into the "
        "cache, hash verified" % harness.size_text(size),
        "curl -o FILE URL; verified: curl URL | tee FILE | sha512sum",
        row["target"], lib, spawned, floors, image_bytes=size)
    for key, runs in (("throughput_mib_s", "library_s"),
                      ("floor_throughput_mib_s", "floor_s"),
                      ("verified_floor_throughput_mib_s",
                       "verified_floor_s")):
        result[key] = size / result[runs]["median"] / MiB
    # The verified floor hashed what Glance recorded, or it verified
    # nothing.
    result["verified_floor_hash_matches"] = set(sums) == {recorded}
    result["met"] = (result["ratio_verified_floor"] <= 1.0
                     and result["best_ratio_verified_floor"] <= 1.0
                     and result["verified_floor_hash_matches"])
    result["servers"] = "given" if args.servers else "started"
    result["glance_image_id"] = image_id
    return result


#: name -> scenario, in the order they run.
SCENARIOS = {
    "warm-qcow2": warm_qcow2,
    "warm-cached-base": warm_cached_base,
    "cold-qcow2-image": cold_qcow2_image,
    "cold-raw-image": cold_raw_image,
    "raw-backend": raw_backend,
    "concurrent-one-image": concurrent_one_image,
    "concurrent-images": concurrent_images,
    "memory": memory,
    "glance-download": glance_download,
    "glance-warm-lookup": glance_scenarios.glance_warm_lookup,
    "rbd-cold-import": rbd_scenarios.rbd_cold_import,
    "rbd-warm-clone": rbd_scenarios.rbd_warm_clone,
    "second-id-same-bytes": content_scenarios.second_id_same_bytes,
    "cli-startup": startup_scenarios.cli_startup,
}
