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

"""The runner with tiny real programs: streaming, cancelling, limits."""

import os
import resource
import signal
import subprocess
import sys
import threading
import time

from oslo_concurrency import processutils
import pytest

from imagebackend.qemu import runner


#: seconds the programs below sleep when not stopped; a stopped one is
#: gone in half of that, however loaded the machine
SLEEP = 60


def python(code):
    return [sys.executable, "-c", code]


def test_output_arrives_while_the_program_runs_and_cancel_stops_it():
    cancel = threading.Event()
    seen = []

    def on_output(text):
        seen.append(text)
        cancel.set()

    start = time.monotonic()
    result = runner.Runner().stream(
        python("import sys, time\n"
               "sys.stdout.write('    (1.00/100%)\\r'); sys.stdout.flush()\n"
               f"time.sleep({SLEEP})\n"), on_output, cancel)
    assert seen == ["    (1.00/100%)\r"]
    assert result.cancelled
    assert result.exit_code < 0
    assert time.monotonic() - start < SLEEP / 2


def test_a_program_ignoring_sigterm_is_killed(monkeypatch):
    monkeypatch.setattr(runner, "TERMINATE_GRACE", 0.5)
    cancel = threading.Event()
    result = runner.Runner().stream(
        python("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "print('ready', flush=True)\n"
               "time.sleep(60)\n"), lambda text: cancel.set(), cancel)
    assert result.cancelled
    assert result.exit_code == -9


def test_a_failing_stream_raises_with_its_stderr():
    with pytest.raises(processutils.ProcessExecutionError) as err:
        runner.Runner().stream(
            python("import sys; print('half'); sys.exit('it broke')"),
            lambda text: None)
    assert err.value.exit_code == 1
    assert "it broke" in err.value.stderr
    assert err.value.stdout == "half\n"


def test_a_callback_error_stops_the_program_and_propagates():
    def on_output(text):
        raise RuntimeError("no more")

    start = time.monotonic()
    with pytest.raises(RuntimeError):
        runner.Runner().stream(
            python("import time; print('x', flush=True); "
                   f"time.sleep({SLEEP})"),
            on_output)
    assert time.monotonic() - start < SLEEP / 2


def test_stream_of_a_missing_program_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        runner.Runner().stream([str(tmp_path / "nothing")], print)


def test_limits_apply_to_the_child_only():
    before = resource.getrlimit(resource.RLIMIT_CPU)
    code = ("import resource; "
            "print(resource.getrlimit(resource.RLIMIT_CPU), "
            "resource.getrlimit(resource.RLIMIT_AS))")
    limits = runner.Limits(address_space=2 << 30, cpu_time=7)
    out = runner.Runner().execute(python(code), preexec_fn=limits.apply)
    assert out.stdout.strip() == "(7, 7) (%d, %d)" % (2 << 30, 2 << 30)
    streamed = runner.Runner().stream(python(code), lambda text: None,
                                      preexec_fn=limits.apply)
    assert streamed.stdout == out.stdout
    assert resource.getrlimit(resource.RLIMIT_CPU) == before


def test_accepted_exit_codes_are_results():
    result = runner.Runner().execute(python("import sys; sys.exit(3)"),
                                     ok_codes=(0, 3))
    assert result.exit_code == 3
    streamed = runner.Runner().stream(python("import sys; sys.exit(3)"),
                                      lambda text: None, ok_codes=(0, 3))
    assert streamed.exit_code == 3 and not streamed.cancelled


@pytest.mark.parametrize("code", [
    "import sys; print('half'); sys.exit('it broke')",
    "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
])
@pytest.mark.parametrize("limits", [None, runner.Limits(cpu_time=30)])
def test_a_command_fails_exactly_as_through_processutils(code, limits):
    preexec_fn = limits.preexec() if limits else None
    with pytest.raises(processutils.ProcessExecutionError) as expected:
        processutils.execute(*python(code), preexec_fn=preexec_fn)
    with pytest.raises(processutils.ProcessExecutionError) as err:
        runner.Runner().execute(python(code), preexec_fn=preexec_fn)
    assert (err.value.exit_code, err.value.stdout, err.value.stderr,
            err.value.cmd) == (expected.value.exit_code,
                               expected.value.stdout, expected.value.stderr,
                               expected.value.cmd)
    assert err.value.exit_code != 0


def test_a_plain_command_gets_default_sigpipe_and_no_stdin():
    # Python ignores SIGPIPE; the programs it starts must not inherit that.
    status = runner.Runner().execute(["grep", "SigIgn", "/proc/self/status"])
    assert not int(status.stdout.split()[1], 16) & (1 << signal.SIGPIPE - 1)
    result = runner.Runner().execute(python("import sys; "
                                            "print(repr(sys.stdin.read()))"))
    assert result == runner.ProcessResult(0, "''\n", "")


def test_execute_of_a_missing_program_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        runner.Runner().execute([str(tmp_path / "nothing")])


def test_a_child_dies_with_its_parent_and_has_its_own_group():
    # A parent that starts a long child, reports its pid, then is killed.
    code = ("import sys, time\n"
            "from imagebackend.qemu import runner\n"
            "limits = runner.Limits()\n"
            "runner.Runner().stream([sys.executable, '-c', "
            "'import os, time; print(os.getpid(), os.getpgid(0), "
            "flush=True); time.sleep(60)'], "
            "lambda text: print(text, end='', flush=True), "
            "preexec_fn=limits.preexec())\n")
    parent = subprocess.Popen(python(code), stdout=subprocess.PIPE,
                              text=True)
    try:
        pid, pgid = map(int, parent.stdout.readline().split())
        assert pgid == pid != os.getpgid(0)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()
