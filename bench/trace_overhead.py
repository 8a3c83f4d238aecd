"""What does ``TraceRecorder`` cost per chat-model call?

A fast fake chat model (no I/O; a support conversation and answer with PII in them, new on every
call apart from the system prompt) is invoked
many times under four arms, interleaved block by block in one process so drift hits all arms alike:

* ``none``: no callbacks at all;
* ``noop-handler``: a do-nothing ``BaseCallbackHandler`` (what LangChain's callback machinery
  alone costs once any handler is attached);
* ``recorder``: ``TraceRecorder`` with redaction (the default);
* ``recorder-raw``: ``TraceRecorder(redact=False)``.

Both ``invoke`` and ``stream`` are measured. The per-call times are taken on the caller's thread,
which is what an agent feels; the background writer's drain time is reported separately.

    .venv/bin/python bench/trace_overhead.py [--calls 3000] [--block 100]

Writes ``bench/results/trace_overhead.json`` and prints a short table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import langchain_core
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_understudy.distill_jobs.recorder import TraceRecorder
from langchain_understudy.distill_jobs.traces import TraceStore

OUT = Path(__file__).parent / "results" / "trace_overhead.json"

ANSWER = (
    "Thanks Jane! I found your order 4111111111111112 from 2024-01-15. The refund of 49.00 EUR "
    "goes to IBAN DE89 3704 0044 0532 0130 00 within 3-5 days; we will confirm to "
    "jane.doe@example.com. Anything else I can help with?"
)
SYSTEM = SystemMessage("You are the support assistant of Acme. Be brief, friendly, precise. " * 3)
QUESTION = (
    "Hi, I'm Jane (jane.doe@example.com, +49 30 1234567). My order 4111111111111112 arrived "
    "broken, please refund it to my account. Ticket {n}."
)
_counter = itertools.count()


def prompt() -> list[BaseMessage]:
    """A new conversation each call (same system prompt, as an agent sends it)."""
    return [SYSTEM, HumanMessage(QUESTION.format(n=next(_counter)))]


def _answer(messages: list[BaseMessage]) -> str:
    return f"{ANSWER} ({str(messages[-1].content)[-12:]})"  # unique per call, like real answers


class FastChatModel(BaseChatModel):
    """Answers instantly with a fixed message (streamed as 8 chunks)."""

    @property
    def _llm_type(self) -> str:
        return "fast-fake"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(_answer(messages)))])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        text = _answer(messages)
        step = len(text) // 8 + 1
        for i in range(0, len(text), step):
            yield ChatGenerationChunk(message=AIMessageChunk(content=text[i : i + step]))


class NoopHandler(BaseCallbackHandler):
    """Receives every event and does nothing."""


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000, help="calls per arm and mode")
    ap.add_argument("--block", type=int, default=100, help="calls per interleaved block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="trace-bench-"))
    store = TraceStore(tmp / "traces.sqlite")
    rec = TraceRecorder(store, tags=["bench"])
    raw_store = TraceStore(tmp / "raw.sqlite")
    rec_raw = TraceRecorder(raw_store, redact=False)
    arms: dict[str, list[Any]] = {
        "none": [],
        "noop-handler": [NoopHandler()],
        "recorder": [rec],
        "recorder-raw": [rec_raw],
    }
    model = FastChatModel()
    modes = {
        "invoke": lambda cfg: model.invoke(prompt(), config=cfg),
        "stream": lambda cfg: list(model.stream(prompt(), config=cfg)),
    }
    times: dict[str, dict[str, list[float]]] = {m: {a: [] for a in arms} for m in modes}
    rng = random.Random(args.seed)

    for call in modes.values():  # warm-up: imports, caches, first SQLite pages
        for cbs in arms.values():
            for _ in range(50):
                call({"callbacks": cbs})
    rec.flush()
    rec_raw.flush()

    blocks = max(1, args.calls // args.block)
    # Per block: wall time of the calls plus, for the recorders, the writer's drain right after
    # the block, so background work is charged to the arm that caused it (not the next arm).
    block_totals: dict[str, dict[str, list[float]]] = {m: {a: [] for a in arms} for m in modes}
    drains: dict[str, dict[str, list[float]]] = {m: {a: [] for a in arms} for m in modes}
    flushers = {"recorder": rec, "recorder-raw": rec_raw}
    t_start = time.perf_counter()
    for _ in range(blocks):
        for mode, call in modes.items():
            order = list(arms)
            rng.shuffle(order)
            for arm in order:
                cfg = {"callbacks": arms[arm]}
                bucket = times[mode][arm]
                b0 = time.perf_counter_ns()
                for _ in range(args.block):
                    t0 = time.perf_counter_ns()
                    call(cfg)
                    bucket.append((time.perf_counter_ns() - t0) / 1000.0)
                d0 = time.perf_counter_ns()
                if arm in flushers:
                    flushers[arm].flush()
                end = time.perf_counter_ns()
                drains[mode][arm].append((end - d0) / 1000.0 / args.block)
                block_totals[mode][arm].append((end - b0) / 1000.0 / args.block)
    loop_s = time.perf_counter() - t_start
    rec.flush()
    rec_raw.flush()
    recorded = store.count()
    sample = next(store.iter_traces())
    assert "<EMAIL>" in str(sample.answer.content)  # redaction really ran

    results: dict[str, Any] = {}
    for mode in modes:
        results[mode] = {}
        for arm, xs in times[mode].items():
            results[mode][arm] = {
                "calls": len(xs),
                "caller_p50_us": _pct(xs, 0.5),
                "caller_p95_us": _pct(xs, 0.95),
                "caller_mean_us": statistics.fmean(xs),
                "writer_drain_per_call_us": statistics.median(drains[mode][arm]),
                "total_per_call_us": statistics.median(block_totals[mode][arm]),
            }
        base, noop = results[mode]["none"], results[mode]["noop-handler"]
        for arm in ("noop-handler", "recorder", "recorder-raw"):
            r = results[mode][arm]
            r["caller_overhead_p50_us"] = r["caller_p50_us"] - base["caller_p50_us"]
            r["total_overhead_us"] = r["total_per_call_us"] - base["total_per_call_us"]
        for arm in ("recorder", "recorder-raw"):
            r = results[mode][arm]
            r["total_overhead_vs_noop_us"] = r["total_per_call_us"] - noop["total_per_call_us"]

    doc = {
        "benchmark": "trace_overhead",
        "what": (
            "wall time per chat-model call of an instant fake model, arms interleaved in blocks; "
            "caller_*: per call on the caller's thread; total_per_call: median over blocks of "
            "(block wall time + recorder flush after the block) / calls"
        ),
        "calls_per_arm_and_mode": blocks * args.block,
        "block": args.block,
        "python": platform.python_version(),
        "langchain_core": langchain_core.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # Other work on the machine inflates every arm; compare arms, not runs, when it is busy.
        "loadavg_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "results": results,
        "writer": {"traces_written": recorded, "loop_s": loop_s, "dropped": rec.dropped},
    }
    rec.close()
    rec_raw.close()
    store.close()
    raw_store.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    head = ["mode", "arm", "caller p50", "caller p95", "total/call", "overhead"]
    print(f"{head[0]:<7} {head[1]:<13} {head[2]:>10} {head[3]:>10} {head[4]:>10} {head[5]:>9}")
    for mode in modes:
        for arm, r in results[mode].items():
            extra = r.get("total_overhead_us")
            extra_s = f"{extra:+9.1f}" if extra is not None else f"{'':>9}"
            print(
                f"{mode:<7} {arm:<13} {r['caller_p50_us']:10.1f} {r['caller_p95_us']:10.1f} "
                f"{r['total_per_call_us']:10.1f} {extra_s}"
            )
    print(
        f"microseconds per call; overhead = total/call minus 'none' (writer time included). "
        f"{recorded} traces recorded, {rec.dropped} dropped; load average "
        f"{doc['loadavg_1m']['start']:.1f}->{doc['loadavg_1m']['end']:.1f} on {os.cpu_count()} CPUs; "
        f"results in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
