"""``KnowledgeStore``: current facts in FAISS + SQLite, as a LangChain ``VectorStore``.

A fact is a document with a stable key (its id) and, optionally, an ``as_of`` time in its metadata.
Writing a key again replaces the fact and keeps the old version as history; the current view is
the facts whose validity has not ended, and a search ``as_of=t`` selects those valid at ``t``.
Both are applied inside the FAISS search with an id selector, so ``k`` results come back whenever
``k`` facts match.

This module is the LangChain adapter: it embeds texts and queries and turns rows into
``Document`` objects. Rows, segments, locks and crash safety are the storage engine's
(:mod:`langchain_understudy.retrieval._engine`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from langchain_understudy.errors import ConfigError, KnowledgeStoreError
from langchain_understudy.retrieval._engine import (
    DB_NAME,
    FactEngine,
    FactVersion,
    KnowledgeStats,
    MetadataFilter,
    SegmentInfo,
    UpsertResult,
    chunks,
    prepare_facts,
    same_fact,
    sha256_text,
)
from langchain_understudy.retrieval._faiss import (
    INDEX_KINDS,
    FloatArray,
    IndexKind,
    IndexParams,
    normalize,
)
from langchain_understudy.retrieval._time import TimeLike
from langchain_understudy.retrieval.embeddings import default_embeddings, embeddings_name

__all__ = [
    "DB_NAME",
    "FactVersion",
    "KnowledgeStats",
    "KnowledgeStore",
    "MetadataFilter",
    "SegmentInfo",
    "UpsertResult",
]


class KnowledgeStore(VectorStore):
    """Current facts in FAISS + SQLite, with history, as a LangChain ``VectorStore``.

    Writing an existing key replaces the fact (its old version is kept as history, never shown
    in the current view); ``as_of=`` searches answer with the facts as they stood at that time.
    Scores from ``similarity_search_with_score`` are cosine similarities (higher is closer);
    relevance scores are ``(1 + cosine) / 2``, in ``[0, 1]``.

    A write costs what it writes: its vectors go to a new segment file, and small segments are
    merged as they pile up. :meth:`compact` (``understudy kb compact``) merges all segments into
    one index of the store's kind.

    ``params`` holds the index parameters; its search-time fields (``ef_search``, ``nprobe``)
    may be changed on an open store, e.g. ``store.params = replace(store.params, ef_search=128)``.

    Args:
        path: The store's folder (created on first use unless ``create=False``).
        embedding: Any LangChain ``Embeddings``; ``None`` uses the bundled all-MiniLM-L6-v2.
            A store remembers which embeddings built it and refuses others.
        index: FAISS index kind for a new store: ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"``.
            ``None`` keeps an existing store's kind (``"flat"`` for a new one). Segments under
            512 vectors are always exact.
        hnsw_m: HNSW graph degree, used when an HNSW segment is built.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width.
        nlist: IVF cells (``None``: about ``4 * sqrt(n)`` for a segment of ``n`` vectors).
        nprobe: IVF cells searched per query.
        keep_history: Keep replaced and deleted versions for ``as_of`` searches; ``False``
            erases them (their vectors are merged away).
        compact_threshold: Rewrite the segments holding erased vectors when those exceed this
            share of all vectors.
        lock_timeout: Seconds a writer waits for another process's write.
        create: Create the store if ``path`` holds none (else raise).
        load_index: ``False`` opens only the database, to :meth:`rebuild` a lost index.
        embed_batch_size: Texts per call to the embeddings.
        background_merges: Merge large segments in a background thread as they pile up (for
            long-running processes such as a server); ``False`` leaves them to :meth:`compact`.

    Example:
        >>> from langchain_core.embeddings import DeterministicFakeEmbedding
        >>> store = KnowledgeStore(tmp / "kb", DeterministicFakeEmbedding(size=32))  # doctest: +SKIP
        >>> store.add_texts(["Pro costs $20 a month"], [{"as_of": "2024-01-01"}], ids=["price"])
        ['price']
        >>> store.add_texts(["Pro costs $25 a month"], [{"as_of": "2024-06-01"}], ids=["price"])
        ['price']
        >>> store.similarity_search("Pro price", k=1)[0].page_content
        'Pro costs $25 a month'
        >>> store.similarity_search("Pro price", k=1, as_of="2024-03-01")[0].page_content
        'Pro costs $20 a month'
    """

    def __init__(
        self,
        path: str | PurePath,
        embedding: Embeddings | None = None,
        *,
        index: IndexKind | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int = 16,
        keep_history: bool = True,
        compact_threshold: float = 0.25,
        lock_timeout: float = 60.0,
        create: bool = True,
        load_index: bool = True,
        embed_batch_size: int = 256,
        background_merges: bool = False,
    ) -> None:
        if index is not None and index not in INDEX_KINDS:
            msg = f"index must be one of {', '.join(INDEX_KINDS)}, got {index!r}"
            raise ConfigError(msg)
        if not 0.0 < compact_threshold <= 1.0:
            msg = f"compact_threshold must be in (0, 1], got {compact_threshold}"
            raise ConfigError(msg)
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search), ("nprobe", nprobe),
                            ("embed_batch_size", embed_batch_size)):  # fmt: skip
            if value < 1:
                msg = f"{name} must be >= 1, got {value}"
                raise ConfigError(msg)
        self._embedding = embedding
        self.embed_batch_size = embed_batch_size
        self._embedding_checked = False
        self._engine = FactEngine(
            path,
            kind=index,
            params=IndexParams(hnsw_m, ef_construction, ef_search, nlist, nprobe),
            keep_history=keep_history,
            compact_threshold=compact_threshold,
            lock_timeout=lock_timeout,
            create=create,
            load_index=load_index,
            background_merges=background_merges,
        )
        self.path = self._engine.path

    # -- the engine's settings -------------------------------------------------------------------

    @property
    def params(self) -> IndexParams:
        """Index build and search parameters."""
        return self._engine.params

    @params.setter
    def params(self, value: IndexParams) -> None:
        self._engine.params = value

    @property
    def keep_history(self) -> bool:
        """Whether replaced and deleted versions are kept."""
        return self._engine.keep_history

    @property
    def db_path(self) -> Path:
        """The SQLite database of texts, metadata, history and segments."""
        return self._engine.db_path

    def close(self) -> None:
        """Close the database connection (the store cannot be used afterwards)."""
        self._engine.close()

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._engine)

    # -- embeddings ----------------------------------------------------------------------------

    @property
    def embeddings(self) -> Embeddings:
        """The embeddings that turn texts and queries into vectors."""
        if self._embedding is None:
            self._embedding = default_embeddings()
        return self._embedding

    def _embedder(self) -> Embeddings:
        emb = self.embeddings
        if not self._embedding_checked:
            stored = self._engine.meta().get("embedding", "")
            name = embeddings_name(emb)
            if stored and stored != name:
                msg = (
                    f"the knowledge store {self.path} was built with embeddings {stored!r}, not "
                    f"{name!r}; open it with the same embeddings, or re-embed every fact with "
                    f"`understudy kb rebuild --store {self.path}`"
                )
                raise KnowledgeStoreError(msg)
            self._embedding_checked = True
        return emb

    def _embed_query(self, query: str) -> list[float]:
        return self._embedder().embed_query(query)

    async def _aembed_query(self, query: str) -> list[float]:
        return await self._embedder().aembed_query(query)

    def embed_texts(
        self, texts: Sequence[str], *, on_progress: Callable[[int], None] | None = None
    ) -> FloatArray:
        """Return unit vectors for ``texts``, reusing stored vectors of identical texts.

        The cache key is the text's sha256, so re-ingesting unchanged text costs no embedding.

        Args:
            texts: Texts to embed.
            on_progress: Called with the number of texts done after each batch.
        """
        texts = list(texts)
        if not texts:
            return np.empty((0, 0), dtype=np.float32)
        hashes = [sha256_text(t) for t in texts]
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        vectors = self._engine.cached_vectors(list(first))
        dim = self._engine.dim()
        counts = Counter(hashes)
        if on_progress is not None:
            done = sum(counts[h] for h in vectors)
            if done:
                on_progress(done)
        missing = [h for h in first if h not in vectors]
        if missing:
            emb = self._embedder()
        for batch in chunks(missing, self.embed_batch_size):
            out = normalize(emb.embed_documents([texts[first[h]] for h in batch]), dim)
            if len(out) != len(batch):
                msg = f"the embeddings returned {len(out)} vectors for {len(batch)} texts"
                raise KnowledgeStoreError(msg)
            vectors.update(zip(batch, out, strict=True))
            if on_progress is not None:
                on_progress(sum(counts[h] for h in batch))
        return np.stack([vectors[h] for h in hashes]).astype(np.float32, copy=False)

    # -- writing -------------------------------------------------------------------------------

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed and upsert facts; return their keys.

        Args:
            texts: Fact texts.
            metadatas: One dict per text; ``as_of`` (datetime or ISO-8601) dates the fact.
            ids: Stable keys; a key already stored is replaced. ``None`` draws UUIDs.
            **kwargs: ``replace_sources`` (see :meth:`upsert`).
        """
        replace_sources = kwargs.pop("replace_sources", None)
        _no_extra(kwargs, "add_texts")
        return self.upsert(texts, metadatas, ids=ids, replace_sources=replace_sources).ids

    def add_embeddings(
        self,
        text_embeddings: Iterable[tuple[str, Sequence[float]]],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Upsert facts whose vectors are already computed; return their keys."""
        pairs = list(text_embeddings)
        replace_sources = kwargs.pop("replace_sources", None)
        _no_extra(kwargs, "add_embeddings")
        return self.upsert(
            [t for t, _ in pairs],
            metadatas,
            ids=ids,
            vectors=[v for _, v in pairs] if pairs else None,
            replace_sources=replace_sources,
        ).ids

    def upsert(
        self,
        texts: Iterable[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        ids: Sequence[str | None] | None = None,
        vectors: Any = None,
        replace_sources: Iterable[str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> UpsertResult:
        """Write facts in one atomic transaction and report what changed.

        A fact identical to its key's current version (same text and metadata) is left alone;
        a different one becomes the new current version and the old one history.

        Args:
            texts: Fact texts.
            metadatas: One dict (or ``None``) per text; ``as_of`` dates the fact.
            ids: Stable keys (``None`` entries get UUIDs).
            vectors: Precomputed embeddings, one per text; ``None`` embeds (with the cache).
            replace_sources: Retire current facts whose ``metadata["source"]`` is one of these
                and whose key this write does not mention: re-ingesting a shorter file leaves no
                stale chunks.
            on_progress: Called with the number of texts embedded after each batch.
        """
        facts = prepare_facts(texts, metadatas, ids)
        sources = sorted(set(replace_sources or ()))
        if not facts and not sources:
            return UpsertResult(ids=[])
        vecs: dict[int, FloatArray] = {}
        if vectors is not None:
            arr = normalize(vectors, self._engine.dim())
            if len(arr) != len(facts):
                msg = f"got {len(arr)} vectors for {len(facts)} texts; pass one per text"
                raise ConfigError(msg)
            vecs = dict(enumerate(arr))
        elif facts:
            self._engine.refresh()
            heads = self._engine.heads({f.key for f in facts})
            todo = [i for i, f in enumerate(facts) if not same_fact(heads.get(f.key), f)]
            if on_progress is not None and len(todo) < len(facts):
                on_progress(len(facts) - len(todo))
            embedded = self.embed_texts([facts[i].text for i in todo], on_progress=on_progress)
            vecs = dict(zip(todo, embedded, strict=True))
        return self._engine.write(
            facts,
            vecs,
            sources,
            embed=lambda text: self.embed_texts([text])[0],
            embedding=embeddings_name(self.embeddings),
        )

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete facts by key; missing keys are ignored.

        Args:
            ids: Keys to delete (required: a store is never emptied by accident).
            **kwargs: ``purge=True`` erases every version of the keys instead of keeping them
                as history for ``as_of`` searches.

        Returns:
            ``True``.
        """
        purge = bool(kwargs.pop("purge", False))
        _no_extra(kwargs, "delete")
        if ids is None:
            msg = "pass the keys to delete; to empty a store, remove its folder"
            raise ConfigError(msg)
        if ids:
            self._engine.delete(ids, purge=purge)
        return True

    def compact(self, *, drop_history_before: TimeLike | None = None) -> int:
        """Merge all segments into one and drop erased vectors; return how many were dropped.

        Writers in other processes carry on while the merged index is built.

        Args:
            drop_history_before: Also erase versions whose validity ended before this time.
        """
        return self._engine.compact(drop_history_before=drop_history_before)

    def rebuild(
        self,
        *,
        index: IndexKind | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Re-embed every stored version into a new index; return the number of vectors.

        This recovers a store whose index files are lost or damaged, moves a store to other
        embeddings (the ones this store was opened with), or changes the index kind.
        """
        if index is not None and index not in INDEX_KINDS:
            msg = f"index must be one of {', '.join(INDEX_KINDS)}, got {index!r}"
            raise ConfigError(msg)
        emb = self.embeddings
        n = self._engine.rebuild(
            lambda batch: normalize(emb.embed_documents(batch)),
            kind=index,
            embedding=embeddings_name(emb),
            batch_size=self.embed_batch_size,
            on_progress=on_progress,
        )
        self._embedding_checked = False
        return n

    # -- reading -------------------------------------------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """Return the current facts with these keys, in the order asked (missing keys skipped)."""
        return [v.to_document() for v in self._engine.get(ids)]

    def history(self, key: str) -> list[FactVersion]:
        """Return every kept version of a fact, oldest first."""
        return self._engine.history(key)

    def stats(self) -> KnowledgeStats:
        """Return counts and sizes of the store."""
        return self._engine.stats()

    def segments(self) -> list[SegmentInfo]:
        """Return the segment files that hold the vectors, oldest first."""
        return self._engine.segments()

    def _search(
        self,
        embedding: Sequence[float] | FloatArray,
        k: int,
        flt: MetadataFilter | None,
        as_of: TimeLike | None,
        *,
        with_vectors: bool = False,
    ) -> tuple[list[tuple[Document, float]], FloatArray | None]:
        hits, vectors = self._engine.search(embedding, k, flt, as_of, with_vectors=with_vectors)
        return [(v.to_document(), s) for v, s in hits], vectors

    def similarity_search_with_score_by_vector(
        self,
        embedding: Sequence[float],
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        """Return the ``k`` nearest facts to a vector with their cosine similarity.

        Args:
            embedding: The query vector.
            k: Results wanted; fewer only when fewer facts match.
            filter: A metadata filter (see :data:`MetadataFilter`).
            as_of: Search the facts as they stood at this time instead of the current ones.
            **kwargs: ``fetch_k`` is accepted and ignored (filters run inside the search).
        """
        kwargs.pop("fetch_k", None)
        _no_extra(kwargs, "similarity search")
        return self._search(embedding, k, filter, as_of)[0]

    def similarity_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Return the ``k`` nearest facts to a vector (see ``similarity_search``)."""
        hits = self.similarity_search_with_score_by_vector(
            embedding, k, filter, as_of=as_of, **kwargs
        )
        return [doc for doc, _ in hits]

    def similarity_search_with_score(
        self,
        query: str,
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        """Return the ``k`` facts nearest to ``query`` with their cosine similarity."""
        return self.similarity_search_with_score_by_vector(
            self._embed_query(query), k, filter, as_of=as_of, **kwargs
        )

    def similarity_search(
        self,
        query: str,
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Return the ``k`` facts nearest to ``query``.

        Args:
            query: Text to look up.
            k: Results wanted; fewer only when fewer facts match.
            filter: A metadata filter, applied inside the search.
            as_of: A time (datetime or ISO-8601): answer with the facts valid then.
            **kwargs: ``fetch_k`` is accepted and ignored.
        """
        hits = self.similarity_search_with_score(query, k, filter, as_of=as_of, **kwargs)
        return [doc for doc, _ in hits]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        # Scores are cosine similarities in [-1, 1]; map cosine distance [0, 2] onto [0, 1].
        return _cosine_relevance

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Return ``k`` facts chosen for relevance and diversity among the ``fetch_k`` nearest."""
        _no_extra(kwargs, "max_marginal_relevance_search")
        hits, vectors = self._search(embedding, max(k, fetch_k), filter, as_of, with_vectors=True)
        if not hits or vectors is None:
            return []
        query = normalize(embedding)[0]
        chosen = maximal_marginal_relevance(
            query, vectors.tolist(), lambda_mult=lambda_mult, k=min(k, len(hits))
        )
        return [hits[i][0] for i in chosen]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Return ``k`` facts chosen for relevance to ``query`` and diversity."""
        return self.max_marginal_relevance_search_by_vector(
            self._embed_query(query), k, fetch_k, lambda_mult, filter, as_of=as_of, **kwargs
        )

    # -- async: embed with the async API, search in a worker thread ------------------------------

    async def asimilarity_search_with_score(
        self,
        query: str,
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        """Async ``similarity_search_with_score``."""
        vector = await self._aembed_query(query)
        return await run_in_executor(
            None,
            self.similarity_search_with_score_by_vector,
            vector,
            k,
            filter,
            as_of=as_of,
            **kwargs,
        )

    async def asimilarity_search(
        self,
        query: str,
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Async ``similarity_search``."""
        hits = await self.asimilarity_search_with_score(query, k, filter, as_of=as_of, **kwargs)
        return [doc for doc, _ in hits]

    async def asimilarity_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Async ``similarity_search_by_vector``."""
        return await run_in_executor(
            None, self.similarity_search_by_vector, embedding, k, filter, as_of=as_of, **kwargs
        )

    async def amax_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: MetadataFilter | None = None,
        *,
        as_of: TimeLike | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Async ``max_marginal_relevance_search``."""
        vector = await self._aembed_query(query)
        return await run_in_executor(
            None,
            self.max_marginal_relevance_search_by_vector,
            vector,
            k,
            fetch_k,
            lambda_mult,
            filter,
            as_of=as_of,
            **kwargs,
        )

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> KnowledgeStore:
        """Create (or open) the store at ``path=`` and add ``texts``.

        Args:
            texts: Fact texts.
            embedding: The embeddings.
            metadatas: One dict per text.
            ids: Stable keys.
            **kwargs: ``path`` (required) and any ``KnowledgeStore`` argument.
        """
        path = kwargs.pop("path", None)
        if path is None:
            msg = "KnowledgeStore.from_texts needs path=, the folder that holds the store"
            raise ConfigError(msg)
        store = cls(path, embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


def _cosine_relevance(score: float) -> float:
    if math.isnan(score):
        return 0.0
    return min(1.0, max(0.0, (1.0 + score) / 2.0))


def _no_extra(kwargs: Mapping[str, Any], where: str) -> None:
    if kwargs:
        msg = (
            f"unexpected argument(s) to {where}: {', '.join(sorted(kwargs))}; "
            "KnowledgeStore searches take k, filter and as_of"
        )
        raise ConfigError(msg)
