"""CLINC150 through the product path: traces → `[exemplars]` job → registered student → test.

Traces: the 15,000 in-scope training queries (user: the query; teacher: the intent name — the
dataset's gold labels stand in for a teacher). The job's own exemplar memory (``[exemplars]``)
shows each prompt the k most similar past teacher answers, distinct ones, never the example's own;
the registered student retrieves them the same way at test time (``ChatStudent.from_version``).
Recipes: ``scratch`` (a ~1 M-parameter llama trained from nothing) and ``pretrained``
(SmolLM2-135M-Instruct, the bundled base). Evaluated at Q8_0 and Q4_K_M on the in-scope test
queries (all 4,500, or a fixed random sample with ``--limit-test``), beside nearest-neighbour
baselines over the same MiniLM embeddings.

    .venv/bin/python bench/distill_clinc.py --recipe pretrained --minutes 20 --threads 2
    .venv/bin/python bench/distill_clinc.py --recipe scratch --minutes 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import (
    cached_minilm,
    checkpoint_curve,
    clinc_conversation,
    machine,
    plot_curve,
    require_data,
    save,
    table,
    write_traces,
)

RECIPES: dict[str, dict[str, Any]] = {
    "scratch": {
        "student": {
            "hidden": 128,
            "layers": 4,
            "heads": 4,
            "kv_heads": 2,
            "ffn": 384,
            "context": 320,
            "vocab_size": 2048,
        },
        "training": {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3, "save_every": 500},
        "n_ctx": 320,
    },
    "pretrained": {
        "student": {"base": "smollm2-135m-instruct"},
        "training": {"epochs": 2, "batch_size": 16, "save_every": 100, "group_by_length": True},
        "n_ctx": 512,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="pretrained")
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--work", type=Path, default=None, help="default bench/out/clinc-<recipe>")
    ap.add_argument("--k", type=int, default=5, help="exemplars per prompt (0: no [exemplars])")
    ap.add_argument("--train-layers", type=int, default=None, help="pretrained: top N blocks")
    ap.add_argument("--keep-layers", type=int, default=None, help="pretrained: bottom N blocks")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate")
    ap.add_argument("--limit-test", type=int, default=None, help="fixed random test sample")
    ap.add_argument("--heldout", type=float, default=0.03, help="held-out share of the traces")
    ap.add_argument("--fresh", action="store_true", help="delete the work folder first")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (train and eval)")
    ap.add_argument("--resume", action="store_true", help="continue the last interrupted run")
    ap.add_argument("--eval-threads", type=int, default=None, help="llama.cpp threads (evaluation)")
    ap.add_argument("--multi-turn", type=float, default=0.0, help="share of multi-turn traces")
    ap.add_argument("--name", default=None, help="results name (default distill_clinc_<recipe>)")
    ap.add_argument("--order", choices=["vote", "similarity"], default="vote", help="exemplars")
    ap.add_argument(
        "--curve-minutes", type=float, default=None, help="checkpoint (and evaluate) every M min"
    )
    args = ap.parse_args()

    from langchain_core.messages import HumanMessage

    from langchain_understudy.distill_jobs.dataset import Example
    from langchain_understudy.distill_jobs.evaluation import evaluate_student
    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
    from langchain_understudy.distill_jobs.traces import TraceStore
    from langchain_understudy.students import ChatStudent, StudentRegistry

    recipe = RECIPES[args.recipe]
    data = json.loads((require_data("clinc150") / "data_full.json").read_text())
    work = args.work or Path(f"bench/out/clinc-{args.recipe}")
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # 1. traces, imported as a user would
    rng = random.Random(0)
    conversations, answers = [], []
    for q, intent in data["train"]:
        if rng.random() < args.multi_turn:
            turns, ref, _ = clinc_conversation(q, intent, data["train"], rng, 0.25)
        else:
            turns, ref = [("user", q)], intent
        conversations.append([{"role": r, "content": t} for r, t in turns])
        answers.append(ref)
    traces_file = work / "clinc_train.jsonl"
    write_traces(
        traces_file,
        (
            (conv, ref, {"model": "clinc150-gold", "split": "train"})
            for conv, ref in zip(conversations, answers, strict=True)
        ),
    )
    store = TraceStore(work / "traces.sqlite")
    if store.count() == 0:
        store.import_jsonl(traces_file)
    queries = [q for split in ("train", "test", "val") for q, _ in data[split]]
    emb = cached_minilm(Path("bench/out/clinc_minilm_cache.npz"), queries)

    # 2. the distillation job with its own exemplar memory
    student = dict(recipe["student"])
    if args.train_layers:
        student["train_layers"] = args.train_layers
    if args.keep_layers:
        student["keep_layers"] = args.keep_layers
    training = {**recipe["training"], "max_minutes": args.minutes, "threads": args.threads}
    if args.curve_minutes:
        training |= {"save_every_minutes": args.curve_minutes, "keep_checkpoints": 0}
    if args.lr:
        training["learning_rate"] = args.lr
    cfg = DistillConfig(
        name=f"clinc-{args.recipe}",
        traces=work / "traces.sqlite",
        registry=work / "students",
        work_dir=work / "runs",
        heldout_fraction=args.heldout,
        skip_if_no_new_traces=False,
        exemplars={"k": args.k, "distinct_by": "answer", "order": args.order} if args.k else None,
        student=student,
        training=training,
        package={
            "quant_types": ["Q8_0", "Q4_K_M"],
            "serve": "Q8_0",
            "eval_threads": args.eval_threads,
        },
    )
    job = DistillJob(cfg, embeddings=emb)
    result = job.run(resume=args.resume)
    print(f"job: {result.status} {result.version} ({result.reason})")

    # 3. the registered student on the official test split, exemplars retrieved at serving time
    test = list(enumerate(data["test"]))
    if args.limit_test:
        test = random.Random(1).sample(test, args.limit_test)
    examples = [
        Example(key=f"test-{i}", messages=[HumanMessage(q)], answer=intent)
        for i, (q, intent) in test
    ]
    reg = StudentRegistry(cfg.registry)
    version = reg.get(result.version or "")
    run_dir = Path(version.provenance["run_dir"])
    rows, per_quant = [], {}

    def student_for(gguf: Path, closed: bool = True) -> ChatStudent:
        st = ChatStudent.from_version(
            version,
            embeddings=emb,
            n_ctx=recipe["n_ctx"],
            max_tokens=16,
            n_threads=args.eval_threads or args.threads,
        )
        return st.model_copy(
            update={"model_path": gguf, **({} if closed else {"answer_space": None})}
        )

    st = student_for(run_dir / "student.Q8_0.gguf")
    shown = [st.exemplars.for_messages(ex.messages) if st.exemplars else [] for ex in examples]
    shown_right = sum(
        any(e.answer == ex.answer for e in s) for s, ex in zip(shown, examples, strict=True)
    )
    first_right = sum(
        bool(s) and s[0].answer == ex.answer for s, ex in zip(shown, examples, strict=True)
    )
    arms = [("Q8_0", True), ("Q4_K_M", True), ("Q8_0", False)]
    for quant, closed in arms:
        gguf = run_dir / f"student.{quant}.gguf"
        name = quant if closed else f"{quant}, answer space off"
        rep = evaluate_student(student_for(gguf, closed), examples, desc=f"CLINC test {name}")
        per_quant[name] = {**rep.summary(), "file_mb": gguf.stat().st_size / 1e6}
        rows.append(
            [
                name,
                f"{rep.exact_match:.4f}",
                f"{rep.latency_ms_p50:.1f}",
                f"{rep.latency_ms_p95:.1f}",
                f"{gguf.stat().st_size / 1e6:.1f}",
            ]
        )
        (work / f"test_rows_{name.replace(', ', '_').replace(' ', '_')}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rep.rows)
        )
    curve = (
        checkpoint_curve(
            run_dir,
            student_for,
            examples,
            desc="CLINC checkpoint",
            save_every=recipe["training"]["save_every"],
        )
        if args.curve_minutes
        else []
    )

    # 4. nearest-neighbour baselines over the same embeddings and the same test queries
    import numpy as np

    def unit(texts: list[str]) -> np.ndarray:
        m = np.asarray(emb.embed_documents(texts), dtype=np.float32)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    train_y = [intent for _, intent in data["train"]]
    sims = unit([q for _, (q, _) in test]) @ unit([q for q, _ in data["train"]]).T
    nearest = np.argsort(-sims, axis=1)[:, :30]
    nn1 = wknn = 0
    for row, (_, (_, gold)) in enumerate(test):
        nn1 += train_y[nearest[row, 0]] == gold
        score: Counter[str] = Counter()
        for j in nearest[row]:
            score[train_y[j]] += float(sims[row, j])
        wknn += score.most_common(1)[0][0] == gold
    n_test = len(examples)
    out = {
        "benchmark": "CLINC150 in-scope intent, distilled student with the job's exemplar memory",
        "data": "CLINC150 data_full (Larson et al. 2019), train 15,000 / test 4,500 in-scope",
        "teacher": "gold intent labels stand in for the teacher's answers",
        "recipe": args.recipe,
        "config": json.loads(cfg.model_dump_json()),
        "command": (
            f"python bench/distill_clinc.py --recipe {args.recipe} --minutes {args.minutes:g} "
            f"--threads {args.threads} --k {args.k}"
            + (f" --train-layers {args.train_layers}" if args.train_layers else "")
            + (f" --keep-layers {args.keep_layers}" if args.keep_layers else "")
            + (f" --lr {args.lr:g}" if args.lr else "")
            + (f" --limit-test {args.limit_test}" if args.limit_test else "")
            + (f" --eval-threads {args.eval_threads}" if args.eval_threads else "")
            + f" --heldout {args.heldout:g} --order {args.order}"
            + (f" --curve-minutes {args.curve_minutes:g}" if args.curve_minutes else "")
            + (f" --multi-turn {args.multi_turn:g}" if args.multi_turn else "")
        ),
        "machine": machine(),
        "train_minutes_budget": args.minutes,
        "train_seconds": result.metrics.get("train_seconds"),
        "train_steps": result.metrics.get("train_steps"),
        "n_train": result.metrics.get("n_train"),
        "n_params": result.metrics.get("n_params"),
        "n_trainable": result.metrics.get("n_trainable"),
        "job_timings_s": result.timings_s,
        "heldout_exact_match": result.metrics.get("exact_match"),
        "n_test": n_test,
        "test": per_quant,
        "baselines": {
            "nn_top1": nn1 / n_test,
            "weighted_vote_30nn": wknn / n_test,
            f"answer_among_{args.k}_exemplars": shown_right / n_test,
            "first_exemplar": first_right / n_test,
        },
        "curve": curve,
        "time_to_parity_minutes": next(
            (p["train_minutes"] for p in curve if p["exact_match"] > wknn / n_test), None
        ),
        "student_version": result.version,
        "run_dir": str(run_dir),
        "wall_seconds": time.perf_counter() - t0,
    }
    print(table(["quant", "test exact match", "p50 ms", "p95 ms", "MB"], rows))
    print(table(["baseline", "accuracy"], [[k, f"{v:.4f}"] for k, v in out["baselines"].items()]))
    name = args.name or f"distill_clinc_{args.recipe}"
    if curve:
        png = plot_curve(
            Path("bench/results") / f"{name}_curve.png",
            {f"{args.recipe} student, Q8_0": curve},
            {"weighted 30-NN vote": wknn / n_test},
            f"CLINC150, {n_test} test queries",
        )
        print(f"wrote {png}")
    print(f"wrote {save(name, out)}")


if __name__ == "__main__":
    main()
