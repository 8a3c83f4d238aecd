"""The trace store: every teacher call as one SQLite row, importable and exportable as JSONL.

A trace is one chat-model call: the messages in (the prompt), the message out (the teacher's
answer, tool calls included), the model name, latency, tags, metadata, LangChain run ids, the time,
and an error when the call failed. Messages are stored as JSON in LangChain's own message-dict
format (``messages_to_dict``), never pickled.

JSONL files use the OpenAI chat fine-tuning format, one object per line::

    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "metadata": {"model": "gpt-4o-mini", "tags": ["support"]}}

The final assistant message is the teacher's answer. The metadata keys ``id``,
``created_at``, ``model``, ``latency_ms``, ``tags``, ``run_id``, ``parent_run_id`` and ``error``
fill the trace's own fields; every other key stays in :attr:`Trace.metadata`. A line's ``tools``
list, if any, is kept in ``metadata["tools"]`` and written back on export.

Example:
    >>> import tempfile, os
    >>> from langchain_core.messages import AIMessage, HumanMessage
    >>> store = TraceStore(os.path.join(tempfile.mkdtemp(), "traces.sqlite"))
    >>> _ = store.add([HumanMessage("2+2?")], AIMessage("4"), model="teacher-1")
    >>> store.count()
    1
    >>> next(store.iter_traces()).answer.content
    '4'
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    convert_to_openai_messages,
    message_chunk_to_message,
    message_to_dict,
    messages_from_dict,
    messages_to_dict,
)

from langchain_understudy.errors import TraceError
from langchain_understudy.prompting import message_text

if TYPE_CHECKING:
    from langchain_understudy.distill_jobs.redact import Redactor

__all__ = [
    "RELABELLED",
    "UNANSWERED",
    "ImportReport",
    "ModelStats",
    "Trace",
    "TraceStats",
    "TraceStore",
    "snapshot_hash",
]

SCHEMA_VERSION = 1
#: Tag of a prompt imported without the teacher's answer (it awaits relabelling).
UNANSWERED = "unanswered"
#: Tag of an answer obtained by relabelling (its ``metadata["relabel_of"]`` names the source).
RELABELLED = "relabelled"
_SNAPSHOT_PREFIX = "understudy-traces-v1"
#: Metadata keys of the JSONL format that map to :class:`Trace` fields.
_FIELD_KEYS = (
    "id", "created_at", "model", "latency_ms", "tags", "run_id", "parent_run_id", "error",
)  # fmt: skip
_ROLES = ("system", "developer", "user", "assistant", "tool")
#: Deepest nesting of arrays and objects accepted in an imported line.
MAX_JSON_DEPTH = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    id            TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL,      -- ISO-8601 UTC, fixed width: sorts as text
    messages      TEXT NOT NULL,      -- JSON: messages_to_dict(prompt)
    answer        TEXT NOT NULL,      -- JSON: message_to_dict(answer)
    model         TEXT,
    latency_ms    REAL,
    tags          TEXT NOT NULL DEFAULT '[]',
    metadata      TEXT NOT NULL DEFAULT '{}',
    run_id        TEXT,
    parent_run_id TEXT,
    error         TEXT,
    content_hash  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_created_at ON traces (created_at);
CREATE INDEX IF NOT EXISTS traces_content_hash ON traces (content_hash);
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = (
    "id, created_at, messages, answer, model, latency_ms, tags, metadata, run_id, "
    "parent_run_id, error, content_hash"
)

TimeLike = datetime | date | str


# --------------------------------------------------------------------------------------------
# helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: TimeLike) -> datetime:
    """Read a time; naive times and dates are taken as UTC."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    else:
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as e:
            msg = f"time must be ISO-8601 like 2026-01-31 or 2026-01-31T12:00:00Z, got {value!r}"
            raise TraceError(msg) from e
    try:
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except OverflowError as e:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
        msg = f"time {value!s} is out of range in UTC; use a time between years 1 and 9999"
        raise TraceError(msg) from e


def _iso(value: TimeLike) -> str:
    return _as_utc(value).isoformat(timespec="microseconds")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _canonical(obj: Any) -> str:
    return json.dumps(
        obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=_json_default
    )


