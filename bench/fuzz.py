"""Fuzzing benchmark: the ``test_fuzz_*`` properties with a large budget, one entry point at a time.

The properties are the ones ``make test`` runs with a small budget (``tests/*/test_fuzz_*.py``);
here every entry point gets at least ``--cases`` generated cases in total (split evenly over its
properties) and Hypothesis explores at random instead of a fixed seed. Each entry point runs in its
own pytest process; Hypothesis's observability callbacks count the cases. Reported per entry point:
cases generated, failures of this run (properties that found something), regression cases of
failures found earlier and fixed (``test_found_*`` that pass), failures found in code owned
elsewhere and pinned as strict xfails (``test_found_*`` that xfail, and generated cases that hit
them), and the wall time.

    python bench/fuzz.py                       # every entry point, >= 10,000 cases each
    python bench/fuzz.py --cases 500 --only http traces

Writes ``bench/results/fuzz.json``; ``--only`` merges into an existing file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, table  # noqa: E402

#: Entry point → (label, its fuzz test files).
ENTRY_POINTS: dict[str, tuple[str, list[str]]] = {
    "http": (
        "HTTP API (`understudy serve`)",
        ["tests/unit_tests/test_fuzz_http.py", "tests/integration_tests/test_fuzz_serve.py"],
    ),
    "traces": ("`understudy traces import`", ["tests/unit_tests/test_fuzz_traces.py"]),
    "kb": ("`understudy kb ingest`", ["tests/unit_tests/test_fuzz_kb.py"]),
    "config": ("`understudy.toml` and job TOML", ["tests/unit_tests/test_fuzz_config.py"]),
    "gguf": ("GGUF loading", ["tests/integration_tests/test_fuzz_gguf.py"]),
    "registry": ("registry metadata", ["tests/unit_tests/test_fuzz_registry.py"]),
    "messages": (
        "messages to `ChatStudent` / `ChatUnderstudy`",
        ["tests/integration_tests/test_fuzz_messages.py"],
    ),
}


def properties(files: list[str]) -> int:
    """How many properties the files define (each is decorated with the module's ``@FUZZ``)."""
    return sum((ROOT / f).read_text(encoding="utf-8").count("@FUZZ\n") for f in files)


class _Counter:
    """A pytest plugin counting Hypothesis test cases and test outcomes."""

    def __init__(self) -> None:
        self.cases = 0
        self.known_open = 0
        self.outcomes: list[dict[str, Any]] = []
        self.current = ""

    def observe(self, obs: Any) -> None:
        if getattr(obs, "type", None) != "test_case" or obs.status == "gave_up":
            return
        if "generate" not in str(obs.how_generated):
            return  # shrinking a failure replays cases: count each generated case once
        self.cases += 1
        if any(str(k).startswith("known open bug") for k in (obs.features or {})):
            self.known_open += 1

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            xfail = hasattr(report, "wasxfail")
            self.outcomes.append(
                {
                    "test": report.nodeid,
                    "outcome": "xfailed"
                    if xfail and report.outcome == "skipped"
                    else report.outcome,
                    "seconds": round(report.duration, 3),
                    "message": str(report.longrepr)[-2000:] if report.failed else "",
                }
            )


def _child(key: str, examples: int, out: Path) -> int:
    import pytest
    from hypothesis.internal.observability import add_observability_callback

    counter = _Counter()
    add_observability_callback(counter.observe, all_threads=False)
    files = [str(ROOT / f) for f in ENTRY_POINTS[key][1] if (ROOT / f).exists()]
    code = pytest.main(
        [*files, "-q", "-p", "no:cacheprovider", "-p", "no:logging", "-W", "ignore"],
        plugins=[counter],
    )
    out.write_text(
        json.dumps(
            {
                "cases": counter.cases,
                "known_open_cases": counter.known_open,
                "tests": counter.outcomes,
                "pytest_exit": int(code),
            },  # fmt: skip
            indent=1,
        )
    )
    return 0


def run_entry(key: str, cases: int) -> dict[str, Any]:
    label, files = ENTRY_POINTS[key]
    present = [f for f in files if (ROOT / f).exists()]
    n_props = properties(present)
    per_property = math.ceil(cases / max(1, n_props))
    env = {**os.environ, "UNDERSTUDY_FUZZ_EXAMPLES": str(per_property)}
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--child", key, "--out", str(out)],
            env=env,
            cwd=ROOT,
            check=False,
        )
        seconds = time.perf_counter() - t0
        got = json.loads(out.read_text()) if out.exists() else {"cases": 0, "tests": [],
                                                                 "pytest_exit": -1}  # fmt: skip
    tests = got["tests"]
    found = [t for t in tests if "::test_found_" in t["test"]]
    return {
        "entry_point": label,
        "files": present,
        "cases_target": cases,
        "properties": n_props,
        "examples_per_property": per_property,
        "cases": got["cases"],
        "failures": sum(t["outcome"] == "failed" for t in tests),
        "found_and_fixed": sum(t["outcome"] == "passed" for t in found),
        "found_open_elsewhere": sum(t["outcome"] == "xfailed" for t in found),
        "known_open_cases": got.get("known_open_cases", 0),
        "seconds": round(seconds, 1),
        "started": started,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "pytest_exit": got["pytest_exit"],
        "tests": tests,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="generated cases per entry point")
    p.add_argument("--only", nargs="+", choices=sorted(ENTRY_POINTS), help="entry points to run")
    p.add_argument("--child", choices=sorted(ENTRY_POINTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, 0, args.out)

    path = RESULTS / "fuzz.json"
    if not args.only and path.exists():
        path.unlink()  # a full run starts a fresh file
    entries: dict[str, Any] = {}
    load_before = os.getloadavg()
    for key in args.only or list(ENTRY_POINTS):
        print(f"fuzzing {key} ...", flush=True)
        entries[key] = run_entry(key, args.cases)
        e = entries[key]
        print(f"  {e['cases']} cases, {e['failures']} failures, {e['seconds']} s", flush=True)
        result = _save(path, entries, args, argv, load_before)  # after each: a long run keeps
    print(table(*_table(result)))
    print(f"wrote {path}")
    return 0 if all(e["failures"] == 0 for e in result["entries"].values()) else 1


def _save(
    path: Path,
    entries: dict[str, Any],
    args: argparse.Namespace,
    argv: list[str] | None,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    if path.exists():  # read just before writing: other runs may have added entry points
        entries = {**json.loads(path.read_text()).get("entries", {}), **entries}
    result = {
        "command": "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases_target_per_entry_point": args.cases,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "python": sys.version.split()[0],
        },
        "entries": {k: entries[k] for k in ENTRY_POINTS if k in entries},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = [
        [
            e["entry_point"],
            f"{e['cases']:,}",
            e["failures"],
            e["found_and_fixed"],
            e["found_open_elsewhere"],
            f"{e['seconds']:,.0f}",
        ]  # fmt: skip
        for e in result["entries"].values()
    ]
    headers = ["entry point", "cases", "failures (this run)", "found and fixed",
               "found, open elsewhere", "time (s)"]  # fmt: skip
    return headers, rows


if __name__ == "__main__":
    sys.exit(main())
