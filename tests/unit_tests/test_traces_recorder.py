from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel, FakeListLLM, GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_understudy.distill_jobs import recorder as recorder_module
from langchain_understudy.distill_jobs.recorder import TraceRecorder
from langchain_understudy.distill_jobs.traces import Trace, TraceStore
from langchain_understudy.errors import ConfigError, TraceError


class EchoModel(BaseChatModel):
    """Answers 'echo: <last message>' (streams word by word); fails on 'fail'."""

    model_name: str = "echo-1"
    fail_after_chunks: int | None = None

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _text(self, messages: list[BaseMessage]) -> str:
        last = str(messages[-1].content)
        if last == "fail":
            msg = "teacher is down"
            raise ValueError(msg)
        return f"echo: {last}"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        msg = AIMessage(self._text(messages), response_metadata={"model_name": self.model_name})
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        words = self._text(messages).split(" ")
        for i, w in enumerate(words):
            if self.fail_after_chunks is not None and i == self.fail_after_chunks:
                msg = "connection reset"
                raise ConnectionError(msg)
            yield ChatGenerationChunk(message=AIMessageChunk(content=w if i == 0 else " " + w))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TraceStore]:
    s = TraceStore(tmp_path / "traces.sqlite")
    yield s
    s.close()


def _traces(store: TraceStore) -> list[Trace]:
    return list(store.iter_traces())


def test_all_is_pinned() -> None:
    assert recorder_module.__all__ == ["TraceRecorder"]


def test_records_invoke_with_everything(store: TraceStore) -> None:
    with TraceRecorder(store, tags=["rec"]) as rec:
        out = EchoModel().invoke(
            [HumanMessage("hello")],
            config={"callbacks": [rec], "tags": ["run"], "metadata": {"user": "u1"}},
        )
    (t,) = _traces(store)
    assert t.messages == [HumanMessage("hello")]
    assert t.answer.content == out.content == "echo: hello"
    assert t.model == "echo-1" and t.latency_ms is not None and t.latency_ms >= 0
    assert t.tags == ["rec", "run"] and t.metadata["user"] == "u1"
    assert t.run_id is not None and t.id == t.run_id and t.parent_run_id is None
    assert t.error is None
    assert rec.written == 1 and rec.dropped == 0


def test_records_stream_as_the_aggregated_message(store: TraceStore) -> None:
    with TraceRecorder(store) as rec:
        chunks = list(EchoModel().stream("a b c", config={"callbacks": [rec]}))
    assert len(chunks) > 1
    (t,) = _traces(store)
    assert type(t.answer) is AIMessage and t.answer.content == "echo: a b c"


async def test_records_async_and_async_stream(store: TraceStore) -> None:
    rec = TraceRecorder(store)
    model = EchoModel()
    await asyncio.gather(*(model.ainvoke(f"q{i}", config={"callbacks": [rec]}) for i in range(20)))
    async for _ in model.astream("streamed", config={"callbacks": [rec]}):
        pass
    await rec.aflush()
    answers = sorted(str(t.answer.content) for t in _traces(store))
    assert answers == sorted([f"echo: q{i}" for i in range(20)] + ["echo: streamed"])
    rec.close()


def test_records_batch_and_tool_calls(store: TraceStore) -> None:
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "c1"}])
    model = GenericFakeChatModel(messages=iter([call, AIMessage("two"), AIMessage("three")]))
    with TraceRecorder(store) as rec:
        model.invoke("one", config={"callbacks": [rec]})
        model.batch(["two", "three"], config={"callbacks": [rec], "max_concurrency": 1})
    ts = _traces(store)
    assert len(ts) == 3
    first = next(t for t in ts if t.messages[0].content == "one")
    assert first.answer.tool_calls == [
        {"name": "lookup", "args": {"q": "x"}, "id": "c1", "type": "tool_call"}
    ]
    assert first.model == "generic-fake-chat-model"


