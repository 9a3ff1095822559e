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

"""Test doubles shared by the unit tests."""

import hashlib
import json
import os
import threading
import time
from unittest import mock

from oslo_concurrency import processutils
import xxhash

from imagebackend.cache import layout as cache_layout
from imagebackend import exception
from imagebackend import opts
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import results as qemu_results
from imagebackend.qemu import runner
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
    """An in-memory source: ``images`` maps id -> bytes.

    It keeps the source contract (tests/contract/source.py runs against
    it as against the real sources): ids are checked first, an unknown
    image is ImageNotFound, the recorded sha512 is of the bytes served.

    :param declared: id -> the disk format the source declares.
    :param checksums: id -> a sha512 to record instead of the true one.
    :param truncate: serve only this many bytes of every image.
    :param delay: seconds to wait before each chunk (a slow network).
    :attr opened: how many downloads were started.
    """

    name = "fake"

    def __init__(self, conf, images=None, declared=None, checksums=None,
                 chunk=64 * 1024, truncate=None, delay=0.0):
        super().__init__(conf)
        self.images = dict(images or {})
        self.declared = dict(declared or {})
        self.checksums = dict(checksums or {})
        self.chunk = chunk
        self.truncate = truncate
        self.delay = delay
        self.opened = 0
        self._lock = threading.Lock()

    def _data(self, image_id):
        self.check_id(image_id)
        try:
            return self.images[image_id]
        except KeyError:
            raise exception.ImageNotFound(image_id=image_id,
                                          source=self.describe()) from None

    def get_meta(self, image_id):
        data = self._data(image_id)
        digest = self.checksums.get(image_id,
                                    hashlib.sha512(data).hexdigest())
        return base.ImageMeta(image_id=image_id, source=self.describe(),
                              disk_format=self.declared.get(image_id),
                              size=len(data), hash_algo="sha512",
                              hash_value=digest, identity=digest)

    def open(self, meta):
        data = self._data(meta.image_id)
        with self._lock:
            self.opened += 1
        if self.truncate is not None:
            data = data[:self.truncate]
        return self._chunks(data)

    def _chunks(self, data):
        for i in range(0, len(data), self.chunk):
            if self.delay:
                time.sleep(self.delay)
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
    """The sparse digest of ``data`` (scheme ``sparse-64k-xxh3``,
    ``sparse-64k-xxh3-padded`` or ``sparse-64k``), spelled out as the
    definition says.
    """
    block = 64 * 1024
    h = hashlib.sha256() if scheme == "sparse-64k" else xxhash.xxh3_128()
    for offset in range(0, len(data), block):
        chunk = data[offset:offset + block]
        if chunk.count(0) != len(chunk):
            if scheme == "sparse-64k-xxh3-padded":
                chunk = chunk.ljust(block, b"\0")
            h.update(offset.to_bytes(8, "big") + chunk)
    return h.hexdigest()


def open_scratch(directory, name: str, data: bytes) -> tuple[str, int]:
    """A new file ``name`` in ``directory`` holding ``data``: its path and
    a read-only descriptor of it (the caller closes it).
    """
    path = os.path.join(str(directory), name)
    with open(path, "wb") as f:
        f.write(data)
    return path, os.open(path, os.O_RDONLY)


def scratch_base(c, data: bytes) -> tuple[str, int]:
    """A scratch file in the ``_base`` of image cache ``c`` holding
    ``data``, as a fetch leaves one to publish (see :func:`open_scratch`).
    """
    c.store.ensure_dirs()
    path = cache_layout.scratch_name(c.base_path("s"), ".part")
    return open_scratch(os.path.dirname(path), os.path.basename(path), data)


def flip_byte(path, offset: int) -> bytes:
    """Change the byte at ``offset`` of file ``path``; returns what it
    was, for :func:`put_byte`.
    """
    with open(path, "r+b") as f:
        f.seek(offset)
        before = f.read(1)
        f.seek(offset)
        f.write(b"\x01" if before != b"\x01" else b"\x02")
    return before


