"""``KnowledgeStore``: current facts in FAISS + SQLite, as a LangChain ``VectorStore``.

A fact is a document with a stable key (its id) and, optionally, an ``as_of`` time in its metadata.
Every version of every fact is a row in SQLite (key, version, validity interval, text, metadata,
vector id); FAISS holds one unit vector per row under that id. The current view is the rows whose
validity has not ended; a search ``as_of=t`` selects the rows valid at ``t``. Both are applied
inside the FAISS search with an id selector, so ``k`` results come back whenever ``k`` facts match.

Writes are atomic: the new index is written to a file of its own (temp name, fsync, rename) and
one SQLite transaction records both the rows and which index file is current. A kill at any point
leaves the previous pair readable. A file lock serialises writers across processes, and a writer
re-reads the on-disk state after taking it, so concurrent writers lose nothing. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from langchain_understudy.errors import ConfigError, KnowledgeStoreError
from langchain_understudy.retrieval._faiss import (
    INDEX_KINDS,
    FloatArray,
    IdArray,
    IdSet,
    IndexKind,
    IndexParams,
    VectorIndex,
    normalize,
)
from langchain_understudy.retrieval._filters import compile_filter
from langchain_understudy.retrieval._time import TimeLike, from_timestamp, to_timestamp
from langchain_understudy.retrieval.embeddings import default_embeddings, embeddings_name

__all__ = ["FactVersion", "KnowledgeStats", "KnowledgeStore", "MetadataFilter", "UpsertResult"]

logger = logging.getLogger(__name__)

MetadataFilter = Mapping[str, Any] | Callable[[dict[str, Any]], bool]
"""A metadata filter: a dict in the grammar of ``_filters`` (equality, ``$in``, ranges on
``as_of``, ``$and``/``$or``) or a function of a fact's metadata returning ``True`` to keep it."""

DB_NAME = "knowledge.sqlite"
_LOCK_NAME = "knowledge.lock"
_FORMAT = "langchain-understudy knowledge store"
_FORMAT_VERSION = "1"
_SQL_CHUNK = 500  # keys or ids per ``IN (...)`` query

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS facts (
        vid INTEGER PRIMARY KEY,      -- the vector's id in FAISS
        key TEXT NOT NULL,            -- the fact's stable id
        version INTEGER NOT NULL,     -- 1, 2, ... per key
        valid_from REAL NOT NULL,     -- epoch seconds: the fact's as_of, or its write time
        valid_to REAL,                -- NULL while current
        written_at REAL NOT NULL,
        text TEXT NOT NULL,
        metadata TEXT NOT NULL,       -- JSON object
        content_hash TEXT NOT NULL    -- sha256 of text: the embedding cache key
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS facts_current ON facts (key) WHERE valid_to IS NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS facts_versions ON facts (key, version)",
    "CREATE INDEX IF NOT EXISTS facts_hash ON facts (content_hash)",
    # Vectors still in the index whose rows were erased; compaction drops them.
    "CREATE TABLE IF NOT EXISTS dead (vid INTEGER PRIMARY KEY)",
)
_FACT_COLUMNS = "vid, key, version, valid_from, valid_to, written_at, text, metadata, content_hash"


@dataclass(frozen=True)
class UpsertResult:
    """What one write did.

    Attributes:
        ids: The key of every input fact, in input order.
        added: Facts whose key had no current version.
        replaced: Facts that replaced a different current version of their key.
        unchanged: Facts identical (text and metadata) to their current version: nothing written.
        retired: Current facts of ``replace_sources`` that this write did not mention.
        statuses: Per input fact: ``"added"``, ``"replaced"`` or ``"unchanged"``.
        retired_by_source: ``retired`` broken down by source.
    """

    ids: list[str]
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    retired: int = 0
    statuses: list[str] = field(default_factory=list)
    retired_by_source: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FactVersion:
    """One version of a fact, as kept for time travel.

    Attributes:
        key: The fact's key.
        version: 1 for the first write of the key, then 2, 3, ...
        text: The fact's text.
        metadata: The metadata it was written with.
        valid_from: When it became valid (its ``as_of``, or its write time).
        valid_to: When it was replaced or deleted (``None`` while current).
        written_at: When it was written.
    """

    key: str
    version: int
    text: str
    metadata: dict[str, Any]
    valid_from: datetime
    valid_to: datetime | None
    written_at: datetime

    def to_document(self) -> Document:
        """Return the version as a LangChain ``Document`` (id = key)."""
        return Document(id=self.key, page_content=self.text, metadata=dict(self.metadata))


