"""MiniLM in llama.cpp vs sentence-transformers: per-query latency, and llama.cpp thread oversubscription.

Arms (each in a fresh process, 400 short CLINC150-style queries embedded one call per query, as a
server embeds them):

- sentence-transformers (torch), alone;
- llama.cpp at 1 and at 2 threads, alone;
- llama.cpp at 1 and at 2 threads, two processes at once (what a job's two DDP ranks, or an
  embedding beside a decoding student, do to 2 cores).

Writes bench/results/embed_threads.json and prints a table.

Usage:
    .venv/bin/python bench/embed_threads.py [--queries 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from _common import machine, save, table

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    arm, n_threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from langchain_understudy.retrieval import LlamaCppEmbeddings, SentenceTransformerEmbeddings
    if arm == "sentence-transformers":
        import torch
        torch.set_num_threads(n_threads)
        emb = SentenceTransformerEmbeddings()
    else:
        emb = LlamaCppEmbeddings(n_threads=n_threads)
    emb.embed_query("warm up")
    texts = [f"what is the balance of my account number {i}" for i in range(n)]
    t = time.perf_counter()
    for q in texts:
        emb.embed_query(q)
    print(json.dumps({"seconds": time.perf_counter() - t}))
    """
)


def _run(arm: str, threads: int, processes: int, n: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, arm, str(threads), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(processes)
    ]
    seconds = [json.loads(p.communicate()[0].strip().splitlines()[-1])["seconds"] for p in procs]
    return {
        "arm": arm,
        "threads": threads,
        "processes": processes,
        "seconds_each": [round(s, 2) for s in seconds],
        "ms_per_query": round(max(seconds) / n * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queries", type=int, default=400)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    arms = [
        ("sentence-transformers", 2, 1),
        ("llama.cpp", 1, 1),
        ("llama.cpp", 2, 1),
        ("llama.cpp", 1, 2),
        ("llama.cpp", 2, 2),
    ]
    rows = []
    for arm, threads, procs in arms:
        rows.append(_run(arm, threads, procs, args.queries))
        print(rows[-1], flush=True)
    out = save(
        "embed_threads",
        {
            "queries": args.queries,
            "runs": rows,
            "load_average_before": [round(x, 2) for x in load_before],
            "machine": machine(),
        },
    )
    print(
        table(
            ["embeddings", "threads", "processes", "seconds (each)", "ms per query"],
            [
                [r["arm"], r["threads"], r["processes"], r["seconds_each"], r["ms_per_query"]]
                for r in rows
            ],
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