def put_byte(path, offset: int, byte: bytes) -> None:
    """Write ``byte`` back at ``offset`` of file ``path``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte)


def local_identity(data: bytes) -> str:
    """The identity the local source gives a file holding ``data``."""
    return "sparse-64k-xxh3:%d:%s" % (len(data), sparse_digest(data))


# -- a model of qemu-img at the runner boundary ------------------------------

#: where the guest data of a qcow2 file made by :class:`FakeQemuRunner`
#: starts (its first cluster holds the header); a shorter file has none.
FAKE_QCOW2_DATA = 64 * 1024
_BACKING_NAME_AT = 256
_EXT_BACKING_FORMAT = 0xE2792ACA


def fake_qcow2(virtual_size: int, data: bytes = b"",
               backing_file: str | None = None,
               backing_fmt: str | None = None) -> bytes:
    """A qcow2 file as :class:`FakeQemuRunner` reads and writes it: a
    valid-looking header (virtual size, backing file name and format where
    qemu keeps them), and the guest's first ``len(data)`` bytes stored
    flat from :data:`FAKE_QCOW2_DATA` (a model, not qcow2's clusters).
    """
    header = bytearray(qcow2_header(virtual_size))
    if backing_file is not None:
        name = backing_file.encode()
        header[8:16] = _BACKING_NAME_AT.to_bytes(8, "big")
        header[16:20] = len(name).to_bytes(4, "big")
        fmt = (backing_fmt or "").encode()
        padded = fmt.ljust(-(-len(fmt) // 8) * 8, b"\0")
        ext = (_EXT_BACKING_FORMAT.to_bytes(4, "big")
               + len(fmt).to_bytes(4, "big") + padded)
        header[104:104 + len(ext) + 8] = ext + bytes(8)
        header[_BACKING_NAME_AT:_BACKING_NAME_AT + len(name)] = name
    if data:
        header = header.ljust(FAKE_QCOW2_DATA, b"\0") + data
    return bytes(header)


def _read_qcow2(blob: bytes) -> tuple[int, str | None, str | None, bytes]:
    """(virtual size, backing file, backing format, stored data) of a
    file :func:`fake_qcow2` made.
    """
    if blob[:4] != b"QFI\xfb":
        raise ValueError("not a qcow2 file")
    vsize = int.from_bytes(blob[24:32], "big")
    offset = int.from_bytes(blob[8:16], "big")
    length = int.from_bytes(blob[16:20], "big")
    backing = fmt = None
    if offset:
        backing = blob[offset:offset + length].decode()
        if int.from_bytes(blob[104:108], "big") == _EXT_BACKING_FORMAT:
            fmt_len = int.from_bytes(blob[108:112], "big")
            fmt = blob[112:112 + fmt_len].decode()
    return vsize, backing, fmt, blob[FAKE_QCOW2_DATA:]


class FakeQemuRunner:
    """Stands in for :class:`imagebackend.qemu.runner.Runner` under a real
    :class:`imagebackend.qemu.img.QemuImg`: it carries out the qemu-img
    commands the pipeline runs (``check``, ``info``, ``convert``,
    ``create``, ``resize``) on the files themselves, raw files as they
    are and qcow2 files as :func:`fake_qcow2` models them, so a unit test
    gets real files whose guest content :meth:`guest_bytes` reads back.

    :attr calls: every command run, as the functional tests' qemu-img
        wrapper logs it (the arguments after the program, space-joined).
    :attr fail: sub-command -> stderr: that command writes a few bytes to
        its output file, then fails with exit code 1 (as a full disk
        would).
    """

    _VALUED = {"-f", "-O", "-t", "-T", "-o", "-S", "-m", "-r", "-F", "-b",
               "-B", "-l", "-s"}

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- the Runner interface ----------------------------------------------

    def execute(self, argv, *, ok_codes=(0,), preexec_fn=None):
        return self._run(argv, None, ok_codes)

    def stream(self, argv, on_output, cancel=None, *, ok_codes=(0,),
               preexec_fn=None):
        if cancel is not None and cancel.is_set():
            return runner.ProcessResult(-1, "", "", cancelled=True)
        return self._run(argv, on_output, ok_codes)

    # -- reading what it made ----------------------------------------------

    def guest_bytes(self, path: str, fmt: str) -> bytes:
        """The guest-visible content of image ``path`` (all of its
        virtual size, backing files read through).
        """
        with open(path, "rb") as f:
            blob = f.read()
        if fmt == "raw":
            return blob
        vsize, backing, backing_fmt, data = _read_qcow2(blob)
        if not data and backing:
            data = self.guest_bytes(backing, backing_fmt)
        return data[:vsize].ljust(vsize, b"\0")

    def info(self, path: str, fmt: str) -> dict:
        """What ``qemu-img info --output=json`` says of ``path``."""
        info = {"filename": path, "format": fmt,
                "actual-size": os.stat(path).st_blocks * 512}
        if fmt == "raw":
            info["virtual-size"] = os.path.getsize(path)
            return info
        with open(path, "rb") as f:
            vsize, backing, backing_fmt, _data = _read_qcow2(f.read())
        info["virtual-size"] = vsize
        if backing:
            info["backing-filename"] = backing
            info["backing-filename-format"] = backing_fmt
        return info

    # -- the commands ------------------------------------------------------

    def _run(self, argv, on_output, ok_codes):
        args = [str(a) for a in argv[1:]]
        with self._lock:
            self.calls.append(" ".join(args))
        command, flags, paths = args[0], {}, []
        rest = iter(args[1:])
        for arg in rest:
            if arg in self._VALUED:
                flags[arg] = next(rest)
            elif arg.startswith("-"):
                flags[arg] = True
            else:
                paths.append(arg)
        handler = getattr(self, "_cmd_" + command, None)
        if handler is None:
            raise processutils.ProcessExecutionError(
                exit_code=1, cmd=" ".join(argv),
                stderr="the fake qemu-img does not model %r" % command)
        if command in self.fail:
            with open(paths[-1] if command != "create" else paths[0],
                      "wb") as f:
                f.write(b"half")
            raise processutils.ProcessExecutionError(
                exit_code=1, cmd=" ".join(argv), stderr=self.fail[command])
        stdout, code = handler(flags, paths, on_output)
        if code not in ok_codes:
            raise processutils.ProcessExecutionError(
                exit_code=code, cmd=" ".join(argv), stdout=stdout)
        return runner.ProcessResult(code, stdout, "")

    def _cmd_check(self, flags, paths, on_output):
        fmt, path = flags["-f"], paths[0]
        if fmt == "raw":
            return "", 63
        with open(path, "rb") as f:
            _read_qcow2(f.read(512))
        return json.dumps({"filename": path, "format": fmt,
                           "check-errors": 0, "corruptions": 0,
                           "leaks": 0, "image-end-offset":
                           os.path.getsize(path)}), 0

    def _cmd_info(self, flags, paths, on_output):
        return json.dumps(self.info(paths[0], flags["-f"])), 0

    def _cmd_convert(self, flags, paths, on_output):
        source, target = paths
        data = self.guest_bytes(source, flags["-f"])
        if "-p" in flags and on_output is not None:
            for percent in (0, 50, 100):
                on_output("    (%d.00/100%%)\r" % percent)
        self._write(target, flags["-O"], len(data), data)
        return "", 0

    def _cmd_create(self, flags, paths, on_output):
        options = dict(item.split("=", 1)
                       for item in flags.get("-o", "").split(",") if item)
        path = paths[0]
        backing = options.get("backing_file")
        size = int(paths[1]) if len(paths) > 1 else self.info(
            backing, options["backing_fmt"])["virtual-size"]
        if flags["-f"] == "raw":
            self._write(path, "raw", size, b"")
            return "", 0
        with open(path, "wb") as f:
            f.write(fake_qcow2(size, backing_file=backing,
                               backing_fmt=options.get("backing_fmt")))
        return "", 0

    def _cmd_resize(self, flags, paths, on_output):
        path, size = paths[0], int(paths[1])
        current = self.info(path, flags["-f"])["virtual-size"]
        if size < current and "--shrink" not in flags:
            return "", 1
        if flags["-f"] == "raw":
            os.truncate(path, size)
            return "", 0
        with open(path, "r+b") as f:
            f.seek(24)
            f.write(size.to_bytes(8, "big"))
        return "", 0

    @staticmethod
    def _write(path, fmt, size, data):
        """Write an image of ``size`` guest bytes, ``data`` first; a raw
        file keeps its runs of zeros as holes.
        """
        with open(path, "wb") as f:
            if fmt != "raw":
                f.write(fake_qcow2(size, data.rstrip(b"\0")))
                return
            block = 64 * 1024
            for offset in range(0, len(data), block):
                chunk = data[offset:offset + block]
                if chunk.count(0) != len(chunk):
                    f.seek(offset)
                    f.write(chunk)
            f.truncate(size)


def fake_qemu(conf=None, fake: FakeQemuRunner | None = None
              ) -> tuple[qemu_img.QemuImg, FakeQemuRunner]:
    """A real QemuImg over ``fake`` (default: a new
    :class:`FakeQemuRunner`), and the runner.
    """
    fake = fake or FakeQemuRunner()
    return qemu_img.QemuImg(conf, execute=fake), fake
