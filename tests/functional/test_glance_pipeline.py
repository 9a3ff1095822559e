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

"""Instance disks made from Glance images, end to end.

Keystone and Glance are real (``openstack_servers``), so is qemu-img; the
Glance source finds Glance through the Keystone catalog with a password.
"""

import os
import subprocess

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.common import digest as content_digest
from imagebackend import exception
from imagebackend import sources
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
GiB = fenv.GiB


@pytest.fixture
def deployment(tmp_path, openstack_servers):
    glance_opts = dict(openstack_servers.demo.auth_options(), num_retries=1)
    return fenv.Deployment(str(tmp_path), glance=glance_opts)


@pytest.fixture(scope="module")
def images(openstack_servers, tmp_path_factory):
    """A qcow2 and a raw image, uploaded once for this module."""
    root = tmp_path_factory.mktemp("glance-images")
    qcow2 = fenv.make_qcow2(str(root / "guest.qcow2"), size=64 * MiB)
    raw = fenv.make_raw(str(root / "guest.raw"), size=32 * MiB)
    return {
        "qcow2": (openstack_servers.upload_image(qcow2, "qcow2"), qcow2),
        "raw": (openstack_servers.upload_image(raw, "raw"), raw),
    }


def backend(deployment, name):
    conf = deployment.conf()
    return backends_base.load(conf, name, source=sources.load(conf, "glance"))


@pytest.mark.parametrize("backend_name", ["raw", "qcow2", "cached-base"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_disk_from_glance_image(deployment, images, backend_name, fmt):
    image_id, original = images[fmt]
    target = os.path.join(deployment.instances, "vm", "disk")

    disk = backend(deployment, backend_name).create_image(image_id, target,
                                                          GiB)

    assert disk.cache_hit is False
    assert disk.virtual_size == GiB
    assert fenv.images_identical(original, fmt, target, disk.format)
    base = os.path.join(deployment.base_dir, content_digest.cache_id(image_id))
    assert fenv.images_identical(original, fmt, base, "raw")


def test_second_disk_is_a_cache_hit(deployment, images):
    image_id, original = images["qcow2"]
    made = backend(deployment, "qcow2")
    made.create_image(image_id, os.path.join(deployment.instances, "a"), GiB)

    disk = made.create_image(image_id,
                             os.path.join(deployment.instances, "b"), GiB)

    assert disk.cache_hit is True
    assert fenv.images_identical(original, "qcow2", disk.path, "qcow2")


def test_tampered_image_is_refused_and_nothing_is_cached(
        deployment, openstack_servers, tmp_path):
    path = fenv.make_raw(str(tmp_path / "tampered.raw"), size=8 * MiB)
    image_id = openstack_servers.upload_image(path, "raw")
    openstack_servers.tamper_image_file(image_id, offset=4 * MiB)
    target = os.path.join(deployment.instances, "vm", "disk")

    with pytest.raises(exception.ImageChecksumMismatch) as err:
        backend(deployment, "qcow2").create_image(image_id, target, GiB)

    assert image_id in str(err.value)
    assert err.value.algo == "sha512"
    assert not os.path.exists(target)
    assert deployment.base_listing() == []


def test_deactivated_image_makes_no_disk(deployment, openstack_servers,
                                         tmp_path):
    path = fenv.make_raw(str(tmp_path / "old.raw"), size=4 * MiB)
    image_id = openstack_servers.upload_image(path, "raw")
    openstack_servers.deactivate_image(image_id)
    target = os.path.join(deployment.instances, "vm", "disk")

    with pytest.raises(exception.ImageNotActive):
        backend(deployment, "raw").create_image(image_id, target, GiB)

    assert not os.path.exists(target)
    assert deployment.base_listing() == []


def test_uploaded_extract_round_trips(deployment, images, tmp_path):
    image_id, original = images["qcow2"]
    made = backend(deployment, "qcow2")
    disk = made.create_image(image_id,
                             os.path.join(deployment.instances, "vm"), GiB)
    # What `disk extract --upload` does: a standalone copy, uploaded.
    extracted = str(tmp_path / "extracted.qcow2")
    subprocess.run([fenv.REAL_QEMU_IMG, "convert", "-q", "-f", "qcow2",
                    "-O", "qcow2", disk.path, extracted], check=True)

    new_id = made.source.upload("extracted", extracted, "qcow2")

    again = made.create_image(new_id,
                              os.path.join(deployment.instances, "vm2"),
                              GiB)
    assert fenv.images_identical(original, "qcow2", again.path, "qcow2")


def test_cli_extract_upload_round_trips(deployment, images, tmp_path):
    image_id, original = images["qcow2"]
    conf = deployment.conf()
    backends_base.load(conf, "qcow2", source=sources.load(conf, "glance")) \
        .create_image(image_id, os.path.join(deployment.instances, "vm"),
                      GiB)
    deployment.write_config(imagebackend={"image_source": "glance"})
    out = str(tmp_path / "extracted.qcow2")
    row = deployment.cli_json("disk", "extract",
                              os.path.join(deployment.instances, "vm"),
                              out, "--upload", "round-trip")
    assert row["image_name"] == "round-trip"
    new_id = row["image_id"]
    assert new_id != image_id
    target = os.path.join(deployment.instances, "from-upload")
    disk = deployment.cli_json("disk", "create", new_id, target, "--size",
                               "1G")
    assert disk["cache_hit"] is False
    assert fenv.images_identical(original, "qcow2", target, "qcow2")
