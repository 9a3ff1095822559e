#!/usr/bin/env python3
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

"""Turn mutmut's results into doc/source/mutation.rst.

Two steps, both run by ``tox -e mutation``:

``--collect`` reads the per-file result records mutmut 3 leaves beside
each mutated copy (``mutants/<path>.meta``: the exit code of the tests run
against every mutant and how long they took) and writes one committed
summary per module, ``tools/mutation-results/<module>.json`` (exit codes,
durations, and the diff of every mutant not detected).  Only modules whose
mutants were all run are written unless ``--partial`` is given, so a
stopped run never replaces a complete result.

Rendering reads those summaries (not ``mutants/``, which is not kept), the
module list of ``setup.cfg [mutmut]`` and the hand-kept notes in
``tools/mutation-notes/*.ini`` (one file per module: the measured wall
clock of each run, the result before the tests that kill survivors, and
every surviving mutant judged equivalent with the reason).  It writes one
reStructuredText page: a kill-rate table per module, then every surviving
mutant with its diff, marked equivalent where the notes say so.  Run it
from the project root; ``--collect`` needs the ``mutation`` tox
environment (it imports mutmut to print the diffs).
"""

import argparse
import collections
import configparser
import glob
import json
import os
import sys

NOTES = os.path.join("tools", "mutation-notes")
RESULTS = os.path.join("tools", "mutation-results")

# mutmut 3's exit-code meanings (mutmut/stats.py); anything else is
# "suspicious".  A timeout or a crash of the tests counts as detected.
DETECTED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout",
            -24: "timeout", 152: "timeout", 255: "timeout",
            -11: "crashed", -9: "crashed", 37: "killed"}
NOT_TESTED = {5: "no tests", 33: "no tests", 34: "skipped"}


def read_notes(path):
    """Read the wall-clock and equivalence notes.

    :param path: the notes directory: every ``*.ini`` in it is read (one
        per module, so parallel work on two modules never edits one file).
    :returns: (durations, equivalent, before): dicts keyed by module path,
        by mutant name, and by module path (the result before the tests
        added to kill survivors).
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # mutant names are case-sensitive
    parser.read(sorted(glob.glob(os.path.join(path, "*.ini"))),
                encoding="utf-8")
    durations = dict(parser.items("durations")) \
        if parser.has_section("durations") else {}
    equivalent = dict(parser.items("equivalent")) \
        if parser.has_section("equivalent") else {}
    before = dict(parser.items("before")) \
        if parser.has_section("before") else {}
    return durations, equivalent, before


def modules_to_mutate(setup_cfg="setup.cfg"):
    """The module paths listed in ``setup.cfg [mutmut] only_mutate``.

    :returns: a list of paths relative to the project root.
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg)
    return [line.strip() for line in
            parser.get("mutmut", "only_mutate").splitlines() if line.strip()]


def summary_path(path, results_dir=RESULTS):
    """Where the committed summary of one module lives."""
    name = path[:-3] if path.endswith(".py") else path
    return os.path.join(results_dir, name.replace("/", ".") + ".json")


def collect(path, mutants_dir, partial=False, results_dir=RESULTS):
    """Write the committed summary of one module from mutmut's record.

    :param path: the module's path, e.g. ``imagebackend/disk/trust.py``.
    :param mutants_dir: mutmut's working tree (``mutants``).
    :param partial: also write when some mutants were not run.
    :returns: a short status string, or None when mutmut has no record.
    """
    meta = os.path.join(mutants_dir, path + ".meta")
    try:
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    codes = data.get("exit_code_by_key", {})
    not_run = sum(1 for code in codes.values() if code is None)
    if not_run == len(codes):
        return "nothing run"
    if not_run and not partial:
        return "%d of %d not run: kept the old summary" % (not_run,
                                                           len(codes))
    durations = {k: v for k, v in data.get("durations_by_key", {}).items()
                 if isinstance(v, (int, float))}
    diffs = {}
    cwd = os.getcwd()
    for name, code in codes.items():
        if code is not None and code not in DETECTED:
            os.chdir(os.path.dirname(os.path.abspath(mutants_dir)))
            try:
                diffs[name] = mutant_diff(name, path)
            finally:
                os.chdir(cwd)
    os.makedirs(results_dir, exist_ok=True)
    out = summary_path(path, results_dir)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"module": path, "exit_code_by_key": codes,
                   "durations_by_key": durations, "diffs": diffs},
                  f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(out + ".tmp", out)
    return "written %s" % out


