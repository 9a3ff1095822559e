"""Processes for the functional tests' servers: the virtualenv they run
from, gunicorn process groups, and one-shot setup commands.

Every process started here dies with the test process (``PR_SET_PDEATHSIG``)
and a server is stopped with its whole process group, so a test run leaves
nothing behind even when it is killed.
"""

import contextlib
import ctypes
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

LOG = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
SETUP_SCRIPT = REPO_ROOT / "tools" / "glance-servers" / "setup-venv.sh"
VENV_ENV = "IMAGEBACKEND_SERVERS_VENV"
DEFAULT_VENV = pathlib.Path.home() / ".cache" / "imagebackend" / "servers-venv"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


class ServersUnavailable(Exception):
    """The server virtualenv could not be installed; tests should skip."""


class ServerFailed(RuntimeError):
    """A server could not be set up or did not come up."""


def venv_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def ensure_venv() -> pathlib.Path:
    """Install (or check) the server virtualenv.

    :returns: the virtualenv's path.
    :raises ServersUnavailable: the setup script failed; its output is in
        the message.
    """
    venv = venv_path()
    env = dict(os.environ, **{VENV_ENV: str(venv)})
    try:
        proc = subprocess.run(["bash", str(SETUP_SCRIPT)], env=env,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServersUnavailable(
            "cannot run %s: %s" % (SETUP_SCRIPT, exc)) from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise ServersUnavailable(
            "%s failed (exit %d); Keystone and Glance cannot be installed "
            "into %s:\n%s" % (SETUP_SCRIPT, proc.returncode, venv, tail))
    LOG.info("%s", proc.stdout.strip())
    return venv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(venv: pathlib.Path, **extra) -> dict:
    """The environment for a server process: this one without anything
    that would make the venv's Python import the tests' packages or read
    another cloud's credentials, with the venv first on PATH.
    """
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
           and not key.startswith("OS_")}
    env["PATH"] = "%s:%s" % (pathlib.Path(venv) / "bin", env.get("PATH", ""))
    env.update(extra)
    return env


def gunicorn_argv(venv: pathlib.Path, app: str, port: int, threads: int,
                  *extra: str) -> list[str]:
    """gunicorn serving ``app`` on 127.0.0.1:``port`` with one gthread
    worker.
    """
    return [str(pathlib.Path(venv) / "bin" / "gunicorn"),
            "--bind", "127.0.0.1:%d" % port,
            "--workers", "1", "--worker-class", "gthread",
            "--threads", str(threads),
            "--timeout", "300", "--graceful-timeout", "3",
            "--no-control-socket",
            *extra, app]


def spawn(argv: list[str], env: dict, log_path: pathlib.Path,
          niceness: int = 0) -> subprocess.Popen:
    """Start a one-shot command with its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(nice(niceness) + argv, env=env,
                                stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)


def nice(niceness: int) -> list[str]:
    return ["nice", "-n", str(niceness)] if niceness else []


def die_with_parent():
    """In the child before exec: get SIGTERM when the test process dies,
    so a test run killed outright leaves no server behind (gunicorn's
    workers follow their master).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG,
                                                signal.SIGTERM)


class GunicornServer:
    """One gunicorn process group, logging to a file."""

    def __init__(self, name, argv, env, log_path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc = None

    def start(self):
        with open(self.log_path, "ab") as log:
            # A session of its own, so that stop() can signal the master
            # and all its workers together, and nothing else.
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, url, deadline):
        while time.monotonic() < deadline:
            if not self.running:
                raise ServerFailed("%s exited during start (code %s):\n%s"
                                   % (self.name, self.proc.returncode,
                                      self.log_tail()))
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    resp.read()
                    return
            except urllib.error.HTTPError:
                # Any HTTP answer (300 for version lists) means it serves.
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise ServerFailed("%s did not answer on %s within %.0f s:\n%s"
                           % (self.name, url, START_TIMEOUT, self.log_tail()))

    def interrupt(self):
        """Ask gunicorn for its quick shutdown (test servers need no
        draining); :meth:`stop` waits for it.
        """
        if self.proc is not None and self.proc.returncode is None:
            self._signal_group(self.proc.pid, signal.SIGINT)

    def stop(self):
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.returncode is None:
            self.interrupt()
            if not self._exited(pid, STOP_TIMEOUT):
                LOG.warning("%s did not stop in %.0f s; killing it",
                            self.name, STOP_TIMEOUT)
        # Whatever is left of the group (workers of a master that died or
        # hung).  The master is not reaped yet, so its group id cannot
        # have been reused by an unrelated process.
        self._signal_group(pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    @staticmethod
    def _exited(pid, timeout):
        """Wait for ``pid`` to exit without reaping it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG
                             | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:
                return True
            time.sleep(0.05)
        return False

    @staticmethod
    def _signal_group(pgid, signum):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    def log_tail(self, lines=30):
        try:
            text = pathlib.Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
