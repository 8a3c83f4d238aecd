"""Dataset building, splitting, metrics and scheduling: the distillation job's pure parts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.messages import HumanMessage

from langchain_understudy.distill_jobs.dataset import build_examples, split_examples
from langchain_understudy.distill_jobs.evaluation import field_accuracy, normalize_answer, token_f1
from langchain_understudy.distill_jobs.schedule import next_run, parse_every, run_schedule
from langchain_understudy.errors import ConfigError
from langchain_understudy.prompting import END, Fact, render_prompt


def _pairs(n: int) -> list:
    return [([HumanMessage(f"question {i}")], f"answer {i}", {}) for i in range(n)]


def test_build_examples_dedupes_filters_and_uses_the_serving_prompt() -> None:
    pairs = [
        *_pairs(5),
        ([HumanMessage("question 1")], "newer answer", {}),
        ([HumanMessage("x")], "  ", {}),
        ([HumanMessage("y")], "z", {"error": "timeout"}),
    ]
    facts_seen = []

    def lookup(examples):
        facts_seen.extend(ex.key for ex in examples)
        return [[Fact("fact for " + ex.messages[-1].content)] for ex in examples]

    examples, dropped = build_examples(pairs, facts=lookup)
    assert len(examples) == 5
    assert dropped == {
        "empty_answer": 1,
        "long_answer": 0,
        "error": 1,
        "duplicate": 1,
        "bad_tools": 0,
    }
    ex = next(e for e in examples if e.messages[0].content == "question 1")
    assert ex.answer == "newer answer"  # the latest answer wins
    assert ex.prompt == render_prompt(ex.messages, [Fact("fact for question 1")])
    assert ex.target == "newer answer" + END
    assert sorted(facts_seen) == sorted(e.key for e in examples)


def test_split_is_deterministic_and_disjoint() -> None:
    examples, _ = build_examples(_pairs(2000))
    train, held = split_examples(examples, 0.1)
    train2, held2 = split_examples(list(reversed(examples)), 0.1)
    assert {e.key for e in held} == {e.key for e in held2}
    assert not {e.key for e in train} & {e.key for e in held}
    assert 150 < len(held) < 250


def test_metrics() -> None:
    assert normalize_answer("  The Pro plan. ") == normalize_answer("the pro   plan")
    assert normalize_answer('{"b": 1, "a": "x"}') == normalize_answer('{ "a":"x","b":1 }')
    assert token_f1("the pro plan", "pro plan") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("a", "b") == 0.0
    assert field_accuracy('{"a": 1, "b": 2}', '{"a": 1, "b": 3}') == 0.5
    assert field_accuracy('{"a": 1, "c": 2}', '{"a": 1}') == 0.5  # extra field counts against
    assert field_accuracy("not json", '{"a": 1}') == 0.0
    assert field_accuracy("x", "plain text") is None


def test_schedule_parsing_and_cron() -> None:
    assert parse_every("6h") == timedelta(hours=6)
    assert parse_every("1h30m") == timedelta(minutes=90)
    for bad in ("6 hours", "", "0m", "h"):
        with pytest.raises(ConfigError, match="--every"):
            parse_every(bad)
    now = datetime(2026, 1, 1, 2, 59, tzinfo=UTC)
    assert next_run(now, cron="0 3 * * *") == datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    with pytest.raises(ConfigError, match="cron"):
        next_run(now, cron="every day")


def test_run_schedule_runs_on_time_and_survives_failures() -> None:
    t = [datetime(2026, 1, 1, tzinfo=UTC)]
    sleeps: list[float] = []
    calls = iter([RuntimeError("boom"), "promoted v2", "skipped"])
    lines: list[str] = []

    def once() -> str:
        outcome = next(calls)
        t[0] += timedelta(minutes=5)  # each run takes five minutes
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def sleep(s: float) -> None:
        sleeps.append(s)
        t[0] += timedelta(seconds=s)

    n = run_schedule(
        once,
        every=timedelta(hours=1),
        max_runs=3,
        sleep=sleep,
        clock=lambda: t[0],
        log=lines.append,
    )
    assert n == 3
    assert sleeps == [
        55 * 60,
        55 * 60,
    ]  # runs start on the hour, not an hour after the last one ended
    assert "failed: RuntimeError: boom" in lines[0] and "promoted v2" in "\n".join(lines)


def test_job_prompts_carry_the_facts_as_the_teacher_saw_them(tmp_path) -> None:
    """Facts as of each trace's date, never the trace's own fact, distinct answers on request."""
    from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
    from langchain_understudy.retrieval import KnowledgeStore

    class Same(Embeddings):  # every text equally similar: the store's order decides ties
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [[1.0, 0.0] for _ in texts]

        def embed_query(self, text: str) -> list[float]:
            return [1.0, 0.0]

    kb = KnowledgeStore(tmp_path / "kb", Same())
    kb.add_texts(["Pro costs 20 EUR"], [{"as_of": "2024-01-01"}], ids=["price"])
    kb.add_texts(["Pro costs 25 EUR"], [{"as_of": "2024-06-01"}], ids=["price"])
    pairs = [
        (
            [HumanMessage("How much is Pro?")],
            "20 EUR",
            {"created_at": datetime(2024, 3, 1, tzinfo=UTC)},
        ),
        ([HumanMessage("Pro price?")], "25 EUR", {"created_at": datetime(2024, 7, 1, tzinfo=UTC)}),
        ([HumanMessage("Pro, how much?")], "20 EUR", {"created_at": datetime(2020, 1, 1)}),
    ]
    cfg = DistillConfig(traces=tmp_path / "t.sqlite", knowledge={"path": tmp_path / "kb", "k": 3})
    lookup = DistillJob(cfg, embeddings=Same())._fact_lookup()
    assert lookup is not None
    examples, _ = build_examples(pairs, facts=lookup)
    seen = {ex.messages[0].content: [f.text for f in ex.facts] for ex in examples}
    assert seen["How much is Pro?"] == ["Pro costs 20 EUR"]
    assert seen["Pro price?"] == ["Pro costs 25 EUR"]
    # older than the store's first fact: the oldest facts stand in
    assert seen["Pro, how much?"] == ["Pro costs 20 EUR"]
    assert "as of 2024-01-01" in examples[0].prompt

    now = DistillConfig(
        traces=tmp_path / "t.sqlite",
        knowledge={"path": tmp_path / "kb", "k": 3, "as_of": "now", "fact_details": False},
    )
    lookup = DistillJob(now, embeddings=Same())._fact_lookup()
    assert lookup is not None
    examples, _ = build_examples(pairs, facts=lookup)
    assert all([f.text for f in ex.facts] == ["Pro costs 25 EUR"] for ex in examples)
    assert "[1] Pro costs 25 EUR" in examples[0].prompt  # no key, no date

    # past teacher answers as facts: the example's own trace never shows, answers are distinct
    mem = KnowledgeStore(tmp_path / "mem", Same())
    rows = [("How much is Pro?", "20 EUR"), ("Pro cost?", "20 EUR"), ("Pro fee?", "20 EUR")]
    rows += [("Is Pro monthly?", "yes")]
    own = build_examples([([HumanMessage(q)], a, {}) for q, a in rows[:1]])[0][0].key
    mem.add_texts(
        [f"{q} => {a}" for q, a in rows],
        [
            {"answer": a, "source_key": own if i == 0 else f"other-{i}"}
            for i, (q, a) in enumerate(rows)
        ],
    )
    cfg = DistillConfig(
        traces=tmp_path / "t.sqlite",
        knowledge={"path": tmp_path / "mem", "k": 3, "distinct_by": "answer"},
    )
    lookup = DistillJob(cfg, embeddings=Same())._fact_lookup()
    assert lookup is not None
    examples, _ = build_examples([([HumanMessage(rows[0][0])], "20 EUR", {})], facts=lookup)
    texts = [f.text for f in examples[0].facts]
    assert "How much is Pro? => 20 EUR" not in texts
    assert sorted(t.split(" => ")[1] for t in texts) == ["20 EUR", "yes"]
