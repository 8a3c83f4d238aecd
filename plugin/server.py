r"""``understudy serve``: an OpenAI-compatible HTTP API over the routed understudy.

Endpoints: ``POST /v1/chat/completions`` (with and without ``stream``), ``GET /v1/models``,
``GET /healthz`` and ``GET /metrics`` (Prometheus text format rendered by ``prometheus-client``:
request counts, a latency histogram, who answered, the teacher-call rate and the student's
decoding engine: slots, sequences decoding and waiting, steps and tokens; for a registry student,
shadow and canary checks, rollout events and drift). Any OpenAI client
can point its ``base_url`` at ``http://127.0.0.1:8321/v1``.

Tool calling and structured output are served as OpenAI defines them: ``tools``, ``tool_choice``
(``auto``, ``none``, ``required`` or a named function), ``parallel_tool_calls`` and the deprecated
``functions``/``function_call`` reach the model as ``tools=``/``tool_choice=`` (a student decodes
its calls under a grammar built from the tools' schemas); ``response_format`` ``json_object`` and
``json_schema`` reach it as ``json_schema=``. Answers carry ``message.tool_calls`` and
``finish_reason: "tool_calls"``; streams send ``delta.tool_calls`` as OpenAI does (id and name on
a call's first chunk, fragments of its arguments after). Assistant messages with ``tool_calls``
and ``tool`` messages answering them by ``tool_call_id`` are accepted in the conversation.

Safety: the server binds 127.0.0.1 by default and refuses any other address unless the API key
variable (``server.api_key_env``, default ``UNDERSTUDY_API_KEY``) is set, in which case every
``/v1`` and ``/metrics`` request must carry ``Authorization: Bearer <key>``. Request bodies and
``max_tokens`` are capped. Malformed requests get OpenAI-style 4xx JSON errors
(``{"error": {"message", "type", "param", "code"}}``), never a 500 or a hang: bodies that are not
UTF-8 JSON objects, JSON nested deeper than :data:`MAX_JSON_DEPTH` levels, and strings holding a
lone UTF-16 surrogate (a JSON ``\ud800`` escape without its low half, which no UTF-8 text can
carry) are refused with a 400 naming the offending field.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import numbers
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolCallChunk,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from langchain_understudy.config import ServerSettings
from langchain_understudy.errors import (
    ConfigError,
    StudentError,
    TeacherUnavailableError,
    UnderstudyError,
)

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_JSON_DEPTH",
    "ServerMetrics",
    "ServerThread",
    "check_bind",
    "create_app",
    "is_loopback",
    "serve",
]

logger = logging.getLogger(__name__)

#: Upper bounds (seconds) of the latency histogram buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: Deepest nesting of arrays and objects accepted in a request body.
MAX_JSON_DEPTH = 64

_ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/healthz", "/metrics")


# -- bind safety ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, api_key_env: str = "UNDERSTUDY_API_KEY") -> None:
    """Refuse a non-loopback bind address unless an API key is set.

    Raises:
        ConfigError: ``host`` is reachable from other machines and no key protects it.
    """
    if not is_loopback(host) and not api_key:
        msg = (
            f"refusing to listen on {host!r} without an API key: anyone on the network could use "
            f"the model. Set the environment variable {api_key_env} (clients then send "
            f"'Authorization: Bearer <key>'), or bind 127.0.0.1"
        )
        raise ConfigError(msg)


# -- metrics --------------------------------------------------------------------------------------------


class ServerMetrics(Collector):
    """Counters and a latency histogram, exposed through ``prometheus-client``.

    The counts live here (one lock, no global state, so several apps in one process keep their
    own); :meth:`collect` turns them into metric families and :meth:`render` writes them in the
    Prometheus text format with ``prometheus_client.generate_latest``.

    Example:
        >>> m = ServerMetrics()
        >>> m.observe_request("/v1/models", 200)
        >>> "understudy_http_requests_total" in m.render()
        True
    """

    def __init__(
        self,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
        engine: Callable[[], Any] | None = None,
        rollout: Callable[[], Any] | None = None,
    ) -> None:
        self.buckets = tuple(sorted(buckets))
        self.engine = engine
        """Returns the serving student's ``EngineStats`` (``None``: no engine yet)."""
        self.rollout = rollout
        """Returns ``LiveRollout.metrics()`` (``None``: not a registry student)."""
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.bucket_counts = [0] * len(self.buckets)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.answers: Counter[str] = Counter()
        self.finishes: Counter[str] = Counter()
        self.blocked = 0
        self.in_flight = 0
        self.started = time.time()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe_request(self, path: str, status: int) -> None:
        """Count one HTTP request."""
        endpoint = path if path in _ENDPOINTS else "other"
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def observe_completion(
        self, seconds: float, meta: Mapping[str, Any] | None, finish_reason: str | None = None
    ) -> None:
        """Record one chat completion's latency, who answered it and why it finished."""
        with self._lock:
            if finish_reason is not None:
                self.finishes[finish_reason] += 1
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    self.bucket_counts[i] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            by = str((meta or {}).get("answered_by") or "unknown")
            self.answers[by] += 1
            if (meta or {}).get("escalation_blocked"):
                self.blocked += 1

    def teacher_call_rate(self) -> float:
        """Share of answered completions that the teacher answered."""
        with self._lock:
            total = sum(self.answers.values())
            return self.answers["teacher"] / total if total else 0.0

    def collect(self) -> Iterator[Metric]:
        """Yield the current values as Prometheus metric families (``Collector`` interface)."""
        rate = self.teacher_call_rate()
        with self._lock:
            requests = CounterMetricFamily(
                "understudy_http_requests",
                "HTTP requests by endpoint and status code.",
                labels=["endpoint", "code"],
            )
            for (endpoint, status), n in sorted(self.requests.items()):
                requests.add_metric([endpoint, str(status)], n)
            # Bucket bounds keep their short form (le="1", not "1.0") for existing dashboards.
            buckets = [
                (f"{bound:g}", n) for bound, n in zip(self.buckets, self.bucket_counts, strict=True)
            ]
            latency = HistogramMetricFamily(
                "understudy_chat_completion_seconds",
                "Latency of chat completions.",
                buckets=[*buckets, ("+Inf", self.latency_count)],
                sum_value=self.latency_sum,
            )
            answers = CounterMetricFamily(
                "understudy_answers",
                "Chat completions by who answered them.",
                labels=["answered_by"],
            )
            for by in sorted({"student", "teacher", *self.answers}):
                answers.add_metric([by], self.answers[by])
            finishes = CounterMetricFamily(
                "understudy_chat_completions",
                "Chat completions by finish reason (stop, length, tool_calls, function_call).",
                labels=["finish_reason"],
            )
            for reason in sorted({"stop", "length", "tool_calls", *self.finishes}):
                finishes.add_metric([reason], self.finishes[reason])
            blocked = CounterMetricFamily(
                "understudy_escalations_blocked",
                "Escalations that could not reach the teacher (none configured, down, over "
                "budget or private).",
                value=self.blocked,
            )
            in_flight = self.in_flight
        yield requests
        yield latency
        yield answers
        yield finishes
        yield GaugeMetricFamily(
            "understudy_teacher_call_rate",
            "Share of completions answered by the teacher.",
            value=rate,
        )
        yield blocked
        yield GaugeMetricFamily(
            "understudy_in_flight_requests", "Chat completions being answered now.", in_flight
        )
        yield GaugeMetricFamily(
            "understudy_uptime_seconds",
            "Seconds since the server started.",
            time.time() - self.started,
        )
        yield from self._engine_metrics()
        yield from self._rollout_metrics()

    def _rollout_metrics(self) -> Iterator[Metric]:
        """Shadow and canary checks, rollout events and drift, for a registry student."""
        figures = self.rollout() if self.rollout is not None else None
        if figures is None:
            return
        checks = CounterMetricFamily(
            "understudy_rollout_checks",
            "Live checks of shadow and canary candidates.",
            labels=["kind", "candidate"],
        )
        agree = GaugeMetricFamily(
            "understudy_rollout_agreement",
            "Live agreement of a candidate (shadow: with the served answer; canary: with the "
            "teacher).",
            labels=["kind", "candidate"],
        )
        for c in figures["candidates"]:
            checks.add_metric([c["kind"], c["candidate"]], c["n"])
            if c["agreement"] is not None:
                agree.add_metric([c["kind"], c["candidate"]], c["agreement"])
        yield checks
        yield agree
        yield CounterMetricFamily(
            "understudy_rollout_checks_dropped",
            "Checks dropped because the background queue was full.",
            value=figures["dropped"],
        )
        events = CounterMetricFamily(
            "understudy_rollout_events",
            "Canary promotions and rollbacks.",
            labels=["event"],
        )
        for event in sorted({"canary promoted", "canary rolled back", *figures["events"]}):
            events.add_metric([event], figures["events"].get(event, 0))
        yield events
        drift_psi = GaugeMetricFamily(
            "understudy_drift_psi",
            "PSI of a routing signal on live traffic against the student's held-out traces.",
            labels=["version", "signal"],
        )
        drift_ks = GaugeMetricFamily(
            "understudy_drift_ks",
            "Two-sample KS statistic of a routing signal, live against held-out.",
            labels=["version", "signal"],
        )
        alarm = GaugeMetricFamily(
            "understudy_drift_alarm",
            "1 when a routing signal's PSI is at or above the alarm threshold.",
            labels=["version"],
        )
        for version, report in figures["drift"].items():
            for name, row in report["signals"].items():
                if row["psi"] is not None:
                    drift_psi.add_metric([version, name], row["psi"])
                    drift_ks.add_metric([version, name], row["ks"])
            alarm.add_metric([version], 1.0 if report["alarm"] else 0.0)
        yield drift_psi
        yield drift_ks
        yield alarm

    def _engine_metrics(self) -> Iterator[Metric]:
        """The student engine's gauges and counters, once it has loaded its model."""
        stats = self.engine() if self.engine is not None else None
        if stats is None:
            return
        yield GaugeMetricFamily(
            "understudy_engine_slots",
            "Sequences the student decodes together at most.",
            stats.slots,
        )
        yield GaugeMetricFamily(
            "understudy_engine_active_sequences",
            "Generations in the student's context now.",
            stats.active,
        )
        yield GaugeMetricFamily(
            "understudy_engine_waiting_requests",
            "Generations waiting for a free slot.",
            stats.waiting,
        )
        yield CounterMetricFamily(
            "understudy_engine_decode_steps", "Batches the student has decoded.", value=stats.steps
        )
        yield CounterMetricFamily(
            "understudy_engine_tokens",
            "Tokens the student has decoded, prompt tokens included.",
            value=stats.tokens,
        )
        yield CounterMetricFamily(
            "understudy_engine_decode_seconds",
            "Seconds the student has spent inside llama_decode.",
            value=stats.decode_seconds,
        )
        yield CounterMetricFamily(
            "understudy_engine_generated_tokens",
            "Tokens the student has generated.",
            value=stats.generated,
        )

    def render(self) -> str:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry).decode("utf-8")


