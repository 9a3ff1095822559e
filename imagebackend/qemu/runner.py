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

"""The one way imagebackend runs an external command.

:class:`Runner` has two primitives: :meth:`Runner.execute`, which runs a
command to completion as :func:`oslo_concurrency.processutils.execute`
does (or through any function with its signature, such as a privsep or
rootwrap ``execute``; by default the command is started directly, which is
faster and behaves the same), and
:meth:`Runner.stream`, which hands the command's standard output to a
callback as it arrives and can stop the command from another thread.
Callers take a runner as an argument, so a unit test passes an autospec
mock and never starts a process.

Both primitives return a :class:`ProcessResult` for the exit codes the
caller accepts, and raise
:class:`oslo_concurrency.processutils.ProcessExecutionError` for any other
exit code and :class:`OSError` when the command cannot be started.  The
caller turns those into the library's own exceptions.
"""

import codecs
import collections.abc
import ctypes
import dataclasses
import logging
import os
import re
import resource
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time

LOG = logging.getLogger(__name__)

#: how often a streaming command checks its cancel event, in seconds.
POLL_INTERVAL = 0.1
#: how long a cancelled command gets to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE = 5.0
_PROCESSUTILS = "oslo_concurrency.processutils"


# processutils (and oslo_utils.strutils, which it imports and whose
# password patterns take about 0.1 s of CPU to compile) are imported when
# first needed: a process whose commands all succeed, with or without
# resource limits (the command line's disk info), or that runs none (its
# cache list), needs neither.
def _processutils():
    from oslo_concurrency import processutils
    return processutils


def _mask(text: str) -> str:
    from oslo_utils import strutils
    return strutils.mask_password(text)


def __getattr__(name: str):
    # ``runner.ProcessExecutionError``, for a caller's except clause,
    # without importing processutils before a command fails.
    if name == "ProcessExecutionError":
        return _processutils().ProcessExecutionError
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def _replaced_execute():
    """processutils.execute when something replaced it (a consumer's test
    fixture), else None: not loaded yet, it cannot have been replaced, and
    the genuine function is the one its module defines.
    """
    processutils = sys.modules.get(_PROCESSUTILS)
    if processutils is None:
        return None
    execute = processutils.execute
    if getattr(execute, "__globals__", None) is vars(processutils) and (
            execute.__name__ == "execute"):
        return None
    return execute


class _Masked:
    """A command line for a debug message, passwords masked only if the
    message is shown.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return _mask(self.text)


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """How a command ended.

    :param exit_code: the exit status (negative: killed by that signal).
    :param stdout: the standard output, decoded.
    :param stderr: the standard error, decoded.
    :param cancelled: True when :meth:`Runner.stream` stopped the command
        because its cancel event was set.
    """

    exit_code: int
    stdout: str
    stderr: str
    cancelled: bool = False


#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for a child process, and its tie to its caller.

    They are set in the child just before the program starts (no helper
    process is spawned).

    :param address_space: bytes of address space (``RLIMIT_AS``).
    :param cpu_time: seconds of CPU time (``RLIMIT_CPU``); the kernel kills
        the process with SIGKILL when it is used up.
    :param file_size: the largest file the process may write, in bytes
        (``RLIMIT_FSIZE``); writing past it kills it with SIGXFSZ.
    :param die_with_parent: the child gets SIGKILL when the thread that
        started it dies (``PR_SET_PDEATHSIG``), and runs in a process group
        of its own, so it never outlives its caller, whatever kills the
        caller, and a signal meant for the caller's group is the caller's
        to handle (it stops the child itself).
    """

    address_space: int | None = None
    cpu_time: int | None = None
    file_size: int | None = None
    die_with_parent: bool = True

    _NO_MEMORY = re.compile(
        r"cannot allocate memory|failed to (?:allocate|map)|out of memory|"
        r"resource temporarily unavailable", re.IGNORECASE)
    _TOO_LARGE = re.compile(r"file too large", re.IGNORECASE)

    def preexec(self) -> collections.abc.Callable[[], None]:
        """A ``preexec_fn`` that applies these limits; call it in the
        parent, just before starting the child (it notes the parent's pid,
        to notice a parent that died before the child was tied to it).
        """
        parent = os.getpid()

        def setup():
            if self.die_with_parent:
                os.setpgid(0, 0)
                _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != parent:
                    # The caller died before the tie was made.
                    os._exit(255)
            self.apply()
        return setup

    def apply(self) -> None:
        """Set the resource limits on the calling process."""
        if self.address_space:
            resource.setrlimit(resource.RLIMIT_AS,
                               (self.address_space, self.address_space))
        if self.cpu_time:
            resource.setrlimit(resource.RLIMIT_CPU,
                               (self.cpu_time, self.cpu_time))
        if self.file_size:
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (self.file_size, self.file_size))

    def exceeded(self, exit_code: int | None, stderr: str) -> str | None:
        """Return which limit a failed process most likely hit, or None.

        The answer is ``"cpu_time"``, ``"address_space"`` or
        ``"file_size"``.

        Running out of CPU time ends in SIGKILL (or SIGXCPU); writing past
        the file size limit in SIGXFSZ (or, where it is ignored, "File too
        large"); running out of address space in an abort (a failed
        allocation or thread creation) or an allocation error message.
        """
        if self.cpu_time and exit_code in (-signal.SIGKILL, -signal.SIGXCPU):
            return "cpu_time"
        if self.file_size and (exit_code == -signal.SIGXFSZ or
                               self._TOO_LARGE.search(stderr or "")):
            return "file_size"
        if self.address_space and (exit_code == -signal.SIGABRT or
                                   self._NO_MEMORY.search(stderr or "")):
            return "address_space"
        return None


