"""The routing flow of ``ChatUnderstudy``: every routing decision, written once, with no I/O.

:meth:`RoutingFlow.steps` is a generator. It yields what has to happen next and is sent back
what came of it:

* :class:`Score`: compute a routing decision (``Router.decide``) and send the ``Decision``;
* :class:`RunStudent`: run the student and send its answer (an ``AIMessage``), or the
  ``StudentError`` it raised;
* :class:`AskTeacher`: ask the guarded teacher and send its answer, or the
  ``TeacherUnavailableError`` it raised;
* :class:`Done`: the last step, with the answer, its ``response_metadata["understudy"]`` and the
  audit record.

When to score, when to escalate, why an escalation is blocked, what the metadata and the audit line
say: all of it lives here. The sync, async and streaming entry points of ``ChatUnderstudy`` only
carry the steps out, so a stage added here reaches every path.

Example:
    >>> from langchain_core.messages import AIMessage, HumanMessage
    >>> from langchain_understudy.router.policy import Router
    >>> from langchain_understudy.router.signals import RoutingContext
    >>> msgs = [HumanMessage("What does Pro cost?")]
    >>> flow = RoutingFlow(FlowRequest(msgs, RoutingContext(msgs), mode="pre", threshold=0.5))
    >>> steps = flow.steps()
    >>> step = next(steps)
    >>> type(step).__name__
    'Score'
    >>> step = steps.send(Router().decide(step.ctx, step.stage, threshold=step.threshold))
    >>> type(step).__name__
    'RunStudent'
    >>> done = steps.send(AIMessage("49 EUR a month."))
    >>> done.meta["answered_by"], done.meta["escalation_blocked"]
    ('student', False)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage

from langchain_understudy.errors import StudentError, TeacherUnavailableError
from langchain_understudy.prompting import Fact, message_text
from langchain_understudy.router.policy import Decision, Mode, SignalReading, Stage
from langchain_understudy.router.signals import RoutingContext

__all__ = [
    "METADATA_FIELDS",
    "AskTeacher",
    "Done",
    "FlowRequest",
    "RoutingFlow",
    "RunStudent",
    "Score",
    "Step",
    "merge_signals",
]

METADATA_FIELDS: dict[str, str] = {
    "answered_by": '``"student"`` or ``"teacher"``',
    "reason": "why the router decided as it did (the deciding signal, rule or failure), or why "
    "the student failed",
    "score": "escalation score of the last decision, in [0, 1] (``None`` when no decision ran)",
    "threshold": "threshold the scores were compared with (steered when a rate controller runs)",
    "stage": 'stage of the last decision: ``"pre"``, ``"post"`` or ``"cascade"``',
    "mode": '``"pre"``, ``"cascade"`` or ``"auto"``',
    "deciding_signals": "signals that set the last score",
    "rule": "the *always* rule that matched, or ``None``",
    "student_version": "registry version of the student, or ``None``",
    "student_model": "the student's model name",
    "teacher_model": "the teacher's model name, or ``None`` without a teacher",
    "latency_ms": "time from the request to the answer",
    "router_overhead_ms": "time spent reading signals and deciding, embedding included",
    "retrieval_ms": "time of the knowledge-store query",
    "facts": "keys of the facts shown to the student",
    "escalation_blocked": "``True`` when the teacher was wanted but the student answered "
    "(a bool; the reason is in ``blocked_reason``)",
    "blocked_reason": "why the escalation was blocked (privacy, no teacher, a *never* rule, "
    "circuit open, budget spent, teacher failing), else ``None``",
    "student_draft_discarded": "``True`` when the student answered first and the teacher's answer "
    "replaced it",
    "signals": "raw signal values by name",
    "absent": "signals that did not apply, with the reason",
    "failed": "signals that failed, with the reason (a failing signal escalates)",
    "answer_entropy": "mean entropy (nats) of the student's next-token distributions over its "
    "answer, or ``None`` when the student did not answer; the drift watch compares it with the "
    "held-out answers'",
}
"""What ``response_metadata["understudy"]`` holds on every answer: key → meaning."""

_LIVE_FALLBACK = "the teacher was unavailable when the answer started streaming"


@dataclass(frozen=True)
class Score:
    """Step: compute the routing decision of ``stage`` and send back the ``Decision``.

    Attributes:
        ctx: The request's routing context.
        stage: ``"pre"``, ``"post"`` or ``"cascade"``.
        threshold: The threshold to compare with (``Router.decide(..., threshold=...)``).
        reuse: Signal values of an earlier decision, not to be recomputed.
    """

    ctx: RoutingContext
    stage: Stage
    threshold: float
    reuse: SignalReading | None = None


@dataclass(frozen=True)
class RunStudent:
    """Step: run the student and send back its answer or the ``StudentError`` it raised.

    Attributes:
        messages: The conversation.
        facts: Facts for the student's prompt.
        live: Stream the student's tokens to the caller as they come. Only set when streaming and
            the answer will not be escalated after generation (``pre`` mode, or escalation is
            impossible anyway); the driver then sends back the joined answer.
    """

    messages: list[BaseMessage]
    facts: list[Fact]
    live: bool = False


@dataclass(frozen=True)
class AskTeacher:
    """Step: ask the guarded teacher; send back its answer or the ``TeacherUnavailableError``."""

    messages: list[BaseMessage]


@dataclass(frozen=True)
class Done:
    """The last step: the answer and everything said about it.

    Attributes:
        message: The answer, with ``response_metadata["understudy"]`` and ``model_name`` set.
        answered_by: ``"student"`` or ``"teacher"``.
        meta: ``response_metadata["understudy"]`` (keys: :data:`METADATA_FIELDS`).
        audit: The audit-log record (no message text).
        streamed: The student's tokens already went to the caller live.
        score: The request's escalation score as a rate controller sees it (the largest score of
            its decisions), ``None`` when no decision ran.
        asked_teacher: The router asked for the teacher (a decision escalated or the student
            failed), whether or not the teacher could be called.
    """

    message: AIMessage
    answered_by: Literal["student", "teacher"]
    meta: dict[str, Any]
    audit: dict[str, Any]
    streamed: bool
    score: float | None
    asked_teacher: bool


Step = Score | RunStudent | AskTeacher | Done
"""What :meth:`RoutingFlow.steps` yields."""


@dataclass
class FlowRequest:
    """What the flow needs to know about one request; gathered by the caller before it starts.

    Attributes:
        messages: The conversation.
        ctx: Its routing context (retrieval result included).
        mode: ``"pre"``, ``"cascade"`` or ``"auto"``.
        threshold: The escalation threshold for this request.
        facts: Facts for the student's prompt.
        forbidden: Why the privacy policy keeps this conversation on the machine, or ``None``.
        has_teacher: A teacher is configured.
        stream: The caller streams the answer.
        teacher_refusal: Why the guarded teacher refuses calls right now (circuit open, budget
            spent), read when the request started; only used when streaming.
        student_version: Registry version of the student.
        student_model: The student's model name.
        teacher_model: The teacher's model name.
        tags: Run tags (for the audit log).
        run_id: The LangChain run id.
        retrieval_ms: Time of the knowledge-store query.
        started: ``time.perf_counter()`` when the request arrived.
    """

    messages: list[BaseMessage]
    ctx: RoutingContext
    mode: Mode
    threshold: float
    facts: list[Fact] = field(default_factory=list)
    forbidden: str | None = None
    has_teacher: bool = True
    stream: bool = False
    teacher_refusal: str | None = None
    student_version: str | None = None
    student_model: str | None = None
    teacher_model: str | None = None
    tags: list[str] = field(default_factory=list)
    run_id: str | None = None
    retrieval_ms: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def merge_signals(
    decisions: Iterable[Decision],
) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """Signal values, absent and failed signals over several decisions of one request.

    A signal absent at one stage but read at a later one counts as read.
    """
    signals: dict[str, float] = {}
    absent: dict[str, str] = {}
    failed: dict[str, str] = {}
    for d in decisions:
        signals.update(d.signals)
        absent.update(d.absent)
        failed.update(d.failed)
    for name in signals:
        absent.pop(name, None)
    return signals, absent, failed


class RoutingFlow:
    """One request's route from the conversation to an answer, as a generator of steps.

    Args:
        request: What is known about the request.
        clock: ``time.perf_counter``-like clock for ``latency_ms``.
        now: Wall clock for the audit record's time.
    """

    def __init__(
        self,
        request: FlowRequest,
        *,
        clock: Callable[[], float] = time.perf_counter,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.request = request
        self.decisions: list[Decision] = []
        """Decisions made so far, in order."""
        self.blocked: str | None = None
        """Why the escalation was blocked, once it was."""
        self.student_error: str | None = None
        """What the student raised, if it failed."""
        self.answer_entropy: float | None = None
        """The student's answer entropy (its ``response_metadata``), once it has answered."""
        self.asked_teacher = False
        """The router asked for the teacher."""
        self._clock = clock
        self._now = now

    # -- the flow -----------------------------------------------------------------------------------
    def steps(self) -> Generator[Step, Any, None]:
        """Yield the steps of this request; the last one is :class:`Done`.

        Raises:
            StudentError: the student failed and the teacher could not answer instead.
        """
        r = self.request
        if r.mode in ("pre", "auto"):
            d = yield from self._score("pre")
            if d.escalate:
                answer = yield from self._escalate(d)
                if answer is not None:
                    yield self._done(answer, "teacher")
                    return
        live = self._live()
        draft = yield RunStudent(r.messages, r.facts, live)
        if isinstance(draft, StudentError):
            yield from self._student_failed(draft)
            return
        entropy = draft.response_metadata.get("answer_entropy")
        numeric = isinstance(entropy, int | float) and not isinstance(entropy, bool)
        self.answer_entropy = float(entropy) if numeric else None
        if r.mode in ("cascade", "auto") and self.blocked is None:
            r.ctx.student_output = draft
            d = yield from self._score("cascade" if r.mode == "cascade" else "post")
            if d.escalate and live:
                # the answer is already with the caller; say why it was not escalated
                self.asked_teacher = True
                self.blocked = self._why_blocked(d) or r.teacher_refusal or _LIVE_FALLBACK
            elif d.escalate:
                answer = yield from self._escalate(d)
                if answer is not None:
                    yield self._done(answer, "teacher", draft_discarded=True)
                    return
        yield self._done(draft, "student", streamed=live)

    def _score(self, stage: Stage) -> Generator[Step, Any, Decision]:
        reuse = SignalReading.of(self.decisions[-1]) if self.decisions else None
        d = yield Score(self.request.ctx, stage, self.request.threshold, reuse)
        self.decisions.append(d)
        return d

    def _escalate(self, decision: Decision) -> Generator[Step, Any, AIMessage | None]:
        self.asked_teacher = True
        blocked = self._why_blocked(decision)
        if blocked:
            self.blocked = blocked
            return None
        answer = yield AskTeacher(self.request.messages)
        if isinstance(answer, TeacherUnavailableError):
            self.blocked = str(answer)
            return None
        return answer

    def _student_failed(self, error: StudentError) -> Generator[Step, Any, None]:
        self.student_error = str(error)
        self.asked_teacher = True
        if self._why_blocked(self.decisions[-1] if self.decisions else None):
            raise error
        answer = yield AskTeacher(self.request.messages)
        if isinstance(answer, TeacherUnavailableError):
            raise error
        yield self._done(answer, "teacher")

    # -- decisions ----------------------------------------------------------------------------------
    def _why_blocked(self, decision: Decision | None) -> str | None:
        """Why this request may not go to the teacher, or ``None``."""
        r = self.request
        if r.forbidden:
            return r.forbidden
        if not r.has_teacher:
            return "no teacher configured"
        if decision is not None and decision.forbidden:
            return f"rule: {decision.forbidden}"
        return None

    def _live(self) -> bool:
        """Stream the student live: only when nothing can escalate its answer afterwards."""
        r = self.request
        if not r.stream:
            return False
        return r.mode == "pre" or bool(self._why_blocked(None) or r.teacher_refusal)

    # -- the answer ---------------------------------------------------------------------------------
    def _done(
        self,
        message: AIMessage,
        answered_by: Literal["student", "teacher"],
        *,
        draft_discarded: bool = False,
        streamed: bool = False,
    ) -> Done:
        r = self.request
        meta = self.metadata(answered_by, draft_discarded=draft_discarded)
        rm = dict(message.response_metadata)
        rm["understudy"] = meta
        name = r.student_model if answered_by == "student" else r.teacher_model
        if name is not None:
            rm.setdefault("model_name", name)
        out = AIMessage(
            content=message.content,
            additional_kwargs=dict(message.additional_kwargs),
            response_metadata=rm,
            usage_metadata=message.usage_metadata,
            tool_calls=list(message.tool_calls),
            id=message.id,
        )
        scores = [d.score for d in self.decisions]
        return Done(
            message=out,
            answered_by=answered_by,
            meta=meta,
            audit=self.audit_record(meta),
            streamed=streamed,
            score=max(scores) if scores else None,
            asked_teacher=self.asked_teacher,
        )

    def metadata(
        self, answered_by: Literal["student", "teacher"], *, draft_discarded: bool = False
    ) -> dict[str, Any]:
        """``response_metadata["understudy"]`` for the answer (keys: :data:`METADATA_FIELDS`)."""
        r = self.request
        last = self.decisions[-1] if self.decisions else None
        signals, absent, failed = merge_signals(self.decisions)
        reason = last.reason if last else "no decision"
        if self.student_error:
            reason = f"student failed: {self.student_error}"
        return {
            "answered_by": answered_by,
            "reason": reason,
            "score": last.score if last else None,
            "threshold": r.threshold,
            "stage": last.stage if last else None,
            "mode": r.mode,
            "deciding_signals": list(last.deciding) if last else [],
            "rule": last.rule if last else None,
            "student_version": r.student_version,
            "student_model": r.student_model,
            "teacher_model": r.teacher_model,
            "latency_ms": round((self._clock() - r.started) * 1000.0, 3),
            "router_overhead_ms": round(sum(d.elapsed_ms for d in self.decisions), 3),
            "retrieval_ms": round(r.retrieval_ms, 3),
            "facts": [f.key for f in r.facts],
            "escalation_blocked": self.blocked is not None,
            "blocked_reason": self.blocked,
            "student_draft_discarded": draft_discarded,
            "signals": signals,
            "absent": absent,
            "failed": failed,
            "answer_entropy": self.answer_entropy,
        }

    def audit_record(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The audit-log record: the metadata, a hash of the conversation, never its text."""
        r = self.request
        convo = json.dumps(
            [[m.type, message_text(m)] for m in r.messages], ensure_ascii=False
        ).encode("utf-8", errors="surrogatepass")  # a lone surrogate still hashes
        return {
            "time": self._now().isoformat(timespec="milliseconds"),
            "run_id": r.run_id,
            "conversation_sha256": hashlib.sha256(convo).hexdigest()[:16],
            "tags": list(r.tags),
            **{k: v for k, v in meta.items() if k != "facts"},
        }
