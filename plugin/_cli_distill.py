"""``understudy distill run|schedule`` and ``understudy eval``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langchain_understudy.plugin._table import format_table

__all__ = ["STARTER_JOB", "register"]

STARTER_JOB = """\
# understudy distillation job: `understudy distill run --config job.toml`
# Paths are relative to this file. Every table and key is optional; these are the defaults
# of a pretrained, exemplar-backed student. `understudy traces import FILE.jsonl` fills the traces.
name = "understudy"
traces = ".understudy/traces.sqlite"    # the trace store `understudy traces import` writes
registry = ".understudy/students"       # where students are registered and promoted
work_dir = ".understudy/runs"           # run folders: datasets, checkpoints, reports
heldout_fraction = 0.05                 # by hash of the conversation: never trained on
# system = "You are the support assistant of Example Corp."   # when a trace has no system line

[student]
base = "smollm2-135m-instruct"          # bundled SmolLM2-135M-Instruct (Apache-2.0), offline;
                                        # or "path/to/any-llama-family.gguf"
train_layers = 8                        # train the top 8 of its 30 blocks (faster steps on CPU);
                                        # remove to train every weight
# lora = { r = 16, alpha = 32 }         # or: train LoRA adapters, merged before export

[exemplars]                             # the job indexes its own training traces: every prompt
k = 4                                   # shows the k most similar past teacher answers,
distinct_by = "answer"                  # k different ones, never the example's own
# order = "vote"                        # labels (intents, routes): the answer most of the 30
                                        # nearest requests back comes first, not the closest's

# [knowledge]                           # current facts from a knowledge store (`understudy kb`)
# path = ".understudy/knowledge"
# k = 4

[training]
max_minutes = 20                        # time budget; the learning rate anneals within it
epochs = 2
batch_size = 16
group_by_length = true                  # batches of similar length: less padding per step
# learning_rate = 1e-4                  # default: 1e-4 for a base, 1e-3 from scratch or LoRA
# threads = 2                           # CPU threads (default: all cores); a GPU is used if present

[package]
quant_types = ["Q8_0", "Q4_K_M"]        # each is evaluated on the held-out traces
serve = "Q8_0"                          # the one registered and served

[gate]
min_exact_match = 0.0                   # absolute floor on held-out exact match
min_improvement = 0.0                   # must match or beat the serving student

