"""A real ``create_agent`` agent with a tool-calling teacher, recorded by ``TraceRecorder``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.tools import tool

from langchain_understudy.distill_jobs.recorder import TraceRecorder
from langchain_understudy.distill_jobs.traces import TraceStore


class ToolCallingTeacher(BaseChatModel):
    """First asks for the customer tool, then answers with what it returned; streams both."""

    @property
    def _llm_type(self) -> str:
        return "tool-calling-teacher"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _reply(self, messages: list[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            return AIMessage(f"Found: {last.content}.", response_metadata={"model_name": "big-1"})
        email = str(last.content).split()[-1].rstrip("?")
        call = {"name": "lookup_customer", "args": {"email": email}, "id": "call_1"}
        return AIMessage("", tool_calls=[call], response_metadata={"model_name": "big-1"})

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        reply = self._reply(messages)
        if reply.tool_calls:  # arguments arrive in two pieces, as real providers send them
            c = reply.tool_calls[0]
            args = json.dumps(c["args"])
            first = tool_call_chunk(name=c["name"], args=args[:7], id=c["id"], index=0)
            rest = tool_call_chunk(name=None, args=args[7:], id=None, index=0)
            for piece in (first, rest):
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", tool_call_chunks=[piece])
                )
        else:
            for i, word in enumerate(str(reply.content).split(" ")):
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content=word if i == 0 else " " + word)
                )
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", response_metadata={"model_name": "big-1"})
        )


@tool
def lookup_customer(email: str) -> str:
    """Look a customer up by email."""
    return f"Jane Doe <{email}>, phone +49 30 1234567"


@pytest.fixture
def agent() -> Any:
    return create_agent(ToolCallingTeacher(), [lookup_customer], system_prompt="You help support.")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TraceStore]:
    s = TraceStore(tmp_path / "traces.sqlite")
    yield s
    s.close()


def _question(i: int = 0) -> dict[str, Any]:
    return {"messages": [HumanMessage(f"Who is jane{i}@example.com?")]}


def _check_run(store: TraceStore, tag: str) -> None:
    """One agent run = two teacher calls: the tool call, then the final answer; all redacted."""
    first, second = store.iter_traces(tags=[tag])
    assert [m.type for m in first.messages] == ["system", "human"]
    assert first.messages[1].content == "Who is <EMAIL>?"
    assert first.answer.tool_calls == [
        {
            "name": "lookup_customer",
            "args": {"email": "<EMAIL>"},
            "id": "call_1",
            "type": "tool_call",
        }
    ]
    assert [m.type for m in second.messages] == ["system", "human", "ai", "tool"]
    assert second.messages[3].content == "Jane Doe <<EMAIL>>, phone <PHONE>"
    assert second.answer.content == "Found: Jane Doe <<EMAIL>>, phone <PHONE>."
    assert not second.answer.tool_calls
    for t in (first, second):
        assert t.model == "big-1" and t.error is None and t.latency_ms is not None
        assert t.parent_run_id is not None  # the agent's model node
        assert t.metadata.get("langgraph_node") == "model"
        assert "recorded" in t.tags
    files = [store.path, Path(f"{store.path}-wal")]
    raw = b"".join(f.read_bytes() for f in files if f.exists())
    assert b"example.com" not in raw and b"1234567" not in raw


def test_agent_invoke(agent: Any, store: TraceStore) -> None:
    with TraceRecorder(store, tags=["recorded"]) as rec:
        out = agent.invoke(_question(), config={"callbacks": [rec], "tags": ["sync"]})
    assert out["messages"][-1].content.startswith("Found: Jane Doe <jane0@example.com>")
    _check_run(store, "sync")


def test_agent_stream_messages(agent: Any, store: TraceStore) -> None:
    with TraceRecorder(store, tags=["recorded"]) as rec:
        tokens = [
            chunk
            for chunk, _meta in agent.stream(
                _question(), config={"callbacks": [rec], "tags": ["stream"]}, stream_mode="messages"
            )
            if isinstance(chunk, AIMessageChunk)
        ]
    assert len(tokens) > 3  # the model really streamed
    _check_run(store, "stream")


async def test_agent_ainvoke_and_astream(agent: Any, store: TraceStore) -> None:
    rec = TraceRecorder(store, tags=["recorded"])
    await agent.ainvoke(_question(), config={"callbacks": [rec], "tags": ["async"]})
    async for _ in agent.astream(
        _question(), config={"callbacks": [rec], "tags": ["astream"]}, stream_mode="messages"
    ):
        pass
    await rec.aflush()
    _check_run(store, "async")
    _check_run(store, "astream")
    rec.close()


async def test_many_concurrent_agent_runs(agent: Any, store: TraceStore) -> None:
    rec = TraceRecorder(store)
    runs = [agent.ainvoke(_question(i), config={"callbacks": [rec]}) for i in range(25)]
    await asyncio.gather(*runs)
    await rec.aflush()
    assert store.count() == 50
    assert store.stats().tool_call_answers == 25
    assert len({t.parent_run_id for t in store.iter_traces()}) == 50  # one model step each
    rec.close()
