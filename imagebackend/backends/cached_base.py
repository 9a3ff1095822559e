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

"""cached-base: a qcow2 overlay over a shared base grown to the disk size.

The sized base ``_base/<cache_id>_<size>`` (``<size>`` in bytes, decimal)
is made once per image and size, under its own lock, and shared by every
disk of that size; the overlay then has the same virtual size as its
backing file, as some tools expect.  The overlay itself is copied from a
template of the sized base, as the qcow2 backend's is (see
:mod:`imagebackend.cache.templates`).
"""

import os

from imagebackend.backends import base
from imagebackend.backends import qcow2
from imagebackend.common import sparseio


class CachedBaseBackend(qcow2.Qcow2Backend):
    """Disks are qcow2 overlays over ``_base/<cache_id>_<size>``; a
    request for the image's own size uses the base itself.
    """

    name = "cached-base"

    def prepare_base(self, entry, size):
        if entry.virtual_size == size:
            return entry.path, entry.format
        sized = self.cache.sized_path(entry.cache_id, size)

        def build(fd, tmp):
            if entry.format == "raw":
                base.copy_sparse_grown(entry.path, fd, size)
            else:
                sparseio.sparse_copy(entry.path, fd)
                self.qemu.resize(tmp, entry.format, size)

        self.cache.publish_derived(sized, os.path.basename(sized), build)
        return sized, entry.format
