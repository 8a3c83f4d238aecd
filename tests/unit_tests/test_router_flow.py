"""The routing flow on its own: steps, decisions, block reasons, metadata and the audit record,
driven here by a few lines of test code instead of any chat model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from langchain_understudy.errors import StudentError, TeacherUnavailableError
from langchain_understudy.prompting import Fact
from langchain_understudy.router import ChatUnderstudy, Router, RoutingRules
from langchain_understudy.router._flow import (
    METADATA_FIELDS,
    AskTeacher,
    Done,
    FlowRequest,
    RoutingFlow,
    RunStudent,
    Score,
)
from langchain_understudy.router.signals import MAX_RAMP_RISK, RoutingContext, SignalSpec

README = Path(__file__).resolve().parents[2] / "README.md"


def _risk(ctx: RoutingContext) -> float:
    """A pre-generation signal read from the conversation: 'risk=0.7' in the last message."""
    m = re.search(r"risk=([0-9.]+)", str(ctx.messages[-1].content))
    return float(m.group(1)) if m else 0.0


def _confidence(ctx: RoutingContext) -> float:
    assert ctx.student_output is not None
    return float(ctx.student_output.response_metadata["confidence"])


SIGNALS = (
    SignalSpec("risk", _risk, "pre", True, (0.0, 1.0), (0.0, 1.0)),
    SignalSpec("confidence", _confidence, "post", False, (0.0, 1.0), (1.0, 0.0)),
)


@dataclass
class Driver:
    """Carries out the flow's steps with canned outcomes and records them."""

    router: Router
    student: Any = None  # AIMessage or StudentError
    teacher: Any = None  # AIMessage or TeacherUnavailableError
    steps: list[Any] = field(default_factory=list)

    def run(self, flow: RoutingFlow) -> Done:
        gen = flow.steps()
        step = next(gen)
        while not isinstance(step, Done):
            self.steps.append(step)
            step = gen.send(self.outcome(step))
        return step

    def outcome(self, step: Any) -> Any:
        if isinstance(step, Score):
            return self.router.decide(
                step.ctx, step.stage, reuse=step.reuse, threshold=step.threshold
            )
        if isinstance(step, RunStudent):
            return self.student
        assert isinstance(step, AskTeacher)
        return self.teacher

    @property
    def kinds(self) -> list[str]:
        names = {Score: "score", RunStudent: "student", AskTeacher: "teacher"}
        return [f"score:{s.stage}" if isinstance(s, Score) else names[type(s)] for s in self.steps]


def _student(text: str = "49 EUR.", confidence: float = 0.95) -> AIMessage:
    return AIMessage(text, response_metadata={"confidence": confidence, "model_name": "stu"})


def _teacher(text: str = "Teacher says 49 EUR.") -> AIMessage:
    return AIMessage(text, response_metadata={"model_name": "big-teacher"})


def _request(text: str = "What does Pro cost?", **kw: Any) -> FlowRequest:
    msgs: list[BaseMessage] = [HumanMessage(text)]
    kw.setdefault("mode", "auto")
    kw.setdefault("threshold", 0.5)
    kw.setdefault("student_model", "stu")
    kw.setdefault("teacher_model", "big-teacher")
    return FlowRequest(msgs, RoutingContext(msgs), **kw)


def _router(**kw: Any) -> Router:
    return Router(signals=SIGNALS, **kw)


def _run(
    req: FlowRequest, *, student: Any = None, teacher: Any = None, router: Router | None = None
) -> tuple[Done, Driver]:
    d = Driver(router or _router(), student or _student(), teacher or _teacher())
    return d.run(RoutingFlow(req)), d


# -- routes --------------------------------------------------------------------------------------
def test_routine_request_stays_with_the_student() -> None:
    done, d = _run(_request())
    assert d.kinds == ["score:pre", "student", "score:post"]
    assert done.answered_by == "student" and done.message.content == "49 EUR."
    meta = done.meta
    assert meta["stage"] == "post" and meta["escalation_blocked"] is False
    assert meta["blocked_reason"] is None and meta["student_draft_discarded"] is False
    assert meta["signals"] == {"risk": 0.0, "confidence": 0.95}
    assert done.message.response_metadata["model_name"] == "stu"
    assert done.asked_teacher is False and not done.streamed


def test_pre_escalation_never_runs_the_student() -> None:
    done, d = _run(_request("risk=0.9 refund?"))
    assert d.kinds == ["score:pre", "teacher"]
    assert done.answered_by == "teacher" and done.message.content == "Teacher says 49 EUR."
    assert done.meta["stage"] == "pre" and done.meta["deciding_signals"] == ["risk"]
    assert "confidence" not in done.meta["signals"]
    assert done.message.response_metadata["model_name"] == "big-teacher"
    assert done.asked_teacher and done.score == pytest.approx(MAX_RAMP_RISK * 0.9)


def test_post_escalation_discards_the_draft_and_reuses_pre_signals() -> None:
    done, d = _run(_request("risk=0.2"), student=_student(confidence=0.1))
    assert d.kinds == ["score:pre", "student", "score:post", "teacher"]
    post = d.steps[2]
    assert post.reuse is not None and post.reuse.values == {"risk": 0.2}
    assert done.answered_by == "teacher" and done.meta["student_draft_discarded"] is True
    assert done.meta["signals"] == {"risk": 0.2, "confidence": 0.1}
    assert done.score == pytest.approx(
        MAX_RAMP_RISK * 0.9
    )  # the largest score of the request's decisions


