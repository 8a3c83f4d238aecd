"""The OpenAI-compatible server with a fake model: protocol, limits, errors, auth, metrics."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from prometheus_client.parser import text_string_to_metric_families

from langchain_understudy.config import ServerSettings
from langchain_understudy.errors import ConfigError, StudentError
from langchain_understudy.plugin.server import ServerMetrics, check_bind, create_app, is_loopback
from langchain_understudy.prompting import message_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fuzz_strategies import encode, fuzz_settings, mutate  # noqa: E402


class EchoModel(BaseChatModel):
    """Answers 'echo: <last message>' with understudy-style routing metadata."""

    fail: bool = False

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:  # fmt: skip
        if self.fail:
            raise StudentError("conversation needs 999 prompt tokens")
        text = f"echo: {message_text(messages[-1])}"
        if kwargs.get("max_tokens"):
            text = text[: kwargs["max_tokens"]]
        meta = {"answered_by": "student", "reason": "score 0.10 < threshold 0.50",
                "student_version": "v1"}  # fmt: skip
        msg = AIMessage(
            content=text,
            response_metadata={"finish_reason": "stop", "understudy": meta},
            usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])


def _client(**kw: Any) -> TestClient:
    settings = kw.pop("settings", ServerSettings(max_request_bytes=2048, max_tokens_limit=64))
    return TestClient(create_app(EchoModel(**kw.pop("model", {})), settings=settings, **kw))


def _chat(**over: Any) -> dict[str, Any]:
    return {"model": "understudy", "messages": [{"role": "user", "content": "hi"}], **over}


def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_completion_has_the_openai_shape_and_routing_metadata() -> None:
    resp = _client().post("/v1/chat/completions", json=_chat())
    body = resp.json()
    assert resp.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["understudy"]["answered_by"] == "student"
    assert resp.headers["x-understudy-answered-by"] == "student"


def test_text_parts_and_system_roles_are_accepted() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}]
    resp = _client().post("/v1/chat/completions", json=_chat(messages=msgs))
    assert resp.json()["choices"][0]["message"]["content"] == "echo: ab"


def test_streaming_sends_chunks_then_done() -> None:
    with _client().stream(
        "POST", "/v1/chat/completions",
        json=_chat(stream=True, stream_options={"include_usage": True}),
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hi"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["understudy"]["answered_by"] == "student"
    assert chunks[-1]["usage"]["total_tokens"] == 5


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "x"}).encode(), 400, "messages"),
        (json.dumps(_chat(messages=[{"role": "wizard", "content": "hi"}])).encode(), 400,
         "messages.0.role"),
        (json.dumps(_chat(messages=[{"role": "user", "content": 42}])).encode(), 400, None),
        (json.dumps(_chat(max_tokens=65)).encode(), 400, "max_tokens"),
        (json.dumps(_chat(max_tokens=0)).encode(), 400, "max_tokens"),
        (json.dumps(_chat(temperature=7)).encode(), 400, "temperature"),
        (json.dumps(_chat(n=2)).encode(), 400, "n"),
        (json.dumps(_chat(stop=["a", "b", "c", "d", "e"])).encode(), 400, "stop"),
        (json.dumps(_chat(tools=[{"type": "function"}])).encode(), 400, "tools.0.function"),
        (json.dumps(_chat(response_format={"type": "xml"})).encode(), 400,
         "response_format.type"),
        (json.dumps(_chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])).encode(),
         400, "messages.0.content.0.type"),
        (json.dumps(_chat(messages=[{"role": "tool", "content": "x"}])).encode(), 400,
         "messages.0"),
        (b"x" * 5000, 413, None),
    ],
)  # fmt: skip
def test_malformed_requests_get_openai_style_4xx(
    body: bytes, status: int, param: str | None
) -> None:
    resp = _client().post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    err = _error(resp, status)
    if param is not None:
        assert err["param"] == param


def test_wrong_content_type_unknown_route_and_method() -> None:
    client = _client()
    resp = client.post(
        "/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"}
    )
    _error(resp, 415)
    assert _error(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert _error(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_model_errors_become_json_errors() -> None:
    resp = _client(model={"fail": True}).post("/v1/chat/completions", json=_chat())
    assert _error(resp, 400)["code"] == "context_length_exceeded"
    with _client(model={"fail": True}).stream("POST", "/v1/chat/completions",
                                              json=_chat(stream=True)) as resp:  # fmt: skip
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "context_length_exceeded"


def test_api_key_is_required_when_set() -> None:
    client = _client(api_key="s3cret")
    assert _error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert _error(client.get("/metrics"), 401)["code"] == "invalid_api_key"
    bad = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    _error(bad, 401)
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "understudy"
    assert client.get("/healthz").status_code == 200  # liveness stays open


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_models_health_and_metrics() -> None:
    client = _client()
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/chat/completions", json=_chat())
    client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    resp = client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    got = _samples(resp.text)
    chat = ("endpoint", "/v1/chat/completions")
    assert got["understudy_http_requests_total", frozenset({chat, ("code", "200")})] == 1
    assert got["understudy_http_requests_total", frozenset({chat, ("code", "400")})] == 1
    assert got["understudy_chat_completion_seconds_bucket", frozenset({("le", "+Inf")})] == 1
    assert got["understudy_chat_completion_seconds_count", frozenset()] == 1
    assert got["understudy_answers_total", frozenset({("answered_by", "student")})] == 1
    assert got["understudy_teacher_call_rate", frozenset()] == 0.0


def test_metrics_histogram_is_cumulative_and_rate_is_a_share() -> None:
    m = ServerMetrics(buckets=(0.1, 1.0))
    m.observe_completion(0.05, {"answered_by": "student"})
    m.observe_completion(0.5, {"answered_by": "teacher"})
    m.observe_completion(5.0, {"answered_by": "teacher", "escalation_blocked": True})
    got = _samples(m.render())
    bucket = "understudy_chat_completion_seconds_bucket"
    assert got[bucket, frozenset({("le", "0.1")})] == 1
    assert got[bucket, frozenset({("le", "1")})] == 2
    assert got[bucket, frozenset({("le", "+Inf")})] == 3
    assert got["understudy_chat_completion_seconds_sum", frozenset()] == pytest.approx(5.55)
    assert m.teacher_call_rate() == pytest.approx(2 / 3)
    assert got["understudy_teacher_call_rate", frozenset()] == pytest.approx(2 / 3)
    assert got["understudy_escalations_blocked_total", frozenset()] == 1


def test_bind_safety() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(ConfigError, match="UNDERSTUDY_API_KEY"):
        check_bind("0.0.0.0", None)


# -- tool calling and structured output -----------------------------------------------------------


WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}
ARGS = {"city": "Zürich", "days": 2}


class ToolModel(BaseChatModel):
    """Honours the tool kwargs as ``ChatStudent`` does: calls the bound tools (each once, or one
    when ``parallel_tool_calls`` is false or a tool is named), streams ``tool_call_chunks``, and
    answers JSON under ``json_schema``. Records each call's messages and kwargs.

    ``first_index`` and ``indexed`` imitate other sources' chunk numbering (Anthropic counts
    content blocks; some sources send no index at all).
    """

    seen: list[dict[str, Any]] = []  # noqa: RUF012 - one list per instance (pydantic copies it)
    text: str = ""
    first_index: int = 0
    indexed: bool = True
    error: str | None = None

    @property
    def _llm_type(self) -> str:
        return "tool-fake"

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        self.seen.append({"messages": messages, "kwargs": kwargs})
        if self.error:
            raise ConfigError(self.error)
        tools = [t["function"]["name"] for t in kwargs.get("tools") or []]
        choice = kwargs.get("tool_choice", "auto")
        if tools and choice != "none":
            if choice not in ("auto", "any"):
                tools = [choice]
            elif kwargs.get("parallel_tool_calls") is False:
                tools = tools[:1]
            calls = [{"name": n, "args": ARGS if n == "get_weather" else {}, "id": f"call_{i}"}
                     for i, n in enumerate(tools)]  # fmt: skip
            meta = {"finish_reason": "tool_calls", "understudy": {"answered_by": "student"}}
            return AIMessage(self.text, tool_calls=calls, response_metadata=meta)
        schema = kwargs.get("json_schema")
        text = json.dumps({"city": "Zürich"}) if schema is not None else "plain text"
        return AIMessage(text, response_metadata={"finish_reason": "stop"})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:  # fmt: skip
        return ChatResult(generations=[ChatGeneration(message=self._answer(messages, kwargs))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: Any = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:  # fmt: skip
        answer = self._answer(messages, kwargs)
        if answer.content:
            yield ChatGenerationChunk(message=AIMessageChunk(content=answer.content))
        for i, call in enumerate(answer.tool_calls):
            index = i + self.first_index if self.indexed else None
            text = json.dumps(call["args"], ensure_ascii=False)
            parts = [(call["id"], call["name"], ""), (None, None, text[:5]), (None, None, text[5:])]
            for call_id, name, args in parts:
                chunk = tool_call_chunk(index=index, id=call_id, name=name, args=args)
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", tool_call_chunks=[chunk])
                )
        last = AIMessageChunk(content="", response_metadata=answer.response_metadata)
        yield ChatGenerationChunk(message=last)


def _tool_client(**model: Any) -> tuple[TestClient, ToolModel]:
    llm = ToolModel(**model)
    settings = ServerSettings(max_request_bytes=8192, max_tokens_limit=64)
    return TestClient(create_app(llm, settings=settings, api_key="")), llm


def _post(client: TestClient, **over: Any) -> Any:
    return client.post("/v1/chat/completions", json=_chat(**over))


def _events(client: TestClient, **over: Any) -> list[dict[str, Any]]:
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True, **over)) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "json_schema")
_NAMED = {"type": "function", "function": {"name": "now"}}
_BARE_CLOCK = {"type": "function", "function": {
    "name": "now", "parameters": {"type": "object", "properties": {}}}}  # fmt: skip


@pytest.mark.parametrize(
    ("over", "want"),
    [
        ({"tools": [WEATHER]}, {"tools": [WEATHER]}),
        ({"tools": [WEATHER], "tool_choice": "required"},
         {"tools": [WEATHER], "tool_choice": "any"}),
        ({"tools": [WEATHER], "tool_choice": "auto"}, {"tools": [WEATHER], "tool_choice": "auto"}),
        ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": [WEATHER], "tool_choice": "none"}),
        ({"tools": [WEATHER, CLOCK], "tool_choice": _NAMED},
         {"tools": [WEATHER, _BARE_CLOCK], "tool_choice": "now"}),
        ({"tools": [WEATHER], "parallel_tool_calls": False},
         {"tools": [WEATHER], "parallel_tool_calls": False}),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}},
         {"tools": [WEATHER], "tool_choice": "get_weather", "parallel_tool_calls": False}),
        ({"functions": [WEATHER["function"]], "function_call": "auto"},
         {"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False}),
        ({"tools": [], "tool_choice": "none", "parallel_tool_calls": True}, {}),
        ({"response_format": {"type": "json_object"}}, {"json_schema": {"type": "object"}}),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "city", "schema": {"type": "object"}, "strict": True}}},
         {"json_schema": {"type": "object"}}),
        ({"response_format": {"type": "text"}}, {}),
    ],
)  # fmt: skip
def test_tools_and_response_format_reach_the_model_as_kwargs(
    over: dict[str, Any], want: dict[str, Any]
) -> None:
    client, llm = _tool_client()
    assert _post(client, **over).status_code == 200
    got = llm.seen[-1]["kwargs"]
    assert {k: got[k] for k in _OPTIONS if k in got} == want


def test_a_tool_call_answer_has_the_openai_shape() -> None:
    client, _ = _tool_client()
    body = _post(client, tools=[WEATHER, CLOCK], tool_choice="required").json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    assert [(c["id"], c["type"], c["function"]["name"]) for c in message["tool_calls"]] == [
        ("call_0", "function", "get_weather"),
        ("call_1", "function", "now"),
    ]
    arguments = message["tool_calls"][0]["function"]["arguments"]
    assert isinstance(arguments, str) and json.loads(arguments) == ARGS
    assert "Zürich" in arguments  # ensure_ascii=False
    assert json.loads(message["tool_calls"][1]["function"]["arguments"]) == {}


def test_text_with_calls_keeps_its_content_and_plain_answers_have_no_tool_calls() -> None:
    client, _ = _tool_client(text="Let me check.")
    message = _post(client, tools=[WEATHER]).json()["choices"][0]["message"]
    assert message["content"] == "Let me check." and len(message["tool_calls"]) == 1
    plain = _post(client, tools=[WEATHER], tool_choice="none").json()["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "plain text"}
    assert plain["finish_reason"] == "stop"


def test_json_schema_answers_are_the_models_json() -> None:
    client, _ = _tool_client()
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}
    content = _post(client, response_format=fmt).json()["choices"][0]["message"]["content"]
    assert json.loads(content) == {"city": "Zürich"}


def test_the_deprecated_functions_api_is_answered_with_function_call() -> None:
    client, llm = _tool_client()
    body = _post(client, functions=[WEATHER["function"]]).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "function_call"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert json.loads(choice["message"]["function_call"]["arguments"]) == ARGS
    chunks = _events(client, functions=[WEATHER["function"]])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["function_call"] for d in deltas if "function_call" in d]
    assert calls[0] == {"name": "get_weather", "arguments": ""}
    assert json.loads("".join(c["arguments"] for c in calls)) == ARGS
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def _stream_state(chunks: list[dict[str, Any]], **request: Any) -> Any:
    """The openai client's own accumulation of a stream (what ``chat.completions.stream`` does)."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState(**request)
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


