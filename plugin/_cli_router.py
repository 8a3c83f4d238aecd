"""``understudy router ...``: calibrate the routing threshold and evaluate the router on traces.

Both commands read held-out traces in the OpenAI chat fine-tuning format (one JSON object per line,
``{"messages": [...], "metadata": {...}}``, the last assistant message being the teacher's answer;
``metadata.out_of_scope = true`` marks out-of-scope requests), run the student and every routing
signal on each prompt, and score the student's answer against the teacher's (exact match after
normalisation). The teacher is never called.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from langchain_understudy.errors import ConfigError, TraceError
from langchain_understudy.plugin._table import format_table

__all__ = ["read_traces", "register", "set_router_settings"]


def read_traces(path: Path, limit: int | None = None) -> list[tuple[list[Any], str, bool]]:
    """Read ``(prompt messages, teacher answer text, out_of_scope)`` from a trace JSONL file.

    Raises:
        TraceError: the file is missing or a line is not a trace.
    """
    from langchain_understudy.distill_jobs.traces import Trace
    from langchain_understudy.prompting import message_text

    out: list[tuple[list[Any], str, bool]] = []
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as e:
        msg = f"cannot read traces {path} ({e}); export some with `understudy traces export`"
        raise TraceError(msg) from e
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}:{lineno}: not JSON ({e})"
                raise TraceError(msg) from e
            try:
                trace = Trace.from_openai(obj)
            except TraceError as e:
                msg = f"{path}:{lineno}: {e}"
                raise TraceError(msg) from e
            meta = obj.get("metadata") or {}
            oos = bool(meta.get("out_of_scope", trace.metadata.get("out_of_scope", False)))
            out.append((list(trace.messages), message_text(trace.answer), oos))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        msg = f"{path} holds no traces"
        raise TraceError(msg)
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the paths and names written here
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


_TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def set_router_settings(path: Path, values: dict[str, Any]) -> None:
    """Set keys of the ``[router]`` table of a TOML file, keeping everything else as it was.

    Existing ``key = ...`` lines in ``[router]`` are replaced in place; missing keys are added at
    the end of the table; a missing table is appended. The result is parsed back to check it.

    Raises:
        ConfigError: the file is not valid TOML before or after the edit (for example when the
            router settings are written as an inline table).
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text:
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = f"{path} is not valid TOML ({e}); fix it before calibrating"
            raise ConfigError(msg) from e
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next(
        (i for i, ln in enumerate(lines) if (m := _TABLE.match(ln)) and m.group(1) == "router"),
        None,
    )
    if start is None:
        block = "".join(f"{k} = {_format_value(v)}\n" for k, v in values.items())
        sep = "\n" if lines and lines[-1].strip() else ""
        lines.append(f"{sep}[router]\n{block}")
    else:
        end = next((i for i in range(start + 1, len(lines)) if _TABLE.match(lines[i])), len(lines))
        for key, value in values.items():
            pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
            hit = next((i for i in range(start + 1, end) if pat.match(lines[i])), None)
            new = f"{key} = {_format_value(value)}\n"
            if hit is not None:
                lines[hit] = new
                continue
            at = end
            while at > start + 1 and not lines[at - 1].strip():
                at -= 1
            lines.insert(at, new)
            end += 1
    out = "".join(lines)
    try:
        parsed = tomllib.loads(out).get("router", {})
    except tomllib.TOMLDecodeError as e:
        msg = f"editing {path} would make it invalid TOML ({e}); set router.threshold by hand"
        raise ConfigError(msg) from e
    for key, value in values.items():
        got = parsed.get(key)
        ok = (
            abs(got - value) < 1e-6
            if isinstance(value, float) and got is not None
            else got == value
        )
        if not ok:
            msg = (
                f"could not write router.{key} into {path} (is [router] an inline table?); "
                f"set {key} = {_format_value(value)} by hand"
            )
            raise ConfigError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(out, encoding="utf-8")
    os.replace(tmp, path)


def _config(args: argparse.Namespace) -> tuple[Any, Path]:
    from langchain_understudy.config import load_config

    path = Path(args.config) if args.config else Path("understudy.toml")
    cfg = load_config(path if path.exists() else None)
    return cfg, path


def _knowledge(cfg: Any, args: argparse.Namespace) -> Any:
    if args.no_knowledge or cfg.knowledge.path is None:
        return None
    from langchain_understudy.retrieval.vectorstores import KnowledgeStore

    embedding = None
    if cfg.knowledge.embedding_model is not None:
        from langchain_understudy.retrieval.embeddings import load_embeddings

        embedding = load_embeddings(cfg.knowledge.embedding_model)
    return KnowledgeStore(cfg.knowledge.path, embedding, create=False)