# -- request model --------------------------------------------------------------------------------------


class _ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The accepted subset of OpenAI's chat completion request (unknown fields are ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def legacy_functions(self) -> bool:
        """Whether the request uses the deprecated ``functions`` API (answered as ``function_call``)."""
        return bool(self.functions) and not self.tools


def _text(content: str | list[_ContentPart] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _ApiError(
                400,
                f"content part of type {part.type!r} is not supported; send text parts only",
                param=f"{where}.content.{i}.type",
            )
        parts.append(part.text)
    return "".join(parts)


def _to_messages(req: ChatCompletionRequest) -> list[BaseMessage]:
    """The request's messages as LangChain messages.

    An assistant message's ``tool_calls`` (or deprecated ``function_call``) become
    ``AIMessage.tool_calls``; a ``tool`` message must answer one of them by ``tool_call_id`` (a
    ``function`` message by the function's name) and becomes a ``ToolMessage`` named after the tool.
    """
    out: list[BaseMessage] = []
    called: dict[str, str] = {}  # tool_call_id -> tool name, for every call made so far
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        text = _text(m.content, where)
        if m.role in ("system", "developer"):
            out.append(SystemMessage(text))
        elif m.role == "user":
            out.append(HumanMessage(text, name=m.name) if m.name else HumanMessage(text))
        elif m.role == "assistant":
            calls = _request_calls(m, where)
            called.update((str(c["id"]), c["name"]) for c in calls)
            out.append(AIMessage(text, tool_calls=calls))
        elif m.role == "tool":
            if not m.tool_call_id:
                raise _ApiError(400, "a message with role 'tool' needs tool_call_id", param=where)
            if m.tool_call_id not in called:
                raise _ApiError(
                    400,
                    f"{where}: tool_call_id {m.tool_call_id!r:.80} answers no tool call of an "
                    "earlier assistant message; send the assistant message whose tool_calls made "
                    "the call before the tool's result, with the same id",
                    param=f"{where}.tool_call_id",
                )
            name = called[m.tool_call_id]
            out.append(ToolMessage(text, tool_call_id=m.tool_call_id, name=name))
        else:  # "function": a result in the deprecated functions API, matched by name
            ids = [cid for cid, name in called.items() if name == m.name]
            if not ids:
                raise _ApiError(
                    400,
                    f"{where}: a message with role 'function' must carry the name of a function "
                    f"an earlier assistant message called (its function_call.name), got "
                    f"{m.name!r:.80}",
                    param=f"{where}.name",
                )
            out.append(ToolMessage(text, tool_call_id=ids[-1], name=m.name))
    return out


def _request_calls(m: _Message, where: str) -> list[ToolCall]:
    """An assistant message's ``tool_calls`` (or deprecated ``function_call``), validated."""
    if m.tool_calls:
        out: list[ToolCall] = []
        for j, call in enumerate(m.tool_calls):
            at = f"{where}.tool_calls.{j}"
            if not isinstance(call, dict) or call.get("type", "function") != "function":
                raise _ApiError(
                    400,
                    f'{at}: a tool call is {{"id": ..., "type": "function", "function": '
                    '{"name": ..., "arguments": "<JSON object as a string>"}}',
                    param=at,
                )
            call_id = call.get("id")
            if not isinstance(call_id, str) or not call_id:
                raise _ApiError(
                    400,
                    f"{at}.id: a tool call needs its id (a non-empty string); the tool message "
                    "answering it repeats it as tool_call_id",
                    param=f"{at}.id",
                )
            out.append(_request_call(call.get("function"), f"{at}.function", call_id))
        return out
    if m.function_call is not None:
        call_id = f"call_{where.replace('.', '_')}"  # the function message answers by name
        return [_request_call(m.function_call, f"{where}.function_call", call_id)]
    return []


def _request_call(fn: Any, at: str, call_id: str) -> ToolCall:
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _ApiError(
            400,
            f'{at}: must be {{"name": ..., "arguments": "<JSON object as a string>"}}, naming '
            "the function that was called",
            param=f"{at}.name",
        )
    args = _arguments(fn.get("arguments"), f"{at}.arguments")
    return ToolCall(name=fn["name"], args=args, id=call_id, type="tool_call")


def _arguments(value: Any, at: str) -> dict[str, Any]:
    """A tool call's ``arguments`` string parsed to the arguments object (missing or empty: ``{}``)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if not isinstance(value, str):
        raise _ApiError(
            400,
            f"{at}: a tool call's arguments are a JSON object encoded as a string "
            f"(json.dumps(args)), got a JSON {_json_type(value)}",
            param=at,
        )
    try:
        args = json.loads(value)
    except RecursionError:
        raise _ApiError(
            400, f"{at}: the arguments are nested more than {MAX_JSON_DEPTH} levels deep", param=at
        ) from None
    except ValueError as e:
        raise _ApiError(
            400,
            f"{at}: the arguments are not valid JSON ({e}); send json.dumps of the arguments "
            "object",
            param=at,
        ) from None
    if not isinstance(args, dict):
        raise _ApiError(
            400,
            f"{at}: the arguments must encode a JSON object (name -> value), got a JSON "
            f"{_json_type(args)}",
            param=at,
        )
    _check_json(args, at)
    return args


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    kinds = ((dict, "object"), (list, "array"), (str, "string"), ((int, float), "number"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


# -- tools and structured output --------------------------------------------------------------------

_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_FORM = (
    '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
)


def _model_options(req: ChatCompletionRequest) -> dict[str, Any]:
    """Validate the request's tool and output options into chat-model kwargs.

    ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (or the deprecated ``functions`` and
    ``function_call``) become ``tools=``, ``tool_choice=`` and ``parallel_tool_calls=``;
    ``response_format`` becomes ``json_schema=``.

    Example:
        >>> req = ChatCompletionRequest.model_validate({
        ...     "messages": [{"role": "user", "content": "hi"}],
        ...     "tools": [{"type": "function", "function": {"name": "now"}}],
        ...     "tool_choice": "required", "response_format": {"type": "json_object"}})
        >>> opts = _model_options(req)
        >>> opts["tools"][0]["function"]["parameters"], opts["tool_choice"], opts["json_schema"]
        ({'type': 'object', 'properties': {}}, 'any', {'type': 'object'})
    """
    if req.tools and req.functions:
        raise _ApiError(
            400, "send tools or the deprecated functions, not both; tools is preferred",
            param="functions",
        )  # fmt: skip
    legacy = req.legacy_functions
    kw: dict[str, Any] = {}
    tools = _tools(req.functions or [], "functions") if legacy else _tools(req.tools or [], "tools")
    names = [t["function"]["name"] for t in tools]
    if legacy:
        choice = _tool_choice(req.function_call, names, "function_call")
    else:
        choice = _tool_choice(req.tool_choice, names, "tool_choice")
    if tools:
        kw["tools"] = tools
        if choice is not None:
            kw["tool_choice"] = choice
        if legacy:
            kw["parallel_tool_calls"] = False  # the functions API makes one call at most
        elif req.parallel_tool_calls is not None:
            kw["parallel_tool_calls"] = req.parallel_tool_calls
    schema = _json_schema(req.response_format)
    if schema is not None:
        kw["json_schema"] = schema
    return kw


def _tools(items: list[Any], param: str) -> list[dict[str, Any]]:
    """Validate ``tools`` (or ``functions``: bare function objects) into OpenAI tool dicts."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        at = f"{param}.{i}"
        if param == "functions":
            fn, fn_at = item, at
        elif not isinstance(item, dict) or item.get("type") != "function":
            raise _ApiError(
                400, f"{at}: only function tools are served; send {_TOOL_FORM}", param=f"{at}.type"
            )
        else:
            fn, fn_at = item.get("function"), f"{at}.function"
        if not isinstance(fn, dict):
            raise _ApiError(
                400,
                f'{fn_at}: a function is {{"name": ..., "description": ..., "parameters": '
                f"{{...}}}}, got {fn!r:.80}",
                param=fn_at,
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _ApiError(
                400,
                f"{fn_at}.name: a tool's name is 1 to 64 letters, digits, '_' or '-', "
                f"got {name!r:.80}",
                param=f"{fn_at}.name",
            )
        if any(t["function"]["name"] == name for t in out):
            raise _ApiError(
                400, f"{fn_at}.name: two tools are named {name!r}; give each its own name",
                param=f"{fn_at}.name",
            )  # fmt: skip
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise _ApiError(
                400, f"{fn_at}.description: must be a string", param=f"{fn_at}.description"
            )
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        elif not isinstance(params, dict) or params.get("type", "object") != "object":
            raise _ApiError(
                400,
                f"{fn_at}.parameters: must be a JSON schema of type 'object' describing the "
                'arguments object, e.g. {"type": "object", "properties": {"city": '
                '{"type": "string"}}, "required": ["city"]}',
                param=f"{fn_at}.parameters",
            )
        spec: dict[str, Any] = {"name": name, "parameters": params}
        if description:
            spec["description"] = description
        out.append({"type": "function", "function": spec})
    return out


def _tool_choice(value: Any, names: list[str], param: str) -> str | None:
    """Map OpenAI's ``tool_choice`` (or ``function_call``) to the model's.

    That is ``"auto"``, ``"none"``, ``"any"`` or a tool's name; ``None`` when the request leaves
    it to the default.
    """
    legacy = param == "function_call"
    form = '{"name": ...}' if legacy else '{"type": "function", "function": {"name": ...}}'
    if value is None or value in ("auto", "none"):
        return None if value is None else str(value)
    if value == "required" and not legacy:
        choice = "any"
    elif isinstance(value, dict):
        fn = value if legacy else value.get("function") if value.get("type") == "function" else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(named, str):
            raise _ApiError(400, f"{param}: name the tool to call as {form}", param=param)
        choice = named
    else:
        forms = "'auto', 'none'" if legacy else "'auto', 'none', 'required'"
        raise _ApiError(400, f"{param} must be {forms} or {form}, got {value!r:.80}", param=param)
    if not names:
        raise _ApiError(
            400,
            f"{param} asks for a tool call but the request has no {'functions' if legacy else 'tools'}; "
            "send the tools too",
            param=param,
        )
    if choice != "any" and choice not in names:
        raise _ApiError(
            400,
            f"{param} names {choice!r:.80}, which is not one of the request's tools {names}; "
            "name one of them" + ("" if legacy else " or use 'required'"),
            param=param,
        )
    return choice


def _json_schema(fmt: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks the answer to follow (``None``: free text)."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = (fmt or {}).get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _ApiError(
                400,
                "response_format.json_schema.schema: a json_schema response format is "
                '{"type": "json_schema", "json_schema": {"name": ..., "schema": {<JSON schema>}}}',
                param="response_format.json_schema.schema",
            )
        return schema
    raise _ApiError(
        400,
        f"response_format type {kind!r:.80} is not supported; use 'text', 'json_object' or "
        "'json_schema'",
        param="response_format.type",
    )


@dataclass(frozen=True)
class _CallPart:
    """A tool call in the OpenAI shape, or the part of it that one streamed chunk carries."""

    index: int
    id: str | None
    name: str | None
    arguments: str


def _content_text(content: Any) -> str:
    """A LangChain message's content as text (text blocks joined, other blocks left out)."""
    if isinstance(content, str):
        return content
    return "".join(
        b if isinstance(b, str) else str(b.get("text") or "")
        for b in content
        if isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text")
    )


def _whole_calls(message: AIMessage) -> list[_CallPart]:
    """A finished answer's tool calls; calls cut off by ``max_tokens`` keep their partial JSON."""
    calls: list[tuple[str | None, str | None, str]] = [
        (c.get("id"), c["name"], json.dumps(_plain(c["args"]), ensure_ascii=False))
        for c in message.tool_calls
    ]
    calls += [(c.get("id"), c.get("name"), c.get("args") or "") for c in message.invalid_tool_calls]
    return [
        _CallPart(i, call_id or _call_id(), name or "", args)
        for i, (call_id, name, args) in enumerate(calls)
    ]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _StreamedCalls:
    """Number streamed tool-call chunks 0, 1, ... in call order, whatever their source used.

    A call's first chunk carries its id and name (an id is made up when the source sent none);
    later chunks carry fragments of its arguments only, as OpenAI streams them.
    """

    def __init__(self) -> None:
        self._index: dict[Any, int] = {}
        self._last: Any = None

    def parts(self, piece: BaseMessage) -> list[_CallPart]:
        """The OpenAI parts of one streamed piece's calls.

        A piece is a chunk, or a whole answer from a model that cannot stream (its calls come
        whole, cut-off ones with their partial JSON).
        """
        chunks: list[ToolCallChunk] = list(getattr(piece, "tool_call_chunks", None) or [])
        if not chunks and isinstance(piece, AIMessage):
            chunks = [
                tool_call_chunk(name=c.name, args=c.arguments, id=c.id, index=c.index)
                for c in _whole_calls(piece)
            ]
        out = []
        for c in chunks:
            key: Any = c.get("index")
            if key is None:  # a source without indices: a new id or name starts a new call
                starts = c.get("id") is not None or c.get("name") is not None
                key = ("call", len(self._index)) if starts or self._last is None else self._last
            self._last = key
            args = c.get("args") or ""
            if key in self._index:
                out.append(_CallPart(self._index[key], None, None, args))
                continue
            self._index[key] = len(self._index)
            call_id = c.get("id") or _call_id()
            out.append(_CallPart(self._index[key], call_id, c.get("name") or "", args))
        return out


def _openai_message(
    text: str, calls: list[_CallPart], *, legacy: bool, delta: bool
) -> dict[str, Any]:
    """Write an answer in the OpenAI shape, or one streamed piece of it.

    Without ``delta`` this is ``choices[].message``, with it ``choices[].delta``: the content,
    then the ``tool_calls`` (or, for the deprecated functions API, the first call as
    ``function_call``). Both the streaming and the non-streaming path write through here.

    Example:
        >>> call = _CallPart(0, "call_1", "now", "{}")
        >>> _openai_message("", [call], legacy=False, delta=False)["tool_calls"]
        [{'id': 'call_1', 'type': 'function', 'function': {'name': 'now', 'arguments': '{}'}}]
    """
    out: dict[str, Any] = {}
    if not delta:
        out = {"role": "assistant", "content": text if text or not calls else None}
    elif text:
        out["content"] = text
    if legacy:
        first = [c for c in calls if c.index == 0]
        if first:
            out["function_call"] = _openai_function(first[0])
    elif calls:
        out["tool_calls"] = [
            {
                **({"index": c.index} if delta else {}),
                **({"id": c.id, "type": "function"} if c.id is not None else {}),
                "function": _openai_function(c),
            }
            for c in calls
        ]
    return out


def _openai_function(call: _CallPart) -> dict[str, str]:
    if call.name is None:
        return {"arguments": call.arguments}
    return {"name": call.name, "arguments": call.arguments}


def _check_json(value: Any, where: str = "") -> None:
    """Refuse JSON nested deeper than :data:`MAX_JSON_DEPTH` or holding lone UTF-16 surrogates.

    ``json.loads`` accepts a lone surrogate escape and returns a string no UTF-8 encoder (the tokenizer,
    SQLite, the response) can write; it is cheaper to name the field now than to fail later.
    The walk is iterative, so a deep body cannot exhaust the stack here either.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, where)]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise _ApiError(
                400,
                f"the request body is nested more than {MAX_JSON_DEPTH} levels deep "
                f"(at {where or 'body'}); send a flatter JSON object",
                param=where or None,
            )
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            # a bad key is shown escaped: the error message itself must be valid UTF-8
            shown = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            path = f"{where}.{shown}" if where else shown
            if isinstance(key, str):
                _check_text(key, path)
            stack.append((child, depth + 1, path))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _ApiError(
            400,
            f"{where or 'body'}: the string holds a lone UTF-16 surrogate "
            f"(U+{ord(text[e.start]):04X} at character {e.start}), which is not valid Unicode; "
            "send the text as valid UTF-8 (a surrogate escape like \\ud83d must be followed by "
            "its low half, e.g. \\ude00)",
            param=where or None,
        ) from None


def _plain(value: Any) -> Any:
    """Return ``value`` as plain JSON data.

    NaN and infinities become ``None`` (JSON cannot spell them), numpy-like numbers become floats,
    lone surrogates in strings become ``?`` and anything else unknown becomes its ``str``.
    """
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _dumps(obj: Any) -> str:
    return json.dumps(_plain(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class _JSONResponse(JSONResponse):
    """A JSON response that cannot fail on NaN, numpy numbers or other non-JSON values."""

    def render(self, content: Any) -> bytes:
        return _dumps(content).encode("utf-8")


def _validation_error(e: ValidationError) -> _ApiError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return _ApiError(400, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", param=loc or None)


# -- the app ------------------------------------------------------------------------------------------


def _usage(msg: BaseMessage) -> dict[str, int]:
    u = getattr(msg, "usage_metadata", None) or {}
    p, c = int(u.get("input_tokens", 0)), int(u.get("output_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(message: BaseMessage, legacy: bool) -> str:
    """Return OpenAI's finish reason for an answer, whatever its model reported.

    ``length`` when ``max_tokens`` cut it, ``tool_calls`` (``function_call``) when it calls
    tools, else ``stop``.
    """
    if message.response_metadata.get("finish_reason") == "length":
        return "length"
    calls = [
        *getattr(message, "tool_calls", ()),
        *getattr(message, "invalid_tool_calls", ()),
        *getattr(message, "tool_call_chunks", ()),
    ]
    if calls:
        return "function_call" if legacy else "tool_calls"
    return "stop"


def _engine_of(llm: Any) -> Any:
    """The ``EngineStats`` of the student serving ``llm`` (``None`` until its model is loaded)."""
    model = llm
    current = getattr(llm, "current_student", None)
    if callable(current):
        try:
            model = current()
        except UnderstudyError:  # e.g. nothing promoted yet
            return None
    return getattr(model, "engine_stats", None)


def _rollout_of(llm: Any) -> dict[str, Any] | None:
    """``LiveRollout.metrics()`` of a registry-backed ``ChatUnderstudy``, else ``None``."""
    rollout = getattr(llm, "live_rollout", None)
    return rollout.metrics() if rollout is not None and hasattr(rollout, "metrics") else None


def create_app(
    llm: Any,
    *,
    settings: ServerSettings | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    max_concurrency: int = 64,
    queue_timeout_s: float = 60.0,
) -> FastAPI:
    """Build the FastAPI app serving ``llm`` (normally a ``ChatUnderstudy``).

    Args:
        llm: Any LangChain chat model; a ``ChatUnderstudy`` adds routing metadata to answers.
        settings: Limits and the API key variable (default ``ServerSettings()``).
        api_key: The bearer key clients must send; ``None`` reads ``settings.api_key_env``
            (unset: no authentication, which :func:`check_bind` allows on loopback only).
        model_name: The model id listed by ``/v1/models`` (default: ``llm.model_name``).
        max_concurrency: Completions answered at once; more wait in line.
        queue_timeout_s: How long a request waits in line before a 503.

    Example:
        >>> from fastapi.testclient import TestClient  # doctest: +SKIP
        >>> client = TestClient(create_app(load_understudy()))  # doctest: +SKIP
        >>> client.get("/healthz").json()["status"]  # doctest: +SKIP
        'ok'
    """
    s = settings or ServerSettings()
    # An explicit "" switches authentication off (tests); None reads the environment.
    key = (api_key if api_key is not None else os.environ.get(s.api_key_env)) or None
    name = model_name or str(getattr(llm, "model_name", None) or "understudy")
    metrics = ServerMetrics(engine=lambda: _engine_of(llm), rollout=lambda: _rollout_of(llm))
    gate = asyncio.Semaphore(max_concurrency)
    created = int(time.time())

    app = FastAPI(title="understudy", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.llm = llm

    def error_response(err: _ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.middleware("http")
    async def count_and_guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        try:
            if key is not None and (path.startswith("/v1/") or path == "/metrics"):
                header = request.headers.get("authorization", "")
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), key.encode()
                ):
                    raise _ApiError(
                        401,
                        "missing or wrong API key; send 'Authorization: Bearer <key>'",
                        code="invalid_api_key",
                    )
            response: Response = await call_next(request)
        except _ApiError as e:
            response = error_response(e)
        metrics.observe_request(path, response.status_code)
        return response

    @app.exception_handler(_ApiError)
    async def api_error(_request: Request, exc: _ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(_ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the understudy server")
        return error_response(
            _ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        )

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _ApiError(400, "Content-Length is not a number") from None
            if size > s.max_request_bytes:
                raise _ApiError(
                    413,
                    f"request body of {size} bytes is larger than the limit of "
                    f"{s.max_request_bytes} bytes (server.max_request_bytes)",
                    code="request_too_large",
                )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > s.max_request_bytes:
                raise _ApiError(
                    413,
                    f"request body is larger than the limit of {s.max_request_bytes} bytes "
                    "(server.max_request_bytes)",
                    code="request_too_large",
                )
        return bytes(body)

    def parse(body: bytes, content_type: str) -> tuple[ChatCompletionRequest, dict[str, Any]]:
        """The validated request and the chat-model kwargs it asks for."""
        if content_type and "json" not in content_type.lower():
            raise _ApiError(415, f"Content-Type must be application/json, got {content_type!r}")
        try:
            data = json.loads(body)
        except RecursionError:
            raise _ApiError(
                400,
                f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; "
                "send a flatter JSON object",
            ) from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
            raise _ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        _check_json(data)
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.n not in (None, 1):
            raise _ApiError(400, "only n = 1 is supported", param="n")
        want = req.max_completion_tokens or req.max_tokens
        if want is not None and want > s.max_tokens_limit:
            raise _ApiError(
                400,
                f"max_tokens = {want} is larger than this server's limit of {s.max_tokens_limit} "
                "(server.max_tokens_limit)",
                param="max_tokens",
            )
        if isinstance(req.stop, list) and len(req.stop) > 4:
            raise _ApiError(400, "at most 4 stop sequences are allowed", param="stop")
        return req, {**call_kwargs(req), **_model_options(req)}

    def call_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        want = req.max_completion_tokens or req.max_tokens
        if want is not None:
            kw["max_tokens"] = want
        if req.temperature is not None:
            kw["temperature"] = req.temperature
        if req.stop:
            kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        return kw

    def model_error(e: Exception) -> _ApiError:
        if isinstance(e, StudentError):
            return _ApiError(400, str(e), code="context_length_exceeded")
        if isinstance(e, ConfigError):  # an argument of this request (a tool or JSON schema)
            return _ApiError(400, str(e))
        if isinstance(e, TeacherUnavailableError):
            return _ApiError(503, str(e), type="server_error", code="teacher_unavailable")
        if isinstance(e, UnderstudyError):
            return _ApiError(500, str(e), type="server_error")
        logger.exception("the model failed")
        return _ApiError(500, f"the model failed: {type(e).__name__}: {e}", type="server_error")

    async def enter() -> None:
        try:
            await asyncio.wait_for(gate.acquire(), timeout=queue_timeout_s)
        except TimeoutError:
            raise _ApiError(
                503,
                f"the server is busy ({max_concurrency} requests in progress); retry later",
                type="server_error",
                code="overloaded",
            ) from None
        metrics.in_flight += 1

    def leave() -> None:
        metrics.in_flight -= 1
        gate.release()

    @app.get("/healthz")
    async def healthz() -> Response:
        info: dict[str, Any] = {"status": "ok", "model": name}
        try:
            current = getattr(llm, "current_student", None)
            if current is not None:
                student = await asyncio.to_thread(current)
                info["student_version"] = getattr(student, "student_version", None)
            guard = getattr(llm, "resilient_teacher", None)
            info["teacher"] = guard.model_name if guard is not None else None
            info["teacher_state"] = guard.circuit_state if guard is not None else None
        except UnderstudyError as e:
            return _JSONResponse({"status": "error", "error": str(e)}, status_code=503)
        return _JSONResponse(info)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": name, "object": "model", "created": created, "owned_by": "understudy"}
        return _JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        req, kwargs = parse(body, request.headers.get("content-type", ""))
        messages = _to_messages(req)
        legacy = req.legacy_functions
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(cid, messages, kwargs, include_usage, legacy),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        await enter()
        t0 = time.perf_counter()
        try:
            answer = await llm.ainvoke(messages, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-style error
            raise model_error(e) from None
        finally:
            leave()
        meta = answer.response_metadata.get("understudy")
        finish = _finish_reason(answer, legacy)
        metrics.observe_completion(time.perf_counter() - t0, meta, finish)
        message = _openai_message(
            _content_text(answer.content), _whole_calls(answer), legacy=legacy, delta=False
        )
        payload: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": (meta or {}).get("student_version"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": _usage(answer),
        }
        if meta is not None:
            payload["understudy"] = meta
        headers = {"X-Understudy-Answered-By": str((meta or {}).get("answered_by", "unknown"))}
        return _JSONResponse(payload, headers=headers)

    def sse(obj: Any) -> str:
        # Line-oriented clients (Python's splitlines among them) also break lines at NEL, LINE
        # SEPARATOR and PARAGRAPH SEPARATOR: escape them so an event stays on one line.
        return f"data: {_dumps(obj).translate(_LINE_BREAKS)}\n\n"

    async def stream(
        cid: str,
        messages: list[BaseMessage],
        kwargs: dict[str, Any],
        include_usage: bool,
        legacy: bool,
    ) -> AsyncIterator[str]:
        t0 = time.perf_counter()
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": name}  # fmt: skip

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return sse({**base, "choices": [choice], **extra})

        full: AIMessageChunk | None = None
        try:
            await enter()  # inside the generator: a stream that never starts holds no slot
        except _ApiError as e:
            yield sse(e.body())
            yield "data: [DONE]\n\n"
            return
        try:
            yield chunk({"role": "assistant", "content": ""})
            calls = _StreamedCalls()
            async for piece in llm.astream(messages, **kwargs):
                full = piece if full is None else full + piece
                delta = _openai_message(
                    _content_text(piece.content),
                    calls.parts(piece),
                    legacy=legacy,
                    delta=True,
                )
                if delta:
                    yield chunk(delta)
            answer = full if full is not None else AIMessageChunk(content="")
            meta = answer.response_metadata.get("understudy")
            finish = _finish_reason(answer, legacy)
            metrics.observe_completion(time.perf_counter() - t0, meta, finish)
            extra = {"understudy": meta} if meta is not None else {}
            yield chunk({}, finish, **extra)
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(answer)})
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band
            yield sse(model_error(e).body())
        finally:
            leave()
        yield "data: [DONE]\n\n"

    return app


# -- running --------------------------------------------------------------------------------------------


def serve(
    llm: Any,
    *,
    settings: ServerSettings | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "warning",
) -> None:
    """Serve ``llm`` with uvicorn until interrupted.

    Raises:
        ConfigError: ``host`` is not loopback and no API key is set.
    """
    import uvicorn

    s = settings or ServerSettings()
    h = host or s.host
    key = os.environ.get(s.api_key_env) or None
    check_bind(h, key, s.api_key_env)
    app = create_app(llm, settings=s, api_key=key)
    uvicorn.run(
        app,
        host=h,
        port=s.port if port is None else port,
        log_level=log_level,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """Run an app under uvicorn in a background thread (tests, notebooks, benchmarks).

    Args:
        app: The ASGI app (from :func:`create_app`).
        host: Bind address (loopback by default).
        port: TCP port; ``0`` picks a free one.

    Example:
        >>> with ServerThread(create_app(llm)) as server:  # doctest: +SKIP
        ...     print(server.base_url)
        http://127.0.0.1:54321/v1
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.host = host
        self.port = port or _free_port(host)
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", timeout_keep_alive=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="understudy-serve")

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` of the running server."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving and wait until the socket accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                msg = f"the server did not start on {self.host}:{self.port}"
                raise ConfigError(msg)
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