@pytest.mark.parametrize(
    "model",
    [{}, {"first_index": 1}, {"indexed": False}, {"text": "Checking."}],
    ids=["student", "sparse-indices", "no-indices", "text-then-calls"],
)
def test_streamed_tool_calls_follow_openai_and_reassemble(model: dict[str, Any]) -> None:
    client, _ = _tool_client(**model)
    chunks = _events(client, tools=[WEATHER, CLOCK], tool_choice="required")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    parts = [p for d in deltas for p in d.get("tool_calls", [])]
    firsts = [p for p in parts if "id" in p]
    assert [p["index"] for p in firsts] == [0, 1]  # dense, in call order, whatever the source
    for p in firsts:
        assert p["type"] == "function" and p["id"]
        assert p["function"] == {"name": p["function"]["name"], "arguments": ""}
    for p in parts:
        if "id" not in p:
            assert set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "".join(d.get("content") or "" for d in deltas) == model.get("text", "")
    final = _stream_state(chunks, input_tools=[WEATHER, CLOCK])
    message = final.choices[0].message
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "now"]
    assert json.loads(message.tool_calls[0].function.arguments) == ARGS
    assert final.choices[0].finish_reason == "tool_calls"


def test_assistant_tool_calls_and_tool_results_are_converted() -> None:
    client, llm = _tool_client()
    call = {"id": "call_9", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}  # fmt: skip
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_9", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "assistant", "function_call": {"name": "now", "arguments": ""}},
        {"role": "function", "name": "now", "content": "noon"},
    ]
    assert _post(client, messages=messages, tools=[WEATHER, CLOCK]).status_code == 200
    _, ai, tool, ai2, fn = llm.seen[-1]["messages"]
    assert isinstance(ai, AIMessage) and ai.content == ""
    assert [(c["name"], c["args"], c["id"]) for c in ai.tool_calls] == [
        ("get_weather", ARGS, "call_9")
    ]
    assert isinstance(tool, ToolMessage)
    assert (tool.tool_call_id, tool.name, tool.content) == ("call_9", "get_weather", "sunny")
    assert isinstance(ai2, AIMessage) and ai2.tool_calls[0]["args"] == {}
    assert isinstance(fn, ToolMessage) and fn.tool_call_id == ai2.tool_calls[0]["id"]
    assert fn.name == "now"


_CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


def _with_call(call: Any, then: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]
    return {"messages": [*msgs, *(then or [])], "tools": [WEATHER]}


def _fn(**over: Any) -> dict[str, Any]:
    return {"type": "function", "function": {**WEATHER["function"], **over}}


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"tools": ["get_weather"]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": "get_weather"}]}, "tools.0.function"),
        ({"tools": [_fn(name="has space")]}, "tools.0.function.name"),
        ({"tools": [_fn(name="x" * 65)]}, "tools.0.function.name"),
        ({"tools": [_fn(name=7)]}, "tools.0.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
        ({"tools": [_fn(description=3)]}, "tools.0.function.description"),
        ({"tools": [_fn(parameters={"type": "string"})]}, "tools.0.function.parameters"),
        ({"tools": [_fn(parameters=[1])]}, "tools.0.function.parameters"),
        ({"functions": [{"name": "a b"}]}, "functions.0.name"),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "now"}}},
         "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "any"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": 3}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "now"}}, "function_call"),
        ({"tools": [WEATHER], "parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 1}}},
         "response_format.json_schema.schema"),
        (_with_call({**_CALL, "function": {"name": "get_weather", "arguments": "{nope"}}),
         "messages.1.tool_calls.0.function.arguments"),
        (_with_call({**_CALL, "function": {"name": "get_weather", "arguments": "[1]"}}),
         "messages.1.tool_calls.0.function.arguments"),
        (_with_call({**_CALL, "function": {"name": "get_weather", "arguments": {"city": "x"}}}),
         "messages.1.tool_calls.0.function.arguments"),
        (_with_call({**_CALL, "function": {"name": "get_weather", "arguments": "[" * 100}}),
         "messages.1.tool_calls.0.function.arguments"),
        (_with_call({**_CALL, "function": {"name": "get_weather",
                                           "arguments": '{"city": "\\ud800"}'}}),
         "messages.1.tool_calls.0.function.arguments.city"),
        (_with_call({**_CALL, "function": {"name": "get_weather",
                                           "arguments": "{\"a\": " * 70 + "1" + "}" * 70}}),
         "messages.1.tool_calls.0.function.arguments" + ".a" * 64),
        (_with_call({**_CALL, "id": ""}), "messages.1.tool_calls.0.id"),
        (_with_call({**_CALL, "type": "custom"}), "messages.1.tool_calls.0"),
        (_with_call({**_CALL, "function": {"arguments": "{}"}}),
         "messages.1.tool_calls.0.function.name"),
        (_with_call(_CALL, [{"role": "tool", "tool_call_id": "c2", "content": "x"}]),
         "messages.2.tool_call_id"),
        ({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]},
         "messages.0.tool_call_id"),
        ({"messages": [{"role": "function", "name": "now", "content": "x"}]}, "messages.0.name"),
        ({"messages": [{"role": "assistant", "tool_calls": "c1"}]}, "messages.0.tool_calls"),
    ],
)  # fmt: skip
def test_malformed_tool_requests_get_a_400_naming_the_field(
    over: dict[str, Any], param: str
) -> None:
    client, llm = _tool_client()
    err = _error(_post(client, **over), 400)
    assert err["param"] == param, err
    assert not llm.seen  # refused before the model is called


