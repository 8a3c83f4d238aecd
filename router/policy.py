"""``Router``: turn routing signals into one escalation score and compare it with a threshold.

Two policies share one interface:

* :class:`Router` (the default) is transparent. Each signal is mapped to a *risk* in [0, 1] (by
  a documented ramp, or, once :meth:`Router.fit` has seen held-out examples, by a per-signal
  logistic calibration that estimates the probability that the student is wrong given that signal
  alone). The score is the largest risk, and the reason names the signal that set it: "escalated
  because ``ood_distance`` = 0.71 gives risk 0.93".
* :class:`LearnedRouter` fits a logistic regression on all signals jointly (numpy, weights stored as
  JSON) and usually separates better at the cost of a less obvious reason.

Whatever the policy, a signal that raises or returns garbage (NaN, infinity, outside its range)
forces the score to 1 and the reason says which signal failed; an *always* rule does the same.
Thresholds are calibrated on held-out examples to a target teacher-call rate or a target quality
(:meth:`Router.calibrate`).

Example:
    >>> from langchain_core.messages import HumanMessage
    >>> from langchain_understudy.router.signals import RoutingContext
    >>> router = Router(threshold=0.5)
    >>> d = router.decide(RoutingContext([HumanMessage("What does Pro cost?")]), "pre")
    >>> d.escalate, d.score
    (False, 0.0)
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from langchain_understudy.errors import ConfigError
from langchain_understudy.router._logistic import fit_logistic, sigmoid
from langchain_understudy.router.signals import (
    DEFAULT_SIGNALS,
    MAX_RAMP_RISK,
    TOOL_SIGNALS,
    RoutingContext,
    RoutingRules,
    SignalAbsent,
    SignalSpec,
)

__all__ = [
    "Decision",
    "LearnedRouter",
    "Mode",
    "RoutedExample",
    "Router",
    "SignalReading",
    "Stage",
    "TeacherRateController",
    "load_router",
    "threshold_for_quality",
    "threshold_for_teacher_rate",
]

Stage = Literal["pre", "post", "cascade"]
"""``pre``: signals known before generation; ``post``: all signals; ``cascade``: only the signals
that need the student's answer."""
Mode = Literal["pre", "cascade", "auto"]
"""``pre`` decides before generating, ``cascade`` after, ``auto`` both (escalate if either says so)."""

_FORMAT = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignalReading:
    """Signal values for one request at one stage.

    Attributes:
        values: Valid raw values by signal name.
        absent: Signals that did not apply, with the reason.
        failed: Signals that raised or returned garbage, with the reason.
        elapsed_ms: Time spent computing the signals read now (reused values excluded),
            embedding included.
        embedding_ms: Time spent in the embedding call.
    """

    values: dict[str, float]
    absent: dict[str, str]
    failed: dict[str, str]
    elapsed_ms: float = 0.0
    embedding_ms: float = 0.0

    @classmethod
    def of(cls, decision: Decision) -> SignalReading:
        """The signal values a decision was made on (for reuse at a later stage)."""
        return cls(dict(decision.signals), dict(decision.absent), dict(decision.failed))


@dataclass(frozen=True)
class Decision:
    """One routing decision.

    Attributes:
        escalate: ``True`` sends the request to the teacher.
        score: The escalation score in [0, 1].
        threshold: The threshold it was compared with (escalate when ``score >= threshold``).
        stage: ``"pre"``, ``"post"`` or ``"cascade"``.
        reason: Human-readable explanation naming the deciding signals or rule.
        deciding: Names of the signals that set the score.
        signals: Raw signal values.
        risks: Per-signal risk (default policy) or contribution to the log-odds (learned policy).
        absent: Signals that did not apply, with the reason.
        failed: Signals that failed, with the reason.
        rule: The *always* rule that matched, if any.
        forbidden: The *never* rule that matched, if any (escalation is then not allowed).
        elapsed_ms: Router overhead of this decision (signals read now, rules, scoring),
            embedding included.
        embedding_ms: Part of ``elapsed_ms`` spent embedding the query.
    """

    escalate: bool
    score: float
    threshold: float
    stage: str
    reason: str
    deciding: tuple[str, ...] = ()
    signals: dict[str, float] = field(default_factory=dict)
    risks: dict[str, float] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rule: str | None = None
    forbidden: str | None = None
    elapsed_ms: float = 0.0
    embedding_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["deciding"] = list(self.deciding)
        return d


