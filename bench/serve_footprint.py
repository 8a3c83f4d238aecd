"""Cold start and memory of `understudy serve`: MiniLM in sentence-transformers vs in llama.cpp.

Both arms serve the same GGUF student (default: the bundled SmolLM2-135M-Instruct, Q4_1) with a
knowledge store, so every request embeds its query; they differ only in the embeddings the
server is given:

- ``sentence-transformers``: ``SentenceTransformerEmbeddings`` (torch), the default before the
  serving install went lean;
- ``llama.cpp``: ``LlamaCppEmbeddings`` (the default now; what a lean install runs).

For each arm and repeat, a fresh server process is started and the benchmark records the
seconds until ``/healthz`` answers, until the first answer (the embeddings load on first use),
the resident memory after the requests (VmRSS and its peak VmHWM from /proc) and whether
``libtorch`` is mapped into the process. Arms alternate, so drift on a shared machine hits
both.

Writes bench/results/serve_footprint.json and prints a table.

Usage:
    .venv/bin/python bench/serve_footprint.py [--model PATH.gguf] [--repeats 3] [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
from _common import machine, save, stop_process, table

ARMS = ("sentence-transformers", "llama.cpp")
FACTS = [
    "The Pro plan costs $25 per user per month.",
    "The Basic plan is free for up to three users.",
    "Refunds are available within 30 days of purchase.",
    "Support answers tickets within one business day.",
    "Each workspace includes 100 GB of file storage.",
    "Single sign-on with SAML is available on the Enterprise plan.",
]
QUESTIONS = [
    "How much is the Pro plan?",
    "Can I get a refund?",
    "How fast does support answer?",
    "How much storage do I get?",
    "Do you have SSO?",
]

_SERVE = textwrap.dedent(
    """
    import sys
    from langchain_understudy.config import load_config
    from langchain_understudy.plugin.loader import load_understudy
    from langchain_understudy.plugin.server import serve
    from langchain_understudy.retrieval import LlamaCppEmbeddings, SentenceTransformerEmbeddings
    arm, config, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config(config)
    emb = SentenceTransformerEmbeddings() if arm == "sentence-transformers" else LlamaCppEmbeddings()
    serve(load_understudy(cfg, embeddings=emb), settings=cfg.server, host="127.0.0.1", port=port)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _one(arm: str, config: Path, requests: int) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, arm, str(config), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                log = proc.stdout.read() if proc.stdout else ""
                raise SystemExit(f"the {arm} server did not start:\n{log[-3000:]}")
            time.sleep(0.05)
        healthz = time.perf_counter() - t0
        url = f"{base}/v1/chat/completions"
        first = None
        latencies = []
        for i in range(requests):
            q = QUESTIONS[i % len(QUESTIONS)]
            s = time.perf_counter()
            r = httpx.post(
                url, json={"messages": [{"role": "user", "content": q}], "max_tokens": 16}, timeout=120
            )
            r.raise_for_status()
            latencies.append(time.perf_counter() - s)
            if first is None:
                first = time.perf_counter() - t0
        mem = _status_kb(proc.pid)
        torch_mapped = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        stop_process(proc)
    return {
        "healthz_s": round(healthz, 2),
        "first_answer_s": round(first or 0.0, 2),
        "median_request_ms": round(statistics.median(latencies[1:] or latencies) * 1000, 1),
        "rss_mb": round(mem["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
        "torch_loaded": torch_mapped,
    }


def main(argv: list[str] | None = None) -> int:
    from langchain_understudy.distill_jobs.bases import builtin_base_path
    from langchain_understudy.retrieval import KnowledgeStore, LlamaCppEmbeddings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="student GGUF (default: bundled SmolLM2-135M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args(argv)
    model = args.model or builtin_base_path("smollm2-135m-instruct")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # the store records "all-MiniLM-L6-v2", which both arms are, so one store serves both
        KnowledgeStore(work / "kb", LlamaCppEmbeddings()).add_texts(FACTS)
        config = work / "understudy.toml"
        config.write_text(
            f'[student]\nmodel_path = "{model}"\nn_ctx = 1024\nmax_tokens = 16\n'
            f'[knowledge]\npath = "{work / "kb"}"\n'
        )
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        for r in range(args.repeats):
            for arm in ARMS:
                runs[arm].append(_one(arm, config, args.requests))
                print(f"repeat {r + 1}/{args.repeats} {arm}: {runs[arm][-1]}", flush=True)

    def med(arm: str, key: str) -> float:
        return float(statistics.median(run[key] for run in runs[arm]))

    keys = ("healthz_s", "first_answer_s", "median_request_ms", "rss_mb", "peak_rss_mb")
    summary = {arm: {k: med(arm, k) for k in keys} for arm in ARMS}
    for arm in ARMS:
        summary[arm]["torch_loaded"] = any(run["torch_loaded"] for run in runs[arm])
    result = {
        "model": str(model),
        "repeats": args.repeats,
        "requests": args.requests,
        "summary": summary,
        "runs": runs,
        "load_average_before": [round(x, 2) for x in load_before],
        "machine": machine(),
    }
    out = save("serve_footprint", result)
    print(
        table(
            ["embeddings", "/healthz s", "first answer s", "request ms", "RSS MB", "peak MB", "torch"],
            [
                [arm, *(summary[arm][k] for k in keys), "yes" if summary[arm]["torch_loaded"] else "no"]
                for arm in ARMS
            ],
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
