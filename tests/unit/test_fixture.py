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

"""imagebackend.fixture: real disks, with the real qemu-img, in a test."""

import json
import os
import subprocess
import unittest

import fixtures
from oslo_config import cfg
import pytest

from imagebackend import exception
from imagebackend import fixture as ib_fixture
from imagebackend import opts

MiB = 1024 * 1024
DATA = b"fixture image" + bytes(MiB - 13)


def _info(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_a_backend_from_the_fixture_makes_real_disks():
    with ib_fixture.ImageBackendFixture(images={"img.raw": DATA}) as ib:
        assert ib.conf.imagebackend.instances_path == ib.instances_path
        assert ib.conf.oslo_concurrency.lock_path == ib.lock_path
        backend = ib.load_backend()
        assert backend.name == "qcow2"
        disk = backend.create_image("img.raw", ib.disk_path("vm1"), 4 * MiB)
        info = _info(disk.path)
        assert info["format"] == "qcow2" and info["virtual-size"] == 4 * MiB
        assert os.path.dirname(disk.backing_file) == ib.base_dir
        assert disk.libvirt_disk().driver_type == "qcow2"
        raw = ib.load_backend("raw").create_image(
            "img.raw", ib.disk_path("vm2"), 2 * MiB)
        assert raw.cache_hit
        with open(raw.path, "rb") as f:
            assert f.read(MiB) == DATA
        root = ib.root
        assert os.listdir(ib.lock_path)
    # Everything it made is gone.
    assert not os.path.exists(root)


def test_images_may_be_files_and_options_may_be_given(tmp_path):
    src = tmp_path / "seed.raw"
    src.write_bytes(DATA)
    qcow2 = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O",
                    "qcow2", str(src), str(qcow2)], check=True)
    with ib_fixture.ImageBackendFixture(
            images={"guest.qcow2": qcow2}, images_type="raw",
            force_raw_images=False) as ib:
        assert ib.conf.imagebackend.force_raw_images is False
        disk = ib.load_backend().create_image(
            "guest.qcow2", ib.disk_path("vm"), 2 * MiB)
        assert disk.format == "raw"
        with open(disk.path, "rb") as f:
            assert f.read(MiB) == DATA
        # The base kept the image's own format.
        bases = [n for n in os.listdir(ib.base_dir)
                 if not n.startswith(".") and not n.endswith(".json")]
        assert [_info(os.path.join(ib.base_dir, n))["format"]
                for n in bases] == ["qcow2"]


def test_a_missing_image_is_the_library_error():
    with ib_fixture.ImageBackendFixture() as ib:
        with pytest.raises(exception.ImageNotFound):
            ib.load_backend().create_image("nope", ib.disk_path("vm"), MiB)


def test_the_callers_conf_is_set_up_and_restored(tmp_path):
    # A service's own ConfigOpts, with its own [DEFAULT] instances_path.
    conf = cfg.ConfigOpts()
    conf.register_opt(cfg.StrOpt("instances_path", default="/srv/nova"))
    conf([])
    opts.set_defaults(conf, instances_path="/srv/nova")

    class Test(fixtures.TestWithFixtures):
        def runTest(self):
            ib = self.useFixture(ib_fixture.ImageBackendFixture(
                images={"a.raw": DATA}, conf=conf))
            assert conf.imagebackend.instances_path == ib.instances_path
            assert conf.local_source.path == ib.images_path
            disk = ib.load_backend().create_image(
                "a.raw", ib.disk_path("vm"), MiB)
            assert os.path.exists(disk.path)

    result = unittest.TestResult()
    Test().run(result)
    assert result.testsRun == 1
    assert result.wasSuccessful(), result.errors + result.failures
    assert conf.imagebackend.instances_path == "/srv/nova"
    assert conf.oslo_concurrency.lock_path is None
    assert conf.instances_path == "/srv/nova"
