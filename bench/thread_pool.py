"""The engine's own ggml thread pool against ggml's pool per decode call, side by side.

The same greedy generations (``--prompts``, one after another) go through two ``Engine`` s over
one loaded model: one whose context has a thread pool made once (the default), and one that leaves
ggml to make a pool for every ``llama_decode`` call. Each pair of arms runs alone and beside a
Python thread that wants the CPU half of the time (2 ms busy, 2 ms asleep), as a server's request
threads do, and 8 at a time (continuous batching, each read by its own thread). Arms
interleave, medians over ``--repeats``.

    .venv/bin/python bench/thread_pool.py [--models demo smollm2] [--repeats 5]

``demo`` is the student `make demo` registered (a few MB); ``smollm2`` SmolLM2-135M-Instruct Q4_1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine, save, table


def _model(name: str) -> Path:
    if name == "demo":
        from langchain_understudy.config import load_config
        from langchain_understudy.students import StudentRegistry

        config = ROOT / "understudy-demo" / "understudy.toml"
        if not config.is_file():
            raise SystemExit(f"{config} does not exist: run `make demo` first")
        current = StudentRegistry(load_config(config).student.registry).current()
        if current is None:
            raise SystemExit("the demo registry has no promoted student: run `make demo` first")
        return current.path
    if name == "smollm2":
        from langchain_understudy.distill_jobs.bases import builtin_base_path

        return builtin_base_path("smollm2-135m-instruct")
    return Path(name)


class _Busy:
    """A Python thread that spins 2 ms and sleeps 2 ms until stopped."""

    def __enter__(self) -> _Busy:
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.002:
                pass
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join()


def _generate(engine: Any, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Seconds for the prompts one after another, and ms per decode step."""
    from langchain_understudy.students._engine import Sampling

    steps0, sec0 = engine.stats.steps, engine.stats.decode_seconds
    t0 = time.perf_counter()
    for prompt in prompts:
        with engine.generate(prompt, max_tokens=tokens, sampling=Sampling()) as gen:
            for _ in gen:
                pass
    wall = time.perf_counter() - t0
    steps = engine.stats.steps - steps0
    return wall, 1000 * (engine.stats.decode_seconds - sec0) / max(1, steps)


def _generate_at_once(engine: Any, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Seconds for the prompts 8 at a time, each read by its own thread, and ms per step."""
    from concurrent.futures import ThreadPoolExecutor

    from langchain_understudy.students._engine import Sampling

    def one(prompt: list[int]) -> None:
        with engine.generate(prompt, max_tokens=tokens, sampling=Sampling()) as gen:
            for _ in gen:
                pass

    steps0, sec0 = engine.stats.steps, engine.stats.decode_seconds
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    steps = engine.stats.steps - steps0
    return wall, 1000 * (engine.stats.decode_seconds - sec0) / max(1, steps)


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from langchain_understudy.students._engine import Engine
    from langchain_understudy.students._llama import load_llama

    path = _model(name)
    llm = load_llama(path, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=0, seed=0)
    engines = {
        pool: Engine(
            llm, slots=8, n_ctx=args.n_ctx, n_batch=512, n_threads=args.threads, thread_pool=pool
        )
        for pool in (True, False)
    }
    prompts = [
        llm.tokenize(f"Question {i}: how much is the Pro plan?".encode())
        for i in range(args.prompts)
    ]
    arms = [
        (load, pool) for load in ("one at a time", "busy thread", "8 at once") for pool in (True, False)
    ]
    walls: dict[tuple[str, bool], list[float]] = {a: [] for a in arms}
    steps: dict[tuple[str, bool], list[float]] = {a: [] for a in arms}
    for engine in engines.values():
        _generate(engine, prompts[:2], args.tokens)  # warm-up
    for _ in range(args.repeats):
        for load, pool in arms:
            if load == "busy thread":
                with _Busy():
                    wall, ms = _generate(engines[pool], prompts, args.tokens)
            elif load == "8 at once":
                wall, ms = _generate_at_once(engines[pool], prompts, args.tokens)
            else:
                wall, ms = _generate(engines[pool], prompts, args.tokens)
            walls[(load, pool)].append(wall)
            steps[(load, pool)].append(ms)
    for engine in engines.values():
        engine.close()
    return [
        {
            "model": name,
            "load": load,
            "thread_pool": "engine's own" if pool else "ggml's per decode",
            "median_seconds": statistics.median(walls[(load, pool)]),
            "median_ms_per_step": statistics.median(steps[(load, pool)]),
            "seconds": walls[(load, pool)],
        }
        for load, pool in arms
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["demo", "smollm2"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="most tokens per generation")
    ap.add_argument("--prompts", type=int, default=32, help="generations per arm and repeat")
    ap.add_argument("--n-ctx", type=int, default=256)
    args = ap.parse_args()
    load = os.getloadavg()
    rows = [r for name in args.models for r in run_model(name, args)]
    ratios = {}
    for name in args.models:
        for load in ("one at a time", "busy thread", "8 at once"):
            own, per = (
                next(
                    r for r in rows
                    if r["model"] == name and r["load"] == load
                    and r["thread_pool"].startswith(kind)
                )
                for kind in ("engine", "ggml")
            )  # fmt: skip
            ratios[f"{name}, {load}"] = own["median_seconds"] / per["median_seconds"]
    result = {
        "benchmark": "generations one after another, engine's own ggml thread pool vs per call",
        "command": f"python bench/thread_pool.py --models {' '.join(args.models)}",
        "threads": args.threads,
        "tokens_per_generation": args.tokens,
        "runs": rows,
        "own_pool_over_per_call": ratios,
        "load_average_before": load,
        "machine": machine(),
    }
    print(
        table(
            ["model", "load", "thread pool", "median s", "ms per step"],
            [
                [
                    r["model"], r["load"], r["thread_pool"],
                    f"{r['median_seconds']:.3f}", f"{r['median_ms_per_step']:.3f}",
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    for k, v in ratios.items():
        print(f"{k}: own pool ÷ pool per call = {v:.2f}×")
    print(f"wrote {save('thread_pool', result)}")


if __name__ == "__main__":
    main()
