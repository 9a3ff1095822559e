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

"""Bases shared by content, with real files, the real qemu-img, a real
filesystem's hard links, and a Glance on 127.0.0.1 that counts what it
sends.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import sources
from tests.functional.fixtures import env as fenv
from tests.functional.fixtures import hostile_glance as hg

MiB = fenv.MiB
SIZE = 16 * MiB
DISK = 32 * MiB
AGES_ZERO = fenv.AGES_ZERO


@pytest.fixture
def dep(tmp_path):
    return fenv.Deployment(str(tmp_path))


def create(dep, image_id, name, backend="qcow2"):
    return backends_base.load(dep.conf(), backend).create_image(
        image_id, os.path.join(dep.instances, name, "disk"), DISK)


def two_copies(dep, fmt, seed=1):
    """Image ``a.<fmt>`` and an independent copy ``b.<fmt>``."""
    a = os.path.join(dep.images, "a." + fmt)
    (fenv.make_qcow2 if fmt == "qcow2" else fenv.make_raw)(a, SIZE, seed)
    b = shutil.copyfile(a, os.path.join(dep.images, "b." + fmt))
    return a, b


def check_ok(path):
    subprocess.run([fenv.REAL_QEMU_IMG, "check", "-q", "-f", "qcow2",
                    path], check=True)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_two_ids_with_the_same_bytes_share_one_base(dep, fmt):
    a, b = two_copies(dep, fmt)
    disk_a = create(dep, "a." + fmt, "vm-a")
    disk_b = create(dep, "b." + fmt, "vm-b")

    st_a, st_b = os.lstat(disk_a.backing_file), os.lstat(disk_b.backing_file)
    assert disk_a.backing_file != disk_b.backing_file
    assert os.path.samestat(st_a, st_b) and st_b.st_nlink == 2
    for disk, image in ((disk_a, a), (disk_b, b)):
        check_ok(disk.path)
        assert fenv.images_identical(image, fmt, disk.path, "qcow2")
    rows = {r["image_id"]: r for r in dep.cli_json("cache", "list")}
    assert {i: (r["shared_with"], r["disks"]) for i, r in rows.items()} == {
        "a." + fmt: (1, 1), "b." + fmt: (1, 1)}


def test_different_bytes_never_share(dep):
    fenv.make_raw(os.path.join(dep.images, "a.raw"), SIZE, seed=1)
    fenv.make_raw(os.path.join(dep.images, "b.raw"), SIZE, seed=2)
    disk_a = create(dep, "a.raw", "vm-a")
    disk_b = create(dep, "b.raw", "vm-b")
    assert os.lstat(disk_a.backing_file).st_nlink == 1
    assert os.lstat(disk_b.backing_file).st_nlink == 1
    assert {r["shared_with"] for r in dep.cli_json("cache", "list")} == {0}


def test_invalidating_and_pruning_one_id_leaves_the_other_working(dep):
    dep.write_config(image_cache=AGES_ZERO)
    a, b = two_copies(dep, "raw")
    disk_a = create(dep, "a.raw", "vm-a")
    disk_b = create(dep, "b.raw", "vm-b")
    os.unlink(disk_a.path)

    removed = dep.cli_json("cache", "invalidate", "a.raw")

    # The base's name, and the overlay template made for it (its own bytes).
    base_a = [r for r in removed["removed"] if r["kind"] != "template"]
    templates = [r for r in removed["removed"] if r["kind"] == "template"]
    assert [r["file"] for r in base_a] == [disk_a.backing_file]
    assert [os.path.basename(r["file"]).split(".template-")[0]
            for r in templates] == [os.path.basename(disk_a.backing_file)]
    assert base_a[0]["bytes"] == 0      # b.raw's name still holds them
    assert removed["bytes_freed"] == templates[0]["bytes"] > 0
    assert os.lstat(disk_b.backing_file).st_nlink == 1
    check_ok(disk_b.path)
    assert fenv.images_identical(b, "raw", disk_b.path, "qcow2")
    again = create(dep, "b.raw", "vm-b2")
    assert again.cache_hit and again.backing_file == disk_b.backing_file

    pruned = dep.cli_json("cache", "prune")

    assert pruned["removed"] == []          # b.raw's base is in use
    assert fenv.images_identical(b, "raw", disk_b.path, "qcow2")
    # a.raw comes back sharing b.raw's bytes again.
    disk_a = create(dep, "a.raw", "vm-a")
    assert os.path.samestat(os.lstat(disk_a.backing_file),
                            os.lstat(disk_b.backing_file))


def test_verify_reports_each_id_and_repair_moves_only_unused_names(dep):
    a, b = two_copies(dep, "raw")
    disk_a = create(dep, "a.raw", "vm-a")
    create(dep, "b.raw", "vm-b")
    rows = dep.cli_json("cache", "verify")
    assert sorted((r["image_id"], r["status"]) for r in rows) == [
        ("a.raw", "ok"), ("b.raw", "ok")]
    # Bit rot (or a hand) changes the shared bytes: both ids see it.
    with open(dep.base_path("a.raw"), "r+b") as f:
        f.write(b"rot")
    os.unlink(disk_a.path)

    result = dep.cli("cache", "verify", "--repair", "-f", "json",
                     check=False)

    assert result.returncode == 1
    rows = {r["image_id"]: r for r in json.loads(result.stdout)}
    assert {i: r["status"] for i, r in rows.items()} == {
        "a.raw": "corrupt", "b.raw": "corrupt"}
    assert rows["a.raw"]["action"].startswith("moved aside")
    assert rows["b.raw"]["action"].startswith("in use by")
    assert os.path.exists(dep.base_path("b.raw"))
    assert not os.path.exists(dep.base_path("a.raw"))
    # The next disk of either id fetches fresh bytes, not the rotten ones.
    fresh = create(dep, "a.raw", "vm-a2")
    assert fenv.images_identical(a, "raw", fresh.path, "qcow2")
    assert os.lstat(fresh.backing_file).st_nlink == 1


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from imagebackend.backends import base as backends_base
    from imagebackend.cache import publish
    from imagebackend.common import fileio
    from imagebackend import opts

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[2] == "publish_base":
        publish.publish_base = die      # after the scratch link
    else:
        fileio.publish_fd = die         # after the record, before the name
    conf = opts.new_conf(["--config-file", sys.argv[1]])
    backends_base.load(conf, "qcow2").create_image(
        "b.raw", sys.argv[3], 32 * 1024 * 1024)
""")


