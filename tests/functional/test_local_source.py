"""The local directory source refuses ids that escape its directory."""

import os

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import exception
from tests.functional.fixtures import env as fenv


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path))
    fenv.make_raw(os.path.join(d.images, "ok.raw"))
    with open(os.path.join(d.root, "secret"), "wb") as f:
        f.write(b"host secret canary\n" * 100)
    return d


@pytest.mark.parametrize("image_id", [
    "../secret", "..", ".", "/etc/passwd", "sub/ok.raw", "", "a\0b",
])
def test_ids_outside_the_directory_are_refused(dep, image_id):
    backend = backends_base.load(dep.conf(), "qcow2")
    target = os.path.join(dep.instances, "vm", "disk")
    with pytest.raises(exception.InvalidImageId):
        backend.create_image(image_id, target, fenv.GiB)
    assert dep.base_listing() == []
    assert not os.path.exists(target)


def test_symlink_out_of_the_directory_is_refused(dep):
    os.symlink(os.path.join(dep.root, "secret"),
               os.path.join(dep.images, "link.raw"))
    backend = backends_base.load(dep.conf(), "raw")
    target = os.path.join(dep.instances, "vm", "disk")
    with pytest.raises(exception.InvalidImageId) as err:
        backend.create_image("link.raw", target, fenv.GiB)
    assert "symlink" in str(err.value)
    assert dep.base_listing() == []
    assert not os.path.exists(target)


def test_directory_and_fifo_are_refused(dep):
    os.mkdir(os.path.join(dep.images, "adir"))
    os.mkfifo(os.path.join(dep.images, "afifo"))
    backend = backends_base.load(dep.conf(), "raw")
    for image_id in ("adir", "afifo"):
        with pytest.raises(exception.InvalidImageId):
            backend.create_image(image_id,
                                 os.path.join(dep.instances, image_id),
                                 fenv.GiB)
    assert dep.base_listing() == []