def test_records_errors_with_partial_stream(store: TraceStore) -> None:
    with TraceRecorder(store) as rec:
        with pytest.raises(ValueError, match="teacher is down"):
            EchoModel().invoke("fail", config={"callbacks": [rec]})
        with pytest.raises(ConnectionError):
            list(EchoModel(fail_after_chunks=2).stream("x y z", config={"callbacks": [rec]}))
    failed, partial = _traces(store)
    assert failed.error == "ValueError: teacher is down" and failed.answer.content == ""
    assert partial.error == "ConnectionError: connection reset"
    assert partial.answer.content == "echo: x"
    assert store.count(include_errors=False) == 0


def test_redaction_defaults_patterns_and_opt_out(tmp_path: Path) -> None:
    text = "I am jo@example.com, card 4111 1111 1111 1111, ticket TCK-123456"
    with TraceStore(tmp_path / "a.sqlite") as a, TraceStore(tmp_path / "b.sqlite") as b:
        with TraceRecorder(a, patterns={"ticket": r"TCK-\d{6}"}) as rec:
            EchoModel().invoke(
                text, config={"callbacks": [rec], "metadata": {"email": "jo@example.com"}}
            )
        with TraceRecorder(b, redact=False) as raw:
            EchoModel().invoke(text, config={"callbacks": [raw]})
        (t,) = _traces(a)
        assert t.messages[0].content == "I am <EMAIL>, card <CARD>, ticket <TICKET>"
        assert t.answer.content == "echo: I am <EMAIL>, card <CARD>, ticket <TICKET>"
        assert t.metadata["email"] == "<EMAIL>"
        (u,) = _traces(b)
        assert u.messages[0].content == text
    with pytest.raises(ConfigError, match="redact=False"):
        TraceRecorder(tmp_path / "c.sqlite", redact=False, patterns={"x": "y"})


def test_thread_safe_under_concurrent_calls(store: TraceStore) -> None:
    rec = TraceRecorder(store, batch_size=16)
    model = EchoModel()

    def work(k: int) -> None:
        for i in range(40):
            model.invoke(f"{k}-{i}", config={"callbacks": [rec]})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rec.flush()
    assert store.count() == 320 and rec.written == 320
    assert len({t.run_id for t in store.iter_traces()}) == 320
    rec.close()


def test_writes_off_the_callers_thread(store: TraceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store._insert_rows

    def slow(rows: Any) -> int:
        time.sleep(0.3)
        return real(rows)

    monkeypatch.setattr(store, "_insert_rows", slow)
    rec = TraceRecorder(store)
    start = time.perf_counter()
    for i in range(5):
        EchoModel().invoke(f"q{i}", config={"callbacks": [rec]})
    assert time.perf_counter() - start < 0.25  # the slow store never blocked the caller
    rec.flush()
    assert store.count() == 5
    rec.close()


def test_write_failures_surface_on_flush(
    store: TraceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(rows: Any) -> int:
        msg = "disk I/O error"
        raise TraceError(msg)

    rec = TraceRecorder(store)
    monkeypatch.setattr(store, "_insert_rows", broken)
    EchoModel().invoke("q", config={"callbacks": [rec]})  # the agent itself is unaffected
    with pytest.raises(TraceError, match="1 traces could not be written.*disk I/O error"):
        rec.flush()
    rec.flush()  # reported once
    monkeypatch.undo()
    EchoModel().invoke("q2", config={"callbacks": [rec]})
    rec.close()
    assert store.count() == 1


def test_close_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "owned.sqlite"
    rec = TraceRecorder(str(path))  # opens (and owns) the store
    EchoModel().invoke("q", config={"callbacks": [rec]})
    rec.close()
    rec.close()  # harmless
    with pytest.raises(TraceError, match="closed"):
        rec.flush()
    EchoModel().invoke("after close", config={"callbacks": [rec]})  # ignored, no error
    with TraceStore(path) as s:
        assert s.count() == 1
    assert not rec._thread.is_alive()


def test_ignores_completion_llms(store: TraceStore) -> None:
    with TraceRecorder(store) as rec:
        FakeListLLM(responses=["x"]).invoke("q", config={"callbacks": [rec]})
    assert store.count() == 0
