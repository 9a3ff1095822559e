#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
#    implied. See the License for the specific language governing
#    permissions and limitations under the License.

"""``cache verify`` of sized bases grown from a base whose length is not a
multiple of the sparse digest's 64 KiB block, with the real qemu-img and
the command line: records of this release and of earlier ones.
"""

import json
import os
import subprocess

import pytest
import xxhash

from imagebackend.backends import base as backends_base
from tests import fakes
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
BLOCK = 64 * 1024
# An image length 4 KiB past a block boundary, its last bytes data.
LENGTH = 16 * MiB + 4096
DISK = 32 * MiB


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def raw_with_tail(path):
    """A sparse raw file of ``LENGTH`` bytes: data at its start and in its
    last 4 KiB.
    """
    with open(path, "wb") as f:
        f.truncate(LENGTH)
        f.write(b"head of the image " * 1000)
        f.seek(LENGTH - 4096)
        f.write((b"tail" * 1024)[:4096])
    return path


def create(dep, image_id):
    """A cached-base disk of ``image_id``; returns its sized base."""
    disk = backends_base.load(dep.conf(), "cached-base").create_image(
        image_id, os.path.join(dep.instances, "vm", "disk"), DISK)
    assert disk.backing_file.endswith("_%d" % DISK)
    return disk.backing_file


def verify(dep, *argv):
    result = dep.cli("cache", "verify", *argv, "-f", "json", check=False)
    rows = json.loads(result.stdout)
    return result.returncode, [(r["kind"], r["status"]) for r in rows]


def unpadded_xxh3(path):
    """The sparse digest as earlier releases defined it (``sparse-64k-xxh3``:
    a last, shorter block hashed as it is), spelled out.
    """
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        data = f.read()
    for offset in range(0, len(data), BLOCK):
        chunk = data[offset:offset + BLOCK]
        if chunk.count(0) != len(chunk):
            h.update(offset.to_bytes(8, "big") + chunk)
    return h.hexdigest()


def test_a_sized_base_without_its_own_record_verifies(dep):
    raw_with_tail(os.path.join(dep.images, "tail.raw"))
    sized = create(dep, "tail.raw")
    os.unlink(sized + ".json")      # as made by a release without them
    assert verify(dep) == (0, [("base", "ok"), ("sized", "ok")])
    for offset in (LENGTH - 1, LENGTH + 5):
        byte = fakes.flip_byte(sized, offset)
        assert verify(dep) == (1, [("base", "ok"), ("sized", "corrupt")])
        fakes.put_byte(sized, offset, byte)
    code, rows = verify(dep, "--repair")
    assert (code, rows) == (0, [("base", "ok"), ("sized", "ok")])
    assert os.path.isfile(sized)


def test_records_of_the_unpadded_scheme_still_verify(dep):
    """A converted base and its sized base, with the records an earlier
    release wrote (``sparse-64k-xxh3``): good files are ok, with or without
    the sized base's own record, and a changed one is corrupt.
    """
    raw = raw_with_tail(os.path.join(dep.root, "tail.src"))
    subprocess.run([fenv.REAL_QEMU_IMG, "convert", "-q", "-f", "raw", "-O",
                    "qcow2", raw, os.path.join(dep.images, "tail.qcow2")],
                   check=True)
    sized = create(dep, "tail.qcow2")
    base = sized[:-len("_%d" % DISK)]
    assert os.path.getsize(base) == LENGTH
    with open(base + ".json") as f:
        record = json.load(f)
    assert record["converted"] is True
    record["base_checksum"] = {"algo": "xxh3_128",
                               "scheme": "sparse-64k-xxh3",
                               "value": unpadded_xxh3(base)}
    with open(base + ".json", "w") as f:
        json.dump(record, f)
    with open(sized + ".json") as f:
        own = json.load(f)
    own["digest"] = {"scheme": "sparse-64k-xxh3",
                     "value": unpadded_xxh3(sized)}
    with open(sized + ".json", "w") as f:
        json.dump(own, f)
    assert verify(dep) == (0, [("base", "ok"), ("sized", "ok")])
    byte = fakes.flip_byte(sized, LENGTH - 1)
    assert verify(dep) == (1, [("base", "ok"), ("sized", "corrupt")])
    fakes.put_byte(sized, LENGTH - 1, byte)

    os.unlink(sized + ".json")
    assert verify(dep) == (0, [("base", "ok"), ("sized", "ok")])
    for offset in (LENGTH - 1, LENGTH + 5):
        byte = fakes.flip_byte(sized, offset)
        assert verify(dep) == (1, [("base", "ok"), ("sized", "corrupt")])
        fakes.put_byte(sized, offset, byte)
    byte = fakes.flip_byte(base, LENGTH - 1)
    assert verify(dep)[0] == 1
    fakes.put_byte(base, LENGTH - 1, byte)
    assert verify(dep, "--repair") == (0, [("base", "ok"), ("sized", "ok")])
    assert os.path.isfile(base) and os.path.isfile(sized)