def _semantic(message_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a message says, from its ``message_to_dict`` form: ids and metadata left out."""
    data = message_dict.get("data", {})
    out: dict[str, Any] = {"type": message_dict.get("type"), "content": data.get("content")}
    calls = data.get("tool_calls")
    if calls:
        out["tool_calls"] = [{"name": c.get("name"), "args": c.get("args")} for c in calls]
    if isinstance(data.get("role"), str):
        out["role"] = data["role"]
    return out


def _hash_dicts(prompt: Sequence[Mapping[str, Any]], answer: Mapping[str, Any]) -> str:
    payload = _canonical({"m": [_semantic(d) for d in prompt], "a": _semantic(answer)})
    return hashlib.sha256(payload.encode("utf-8", errors="surrogatepass")).hexdigest()


def content_hash(messages: Sequence[BaseMessage], answer: BaseMessage) -> str:
    """SHA-256 of a conversation and its answer, ignoring ids and metadata."""
    return _hash_dicts(messages_to_dict(messages), message_to_dict(answer))


def _row(
    *,
    id: str,
    created_at: datetime,
    prompt: Sequence[Mapping[str, Any]],
    answer: Mapping[str, Any],
    model: str | None,
    latency_ms: float | None,
    tags: Sequence[str],
    metadata: Mapping[str, Any],
    run_id: str | None,
    parent_run_id: str | None,
    error: str | None,
) -> tuple[Any, ...]:
    """One database row from messages already in ``message_to_dict`` form.

    Raises:
        TraceError: a text holds a lone UTF-16 surrogate, which SQLite cannot store (refused
            here, so a recorder drops this trace and keeps the rest of its batch).
    """
    row = (
        id,
        _iso(created_at),
        _dumps(prompt),
        _dumps(answer),
        model,
        latency_ms,
        _dumps(list(tags)),
        _dumps(metadata),
        run_id,
        parent_run_id,
        error,
        _hash_dicts(prompt, answer),
    )
    for col in row:
        if isinstance(col, str):
            _require_unicode(col, f"trace {id}", "it is not stored")
    return row


def _require_unicode(text: str, where: str, then: str) -> None:
    """Refuse a string holding a lone UTF-16 surrogate, which SQLite cannot store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        msg = (
            f"{where} holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}), which is not "
            f"valid Unicode; {then}"
        )
        raise TraceError(msg) from None


def snapshot_hash(traces: Iterable[Trace]) -> str:
    """Return a stable SHA-256 of a set of traces' contents, for provenance.

    The hash depends only on what the traces say (see :attr:`Trace.content_hash`), counted with
    multiplicity, not on their order, ids or times; it equals :meth:`TraceStore.snapshot_hash`
    for the same selection.
    """
    return _snapshot_of(sorted(t.content_hash for t in traces))


def _snapshot_of(sorted_hashes: Iterable[str]) -> str:
    h = hashlib.sha256(_SNAPSHOT_PREFIX.encode("ascii"))
    for ch in sorted_hashes:
        h.update(b"\n")
        h.update(ch.encode("ascii"))
    return h.hexdigest()


def _as_ai_message(message: BaseMessage) -> AIMessage:
    if isinstance(message, AIMessageChunk):  # streamed: store the aggregated plain message
        message = message_chunk_to_message(message)
    if isinstance(message, AIMessage):
        return message
    return AIMessage(content=message.content, name=message.name, id=message.id)


# --------------------------------------------------------------------------------------------
# the trace


@dataclass
class Trace:
    """One teacher call: the prompt messages and the teacher's answer, plus what we know of it.

    Attributes:
        messages: The prompt: every message the model was called with.
        answer: The teacher's answer; tool calls are in ``answer.tool_calls``. Empty when the call
            failed (see ``error``).
        model: The teacher's model name, when known.
        latency_ms: Wall time of the call in milliseconds, when measured.
        tags: Free-form labels (run tags, recorder tags, import tags).
        metadata: JSON-serialisable extra information (run metadata, import metadata).
        run_id: The LangChain run id of the chat-model call.
        parent_run_id: The run id of the chain or agent step that made the call.
        error: ``"ErrorType: message"`` when the call failed, else ``None``.
        created_at: When the call was made (UTC).
        id: Unique key in the store; recorded traces use the run id, imported ones a hash of their
            content and metadata (so importing a file twice adds nothing).

    Example:
        >>> from langchain_core.messages import AIMessage, HumanMessage
        >>> t = Trace([HumanMessage("hi")], AIMessage("hello"), model="gpt-4o-mini")
        >>> t.to_openai()["messages"]
        [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
        >>> Trace.from_openai(t.to_openai()).content_hash == t.content_hash
        True
    """

    messages: list[BaseMessage]
    answer: AIMessage
    model: str | None = None
    latency_ms: float | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    parent_run_id: str | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=_now)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def has_answer(self) -> bool:
        """Whether the call succeeded with an answer (text or tool calls) to learn from."""
        return not self.error and bool(message_text(self.answer) or self.answer.tool_calls)

    @property
    def content_hash(self) -> str:
        """SHA-256 of what the prompt and answer say (ids and metadata ignored); dedupe key."""
        return content_hash(self.messages, self.answer)

    def to_openai(self) -> dict[str, Any]:
        """Return this trace as one line of the OpenAI chat fine-tuning format (a dict)."""
        messages = convert_to_openai_messages([*self.messages, self.answer])
        meta: dict[str, Any] = {k: v for k, v in self.metadata.items() if k != "tools"}
        meta.update(
            {
                "id": self.id,
                "created_at": _iso(self.created_at),
                "model": self.model,
                "latency_ms": self.latency_ms,
                "tags": list(self.tags),
                "run_id": self.run_id,
                "parent_run_id": self.parent_run_id,
                "error": self.error,
            }
        )
        out: dict[str, Any] = {
            "messages": messages,
            "metadata": {k: v for k, v in meta.items() if v not in (None, [])},
        }
        if "tools" in self.metadata:
            out["tools"] = self.metadata["tools"]
        return out

    @classmethod
    def from_openai(cls, obj: Any, *, unanswered: bool = False) -> Trace:
        """Build a trace from one line of the OpenAI chat fine-tuning format.

        The last message must be the assistant's answer; ``system``/``developer``, ``user``,
        ``assistant`` (with ``tool_calls``) and ``tool`` roles are accepted. Without an ``id`` in
        the metadata, the id is derived from the content and metadata.

        With ``unanswered=True`` a line may end without the assistant's answer: it becomes a
        prompt awaiting one (empty answer, tag ``"unanswered"``) for teacher relabelling.

        Raises:
            TraceError: the object is not in that format; the message names the bad field.
        """
        if not isinstance(obj, Mapping):
            msg = f"expected a JSON object with a 'messages' list, got {type(obj).__name__}"
            raise TraceError(msg)
        raw = obj.get("messages")
        if not isinstance(raw, list) or not raw:
            msg = "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects"
            raise TraceError(msg)
        messages = [_message_from_openai(m, f"messages[{i}]") for i, m in enumerate(raw)]
        awaiting = unanswered and raw[-1]["role"] != "assistant"
        if awaiting:
            messages.append(AIMessage(content=""))
        elif raw[-1]["role"] != "assistant":
            msg = (
                f"the last message must be the assistant's answer, got role {raw[-1]['role']!r}; "
                "drop prompts without an answer or add the teacher's reply"
            )
            raise TraceError(msg)
        if len(messages) < 2:
            msg = "there is no prompt before the assistant's answer; add the user's message"
            raise TraceError(msg)
        meta = obj.get("metadata", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            msg = f"'metadata' must be a JSON object, got {type(meta).__name__}"
            raise TraceError(msg)
        meta = dict(meta)
        if "tools" in obj:
            if not isinstance(obj["tools"], list):
                msg = f"'tools' must be a list, got {type(obj['tools']).__name__}"
                raise TraceError(msg)
            meta["tools"] = obj["tools"]
        fields = _fields_from_metadata(meta)
        answer = _as_ai_message(messages[-1])
        trace = cls(messages=list(messages[:-1]), answer=answer, metadata=meta, **fields)
        if awaiting:
            trace.tags = list(dict.fromkeys([*trace.tags, UNANSWERED]))
        if "id" not in fields:
            trace.id = trace._derived_id()
        return trace

    def _derived_id(self) -> str:
        # Content + metadata (not the import time): the same line imported twice has one id.
        payload = _canonical(
            {
                "c": self.content_hash,
                "meta": self.metadata,
                "f": [self.model, self.tags, self.run_id, self.parent_run_id, self.error],
            }
        )
        return "sha-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:40]

    def _row(self) -> tuple[Any, ...]:
        return _row(
            id=self.id,
            created_at=self.created_at,
            prompt=messages_to_dict(self.messages),
            answer=message_to_dict(self.answer),
            model=self.model,
            latency_ms=self.latency_ms,
            tags=self.tags,
            metadata=self.metadata,
            run_id=self.run_id,
            parent_run_id=self.parent_run_id,
            error=self.error,
        )

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> Trace:
        messages = messages_from_dict(json.loads(row[2]))
        (answer,) = messages_from_dict([json.loads(row[3])])
        return cls(
            id=row[0],
            created_at=datetime.fromisoformat(row[1]),
            messages=messages,
            answer=_as_ai_message(answer),
            model=row[4],
            latency_ms=row[5],
            tags=json.loads(row[6]),
            metadata=json.loads(row[7]),
            run_id=row[8],
            parent_run_id=row[9],
            error=row[10],
        )


def _message_from_openai(m: Any, where: str) -> BaseMessage:
    """Check one OpenAI-format message and build the LangChain message it stands for."""
    if not isinstance(m, Mapping):
        msg = f"{where} must be an object with 'role' and 'content', got {type(m).__name__}"
        raise TraceError(msg)
    role = m.get("role")
    if role not in _ROLES:
        msg = f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}"
        raise TraceError(msg)
    content = m.get("content")
    raw_calls = m.get("tool_calls")
    if content is None and not (role == "assistant" and raw_calls):
        msg = f"{where} has no 'content' (only an assistant message with tool_calls may omit it)"
        raise TraceError(msg)
    if content is not None and not isinstance(content, (str, list)):
        msg = f"{where}.content must be a string or a list of parts, got {type(content).__name__}"
        raise TraceError(msg)
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, (str, Mapping)) or (
                isinstance(part, Mapping) and "type" not in part
            ):
                msg = f"{where}.content[{j}] must be a string or a {{'type': ...}} part"
                raise TraceError(msg)
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        msg = f"{where}.name must be a string, got {type(name).__name__}"
        raise TraceError(msg)
    body: Any = "" if content is None else content
    if role in ("system", "developer"):
        return SystemMessage(content=body, name=name)
    if role == "user":
        return HumanMessage(content=body, name=name)
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str):
            msg = f"{where} is a tool result without a 'tool_call_id' string"
            raise TraceError(msg)
        return ToolMessage(content=body, tool_call_id=call_id, name=name)
    if raw_calls is not None and not isinstance(raw_calls, list):
        msg = f"{where}.tool_calls must be a list, got {type(raw_calls).__name__}"
        raise TraceError(msg)
    calls: list[ToolCall] = []
    for j, call in enumerate(raw_calls or []):
        w = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            msg = (
                f"{w} must look like {{'id': ..., 'type': 'function', "
                "'function': {'name': ..., 'arguments': '{...}'}}"
            )
            raise TraceError(msg)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):  # a JSON text of its own: held to the line's rules
            args = _read_json(args or "{}", f"{w}.function.arguments")
        if not isinstance(args, dict):
            msg = f"{w}.function.arguments must encode a JSON object, got {type(args).__name__}"
            raise TraceError(msg)
        call_id = call.get("id")
        calls.append(
            ToolCall(
                name=fn["name"],
                args=args,
                id=call_id if isinstance(call_id, str) else f"call_{j}",
                type="tool_call",
            )
        )
    return AIMessage(content=body, tool_calls=calls, name=name)


