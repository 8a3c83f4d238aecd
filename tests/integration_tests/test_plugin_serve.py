"""`understudy serve` on loopback with a real GGUF student: the official `openai` client,
`langchain-openai`'s `ChatOpenAI`, streaming, malformed requests, auth and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import COLORS
from langchain_core.language_models import FakeListChatModel
from langchain_openai import ChatOpenAI

from langchain_understudy.config import ServerSettings
from langchain_understudy.plugin.server import ServerThread, create_app
from langchain_understudy.router import ChatUnderstudy
from langchain_understudy.students import ChatStudent

pytestmark = pytest.mark.slow

QUESTION = "What color is the chair 8? It is yellow."


TEACHER_ANSWER = "the teacher's answer"


def understudy(model_path: Path, **student: Any) -> ChatUnderstudy:
    """A GGUF student routed by ``ChatUnderstudy`` before generation, with a canned teacher."""
    options: dict[str, Any] = {"n_ctx": 256, "max_tokens": 8, "n_parallel": 2, **student}
    teacher = FakeListChatModel(responses=[TEACHER_ANSWER] * 100)
    return ChatUnderstudy(
        student=ChatStudent(model_path=model_path, **options), teacher=teacher, mode="pre"
    )


@contextmanager
def serving(llm: Any, **limits: Any) -> Iterator[ServerThread]:
    """``understudy serve`` on a free loopback port, without authentication."""
    settings = ServerSettings(**{"max_request_bytes": 4096, "max_tokens_limit": 64, **limits})
    with ServerThread(create_app(llm, settings=settings, api_key="")) as srv:
        yield srv


def openai_client(server: ServerThread) -> openai.OpenAI:
    """The official client pointed at ``server``."""
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=60, max_retries=0)


def chat_openai(server: ServerThread) -> ChatOpenAI:
    """``langchain-openai``'s chat model pointed at ``server``."""
    return ChatOpenAI(base_url=server.base_url, api_key="unused", model="understudy",  # type: ignore[arg-type]
                      max_retries=0, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def llm(trained_gguf: Path) -> ChatUnderstudy:
    return understudy(trained_gguf)


@pytest.fixture(scope="module")
def server(llm: ChatUnderstudy) -> Iterator[ServerThread]:
    with serving(llm) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai_client(server)


def test_openai_client_lists_models_and_completes(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["understudy"]
    resp = client.chat.completions.create(
        model="understudy", messages=[{"role": "user", "content": QUESTION}], max_tokens=8
    )
    assert resp.choices[0].message.content.strip() in COLORS
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage is not None and resp.usage.prompt_tokens > 0
    routing = (resp.model_extra or {})["understudy"]
    assert routing["answered_by"] == "student" and "threshold" in routing["reason"]


def test_openai_client_streams_the_same_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="understudy", messages=messages)
    stream = client.chat.completions.create(
        model="understudy", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_openai_invokes_and_streams(server: ServerThread) -> None:
    chat = chat_openai(server)
    msg = chat.invoke(QUESTION)
    assert str(msg.content).strip() in COLORS
    streamed = "".join(str(c.content) for c in chat.stream(QUESTION))
    assert streamed == msg.content


def test_follow_up_escalates_to_the_teacher_and_metrics_count_it(
    client: openai.OpenAI, server: ServerThread
) -> None:
    student = client.chat.completions.create(  # one the student answers, whatever ran before
        model="understudy", messages=[{"role": "user", "content": QUESTION}], max_tokens=8
    )
    assert (student.model_extra or {})["understudy"]["answered_by"] == "student"
    resp = client.chat.completions.create(
        model="understudy",
        messages=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "yellow"},
            {"role": "user", "content": "and the other one, same again?"},
        ],
    )
    assert resp.choices[0].message.content == TEACHER_ANSWER
    assert (resp.model_extra or {})["understudy"]["answered_by"] == "teacher"
    metrics = httpx.get(server.base_url.replace("/v1", "/metrics"), timeout=10).text
    rate = float(next(line.split()[1] for line in metrics.splitlines()
                      if line.startswith("understudy_teacher_call_rate ")))  # fmt: skip
    assert 0.0 < rate < 1.0
    assert 'understudy_answers_total{answered_by="teacher"}' in metrics
    assert "understudy_chat_completion_seconds_bucket" in metrics


def _samples(server: ServerThread) -> dict[str, float]:
    text = httpx.get(server.base_url.replace("/v1", "/metrics"), timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("understudy_engine_")}  # fmt: skip


def test_metrics_show_the_student_engine(
    client: openai.OpenAI, server: ServerThread, llm: ChatUnderstudy
) -> None:
    before = _samples(server)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: client.chat.completions.create(
            model="understudy", messages=[{"role": "user", "content": q}], max_tokens=8),
            [QUESTION, "what colour is the sky?", QUESTION + " now", "hello"]))  # fmt: skip
    after = _samples(server)
    assert after["understudy_engine_slots"] == llm.current_student().n_parallel  # type: ignore[attr-defined]
    assert after["understudy_engine_active_sequences"] == 0  # all four have left their slots
    assert after["understudy_engine_waiting_requests"] == 0
    made = sum(a.usage.completion_tokens for a in answers if a.usage is not None)
    generated = "understudy_engine_generated_tokens_total"
    assert after[generated] - before.get(generated, 0) >= made > 0
    steps = "understudy_engine_decode_steps_total"
    assert after[steps] > before.get(steps, 0)
    tokens = "understudy_engine_tokens_total"
    assert after[tokens] - before.get(tokens, 0) > after[generated] - before.get(generated, 0)
    seconds = "understudy_engine_decode_seconds_total"
    assert after[seconds] > before.get(seconds, 0)


def test_malformed_requests_get_4xx_never_500(client: openai.OpenAI, server: ServerThread) -> None:
    url = server.base_url + "/chat/completions"
    cases = [
        (b"{", 400),
        (json.dumps({"messages": "hi"}).encode(), 400),
        (json.dumps({"messages": [{"role": "user"}], "max_tokens": 10_000}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 413),
    ]
    with httpx.Client(timeout=10) as http:
        for body, status in cases:
            resp = http.post(url, content=body, headers={"content-type": "application/json"})
            assert resp.status_code == status, resp.text
            assert resp.json()["error"]["message"]
        assert http.get(server.base_url + "/nope").status_code == 404
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="understudy", messages=[{"role": "user", "content": "hi"}], max_tokens=65
        )


def test_api_key_is_enforced(llm: ChatUnderstudy) -> None:
    with ServerThread(create_app(llm, api_key="k3y")) as srv:
        bad = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.base_url, api_key="k3y", max_retries=0, timeout=30)
        assert good.models.list().data[0].id == "understudy"
        assert (
            httpx.get(srv.base_url.replace("/v1", "/healthz"), timeout=10).json()["status"] == "ok"
        )