# [relabel]                             # ask a teacher for prompts without an answer
# mode = "missing"                      # needs a [teacher] table as in understudy.toml
"""


def _job(args: argparse.Namespace) -> object:
    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob

    cfg = DistillConfig.from_toml(args.config)
    teacher = None
    if cfg.relabel.mode != "off":
        from langchain_understudy.router.teachers import teacher_from_settings

        teacher = teacher_from_settings(cfg.teacher)
    return DistillJob(cfg, progress=not args.quiet, teacher=teacher)


def _summary(result: object) -> str:
    from langchain_understudy.distill_jobs.job import JobResult

    assert isinstance(result, JobResult)
    if result.status == "skipped":
        return f"skipped: {result.reason}"
    m = result.metrics
    rows: list[list[Any]] = [
        ["status", result.status],
        ["version", result.version],
        ["gate", result.reason],
        ["exact match (held-out)", m.get("exact_match")],
        ["token F1", m.get("token_f1")],
        [
            "latency p50 / p95 ms",
            f"{m.get('latency_ms_p50', 0):.1f} / {m.get('latency_ms_p95', 0):.1f}",
        ],
        ["train examples / steps", f"{m.get('n_train')} / {m.get('train_steps')}"],
        *([["answer space", _space_line(space)]] if (space := m.get("answer_space")) else []),
        *(
            [
                [
                    "relabelled (answered / failed / over budget)",
                    f"{r['answered']} / {r['failed']} / {r['over_budget']}",
                ]
            ]
            if (r := m.get("relabel"))
            else []
        ),
        ["train time s", m.get("train_seconds")],
        ["run folder", result.run_dir],
    ]
    return format_table(["", "value"], rows)


def _init(args: argparse.Namespace) -> int:
    from langchain_understudy.plugin._cli_app import write_starter

    path = Path(args.path)
    if not write_starter(path, STARTER_JOB, force=args.force):
        return 1
    print("next: `understudy traces import TRACES.jsonl`, then")
    print(f"`understudy distill run --config {path}`")
    return 0


def _space_line(space: dict[str, Any]) -> str:
    kind = space.get("kind")
    if kind == "labels":
        return f"closed set of {space.get('n_labels')} answers (constrained when serving)"
    if kind == "json":
        return "JSON schema inferred from the answers (see report.json; enforced when serving)"
    return "free text"


def _run(args: argparse.Namespace) -> int:
    from langchain_understudy.distill_jobs.job import DistillJob

    job = _job(args)
    assert isinstance(job, DistillJob)
    result = job.run(resume=args.resume)
    print(_summary(result))
    if result.run_dir:
        print(
            f"report: {result.run_dir / 'report.json'}  loss curve: {result.run_dir / 'loss.png'}"
        )
    if job.ranks.world > 1:
        # Under torchrun a rank whose work is done and written can still abort while the
        # interpreter tears down native threads (gloo, torch): "terminate called without an
        # active exception", seen now and then even after leaving the process group. The rank
        # exits here instead, its output flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _drift_trigger(args: argparse.Namespace, registry: Path) -> tuple[dict[str, Any] | None, str]:
    """For ``--when-drift``: (the trigger to record, or None to skip this slot; why)."""
    from langchain_understudy.config import load_config
    from langchain_understudy.errors import ConfigError
    from langchain_understudy.router.rollout import drift_from_audit
    from langchain_understudy.students import StudentRegistry

    reg = StudentRegistry(registry)
    if reg.current_version() is None:
        return {"kind": "first build"}, "no student serves yet"
    default = Path("understudy.toml")
    cfg = load_config(args.serve_config or (default if default.is_file() else None))
    audit = args.audit_log or cfg.router.audit_log
    if audit is None:
        return None, "no audit log: pass --audit-log or set [router] audit_log"
    try:
        report = drift_from_audit(reg, audit, cfg.rollout)
    except ConfigError as e:
        return None, f"drift unknown ({e})"
    judged = [r["psi"] for r in report["signals"].values() if r["psi"] is not None]
    if not report["alarm"]:
        if not judged:
            return None, f"no drift on {report['version']} (too few live requests to judge)"
        return None, (
            f"no drift on {report['version']} (max PSI {max(judged):.3f}; an alarm needs PSI "
            f">= {report['alarm_psi']} with KS beyond its 1% critical value)"
        )
    at = datetime.now(UTC).isoformat(timespec="seconds")
    why = f"drift on {report['version']}: " + ", ".join(report["alarm_signals"])
    return {"kind": "drift", "at": at, "audit_log": str(audit), **report}, why


def _schedule(args: argparse.Namespace) -> int:
    from langchain_understudy.distill_jobs.job import DistillJob, JobLockedError
    from langchain_understudy.distill_jobs.schedule import parse_every, run_schedule

    if bool(args.every) == bool(args.cron):
        print("error: give exactly one of --every or --cron", file=sys.stderr)
        return 2
    job = _job(args)
    assert isinstance(job, DistillJob)

    def once() -> str:
        trigger = None
        if args.when_drift:
            trigger, why = _drift_trigger(args, job.config.registry)
            if trigger is None:
                return f"skipped: {why}"
        try:
            r = job.run(trigger=trigger)
        except JobLockedError as e:
            return f"skipped: {e}"
        return f"{r.status} {r.version or ''} ({r.reason})".strip()

    def log(line: str) -> None:
        print(line, flush=True)

    run_schedule(
        once,
        every=parse_every(args.every) if args.every else None,
        cron=args.cron,
        max_runs=args.max_runs,
        log=log,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from langchain_understudy.distill_jobs.dataset import Example, conversation_key
    from langchain_understudy.distill_jobs.evaluation import evaluate_student
    from langchain_understudy.distill_jobs.traces import Trace
    from langchain_understudy.plugin.loader import student_from_version
    from langchain_understudy.prompting import message_text
    from langchain_understudy.students import StudentRegistry

    reg = StudentRegistry(args.registry)
    v = reg.get(args.student) if args.student else reg.current()
    if v is None:
        print(f"error: no student promoted in {args.registry}", file=sys.stderr)
        return 1
    prov = v.provenance
    examples = []
    with open(args.traces, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t = Trace.from_openai(json.loads(line))
            except Exception as e:  # noqa: BLE001 - report and skip a bad line
                print(f"line {n}: skipped ({e})", file=sys.stderr)
                continue
            ex = Example(conversation_key(t.messages), t.messages, message_text(t.answer))
            examples.append(ex)
    if args.limit:
        examples = examples[: args.limit]
    student = student_from_version(
        v,
        n_ctx=int(prov.get("n_ctx", 2048)),
        system_prompt=prov.get("system"),
        max_tokens=args.max_tokens,
    )
    rep = evaluate_student(student, examples, desc=f"evaluate {v.version}")
    rows = [[k, val] for k, val in rep.summary().items() if val is not None]
    print(format_table(["metric", v.version], rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rep.summary(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``distill`` and ``eval``."""
    p = sub.add_parser("distill", help="build students from traces")
    s = p.add_subparsers(dest="distill_command", metavar="ACTION", required=True)
    init = s.add_parser("init", help="write a commented starter job.toml")
    init.add_argument("path", nargs="?", default="job.toml", type=Path)
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=_init)
    run = s.add_parser("run", help="run a distillation job once")
    run.add_argument("--config", required=True, type=Path, help="job TOML file")
    run.add_argument("--resume", action="store_true", help="continue the last interrupted run")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)
    sched = s.add_parser("schedule", help="run a job repeatedly, one run at a time")
    sched.add_argument("--config", required=True, type=Path, help="job TOML file")
    sched.add_argument("--every", help="interval such as 30m, 6h, 1d")
    sched.add_argument("--cron", help="cron expression such as '0 3 * * *' (UTC)")
    sched.add_argument("--max-runs", type=int, default=None, help="stop after N runs")
    sched.add_argument("--quiet", action="store_true", help="no progress bars")
    sched.add_argument(
        "--when-drift",
        action="store_true",
        help="run only when the serving student's drift watch raises the alarm (PSI over the "
        "audit log's latest requests, as `understudy students drift`); the drift report is "
        "recorded in the new student's provenance",
    )
    sched.add_argument(
        "--serve-config",
        type=Path,
        default=None,
        help="understudy.toml whose [rollout] drift settings and [router] audit_log apply "
        "(default: ./understudy.toml when present)",
    )
    sched.add_argument("--audit-log", type=Path, help="the serving audit log (JSONL)")
    sched.set_defaults(func=_schedule)

    ev = sub.add_parser("eval", help="evaluate a registered student on traces (JSONL)")
    ev.add_argument("--student", help="version (default: the promoted one)")
    ev.add_argument("--traces", required=True, type=Path, help="OpenAI chat-format JSONL")
    ev.add_argument("--registry", type=Path, default=Path(".understudy/students"))
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--max-tokens", type=int, default=256)
    ev.add_argument("--out", type=Path, help="write the summary JSON here")
    ev.set_defaults(func=_eval)
