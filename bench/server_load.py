"""Load test: `understudy serve` against llama.cpp's own servers, same GGUF, same threads, 127.0.0.1.

Arms (each a real server in a subprocess, started and stopped by this script):

* ``understudy``: `understudy serve` on a generated `understudy.toml` that serves the GGUF alone
  (no teacher, no knowledge store), ``n_parallel`` slots in one llama.cpp context;
* ``understudy-demo``: `understudy serve` on the demo's own `understudy.toml` (retrieval and
  routing included; only for the ``demo`` model);
* ``llama-cpp-python``: `python -m llama_cpp.server` (the ``bench`` extra);
* ``llama-server``: llama.cpp's C++ server with ``--parallel N --cont-batching``, built from the
  sources llama-cpp-python vendors by `bash bench/build_llama_server.sh` (skipped when absent).

Models: ``demo`` (the student `understudy demo` registered; run `make demo` first), ``smollm2``
(SmolLM2-135M-Instruct Q4_1, the pretrained base), or any GGUF path. For every model, arm and
client count, the clients loop for ``--seconds`` sending the demo company's questions (greedy,
``max_tokens`` 48, a quarter streamed); every request has a timeout, so the run ends by itself.
Answers stop at the model's end token, so the arms can differ in tokens per answer: the table
shows completion tokens per second beside requests per second.

Writes bench/results/server_load.json and prints a table.

Usage:
    .venv/bin/python bench/server_load.py [--models demo smollm2] [--clients 1 4 16]
        [--seconds 30] [--arms understudy llama-cpp-python llama-server] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from _common import machine, save, stop_process, table

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = ROOT / "bench" / "out" / "llama-src" / "build" / "bin" / "llama-server"
ARMS = ("understudy", "understudy-demo", "llama-cpp-python", "llama-server")

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


def _model_path(name: str, demo_config: Path) -> Path:
    if name == "demo":
        if not demo_config.is_file():
            raise SystemExit(f"{demo_config} does not exist: run `make demo` first")
        from langchain_understudy.config import load_config
        from langchain_understudy.students import StudentRegistry

        registry = load_config(demo_config).student.registry  # paths resolved against the file
        current = StudentRegistry(registry).current()
        if current is None:
            raise SystemExit(f"{registry} has no promoted student: run `make demo` first")
        return current.path
    if name == "smollm2":
        from langchain_understudy.distill_jobs.bases import builtin_base_path

        return builtin_base_path("smollm2-135m-instruct")
    return Path(name)


def _command(
    arm: str, model: Path, port: int, args: argparse.Namespace, work: Path
) -> list[str] | None:
    """The server's command line, or ``None`` when the arm cannot run here."""
    slots = max(args.clients)
    if arm == "understudy":
        config = work / f"understudy-{port}.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [student]
                model_path = {json.dumps(str(model))}
                n_ctx = {args.n_ctx}
                n_threads = {args.threads}
                n_parallel = {slots}
                [traces]
                path = {json.dumps(str(work / f"traces-{port}.sqlite"))}
                """
            )
        )
        return [sys.executable, "-c", _SERVE, "serve", "--config", str(config), "--port", str(port)]
    if arm == "understudy-demo":
        return [
            sys.executable, "-c", _SERVE, "serve", "--config", str(args.demo_config),
            "--port", str(port),
        ]  # fmt: skip
    if arm == "llama-cpp-python":
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(args.n_ctx), "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads),
        ]  # fmt: skip
    if arm == "llama-server":
        if not args.llama_server.is_file():
            return None
        return [
            str(args.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(slots), "--cont-batching", "-c", str(args.n_ctx * slots),
            "-t", str(args.threads), "-tb", str(args.threads), "--no-webui",
        ]  # fmt: skip
    raise ValueError(arm)


@contextmanager
def _server(cmd: list[str], port: int, log: Path) -> Iterator[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("UNDERSTUDY_API_KEY", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:  # understudy answers /healthz, llama-server /health, llama_cpp.server neither
                if any(
                    httpx.get(f"{base}/{p}", timeout=2).status_code == 200
                    for p in ("healthz", "health", "v1/models")
                ):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[0]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        stop_process(proc)


def _request(http: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"stream": bool(body.get("stream"))}
    if body.get("stream"):
        with http.stream("POST", url, json=body) as resp:
            rec["status"] = resp.status_code
            events = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        rec["ok"] = resp.status_code == 200 and bool(events) and events[-1] == "[DONE]"
        rec["ok"] = rec["ok"] and not any("error" in c for c in chunks)
        usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), None)
        deltas = sum(1 for c in chunks for ch in c.get("choices", []) if ch["delta"].get("content"))
        rec["completion_tokens"] = usage["completion_tokens"] if usage else deltas
        rec["answered_by"] = next(
            (c["understudy"].get("answered_by") for c in chunks if c.get("understudy")), None
        )
        return rec
    resp = http.post(url, json=body)
    rec["status"] = resp.status_code
    data = resp.json() if resp.status_code == 200 else {}
    rec["ok"] = resp.status_code == 200 and bool(data.get("choices"))
    rec["completion_tokens"] = (data.get("usage") or {}).get("completion_tokens", 0)
    rec["answered_by"] = (data.get("understudy") or {}).get("answered_by")
    return rec


def _client(
    url: str, questions: list[str], deadline: float, seed: int, out: list[dict[str, Any]]
) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60.0) as http:
        while time.monotonic() < deadline:
            stream = rng.random() < 0.25
            body: dict[str, Any] = {
                "model": "understudy",
                "messages": [{"role": "user", "content": rng.choice(questions)}],
                "max_tokens": 48,
                "temperature": 0.0,
                "stream": stream,
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            t0 = time.perf_counter()
            reconnected = False
            try:
                try:
                    rec = _request(http, url, body)
                except httpx.RemoteProtocolError:
                    # the server closed a kept-alive connection as the request went out (cpp-httplib
                    # ends one after a number of requests): the request was never read, so it is
                    # sent again on a new connection, as OpenAI's client does; counted apart
                    reconnected = True
                    rec = _request(http, url, body)
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                rec = {"stream": stream, "ok": False, "error": f"{type(e).__name__}: {e}"}
            rec["reconnected"] = reconnected
            rec["latency_s"] = time.perf_counter() - t0
            rec["end"] = time.monotonic()
            out.append(rec)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _load(base: str, clients: int, seconds: float, questions: list[str]) -> dict[str, Any]:
    url = f"{base}/v1/chat/completions"
    records: list[dict[str, Any]] = []
    start = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(url, questions, start + seconds, i, records))
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in records) - start if records else seconds
    ok = [r for r in records if r["ok"]]
    lat = [r["latency_s"] * 1000 for r in ok]
    errors = [r for r in records if not r["ok"]]
    tokens = sum(r.get("completion_tokens") or 0 for r in ok)
    return {
        "clients": clients,
        "wall_seconds": round(wall, 2),
        "requests": len(records),
        "errors": len(errors),
        "resent_after_closed_connection": sum(1 for r in records if r.get("reconnected")),
        "error_examples": [r.get("error") or f"status {r.get('status')}" for r in errors[:5]],
        "throughput_rps": round(len(ok) / wall, 2) if wall else None,
        "completion_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "tokens_per_answer": round(tokens / len(ok), 1) if ok else None,
        "latency_ms": {q: _pct(lat, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "answered_by": {
            k: sum(1 for r in ok if r.get("answered_by") == k) for k in ("student", "teacher")
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "smollm2"])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=30.0, help="per model, arm and client count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=256, help="context per sequence (slot)")
    ap.add_argument("--warmup", type=int, default=3, help="requests before the clock starts")
    ap.add_argument("--demo-config", type=Path, default=ROOT / "understudy-demo" / "understudy.toml")
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    ap.add_argument("--name", default="server_load", help="results file name")
    args = ap.parse_args(argv)

    questions = _questions()
    load_before = os.getloadavg()  # other work on the machine skews the numbers: record it
    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model_name in args.models:
            model = _model_path(model_name, args.demo_config)
            for arm in args.arms:
                if arm == "understudy-demo" and model_name != "demo":
                    continue
                port = _free_port()
                cmd = _command(arm, model, port, args, work)
                if cmd is None:
                    skipped.append(f"{arm}: {args.llama_server} missing")
                    continue
                print(f"{model_name} / {arm}: starting", flush=True)
                with _server(cmd, port, work / f"{arm}-{port}.log") as base:
                    url = f"{base}/v1/chat/completions"
                    for q in questions[: args.warmup]:  # load the model (and the embeddings)
                        body = {"messages": [{"role": "user", "content": q}], "max_tokens": 8}
                        httpx.post(url, json=body, timeout=180)
                    for clients in args.clients:
                        run = _load(base, clients, args.seconds, questions)
                        run.update(model=model_name, model_path=str(model), arm=arm)
                        runs.append(run)
                        print(
                            f"  {clients:>2} clients: {run['throughput_rps']} req/s, "
                            f"{run['completion_tokens_per_s']} tok/s, {run['errors']} errors",
                            flush=True,
                        )
    result = {
        "arms": args.arms,
        "clients": args.clients,
        "seconds": args.seconds,
        "threads": args.threads,
        "n_ctx_per_slot": args.n_ctx,
        "runs": runs,
        "ratios": _ratios(runs),
        "skipped": skipped,
        "load_average_before": [round(x, 2) for x in load_before],
        "machine": machine(),
    }
    out = save(args.name, result)
    print(table(*_table(runs)))
    for r in result["ratios"]:
        print(
            f"{r['model']}, {r['clients']} clients: {r['arm']} ÷ llama-cpp-python = "
            f"{r['rps_ratio']}× req/s, {r['tokens_ratio']}× tok/s"
        )
    print(f"wrote {out}")
    return 0 if not any(r["errors"] for r in runs) else 1


def _ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    anchor = {(r["model"], r["clients"]): r for r in runs if r["arm"] == "llama-cpp-python"}
    out = []
    for r in runs:
        a = anchor.get((r["model"], r["clients"]))
        if r["arm"] == "llama-cpp-python" or a is None or not a["throughput_rps"]:
            continue
        out.append(
            {
                "model": r["model"],
                "clients": r["clients"],
                "arm": r["arm"],
                "rps_ratio": round(r["throughput_rps"] / a["throughput_rps"], 2),
                "tokens_ratio": round(
                    r["completion_tokens_per_s"] / a["completion_tokens_per_s"], 2
                )
                if a["completion_tokens_per_s"]
                else None,
            }
        )
    return out


def _table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "model", "arm", "clients", "requests", "errors", "req/s", "tok/s", "tok/answer",
        "p50 ms", "p95 ms",
    ]  # fmt: skip
    rows = [
        [
            r["model"], r["arm"], r["clients"], r["requests"], r["errors"], r["throughput_rps"],
            r["completion_tokens_per_s"], r["tokens_per_answer"],
            round(r["latency_ms"]["p50"] or 0), round(r["latency_ms"]["p95"] or 0),
        ]  # fmt: skip
        for r in runs
    ]
    return headers, rows


if __name__ == "__main__":
    sys.exit(main())
