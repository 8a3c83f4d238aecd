"""invoke, ainvoke, stream and astream drive the same routing flow: same answer, same metadata."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_understudy.errors import StudentError
from langchain_understudy.router import ChatUnderstudy, ResilientTeacher, Router
from langchain_understudy.router.signals import DEFAULT_SIGNALS, RoutingContext, SignalSpec

KEYS = (
    "answered_by",
    "stage",
    "score",
    "threshold",
    "escalation_blocked",
    "blocked_reason",
    "student_draft_discarded",
    "reason",
    "signals",
)


def _value(name: str, text: str) -> float | None:
    m = re.search(rf"{name}=([0-9.]+)", text)
    return float(m.group(1)) if m else None


def _risk(ctx: RoutingContext) -> float:
    return _value("risk", str(ctx.messages[-1].content)) or 0.0


class _Student(BaseChatModel):
    """Answers in three chunks; its confidence is 'conf=X' from the request (0.95 without)."""

    @property
    def _llm_type(self) -> str:
        return "scripted-student"

    def _meta(self, messages: list[BaseMessage]) -> dict[str, Any]:
        text = str(messages[-1].content)
        if "fail" in text:
            raise StudentError("the student is broken")
        conf = _value("conf", text)
        return {"confidence": 0.95 if conf is None else conf, "model_name": "scripted"}

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        msg = AIMessage("the student answer", response_metadata=self._meta(messages))
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        meta = self._meta(messages)
        for word in ("the ", "student "):
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))
        last = AIMessageChunk(content="answer", response_metadata=meta, chunk_position="last")
        yield ChatGenerationChunk(message=last)


class _Teacher(BaseChatModel):
    fail: bool = False

    @property
    def _llm_type(self) -> str:
        return "scripted-teacher"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        if self.fail:
            raise ConnectionError("503 Service Unavailable")
        msg = AIMessage("the teacher answer", response_metadata={"model_name": "teacher-1"})
        return ChatResult(generations=[ChatGeneration(message=msg)])


def _llm(mode: str, teacher: str) -> ChatUnderstudy:
    spec = SignalSpec("risk", _risk, "pre", True, (0.0, 1.0), (0.0, 1.0))
    guard = None
    if teacher != "none":
        guard = ResilientTeacher(
            _Teacher(fail=teacher == "down"), max_retries=0, failure_threshold=1000
        )
    return ChatUnderstudy(
        student=_Student(),
        teacher=guard,
        mode=mode,  # type: ignore[arg-type]
        router=Router(threshold=0.5, signals=[spec, DEFAULT_SIGNALS[-1]]),
    )


def _pick(msg: BaseMessage) -> tuple[Any, ...]:
    meta = msg.response_metadata["understudy"]
    return (msg.content, *(meta[k] for k in KEYS))


def _joined(chunks: list[AIMessageChunk]) -> AIMessage:
    text = "".join(str(c.content) for c in chunks)
    return AIMessage(text, response_metadata=chunks[-1].response_metadata)


@pytest.mark.parametrize("mode", ["pre", "cascade", "auto"])
@pytest.mark.parametrize("teacher", ["up", "down", "none"])
@pytest.mark.parametrize(
    "text", ["routine", "risk=0.9 hard", "conf=0.1 unsure", "risk=0.9 mail ana@example.org"]
)
async def test_every_entry_point_routes_alike(mode: str, teacher: str, text: str) -> None:
    llm = _llm(mode, teacher)
    invoked = _pick(llm.invoke(text))
    assert _pick(await llm.ainvoke(text)) == invoked
    chunks = list(llm.stream(text))
    assert all("understudy" not in c.response_metadata for c in chunks[:-1])
    assert _pick(_joined(chunks)) == invoked
    achunks = [c async for c in llm.astream(text)]
    assert _pick(_joined(achunks)) == invoked


@pytest.mark.parametrize("teacher", ["up", "none"])
async def test_a_failing_student_behaves_alike(teacher: str) -> None:
    llm = _llm("auto", teacher)
    if teacher == "none":
        with pytest.raises(StudentError):
            llm.invoke("fail")
        with pytest.raises(StudentError):
            list(llm.stream("fail"))
        with pytest.raises(StudentError):
            await llm.ainvoke("fail")
        return
    invoked = _pick(llm.invoke("fail"))
    assert invoked[0] == "the teacher answer" and invoked[-2].startswith("student failed")
    assert _pick(list(llm.stream("fail"))[-1]) == invoked
    assert _pick(await llm.ainvoke("fail")) == invoked


def test_the_teacher_receives_the_bound_tools_in_the_openai_form() -> None:
    seen: list[dict[str, Any]] = []

    class _Teacher(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "recording-teacher"

        def _generate(
            self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> ChatResult:
            seen.append(kw)
            call = {"name": "lookup", "args": {"q": "x"}, "id": "t1"}
            return ChatResult(
                generations=[ChatGeneration(message=AIMessage("", tool_calls=[call]))]
            )

    def lookup(q: str) -> str:
        """Look something up."""
        return q

    llm = ChatUnderstudy(student=_Student(), teacher=_Teacher(), router=Router(threshold=0.0))
    bound = llm.bind_tools([lookup], tool_choice="any", parallel_tool_calls=False)
    msg = bound.invoke("risk=0.9 find x")
    assert msg.tool_calls[0]["name"] == "lookup"
    assert msg.response_metadata["understudy"]["answered_by"] == "teacher"
    (kw,) = seen
    assert [t["function"]["name"] for t in kw["tools"]] == ["lookup"]
    assert kw["tools"][0]["type"] == "function"
    assert kw["tool_choice"] == "required" and kw["parallel_tool_calls"] is False
    # a named choice reaches the teacher as OpenAI's named-function form
    llm.bind_tools([lookup], tool_choice="lookup").invoke("risk=0.9 find x")
    assert seen[-1]["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert "parallel_tool_calls" not in seen[-1]
