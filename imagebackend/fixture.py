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

"""A fixture for the unit tests of code that uses imagebackend.

In the spirit of oslo.concurrency's lock fixture: a compute driver's tests
get a real, private instances path (with its ``_base`` cache), a lock
directory and a local-directory image source holding the images they
give, so they make real disks with the real qemu-img in milliseconds and
leave nothing behind::

    from imagebackend import fixture as ib_fixture

    def test_spawn(self):
        images = self.useFixture(ib_fixture.ImageBackendFixture(
            images={"cirros.raw": b"...", "guest.qcow2": "/path/to/file"}))
        backend = images.load_backend()            # or load_backend("raw")
        disk = backend.create_image("cirros.raw",
                                    images.disk_path("vm1"), 1 << 30)

It is also a context manager (``with ImageBackendFixture(...) as ib:``).
With ``conf=`` it sets its options on the caller's ConfigOpts (the
service's own) and restores them at cleanup.  It needs the ``fixtures``
library, as every OpenStack project's test requirements have it.
"""

import os
import shutil

import fixtures
from oslo_config import cfg

from imagebackend.backends import base as backends_base
from imagebackend import opts


class ImageBackendFixture(fixtures.Fixture):
    """A temporary instances path, ``_base``, lock path and local image
    source, with a ready ``conf``.

    :param images: ``{image_id: data}`` where data is the image's bytes or
        the path of a file to copy; the image id is the file name in the
        source's directory (an extension such as ``.qcow2`` or ``.raw``
        declares its format, see ``[local_source] formats``).
    :param images_type: the default backend (``[imagebackend]
        images_type``).
    :param conf: a ConfigOpts to set up (parsed or not); by default a new
        one.  The options the fixture sets are overrides, cleared at
        cleanup (a value the caller had overridden itself is cleared too).
    :param overrides: more ``[imagebackend]`` options, by name (for
        example ``force_raw_images=False``).

    Attributes once set up: ``conf``, ``root`` (the temporary directory),
    ``instances_path``, ``base_dir``, ``lock_path``, ``images_path``.
    """

    def __init__(self, images: dict | None = None,
                 images_type: str = "qcow2",
                 conf: cfg.ConfigOpts | None = None, **overrides) -> None:
        super().__init__()
        self._images = dict(images or {})
        self._images_type = images_type
        self._conf = conf
        self._overrides = overrides

    def _setUp(self) -> None:
        self.root = self.useFixture(fixtures.TempDir()).path
        self.instances_path = os.path.join(self.root, "instances")
        self.lock_path = os.path.join(self.root, "locks")
        self.images_path = os.path.join(self.root, "images")
        os.mkdir(self.images_path)
        conf = self._conf
        if conf is None:
            conf = cfg.ConfigOpts()
            opts.register_opts(conf)
            conf([], project="imagebackend", default_config_files=[])
        else:
            opts.register_opts(conf)
        self._override(conf, opts.GROUP, instances_path=self.instances_path,
                       images_type=self._images_type, image_source="local",
                       **self._overrides)
        self._override(conf, "oslo_concurrency", lock_path=self.lock_path)
        self._override(conf, "local_source", path=self.images_path)
        self.conf = conf
        self.base_dir = os.path.join(self.instances_path,
                                     conf[opts.GROUP].base_dir_name)
        for image_id, data in self._images.items():
            self.add_image(image_id, data)

    def _override(self, conf, group, **values):
        # Overrides of our own, cleared again at cleanup: unlike
        # oslo.config's Config fixture (whose cleanup is conf.reset()),
        # this leaves the defaults and other overrides a service set on
        # its ConfigOpts as they were.
        for name, value in values.items():
            conf.set_override(name, value, group=group)
            self.addCleanup(conf.clear_override, name, group=group)

    def add_image(self, image_id: str, data) -> str:
        """Put an image into the source.

        :param data: the image's bytes, or the path of a file to copy.
        :returns: the image file's path.
        """
        path = os.path.join(self.images_path, image_id)
        if isinstance(data, (bytes, bytearray, memoryview)):
            with open(path, "wb") as f:
                f.write(data)
        else:
            shutil.copyfile(os.fspath(data), path)
        return path

    def disk_path(self, instance: str, name: str = "disk") -> str:
        """A path for an instance's disk under the instances path (the
        disk is not made).
        """
        return os.path.join(self.instances_path, instance, name)

    def load_backend(self, name: str | None = None,
                     **kwargs) -> backends_base.ImageBackend:
        """The backend named ``name`` (default: ``images_type``), as
        :func:`imagebackend.load_backend` builds it.
        """
        return backends_base.load(self.conf, name, **kwargs)
