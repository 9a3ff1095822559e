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

"""raw: an independent sparse raw copy of the base, no backing file."""

import os

from imagebackend.backends import base


class RawBackend(base.ImageBackend):
    """The instance disk is a raw file with the base's data extents copied
    in (``copy_file_range``; holes stay holes) and grown to the requested
    size.  A raw base needs no qemu-img at all; a base kept in another
    format (``force_raw_images = false``) is converted.
    """

    name = "raw"
    disk_format = "raw"
    uses_backing_file = False

    def create_disk(self, base_path, base_format, target, size):
        if base_format != "raw":
            self.qemu.convert(base_path, base_format, target, "raw")
            self.qemu.resize(target, "raw", size)
            return
        # ``target`` is this call's own new, empty file (see the hook).
        fd = os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC)
        try:
            base.copy_sparse_grown(base_path, fd, size)
        finally:
            os.close(fd)
