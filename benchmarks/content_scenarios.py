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

import os
import time

from benchmarks import harness

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
    result["met"] = on_disk * 2 == per_name
    return result