@pytest.mark.parametrize(
    ("mode", "kinds", "stage"),
    [
        ("pre", ["score:pre", "student"], "pre"),
        ("cascade", ["student", "score:cascade", "teacher"], "cascade"),
        ("auto", ["score:pre", "student", "score:post", "teacher"], "post"),
    ],
)
def test_modes(mode: str, kinds: list[str], stage: str) -> None:
    done, d = _run(_request("risk=0.3", mode=mode), student=_student(confidence=0.2))
    assert d.kinds == kinds and done.meta["stage"] == stage and done.meta["mode"] == mode


def test_the_requests_threshold_is_used_and_reported() -> None:
    done, d = _run(_request("risk=0.3", threshold=0.25))
    assert all(s.threshold == 0.25 for s in d.steps if isinstance(s, Score))
    assert done.answered_by == "teacher" and done.meta["threshold"] == 0.25


# -- blocked escalations -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_kw", "router_kw", "teacher", "why"),
    [
        ({"forbidden": "personal data detected (email)"}, {}, None, "personal data detected"),
        ({"has_teacher": False}, {}, None, "no teacher configured"),
        ({}, {"rules": RoutingRules(never_teacher_patterns=["risk"])}, None, "rule: "),
        ({}, {}, TeacherUnavailableError("teacher budget exhausted"), "budget exhausted"),
    ],
)
def test_blocked_escalation_is_a_bool_with_its_reason(
    request_kw: dict[str, Any], router_kw: dict[str, Any], teacher: Any, why: str
) -> None:
    done, d = _run(_request("risk=0.9", **request_kw), router=_router(**router_kw), teacher=teacher)
    asked = "teacher" in d.kinds
    assert asked == isinstance(teacher, TeacherUnavailableError)
    assert d.kinds[-1] != "score:post"  # a blocked pre escalation is not asked again
    assert done.answered_by == "student" and done.asked_teacher
    assert done.meta["escalation_blocked"] is True
    assert isinstance(done.meta["blocked_reason"], str) and why in done.meta["blocked_reason"]


def test_student_failure_falls_back_or_raises() -> None:
    broken = StudentError("prompt longer than the context")
    done, d = _run(_request(mode="cascade"), student=broken)
    assert d.kinds == ["student", "teacher"] and done.answered_by == "teacher"
    assert done.meta["reason"] == "student failed: prompt longer than the context"
    for kw, teacher in (({"has_teacher": False}, None), ({}, TeacherUnavailableError("down"))):
        with pytest.raises(StudentError, match="longer than the context"):
            _run(_request(mode="cascade", **kw), student=broken, teacher=teacher)


# -- streaming -----------------------------------------------------------------------------------------
def test_streaming_live_only_when_nothing_can_escalate_afterwards() -> None:
    _, d = _run(_request(stream=True))
    assert d.steps[1] == RunStudent(d.steps[1].messages, [], live=False)  # auto, teacher ready
    _, d = _run(_request(stream=True, mode="pre"))
    assert d.steps[1].live is True
    done, d = _run(
        _request(stream=True, teacher_refusal="teacher circuit open after 3 failures"),
        student=_student(confidence=0.1),
    )
    assert d.kinds == ["score:pre", "student", "score:post"] and d.steps[1].live
    assert done.streamed and done.answered_by == "student" and done.asked_teacher
    assert done.meta["blocked_reason"] == "teacher circuit open after 3 failures"
    done, _ = _run(_request(stream=True, has_teacher=False), student=_student(confidence=0.1))
    assert done.streamed and done.meta["blocked_reason"] == "no teacher configured"


# -- the metadata contract --------------------------------------------------------------------------
def _readme_keys() -> set[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Routing: `ChatUnderstudy`")
    end = text.index("\n## ", start + 1)
    return set(re.findall(r"^\| `([a-z_]+)` \|", text[start:end], flags=re.M))


def test_metadata_keys_match_docstring_and_readme() -> None:
    facts = [Fact(key="price.pro", text="Pro costs 49 EUR.")]
    for done in (
        _run(_request(facts=facts))[0],
        _run(_request("risk=0.9"))[0],
        _run(_request("risk=0.9", has_teacher=False, teacher_model=None))[0],
    ):
        assert set(done.meta) == set(METADATA_FIELDS)
        assert isinstance(done.meta["escalation_blocked"], bool)
        assert done.meta["blocked_reason"] is None or isinstance(done.meta["blocked_reason"], str)
        assert done.message.response_metadata["understudy"] == done.meta
    doc = ChatUnderstudy.__doc__ or ""
    missing = [k for k in METADATA_FIELDS if f"``{k}``" not in doc]
    assert missing == [], f"ChatUnderstudy's docstring does not document {missing}"
    assert _readme_keys() == set(METADATA_FIELDS)


def test_audit_record_has_the_metadata_but_no_text() -> None:
    req = _request("my secret phrase risk=0.1", tags=["t1"], run_id="r-1")
    flow = RoutingFlow(req, now=lambda: datetime(2026, 12, 3, tzinfo=UTC))
    done = Driver(_router(), _student(), _teacher()).run(flow)
    rec = done.audit
    assert set(rec) == (set(METADATA_FIELDS) - {"facts"}) | {
        "time",
        "run_id",
        "conversation_sha256",
        "tags",
    }
    assert rec["time"].startswith("2026-12-03T00:00:00") and rec["run_id"] == "r-1"
    assert rec["tags"] == ["t1"] and len(rec["conversation_sha256"]) == 16
    assert "secret phrase" not in json.dumps(rec)
