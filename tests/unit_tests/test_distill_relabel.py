"""Teacher relabelling: retries, budget, bounded concurrency, idempotent reruns, nothing lost."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_understudy.distill_jobs.relabel import relabel_traces, traces_to_relabel
from langchain_understudy.distill_jobs.traces import RELABELLED, UNANSWERED, TraceStore


class ScriptedTeacher(BaseChatModel):
    """Answers ``"re: <question>"``; fails the first ``fail_first`` calls of each question."""

    fail_first: int = 0
    name_: str = "big-teacher"
    delay_s: float = 0.01
    calls: dict[str, int] = {}
    in_flight: int = 0
    max_in_flight: int = 0
    lock: Any = None

    def model_post_init(self, _: Any) -> None:
        self.calls = {}
        self.lock = threading.Lock()

    @property
    def _llm_type(self) -> str:
        return "scripted"

    @property
    def model_name(self) -> str:
        return self.name_

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **_: Any) -> ChatResult:
        q = str(messages[-1].content)
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            n = self.calls[q] = self.calls.get(q, 0) + 1
        try:
            time.sleep(self.delay_s)
            if n <= self.fail_first:
                msg = "upstream 503"
                raise ConnectionError(msg)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(f"re: {q}"))])
        finally:
            with self.lock:
                self.in_flight -= 1


def _store(tmp_path: Path, n_unanswered: int = 6, n_answered: int = 3) -> TraceStore:
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n_unanswered)]
    lines += [
        {"messages": [{"role": "user", "content": f"a{i}"}, {"role": "assistant", "content": "x"}]}
        for i in range(n_answered)
    ]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    store = TraceStore(tmp_path / "traces.sqlite")
    report = store.import_jsonl(f, unanswered=True)
    assert report.added == n_unanswered + n_answered and not report.errors
    return store


def test_import_keeps_unanswered_prompts_only_when_asked(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    store = TraceStore(tmp_path / "s.sqlite")
    report = store.import_jsonl(f)
    assert (
        report.added == 0
        and "line 1: the last message must be the assistant's" in (report.errors[0])
    )
    assert store.import_jsonl(f, unanswered=True).added == 1
    (t,) = store.iter_traces()
    assert UNANSWERED in t.tags and t.answer.content == ""
    assert [m.content for m in t.messages] == ["q"]


def test_missing_answers_are_asked_with_retries_and_bounded_concurrency(tmp_path: Path) -> None:
    store = _store(tmp_path)
    teacher = ScriptedTeacher(fail_first=1, delay_s=0.05)
    report = relabel_traces(store, teacher, mode="missing", max_concurrency=3, backoff_s=0.0)
    assert (report.wanted, report.answered, report.failed) == (6, 6, 0)
    assert report.calls == 12  # every prompt failed once, then succeeded
    assert teacher.max_in_flight == 3
    new = [t for t in store.iter_traces() if RELABELLED in t.tags]
    assert sorted(str(t.answer.content) for t in new) == [f"re: q{i}" for i in range(6)]
    assert all(t.model == "big-teacher" and t.metadata["relabel_of"] for t in new)
    # a rerun asks nothing: every missing answer now exists
    assert traces_to_relabel(store, "missing", "big-teacher") == []
    assert relabel_traces(store, teacher, mode="missing").calls == 0


def test_budget_stops_asking_and_the_rest_waits_for_the_next_run(tmp_path: Path) -> None:
    store = _store(tmp_path)
    teacher = ScriptedTeacher()
    first = relabel_traces(store, teacher, mode="missing", max_calls=4, max_concurrency=2)
    assert (first.answered, first.over_budget, first.calls) == (4, 2, 4)
    second = relabel_traces(store, teacher, mode="missing", max_calls=4)
    assert (second.wanted, second.answered, second.calls) == (2, 2, 2)


def test_a_teacher_that_keeps_failing_loses_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    before = store.count()
    report = relabel_traces(
        store, ScriptedTeacher(fail_first=99), mode="missing", max_retries=2, backoff_s=0.0
    )
    assert (report.answered, report.failed, report.calls) == (0, 6, 18)
    assert "ConnectionError: upstream 503" in report.errors[0]
    assert store.count() == before
    assert len(traces_to_relabel(store, "missing", "big-teacher")) == 6


def test_all_mode_relabels_every_prompt_once_per_teacher_model(tmp_path: Path) -> None:
    store = _store(tmp_path, n_unanswered=2, n_answered=3)
    report = relabel_traces(store, ScriptedTeacher(), mode="all")
    assert report.answered == 5
    assert relabel_traces(store, ScriptedTeacher(), mode="all").wanted == 0
    assert relabel_traces(store, ScriptedTeacher(name_="bigger"), mode="all").answered == 5


def test_job_without_a_teacher_says_what_to_configure(tmp_path: Path) -> None:
    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
    from langchain_understudy.errors import ConfigError

    _store(tmp_path)
    cfg = DistillConfig(
        traces=tmp_path / "traces.sqlite",
        registry=tmp_path / "students",
        work_dir=tmp_path / "runs",
        relabel={"mode": "missing"},
    )
    with pytest.raises(ConfigError, match=r"needs a teacher: set \[teacher\]"):
        DistillJob(cfg, progress=False).run()


def test_conversations_keep_the_newest_answer(tmp_path: Path) -> None:
    from langchain_understudy.distill_jobs.dataset import build_examples

    store = _store(tmp_path, n_unanswered=0, n_answered=2)
    relabel_traces(store, ScriptedTeacher(), mode="all")
    pairs = [(t.messages, t.answer, {}) for t in store.iter_traces()]
    examples, _ = build_examples(pairs)
    assert sorted(e.answer for e in examples) == ["re: a0", "re: a1"]
