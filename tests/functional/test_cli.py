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

"""The ``imagebackend`` command line, run as a child process."""

import os

import pytest

from tests.functional.fixtures import env as fenv

GiB = fenv.GiB


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path), real_cli=True)
    fenv.make_qcow2(os.path.join(d.images, "guest.qcow2"))
    return d


def test_disk_create_json_has_the_documented_keys(dep):
    target = os.path.join(dep.instances, "vm1", "disk")
    disk = dep.cli_json("disk", "create", "guest.qcow2", target,
                        "--size", "1G")
    for key in ("path", "format", "virtual_size", "backing_file",
                "cache_hit", "timings"):
        assert key in disk
    assert disk["path"] == target
    assert disk["format"] == "qcow2"
    assert disk["virtual_size"] == GiB
    assert disk["cache_hit"] is False
    assert {"fetch", "convert", "overlay"} <= set(disk["timings"])
    again = dep.cli_json("disk", "create", "guest.qcow2", target + "2",
                         "--size", str(GiB), "--backend", "raw")
    assert again["cache_hit"] is True
    assert again["backing_file"] is None
    assert fenv.images_identical(os.path.join(dep.images, "guest.qcow2"),
                                 "qcow2", target + "2", "raw")


def test_disk_create_text_output_is_readable(dep):
    target = os.path.join(dep.instances, "vm1", "disk")
    out = dep.cli("disk", "create", "guest.qcow2", target,
                  "--size", "1G").stdout
    assert "path" in out and target in out
    assert "cache_hit" in out


def test_failure_is_one_line_and_nonzero(dep):
    target = os.path.join(dep.instances, "vm1", "disk")
    result = dep.cli("disk", "create", "guest.qcow2", target,
                     "--size", "1M", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagebackend: error: Image guest.qcow2")
    assert "Traceback" not in result.stderr
    assert not os.path.exists(target)


def test_debug_shows_the_traceback(dep):
    result = dep.cli("--debug", "disk", "create", "nope.img",
                     os.path.join(dep.instances, "x"), "--size", "1G",
                     check=False)
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_bad_size_is_rejected_by_the_parser(dep):
    result = dep.cli("disk", "create", "guest.qcow2",
                     os.path.join(dep.instances, "x"), "--size", "12Q",
                     check=False)
    assert result.returncode == 2
    assert "12Q" in result.stderr


def test_cache_list_shows_each_base(dep):
    assert dep.cli_json("cache", "list") == []
    dep.cli("disk", "create", "guest.qcow2",
            os.path.join(dep.instances, "vm1", "disk"), "--size", "1G",
            "--backend", "cached-base")
    rows = dep.cli_json("cache", "list")
    assert [r["kind"] for r in rows] == ["base", "sized"]
    assert all(r["image_id"] == "guest.qcow2" for r in rows)
    assert rows[0]["format"] == "raw"
    assert rows[0]["virtual_size"] == 64 * fenv.MiB
    assert rows[1]["virtual_size"] == GiB
    assert all(r["size_on_disk"] > 0 and r["last_used"] for r in rows)
    text = dep.cli("cache", "list").stdout
    assert text.splitlines()[0].split()[:2] == ["image_id", "kind"]
