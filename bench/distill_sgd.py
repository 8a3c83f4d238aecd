"""SGD agent traces: distil a tool-calling student, route it, and run it as an agent's model.

The traces come from ``bench/sgd_traces.py`` (ten Schema-Guided Dialogue services; every SYSTEM
turn is a trace, a turn that calls its service gives the call and the reply after the result). The
recorded system stands in for the teacher. One from-scratch student is distilled from the train
dialogues (every call turn and ``--reply-fraction`` of the reply turns: prompts are long and
two CPU cores train on about 7,000 tokens a second), except a tenth of the dialogues (by crc32 of
the dialogue id) kept back to calibrate the router. Then, on the test dialogues:

1. **Student.** Every tool-calling turn, under ``tool_choice="auto"`` (the student decides to call,
   and decodes the call under the tools' grammar): tool-call exact match (name and all arguments),
   name accuracy, argument F1, valid calls, p50/p95 latency; plus a sample of reply turns, to count
   calls made where the teacher answered in words.
2. **Routed.** ``ChatUnderstudy`` over the same student with the tool-call signals on and a teacher
   that replays the recorded answer. The router policy is fitted on the calibration dialogues and
   its threshold set there twice: for ``--target-teacher-rate`` (the budget) and for
   ``--target-quality`` (the fewest teacher turns that reach it). At each, every test call turn is
   answered through ``ChatUnderstudy.bind_tools(...).invoke``; an escalated turn gets the recorded
   call.
3. **Agent.** ``create_agent(model=load_understudy(...), tools=...)`` (the policy of
   ``--agent-point``) with one tool per intent that
   replays the recorded ``service_results``. Each user turn of a test dialogue is given to the agent
   with the recorded conversation before it; the turn is right when the agent makes exactly the
   recorded calls (none on a turn where the system only spoke). A dialogue succeeds when every turn
   is right.

    .venv/bin/python bench/distill_sgd.py --minutes 30 --threads 2 --eval-threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import machine, require_data, save, table
from sgd_traces import (
    SERVICES,
    load_schema,
    service_tools,
    split_traces,
    system_line,
    tool_result,
)

ROUTER_POLICY = "router_policy.json"  # saved as router_policy_{budget,quality}.json


def _calibration_dialogue(dialogue_id: str, fraction: float) -> bool:
    return zlib.crc32(dialogue_id.encode()) % 1000 < fraction * 1000


def _kept_reply(meta: dict[str, Any], fraction: float) -> bool:
    key = f"{meta['dialogue']}:{meta['turn']}:{meta['kind']}"
    return zlib.crc32(key.encode()) % 1000 < fraction * 1000


def _examples(traces: Sequence[dict[str, Any]]) -> list[Any]:
    """Evaluation examples (rendered as the student serves them) from OpenAI-format traces."""
    from langchain_understudy.distill_jobs.dataset import build_examples
    from langchain_understudy.distill_jobs.traces import Trace

    pairs = []
    for obj in traces:
        t = Trace.from_openai(obj)
        pairs.append((t.messages, t.answer, t.metadata))
    examples, dropped = build_examples(pairs)
    if sum(dropped.values()) - dropped["duplicate"]:
        print(f"dropped test traces: {dropped}")
    return examples


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def call_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Tool-call metrics of evaluation rows (those of call turns)."""
    scores = [r["tool_calls"] for r in rows if r["tool_calls"] is not None]
    lat = [r["latency_ms"] for r in rows]
    return {
        "n": len(scores),
        "tool_call_exact": _mean([float(s["exact"]) for s in scores]),
        "name_accuracy": _mean([float(s["name"]) for s in scores]),
        "arg_f1": _mean([s["arg_f1"] for s in scores]),
        "valid_calls": _mean([float(s["valid"]) for s in scores]),
        "called": _mean([float(s["called"]) for s in scores]),
        "latency_ms_p50": _pct(lat, 0.5),
        "latency_ms_p95": _pct(lat, 0.95),
    }


def per_service(rows: Sequence[dict[str, Any]], fn: Any) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["metadata"]["service"]].append(r)
    out = {s: fn(groups[s]) for s in SERVICES if s in groups}
    out["overall"] = fn(list(rows))
    return out


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# -- the teacher and the tools ----------------------------------------------------------------------


