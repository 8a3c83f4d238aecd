"""ResilientTeacher (retries, backoff, timeout, circuit breaker, budget) with fake clocks, teacher
construction from settings, and the privacy policy."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_understudy.config import TeacherSettings
from langchain_understudy.errors import ConfigError, TeacherUnavailableError
from langchain_understudy.router import PrivacyPolicy, ResilientTeacher, teacher_from_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    async def asleep(self, s: float) -> None:
        self.sleep(s)


class Flaky(BaseChatModel):
    """Fails the first ``fail`` calls, then answers."""

    fail: int = 0
    delay_s: float = 0.0
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "flaky"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.calls <= self.fail:
            raise ConnectionError(f"connection refused (call {self.calls})")
        return ChatResult(generations=[ChatGeneration(message=AIMessage("ok"))])


def _guard(model: BaseChatModel, clock: Clock, **kw: Any) -> ResilientTeacher:
    kw.setdefault("backoff_s", 0.5)
    return ResilientTeacher(model, clock=clock, sleep=clock.sleep, async_sleep=clock.asleep, **kw)


MSG = [HumanMessage("hi")]


def test_retries_with_exponential_backoff_then_succeeds() -> None:
    clock = Clock()
    model = Flaky(fail=2)
    t = _guard(model, clock, max_retries=3, max_backoff_s=8.0)
    assert t.invoke(MSG).content == "ok"
    assert model.calls == 3
    assert clock.sleeps == [0.5, 1.0]
    assert t.circuit_state == "closed" and t.attempts == 3


def test_backoff_is_capped() -> None:
    clock = Clock()
    t = _guard(Flaky(fail=10), clock, max_retries=4, max_backoff_s=1.5, failure_threshold=10)
    with pytest.raises(TeacherUnavailableError, match="failed 5 time"):
        t.invoke(MSG)
    assert clock.sleeps == [0.5, 1.0, 1.5, 1.5]


def test_gives_up_with_the_last_error() -> None:
    clock = Clock()
    t = _guard(Flaky(fail=10), clock, max_retries=1, failure_threshold=10)
    with pytest.raises(
        TeacherUnavailableError, match=r"ConnectionError: connection refused \(call 2\)"
    ):
        t.invoke(MSG)


def test_timeout_counts_as_failure() -> None:
    clock = Clock()
    t = _guard(Flaky(delay_s=0.5), clock, timeout_s=0.05, max_retries=0)
    start = time.perf_counter()
    with pytest.raises(TeacherUnavailableError, match="timed out after 0.05s"):
        t.invoke(MSG)
    assert time.perf_counter() - start < 0.4


def test_circuit_opens_refuses_then_half_opens_and_closes() -> None:
    clock = Clock()
    model = Flaky(fail=3)
    t = _guard(model, clock, max_retries=0, failure_threshold=3, reset_after_s=30)
    for _ in range(3):
        with pytest.raises(TeacherUnavailableError):
            t.invoke(MSG)
    assert t.circuit_state == "open"
    with pytest.raises(TeacherUnavailableError, match="circuit open after 3 consecutive"):
        t.invoke(MSG)
    assert model.calls == 3  # refused without calling
    assert "circuit open" in (t.blocked_reason() or "")
    clock.now += 30
    assert t.circuit_state == "half-open"
    assert t.invoke(MSG).content == "ok"  # the trial call succeeds
    assert t.circuit_state == "closed"


def test_failed_probe_reopens_the_circuit() -> None:
    clock = Clock()
    t = _guard(Flaky(fail=10), clock, max_retries=0, failure_threshold=2, reset_after_s=10)
    for _ in range(2):
        with pytest.raises(TeacherUnavailableError):
            t.invoke(MSG)
    clock.now += 10
    with pytest.raises(TeacherUnavailableError, match="ConnectionError"):
        t.invoke(MSG)  # the half-open probe fails
    assert t.circuit_state == "open"


def test_circuit_opening_stops_retries() -> None:
    clock = Clock()
    model = Flaky(fail=10)
    t = _guard(model, clock, max_retries=5, failure_threshold=2)
    with pytest.raises(TeacherUnavailableError, match="circuit open.*last error: ConnectionError"):
        t.invoke(MSG)
    assert model.calls == 2


def test_budget_per_minute_and_day() -> None:
    clock = Clock()
    model = FakeListChatModel(responses=["a"])
    t = _guard(model, clock, calls_per_minute=2, calls_per_day=3)
    t.invoke(MSG)
    t.invoke(MSG)
    with pytest.raises(TeacherUnavailableError, match="2 calls in the last minute"):
        t.invoke(MSG)
    clock.now += 60
    t.invoke(MSG)
    clock.now += 60
    with pytest.raises(TeacherUnavailableError, match="3 calls in the last 24 hours"):
        t.invoke(MSG)
    assert "budget exhausted" in (t.blocked_reason() or "")
    clock.now += 86_400
    assert t.blocked_reason() is None
    t.invoke(MSG)


def test_retries_count_against_the_budget() -> None:
    clock = Clock()
    model = Flaky(fail=5)
    t = _guard(model, clock, max_retries=5, calls_per_minute=2, failure_threshold=10)
    with pytest.raises(TeacherUnavailableError, match="budget exhausted.*last error"):
        t.invoke(MSG)
    assert model.calls == 2


async def test_async_retries_and_timeout() -> None:
    clock = Clock()
    model = Flaky(fail=1)
    t = _guard(model, clock, max_retries=2)
    msg = await t.ainvoke(MSG)
    assert msg.content == "ok" and clock.sleeps == [0.5]

    class Slow(Flaky):
        async def _agenerate(self, *a: Any, **k: Any) -> ChatResult:
            await asyncio.sleep(1.0)
            return ChatResult(generations=[ChatGeneration(message=AIMessage("late"))])

    slow = _guard(Slow(), Clock(), timeout_s=0.05, max_retries=0)
    with pytest.raises(TeacherUnavailableError, match="timed out"):
        await slow.ainvoke(MSG)


def test_invalid_limits() -> None:
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        ResilientTeacher(Flaky(), timeout_s=0)


def test_teacher_from_settings_none_and_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    assert teacher_from_settings(TeacherSettings(kind="none")) is None
    monkeypatch.delenv("MY_KEY", raising=False)
    remote = TeacherSettings(
        kind="openai", api_key_env="MY_KEY", base_url="https://api.example.com/v1"
    )
    with pytest.raises(ConfigError, match="set the environment variable MY_KEY"):
        teacher_from_settings(remote)
    local = TeacherSettings(
        kind="openai", api_key_env="MY_KEY", base_url="http://127.0.0.1:8000/v1", model="m"
    )
    model = teacher_from_settings(local)
    assert model is not None and model.max_retries == 0  # type: ignore[attr-defined]
    monkeypatch.setenv("MY_KEY", "sk-test")
    model = teacher_from_settings(remote)
    assert model.openai_api_key.get_secret_value() == "sk-test"  # type: ignore[union-attr]
    guarded = ResilientTeacher.from_settings(
        TeacherSettings(kind="openai", api_key_env="MY_KEY", calls_per_minute=5, timeout_s=3)
    )
    assert guarded is not None and guarded.timeout_s == 3.0 and guarded.model_name == "gpt-4o-mini"


def test_teacher_from_settings_gguf_and_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="needs teacher.path"):
        teacher_from_settings(TeacherSettings(kind="gguf"))
    (tmp_path / "my_teachers.py").write_text(
        "from langchain_core.language_models.fake_chat_models import FakeListChatModel\n"
        "def make():\n    return FakeListChatModel(responses=['from factory'])\n"
        "def wrong():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_teachers", None)
    model = teacher_from_settings(TeacherSettings(kind="import", factory="my_teachers:make"))
    assert model is not None and model.invoke("x").content == "from factory"
    with pytest.raises(ConfigError, match="must return a LangChain BaseChatModel"):
        teacher_from_settings(TeacherSettings(kind="import", factory="my_teachers:wrong"))
    with pytest.raises(ConfigError, match="cannot load teacher factory"):
        teacher_from_settings(TeacherSettings(kind="import", factory="my_teachers:nope"))
    with pytest.raises(ConfigError, match="needs teacher.factory"):
        teacher_from_settings(TeacherSettings(kind="import"))


def test_privacy_policy() -> None:
    p = PrivacyPolicy()
    assert p.check([HumanMessage("What does Pro cost?")]) is None
    assert "email" in (p.check([HumanMessage("I am ana@example.org")]) or "")
    assert "card" in (p.check([AIMessage("your card 4111 1111 1111 1111")]) or "")
    assert "'private'" in (p.check([HumanMessage("hi")], tags=["private"]) or "")
    # the application's own system prompt is not scanned
    assert p.check([SystemMessage("Support: help@acme.com"), HumanMessage("hi")]) is None
    assert PrivacyPolicy(block_pii=False).check([HumanMessage("ana@example.org")]) is None
    with pytest.raises(ConfigError, match="pii_kinds"):
        PrivacyPolicy(pii_kinds=["passport"])
