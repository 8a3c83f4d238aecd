"""Live rollouts of a candidate student: shadow, canary and drift watch, with no LangChain adapter.

* **Shadow.** A registered candidate answers the same requests as the serving student, off the
  request's path: :class:`CheckWorker` runs the candidate on one background thread from a bounded
  queue and drops work when the queue is full, so a served answer never waits for it. Each check
  records whether the candidate agreed with the answer that was served (and, on escalated turns,
  with the teacher's).
* **Canary.** A share of the conversations, chosen by a hash of the conversation so every turn of
  one conversation lands on the same side, is served by the candidate. A sample of its turns is
  also put to the teacher in the background, and :class:`CanaryPolicy` promotes the candidate when
  its live figures hold over enough requests, or rolls it back when they fall below the gate.
* **Drift.** :class:`DriftMonitor` compares the routing signals of live traffic (out-of-distribution
  distance, confidence, retrieval similarity) with the ones measured on the student's held-out
  traces (``signal_reference.json``, written by the distillation job) by PSI and the two-sample KS
  statistic, and raises an alarm when a signal's PSI passes a threshold.

Every check is one JSON line in the live log (:class:`LiveLog`, ``live.jsonl`` in the registry by
default), so ``understudy students compare`` and a restarted server read the same figures:
:func:`summarize` turns those lines into agreement rates with Wilson intervals.

Example:
    >>> wilson_interval(45, 50)
    (0.786..., 0.956...)
    >>> summarize([{"kind": "shadow", "candidate": "v2", "agree_served": True}]).get("v2").agreement
    1.0
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage

from langchain_understudy.errors import ConfigError
from langchain_understudy.prompting import message_text
from langchain_understudy.router.evaluation import normalize_answer
from langchain_understudy.students.registry import SIGNAL_REFERENCE_FILE

__all__ = [
    "DRIFT_SIGNALS",
    "CanaryPolicy",
    "CheckWorker",
    "DriftMonitor",
    "LiveLog",
    "LiveSummary",
    "agreement",
    "conversation_key",
    "drift_values",
    "in_canary",
    "ks_critical",
    "ks_statistic",
    "psi",
    "summarize",
    "wilson_interval",
]

logger = logging.getLogger(__name__)

DRIFT_SIGNALS = ("ood_distance", "student_confidence", "retrieval_similarity", "answer_entropy")
"""The values whose live distribution is compared with the held-out one: routing signals, and the
student's answer entropy (``response_metadata["understudy"]["answer_entropy"]``)."""