def _understudy(cfg: Any, args: argparse.Namespace) -> tuple[Any, str]:
    """An offline ChatUnderstudy (no teacher) over the chosen student; returns it and a label."""
    from langchain_understudy.plugin.loader import student_from_version
    from langchain_understudy.router import ChatUnderstudy, Router, load_router
    from langchain_understudy.students import ChatStudent, StudentRegistry

    s = cfg.student
    opts: dict[str, Any] = {
        **s.chat_student_kwargs(),
        "max_tokens": args.max_tokens or s.max_tokens,
        "temperature": 0.0,
    }
    ood: Any = args.ood_index
    if args.gguf:
        student = ChatStudent(model_path=args.gguf, **opts)
        label = str(args.gguf)
    elif args.student or s.model_path is None:
        reg = StudentRegistry(s.registry)
        v = reg.get(args.student) if args.student else reg.current()
        if v is None:
            msg = f"no student is promoted in {reg.root}; pass --gguf PATH or --student V"
            raise ConfigError(msg)
        student = student_from_version(v, **opts)
        if ood is None and "ood_index.npy" in v.files:
            ood = v.artifact("ood_index.npy")
        label = v.version
    else:
        student = ChatStudent(model_path=s.model_path, **opts)
        label = str(s.model_path)
    router = load_router(args.router) if args.router else Router.from_settings(cfg.router)
    if args.router:
        base = Router.from_settings(cfg.router)
        router.rules = base.rules
        router.threshold = cfg.router.threshold
    llm = ChatUnderstudy(
        student=student,
        teacher=None,
        knowledge=_knowledge(cfg, args),
        router=router,
        mode=args.mode or cfg.router.mode,
        ood_index=ood,
        k=cfg.knowledge.k,
        min_relevance=cfg.knowledge.min_relevance,
    )
    return llm, label


def _examples(llm: Any, traces: list[tuple[list[Any], str, bool]]) -> list[Any]:
    from tqdm.auto import tqdm

    from langchain_understudy.router.evaluation import collect_examples

    with tqdm(
        total=len(traces), desc="routing traces", unit="trace", file=sys.stderr, disable=None
    ) as bar:
        return collect_examples(
            llm,
            [t[0] for t in traces],
            [t[1] for t in traces],
            out_of_scope=[t[2] for t in traces],
            progress=bar.update,
        )


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(float(v), fmt)


def _summary(report: Any) -> str:
    at = report.at_threshold
    o = report.overhead_ms
    rows = [
        ["requests (out of scope)", f"{report.n} ({report.n_out_of_scope})"],
        ["router / mode", f"{report.router} / {report.mode}"],
        ["threshold", _num(report.threshold)],
        ["student-only quality", _pct(report.student_quality)],
        ["teacher calls @ threshold", _pct(at["teacher_rate"])],
        ["quality @ threshold", _pct(at["quality"])],
        ["out-of-scope recall @ threshold", _pct(at["oos_recall"])],
        ["APGR", _num(report.apgr)],
        [
            "CPT(50%) / CPT(80%) / CPT(95%)",
            " / ".join(_pct(report.cpt[k]) for k in ("50", "80", "95")),
        ],
        [
            "overhead p50 / p95 (ms)",
            f"{_num(o.get('p50'), '.2f')} / {_num(o.get('p95'), '.2f')}",
        ],
        [
            "  excluding embedding",
            f"{_num(o.get('p50_excluding_embedding'), '.2f')} / "
            f"{_num(o.get('p95_excluding_embedding'), '.2f')}",
        ],
    ]
    aurocs = [[name, _num(v)] for name, v in report.signal_auroc.items()]
    aurocs.append(["(combined score)", _num(report.router_auroc)])
    return (
        format_table(["metric", "value"], rows)
        + "\n\n"
        + format_table(["signal", "AUROC (student error)"], aurocs)
    )