def test_a_schema_the_model_rejects_is_a_400_and_tool_calls_are_counted() -> None:
    client, _ = _tool_client(error="invalid JSON schema for constrained generation: ...")
    assert "invalid JSON schema" in _error(_post(client, tools=[WEATHER]), 400)["message"]
    client, _ = _tool_client()
    _post(client, tools=[WEATHER])
    _events(client, tools=[WEATHER])
    _post(client)
    got = _samples(client.get("/metrics").text)
    finish = "understudy_chat_completions_total"
    assert got[finish, frozenset({("finish_reason", "tool_calls")})] == 2
    assert got[finish, frozenset({("finish_reason", "stop")})] == 1


_FUZZ = fuzz_settings(ci_examples=100)


@st.composite
def tool_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed tool-calling request (tools, a choice, a call and its result, a response
    format, streamed or not), then up to three of its values replaced by any JSON or removed."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}  # fmt: skip
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "tools": [WEATHER, CLOCK],
        "tool_choice": draw(st.sampled_from(["auto", "none", "required", _NAMED])),
        "parallel_tool_calls": draw(st.booleans()),
        "stream": draw(st.booleans()),
    }
    if draw(st.booleans()):
        body["response_format"] = draw(st.sampled_from([
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}},
        ]))  # fmt: skip
    if draw(st.booleans()):  # the deprecated functions API instead
        body["functions"] = [f["function"] for f in body.pop("tools")]
        body["function_call"] = draw(st.sampled_from(["auto", {"name": "now"}]))
        del body["tool_choice"]
    return mutate(draw, json.loads(json.dumps(body)))  # a copy: mutate works in place


@_FUZZ
@given(obj=tool_requests())
def test_tool_requests_of_any_shape_get_an_answer_or_a_4xx(obj: dict[str, Any]) -> None:
    client, _ = _tool_client()
    hdrs = {"content-type": "application/json"}
    if obj.get("stream") is True:
        with client.stream(
            "POST", "/v1/chat/completions", content=encode(obj), headers=hdrs
        ) as resp:
            if resp.status_code == 200:
                events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert all("error" not in json.loads(e) for e in events[:-1]), events
                return
            resp.read()
    else:
        resp = client.post("/v1/chat/completions", content=encode(obj), headers=hdrs)
        if resp.status_code == 200:
            message = resp.json()["choices"][0]["message"]
            for call in message.get("tool_calls") or []:
                assert isinstance(json.loads(call["function"]["arguments"]), dict)
            return
    _error(resp, resp.status_code)
    assert 400 <= resp.status_code < 500
