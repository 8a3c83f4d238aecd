"""``understudy students ...``: list, show, promote, roll back, export and quantize."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from langchain_understudy.plugin._table import format_table

__all__ = ["register"]


def _registry(args: argparse.Namespace) -> Any:
    from langchain_understudy.config import load_config
    from langchain_understudy.students import StudentRegistry

    root = args.registry or load_config(args.config).student.registry
    return StudentRegistry(root)


def _list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    current = reg.current_version()
    rows = []
    for v in reg.list():
        m = v.metrics
        score = m.get("exact_match", m.get("accuracy"))
        rows.append(
            [
                ("* " if v.version == current else "  ") + v.version,
                v.created_at,
                v.provenance.get("quant", ""),
                f"{v.path.stat().st_size / 1e6:.1f} MB" if v.path.exists() else "missing",
                score,
                v.provenance.get("teacher_model", ""),
            ]
        )
    if not rows:
        print(f"no students registered in {reg.root}")
        return 0
    print(format_table(["version", "created", "quant", "size", "exact_match", "teacher"], rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    v = _registry(args).get(args.version)
    print(json.dumps(v.to_dict(), indent=2, sort_keys=True, default=str))
    return 0


def _rollout_settings(args: argparse.Namespace) -> Any:
    from langchain_understudy.config import load_config

    return load_config(args.config).rollout


def _live(args: argparse.Namespace, reg: Any) -> Any:
    from langchain_understudy.router.rollout import LiveLog, summarize

    log = _rollout_settings(args).log or reg.root / "live.jsonl"
    return summarize(LiveLog(log).read())


def _promote(args: argparse.Namespace) -> int:
    reg = _registry(args)
    rs = _rollout_settings(args)
    if rs.require_live_agreement and not args.force:
        s = _live(args, reg).get(args.version)
        if s is None or s.judged < rs.min_requests or (s.agreement or 0.0) < rs.min_agreement:
            got = "no live checks" if s is None else f"{s.agreed}/{s.judged} agreed"
            print(
                f"refused: {args.version} needs live agreement >= {rs.min_agreement} over >= "
                f"{rs.min_requests} checks ({got}); run it as a shadow or canary first, or "
                "pass --force"
            )
            return 2
    v = reg.promote(args.version)
    print(f"promoted {v.version} ({v.path})")
    return 0


def _shadow(args: argparse.Namespace) -> int:
    if not args.stop and not args.version:
        print("give the version to shadow, or --stop")
        return 2
    st = _registry(args).set_shadow(None if args.stop else args.version)
    print(f"shadow: {st.shadow or 'none'}")
    return 0


def _canary(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.stop:
        v = reg.end_canary("stopped", "stopped by hand")
        print(f"canary stopped: {v}" if v else "no canary was running")
        return 0
    if not args.version:
        print("give the version to run as a canary, or --stop")
        return 2
    st = reg.start_canary(args.version, args.share)
    print(f"canary: {st.canary} serves {st.canary_share:.0%} of the conversations")
    return 0


def _compare(args: argparse.Namespace) -> int:
    reg = _registry(args)
    live = _live(args, reg)
    rows = []
    for s in live.values():
        if args.version and s.candidate != args.version:
            continue
        d = s.to_dict()
        lo, hi = d["agreement_ci95"]
        rows.append(
            [
                s.kind,
                s.candidate,
                s.n,
                "n/a" if s.agreement is None else f"{s.agreement:.3f}",
                f"{lo:.3f}-{hi:.3f}",
                f"{s.teacher_agreed}/{s.teacher_n}",
                f"{s.error_rate:.3f}",
                "n/a" if s.latency_p95_ms is None else f"{s.latency_p95_ms:.0f}",
            ]
        )
    if args.json:
        print(json.dumps([s.to_dict() for s in live.values()], indent=2))
        return 0
    st = reg.rollout()
    print(f"serving {reg.current_version()}; shadow {st.shadow}; canary {st.canary}")
    if not rows:
        print("no live checks recorded yet")
        return 0
    head = ["kind", "candidate", "checks", "agreement", "95% CI", "teacher", "errors", "p95 ms"]
    print(format_table(head, rows))
    return 0


def _drift(args: argparse.Namespace) -> int:
    from langchain_understudy.config import load_config
    from langchain_understudy.router.rollout import drift_from_audit

    cfg = load_config(args.config)
    audit = args.audit_log or cfg.router.audit_log
    if audit is None:
        print("no audit log: pass --audit-log or set [router] audit_log")
        return 2
    report = drift_from_audit(_registry(args), audit, cfg.rollout, args.version)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rows = [
            [name, r["n"], r["reference_n"], r["psi"], r["ks"]]
            for name, r in report["signals"].items()
        ]
        print(format_table(["signal", "live", "held-out", "PSI", "KS"], rows))
        state = "ALARM: " + ", ".join(report["alarm_signals"]) if report["alarm"] else "no alarm"
        print(f"{report['version']}: {state} (PSI >= {report['alarm_psi']})")
    return 3 if report["alarm"] else 0


def _rollback(args: argparse.Namespace) -> int:
    v = _registry(args).rollback()
    print(f"rolled back: now serving {v.version} ({v.path})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from langchain_understudy.students import export_gguf

    out = export_gguf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from langchain_understudy.students import quantize_gguf

    out = quantize_gguf(args.src, args.dst, args.type)
    src_mb, dst_mb = Path(args.src).stat().st_size / 1e6, out.stat().st_size / 1e6
    print(f"wrote {out} ({args.type}, {dst_mb:.1f} MB from {src_mb:.1f} MB)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``students`` command group."""
    from langchain_understudy.students.quantize import QUANT_TYPES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", type=Path, help="registry folder (default: from config)")
    common.add_argument("--config", type=Path, help="understudy.toml")
    p = sub.add_parser("students", help="manage student models (registry, export, quantize)")
    s = p.add_subparsers(dest="students_command", metavar="ACTION", required=True)
    s.add_parser("list", parents=[common], help="list registered versions").set_defaults(func=_list)
    show = s.add_parser("show", parents=[common], help="show one version's provenance and metrics")
    show.add_argument("version")
    show.set_defaults(func=_show)
    promote = s.add_parser("promote", parents=[common], help="serve a version from now on")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="skip the live-agreement gate")
    promote.set_defaults(func=_promote)
    shadow = s.add_parser(
        "shadow", parents=[common], help="run a candidate beside the served student, never served"
    )
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--stop", action="store_true", help="stop the shadow")
    shadow.set_defaults(func=_shadow)
    canary = s.add_parser(
        "canary", parents=[common], help="serve a candidate to a share of the conversations"
    )
    canary.add_argument("version", nargs="?")
    canary.add_argument("--share", type=float, default=0.1, help="share in (0, 1] (default 0.1)")
    canary.add_argument("--stop", action="store_true", help="end the canary, keep the served one")
    canary.set_defaults(func=_canary)
    compare = s.add_parser(
        "compare", parents=[common], help="live agreement of shadow and canary candidates"
    )
    compare.add_argument("version", nargs="?")
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(func=_compare)
    drift = s.add_parser(
        "drift", parents=[common], help="routing signals on live traffic vs held-out (PSI, KS)"
    )
    drift.add_argument("--version", help="default: the promoted one")
    drift.add_argument("--audit-log", type=Path, help="default: [router] audit_log")
    drift.add_argument("--json", action="store_true")
    drift.set_defaults(func=_drift)
    rollback = s.add_parser(
        "rollback", parents=[common], help="serve the previously promoted version"
    )
    rollback.set_defaults(func=_rollback)
    export = s.add_parser("export", help="convert a Hugging Face checkpoint to GGUF")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    export.set_defaults(func=_export)
    quant = s.add_parser("quantize", help="quantize a GGUF with llama.cpp")
    quant.add_argument("src", type=Path)
    quant.add_argument("dst", type=Path)
    quant.add_argument("--type", default="Q8_0", choices=list(QUANT_TYPES))
    quant.set_defaults(func=_quantize)
