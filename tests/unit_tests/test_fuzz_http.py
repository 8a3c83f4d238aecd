"""Generated requests against the OpenAI-compatible server: bodies, headers, unicode, nesting,
sizes and streaming. Every request gets a 2xx answer of the right shape or an OpenAI-style 4xx
error with a message, never a 500 or a hang, and the server keeps counting and answering.

The model behind the app is a small echo model that, like the real student, encodes its prompt
as UTF-8 (the real GGUF student behind real HTTP is fuzzed in
``integration_tests/test_fuzz_serve.py``). ``UNDERSTUDY_FUZZ_EXAMPLES`` raises the number of
generated cases per property (``bench/fuzz.py`` runs thousands).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import example, given
from hypothesis import strategies as st
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from prometheus_client.parser import text_string_to_metric_families
from test_fuzz_strategies import (
    any_text,
    encode,
    fuzz_settings,
    json_values,
    mutate,
    nested,
    valid_text,
)

from langchain_understudy.config import ServerSettings
from langchain_understudy.plugin.server import MAX_JSON_DEPTH, create_app
from langchain_understudy.prompting import message_text, render_prompt

FUZZ = fuzz_settings(ci_examples=40)
LIMIT = 4096  # server.max_request_bytes in these tests
MAX_TOKENS = 64
URL = "/v1/chat/completions"


class Utf8EchoModel(BaseChatModel):
    """Answers ``echo: <last message>``; encodes the prompt as UTF-8 first, as the student does."""

    confidence: float = 0.9

    @property
    def _llm_type(self) -> str:
        return "utf8-echo"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        render_prompt(messages).encode("utf-8")  # the tokenizer's first step
        text = f"echo: {message_text(messages[-1])}"[: kwargs.get("max_tokens") or None]
        meta = {"answered_by": "student", "confidence": self.confidence, "signals": {"x": 1.0}}
        msg = AIMessage(
            content=text,
            response_metadata={"finish_reason": "stop", "understudy": meta},
            usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings_ = ServerSettings(max_request_bytes=LIMIT, max_tokens_limit=MAX_TOKENS)
    app = create_app(Utf8EchoModel(), settings=settings_, api_key="")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# -- strategies -------------------------------------------------------------------------------

valid_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": any_text
        | st.none()
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text}), max_size=3),
    },
    optional={"name": any_text},
)
tool_message = st.fixed_dictionaries(
    {"role": st.just("tool"), "content": any_text, "tool_call_id": any_text}
)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values that are usually in range, sometimes just out of it."""
    return st.one_of(good, good, good, bad)


valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "model": any_text,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": _mostly(st.integers(1, MAX_TOKENS), st.integers(-5, 2 * MAX_TOKENS)),
    "max_completion_tokens": _mostly(st.integers(1, MAX_TOKENS), st.integers(-5, 200)),
    "temperature": _mostly(st.floats(0, 2), st.floats(-1, 3) | st.floats()),
    "top_p": _mostly(st.floats(0.01, 1), st.floats(0, 1.5) | st.floats()),
    "n": _mostly(st.just(1), st.integers(-1, 3)),
    "stop": any_text | st.lists(any_text, max_size=6),
    "tools": _mostly(st.just([]), st.lists(json_values, max_size=2)),
    "response_format": st.fixed_dictionaries({"type": _mostly(st.just("text"), json_values)}),
    "user": any_text,
    "seed": st.integers(),
}


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed chat request, then up to three of its values replaced by any JSON value,
    or removed, and unknown fields added: every depth of wrongness is reached."""
    messages = draw(st.lists(valid_message | tool_message, min_size=1, max_size=4))
    body: dict[str, Any] = {"messages": messages}
    for key, values in valid_fields.items():
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(values)
    mutate(draw, body)
    body.update(draw(st.dictionaries(any_text, json_values, max_size=2)))  # unknown fields
    return body


@st.composite
def nested_bodies(draw: st.DrawFn) -> bytes:
    """A request whose messages, content or an extra field holds a deeply nested value."""
    depth = draw(st.integers(0, 6000))
    value = nested(depth, draw(st.sampled_from(["list", "dict"])))
    where = draw(st.sampled_from(["messages", "content", "extra", "top"]))
    if where == "top":
        return value.encode()
    if where == "messages":
        return f'{{"messages": {value}}}'.encode()
    if where == "content":
        return f'{{"messages": [{{"role": "user", "content": {value}}}]}}'.encode()
    return f'{{"messages": [{{"role": "user", "content": "hi"}}], "metadata": {value}}}'.encode()


raw_bodies = (
    st.binary(max_size=LIMIT + 200)
    | request_objects().map(encode)
    | json_values.map(encode)
    | nested_bodies()
    | st.binary(min_size=LIMIT - 50, max_size=LIMIT + 50)
    | request_objects()
    .map(encode)
    .flatmap(
        lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda i: b[:i])  # cut short
    )
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
headers = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(
            ["application/json", "text/plain", "", "application/json; charset=latin-1"]
        )
        | header_text,
        "authorization": header_text,
        "accept": header_text,
        "x-anything": header_text,
    },
)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant"]),
            "content": valid_text,
        }
    ),
    max_size=3,
).map(lambda ms: [*ms, {"role": "user", "content": "last"}])


# -- checks -------------------------------------------------------------------------------------


def check_error(resp: Any) -> None:
    """A 4xx with an OpenAI-style error body."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]


