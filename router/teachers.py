"""Teachers: built from configuration, guarded by timeouts, retries, a circuit breaker and a budget.

:func:`teacher_from_settings` turns a :class:`~langchain_understudy.config.TeacherSettings` into a
LangChain chat model: ``openai`` (any OpenAI-compatible endpoint through ``langchain-openai``, the
key read from an environment variable), ``gguf`` (a larger local GGUF through
:class:`~langchain_understudy.students.ChatStudent`) or ``import`` (``module:factory``).

:class:`ResilientTeacher` wraps any chat model so that a slow, failing or expensive teacher never
takes the application down: each attempt has a timeout, failed attempts are retried with exponential
backoff, consecutive failures open a circuit breaker for a while, and calls per minute and per day
are capped. When the teacher cannot be used it raises
:class:`~langchain_understudy.errors.TeacherUnavailableError`, which ``ChatUnderstudy`` turns into a
student answer marked ``escalation_blocked``.

:class:`PrivacyPolicy` decides which conversations must never reach the teacher at all (personal
data detected, or a private run tag).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import importlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage

from langchain_understudy.errors import ConfigError, TeacherUnavailableError
from langchain_understudy.prompting import message_text, model_name_of
from langchain_understudy.redact import BUILTIN_KINDS, Redactor

if TYPE_CHECKING:
    from langchain_core.callbacks import Callbacks

    from langchain_understudy.config import RouterSettings, TeacherSettings

__all__ = [
    "PrivacyPolicy",
    "ResilientTeacher",
    "model_name_of",
    "teacher_from_settings",
]

logger = logging.getLogger(__name__)

#: Kinds of personal data the privacy rules look for (those the shared redactor knows).
PII_KINDS: tuple[str, ...] = tuple(k.lower() for k in BUILTIN_KINDS)

_MINUTE = 60.0
_DAY = 86_400.0


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def teacher_from_settings(settings: TeacherSettings) -> BaseChatModel | None:
    """Build the teacher chat model a :class:`TeacherSettings` describes (``None`` for ``none``).

    Raises:
        ConfigError: a required setting is missing, the API key variable is unset for a remote
            endpoint, or an ``import`` factory cannot be loaded or returns something else than a
            chat model.

    Example:
        >>> from langchain_understudy.config import TeacherSettings
        >>> teacher_from_settings(TeacherSettings(kind="none")) is None
        True
    """
    kind = settings.kind
    if kind == "none":
        return None
    if kind == "openai":
        from langchain_understudy._extras import require

        require("openai", "the OpenAI teacher (teacher.kind = 'openai')")
        from langchain_openai import ChatOpenAI

        key = os.environ.get(settings.api_key_env)
        if not key:
            if settings.base_url is None or not _is_loopback(settings.base_url):
                msg = (
                    f"the teacher needs an API key: set the environment variable "
                    f"{settings.api_key_env} (teacher.api_key_env names it)"
                )
                raise ConfigError(msg)
            key = "not-needed"  # local servers (llama.cpp, vLLM, Ollama) accept any key
        # Retries are ResilientTeacher's job: one place counts attempts against the budget.
        return ChatOpenAI(
            model=settings.model,
            base_url=settings.base_url,
            api_key=key,  # type: ignore[arg-type]
            timeout=settings.timeout_s,
            max_retries=0,
            temperature=0.0,
        )
    if kind == "gguf":
        if settings.path is None:
            msg = "teacher.kind = 'gguf' needs teacher.path, the GGUF file of the larger model"
            raise ConfigError(msg)
        from langchain_understudy.students import ChatStudent

        return ChatStudent(model_path=settings.path, model=settings.path.name)
    if kind == "import":
        if not settings.factory:
            msg = "teacher.kind = 'import' needs teacher.factory = 'module:callable'"
            raise ConfigError(msg)
        module_name, _, attr = settings.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            msg = f"cannot load teacher factory {settings.factory!r} ({e}); check the module path"
            raise ConfigError(msg) from e
        model = factory()
        if not isinstance(model, BaseChatModel):
            msg = (
                f"teacher factory {settings.factory!r} returned {type(model).__name__}; it must "
                "return a LangChain BaseChatModel"
            )
            raise ConfigError(msg)
        return model
    msg = f"teacher.kind must be none, openai, gguf or import, got {kind!r}"
    raise ConfigError(msg)


class _Budget:
    """Sliding windows of call times: at most ``limit`` calls in any ``window`` seconds."""

    def __init__(self, limit: int | None, window: float, label: str) -> None:
        self.limit = limit
        self.window = window
        self.label = label
        self.calls: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        while self.calls and now - self.calls[0] >= self.window:
            self.calls.popleft()

    def exhausted(self, now: float) -> str | None:
        if self.limit is None:
            return None
        self._trim(now)
        if len(self.calls) >= self.limit:
            wait = self.window - (now - self.calls[0])
            return (
                f"teacher budget exhausted: {len(self.calls)} calls in the last {self.label} "
                f"(limit {self.limit}); next call allowed in {wait:.0f}s"
            )
        return None

    def record(self, now: float) -> None:
        if self.limit is not None:
            self.calls.append(now)


class ResilientTeacher:
    """A teacher chat model behind a timeout, retries, a circuit breaker and a call budget.

    Every *attempt* counts against the budget (each one is a paid call). Attempt ``i`` (0-based)
    that fails is followed by a pause of ``min(backoff_s * 2**i, max_backoff_s)`` seconds, up to
    ``max_retries`` retries. After ``failure_threshold`` consecutive failed attempts the circuit
    opens: calls are refused at once for ``reset_after_s`` seconds, then one trial call is let
    through (half-open) and its outcome closes or re-opens the circuit.

    Args:
        model: Any LangChain chat model.
        timeout_s: Limit on one attempt.
        max_retries: Retries after the first attempt.
        backoff_s: First pause between attempts.
        max_backoff_s: Longest pause.
        failure_threshold: Consecutive failed attempts that open the circuit.
        reset_after_s: How long the circuit stays open.
        calls_per_minute: Budget per rolling minute (``None``: unlimited).
        calls_per_day: Budget per rolling 24 hours (``None``: unlimited).
        clock: Monotonic clock in seconds (injectable for tests).
        sleep: Blocking sleep (injectable for tests).
        async_sleep: Async sleep (injectable for tests).

    Example:
        >>> from langchain_core.language_models.fake_chat_models import FakeListChatModel
        >>> teacher = ResilientTeacher(FakeListChatModel(responses=["Paris."]), calls_per_minute=10)
        >>> teacher.invoke([("user", "Capital of France?")]).content
        'Paris.'
    """

    def __init__(
        self,
        model: BaseChatModel,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        failure_threshold: int = 3,
        reset_after_s: float = 30.0,
        calls_per_minute: int | None = None,
        calls_per_day: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or failure_threshold < 1 or reset_after_s < 0:
            msg = (
                "timeout_s must be > 0, max_retries >= 0, failure_threshold >= 1 and "
                f"reset_after_s >= 0; got {timeout_s}, {max_retries}, {failure_threshold}, "
                f"{reset_after_s}"
            )
            raise ConfigError(msg)
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.failure_threshold = int(failure_threshold)
        self.reset_after_s = float(reset_after_s)
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._lock = threading.Lock()
        self._budgets = (
            _Budget(calls_per_minute, _MINUTE, "minute"),
            _Budget(calls_per_day, _DAY, "24 hours"),
        )
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.attempts = 0
        """Attempts made so far (successful or not)."""

    @classmethod
    def from_settings(cls, settings: TeacherSettings, **kwargs: Any) -> ResilientTeacher | None:
        """Build and guard the teacher of ``settings`` (``None`` when ``kind = "none"``)."""
        model = teacher_from_settings(settings)
        if model is None:
            return None
        params: dict[str, Any] = {
            "timeout_s": settings.timeout_s,
            "max_retries": settings.max_retries,
            "calls_per_minute": settings.calls_per_minute,
            "calls_per_day": settings.calls_per_day,
        }
        for name in ("backoff_s", "max_backoff_s", "failure_threshold", "reset_after_s"):
            if hasattr(settings, name):
                params[name] = getattr(settings, name)
        params.update(kwargs)
        return cls(model, **params)

    @property
    def model_name(self) -> str:
        """The wrapped model's name."""
        return model_name_of(self.model)

    @property
    def circuit_state(self) -> str:
        """``"closed"`` (normal), ``"open"`` (refusing) or ``"half-open"`` (one trial allowed)."""
        with self._lock:
            return self._state(self._clock())

    def _state(self, now: float) -> str:
        if self._opened_at is None:
            return "closed"
        if now - self._opened_at >= self.reset_after_s:
            return "half-open"
        return "open"

    def blocked_reason(self) -> str | None:
        """Why a call would be refused right now (circuit open, budget spent), or ``None``."""
        with self._lock:
            return self._blocked(self._clock(), claim=False)

    def _blocked(self, now: float, *, claim: bool) -> str | None:
        state = self._state(now)
        if state == "open":
            assert self._opened_at is not None
            wait = self.reset_after_s - (now - self._opened_at)
            return (
                f"teacher circuit open after {self._failures} consecutive failures; "
                f"next try in {wait:.0f}s"
            )
        if state == "half-open" and self._probing:
            return "teacher circuit half-open: a trial call is in flight"
        for b in self._budgets:
            reason = b.exhausted(now)
            if reason:
                return reason
        if claim:
            if state == "half-open":
                self._probing = True
            for b in self._budgets:
                b.record(now)
            self.attempts += 1
        return None

    def _success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def _failure(self) -> None:
        with self._lock:
            self._failures += 1
            was_probe = self._probing
            self._probing = False
            if was_probe or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff_s * (2.0**attempt), self.max_backoff_s))

    def _claim(self) -> str | None:
        with self._lock:
            return self._blocked(self._clock(), claim=True)

    def invoke(
        self,
        messages: Sequence[BaseMessage] | Any,
        *,
        stop: list[str] | None = None,
        callbacks: Callbacks = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """Ask the teacher, retrying with backoff.

        Raises:
            TeacherUnavailableError: the circuit is open, the budget is spent, or every attempt
                failed or timed out; the message says which.
        """
        last = ""
        for attempt in range(self.max_retries + 1):
            refused = self._claim()
            if refused:
                raise TeacherUnavailableError(refused + (f"; last error: {last}" if last else ""))
            try:
                out = _run_with_timeout(
                    lambda: self.model.invoke(
                        messages,
                        config={"callbacks": callbacks, "tags": tags or []},
                        stop=stop,
                        **kwargs,
                    ),
                    self.timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - any teacher failure is retried, then reported
                last = _describe(e, self.timeout_s)
                logger.warning("teacher attempt %d failed: %s", attempt + 1, last)
                self._failure()
                if attempt < self.max_retries:
                    self._sleep(self._delay(attempt))
                continue
            self._success()
            return _as_ai_message(out)
        msg = f"teacher failed {self.max_retries + 1} time(s); last error: {last}"
        raise TeacherUnavailableError(msg)

    async def ainvoke(
        self,
        messages: Sequence[BaseMessage] | Any,
        *,
        stop: list[str] | None = None,
        callbacks: Callbacks = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """Async :meth:`invoke`."""
        last = ""
        for attempt in range(self.max_retries + 1):
            refused = self._claim()
            if refused:
                raise TeacherUnavailableError(refused + (f"; last error: {last}" if last else ""))
            try:
                out = await asyncio.wait_for(
                    self.model.ainvoke(
                        messages,
                        config={"callbacks": callbacks, "tags": tags or []},
                        stop=stop,
                        **kwargs,
                    ),
                    timeout=self.timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - any teacher failure is retried, then reported
                last = _describe(e, self.timeout_s)
                logger.warning("teacher attempt %d failed: %s", attempt + 1, last)
                self._failure()
                if attempt < self.max_retries:
                    await self._async_sleep(self._delay(attempt))
                continue
            self._success()
            return _as_ai_message(out)
        msg = f"teacher failed {self.max_retries + 1} time(s); last error: {last}"
        raise TeacherUnavailableError(msg)


def _describe(e: BaseException, timeout_s: float) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout_s:g}s"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def _as_ai_message(out: Any) -> AIMessage:
    if isinstance(out, AIMessage):
        return out
    if isinstance(out, BaseMessage):
        return AIMessage(content=out.content, response_metadata=dict(out.response_metadata))
    return AIMessage(content=str(out))


def _run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` in a daemon thread (keeping context variables); give up after ``timeout_s``.

    A timed-out call keeps running in the background until the client's own timeout ends it; the
    thread is a daemon so it never holds the process open.
    """
    ctx = contextvars.copy_context()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = ctx.run(fn)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="understudy-teacher").start()
    if not done.wait(timeout_s):
        msg = f"teacher call exceeded {timeout_s:g}s"
        raise TimeoutError(msg)
    if "error" in box:
        raise box["error"]
    return box["value"]


class PrivacyPolicy:
    """Which conversations must never leave the machine.

    Args:
        block_pii: Forbid escalation when personal data is found in a user, assistant or tool
            message (system prompts are the application's own text and are not scanned).
        private_tags: Run tags that forbid escalation.
        pii_kinds: Kinds of personal data to look for (``email``, ``phone``, ``card``, ``iban``).

    Example:
        >>> from langchain_core.messages import HumanMessage
        >>> PrivacyPolicy().check([HumanMessage("write to ana@example.org")], tags=[])
        'personal data detected (email); the conversation stays on this machine'
    """

    def __init__(
        self,
        *,
        block_pii: bool = True,
        private_tags: Iterable[str] = ("private",),
        pii_kinds: Iterable[str] = PII_KINDS,
    ) -> None:
        self.block_pii = block_pii
        self.private_tags = tuple(private_tags)
        kinds = tuple(pii_kinds)
        unknown = sorted(set(kinds) - set(PII_KINDS))
        if unknown:
            msg = f"pii_kinds must be among {list(PII_KINDS)}, got {unknown}"
            raise ConfigError(msg)
        self.pii_kinds = kinds
        self._detector = Redactor(builtins=[k.upper() for k in kinds])

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> PrivacyPolicy:
        """Build the policy a :class:`~langchain_understudy.config.RouterSettings` describes."""
        return cls(block_pii=settings.block_pii, private_tags=settings.private_tags)

    def check(self, messages: Sequence[BaseMessage], tags: Iterable[str] = ()) -> str | None:
        """Return why escalation is forbidden for this conversation, or ``None``."""
        tag_set = set(tags)
        for t in self.private_tags:
            if t in tag_set:
                return f"run tagged {t!r}; the conversation stays on this machine"
        if self.block_pii:
            kinds: list[str] = []
            for m in messages:
                if isinstance(m, SystemMessage):
                    continue
                for hit in self._detector.find(message_text(m)):
                    if hit.kind.lower() not in kinds:
                        kinds.append(hit.kind.lower())
            if kinds:
                return (
                    f"personal data detected ({', '.join(kinds)}); "
                    "the conversation stays on this machine"
                )
        return None
