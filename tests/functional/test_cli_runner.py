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

"""The forked command line of the tests (fixtures/cli_runner.py) answers
exactly as the real one: same output, same exit status, same qemu-img
processes.
"""

import json
import os
import re

import pytest

from tests.functional.fixtures import env as fenv


@pytest.fixture
def deps(tmp_path):
    """Two identical deployments: one for each way of running."""
    made = []
    for name in ("forked", "real"):
        d = fenv.Deployment(str(tmp_path / name), real_cli=name == "real")
        fenv.make_qcow2(os.path.join(d.images, "guest.qcow2"))
        made.append(d)
    return made


def _answers(dep):
    target = os.path.join(dep.instances, "vm", "disk")
    steps = [
        ("disk", "create", "guest.qcow2", target, "--size", "1G"),
        ("cache", "list", "-f", "json"),
        # a failure: one line on stderr, exit status 1
        ("disk", "create", "missing.qcow2", target + "2", "--size", "1G"),
        # refused by the parser: usage, exit status 2
        ("disk", "create", "guest.qcow2", target + "3", "--size", "513"),
        ("-v", "cache", "prune", "--dry-run"),
    ]
    answers = []
    for argv in steps:
        result = dep.cli(*argv, check=False)
        answers.append((result.returncode, _same(dep, result.stdout),
                        _same(dep, result.stderr)))
    return answers, dep.qemu_calls()


def _same(dep, text):
    """``text`` without what differs between two runs (the deployment's
    directory, times, timings, the free space of a shared filesystem,
    the random part of temporary names, the base's allocation).
    """
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:]+(\+00:00)?", "TIME",
                  text.replace(dep.root, "ROOT"))
    text = re.sub(r"\d+ bytes free", "N bytes free", text)
    text = re.sub(r"[-.][0-9a-f]{12,16}\b", "-X", text)
    text = _allocation(dep, text)
    return re.sub(r"\d+\.\d{3}", "T", text)


def _allocation(dep, text):
    """``text`` with the base's size on disk, where it is exactly what
    the base's file takes now, as ``ALLOCATED`` (and the cache's size as
    that plus the rest).

    Two bases of the same bytes need not take the same blocks: ext4 keeps
    four extents in the inode and a fifth takes a block of its own, which
    ``st_blocks`` counts.  The base has four extents of data, and whether
    the first block, which qemu-img writes apart when it creates the file,
    lands next to the rest depends on the other writers of the
    filesystem at that moment: 4 MiB one run, 4 MiB + 4 KiB the next.
    """
    try:
        allocated = os.stat(dep.base_path("guest.qcow2")).st_blocks * 512
    except FileNotFoundError:
        return text
    text = text.replace('"size_on_disk": %d,' % allocated,
                        '"size_on_disk": "ALLOCATED",')
    return re.sub(r"cache now (\d+) bytes", lambda m: "cache now ALLOCATED"
                  "%+d bytes" % (int(m.group(1)) - allocated), text)


def test_forked_and_real_command_lines_answer_alike(deps):
    forked, real = deps
    (forked_answers, forked_qemu), (real_answers, real_qemu) = (
        _answers(forked), _answers(real))
    assert [a[0] for a in real_answers] == [0, 0, 1, 2, 0]
    assert forked_answers == real_answers
    assert (json.loads(forked_answers[1][1])[0]["image_id"]
            == "guest.qcow2")
    # Both told the base's true allocation, and the same cache size
    # beyond it.
    assert '"size_on_disk": "ALLOCATED"' in forked_answers[1][1]
    assert "cache now ALLOCATED+" in forked_answers[4][1]
    # Through the qemu-img wrapper on the deployment's PATH, alike.
    assert [_same(forked, c) for c in forked_qemu] == [
        _same(real, c) for c in real_qemu]
    assert any(c.startswith("create") for c in forked_qemu)
