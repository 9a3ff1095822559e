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

"""Running one qemu-img command: its process, its errors, its progress.

:class:`Command` turns an argument list into a process through a
:class:`imagebackend.qemu.runner.Runner`, under process limits, and turns
every failure into a :class:`imagebackend.exception.QemuImgError` (or a
subclass) carrying the useful line of qemu-img's standard error.  Long
commands (``convert``, ``rebase``, ``commit``) take ``-p``: their output is
parsed into percentages (:class:`ProgressParser`) and they can be
cancelled.  :func:`written_back` and :func:`flush` make a new image
durable.  What each command's arguments are is
:mod:`imagebackend.qemu.img`'s business.
"""

import contextlib
import errno
import json
import logging
import os
import re
import threading
import typing

from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import options as qemu_options
from imagebackend.qemu import results as qemu_results
from imagebackend.qemu import runner

LOG = logging.getLogger(__name__)

# Commands on the warm path, started without copying this process: they
# take milliseconds and read no image a user supplied.
_QUICK = ("create", "--version", "-h")
# Cache modes that make qemu-img write through to stable storage itself;
# with any other mode the converted file is fsynced afterwards.
DURABLE_CACHES = ("none", "directsync", "writethrough")
_PROGRESS_RE = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


class ProgressParser:
    """Turns ``qemu-img -p`` output into calls of a callback.

    Output such as ``"    (12.34/100%)\\r"``, fed in pieces of any size,
    becomes ``callback(12.34)``; the values never go backwards, and
    :meth:`finish` reports 100.0 if qemu-img did not.  This percentage is
    the runner's parsing hook; callers turn it into bytes with
    :func:`imagebackend.common.progress.from_percent`.
    """

    def __init__(self, callback: typing.Callable[[float], None]) -> None:
        self._callback = callback
        self._pending = ""
        self._last = -1.0

    def feed(self, text: str) -> None:
        *complete, self._pending = re.split(r"[\r\n]", self._pending + text)
        for piece in complete:
            match = _PROGRESS_RE.search(piece)
            if match and float(match.group(1)) > self._last:
                self._last = float(match.group(1))
                self._callback(self._last)

    def finish(self) -> None:
        self.feed("\n")
        if self._last < 100.0:
            self._last = 100.0
            self._callback(100.0)


class Command:
    """Runs qemu-img commands through ``runner`` as program ``binary``.

    :param runner: a :class:`imagebackend.qemu.runner.Runner` (or an
        object with its ``execute`` and ``stream`` methods).
    :param binary: the qemu-img program.
    """

    def __init__(self, runner, binary: str) -> None:
        self.runner = runner
        self.binary = binary

    def run(self, operation: str, path, args: list, *,
            ok_codes=(0,), limits: runner.Limits | None = None,
            on_output=None, cancel: threading.Event | None = None
            ) -> runner.ProcessResult:
        """Run ``qemu-img args`` to completion.

        :param operation: the qemu-img command, for messages and to choose
            the default limits.
        :param path: the image concerned, for messages.
        :param limits: process limits; ``None`` ties every command but the
            quick ones to its caller's life and sets no other limit.
        :param on_output: called with standard output as it arrives.
        :param cancel: set it from another thread to stop the command.
        :raises exception.QemuImgLimitExceeded: a limit was hit.
        :raises exception.QemuImgOutputTooLarge: the output limit was hit.
        :raises exception.QemuImgNotFound: the program does not exist.
        :raises exception.QemuImgError: qemu-img failed.
        """
        # The runner logs each command at debug level.  Every command but
        # the quick ones dies with its caller.
        argv = [self.binary] + [os.fspath(arg) for arg in args]
        if limits is None and operation not in _QUICK:
            limits = runner.Limits()
        preexec_fn = limits.preexec() if limits else None
        try:
            if on_output is not None or cancel is not None:
                return self.runner.stream(
                    argv, on_output or _ignore, cancel, ok_codes=ok_codes,
                    preexec_fn=preexec_fn)
            return self.runner.execute(argv, ok_codes=ok_codes,
                                       preexec_fn=preexec_fn)
        except runner.ProcessExecutionError as exc:
            raise _failed(operation, path, limits, exc) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise exception.QemuImgNotFound(
                    reason="%s: %s" % (self.binary, exc.strerror),
                    operation=operation, path=path, exit_code=None,
                    stderr=str(exc)) from exc
            raise exception.QemuImgError(
                operation=operation, path=path, exit_code=None,
                stderr=str(exc)) from exc

    def run_long(self, operation: str, what: str, path, args: list,
                 progress: typing.Callable[[float], None] | None,
                 cancel: threading.Event | None, *, finish=None,
                 limits: runner.Limits | None = None) -> None:
        """Run a command that takes ``-p``: with ``progress``, its output
        is parsed into percentages; with ``cancel``, it can be stopped.

        :param what: the operation's name in a cancellation message.
        :param finish: runs after the command succeeded and before the
            last progress report (100.0).
        :raises exception.OperationCancelled: ``cancel`` was set.
        """
        parser = ProgressParser(progress) if progress else None
        if parser:
            args = args[:1] + ["-p"] + args[1:]
        if parser or cancel is not None:
            result = self.run(operation, path, args, cancel=cancel,
                              on_output=parser.feed if parser else None,
                              limits=limits)
            if result.cancelled:
                raise exception.OperationCancelled(operation=what, path=path)
        else:
            self.run(operation, path, args, limits=limits)
        if finish is not None:
            finish()
        if parser:
            parser.finish()

    @staticmethod
    def parse(operation: str, path, result: runner.ProcessResult, parse,
              *args):
        """Return ``parse(json, *args)`` of a command's output.

        :raises exception.QemuImgError: any surprise in the output, never
            a KeyError.
        """
        try:
            return parse(json.loads(result.stdout), *args)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise bad_output(operation, path, exc) from exc


