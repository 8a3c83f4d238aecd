"""DSTC8 slot extraction (Buses_1 + Events_1): the teacher answers a JSON object of slot → value.

One student for both domains (``--recipe scratch``: a ~1 M-parameter llama trained from nothing;
``pretrained``: SmolLM2-135M-Instruct, the bundled base); the system line names the domain and the
slots the assistant asked for; ``--k`` adds the job's exemplar memory. The same student is
evaluated up to three ways: under the answer schema the job inferred from the traces (registered
with the student; nothing hand-written), under a hand-written schema per domain, and with no
grammar at all. Scored by exact match of the parsed object.

    .venv/bin/python bench/distill_dstc8.py [--minutes 8]
    .venv/bin/python bench/distill_dstc8.py --recipe pretrained --minutes 20 --arms inferred
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from _common import cached_minilm, machine, require_data, save, table, write_traces

DOMAINS = ("Buses_1", "Events_1")
ARMS = ("inferred", "hand-written", "no grammar")
RECIPES: dict[str, dict[str, Any]] = {
    "scratch": {
        "student": {
            "hidden": 128,
            "layers": 4,
            "heads": 4,
            "kv_heads": 2,
            "ffn": 384,
            "context": 256,
            "vocab_size": 2048,
        },
        "training": {"epochs": 40, "batch_size": 32, "learning_rate": 2e-3, "save_every": 500},
    },
    "pretrained": {
        "student": {"base": "smollm2-135m-instruct", "train_layers": 8},
        "training": {"epochs": 6, "batch_size": 16, "save_every": 100, "group_by_length": True},
    },
}


def _example(domain: str, item: dict[str, Any]) -> tuple[list[dict[str, str]], str, dict[str, Any]]:
    text = item["userInput"]["text"]
    asked = item.get("context", {}).get("requestedSlots", [])
    system = f"Extract {domain.split('_')[0].lower()} slots as JSON."
    if asked:
        system += " Asked for: " + ", ".join(asked) + "."
    slots = {}
    for label in item.get("labels", []):
        span = label["valueSpan"]
        slots[label["slot"]] = text[span.get("startIndex", 0) : span["endIndex"]]
    answer = json.dumps(dict(sorted(slots.items())), ensure_ascii=False)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return messages, answer, {"model": "dstc8-gold", "domain": domain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--work", type=Path, default=Path("bench/out/dstc8"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for training and evaluation"
    )
    ap.add_argument("--resume", action="store_true", help="continue the last interrupted job run")
    ap.add_argument("--eval-threads", type=int, default=None, help="llama.cpp threads (evaluation)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="scratch")
    ap.add_argument("--k", type=int, default=0, help="exemplars per prompt (0: no [exemplars])")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="schemas")
    ap.add_argument("--name", default="distill_dstc8", help="results name")
    args = ap.parse_args()

    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_understudy.distill_jobs.dataset import Example
    from langchain_understudy.distill_jobs.evaluation import evaluate_student
    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
    from langchain_understudy.distill_jobs.traces import TraceStore
    from langchain_understudy.students import ChatStudent, StudentRegistry

    root = require_data("dstc8")
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test, slots = [], {}, {}
    for d in DOMAINS:
        items = json.loads((root / d / "train_0.json").read_text())
        train += [_example(d, it) for it in items]
        test[d] = [_example(d, it) for it in json.loads((root / d / "test.json").read_text())]
        slots[d] = sorted({lab["slot"] for it in items for lab in it.get("labels", [])})
    write_traces(work / "train.jsonl", train)
    store = TraceStore(work / "traces.sqlite")
    if store.count() == 0:
        store.import_jsonl(work / "train.jsonl")

    cfg = DistillConfig(
        name="dstc8",
        traces=work / "traces.sqlite",
        registry=work / "students",
        work_dir=work / "runs",
        heldout_fraction=0.05,
        skip_if_no_new_traces=False,
        student=RECIPES[args.recipe]["student"],
        training={
            **RECIPES[args.recipe]["training"],
            "max_minutes": args.minutes,
            "threads": args.threads,
        },
        exemplars={"k": args.k, "distinct_by": "answer"} if args.k else None,
        package={"quant_types": ["Q8_0"], "serve": "Q8_0", "eval_threads": args.eval_threads},
    )
    embeddings = None
    if args.k:
        queries = [m[-1]["content"] for m, _, _ in train] + [
            m[-1]["content"] for d in DOMAINS for m, _, _ in test[d]
        ]
        embeddings = cached_minilm(Path("bench/out/dstc8_minilm_cache.npz"), queries)
    result = DistillJob(cfg, embeddings=embeddings).run(resume=args.resume)
    print(f"job: {result.status} {result.version} ({result.reason})")
    version = StudentRegistry(cfg.registry).get(result.version or "")
    inferred = ChatStudent.from_version(
        version,
        embeddings=embeddings,
        n_ctx=512 if args.k else 256,
        max_tokens=96,
        n_threads=args.eval_threads or args.threads,
    )
    assert inferred.answer_space is not None and inferred.answer_space.kind == "json"
    free = inferred.model_copy(update={"answer_space": None})
    rows, per_arm = [], {}
    for arm in args.arms:
        per_domain: dict[str, Any] = {}
        for d in DOMAINS:
            hand = {
                "type": "object",
                "properties": {s: {"type": "string"} for s in slots[d]},
                "additionalProperties": False,
            }
            examples = []
            for i, (msgs, answer, meta) in enumerate(test[d]):
                conv = [SystemMessage(msgs[0]["content"]), HumanMessage(msgs[1]["content"])]
                examples.append(
                    Example(key=f"{d}-{i}", messages=conv, answer=answer, metadata=meta)
                )
            rep = evaluate_student(
                free if arm == "no grammar" else inferred,
                examples,
                json_schema=hand if arm == "hand-written" else None,
                desc=f"{d} test ({arm})",
            )
            per_domain[d] = rep.summary()
            rows.append(
                [
                    arm,
                    d,
                    rep.n,
                    f"{rep.exact_match:.4f}",
                    f"{rep.field_accuracy or 0:.4f}",
                    f"{rep.valid_json:.3f}",
                    f"{rep.latency_ms_p50:.1f}",
                    f"{rep.latency_ms_p95:.1f}",
                ]
            )
            (work / f"test_rows_{d}_{arm.replace(' ', '_')}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rep.rows)
            )
        n_all = sum(per_domain[d]["n"] for d in DOMAINS)
        per_domain["overall_exact_match"] = (
            sum(per_domain[d]["exact_match"] * per_domain[d]["n"] for d in DOMAINS) / n_all
        )
        per_domain["overall_valid_json"] = (
            sum(per_domain[d]["valid_json"] * per_domain[d]["n"] for d in DOMAINS) / n_all
        )
        per_arm[arm] = per_domain
    out = {
        "benchmark": "DSTC8 slot extraction (Buses_1 + Events_1), JSON answers under a grammar",
        "data": "DSTC8 span extraction (Coope et al. 2020), train_0 / test",
        "teacher": "gold slot spans stand in for the teacher's JSON answers",
        "command": (
            f"python bench/distill_dstc8.py --minutes {args.minutes:g} --threads {args.threads}"
            f" --eval-threads {args.eval_threads} --recipe {args.recipe} --k {args.k}"
            f" --arms {' '.join(repr(a) if ' ' in a else a for a in args.arms)}"
        ),
        "recipe": args.recipe,
        "exemplars_k": args.k,
        "machine": machine(),
        "train_threads": args.threads,
        "train_seconds": result.metrics.get("train_seconds"),
        "train_steps": result.metrics.get("train_steps"),
        "n_train": result.metrics.get("n_train"),
        "n_params": result.metrics.get("n_params"),
        "file_mb": version.path.stat().st_size / 1e6,
        "inferred_schema": inferred.answer_space.schema,
        "test": per_arm,
        "wall_seconds": time.perf_counter() - t0,
    }
    head = ["schema", "domain", "n", "exact match", "field acc", "valid JSON", "p50 ms", "p95 ms"]
    print(table(head, rows))
    for arm, r in per_arm.items():
        print(f"{arm}: overall exact match {r['overall_exact_match']:.4f}")
    print(f"wrote {save(args.name, out)}")


if __name__ == "__main__":
    main()