class Runner:
    """Runs commands given as argv lists (never through a shell).

    :param execute: a function with the signature of
        :func:`oslo_concurrency.processutils.execute`; defaults to it.  When
        one is given, :meth:`stream` runs through it too, so every command
        goes through the caller's function: output then arrives in one
        piece when the command ends, and cancellation is only noticed
        before it starts.
    """

    def __init__(self, execute: collections.abc.Callable | None = None
                 ) -> None:
        self._custom = execute is not None
        # None: no function of the caller's; processutils is not needed.
        self._execute = execute or _replaced_execute()
        # Commands are started here rather than through
        # processutils.execute, which would cost its import (see above) and
        # always a preexec_fn (to reset SIGPIPE, which restore_signals does
        # too): without one, subprocess starts the program with
        # vfork/posix_spawn instead of copying the whole Python process,
        # which costs milliseconds per command; with one (resource limits)
        # the program runs exactly as processutils would run it.  A
        # patched processutils.execute (a consumer's test fixture) is still
        # used.
        self._direct = self._execute is None

    def execute(self, argv: collections.abc.Sequence[str], *,
                ok_codes: collections.abc.Collection[int] = (0,),
                preexec_fn: collections.abc.Callable | None = None
                ) -> ProcessResult:
        """Run ``argv`` to completion.

        :param argv: the program and its arguments.
        :param ok_codes: exit codes that are a result, not a failure.
        :param preexec_fn: called in the child before the program starts
            (for example to set resource limits: see :meth:`Limits.preexec`).
            Unless an ``execute`` function was given to the runner, the
            program is started directly rather than through processutils;
            the result and the errors are the same.
        :returns: a :class:`ProcessResult`.
        :raises oslo_concurrency.processutils.ProcessExecutionError: the
            command exited with a code not in ``ok_codes``.
        :raises OSError: the command could not be started.
        """
        argv = [str(arg) for arg in argv]
        try:
            if self._direct:
                stdout, stderr = _run(argv, preexec_fn)
            else:
                stdout, stderr = self._execute(*argv, check_exit_code=[0],
                                               preexec_fn=preexec_fn)
        except _processutils().ProcessExecutionError as exc:
            if exc.exit_code not in ok_codes:
                raise
            return ProcessResult(exc.exit_code, exc.stdout or "",
                                 exc.stderr or "")
        return ProcessResult(0, stdout or "", stderr or "")

    def stream(self, argv: collections.abc.Sequence[str],
               on_output: collections.abc.Callable[[str], None],
               cancel: threading.Event | None = None, *,
               ok_codes: collections.abc.Collection[int] = (0,),
               preexec_fn: collections.abc.Callable | None = None
               ) -> ProcessResult:
        """Run ``argv``, passing its standard output to ``on_output``.

        :param argv: the program and its arguments.
        :param on_output: called with each piece of standard output as it
            arrives (text, not split into lines).  If it raises, the command
            is stopped and the exception propagates.
        :param cancel: when set (from any thread), the command is stopped
            (SIGTERM, then SIGKILL after a grace period) and the result
            says ``cancelled``.
        :param ok_codes: exit codes that are a result, not a failure.
        :param preexec_fn: called in the child before the program starts.
        :returns: a :class:`ProcessResult`.
        :raises oslo_concurrency.processutils.ProcessExecutionError: the
            command exited with a code not in ``ok_codes``.
        :raises OSError: the command could not be started.
        """
        argv = [str(arg) for arg in argv]
        if cancel is not None and cancel.is_set():
            return ProcessResult(-1, "", "", cancelled=True)
        if self._custom:
            result = self.execute(argv, ok_codes=ok_codes,
                                  preexec_fn=preexec_fn)
            if result.stdout:
                on_output(result.stdout)
            return result
        cmd = shlex.join(argv)
        LOG.debug("Running cmd (streaming): %s", cmd)
        start = time.monotonic()
        proc = subprocess.Popen(  # argv list, no shell
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, close_fds=True, preexec_fn=preexec_fn)
        try:
            stdout, stderr, cancelled = _pump(proc, on_output, cancel)
        except BaseException:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
            proc.stderr.close()
        LOG.debug('CMD "%s" %s: %s in %0.3fs', cmd,
                  "cancelled" if cancelled else "returned", proc.returncode,
                  time.monotonic() - start)
        if cancelled:
            return ProcessResult(proc.returncode, stdout, stderr,
                                 cancelled=True)
        if proc.returncode not in ok_codes:
            raise _processutils().ProcessExecutionError(
                stdout=stdout, stderr=stderr, exit_code=proc.returncode,
                cmd=cmd)
        return ProcessResult(proc.returncode, stdout, stderr)


