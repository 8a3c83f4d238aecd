"""Generated conversations for a real tiny GGUF ``ChatStudent`` and for ``ChatUnderstudy`` over it:
every message type and content shape LangChain allows (strings, text/image/file/JSON/reasoning
blocks, unknown block types, tool calls and results, named and custom roles), any unicode, long
and empty. Each answer is an ``AIMessage`` with text, or an ``UnderstudyError``; every teacher
answer is recorded and the traces stored before are all still there.

Cases the fuzzing found are kept as regression tests at the end.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _understudy_fakes import FakeTeacher
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_understudy.distill_jobs.recorder import TraceRecorder
from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.errors import TraceError, UnderstudyError
from langchain_understudy.router import ChatUnderstudy, Router
from langchain_understudy.students import ChatStudent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit_tests"))
from test_fuzz_strategies import any_text, fuzz_settings, json_values  # noqa: E402

pytestmark = pytest.mark.slow
FUZZ = fuzz_settings(ci_examples=25)

# -- strategies -------------------------------------------------------------------------------

blocks = st.one_of(
    any_text,
    st.builds(lambda t: {"type": "text", "text": t}, any_text),
    st.builds(
        lambda t: {"type": "text", "text": t, "cache_control": {"type": "ephemeral"}}, any_text
    ),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, any_text),
    st.just(
        {"type": "image", "source_type": "base64", "data": "iVBORw0KGgo=", "mime_type": "image/png"}
    ),
    st.just({"type": "file", "source_type": "url", "url": "https://example.com/a.pdf"}),
    st.builds(lambda v: {"type": "json", "json": v}, json_values),
    st.builds(lambda t: {"type": "reasoning", "reasoning": t}, any_text),
    st.builds(lambda t, v: {"type": t or "x", "value": v}, any_text, json_values),
)
content = any_text | st.lists(blocks, max_size=4)
tool_calls = st.lists(
    st.builds(
        lambda n, a, i: {"name": n, "args": a, "id": i, "type": "tool_call"},
        any_text,
        st.dictionaries(any_text, json_values, max_size=3),
        any_text,
    ),
    max_size=2,
)
message: st.SearchStrategy[BaseMessage] = st.one_of(
    st.builds(HumanMessage, content=content),
    st.builds(lambda c, n: HumanMessage(content=c, name=n), content, any_text),
    st.builds(SystemMessage, content=content),
    st.builds(lambda c, t: AIMessage(content=c, tool_calls=t), content, tool_calls),
    st.builds(lambda c, i: ToolMessage(content=c, tool_call_id=i), content, any_text),
    st.builds(lambda c, r: ChatMessage(content=c, role=r), content, any_text),
    st.builds(lambda c, n: FunctionMessage(content=c, name=n), content, any_text),
)
conversations = st.one_of(
    st.lists(message, min_size=1, max_size=5),
    st.lists(message, min_size=1, max_size=2).map(lambda ms: ms * 30),  # longer than the context
    any_text.map(lambda t: [HumanMessage(t * 200)]),
)


def _has_surrogate(messages: list[BaseMessage]) -> bool:
    text = json.dumps([m.model_dump() for m in messages], ensure_ascii=False, default=str)
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _check_answer(llm: Any, messages: list[BaseMessage]) -> AIMessage | None:
    try:
        answer = llm.invoke(messages)
    except UnderstudyError as e:
        assert str(e)
        return None
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)
    return answer


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tiny_gguf: Path) -> ChatStudent:
    return ChatStudent(model_path=tiny_gguf, n_ctx=256, max_tokens=4).load()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    path = tmp_path / "traces.sqlite"
    with TraceStore(path) as s:
        for i in range(3):
            s.add([HumanMessage(f"seed {i}")], AIMessage(f"answer {i}"), tags=["seed"])
        seeded = {t.id: t.content_hash for t in s.iter_traces(tags=["seed"])}
    yield path, seeded
    with TraceStore(path) as s:  # reopened after the batch: everything seeded is still there
        for trace_id, digest in seeded.items():
            got = s.get(trace_id)
            assert got is not None and got.content_hash == digest


# -- properties -------------------------------------------------------------------------------


def test_student_answers_any_conversation_or_raises(student: ChatStudent) -> None:
    @FUZZ
    @given(messages=conversations, stream=st.booleans())
    def case(messages: list[BaseMessage], stream: bool) -> None:
        if stream:
            try:
                text = "".join(str(c.content) for c in student.stream(messages))
            except UnderstudyError:
                return
            assert isinstance(text, str)
        else:
            _check_answer(student, messages)

    case()
    assert isinstance(student.invoke("hi").content, str)  # still serving


def test_understudy_routes_any_conversation_and_records_teacher_answers(
    student: ChatStudent, store: tuple[Path, dict[str, str]]
) -> None:
    path, _seeded = store
    recorder = TraceRecorder(path, redact=False)
    teacher = FakeTeacher()
    llm = ChatUnderstudy(
        student=student,
        teacher=teacher,
        router=Router(threshold=0.5),
        mode="auto",
        trace_callbacks=[recorder],
    )

    with_surrogates = 0

    @FUZZ
    @given(messages=conversations, threshold=st.sampled_from([0.0, 0.5, 1.0]))
    def case(messages: list[BaseMessage], threshold: float) -> None:
        nonlocal with_surrogates
        with_surrogates += _has_surrogate(messages)
        llm.router = Router(threshold=threshold)
        before = recorder.store.count()
        answer = _check_answer(llm, messages)
        try:
            recorder.flush()
        except TraceError as e:  # a lone surrogate: that trace alone is not stored
            assert _has_surrogate(messages) and "surrogate" in str(e), e
        if answer is None:
            return
        meta = answer.response_metadata["understudy"]
        assert meta["answered_by"] in ("student", "teacher")
        if meta["answered_by"] == "teacher" and not _has_surrogate(messages):
            assert recorder.store.count() == before + 1  # the teacher's answer became a trace

    try:
        case()
    finally:
        recorder.close()
    # only traces SQLite cannot hold (lone surrogates) are dropped, one per conversation
    assert recorder.dropped <= with_surrogates


# -- cases the fuzzing found, kept as regression tests -----------------------------------------

LONE = "what is \ud800 this"


@pytest.mark.parametrize(
    "messages",
    [
        [HumanMessage(LONE)],
        [HumanMessage([{"type": "text", "text": LONE}])],
        [SystemMessage("\udfff"), HumanMessage("hi")],
    ],
)
def test_found_lone_surrogate_is_answered_or_a_student_error(
    student: ChatStudent, messages: list[BaseMessage]
) -> None:
    try:
        assert isinstance(student.invoke(messages).content, str)
    except UnderstudyError:
        pass


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_found_lone_surrogate_is_routed(student: ChatStudent, threshold: float) -> None:
    llm = ChatUnderstudy(student=student, teacher=FakeTeacher(), router=Router(threshold=threshold))
    try:
        answer = llm.invoke([HumanMessage(LONE)])
    except UnderstudyError:
        return
    assert answer.response_metadata["understudy"]["answered_by"] in ("student", "teacher")


def test_found_lone_surrogate_trace_does_not_drop_its_batch(tmp_path: Path) -> None:
    recorder = TraceRecorder(tmp_path / "t.sqlite", redact=False, flush_interval=10.0)
    teacher = FakeTeacher(callbacks=[recorder])
    teacher.invoke([HumanMessage("good one")])
    teacher.invoke([HumanMessage(LONE)])
    teacher.invoke([HumanMessage("good two")])
    with pytest.raises(TraceError, match="surrogate"):  # the one trace SQLite cannot hold
        recorder.flush()
    recorder.close()
    with TraceStore(tmp_path / "t.sqlite") as s:
        assert s.count() == 2