def _fields_from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Pop the keys that are trace fields out of ``meta``, checking their types."""
    fields: dict[str, Any] = {}
    for key in _FIELD_KEYS:
        if key not in meta:
            continue
        value = meta.pop(key)
        if value is None:
            continue
        if key == "created_at":
            if not isinstance(value, str):
                msg = f"metadata.created_at must be an ISO-8601 string, got {value!r}"
                raise TraceError(msg)
            try:
                value = _as_utc(value)
            except TraceError as e:
                msg = f"metadata.created_at: {e}"
                raise TraceError(msg) from e
        elif key == "latency_ms":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                msg = f"metadata.latency_ms must be a number, got {value!r}"
                raise TraceError(msg)
            value = float(value)
        elif key == "tags":
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                msg = f"metadata.tags must be a list of strings, got {value!r}"
                raise TraceError(msg)
        elif not isinstance(value, str):
            value = str(value)
        fields[key] = value
    return fields


# --------------------------------------------------------------------------------------------
# reports


@dataclass
class ImportReport:
    """What :meth:`TraceStore.import_jsonl` did.

    Attributes:
        path: The file read.
        lines: Non-blank lines read.
        added: Traces written.
        duplicates: Valid traces already in the store (or repeated in the file), not written again.
        errors: One ``"line N: what is wrong"`` per malformed line, in file order.
    """

    path: Path
    lines: int = 0
    added: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def malformed(self) -> int:
        """Lines skipped because they could not be read as a trace."""
        return len(self.errors)

    @property
    def ok(self) -> bool:
        """Whether every line was a valid trace."""
        return not self.errors


@dataclass(frozen=True)
class ModelStats:
    """Counts for one model name in :class:`TraceStats`."""

    traces: int
    errors: int
    mean_latency_ms: float | None


@dataclass(frozen=True)
class TraceStats:
    """A summary of the store, from :meth:`TraceStore.stats`.

    Attributes:
        traces: Rows in the store.
        errors: Rows whose call failed.
        distinct: Distinct prompt+answer contents (``traces - distinct`` are duplicates).
        tool_call_answers: Answers that call tools.
        first: Time of the oldest trace, if any.
        last: Time of the newest trace, if any.
        latency_p50_ms: Median call latency, over traces that have one.
        latency_p95_ms: 95th percentile call latency.
        models: Per model name (``""`` when unknown).
        tags: Traces per tag.
    """

    traces: int
    errors: int
    distinct: int
    tool_call_answers: int
    first: datetime | None
    last: datetime | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    models: dict[str, ModelStats]
    tags: dict[str, int]


# --------------------------------------------------------------------------------------------
# the store


class TraceStore:
    """Teacher calls in one SQLite file (WAL mode, safe for several threads and processes).

    Args:
        path: The SQLite file; created with its parent folders when missing.

    Raises:
        TraceError: the file exists but is not a trace store, or was written by a newer version.

    Example:
        >>> import tempfile, os
        >>> from langchain_core.messages import AIMessage, HumanMessage
        >>> with TraceStore(os.path.join(tempfile.mkdtemp(), "t.sqlite")) as store:
        ...     _ = store.add([HumanMessage("hi")], AIMessage("hello"), tags=["demo"])
        ...     [t.answer.content for t in store.iter_traces(tags=["demo"])]
        ['hello']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._connect()
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.executescript(_SCHEMA)
                self._check_version()
        except sqlite3.DatabaseError as e:
            msg = (
                f"{self.path} is not a trace store ({e}); point at a file made by understudy "
                "or at a new path"
            )
            raise TraceError(msg) from e
        except OSError as e:
            msg = f"cannot create the trace store at {self.path} ({e}); choose a writable path"
            raise TraceError(msg) from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        return conn

    def _check_version(self) -> None:
        row = self._conn.execute(
            "SELECT value FROM store_info WHERE key='schema_version'"
        ).fetchone()
        if row is None:
            self._conn.execute(
                "INSERT OR IGNORE INTO store_info VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        elif int(row[0]) > SCHEMA_VERSION:
            msg = (
                f"{self.path} was written by a newer langchain-understudy (schema {row[0]}); "
                "upgrade the package to read it"
            )
            raise TraceError(msg)

    def __repr__(self) -> str:
        return f"TraceStore({str(self.path)!r})"

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    # writing -----------------------------------------------------------------------------

    def add(
        self,
        messages: Sequence[BaseMessage],
        answer: BaseMessage,
        *,
        model: str | None = None,
        latency_ms: float | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        run_id: str | uuid.UUID | None = None,
        parent_run_id: str | uuid.UUID | None = None,
        error: str | None = None,
        created_at: TimeLike | None = None,
        id: str | None = None,
    ) -> Trace:
        """Write one teacher call and return it as a :class:`Trace`.

        Nothing is written when a trace with the same id is already stored. The id defaults to
        ``run_id`` when given, else a fresh random id.
        """
        trace = Trace(
            messages=list(messages),
            answer=_as_ai_message(answer),
            model=model,
            latency_ms=latency_ms,
            tags=list(tags or []),
            metadata=dict(metadata or {}),
            run_id=str(run_id) if run_id is not None else None,
            parent_run_id=str(parent_run_id) if parent_run_id is not None else None,
            error=error,
            created_at=_as_utc(created_at) if created_at is not None else _now(),
        )
        if id is not None:
            trace.id = id
        elif trace.run_id is not None:
            trace.id = trace.run_id
        self.add_many([trace])
        return trace

    def add_many(self, traces: Iterable[Trace]) -> int:
        """Write traces in one transaction; returns how many were new (same id: skipped)."""
        return self._insert_rows([t._row() for t in traces])

    def _insert_rows(self, rows: Sequence[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        try:
            with self._lock:
                before = self._conn.total_changes
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(
                        f"INSERT OR IGNORE INTO traces ({_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                return self._conn.total_changes - before
        except sqlite3.Error as e:
            msg = f"cannot write traces to {self.path} ({e}); check the disk and file permissions"
            raise TraceError(msg) from e

    # reading -----------------------------------------------------------------------------

    @staticmethod
    def _where(
        since: TimeLike | None,
        until: TimeLike | None,
        tags: Sequence[str] | None,
        include_errors: bool,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(_iso(since))
        if until is not None:
            clauses.append("created_at < ?")
            params.append(_iso(until))
        if tags:
            marks = ", ".join("?" for _ in tags)
            clauses.append(
                f"EXISTS (SELECT 1 FROM json_each(traces.tags) WHERE json_each.value IN ({marks}))"
            )
            params.extend(tags)
        if not include_errors:
            clauses.append("error IS NULL")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def iter_traces(
        self,
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        tags: Sequence[str] | None = None,
        *,
        include_errors: bool = True,
    ) -> Iterator[Trace]:
        """Yield traces oldest first.

        Args:
            since: Only traces made at or after this time (naive times are UTC).
            until: Only traces made before this time.
            tags: Only traces carrying at least one of these tags.
            include_errors: Also yield failed calls (``trace.error`` set).

        The iterator reads from its own connection, so it sees one consistent snapshot and never
        blocks writers.
        """
        where, params = self._where(since, until, tags, include_errors)
        conn = self._connect()
        try:
            cur = conn.execute(
                f"SELECT {_COLUMNS} FROM traces{where} ORDER BY created_at, rowid", params
            )
            while batch := cur.fetchmany(512):
                for row in batch:
                    yield Trace._from_row(row)
        except sqlite3.Error as e:
            msg = f"cannot read traces from {self.path} ({e}); check the file is not corrupted"
            raise TraceError(msg) from e
        finally:
            conn.close()

    def get(self, trace_id: str) -> Trace | None:
        """Return the trace with this id, or ``None``."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM traces WHERE id = ?", (trace_id,)
            ).fetchone()
        return None if row is None else Trace._from_row(row)

    def count(
        self,
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        tags: Sequence[str] | None = None,
        *,
        include_errors: bool = True,
    ) -> int:
        """Return how many traces match (same filters as :meth:`iter_traces`)."""
        where, params = self._where(since, until, tags, include_errors)
        with self._lock:
            (n,) = self._conn.execute(f"SELECT COUNT(*) FROM traces{where}", params).fetchone()
        return int(n)

    def snapshot_hash(
        self,
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        tags: Sequence[str] | None = None,
        *,
        include_errors: bool = True,
    ) -> str:
        """Return a stable SHA-256 (hex) of the selected traces' contents, for provenance.

        It depends only on the prompts and answers selected (with multiplicity), not on ids,
        times or row order, and equals :func:`snapshot_hash` over the same traces.
        """
        where, params = self._where(since, until, tags, include_errors)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT content_hash FROM traces{where} ORDER BY content_hash", params
            ).fetchall()
        return _snapshot_of(r[0] for r in rows)

    def stats(self) -> TraceStats:
        """Summarise the store: counts, time range, latency percentiles, models and tags."""
        with self._lock:
            c = self._conn
            n, errors, distinct, first, last = c.execute(
                "SELECT COUNT(*), COUNT(error), COUNT(DISTINCT content_hash), "
                "MIN(created_at), MAX(created_at) FROM traces"
            ).fetchone()
            tool_calls = c.execute(
                "SELECT COUNT(*) FROM traces WHERE json_array_length("
                "json_extract(answer, '$.data.tool_calls')) > 0"
            ).fetchone()[0]
            models = {
                (name or ""): ModelStats(int(k), int(e), float(lat) if lat is not None else None)
                for name, k, e, lat in c.execute(
                    "SELECT model, COUNT(*), COUNT(error), AVG(latency_ms) FROM traces "
                    "GROUP BY model ORDER BY COUNT(*) DESC"
                )
            }
            tags = {
                str(tag): int(k)
                for tag, k in c.execute(
                    "SELECT json_each.value, COUNT(*) FROM traces, json_each(traces.tags) "
                    "GROUP BY json_each.value ORDER BY COUNT(*) DESC, json_each.value"
                )
            }
            (n_lat,) = c.execute(
                "SELECT COUNT(*) FROM traces WHERE latency_ms IS NOT NULL"
            ).fetchone()

            def pct(q: float) -> float | None:
                if not n_lat:
                    return None
                row = c.execute(
                    "SELECT latency_ms FROM traces WHERE latency_ms IS NOT NULL "
                    "ORDER BY latency_ms LIMIT 1 OFFSET ?",
                    (min(n_lat - 1, int(q * n_lat)),),
                ).fetchone()
                return float(row[0])

            p50, p95 = pct(0.5), pct(0.95)
        return TraceStats(
            traces=int(n),
            errors=int(errors),
            distinct=int(distinct),
            tool_call_answers=int(tool_calls),
            first=datetime.fromisoformat(first) if first else None,
            last=datetime.fromisoformat(last) if last else None,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            models=models,
            tags=tags,
        )

    # JSONL ------------------------------------------------------------------------------

    def export_jsonl(
        self,
        path: str | os.PathLike[str] | IO[str],
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        tags: Sequence[str] | None = None,
        *,
        include_errors: bool = False,
    ) -> int:
        """Write traces as OpenAI chat fine-tuning JSONL; returns how many lines were written.

        Args:
            path: A file path (written atomically: readers never see half a file) or an open
                text stream such as ``sys.stdout``.
            since: Only traces made at or after this time.
            until: Only traces made before this time.
            tags: Only traces carrying at least one of these tags.
            include_errors: Also export failed calls (their answer is empty, the error is in
                ``metadata.error``); off by default so the file is ready for fine-tuning.
        """
        traces = self.iter_traces(since, until, tags, include_errors=include_errors)
        if not isinstance(path, (str, os.PathLike)):
            return _write_jsonl(path, traces)
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    n = _write_jsonl(f, traces)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            msg = f"cannot write {target} ({e}); choose a writable path"
            raise TraceError(msg) from e
        return n

    def import_jsonl(
        self,
        path: str | os.PathLike[str],
        *,
        redactor: Redactor | None = None,
        tags: Sequence[str] | None = None,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
        unanswered: bool = False,
    ) -> ImportReport:
        """Import an OpenAI chat fine-tuning JSONL file.

        Every valid line becomes one trace; malformed lines are skipped and reported as
        ``"line N: what is wrong"``. Importing the same file again adds nothing: a line's id
        is a hash of its content and metadata (or its ``metadata.id``).

        Args:
            path: The ``.jsonl`` file.
            redactor: When given, PII is redacted from messages and metadata before writing.
            tags: Tags added to every imported trace.
            batch_size: Lines per transaction.
            progress: Called with the number of bytes read since the previous call.
            unanswered: Accept lines without the assistant's answer as prompts awaiting one
                (tagged ``"unanswered"``; a distillation job with ``[relabel]`` asks the teacher).

        Raises:
            TraceError: the file cannot be opened, or the store cannot be written.
        """
        src = Path(path)
        report = ImportReport(path=src)
        batch: list[Trace] = []
        seen: set[str] = set()
        read = 0

        def commit() -> None:
            nonlocal read
            added = self.add_many(batch)
            report.added += added
            report.duplicates += len(batch) - added
            batch.clear()
            if progress is not None and read:
                progress(read)
                read = 0

        try:
            f = src.open("rb")
        except OSError as e:
            msg = f"cannot open {src} ({e.strerror or e}); check the path"
            raise TraceError(msg) from e
        with f:
            for lineno, raw in enumerate(f, 1):
                read += len(raw)
                if not raw.strip():
                    continue
                report.lines += 1
                try:
                    trace = _parse_line(raw, redactor, tags, unanswered)
                except TraceError as e:
                    report.errors.append(f"line {lineno}: {e}")
                    continue
                if trace.id in seen:
                    report.duplicates += 1
                    continue
                seen.add(trace.id)
                batch.append(trace)
                if len(batch) >= batch_size:
                    commit()
        commit()
        if progress is not None and read:
            progress(read)
        return report


def _parse_line(
    raw: bytes, redactor: Redactor | None, tags: Sequence[str] | None, unanswered: bool = False
) -> Trace:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        raise TraceError(msg) from e
    obj = _read_json(text)
    if redactor is not None and isinstance(obj, Mapping):
        obj = {
            **obj,
            "messages": redactor.redact_value(obj.get("messages")),
            "metadata": redactor.redact_value(obj.get("metadata")),
        }
    trace = Trace.from_openai(obj, unanswered=unanswered)
    if tags:
        trace.tags = list(dict.fromkeys([*trace.tags, *tags]))
    return trace


def _read_json(text: str, what: str = "") -> Any:
    """``json.loads`` held to the import's rules (:func:`_check_json`).

    Raises:
        TraceError: the text is not JSON, too deep, holds an integer of more digits than Python
            converts, or a string that is not valid Unicode; the message names ``what`` (the
            line when empty).
    """
    lead = f"{what} is " if what else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"{lead}not valid JSON ({e.msg} at column {e.colno})"
        raise TraceError(msg) from e
    except RecursionError as e:
        msg = f"{lead}nested more than {MAX_JSON_DEPTH} levels deep; flatten it"
        raise TraceError(msg) from e
    except ValueError as e:  # an integer of more digits than Python converts
        msg = f"{lead}not valid JSON ({e}); write huge numbers as strings"
        raise TraceError(msg) from e
    try:
        _check_json(value)
    except TraceError as e:
        if not what:
            raise
        raise TraceError(f"{what}: {e}") from e
    return value


def _check_json(value: Any) -> None:
    """Refuse a parsed line that is too deep or holds a string that is not valid Unicode.

    Lines nested deeper than :data:`MAX_JSON_DEPTH` would exhaust the stack of the code that
    reads them later; a lone surrogate escape (a high or low half alone) makes a string SQLite
    cannot store. The walk is iterative, so the check itself cannot exhaust the stack.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            _require_unicode(item, where or "the line", "re-export the file with valid text")
        elif isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                msg = f"{where or 'the line'} is nested more than {MAX_JSON_DEPTH} levels deep"
                raise TraceError(msg)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                shown = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                path = f"{where}.{shown}" if where else shown
                stack.append((key, depth + 1, f"a key of {where or 'the line'}"))
                stack.append((child, depth + 1, path))


def _write_jsonl(f: IO[str], traces: Iterable[Trace]) -> int:
    n = 0
    for t in traces:
        f.write(_dumps(t.to_openai()))
        f.write("\n")
        n += 1
    if f is sys.stdout:
        f.flush()
    return n
