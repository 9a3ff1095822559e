"""Test doubles shared by the unit tests."""

import hashlib
import threading
from unittest import mock

import xxhash

from imagebackend import exception
from imagebackend import opts
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import results as qemu_results
from imagebackend.sources import base
from imagebackend.sources import local

MiB = 1024 * 1024


def qcow2_header(virtual_size: int) -> bytes:
    """The first bytes of a minimal, valid-looking qcow2 v3 image."""
    header = bytearray(512)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (3).to_bytes(4, "big")            # version
    header[20:24] = (16).to_bytes(4, "big")         # cluster_bits
    header[24:32] = virtual_size.to_bytes(8, "big")
    header[96:100] = (4).to_bytes(4, "big")         # refcount_order
    header[100:104] = (104).to_bytes(4, "big")      # header_length
    return bytes(header)


#: a small raw image with a run of zeros, and a qcow2 one (header only).
RAW_IMAGE = b"bootloader" + bytes(2 * MiB) + b"rootfs" * 1000
QCOW2_IMAGE = qcow2_header(8 * MiB) + bytes(256 * 1024)


def _converter(source, source_fmt, target, target_fmt, **kwargs):
    with open(target, "wb") as f:
        f.truncate(8 * MiB)


def qemu():
    """An autospec QemuImg whose convert writes an 8 MiB raw target."""
    q = mock.create_autospec(qemu_img.QemuImg, instance=True)
    q.convert.side_effect = _converter
    q.check.return_value = qemu_results.CheckResult(filename="", format="")
    return q


class FakeSource(base.ImageSource):
    """An in-memory source: ``images`` maps id -> bytes."""

    name = "fake"

    def __init__(self, conf, images=None, declared=None, checksums=None,
                 chunk=64 * 1024, truncate=None):
        super().__init__(conf)
        self.images = dict(images or {})
        self.declared = dict(declared or {})
        self.checksums = dict(checksums or {})
        self.chunk = chunk
        self.truncate = truncate
        self.opened = 0
        self._lock = threading.Lock()

    def get_meta(self, image_id):
        if image_id not in self.images:
            raise exception.ImageNotFound(image_id=image_id, source="fake")
        data = self.images[image_id]
        digest = self.checksums.get(image_id,
                                    hashlib.sha512(data).hexdigest())
        return base.ImageMeta(image_id=image_id, source="fake",
                              disk_format=self.declared.get(image_id),
                              size=len(data), hash_algo="sha512",
                              hash_value=digest, identity=digest)

    def open(self, meta):
        with self._lock:
            self.opened += 1
        data = self.images[meta.image_id]
        if self.truncate is not None:
            data = data[:self.truncate]
        for i in range(0, len(data), self.chunk):
            yield data[i:i + self.chunk]


def conf(tmp_path, **overrides):
    c = opts.new_conf([])
    c.set_override("instances_path", str(tmp_path / "instances"),
                   group="imagebackend")
    for key, value in overrides.items():
        c.set_override(key, value, group="imagebackend")
    return c


def local_source(tmp_path, c):
    """A LocalSource over a new ``tmp_path/images`` directory."""
    images = tmp_path / "images"
    images.mkdir()
    local.LocalSource.register_opts(c)
    c.set_override("path", str(images), group="local_source")
    return local.LocalSource(c)


def sparse_digest(data: bytes, scheme: str = "sparse-64k-xxh3") -> str:
    """The sparse digest of ``data`` (scheme ``sparse-64k-xxh3``, or
    ``sparse-64k``), spelled out as the definition says.
    """
    block = 64 * 1024
    h = (xxhash.xxh3_128() if scheme == "sparse-64k-xxh3"
         else hashlib.sha256())
    for offset in range(0, len(data), block):
        chunk = data[offset:offset + block]
        if chunk.count(0) != len(chunk):
            h.update(offset.to_bytes(8, "big") + chunk)
    return h.hexdigest()


def local_identity(data: bytes) -> str:
    """The identity the local source gives a file holding ``data``."""
    return "sparse-64k-xxh3:%d:%s" % (len(data), sparse_digest(data))
