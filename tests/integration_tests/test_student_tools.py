"""Tool calling on a real GGUF through llama.cpp: the grammar makes every call well-formed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_understudy.errors import ConfigError
from langchain_understudy.students import ChatStudent


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@tool
def get_weather(location: str, unit: str = "celsius") -> str:
    """Get the weather at a location."""
    return "sunny"


TOOLS = [magic_function, get_weather]


@pytest.fixture(scope="module")
def student(tiny_gguf: Path) -> ChatStudent:
    # an untrained student: only the grammar stands between it and a malformed call
    return ChatStudent(model_path=tiny_gguf, n_ctx=512, max_tokens=192, json_max_string_length=8)


def _check_call(call: dict, names: set[str]) -> None:
    assert call["name"] in names
    assert call["id"].startswith("call_")
    if call["name"] == "magic_function":
        assert set(call["args"]) == {"input"} and isinstance(call["args"]["input"], int)
    else:
        assert isinstance(call["args"]["location"], str)
        assert set(call["args"]) <= {"location", "unit"}


def test_forced_choice_always_yields_a_valid_call(student: ChatStudent) -> None:
    bound = student.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False)
    for prompt in ["Hello!", "What is the weather in Paris?", "magic_function(3)"]:
        msg = bound.invoke(prompt)
        assert isinstance(msg, AIMessage)
        assert len(msg.tool_calls) == 1, msg
        _check_call(msg.tool_calls[0], {"magic_function", "get_weather"})
        assert msg.response_metadata["finish_reason"] == "tool_calls"
        assert 0.0 <= msg.response_metadata["tool_call_confidence"] <= 1.0


def test_named_choice_calls_that_tool(student: ChatStudent) -> None:
    msg = student.bind_tools(TOOLS, tool_choice="get_weather").invoke("Hello!")
    assert msg.tool_calls and all(c["name"] == "get_weather" for c in msg.tool_calls)
    # the OpenAI dict form names a tool the same way
    msg = student.bind_tools(
        TOOLS, tool_choice={"type": "function", "function": {"name": "magic_function"}}
    ).invoke("Hello!")
    assert msg.tool_calls[0]["name"] == "magic_function"


def test_none_and_auto(student: ChatStudent) -> None:
    none = student.bind_tools(TOOLS, tool_choice="none").invoke("Hello!")
    assert none.tool_calls == [] and isinstance(none.content, str)
    auto = student.bind_tools(TOOLS).invoke("Hello!")
    for call in auto.tool_calls:  # text, calls, or both: whatever it is, it is well-formed
        _check_call(call, {"magic_function", "get_weather"})


def test_stream_yields_tool_call_chunks_that_add_up(student: ChatStudent) -> None:
    bound = student.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False)
    full: AIMessageChunk | None = None
    n_chunks = 0
    for chunk in bound.stream("What is the weather in Paris?"):
        n_chunks += bool(chunk.tool_call_chunks)
        full = chunk if full is None else full + chunk
    assert full is not None and n_chunks >= 2  # the name first, then argument fragments
    assert len(full.tool_calls) == 1
    _check_call(full.tool_calls[0], {"magic_function", "get_weather"})
    same = bound.invoke("What is the weather in Paris?")  # greedy: the same call
    assert (same.tool_calls[0]["name"], same.tool_calls[0]["args"]) == (
        full.tool_calls[0]["name"],
        full.tool_calls[0]["args"],
    )

    async def astream() -> AIMessageChunk | None:
        out = None
        async for chunk in bound.astream("What is the weather in Paris?"):
            out = chunk if out is None else out + chunk
        return out

    afull = asyncio.run(astream())
    assert afull is not None and afull.tool_calls[0]["args"] == full.tool_calls[0]["args"]
    ainvoked = asyncio.run(bound.ainvoke("What is the weather in Paris?"))
    assert ainvoked.tool_calls[0]["args"] == full.tool_calls[0]["args"]


def test_tool_results_in_the_conversation(student: ChatStudent) -> None:
    call = {"name": "get_weather", "args": {"location": "Paris"}, "id": "call_1"}
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("sunny", tool_call_id="call_1", name="get_weather"),
    ]
    msg = student.bind_tools(TOOLS, tool_choice="none").invoke(history)
    assert isinstance(msg.content, str) and not msg.tool_calls


def test_structured_output_through_a_forced_call(student: ChatStudent) -> None:
    class Person(BaseModel):
        name: str
        age: int

    person = student.with_structured_output(Person, method="function_calling").invoke("Ann, 31")
    assert isinstance(person, Person)


def test_bad_tool_choice_is_a_clear_error(student: ChatStudent) -> None:
    with pytest.raises(ConfigError, match="tool_choice"):
        student.bind_tools(TOOLS, tool_choice="search")
    with pytest.raises(ConfigError, match="bound tool"):
        student.invoke("hi", tool_choice="any")


@pytest.mark.parametrize("routed", [False, True])
def test_an_agent_runs_on_the_distilled_student(tool_gguf: Path, routed: bool) -> None:
    """``create_agent`` with the student (or ChatUnderstudy over it) as the agent's own model."""
    from langchain.agents import create_agent
    from langchain_core.language_models import GenericFakeChatModel

    from langchain_understudy.router import ChatUnderstudy, Router

    seen: list[dict] = []

    @tool
    def get_weather(location: str) -> str:
        """Get the weather at a location."""
        seen.append({"location": location})
        return "It's sunny."

    student = ChatStudent(model_path=tool_gguf, n_ctx=512, max_tokens=96)
    model: Any = student
    if routed:  # threshold 1.0: the student answers every turn; the teacher is never asked
        teacher = GenericFakeChatModel(messages=iter([AIMessage("teacher")]))
        model = ChatUnderstudy(student=student, teacher=teacher, router=Router(threshold=1.0))
    agent = create_agent(model=model, tools=[get_weather])
    out = agent.invoke({"messages": [HumanMessage("What is the weather in San Francisco, CA?")]})
    messages = out["messages"]
    assert seen == [{"location": "San Francisco, CA"}]  # the call, with the argument copied
    assert isinstance(messages[-2], ToolMessage)
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls
    assert "sunny" in str(messages[-1].content)
    if routed:
        meta = messages[-1].response_metadata["understudy"]
        assert meta["answered_by"] == "student"