def check_completion(resp: Any) -> dict[str, Any]:
    """A 200 chat completion with a string answer; the server answers, or refuses with a 4xx."""
    if resp.status_code != 200:
        check_error(resp)
        return {}
    if resp.headers["content-type"].startswith("text/event-stream"):  # the body asked for it
        check_events(resp.text.splitlines())
        return {}
    body = resp.json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    return body


def check_stream(client: TestClient, body: bytes, hdrs: dict[str, str]) -> None:
    """A stream is refused with a 4xx before it starts, or sends JSON events ending in [DONE]."""
    with client.stream("POST", URL, content=body, headers=hdrs) as resp:
        if resp.status_code != 200:
            resp.read()
            check_error(resp)
            return
        check_events(list(resp.iter_lines()))


def check_events(lines: list[str]) -> None:
    """Server-sent events: JSON chunks, no in-band error, then ``[DONE]``."""
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        assert chunk["object"] == "chat.completion.chunk"


def requests_counted(client: TestClient) -> float:
    text = client.get("/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "understudy_http_requests_total" and s.labels["endpoint"] == URL
    )


def check_still_serving(client: TestClient) -> None:
    resp = client.post(URL, json={"messages": [{"role": "user", "content": "still there?"}]})
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "echo: still there?"


# -- properties -------------------------------------------------------------------------------


@FUZZ
@given(body=raw_bodies, hdrs=headers)
def test_any_body_and_headers_get_an_answer_or_a_4xx(
    client: TestClient, body: bytes, hdrs: dict[str, str]
) -> None:
    check_completion(client.post(URL, content=body, headers=hdrs))


@FUZZ
@given(body=raw_bodies)
def test_any_body_streamed_gets_events_or_a_4xx(client: TestClient, body: bytes) -> None:
    obj: Any
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):  # ask for a stream where the body is an object
        obj["stream"] = True
        body = encode(obj)
    check_stream(client, body, {"content-type": "application/json"})


@FUZZ
@given(obj=request_objects())
def test_requests_of_any_shape_get_an_answer_or_a_4xx(
    client: TestClient, obj: dict[str, Any]
) -> None:
    body = encode(obj)
    hdrs = {"content-type": "application/json"}
    if obj.get("stream") is True:
        check_stream(client, body, hdrs)
    else:
        check_completion(client.post(URL, content=body, headers=hdrs))


