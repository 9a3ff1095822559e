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

"""The runner's contract, with processutils mocked (no processes)."""

import logging
import signal
import threading
from unittest import mock

from oslo_concurrency import processutils
import pytest

from imagebackend.qemu import runner


@pytest.fixture
def execute():
    with mock.patch.object(processutils, "execute",
                           autospec=True) as fake:
        fake.return_value = ("out", "err")
        yield fake


def test_execute_runs_the_argv_through_processutils(execute):
    result = runner.Runner().execute(["prog", "a b", 3])
    assert execute.call_args.args == ("prog", "a b", "3")
    assert execute.call_args.kwargs["check_exit_code"] == [0]
    assert result == runner.ProcessResult(0, "out", "err")


def test_an_accepted_exit_code_is_a_result(execute):
    execute.side_effect = processutils.ProcessExecutionError(
        stdout="{}", stderr="leaks", exit_code=3, cmd="prog")
    result = runner.Runner().execute(["prog"], ok_codes=(0, 3))
    assert result == runner.ProcessResult(3, "{}", "leaks")


def test_another_exit_code_raises(execute):
    execute.side_effect = processutils.ProcessExecutionError(exit_code=1)
    with pytest.raises(processutils.ProcessExecutionError):
        runner.Runner().execute(["prog"], ok_codes=(0, 3))


def test_a_custom_execute_function_is_used_for_streams_too():
    custom = mock.create_autospec(processutils.execute,
                                  return_value=("(50.00/100%)\r", ""))
    seen = []
    result = runner.Runner(custom).stream(["prog"], seen.append,
                                          threading.Event())
    assert custom.call_args.args == ("prog",)
    assert seen == ["(50.00/100%)\r"]
    assert not result.cancelled


def test_a_stream_cancelled_before_it_starts_runs_nothing():
    custom = mock.create_autospec(processutils.execute)
    cancel = threading.Event()
    cancel.set()
    result = runner.Runner(custom).stream(["prog"], print, cancel)
    assert result.cancelled
    assert not custom.called


def test_limits_are_set_in_the_calling_process():
    limits = runner.Limits(address_space=1 << 30, cpu_time=30)
    with mock.patch("resource.setrlimit", autospec=True) as setrlimit:
        limits.apply()
    assert setrlimit.call_args_list == [
        mock.call(runner.resource.RLIMIT_AS, (1 << 30, 1 << 30)),
        mock.call(runner.resource.RLIMIT_CPU, (30, 30))]
    with mock.patch("resource.setrlimit", autospec=True) as setrlimit:
        runner.Limits().apply()
    assert not setrlimit.called


@pytest.mark.parametrize("code,stderr,expected", [
    (-signal.SIGKILL, "", "cpu_time"),
    (-signal.SIGXCPU, "", "cpu_time"),
    (-signal.SIGABRT, "", "address_space"),
    (1, "qemu-img: Failed to allocate memory: Cannot allocate memory",
     "address_space"),
    (127, "error while loading shared libraries: libz.so.1: failed to map "
          "segment from shared object", "address_space"),
    (1, "qemu-img: Could not open 'x'", None),
])
def test_which_limit_a_failure_hit(code, stderr, expected):
    limits = runner.Limits(address_space=1 << 30, cpu_time=30)
    assert limits.exceeded(code, stderr) == expected


def test_no_limit_is_blamed_when_none_was_set():
    assert runner.Limits().exceeded(-signal.SIGKILL, "out of memory") is None


@pytest.fixture
def run():
    with mock.patch.object(runner.subprocess, "run", autospec=True) as fake:
        fake.return_value = runner.subprocess.CompletedProcess(
            ["prog"], 0, b"out", b"err")
        yield fake


def test_a_plain_command_starts_without_a_preexec_fn(run):
    result = runner.Runner().execute(["prog", "a b", 3])
    assert run.call_args.args == (("prog", "a b", "3"),)
    assert run.call_args.kwargs.get("preexec_fn") is None
    assert run.call_args.kwargs["stdin"] == runner.subprocess.DEVNULL
    assert result == runner.ProcessResult(0, "out", "err")


def test_a_plain_command_failing_raises_like_processutils(run):
    run.return_value = runner.subprocess.CompletedProcess(
        ["prog"], 1, b"half", b"password=secret broke")
    with pytest.raises(processutils.ProcessExecutionError) as err:
        runner.Runner().execute(["prog", "--password", "secret"])
    assert err.value.exit_code == 1
    assert err.value.stdout == "half"
    assert "broke" in err.value.stderr
    assert "secret" not in err.value.stderr + err.value.cmd


def test_a_plain_command_with_an_accepted_exit_code_is_a_result(run):
    run.return_value = runner.subprocess.CompletedProcess(
        ["prog"], 3, b"{}", b"leaks")
    result = runner.Runner().execute(["prog"], ok_codes=(0, 3))
    assert result == runner.ProcessResult(3, "{}", "leaks")


def test_a_command_with_a_preexec_fn_starts_directly_with_it(run):
    # Resource limits need no processutils: the program is started here,
    # with the preexec_fn that sets them.
    limits = runner.Limits(cpu_time=5)
    result = runner.Runner().execute(["prog"], preexec_fn=limits.apply)
    assert run.call_args.args == (("prog",),)
    assert run.call_args.kwargs["preexec_fn"] == limits.apply
    assert run.call_args.kwargs["stdin"] == runner.subprocess.DEVNULL
    assert result == runner.ProcessResult(0, "out", "err")


def test_a_patched_processutils_execute_still_runs_limited_commands(
        run, execute):
    # A consumer's test fixture that replaced processutils.execute sees
    # every command, those with limits too.
    limits = runner.Limits(cpu_time=5)
    runner.Runner().execute(["prog"], preexec_fn=limits.apply)
    assert not run.called
    assert execute.call_args.kwargs["preexec_fn"] == limits.apply


def test_an_injected_execute_runs_every_command(run):
    custom = mock.create_autospec(processutils.execute,
                                  return_value=("out", ""))
    result = runner.Runner(custom).execute(["prog"])
    assert not run.called
    assert custom.call_args.args == ("prog",)
    assert result.stdout == "out"


@pytest.mark.parametrize("code,stderr", [
    (-signal.SIGXFSZ, ""),
    (1, "qemu-img: error while writing at byte 0: File too large"),
])
def test_a_write_past_the_file_size_limit_is_blamed_on_it(code, stderr):
    limits = runner.Limits(address_space=1 << 30, cpu_time=30,
                           file_size=1 << 20)
    assert limits.exceeded(code, stderr) == "file_size"
    assert runner.Limits(cpu_time=30).exceeded(code, stderr) is None


def test_the_file_size_limit_is_set_in_the_child():
    with mock.patch("resource.setrlimit", autospec=True) as setrlimit:
        runner.Limits(file_size=5 << 20).apply()
    assert setrlimit.call_args_list == [
        mock.call(runner.resource.RLIMIT_FSIZE, (5 << 20, 5 << 20))]


def test_the_debug_log_of_a_plain_command_masks_passwords(run, caplog):
    caplog.set_level(logging.DEBUG, logger=runner.__name__)
    runner.Runner().execute(["prog", "--password", "secret"])
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 2
    assert all("--password ***" in line for line in logged)
    assert not any("secret" in line for line in logged)
