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

"""The backend contract: what a compute driver relies on from every backend.

``BackendContract`` is inherited by one test class per backend and per
level: ``tests/unit/backends/test_backend_contract.py`` runs it with the
fake source and a fake qemu-img at the runner boundary, and
``tests/functional/test_pipeline.py`` with real files, a local source and
the real qemu-img.  A backend's differences are attributes and hooks of
its subclass (the ``*Hooks`` mixins below, shared by both levels); the
contract never asks which backend it is testing.  A new backend (RBD)
adds a hooks mixin and a test class at each level.

The world a test class runs in is a :class:`BackendWorld`, returned by a
``backend_world`` fixture of the test module.

The library names the contract depends on are used only in the "seams"
section, so that a renamed API is a one-line change here.
"""

import abc
import dataclasses
import json
import os
import threading
import time

import pytest

import imagebackend
from imagebackend.common import digest
from imagebackend import exception

# -- seams: the library API the contract uses ---------------------------------


def load_backend(conf, name, **kwargs):
    """Build backend ``name`` (``source``/``qemu`` passed on)."""
    return imagebackend.load_backend(conf, name, **kwargs)


def driver_type(disk):
    """The disk format a libvirt ``<driver type=...>`` gets for ``disk``."""
    return disk.libvirt_disk().driver_type


def cache_id(image_id):
    """The name of an image's base in ``_base``."""
    return digest.cache_id(image_id)


def disk_records(backend, target):
    """The registry records of the disk ``target``."""
    return [r for r in backend.cache.scanner.registry.records()
            if r["disk"] == str(target)]


def record_disk(backend, image_id, target, base_path):
    """Record a disk in the registry as another request would."""
    return backend.cache.scanner.registry.add(cache_id(image_id), image_id,
                                              str(target), base_path)


#: the first word of the stage of a download's progress reports.
DOWNLOAD_STAGES = ("download",)


# -- the world a contract runs in --------------------------------------------

class BackendWorld(abc.ABC):
    """Where the contract runs: a cache directory, a source serving a
    qcow2 and a raw image of the same virtual size, and a qemu-img.
    """

    qcow2_image = "guest.qcow2"
    raw_image = "guest.raw"
    #: the virtual size of both images.
    image_vsize: int
    #: the size of the disks the contract asks for (> image_vsize).
    disk_size: int
    #: another disk size, larger than disk_size.
    other_size: int
    #: how many requests the concurrency test makes at once.
    concurrent_requests = 8
    instances: str
    base_dir: str

    @abc.abstractmethod
    def conf(self, **overrides):
        """A ConfigOpts for this world, ``[imagebackend]`` overrides set."""

    @abc.abstractmethod
    def backend_kwargs(self, conf) -> dict:
        """``source``/``qemu`` for a backend built on ``conf``; every
        download through that source is counted by :meth:`downloads`.
        """

    @abc.abstractmethod
    def downloads(self) -> int:
        """How many image downloads were started."""

    @abc.abstractmethod
    def qemu_calls(self) -> list[str]:
        """The qemu-img commands run, as ``"convert -f qcow2 ..."``."""

    @abc.abstractmethod
    def reset_qemu_log(self) -> None:
        """Forget the qemu-img commands run so far."""

    @abc.abstractmethod
    def same_content(self, image_id, path, fmt) -> bool:
        """Whether image ``path`` (format ``fmt``) shows the guest what
        image ``image_id`` does (the rest of a larger disk reads zeros).
        """

    @abc.abstractmethod
    def disk_info(self, path, fmt) -> dict:
        """``format``, ``virtual_size``, ``backing_file`` and
        ``backing_format`` (None without one) of image ``path``.
        """

    @abc.abstractmethod
    def image_bytes(self, image_id) -> bytes:
        """The bytes the source serves for ``image_id``."""

    @abc.abstractmethod
    def image_checksum(self, image_id) -> dict:
        """``{"algo", "value"}`` the cache records for ``image_id``."""

    @abc.abstractmethod
    def create_concurrently(self, backend_name, image_id, targets, size
                            ) -> list["Request"]:
        """Create ``targets`` from ``image_id`` at once, from separate
        requests that share nothing but the cache directory (each made
        ready first, then all let go together); return a :class:`Request`
        per target, and count their downloads.
        """

    def base_path(self, image_id) -> str:
        return os.path.join(self.base_dir, cache_id(image_id))

    def base_listing(self) -> list[str]:
        """The files in ``_base``, without the hidden bookkeeping
        directories.
        """
        try:
            return sorted(n for n in os.listdir(self.base_dir)
                          if not n.startswith("."))
        except FileNotFoundError:
            return []


