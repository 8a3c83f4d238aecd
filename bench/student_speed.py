"""ChatStudent vs raw llama_cpp.Llama on the same GGUF: decode and prompt throughput, TTFT, peak RSS.

Two random-weight students (speed does not depend on what the weights say), ~5M and ~30M
parameters, each at F16, Q8_0 and Q4_K_M. Each measurement runs in its own subprocess (so peak RSS
is its own), raw and ChatStudent interleaved, repeated; medians reported.

    .venv/bin/python bench/student_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, save, table

SIZES = {
    "5M": {"hidden": 256, "layers": 6, "heads": 4, "kv_heads": 2, "ffn": 768, "vocab": 4096},
    "30M": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "ffn": 1536, "vocab": 8192},
}
QUANTS = ("F16", "Q8_0", "Q4_K_M")
N_DECODE = 256
THREADS = 2


def build(work: Path) -> dict[str, dict[str, Path]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import corpus

    from langchain_understudy.distill_jobs.scratch import (
        ScratchSize,
        build_tokenizer,
        init_student,
        save_student,
    )
    from langchain_understudy.students import export_gguf, quantize_gguf

    out: dict[str, dict[str, Path]] = {}
    for name, s in SIZES.items():
        d = work / name
        f16 = d / "student.F16.gguf"
        if not f16.exists():
            tok = build_tokenizer(corpus(20000, seed=1), d / "ckpt", vocab_size=s["vocab"])
            size = ScratchSize(s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["ffn"], 1024)
            model = init_student(tok, size, seed=0)
            save_student(model, tok, d / "ckpt")
            export_gguf(d / "ckpt", f16, dtype="f16")
        out[name] = {"F16": f16}
        for q in QUANTS[1:]:
            p = d / f"student.{q}.gguf"
            if not p.exists():
                quantize_gguf(f16, p, q)
            out[name][q] = p
    return out


PROMPT = " ".join(
    ["The Pro plan costs 49 EUR a month and includes 20 seats and priority support."] * 12
)


def measure(runner: str, path: str) -> dict[str, float]:
    """Run in a child process: time prompt+1 token and prompt+N tokens; report rates and RSS."""
    from langchain_core.messages import HumanMessage

    from langchain_understudy.prompting import render_prompt

    prompt_text = render_prompt([HumanMessage(PROMPT)])
    if runner == "raw":
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=path, n_ctx=1024, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
        )

        def run(n: int) -> tuple[float, int]:
            llm.reset()
            t = time.perf_counter()
            r = llm.create_completion(prompt_text, max_tokens=n, temperature=0.0, top_k=1)
            return time.perf_counter() - t, int(r["usage"]["completion_tokens"])

        n_prompt = len(llm.tokenize(prompt_text.encode(), special=True))
    else:
        from langchain_understudy.students import ChatStudent

        student = ChatStudent(
            model_path=path,
            n_ctx=1024,
            n_threads=THREADS,
            confidence=runner == "student+conf",
            stop=None,
        )
        student.load()
        msgs = [HumanMessage(PROMPT)]

        def run(n: int) -> tuple[float, int]:
            t = time.perf_counter()
            m = student.invoke(msgs, max_tokens=n)
            return time.perf_counter() - t, int(m.usage_metadata["output_tokens"]) + (
                1 if m.response_metadata["finish_reason"] == "stop" else 0
            )

        n_prompt = student.count_tokens(prompt_text)
    run(4)  # warm up
    t1, _ = min(run(1) for _ in range(3))
    tn, n = min((run(N_DECODE) for _ in range(3)), key=lambda x: x[0])
    return {
        "prompt_tokens": n_prompt,
        "ttft_ms": t1 * 1000,
        "prompt_tok_s": n_prompt / t1,
        "decode_tok_s": (n - 1) / (tn - t1) if n > 1 else float("nan"),
        "generated": n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("bench/out/speed"))
    ap.add_argument("--child", nargs=2, metavar=("RUNNER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    models = build(args.work)
    runners = ("raw", "student", "student+conf")
    results: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    for rep in range(args.repeats):
        for size, quants in models.items():
            for q, path in quants.items():
                for runner in runners:  # interleaved so drift hits all runners alike
                    out = (
                        subprocess.run(
                            [sys.executable, __file__, "--child", runner, str(path)],
                            capture_output=True,
                            text=True,
                            check=True,
                        )
                        .stdout.strip()
                        .splitlines()[-1]
                    )
                    results.setdefault(size, {}).setdefault(q, {}).setdefault(runner, []).append(
                        json.loads(out)
                    )
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    rows, summary = [], {}
    for size, quants in results.items():
        for q, by_runner in quants.items():
            med = {
                r: {k: statistics.median(x[k] for x in v) for k in v[0]}
                for r, v in by_runner.items()
            }
            raw = med["raw"]["decode_tok_s"]
            entry = {
                **{r: m for r, m in med.items()},
                "student_vs_raw_decode": med["student"]["decode_tok_s"] / raw,
                "student_conf_vs_raw_decode": med["student+conf"]["decode_tok_s"] / raw,
                "file_mb": Path(models[size][q]).stat().st_size / 1e6,
            }
            summary[f"{size}/{q}"] = entry
            rows.append(
                [
                    size,
                    q,
                    f"{entry['file_mb']:.1f}",
                    f"{raw:.0f}",
                    f"{med['student']['decode_tok_s']:.0f}",
                    f"{med['student+conf']['decode_tok_s']:.0f}",
                    f"{entry['student_vs_raw_decode']:.3f}",
                    f"{entry['student_conf_vs_raw_decode']:.3f}",
                    f"{med['raw']['prompt_tok_s']:.0f}",
                    f"{med['student']['prompt_tok_s']:.0f}",
                    f"{med['raw']['ttft_ms']:.1f}",
                    f"{med['student']['ttft_ms']:.1f}",
                    f"{med['raw']['peak_rss_mb']:.0f}",
                    f"{med['student']['peak_rss_mb']:.0f}",
                ]
            )
    headers = [
        "size",
        "quant",
        "MB",
        "raw dec t/s",
        "student dec t/s",
        "+conf dec t/s",
        "student/raw",
        "+conf/raw",
        "raw prompt t/s",
        "student prompt t/s",
        "raw TTFT ms",
        "student TTFT ms",
        "raw RSS MB",
        "student RSS MB",
    ]
    print(table(headers, rows))
    path = save(
        "student_speed",
        {
            "command": f"python bench/student_speed.py --repeats {args.repeats}",
            "machine": machine(),
            "threads": THREADS,
            "n_decode": N_DECODE,
            "results": summary,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