@dataclass
class RoutedExample:
    """A held-out request with known student correctness, for fitting, calibration and evaluation.

    Attributes:
        signals: Raw signal values by name (all stages); ``None`` for an absent signal.
        student_correct: 1 when the student's answer matched the teacher's, 0 otherwise (a
            fraction for graded quality).
        out_of_scope: The traces mark this request as out of scope.
        failed: Names of signals that failed on this request.
        overhead_ms: Router overhead measured for this request, embedding included.
        embedding_ms: The embedding part of ``overhead_ms``.
    """

    signals: Mapping[str, float | None]
    student_correct: float
    out_of_scope: bool = False
    failed: tuple[str, ...] = ()
    overhead_ms: float | None = None
    embedding_ms: float | None = None


def _check_value(spec: SignalSpec, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        msg = f"returned {type(value).__name__} {value!r}, not a number"
        raise ValueError(msg)
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        msg = f"returned {v}"
        raise ValueError(msg)
    lo, hi = spec.valid
    if not lo <= v <= hi:
        msg = f"returned {v:g}, outside its range [{lo:g}, {hi:g}]"
        raise ValueError(msg)
    return v


def _unit(value: float, name: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        msg = f"{name} must be in [0, 1], got {value!r}"
        raise ConfigError(msg)
    return v


def _fmt(v: float) -> str:
    return f"{v:.3g}"


class Router:
    """The transparent default policy: the score is the largest per-signal risk.

    Args:
        threshold: Escalate when the score is at or above it, in [0, 1].
        signals: The signals to compute (default: :data:`~.signals.DEFAULT_SIGNALS`).
        calibration: Per-signal logistic calibration ``{name: (a, b)}``, risk
            ``= sigmoid(a * value + b)``; signals without one use their default ramp. Set by
            :meth:`fit`.
        rules: Always/never rules (default: none).

    Example:
        >>> router = Router(threshold=0.4)
        >>> router.risk("student_confidence", 0.9), router.risk("student_confidence", 0.2)
        (0.0, 0.99)
    """

    kind = "default"

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        signals: Sequence[SignalSpec] = DEFAULT_SIGNALS,
        calibration: Mapping[str, tuple[float, float]] | None = None,
        rules: RoutingRules | None = None,
    ) -> None:
        self.threshold = threshold
        self.signals = tuple(signals)
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            msg = f"signal names must be unique, got {names}"
            raise ConfigError(msg)
        self.calibration: dict[str, tuple[float, float]] = {
            k: (float(a), float(b)) for k, (a, b) in (calibration or {}).items()
        }
        self.rules = rules or RoutingRules()

    # -- configuration -----------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """Escalate when the score is at or above this value."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = _unit(value, "threshold")

    @classmethod
    def from_settings(cls, settings: Any) -> Router:
        """Build the router a :class:`~langchain_understudy.config.RouterSettings` describes.

        When the settings name a saved policy file (a ``policy`` field), it is loaded with its
        calibrated threshold; the settings' rules apply on top, and their threshold too when it
        is set explicitly (in the file or the environment).
        """
        rules = RoutingRules(
            always_teacher_patterns=settings.always_teacher_patterns,
            never_teacher_patterns=settings.never_teacher_patterns,
            always_teacher_tags=getattr(settings, "always_teacher_tags", ()) or (),
        )
        policy = getattr(settings, "policy", None)
        router = load_router(policy) if policy else Router()
        router.rules = rules
        if not policy or "threshold" in getattr(settings, "model_fields_set", {"threshold"}):
            router.threshold = settings.threshold
        return router

    def stage_signals(self, stage: Stage) -> tuple[SignalSpec, ...]:
        """The signals used at ``stage``."""
        if stage == "pre":
            return tuple(s for s in self.signals if s.stage == "pre")
        if stage == "cascade":
            return tuple(s for s in self.signals if s.stage == "post")
        if stage == "post":
            return self.signals
        msg = f"stage must be 'pre', 'post' or 'cascade', got {stage!r}"
        raise ConfigError(msg)

    # -- reading and scoring -------------------------------------------------------------------------
    def read(
        self, ctx: RoutingContext, stage: Stage, *, reuse: SignalReading | None = None
    ) -> SignalReading:
        """Compute the signals of ``stage``; a failure is recorded, never raised.

        Args:
            ctx: The request.
            stage: Which signals to compute.
            reuse: An earlier reading of the same request whose values are kept as they are.
        """
        t0 = time.perf_counter()
        emb0 = ctx.timings_ms.get("embedding", 0.0)
        values: dict[str, float] = {}
        absent: dict[str, str] = {}
        failed: dict[str, str] = {}
        for spec in self.stage_signals(stage):
            if reuse is not None:
                if spec.name in reuse.values:
                    values[spec.name] = reuse.values[spec.name]
                    continue
                if spec.name in reuse.failed:
                    failed[spec.name] = reuse.failed[spec.name]
                    continue
                if spec.name in reuse.absent and spec.stage == "pre":
                    absent[spec.name] = reuse.absent[spec.name]
                    continue
            try:
                raw = spec.fn(ctx)
            except SignalAbsent as e:
                absent[spec.name] = str(e) or "not applicable"
                continue
            except Exception as e:  # noqa: BLE001 - any failure must escalate, not crash
                failed[spec.name] = f"raised {type(e).__name__}: {e}"
                continue
            try:
                values[spec.name] = _check_value(spec, raw)
            except ValueError as e:
                failed[spec.name] = str(e)
        elapsed = (time.perf_counter() - t0) * 1000.0
        emb = ctx.timings_ms.get("embedding", 0.0) - emb0
        return SignalReading(values, absent, failed, elapsed, emb)

    def risk(self, name: str, value: float) -> float:
        """Risk in [0, 1] of one signal value: calibrated when fitted, else the default ramp.

        Like the ramps, a calibrated risk stays at or below :data:`~.signals.MAX_RAMP_RISK`: a
        score of exactly 1 is kept for rules and failing signals.
        """
        if name in self.calibration:
            a, b = self.calibration[name]
            return min(MAX_RAMP_RISK, float(sigmoid(a * value + b)))
        for spec in self.signals:
            if spec.name == name:
                return spec.default_risk(value)
        msg = f"unknown signal {name!r}"
        raise ConfigError(msg)

    def combine(
        self, values: Mapping[str, float], stage: Stage
    ) -> tuple[float, dict[str, float], tuple[str, ...]]:
        """Combine valid values into ``(score, per-signal risk, deciding signals)``.

        The default policy takes the maximum risk; the deciding signal is the one that set it.
        """
        del stage
        risks = {n: self.risk(n, v) for n, v in values.items()}
        if not risks:
            return 0.0, risks, ()
        top = max(risks.values())
        deciding = tuple(n for n, r in risks.items() if r == top and top > 0.0)
        return float(top), risks, deciding

    def decide(
        self,
        ctx: RoutingContext,
        stage: Stage,
        *,
        reuse: SignalReading | None = None,
        threshold: float | None = None,
    ) -> Decision:
        """Read the signals of ``stage``, apply the rules and decide.

        Args:
            ctx: The request.
            stage: ``"pre"`` before generation, ``"post"`` after it (all signals), or
                ``"cascade"`` (only the signals that need the student's answer).
            reuse: An earlier reading of the same request (its values are not recomputed).
            threshold: Compare with this threshold instead of :attr:`threshold` (a
                :class:`TeacherRateController` steering it online); the policy is not changed.
        """
        reading = self.read(ctx, stage, reuse=reuse)
        t0 = time.perf_counter()
        forbidden = self.rules.never(ctx)
        rule = self.rules.always(ctx)
        t = self.threshold if threshold is None else _unit(threshold, "threshold")
        risks: dict[str, float] = {}
        deciding: tuple[str, ...] = ()
        if reading.failed:
            score, escalate = 1.0, True
            deciding = tuple(reading.failed)
            reason = "; ".join(f"signal {n} failed: {why}" for n, why in reading.failed.items())
            reason += " (a failing signal escalates)"
        elif rule is not None:
            score, escalate, reason = 1.0, True, f"rule: {rule}"
        else:
            score, risks, deciding = self.combine(reading.values, stage)
            score = float(min(1.0, max(0.0, score)))
            escalate = score >= t
            reason = self._reason(reading.values, risks, deciding, score, escalate, t)
        elapsed = reading.elapsed_ms + (time.perf_counter() - t0) * 1000.0
        return Decision(
            escalate=escalate,
            score=score,
            threshold=t,
            stage=stage,
            reason=reason,
            deciding=deciding,
            signals=dict(reading.values),
            risks=risks,
            absent=dict(reading.absent),
            failed=dict(reading.failed),
            rule=rule,
            forbidden=forbidden,
            elapsed_ms=elapsed,
            embedding_ms=reading.embedding_ms,
        )

    def _reason(
        self,
        values: Mapping[str, float],
        risks: Mapping[str, float],
        deciding: tuple[str, ...],
        score: float,
        escalate: bool,
        t: float,
    ) -> str:
        if not values:
            return f"no signal applies; score 0 {'≥' if escalate else '<'} threshold {t:.2f}"
        parts = ", ".join(
            f"{n}={_fmt(values[n])} (risk {_fmt(risks[n])})" for n in deciding if n in values
        )
        if escalate:
            return f"{parts or 'score'} ≥ threshold {t:.2f}"
        head = f"score {score:.2f} < threshold {t:.2f}"
        return f"{head}; highest: {parts}" if parts else head

    # -- offline: scores, fitting, calibration -------------------------------------------------------
    def example_score(self, example: RoutedExample, stage: Stage) -> float:
        """Score of a held-out example at ``stage`` (failed or garbage signals give 1)."""
        specs = self.stage_signals(stage)
        values: dict[str, float] = {}
        for spec in specs:
            if spec.name in example.failed:
                return 1.0
            raw = example.signals.get(spec.name)
            if raw is None:
                continue
            try:
                values[spec.name] = _check_value(spec, raw)
            except ValueError:
                return 1.0
        score, _, _ = self.combine(values, stage)
        return float(min(1.0, max(0.0, score)))

    def scores(self, examples: Sequence[RoutedExample], mode: Mode = "auto") -> np.ndarray:
        """Escalation scores of held-out examples as the router would see them in ``mode``.

        In ``auto`` mode a request escalates when either stage says so, which is the same as
        comparing the larger of the two scores with the threshold.
        """
        if mode == "pre":
            return np.array([self.example_score(e, "pre") for e in examples], dtype=np.float64)
        if mode == "cascade":
            return np.array([self.example_score(e, "cascade") for e in examples], dtype=np.float64)
        if mode == "auto":
            return np.array(
                [
                    max(self.example_score(e, "pre"), self.example_score(e, "post"))
                    for e in examples
                ],
                dtype=np.float64,
            )
        msg = f"mode must be 'pre', 'cascade' or 'auto', got {mode!r}"
        raise ConfigError(msg)

    def fit(self, examples: Sequence[RoutedExample], *, l2: float = 1.0) -> Router:
        """Calibrate each signal's risk to P(student wrong | signal) on held-out examples.

        Each signal gets a 1-D logistic fit on the examples where it is present. A fit whose
        slope points the wrong way (e.g. higher confidence, more errors) is flattened to the base
        error rate, so every risk stays monotone in the documented direction. Returns ``self``.
        """
        y_all = np.array([1.0 - float(e.student_correct) for e in examples], dtype=np.float64)
        for spec in self.signals:
            xs, ys = [], []
            for e, y in zip(examples, y_all, strict=True):
                raw = e.signals.get(spec.name)
                if raw is None or spec.name in e.failed:
                    continue
                try:
                    xs.append(_check_value(spec, raw))
                except ValueError:
                    continue
                ys.append(y)
            if len(xs) < 2:
                continue
            x = np.array(xs)
            y = np.array(ys)
            mu, sd = float(x.mean()), float(x.std())
            if sd < 1e-12:
                w, b = fit_logistic(np.zeros((len(x), 0)), y, l2=l2)
                self.calibration[spec.name] = (0.0, b)
                continue
            w, b = fit_logistic(((x - mu) / sd)[:, None], y, l2=l2)
            a = float(w[0]) / sd
            b0 = b - float(w[0]) * mu / sd
            if (a > 0) != spec.higher_is_riskier and a != 0.0:
                _, b_flat = fit_logistic(np.zeros((len(x), 0)), y, l2=l2)
                a, b0 = 0.0, b_flat
            self.calibration[spec.name] = (a, float(b0))
        return self

    def calibrate(
        self,
        examples: Sequence[RoutedExample],
        *,
        target_teacher_rate: float | None = None,
        target_quality: float | None = None,
        mode: Mode = "auto",
        teacher_quality: float = 1.0,
    ) -> float:
        """Set :attr:`threshold` from held-out examples and return it.

        Exactly one target must be given:

        * ``target_teacher_rate``: the lowest threshold whose teacher-call rate is at most the
          target (the best quality the budget allows);
        * ``target_quality``: the highest threshold whose quality (teacher answers count as
          ``teacher_quality``, student answers as their correctness) is at least the target (the
          fewest teacher calls that reach it).

        Raises:
            ConfigError: no target, both targets, a target out of range, or no examples.
        """
        if (target_teacher_rate is None) == (target_quality is None):
            msg = "give exactly one of target_teacher_rate or target_quality"
            raise ConfigError(msg)
        if not examples:
            msg = "calibration needs held-out examples; got none"
            raise ConfigError(msg)
        s = self.scores(examples, mode)
        if target_teacher_rate is not None:
            t = threshold_for_teacher_rate(s, target_teacher_rate)
            reached = float((s >= t).mean())
            if reached > target_teacher_rate + 1e-12:
                logger.warning(
                    "target teacher rate %.3f is out of reach: %.1f%% of the examples score 1.0 "
                    "(rules, failing signals or saturated risks); the lowest rate is %.3f",
                    target_teacher_rate,
                    100 * float((s >= 1.0).mean()),
                    reached,
                )
        else:
            correct = np.array([float(e.student_correct) for e in examples])
            t = threshold_for_quality(
                s, correct, float(target_quality or 0.0), teacher_quality=teacher_quality
            )
        self.threshold = t
        return t

    # -- persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the policy as a JSON-ready dict (no pickle anywhere)."""
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "threshold": self.threshold,
            "signals": [s.name for s in self.signals],
            "calibration": {k: list(v) for k, v in self.calibration.items()},
            "rules": self.rules.to_dict(),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, extra_signals: Iterable[SignalSpec] = ()
    ) -> Router:
        """Rebuild a policy saved by :meth:`to_dict` (dispatching on its ``kind``).

        Args:
            data: The saved dict.
            extra_signals: Custom signals the saved policy names besides the built-in ones
                (:data:`~.signals.DEFAULT_SIGNALS` and :data:`~.signals.TOOL_SIGNALS`).
        """
        if data.get("format") != _FORMAT:
            msg = f"not a router policy of format {_FORMAT}: {str(dict(data))[:120]}"
            raise ConfigError(msg)
        known = {s.name: s for s in (*DEFAULT_SIGNALS, *TOOL_SIGNALS, *extra_signals)}
        try:
            specs = [known[n] for n in data["signals"]]
        except KeyError as e:
            msg = f"router policy uses unknown signal {e}; pass it as extra_signals"
            raise ConfigError(msg) from e
        rules = RoutingRules(**data.get("rules", {}))
        calibration = {
            k: (float(v[0]), float(v[1])) for k, v in data.get("calibration", {}).items()
        }
        kind = data.get("kind", "default")
        if kind == "default":
            return Router(
                threshold=data["threshold"], signals=specs, calibration=calibration, rules=rules
            )
        if kind == "learned":
            return LearnedRouter(
                threshold=data["threshold"], signals=specs, rules=rules, models=data["models"]
            )
        msg = f"router policy kind must be 'default' or 'learned', got {kind!r}"
        raise ConfigError(msg)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the policy as JSON (atomically) and return the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Router:
        """Load a policy saved by :meth:`save`."""
        return load_router(path)

    def __repr__(self) -> str:
        names = [s.name for s in self.signals]
        return f"{type(self).__name__}(threshold={self.threshold:.3g}, signals={names})"