def _run(argv, preexec_fn=None):
    """Run ``argv`` as ``processutils.execute(*argv, preexec_fn=...)``
    would.

    Output is decoded, and a failure is reported (with passwords masked),
    exactly as processutils does it, so callers cannot tell the two apart.
    ``preexec_fn`` runs in the child, after subprocess has restored the
    signals Python ignores (SIGPIPE, SIGXFSZ) to their defaults, as
    processutils' own set-up does for SIGPIPE.

    :returns: (stdout, stderr).
    :raises oslo_concurrency.processutils.ProcessExecutionError: the
        command exited with a code other than 0.
    :raises OSError: the command could not be started.
    """
    cmd = _Masked(" ".join(argv))
    LOG.debug("Running cmd (subprocess): %s", cmd)
    start = time.monotonic()
    proc = subprocess.run(  # argv list, no shell
        tuple(argv), stdin=subprocess.DEVNULL, capture_output=True,
        close_fds=True, check=False, preexec_fn=preexec_fn)
    LOG.debug('CMD "%s" returned: %s in %0.3fs', cmd, proc.returncode,
              time.monotonic() - start)
    stdout = os.fsdecode(proc.stdout)
    stderr = os.fsdecode(proc.stderr)
    if proc.returncode != 0:
        raise _processutils().ProcessExecutionError(
            exit_code=proc.returncode, stdout=_mask(stdout),
            stderr=_mask(stderr), cmd=str(cmd))
    return stdout, stderr


def _pump(proc, on_output, cancel):
    """Read both pipes until EOF and the process has exited, or cancel.

    :returns: (stdout, stderr, cancelled).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, err = [], []
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            if cancel is not None and cancel.is_set():
                _stop(proc)
                return "".join(out), _decode(err), True
            for key, _events in selector.select(POLL_INTERVAL):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                elif key.data is out:
                    text = decoder.decode(data)
                    out.append(text)
                    if text:
                        on_output(text)
                else:
                    err.append(data)
    tail = decoder.decode(b"", final=True)
    if tail:
        out.append(tail)
        on_output(tail)
    while True:
        try:
            proc.wait(timeout=POLL_INTERVAL)
            break
        except subprocess.TimeoutExpired:
            if cancel is not None and cancel.is_set():
                _stop(proc)
                return "".join(out), _decode(err), True
    return "".join(out), _decode(err), False


def _decode(chunks):
    return b"".join(chunks).decode("utf-8", errors="replace")


def _stop(proc):
    """Terminate ``proc`` and reap it, killing it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
