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

"""Fixtures shared by the tests of the image cache."""

import pytest

from imagebackend import cache
from imagebackend.common import fileio
from tests import fakes


@pytest.fixture
def cache_images():
    """The images the fake source of :func:`make_cache` serves, by id (a
    test module overrides this fixture to serve others).
    """
    return {"img": fakes.RAW_IMAGE}


@pytest.fixture
def make_cache(tmp_path, cache_images):
    """A function making an :class:`imagebackend.cache.ImageCache` under
    ``tmp_path`` with a fake source and a fake qemu-img:
    ``make_cache(images=None, **conf_overrides)``.
    """
    def make(images=None, **overrides):
        conf = fakes.conf(tmp_path, **overrides)
        return cache.ImageCache(conf, fakes.FakeSource(
            conf, images=images or cache_images), fakes.qemu())
    return make


@pytest.fixture
def sized_record():
    """A function writing the record of the sized base at ``path`` of the
    base ``stem`` and image ``img``: ``sized_record(path, stem, size,
    fmt="raw", scheme="sparse-64k-xxh3", value=None, **fields)``, the
    digest by default the sparse digest of the file as it is now (computed
    by the tests' own reference, not the code under test); ``fields``
    replace any field.
    """
    def write(path, stem, size, /, fmt="raw", scheme="sparse-64k-xxh3",
              value=None, **fields):
        if value is None:
            with open(path, "rb") as f:
                value = fakes.sparse_digest(f.read(), scheme)
        record = {"kind": "sized", "image_id": "img", "base": stem,
                  "size": size, "format": fmt,
                  "digest": {"scheme": scheme, "value": value}}
        record.update(fields)
        fileio.write_json_atomic(path + ".json", record)
    return write
