#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""Hostile bytes: qcow2 headers written by a guest into its raw disk, and
into a raw base (a snapshot of such a disk, uploaded as an image).

The headers name a host secret, a base in ``_base``, a special file and a
symlink.  ``disk info/check/extract/rebase/resize`` and ``cache
prune/verify`` must never open the secret (watched with inotify, whoever
opens it), never copy its bytes out, and the headers must neither pin a
base nor stop pruning.
"""

import json
import os
import subprocess

import pytest

from imagebackend.common import digest as content_digest
from tests.stress import faults
from tests.stress import harness

MiB = harness.MiB
VIRTUAL = 16 * MiB
MARKER = b"HOST-SECRET-"


def header(tmp, backing):
    """The first bytes of a real qcow2 file whose backing file is
    ``backing`` (format raw): what a guest would write to fool a reader
    that guesses formats.
    """
    path = os.path.join(tmp, "header-%d.qcow2" % abs(hash(backing)))
    subprocess.run([harness.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u",
                    "-b", backing, "-F", "raw", path, "1M"], check=True)
    with open(path, "rb") as f:
        return f.read()


class _Host:
    """A deployment with a host secret, benign images and a hostile one."""

    def __init__(self, root):
        self.dep = harness.Deployment(root)
        self.dep.write_config(image_cache=harness.AGES_ZERO)
        secret_dir = os.path.join(root, "host")
        os.makedirs(secret_dir)
        self.secret = os.path.join(secret_dir, "secret.img")
        with open(self.secret, "wb") as f:
            f.write((MARKER + b"do not read\n") * 65536)
        self.watch = faults.OpenWatch(self.secret)
        self.problems = harness.Problems("hostile bytes")
        self.tmp = os.path.join(root, "tmp")
        os.makedirs(self.tmp)

    def image(self, name, seed, head=b""):
        path = os.path.join(self.dep.images, name)
        return harness.write_image(path, VIRTUAL, 4 * MiB, seed=seed,
                                   head=head)

    def base(self, image_id):
        return os.path.join(self.dep.base_dir,
                            content_digest.cache_id(image_id))

    def run(self, context, *argv, expect_ok=False):
        """Run the command line; it may succeed or fail cleanly, and must
        not open the secret.

        :returns: the parsed JSON output, or None if it failed.
        """
        result = self.dep.cli(*argv, "-f", "json", check=False)
        harness.STATS.add("hostile bytes", "commands run on hostile bytes")
        opened = self.watch.opened()
        self.problems.extend(context, ["opened the host secret: %s" % o
                                       for o in opened])
        if MARKER.decode() in result.stdout:
            self.problems.extend(context, ["printed the host secret"])
        if result.returncode == 0:
            return json.loads(result.stdout) if result.stdout.strip() \
                else {}
        if expect_ok:
            self.problems.extend(context, ["failed: %s"
                                           % result.stderr.strip()])
        else:
            self.problems.extend(context, harness.clean_error_problems(
                result))
        return None

    def no_secret_in(self, context, path):
        if os.path.exists(path):
            with open(path, "rb") as f:
                if MARKER in f.read():
                    self.problems.extend(context, [
                        "%s holds the host secret's bytes" % path])


@pytest.fixture
def host(tmp_path):
    h = _Host(str(tmp_path))
    yield h
    h.watch.close()


def test_raw_base_with_a_guest_written_qcow2_header(host):
    dep = host.dep
    hostile = host.image("snapshot.qcow2", 1,
                         head=header(host.tmp, host.secret))
    benign = host.image("benign.qcow2", 2)
    disk = os.path.join(dep.instances, "vm-h", "disk")
    other = os.path.join(dep.instances, "vm-b", "disk")
    dep.cli("disk", "create", "snapshot.qcow2", disk, "--size", VIRTUAL)
    dep.cli("disk", "create", "benign.qcow2", other, "--size", VIRTUAL)
    sized = os.path.join(dep.instances, "vm-s", "disk")
    dep.cli("disk", "create", "snapshot.qcow2", sized, "--size",
            2 * VIRTUAL, "--backend", "cached-base")
    host.watch.opened()
    base = host.base("snapshot.qcow2")

    for path in (disk, sized):
        info = host.run("disk info " + path, "disk", "info", path,
                        expect_ok=True)
        if info is not None:
            formats = [link["format"] for link in info["backing_chain"]]
            host.problems.extend("disk info " + path, [
                "the chain was read as %s, not ending in the raw base"
                % formats] if formats[-1:] != ["raw"] else [])
        host.run("disk check " + path, "disk", "check", path,
                 expect_ok=True)
        out = os.path.join(host.tmp, os.path.basename(os.path.dirname(path))
                           + ".raw")
        if host.run("disk extract " + path, "disk", "extract", path, out,
                    "-O", "raw", expect_ok=True) is not None:
            host.no_secret_in("disk extract " + path, out)
            if not harness.same_content(hostile, "qcow2", out, "raw"):
                host.problems.extend("disk extract " + path, [
                    "the extracted image is not the guest's content"])

    # Rebase a disk onto the hostile raw base: its format is the record's.
    info = host.run("disk rebase onto a raw base", "disk", "rebase", other,
                    base)
    if info is not None:
        formats = [link["format"] for link in info["backing_chain"]]
        host.problems.extend("disk rebase", [
            "the new backing file was recorded as %s, not raw (its record)"
            % formats[0]] if formats[:1] != ["raw"] else [])
        out = os.path.join(host.tmp, "rebased.raw")
        if host.run("disk extract after rebase", "disk", "extract", other,
                    out, "-O", "raw") is not None:
            host.no_secret_in("disk extract after rebase", out)
            if not harness.same_content(benign, "qcow2", out, "raw"):
                host.problems.extend("disk rebase", [
                    "the guest's content changed in a safe rebase"])
    host.run("cache verify", "cache", "verify", expect_ok=True)
    host.run("cache prune", "cache", "prune", expect_ok=True)
    host.problems.extend("cache prune", harness.disk_problems(
        disk, "qcow2", hostile))
    host.problems.check()


def test_raw_disk_with_a_guest_written_qcow2_header(host):
    dep = host.dep
    host.image("benign.qcow2", 3)
    disk = os.path.join(dep.instances, "vm-r", "disk")
    dep.cli("disk", "create", "benign.qcow2", disk, "--size", VIRTUAL,
            "--backend", "raw")
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, header(host.tmp, host.secret), 0)
    finally:
        os.close(fd)
    guest_view = os.path.join(host.tmp, "guest-view.raw")
    subprocess.run(["cp", "--sparse=always", disk, guest_view], check=True)
    host.watch.opened()

    info = host.run("disk info", "disk", "info", disk)
    if info is not None and info["format"] != "raw":
        host.problems.extend("disk info", [
            "a raw disk the library made was shown as %s" % info["format"]])
    host.run("disk check", "disk", "check", disk)
    host.run("disk snapshot list", "disk", "snapshot", "list", disk)
    out = os.path.join(host.tmp, "extracted.raw")
    if host.run("disk extract", "disk", "extract", disk, out, "-O",
                "raw") is not None:
        host.no_secret_in("disk extract", out)
        if not harness.same_content(guest_view, "raw", out, "raw"):
            host.problems.extend("disk extract", [
                "the extracted image is not the guest's raw content"])
    host.run("disk resize", "disk", "resize", disk, 2 * VIRTUAL)
    if os.path.getsize(disk) not in (VIRTUAL, 2 * VIRTUAL) or \
            not harness.same_content(guest_view, "raw", disk, "raw"):
        host.problems.extend("disk resize", [
            "the raw disk's content or size was changed through the "
            "guest's header"])
    # Told the format, every command works on the same disk.
    info = host.run("disk info --input-format raw", "disk", "info", disk,
                    "--input-format", "raw", expect_ok=True)
    if info is not None and info["format"] != "raw":
        host.problems.extend("disk info --input-format raw", [
            "shown as %s" % info["format"]])
    host.run("cache prune", "cache", "prune", expect_ok=True)
    host.problems.check()


def test_guest_headers_never_pin_bases_or_stop_pruning(host):
    """Raw disks whose guests wrote headers naming an unused base, a
    special file, a symlink and the secret; and a raw base whose header
    names another base.  Prune (every unused base is old enough) must
    remove exactly the unused bases.
    """
    dep = host.dep
    for name, seed in (("x.qcow2", 4), ("y.qcow2", 5)):
        host.image(name, seed)
    dep.cli("cache", "prefetch", "x.qcow2")
    x_base = host.base("x.qcow2")
    host.image("pin.qcow2", 6, head=header(host.tmp, x_base))
    used = os.path.join(dep.instances, "vm-used", "disk")
    dep.cli("disk", "create", "pin.qcow2", used, "--size", VIRTUAL)
    link = os.path.join(dep.instances, "link-to-disk")
    os.symlink(used, link)
    names = {"base": x_base, "special": "/proc/self/mem", "symlink": link,
             "secret": host.secret}
    for what, backing in names.items():
        disk = os.path.join(dep.instances, "vm-" + what, "disk")
        dep.cli("disk", "create", "y.qcow2", disk, "--size", VIRTUAL,
                "--backend", "raw")
        fd = os.open(disk, os.O_WRONLY)
        try:
            os.pwrite(fd, header(host.tmp, backing), 0)
        finally:
            os.close(fd)
        harness.STATS.add("hostile bytes", "guest headers planted")
    host.watch.opened()
    pin_base = host.base("pin.qcow2")
    report = host.run("cache prune", "cache", "prune", expect_ok=True)
    if report is not None:
        removed = {r["file"] for r in report["removed"]}
        host.problems.extend("cache prune", [
            "%s was kept: %s" % (path, [k["reason"] for k in report["kept"]
                                        if k["file"] == path])
            for path in (x_base, host.base("y.qcow2")) if path not in removed
        ] + ["%s, used by a disk, was removed" % pin_base
             for _ in [1] if pin_base in removed])
    host.problems.extend("after prune", harness.disk_problems(
        used, "qcow2", os.path.join(dep.images, "pin.qcow2")))
    host.problems.check()
