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

"""The one progress protocol of every long operation.

Downloads, conversions, rebases, extractions, uploads and prefetches all
report the same way: a callable taking ``(stage, done, total)``, where
``stage`` is a short human-readable label whose first word names the
operation (``"download"``, ``"convert"``, ``"rebase"``, ``"extract"``,
``"upload"``), and ``done``/``total`` are BYTES (``total`` is None when
the size is not known in advance, as for a download whose size the image
service did not state).  A caller passes ``progress=None`` for silence.

qemu-img reports percentages; :func:`from_percent` turns them into bytes
of the operation's known size, so the caller never sees two units.
"""

import typing


class Progress(typing.Protocol):
    """What every long operation calls as it advances."""

    def __call__(self, stage: str, done: int,
                 total: int | None) -> None:
        ...


def report(progress: Progress | None, stage: str, done: int,
           total: int | None) -> None:
    """Call ``progress`` unless it is None."""
    if progress is not None:
        progress(stage, done, total)


def from_percent(progress: Progress | None, stage: str, total: int
                 ) -> typing.Callable[[float], None] | None:
    """A percentage callback (as qemu-img's output is parsed into) that
    reports ``total * percent / 100`` bytes of ``stage`` to ``progress``.

    :param total: the size in bytes the percentage is of (for qemu-img,
        the image's virtual size).
    :returns: None when ``progress`` is None, so that the operation can
        skip parsing its progress output at all.
    """
    if progress is None:
        return None

    def on_percent(percent: float) -> None:
        done = int(total * min(max(percent, 0.0), 100.0) / 100)
        progress(stage, done, total)
    return on_percent


def labelled(progress: Progress | None, subject: str
             ) -> Progress | None:
    """``progress`` with ``subject`` (an image id, a path) added to every
    stage label, for operations that work on several things at once (a
    prefetch of several images): ``"download"`` becomes
    ``"download <subject>"``.
    """
    if progress is None:
        return None

    def tagged(stage: str, done: int, total: int | None) -> None:
        progress("%s %s" % (stage, subject), done, total)
    return tagged
