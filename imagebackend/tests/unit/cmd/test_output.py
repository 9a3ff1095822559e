import argparse
import io
import json

from imagebackend.cmd import output


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