def test_an_agent_runs_on_load_understudy_and_unseen_tools_go_to_the_teacher(
    tool_gguf: Path, tmp_path: Path
) -> None:
    """``create_agent(model=load_understudy(...))`` over a registry student: a turn with the tools
    the student learnt stays local; binding a tool it never saw called sends the turn up."""
    from conftest import suite_tool_traces
    from langchain.agents import create_agent
    from langchain_core.language_models import GenericFakeChatModel

    from langchain_understudy.plugin import load_understudy
    from langchain_understudy.prompting import tool_specs
    from langchain_understudy.router import Router
    from langchain_understudy.router.signals import TOOL_SIGNALS
    from langchain_understudy.students import StudentRegistry

    traces = suite_tool_traces()
    learnt = sorted({t["name"] for _, _, m in traces for t in tool_specs(m.get("tools"))})
    assert "get_weather" in learnt
    reg = StudentRegistry(tmp_path / "students")
    reg.promote(reg.register(tool_gguf, provenance={"tools": learnt}))  # as a distillation job does
    unseen_only = [s for s in TOOL_SIGNALS if s.name == "tools_unseen"]
    policy = Router(threshold=0.5, signals=unseen_only).save(tmp_path / "policy.json")
    (tmp_path / "understudy.toml").write_text(
        f'[student]\nregistry = "{reg.root}"\nn_ctx = 512\nmax_tokens = 96\n'
        f'[router]\npolicy = "{policy}"\n'
    )
    seen: list[dict] = []

    @tool
    def get_weather(location: str) -> str:
        """Get the weather at a location."""
        seen.append({"location": location})
        return "It's sunny."

    @tool
    def book_flight(city: str) -> str:
        """Book a flight to a city."""
        return "booked"

    teacher = GenericFakeChatModel(messages=iter([AIMessage("The teacher answers.")]))
    llm = load_understudy(tmp_path / "understudy.toml", teacher=teacher, record_traces=False)
    question = {"messages": [HumanMessage("What is the weather in San Francisco, CA?")]}
    out = create_agent(model=llm, tools=[get_weather]).invoke(question)["messages"]
    assert seen == [{"location": "San Francisco, CA"}]
    assert "sunny" in str(out[-1].content)
    for m in (out[1], out[-1]):
        meta = m.response_metadata["understudy"]
        assert meta["answered_by"] == "student" and meta["signals"]["tools_unseen"] == 0.0
    # the agent now also binds a tool the student never learnt to call: the teacher answers
    out = create_agent(model=llm, tools=[get_weather, book_flight]).invoke(question)["messages"]
    meta = out[-1].response_metadata["understudy"]
    assert meta["answered_by"] == "teacher" and meta["signals"]["tools_unseen"] == 0.5
    assert "tools_unseen" in meta["reason"] and out[-1].content == "The teacher answers."
