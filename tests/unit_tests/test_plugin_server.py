"""The OpenAI-compatible server with a fake model: protocol, limits, errors, auth, metrics."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from prometheus_client.parser import text_string_to_metric_families

from langchain_understudy.config import ServerSettings
from langchain_understudy.errors import ConfigError, StudentError
from langchain_understudy.plugin.server import ServerMetrics, check_bind, create_app, is_loopback
from langchain_understudy.prompting import message_text


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
        (json.dumps(_chat(tools=[{"type": "function"}])).encode(), 400, "tools"),
        (json.dumps(_chat(response_format={"type": "json_object"})).encode(), 400,
         "response_format"),
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
