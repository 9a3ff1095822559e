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

import argparse
import io
import json

from imagebackend.backends import base
from imagebackend.cmd import output
from imagebackend import exception


class TTY(io.StringIO):
    def isatty(self):
        return True


def args(fmt="text"):
    return argparse.Namespace(output_format=fmt)


def test_progress_bar_draws_on_a_terminal_and_reaches_100():
    stream = TTY()
    bar = output.ProgressBar(args(), stream=stream, min_interval=0)
    for done in range(0, 101, 25):
        bar("fetch", done, 100)
    bar.close()
    text = stream.getvalue()
    assert "fetch" in text and "100.0%" in text
    assert text.endswith("\n")


def test_progress_bar_is_silent_in_pipes_and_json():
    pipe = io.StringIO()
    bar = output.ProgressBar(args(), stream=pipe, min_interval=0)
    bar("fetch", 50, 100)
    bar.close()
    assert pipe.getvalue() == ""
    tty = TTY()
    bar = output.ProgressBar(args("json"), stream=tty, min_interval=0)
    bar("fetch", 50, 100)
    bar.close()
    assert tty.getvalue() == ""


def test_emit_json_and_table():
    stream = io.StringIO()
    output.emit({"path": "/d", "cache_hit": True}, args("json"), stream)
    assert json.loads(stream.getvalue()) == {"path": "/d",
                                             "cache_hit": True}
    stream = io.StringIO()
    rows = [{"image_id": "a", "size": 1}, {"image_id": "bbb", "size": None}]
    output.emit(rows, args(), stream)
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["image_id", "size"]
    assert lines[2].split() == ["bbb", "-"]


EVIL = "evil\nimage_id  kind\x1b[2J\u202e\udcff" + "x" * 300


def test_text_table_shows_others_text_escaped_one_line_per_row():
    stream = io.StringIO()
    rows = [{"image_id": EVIL, "file": "/b/1"}, {"image_id": "ok",
                                                 "file": "/b/2"}]
    output.emit(rows, args(), stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith(
        "evil\\nimage_id  kind\\x1b[2J\\u202e\\xff" + "x" * 10)
    assert "... (" in lines[1] and "more characters)" in lines[1]
    assert len(lines[1]) < 300
    assert lines[2].split() == ["ok", "/b/2"]
    assert stream.getvalue().isascii()


def test_text_listing_escapes_values_lists_and_dicts():
    stream = io.StringIO()
    output.emit({"path": "/d\n", "chain": ["a\rb", "c"],
                 "timings": {"fe\x1btch": 0.5}}, args(), stream)
    lines = stream.getvalue().splitlines()
    assert lines == ["path     /d\\n", "chain    a\\rb, c",
                     "timings  fe\\x1btch=0.500"]
    stream = io.StringIO()
    output.emit("new-id\n\x1b[1m", args(), stream)
    assert stream.getvalue() == "new-id\\n\\x1b[1m\n"


def test_json_keeps_the_text_exact():
    stream = io.StringIO()
    rows = [{"image_id": EVIL, "file": "/b/1"}]
    output.emit(rows, args("json"), stream)
    assert json.loads(stream.getvalue()) == rows
    stream = io.StringIO()
    output.emit({"reason": "a\nb"}, args("json"), stream)
    assert json.loads(stream.getvalue()) == {"reason": "a\nb"}


def test_an_error_message_in_a_cell_is_not_escaped_twice():
    error = exception.ImageNotFound(image_id="a\nb\\c", source="s")
    stream = io.StringIO()
    output.emit([{"image_id": "x", "error": error.message}], args(), stream)
    assert stream.getvalue().splitlines()[1] == (
        "x         Image a\\nb\\\\c was not found in s.")


MiB = 1024 * 1024


def test_progress_bar_shows_the_bytes_done_of_the_total():
    stream = TTY()
    bar = output.ProgressBar(args(), stream=stream, min_interval=0)
    bar("download", 16 * MiB, 64 * MiB)
    bar("download", 64 * MiB, 64 * MiB)
    bar("convert", 5 * MiB, None)
    bar.close()
    text = stream.getvalue()
    assert "25.0% 16.0/64.0 MiB" in text
    assert "100.0% 64.0/64.0 MiB" in text
    assert "convert  5.0 MiB" in text


def test_progress_bar_escapes_a_stage_holding_an_image_id():
    stream = TTY()
    bar = output.ProgressBar(args(), stream=stream, min_interval=0)
    bar("download evil\n\x1b[2J" + "x" * 300, 1, 2)
    bar.close()
    text = stream.getvalue()
    assert "\x1b" not in text and "download evil\\n\\x1b[2J" in text
    assert text.count("\n") == 1 and len(text) < 200


def test_typed_results_are_shown_as_their_dicts():
    disk = base.Disk(path="/i/vm/disk", format="qcow2", virtual_size=MiB,
                     image_id="img", backend="qcow2",
                     backing_chain=["/i/_base/x"], cache_hit=False,
                     timings={})
    stream = io.StringIO()
    output.emit(disk, args("json"), stream)
    assert json.loads(stream.getvalue()) == json.loads(
        json.dumps(disk.to_dict()))
    stream = io.StringIO()
    output.emit([disk.libvirt_disk()], args(), stream)
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["source_type", "source_path",
                                "driver_name", "driver_type",
                                "backing_chain"]
    assert lines[1].split() == ["file", "/i/vm/disk", "qemu", "qcow2",
                                "/i/_base/x"]