def drift_values(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The values the drift watch follows, from an answer's metadata or an audit-log record."""
    signals = meta.get("signals")
    out = dict(signals) if isinstance(signals, Mapping) else {}
    out["answer_entropy"] = meta.get("answer_entropy")
    return out


# -- agreement and intervals ------------------------------------------------------------------------
def _calls(message: AIMessage) -> list[tuple[str, str]]:
    return sorted(
        (str(c.get("name")), json.dumps(c.get("args"), sort_keys=True, default=str))
        for c in message.tool_calls
    )


def agreement(a: AIMessage, b: AIMessage) -> bool:
    """Whether two answers say the same: equal text after normalization and equal tool calls.

    The text is compared as the held-out evaluation compares it (case, whitespace, quotes and
    final punctuation do not count); tool calls by name and arguments, in any order.
    """
    if _calls(a) != _calls(b):
        return False
    return normalize_answer(message_text(a)) == normalize_answer(message_text(b))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def conversation_key(messages: Sequence[BaseMessage], tags: Sequence[str] = ()) -> str:
    """A stable key for the conversation a request belongs to.

    A run tag ``conversation:<id>`` wins; otherwise the first user turn (and the system prompt
    before it) identifies the conversation, so every later turn of it gets the same key.
    """
    for t in tags:
        if t.startswith("conversation:"):
            return t
    head: list[str] = []
    for m in messages:
        head.append(f"{m.type}:{message_text(m)}")
        if m.type == "human":
            break
    data = "\x1e".join(head).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def in_canary(key: str, share: float, salt: str = "") -> bool:
    """Whether the conversation ``key`` falls in the canary's ``share`` (deterministic)."""
    digest = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


# -- the live log ----------------------------------------------------------------------------------
class LiveLog:
    """An append-only JSONL file of live checks and rollout events, safe to share across threads.

    Lines that cannot be parsed (a torn last line after a crash, a hand edit) are skipped with a
    warning when read, so one bad line never hides the rest.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record, stamped with the current time."""
        line = json.dumps(
            {"time": datetime.now(UTC).isoformat(), **record}, default=str, sort_keys=True
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def read(self) -> Iterator[dict[str, Any]]:
        """Yield every record, oldest first (nothing when the file does not exist)."""
        try:
            f = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    logger.warning("%s:%d is not a JSON line; skipped", self.path, i)
                    continue
                if isinstance(rec, dict):
                    yield rec


@dataclass
class LiveSummary:
    """Live figures of one candidate, from its checks.

    Attributes:
        candidate: The candidate's version.
        kind: ``"shadow"`` or ``"canary"``.
        n: Checks recorded.
        agreed: Checks where the candidate agreed with the answer that was served (shadow) or with
            the teacher (canary).
        teacher_n: Checks against a teacher answer.
        teacher_agreed: Of those, the ones the candidate agreed with.
        errors: Checks where the candidate failed.
        latency_ms: The candidate's answer times.
        confidence: The candidate's confidences.
    """

    candidate: str
    kind: str
    n: int = 0
    agreed: int = 0
    teacher_n: int = 0
    teacher_agreed: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)

    def add(self, rec: Mapping[str, Any]) -> None:
        """Count one check."""
        self.n += 1
        if rec.get("error"):
            self.errors += 1
        key = "agree_served" if self.kind == "shadow" else "agree_teacher"
        if rec.get(key) is True:
            self.agreed += 1
        if rec.get("agree_teacher") is not None:
            self.teacher_n += 1
            self.teacher_agreed += rec.get("agree_teacher") is True
        if isinstance(rec.get("latency_ms"), int | float):
            self.latency_ms.append(float(rec["latency_ms"]))
        if isinstance(rec.get("confidence"), int | float):
            self.confidence.append(float(rec["confidence"]))

    @property
    def judged(self) -> int:
        """Checks that count for agreement: all (shadow) or those put to the teacher (canary)."""
        return self.n if self.kind == "shadow" else self.teacher_n

    @property
    def agreement(self) -> float | None:
        """Share of the judged checks the candidate agreed on (``None`` before any)."""
        return self.agreed / self.judged if self.judged else None

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of :attr:`agreement`."""
        return wilson_interval(self.agreed, self.judged)

    @property
    def teacher_agreement(self) -> float | None:
        """Share of the teacher checks the candidate agreed on (``None`` before any)."""
        return self.teacher_agreed / self.teacher_n if self.teacher_n else None

    @property
    def error_rate(self) -> float:
        """Share of checks where the candidate failed."""
        return self.errors / self.n if self.n else 0.0

    @property
    def latency_p95_ms(self) -> float | None:
        """95th percentile of the candidate's answer times."""
        s = sorted(self.latency_ms)
        return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] if s else None

    @property
    def mean_confidence(self) -> float | None:
        """Mean confidence of the candidate's answers."""
        return statistics.fmean(self.confidence) if self.confidence else None

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (no per-check lists)."""
        lo, hi = self.interval
        return {
            "candidate": self.candidate,
            "kind": self.kind,
            "n": self.n,
            "judged": self.judged,
            "agreement": self.agreement,
            "agreement_ci95": [round(lo, 4), round(hi, 4)],
            "teacher_n": self.teacher_n,
            "teacher_agreement": self.teacher_agreement,
            "error_rate": self.error_rate,
            "latency_p95_ms": self.latency_p95_ms,
            "mean_confidence": self.mean_confidence,
        }


class _Summaries(dict[str, LiveSummary]):
    def feed(self, rec: Mapping[str, Any]) -> None:
        cand, kind = rec.get("candidate"), rec.get("kind")
        if not isinstance(cand, str) or kind not in ("shadow", "canary"):
            return
        key = f"{kind}:{cand}"
        if key not in self:
            self[key] = LiveSummary(cand, str(kind))
        self[key].add(rec)

    def get(self, candidate: str, kind: str | None = None) -> LiveSummary | None:  # type: ignore[override]
        for k in (kind,) if kind else ("canary", "shadow"):
            s = dict.get(self, f"{k}:{candidate}")
            if s is not None:
                return s
        return None


def summarize(records: Iterable[Mapping[str, Any]], since: str | None = None) -> _Summaries:
    """Aggregate live checks per candidate and kind (``since``: ISO time of the first to count)."""
    out = _Summaries()
    for rec in records:
        if since is not None and str(rec.get("time", "")) < since:
            continue
        out.feed(rec)
    return out


# -- the background worker ----------------------------------------------------------------------------
class CheckWorker:
    """Runs checks on one daemon thread from a bounded queue; never blocks the caller.

    :meth:`submit` returns at once: when the queue is full the check is dropped and counted in
    ``dropped``. A check that raises is logged and counted in ``failed``.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self._q: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=maxsize)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.submitted = 0
        self.dropped = 0
        self.failed = 0

    def submit(self, check: Callable[[], None]) -> bool:
        """Queue ``check``; ``False`` when it was dropped because the queue is full."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="understudy-rollout", daemon=True
                    )
                    self._thread.start()
        try:
            self._q.put_nowait(check)
        except queue.Full:
            self.dropped += 1
            return False
        self.submitted += 1
        return True

    def _loop(self) -> None:
        while True:
            check = self._q.get()
            try:
                check()
            except Exception:  # noqa: BLE001 - a failing check must not stop the worker
                self.failed += 1
                logger.exception("rollout check failed")
            finally:
                self._q.task_done()

    def join(self) -> None:
        """Wait until every submitted check has run."""
        self._q.join()


# -- canary decisions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary is promoted or rolled back, from its live figures.

    The candidate is promoted once ``min_requests`` canary turns and ``min_checks`` teacher checks
    are in and every figure holds: teacher agreement ≥ ``min_agreement``, error rate ≤
    ``max_error_rate``, p95 latency ≤ ``max_latency_p95_ms`` and mean confidence ≥
    ``min_confidence`` (``None``: not checked). It is rolled back as soon as the upper end of the
    agreement's 95% Wilson interval is below ``min_agreement`` (at least 10 checks), or, once the
    counts are in, when any figure fails.
    """

    min_agreement: float = 0.9
    min_checks: int = 50
    min_requests: int = 200
    max_error_rate: float = 0.02
    max_latency_p95_ms: float | None = None
    min_confidence: float | None = None

    def decide(self, s: LiveSummary) -> tuple[Literal["promote", "rollback"] | None, str]:
        """``("promote" | "rollback" | None, why)`` for the canary figures ``s``."""
        lo, hi = s.interval
        if s.teacher_n >= 10 and hi < self.min_agreement:
            return "rollback", (
                f"teacher agreement {s.teacher_agreed}/{s.teacher_n} (95% CI {lo:.3f}-{hi:.3f}) "
                f"is below {self.min_agreement:.3f}"
            )
        if s.n < self.min_requests or s.teacher_n < self.min_checks:
            return None, (
                f"waiting: {s.n}/{self.min_requests} requests, "
                f"{s.teacher_n}/{self.min_checks} teacher checks"
            )
        failures = []
        agree = s.teacher_agreement or 0.0
        if agree < self.min_agreement:
            failures.append(f"teacher agreement {agree:.3f} < {self.min_agreement:.3f}")
        if s.error_rate > self.max_error_rate:
            failures.append(f"error rate {s.error_rate:.3f} > {self.max_error_rate:.3f}")
        p95 = s.latency_p95_ms
        if (
            self.max_latency_p95_ms is not None
            and p95 is not None
            and p95 > self.max_latency_p95_ms
        ):
            failures.append(f"p95 latency {p95:.0f} ms > {self.max_latency_p95_ms:.0f} ms")
        conf = s.mean_confidence
        if self.min_confidence is not None and conf is not None and conf < self.min_confidence:
            failures.append(f"mean confidence {conf:.3f} < {self.min_confidence:.3f}")
        if failures:
            return "rollback", "; ".join(failures)
        return "promote", (
            f"teacher agreement {agree:.3f} over {s.teacher_n} checks, error rate "
            f"{s.error_rate:.3f} over {s.n} requests"
        )


