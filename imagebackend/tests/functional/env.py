"""A throw-away imagebackend deployment for functional tests.

Real files in a temporary directory, the real qemu-img, and a ``qemu-img``
wrapper first on PATH that logs every invocation, so tests can count the
processes the library spawns.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

from imagebackend import opts

REAL_QEMU_IMG = shutil.which("qemu-img")
MiB = 1024 * 1024
GiB = 1024 * MiB


class Deployment:
    """Directories, config file and helpers under ``root``."""

    def __init__(self, root: str, **conf_overrides) -> None:
        self.root = root
        self.images = os.path.join(root, "images")
        self.instances = os.path.join(root, "instances")
        self.base_dir = os.path.join(self.instances, "_base")
        self.bin = os.path.join(root, "bin")
        self.qemu_log = os.path.join(root, "qemu-img.log")
        for d in (self.images, self.instances, self.bin):
            os.makedirs(d, exist_ok=True)
        self._write_wrapper()
        self.config_file = os.path.join(root, "imagebackend.conf")
        self.sections = {
            "imagebackend": {"instances_path": self.instances,
                             "image_source": "local"},
            "local_source": {"path": self.images},
            "qemu_img": {"binary": os.path.join(self.bin, "qemu-img")},
        }
        self.write_config(**conf_overrides)

    def _write_wrapper(self) -> None:
        wrapper = os.path.join(self.bin, "qemu-img")
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\nprintf '%%s\\n' \"$*\" >> '%s'\n"
                    "exec '%s' \"$@\"\n" % (self.qemu_log, REAL_QEMU_IMG))
        os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR)

    def env(self) -> dict:
        env = dict(os.environ)
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "")
        return env

    def write_config(self, **sections) -> None:
        """(Re)write the config file; ``sections`` add to or override
        what earlier calls wrote.
        """
        for section, items in sections.items():
            self.sections.setdefault(section, {}).update(items)
        with open(self.config_file, "w") as f:
            for section, items in self.sections.items():
                f.write("[%s]\n" % section)
                for key, value in items.items():
                    f.write("%s = %s\n" % (key, value))
                f.write("\n")

    def conf(self):
        return opts.new_conf(["--config-file", self.config_file])

    def qemu_calls(self) -> list[str]:
        try:
            with open(self.qemu_log) as f:
                return [line.rstrip("\n") for line in f]
        except FileNotFoundError:
            return []

    def reset_qemu_log(self) -> None:
        if os.path.exists(self.qemu_log):
            os.unlink(self.qemu_log)

    def base_listing(self) -> list[str]:
        """The files in ``_base``, without the cache's hidden bookkeeping
        directories (``.disks``, ``.sources``).
        """
        try:
            return sorted(n for n in os.listdir(self.base_dir)
                          if not n.startswith("."))
        except FileNotFoundError:
            return []

    def cli(self, *argv, check=True):
        """Run the command line in a child process."""
        return subprocess.run(
            [sys.executable, "-m", "imagebackend.cmd.main",
             "--config-file", self.config_file] + list(argv),
            env=self.env(), capture_output=True, text=True, check=check)

    def cli_json(self, *argv):
        return json.loads(self.cli(*argv, "-f", "json").stdout)


def write_pattern_raw(path: str, size: int, extents: int = 4,
                      extent_size: int = MiB, seed: int = 1) -> None:
    """A sparse raw file with ``extents`` blocks of recognisable data."""
    with open(path, "wb") as f:
        f.truncate(size)
        step = size // extents
        for i in range(extents):
            f.seek(i * step)
            block = (b"imagebackend seed %d extent %d " % (seed, i))
            f.write((block * (extent_size // len(block) + 1))[:extent_size])


def make_qcow2(path: str, size: int = 64 * MiB, seed: int = 1) -> str:
    raw = path + ".src.raw"
    write_pattern_raw(raw, size, seed=seed)
    subprocess.run([REAL_QEMU_IMG, "convert", "-q", "-f", "raw", "-O",
                    "qcow2", raw, path], check=True)
    os.unlink(raw)
    return path


def make_raw(path: str, size: int = 64 * MiB, seed: int = 2) -> str:
    write_pattern_raw(path, size, seed=seed)
    return path


def images_identical(a: str, a_fmt: str, b: str, b_fmt: str) -> bool:
    result = subprocess.run([REAL_QEMU_IMG, "compare", "-q", "-f", a_fmt,
                             "-F", b_fmt, a, b])
    return result.returncode == 0


def qemu_info(path: str, fmt: str) -> dict:
    out = subprocess.run([REAL_QEMU_IMG, "info", "-U", "--output", "json",
                          "-f", fmt, path], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)
