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

"""Every crafted image of the corpus through the whole pipeline, for every
backend: refused ones leave ``_base`` and the target untouched, and no byte
of a host canary file ever reaches a disk or the cache."""

import os
import shutil

import pytest

from imagebackend.backends import base as backends_base
from imagebackend import inspection
from tests.functional.fixtures import env as fenv

BACKENDS = ("qcow2", "cached-base", "raw")


@pytest.fixture(scope="module")
def entries(crafted_corpus):
    return crafted_corpus


def _ids(entries):
    return [e.name for e in entries]


def _files_under(directory):
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                yield path


def _contains(path, marker):
    with open(path, "rb") as f:
        tail = b""
        while True:
            chunk = f.read(4 * 1024 * 1024)
            if not chunk:
                return False
            if marker in tail + chunk:
                return True
            tail = chunk[-len(marker):]


@pytest.mark.parametrize("backend", BACKENDS)
def test_corpus_through_the_pipeline(tmp_path, entries, backend):
    failures = []
    for entry in entries:
        dep = fenv.Deployment(str(tmp_path / backend / entry.name))
        image_id = "img-" + entry.name
        shutil.copyfile(entry.path, os.path.join(dep.images, image_id))
        formats = ("%s:%s" % (image_id, entry.declared_format)
                   if entry.declared_format else "")
        dep.write_config(local_source={"formats": formats})
        target = os.path.join(dep.instances, "vm", "disk")
        try:
            disk = backends_base.load(dep.conf(), backend).create_image(
                image_id, target, 2 * fenv.GiB)
        except Exception as exc:   # compared below
            if entry.expected is None or not isinstance(exc,
                                                        entry.expected):
                failures.append((entry.name, "raised %r" % exc))
                continue
            assert image_id in str(exc), (entry.name, str(exc))
            if dep.base_listing():
                failures.append((entry.name, "left %s in _base"
                                 % dep.base_listing()))
            if os.path.lexists(target):
                failures.append((entry.name, "left the target"))
        else:
            if entry.expected is not None:
                failures.append((entry.name, "was accepted"))
                continue
            src_fmt = inspection.qemu_format(entry.expected_format)
            if not fenv.images_identical(entry.path, src_fmt, disk.path,
                                         disk.format):
                failures.append((entry.name, "disk differs from image"))
        if entry.marker:
            for path in _files_under(dep.instances):
                if _contains(path, entry.marker):
                    failures.append((entry.name, "canary in %s" % path))
    assert failures == []
