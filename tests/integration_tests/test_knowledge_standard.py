"""langchain-tests standard suites for KnowledgeStore (every index kind) and its retriever."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from knowledge_helpers import one_torch_thread
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import (
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)

from langchain_understudy.retrieval import KnowledgeStore, default_embeddings


class TestKnowledgeStoreFlat(VectorStoreIntegrationTests):
    kind = "flat"

    @pytest.fixture
    def vectorstore(self, tmp_path: Path) -> Generator[VectorStore, None, None]:  # type: ignore[override]
        store = KnowledgeStore(tmp_path / "kb", self.get_embeddings(), index=self.kind)  # type: ignore[arg-type]
        try:
            yield store
        finally:
            store.close()


class TestKnowledgeStoreHNSW(TestKnowledgeStoreFlat):
    kind = "hnsw"


class TestKnowledgeStoreIVF(TestKnowledgeStoreFlat):
    kind = "ivf"


_FACTS = {
    "pro-price": "The Pro plan costs $25 per user per month.",
    "basic-price": "The Basic plan is free for up to three users.",
    "refunds": "Refunds are available within 30 days of purchase.",
    "support": "Support answers tickets within one business day.",
    "storage": "Each workspace includes 100 GB of storage.",
}


class TestKnowledgeRetriever(RetrieversIntegrationTests):
    """The retriever from ``as_retriever()`` over real MiniLM embeddings."""

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _store(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        with one_torch_thread():
            store = KnowledgeStore(tmp_path_factory.mktemp("kb"), default_embeddings())
            store.add_texts(list(_FACTS.values()), ids=list(_FACTS))
            cls._kb = store
            yield

    @property
    def retriever_constructor(self) -> Callable[..., BaseRetriever]:  # type: ignore[override]
        def build(k: int = 4, **search_kwargs: Any) -> BaseRetriever:
            return type(self)._kb.as_retriever(search_kwargs={"k": k, **search_kwargs})

        return build

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "How much does the Pro plan cost?"

    def test_answers_are_relevant(self) -> None:
        docs = self.retriever_constructor(k=1).invoke(self.retriever_query_example)
        assert docs[0].id == "pro-price"
