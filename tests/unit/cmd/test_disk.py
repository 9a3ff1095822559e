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

"""``imagebackend disk info|check|snapshot|rebase|extract|resize``: the
arguments they take, and what they print and exit with, with QemuImg
mocked."""

import json
from unittest import mock

import pytest

from imagebackend.cmd import disk as disk_cmd
from imagebackend.cmd import main
from imagebackend.qemu import img as qemu_img
from imagebackend.qemu import results as qemu_results
from tests import fakes

GiB = 1024 ** 3


def parse(*argv):
    return main.build_parser().parse_args(list(argv))


def parse_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_every_operation_has_its_command():
    for argv, func in [
            (("disk", "info", "d"), disk_cmd.show_info),
            (("disk", "check", "d"), disk_cmd.check_disk),
            (("disk", "snapshot", "list", "d"), disk_cmd.list_snapshots),
            (("disk", "snapshot", "create", "d", "s"),
             disk_cmd.change_snapshot),
            (("disk", "rebase", "d", "b"), disk_cmd.rebase_disk),
            (("disk", "extract", "d", "o"), disk_cmd.extract_disk),
            (("disk", "resize", "d", "1G"), disk_cmd.resize_disk)]:
        args = parse(*argv)
        assert args.func is func
        assert (args.path, args.input_format) == ("d", None)
        assert args.output_format == "text"
        assert parse(*argv, "-f", "json").output_format == "json"


def test_disk_create_is_unchanged():
    args = parse("disk", "create", "img", "/t", "--size", "2G")
    assert (args.image_id, args.target, args.size) == ("img", "/t", 2 * GiB)


def test_check_repair_modes(capsys):
    assert parse("disk", "check", "d").repair is None
    assert parse("disk", "check", "d", "--repair", "leaks").repair == "leaks"
    assert parse("disk", "check", "d", "--repair", "all").repair == "all"
    assert "invalid choice" in parse_error(capsys, "disk", "check", "d",
                                           "--repair", "everything")


def test_snapshot_actions_take_a_name_except_list(capsys):
    for action, done in [("create", "created"), ("apply", "applied"),
                         ("delete", "deleted")]:
        args = parse("disk", "snapshot", action, "d", "s1")
        assert (args.action, args.name, args.action_done) == (action, "s1",
                                                              done)
        parse_error(capsys, "disk", "snapshot", action, "d")
    parse_error(capsys, "disk", "snapshot", "list", "d", "s1")
    parse_error(capsys, "disk", "snapshot", "d")


def test_resize_size_is_parsed_like_disk_create(capsys):
    args = parse("disk", "resize", "d", "1.5G")
    assert (args.size, args.shrink) == (3 * GiB // 2, False)
    assert parse("disk", "resize", "d", "512", "--shrink").shrink
    assert "12Q" in parse_error(capsys, "disk", "resize", "d", "12Q")


def test_extract_and_rebase_options(capsys):
    args = parse("disk", "extract", "d", "o")
    assert (args.output, args.image_format, args.compress) == (
        "o", "qcow2", False)
    args = parse("disk", "extract", "d", "o", "-O", "raw", "--compress",
                 "--input-format", "raw")
    assert (args.image_format, args.compress, args.input_format) == (
        "raw", True, "raw")
    parse_error(capsys, "disk", "extract", "d", "o", "-O", "vmdk")
    args = parse("disk", "rebase", "d", "b", "--unsafe")
    assert (args.new_backing, args.unsafe, args.backing_format) == (
        "b", True, None)
    assert not parse("disk", "rebase", "d", "b").unsafe
    assert parse("disk", "rebase", "d", "b", "--backing-format",
                 "raw").backing_format == "raw"
    parse_error(capsys, "disk", "rebase", "d", "b", "--backing-format",
                "qed")
    parse_error(capsys, "disk", "info", "d", "--input-format", "vmdk")


# --- running them ------------------------------------------------------------

@pytest.fixture
def qemu():
    with mock.patch.object(qemu_img, "QemuImg", autospec=True) as cls:
        yield cls.return_value


@pytest.fixture
def disk(tmp_path):
    path = str(tmp_path / "disk.qcow2")
    with open(path, "wb") as f:
        f.write(fakes.qcow2_header(GiB))
    return path


def check_result(path, **counts):
    return qemu_results.CheckResult(filename=path, format="qcow2", **counts)


@pytest.mark.parametrize("counts,status", [
    ({}, 0), ({"leaks": 4}, 3), ({"corruptions": 1, "leaks": 4}, 2),
    ({"leaks_fixed": 4}, 0)])
def test_check_exits_like_qemu_img_check(qemu, disk, capsys, counts,
                                         status):
    qemu.info.return_value = qemu_results.ImageInfo(disk, "qcow2", GiB)
    qemu.check.return_value = check_result(disk, **counts)
    assert main.main(["disk", "check", disk, "--input-format", "qcow2",
                      "-f", "json"]) == status
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == disk
    assert out["leaks"] == counts.get("leaks", 0)
    assert out["clean"] is (status == 0)


def test_info_prints_the_chain_as_json_and_text(qemu, disk, tmp_path,
                                                capsys):
    base = str(tmp_path / "base")
    with open(base, "wb") as f:
        f.write(b"raw data")
    qemu.info.side_effect = [
        qemu_results.ImageInfo(disk, "qcow2", GiB, backing_file=base,
                               backing_format="raw"),
        qemu_results.ImageInfo(base, "raw", 8)] * 2
    assert main.main(["disk", "info", disk, "--input-format", "qcow2", "-f",
                      "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backing_file"] == base
    assert out["backing_chain"] == [{"path": base, "format": "raw",
                                     "virtual_size": 8}]
    assert main.main(["disk", "info", disk, "--input-format", "qcow2"]) == 0
    assert "%s (raw)" % base in capsys.readouterr().out


def test_a_refused_operation_is_one_line_and_exit_1(qemu, tmp_path, capsys):
    raw = str(tmp_path / "disk.raw")
    with open(raw, "wb") as f:
        f.write(b"guest data")
    assert main.main(["disk", "snapshot", "create", raw, "s1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("imagebackend: error: Disk %s" % raw)
    assert qemu.method_calls == []


def test_rebase_passes_the_backing_format(qemu, disk, tmp_path, capsys):
    base = str(tmp_path / "base")
    with open(base, "wb") as f:
        f.write(b"raw data")

    def info(path, fmt, backing_chain=False, **kwargs):
        # The disk as qemu-img reads it after the rebase.
        found = [qemu_results.ImageInfo(disk, "qcow2", GiB,
                                        backing_file=base,
                                        backing_format="raw"),
                 qemu_results.ImageInfo(base, "raw", 8)]
        found = found[1:] if path == base else found
        found[0].chain = found if backing_chain else []
        return found[0]
    qemu.info.side_effect = info
    assert main.main(["disk", "rebase", disk, base, "--unsafe",
                      "--input-format", "qcow2", "--backing-format",
                      "raw"]) == 0
    qemu.rebase.assert_called_once_with(disk, "qcow2", base, "raw",
                                        unsafe=True, progress=mock.ANY,
                                        cancel=None)


def test_an_unknown_format_names_the_flag(qemu, disk, capsys):
    assert main.main(["disk", "info", disk]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imagebackend: error: Disk %s" % disk)
    assert "--input-format" in err and len(err.strip().splitlines()) == 1
    assert qemu.method_calls == []
