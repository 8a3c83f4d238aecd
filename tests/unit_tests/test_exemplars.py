"""Exemplar memory search: distinct answers, the example's own trace excluded, vote ordering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from langchain_understudy.distill_jobs.job import ExemplarSection
from langchain_understudy.errors import ConfigError
from langchain_understudy.students.exemplars import ExemplarMemory


def _memory() -> ExemplarMemory:
    # one very close "refund" request, then three slightly further "cancel" requests
    rows = [
        ("refund my order", "refund", [1.0, 0.0]),
        ("cancel my order", "cancel", [0.9, 0.44]),
        ("cancel it now", "cancel", [0.9, 0.43]),
        ("please cancel", "cancel", [0.88, 0.47]),
        ("weather today", "weather", [0.0, 1.0]),
    ]
    q, a, v = zip(*rows, strict=True)
    return ExemplarMemory.build(q, a, [f"k{i}" for i in range(len(rows))], v)


def test_similarity_order_puts_the_closest_request_first() -> None:
    found = _memory().search([[1.0, 0.05]], k=2)[0]
    assert [e.answer for e in found] == ["refund", "cancel"]


def test_vote_order_puts_the_answer_the_neighbourhood_backs_first() -> None:
    found = _memory().search([[1.0, 0.05]], k=2, vote_k=4)[0]
    assert [e.answer for e in found] == ["cancel", "refund"]
    assert found[0].query == "cancel it now"  # its closest request stands for it
    # an answer outside the voting neighbours still fills the prompt, after the voted ones
    assert [e.answer for e in _memory().search([[1.0, 0.05]], k=3, vote_k=2)[0]] == [
        "refund",
        "cancel",
        "weather",
    ]


def test_vote_order_never_counts_the_examples_own_trace() -> None:
    mem = _memory()
    # the query is request 1 itself: without its own vote "cancel" (2 left) still beats "refund"
    found = mem.search([mem.vectors[1]], k=2, vote_k=4, exclude_keys=["k1"])[0]
    assert "cancel my order" not in [e.query for e in found]
    assert [e.answer for e in found] == ["cancel", "refund"]


def test_vote_order_needs_distinct_answers() -> None:
    with pytest.raises(ConfigError, match="distinct"):
        _memory().search(np.ones((1, 2)), k=2, distinct=False, vote_k=3)


def test_exemplar_section_votes_only_when_asked_and_over_distinct_answers() -> None:
    assert ExemplarSection().vote_neighbours is None
    assert ExemplarSection(order="vote").vote_neighbours == 30
    assert ExemplarSection(order="vote", vote_k=7).vote_neighbours == 7
    assert ExemplarSection(order="vote", distinct_by=None).vote_neighbours is None


def test_a_registered_vote_memory_is_served_in_vote_order(tmp_path: Path, tiny_gguf: Path) -> None:
    from langchain_core.embeddings import Embeddings
    from langchain_core.messages import HumanMessage

    from langchain_understudy.students import ChatStudent, StudentRegistry

    class TwoD(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [self.embed_query(t) for t in texts]

        def embed_query(self, text: str) -> list[float]:
            return [1.0, 0.05]

    npy, rows = _memory().save(tmp_path / "mem")
    reg = StudentRegistry(tmp_path / "reg")
    settings = {"k": 2, "distinct_by": "answer", "order": "vote", "vote_k": 4}
    v = reg.register(
        tiny_gguf,
        {"exemplars": settings},
        extra_files={"exemplars.npy": npy, "exemplars.jsonl": rows},
    )
    student = ChatStudent.from_version(reg.get(v), embeddings=TwoD())
    assert student.exemplars is not None
    shown = student.exemplars.for_messages([HumanMessage("refund?")])
    assert [e.answer for e in shown] == ["cancel", "refund"]
    # a version registered before vote ordering existed (no "order") keeps similarity order
    v_old = reg.register(
        tiny_gguf,
        {"exemplars": {"k": 2, "distinct_by": "answer"}},
        extra_files={"exemplars.npy": npy, "exemplars.jsonl": rows},
    )
    old = ChatStudent.from_version(reg.get(v_old), embeddings=TwoD())
    assert old.exemplars is not None
    assert [e.answer for e in old.exemplars.for_messages([HumanMessage("x")])] == [
        "refund",
        "cancel",
    ]