@FUZZ
@given(messages=valid_messages, max_tokens=st.none() | st.integers(1, MAX_TOKENS))
def test_valid_requests_get_the_right_answer(
    client: TestClient, messages: list[dict[str, str]], max_tokens: int | None
) -> None:
    body: dict[str, Any] = {"messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    got = check_completion(client.post(URL, json=body))
    want = f"echo: {messages[-1]['content'].strip()}"[:max_tokens]
    assert got and got["choices"][0]["message"]["content"] == want


@FUZZ
@given(
    header=st.none()
    | header_text
    | st.sampled_from(["Bearer s3cret", "bearer  s3cret ", "Bearer"]),
    path=st.sampled_from([URL, "/v1/models", "/metrics", "/healthz", "/v1/x"]),
)
def test_with_an_api_key_only_the_right_bearer_gets_in(header: str | None, path: str) -> None:
    app = create_app(Utf8EchoModel(), api_key="s3cret")
    with TestClient(app, raise_server_exceptions=False) as c:
        headers = {} if header is None else {"authorization": header}
        resp = c.post(path, json={"messages": [{"role": "user", "content": "hi"}]}, headers=headers)
        scheme, _, token = (header or "").partition(" ")
        allowed = path == "/healthz" or (scheme.lower() == "bearer" and token.strip() == "s3cret")
        if allowed:
            assert resp.status_code != 401
        else:
            check_error(resp)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"


@FUZZ
@given(depth=st.integers(0, 6000), kind=st.sampled_from(["list", "dict"]))
@example(depth=MAX_JSON_DEPTH - 1, kind="list")  # the deepest accepted, found by bench/fuzz.py
@example(depth=MAX_JSON_DEPTH, kind="dict")  # one level more: refused
def test_nesting_within_the_limit_is_read_and_beyond_it_refused(
    client: TestClient, depth: int, kind: str
) -> None:
    body = (
        f'{{"messages": [{{"role": "user", "content": "hi"}}], "metadata": {nested(depth, kind)}}}'
    )
    resp = client.post(URL, content=body.encode(), headers={"content-type": "application/json"})
    if len(body) > LIMIT:
        assert resp.status_code == 413
    elif depth + 1 > MAX_JSON_DEPTH:  # the body object itself is one level
        check_error(resp)
        assert "nested" in resp.json()["error"]["message"]
    else:
        assert resp.status_code == 200, resp.text


def test_the_server_counted_every_request_and_still_serves(client: TestClient) -> None:
    before = requests_counted(client)
    for body in (b"{", b"[]", encode({"messages": [{"role": "user", "content": "\ud800"}]})):
        check_error(client.post(URL, content=body, headers={"content-type": "application/json"}))
    check_still_serving(client)
    assert requests_counted(client) == before + 4


# -- cases the fuzzing found, kept as regression tests -----------------------------------------

FOUND = {
    # a lone surrogate reached the model's UTF-8 encoder: 500 UnicodeEncodeError
    "lone-surrogate": encode({"messages": [{"role": "user", "content": "\ud800"}]}),
    "lone-surrogate-in-part": encode(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}
    ),
    "lone-surrogate-in-stop": encode(
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["\udc80"]}
    ),
    # 5,000 nested arrays: RecursionError in json.loads, 500
    "deep-nesting": b'{"messages": [{"role": "user", "content": "hi"}], "x": '
    + nested(5000, "list").encode()
    + b"}",
    # an integer of more than 4,300 digits: ValueError from int parsing, 500
    "huge-integer": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
    + b"9" * 4400
    + b"}",
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_case_gets_a_4xx(name: str) -> None:
    body = FOUND[name]
    settings_ = ServerSettings(max_request_bytes=1 << 20, max_tokens_limit=MAX_TOKENS)
    with TestClient(
        create_app(Utf8EchoModel(), settings=settings_, api_key=""), raise_server_exceptions=False
    ) as c:
        resp = c.post(URL, content=body, headers={"content-type": "application/json"})
        check_error(resp)
        assert resp.status_code == 400
        check_still_serving(c)


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_found_line_separator_in_a_streamed_answer_stays_in_one_event(
    client: TestClient, char: str
) -> None:
    # found by fuzzing: the echoed U+2028 split an event's JSON for line-splitting clients
    body = {"messages": [{"role": "user", "content": f"a{char}b"}], "stream": True}
    with client.stream("POST", URL, json=body) as resp:
        lines = [line for line in resp.iter_lines() if line]
    check_events(lines)
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in lines[:-1]
        if json.loads(line[6:])["choices"]
    )
    assert text == f"echo: a{char}b"


def test_non_finite_model_metadata_is_sent_as_null() -> None:
    # a student with broken weights reports confidence NaN: JSON cannot carry it
    app = create_app(Utf8EchoModel(confidence=float("nan")), api_key="")
    with TestClient(app, raise_server_exceptions=False) as c:
        body = c.post(URL, json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert body["understudy"]["confidence"] is None
        stream = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with c.stream("POST", URL, json=stream) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    final = json.loads(events[-2])
    assert final["understudy"]["confidence"] is None
