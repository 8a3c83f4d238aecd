"""The router shows the student facts chosen exactly as the student was trained to read them."""

from __future__ import annotations

from pathlib import Path

from langchain_core.embeddings import Embeddings
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from langchain_understudy.config import UnderstudyConfig
from langchain_understudy.retrieval import KnowledgeStore
from langchain_understudy.router import ChatUnderstudy


class Ranked(Embeddings):
    """Query [1, 0]; a fact's similarity falls with the number in its text."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, float(t.split()[0][1:])] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return [1.0, 0.0]


def _store(tmp_path: Path) -> KnowledgeStore:
    kb = KnowledgeStore(tmp_path / "kb", Ranked())
    rows = [
        ("q1 => balance", "balance"),
        ("q2 => balance", "balance"),
        ("q3 => transfer", "transfer"),
    ]
    kb.add_texts([t for t, _ in rows], [{"answer": a} for _, a in rows], ids=["a", "b", "c"])
    return kb


def test_facts_follow_the_students_training_unless_set(tmp_path: Path) -> None:
    llm = ChatUnderstudy(student=FakeListChatModel(responses=["x"]), knowledge=_store(tmp_path))
    trained = {"k": 2, "distinct_by": "answer", "fetch_k": 10, "fact_details": False}
    _, facts, err, _ = llm._retrieve("anything", trained)
    assert err is None
    assert [(f.text, f.key) for f in facts] == [("q1 => balance", None), ("q3 => transfer", None)]

    # without a recorded selection: the k most relevant, with their keys
    _, facts, _, _ = llm._retrieve("anything", None)
    assert [f.key for f in facts] == ["a", "b", "c"]

    # a field set on the model wins over the student's record
    pinned = ChatUnderstudy(
        student=FakeListChatModel(responses=["x"]), knowledge=_store(tmp_path / "2"), k=1
    )
    assert pinned.fact_selection(trained).k == 1
    assert pinned.fact_selection(trained).distinct_by == "answer"


def test_from_config_only_pins_what_the_config_sets(tmp_path: Path) -> None:
    cfg = UnderstudyConfig.model_validate({"student": {"registry": str(tmp_path / "students")}})
    llm = ChatUnderstudy.from_config(cfg, knowledge=None)
    assert llm.fact_selection({"k": 7}).k == 7
    cfg = UnderstudyConfig.model_validate({"knowledge": {"k": 3, "distinct_by": "answer"}})
    llm = ChatUnderstudy.from_config(cfg, knowledge=None)
    assert llm.fact_selection({"k": 7, "fact_details": False}).model_dump() == {
        "k": 3,
        "distinct_by": "answer",
        "fetch_k": None,
        "fact_details": False,
    }
