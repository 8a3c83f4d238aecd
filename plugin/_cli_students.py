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


def _promote(args: argparse.Namespace) -> int:
    v = _registry(args).promote(args.version)
    print(f"promoted {v.version} ({v.path})")
    return 0


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
    promote.set_defaults(func=_promote)
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
