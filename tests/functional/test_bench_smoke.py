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

"""The benchmark (``benchmarks/bench.py``) still runs, on tiny images.

Benchmarks are not tests: nothing here looks at how long anything took.
What is checked is that every scenario reports its numbers, and that the
counts the benchmark reports (processes, downloads, conversions, allocated
blocks) say what the library promises.
"""

import importlib
import json
import numbers
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench.py"

# Processes of the concurrent scenarios.
CONCURRENCY = 8
TIMED = ("warm-qcow2", "warm-cached-base", "cold-qcow2-image",
         "cold-raw-image", "raw-backend", "concurrent-one-image",
         "concurrent-images", "glance-download")


@pytest.fixture(scope="module")
def session_servers(request):
    """The run's Keystone and Glance (conftest.py), or None where they are
    skipped (never under CI: there the fixture fails).
    """
    try:
        return request.getfixturevalue("openstack_servers")
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, session_servers):
    if not BENCH.is_file():
        pytest.skip("benchmarks/bench.py is not in this tree")
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.json"
    # Eight processes still race for one image, and two for each of the
    # four images of concurrent-images; sixteen cost a third more CPU.
    argv = [sys.executable, str(BENCH), "--quick", "--repeat", "1",
            "--concurrency", str(CONCURRENCY), "--workdir", str(work),
            "--json", str(out)]
    if session_servers is not None:
        # The benchmark uses the run's servers rather than starting a
        # second pair; the file holds their passwords: owner-only.
        described = tmp_path_factory.mktemp("bench-servers") / "servers.json"
        fd = os.open(described, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(session_servers.endpoints(), f)
        argv += ["--servers", str(described)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    return {r["name"]: r for r in data["scenarios"]}, proc.stdout, work


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def test_every_timed_scenario_has_medians_and_a_ratio(bench_run):
    rows, _, _ = bench_run
    for name in TIMED:
        row = rows[name]
        assert _number(row["library_s"]["median"]), name
        assert _number(row["floor_s"]["median"]), name
        assert _number(row["ratio"]), name
        assert row["best_ratio"] == pytest.approx(
            row["library_s"]["min"] / row["floor_s"]["min"]), name
        assert _number(row["processes"]), name
        assert isinstance(row["met"], bool), name


def test_a_target_is_met_only_by_both_the_medians_and_the_best_runs(
        monkeypatch):
    if not BENCH.is_file():
        pytest.skip("benchmarks/bench.py is not in this tree")
    monkeypatch.syspath_prepend(str(REPO))
    harness = importlib.import_module("benchmarks.harness")
    # Floor runs stalled four times out of seven: its median is inflated.
    lib = [0.43, 1.15, 0.43, 2.24, 0.39, 1.29, 0.41]
    floor = [1.04, 1.26, 0.19, 0.19, 0.18, 1.02, 1.32]
    row = harness.row("x", "", "", "", lib, [[]] * 7, {"floor": floor})
    assert row["ratio"] < 1.15
    assert row["best_ratio"] > 2
    assert not harness.within(row, 1.15)
    assert harness.within(row, 2.5)


def test_memory_scenario_reports_peak_rss(bench_run):
    rows, _, _ = bench_run
    assert _number(rows["memory"]["peak_rss_mib"])
    assert rows["memory"]["peak_rss_mib"] > 0
    assert _number(rows["memory"]["library_s"]["median"])


def test_glance_row_uses_the_runs_own_servers(bench_run, session_servers):
    if session_servers is None:
        pytest.skip("Keystone and Glance are not available")
    rows, _, _ = bench_run
    row = rows["glance-download"]
    assert row["servers"] == "given"
    # The image it measured was uploaded to this run's Glance.
    image = session_servers.image_get(row["glance_image_id"])
    assert (image["name"], image["status"]) == ("bench", "active")


def test_glance_row_measures_a_real_download(bench_run):
    rows, _, _ = bench_run
    row = rows["glance-download"]
    assert row["image_bytes"] > 0
    assert row["throughput_mib_s"] > 0 and row["floor_throughput_mib_s"] > 0
    # The verified floor hashed the very bytes Glance recorded.
    assert row["verified_floor_throughput_mib_s"] > 0
    assert row["verified_floor_hash_matches"] is True
    # No process but curl's floor: the library downloads in-process.
    assert row["spawned"] == []


def test_cold_rows_are_judged_against_their_durable_floor(bench_run):
    rows, _, _ = bench_run
    for name, limit in (("cold-qcow2-image", 1.15), ("cold-raw-image", 1.1)):
        row = rows[name]
        assert row["met"] == (row["ratio_durable_floor"] <= limit
                              and row["best_ratio_durable_floor"] <= limit)
        assert row["step_s"]["fetch"] > 0


def test_warm_glance_create_sends_one_request(bench_run):
    rows, _, _ = bench_run
    row = rows["glance-warm-lookup"]
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert row["requests_per_create"] == [1]
    assert row["create_requests_example"][0].startswith(
        "glance GET /v2/images/")
    assert [r["request"].split(" /")[0] for r in
            row["first_create_requests"]] == [
        "keystone GET", "keystone POST", "glance GET"]
    assert len(row["cli_requests"]) == 3


def test_table_has_a_row_per_scenario(bench_run):
    rows, stdout, _ = bench_run
    first_words = {line.split(" ", 1)[0] for line in stdout.splitlines()}
    assert set(rows) <= first_words


def test_warm_disk_spawns_no_process(bench_run):
    rows, _, _ = bench_run
    for name in ("warm-qcow2", "warm-cached-base"):
        # A copy of the overlay template the first create made.
        assert rows[name]["spawned"] == [], name
        assert rows[name]["qemu_img_runs"] == {}, name
        assert rows[name]["processes"] == 0, name


def test_concurrent_creates_download_and_convert_each_image_once(bench_run):
    rows, _, _ = bench_run
    assert rows["concurrent-one-image"]["downloads"] == 1
    assert rows["concurrent-one-image"]["conversions"] == 1
    assert rows["concurrent-images"]["downloads"] == 4
    assert rows["concurrent-images"]["conversions"] == 4


def test_concurrent_creates_really_ran_at_once(bench_run):
    """Every worker of each concurrent run began its create before the
    first one was done (in every run of the scenario), so the single
    download and conversion above were shared by racing creates, not
    reused by creates that came after.
    """
    rows, _, _ = bench_run
    for name in ("concurrent-one-image", "concurrent-images"):
        row = rows[name]
        assert row["overlapping"] == CONCURRENCY, (name, row)
        assert row["overlap_s"] > 0, (name, row)


def test_raw_disk_allocates_no_more_than_its_base(bench_run):
    rows, _, _ = bench_run
    allocated = rows["raw-backend"]["allocated_bytes"]
    assert 0 < allocated["disk"] <= allocated["base"]
    assert rows["raw-backend"]["spawned"] == []


def test_work_directory_is_removed(bench_run):
    _, _, work = bench_run
    assert [p.name for p in work.iterdir()] == ["results.json"]
