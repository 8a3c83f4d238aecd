"""What each training choice buys on a CPU budget: seconds per step of SmolLM2-135M-Instruct.

The same 16-example batches of CLINC150 prompts (each with 4 exemplars, as the CLINC benchmark
trains them) through ``train_student`` under each recipe the job offers: every weight, the top N
blocks (``train_layers``), LoRA adapters, a shorter model (``keep_layers``), with and without
length grouping. Each arm runs in its own process (its own peak RSS) for the same number of
steps; the per-step time is the training time over the steps (the first step's warm-up and the
trainer's set-up included).

    .venv/bin/python bench/train_recipes.py --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import cached_minilm, machine, require_data, save, table

ARMS: dict[str, dict[str, Any]] = {
    "every weight": {},
    "train_layers = 8": {"train_layers": 8},
    "train_layers = 4": {"train_layers": 4},
    "train_layers = 8, no length grouping": {"train_layers": 8, "group_by_length": False},
    "LoRA r = 16 (attention)": {"lora": {"r": 16, "alpha": 32}},
    "keep_layers = 12 (every weight)": {"keep_layers": 12},
}


def _examples(n: int) -> list[Any]:
    from langchain_core.messages import HumanMessage

    from langchain_understudy.distill_jobs.dataset import build_examples
    from langchain_understudy.students.exemplars import ExemplarMemory

    data = json.loads((require_data("clinc150") / "data_full.json").read_text())
    train = data["train"]
    emb: Any = cached_minilm(Path("bench/out/clinc_minilm_cache.npz"), [q for q, _ in train])
    vecs = emb.embed_documents([q for q, _ in train])
    memory = ExemplarMemory.build(
        [q for q, _ in train], [a for _, a in train], [str(i) for i in range(len(train))], vecs
    )
    pick = random.Random(0).sample(range(len(train)), n)
    examples, _ = build_examples([([HumanMessage(train[i][0])], train[i][1], {}) for i in pick])
    found = memory.search(
        [vecs[i] for i in pick], k=4, vote_k=30, exclude_keys=[str(i) for i in pick]
    )
    for ex, shown in zip(examples, found, strict=True):
        ex.exemplars = shown
        ex.render(None)
    return examples


def _arm(name: str, steps: int, threads: int, out: Path) -> dict[str, Any]:
    from langchain_understudy.distill_jobs.bases import resolve_base
    from langchain_understudy.distill_jobs.training import (
        LoraSettings,
        TrainSettings,
        train_student,
    )

    opts = dict(ARMS[name])
    lora = opts.pop("lora", None)
    settings = TrainSettings(
        max_steps=steps,
        batch_size=16,
        learning_rate=1e-3 if lora else 1e-4,
        save_every=10_000,
        threads=threads,
        base_checkpoint=str(resolve_base("smollm2-135m-instruct")),
        lora=LoraSettings(**lora) if lora else None,
        group_by_length=opts.pop("group_by_length", True),
        **opts,
    )
    examples = _examples(16 * steps)
    result = train_student(examples, out, settings, progress_bar=False)
    per_step = result.seconds / result.steps
    tokens = sum(len(ex.prompt) + len(ex.target) for ex in examples) / len(examples)
    return {
        "arm": name,
        "settings": ARMS[name],
        "steps": result.steps,
        "seconds_per_step": per_step,
        "examples_per_second": 16 / per_step,
        "n_params": result.n_params,
        "n_trainable": result.n_trainable,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "mean_chars_per_example": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # one arm, in a child process
    ap.add_argument("--work", type=Path, default=Path("bench/out/train_recipes"))
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(_arm(args.arm, args.steps, args.threads, args.work / "run")))
        return
    rows, results = [], []
    for name in ARMS:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--arm",
                name,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--work",
                str(args.work / str(len(results))),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
            check=False,
        )
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"arm {name!r} failed")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(r)
        rows.append(
            [
                name,
                f"{r['n_trainable'] / 1e6:.1f} M",
                f"{r['seconds_per_step']:.2f}",
                f"{r['examples_per_second']:.1f}",
                f"{r['peak_rss_gb']:.1f}",
            ]
        )
        print(f"{name}: {r['seconds_per_step']:.2f} s/step", flush=True)
    out = {
        "benchmark": "SmolLM2-135M-Instruct training step cost per recipe, CLINC150 prompts",
        "command": f"python bench/train_recipes.py --steps {args.steps} --threads {args.threads}",
        "machine": machine(),
        "batch_size": 16,
        "arms": results,
    }
    print(table(["recipe", "trained", "s / step", "examples / s", "peak RSS GB"], rows))
    print(f"wrote {save('train_recipes', out)}")


if __name__ == "__main__":
    main()
