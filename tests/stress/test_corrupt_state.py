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

"""Corrupted cache state: records missing, invalid, or replaced by
symlinks; the registry and source-memo directories and a base replaced by
symlinks.

In every case the base's bytes are also corrupted, so that trusting them
shows: a new disk must hold the image (the base re-verified against the
source, or fetched again) or the create must fail cleanly; ``cache
verify`` never calls corrupt bytes ``ok``; nothing is read or changed
through a symlink.
"""

import json
import os
import shutil
import socket

import pytest

from imagebackend.cache import verify as cache_verify
from imagebackend.common import digest as content_digest
from tests.stress import faults
from tests.stress import harness

MiB = harness.MiB
VIRTUAL = 16 * MiB
IMAGE = "img.qcow2"
RECORD_FAULTS = ("missing", "invalid-json", "not-an-object", "truncated",
                 "symlink-to-forged-record", "symlink-to-host-secret")


class _Cache:
    def __init__(self, root):
        self.dep = harness.Deployment(root)
        self.dep.write_config(image_cache=harness.AGES_ZERO)
        self.image = harness.write_image(
            os.path.join(self.dep.images, IMAGE), VIRTUAL, 6 * MiB, seed=9)
        self.outside = os.path.join(root, "outside")
        os.makedirs(self.outside)
        self.secret = os.path.join(self.outside, "secret")
        with open(self.secret, "w") as f:
            f.write('{"image_id": "%s", "secret": true}\n' % IMAGE)
        self.watch = faults.OpenWatch(self.secret)
        self.base = os.path.join(self.dep.base_dir,
                                 content_digest.cache_id(IMAGE))
        self.problems = harness.Problems("corrupted cache state")

    def disk(self, name):
        return os.path.join(self.dep.instances, name, "disk")

    def corrupt_base(self):
        """Flip bytes of the base's data, as bit rot or tampering would."""
        fd = os.open(self.base, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xa5" * 4096, 8192)
        finally:
            os.close(fd)

    def run(self, context, *argv):
        """Run the command line: success or a clean failure, never through
        the secret.
        """
        result = self.dep.cli(*argv, check=False)
        harness.STATS.add("corrupted cache state", "commands run")
        self.problems.extend(context, ["opened %s" % o
                                       for o in self.watch.opened()])
        if result.returncode != 0 and not (
                argv[:2] == ("cache", "verify") and result.returncode == 1
                and not result.stderr.strip()):
            self.problems.extend(context, harness.clean_error_problems(
                result))
        return result

    def verify_never_trusts_corrupt_bytes(self, context):
        result = self.run(context, "cache", "verify", "-f", "json")
        try:
            rows = json.loads(result.stdout) if result.returncode in (0, 1) \
                and result.stdout.strip() else []
        except ValueError:
            rows = []
            self.problems.extend(context, ["not JSON: %r"
                                           % result.stdout[:200]])
        for row in rows:
            if row["status"] == "ok" and row["file"] and not \
                    harness.same_content(row["file"], "raw", self.image,
                                         "qcow2"):
                self.problems.extend(context, [
                    "%s is reported ok but does not hold the image"
                    % row["file"]])

    def create_serves_the_image(self, context, name):
        target = self.disk(name)
        result = self.run(context, "disk", "create", IMAGE, target,
                          "--size", VIRTUAL)
        if result.returncode == 0:
            if self.problems.extend(context, harness.disk_problems(
                    target, "qcow2", self.image)):
                harness.STATS.add("corrupted cache state",
                                  "creates that served the image")
            else:
                harness.STATS.add("corrupted cache state",
                                  "creates that served corrupt bytes")
        elif os.path.lexists(target):
            self.problems.extend(context, ["the failed create left TARGET"])
        return result.returncode == 0


@pytest.fixture
def state(tmp_path):
    s = _Cache(str(tmp_path))
    yield s
    s.watch.close()


@pytest.mark.parametrize("fault", RECORD_FAULTS)
def test_a_base_without_a_valid_record_is_never_served_unverified(state,
                                                                  fault):
    dep = state.dep
    first = state.disk("vm1")
    dep.create(IMAGE, first, VIRTUAL)
    record_path = state.base + ".json"
    with open(record_path) as f:
        record = json.load(f)
    state.corrupt_base()
    forged = os.path.join(state.outside, "forged.json")
    if fault == "missing":
        os.unlink(record_path)
    elif fault == "invalid-json":
        with open(record_path, "w") as f:
            f.write('{"image_id": "%s", "format": "raw",' % IMAGE)
    elif fault == "not-an-object":
        with open(record_path, "w") as f:
            json.dump([record], f)
    elif fault == "truncated":
        os.truncate(record_path, 0)
    elif fault == "symlink-to-forged-record":
        # What a writer outside _base would plant: the record, with the
        # corrupt bytes' digest, so that following it trusts them.
        forged_record = dict(record, base_checksum=cache_verify.sparse_digest(
            state.base))
        with open(forged, "w") as f:
            json.dump(forged_record, f)
        os.unlink(record_path)
        os.symlink(forged, record_path)
    elif fault == "symlink-to-host-secret":
        os.unlink(record_path)
        os.symlink(state.secret, record_path)
    harness.STATS.add("faults injected", "record " + fault)
    kept = {p: open(p, "rb").read() for p in (forged, state.secret)
            if os.path.exists(p)}
    state.watch.opened()

    state.verify_never_trusts_corrupt_bytes("verify with the record " + fault)
    state.create_serves_the_image("create with the record " + fault, "vm2")
    state.verify_never_trusts_corrupt_bytes("verify after the create")
    state.run("cache prune", "cache", "prune")
    info = harness.qemu_img("info", "-U", "--backing-chain", "-f",
                            "qcow2", first)
    state.problems.extend("after prune", [
        "the first disk lost its base: " + info.stderr.strip()]
        if info.returncode else [])
    second = state.disk("vm2")
    if os.path.exists(second):
        state.problems.extend("after prune", harness.disk_problems(
            second, "qcow2", state.image))
    state.problems.extend("outside _base", [
        "%s was changed" % p for p, data in kept.items()
        if not os.path.exists(p) or open(p, "rb").read() != data])
    state.problems.check()


def _tree(top):
    found = {}
    for directory, _, files in os.walk(top):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, top)] = f.read()
    return found


