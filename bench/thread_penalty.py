"""Decoding off the main thread: the same 8 requests on the main thread, on a worker thread, and
8 at once on one ``ChatStudent`` (continuous batching: 8 slots, and 1 slot for comparison),
interleaved in one run.

llama.cpp built with OpenMP (libgomp) keeps one spinning thread team per calling thread, so a
second thread that decodes competes with the first team for the same cores; the Makefile builds
it with ``-DGGML_OPENMP=OFF`` (ggml's own thread pool). This benchmark checks that build.

    .venv/bin/python bench/thread_penalty.py [--repeats 3] [--gguf smollm2 --name thread_penalty_smollm2]

``--gguf`` runs the same arms on any GGUF (``smollm2``: the bundled SmolLM2-135M-Instruct Q4_1)
instead of the random-weight 25 M-parameter student.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import machine, save, table


def _student_gguf(folder: Path) -> Path:
    """A random-weight ~25 M-parameter llama student (decode speed does not need training)."""
    from langchain_understudy.distill_jobs.scratch import (
        ScratchSize,
        build_tokenizer,
        init_student,
        save_student,
    )
    from langchain_understudy.students import export_gguf, quantize_gguf

    lines = [f"request {i} about plan {i % 7} and price {i * 13 % 1000}" for i in range(3000)]
    tok = build_tokenizer(lines, folder / "ckpt", vocab_size=2048)
    model = init_student(tok, ScratchSize(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536))
    save_student(model, tok, folder / "ckpt")
    f16 = export_gguf(folder / "ckpt", folder / "student.f16.gguf")
    return quantize_gguf(f16, folder / "student.Q8_0.gguf", "Q8_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8, help="slots of the batching student")
    ap.add_argument("--gguf", help="a GGUF to decode with, or 'smollm2' (default: a random 25 M)")
    ap.add_argument("--name", default="thread_penalty", help="results file name")
    args = ap.parse_args()

    import llama_cpp

    from langchain_understudy.students import ChatStudent

    if args.gguf == "smollm2":
        from langchain_understudy.distill_jobs.bases import builtin_base_path

        gguf = builtin_base_path("smollm2-135m-instruct")
    elif args.gguf:
        gguf = Path(args.gguf)
    else:
        gguf = _student_gguf(Path(tempfile.mkdtemp(prefix="thread-penalty-")))

    def make(**kw: object) -> ChatStudent:
        opts = {"n_threads": args.threads, "n_parallel": args.parallel, **kw}
        return ChatStudent(
            model_path=gguf, n_ctx=512, max_tokens=args.tokens, stop=["\x00"], **opts
        ).load()

    student = make()
    one_slot = make(n_parallel=1)
    one_thread = make(n_threads=1)
    prompts = [f"request {i}: how much is plan {i}?" for i in range(8)]

    def sequential() -> None:
        for p in prompts:
            student.invoke(p, confidence=False)

    def on_worker() -> None:
        t = threading.Thread(target=sequential)
        t.start()
        t.join()

    def concurrent() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: student.invoke(p, confidence=False), prompts))

    def concurrent_one_slot() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: one_slot.invoke(p, confidence=False), prompts))

    def single_threaded() -> None:
        for p in prompts:
            one_thread.invoke(p, confidence=False)

    arms = {
        "main thread": sequential,
        "worker thread": on_worker,
        "8 concurrent": concurrent,
        "8 concurrent, 1 slot": concurrent_one_slot,
        "main thread, n_threads=1": single_threaded,
    }
    engine_of = {"8 concurrent": student, "8 concurrent, 1 slot": one_slot, "main thread": student}
    times: dict[str, list[float]] = {k: [] for k in arms}
    # where the batching arms spend their time: decode steps, and wall time inside llama_decode
    decode: dict[str, dict[str, list[float]]] = {
        k: {"steps": [], "ms_per_step": [], "decode_share": []} for k in engine_of
    }
    sequential()  # warm-up
    for _ in range(args.repeats):
        for name, fn in arms.items():
            stats = engine_of[name].engine_stats if name in engine_of else None
            steps0, sec0 = (stats.steps, stats.decode_seconds) if stats else (0, 0.0)
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            times[name].append(wall)
            if stats is not None:
                steps, sec = stats.steps - steps0, stats.decode_seconds - sec0
                decode[name]["steps"].append(steps)
                decode[name]["ms_per_step"].append(1000 * sec / max(1, steps))
                decode[name]["decode_share"].append(sec / wall)
    med = {k: statistics.median(v) for k, v in times.items()}
    inside = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in decode.items()}
    out = {
        "benchmark": "8 requests decoded on the main thread, a worker thread, and concurrently",
        "command": f"python bench/thread_penalty.py --repeats {args.repeats} "
        f"--parallel {args.parallel}" + (f" --gguf {args.gguf} --name {args.name}" if args.gguf else ""),
        "n_parallel": args.parallel,
        "machine": machine(),
        "llama_cpp_python": llama_cpp.__version__,
        "student": str(gguf) if args.gguf else "random-weight llama, hidden 512, 8 layers, Q8_0",
        "tokens_per_request": args.tokens,
        "seconds": times,
        "median_seconds": med,
        "worker_over_main": med["worker thread"] / med["main thread"],
        "concurrent_over_sequential": med["8 concurrent"] / med["main thread"],
        "concurrent_one_slot_over_sequential": med["8 concurrent, 1 slot"] / med["main thread"],
        "one_thread_over_all_threads": med["main thread, n_threads=1"] / med["main thread"],
        "decode": inside,
        "load_average": os.getloadavg(),
    }
    rows = [[k, f"{v:.2f}", f"{v / med['main thread']:.2f}"] for k, v in med.items()]
    print(table(["arm", "median s", "÷ main thread"], rows))
    rows = [
        [k, f"{d['steps']:.0f}", f"{d['ms_per_step']:.2f}", f"{100 * d['decode_share']:.0f}%"]
        for k, d in inside.items()
    ]
    print(table(["arm", "decode steps", "ms per step", "wall time in llama_decode"], rows))
    print(f"wrote {save(args.name, out)}")


if __name__ == "__main__":
    main()