@dataclass(frozen=True)
class KnowledgeStats:
    """A summary of a store (``understudy kb stats``).

    Attributes:
        path: The store's folder.
        index: FAISS index kind.
        dim: Vector width (``None`` before the first fact).
        embedding: Name of the embeddings the vectors came from.
        facts: Current facts.
        retired_keys: Keys deleted and not written since (their history is kept).
        versions: Rows kept, current and historical.
        vectors: Vectors in the FAISS index.
        dead_vectors: Vectors of erased rows awaiting compaction.
        generation: Number of the current index file.
        disk_bytes: Bytes of the store's files on disk.
        oldest_valid_from: When the oldest version kept became valid (``None`` when empty);
            before this time the store knows no facts.
    """

    path: Path
    index: str
    dim: int | None
    embedding: str
    facts: int
    retired_keys: int
    versions: int
    vectors: int
    dead_vectors: int
    generation: int
    disk_bytes: int
    oldest_valid_from: datetime | None = None


@dataclass
class _Fact:
    key: str
    text: str
    meta_json: str
    content_hash: str
    valid_from: float | None  # None: the write time
    source: str | None


@dataclass
class _Head:
    """The newest row of a key inside a write: stored already, or pending insertion."""

    vid: int
    content_hash: str
    meta_json: str
    pending: bool


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(type(value).__name__)


