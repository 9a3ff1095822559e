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

"""The command line, run as a child process, in front of text it did not
choose (THREATS.md "Text is data", "Clear errors"): ids, records and paths
with newlines and escape sequences, bytes that are not UTF-8, a reader
that goes away, a bad config file, a size that is not whole sectors.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

import imagebackend
from imagebackend import exception
from tests.functional.fixtures import env as fenv

FORGED = "evil\nimagebackend: error: forged\x1b[2J\x1b]0;pwned\x07"


@pytest.fixture
def dep(tmp_path):
    d = fenv.Deployment(str(tmp_path), real_cli=True)
    fenv.make_qcow2(os.path.join(d.images, "guest.qcow2"))
    return d


def cli_bytes(dep, *argv, stdout=subprocess.PIPE):
    """Run the command line with arguments given as bytes (as a shell
    passes them: not necessarily UTF-8).
    """
    return subprocess.run(
        [sys.executable.encode(), b"-m", b"imagebackend.cmd.main",
         b"--config-file", dep.config_file.encode()]
        + [a if isinstance(a, bytes) else a.encode() for a in argv],
        env=dep.env(), stdout=stdout, stderr=subprocess.PIPE)


def create(dep, target, size, backend="cached-base"):
    """Set-up: a disk of guest.qcow2 made through the library in this
    process (what ``disk create`` does).
    """
    return imagebackend.load_backend(dep.conf(), backend).create_image(
        "guest.qcow2", target, size)


def state(dep) -> dict:
    """Everything under the instances directory (files and directories),
    to tell that a refused command changed nothing.
    """
    found = {}
    for root, dirs, files in os.walk(dep.instances):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            found[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def one_error_line(result) -> str:
    err = result.stderr.decode() if isinstance(result.stderr, bytes) \
        else result.stderr
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imagebackend: error: "), err
    assert lines[0].isprintable() and "\x1b" not in lines[0]
    return lines[0]


# -- a reader that goes away ------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["cache", "list"],
    ["cache", "list", "-f", "json"],
    ["disk", "info", "--input-format", "qcow2"],
])
def test_a_closed_pipe_ends_the_command_quietly(dep, argv):
    target = os.path.join(dep.instances, "vm1", "disk")
    create(dep, target, fenv.GiB)
    if argv[:2] == ["disk", "info"]:
        argv = argv + [target]
    # The reading end is closed before the command runs: its first write
    # of output meets a broken pipe, as with "| head -0" or a reader that
    # exits early.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "imagebackend.cmd.main",
             "--config-file", dep.config_file] + argv,
            env=dep.env(), stdout=write_end, stderr=subprocess.PIPE,
            text=True)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141


def test_cache_list_into_head_prints_the_header_and_no_traceback(dep):
    for n in range(3):
        create(dep, os.path.join(dep.instances, "vm%d" % n, "disk"),
               (128 + n) * fenv.MiB)
    cli = " ".join([sys.executable, "-m", "imagebackend.cmd.main",
                    "--config-file", dep.config_file])
    result = subprocess.run(
        ["sh", "-c", "%s cache list | head -1; %s cache list -f json | "
                     "head -c 1" % (cli, cli)],
        env=dep.env(), capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.split()[:2] == ["image_id", "kind"]
    assert result.stderr == ""


# -- configuration ----------------------------------------------------------

@pytest.mark.parametrize("section, option, value", [
    ("imagebackend", "instances_path", "$nope"),
    ("imagebackend", "images_type", "lvm"),
    ("local_source", "path", "/srv/$nope/images"),
])
def test_a_bad_config_value_names_the_option_and_the_file(dep, section,
                                                          option, value):
    dep.write_config(**{section: {option: value}})
    before = state(dep)
    result = dep.cli("disk", "create", "guest.qcow2",
                     os.path.join(dep.instances, "vm1", "disk"), "--size",
                     "1G", check=False)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "option [%s] %s" % (section, option) in line
    assert dep.config_file in line
    assert "'%s'" % value in line
    assert state(dep) == before


# -- image ids --------------------------------------------------------------

@pytest.mark.parametrize("image_id, shown", [
    (b"guest.qcow2\n", "'guest.qcow2\\n'"),
    (FORGED.encode(), "'evil\\nimagebackend: error: forged\\x1b[2J"
                      "\\x1b]0;pwned\\x07'"),
    (b"\xff", "'\\xff'"),
    (b"guest\xe9.qcow2", "'guest\\xe9.qcow2'"),
])
@pytest.mark.parametrize("command", [
    ["disk", "create", "ID", "TARGET", "--size", "1G"],
    ["cache", "prefetch", "ID"],
    ["cache", "invalidate", "ID"],
    ["cache", "verify", "ID"],
])
def test_an_unusable_image_id_is_one_line_and_changes_nothing(
        dep, image_id, shown, command):
    target = os.path.join(dep.instances, "new-vm", "disk")
    # A cached image, so that an id reaching the cache would be noticed.
    dep.prefetch("guest.qcow2")
    before = state(dep)
    argv = [image_id if a == "ID" else target if a == "TARGET" else a
            for a in command]
    result = cli_bytes(dep, *argv)
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith("imagebackend: error: Invalid image id %s: "
                           % shown)
    assert "an image id is 1 to 255 characters of UTF-8 text" in line
    assert "UnicodeEncodeError" not in line and "codec" not in line
    assert state(dep) == before
    assert not os.path.exists(os.path.dirname(target))


@pytest.mark.parametrize("image_id", ["guest\udcff.qcow2", "guest.qcow2\n"])
def test_an_unusable_id_through_the_python_api_changes_nothing(dep,
                                                               image_id):
    backend = imagebackend.load_backend(dep.conf())
    target = os.path.join(dep.instances, "api-vm", "disk")
    before = state(dep)
    with pytest.raises(exception.InvalidImageId) as err:
        backend.create_image(image_id, target, fenv.GiB)
    shown = "'guest\\xff.qcow2'" if "\udcff" in image_id else (
        "'guest.qcow2\\n'")
    assert str(err.value).startswith("Invalid image id %s: " % shown)
    with pytest.raises(exception.InvalidImageId):
        backend.source.get_meta(image_id)
    assert state(dep) == before
    assert not os.path.exists(os.path.dirname(target))


# -- text output ------------------------------------------------------------

def forge_record(dep, image_id):
    """Rewrite the record of the cached base so that it names
    ``image_id``: what another host or version sharing ``_base`` could
    have written, or an image service's id shown as it came.
    """
    # The base's record (a sized base has its own, named <stem>_<size>).
    records = [path for path in glob.glob(os.path.join(dep.base_dir,
                                                       "*.json"))
               if "_" not in os.path.basename(path)]
    assert len(records) == 1
    with open(records[0]) as f:
        record = json.load(f)
    record["image_id"] = image_id
    with open(records[0], "w") as f:
        json.dump(record, f)


def test_cache_list_text_is_one_line_per_base_and_json_is_exact(dep):
    create(dep, os.path.join(dep.instances, "vm1", "disk"), fenv.GiB)
    forge_record(dep, FORGED)
    rows = dep.cli_json("cache", "list")
    base = [r for r in rows if r["kind"] == "base"]
    assert base[0]["image_id"] == FORGED
    text = dep.cli("cache", "list").stdout
    lines = text.splitlines()
    assert len(lines) == len(rows) + 1
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("imagebackend: error") for line in lines)
    assert any(line.startswith(
        "evil\\nimagebackend: error: forged\\x1b[2J\\x1b]0;pwned\\x07 ")
        for line in lines), text


def test_cache_verify_text_shows_a_forged_id_escaped(dep):
    dep.prefetch("guest.qcow2")
    forge_record(dep, FORGED)
    rows = dep.cli_json("cache", "verify")
    assert [r["image_id"] for r in rows] == [FORGED]
    result = dep.cli("cache", "verify", check=False)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert "evil\\nimagebackend: error: forged\\x1b[2J" in lines[1]


def test_disk_create_text_shows_a_path_escaped_and_json_exact(dep):
    target = os.path.join(dep.instances, "vm\nINFO forged: line", "disk")
    out = dep.cli("disk", "create", "guest.qcow2", target,
                  "--size", "1G").stdout
    path_lines = [line for line in out.splitlines()
                  if line.startswith("path ")]
    assert path_lines == ["path           %s" % target.replace("\n", "\\n")]
    assert "INFO forged" not in out.replace("\\nINFO forged", "")
    disk = dep.cli_json("disk", "info", "--input-format", "qcow2", target)
    assert disk["path"] == target


def test_log_lines_cannot_be_forged_by_a_path(dep):
    target = os.path.join(dep.instances, "vm\nERROR forged: line", "disk")
    result = dep.cli("-v", "disk", "create", "guest.qcow2", target,
                     "--size", "1G")
    lines = result.stderr.splitlines()
    assert lines, "-v logged nothing"
    assert all(line.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING",
                                         "ERROR") for line in lines)
    assert not any(line.startswith("ERROR forged") for line in lines)
    assert any("vm\\nERROR forged: line" in line for line in lines)


# -- sizes ------------------------------------------------------------------

def test_a_size_that_is_not_whole_sectors_is_refused(dep):
    target = os.path.join(dep.instances, "vm1", "disk")
    before = state(dep)
    result = dep.cli("disk", "create", "guest.qcow2", target,
                     "--size", "1000000001", check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "imagebackend: error: size 1000000001 bytes is not a multiple of "
        "512 (disks are made of 512-byte sectors); give 1000000512 or "
        "1000000000")
    assert state(dep) == before


@pytest.mark.parametrize("backend", ["raw", "qcow2", "cached-base"])
def test_the_reported_size_is_the_disk_size(dep, backend):
    target = os.path.join(dep.instances, "vm1", "disk")
    disk = dep.cli_json("disk", "create", "guest.qcow2", target, "--size",
                        "1000000512", "--backend", backend)
    actual = fenv.qemu_info(target, disk["format"])["virtual-size"]
    assert disk["virtual_size"] == actual == 1000000512
    text = dep.cli("disk", "info", "--input-format", disk["format"],
                   target).stdout
    assert "virtual_size   1000000512" in text