def module_results(path, results_dir=RESULTS):
    """Count the outcome of every mutant of one module.

    :param path: the module's path, e.g. ``imagebackend/disk/trust.py``.
    :param results_dir: where the committed summaries are.
    :returns: a dict with the counts, the survivors' names, their diffs and
        the summed test time, or None when the module has no summary.
    """
    try:
        with open(summary_path(path, results_dir), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    counts = collections.Counter()
    survivors = []
    other = []
    codes = data.get("exit_code_by_key", {})
    for name, code in sorted(codes.items()):
        if code is None:
            counts["not run"] += 1
        elif code == 0:
            counts["survived"] += 1
            survivors.append(name)
        elif code in DETECTED:
            counts["detected"] += 1
            counts[DETECTED[code]] += 1
        elif code in NOT_TESTED:
            counts["no tests"] += 1
            survivors.append(name)
        else:
            counts["suspicious"] += 1
            other.append(name)
    seconds = sum(v for v in data.get("durations_by_key", {}).values()
                  if isinstance(v, (int, float)))
    return {"counts": counts, "survivors": survivors, "other": other,
            "total": len(codes), "test_seconds": seconds,
            "diffs": data.get("diffs", {})}


def mutant_diff(name, path):
    """The changed lines of one mutant, from mutmut's own diff.

    :returns: the '-'/'+' lines, or a note when mutmut cannot say.
    """
    try:
        from mutmut.mutation import diff_apply
        diff = diff_apply.get_diff_for_mutant(name, path=path)
    except Exception as exc:  # noqa: BLE001 - report, never abort the page
        return ["(no diff: %s)" % exc]
    return [line for line in diff.splitlines()
            if line[:1] in "-+" and not line.startswith(("---", "+++"))]


def pct(part, whole):
    return "%.1f%%" % (100.0 * part / whole) if whole else "n/a"


def render(rows, durations, equivalent, before, with_diffs=True):
    """Build the page.

    :param rows: (path, results-or-None) pairs in setup.cfg order.
    :returns: the reStructuredText text.
    """
    out = []
    w = out.append
    title = "Mutation testing"
    w("=" * len(title))
    w(title)
    w("=" * len(title))
    w("")
    w("Generated by ``tools/mutation-report.py`` from the results of "
      "``tox -e mutation``")
    w("(mutmut 3; configuration in ``setup.cfg [mutmut]``, results in")
    w("``tools/mutation-results/``, notes in ``tools/mutation-notes/``).")
    w("Each mutant is one small change to one")
    w("function of a safety-critical module; the **unit** suite")
    w("(``tests/unit``, only the tests that execute the mutated function) "
      "is")
    w("run against it.  A mutant is *detected* when a test fails or times "
      "out.")
    w("The functional suite is not run (too slow per mutant), so a mutant "
      "that")
    w("only a functional test would catch counts as surviving here.")
    w("")
    w("A timeout counts as detected.  mutmut also stops a mutant's tests "
      "at a")
    w("wall-clock limit (half their CPU-time limit), so on a loaded "
      "machine a")
    w("slow survivor can be counted as a timeout: *Timeouts* says how many")
    w("of the detected were, and the notes say which were re-run.  Where "
      "a")
    w("run selected fewer tests than ``tests/unit`` (to finish on a "
      "loaded")
    w("machine), its rate is a lower bound; the list under the table "
      "says so.")
    w("")
    w("*Kill rate* is detected / (run - equivalent).  *Test time* is the "
      "sum of")
    w("the per-mutant test durations mutmut recorded; how long each "
      "module's")
    w("runs took on the shared two-core machine, and with which tests, is")
    w("listed under the table.  Modules marked *not run*")
    w("have no results yet: run ``tox -e mutation -- "
      "\"imagebackend.disk.chain*\"``")
    w("(a glob on mutant names) and regenerate this page.")
    w("")
    if before:
        w("Before the tests added to kill survivors "
          "(``tests/unit/*/test_*_mutants.py``):")
        w("")
        for path in sorted(before):
            w("- ``%s``: %s" % (path, before[path]))
        w("")
        w("Now:")
        w("")
    table = [("Module", "Mutants", "Run", "Detected", "Timeouts",
              "Survived", "Equivalent", "Kill rate", "Test time")]
    for path, res in rows:
        if res is None or res["total"] == res["counts"]["not run"]:
            total = res["total"] if res else 0
            table.append((path, str(total) if total else "-", "0", "-", "-",
                          "-", "-", "not run", "-"))
            continue
        c = res["counts"]
        run = res["total"] - c["not run"]
        equiv = sum(1 for s in res["survivors"] if s in equivalent)
        live = len(res["survivors"]) - equiv
        table.append((path, str(res["total"]), str(run), str(c["detected"]),
                      str(c["timeout"]), str(live), str(equiv),
                      pct(c["detected"], run - equiv),
                      "%.0f s" % res["test_seconds"]))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    rule = "  ".join("=" * n for n in widths)
    w(rule)
    w("  ".join(v.ljust(n) for v, n in zip(table[0], widths)).rstrip())
    w(rule)
    for r in table[1:]:
        w("  ".join(v.ljust(n) for v, n in zip(r, widths)).rstrip())
    w(rule)
    w("")
    heading = "How each module was run"
    w(heading)
    w("=" * len(heading))
    w("")
    for path, _ in rows:
        w("``%s``" % path)
        w("    %s" % durations.get(path, "not run yet"))
        w("")
    heading = "Surviving mutants"
    w(heading)
    w("=" * len(heading))
    w("")
    w("Every mutant no unit test detected, with the change it makes.  "
      "Those")
    w("judged equivalent (no behaviour a caller could see changes) say "
      "why;")
    w("the others are gaps in the tests.")
    w("")
    for path, res in rows:
        if not res or not (res["survivors"] or res["other"]):
            continue
        w(path)
        w("-" * len(path))
        w("")
        for name in res["survivors"] + res["other"]:
            short = name.split(".")[-1]
            status = "suspicious" if name in res["other"] else (
                "equivalent" if name in equivalent else "survived")
            w("- ``%s`` (%s)%s" % (
                short, status,
                ": " + equivalent[name] if name in equivalent else ""))
            if with_diffs:
                lines = res["diffs"].get(name)
                if lines:
                    w("")
                    w("  ::")
                    w("")
                    for line in lines:
                        w("    " + line.rstrip())
                    w("")
        w("")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", action="store_true",
                        help="first write tools/mutation-results/ from "
                             "mutmut's records in --mutants")
    parser.add_argument("--partial", action="store_true",
                        help="with --collect: also keep a module's results "
                             "when some of its mutants were not run")
    parser.add_argument("--mutants", default="mutants",
                        help="mutmut's working tree (default: mutants)")
    parser.add_argument("--output", default=os.path.join(
        "doc", "source", "mutation.rst"))
    parser.add_argument("--no-diffs", action="store_true",
                        help="list survivors without their diffs")
    args = parser.parse_args(argv)
    if args.collect:
        for path in modules_to_mutate():
            status = collect(path, args.mutants, args.partial)
            if status:
                print("%-40s %s" % (path, status))
    durations, equivalent, before = read_notes(NOTES)
    rows = [(path, module_results(path)) for path in modules_to_mutate()]
    text = render(rows, durations, equivalent, before, not args.no_diffs)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    for path, res in rows:
        if res and res["total"] != res["counts"]["not run"]:
            c = res["counts"]
            run = res["total"] - c["not run"]
            print("%-40s %4d run, %4d detected, %4d survived" % (
                path, run, c["detected"], len(res["survivors"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