def _chunks(items: Sequence[Any], size: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class KnowledgeStore(VectorStore):
    """Current facts in FAISS + SQLite, with history, as a LangChain ``VectorStore``.

    Writing an existing key replaces the fact (its old version is kept as history, never shown
    in the current view); ``as_of=`` searches answer with the facts as they stood at that time.
    Scores from ``similarity_search_with_score`` are cosine similarities (higher is closer);
    relevance scores are ``(1 + cosine) / 2``, in ``[0, 1]``.

    ``params`` holds the index parameters; its search-time fields (``ef_search``, ``nprobe``)
    may be changed on an open store, e.g. ``store.params = replace(store.params, ef_search=128)``.

    Args:
        path: The store's folder (created on first use unless ``create=False``).
        embedding: Any LangChain ``Embeddings``; ``None`` uses the bundled all-MiniLM-L6-v2.
            A store remembers which embeddings built it and refuses others.
        index: FAISS index kind for a new store: ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"``.
            ``None`` keeps an existing store's kind (``"flat"`` for a new one).
        hnsw_m: HNSW graph degree, used when an HNSW index is built.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width.
        nlist: IVF cells (``None``: about ``4 * sqrt(n)``, retrained as the store grows).
        nprobe: IVF cells searched per query.
        keep_history: Keep replaced and deleted versions for ``as_of`` searches; ``False``
            erases them (their vectors are compacted away).
        compact_threshold: Rebuild the index when erased vectors exceed this share of it.
        lock_timeout: Seconds a writer waits for another process's write.
        create: Create the store if ``path`` holds none (else raise).
        load_index: ``False`` opens only the database, to :meth:`rebuild` a lost index.
        embed_batch_size: Texts per call to the embeddings.

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
        self.path = Path(path)
        self._embedding = embedding
        self.params = IndexParams(hnsw_m, ef_construction, ef_search, nlist, nprobe)
        self.keep_history = keep_history
        self.compact_threshold = compact_threshold
        self.lock_timeout = lock_timeout
        self.embed_batch_size = embed_batch_size
        self._load_index_enabled = load_index
        self._mutex = threading.RLock()
        self._revision: int | None = None
        self._generation: int | None = None
        self._vindex: VectorIndex | None = None
        self._current = IdSet(np.empty(0, dtype=np.int64))
        self._as_of_ids: dict[float, IdSet] = {}  # validity span -> its rows, this revision
        self._bounds: np.ndarray[Any, np.dtype[np.float64]] | None = (
            None  # times at which some fact's validity changes
        )
        self._all_current = True
        self._loaded_next_vid = 1
        self._embedding_checked = False
        self._con = self._open(create)
        self._kind: IndexKind = self._meta()["index_kind"]  # type: ignore[assignment]
        if index is not None and index != self._kind:
            self._set_kind_of_empty_store(index)
        if index is not None and index != self._kind:
            msg = (
                f"the knowledge store {self.path} uses a {self._kind!r} index, not {index!r}; "
                f"switch it with `understudy kb rebuild --index {index} --store {self.path}`"
            )
            raise ConfigError(msg)
        with self._mutex:
            self._refresh(force=True)

    # -- opening -------------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        """The SQLite database of texts, metadata and history."""
        return self.path / DB_NAME

    def _rebuild_hint(self) -> str:
        return (
            f"The facts themselves are safe in {self.db_path}: re-embed them into a new index "
            f"with `understudy kb rebuild --store {self.path}` (or KnowledgeStore(path, "
            "load_index=False).rebuild())."
        )

    def _foreign(self, detail: str) -> KnowledgeStoreError:
        msg = (
            f"{self.db_path} is not a knowledge store database ({detail}); move {self.path} "
            f"aside and rebuild it from your sources with `understudy kb ingest SOURCES "
            f"--store {self.path}`"
        )
        return KnowledgeStoreError(msg)

    def _open(self, create: bool) -> sqlite3.Connection:
        if self.path.exists() and not self.path.is_dir():
            msg = f"{self.path} is a file, not a knowledge store folder; pick a folder path"
            raise KnowledgeStoreError(msg)
        if not self.db_path.exists():
            if not create:
                msg = (
                    f"no knowledge store at {self.path}; create one with "
                    f"`understudy kb ingest FILES --store {self.path}` or `understudy kb add`"
                )
                raise KnowledgeStoreError(msg)
            self.path.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(self.path / _LOCK_NAME), timeout=self.lock_timeout)
        fresh = not self.db_path.exists()
        con = sqlite3.connect(
            self.db_path, isolation_level=None, check_same_thread=False, timeout=self.lock_timeout
        )
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if "meta" not in tables:
                if tables and not fresh:
                    raise self._foreign(f"it holds tables {sorted(tables)}")
                with self._locked():
                    self._create_schema(con)
            meta = dict(con.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            con.close()
            raise self._foreign(str(e)) from e
        except BaseException:
            con.close()
            raise
        if meta.get("format") != _FORMAT:
            con.close()
            raise self._foreign("no knowledge store format marker")
        if meta.get("format_version") != _FORMAT_VERSION:
            con.close()
            msg = (
                f"{self.db_path} has format version {meta.get('format_version')!r}; this "
                f"langchain-understudy reads version {_FORMAT_VERSION}: upgrade the package"
            )
            raise KnowledgeStoreError(msg)
        return con

    def _set_kind_of_empty_store(self, kind: IndexKind) -> None:
        # A store that never held a vector takes whichever kind its first user asks for.
        with self._mutex, self._locked():
            self._con.execute("BEGIN IMMEDIATE")
            updated = self._con.execute(
                "UPDATE meta SET value = ? WHERE name = 'index_kind' AND "
                "(SELECT value FROM meta WHERE name = 'generation') = '0'",
                (kind,),
            ).rowcount
            self._con.execute("COMMIT")
        if updated:
            self._kind = kind

    def _create_schema(self, con: sqlite3.Connection) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA:
                con.execute(stmt)
            defaults = {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "created_at": str(time.time()),
                "index_kind": "flat",
                "dim": "",
                "embedding": "",
                "generation": "0",
                "revision": "0",
                "next_vid": "1",
                "index_size": "0",
                "index_crc": "0",
            }
            con.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", defaults.items())
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._file_lock.acquire()
        except Timeout as e:
            msg = (
                f"another process has been writing to the knowledge store {self.path} for over "
                f"{self.lock_timeout:g}s; wait for it to finish, or open the store with a "
                "longer lock_timeout"
            )
            raise KnowledgeStoreError(msg) from e
        try:
            yield
        finally:
            self._file_lock.release()

    def close(self) -> None:
        """Close the database connection (the store cannot be used afterwards)."""
        with self._mutex:
            self._con.close()

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        try:
            return dict(self._con.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.Error as e:
            msg = f"cannot read the knowledge store database {self.db_path}: {e}"
            raise KnowledgeStoreError(msg) from e

    def _index_path(self, generation: int) -> Path:
        return self.path / f"index-{generation:08d}.faiss"

    def _refresh(self, *, force: bool = False) -> None:
        """Bring the in-memory index and caches up to the last commit (any process's)."""
        try:
            row = self._con.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.Error as e:
            msg = f"cannot read the knowledge store database {self.db_path}: {e}"
            raise KnowledgeStoreError(msg) from e
        if not force and row is not None and int(row[0]) == self._revision:
            return
        missing: int | None = None
        generation = 0
        for attempt in range(6):
            self._con.execute("BEGIN")  # one read snapshot for meta, ids and the index choice
            try:
                meta = self._meta()
                generation = int(meta["generation"])
                vindex = self._vindex
                if generation != self._generation:
                    vindex = self._load_index(meta, generation)
                current = self._fetch_ids("SELECT vid FROM facts WHERE valid_to IS NULL")
            except FileNotFoundError:
                # Either a writer replaced the file between our reads (read again), or the
                # file is gone (the same generation is missing twice).
                if missing == generation:
                    break
                missing = generation
                time.sleep(0.02 * (attempt + 1))
                continue
            finally:
                self._con.execute("COMMIT")
            self._kind = meta["index_kind"]  # type: ignore[assignment]
            self._vindex = vindex
            self._generation = generation
            self._revision = int(meta["revision"])
            self._loaded_next_vid = int(meta["next_vid"])
            self._current = IdSet(current)
            self._as_of_ids, self._bounds = {}, None
            self._all_current = vindex is None or vindex.ntotal == len(self._current)
            return
        msg = f"the knowledge index file {self._index_path(generation)} is missing. " + (
            self._rebuild_hint()
        )
        raise KnowledgeStoreError(msg)

    def _load_index(self, meta: dict[str, str], generation: int) -> VectorIndex | None:
        if generation == 0 or int(meta["index_size"]) == 0 or not self._load_index_enabled:
            return None
        path = self._index_path(generation)
        logger.debug("loading %s", path)
        vindex = VectorIndex.load(
            path,
            meta["index_kind"],  # type: ignore[arg-type]
            self.params,
            size=int(meta["index_size"]),
            crc=int(meta["index_crc"]),
            rebuild_hint=self._rebuild_hint(),
        )
        rows = int(self._con.execute("SELECT COUNT(*) FROM facts").fetchone()[0])
        dead = int(self._con.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
        if vindex.ntotal != rows + dead or str(vindex.dim) != meta["dim"]:
            msg = (
                f"the knowledge index {path} holds {vindex.ntotal} {vindex.dim}-d vectors but "
                f"the database expects {rows + dead} {meta['dim']}-d ones. {self._rebuild_hint()}"
            )
            raise KnowledgeStoreError(msg)
        return vindex

    def _fetch_ids(self, sql: str, params: Sequence[Any] = ()) -> IdArray:
        cur = self._con.execute(sql, params)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def _require_index(self) -> VectorIndex | None:
        if self._vindex is None and not self._load_index_enabled and self._generation:
            msg = "this KnowledgeStore was opened with load_index=False; call rebuild() first"
            raise KnowledgeStoreError(msg)
        return self._vindex

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
            with self._mutex:
                stored = self._meta().get("embedding", "")
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
        hashes = [_sha256(t) for t in texts]
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        with self._mutex:
            self._refresh()
            vectors = self._cached_vectors(list(first))
            dim = self._dim()
        counts = Counter(hashes)
        if on_progress is not None:
            done = sum(counts[h] for h in vectors)
            if done:
                on_progress(done)
        missing = [h for h in first if h not in vectors]
        if missing:
            emb = self._embedder()
        for batch in _chunks(missing, self.embed_batch_size):
            out = normalize(emb.embed_documents([texts[first[h]] for h in batch]), dim)
            if len(out) != len(batch):
                msg = f"the embeddings returned {len(out)} vectors for {len(batch)} texts"
                raise KnowledgeStoreError(msg)
            vectors.update(zip(batch, out, strict=True))
            if on_progress is not None:
                on_progress(sum(counts[h] for h in batch))
        return np.stack([vectors[h] for h in hashes]).astype(np.float32, copy=False)

    def _dim(self) -> int | None:
        dim = self._meta().get("dim", "")
        return int(dim) if dim else None

    def _cached_vectors(self, hashes: Sequence[str]) -> dict[str, FloatArray]:
        vindex = self._vindex
        if vindex is None or not hashes:
            return {}
        found: dict[str, int] = {}
        for chunk in _chunks(hashes):
            rows = self._con.execute(
                f"SELECT content_hash, MAX(vid) FROM facts WHERE content_hash IN "
                f"({_marks(len(chunk))}) AND vid < ? GROUP BY content_hash",
                [*chunk, self._loaded_next_vid],
            )
            found.update(rows.fetchall())
        if not found:
            return {}
        vids = np.fromiter(found.values(), dtype=np.int64)
        return dict(zip(found, vindex.reconstruct(vids), strict=True))

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
        facts = self._prepare(texts, metadatas, ids)
        sources = sorted(set(replace_sources or ()))
        if not facts and not sources:
            return UpsertResult(ids=[])
        vecs: dict[int, FloatArray] = {}
        if vectors is not None:
            with self._mutex:
                dim = self._dim()
            arr = normalize(vectors, dim)
            if len(arr) != len(facts):
                msg = f"got {len(arr)} vectors for {len(facts)} texts; pass one per text"
                raise ConfigError(msg)
            vecs = dict(enumerate(arr))
        elif facts:
            with self._mutex:
                self._refresh()
                heads = self._heads({f.key for f in facts})
            todo = [i for i, f in enumerate(facts) if not _same(heads.get(f.key), f)]
            if on_progress is not None and len(todo) < len(facts):
                on_progress(len(facts) - len(todo))
            embedded = self.embed_texts([facts[i].text for i in todo], on_progress=on_progress)
            vecs = dict(zip(todo, embedded, strict=True))
        with self._mutex, self._locked():
            self._refresh()
            self._require_index()
            return self._apply(facts, vecs, sources)

    def _prepare(
        self,
        texts: Iterable[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None,
        ids: Sequence[str | None] | None,
    ) -> list[_Fact]:
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            msg = f"got {len(metadatas)} metadatas for {len(texts)} texts; pass one per text"
            raise ConfigError(msg)
        if ids is not None and len(ids) != len(texts):
            msg = f"got {len(ids)} ids for {len(texts)} texts; pass one per text"
            raise ConfigError(msg)
        facts = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                msg = f"fact texts must be strings, got {type(text).__name__} at position {i}"
                raise ConfigError(msg)
            key = ids[i] if ids is not None else None
            if key is None or key == "":
                key = str(uuid.uuid4())
            elif not isinstance(key, str):
                msg = f"fact ids must be strings, got {key!r}"
                raise ConfigError(msg)
            md = dict(metadatas[i] or {}) if metadatas is not None else {}
            as_of = md.get("as_of")
            valid_from = (
                to_timestamp(as_of, what=f"metadata 'as_of' of fact {key!r}")
                if as_of is not None
                else None
            )
            try:
                meta_json = (
                    json.dumps(
                        md,
                        sort_keys=True,
                        ensure_ascii=False,
                        allow_nan=False,
                        default=_json_default,
                    )
                    if md
                    else "{}"
                )
            except (TypeError, ValueError) as e:
                msg = (
                    f"metadata of fact {key!r} cannot be stored as JSON ({e}); use strings, "
                    "numbers, booleans, None, lists, dicts or datetimes"
                )
                raise ConfigError(msg) from e
            source = md.get("source")
            source = source if isinstance(source, str) else None
            facts.append(_Fact(key, text, meta_json, _sha256(text), valid_from, source))
        return facts

    def _heads(self, keys: Iterable[str]) -> dict[str, _Head]:
        heads: dict[str, _Head] = {}
        for chunk in _chunks(sorted(keys)):
            rows = self._con.execute(
                f"SELECT key, vid, content_hash, metadata FROM facts "
                f"WHERE valid_to IS NULL AND key IN ({_marks(len(chunk))})",
                chunk,
            )
            for key, vid, h, md in rows:
                heads[key] = _Head(vid, h, md, pending=False)
        return heads

    def _apply(
        self, facts: list[_Fact], vecs: dict[int, FloatArray], sources: list[str]
    ) -> UpsertResult:
        now = time.time()
        meta = self._meta()
        next_vid = int(meta["next_vid"])
        keys = {f.key for f in facts}
        heads = self._heads(keys)
        versions: dict[str, int] = {}
        for chunk in _chunks(sorted(keys)):
            versions.update(
                self._con.execute(
                    f"SELECT key, MAX(version) FROM facts WHERE key IN ({_marks(len(chunk))}) "
                    "GROUP BY key",
                    chunk,
                ).fetchall()
            )
        pending: dict[int, list[Any]] = {}
        pending_vecs: dict[int, FloatArray] = {}
        closes: list[tuple[float, int]] = []
        erase: list[int] = []
        statuses: list[str] = []
        retired_by_source: dict[str, int] = {}

        def close(head: _Head, valid_to: float) -> None:
            if head.pending:
                if self.keep_history:
                    pending[head.vid][4] = valid_to
                else:
                    del pending[head.vid], pending_vecs[head.vid]
            elif self.keep_history:
                closes.append((valid_to, head.vid))
            else:
                erase.append(head.vid)

        for i, fact in enumerate(facts):
            head = heads.get(fact.key)
            if _same(head, fact):
                statuses.append("unchanged")
                continue
            valid_from = fact.valid_from if fact.valid_from is not None else now
            if head is not None:
                close(head, valid_from)
            statuses.append("added" if head is None else "replaced")
            vec = vecs.get(i)
            if vec is None:  # changed by another process since we embedded: embed now
                vec = self.embed_texts([fact.text])[0]
            vid, next_vid = next_vid, next_vid + 1
            version = versions.get(fact.key, 0) + 1
            versions[fact.key] = version
            pending[vid] = [vid, fact.key, version, valid_from, None, now, fact.text,
                            fact.meta_json, fact.content_hash]  # fmt: skip
            pending_vecs[vid] = vec
            heads[fact.key] = _Head(vid, fact.content_hash, fact.meta_json, pending=True)

        # A source's missing facts end when its new version begins (a file's new mtime).
        retire_at: dict[str, float] = {}
        for fact in facts:
            if fact.source is not None:
                start = fact.valid_from if fact.valid_from is not None else now
                retire_at[fact.source] = max(retire_at.get(fact.source, start), start)
        for chunk in _chunks(sources):
            rows = self._con.execute(
                "SELECT key, vid, json_extract(metadata, '$.source') FROM facts WHERE "
                f"valid_to IS NULL AND json_extract(metadata, '$.source') IN ({_marks(len(chunk))})",
                chunk,
            ).fetchall()
            for key, vid, source in rows:
                if key not in keys:
                    close(_Head(vid, "", "", pending=False), retire_at.get(source, now))
                    retired_by_source[source] = retired_by_source.get(source, 0) + 1

        self._commit(
            closes=closes,
            erase=erase,
            rows=list(pending.values()),
            vectors=pending_vecs,
            next_vid=next_vid,
        )
        return UpsertResult(
            ids=[f.key for f in facts],
            added=statuses.count("added"),
            replaced=statuses.count("replaced"),
            unchanged=statuses.count("unchanged"),
            retired=sum(retired_by_source.values()),
            statuses=statuses,
            retired_by_source=retired_by_source,
        )

    def _commit(
        self,
        *,
        closes: Sequence[tuple[float, int]] = (),
        erase: Sequence[int] = (),
        rows: Sequence[Sequence[Any]] = (),
        vectors: Mapping[int, FloatArray] | None = None,
        next_vid: int | None = None,
        compact: bool = False,
        replace_index: bool = False,
        new_index: VectorIndex | None = None,
        extra_meta: Mapping[str, str] | None = None,
    ) -> None:
        """Apply one write: rows first, then the index file, then one commit that names it.

        With ``replace_index``, ``new_index`` (``None``: empty) replaces the index outright.
        """
        if not (closes or erase or rows or vectors or compact or replace_index or extra_meta):
            return  # nothing changed: no new revision for readers to reload
        con = self._con
        meta = self._meta()
        generation = int(meta["generation"])
        vindex = new_index if replace_index else self._vindex
        index_changed = replace_index
        con.execute("BEGIN IMMEDIATE")
        try:
            if replace_index:
                con.execute("DELETE FROM dead")
            for name, value in (extra_meta or {}).items():
                con.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))
            if closes:
                con.executemany("UPDATE facts SET valid_to = ? WHERE vid = ?", closes)
            if erase:
                con.executemany(
                    "INSERT OR IGNORE INTO dead (vid) VALUES (?)", [(v,) for v in erase]
                )
                con.executemany("DELETE FROM facts WHERE vid = ?", [(v,) for v in erase])
            if rows:
                con.executemany(f"INSERT INTO facts ({_FACT_COLUMNS}) VALUES ({_marks(9)})", rows)
            if vectors:
                ids = np.fromiter(vectors.keys(), dtype=np.int64)
                # rows of already-normalised arrays: stack only
                stacked = np.ascontiguousarray(np.stack(list(vectors.values())), dtype=np.float32)
                if vindex is not None and stacked.shape[1] != vindex.dim:
                    normalize(stacked[:1], vindex.dim)  # raises the dimension error
                if vindex is None:
                    vindex = VectorIndex(self._kind, stacked.shape[1], self.params)
                    con.execute("UPDATE meta SET value = ? WHERE name = 'dim'", (str(vindex.dim),))
                vindex.add(stacked, ids)
                index_changed = True
            dead = int(con.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
            if vindex is not None and (
                (dead and (compact or dead > self.compact_threshold * vindex.ntotal))
                or vindex.needs_retrain()
            ):
                keep = self._fetch_ids("SELECT vid FROM facts ORDER BY vid")
                logger.info(
                    "compacting %s: %d vectors kept, %d dropped", self.path, len(keep), dead
                )
                vindex = vindex.rebuilt(keep) if keep.size else None
                con.execute("DELETE FROM dead")
                index_changed = True
            updates: dict[str, str] = {}
            if index_changed:
                generation += 1
                size, crc = vindex.save(self._index_path(generation)) if vindex else (0, 0)
                updates.update(generation=str(generation), index_size=str(size), index_crc=str(crc))
            if next_vid is not None:
                updates["next_vid"] = str(next_vid)
            if not meta.get("embedding") and (rows or vectors):
                updates["embedding"] = embeddings_name(self.embeddings)
            updates["revision"] = str(int(meta["revision"]) + 1)
            con.executemany("UPDATE meta SET value = ? WHERE name = ?", [
                (v, k) for k, v in updates.items()
            ])  # fmt: skip
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            # The in-memory index may hold the failed write's vectors: reload from disk.
            self._vindex, self._generation, self._revision = None, None, None
            raise
        self._vindex = vindex
        self._generation = generation
        self._remove_stale_files(generation)
        self._refresh(force=True)

    def _remove_stale_files(self, generation: int) -> None:
        # The previous generation stays for readers that have not reloaded yet.
        for path in self.path.glob("index-*.faiss"):
            try:
                number = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if number not in (generation, generation - 1):
                path.unlink(missing_ok=True)
        for path in self.path.glob(".index-*.tmp"):
            path.unlink(missing_ok=True)

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
        keys = sorted(set(ids))
        if not keys:
            return True
        with self._mutex, self._locked():
            self._refresh()
            self._require_index()
            now = time.time()
            closes: list[tuple[float, int]] = []
            erase: list[int] = []
            for chunk in _chunks(keys):
                where = f"key IN ({_marks(len(chunk))})"
                if purge:
                    erase += self._fetch_ids(f"SELECT vid FROM facts WHERE {where}", chunk).tolist()
                    continue
                vids = self._fetch_ids(
                    f"SELECT vid FROM facts WHERE valid_to IS NULL AND {where}", chunk
                ).tolist()
                if self.keep_history:
                    closes += [(now, v) for v in vids]
                else:
                    erase += vids
            if closes or erase:
                self._commit(closes=closes, erase=erase)
        return True

    def compact(self, *, drop_history_before: TimeLike | None = None) -> int:
        """Drop erased vectors from the index (and, optionally, old history); return how many.

        Args:
            drop_history_before: Also erase versions whose validity ended before this time.
        """
        with self._mutex, self._locked():
            self._refresh()
            self._require_index()
            erase: list[int] = []
            if drop_history_before is not None:
                ts = to_timestamp(drop_history_before, what="drop_history_before")
                erase = self._fetch_ids(
                    "SELECT vid FROM facts WHERE valid_to IS NOT NULL AND valid_to <= ?", (ts,)
                ).tolist()
            before = self._vindex.ntotal if self._vindex is not None else 0
            self._commit(erase=erase, compact=True)
            after = self._vindex.ntotal if self._vindex is not None else 0
        return before - after

    def rebuild(
        self,
        *,
        index: IndexKind | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Re-embed every stored version into a new index; return the number of vectors.

        This recovers a store whose index file is lost or damaged, moves a store to other
        embeddings (the ones this store was opened with), or changes the index kind.
        """
        if index is not None and index not in INDEX_KINDS:
            msg = f"index must be one of {', '.join(INDEX_KINDS)}, got {index!r}"
            raise ConfigError(msg)
        emb = self.embeddings
        with self._mutex, self._locked():
            self._refresh()
            rows = self._con.execute("SELECT vid, text FROM facts ORDER BY vid").fetchall()
            kind: IndexKind = index or self._kind
            new: VectorIndex | None = None
            first: dict[str, int] = {}
            for i, (_, text) in enumerate(rows):
                first.setdefault(_sha256(text), i)
            by_hash: dict[str, FloatArray] = {}
            unique = list(first)
            for batch in _chunks(unique, self.embed_batch_size):
                out = normalize(emb.embed_documents([rows[first[h]][1] for h in batch]))
                by_hash.update(zip(batch, out, strict=True))
                if on_progress is not None:
                    on_progress(len(batch))
            if rows:
                vids = np.array([r[0] for r in rows], dtype=np.int64)
                vecs = np.stack([by_hash[_sha256(t)] for _, t in rows])
                new = VectorIndex(kind, vecs.shape[1], self.params)
                new.add(vecs, vids)
            extra = {"index_kind": kind, "embedding": embeddings_name(emb)}
            if new is not None:
                extra["dim"] = str(new.dim)
            self._kind = kind
            self._load_index_enabled = True
            self._commit(replace_index=True, new_index=new, extra_meta=extra)
            self._embedding_checked = False
            return new.ntotal if new is not None else 0

    # -- reading -------------------------------------------------------------------------------

    def _rows(self, vids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        out: dict[int, tuple[Any, ...]] = {}
        for chunk in _chunks(list(vids)):
            for row in self._con.execute(
                f"SELECT {_FACT_COLUMNS} FROM facts WHERE vid IN ({_marks(len(chunk))})", chunk
            ):
                out[row[0]] = row
        return out

    @staticmethod
    def _document(row: Sequence[Any]) -> Document:
        return Document(id=row[1], page_content=row[6], metadata=json.loads(row[7]))

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """Return the current facts with these keys, in the order asked (missing keys skipped)."""
        found: dict[str, Document] = {}
        with self._mutex:
            for chunk in _chunks(sorted(set(ids))):
                for row in self._con.execute(
                    f"SELECT {_FACT_COLUMNS} FROM facts WHERE valid_to IS NULL "
                    f"AND key IN ({_marks(len(chunk))})",
                    chunk,
                ):
                    found[row[1]] = self._document(row)
        return [found[k] for k in dict.fromkeys(ids) if k in found]

    def history(self, key: str) -> list[FactVersion]:
        """Return every kept version of a fact, oldest first."""
        with self._mutex:
            rows = self._con.execute(
                f"SELECT {_FACT_COLUMNS} FROM facts WHERE key = ? ORDER BY version", (key,)
            ).fetchall()
        return [
            FactVersion(
                key=r[1],
                version=r[2],
                text=r[6],
                metadata=json.loads(r[7]),
                valid_from=from_timestamp(r[3]),
                valid_to=from_timestamp(r[4]) if r[4] is not None else None,
                written_at=from_timestamp(r[5]),
            )
            for r in rows
        ]

    def __len__(self) -> int:
        with self._mutex:
            self._refresh()
            return len(self._current)

    def stats(self) -> KnowledgeStats:
        """Return counts and sizes of the store."""
        with self._mutex:
            self._refresh()
            con = self._con
            meta = self._meta()
            versions = int(con.execute("SELECT COUNT(*) FROM facts").fetchone()[0])
            keys = int(con.execute("SELECT COUNT(DISTINCT key) FROM facts").fetchone()[0])
            dead = int(con.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
            disk = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
            oldest = con.execute("SELECT MIN(valid_from) FROM facts").fetchone()[0]
            return KnowledgeStats(
                path=self.path,
                index=meta["index_kind"],
                dim=int(meta["dim"]) if meta["dim"] else None,
                embedding=meta["embedding"],
                facts=len(self._current),
                retired_keys=keys - len(self._current),
                versions=versions,
                vectors=self._vindex.ntotal if self._vindex is not None else 0,
                dead_vectors=dead,
                generation=int(meta["generation"]),
                disk_bytes=disk,
                oldest_valid_from=(
                    datetime.fromtimestamp(float(oldest), UTC) if oldest is not None else None
                ),
            )

    def _allowed(self, flt: MetadataFilter | None, as_of: TimeLike | None) -> IdSet | None:
        if flt is None and as_of is None:
            return None if self._all_current else self._current
        span: float | None = None  # as_of without a filter: its row set is cached per span
        if as_of is None:
            where, params = ["valid_to IS NULL"], []
        else:
            t = to_timestamp(as_of)
            if flt is None:
                span = self._validity_span(t)
                if span in self._as_of_ids:  # many searches at one time (training prompts)
                    return self._as_of_ids[span]
            where = ["valid_from <= ?", "(valid_to IS NULL OR valid_to > ?)"]
            params = [t, t]
        if flt is not None and not callable(flt):
            sql, ps = compile_filter(flt)
            where.append(sql)
            params += ps
        sql = " AND ".join(where)
        if callable(flt):
            keep = [
                vid
                for vid, md in self._con.execute(
                    f"SELECT vid, metadata FROM facts WHERE {sql}", params
                )
                if flt(json.loads(md))
            ]
            return IdSet(np.array(keep, dtype=np.int64))
        ids = IdSet(self._fetch_ids(f"SELECT vid FROM facts WHERE {sql}", params))
        if span is not None:
            if len(self._as_of_ids) >= 256:
                self._as_of_ids.clear()
            self._as_of_ids[span] = ids
        return ids

    def _validity_span(self, t: float) -> float:
        """The start of the span around ``t`` in which no fact became valid or stopped being so.

        Every time in one span sees the same rows, so ``as_of`` searches share their row set.
        """
        if self._bounds is None:
            b = self._con.execute(
                "SELECT valid_from FROM facts UNION SELECT valid_to FROM facts "
                "WHERE valid_to IS NOT NULL"
            ).fetchall()
            self._bounds = np.unique(np.array([r[0] for r in b], dtype=np.float64))
        i = int(np.searchsorted(self._bounds, t, side="right")) - 1
        return float(self._bounds[i]) if i >= 0 else float("-inf")

    def _search(
        self,
        embedding: Sequence[float] | FloatArray,
        k: int,
        flt: MetadataFilter | None,
        as_of: TimeLike | None,
        *,
        with_vectors: bool = False,
    ) -> tuple[list[tuple[Document, float]], FloatArray | None]:
        with self._mutex:
            self._refresh()
            vindex = self._require_index()
            if vindex is None or k <= 0:
                return [], None
            query = normalize(embedding, vindex.dim)[0]
            allowed = self._allowed(flt, as_of)
            ids, scores = vindex.search(query, k, allowed, self.params)
            rows = self._rows(ids.tolist())
            hits = [
                (self._document(rows[v]), float(s))
                for v, s in zip(ids.tolist(), scores.tolist(), strict=True)
                if v in rows
            ]
            vectors = None
            if with_vectors:
                kept = np.array([v for v in ids.tolist() if v in rows], dtype=np.int64)
                vectors = vindex.reconstruct(kept)
        return hits, vectors

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


def _same(head: _Head | None, fact: _Fact) -> bool:
    return (
        head is not None
        and head.content_hash == fact.content_hash
        and head.meta_json == fact.meta_json
    )


def _no_extra(kwargs: Mapping[str, Any], where: str) -> None:
    if kwargs:
        msg = (
            f"unexpected argument(s) to {where}: {', '.join(sorted(kwargs))}; "
            "KnowledgeStore searches take k, filter and as_of"
        )
        raise ConfigError(msg)