# -- drift --------------------------------------------------------------------------------------------
def psi(reference: Sequence[float], live: Sequence[float], bins: int = 10) -> float:
    """Population stability index of ``live`` against ``reference``, on the reference's deciles.

    Bins are the reference's quantiles (ties merged), both shares smoothed by 1e-4; 0 means the
    same distribution, above 0.25 is commonly read as a large shift.
    """
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(live, dtype=np.float64)
    if ref.size == 0 or cur.size == 0:
        msg = "psi needs values on both sides"
        raise ValueError(msg)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    p, q = p + 1e-4, q + 1e-4
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(reference: Sequence[float], live: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    import numpy as np

    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(live, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        msg = "ks_statistic needs values on both sides"
        raise ValueError(msg)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def ks_critical(n_reference: int, n_live: int, alpha: float = 0.01) -> float:
    """The two-sample KS statistic that samples of these sizes exceed by chance with ``alpha``.

    The asymptotic value ``c(alpha) * sqrt((n + m) / (n * m))``, ``c = sqrt(-ln(alpha / 2) / 2)``
    (1.63 at 1%).
    """
    c = math.sqrt(-math.log(alpha / 2) / 2)
    return c * math.sqrt((n_reference + n_live) / (n_reference * n_live))


class DriftMonitor:
    """Live routing signals of one student against their held-out distributions.

    Args:
        reference: Signal name → values measured on the student's held-out traces.
        window: Live values kept per signal (the latest ones).
        min_samples: Live values needed before a signal is judged.
        alarm_psi: PSI at or above which a signal raises the alarm, when its KS statistic also
            exceeds the 1% critical value for the two sample sizes (:func:`ks_critical`).
    """

    def __init__(
        self,
        reference: Mapping[str, Sequence[float]],
        *,
        window: int = 500,
        min_samples: int = 100,
        alarm_psi: float = 0.25,
    ) -> None:
        self.reference = {k: [float(x) for x in v] for k, v in reference.items() if len(v) >= 10}
        if not self.reference:
            msg = "a drift reference needs at least 10 values of one signal"
            raise ConfigError(msg)
        self.min_samples = min_samples
        self.alarm_psi = alarm_psi
        self._live: dict[str, deque[float]] = {k: deque(maxlen=window) for k in self.reference}
        self._lock = threading.Lock()
        self.observed = 0

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> DriftMonitor:
        """Read a ``signal_reference.json`` written by the distillation job."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            signals = data["signals"]
            ref = {
                str(k): [float(x) for x in v if isinstance(x, int | float) and math.isfinite(x)]
                for k, v in signals.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            msg = f"{path} is not a signal reference written by a distillation job: {e}"
            raise ConfigError(msg) from e
        return cls(ref, **kwargs)

    def observe(self, signals: Mapping[str, Any]) -> None:
        """Add one request's signal values (absent or non-numeric ones are skipped)."""
        with self._lock:
            self.observed += 1
            for name, values in self._live.items():
                v = signals.get(name)
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    values.append(float(v))

    def report(self) -> dict[str, Any]:
        """The drift figures: per signal, counts, PSI and KS; ``alarm`` and what raised it.

        PSI and KS are ``None`` for a signal with fewer than ``min_samples`` live values.
        """
        with self._lock:
            live = {k: list(v) for k, v in self._live.items()}
        out: dict[str, Any] = {"observed": self.observed, "signals": {}, "alarm": False}
        raised = []
        for name, ref in self.reference.items():
            cur = live[name]
            row: dict[str, Any] = {"n": len(cur), "reference_n": len(ref), "psi": None, "ks": None}
            if len(cur) >= self.min_samples:
                row["psi"] = round(psi(ref, cur), 4)
                row["ks"] = round(ks_statistic(ref, cur), 4)
                row["ks_critical"] = round(ks_critical(len(ref), len(cur)), 4)
                # large (PSI) and not sampling noise (KS beyond its 1% critical value): PSI on
                # deciles of a few hundred values reaches 0.25 by chance alone
                if row["psi"] >= self.alarm_psi and row["ks"] >= row["ks_critical"]:
                    raised.append(name)
            out["signals"][name] = row
        out["alarm"] = bool(raised)
        out["alarm_signals"] = raised
        out["alarm_psi"] = self.alarm_psi
        return out


# -- the orchestrator ChatUnderstudy drives -------------------------------------------------------------


class LiveRollout:
    """Shadow, canary and drift watch for a registry-backed ``ChatUnderstudy``.

    :meth:`cohort` says whether a conversation is served by the canary; :meth:`after` takes each
    finished request, feeds the drift watch at once (cheap) and queues the shadow run and the
    canary's teacher check on the :class:`CheckWorker`. Canary decisions (``auto``) promote the
    candidate in the registry or end the canary, and are logged as ``event`` lines in the live log
    and through ``on_event`` (the audit log).

    Args:
        registry: A ``StudentRegistry``.
        settings: A :class:`~langchain_understudy.config.RolloutSettings`.
        check_every_s: How often the registry's rollout state is re-read.
        on_event: Called with each rollout event (a dict), e.g. to append it to the audit log.
        seed: Seed of the teacher-check sampling.
    """

    def __init__(
        self,
        registry: Any,
        settings: Any,
        *,
        check_every_s: float = 2.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        seed: int = 0,
    ) -> None:
        import random

        self.registry = registry
        self.settings = settings
        self.log = LiveLog(settings.log or Path(registry.root) / "live.jsonl")
        self.worker = CheckWorker(settings.queue_size)
        self.policy = CanaryPolicy(
            min_agreement=settings.min_agreement,
            min_checks=settings.min_checks,
            min_requests=settings.min_requests,
            max_error_rate=settings.max_error_rate,
            max_latency_p95_ms=settings.max_latency_p95_ms,
            min_confidence=settings.min_confidence,
        )
        self._every = check_every_s
        self._on_event = on_event
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._state: Any = None
        self._checked = -math.inf
        self._stats: dict[str, LiveSummary] = {}  # "kind:version" -> figures since it started
        self._drift: dict[str, DriftMonitor | None] = {}
        self.events: dict[str, int] = {}

    # -- state --------------------------------------------------------------------------------------
    def state(self) -> Any:
        """The registry's :class:`~langchain_understudy.students.registry.RolloutState`."""
        import time

        now = time.monotonic()
        with self._lock:
            if self._state is None or now - self._checked >= self._every:
                state = self.registry.rollout()
                if state != self._state:
                    self._restore(state)
                self._state, self._checked = state, now
            return self._state

    def _restore(self, state: Any) -> None:
        """Reload the figures of a new shadow or canary from the live log (a restart keeps them)."""
        wanted: dict[str, str | None] = {}
        if state.shadow:
            wanted[f"shadow:{state.shadow}"] = None
        if state.canary:
            wanted[f"canary:{state.canary}"] = state.canary_since or None
        keep = {k: v for k, v in self._stats.items() if k in wanted}
        for key, since in wanted.items():
            if key not in keep:
                found = summarize(self.log.read(), since=since)
                kind, version = key.split(":", 1)
                keep[key] = found.get(version, kind) or LiveSummary(version, kind)
        self._stats = keep

    def summary(self, kind: str, version: str) -> LiveSummary | None:
        with self._lock:
            return self._stats.get(f"{kind}:{version}")

    def cohort(self, messages: Sequence[BaseMessage], tags: Sequence[str] = ()) -> str | None:
        """The canary version when this conversation falls in the canary's share, else ``None``."""
        st = self.state()
        if not st.canary:
            return None
        hit = in_canary(conversation_key(messages, tags), st.canary_share, salt=st.canary)
        return str(st.canary) if hit else None

    # -- drift --------------------------------------------------------------------------------------
    def drift(self, version: str | None) -> DriftMonitor | None:
        """The drift watch of a served version (``None`` without a ``signal_reference.json``)."""
        if version is None:
            return None
        with self._lock:
            if version in self._drift:
                return self._drift[version]
        monitor = None
        try:
            v = self.registry.get(version, verify=False)
            if SIGNAL_REFERENCE_FILE in v.files:
                monitor = DriftMonitor.load(
                    v.artifact(SIGNAL_REFERENCE_FILE),
                    window=self.settings.drift_window,
                    min_samples=self.settings.drift_min_samples,
                    alarm_psi=self.settings.drift_alarm_psi,
                )
        except Exception as e:  # noqa: BLE001 - no drift watch is no reason to fail a request
            logger.warning("no drift watch for %s: %s", version, e)
        with self._lock:
            return self._drift.setdefault(version, monitor)

    # -- after each request -------------------------------------------------------------------------
    def after(
        self,
        *,
        served_version: str | None,
        canary: str | None,
        meta: Mapping[str, Any],
        answer: AIMessage,
        run_candidate: Callable[[str], AIMessage],
        ask_teacher: Callable[[], AIMessage] | None,
    ) -> None:
        """Feed one finished request to the drift watch, the shadow and the canary; never blocks.

        Args:
            served_version: The version that served the request.
            canary: The canary version when the request was in its share (then
                ``served_version`` is that version too), else ``None``.
            meta: The answer's ``response_metadata["understudy"]``.
            answer: The answer that was served.
            run_candidate: Runs a version on the request and returns its answer (raises
                ``StudentError`` when it fails).
            ask_teacher: Asks the teacher the request, or ``None`` without a teacher.
        """
        monitor = self.drift(served_version)
        if monitor is not None:  # escalated requests too: they are the traffic that drifts
            monitor.observe(drift_values(meta))
        st = self.state()
        base = {
            "serving": served_version,
            "answered_by": meta.get("answered_by"),
            "conversation": None,
        }
        if canary is not None:
            failed = str(meta.get("reason") or "").startswith("student failed")
            sample = (
                ask_teacher is not None
                and meta.get("answered_by") == "student"
                and self._rng.random() < self.settings.teacher_sample_rate
            )
            rec = {
                **base,
                "kind": "canary",
                "candidate": canary,
                "error": meta.get("reason") if failed else None,
                "latency_ms": meta.get("latency_ms"),
                "confidence": answer.response_metadata.get("confidence")
                if meta.get("answered_by") == "student"
                else None,
            }
            self.worker.submit(
                lambda: self._canary_check(rec, answer, ask_teacher if sample else None)
            )
        if st.shadow and st.shadow != served_version and canary is None:
            self.worker.submit(lambda: self._shadow_check(st.shadow, base, answer, run_candidate))

    def _shadow_check(
        self,
        version: str,
        base: dict[str, Any],
        served: AIMessage,
        run_candidate: Callable[[str], AIMessage],
    ) -> None:
        import time

        from langchain_understudy.errors import StudentError

        t0 = time.perf_counter()
        rec: dict[str, Any] = {**base, "kind": "shadow", "candidate": version}
        try:
            mine = run_candidate(version)
        except StudentError as e:
            rec.update(error=str(e), agree_served=False)
        else:
            same = agreement(mine, served)
            rec.update(
                agree_served=same,
                agree_teacher=same if base["answered_by"] == "teacher" else None,
                confidence=mine.response_metadata.get("confidence"),
                error=None,
            )
        rec["latency_ms"] = (time.perf_counter() - t0) * 1000.0
        self._record(rec)

    def _canary_check(
        self,
        rec: dict[str, Any],
        answer: AIMessage,
        ask_teacher: Callable[[], AIMessage] | None,
    ) -> None:
        from langchain_understudy.errors import TeacherUnavailableError

        if ask_teacher is not None:
            try:
                rec["agree_teacher"] = agreement(answer, ask_teacher())
            except TeacherUnavailableError as e:
                rec["teacher_error"] = str(e)
        self._record(rec)
        if self.settings.auto:
            self.decide_canary(str(rec["candidate"]))

    def _record(self, rec: dict[str, Any]) -> None:
        self.log.append(rec)
        key = f"{rec['kind']}:{rec['candidate']}"
        with self._lock:
            if key not in self._stats:
                self._stats[key] = LiveSummary(str(rec["candidate"]), str(rec["kind"]))
            self._stats[key].add(rec)

    # -- canary decisions -----------------------------------------------------------------------------
    def decide_canary(self, version: str) -> str | None:
        """Apply :class:`CanaryPolicy` to the canary's figures and act on the verdict.

        Returns ``"promote"``, ``"rollback"`` or ``None`` (still waiting, or ``version`` is no
        longer the canary).
        """
        from langchain_understudy.errors import ArtifactError

        stats = self.summary("canary", version)
        if stats is None:
            return None
        verdict, reason = self.policy.decide(stats)
        if verdict is None:
            return None
        try:
            if self.registry.rollout().canary != version:
                return None
            if verdict == "promote":
                self.registry.promote(version)
                event = "canary promoted"
            else:
                self.registry.end_canary("rolled back", reason)
                event = "canary rolled back"
        except ArtifactError as e:
            logger.error("canary %s: %s failed: %s", version, verdict, e)
            return None
        with self._lock:
            self._checked = -math.inf  # re-read the registry on the next request
            self.events[event] = self.events.get(event, 0) + 1
        record = {
            "kind": "event",
            "event": event,
            "candidate": version,
            "reason": reason,
            "figures": stats.to_dict(),
        }
        self.log.append(record)
        logger.warning("%s: %s (%s)", event, version, reason)
        if self._on_event is not None:
            self._on_event({"time": datetime.now(UTC).isoformat(), **record})
        return verdict

    # -- figures for /metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Live figures for ``/metrics``: checks and agreement per candidate, drift, events."""
        with self._lock:
            stats = [s.to_dict() for s in self._stats.values()]
            drift = {v: m for v, m in self._drift.items() if m is not None}
            events = dict(self.events)
        return {
            "candidates": stats,
            "drift": {v: m.report() for v, m in drift.items()},
            "events": events,
            "submitted": self.worker.submitted,
            "dropped": self.worker.dropped,
            "failed": self.worker.failed,
        }


def drift_from_audit(
    registry: Any,
    audit_log: str | Path,
    settings: Any,
    version: str | None = None,
) -> dict[str, Any]:
    """The drift report of ``version`` (default: the promoted one) over its latest audit lines.

    Reads the ``signals`` of the last ``settings.drift_window`` requests the audit log holds for
    that version, escalated ones included (they are the traffic that drifts away from it), so a
    command line and a scheduled job see what a server's drift watch sees.

    Raises:
        ConfigError: no version is promoted, the version has no ``signal_reference.json``, or
            the audit log cannot be read.
    """
    version = version or registry.current_version()
    if version is None:
        msg = f"no student is promoted in {registry.root}"
        raise ConfigError(msg)
    v = registry.get(version, verify=False)
    if SIGNAL_REFERENCE_FILE not in v.files:
        msg = (
            f"{version} was registered without {SIGNAL_REFERENCE_FILE}; students distilled by "
            "this release carry one"
        )
        raise ConfigError(msg)
    monitor = DriftMonitor.load(
        v.artifact(SIGNAL_REFERENCE_FILE),
        window=settings.drift_window,
        min_samples=settings.drift_min_samples,
        alarm_psi=settings.drift_alarm_psi,
    )
    try:
        lines = Path(audit_log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        msg = f"cannot read the audit log {audit_log}: {e}"
        raise ConfigError(msg) from e
    kept: deque[dict[str, Any]] = deque(maxlen=settings.drift_window)
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if (
            isinstance(rec, dict)
            and rec.get("student_version") == version
            and isinstance(rec.get("signals"), dict)
        ):
            kept.append(drift_values(rec))
    for signals in kept:
        monitor.observe(signals)
    return {"version": version, **monitor.report()}