# -- each backend's hooks (shared by the unit and the functional level) ------

@dataclasses.dataclass
class Request:
    """How one of concurrent requests went."""

    cache_hit: bool
    #: when ``create_image`` was called (``time.time()``: comparable
    #: across processes).
    started: float
    #: the disk's ``timings``.
    timings: dict

    @property
    def asked_at(self) -> float:
        """When it had looked the image up: it looks for a cached base
        right after.
        """
        return self.started + self.timings["lookup"]

    @property
    def published_after(self) -> float:
        """For the request that fetched: a time before the base it
        fetched could be found (it is published after its download and
        conversion).
        """
        return self.asked_at + self.timings["fetch"] + self.timings.get(
            "convert", 0.0)


class Qcow2Hooks:
    backend_name = "qcow2"
    disk_format = "qcow2"
    #: qemu-img commands a disk from a cached image costs.
    warm_qemu_calls = 1
    #: whether a warm disk is a process-free copy (``copy_disk``).
    copies_disks = True

    def expected_backing(self, world, image_id, size):
        """The backing file of a ``size``-byte disk, None for none."""
        return world.base_path(image_id)


class CachedBaseHooks(Qcow2Hooks):
    backend_name = "cached-base"

    def expected_backing(self, world, image_id, size):
        if size == world.image_vsize:
            return world.base_path(image_id)
        return "%s_%d" % (world.base_path(image_id), size)


class RawHooks:
    backend_name = "raw"
    disk_format = "raw"
    warm_qemu_calls = 0
    copies_disks = False

    def expected_backing(self, world, image_id, size):
        return None


# -- the contract -------------------------------------------------------------