@pytest.mark.parametrize("point", ["publish_base", "publish_fd"])
def test_a_crash_while_linking_leaves_nothing_under_its_name(dep, point):
    a, b = two_copies(dep, "raw")
    disk_a = create(dep, "a.raw", "vm-a")
    with open(disk_a.backing_file + ".json", "rb") as f:
        record_a = f.read()
    target = os.path.join(dep.instances, "vm-b", "disk")

    child = subprocess.run([sys.executable, "-c", _KILLER, dep.config_file,
                            point, target], env=dep.env())

    assert child.returncode == -signal.SIGKILL
    assert not os.path.lexists(dep.base_path("b.raw"))
    assert not os.path.lexists(target)
    left = [n for n in os.listdir(dep.base_dir)
            if n.startswith(os.path.basename(dep.base_path("b.raw")))]
    assert all(".part-" in n or n.endswith(".json") for n in left), left
    # The shared bytes and a.raw's record are untouched.
    with open(disk_a.backing_file + ".json", "rb") as f:
        assert f.read() == record_a
    assert fenv.images_identical(a, "raw", disk_a.backing_file, "raw")
    disk_b = create(dep, "b.raw", "vm-b")
    assert fenv.images_identical(b, "raw", disk_b.path, "qcow2")
    assert os.path.samestat(os.lstat(disk_a.backing_file),
                            os.lstat(disk_b.backing_file))


# -- Glance: a strong hash skips the download --------------------------------

BLOCK = bytes(range(256)) * 4096        # 1 MiB


@pytest.fixture
def server():
    with hg.HostileGlance() as srv:
        yield srv


@pytest.fixture
def gdep(tmp_path, server):
    return server.deployment(str(tmp_path))


def glance_image(server, total, strong=True, disk_format="raw"):
    size, md5, sha512 = hg.digests(hg.repeat(BLOCK, total))

    def data(answer):
        answer.start(200, [("Content-Type", "application/octet-stream"),
                           ("Content-Length", str(size))])
        answer.body(hg.repeat(BLOCK, total))

    return server.image(data=data, size=size, checksum=md5,
                        os_hash_algo="sha512" if strong else None,
                        os_hash_value=sha512 if strong else None,
                        disk_format=disk_format)


def glance_disk(gdep, image_id, name):
    conf = gdep.conf()
    backend = backends_base.load(conf, "raw",
                                 source=sources.load(conf, "glance"))
    return backend.create_image(image_id,
                                os.path.join(gdep.instances, name, "disk"),
                                DISK)


def data_requests(server):
    return [r.path for r in server.requests_of("GET")
            if r.path.endswith("/file")]


def test_a_glance_image_with_a_cached_sha512_is_not_downloaded(server,
                                                               gdep):
    first = glance_image(server, 8 * MiB)
    second = glance_image(server, 8 * MiB)
    disk_a = glance_disk(gdep, first, "vm-a")
    sent = server.body_bytes_sent

    disk_b = glance_disk(gdep, second, "vm-b")

    assert data_requests(server) == ["/v2/images/%s/file" % first]
    # Only the image's record was sent, no data.
    assert server.body_bytes_sent - sent < 4096
    assert not disk_b.cache_hit
    assert os.path.samestat(os.lstat(gdep.base_path(first)),
                            os.lstat(gdep.base_path(second)))
    with open(disk_a.path, "rb") as fa, open(disk_b.path, "rb") as fb:
        assert fa.read(8 * MiB) == fb.read(8 * MiB) == BLOCK * 8
    rows = {r["image_id"]: r["status"]
            for r in gdep.cli_json("cache", "verify")}
    assert rows == {first: "ok", second: "ok"}


@pytest.mark.parametrize("strong,disk_format", [(False, "raw"),
                                                (True, "ami")])
def test_an_md5_or_another_format_is_downloaded(server, gdep, strong,
                                                disk_format):
    first = glance_image(server, 8 * MiB)
    second = glance_image(server, 8 * MiB, strong=strong,
                          disk_format=disk_format)
    glance_disk(gdep, first, "vm-a")
    glance_disk(gdep, second, "vm-b")

    assert data_requests(server) == ["/v2/images/%s/file" % i
                                     for i in (first, second)]
    assert server.body_bytes_sent >= 2 * 8 * MiB
