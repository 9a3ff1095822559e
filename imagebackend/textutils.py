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

"""Showing text that others wrote: escaped, on one line, bounded.

Image ids, statuses, error bodies and file names come from tenants and
image services.  Shown raw, a newline in one forges a line of a table, a
log or an error message, and an escape sequence rewrites the terminal
(THREATS.md, "Text is data").  :func:`printable` is the one way such text
is shown to people: every control character, line separator, invisible
format character (bidi overrides, zero-width characters) and lone
surrogate becomes a visible escape, the backslash itself is doubled so the
result is unambiguous, and the length is bounded.  Machine-readable output
(JSON) keeps the exact text instead.
"""

import copy
import logging
import re
import unicodedata

#: characters kept of one table cell.
CELL_LIMIT = 200
#: characters kept of one value in an error message, or of a log message.
MESSAGE_LIMIT = 1000

# Unicode categories escaped: controls (C0, DEL, C1), format characters
# (bidi overrides, zero-width), surrogates (undecodable input bytes), line
# and paragraph separators.
_ESCAPED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Python decodes bytes that are not UTF-8 (command-line arguments, file
# names) to lone surrogates U+DC80..U+DCFF ("surrogateescape"): show the
# byte the user gave.
_ESCAPED_BYTE_FIRST, _ESCAPED_BYTE_LAST = 0xDC80, 0xDCFF


# One character of the original text, in the escaped text.
_ESCAPED_UNIT = re.compile(
    r"\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)|[^\\]", re.DOTALL)


class Escaped(str):
    """Text that :func:`printable` made.  Given to :func:`printable`
    again (an error message put whole into a table cell) it is only
    bounded, not escaped a second time.
    """

    __slots__ = ()


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if _ESCAPED_BYTE_FIRST <= code <= _ESCAPED_BYTE_LAST:
        return "\\x%02x" % (code - 0xDC00)
    if code <= 0xFF:
        return "\\x%02x" % code
    if code <= 0xFFFF:
        return "\\u%04x" % code
    return "\\U%08x" % code


def is_unsafe_char(char: str) -> bool:
    """Whether ``char`` is shown escaped by :func:`printable` (the
    backslash aside): a control, format or separator character, or a
    lone surrogate.
    """
    return unicodedata.category(char) in _ESCAPED_CATEGORIES


def printable(value, limit: int | None = CELL_LIMIT) -> str:
    """``value`` as one line of text that is safe to show.

    :param value: a str; bytes are decoded as UTF-8 with undecodable bytes
        kept (and shown as ``\\xNN``); anything else is ``str(value)``.
    :param limit: the most characters of the escaped text kept; the rest
        is replaced by ``... (N more characters)``, N counting characters
        of ``value``.  ``None`` keeps everything.
    :returns: an :class:`Escaped` text: ``\\`` doubled, newline,
        carriage return and tab as ``\\n``, ``\\r``, ``\\t``, other
        escaped characters as ``\\xNN``, ``\\uNNNN`` or
        ``\\UNNNNNNNN``, and undecodable bytes as ``\\xNN``.  An
        :class:`Escaped` ``value`` is only bounded.
    """
    if isinstance(value, Escaped):
        return _bound(value, limit)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    if (text.isprintable() and "\\" not in text
            and (limit is None or len(text) <= limit)):
        return Escaped(text)    # the common case, without a loop in Python
    pieces = []
    used = 0
    for index, char in enumerate(text):
        if char == "\\" or is_unsafe_char(char):
            char = _escape(char)
        if limit is not None and used + len(char) > limit:
            pieces.append(_more(len(text) - index))
            break
        pieces.append(char)
        used += len(char)
    return Escaped("".join(pieces))


def _bound(text: Escaped, limit: int | None) -> Escaped:
    """Escaped ``text`` cut to ``limit``, never inside an escape."""
    if limit is None or len(text) <= limit:
        return text
    units = _ESCAPED_UNIT.findall(text)
    used = 0
    for index, unit in enumerate(units):
        if used + len(unit) > limit:
            return Escaped("".join(units[:index])
                           + _more(len(units) - index))
        used += len(unit)
    return text


def _more(count: int) -> str:
    return "... (%d more characters)" % count


def compose(template: str, *args, limit: int | None = MESSAGE_LIMIT
            ) -> Escaped:
    """``template % args`` as text to show: ``template`` is the library's
    own, each argument is escaped and bounded -- once: an argument that is
    already :class:`Escaped` is kept as it is -- and the result is marked
    :class:`Escaped`, so a message it goes into does not escape it again.
    """
    return Escaped(template % tuple(
        arg if isinstance(arg, Escaped) else printable(arg, limit)
        for arg in args))


def quote(text: str) -> str:
    """``text`` (already made :func:`printable`) in quotes, as ``%r``
    would show a str but without escaping it a second time.
    """
    if "'" not in text:
        return "'%s'" % text
    if '"' not in text:
        return '"%s"' % text
    return "'%s'" % text.replace("'", "\\'")


class EscapingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` that shows each log message through
    :func:`printable`, so that text a tenant or server chose, logged as an
    argument, can never start a line of its own in the log.

    Tracebacks (``exc_info``) are kept as they are: their lines are
    Python's, and the library's exception messages are escaped already.
    """

    def __init__(self, *args, limit: int | None = MESSAGE_LIMIT,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limit = limit

    def format(self, record: logging.LogRecord) -> str:
        # A copy: other handlers of the same record see it unchanged.
        record = copy.copy(record)
        record.msg = printable(record.getMessage(), self.limit)
        record.args = None
        return super().format(record)
