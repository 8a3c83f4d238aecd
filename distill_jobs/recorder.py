"""``TraceRecorder``: a LangChain callback handler that records every chat-model call as a trace.

Attach it to any chat model, chain or agent through the run config; it records each chat-model
call (sync, async, streamed or not) into a :class:`~langchain_understudy.distill_jobs.traces.TraceStore`.
The caller's thread only copies references into a queue: redaction, serialisation and the SQLite
insert happen on one background writer thread, in batches, so the agent is not slowed down.

Example:
    >>> import tempfile, os
    >>> from langchain_core.language_models import GenericFakeChatModel
    >>> from langchain_core.messages import AIMessage
    >>> store = TraceStore(os.path.join(tempfile.mkdtemp(), "traces.sqlite"))
    >>> model = GenericFakeChatModel(messages=iter([AIMessage("Mail me at jo@example.com")]))
    >>> with TraceRecorder(store, tags=["demo"]) as recorder:
    ...     _ = model.invoke("hi", config={"callbacks": [recorder]})
    >>> next(store.iter_traces()).answer.content
    'Mail me at <EMAIL>'
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, messages_to_dict
from langchain_core.outputs import ChatGeneration, LLMResult

from langchain_understudy.distill_jobs.redact import Redactor
from langchain_understudy.distill_jobs.traces import TraceStore, _as_ai_message, _row
from langchain_understudy.errors import ConfigError, TraceError

__all__ = ["TraceRecorder"]

logger = logging.getLogger(__name__)

# Tags LangChain adds to every step of a RunnableSequence; they say nothing about the call.
_NOISE_TAG = re.compile(r"^seq:step:\d+$")
# Runs started but never ended (a caller that swallowed cancellation) are forgotten past this.
_MAX_PENDING = 10_000


@dataclass
class _Started:
    messages: list[list[BaseMessage]]
    started: float
    created_at: datetime
    parent_run_id: UUID | None
    tags: list[str]
    metadata: dict[str, Any]
    model: str | None


@dataclass
class _Finished:
    run_id: UUID
    start: _Started
    answers: list[BaseMessage | None]
    latency_ms: float
    model: str | None
    error: str | None = None


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


def _model_from_start(
    serialized: Mapping[str, Any] | None, metadata: Mapping[str, Any], kwargs: Mapping[str, Any]
) -> str | None:
    if isinstance(metadata.get("ls_model_name"), str):
        return str(metadata["ls_model_name"])
    params = kwargs.get("invocation_params") or {}
    for key in ("model", "model_name", "model_id"):
        if isinstance(params.get(key), str):
            return str(params[key])
    if isinstance(params.get("_type"), str):
        return str(params["_type"])
    if serialized and isinstance(serialized.get("id"), list) and serialized["id"]:
        return str(serialized["id"][-1])
    name = kwargs.get("name")
    return name if isinstance(name, str) else None


def _model_from_answer(
    answer: BaseMessage | None, llm_output: Mapping[str, Any] | None
) -> str | None:
    if answer is not None:
        meta = answer.response_metadata or {}
        for key in ("model_name", "model"):
            if isinstance(meta.get(key), str) and meta[key]:
                return str(meta[key])
    if llm_output:
        for key in ("model_name", "model"):
            if isinstance(llm_output.get(key), str) and llm_output[key]:
                return str(llm_output[key])
    return None


def _answers(response: LLMResult | None, n: int) -> list[BaseMessage | None]:
    out: list[BaseMessage | None] = [None] * n
    if response is None:
        return out
    for i, gens in enumerate(response.generations[:n]):
        if gens and isinstance(gens[0], ChatGeneration):
            out[i] = gens[0].message
    return out


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class TraceRecorder(BaseCallbackHandler):
    """Records every chat-model call of whatever it is attached to into a trace store.

    One trace is written per chat-model call: the prompt messages, the answer (tool calls
    included; for a streamed call, the aggregated message), the model name, the latency, the
    run's tags and metadata, and the run ids. A failed call is written with ``error`` set.
    PII is redacted before anything is written. Recording never raises into the agent: write
    failures are logged and surface on :meth:`flush`.

    Args:
        store: A :class:`TraceStore`, or a path to open one at (closed with the recorder).
        redact: Redact emails, phone numbers, card numbers and IBANs (and ``patterns``) before
            writing; or a ready :class:`~langchain_understudy.distill_jobs.redact.Redactor`.
        tags: Tags added to every trace this recorder writes.
        patterns: Extra redaction patterns, ``name -> regex``; a match becomes ``<NAME>``.
        batch_size: Most traces written per transaction.
        flush_interval: Seconds the writer lets calls gather before writing a batch; a trace
            is in the store at most about this long after its call ended (or at :meth:`flush`).
        max_queue: Calls waiting to be written beyond which new ones are dropped (and counted)
            rather than letting memory grow without bound when the disk stalls.

    Raises:
        ConfigError: ``patterns`` given with ``redact=False``, or an invalid pattern.

    Example:
        >>> import tempfile, os
        >>> from langchain_core.language_models import GenericFakeChatModel
        >>> from langchain_core.messages import AIMessage
        >>> store = TraceStore(os.path.join(tempfile.mkdtemp(), "traces.sqlite"))
        >>> recorder = TraceRecorder(store, tags=["support"])
        >>> model = GenericFakeChatModel(messages=iter([AIMessage("hello")]))
        >>> _ = model.invoke("hi", config={"callbacks": [recorder]})
        >>> recorder.flush()
        >>> store.count(tags=["support"])
        1
        >>> recorder.close()
    """

    # The handler only appends to a queue, so it is safe to run on the event loop: this spares
    # async callers a thread-pool hop per callback event.
    run_inline = True
    raise_error = False

    def __init__(
        self,
        store: TraceStore | str | os.PathLike[str],
        *,
        redact: bool | Redactor = True,
        tags: Sequence[str] | None = None,
        patterns: Mapping[str, str | re.Pattern[str]] | None = None,
        batch_size: int = 256,
        flush_interval: float = 0.05,
        max_queue: int = 100_000,
    ) -> None:
        super().__init__()
        if patterns and redact is False:
            msg = "redaction patterns were given with redact=False; drop one of the two"
            raise ConfigError(msg)
        if isinstance(redact, Redactor):
            self.redactor: Redactor | None = redact
        else:
            self.redactor = Redactor(patterns) if redact else None
        self._owns_store = not isinstance(store, TraceStore)
        self.store = store if isinstance(store, TraceStore) else TraceStore(store)
        self.tags = list(tags or [])
        self._batch_size = max(1, batch_size)
        self._interval = max(0.0, flush_interval)
        self._wake = threading.Event()
        self._pending: dict[UUID, _Started] = {}
        self._pending_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._closed = False
        #: Traces written since the recorder was created.
        self.written = 0
        #: Calls that could not be written (queue full, redaction or store failure).
        self.dropped = 0
        self._dropped_seen = 0
        self._last_error: str | None = None
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"TraceRecorder({self.store.path.name})", daemon=True
        )
        self._thread.start()
        ref = weakref.ref(self)

        def at_exit() -> None:  # a weak reference: registering must not keep the recorder alive
            recorder = ref()
            if recorder is not None:
                recorder._close_quietly()

        self._atexit = at_exit
        atexit.register(at_exit)

    def __repr__(self) -> str:
        return f"TraceRecorder({self.store!r}, redact={self.redactor is not None})"

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Chains, tools, retrievers and agent actions are not traces: let LangChain skip us for them.
    @property
    def ignore_chain(self) -> bool:
        """Always ``True``: chains are not recorded."""
        return True

    @property
    def ignore_agent(self) -> bool:
        """Always ``True``: agent actions are not recorded."""
        return True

    @property
    def ignore_retriever(self) -> bool:
        """Always ``True``: retrievers are not recorded."""
        return True

    @property
    def ignore_custom_event(self) -> bool:
        """Always ``True``: custom events are not recorded."""
        return True

    # callback events (caller's thread: cheap, never raise) ----------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the prompt of a chat-model call until it ends."""
        if self._closed:
            return
        meta = dict(metadata or {})
        tools = (kwargs.get("invocation_params") or {}).get("tools")
        if isinstance(tools, list) and tools:
            meta["tools"] = tools  # what the student is shown, and served with, for this call
        start = _Started(
            messages=[list(m) for m in messages],
            started=time.perf_counter(),
            created_at=datetime.now(UTC),
            parent_run_id=parent_run_id,
            tags=[t for t in (tags or []) if not _NOISE_TAG.match(t)],
            metadata=meta,
            model=_model_from_start(serialized, meta, kwargs),
        )
        with self._pending_lock:
            self._pending[run_id] = start
            if len(self._pending) > _MAX_PENDING:
                del self._pending[next(iter(self._pending))]

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Queue the finished call for writing."""
        with self._pending_lock:
            start = self._pending.pop(run_id, None)
        if start is None:  # not a chat-model call we saw start (e.g. a completion LLM)
            return
        latency = (time.perf_counter() - start.started) * 1000.0
        answers = _answers(response, len(start.messages))
        model = _model_from_answer(answers[0], response.llm_output) or start.model
        self._put(_Finished(run_id, start, answers, latency, model))

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Queue the failed call for writing, with whatever was streamed before it failed."""
        with self._pending_lock:
            start = self._pending.pop(run_id, None)
        if start is None:
            return
        latency = (time.perf_counter() - start.started) * 1000.0
        response = kwargs.get("response")
        answers = _answers(response if isinstance(response, LLMResult) else None, 1)
        answers += [None] * (len(start.messages) - 1)
        self._put(_Finished(run_id, start, answers, latency, start.model, _error_text(error)))

    def _put(self, item: _Finished) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._stats_lock:
                self.dropped += len(item.start.messages)
                self._last_error = "the write queue is full (the store cannot keep up)"
            logger.warning("trace dropped: the write queue for %s is full", self.store.path)

    # writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            if isinstance(batch[0], _Finished):
                # Let calls gather for a moment: one transaction (and one wake-up of this
                # thread) per batch instead of per call. flush() and close() cut this short.
                self._wake.wait(self._interval)
            while len(batch) < self._batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._wake.clear()
            rows: list[tuple[Any, ...]] = []
            flushes: list[_Flush] = []
            stop = False
            for it in batch:
                if isinstance(it, _Finished):
                    rows.extend(self._to_rows(it))
                elif isinstance(it, _Flush):
                    flushes.append(it)
                elif it is _STOP:
                    stop = True
            if rows:
                self._write(rows)
            for f in flushes:
                f.done.set()
            if stop:
                return

    def _to_rows(self, item: _Finished) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        n = len(item.start.messages)
        for i, (prompt, answer) in enumerate(zip(item.start.messages, item.answers, strict=True)):
            try:
                out.append(self._to_row(item, i, n, prompt, answer))
            except Exception as e:  # a message we cannot serialise must not stop the writer
                with self._stats_lock:
                    self.dropped += 1
                    self._last_error = _error_text(e)
                logger.warning("trace of run %s could not be prepared: %r", item.run_id, e)
        return out

    def _to_row(
        self,
        item: _Finished,
        i: int,
        n: int,
        prompt: list[BaseMessage],
        answer: BaseMessage | None,
    ) -> tuple[Any, ...]:
        start = item.start
        msg = _as_ai_message(answer) if answer is not None else AIMessage(content="")
        # Work on message dicts: redact them and write them as they are, with no round trip
        # through message objects (this thread shares the GIL with the agent).
        dicts = messages_to_dict([*prompt, msg])
        metadata: dict[str, Any] = start.metadata
        if self.redactor is not None:
            dicts = self.redactor.redact_message_dicts(dicts)
            metadata = self.redactor.redact_value(metadata)
        return _row(
            id=str(item.run_id) if n == 1 else f"{item.run_id}:{i}",
            created_at=start.created_at,
            prompt=dicts[:-1],
            answer=dicts[-1],
            model=item.model,
            latency_ms=item.latency_ms,
            tags=list(dict.fromkeys([*self.tags, *start.tags])),
            metadata=metadata,
            run_id=str(item.run_id),
            parent_run_id=str(start.parent_run_id) if start.parent_run_id else None,
            error=item.error,
        )

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            self.store._insert_rows(rows)
        except Exception as e:  # disk full, locked for too long, ...: log, count, carry on
            with self._stats_lock:
                self.dropped += len(rows)
                self._last_error = _error_text(e)
            logger.warning(
                "%d traces could not be written to %s: %r", len(rows), self.store.path, e
            )
            return
        with self._stats_lock:
            self.written += len(rows)

    # flushing and closing ---------------------------------------------------------------------

    def flush(self, timeout: float | None = 60.0) -> None:
        """Block until every call recorded so far is written.

        Raises:
            TraceError: the recorder is closed, the writer did not finish in ``timeout`` seconds,
                or some traces could not be written since the last flush.
        """
        if self._closed or not self._thread.is_alive():
            msg = "this TraceRecorder is closed; create a new one to record more calls"
            raise TraceError(msg)
        marker = _Flush()
        self._queue.put(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            msg = (
                f"traces were not written to {self.store.path} within {timeout} s; "
                "check that nothing holds a long write lock on the store"
            )
            raise TraceError(msg)
        self._raise_if_dropped()

    async def aflush(self, timeout: float | None = 60.0) -> None:
        """Like :meth:`flush`, without blocking the event loop."""
        await asyncio.to_thread(self.flush, timeout)

    def _raise_if_dropped(self) -> None:
        with self._stats_lock:
            lost = self.dropped - self._dropped_seen
            self._dropped_seen = self.dropped
            last = self._last_error
        if lost:
            msg = (
                f"{lost} traces could not be written to {self.store.path} (last error: {last}); "
                "the others were; for I/O errors check free disk space and that the store file "
                "is writable"
            )
            raise TraceError(msg)

    def close(self, timeout: float | None = 60.0) -> None:
        """Write what is queued, stop the writer thread and close a store this recorder opened.

        Calls that are still running when the recorder closes are not recorded. Closing twice
        is harmless.

        Raises:
            TraceError: some traces could not be written since the last flush.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._wake.set()
            self._thread.join(timeout)
        with self._pending_lock:
            self._pending.clear()
        if self._owns_store and not self._thread.is_alive():
            self.store.close()
        self._raise_if_dropped()

    def _close_quietly(self) -> None:
        try:
            self.close(timeout=10.0)
        except TraceError as e:
            logger.warning("%s", e)
