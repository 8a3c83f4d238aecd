"""Teacher relabelling: ask the teacher to answer prompts that have no answer (or all of them).

A distillation job can only learn from answers. Prompts imported without one
(``understudy traces import --unanswered``), calls that failed, or — on request — every recorded
prompt are sent to the configured teacher with bounded concurrency, retries with backoff and a call
budget. Each answer is written to the trace store as it arrives, as a new trace tagged
``"relabelled"`` whose ``metadata["relabel_of"]`` names the source trace, so a crash loses nothing
and a rerun asks only for what is still missing. The newest answer to a conversation is the one a
job trains on.

Example:
    >>> report = relabel_traces(TraceStore("traces.sqlite"), teacher, mode="missing")  # doctest: +SKIP
    >>> report.summary()["answered"]  # doctest: +SKIP
    120
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage

from langchain_understudy.distill_jobs.traces import RELABELLED, Trace, TraceStore
from langchain_understudy.prompting import message_text, model_name_of

__all__ = ["RelabelReport", "relabel_traces", "traces_to_relabel"]

logger = logging.getLogger(__name__)

RelabelMode = Literal["off", "missing", "all"]


@dataclass
class RelabelReport:
    """What a relabelling pass did.

    Attributes:
        wanted: Prompts that needed an answer from this teacher.
        answered: Answers written to the store.
        failed: Prompts whose every attempt failed (they are asked again next run).
        over_budget: Prompts not asked because the call budget ran out (asked next run).
        calls: Teacher calls made, retries included (what the budget counts).
        seconds: Wall time of the pass.
        errors: The first few failures, ``"trace ID: ErrorType: message"``.
    """

    wanted: int = 0
    answered: int = 0
    failed: int = 0
    over_budget: int = 0
    calls: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``errors`` cut to five)."""
        return {**asdict(self), "seconds": round(self.seconds, 3), "errors": self.errors[:5]}


def traces_to_relabel(store: TraceStore, mode: RelabelMode, teacher_model: str) -> list[Trace]:
    """Return the traces a relabelling pass in ``mode`` would send to the teacher.

    ``missing``: prompts without an answer (imported unanswered, or failed calls) that no
    relabelled trace answers yet. ``all``: every prompt that this teacher model has not yet
    relabelled (relabelled traces themselves are never sources).
    """
    if mode == "off":
        return []
    done_any: set[str] = set()
    done_by_model: set[str] = set()
    sources: list[Trace] = []
    for t in store.iter_traces():
        if RELABELLED in (t.tags or []):
            src = str((t.metadata or {}).get("relabel_of", ""))
            done_any.add(src)
            if t.model == teacher_model:
                done_by_model.add(src)
        else:
            sources.append(t)
    if mode == "missing":
        return [t for t in sources if not t.has_answer and t.id not in done_any]
    return [t for t in sources if t.id not in done_by_model]


def relabel_traces(
    store: TraceStore,
    teacher: BaseChatModel,
    *,
    mode: RelabelMode = "missing",
    teacher_model: str | None = None,
    max_concurrency: int = 4,
    max_calls: int | None = None,
    max_retries: int = 2,
    backoff_s: float = 0.5,
    max_backoff_s: float = 8.0,
    progress: Callable[[int], None] | None = None,
) -> RelabelReport:
    """Ask ``teacher`` for the answers :func:`traces_to_relabel` selects; store each as it arrives.

    Args:
        store: The trace store to read prompts from and write answers to.
        teacher: Any LangChain chat model.
        mode: ``"missing"``, ``"all"`` or ``"off"``.
        teacher_model: The name recorded on the new traces (default: the model's own name).
        max_concurrency: Teacher calls in flight at once.
        max_calls: Budget of teacher calls for this pass, retries included (``None``: no limit).
            Prompts left when it runs out are reported as ``over_budget`` and asked next time.
        max_retries: Further attempts after a failed call, with exponential backoff.
        backoff_s: First pause between attempts; doubles each retry up to ``max_backoff_s``.
        max_backoff_s: Longest pause between attempts.
        progress: Called with 1 for every prompt finished (answered, failed or over budget).

    Returns:
        A :class:`RelabelReport`.
    """
    if max_concurrency < 1:
        msg = f"max_concurrency must be at least 1, got {max_concurrency}"
        raise ValueError(msg)
    name = teacher_model or model_name_of(teacher)
    todo = traces_to_relabel(store, mode, name)
    report = RelabelReport(wanted=len(todo))
    t0 = time.perf_counter()
    budget = threading.Semaphore(max_calls) if max_calls is not None else None
    count_lock = threading.Lock()

    def claim() -> bool:
        if budget is not None and not budget.acquire(blocking=False):
            return False
        with count_lock:
            report.calls += 1
        return True

    def ask(t: Trace) -> tuple[AIMessage | None, float, str | None]:
        """(answer or None, latency ms, error); None and no error: over budget."""
        error: str | None = None
        for attempt in range(max_retries + 1):
            if not claim():
                return None, 0.0, error
            start = time.perf_counter()
            try:
                out = teacher.invoke(t.messages)
            except Exception as e:  # noqa: BLE001 - any teacher failure is retried, then reported
                error = f"{type(e).__name__}: {e}"
            else:
                msg = out if isinstance(out, AIMessage) else AIMessage(content=str(out.content))
                if message_text(msg) or msg.tool_calls:
                    return msg, (time.perf_counter() - start) * 1000, None
                error = "the teacher returned an empty answer"
            if attempt < max_retries:
                time.sleep(min(max_backoff_s, backoff_s * 2**attempt))
        return None, 0.0, error

    def finish(t: Trace, fut: Future[tuple[AIMessage | None, float, str | None]]) -> None:
        answer, latency, error = fut.result()
        if answer is not None:
            store.add(
                t.messages,
                answer,
                model=name,
                latency_ms=latency,
                tags=list(dict.fromkeys([*(t.tags or []), RELABELLED])),
                metadata={**(t.metadata or {}), "relabel_of": t.id},
            )
            report.answered += 1
        elif error is None:
            report.over_budget += 1
        else:
            report.failed += 1
            report.errors.append(f"trace {t.id}: {error}")
            logger.warning("relabelling trace %s failed: %s", t.id, error)
        if progress is not None:
            progress(1)

    # Writes happen on this thread only (one SQLite connection), as answers arrive.
    with ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="relabel") as pool:
        pending: dict[Future[Any], Trace] = {}
        queue = list(reversed(todo))
        while queue or pending:
            while queue and len(pending) < max_concurrency:
                t = queue.pop()
                pending[pool.submit(ask, t)] = t
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(pending.pop(fut), fut)
    report.seconds = time.perf_counter() - t0
    return report
