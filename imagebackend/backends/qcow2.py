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

"""qcow2: a copy-on-write overlay over the cached base."""

import functools

from imagebackend.backends import base
from imagebackend.cache import templates as cache_templates


class Qcow2Backend(base.ImageBackend):
    """The instance disk is a qcow2 file whose backing file is
    ``_base/<cache_id>``; its virtual size is the requested size, so no
    base is ever grown.

    The overlay is a copy of a template that ``qemu-img create`` made
    once per base, size and options (see
    :mod:`imagebackend.cache.templates`): a warm create starts no process,
    and the disk is byte for byte what ``qemu-img create`` writes.
    """

    name = "qcow2"
    disk_format = "qcow2"

    #: ``-o`` options of the overlay's ``qemu-img create`` (none: the
    #: defaults); part of the template's key.
    overlay_options: dict = {}

    @functools.cached_property
    def templates(self) -> cache_templates.Templates:
        """The overlay templates of this backend's cache."""
        # The backend's qemu-img, made when a template is built: copying
        # one runs no qemu-img.
        return cache_templates.Templates(self.cache.store,
                                         make_qemu=lambda: self.qemu)

    def create_disk(self, base_path, base_format, target, size):
        self.templates.make_overlay(base_path, base_format, target, size,
                                    options=self.overlay_options or None)

    def copy_disk(self, base_path, base_format, fd, size):
        return self.templates.copy_overlay(
            base_path, base_format, fd, size,
            options=self.overlay_options or None)
