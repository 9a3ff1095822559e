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

"""An image file that changes while it is downloaded is refused, on a
real filesystem, through every step of the pipeline.
"""

import os

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import exception
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
IMAGE = "guest.raw"

pytestmark = pytest.mark.skipif(fenv.REAL_QEMU_IMG is None,
                                reason="qemu-img is not installed")


def _rewrite_in_place(path):
    with open(path, "r+b") as f:
        f.write(b"rewritten by its owner")


def _replace(path):
    fenv.make_raw(path + ".new", 64 * MiB, seed=7)
    os.rename(path + ".new", path)


@pytest.mark.parametrize("change", [_rewrite_in_place, _replace],
                         ids=["rewritten in place", "replaced"])
def test_a_file_rewritten_during_its_download_is_refused(tmp_path, change):
    dep = fenv.Deployment(str(tmp_path))
    image = os.path.join(dep.images, IMAGE)
    fenv.write_pattern_raw(image, 64 * MiB, extents=16, seed=3)
    backend = backends_base.load(dep.conf(), "qcow2")
    target = os.path.join(dep.instances, "vm", "disk")
    downloads = []

    def progress(stage, done, total):
        if stage.startswith("download"):
            downloads.append(done)
            if len(downloads) == 1:
                # Part of the file has been read: change it now.
                assert 0 < done < total
                change(image)

    with pytest.raises(exception.ImageDownloadError) as err:
        backend.create_image(IMAGE, target, fenv.GiB, progress=progress)

    assert "%s changed while it was being read" % IMAGE in str(err.value)
    assert len(downloads) > 1
    assert dep.base_listing() == []
    assert not os.path.exists(target)
    # Once it stays still, the new version is what the disk shows.
    disk = backend.create_image(IMAGE, target, fenv.GiB)
    assert fenv.images_identical(image, "raw", disk.path, "qcow2")
