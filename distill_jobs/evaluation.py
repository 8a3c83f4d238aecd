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

__all__ = [
    "EvalReport",
    "evaluate_student",
    "field_accuracy",
    "normalize_answer",
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
    facts and exemplars are passed with it, as at serving time.
    """
    rows: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"json_schema": json_schema} if json_schema else {}
    for ex in tqdm(examples, desc=desc, disable=not progress, unit="ex"):
        t0 = time.perf_counter()
        error = None
        try:
            shown = {"exemplars": ex.exemplars} if ex.exemplars is not None else {}
            msg = student.invoke(ex.messages, facts=ex.facts, **shown, **kwargs)
            pred, confidence = str(msg.content).strip(), msg.response_metadata.get("confidence")
        except StudentError as e:  # e.g. a prompt longer than the context: a miss, not a crash
            pred, confidence, error = "", None, str(e)
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
                "error": error,
                "metadata": ex.metadata,
            }
        )
    n = len(rows)
    fa = [r["field_accuracy"] for r in rows if r["field_accuracy"] is not None]
    is_json = bool(fa)
    conf = [r["confidence"] for r in rows if r["confidence"] is not None]
    lat = [r["latency_ms"] for r in rows]
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
        rows=rows,
    )
