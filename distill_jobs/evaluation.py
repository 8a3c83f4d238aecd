"""Judge a student on held-out traces against the teacher's answers."""

from __future__ import annotations

import json
import re
import statistics
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from langchain_understudy.distill_jobs.dataset import Example
from langchain_understudy.errors import StudentError
from langchain_understudy.prompting import answer_text, split_answer

__all__ = [
    "EvalReport",
    "evaluate_student",
    "field_accuracy",
    "normalize_answer",
    "tool_call_scores",
    "token_f1",
]

_PUNCT_END = re.compile(r"[\s.!?;:,]+$")


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match.

    NFKC, case-folded, whitespace collapsed, trailing punctuation dropped; JSON objects are compared
    canonically (sorted keys, no whitespace).
    """
    text = unicodedata.normalize("NFKC", text).strip()
    parsed = _as_json_object(text)
    if parsed is not None:
        return json.dumps(parsed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(text.casefold().split())
    return _PUNCT_END.sub("", text)


def _as_json_object(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between normalised answers."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def field_accuracy(prediction: str, reference: str) -> float | None:
    """Return the fraction of a reference JSON object's fields the prediction reproduces exactly.

    ``None`` when the reference is not a JSON object. Extra predicted fields count against it.
    """
    ref = _as_json_object(reference.strip())
    if ref is None:
        return None
    pred = _as_json_object(prediction.strip()) or {}
    keys = set(ref) | set(pred)
    if not keys:
        return 1.0
    return sum(1 for k in keys if k in ref and k in pred and pred[k] == ref[k]) / len(keys)


def _norm_value(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(unicodedata.normalize("NFKC", value).casefold().split())
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_norm_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm_value(v) for k, v in sorted(value.items())}
    return value


def _call_parts(calls: Sequence[dict[str, Any]]) -> Counter[str]:
    """Each call as (name, argument, value) facts; a call without arguments is one fact."""
    out: Counter[str] = Counter()
    for c in calls:
        args = c.get("args") or {}
        if not args:
            out[json.dumps([c["name"]])] += 1
        for k, v in args.items():
            out[json.dumps([c["name"], k, _norm_value(v)], sort_keys=True)] += 1
    return out


def tool_call_scores(prediction: str, reference: str) -> dict[str, Any] | None:
    """Compare the tool calls of two answers (as written by ``prompting.answer_text``).

    Returns ``None`` when the reference calls no tool. Otherwise:

    * ``exact``: the same calls, names and every argument, after normalisation (strings NFKC,
      case-folded, whitespace collapsed; numbers compared as numbers; order of calls ignored);
    * ``name``: the same tool names (as a multiset);
    * ``arg_f1``: F1 over (tool, argument, value) facts;
    * ``valid``: the prediction's ``<|call|>`` block parsed (``True`` without one);
    * ``called``: the prediction called a tool at all.

    Example:
        >>> ref = '<|call|>[{"name": "book", "arguments": {"city": "Paris", "n": 2}}]'
        >>> pred = '<|call|>[{"name": "book", "arguments": {"city": "paris", "n": 2.0}}]'
        >>> tool_call_scores(pred, ref)["exact"]
        True
    """
    try:
        _, ref_calls = split_answer(reference)
    except ValueError:
        return None
    if not ref_calls:
        return None
    try:
        _, pred_calls = split_answer(prediction)
        valid = True
    except ValueError:
        pred_calls, valid = [], False
    pred, ref = _call_parts(pred_calls), _call_parts(ref_calls)
    common = sum((pred & ref).values())
    f1 = 0.0 if not common else 2 * common / (sum(pred.values()) + sum(ref.values()))
    return {
        "exact": pred == ref,
        "name": Counter(c["name"] for c in pred_calls) == Counter(c["name"] for c in ref_calls),
        "arg_f1": f1,
        "valid": valid,
        "called": bool(pred_calls),
    }


@dataclass
class EvalReport:
    """Aggregate and per-example results of one evaluation."""

    n: int
    exact_match: float
    token_f1: float
    field_accuracy: float | None
    valid_json: float | None
    latency_ms_p50: float
    latency_ms_p95: float
    mean_confidence: float | None
    n_errors: int = 0
    n_tool_call_turns: int = 0
    tool_call_exact: float | None = None
    tool_name_accuracy: float | None = None
    tool_arg_f1: float | None = None
    valid_calls: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The aggregate numbers, without per-example rows."""
        d = asdict(self)
        d.pop("rows")
        return d


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def evaluate_student(
    student: Any,
    examples: Sequence[Example],
    *,
    json_schema: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalReport:
    """Run a student on every example and compare with the teacher's answer.

    ``student`` is a :class:`~langchain_understudy.students.ChatStudent`; each example's retrieved
    facts and exemplars are passed with it, as at serving time, and its tools are bound
    (``tool_choice="auto"``). On turns where the teacher called tools, the report adds tool-call
    exact match, name accuracy, argument F1 and the share of valid calls
    (:func:`tool_call_scores`).
    """
    rows: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"json_schema": json_schema} if json_schema else {}
    for ex in tqdm(examples, desc=desc, disable=not progress, unit="ex"):
        t0 = time.perf_counter()
        error = None
        try:
            shown: dict[str, Any] = {"exemplars": ex.exemplars} if ex.exemplars is not None else {}
            if ex.tools:
                shown.update(tools=ex.tools, tool_choice="auto")
            msg = student.invoke(ex.messages, facts=ex.facts, **shown, **kwargs)
            pred, confidence = answer_text(msg, ex.tools), msg.response_metadata.get("confidence")
            entropy = msg.response_metadata.get("answer_entropy")
        except StudentError as e:  # e.g. a prompt longer than the context: a miss, not a crash
            pred, confidence, entropy, error = "", None, None, str(e)
        ms = (time.perf_counter() - t0) * 1000
        rows.append(
            {
                "key": ex.key,
                "prediction": pred,
                "reference": ex.answer,
                "exact": normalize_answer(pred) == normalize_answer(ex.answer),
                "f1": token_f1(pred, ex.answer),
                "field_accuracy": field_accuracy(pred, ex.answer),
                "valid_json": _as_json_object(pred) is not None,
                "latency_ms": ms,
                "confidence": confidence,
                "answer_entropy": entropy,
                "error": error,
                "tool_calls": tool_call_scores(pred, ex.answer),
                "metadata": ex.metadata,
            }
        )
    n = len(rows)
    fa = [r["field_accuracy"] for r in rows if r["field_accuracy"] is not None]
    is_json = bool(fa)
    conf = [r["confidence"] for r in rows if r["confidence"] is not None]
    lat = [r["latency_ms"] for r in rows]
    calls = [r["tool_calls"] for r in rows if r["tool_calls"] is not None]

    def share(key: str) -> float | None:
        return statistics.fmean(float(c[key]) for c in calls) if calls else None

    return EvalReport(
        n=n,
        exact_match=sum(r["exact"] for r in rows) / n if n else 0.0,
        token_f1=statistics.fmean(r["f1"] for r in rows) if n else 0.0,
        field_accuracy=statistics.fmean(fa) if fa else None,
        valid_json=sum(r["valid_json"] for r in rows) / n if is_json and n else None,
        latency_ms_p50=_pct(lat, 0.5),
        latency_ms_p95=_pct(lat, 0.95),
        mean_confidence=statistics.fmean(conf) if conf else None,
        n_errors=sum(1 for r in rows if r["error"]),
        n_tool_call_turns=len(calls),
        tool_call_exact=share("exact"),
        tool_name_accuracy=share("name"),
        tool_arg_f1=share("arg_f1"),
        valid_calls=share("valid"),
        rows=rows,
    )
