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

"""The stress run's summary: what was tried, and that nothing was lost.

Printed at the end of the run and, when ``IMAGEBACKEND_STRESS_REPORT``
names a file, written there as JSON (``tox -e stress`` does).
"""

import json
import os

import pytest

from tests.stress import harness


def summary_lines(data: dict) -> list[str]:
    """The summary of :meth:`harness.Stats.to_dict` as text lines."""
    lines = ["seed %s, N=%d (replay: IMAGEBACKEND_STRESS_SEED=%s "
             "IMAGEBACKEND_STRESS_N=%d)"
             % (data["seed"], data["n"], data["seed"], data["n"])]
    for section, counts in data["counts"].items():
        total = sum(counts.values())
        lines.append("%s: %d" % (section, total))
        for key, count in counts.items():
            lines.append("    %-44s %d" % (key, count))
    broken = sum(data["problems"].values())
    lines.append("broken invariants: %d%s" % (
        broken, " (%s)" % ", ".join("%s: %d" % kv for kv in
                                    sorted(data["problems"].items()))
        if broken else " -- nothing lost"))
    return lines


def pytest_configure(config):
    # pytest-xdist workers start after this, from this environment: all of
    # them then draw from the seed the summary prints.
    if not hasattr(config, "workerinput"):
        os.environ[harness.SEED_ENV] = harness.SEED


def pytest_sessionfinish(session):
    # On a pytest-xdist worker: hand the figures to the controller.
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["stress_stats"] = harness.STATS.to_dict()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    data = getattr(node, "workeroutput", {}).get("stress_stats")
    if data:
        harness.STATS.merge(data)


def pytest_terminal_summary(terminalreporter):
    data = harness.STATS.to_dict()
    if not data["counts"] and not data["problems"]:
        return
    terminalreporter.section("imagebackend stress summary")
    for line in summary_lines(data):
        terminalreporter.write_line(line)
    path = os.environ.get("IMAGEBACKEND_STRESS_REPORT")
    if path:
        data["summary"] = summary_lines(data)
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        terminalreporter.write_line("written to %s" % path)
