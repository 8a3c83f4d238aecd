"""Routing signals, rules, the out-of-distribution index and the PII detector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.router import signals as sig
from langchain_understudy.router.signals import OODIndex, RoutingContext, RoutingRules, SignalAbsent
from langchain_understudy.router.teachers import PrivacyPolicy


def _ctx(*texts: str, **kw: object) -> RoutingContext:
    msgs = []
    for i, t in enumerate(texts):
        msgs.append(HumanMessage(t) if i % 2 == 0 else AIMessage(t))
    return RoutingContext(msgs, **kw)  # type: ignore[arg-type]


def test_user_turns_counts_only_user_messages() -> None:
    ctx = RoutingContext([SystemMessage("s"), HumanMessage("a"), AIMessage("b"), HumanMessage("c")])
    assert sig.user_turns(ctx) == 2.0


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (("What does Pro cost?",), 0.0),  # no earlier turn
        (("Book a flight to Rome", "done", "What is the weather in Oslo tomorrow?"), 0.0),
        (("Book a flight to Rome", "done", "And the other one?"), 1 - 0.4 * 0.4 * 0.7),
        (("Book a flight to Rome", "done", "Same again, please."), 1 - 0.4 * 0.4 * 0.7),
        (("Book a flight to Rome", "done", "how much does it cost to fly there"), 1 - 0.7),
        (("Book a flight", "done", "thanks a lot"), 0.3),  # short fragment only
    ],
)
def test_depends_on_history(texts: tuple[str, ...], expected: float) -> None:
    assert sig.depends_on_history(_ctx(*texts)) == pytest.approx(expected)


def test_context_fraction_uses_tokenizer_and_facts() -> None:
    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return 100

    ctx = _ctx("hello", n_ctx=400, count_tokens=count)
    assert sig.context_fraction(ctx) == 0.25
    assert "<|user|>" in calls[0]
    doc = Document("Pro costs 49 EUR.", id="price.pro", metadata={"as_of": "2026-01-01"})
    ctx = _ctx("hello", n_ctx=400, count_tokens=count, retrieved=[(doc, 0.9)])
    sig.context_fraction(ctx)
    assert "(price.pro, as of 2026-01-01) Pro costs 49 EUR." in calls[-1]
    with pytest.raises(SignalAbsent):
        sig.context_fraction(_ctx("hello"))
    # without a tokenizer: 4 characters per token
    assert sig.context_fraction(_ctx("x" * 40, n_ctx=100)) > 0.1


def test_retrieval_similarity_absent_empty_best_and_failure() -> None:
    with pytest.raises(SignalAbsent, match="no knowledge store"):
        sig.retrieval_similarity(_ctx("q"))
    assert sig.retrieval_similarity(_ctx("q", retrieved=[])) == 0.0
    docs = [(Document("a"), 0.4), (Document("b"), 0.8)]
    assert sig.retrieval_similarity(_ctx("q", retrieved=docs)) == 0.8
    with pytest.raises(RuntimeError, match="store query failed"):
        sig.retrieval_similarity(_ctx("q", retrieved=None, retrieval_error="disk full"))


def test_student_confidence() -> None:
    with pytest.raises(SignalAbsent):
        sig.student_confidence(_ctx("q"))
    ctx = _ctx("q", student_output=AIMessage("a", response_metadata={"confidence": 0.7}))
    assert sig.student_confidence(ctx) == 0.7
    ctx = _ctx("q", student_output=AIMessage("a"))
    with pytest.raises(SignalAbsent, match="did not report"):
        sig.student_confidence(ctx)


def test_ood_distance_exact_and_embedding_timed() -> None:
    idx = OODIndex(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    seen: list[str] = []

    def embed(text: str) -> list[float]:
        seen.append(text)
        return [1.0, 1.0]

    ctx = _ctx("first", "ok", "last turn", ood_index=idx, embed_query=embed)
    assert sig.ood_distance(ctx) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert sig.ood_distance(ctx) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert seen == ["last turn"]  # embedded once, the last user turn only
    assert "embedding" in ctx.timings_ms
    with pytest.raises(SignalAbsent, match="ood_index"):
        sig.ood_distance(_ctx("q"))
    bad = _ctx("q", ood_index=idx, embed_query=lambda t: [1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="dimensions"):
        sig.ood_distance(bad)


def test_ood_index_ivf_agrees_with_exact_on_clustered_data() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    data = np.concatenate([c + 0.05 * rng.normal(size=(150, 32)) for c in centers]).astype(
        np.float32
    )
    exact = OODIndex(data, exact_below=10**9)
    ivf = OODIndex(data, exact_below=100)
    assert ivf._centroids is not None and exact._centroids is None
    queries = centers[:20] + 0.05 * rng.normal(size=(20, 32))
    for q in queries:
        assert ivf.distance(q) == pytest.approx(exact.distance(q), abs=1e-5)
    far = rng.normal(size=32)
    assert ivf.distance(far) >= exact.distance(far) - 1e-6  # never closer than the truth


def test_ood_index_load_without_pickle(tmp_path: Path) -> None:
    vecs = np.eye(4, dtype=np.float32)
    np.save(tmp_path / "ood_index.npy", vecs, allow_pickle=False)
    (tmp_path / "ood_meta.json").write_text(json.dumps({"embedding": "all-MiniLM-L6-v2", "n": 4}))
    idx = OODIndex.load(tmp_path)
    assert len(idx) == 4 and idx.embedding == "all-MiniLM-L6-v2"
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="cannot read"):
        OODIndex.load(tmp_path / "objects.npy")
    with pytest.raises(ArtifactError):
        OODIndex.load(tmp_path / "missing.npy")
    with pytest.raises(ArtifactError, match="NaN"):
        OODIndex(np.array([[np.nan, 1.0]], dtype=np.float32))


def test_rules_always_never_and_tags() -> None:
    rules = RoutingRules(
        always_teacher_patterns=[r"(?i)\blawyer\b"],
        never_teacher_patterns=[r"(?i)salary"],
        always_teacher_tags=["vip"],
    )
    ctx = _ctx("I need a LAWYER")
    assert rules.always(ctx) == "pattern '(?i)\\\\blawyer\\\\b' always goes to the teacher"
    assert rules.never(ctx) is None
    assert rules.never(_ctx("my salary is low")) is not None
    assert rules.always(RoutingContext([HumanMessage("hi")], tags=("vip",))) is not None
    # system prompts are the application's text: not matched
    assert rules.always(RoutingContext([SystemMessage("lawyer"), HumanMessage("hi")])) is None
    with pytest.raises(ConfigError, match="regular expressions"):
        RoutingRules(always_teacher_patterns=["("])
    assert RoutingRules(**rules.to_dict()).to_dict() == rules.to_dict()


def test_document_to_fact_matches_training_format() -> None:
    from datetime import datetime

    doc = Document("x", id="k1", metadata={"as_of": datetime(2026, 1, 2, 3, 4)})
    fact = sig.document_to_fact(doc)
    assert (fact.key, fact.as_of) == ("k1", "2026-01-02T03:04:00")
    assert sig.document_to_fact(Document("y")).as_of is None


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("write to ana.maria+x@example.co.uk today", ["email"]),
        ("call +41 44 668 18 00 or 555-123-4567", ["phone", "phone"]),
        ("card 4111 1111 1111 1111 expires", ["card"]),
        ("IBAN DE89 3704 0044 0532 0130 00", ["iban"]),
        ("GB82WEST12345698765432", ["iban"]),
        ("meeting on 2024-01-15 at 10:30, pi is 3.14159, 1,000,000 users", []),
        ("transfer 500 dollars, order 12345", []),
        ("card 4111 1111 1111 1112 fails the Luhn check", []),
        ("GB00WEST12345698765432 fails mod 97", []),
        # not an IBAN, but "0044 0532 0130 00" dials a UK number: it stays on the machine
        ("DE00 3704 0044 0532 0130 00", ["phone"]),
    ],
)
def test_privacy_rules_find_pii(text: str, kinds: list[str]) -> None:
    why = PrivacyPolicy().check([HumanMessage(text)])
    if kinds:
        assert why == (
            f"personal data detected ({', '.join(dict.fromkeys(kinds))}); "
            "the conversation stays on this machine"
        )
    else:
        assert why is None


def test_default_ramps() -> None:
    specs = {s.name: s for s in sig.DEFAULT_SIGNALS}
    assert specs["student_confidence"].default_risk(0.8) == 0.0
    assert specs["student_confidence"].default_risk(0.5) == pytest.approx(0.5 * sig.MAX_RAMP_RISK)
    assert specs["student_confidence"].default_risk(0.0) == sig.MAX_RAMP_RISK
    assert specs["ood_distance"].default_risk(0.5) == pytest.approx(0.5 * sig.MAX_RAMP_RISK)
    assert specs["user_turns"].default_risk(1) == 0.0


def test_tool_call_signals_read_the_students_calls() -> None:
    from langchain_understudy.router import Router
    from langchain_understudy.router.signals import (
        DEFAULT_SIGNALS,
        TOOL_SIGNALS,
        SignalAbsent,
        call_args_from_history,
        tool_call_confidence,
    )

    history = [
        HumanMessage("Book a table in Paris"),
        AIMessage("For when?"),
        HumanMessage("at 7pm"),
    ]
    call = {"name": "book", "args": {"city": "Paris", "time": "7pm"}, "id": "c1"}
    out = AIMessage("", tool_calls=[call], response_metadata={"tool_call_confidence": 0.4})
    ctx = RoutingContext(history, student_output=out)
    assert tool_call_confidence(ctx) == pytest.approx(0.4)
    # "Paris" came two user turns ago; "7pm" is in the last one
    assert call_args_from_history(ctx) == pytest.approx(0.5)
    for fn in (tool_call_confidence, call_args_from_history):
        with pytest.raises(SignalAbsent):  # a text answer has no call to judge
            fn(RoutingContext(history, student_output=AIMessage("ok")))
    router = Router(threshold=0.5, signals=(*DEFAULT_SIGNALS, *TOOL_SIGNALS))
    assert {"tool_call_confidence", "call_args_from_history"} <= {
        s.name for s in router.stage_signals("cascade")
    }


def test_tools_unseen_is_the_share_of_bound_tools_the_student_never_learnt() -> None:
    from langchain_understudy.router.signals import SignalAbsent, tools_unseen

    history = [HumanMessage("Book a table in Paris")]
    ctx = RoutingContext(
        history, bound_tools=("book", "cancel"), trained_tools=frozenset({"book", "search"})
    )
    assert tools_unseen(ctx) == pytest.approx(0.5)
    learnt = RoutingContext(history, bound_tools=("book",), trained_tools=frozenset({"book"}))
    assert tools_unseen(learnt) == 0.0
    with pytest.raises(SignalAbsent, match="no tools"):
        tools_unseen(RoutingContext(history, trained_tools=frozenset({"book"})))
    with pytest.raises(SignalAbsent, match="tools the student learnt"):
        tools_unseen(RoutingContext(history, bound_tools=("book",)))