def _calibrate(args: argparse.Namespace) -> int:
    from langchain_understudy.config import RouterSettings
    from langchain_understudy.router import LearnedRouter, Router, evaluate_router

    cfg, cfg_path = _config(args)
    if (
        args.fit != "none"
        and args.router_out is None
        and "policy" not in RouterSettings.model_fields
    ):
        msg = (
            f"--fit {args.fit} learns per-signal weights that must be saved with the threshold; "
            "pass --router-out PATH (and point your application at it)"
        )
        raise ConfigError(msg)
    traces = read_traces(args.traces, args.limit)
    llm, label = _understudy(cfg, args)
    examples = _examples(llm, traces)
    router = llm.active_router
    if args.fit == "default":
        router = Router(rules=router.rules).fit(examples)
    elif args.fit == "learned":
        router = LearnedRouter(rules=router.rules).fit(examples)
    mode = args.mode or cfg.router.mode
    t = router.calibrate(
        examples,
        target_teacher_rate=args.target_teacher_rate,
        target_quality=args.target_quality,
        mode=mode,
    )
    values: dict[str, Any] = {"threshold": float(t)}
    if args.fit != "none":
        out = args.router_out or cfg_path.with_name("router_policy.json")
        router.save(out)
        print(f"wrote router policy ({router.kind}) to {out}")
        if "policy" in RouterSettings.model_fields:
            values["policy"] = str(Path(out).resolve())
    set_router_settings(cfg_path, values)
    report = evaluate_router(router, examples, mode=mode)
    print(f"student {label}: {len(examples)} held-out traces from {args.traces}")
    print(_summary(report))
    reached = report.at_threshold["teacher_rate"]
    if args.target_teacher_rate is not None and reached > args.target_teacher_rate + 1e-9:
        print(
            f"warning: the target teacher rate {args.target_teacher_rate:g} is out of reach; "
            f"the lowest this router reaches on these traces is {reached:.3g} (scores of 1 come "
            "from rules, failing signals or saturated risks: see the reasons above, or --fit)"
        )
    print(f"\nwrote router.threshold = {t:.6g} to {cfg_path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from langchain_understudy.router import evaluate_router, plot_report

    cfg, _ = _config(args)
    traces = read_traces(args.traces, args.limit)
    llm, label = _understudy(cfg, args)
    examples = _examples(llm, traces)
    mode = args.mode or cfg.router.mode
    router = llm.active_router
    report = evaluate_router(router, examples, mode=mode, n_thresholds=args.thresholds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "traces": str(args.traces),
        "student": label,
        "router_policy": router.to_dict(),
        **report.to_dict(),
    }
    (out / "router_eval.json").write_text(
        json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8"
    )
    plot_report(report, out / "router_eval.png", title=f"Router on {Path(args.traces).name}")
    print(f"student {label}: {len(examples)} traces from {args.traces}")
    print(_summary(report))
    print(f"\nwrote {out / 'router_eval.json'} and {out / 'router_eval.png'}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traces", type=Path, required=True, help="held-out traces (OpenAI JSONL)")
    p.add_argument("--config", type=Path, help="understudy.toml (default: ./understudy.toml)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--student", metavar="V", help="registry version (default: the promoted one)")
    who.add_argument("--gguf", type=Path, metavar="PATH", help="a student GGUF file instead")
    p.add_argument("--ood-index", type=Path, help="ood_index.npy (default: the student's own)")
    p.add_argument("--router", type=Path, help="a saved router policy JSON to start from")
    p.add_argument("--mode", choices=["pre", "cascade", "auto"], help="default: from config")
    p.add_argument("--limit", type=int, help="use only the first N traces")
    p.add_argument("--max-tokens", type=int, help="cap on the student's answer length")
    p.add_argument("--no-knowledge", action="store_true", help="do not open the knowledge store")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``router`` command group."""
    p = sub.add_parser("router", help="calibrate and evaluate the student/teacher router")
    s = p.add_subparsers(dest="router_command", metavar="ACTION", required=True)

    cal = s.add_parser(
        "calibrate",
        help="set router.threshold from held-out traces",
        description="Run the student on held-out traces and write the threshold that meets the "
        "target into the config file (the rest of the file is kept as it is).",
    )
    _common(cal)
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-teacher-rate", type=float, metavar="R", help="e.g. 0.2")
    target.add_argument("--target-quality", type=float, metavar="Q", help="e.g. 0.95")
    cal.add_argument(
        "--fit",
        choices=["none", "default", "learned"],
        default="none",
        help="also fit per-signal calibration (default) or a logistic regression (learned)",
    )
    cal.add_argument("--router-out", type=Path, help="where a fitted policy is saved (JSON)")
    cal.set_defaults(func=_calibrate)

    ev = s.add_parser(
        "eval",
        help="quality vs teacher calls, APGR, CPT, AUROC, overhead",
        description="Evaluate the router on traces whose teacher answers stand in for a live "
        "teacher; writes router_eval.json and router_eval.png.",
    )
    _common(ev)
    ev.add_argument("--out", type=Path, default=Path("router_eval"), help="output folder")
    ev.add_argument("--thresholds", type=int, default=50, help="thresholds swept (>= 20)")
    ev.set_defaults(func=_eval)
