"""KnowledgeStore with the bundled all-MiniLM-L6-v2 on a small corpus: the behaviour users see."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from knowledge_helpers import one_torch_thread

from langchain_understudy.retrieval import KnowledgeStore, default_embeddings

pytestmark = pytest.mark.slow

FACTS = {
    "pro-price": (
        "The Pro plan costs $25 per user per month.",
        {"topic": "billing", "tier": "pro"},
    ),
    "basic-price": (
        "The Basic plan is free for up to three users.",
        {"topic": "billing", "tier": "basic"},
    ),
    "refunds": ("Refunds are available within 30 days of purchase.", {"topic": "billing"}),
    "support-hours": ("Support answers tickets within one business day.", {"topic": "support"}),
    "storage": ("Each workspace includes 100 GB of file storage.", {"topic": "limits"}),
    "sso": ("Single sign-on with SAML is available on the Enterprise plan.", {"topic": "security"}),
    "region": ("Customer data is stored in the EU region by default.", {"topic": "security"}),
    "api-limit": ("The API allows 1000 requests per minute per workspace.", {"topic": "limits"}),
    "export": ("Workspaces can be exported as JSON at any time.", {"topic": "data"}),
    "uptime": ("The service level agreement guarantees 99.9% uptime.", {"topic": "support"}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeStore:
    store = KnowledgeStore(tmp_path / "kb", default_embeddings())
    texts = [t for t, _ in FACTS.values()]
    metas = [{**m, "as_of": "2024-01-01"} for _, m in FACTS.values()]
    store.add_texts(texts, metas, ids=list(FACTS))
    return store


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("How much is the Pro plan?", "pro-price"),
        ("Can I get my money back?", "refunds"),
        ("When will support answer my ticket?", "support-hours"),
        ("Where is my data kept?", "region"),
        ("rate limit of the API", "api-limit"),
    ],
)
def test_questions_find_their_fact(kb: KnowledgeStore, query: str, key: str) -> None:
    (doc, relevance), *rest = kb.similarity_search_with_relevance_scores(query, k=3)
    assert doc.id == key
    assert 0.5 < relevance <= 1.0 and all(relevance >= r for _, r in rest)


def test_upsert_changes_the_answer_and_as_of_travels_back(kb: KnowledgeStore) -> None:
    kb.add_texts(
        ["The Pro plan costs $30 per user per month."],
        [{"topic": "billing", "tier": "pro", "as_of": "2024-07-01"}],
        ids=["pro-price"],
    )
    now = kb.similarity_search("How much is the Pro plan?", k=1)
    assert now[0].page_content == "The Pro plan costs $30 per user per month."
    then = kb.similarity_search("How much is the Pro plan?", k=1, as_of="2024-03-01")
    assert then[0].page_content == "The Pro plan costs $25 per user per month."
    assert kb.similarity_search("How much is the Pro plan?", k=3, as_of="2023-12-31") == []
    assert len(kb) == len(FACTS)
    top = kb.similarity_search("Pro plan price", k=len(FACTS))
    assert [d.id for d in top].count("pro-price") == 1


def test_delete_removes_from_now_but_not_from_the_past(kb: KnowledgeStore) -> None:
    kb.delete(["refunds"])
    assert "refunds" not in [d.id for d in kb.similarity_search("money back", k=10)]
    past = kb.similarity_search("Can I get my money back?", k=1, as_of="2024-06-01")
    assert past[0].id == "refunds"


def test_filtered_search(kb: KnowledgeStore) -> None:
    docs = kb.similarity_search("How much is the Pro plan?", k=3, filter={"topic": "security"})
    assert sorted(d.id or "" for d in docs) == ["region", "sso"]
    docs = kb.similarity_search("plan price", k=4, filter={"topic": {"$in": ["billing", "limits"]}})
    assert len(docs) == 4 and {d.metadata["topic"] for d in docs} <= {"billing", "limits"}
    assert docs[0].id in ("pro-price", "basic-price")
    docs = kb.max_marginal_relevance_search("plan price", k=2, filter={"topic": "billing"})
    assert len(docs) == 2 and all(d.metadata["topic"] == "billing" for d in docs)
