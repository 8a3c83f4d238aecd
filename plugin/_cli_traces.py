"""``understudy traces ...``: import OpenAI-format JSONL, summarise the store, export it again."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from langchain_understudy.errors import TraceError
from langchain_understudy.plugin._table import format_table

__all__ = ["register"]

_MAX_SHOWN_ERRORS = 20
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _time_arg(value: str) -> datetime:
    """Read ``--since``/``--until``: an ISO time (UTC unless it says otherwise) or a duration ago."""
    text = value.strip()
    m = _DURATION.fullmatch(text)
    if m:
        return datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        msg = (
            f"must be an ISO time like 2026-01-31 or 2026-01-31T12:00Z, or a duration ago "
            f"like 90m, 12h, 7d, 2w; got {value!r}"
        )
        raise argparse.ArgumentTypeError(msg) from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _store_path(args: argparse.Namespace, cfg: Any = None) -> Path:
    if args.store is not None:
        return Path(args.store)
    if cfg is None:
        from langchain_understudy.config import load_config

        cfg = load_config(args.config)
    return Path(cfg.traces.path)


def _open(path: Path) -> Any:
    from langchain_understudy.distill_jobs.traces import TraceStore

    return TraceStore(path)


def _missing_store(path: Path) -> TraceError:
    msg = f"no trace store at {path}; pass --store or --config pointing at an existing one"
    return TraceError(msg)


def _import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from langchain_understudy.config import load_config
    from langchain_understudy.distill_jobs.redact import Redactor

    src = Path(args.file)
    if not src.is_file():
        msg = f"{src} is not a file; pass the path of a .jsonl file to import"
        raise TraceError(msg)
    cfg = load_config(args.config)
    redactor = Redactor() if cfg.traces.redact and not args.no_redact else None
    with (
        _open(_store_path(args, cfg)) as store,
        tqdm(
            total=src.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"import {src.name}",
            disable=None,  # shown on a terminal only
            file=sys.stderr,
        ) as bar,
    ):
        report = store.import_jsonl(
            src,
            redactor=redactor,
            tags=args.tag,
            progress=bar.update,
            unanswered=args.unanswered,
        )
        total = store.count()
    print(
        format_table(
            ["file", "lines", "added", "duplicates", "malformed", "in store"],
            [[str(src), report.lines, report.added, report.duplicates, report.malformed, total]],
        )
    )
    for line in report.errors[:_MAX_SHOWN_ERRORS]:
        print(line, file=sys.stderr)
    if report.malformed > _MAX_SHOWN_ERRORS:
        print(
            f"... and {report.malformed - _MAX_SHOWN_ERRORS} more malformed lines", file=sys.stderr
        )
    if report.malformed:
        print(
            f"skipped {report.malformed} malformed lines; fix them and import the file again "
            "(lines already imported are not duplicated)",
            file=sys.stderr,
        )
    return 1 if (args.strict and report.malformed) else 0


def _fmt_time(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC") if dt is not None else ""


def _stats(args: argparse.Namespace) -> int:
    path = _store_path(args)
    if not path.exists():
        raise _missing_store(path)
    with _open(path) as store:
        s = store.stats()
    if not s.traces:
        print(f"{path}: no traces yet")
        return 0
    print(
        format_table(
            [
                "store",
                "traces",
                "errors",
                "distinct",
                "tool calls",
                "first",
                "last",
                "p50 ms",
                "p95 ms",
            ],
            [
                [
                    str(path),
                    s.traces,
                    s.errors,
                    s.distinct,
                    s.tool_call_answers,
                    _fmt_time(s.first),
                    _fmt_time(s.last),
                    s.latency_p50_ms,
                    s.latency_p95_ms,
                ]
            ],
        )
    )
    print()
    print(
        format_table(
            ["model", "traces", "errors", "mean ms"],
            [
                [name or "(unknown)", m.traces, m.errors, m.mean_latency_ms]
                for name, m in s.models.items()
            ],
        )
    )
    if s.tags:
        print()
        top = list(s.tags.items())[: args.top]
        print(format_table(["tag", "traces"], top))
        if len(s.tags) > args.top:
            print(f"... and {len(s.tags) - args.top} more tags")
    return 0


def _export(args: argparse.Namespace) -> int:
    path = _store_path(args)
    if not path.exists():
        raise _missing_store(path)
    with _open(path) as store:
        kwargs: dict[str, Any] = {
            "since": args.since,
            "until": args.until,
            "tags": args.tag,
            "include_errors": args.include_errors,
        }
        if args.out is None or str(args.out) == "-":
            n = store.export_jsonl(sys.stdout, **kwargs)
            print(f"exported {n} traces", file=sys.stderr)
        else:
            n = store.export_jsonl(args.out, **kwargs)
            print(f"wrote {n} traces to {args.out}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, help="trace store file (default: traces.path from config)")
    p.add_argument("--config", type=Path, help="understudy.toml")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``traces`` command group."""
    p = sub.add_parser("traces", help="teacher traces: import, stats, export")
    s = p.add_subparsers(dest="traces_command", metavar="ACTION", required=True)

    imp = s.add_parser(
        "import",
        help="import OpenAI chat fine-tuning JSONL (last assistant message = teacher's answer)",
    )
    imp.add_argument("file", type=Path, help="a .jsonl file, one {'messages': [...]} per line")
    imp.add_argument("--tag", action="append", help="tag every imported trace (repeatable)")
    imp.add_argument(
        "--no-redact", action="store_true", help="keep PII (default: redact as traces.redact says)"
    )
    imp.add_argument("--strict", action="store_true", help="exit 1 when any line is malformed")
    imp.add_argument(
        "--unanswered",
        action="store_true",
        help="accept lines without the assistant's answer as prompts for teacher relabelling "
        "(a distillation job with [relabel] mode = 'missing' asks the teacher)",
    )
    _common(imp)
    imp.set_defaults(func=_import)

    stats = s.add_parser("stats", help="summarise the trace store")
    stats.add_argument("--top", type=int, default=10, help="tags to list (default: 10)")
    _common(stats)
    stats.set_defaults(func=_stats)

    exp = s.add_parser("export", help="write traces as OpenAI chat fine-tuning JSONL")
    exp.add_argument("--since", type=_time_arg, help="ISO time or duration ago (12h, 7d)")
    exp.add_argument("--until", type=_time_arg, help="ISO time or duration ago")
    exp.add_argument("--tag", action="append", help="only traces with one of these tags")
    exp.add_argument("--include-errors", action="store_true", help="also export failed calls")
    exp.add_argument("--out", type=Path, help="output file (default: standard output)")
    _common(exp)
    exp.set_defaults(func=_export)
