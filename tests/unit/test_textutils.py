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

"""Showing others' text: escaped, one line, bounded."""

import io
import logging

import pytest

from imagebackend import exception
from imagebackend import textutils


@pytest.mark.parametrize("text, shown", [
    ("plain id-1.qcow2", "plain id-1.qcow2"),
    ("a\nb", "a\\nb"),
    ("a\r\tb", "a\\r\\tb"),
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    ("nul\x00del\x7f", "nul\\x00del\\x7f"),
    ("c1 \x85 \x9b31m", "c1 \\x85 \\x9b31m"),             # NEL, CSI
    ("bidi \u202egnp.exe", "bidi \\u202egnp.exe"),       # RLO
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ("tag \U000e0041", "tag \\U000e0041"),
    ("back\\slash", "back\\\\slash"),
    ("\\n is not a newline", "\\\\n is not a newline"),
    ("caf\u00e9 \u00a0 \u65e5\u672c", "caf\u00e9 \u00a0 \u65e5\u672c"),
])
def test_control_and_invisible_characters_are_escaped(text, shown):
    assert textutils.printable(text) == shown


def test_undecodable_bytes_show_as_the_bytes_given():
    # "\xff" on a command line arrives as the lone surrogate U+DCFF.
    assert textutils.printable("ab\udcff\udc80") == "ab\\xff\\x80"
    assert textutils.printable("\ud800") == "\\ud800"
    assert textutils.printable(b"ok\xff\n") == "ok\\xff\\n"


def test_the_escaped_form_is_unambiguous():
    # A real newline and the two characters backslash-n differ.
    assert textutils.printable("a\nb") != textutils.printable("a\\nb")
    assert "\n" not in textutils.printable("x\n" * 50, None)


def test_length_is_bounded_with_a_count_of_what_was_left_out():
    shown = textutils.printable("x" * 1000, limit=200)
    assert shown == "x" * 200 + "... (800 more characters)"
    assert textutils.printable("y" * 200, limit=200) == "y" * 200
    assert textutils.printable("z" * 5000, limit=None) == "z" * 5000


def test_the_bound_never_cuts_an_escape_in_half():
    shown = textutils.printable("ab" + "\n" * 10, limit=5)
    assert shown == "ab\\n... (9 more characters)"


def test_non_text_values_are_shown_as_text():
    assert textutils.printable(12) == "12"
    assert textutils.printable(ValueError("bad\nvalue")) == "bad\\nvalue"


def test_quote_chooses_quotes_that_stay_unambiguous():
    assert textutils.quote("abc") == "'abc'"
    assert textutils.quote("it's") == '"it\'s"'
    assert textutils.quote("both ' and \"") == "'both \\' and \"'"


def test_log_formatter_keeps_each_message_on_one_line():
    stream = io.StringIO()
    plain = io.StringIO()
    logger = logging.getLogger("tests.textutils")
    logger.propagate = False
    escaping = logging.StreamHandler(stream)
    escaping.setFormatter(textutils.EscapingFormatter(
        "%(levelname)s %(name)s: %(message)s"))
    raw = logging.StreamHandler(plain)
    logger.addHandler(escaping)
    logger.addHandler(raw)
    logger.setLevel(logging.INFO)
    try:
        logger.warning("Image %s: %s", "evil\nERROR forged: line",
                       "\x1b[31mred")
    finally:
        logger.removeHandler(escaping)
        logger.removeHandler(raw)
    lines = stream.getvalue().splitlines()
    assert lines == ["WARNING tests.textutils: Image "
                     "evil\\nERROR forged: line: \\x1b[31mred"]
    # The record itself is unchanged for other handlers.
    assert plain.getvalue() == "Image evil\nERROR forged: line: \x1b[31mred\n"


def test_log_formatter_bounds_a_huge_message():
    formatter = textutils.EscapingFormatter("%(message)s", limit=100)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1,
                               "body: %s", ("b" * 10000,), None)
    text = formatter.format(record)
    assert len(text) < 150 and text.endswith("more characters)")


def test_escaped_text_is_not_escaped_twice():
    once = textutils.printable("a\nb\\c\udcff")
    assert isinstance(once, textutils.Escaped)
    assert textutils.printable(once) == once == "a\\nb\\\\c\\xff"
    # Text that merely looks escaped is not trusted to be.
    assert textutils.printable("a\\nb") == "a\\\\nb"


def test_bounding_escaped_text_never_cuts_an_escape():
    once = textutils.printable("ab" + "\x1b" * 10, limit=None)
    assert textutils.printable(once, limit=7) == (
        "ab\\x1b... (9 more characters)")
    assert textutils.printable(once, limit=5) == (
        "ab... (10 more characters)")


def test_compose_escapes_each_argument_once():
    details = textutils.printable("oops\x1b[2J\nforged")
    text = textutils.compose("Glance answered HTTP %s (%s) at %s", 500,
                             details, "http://g\n:9292")
    assert text == ("Glance answered HTTP 500 (oops\\x1b[2J\\nforged) at "
                    "http://g\\n:9292")
    assert isinstance(text, textutils.Escaped)
    # Put whole into an error, it is not escaped a second time.
    err = exception.ImageSourceError(image_id="i", reason=text)
    assert "(oops\\x1b[2J\\nforged)" in str(err)