class LearnedRouter(Router):
    """A logistic regression over all signals, fitted on held-out examples with known correctness.

    One model per stage (``pre``, ``post``, ``cascade``), each over the signals of that stage,
    standardised; an absent signal is imputed with its training mean (a zero contribution). The
    score is the predicted probability that the student is wrong. Weights are stored as JSON.

    Args:
        threshold: Escalate when the score is at or above it.
        signals: The signals to compute.
        rules: Always/never rules.
        models: Fitted models as saved by :meth:`to_dict` (``None``: call :meth:`fit`).

    Example:
        >>> from langchain_understudy.router.policy import RoutedExample
        >>> ex = [RoutedExample({"student_confidence": c}, c > 0.5) for c in (0.1, 0.3, 0.7, 0.9)]
        >>> r = LearnedRouter().fit(ex)
        >>> r.example_score(ex[0], "cascade") > r.example_score(ex[-1], "cascade")
        True
    """

    kind = "learned"

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        signals: Sequence[SignalSpec] = DEFAULT_SIGNALS,
        rules: RoutingRules | None = None,
        models: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(threshold=threshold, signals=signals, rules=rules)
        self.models: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (models or {}).items()}

    def fit(self, examples: Sequence[RoutedExample], *, l2: float = 1.0) -> LearnedRouter:
        """Fit one logistic regression per stage on held-out examples; returns ``self``."""
        y = np.array([1.0 - float(e.student_correct) for e in examples], dtype=np.float64)
        stages: tuple[Stage, ...] = ("pre", "post", "cascade")
        for stage in stages:
            feats = [
                s.name
                for s in self.stage_signals(stage)
                if any(_finite(e.signals.get(s.name)) for e in examples)
            ]
            x = np.full((len(examples), len(feats)), np.nan)
            for i, e in enumerate(examples):
                for j, f in enumerate(feats):
                    v = e.signals.get(f)
                    if _finite(v):
                        x[i, j] = float(v)  # type: ignore[arg-type]
            mean = np.nanmean(x, axis=0) if feats else np.zeros(0)
            x = np.where(np.isnan(x), mean, x)
            std = x.std(axis=0) if feats else np.zeros(0)
            std = np.where(std < 1e-12, 1.0, std)
            w, b = fit_logistic((x - mean) / std, y, l2=l2)
            self.models[stage] = {
                "features": feats,
                "mean": [float(v) for v in mean],
                "std": [float(v) for v in std],
                "weights": [float(v) for v in w],
                "bias": float(b),
            }
        return self

    def combine(
        self, values: Mapping[str, float], stage: Stage
    ) -> tuple[float, dict[str, float], tuple[str, ...]]:
        """Predicted error probability; risks are per-signal contributions to the log-odds."""
        model = self.models.get(stage)
        if model is None:
            msg = f"LearnedRouter has no '{stage}' model; call fit(examples) or load a fitted one"
            raise ConfigError(msg)
        contrib: dict[str, float] = {}
        z = float(model["bias"])
        for f, m, s, w in zip(
            model["features"], model["mean"], model["std"], model["weights"], strict=True
        ):
            v = values.get(f)
            c = 0.0 if v is None else float(w) * (float(v) - float(m)) / float(s)
            contrib[f] = c
            z += c
        score = float(sigmoid(z))
        positive = sorted((c, n) for n, c in contrib.items() if c > 0)
        deciding = tuple(n for _, n in reversed(positive[-2:]))
        return score, contrib, deciding

    def _reason(
        self,
        values: Mapping[str, float],
        risks: Mapping[str, float],
        deciding: tuple[str, ...],
        score: float,
        escalate: bool,
        t: float,
    ) -> str:
        parts = ", ".join(
            f"{n}={_fmt(values[n])} (log-odds {risks[n]:+.2f})" for n in deciding if n in values
        )
        rel = "≥" if escalate else "<"
        head = f"P(student wrong)={score:.2f} {rel} threshold {t:.2f}"
        return f"{head}; driven by {parts}" if parts else head

    def to_dict(self) -> dict[str, Any]:
        """Return the policy, weights included, as a JSON-ready dict."""
        d = super().to_dict()
        d["models"] = self.models
        return d


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def load_router(path: str | os.PathLike[str]) -> Router:
    """Load a router policy saved as JSON by :meth:`Router.save`.

    Raises:
        ConfigError: the file is missing or not a router policy.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        msg = f"router policy {p} does not exist; fit one with `understudy router calibrate --fit`"
        raise ConfigError(msg) from e
    except (OSError, ValueError) as e:
        msg = f"router policy {p} is not readable JSON ({e})"
        raise ConfigError(msg) from e
    if not isinstance(data, dict):
        msg = f"router policy {p} must hold a JSON object"
        raise ConfigError(msg)
    return Router.from_dict(data)


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds that split the scores differently: 0, midpoints, and one above the maximum."""
    u = np.unique(np.clip(scores, 0.0, 1.0))
    mids = (u[:-1] + u[1:]) / 2.0 if u.size > 1 else np.zeros(0)
    top = (u[-1] + 1.0) / 2.0 if u.size and u[-1] < 1.0 else 1.0
    return np.unique(np.concatenate([[0.0], mids, [top]]))


