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

"""The rbd backend's rows, on a one-node memstore Ceph started for them
(the functional tests' fixture): a cold create (fetch, import, snapshot,
clone) against ``rbd import`` of the same raw file, and a warm create
(clone, resize) against ``rbd clone``.

Memstore keeps the data in memory, so the rows measure the client side
(reading, zero detection, messaging), not a disk.
"""

import contextlib
import statistics

from benchmarks import harness
from imagebackend.backends import rbd_bases
from imagebackend.backends import rbd_cluster
from imagebackend.common import digest

POOL, BASE_POOL = "disks", "bases"


@contextlib.contextmanager
def _cluster(bench, row):
    """A started cluster and an rbd backend on it, or a skipped row."""
    # Test support, not library code: imported only when the row runs.
    from tests.functional.fixtures import ceph
    try:
        ceph.check_installed()
    except ceph.CephUnavailable as exc:
        yield None, None, dict(row, skipped=str(exc))
        return
    with ceph.cluster_in_tempdir() as cluster:
        with open(bench.config_file, "a") as f:
            f.write("\n[rbd]\npool = %s\nbase_pool = %s\nceph_conf = %s\n"
                    "user = admin\n" % (POOL, BASE_POOL, cluster.conf_path))
        backend = bench.backend("rbd")
        try:
            yield cluster, backend, None
        finally:
            backend.close()


def _empty_pools(backend):
    """Remove every disk, then every base (a cold start)."""
    with backend.session() as conn:
        for name in conn.images(POOL):
            conn.remove_quietly(POOL, name)
        for name, _ in rbd_bases.bases(conn, BASE_POOL):
            conn.remove_base(BASE_POOL, name)
        for name in conn.images(BASE_POOL):
            conn.remove_quietly(BASE_POOL, name)


def rbd_cold_import(bench):
    row = {"name": "rbd-cold-import",
           "target": "<= 1.5x rbd import"}
    args = bench.args
    with _cluster(bench, row) as (cluster, backend, skipped):
        if skipped:
            return skipped
        image = bench.image(harness.RAW_ID)
        imports = []

        def library(i):
            disk = backend.create_image(harness.RAW_ID, "cold-%d" % i,
                                        args.disk_size)
            imports.append(disk.timings["import"])

        def floor(i):
            cluster.run("rbd", "import", "--image-format", "2", image,
                        "%s/floor-%d" % (BASE_POOL, i), timeout=600)

        def reset():
            bench.clear(base=True)
            _empty_pools(backend)

        lib, spawned, floors = harness.measure(
            args.repeat, library, {"floor": floor}, reset, [image])
        reset()
    result = harness.row(
        "rbd-cold-import", "raw image of %s (%s data) -> RBD base in Ceph "
        "-> clone, first use on the cluster" % (
            harness.size_text(args.size), harness.size_text(args.data)),
        "rbd import IMAGE (same raw file)", row["target"], lib, spawned,
        floors, import_step_s=statistics.median(imports))
    result["met"] = harness.within(result, 1.5)
    return result


def rbd_warm_clone(bench):
    row = {"name": "rbd-warm-clone", "target": "<= 1.5x rbd clone"}
    args = bench.args
    with _cluster(bench, row) as (cluster, backend, skipped):
        if skipped:
            return skipped
        backend.create_image(harness.RAW_ID, "populate", args.disk_size)
        cid = digest.cache_id(harness.RAW_ID)
        parent = "%s/%s@%s" % (BASE_POOL, cid, rbd_cluster.SNAP)

        def library(i):
            disk = backend.create_image(harness.RAW_ID, "warm-%d" % i,
                                        args.disk_size)
            assert disk.cache_hit

        def floor(i):
            cluster.run("rbd", "clone", parent, "%s/floor-%d" % (POOL, i))

        def reset():
            with backend.session() as conn:
                for name in conn.images(POOL):
                    if name != "populate":
                        conn.remove_quietly(POOL, name)

        lib, spawned, floors = harness.measure(
            args.warm_repeat, library, {"floor": floor}, reset)
    result = harness.row(
        "rbd-warm-clone", "rbd disk of %s, base in the cluster" %
        harness.size_text(args.disk_size),
        "rbd clone BASE@snap (one process, connects each time)",
        row["target"], lib, spawned, floors)
    result["met"] = harness.within(result, 1.5)
    return result
