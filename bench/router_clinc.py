"""CLINC150 router benchmark: keep in-scope queries on the student, send out-of-scope ones up.

Calibrates the router on ``val`` + ``oos_val`` and evaluates on ``test`` + ``oos_test``. The
teacher's answer is the gold intent name (``oos`` for an out-of-scope query, which the student never
saw), so an escalated request counts as correct and a student answer is correct when it names the
intent exactly. Two policies (the transparent per-signal calibrated ``Router`` and the logistic
``LearnedRouter``) are fitted on the calibration split and their threshold set to
``--target-teacher-rate``; both are reported.

Two variants:

* ``single``: one user turn, as in the dataset (RouteLLM also routes on the last message only);
* ``multi``: 2-4 turn conversations whose earlier turns are other queries answered with their
  intent; the last user turn is the one answered. A share of them (``--dependent-fraction``) end
  with a turn that only makes sense with the earlier ones ("Same again, please.", "Back to my first
  question."), whose answer is the referenced turn's intent.

Reported per variant and policy: quality and teacher-call rate at the calibrated threshold,
out-of-scope recall, APGR, CPT(50/80/95 %), per-signal AUROC for student errors, router overhead
p50/p95 with and without the embedding call; plus the curves as PNG. Results go to
``bench/results/router_clinc.json`` and ``router_clinc_{single,multi}.png``.

A third arm serves the same test mix, shuffled, with a :class:`TeacherRateController` steering
the threshold online from its calibrated start (``--controller-window`` requests), and reports the
teacher-call rate it reaches and the accuracy at it beside the fixed threshold's. It works from the
per-query signal values alone: the request escalates when its pre- or post-generation score reaches
the threshold of the moment, and the controller sees the score the routing flow would (the
pre-generation score alone when that one escalated).

Run it on the student of ``bench/distill_clinc.py`` (its registry and knowledge store)::

    .venv/bin/python bench/router_clinc.py --registry bench/out/clinc/students \\
        --knowledge bench/out/clinc/kb --k 5 --save-examples bench/out/clinc/router_examples.json

or on any student GGUF (``--gguf PATH``); ``--ood-from-train`` builds the out-of-distribution index
from the training queries when the student came without one; ``--limit N`` runs a quick slice.
``--save-examples`` keeps every query's signal values, so that the routing arms (fitting,
calibration, the controller) can be rerun in seconds without the student:
``--from-examples bench/out/clinc/router_examples.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import RESULTS, clinc_conversation, machine, require_data, table


@dataclass
class Item:
    messages: list[Any]
    reference: str
    out_of_scope: bool
    dependent: bool = False


def _sample(rows: list[list[str]], n: int | None, rng: random.Random) -> list[list[str]]:
    if n is None or n >= len(rows):
        return list(rows)
    return rng.sample(rows, n)


def _splits(
    data: dict[str, Any], limit: int | None, rng: random.Random
) -> dict[str, list[list[str]]]:
    oos_limit = None if limit is None else max(2, limit // 4)
    return {
        "cal": _sample(data["val"], limit, rng) + _sample(data["oos_val"], oos_limit, rng),
        "test": _sample(data["test"], limit, rng) + _sample(data["oos_test"], oos_limit, rng),
    }


def single_items(rows: list[list[str]], system: str | None) -> list[Item]:
    from langchain_core.messages import HumanMessage, SystemMessage

    head = [SystemMessage(system)] if system else []
    return [Item([*head, HumanMessage(q)], intent, intent == "oos") for q, intent in rows]


def multi_items(
    rows: list[list[str]], system: str | None, rng: random.Random, dependent_fraction: float
) -> list[Item]:
    """2-4 turn conversations ending with each row's query (or a follow-up that needs history)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    head = [SystemMessage(system)] if system else []
    pool = [r for r in rows if r[1] != "oos"] or rows
    items = []
    for q, intent in rows:
        turns, ref, dependent = clinc_conversation(q, intent, pool, rng, dependent_fraction)
        msgs = [*head, *(HumanMessage(t) if r == "user" else AIMessage(t) for r, t in turns)]
        items.append(Item(msgs, ref, ref == "oos", dependent=dependent))
    return items


def build_ood_index(texts: list[str], out: Path) -> Path:
    """Embed training queries as the distillation job does (normalised MiniLM) into ood_index.npy."""
    import numpy as np

    from langchain_understudy.retrieval.embeddings import default_embeddings

    vecs = np.asarray(default_embeddings().embed_documents(texts), dtype=np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "ood_index.npy", vecs, allow_pickle=False)
    (out / "ood_meta.json").write_text(
        json.dumps({"embedding": "all-MiniLM-L6-v2", "n": len(texts)})
    )
    return out / "ood_index.npy"


