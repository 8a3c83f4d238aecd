"""Router evaluation: quality vs teacher-call rate, APGR, CPT, per-signal AUROC and overhead.

The teacher's recorded answers stand in for a live teacher, as routing benchmarks do: an escalated
request scores ``teacher_quality`` (1 by default: the teacher's answer is the reference) and a request
kept on the student scores the student's correctness. Sweeping the threshold traces the curve from
"never escalate" (the student's quality, 0 teacher calls) to "always escalate" (the teacher's
quality, 100 % teacher calls).

Definitions follow RouteLLM (Ong et al., 2024, "RouteLLM: Learning to Route LLMs with Preference
Data"):

* performance gap recovered ``PGR = (q - q_student) / (q_teacher - q_student)``;
* ``APGR`` = area under PGR as a function of the teacher-call rate over [0, 1] (trapezoidal, as in
  RouteLLM's evaluation code), i.e. ``(AUC(q) - q_student) / (q_teacher - q_student)``;
* ``CPT(x%)`` = the smallest teacher-call rate at which PGR reaches ``x%`` (linear interpolation
  between measured points).

Everything here takes plain in-memory lists (:class:`~.policy.RoutedExample`); reading trace files is
the CLI's job.

Example:
    >>> points = quality_curve([0.9, 0.1, 0.8, 0.2], [0, 1, 0, 1], n_thresholds=20)
    >>> apgr(points)
    0.75
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.messages import BaseMessage

from langchain_understudy.errors import ConfigError
from langchain_understudy.prompting import message_text
from langchain_understudy.router.policy import Mode, RoutedExample, Router

if TYPE_CHECKING:
    from langchain_understudy.router.chat_models import ChatUnderstudy

__all__ = [
    "CurvePoint",
    "RouterReport",
    "apgr",
    "auroc",
    "collect_examples",
    "cpt",
    "evaluate_router",
    "exact_match",
    "normalize_answer",
    "plot_report",
    "quality_curve",
]


@dataclass(frozen=True)
class CurvePoint:
    """One operating point of the router.

    Attributes:
        threshold: The threshold (``None`` for "never escalate").
        teacher_rate: Fraction of requests sent to the teacher.
        quality: Mean quality with those requests answered by the teacher.
        pgr: Performance gap recovered at this point (``None`` when student and teacher tie).
        oos_recall: Fraction of out-of-scope requests escalated (``None`` without any).
    """

    threshold: float | None
    teacher_rate: float
    quality: float
    pgr: float | None = None
    oos_recall: float | None = None


def _pgr(q: float, weak: float, strong: float) -> float | None:
    gap = strong - weak
    if abs(gap) < 1e-12:
        return None
    return (q - weak) / gap


def quality_curve(
    scores: Sequence[float] | np.ndarray,
    correct: Sequence[float] | np.ndarray,
    *,
    n_thresholds: int = 50,
    teacher_quality: float = 1.0,
    out_of_scope: Sequence[bool] | np.ndarray | None = None,
) -> list[CurvePoint]:
    """Quality vs teacher-call rate over at least ``n_thresholds`` thresholds.

    Thresholds are the union of ``n_thresholds`` evenly spaced values in [0, 1] and the same number
    of score quantiles (so the curve is dense where the scores are), plus the "never escalate"
    point. A request escalates when its score is at or above the threshold.

    Args:
        scores: Escalation scores.
        correct: Student correctness per request (0/1 or graded).
        n_thresholds: Thresholds to sweep (at least 20 is sensible).
        teacher_quality: Quality credited to an escalated request.
        out_of_scope: Marks out-of-scope requests, for ``oos_recall``.

    Returns:
        Points sorted by teacher-call rate.
    """
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1 or s.size == 0:
        msg = f"scores and correct must be equal-length non-empty lists, got {s.shape}, {c.shape}"
        raise ConfigError(msg)
    oos = None if out_of_scope is None else np.asarray(out_of_scope, dtype=bool)
    has_oos = oos is not None and bool(oos.any())
    weak, strong = float(c.mean()), float(teacher_quality)
    grid = np.linspace(0.0, 1.0, max(2, n_thresholds))
    thresholds = np.unique(np.concatenate([grid, np.quantile(s, grid)]))
    points: list[CurvePoint] = []
    for t in thresholds:
        esc = s >= t
        q = float(np.where(esc, strong, c).mean())
        recall = float(esc[oos].mean()) if has_oos and oos is not None else None
        points.append(CurvePoint(float(t), float(esc.mean()), q, _pgr(q, weak, strong), recall))
    points.append(CurvePoint(None, 0.0, weak, _pgr(weak, weak, strong), 0.0 if has_oos else None))
    points.sort(key=lambda p: (p.teacher_rate, p.quality))
    return points


def _frontier(points: Sequence[CurvePoint]) -> tuple[np.ndarray, np.ndarray]:
    """Rates and qualities with one point per rate (the best), sorted by rate, spanning [0, 1]."""
    best: dict[float, float] = {}
    for p in points:
        r = round(p.teacher_rate, 12)
        best[r] = max(best.get(r, -math.inf), p.quality)
    rates = np.array(sorted(best))
    quals = np.array([best[r] for r in sorted(best)])
    return rates, quals


def _endpoints(points: Sequence[CurvePoint]) -> tuple[float, float]:
    rates, quals = _frontier(points)
    if rates[0] > 1e-12 or rates[-1] < 1.0 - 1e-12:
        msg = "the curve must include 0 % and 100 % teacher calls; build it with quality_curve()"
        raise ConfigError(msg)
    return float(quals[0]), float(quals[-1])


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(((y[1:] + y[:-1]) * (x[1:] - x[:-1])).sum() / 2.0)


def apgr(points: Sequence[CurvePoint]) -> float | None:
    """Average performance gap recovered (RouteLLM): area under PGR vs teacher-call rate.

    ``None`` when the student already matches the teacher (no gap to recover).
    """
    weak, strong = _endpoints(points)
    if abs(strong - weak) < 1e-12:
        return None
    rates, quals = _frontier(points)
    return (_trapezoid(quals, rates) - weak) / (strong - weak)


def cpt(points: Sequence[CurvePoint], fraction: float) -> float | None:
    """Call-performance threshold (RouteLLM): the least teacher-call rate reaching ``fraction`` PGR.

    Args:
        points: A curve from :func:`quality_curve`.
        fraction: The PGR to reach, e.g. 0.5 for CPT(50%).

    Returns:
        The teacher-call rate (linear interpolation between measured points), or ``None`` when
        there is no gap to recover.
    """
    if not 0.0 <= fraction <= 1.0:
        msg = f"fraction must be in [0, 1], got {fraction!r}"
        raise ConfigError(msg)
    weak, strong = _endpoints(points)
    if abs(strong - weak) < 1e-12:
        return None
    rates, quals = _frontier(points)
    target = weak + fraction * (strong - weak)
    for i, (r, q) in enumerate(zip(rates, quals, strict=True)):
        if q >= target - 1e-12:
            if i == 0:
                return float(r)
            r0, q0 = rates[i - 1], quals[i - 1]
            if q0 >= target or q == q0:
                return float(r)
            return float(r0 + (target - q0) * (r - r0) / (q - q0))
    return 1.0


def auroc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> float | None:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (ties count half).

    ``None`` when only one class is present.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


@dataclass
class RouterReport:
    """Everything :func:`evaluate_router` measures; ``to_dict()`` is what the CLI writes as JSON.

    Attributes:
        router: Policy kind (``"default"`` or ``"learned"``).
        mode: Routing mode evaluated.
        n: Requests.
        n_out_of_scope: Requests the traces mark out of scope.
        threshold: The router's threshold.
        student_quality: Quality with no teacher calls.
        teacher_quality: Quality credited to teacher answers.
        curve: Quality vs teacher-call rate.
        apgr: Average performance gap recovered.
        cpt: ``{"50": rate, "80": rate, "95": rate}``.
        at_threshold: Teacher rate, quality and out-of-scope recall at the router's threshold.
        signal_auroc: Per-signal AUROC for predicting a student error (risk direction), ``None``
            when the signal is absent everywhere or only one class is present.
        router_auroc: AUROC of the combined score.
        overhead_ms: Router overhead percentiles, embedding included and excluded.
    """

    router: str
    mode: str
    n: int
    n_out_of_scope: int
    threshold: float
    student_quality: float
    teacher_quality: float
    curve: list[CurvePoint]
    apgr: float | None
    cpt: dict[str, float | None]
    at_threshold: dict[str, float | None]
    signal_auroc: dict[str, float | None]
    router_auroc: float | None
    overhead_ms: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["curve"] = [asdict(p) for p in self.curve]
        return d


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def evaluate_router(
    router: Router,
    examples: Sequence[RoutedExample],
    *,
    mode: Mode = "auto",
    n_thresholds: int = 50,
    teacher_quality: float = 1.0,
) -> RouterReport:
    """Evaluate a router on held-out examples whose student correctness is known.

    Args:
        router: The policy (its threshold gives the ``at_threshold`` numbers).
        examples: Held-out examples (see :func:`collect_examples`).
        mode: Routing mode to simulate.
        n_thresholds: Thresholds swept for the curve (at least 20 is sensible).
        teacher_quality: Quality credited to a teacher answer.

    Raises:
        ConfigError: no examples.
    """
    if not examples:
        msg = "evaluation needs examples; got none"
        raise ConfigError(msg)
    s = router.scores(examples, mode)
    c = np.array([float(e.student_correct) for e in examples])
    oos = np.array([bool(e.out_of_scope) for e in examples])
    errors = c < 0.5
    curve = quality_curve(
        s, c, n_thresholds=n_thresholds, teacher_quality=teacher_quality, out_of_scope=oos
    )
    esc = s >= router.threshold
    at = {
        "threshold": router.threshold,
        "teacher_rate": float(esc.mean()),
        "quality": float(np.where(esc, teacher_quality, c).mean()),
        "pgr": _pgr(
            float(np.where(esc, teacher_quality, c).mean()), float(c.mean()), teacher_quality
        ),
        "oos_recall": float(esc[oos].mean()) if oos.any() else None,
        "in_scope_quality": float(np.where(esc, teacher_quality, c)[~oos].mean())
        if (~oos).any()
        else None,
        "student_accuracy_in_scope": float(c[~oos].mean()) if (~oos).any() else None,
    }
    per_signal: dict[str, float | None] = {}
    for spec in router.signals:
        vals, labs = [], []
        for e, err in zip(examples, errors, strict=True):
            v = e.signals.get(spec.name)
            if v is None or spec.name in e.failed or not math.isfinite(float(v)):
                continue
            vals.append(float(v) if spec.higher_is_riskier else -float(v))
            labs.append(bool(err))
        per_signal[spec.name] = auroc(vals, labs) if vals else None
    total = [e.overhead_ms for e in examples if e.overhead_ms is not None]
    excl = [e.overhead_ms - (e.embedding_ms or 0.0) for e in examples if e.overhead_ms is not None]
    overhead = {
        "p50": _percentile(total, 50),
        "p95": _percentile(total, 95),
        "p50_excluding_embedding": _percentile(excl, 50),
        "p95_excluding_embedding": _percentile(excl, 95),
        "n": float(len(total)),
    }
    return RouterReport(
        router=router.kind,
        mode=mode,
        n=len(examples),
        n_out_of_scope=int(oos.sum()),
        threshold=router.threshold,
        student_quality=float(c.mean()),
        teacher_quality=float(teacher_quality),
        curve=curve,
        apgr=apgr(curve),
        cpt={k: cpt(curve, int(k) / 100.0) for k in ("50", "80", "95")},
        at_threshold=at,
        signal_auroc=per_signal,
        router_auroc=auroc(s, errors),
        overhead_ms=overhead,
    )


def plot_report(
    reports: RouterReport | Sequence[RouterReport],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str = "Router: quality vs teacher calls",
) -> Path:
    """Draw quality vs teacher-call rate (and out-of-scope recall) to a PNG file.

    Args:
        reports: One report or several to compare on the same axes.
        path: Output PNG.
        labels: Legend label per report (default: ``router/mode``).
        title: Figure title.
    """
    from langchain_understudy._extras import pyplot

    plt = pyplot()

    rs = [reports] if isinstance(reports, RouterReport) else list(reports)
    names = list(labels) if labels is not None else [f"{r.router}/{r.mode}" for r in rs]
    has_oos = any(r.n_out_of_scope for r in rs)
    fig, axes = plt.subplots(1, 2 if has_oos else 1, figsize=(12 if has_oos else 7, 5))
    ax = axes[0] if has_oos else axes
    for r, name in zip(rs, names, strict=True):
        rates, quals = _frontier(r.curve)
        ax.plot(rates * 100, quals, marker=".", label=f"{name} (APGR {_f(r.apgr)})")
        ax.scatter(
            [float(r.at_threshold["teacher_rate"] or 0.0) * 100],
            [float(r.at_threshold["quality"] or 0.0)],
            marker="*",
            s=160,
            zorder=5,
        )
    r0 = rs[0]
    ax.axhline(r0.student_quality, color="grey", linestyle="--", label="student only")
    ax.axhline(r0.teacher_quality, color="red", linestyle="--", label="teacher only")
    ax.plot(
        [0, 100],
        [r0.student_quality, r0.teacher_quality],
        color="black",
        linestyle=":",
        label="random routing",
    )
    ax.set_xlabel("teacher calls (%)")
    ax.set_ylabel("quality")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if has_oos:
        ax2 = axes[1]
        for r, name in zip(rs, names, strict=True):
            pts = [p for p in r.curve if p.oos_recall is not None]
            pts.sort(key=lambda p: p.teacher_rate)
            ax2.plot(
                [p.teacher_rate * 100 for p in pts],
                [p.oos_recall for p in pts],
                marker=".",
                label=name,
            )
        ax2.set_xlabel("teacher calls (%)")
        ax2.set_ylabel("out-of-scope recall")
        ax2.set_title("Out-of-scope requests sent to the teacher")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Casefold, collapse whitespace, strip surrounding quotes and final punctuation."""
    t = _SPACES.sub(" ", text).strip().casefold()
    t = t.strip("\"'`")
    return t.rstrip(".!").strip()


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answers are equal after :func:`normalize_answer`, else 0.0."""
    return 1.0 if normalize_answer(answer) == normalize_answer(reference) else 0.0


def collect_examples(
    understudy: ChatUnderstudy,
    conversations: Sequence[Sequence[BaseMessage]],
    references: Sequence[str],
    *,
    out_of_scope: Sequence[bool] | None = None,
    match: Callable[[str, str], float] = exact_match,
    progress: Callable[[int], Any] | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
) -> list[RoutedExample]:
    """Run the student and every signal on held-out conversations; never calls the teacher.

    Args:
        understudy: Provides the student, knowledge store, index and router signals.
        conversations: Prompts (the teacher's answer removed).
        references: The teacher's recorded answer to each.
        out_of_scope: Marks out-of-scope conversations.
        match: Scores a student answer against the reference, in [0, 1].
        progress: Called with 1 after each conversation (e.g. ``tqdm.update``).
        student_kwargs: Extra per-call options for the student (``max_tokens``, ...).

    Returns:
        One :class:`~.policy.RoutedExample` per conversation.
    """
    if len(conversations) != len(references):
        msg = (
            f"got {len(conversations)} conversations but {len(references)} references; "
            "they must pair up"
        )
        raise ConfigError(msg)
    flags = list(out_of_scope) if out_of_scope is not None else [False] * len(conversations)
    out: list[RoutedExample] = []
    for convo, ref, oos in zip(conversations, references, flags, strict=True):
        ins = understudy.inspect(convo, **dict(student_kwargs or {}))
        answer = message_text(ins.answer) if ins.answer is not None else ""
        out.append(ins.to_example(match(answer, ref), out_of_scope=bool(oos)))
        if progress is not None:
            progress(1)
    return out
