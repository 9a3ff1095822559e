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

"""Printing command results: readable text by default, JSON with -f json,
and a progress bar on a terminal for long steps.

Text output shows every value through
:func:`imagebackend.textutils.printable`: image ids, file names and
messages that a tenant or an image service chose are escaped and bounded,
so one row is always one line.  JSON output keeps every value exact (JSON
escapes control characters itself).  A command may return the library's
typed results (objects with ``to_dict()``, or lists of them): they are
shown as their dicts.

Progress is the library's one protocol (:mod:`imagebackend.common.progress`):
``progress(stage, done, total)`` with ``done`` and ``total`` in bytes;
:class:`ProgressBar` draws it.
"""

import json
import sys
import time

from imagebackend import textutils


def add_format_argument(parser) -> None:
    parser.add_argument("-f", "--format", dest="output_format",
                        choices=("text", "json"), default="text",
                        help="Output format; 'json' is machine-readable "
                             "and never mixed with progress output.")


def emit(result, args, stream=None) -> None:
    """Print a command's result (None prints nothing).

    :param result: a dict, a list of dicts (a table), a scalar, or typed
        results with ``to_dict()`` (one, or a list).
    :param args: the parsed arguments (``output_format``, ``columns``).
    """
    stream = stream or sys.stdout
    if result is None:
        return
    result = _plain(result)
    if getattr(args, "output_format", "text") == "json":
        json.dump(result, stream, indent=2, sort_keys=True)
        stream.write("\n")
    elif isinstance(result, list):
        _table(result, getattr(args, "columns", None), stream)
    elif isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            stream.write("%-*s  %s\n" % (width, key, _text(value)))
    else:
        stream.write("%s\n" % _text(result))
    stream.flush()


def _plain(result):
    """Typed results as the dicts they describe."""
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, (list, tuple)):
        return [_plain(item) for item in result]
    return result


def _text(value) -> str:
    """One value as text for a table cell or a listing: escaped and
    bounded; containers as comma-separated items.
    """
    if isinstance(value, dict):
        return ", ".join("%s=%s" % (_text(k), _text(v))
                         for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "-"
    if isinstance(value, float):
        return "%.3f" % value
    return "-" if value is None else textutils.printable(value)


def _table(rows, columns, stream) -> None:
    if not rows:
        stream.write("(none)\n")
        return
    columns = columns or list(rows[0])
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells))
              for i, c in enumerate(columns)]
    stream.write("  ".join(c.ljust(w) for c, w in zip(columns, widths))
                 .rstrip() + "\n")
    for row in cells:
        stream.write("  ".join(v.ljust(w) for v, w in zip(row, widths))
                     .rstrip() + "\n")


#: the longest stage label shown (an image id may be part of it).
STAGE_WIDTH = 40


class ProgressBar:
    """``progress(stage, done, total)`` (bytes) drawn on a terminal's
    stderr: the stage, a bar, the percentage and the MiB done of the total
    (only the MiB done when the total is unknown).

    The stage is shown escaped and bounded: it may hold an image id.
    Silent when stderr is not a terminal or the output is JSON, so pipes
    and machine-readable output stay clean.
    """

    def __init__(self, args, stream=None, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.enabled = (getattr(args, "output_format", "text") != "json"
                        and self.stream.isatty())
        self.min_interval = min_interval
        self._last = 0.0
        self._stage = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = total is not None and done >= total
        if (stage == self._stage and not final
                and now - self._last < self.min_interval):
            return
        if self._stage not in (None, stage):
            self.stream.write("\n")
        self._stage, self._last = stage, now
        label = textutils.printable(stage, STAGE_WIDTH)
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * 30)
            self.stream.write("\r%-8s [%-30s] %5.1f%% %s/%s MiB"
                              % (label, bar, frac * 100, _mib(done),
                                 _mib(total)))
        else:
            self.stream.write("\r%-8s %s MiB" % (label, _mib(done)))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()


def _mib(size: int) -> str:
    return "%.1f" % (size / (1024 * 1024))
