"""Load test: 16 concurrent OpenAI clients against `understudy serve` on 127.0.0.1 for 60 seconds.

The server is the real thing (`understudy serve --config ...` in a subprocess) serving a real GGUF
student with retrieval and routing. By default it serves the demo's student: run `understudy demo`
first (or pass --config to any understudy.toml). Each client loops until the deadline, sending
questions from the demo company's phrasings (a quarter of them streamed), and records latency and
errors. Every request has a timeout, so the run ends by itself.

Writes bench/results/server_load.json and prints a table.

Usage:
    .venv/bin/python bench/server_load.py [--config understudy-demo/understudy.toml]
        [--clients 16] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _common import machine, save, table

ROOT = Path(__file__).resolve().parent.parent

_SERVE = textwrap.dedent(
    """
    import argparse, sys
    from langchain_understudy.plugin import _cli_app
    parser = argparse.ArgumentParser()
    _cli_app.register(parser.add_subparsers())
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
    """
)


def _questions() -> list[str]:
    company = json.loads((ROOT / "plugin" / "demo_data" / "company.json").read_text())
    return [q for spec in company["facts"].values() for q in spec["questions"]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(
    url: str, questions: list[str], deadline: float, seed: int, out: list[dict[str, Any]]
) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=30.0) as http:
        while time.monotonic() < deadline:
            stream = rng.random() < 0.25
            body = {
                "model": "understudy",
                "messages": [{"role": "user", "content": rng.choice(questions)}],
                "max_tokens": 48,
                "stream": stream,
            }
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"stream": stream}
            try:
                if stream:
                    with http.stream("POST", url, json=body) as resp:
                        rec["status"] = resp.status_code
                        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
                        ok = lines and lines[-1] == "data: [DONE]" and '"error"' not in lines[-2]
                        final = json.loads(lines[-2][6:]) if len(lines) >= 2 else {}
                        rec["answered_by"] = (final.get("understudy") or {}).get("answered_by")
                else:
                    resp = http.post(url, json=body)
                    rec["status"] = resp.status_code
                    ok = resp.status_code == 200 and bool(resp.json()["choices"][0]["message"])
                    rec["answered_by"] = (resp.json().get("understudy") or {}).get("answered_by")
                rec["ok"] = bool(ok) and rec["status"] == 200
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                rec["ok"] = False
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["latency_s"] = time.perf_counter() - t0
            rec["end"] = time.monotonic()
            out.append(rec)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "understudy-demo" / "understudy.toml")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=int, default=3, help="requests before the clock starts")
    args = ap.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(
            f"{args.config} does not exist: run `understudy demo` first or pass --config"
        )

    load_before = os.getloadavg()  # other work on the machine skews the numbers: record it
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("UNDERSTUDY_API_KEY", None)
    cmd = [sys.executable, "-c", _SERVE, "serve", "--config", str(args.config), "--port", str(port)]
    server = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log = server.stdout.read() if server.stdout else ""
                raise SystemExit(f"the server did not start:\n{log}")
            time.sleep(0.5)
        url = f"{base}/v1/chat/completions"
        questions = _questions()
        for q in questions[: args.warmup]:  # load the student and the embeddings
            httpx.post(url, json={"messages": [{"role": "user", "content": q}]}, timeout=120)

        records: list[dict[str, Any]] = []
        start = time.monotonic()
        end = start + args.seconds
        threads = [
            threading.Thread(target=_client, args=(url, questions, end, i, records))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(r["end"] for r in records) - start if records else args.seconds
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    ok = [r for r in records if r["ok"]]
    lat = [r["latency_s"] * 1000 for r in ok]
    errors = [r for r in records if not r["ok"]]
    by = {k: sum(1 for r in ok if r.get("answered_by") == k) for k in ("student", "teacher")}
    result = {
        "config": str(args.config),
        "clients": args.clients,
        "seconds": args.seconds,
        "wall_seconds": round(wall, 2),
        "requests": len(records),
        "streamed": sum(1 for r in records if r["stream"]),
        "errors": len(errors),
        "error_examples": [r.get("error") or f"status {r.get('status')}" for r in errors[:5]],
        "throughput_rps": round(len(ok) / wall, 2) if wall else None,
        "latency_ms": {
            "p50": _pct(lat, 0.50),
            "p95": _pct(lat, 0.95),
            "p99": _pct(lat, 0.99),
            "max": max(lat) if lat else None,
        },
        "answered_by": by,
        "server_metrics_teacher_call_rate": next(
            (
                float(ln.split()[1])
                for ln in metrics.splitlines()
                if ln.startswith("understudy_teacher_call_rate ")
            ),
            None,
        ),  # fmt: skip
        "load_average_before": [round(x, 2) for x in load_before],
        "machine": machine(),
    }
    out = save("server_load", result)
    lm = result["latency_ms"]
    print(
        table(
            ["clients", "seconds", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"],
            [
                [
                    args.clients,
                    round(wall, 1),
                    len(records),
                    len(errors),
                    result["throughput_rps"],
                    round(lm["p50"] or 0, 1),
                    round(lm["p95"] or 0, 1),
                    round(lm["p99"] or 0, 1),
                ]
            ],
        )  # fmt: skip
    )
    print(f"wrote {out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
