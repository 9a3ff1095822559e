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

from imagebackend.backends import base


class Qcow2Backend(base.ImageBackend):
    """The instance disk is a qcow2 file whose backing file is
    ``_base/<cache_id>``; its virtual size is the requested size, so no
    base is ever grown.  One qemu-img process per disk.
    """

    name = "qcow2"
    disk_format = "qcow2"

    def create_disk(self, base_path, base_format, target, size):
        self.qemu.create(target, "qcow2", size, backing_file=base_path,
                         backing_fmt=base_format)
