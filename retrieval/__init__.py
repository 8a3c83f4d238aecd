"""Current facts for the student: ``KnowledgeStore`` (FAISS + SQLite), embeddings, ingestion.

Example:
    >>> from langchain_understudy.retrieval import KnowledgeStore
    >>> store = KnowledgeStore(".understudy/knowledge")  # doctest: +SKIP
    >>> store.add_texts(["The Pro plan costs $25 a month."], ids=["pro-price"])  # doctest: +SKIP
    ['pro-price']
    >>> store.similarity_search("How much is Pro?", k=1)  # doctest: +SKIP
"""

from langchain_understudy.retrieval.embeddings import (
    LlamaCppEmbeddings,
    SentenceTransformerEmbeddings,
    default_embeddings,
    embeddings_name,
    load_embeddings,
)
from langchain_understudy.retrieval.ingest import (
    SUPPORTED_SUFFIXES,
    IngestReport,
    SourceReport,
    discover,
    ingest_paths,
    load_source,
)
from langchain_understudy.retrieval.vectorstores import (
    FactVersion,
    KnowledgeStats,
    KnowledgeStore,
    MetadataFilter,
    UpsertResult,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "FactVersion",
    "IngestReport",
    "KnowledgeStats",
    "KnowledgeStore",
    "LlamaCppEmbeddings",
    "MetadataFilter",
    "SentenceTransformerEmbeddings",
    "SourceReport",
    "UpsertResult",
    "default_embeddings",
    "discover",
    "embeddings_name",
    "ingest_paths",
    "load_embeddings",
    "load_source",
]