def test_bookkeeping_directories_replaced_by_symlinks(state):
    """``_base/.disks`` and ``_base/.sources`` replaced by symlinks to
    directories outside, holding records a writer planted there: nothing
    is written, removed or believed through them.
    """
    dep = state.dep
    first = state.disk("vm1")
    dep.create(IMAGE, first, VIRTUAL)
    other = "other.qcow2"
    harness.write_image(os.path.join(dep.images, other), VIRTUAL, 2 * MiB,
                        seed=10)
    dep.prefetch(other)
    other_base = os.path.join(dep.base_dir, content_digest.cache_id(other))
    victim = os.path.join(state.outside, "victim")
    # A record of this host for a disk that is gone (a pruner following
    # the link would delete it), and one of another host "using" the
    # other image's base (a pruner following it would keep that base).
    for cid, record in (
            (content_digest.cache_id(IMAGE),
             {"disk": "/nonexistent/disk", "host": socket.gethostname(),
              "base": state.base, "image_id": IMAGE}),
            (content_digest.cache_id(other),
             {"disk": "/elsewhere/disk", "host": "another-host",
              "base": other_base, "image_id": other})):
        os.makedirs(os.path.join(victim, cid))
        with open(os.path.join(victim, cid, "planted.json"), "w") as f:
            json.dump(record, f)
    sources_victim = os.path.join(state.outside, "sources-victim")
    os.makedirs(sources_victim)
    for name, target in ((".disks", victim), (".sources", sources_victim)):
        path = os.path.join(dep.base_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.symlink(target, path)
        harness.STATS.add("faults injected", name + " replaced by a symlink")
    before = {d: _tree(d) for d in (victim, sources_victim)}

    second = state.disk("vm2")
    state.run("create", "disk", "create", IMAGE, second, "--size", VIRTUAL)
    third = state.disk("vm3")
    state.run("create (new image)", "disk", "create", other, third,
              "--size", VIRTUAL, "--backend", "raw")
    state.run("verify", "cache", "verify")
    state.run("list", "cache", "list")
    pruned = state.run("prune", "cache", "prune", "-f", "json")
    state.run("invalidate", "cache", "invalidate", IMAGE)
    for directory, tree in before.items():
        if _tree(directory) != tree:
            state.problems.extend("through the symlink", [
                "%s was changed: %s -> %s" % (directory, sorted(tree),
                                              sorted(_tree(directory)))])
    if pruned.returncode == 0 and os.path.exists(other_base):
        state.problems.extend("prune", [
            "the unused base %s was kept on a record read through the "
            "symlink" % other_base])
    for disk in (first, second):
        if os.path.exists(disk):
            state.problems.extend("after prune", harness.disk_problems(
                disk, "qcow2", state.image))
    state.problems.check()


def test_a_base_replaced_by_a_symlink_is_never_followed(state):
    dep = state.dep
    dep.prefetch(IMAGE)
    os.unlink(state.base)
    os.symlink(state.secret, state.base)
    harness.STATS.add("faults injected", "base replaced by a symlink")
    before = open(state.secret, "rb").read()
    state.watch.opened()
    state.create_serves_the_image("create over a symlinked base", "vm1")
    state.verify_never_trusts_corrupt_bytes("verify")
    state.run("prune", "cache", "prune")
    state.run("invalidate", "cache", "invalidate", IMAGE)
    state.problems.extend("outside _base", [
        "the symlink's target was changed"]
        if open(state.secret, "rb").read() != before else [])
    state.problems.check()


def _stats(top):
    """Identity, size and (but for records, whose modification time is the
    cache's last-used time) modification time of every file under ``top``.
    """
    found = {}
    for directory, _, files in os.walk(top):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            found[os.path.join(directory, name)] = (
                st.st_ino, st.st_size,
                None if name.endswith(".json") else st.st_mtime_ns)
    return found


def test_nothing_but_the_cache_writes_in_base(state):
    """``_base`` paths given to the front door -- a create's TARGET, an
    extract's OUTPUT, the PATH of resize and snapshot -- are refused, and
    nothing already in ``_base`` changes.
    """
    dep = state.dep
    first = state.disk("vm1")
    dep.create(IMAGE, first, VIRTUAL)
    other = "other.qcow2"
    harness.write_image(os.path.join(dep.images, other), VIRTUAL, 2 * MiB,
                        seed=12)
    planted = os.path.join(dep.base_dir, content_digest.cache_id(other))
    attempts = [
        ("disk create under another image's final name",
         ("disk", "create", other, planted, "--size", VIRTUAL), planted),
        ("disk create in _base", ("disk", "create", IMAGE,
                                  os.path.join(dep.base_dir, "disk"),
                                  "--size", VIRTUAL),
         os.path.join(dep.base_dir, "disk")),
        ("disk extract into _base", ("disk", "extract", first, planted,
                                     "-O", "raw"), planted),
        ("disk resize of a base", ("disk", "resize", state.base,
                                   2 * VIRTUAL, "--input-format", "raw"),
         None),
        ("disk snapshot of a base", ("disk", "snapshot", "create",
                                     state.base, "s1"), None),
    ]
    for context, argv, made in attempts:
        before = _stats(dep.base_dir)
        result = dep.cli(*argv, check=False)
        harness.STATS.add("faults injected", "front door into _base")
        state.problems.extend(context, harness.clean_error_problems(result))
        if made is not None and os.path.lexists(made):
            state.problems.extend(context, ["%s was written" % made])
            os.unlink(made)
        after = _stats(dep.base_dir)
        state.problems.extend(context, [
            "%s changed" % path for path, st in before.items()
            if after.get(path) != st])
    state.problems.extend("at the end", harness.disk_problems(
        first, "qcow2", state.image))
    state.problems.check()
