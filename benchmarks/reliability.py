"""The reliability table: every case of tests/reliability run (the long ones too), printed as case -> expected -> observed.

    python benchmarks/reliability.py                    # all cases, long ones included (tens of minutes on 2 cores)
    python benchmarks/reliability.py --quick            # only what `make test` runs
    python benchmarks/reliability.py -k damaged         # a subset (pytest's -k)
    python benchmarks/reliability.py --table            # print the last run's table from the JSON again

A case is one test (one parameter set of a parametrized test); the first line of its docstring reads ``CASE -> EXPECTED``.
Observed is ``held`` when the test passed, else the first line of its failure (or why it was skipped). Results go to
``benchmarks/results/reliability.json`` (``--json``): totals, then one row per case, with its seconds.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests" / "reliability"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "reliability.json"


def describe(item):
    """(case, expected) of a collected test, from its docstring's first line ``CASE -> EXPECTED``."""
    doc = (getattr(item, "function", None).__doc__ or "").strip() if getattr(item, "function", None) else ""
    first = doc.splitlines()[0].strip() if doc else ""
    if "->" in first:
        case, expected = (s.strip() for s in first.split("->", 1))
    else:
        case, expected = (first or item.originalname.removeprefix("test_").replace("_", " ")), ""
    param = getattr(getattr(item, "callspec", None), "id", None)
    if param:
        case = f"{case} [{param}]"
    return case, expected


class Recorder:
    """A pytest plugin that keeps one row per test: its case, expectation, outcome and time."""

    def __init__(self):
        self.rows, self._meta = [], {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            case, expected = describe(item)
            self._meta[item.nodeid] = {"case": case, "expected": expected, "long": "long" in item.keywords}

    def pytest_runtest_logreport(self, report):
        meta = self._meta.get(report.nodeid)
        if meta is None:
            return
        failed = report.failed
        if report.when == "call" or (report.when == "setup" and (report.skipped or failed)) or (report.when == "teardown" and failed):
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                status, observed = "skipped", reason.removeprefix("Skipped: ")
            elif failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr)
                status, observed = "failed", f"{report.when}: " + (message.strip().splitlines() or ["?"])[0][:200]
            else:
                status, observed = "held", "held"
            self.rows = [r for r in self.rows if r["test"] != report.nodeid]
            self.rows.append({"test": report.nodeid, **meta, "status": status, "observed": observed,
                              "seconds": round(report.duration, 2)})


def totals(rows):
    out = {"cases": len(rows)}
    for s in ("held", "failed", "skipped"):
        out[s] = sum(r["status"] == s for r in rows)
    out["long_cases"] = sum(r["long"] for r in rows)
    return out


def print_table(result, out=sys.stdout):
    rows = result["rows"]
    width = min(70, max([len(r["case"]) for r in rows] + [4]))
    ewidth = min(60, max([len(r["expected"]) for r in rows] + [8]))
    print(f"{'case':<{width}}  {'expected':<{ewidth}}  observed", file=out)
    for r in rows:
        case = r["case"] if len(r["case"]) <= width else r["case"][: width - 1] + "~"
        exp = r["expected"] if len(r["expected"]) <= ewidth else r["expected"][: ewidth - 1] + "~"
        print(f"{case:<{width}}  {exp:<{ewidth}}  {r['observed']}", file=out)
    t = result["totals"]
    print(f"\n{t['cases']} cases ({t['long_cases']} long): {t['held']} held, {t['failed']} failed, {t['skipped']} skipped"
          f" in {result['seconds']:.0f} s", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="skip the cases marked long (what `make test` runs)")
    ap.add_argument("-k", dest="keyword", help="only the cases whose test name matches (pytest -k expression)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where the results go (default {DEFAULT_JSON.relative_to(REPO)})")
    ap.add_argument("--table", action="store_true", help="print the table of the JSON from the last run; run nothing")
    args = ap.parse_args(argv)
    if args.table:
        if not args.json.is_file():
            ap.error(f"{args.json}: no results yet (run without --table first)")
        print_table(json.loads(args.json.read_text(encoding="utf-8")))
        return 0

    import pytest

    os.chdir(REPO)  # setup.cfg's pytest section (pythonpath, markers) applies from the repository root
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]  # benchmarks/serve.py would shadow tests/serve
    recorder = Recorder()
    pytest_args = [str(TESTS), "-q", "-p", "no:randomly", "--no-header", "-rN"]
    if not args.quick:
        pytest_args.append("--run-long")
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    t0 = time.perf_counter()
    code = pytest.main(pytest_args, plugins=[recorder])
    seconds = time.perf_counter() - t0
    if not recorder.rows:
        print(f"no cases ran (pytest exit {int(code)})", file=sys.stderr)
        return 2
    result = {"totals": totals(recorder.rows), "seconds": round(seconds, 1), "quick": args.quick, "keyword": args.keyword,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "rows": recorder.rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, args.json)
    print()
    print_table(result)
    return 0 if result["totals"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
