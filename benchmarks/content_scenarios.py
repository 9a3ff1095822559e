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

"""Bases shared by content: a second image id holding the same bytes as
one already cached, against the first id's cold create (the floor), with
the bytes ``_base`` takes on disk after both.

The local row reads, writes and compares the second id's bytes before
sharing them (a local directory records no strong hash); the Glance row
(a Glance on 127.0.0.1, the functional tests' fake one, with its sha512)
downloads nothing for the second id.
"""

import hashlib
import os
import statistics
import time

from benchmarks import harness
import imagebackend
from imagebackend import opts
from imagebackend import sources

SAME_ID = "bench-same.raw"


def _bytes_in(base_dir):
    """Allocated bytes of the files in ``base_dir``, each inode once, and
    as if each name had its own copy.
    """
    inodes, names = {}, 0
    for entry in os.scandir(base_dir):
        if entry.is_file(follow_symlinks=False) and "." not in entry.name:
            st = entry.stat(follow_symlinks=False)
            inodes[(st.st_dev, st.st_ino)] = st.st_blocks * 512
            names += st.st_blocks * 512
    return sum(inodes.values()), names


def _interleaved(bench, first, second, inputs):
    """Time ``first(i)`` (the floor) and ``second(i)``, interleaved, each
    from an empty cache; ``second`` caches the first id untimed first.
    """
    lib, floor, spawned, sizes = [], [], [], None
    for i in range(bench.args.repeat):
        order = [("floor", first), ("library", second)]
        if i % 2:
            order.reverse()
        for kind, func in order:
            bench.clear(base=True)
            if kind == "library":
                first("setup-%d" % i)
                bench.clear()
            harness.settle(inputs)
            start_spawns = len(harness.SPAWNS)
            start = time.perf_counter()
            func(i)
            seconds = time.perf_counter() - start
            if kind == "floor":
                floor.append(seconds)
                continue
            lib.append(seconds)
            spawned.append(harness.SPAWNS[start_spawns:])
            sizes = _bytes_in(bench.base_dir)
    return lib, spawned, floor, sizes


def second_id_same_bytes(bench):
    args = bench.args
    image = bench.image(harness.RAW_ID)
    if not os.path.exists(bench.image(SAME_ID)):
        os.link(image, bench.image(SAME_ID))
    backend = bench.backend("qcow2")

    def create(image_id):
        return lambda i: backend.create_image(
            image_id, bench.target("%s-%s" % (image_id, i)), args.disk_size)

    lib, spawned, floor, (on_disk, per_name) = _interleaved(
        bench, create(harness.RAW_ID), create(SAME_ID), [image])
    result = harness.row(
        "second-id-same-bytes", "qcow2 disk of a second image id holding "
        "the same %s raw image, first use (local directory)"
        % harness.size_text(args.size),
        "the first id's cold create", "bytes on disk = one base",
        lib, spawned, {"floor": floor}, base_bytes_on_disk=on_disk,
        base_bytes_unshared=per_name)
    result["glance"] = _glance(bench, image)
    result["met"] = (on_disk * 2 == per_name
                     and result["glance"]["second_downloads"] == 0)
    return result


def _glance(bench, image):
    """The same two ids served by a Glance on 127.0.0.1 with a sha512:
    the second id's cold create against the first's, and the image data
    sent for the second.
    """
    # Test support, not library code: imported only when the row runs.
    from tests.functional.fixtures import hostile_glance

    size = os.path.getsize(image)
    sha512 = hashlib.sha512()
    with open(image, "rb") as f:
        while chunk := f.read(harness.MiB):
            sha512.update(chunk)

    def data(answer):
        answer.start(200, [("Content-Type", "application/octet-stream"),
                           ("Content-Length", str(size))])
        with open(image, "rb") as f:
            answer.body(iter(lambda: f.read(harness.MiB), b""))

    with hostile_glance.HostileGlance() as server:
        ids = [server.image(data=data, size=size, os_hash_algo="sha512",
                            os_hash_value=sha512.hexdigest(),
                            disk_format="raw") for _ in range(2)]
        config = bench.config_file + ".glance"
        with open(bench.config_file) as f, open(config, "w") as out:
            out.write(f.read() + "\n[glance]\n" + "".join(
                "%s = %s\n" % item
                for item in server.glance_options().items()))
        conf = opts.new_conf(["--config-file", config])
        backend = imagebackend.load_backend(
            conf, "qcow2", source=sources.load(conf, "glance"))

        def create(image_id):
            return lambda i: backend.create_image(
                image_id, bench.target("%s-%s" % (image_id, i)),
                bench.args.disk_size)

        sent = []

        def second(i):
            before = server.body_bytes_sent
            create(ids[1])(i)
            sent.append(server.body_bytes_sent - before)

        lib, _, floor, _ = _interleaved(bench, create(ids[0]), second,
                                        [image])
        downloads = [r.path for r in server.requests_of("GET")
                     if r.path == "/v2/images/%s/file" % ids[1]]
    return {"first_s": harness.summary(floor),
            "second_s": harness.summary(lib),
            "ratio": statistics.median(lib) / statistics.median(floor),
            "second_downloads": len(downloads),
            "second_bytes_sent": max(sent), "image_bytes": size}