class BackendContract:
    """What every backend promises.  A subclass mixes in its hooks
    (``backend_name``, ``disk_format``, ``warm_qemu_calls``,
    ``expected_backing``) and its module provides ``backend_world``.
    """

    backend_name: str
    disk_format: str
    warm_qemu_calls: int

    @pytest.fixture(autouse=True)
    def _contract_world(self, backend_world):
        self.world = backend_world

    def backend(self, **overrides):
        conf = self.world.conf(**overrides)
        return load_backend(conf, self.backend_name,
                            **self.world.backend_kwargs(conf))

    def target(self, name="disk"):
        return os.path.join(self.world.instances, name, "disk")

    # -- content and layout ------------------------------------------------

    def test_disk_has_the_size_format_backing_and_content_asked_for(self):
        w = self.world
        disk = self.backend().create_image(w.qcow2_image, self.target(),
                                           w.disk_size)
        assert disk.path == self.target()
        assert disk.format == self.disk_format
        assert disk.virtual_size == w.disk_size
        assert disk.cache_hit is False
        assert w.same_content(w.qcow2_image, self.target(),
                              self.disk_format)
        info = w.disk_info(self.target(), self.disk_format)
        assert info["format"] == self.disk_format
        assert info["virtual_size"] == w.disk_size
        expected = self.expected_backing(w, w.qcow2_image, w.disk_size)
        assert info["backing_file"] == expected
        assert disk.backing_file == expected
        if expected is not None:
            assert info["backing_format"] == "raw"
            assert disk.backing_chain == [expected]
        else:
            assert disk.backing_chain == []
        assert driver_type(disk) == self.disk_format

    def test_base_is_raw_with_a_metadata_record(self):
        w = self.world
        self.backend().create_image(w.qcow2_image, self.target(),
                                    w.disk_size)
        base = w.base_path(w.qcow2_image)
        info = w.disk_info(base, "raw")
        assert info["virtual_size"] == w.image_vsize
        assert w.same_content(w.qcow2_image, base, "raw")
        with open(base + ".json") as f:
            record = json.load(f)
        assert record["image_id"] == w.qcow2_image
        assert record["format"] == "raw"
        assert record["source_format"] == "qcow2"
        assert record["size"] == len(w.image_bytes(w.qcow2_image))
        assert record["virtual_size"] == w.image_vsize
        assert record["checksum"] == w.image_checksum(w.qcow2_image)
        assert record["inspection"]["format"] == "qcow2"
        # No scratch file is left behind.
        assert not [n for n in w.base_listing()
                    if ".part" in n or ".converted" in n]

    def test_raw_image_is_renamed_not_converted(self):
        w = self.world
        disk = self.backend().create_image(w.raw_image, self.target(),
                                           w.disk_size)
        assert w.same_content(w.raw_image, disk.path, self.disk_format)
        assert not [c for c in w.qemu_calls() if c.startswith("convert")]

    def test_second_create_is_warm(self):
        w = self.world
        backend = self.backend()
        backend.create_image(w.qcow2_image, self.target("a"), w.disk_size)
        downloads = w.downloads()
        assert downloads == 1
        w.reset_qemu_log()
        disk = backend.create_image(w.qcow2_image, self.target("b"),
                                    w.disk_size)
        assert disk.cache_hit is True
        assert w.downloads() == downloads
        calls = w.qemu_calls()
        assert len(calls) <= self.warm_qemu_calls, calls
        assert w.same_content(w.qcow2_image, self.target("b"),
                              self.disk_format)

    def test_a_new_request_for_a_cached_image_is_warm_too(self):
        """The cache lives on disk, not in the backend object."""
        w = self.world
        self.backend().create_image(w.raw_image, self.target("a"),
                                    w.disk_size)
        disk = self.backend().create_image(w.raw_image, self.target("b"),
                                           w.disk_size)
        assert disk.cache_hit is True
        assert w.downloads() == 1

    # -- refusals ------------------------------------------------------------

    def test_size_below_virtual_size_is_refused_and_writes_nothing(self):
        w = self.world
        with pytest.raises(exception.InvalidImageSize) as err:
            self.backend().create_image(w.qcow2_image, self.target(),
                                        w.image_vsize // 2)
        assert w.qcow2_image in str(err.value)
        assert not os.path.exists(self.target())
        assert not os.path.exists(os.path.dirname(self.target()))
        assert w.base_listing() == []

    def test_size_below_virtual_size_of_cached_image_writes_nothing(self):
        w = self.world
        backend = self.backend()
        backend.create_image(w.raw_image, self.target("a"), w.disk_size)
        before = w.base_listing()
        with pytest.raises(exception.InvalidImageSize):
            backend.create_image(w.raw_image, self.target("b"),
                                 w.image_vsize - 512)
        assert not os.path.exists(self.target("b"))
        assert w.base_listing() == before

    def test_existing_target_is_never_overwritten(self):
        w = self.world
        os.makedirs(os.path.dirname(self.target()))
        with open(self.target(), "w") as f:
            f.write("precious")
        with pytest.raises(exception.TargetExists):
            self.backend().create_image(w.raw_image, self.target(),
                                        w.disk_size)
        with open(self.target()) as f:
            assert f.read() == "precious"

    def test_unknown_image_is_a_clear_error(self):
        w = self.world
        with pytest.raises(exception.ImageNotFound) as err:
            self.backend().create_image("missing.img", self.target(),
                                        w.disk_size)
        assert "missing.img" in str(err.value)
        assert w.base_listing() == []
        assert not os.path.exists(os.path.dirname(self.target()))

    # -- options -------------------------------------------------------------

    def test_force_raw_images_false_keeps_the_format(self):
        w = self.world
        disk = self.backend(force_raw_images=False).create_image(
            w.qcow2_image, self.target(), w.disk_size)
        base = w.base_path(w.qcow2_image)
        assert w.disk_info(base, "qcow2")["format"] == "qcow2"
        assert w.same_content(w.qcow2_image, base, "qcow2")
        assert w.same_content(w.qcow2_image, disk.path, self.disk_format)
        assert w.disk_info(disk.path, self.disk_format)["virtual_size"] == (
            w.disk_size)

    def test_preallocate_space_reserves_the_disk(self):
        w = self.world
        disk = self.backend(preallocate_images="space").create_image(
            w.raw_image, self.target(), w.disk_size)
        assert os.stat(disk.path).st_blocks * 512 >= w.disk_size
        assert w.same_content(w.raw_image, disk.path, self.disk_format)

    # -- atomicity and failure -----------------------------------------------

    def test_disk_appears_complete_or_not_at_all(self):
        w = self.world
        backend = self.backend()
        hook = backend.create_disk
        seen = []

        def watched(base_path, base_format, path, size):
            # While the disk is being made, its name is still free and
            # the work happens beside it, under another name.
            seen.append((os.path.exists(self.target()),
                         os.path.dirname(path), os.path.basename(path)))
            hook(base_path, base_format, path, size)
        backend.create_disk = watched
        backend.create_image(w.qcow2_image, self.target(), w.disk_size)
        [(existed, directory, name)] = seen
        assert existed is False
        assert directory == os.path.dirname(self.target())
        assert name != "disk"
        assert os.listdir(directory) == ["disk"]
        assert w.same_content(w.qcow2_image, self.target(),
                              self.disk_format)
        [record] = disk_records(backend, self.target())
        assert record["state"] == "done"

    @pytest.mark.parametrize("hook_name", ["create_disk", "copy_disk"])
    def test_failed_create_removes_only_what_it_made(self, hook_name):
        """The overlay hook that makes the disk (``copy_disk`` for a warm
        copy where the backend has one, else ``create_disk``) fails after
        writing.
        """
        w = self.world
        backend = self.backend()
        first = backend.create_image(w.raw_image, self.target("first"),
                                     w.disk_size)
        keep = os.path.join(w.instances, "keep")
        os.makedirs(keep)
        with open(os.path.join(keep, "other"), "w") as f:
            f.write("someone else's")
        base_before = w.base_listing()
        hook = getattr(backend, hook_name)
        called = []

        def fails_after_writing(base_path, base_format, path, size):
            called.append(path)
            hook(base_path, base_format, path, size)
            raise exception.DiskOperationError(path=str(path),
                                               reason="injected failure")
        setattr(backend, hook_name, fails_after_writing)
        if hook_name == "create_disk" and self.copies_disks:
            # As when no template can serve: create_disk makes the disk.
            backend.copy_disk = lambda *args: False
        target = os.path.join(keep, "new", "vm", "disk")
        if hook_name == "copy_disk" and not self.copies_disks:
            backend.create_image(w.raw_image, target, w.disk_size)
            assert called == []
            return
        with pytest.raises(exception.ImageBackendException):
            backend.create_image(w.raw_image, target, w.disk_size)
        assert len(called) == 1
        # What it made (directories, temporary file, registry record) is
        # gone; what others made (a file, a disk, the cached base) is not.
        assert os.listdir(keep) == ["other"]
        assert disk_records(backend, target) == []
        assert w.base_listing() == base_before
        assert w.same_content(w.raw_image, first.path, self.disk_format)
        assert [r["state"] for r in disk_records(backend, first.path)] == [
            "done"]

    def test_a_target_taken_meanwhile_is_left_alone(self):
        """Another request publishes the target (and its record) while
        this one builds its disk: this one gets TargetExists and removes
        only its own temporary file and record.
        """
        w = self.world
        backend = self.backend()
        target = self.target()
        hook = backend.create_disk
        theirs = []

        def racing(base_path, base_format, path, size):
            with open(target, "wb") as f:
                f.write(b"theirs")
            theirs.append(record_disk(backend, w.raw_image, target,
                                      base_path))
            hook(base_path, base_format, path, size)
        backend.create_disk = racing
        with pytest.raises(exception.TargetExists):
            backend.create_image(w.raw_image, target, w.disk_size)
        with open(target, "rb") as f:
            assert f.read() == b"theirs"
        assert os.listdir(os.path.dirname(target)) == ["disk"]
        assert [r["_path"] for r in disk_records(backend, target)] == theirs

    # -- concurrency ---------------------------------------------------------

    def test_concurrent_creates_of_one_image_download_once(self):
        w = self.world
        targets = [self.target("vm%d" % i)
                   for i in range(w.concurrent_requests)]
        requests = w.create_concurrently(self.backend_name, w.qcow2_image,
                                         targets, w.disk_size)
        hits = [r.cache_hit for r in requests]
        assert sorted(hits) == [False] + [True] * (len(targets) - 1)
        assert w.downloads() == 1
        # The race happened: every other request looked for the base
        # before the one that fetched it could have published it, so it
        # was a cache hit only by waiting for that fetch.
        [fetcher] = [r for r in requests if not r.cache_hit]
        assert all(r.asked_at < fetcher.published_after
                   for r in requests), requests
        converts = [c for c in w.qemu_calls() if c.startswith("convert")]
        assert len(converts) == 1, converts
        for target in targets:
            assert w.same_content(w.qcow2_image, target, self.disk_format)

    # -- progress ------------------------------------------------------------

    def test_download_progress_is_reported_in_bytes(self):
        w = self.world
        reports = []
        self.backend().create_image(
            w.raw_image, self.target(), w.disk_size,
            progress=lambda stage, done, total: reports.append(
                (stage, done, total)))
        size = len(w.image_bytes(w.raw_image))
        download = [(done, total) for stage, done, total in reports
                    if stage.split()[0] in DOWNLOAD_STAGES]
        assert download, reports
        assert {total for _done, total in download} == {size}
        done = [d for d, _total in download]
        assert done == sorted(done)
        assert done[-1] == size
        for _stage, done, total in reports:
            assert isinstance(done, int) and 0 <= done <= total

    def test_conversion_progress_is_reported_in_bytes(self):
        w = self.world
        reports = []
        self.backend().create_image(
            w.qcow2_image, self.target(), w.disk_size,
            progress=lambda stage, done, total: reports.append(
                (stage, done, total)))
        sizes = {len(w.image_bytes(w.qcow2_image)), w.image_vsize}
        stages = {stage.split()[0] for stage, _done, _total in reports}
        assert "convert" in stages, reports
        for _stage, done, total in reports:
            assert total in sizes, reports
            assert 0 <= done <= total


def create_timed(backend, image_id, target, size) -> Request:
    """``backend.create_image`` of ``target``, timed."""
    started = time.time()
    disk = backend.create_image(image_id, target, size)
    return Request(disk.cache_hit, started, dict(disk.timings))


def create_in_threads(make_backend, image_id, targets, size):
    """Create ``targets`` at once from threads, each with a backend of
    its own; return a :class:`Request` each (for a world's
    :meth:`BackendWorld.create_concurrently`).
    """
    barrier = threading.Barrier(len(targets))
    hits, errors = [], []

    def create(target):
        backend = make_backend()
        barrier.wait()
        try:
            hits.append(create_timed(backend, image_id, target, size))
        except Exception as exc:  # reported below, with the others
            errors.append(exc)
    threads = [threading.Thread(target=create, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    return hits
