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

"""Faults the stress tests inject and watch for: SIGKILL at a chosen step
of a running command (read from the files it has left so far), and opens
of a file by any process (inotify).
"""

import ctypes
import ctypes.util
import dataclasses
import os
import re
import signal
import struct
import time

from tests.stress import harness

# -- killing a command at a chosen step ------------------------------------

#: the steps of a create, in the order they happen, as seen on disk.
STEPS = ("startup", "fetch", "convert", "cache", "prepare", "extend",
         "overlay", "published")
_RANK = {s: i for i, s in enumerate(STEPS)}


@dataclasses.dataclass
class StepWatch:
    """Tells which step of creating ``target`` from image ``cid`` is in
    progress, from the files it left so far.  It knows nothing of the
    scratch names beyond their usual words (``part``, ``conver``), so it
    keeps working when the names change.
    """

    base_dir: str
    target: str
    cid: str

    def __post_init__(self) -> None:
        self.before_base = set(self._list(self.base_dir))
        self.before_dir = set(self._list(os.path.dirname(self.target)))

    @staticmethod
    def _list(path):
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def step(self) -> str:
        tdir = set(self._list(os.path.dirname(self.target)))
        name = os.path.basename(self.target)
        if tdir - self.before_dir - {name}:
            return "overlay"
        if name in tdir:
            return "published"
        new = [n for n in set(self._list(self.base_dir)) - self.before_base
               if self.cid in n]
        scratch = [n for n in new if not harness.FINAL_RE.match(n)
                   and not n.endswith((".json", ".json.tmp"))]
        if any("conver" in n for n in scratch):
            return "convert"
        if any(re.search(r"%s(-[0-9]+)?_[0-9]+" % self.cid, n)
               for n in scratch):
            return "extend"
        if scratch:
            return "fetch"
        finals = [n for n in new if harness.FINAL_RE.match(n)]
        if finals:
            return "prepare"
        if any(n.endswith((".json", ".json.tmp")) for n in new):
            return "cache"
        return "startup"


@dataclasses.dataclass
class Timeline:
    """When each step was seen during a run, relative to its start."""

    wall: float = 0.0
    seen: dict = dataclasses.field(default_factory=dict)

    def window(self, step: str) -> tuple[float, float]:
        return self.seen[step]


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group.
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def calibrate(dep: harness.Deployment, argv, watch: StepWatch) -> Timeline:
    """Run ``argv`` to the end, noting when each step was seen."""
    line = Timeline()
    proc = dep.popen(*argv)
    start = time.monotonic()
    while proc.poll() is None:
        now = time.monotonic() - start
        step = watch.step()
        first, _ = line.seen.get(step, (now, now))
        line.seen[step] = (first, now)
        time.sleep(0.001)
    out, err = proc.communicate()
    line.wall = time.monotonic() - start
    assert proc.returncode == 0, err
    return line


@dataclasses.dataclass
class Kill:
    """The outcome of :func:`run_and_kill`."""

    step: str | None            # None: the command ended first
    returncode: int | None = None
    survivors: list = dataclasses.field(default_factory=list)
    stderr: str = ""


def run_and_kill(dep: harness.Deployment, argv, watch: StepWatch, *,
                 at_step=None, delay: float = 0.0,
                 leader_only: bool = False) -> Kill:
    """Start ``argv``; once step ``at_step`` is seen (or at once), wait
    ``delay`` seconds and SIGKILL it -- the whole process group, as a host
    crash would, or with ``leader_only`` just the command, as the OOM
    killer would (then no child may outlive it).  The group is stopped
    first so the step in progress can be read at the instant of the kill.
    """
    proc = dep.popen(*argv)
    if at_step is not None:
        while proc.poll() is None and _RANK[watch.step()] < _RANK[at_step]:
            time.sleep(0.0005)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(min(0.001, max(0.0, end - time.monotonic())))
    try:
        os.killpg(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass
    if proc.poll() is not None:
        _, err = proc.communicate()
        _cont(proc.pid)
        return Kill(step=None, returncode=proc.returncode, stderr=err)
    step = watch.step()
    survivors = []
    if leader_only:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _cont(proc.pid)
        deadline = time.monotonic() + 3
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = group_members(proc.pid)
    _kill_group(proc.pid)
    proc.communicate()
    return Kill(step=step, returncode=proc.returncode, survivors=survivors)


def _cont(pgid):
    try:
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


# -- watching a file being opened -------------------------------------------

_IN_ACCESS = 0x1
_IN_OPEN = 0x20
_IN_NONBLOCK = 0o4000
_libc = None


def _inotify():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


class OpenWatch:
    """Counts opens and reads of files (by any process) with inotify: the
    proof that a host secret was never read on a tenant's behalf.
    """

    def __init__(self, *paths: str) -> None:
        libc = _inotify()
        self.fd = libc.inotify_init1(_IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.paths = {}
        for path in paths:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(path),
                                        _IN_OPEN | _IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "cannot watch", path)
            self.paths[wd] = path
        self.events: list[str] = []

    def opened(self) -> list[str]:
        """The watched files opened or read since the last call."""
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data,
                                                         offset)
                offset += 16 + length
                found.append("%s (%s)" % (self.paths.get(wd, wd),
                                          "open" if mask & _IN_OPEN
                                          else "read"))
        self.events += found
        return found

    def close(self) -> None:
        os.close(self.fd)
