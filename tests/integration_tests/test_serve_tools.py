"""`understudy serve` serving tool calls and structured output on loopback, with a real GGUF
student routed by `ChatUnderstudy`: the official `openai` client (create, stream, parse) and
`langchain-openai`'s `ChatOpenAI` with bound tools get well-formed calls whose arguments follow
the tools' schemas, and JSON answers that follow the requested schema.

The student is the untrained tiny one: only the grammar built from the schemas stands between it
and a malformed call, which is what the server has to carry to the client intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, ConfigDict
from test_plugin_serve import chat_openai, openai_client, serving, understudy

from langchain_understudy.plugin.server import ServerThread

pytestmark = pytest.mark.slow

MAX_TOKENS = 192
QUESTION = "What is the weather in Paris?"


class GetWeather(BaseModel):
    """Get the weather at a location."""

    model_config = ConfigDict(extra="forbid")

    location: str
    unit: Literal["celsius", "fahrenheit"]


class MagicFunction(BaseModel):
    """Apply a magic function to an input."""

    model_config = ConfigDict(extra="forbid")

    input: int


MODELS: dict[str, type[BaseModel]] = {"GetWeather": GetWeather, "MagicFunction": MagicFunction}
TOOLS = [openai.pydantic_function_tool(m) for m in MODELS.values()]


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[ServerThread]:
    # room for the tools' schemas in the prompt and for a whole call in the answer
    llm = understudy(tiny_gguf, n_ctx=1024, max_tokens=MAX_TOKENS, json_max_string_length=8)
    with serving(llm, max_tokens_limit=MAX_TOKENS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai_client(server)


def _check_call(name: str, arguments: str) -> BaseModel:
    """The call names a served tool and its arguments JSON has exactly that tool's types."""
    assert name in MODELS, name
    return MODELS[name].model_validate(json.loads(arguments), strict=True)


def _answered_by(completion: Any) -> str:
    return str((completion.model_extra or {})["understudy"]["answered_by"])


def _ask(client: openai.OpenAI, **kw: Any) -> Any:
    messages = kw.pop("messages", [{"role": "user", "content": QUESTION}])
    return client.chat.completions.create(
        model="understudy", messages=messages, tools=TOOLS, max_tokens=MAX_TOKENS, **kw
    )


def test_required_tool_choice_gets_a_well_formed_call(client: openai.OpenAI) -> None:
    resp = _ask(client, tool_choice="required", parallel_tool_calls=False)
    (choice,) = resp.choices
    assert _answered_by(resp) == "student"
    assert choice.finish_reason == "tool_calls", resp
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _check_call(call.function.name, call.function.arguments)
    assert resp.usage is not None and resp.usage.completion_tokens > 0


def test_parallel_calls_are_each_well_formed(client: openai.OpenAI) -> None:
    resp = _ask(client, tool_choice="required")
    (choice,) = resp.choices
    calls = choice.message.tool_calls or []
    assert calls
    # an untrained student may go on calling until max_tokens; the cut-off call comes last,
    # its arguments as far as they got, as OpenAI sends them
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length")
    for call in complete:
        _check_call(call.function.name, call.function.arguments)
    assert len({c.id for c in calls}) == len(calls)


def test_named_choice_and_one_call_at_most(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "MagicFunction"}}
    resp = _ask(client, tool_choice=named, parallel_tool_calls=False)
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "MagicFunction"
    assert isinstance(_check_call(call.function.name, call.function.arguments), MagicFunction)
    plain = _ask(client, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None
    assert isinstance(plain.choices[0].message.content, str)


def test_streaming_reassembles_the_same_call(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"tool_choice": "required", "parallel_tool_calls": False}
    whole = _ask(client, **kw).choices[0].message.tool_calls[0]
    raw = list(_ask(client, stream=True, **kw))
    firsts = [t for c in raw if c.choices for t in c.choices[0].delta.tool_calls or [] if t.id]
    assert [(t.index, t.type, t.function.name) for t in firsts] == [
        (0, "function", whole.function.name)
    ]
    with client.chat.completions.stream(
        model="understudy",
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        max_tokens=MAX_TOKENS,
        **kw,
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        whole.function.name,
        json.loads(whole.function.arguments),
    )
    # the tools are strict (pydantic_function_tool): the client parsed the arguments itself
    assert call.function.parsed_arguments == _check_call(
        call.function.name, call.function.arguments
    )


def test_parse_gives_typed_arguments_and_typed_answers(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": QUESTION}]
    resp = client.chat.completions.parse(
        model="understudy", messages=messages, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    (call,) = resp.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, (GetWeather, MagicFunction))
    answer = client.chat.completions.parse(
        model="understudy", messages=messages, response_format=GetWeather, max_tokens=MAX_TOKENS
    )
    assert isinstance(answer.choices[0].message.parsed, GetWeather)
    assert _answered_by(answer) == "student"


def test_json_schema_and_json_object_answers(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer"}},
        "required": ["unit", "days"],
        "additionalProperties": False,
    }  # fmt: skip
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}
    resp = client.chat.completions.create(
        model="understudy", messages=[{"role": "user", "content": QUESTION}],
        response_format=fmt, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    assert resp.choices[0].finish_reason == "stop"
    answer = json.loads(resp.choices[0].message.content or "")
    assert set(answer) == {"unit", "days"}
    assert answer["unit"] in ("celsius", "fahrenheit") and isinstance(answer["days"], int)
    obj = client.chat.completions.create(
        model="understudy", messages=[{"role": "user", "content": QUESTION}],
        response_format={"type": "json_object"}, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    content = obj.choices[0].message.content or ""
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # any object is allowed, so an untrained student may nest until max_tokens
        assert obj.choices[0].finish_reason == "length" and content.startswith("{")


@tool
def get_weather(location: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the weather at a location."""
    return f"sunny, 21 degrees {unit} in {location}"


def test_chat_openai_bind_tools_gets_tool_calls(server: ServerThread) -> None:
    bound = chat_openai(server).bind_tools(
        [get_weather], tool_choice="any", parallel_tool_calls=False
    )
    msg = bound.invoke(QUESTION, max_tokens=MAX_TOKENS)
    assert isinstance(msg, AIMessage) and msg.tool_calls, msg
    for call in msg.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        assert isinstance(call["args"]["location"], str)
        assert set(call["args"]) <= {"location", "unit"}
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    full: AIMessageChunk | None = None
    for chunk in bound.stream(QUESTION, max_tokens=MAX_TOKENS):
        assert isinstance(chunk, AIMessageChunk)
        full = chunk if full is None else full + chunk
    assert full is not None
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        (c["name"], c["args"]) for c in msg.tool_calls
    ]


def test_chat_openai_sends_tool_results_back(server: ServerThread) -> None:
    chat = chat_openai(server)
    tools = chat.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False)
    call = tools.invoke(QUESTION)
    assert isinstance(call, AIMessage) and call.tool_calls
    results = [ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"])
               for c in call.tool_calls]  # fmt: skip
    history = [HumanMessage(QUESTION), call, *results]
    answer = chat.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert isinstance(answer.content, str) and not answer.tool_calls
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


def test_bad_tool_requests_get_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, tool_choice={"type": "function", "function": {"name": "search"}})
    assert err.value.param == "tool_choice" and "search" in err.value.message
    bad_call: Any = {"id": "c1", "type": "function",
                     "function": {"name": "GetWeather", "arguments": "{not json"}}  # fmt: skip
    messages: Any = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [bad_call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, messages=messages)
    assert err.value.param == "messages.1.tool_calls.0.function.arguments"
