"""CLINC150: distil a from-scratch student that reads similar past teacher answers from the store.

Traces: the 15,000 in-scope training queries (user: the query; teacher: the intent name — the
dataset's gold labels stand in for a teacher). The knowledge store holds every training trace as a
fact ("query => intent", metadata ``answer``); each prompt carries k facts with *different*
answers, the most similar past query for each (``distinct_by = "answer"``, text only; never the
example's own trace), so the student learns to pick among candidate answers. Evaluated on the
4,500 in-scope test queries at Q8_0 and Q4_K_M. Also reports nearest-neighbour baselines over the
same embeddings.

    .venv/bin/python bench/distill_clinc.py [--minutes 20] [--threads 2] [--multi-turn 0.3]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

from _common import (
    cached_minilm,
    clinc_conversation,
    machine,
    require_data,
    save,
    table,
    write_traces,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--work", type=Path, default=Path("bench/out/clinc"))
    ap.add_argument("--k", type=int, default=5, help="facts per prompt")
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="delete the work folder first")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for training and evaluation"
    )
    ap.add_argument("--resume", action="store_true", help="continue the last interrupted job run")
    ap.add_argument(
        "--multi-turn",
        type=float,
        default=0.0,
        help="share of training traces turned into 2-4 turn conversations (a quarter of them "
        "ending with a follow-up that needs the history)",
    )
    args = ap.parse_args()

    from langchain_core.messages import AIMessage, HumanMessage

    from langchain_understudy.distill_jobs.dataset import Example, conversation_key
    from langchain_understudy.distill_jobs.evaluation import evaluate_student
    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
    from langchain_understudy.distill_jobs.traces import TraceStore
    from langchain_understudy.retrieval import KnowledgeStore
    from langchain_understudy.students import ChatStudent, StudentRegistry

    data = json.loads((require_data("clinc150") / "data_full.json").read_text())
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # 1. traces: one per training row; with --multi-turn a share of them are 2-4 turn
    # conversations ending with the row's query (or, for some, a follow-up needing the history)
    rng = random.Random(0)
    conversations: list[list[dict[str, str]]] = []
    answers: list[str] = []
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

    # 2. knowledge store of past teacher answers, each fact embedded by its query
    queries = [
        q for split in ("train", "test", "val", "oos_val", "oos_test") for q, _ in data[split]
    ]
    emb = cached_minilm(work.parent / "clinc_minilm_cache.npz", queries)
    kb = KnowledgeStore(work / "kb", emb)
    t_kb = time.perf_counter()
    if kb.stats().facts == 0:
        texts = [f"{q} => {intent}" for q, intent in data["train"]]
        vectors = emb.embed_documents([q for q, _ in data["train"]])
        # a fact made from a row must never show in the prompt of the trace made from that row
        metas = [
            {
                "source_key": conversation_key(
                    [
                        HumanMessage(m["content"])
                        if m["role"] == "user"
                        else AIMessage(m["content"])
                        for m in conv
                    ]
                ),
                "answer": intent,
                "as_of": "2019-11-01",
            }
            for conv, (_, intent) in zip(conversations, data["train"], strict=True)
        ]
        kb.add_embeddings(
            zip(texts, vectors, strict=True),
            metas,
            ids=[f"clinc-train-{i}" for i in range(len(texts))],
        )
    kb_seconds = time.perf_counter() - t_kb

    # 3. the distillation job, as a user would run it
    cfg = DistillConfig(
        name="clinc",
        traces=work / "traces.sqlite",
        registry=work / "students",
        work_dir=work / "runs",
        heldout_fraction=0.03,
        skip_if_no_new_traces=False,
        knowledge={
            "path": work / "kb",
            "k": args.k,
            # k different past answers (the most similar query for each), text only
            "distinct_by": "answer",
            "fact_details": False,
        },
        student={
            "hidden": 128,
            "layers": 4,
            "heads": 4,
            "kv_heads": 2,
            "ffn": 384,
            "context": 320,
            "vocab_size": 2048,
        },
        training={
            "epochs": 30,
            "max_minutes": args.minutes,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "save_every": 500,
            "threads": args.threads,
        },
        package={"quant_types": ["Q8_0", "Q4_K_M"], "serve": "Q8_0"},
    )
    job = DistillJob(cfg, embeddings=emb)
    result = job.run(resume=args.resume)
    print(f"job: {result.status} {result.version} ({result.reason})")

    # 4. evaluate on the official test split, with facts from the same store
    lookup = job._fact_lookup()
    assert lookup is not None
    test = data["test"][: args.limit_test] if args.limit_test else data["test"]
    examples = [
        Example(key=f"test-{i}", messages=[HumanMessage(q)], answer=intent)
        for i, (q, intent) in enumerate(test)
    ]
    for ex, facts in zip(examples, lookup(examples), strict=True):
        ex.facts = facts
    reg = StudentRegistry(cfg.registry)
    version = reg.get(result.version or "")
    run_dir = Path(version.provenance["run_dir"])
    rows, per_quant = [], {}
    for quant in ("Q8_0", "Q4_K_M"):
        gguf = run_dir / f"student.{quant}.gguf"
        student = ChatStudent(model_path=gguf, n_ctx=320, max_tokens=16, n_threads=args.threads)
        rep = evaluate_student(student, examples, desc=f"CLINC test {quant}")
        per_quant[quant] = {**rep.summary(), "file_mb": gguf.stat().st_size / 1e6}
        rows.append(
            [
                quant,
                f"{rep.exact_match:.4f}",
                f"{rep.latency_ms_p50:.1f}",
                f"{rep.latency_ms_p95:.1f}",
                f"{gguf.stat().st_size / 1e6:.2f}",
            ]
        )
        (work / f"test_rows_{quant}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rep.rows)
        )

    # 5. nearest-neighbour baselines over the same embeddings (what retrieval alone gets)
    import numpy as np

    def unit(texts: list[str]) -> np.ndarray:
        m = np.asarray(emb.embed_documents(texts), dtype=np.float32)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    train_y = [intent for _, intent in data["train"]]
    sims = unit([q for q, _ in test]) @ unit([q for q, _ in data["train"]]).T
    nearest = np.argsort(-sims, axis=1)[:, :30]
    nn1 = wknn = 0
    for row, (_, gold) in enumerate(test):
        nn1 += train_y[nearest[row, 0]] == gold
        score: Counter[str] = Counter()
        for j in nearest[row]:
            score[train_y[j]] += float(sims[row, j])
        wknn += score.most_common(1)[0][0] == gold
    n_test = len(examples)
    in_facts = sum(any(f.text.endswith(" => " + e.answer) for f in e.facts) for e in examples)

    out = {
        "benchmark": "CLINC150 in-scope intent (distilled student reading retrieved past answers)",
        "data": "CLINC150 data_full (Larson et al. 2019), train 15,000 / test 4,500 in-scope",
        "teacher": "gold intent labels stand in for the teacher's answers",
        "command": (
            f"python bench/distill_clinc.py --minutes {args.minutes:g} --threads {args.threads}"
            f" --multi-turn {args.multi_turn:g}"
        ),
        "multi_turn_fraction": args.multi_turn,
        "machine": machine(),
        "k_facts": args.k,
        "train_minutes_budget": args.minutes,
        "train_threads": args.threads,
        "train_seconds": result.metrics.get("train_seconds"),
        "train_steps": result.metrics.get("train_steps"),
        "n_train": result.metrics.get("n_train"),
        "n_params": result.metrics.get("n_params"),
        "kb_ingest_seconds": kb_seconds,
        "job_timings_s": result.timings_s,
        "heldout_exact_match": result.metrics.get("exact_match"),
        "test": per_quant,
        "baselines": {
            "nn_top1": nn1 / n_test,
            "weighted_vote_30nn": wknn / n_test,
            f"answer_in_prompt_{args.k}_distinct": in_facts / n_test,
        },
        "student_version": result.version,
        "run_dir": str(run_dir),
        "wall_seconds": time.perf_counter() - t0,
    }
    print(table(["quant", "test exact match", "p50 ms", "p95 ms", "MB"], rows))
    print(table(["baseline", "accuracy"], [[k, f"{v:.4f}"] for k, v in out["baselines"].items()]))
    print(f"wrote {save('distill_clinc', out)}")


if __name__ == "__main__":
    main()
