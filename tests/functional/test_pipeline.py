"""The whole pipeline, for every backend, with the real qemu-img.

``BackendContract`` is the contract every backend's tests inherit; a new
backend adds a subclass naming itself and its disk layout.
"""

import json
import multiprocessing
import os

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.common import digest as content_digest
from imagebackend import exception
from tests import fakes
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
GiB = fenv.GiB


@pytest.fixture
def deployment(tmp_path):
    return fenv.Deployment(str(tmp_path))


def _create_in_child(config_file, image_id, target, size, backend, queue):
    from imagebackend.backends import base
    from imagebackend import opts
    conf = opts.new_conf(["--config-file", config_file])
    disk = base.load(conf, backend).create_image(image_id, target, size)
    queue.put(disk.cache_hit)


class BackendContract:
    """What every backend promises; subclasses set the class attributes."""

    backend_name: str = ""
    disk_format: str = ""
    has_backing_file: bool = True

    @pytest.fixture(autouse=True)
    def _setup(self, deployment):
        self.dep = deployment
        self.qcow2_image = fenv.make_qcow2(
            os.path.join(deployment.images, "guest.qcow2"))
        self.raw_image = fenv.make_raw(
            os.path.join(deployment.images, "guest.raw"))

    def backend(self, **overrides):
        conf = self.dep.conf()
        for key, value in overrides.items():
            conf.set_override(key, value, group="imagebackend")
        return backends_base.load(conf, self.backend_name)

    def target(self, name="disk"):
        return os.path.join(self.dep.instances, name, "disk")

    def expected_backing(self, image_id, size):
        cid = content_digest.cache_id(image_id)
        image_vsize = 64 * MiB
        if self.backend_name == "cached-base" and size != image_vsize:
            return os.path.join(self.dep.base_dir, "%s_%d" % (cid, size))
        return os.path.join(self.dep.base_dir, cid)

    # -- content and layout ------------------------------------------------

    def test_disk_from_qcow2_image_has_image_content(self):
        disk = self.backend().create_image("guest.qcow2", self.target(),
                                           GiB)
        assert disk.path == self.target()
        assert disk.format == self.disk_format
        assert disk.virtual_size == GiB
        assert disk.cache_hit is False
        assert fenv.images_identical(self.qcow2_image, "qcow2",
                                     self.target(), self.disk_format)
        info = fenv.qemu_info(self.target(), self.disk_format)
        assert info["format"] == self.disk_format
        assert info["virtual-size"] == GiB
        if self.has_backing_file:
            expected = self.expected_backing("guest.qcow2", GiB)
            assert info["backing-filename"] == expected
            assert info["backing-filename-format"] == "raw"
            assert disk.backing_file == expected
        else:
            assert "backing-filename" not in info
            assert disk.backing_chain == []
        assert disk.libvirt_disk().driver_type == self.disk_format

    def test_base_is_raw_with_a_metadata_record(self):
        self.backend().create_image("guest.qcow2", self.target(), GiB)
        cid = content_digest.cache_id("guest.qcow2")
        base = os.path.join(self.dep.base_dir, cid)
        assert fenv.qemu_info(base, "raw")["virtual-size"] == 64 * MiB
        assert fenv.images_identical(self.qcow2_image, "qcow2", base, "raw")
        with open(base + ".json") as f:
            record = json.load(f)
        assert record["image_id"] == "guest.qcow2"
        assert record["format"] == "raw"
        assert record["source_format"] == "qcow2"
        assert record["size"] == os.path.getsize(self.qcow2_image)
        assert record["virtual_size"] == 64 * MiB
        with open(self.qcow2_image, "rb") as f:
            source_bytes = f.read()
        assert record["checksum"] == {
            "algo": "sparse-64k-xxh3",
            "value": fakes.sparse_digest(source_bytes)}
        assert record["inspection"]["format"] == "qcow2"
        # No scratch file is left behind.
        assert not [n for n in self.dep.base_listing()
                    if n.endswith((".part", ".converted"))]

    def test_raw_image_is_renamed_not_converted(self):
        disk = self.backend().create_image("guest.raw", self.target(), GiB)
        assert fenv.images_identical(self.raw_image, "raw", disk.path,
                                     self.disk_format)
        assert not [c for c in self.dep.qemu_calls()
                    if c.startswith("convert")]

    def test_second_create_hits_cache_and_spawns_at_most_one_process(self):
        backend = self.backend()
        backend.create_image("guest.qcow2", self.target("a"), GiB)
        self.dep.reset_qemu_log()
        disk = backend.create_image("guest.qcow2", self.target("b"), GiB)
        assert disk.cache_hit is True
        calls = self.dep.qemu_calls()
        assert len(calls) <= (1 if self.has_backing_file else 0), calls
        assert fenv.images_identical(self.qcow2_image, "qcow2",
                                     self.target("b"), self.disk_format)

    def test_size_below_virtual_size_is_refused_and_writes_nothing(self):
        with pytest.raises(exception.InvalidImageSize) as err:
            self.backend().create_image("guest.qcow2", self.target(),
                                        32 * MiB)
        assert "guest.qcow2" in str(err.value)
        assert not os.path.exists(self.target())
        assert self.dep.base_listing() == []

    def test_size_below_virtual_size_of_cached_image_writes_nothing(self):
        backend = self.backend()
        backend.create_image("guest.raw", self.target("a"), GiB)
        before = self.dep.base_listing()
        with pytest.raises(exception.InvalidImageSize):
            backend.create_image("guest.raw", self.target("b"), MiB)
        assert not os.path.exists(self.target("b"))
        assert self.dep.base_listing() == before

    def test_existing_target_is_never_overwritten(self):
        os.makedirs(os.path.dirname(self.target()))
        with open(self.target(), "w") as f:
            f.write("precious")
        with pytest.raises(exception.TargetExists):
            self.backend().create_image("guest.raw", self.target(), GiB)
        with open(self.target()) as f:
            assert f.read() == "precious"

    def test_unknown_image_is_a_clear_error(self):
        with pytest.raises(exception.ImageNotFound) as err:
            self.backend().create_image("missing.img", self.target(), GiB)
        assert "missing.img" in str(err.value)
        assert self.dep.base_listing() == []

    def test_force_raw_images_false_keeps_the_format(self):
        disk = self.backend(force_raw_images=False).create_image(
            "guest.qcow2", self.target(), GiB)
        cid = content_digest.cache_id("guest.qcow2")
        base = os.path.join(self.dep.base_dir, cid)
        assert fenv.qemu_info(base, "qcow2")["format"] == "qcow2"
        assert fenv.images_identical(self.qcow2_image, "qcow2",
                                     disk.path, self.disk_format)

    def test_preallocate_space_reserves_the_disk(self):
        disk = self.backend(preallocate_images="space").create_image(
            "guest.raw", self.target(), 256 * MiB)
        assert os.stat(disk.path).st_blocks * 512 >= 256 * MiB
        assert fenv.images_identical(self.raw_image, "raw", disk.path,
                                     self.disk_format)

    def test_concurrent_processes_download_once(self):
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_create_in_child,
                             args=(self.dep.config_file, "guest.qcow2",
                                   self.target("vm%d" % i), GiB,
                                   self.backend_name, queue))
                 for i in range(8)]
        old_path = os.environ["PATH"]
        os.environ["PATH"] = self.dep.env()["PATH"]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(120)
        finally:
            os.environ["PATH"] = old_path
        assert [p.exitcode for p in procs] == [0] * 8
        hits = sorted(queue.get(timeout=5) for _ in procs)
        assert hits == [False] + [True] * 7
        converts = [c for c in self.dep.qemu_calls()
                    if c.startswith("convert")]
        assert len(converts) == 1, converts
        for i in range(8):
            assert fenv.images_identical(self.qcow2_image, "qcow2",
                                         self.target("vm%d" % i),
                                         self.disk_format)