def threshold_for_teacher_rate(scores: Sequence[float] | np.ndarray, target: float) -> float:
    """The lowest threshold whose teacher-call rate on ``scores`` is at most ``target``.

    Example:
        >>> threshold_for_teacher_rate([0.1, 0.2, 0.3, 0.9], 0.25)
        0.6
    """
    if not 0.0 <= target <= 1.0:
        msg = f"target teacher rate must be in [0, 1], got {target!r}"
        raise ConfigError(msg)
    s = np.asarray(scores, dtype=np.float64)
    for t in _candidates(s):
        if float((s >= t).mean()) <= target + 1e-12:
            return float(t)
    return 1.0


def threshold_for_quality(
    scores: Sequence[float] | np.ndarray,
    correct: Sequence[float] | np.ndarray,
    target: float,
    *,
    teacher_quality: float = 1.0,
) -> float:
    """The highest threshold whose quality is at least ``target``.

    Quality is the mean over examples of ``teacher_quality`` when escalated and the student's
    correctness otherwise.

    Raises:
        ConfigError: the target is out of [0, 1] or above what always asking the teacher gets.

    Example:
        >>> threshold_for_quality([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 1], 0.99)
        0.5
    """
    if not 0.0 <= target <= 1.0:
        msg = f"target quality must be in [0, 1], got {target!r}"
        raise ConfigError(msg)
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    best: float | None = None
    for t in _candidates(s):
        q = float(np.where(s >= t, teacher_quality, c).mean())
        if q >= target - 1e-12:
            best = float(t)
    if best is None:
        msg = (
            f"target quality {target} is above what always asking the teacher reaches "
            f"({teacher_quality}); lower the target"
        )
        raise ConfigError(msg)
    return best