def replay_teacher(traces: Sequence[dict[str, Any]]) -> Any:
    """A chat model answering each recorded conversation with the recorded answer."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from langchain_understudy.distill_jobs.dataset import conversation_key
    from langchain_understudy.distill_jobs.traces import Trace

    answers: dict[str, AIMessage] = {}
    for obj in traces:
        t = Trace.from_openai(obj)
        answers[conversation_key(t.messages)] = t.answer

    class ReplayTeacher(BaseChatModel):
        misses: int = 0

        @property
        def _llm_type(self) -> str:
            return "sgd-replay"

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
            found = answers.get(conversation_key(messages))
            if found is None:
                self.misses += 1
                found = AIMessage("Sorry, could you say that again?")
            return ChatResult(generations=[ChatGeneration(message=found.model_copy())])

        def bind_tools(self, tools: Any, **kw: Any) -> Any:
            return self.bind(**kw)

    return ReplayTeacher()


class ReplayTools:
    """One LangChain tool per intent of a service; each returns the recorded results of the
    current turn when called with the recorded arguments, and no results otherwise."""

    def __init__(self, service: dict[str, Any]) -> None:
        from langchain_core.tools import StructuredTool

        self.expected: dict[str, Any] | None = None
        self.result = tool_result([])
        self.made: list[dict[str, Any]] = []
        self.tools = []
        for spec in service_tools(service):
            fn = spec["function"]
            self.tools.append(
                StructuredTool.from_function(
                    func=self._caller(fn["name"]),
                    name=fn["name"],
                    description=fn["description"],
                    args_schema=fn["parameters"],
                )
            )

    def _caller(self, name: str) -> Any:
        def call(**args: Any) -> str:
            made = {"name": name, "args": args}
            self.made.append(made)
            if made == self.expected:
                return self.result
            return tool_result([])

        return call


# -- the three arms ---------------------------------------------------------------------------------


def student_arm(student: Any, calls: list[Any], replies: list[Any]) -> dict[str, Any]:
    from langchain_understudy.distill_jobs.evaluation import evaluate_student

    rep = evaluate_student(student, calls, desc="test call turns")
    out = {"calls": per_service(rep.rows, call_summary), "rows": rep.rows}
    if replies:
        rrep = evaluate_student(student, replies, desc="test reply turns (sample)")
        wrong = [float("<|call|>" in r["prediction"]) for r in rrep.rows]
        out["replies"] = {
            "n": len(wrong),
            "called_instead_of_replying": _mean(wrong),
            "token_f1": rrep.token_f1,
            "latency_ms_p50": rrep.latency_ms_p50,
            "latency_ms_p95": rrep.latency_ms_p95,
        }
    return out


def routed_arm(
    student: Any,
    teacher: Any,
    calib: list[Any],
    calls: list[Any],
    target: float,
    quality: float,
    policy_path: Path,
) -> dict[str, Any]:
    from tqdm import tqdm

    from langchain_understudy.distill_jobs.evaluation import tool_call_scores
    from langchain_understudy.prompting import answer_text
    from langchain_understudy.router import ChatUnderstudy, PrivacyPolicy, Router
    from langchain_understudy.router.policy import RoutedExample
    from langchain_understudy.router.signals import DEFAULT_SIGNALS, TOOL_SIGNALS

    router = Router(signals=(*DEFAULT_SIGNALS, *TOOL_SIGNALS))
    # the services' results hold phone numbers and street addresses: with block_pii on (the
    # default) those turns could never reach the teacher; here the teacher is the recorded system
    privacy = PrivacyPolicy(block_pii=False)
    llm = ChatUnderstudy(
        student=student, teacher=teacher, router=router, mode="auto", privacy=privacy
    )

    def exact(ex: Any, msg: Any) -> float:
        scores = tool_call_scores(answer_text(msg, ex.tools), ex.answer)
        return float(bool(scores and scores["exact"]))

    fitted: list[RoutedExample] = []
    for ex in tqdm(calib, desc="calibration call turns", unit="ex"):
        ins = llm.inspect(ex.messages, tools=_wire(ex.tools), tool_choice="auto")
        fitted.append(ins.to_example(exact(ex, ins.answer) if ins.answer is not None else 0.0))
    router.fit(fitted)
    calib_acc = _mean([e.student_correct for e in fitted])

    def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "n": len(rs),
            "tool_call_exact": _mean([r["exact"] for r in rs]),
            "teacher_rate": _mean([float(r["teacher"]) for r in rs]),
            "student_exact_when_kept": _mean([r["exact"] for r in rs if not r["teacher"]]),
            "escalation_blocked": _mean([float(r["blocked"]) for r in rs]),
        }

    # two operating points, both set on the calibration dialogues: the teacher budget of the goal,
    # and the fewest teacher turns that reach the goal's quality
    points: dict[str, Any] = {}
    for point, target_kw in (
        ("budget", {"target_teacher_rate": target}),
        ("quality", {"target_quality": quality}),
    ):
        threshold = router.calibrate(fitted, **target_kw)
        router.save(policy_path.with_name(f"{policy_path.stem}_{point}.json"))
        rows = []
        for ex in tqdm(calls, desc=f"routed test call turns ({point})", unit="ex"):
            msg = llm.bind_tools(_wire(ex.tools)).invoke(ex.messages)
            meta = msg.response_metadata["understudy"]
            rows.append(
                {
                    "metadata": ex.metadata,
                    "exact": exact(ex, msg),
                    "teacher": meta["answered_by"] == "teacher",
                    "blocked": bool(meta["escalation_blocked"]),
                }
            )
        points[point] = {"threshold": threshold, **target_kw, "test": per_service(rows, summary)}
    return {
        "n_calibration": len(fitted),
        "calibration_student_exact": calib_acc,
        "router": router.to_dict(),
        "points": points,
        "teacher_misses": teacher.misses,
    }


def _wire(specs: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"type": "function", "function": s} for s in specs or []]


def agent_arm(
    config: Path,
    teacher: Any,
    dialogues: list[tuple[dict[str, Any], dict[str, Any]]],
) -> dict[str, Any]:
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from tqdm import tqdm

    from langchain_understudy.plugin import load_understudy

    llm = load_understudy(config, teacher=teacher, record_traces=False)
    per: list[dict[str, Any]] = []
    for dialogue, service in tqdm(dialogues, desc="agent dialogues", unit="dialogue"):
        tools = ReplayTools(service)
        agent = create_agent(model=llm, tools=tools.tools)
        history: list[Any] = [SystemMessage(system_line(service))]
        turns_right, n_turns, n_calls, teacher_steps, steps = 0, 0, 0, 0, 0
        for i, turn in enumerate(dialogue["turns"]):
            if turn["speaker"] == "USER":
                history.append(HumanMessage(turn["utterance"]))
                continue
            frame = next((f for f in turn["frames"] if "service_call" in f), None)
            expected = None
            if frame is not None:
                expected = {
                    "name": frame["service_call"]["method"],
                    "args": dict(frame["service_call"]["parameters"]),
                }
                results = frame.get("service_results", [])
                tools.result = tool_result(results)
                n_calls += 1
            tools.expected, tools.made = expected, []
            try:
                out = agent.invoke({"messages": list(history)}, {"recursion_limit": 8})
                new = out["messages"][len(history) :]
            except Exception as e:  # a recursion limit or a failing step: the turn is wrong
                new = []
                tools.made.append({"error": type(e).__name__})
            for m in new:
                if isinstance(m, AIMessage):
                    steps += 1
                    by = (m.response_metadata.get("understudy") or {}).get("answered_by")
                    teacher_steps += by == "teacher"
            n_turns += 1
            turns_right += tools.made == ([expected] if expected else [])
            # the recorded conversation goes on, as the user answered the recorded system
            if frame is not None:
                cid = f"call_{dialogue['dialogue_id']}_{i}"
                history.append(
                    AIMessage(
                        "",
                        tool_calls=[
                            {"name": expected["name"], "args": expected["args"], "id": cid}
                        ],
                    )
                )
                history.append(ToolMessage(tools.result, tool_call_id=cid, name=expected["name"]))
            history.append(AIMessage(turn["utterance"]))
        per.append(
            {
                "dialogue": dialogue["dialogue_id"],
                "service": service["service_name"],
                "turns": n_turns,
                "turns_right": turns_right,
                "calls": n_calls,
                "model_steps": steps,
                "teacher_steps": teacher_steps,
                "success": turns_right == n_turns,
            }
        )

    def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "dialogues": len(rs),
            "dialogue_success": _mean([float(r["success"]) for r in rs]),
            "turn_accuracy": sum(r["turns_right"] for r in rs)
            / max(1, sum(r["turns"] for r in rs)),
            "teacher_step_rate": sum(r["teacher_steps"] for r in rs)
            / max(1, sum(r["model_steps"] for r in rs)),
        }

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in per:
        groups[r["service"]].append(r)
    out = {s: summary(groups[s]) for s in SERVICES if s in groups}
    out["overall"] = summary(per)
    return {"summary": out, "dialogues": per}


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--work", type=Path, default=Path("bench/out/sgd"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue the last interrupted job run")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for training")
    ap.add_argument("--eval-threads", type=int, default=1, help="llama.cpp threads (evaluation)")
    ap.add_argument("--context", type=int, default=1024, help="the student's context in tokens")
    ap.add_argument("--calibration-fraction", type=float, default=0.1)
    ap.add_argument(
        "--reply-fraction", type=float, default=0.35, help="share of reply turns trained on"
    )
    ap.add_argument("--target-teacher-rate", type=float, default=0.25)
    ap.add_argument("--target-quality", type=float, default=0.98)
    ap.add_argument(
        "--agent-point",
        choices=("budget", "quality"),
        default="quality",
        help="the routed operating point the agent runs at",
    )
    ap.add_argument("--reply-sample", type=int, default=300, help="reply turns evaluated")
    ap.add_argument("--agent-dialogues", type=int, default=100, help="test dialogues, 0: all")
    ap.add_argument("--limit", type=int, default=0, help="call turns per split (a quick slice)")
    args = ap.parse_args()

    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
    from langchain_understudy.distill_jobs.traces import TraceStore
    from langchain_understudy.students import ChatStudent, StudentRegistry

    root = require_data("sgd")
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train, calib_traces = [], []
    for tr in split_traces(root, "train"):
        meta = tr["metadata"]
        if _calibration_dialogue(meta["dialogue"], args.calibration_fraction):
            calib_traces.append(tr)
        elif meta["kind"] == "call" or _kept_reply(meta, args.reply_fraction):
            train.append(tr)
    test_traces = list(split_traces(root, "test"))
    with open(work / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in train)
    store = TraceStore(work / "traces.sqlite")
    if store.count() == 0:
        store.import_jsonl(work / "train.jsonl")
    print(f"traces: {len(train)} train, {len(calib_traces)} calibration, {len(test_traces)} test")

    cfg = DistillConfig(
        name="sgd",
        traces=work / "traces.sqlite",
        registry=work / "students",
        work_dir=work / "runs",
        heldout_fraction=0.02,
        skip_if_no_new_traces=False,
        student={
            "hidden": 128,
            "layers": 4,
            "heads": 4,
            "kv_heads": 2,
            "ffn": 384,
            "context": args.context,
            "vocab_size": 4096,
        },
        training={
            "epochs": 30,
            "max_minutes": args.minutes,
            "batch_size": 16,
            "group_by_length": True,
            "learning_rate": 2e-3,
            "save_every": 500,
            "threads": args.threads,
        },
        package={"quant_types": ["Q8_0"], "serve": "Q8_0", "eval_threads": args.eval_threads},
    )
    registry = StudentRegistry(cfg.registry)
    version = registry.current()
    if version is None or args.resume:
        result = DistillJob(cfg).run(resume=args.resume)
        print(f"job: {result.status} {result.version} ({result.reason})")
        version = registry.get(result.version or "")
    student = ChatStudent.from_version(
        version, n_ctx=args.context, max_tokens=64, n_threads=args.eval_threads
    )

    rng = random.Random(0)
    test = _examples(test_traces)
    calls = [e for e in test if e.metadata["kind"] == "call"]
    replies = [e for e in test if e.metadata["kind"] != "call"]
    replies = rng.sample(replies, min(args.reply_sample, len(replies)))
    calib = [e for e in _examples(calib_traces) if e.metadata["kind"] == "call"]
    if args.limit:
        calls, calib = calls[: args.limit], calib[: args.limit]

    s_arm = student_arm(student, calls, replies)
    teacher = replay_teacher([*calib_traces, *test_traces])
    r_arm = routed_arm(
        student,
        teacher,
        calib,
        calls,
        args.target_teacher_rate,
        args.target_quality,
        work / ROUTER_POLICY,
    )

    schema = load_schema(root)
    by_id = {(d["dialogue_id"]): (d, schema[s]) for s in SERVICES for d in _load(root, s)}
    chosen = sorted(by_id)
    if args.agent_dialogues:
        chosen = sorted(rng.sample(chosen, min(args.agent_dialogues, len(chosen))))
    policy = work / f"router_policy_{args.agent_point}.json"
    config = work / "understudy.toml"
    config.write_text(
        f'[student]\nregistry = "{cfg.registry.resolve()}"\nn_ctx = {args.context}\n'
        f"max_tokens = 64\nn_threads = {args.eval_threads}\n"
        f'[router]\nmode = "auto"\npolicy = "{policy.resolve()}"\n'
        "block_pii = false\n"
    )
    a_arm = agent_arm(config, teacher, [by_id[k] for k in chosen])

    rows = []
    for svc in [*SERVICES, "overall"]:
        c, a = s_arm["calls"].get(svc), a_arm["summary"].get(svc)
        rb = r_arm["points"]["budget"]["test"].get(svc)
        rq = r_arm["points"]["quality"]["test"].get(svc)
        if c is None:
            continue
        rows.append(
            [
                svc,
                c["n"],
                _f(c["tool_call_exact"]),
                _f(c["name_accuracy"]),
                _f(c["arg_f1"]),
                _f(c["valid_calls"]),
                _f(rb["tool_call_exact"]),
                _f(rb["teacher_rate"]),
                _f(rq["tool_call_exact"]),
                _f(rq["teacher_rate"]),
                _f(a["dialogue_success"]) if a else "n/a",
                _f(c["latency_ms_p50"], 0),
                _f(c["latency_ms_p95"], 0),
            ]
        )
    head = [
        "service",
        "calls",
        "exact",
        "name",
        "arg F1",
        "valid",
        "routed@budget",
        "teacher",
        "routed@quality",
        "teacher",
        "dialogues ok",
        "p50 ms",
        "p95 ms",
    ]
    print(table(head, rows))
    (work / "test_call_rows.jsonl").write_text(
        "".join(json.dumps(r, default=str) + "\n" for r in s_arm.pop("rows"))
    )
    out = {
        "benchmark": "SGD (ten services): tool calls distilled from multi-turn agent traces",
        "data": "Schema-Guided Dialogue (Rastogi et al. 2020), ../shared/data/sgd train / test",
        "teacher": "the recorded system (its service calls and replies) stands in for the teacher",
        "command": (
            f"python bench/distill_sgd.py --minutes {args.minutes:g} --threads {args.threads}"
            f" --eval-threads {args.eval_threads} --context {args.context}"
            f" --reply-fraction {args.reply_fraction:g} --agent-dialogues {args.agent_dialogues}"
            f" --agent-point {args.agent_point}"
        ),
        "machine": machine(),
        "n_train_traces": len(train),
        "student": {
            "version": version.version,
            "file_mb": version.path.stat().st_size / 1e6,
            "metrics": version.metrics,
            "provenance": version.provenance,
        },
        "student_arm": s_arm,
        "routed_arm": r_arm,
        "agent_arm": a_arm,
        "wall_seconds": time.perf_counter() - t0,
    }
    print(f"wrote {save('distill_sgd', out)}")


def _load(root: Path, service: str) -> list[dict[str, Any]]:
    return json.loads((root / service / "test.json").read_text())


if __name__ == "__main__":
    main()
