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
