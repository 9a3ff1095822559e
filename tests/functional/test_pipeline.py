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

"""The backend contract (tests/contract/backend.py) with the real
qemu-img, real files and the local source, for every backend; what only
one backend does; and a check that the fake qemu-img the unit level runs
the contract with answers as the real one does.
"""

import os

import pytest

from imagebackend import opts
from imagebackend.qemu import img as qemu_img
from imagebackend import sources
from tests.contract import backend as contract
from tests import fakes
from tests.functional.fixtures import children
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
GiB = fenv.GiB


def _counted(source, counter):
    """``source`` with every download started added to ``counter``."""
    real_open = source.open

    def open_counted(meta):
        counter.append(meta.image_id)
        return real_open(meta)
    source.open = open_counted
    return source


def _create_in_child(config_file, image_id, target, size, backend, go,
                     queue):
    conf = opts.new_conf(["--config-file", config_file])
    opened = []
    source = _counted(sources.load(conf), opened)
    made = contract.load_backend(conf, backend, source=source)
    go.wait(120)        # every request is ready: start them all at once
    queue.put((contract.create_timed(made, image_id, target, size),
               len(opened)))


class RealWorld(contract.BackendWorld):
    """A deployment in ``root``: the local source over real image files,
    the real qemu-img behind a wrapper that logs each command.
    """

    image_vsize = 64 * MiB
    disk_size = GiB
    other_size = 2 * GiB

    def __init__(self, root):
        self.dep = fenv.Deployment(root)
        self.instances = self.dep.instances
        self.base_dir = self.dep.base_dir
        self.paths = {
            self.qcow2_image: fenv.make_qcow2(
                os.path.join(self.dep.images, self.qcow2_image),
                size=self.image_vsize),
            self.raw_image: fenv.make_raw(
                os.path.join(self.dep.images, self.raw_image),
                size=self.image_vsize),
        }
        self.formats = {self.qcow2_image: "qcow2", self.raw_image: "raw"}
        self.opened = []

    def conf(self, **overrides):
        conf = self.dep.conf()
        for key, value in overrides.items():
            conf.set_override(key, value, group="imagebackend")
        return conf

    def backend_kwargs(self, conf):
        return {"source": _counted(sources.load(conf), self.opened)}

    def downloads(self):
        return len(self.opened)

    def qemu_calls(self):
        return self.dep.qemu_calls()

    def reset_qemu_log(self):
        self.dep.reset_qemu_log()

    def same_content(self, image_id, path, fmt):
        return fenv.images_identical(self.paths[image_id],
                                     self.formats[image_id], path, fmt)

    def disk_info(self, path, fmt):
        info = fenv.qemu_info(path, fmt)
        return {"format": info["format"],
                "virtual_size": info["virtual-size"],
                "backing_file": info.get("backing-filename"),
                "backing_format": info.get("backing-filename-format")}

    def image_bytes(self, image_id):
        with open(self.paths[image_id], "rb") as f:
            return f.read()

    def image_checksum(self, image_id):
        return {"algo": "sparse-64k-xxh3",
                "value": fakes.sparse_digest(self.image_bytes(image_id))}

    def create_concurrently(self, backend_name, image_id, targets, size):
        ctx = children.context()
        queue, go = ctx.Queue(), ctx.Barrier(len(targets))
        procs = [children.process(ctx, _create_in_child,
                                  (self.dep.config_file, image_id, target,
                                   size, backend_name, go, queue))
                 for target in targets]
        old_path = os.environ["PATH"]
        os.environ["PATH"] = self.dep.env()["PATH"]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(120)
        finally:
            os.environ["PATH"] = old_path
        assert [p.exitcode for p in procs] == [0] * len(procs)
        results = [queue.get(timeout=5) for _ in procs]
        self.opened.extend(["child"] * sum(n for _request, n in results))
        return [request for request, _n in results]


@pytest.fixture
def backend_world(tmp_path):
    return RealWorld(str(tmp_path))


class TestQcow2Backend(contract.Qcow2Hooks, contract.BackendContract):
    pass


class TestCachedBaseBackend(contract.CachedBaseHooks,
                            contract.BackendContract):

    def test_sized_base_is_shared_per_size(self):
        w = self.world
        backend = self.backend()
        backend.create_image(w.qcow2_image, self.target("a"), w.disk_size)
        backend.create_image(w.qcow2_image, self.target("b"), w.disk_size)
        backend.create_image(w.qcow2_image, self.target("c"), w.other_size)
        cid = contract.cache_id(w.qcow2_image)
        sized = [n for n in w.base_listing()
                 if "_" in n and not n.endswith(".json")
                 and ".template-" not in n]
        assert sized == ["%s_%d" % (cid, w.disk_size),
                         "%s_%d" % (cid, w.other_size)]
        info = fenv.qemu_info(os.path.join(w.base_dir, sized[0]), "raw")
        assert info["virtual-size"] == w.disk_size


class TestRawBackend(contract.RawHooks, contract.BackendContract):

    def test_copy_keeps_holes(self):
        w = self.world
        disk = self.backend().create_image(w.qcow2_image, self.target(),
                                           w.disk_size)
        base = w.base_path(w.qcow2_image)
        assert (os.stat(disk.path).st_blocks
                <= os.stat(base).st_blocks + 16)
        assert os.stat(disk.path).st_blocks * 512 < 16 * MiB


# -- the unit level's fake qemu-img agrees with the real one ------------------

def _steps(qemu, root, raw_image):
    """Run, through ``qemu``, the commands the pipeline runs; return what
    ``info`` and ``check`` say of each result.
    """
    base = os.path.join(root, "base")
    qemu.convert(raw_image, "raw", base + ".qcow2", "qcow2")
    qemu.convert(base + ".qcow2", "qcow2", base, "raw")
    overlay = os.path.join(root, "overlay")
    qemu.create(overlay, "qcow2", 2 * MiB, backing_file=base,
                backing_fmt="raw")
    qemu.resize(overlay, "qcow2", 4 * MiB)
    qemu.resize(base, "raw", 3 * MiB)
    seen = []
    for path, fmt in ((base + ".qcow2", "qcow2"), (base, "raw"),
                      (overlay, "qcow2")):
        info = qemu.info(path, fmt)
        check = qemu.check(path, fmt)
        seen.append((os.path.basename(path), info.format, info.virtual_size,
                     info.backing_file and os.path.basename(
                         info.backing_file), info.backing_format,
                     check.supported, check.clean))
    # What the guest sees of the overlay, read back as a raw file.
    flat = os.path.join(root, "flat")
    qemu.convert(overlay, "qcow2", flat, "raw")
    with open(flat, "rb") as f:
        seen.append(f.read())
    return seen


def test_the_fake_qemu_img_agrees_with_the_real_one(tmp_path):
    raw_image = str(tmp_path / "image.raw")
    fenv.write_pattern_raw(raw_image, MiB, extent_size=64 * 1024)
    results = []
    for name, qemu in (("real", qemu_img.QemuImg()),
                       ("fake", fakes.fake_qemu()[0])):
        root = tmp_path / name
        root.mkdir()
        results.append(_steps(qemu, str(root), raw_image))
    real, fake = results
    assert fake == real
    assert real[2][1:5] == ("qcow2", 4 * MiB, "base", "raw")
    with open(raw_image, "rb") as f:
        image = f.read()
    assert real[3] == image + bytes(4 * MiB - len(image))