def _failed(operation, path, limits, exc):
    """The library's exception for qemu-img's failure ``exc``."""
    kwargs = dict(operation=operation, path=path, exit_code=exc.exit_code,
                  stderr=qemu_results.useful_error(exc.stderr or ""))
    hit = limits and limits.exceeded(exc.exit_code, exc.stderr)
    if hit == "file_size":
        return exception.QemuImgOutputTooLarge(size=limits.file_size,
                                               **kwargs)
    if hit:
        value = getattr(limits, hit)
        return exception.QemuImgLimitExceeded(
            limit=("CPU time (%d s)" % value if hit == "cpu_time"
                   else "address space (%d MiB)" % (value >> 20)),
            option=qemu_options.LIMIT_OPTIONS[operation == "convert", hit],
            **kwargs)
    return exception.QemuImgError(**kwargs)


def bad_output(operation: str, path, detail) -> exception.QemuImgError:
    """The error for output qemu-img should not have printed."""
    return exception.QemuImgError(
        operation=operation, path=path, exit_code=0,
        stderr="unexpected output from qemu-img (%s)" % detail)


@contextlib.contextmanager
def written_back(path: str, through_page_cache: bool):
    """Through the page cache, send a new image's data to disk while it
    is being converted, not all of it in the flush at the end.

    :raises exception.DiskOperationError: the data cannot be written.
    """
    if not through_page_cache:
        yield
        return
    try:
        with sparseio.Writeback(path=path):
            yield
    except exception.ImageBackendException:
        # qemu-img's own errors (QemuImgNotFound is an OSError too).
        raise
    except OSError as exc:
        raise exception.DiskOperationError(
            path=path, reason="could not write the converted image to disk "
            "(%s)" % exc) from exc


def flush(path: str, data: bool) -> None:
    """Make a new image's name durable, and with ``data`` its contents.

    :param data: the contents went through the page cache.
    :raises exception.DiskOperationError: the image cannot be flushed.
    """
    try:
        if data:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fileio.fsync_dir(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        # Not a local file (a protocol target such as rbd:pool/image).
        LOG.debug("Not flushing %s: not a local file", path)
    except OSError as exc:
        raise exception.DiskOperationError(
            path=path, reason="could not flush the converted image to disk "
            "(%s)" % exc) from exc


def _ignore(_text):
    pass