class TestQcow2Backend(BackendContract):
    backend_name = "qcow2"
    disk_format = "qcow2"


class TestCachedBaseBackend(BackendContract):
    backend_name = "cached-base"
    disk_format = "qcow2"

    def test_sized_base_is_shared_per_size(self):
        backend = self.backend()
        backend.create_image("guest.qcow2", self.target("a"), GiB)
        backend.create_image("guest.qcow2", self.target("b"), GiB)
        backend.create_image("guest.qcow2", self.target("c"), 2 * GiB)
        cid = content_digest.cache_id("guest.qcow2")
        sized = [n for n in self.dep.base_listing()
                 if "_" in n and not n.endswith(".json")]
        assert sized == ["%s_%d" % (cid, GiB), "%s_%d" % (cid, 2 * GiB)]
        info = fenv.qemu_info(os.path.join(self.dep.base_dir, sized[0]),
                              "raw")
        assert info["virtual-size"] == GiB


class TestRawBackend(BackendContract):
    backend_name = "raw"
    disk_format = "raw"
    has_backing_file = False

    def test_copy_keeps_holes(self):
        disk = self.backend().create_image("guest.qcow2", self.target(), GiB)
        cid = content_digest.cache_id("guest.qcow2")
        base = os.path.join(self.dep.base_dir, cid)
        assert (os.stat(disk.path).st_blocks
                <= os.stat(base).st_blocks + 16)
        assert os.stat(disk.path).st_blocks * 512 < 16 * MiB