def collect(llm: Any, items: list[Item], workers: int, desc: str) -> list[Any]:
    from tqdm.auto import tqdm

    from langchain_understudy.router import collect_examples

    with tqdm(total=len(items), desc=desc, unit="conv", file=sys.stderr, disable=None) as bar:

        def run(chunk: list[Item]) -> list[Any]:
            return collect_examples(
                llm,
                [i.messages for i in chunk],
                [i.reference for i in chunk],
                out_of_scope=[i.out_of_scope for i in chunk],
                progress=bar.update,
            )

        if workers <= 1:
            return run(items)
        size = max(1, len(items) // (workers * 8))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(workers) as pool:
            return [ex for part in pool.map(run, chunks) for ex in part]


def save_examples(path: Path, collected: dict[str, Any], about: dict[str, Any]) -> Path:
    """Write every query's signal values and correctness (JSON, no message text)."""
    data = {
        **about,
        "variants": {
            v: {
                "cal": [asdict(e) for e in c["cal"]],
                "test": [asdict(e) for e in c["test"]],
                "test_dependent": c["test_dependent"],
            }
            for v, c in collected.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def load_examples(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what :func:`save_examples` wrote: (collected examples by variant, provenance)."""
    from langchain_understudy.router import RoutedExample

    data = json.loads(path.read_text())

    def ex(d: dict[str, Any]) -> RoutedExample:
        return RoutedExample(**{**d, "failed": tuple(d.get("failed") or ())})

    collected = {
        v: {
            "cal": [ex(d) for d in c["cal"]],
            "test": [ex(d) for d in c["test"]],
            "test_dependent": list(c["test_dependent"]),
        }
        for v, c in data.pop("variants").items()
    }
    return collected, data


def serve_with_controller(
    router: Any,
    examples: list[Any],
    *,
    target: float,
    window: int,
    gain: float,
    seed: int,
) -> dict[str, Any]:
    """Serve ``examples`` in a shuffled order with the threshold steered online (``auto`` mode).

    The controller starts from the router's calibrated threshold. A request escalates when its
    pre- or post-generation score reaches the threshold of the moment; the controller is shown
    the score the routing flow reads (the pre-generation one alone when it escalated) and whether
    the router asked for the teacher.
    """
    import numpy as np

    from langchain_understudy.router import TeacherRateController

    pre = [router.example_score(e, "pre") for e in examples]
    post = [router.example_score(e, "post") for e in examples]
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    ctrl = TeacherRateController(target, window=window, min_requests=min(100, window), gain=gain)
    up = np.zeros(len(order), dtype=bool)
    thresholds = []
    for n, i in enumerate(order):
        t = ctrl.threshold if ctrl.threshold is not None else router.threshold
        thresholds.append(t)
        up[n] = pre[i] >= t or post[i] >= t
        ctrl.observe(pre[i] if pre[i] >= t else max(pre[i], post[i]), bool(up[n]))
    correct = np.array([1.0 if up[n] else examples[i].student_correct for n, i in enumerate(order)])
    oos = np.array([examples[i].out_of_scope for i in order], dtype=bool)
    settled = slice(2 * window, None)  # after two windows of the new mix

    def rate(sl: slice) -> float | None:
        return float(up[sl].mean()) if up[sl].size else None

    return {
        "window": window,
        "gain": gain,
        "order_seed": seed,
        "start_threshold": router.threshold,
        "final_threshold": thresholds[-1] if thresholds else None,
        "threshold_range": [min(thresholds), max(thresholds)] if thresholds else None,
        "teacher_rate": rate(slice(None)),
        "teacher_rate_settled": rate(settled),
        "n_settled": int(up[settled].size),
        "quality": float(correct.mean()) if correct.size else None,
        "quality_settled": float(correct[settled].mean()) if correct[settled].size else None,
        "oos_recall": float(up[oos].mean()) if oos.any() else None,
        "teacher_rate_per_window": [
            float(up[k : k + window].mean()) for k in range(0, len(up), window)
        ],
    }


def drift_watch(
    router: Any, examples: list[Any], reference: Path, *, seed: int, check_every: int = 10
) -> dict[str, Any]:
    """Feed the drift watch the test mix in-scope first, then switched to out-of-scope queries.

    The watch (``DriftMonitor`` with the ``[rollout]`` defaults) reads what a served request
    records: every request's pre-generation signals, and the student's confidence only where the
    calibrated router let the student answer. Reports the first alarm on in-scope traffic (none
    is wanted) and how many out-of-scope requests after the switch raised it.
    """
    from langchain_understudy.config import RolloutSettings
    from langchain_understudy.router.rollout import DriftMonitor

    cfg = RolloutSettings()
    monitor = DriftMonitor.load(
        reference,
        window=cfg.drift_window,
        min_samples=cfg.drift_min_samples,
        alarm_psi=cfg.drift_alarm_psi,
    )
    rng = random.Random(seed)
    inside = [e for e in examples if not e.out_of_scope]
    outside = [e for e in examples if e.out_of_scope]
    rng.shuffle(inside)
    rng.shuffle(outside)
    peak: dict[str, float] = {}
    first_alarm_in_scope = None
    after_switch = None
    for n, e in enumerate([*inside, *outside], 1):
        pre_up = router.example_score(e, "pre") >= router.threshold
        monitor.observe(
            {k: v for k, v in e.signals.items() if not (pre_up and k == "student_confidence")}
        )
        if n % check_every and n != len(inside):
            continue
        rep = monitor.report()
        for name, row in rep["signals"].items():
            if row["psi"] is not None and n <= len(inside):
                peak[name] = max(peak.get(name, 0.0), row["psi"])
        if rep["alarm"] and n <= len(inside) and first_alarm_in_scope is None:
            first_alarm_in_scope = n
        if rep["alarm"] and n > len(inside):
            after_switch = n - len(inside)
            alarm_report = rep
            break
    else:
        alarm_report = monitor.report()
    return {
        "reference": str(reference),
        "settings": {
            "window": cfg.drift_window,
            "min_samples": cfg.drift_min_samples,
            "alarm_psi": cfg.drift_alarm_psi,
            "checked_every": check_every,
        },
        "n_in_scope": len(inside),
        "n_out_of_scope": len(outside),
        "in_scope_alarm_at": first_alarm_in_scope,
        "in_scope_peak_psi": peak,
        "out_of_scope_requests_to_alarm": after_switch,
        "alarm": alarm_report,
    }


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--gguf", type=Path, help="a student GGUF")
    who.add_argument("--registry", type=Path, help="a student registry (its promoted version)")
    who.add_argument(
        "--from-examples", type=Path, help="signal values saved by --save-examples (no student)"
    )
    ap.add_argument("--version", help="registry version instead of the promoted one")
    ap.add_argument(
        "--knowledge", type=Path, help="KnowledgeStore folder whose facts the student reads"
    )
    ap.add_argument(
        "--k",
        type=int,
        default=None,
        help="facts per prompt (default: as the registered student was trained)",
    )
    ap.add_argument(
        "--ood-index", type=Path, help="ood_index.npy (default: the registry version's)"
    )
    ap.add_argument(
        "--ood-from-train", action="store_true", help="build the OOD index from CLINC train"
    )
    ap.add_argument("--target-teacher-rate", type=float, default=0.2)
    ap.add_argument("--limit", type=int, help="in-scope queries per split (quick runs)")
    ap.add_argument("--system", help="system prompt, if the student was trained with one")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dependent-fraction", type=float, default=0.3)
    ap.add_argument("--no-multi-turn", action="store_true")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel student contexts (overhead is measured with 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-examples", type=Path, help="write every query's signal values here")
    ap.add_argument("--controller-window", type=int, default=500, help="controller window")
    ap.add_argument("--controller-gain", type=float, default=0.5, help="controller integral gain")
    ap.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    ap.add_argument("--name", default="router_clinc", help="output file stem")
    args = ap.parse_args(argv)

    from langchain_understudy.router import LearnedRouter, Router, evaluate_router, plot_report

    t_start = time.perf_counter()
    if args.from_examples:
        collected, about = load_examples(args.from_examples)
        about["examples"] = str(args.from_examples)
    else:
        collected, about = collect_variants(args)
        if args.save_examples:
            save_examples(args.save_examples, collected, about)

    results: dict[str, Any] = {}
    rows_out, ctrl_rows = [], []
    target = args.target_teacher_rate
    for variant, c in collected.items():
        cal, test, dependent = c["cal"], c["test"], c["test_dependent"]
        reports, per_policy = [], {}
        for policy, router in (
            ("calibrated", Router().fit(cal)),
            ("learned", LearnedRouter().fit(cal)),
        ):
            router.calibrate(cal, target_teacher_rate=target, mode="auto")
            rep = evaluate_router(router, test, mode="auto")
            scores = router.scores(test, "auto")
            esc = scores >= router.threshold
            dep = [i for i, d in enumerate(dependent) if d]
            at = rep.at_threshold
            ctrl = serve_with_controller(
                router,
                test,
                target=target,
                window=args.controller_window,
                gain=args.controller_gain,
                seed=args.seed,
            )
            drift = (
                drift_watch(router, test, Path(about["signal_reference"]), seed=args.seed)
                if variant == "single" and policy == "calibrated" and about.get("signal_reference")
                else None
            )
            goals = {
                "accuracy>=0.985": (at["quality"] or 0) >= 0.985,
                "teacher_calls<=0.20": (at["teacher_rate"] or 1) <= 0.20,
                "oos_recall>=0.90": (at["oos_recall"] or 0) >= 0.90,
                "cpt80<=0.15": rep.cpt["80"] is not None and rep.cpt["80"] <= 0.15,
                "apgr>=0.85": rep.apgr is not None and rep.apgr >= 0.85,
                "overhead_p95_excl_embedding<5ms": (
                    rep.overhead_ms.get("p95_excluding_embedding") or 1e9
                )
                < 5.0,
                "controller_teacher_rate_within_2pts": ctrl["teacher_rate"] is not None
                and abs(ctrl["teacher_rate"] - target) <= 0.02,
                **(
                    {
                        "drift_no_alarm_in_scope": drift["in_scope_alarm_at"] is None,
                        "drift_alarm_within_500_oos": (
                            drift["out_of_scope_requests_to_alarm"] or 10**9
                        )
                        <= 500,
                    }
                    if drift is not None
                    else {}
                ),
            }
            per_policy[policy] = {
                **rep.to_dict(),
                "policy": router.to_dict(),
                "controller": ctrl,
                **({"drift": drift} if drift is not None else {}),
                "dependent_turns": {
                    "n": len(dep),
                    "escalated": float(esc[dep].mean()) if dep else None,
                    "student_accuracy": (
                        sum(test[i].student_correct for i in dep) / len(dep) if dep else None
                    ),
                },
                "goals": goals,
            }
            reports.append(rep)
            rows_out.append(
                [
                    variant,
                    policy,
                    _num(router.threshold),
                    _pct(at["teacher_rate"]),
                    _pct(at["quality"]),
                    _pct(rep.student_quality),
                    _pct(at["oos_recall"]),
                    _num(rep.apgr),
                    " / ".join(_pct(rep.cpt[k]) for k in ("50", "80", "95")),
                    _num(rep.overhead_ms.get("p95_excluding_embedding")),
                ]
            )
            ctrl_rows.append(
                [
                    variant,
                    policy,
                    _pct(at["teacher_rate"]),
                    _pct(at["quality"]),
                    _pct(ctrl["teacher_rate"]),
                    _pct(ctrl["teacher_rate_settled"]),
                    _pct(ctrl["quality"]),
                    _pct(ctrl["oos_recall"]),
                    _num(ctrl["final_threshold"]),
                ]
            )
        png = plot_report(
            reports,
            args.results / f"{args.name}_{variant}.png",
            labels=list(per_policy),
            title=f"CLINC150 {variant}-turn (test + oos_test)",
        )
        results[variant] = {
            "n_calibration": len(cal),
            "n_test": len(test),
            "n_test_out_of_scope": sum(e.out_of_scope for e in test),
            "n_test_dependent": sum(bool(d) for d in dependent),
            "png": str(png),
            "policies": per_policy,
        }

    out = {
        "benchmark": "CLINC150 routing: calibrate on val+oos_val, evaluate on test+oos_test",
        "data": "CLINC150 data_full (Larson et al., EMNLP 2019), CC BY 3.0",
        "teacher": "gold intent names stand in for the teacher ('oos' for out-of-scope)",
        "metrics": "APGR and CPT as defined by RouteLLM (Ong et al., 2024)",
        "command": "python bench/router_clinc.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        **about,
        "target_teacher_rate": target,
        "machine": machine(),
        "wall_seconds": time.perf_counter() - t_start,
        "variants": results,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(
        table(
            [
                "variant",
                "policy",
                "threshold",
                "teacher",
                "accuracy",
                "student only",
                "oos recall",
                "APGR",
                "CPT 50/80/95",
                "p95 ms excl. emb.",
            ],
            rows_out,
        )
    )
    print(
        table(
            [
                "variant",
                "policy",
                "teacher (fixed)",
                "accuracy (fixed)",
                "teacher (steered)",
                f"teacher after {2 * args.controller_window}",
                "accuracy (steered)",
                "oos recall (steered)",
                "final threshold",
            ],
            ctrl_rows,
        )
    )
    drift = results.get("single", {}).get("policies", {}).get("calibrated", {}).get("drift")
    if drift:
        print(
            f"drift watch: in-scope alarm at {drift['in_scope_alarm_at']} of "
            f"{drift['n_in_scope']} requests (peak PSI {drift['in_scope_peak_psi']}); "
            f"after the switch to out-of-scope: alarm within "
            f"{drift['out_of_scope_requests_to_alarm']} requests"
        )
    print(f"wrote {path}")
    return 0


def collect_variants(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the student and every signal on the calibration and test splits of each variant."""
    from langchain_understudy.router import ChatUnderstudy, Router
    from langchain_understudy.students import ChatStudent, StudentRegistry

    data = json.loads((require_data("clinc150") / "data_full.json").read_text())
    rng = random.Random(args.seed)
    splits = _splits(data, args.limit, rng)

    opts = {
        "n_ctx": args.n_ctx,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "n_parallel": max(1, args.workers),
    }
    ood: Any = args.ood_index
    trained_facts: dict[str, Any] = {}
    reference = None
    if args.gguf:
        student = ChatStudent(model_path=args.gguf, **opts)
        student_label = str(args.gguf)
    else:
        reg = StudentRegistry(args.registry)
        v = reg.get(args.version) if args.version else reg.current()
        if v is None:
            raise SystemExit(f"no student is promoted in {args.registry}; pass --version or --gguf")
        from langchain_understudy.retrieval.embeddings import default_embeddings
        from langchain_understudy.students.registry import SIGNAL_REFERENCE_FILE

        # the version as registered: its exemplar memory and answer space come with it
        student = ChatStudent.from_version(v, embeddings=default_embeddings, **opts)
        student_label = f"{args.registry} {v.version}"
        if SIGNAL_REFERENCE_FILE in v.files:
            reference = str(v.artifact(SIGNAL_REFERENCE_FILE))
        trained_facts = dict(v.provenance.get("facts") or {})
        if ood is None and "ood_index.npy" in v.files:
            ood = v.artifact("ood_index.npy")
    ood_source = str(ood) if ood else None
    if ood is None and args.ood_from_train:
        train = [
            q
            for q, _ in _sample(data["train"], None if args.limit is None else args.limit * 4, rng)
        ]
        ood = build_ood_index(train, args.results / f"{args.name}_ood")
        ood_source = f"built from {len(train)} CLINC train queries"
    if ood is None:
        print(
            "warning: no out-of-distribution index; out-of-scope queries rest on the other signals",
            file=sys.stderr,
        )
    knowledge = None
    if args.knowledge:
        from langchain_understudy.retrieval import KnowledgeStore

        knowledge = KnowledgeStore(args.knowledge, create=False)

    llm = ChatUnderstudy(
        student=student,
        teacher=None,
        knowledge=knowledge,
        router=Router(),
        mode="auto",
        ood_index=ood,
        **{**trained_facts, **({"k": args.k} if args.k else {})},
    )
    llm.inspect(
        single_items(splits["cal"][:1], args.system)[0].messages
    )  # load model and embeddings

    variants = {"single": lambda rows: single_items(rows, args.system)}
    if not args.no_multi_turn:
        mrng = random.Random(args.seed + 1)
        variants["multi"] = lambda rows: multi_items(
            rows, args.system, mrng, args.dependent_fraction
        )
    collected: dict[str, Any] = {}
    for variant, make in variants.items():
        cal_items, test_items = make(splits["cal"]), make(splits["test"])
        collected[variant] = {
            "cal": collect(llm, cal_items, args.workers, f"{variant}: calibration"),
            "test": collect(llm, test_items, args.workers, f"{variant}: test"),
            "test_dependent": [i.dependent for i in test_items],
        }
    about = {
        "student": student_label,
        "knowledge": str(args.knowledge) if args.knowledge else None,
        "ood_index": ood_source,
        "signal_reference": reference,
        "limit": args.limit,
        "seed": args.seed,
    }
    return collected, about


if __name__ == "__main__":
    sys.exit(main())
