"""What a shadow candidate costs the requests that are served.

A registry student is served through ``ChatUnderstudy`` (the student answers every request)
while a shadow copy of it runs on the rollout's background worker. Blocks of requests with the
shadow off and on alternate in one run, paced (``--gap-ms`` between requests, so the worker has
the idle time a lightly loaded server leaves) and back to back (the worker competes with the
served requests for the same cores). Reported per arm: served latency p50/p95, and the time the
request path spends handing the request to the rollout (``LiveRollout.after``: drift watch,
queue put) — the part the shadow adds to every request whatever the load.

    .venv/bin/python bench/shadow_overhead.py --registry bench/out/clinc-scratch/students
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, require_data, save, table


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--registry", type=Path, required=True, help="registry with a promoted student")
    ap.add_argument("--requests", type=int, default=400, help="requests per arm")
    ap.add_argument("--block", type=int, default=20, help="requests per alternating block")
    ap.add_argument("--gap-ms", type=float, default=60.0, help="pause between paced requests")
    ap.add_argument("--n-ctx", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    from langchain_understudy.config import RolloutSettings
    from langchain_understudy.router import ChatUnderstudy, Router
    from langchain_understudy.students import StudentRegistry

    # a private copy: the bench registers a shadow and must not touch the caller's registry
    work = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    shutil.copytree(args.registry, work / "students")
    reg = StudentRegistry(work / "students")
    served = reg.current()
    if served is None:
        raise SystemExit(f"no student is promoted in {args.registry}")
    twin = reg.register(
        served.path,
        served.provenance,
        served.metrics,
        extra_files={n: served.artifact(n) for n in served.files if n != served.path.name},
    )
    data = json.loads((require_data("clinc150") / "data_full.json").read_text())
    queries = [q for q, _ in data["test"]]
    random.Random(0).shuffle(queries)

    llm = ChatUnderstudy(
        student=reg,
        router=Router(threshold=1.0),  # the student answers every request
        mode="pre",
        student_kwargs={"n_ctx": args.n_ctx},
        max_tokens=args.max_tokens,
        reload_check_s=0.0,
        rollout=RolloutSettings(),
    )
    llm.invoke(queries[0])  # load the model and the embeddings
    live = llm.live_rollout
    assert live is not None
    handoff: list[float] = []
    original = live.after

    def timed_after(**kw: Any) -> None:
        t = time.perf_counter()
        original(**kw)
        handoff.append((time.perf_counter() - t) * 1000)

    live.after = timed_after  # type: ignore[method-assign]

    results: dict[str, dict[str, Any]] = {}
    q = iter(queries * 4)
    for load, gap in (("paced", args.gap_ms / 1000), ("back to back", 0.0)):
        lat: dict[str, list[float]] = {"off": [], "on": []}
        hand: dict[str, list[float]] = {"off": [], "on": []}
        for block in range(2 * args.requests // args.block):
            arm = "on" if block % 2 else "off"
            reg.set_shadow(twin if arm == "on" else None)
            live.worker.join()  # each block starts with an empty queue
            for _ in range(args.block):
                before = len(handoff)
                t = time.perf_counter()
                llm.invoke(next(q))
                lat[arm].append((time.perf_counter() - t) * 1000)
                hand[arm].extend(handoff[before:])
                if gap:
                    time.sleep(gap)
            print(f"{load}: block {block + 1} ({arm}) done", file=sys.stderr, flush=True)
        live.worker.join()
        for arm in ("off", "on"):
            results[f"{load} / shadow {arm}"] = {
                "n": len(lat[arm]),
                "p50_ms": round(statistics.median(lat[arm]), 2),
                "p95_ms": round(_pct(lat[arm], 0.95), 2),
                "handoff_p50_ms": round(statistics.median(hand[arm]), 4),
                "handoff_p95_ms": round(_pct(hand[arm], 0.95), 4),
            }
    reg.set_shadow(None)
    m = live.metrics()
    out = {
        "benchmark": "latency a shadow candidate adds to served requests",
        "command": "python bench/shadow_overhead.py " + " ".join(sys.argv[1:]),
        "student": f"{args.registry} {served.version} (shadow: a copy, {twin})",
        "machine": machine(),
        "arms": results,
        "added_p95_ms": {
            load: round(
                results[f"{load} / shadow on"]["p95_ms"]
                - results[f"{load} / shadow off"]["p95_ms"],
                2,
            )
            for load in ("paced", "back to back")
        },
        "rollout_metrics": m,
    }
    path = save("shadow_overhead", out)
    rows = [
        [arm, r["n"], r["p50_ms"], r["p95_ms"], r["handoff_p50_ms"], r["handoff_p95_ms"]]
        for arm, r in results.items()
    ]
    print(table(["arm", "n", "p50 ms", "p95 ms", "hand-off p50 ms", "hand-off p95 ms"], rows))
    print(f"added p95: {out['added_p95_ms']}  wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