class TeacherRateController:
    """Steers the escalation threshold online so the teacher-call rate holds its target.

    A threshold calibrated offline holds its teacher-call rate only while live traffic looks like
    the calibration set; when the mix shifts (more out-of-scope requests, say), the rate drifts
    with it. This controller watches the escalation scores of the last ``window`` requests and
    sets the threshold to the score quantile that sends ``target`` of them to the teacher (the
    rule of :func:`threshold_for_teacher_rate`, applied to live traffic). An integral term on the
    observed rate removes what the quantile cannot see: requests sent up whatever their score
    (a student that fails falls back to the teacher) and requests escalated before generation,
    whose later score is never read.

    It counts the requests the router *asked* to escalate, whether or not the teacher could be
    called: the per-minute and per-day budgets of
    :class:`~langchain_understudy.router.teachers.ResilientTeacher` stay hard caps on top, and
    neither they nor the privacy rules wind the controller up when they refuse calls. Until
    ``min_requests`` requests have been seen, the router's own (calibrated) threshold holds.
    Thread-safe.

    Args:
        target: The teacher-call rate to hold, in (0, 1).
        window: Requests the quantile and the observed rate are taken over.
        min_requests: Requests seen before steering starts (at most ``window``).
        gain: Integral gain: a rate error held for ``window`` requests moves the quantile level
            by ``gain`` times that error. ``0`` turns the integral term off.
        bounds: Lowest and highest threshold it may set (a floor keeps quality when traffic
            turns hard; the budgets still cap spending).

    Example:
        >>> c = TeacherRateController(0.2, window=100, min_requests=100)
        >>> for i in range(100):
        ...     _ = c.observe(i / 100, escalated=i >= 80)
        >>> round(c.threshold, 3), c.observed_rate
        (0.795, 0.2)
    """

    def __init__(
        self,
        target: float,
        *,
        window: int = 500,
        min_requests: int = 100,
        gain: float = 0.5,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if not 0.0 < target < 1.0:
            msg = f"target teacher rate must be in (0, 1), got {target!r}"
            raise ConfigError(msg)
        if window < 10:
            msg = f"window must be at least 10 requests, got {window!r}"
            raise ConfigError(msg)
        if not 1 <= min_requests <= window:
            msg = f"min_requests must be in [1, window={window}], got {min_requests!r}"
            raise ConfigError(msg)
        if gain < 0.0:
            msg = f"gain must be >= 0, got {gain!r}"
            raise ConfigError(msg)
        lo, hi = (_unit(b, "bounds") for b in bounds)
        if lo > hi:
            msg = f"bounds must be (low, high) with low <= high, got {bounds!r}"
            raise ConfigError(msg)
        self.target = float(target)
        self.window = int(window)
        self.min_requests = int(min_requests)
        self.gain = float(gain)
        self.bounds = (lo, hi)
        self._lock = threading.Lock()
        self._scores: collections.deque[float] = collections.deque()
        self._sorted: list[float] = []
        self._asked: collections.deque[bool] = collections.deque(maxlen=self.window)
        self._n_asked = 0
        self._seen = 0
        self._bias = 0.0
        self._threshold: float | None = None

    @property
    def threshold(self) -> float | None:
        """The steered threshold, or ``None`` before ``min_requests`` requests were seen."""
        return self._threshold

    @property
    def observed_rate(self) -> float | None:
        """Share of the last ``window`` requests the router asked to escalate."""
        with self._lock:
            return self._n_asked / len(self._asked) if self._asked else None

    @property
    def requests(self) -> int:
        """Requests observed so far."""
        return self._seen

    def observe(self, score: float | None, escalated: bool) -> float | None:
        """Record one routed request and return the threshold for the next ones.

        Args:
            score: Its escalation score (``None`` when no decision was made: only the rate
                counts it).
            escalated: The router asked for the teacher.
        """
        with self._lock:
            if len(self._asked) == self.window and self._asked[0]:
                self._n_asked -= 1
            self._asked.append(bool(escalated))
            self._n_asked += bool(escalated)
            self._seen += 1
            if score is not None and math.isfinite(score):
                s = min(1.0, max(0.0, float(score)))
                self._scores.append(s)
                bisect.insort(self._sorted, s)
                if len(self._scores) > self.window:
                    old = self._scores.popleft()
                    del self._sorted[bisect.bisect_left(self._sorted, old)]
            if self._seen < self.min_requests or not self._sorted:
                return self._threshold
            if self._threshold is not None:
                # integrate only while steering: the rate under the offline threshold is not ours
                err = self.target - float(escalated)
                self._bias = min(
                    1.0 - self.target, max(-self.target, self._bias + self.gain * err / self.window)
                )
            t = _rate_quantile(self._sorted, self.target + self._bias)
            self._threshold = min(self.bounds[1], max(self.bounds[0], t))
            return self._threshold

    def reset(self) -> None:
        """Forget every observation (the router's own threshold holds again)."""
        with self._lock:
            self._scores.clear()
            self._sorted.clear()
            self._asked.clear()
            self._n_asked = self._seen = 0
            self._bias = 0.0
            self._threshold = None

    def state(self) -> dict[str, Any]:
        """Target, threshold, observed rate and requests seen, JSON-ready (for metrics)."""
        return {
            "target": self.target,
            "threshold": self.threshold,
            "observed_rate": self.observed_rate,
            "requests": self.requests,
            "window": self.window,
        }

    def __repr__(self) -> str:
        return (
            f"TeacherRateController(target={self.target:g}, window={self.window}, "
            f"threshold={self.threshold})"
        )


def _rate_quantile(ascending: Sequence[float], rate: float) -> float:
    """The lowest threshold at which at most ``rate`` of the sorted scores escalate.

    The same candidates as :func:`threshold_for_teacher_rate` (0, midpoints between distinct
    scores, one above the largest), found by bisection instead of a scan.
    """
    n = len(ascending)
    allowed = math.floor(min(1.0, max(0.0, rate)) * n + 1e-9)
    if allowed >= n:
        return 0.0
    v = ascending[n - allowed - 1]  # the highest score that must stay below the threshold
    above = bisect.bisect_right(ascending, v)
    if above < n:
        return (v + ascending[above]) / 2.0
    return (v + 1.0) / 2.0 if v < 1.0 else 1.0
