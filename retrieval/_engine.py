"""The knowledge store's storage engine: rows in SQLite, vectors in immutable FAISS segments.

Every version of every fact is a row in SQLite (key, version, validity interval, text, metadata,
vector id). Vectors live in *segments*: FAISS files that are written once and never changed, plus
a *tail* of recent vectors kept in SQLite itself. A small write appends its vectors to the tail
in the same transaction as its rows, so it costs one SQLite commit whatever the store holds; the
write that would take the tail past ``_TAIL_MAX`` vectors turns the tail and its own vectors
into a new segment file instead. Rows whose validity ended are tombstoned (``valid_to`` set),
and a ``retired`` log lets other processes catch up without re-reading every row.

Searches run over every segment and the tail with an id selector of the rows in view (current
ones, those valid ``as_of`` a time, or those passing a filter) and merge the hits by score.
Segments of similar size merge as they pile up (size tiers of ``_FANOUT``, inside the write up to
``_INLINE_MERGE_MAX`` vectors), and :meth:`FactEngine.compact` merges everything into one segment
of the store's index kind, dropping erased vectors; it builds without the write lock and takes
it only to commit.

Atomicity: a segment is written to a temporary name, fsynced and renamed, and only the SQLite
commit that lists it makes it part of the store; a kill at any point leaves the previous state
readable, and the next writer removes what a dead one left behind. A file lock serialises
writers across processes, and a writer re-reads the on-disk state after taking it. No pickle.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import numpy.typing as npt
from filelock import FileLock, Timeout
from langchain_core.documents import Document

from langchain_understudy.errors import ConfigError, KnowledgeStoreError
from langchain_understudy.retrieval._faiss import (
    INDEX_KINDS,
    FloatArray,
    IdArray,
    IdSet,
    IndexKind,
    IndexParams,
    VectorIndex,
    merge_indexes,
    normalize,
)
from langchain_understudy.retrieval._filters import compile_filter
from langchain_understudy.retrieval._time import TimeLike, from_timestamp, to_timestamp

__all__ = [
    "DB_NAME",
    "Fact",
    "FactEngine",
    "FactVersion",
    "Head",
    "KnowledgeStats",
    "MetadataFilter",
    "SegmentInfo",
    "UpsertResult",
    "prepare_facts",
]

logger = logging.getLogger(__name__)

MetadataFilter = Mapping[str, Any] | Callable[[dict[str, Any]], bool]
"""A metadata filter: a dict in the grammar of ``_filters`` (equality, ``$in``, ranges on
``as_of``, ``$and``/``$or``) or a function of a fact's metadata returning ``True`` to keep it."""

DB_NAME = "knowledge.sqlite"
_LOCK_NAME = "knowledge.lock"
_FORMAT = "langchain-understudy knowledge store"
_FORMAT_VERSION = "2"  # 1: one index file rewritten by every write (opened and upgraded in place)
_SQL_CHUNK = 500  # keys or ids per ``IN (...)`` query
_TAIL_MAX = 1024  # vectors kept in SQLite before they become a segment file
_FANOUT = 8  # segments of one size tier merged together
_FLAT_BELOW = 512  # segments smaller than this are exact (flat) whatever the store's kind
_INLINE_MERGE_MAX = 16_384  # larger merges wait for compact()
_TAIL_ID = 0  # segment id of the tail
_UNLINK_IN_BACKGROUND = 256 * 1024 * 1024  # bytes of replaced files removed off the write path
_RETIRED_LOG = 10_000  # revisions of the retired log kept for readers catching up
_SEGMENT_GLOB = "seg-*.faiss"
_LEGACY_GLOB = "index-*.faiss"

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
    # Vectors still in a segment whose rows were erased; merges drop them.
    "CREATE TABLE IF NOT EXISTS dead (vid INTEGER PRIMARY KEY)",
)
_SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS segments (
        id INTEGER PRIMARY KEY,
        file TEXT NOT NULL,           -- name in the store's folder
        kind TEXT NOT NULL,           -- flat, hnsw or ivf
        vectors INTEGER NOT NULL,
        size INTEGER NOT NULL,        -- bytes of the file
        crc INTEGER NOT NULL          -- its CRC32
    )""",
    # Rows that stopped being current, by revision: readers catch up from here.
    "CREATE TABLE IF NOT EXISTS retired (rev INTEGER NOT NULL, vid INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS retired_rev ON retired (rev)",
    # Recent vectors not yet in a segment file: float32 little-endian bytes.
    "CREATE TABLE IF NOT EXISTS tail (vid INTEGER PRIMARY KEY, vector BLOB NOT NULL)",
)
_FACT_COLUMNS = "vid, key, version, valid_from, valid_to, written_at, text, metadata, content_hash"
_META_DEFAULTS = {
    "format": _FORMAT,
    "index_kind": "flat",
    "dim": "",
    "embedding": "",
    "generation": "0",
    "revision": "0",
    "next_vid": "1",
    "next_segment": "1",
    "retired_floor": "0",
    "tail_generation": "0",
}

BoolArray = npt.NDArray[np.bool_]


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
        index: FAISS index kind of large segments.
        dim: Vector width (``None`` before the first fact).
        embedding: Name of the embeddings the vectors came from.
        facts: Current facts.
        retired_keys: Keys deleted and not written since (their history is kept).
        versions: Rows kept, current and historical.
        vectors: Vectors in the segments.
        dead_vectors: Vectors of erased rows awaiting a merge.
        generation: How many times the set of segments changed.
        disk_bytes: Bytes of the store's files on disk.
        oldest_valid_from: When the oldest version kept became valid (``None`` when empty);
            before this time the store knows no facts.
        segments: Segment files holding the vectors.
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
    segments: int = 0


@dataclass(frozen=True)
class SegmentInfo:
    """One segment file (``understudy kb segments``).

    Attributes:
        id: Segment number (later segments hold later writes, or merges of earlier ones).
        file: File name in the store's folder.
        kind: FAISS index kind of the segment.
        vectors: Vectors it holds.
        current: How many of them are current facts.
        bytes: Size of the file.
    """

    id: int
    file: str
    kind: str
    vectors: int
    current: int
    bytes: int


@dataclass
class Fact:
    """One fact to write, checked and serialised."""

    key: str
    text: str
    meta_json: str
    content_hash: str
    valid_from: float | None  # None: the write time
    source: str | None


@dataclass
class Head:
    """The newest row of a key inside a write: stored already, or pending insertion."""

    vid: int
    content_hash: str
    meta_json: str
    pending: bool


@dataclass
class _Segment:
    id: int
    file: str
    kind: str
    index: VectorIndex
    ids: IdArray  # sorted


def sha256_text(text: str) -> str:
    """The content hash of a text: the embedding cache key."""
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


def chunks(items: Sequence[Any], size: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    """Yield ``items`` in slices of ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _tier(n: int) -> int:
    return int(math.log(max(n, 1), _FANOUT) + 1e-9)


def same_fact(head: Head | None, fact: Fact) -> bool:
    """Whether ``fact`` is identical (text and metadata) to the key's newest row."""
    return (
        head is not None
        and head.content_hash == fact.content_hash
        and head.meta_json == fact.meta_json
    )


def prepare_facts(
    texts: Iterable[str],
    metadatas: Sequence[Mapping[str, Any] | None] | None,
    ids: Sequence[str | None] | None,
) -> list[Fact]:
    """Check and serialise facts for a write (keys drawn for missing ids).

    Raises:
        ConfigError: lengths differ, a text or id is not a string, an ``as_of`` is not a time,
            or metadata cannot be stored as JSON.
    """
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
                    md, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_json_default
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
        facts.append(Fact(key, text, meta_json, sha256_text(text), valid_from, source))
    return facts


def _version(row: Sequence[Any]) -> FactVersion:
    return FactVersion(
        key=row[1],
        version=row[2],
        text=row[6],
        metadata=json.loads(row[7]),
        valid_from=from_timestamp(row[3]),
        valid_to=from_timestamp(row[4]) if row[4] is not None else None,
        written_at=from_timestamp(row[5]),
    )


class FactEngine:
    """Rows, segments, generations and locks of one knowledge-store folder.

    Thread-safe within a process (one mutex), and safe across processes (a file lock around
    every write, and readers that catch up with other processes' commits before each call).

    Args:
        path: The store's folder (created on first use unless ``create=False``).
        kind: Index kind for a new store; ``None`` keeps an existing store's kind.
        params: Index build and search parameters (search fields may change at any time).
        keep_history: Keep replaced and deleted versions; ``False`` erases them.
        compact_threshold: Rewrite the segments holding erased vectors when those exceed this
            share of all vectors.
        lock_timeout: Seconds a writer waits for another process's write.
        create: Create the store if ``path`` holds none (else raise).
        load_index: ``False`` opens only the database, to :meth:`rebuild` lost segments.
        background_merges: Merge full tiers of large segments in a background thread (built
            without the write lock, committed under it); ``False`` leaves them to
            :meth:`compact`.
    """

    def __init__(
        self,
        path: str | PurePath,
        *,
        kind: IndexKind | None = None,
        params: IndexParams | None = None,
        keep_history: bool = True,
        compact_threshold: float = 0.25,
        lock_timeout: float = 60.0,
        create: bool = True,
        load_index: bool = True,
        background_merges: bool = False,
    ) -> None:
        self.path = Path(path)
        self.background_merges = background_merges
        self._merger: threading.Thread | None = None
        self.params = params or IndexParams()
        self.keep_history = keep_history
        self.compact_threshold = compact_threshold
        self.lock_timeout = lock_timeout
        self._load_index_enabled = load_index
        self._mutex = threading.RLock()
        self._revision: int | None = None
        self._segments: list[_Segment] = []
        self._has_segments = False  # the database lists segments (loaded or not)
        self._current: BoolArray = np.zeros(1, dtype=bool)  # by vid: row is a current fact
        self._n_current = 0
        self._state = 0  # bumped whenever ``_current`` changes
        self._bits: tuple[int, npt.NDArray[np.uint8]] | None = None
        self._in_view: dict[int, tuple[int, IdSet | None]] = {}  # segment -> (state, ids)
        self._as_of_ids: dict[float, IdSet] = {}  # validity span -> its rows, this revision
        self._bounds: npt.NDArray[np.float64] | None = None
        self._next_vid = 1
        self._tail_generation: str | None = None
        self._written: dict[int, _Segment] = {}  # segments this engine just wrote, not re-read
        self._con = self._open(create)
        self.kind: IndexKind = self.meta()["index_kind"]  # type: ignore[assignment]
        if kind is not None and kind != self.kind:
            self._set_kind_of_empty_store(kind)
        if kind is not None and kind != self.kind:
            msg = (
                f"the knowledge store {self.path} uses a {self.kind!r} index, not {kind!r}; "
                f"switch it with `understudy kb rebuild --index {kind} --store {self.path}`"
            )
            raise ConfigError(msg)
        with self._mutex:
            self.refresh(force=True)

    # -- opening -------------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        """The SQLite database of texts, metadata, history and segments."""
        return self.path / DB_NAME

    @property
    def revision(self) -> int | None:
        """The commit this engine last caught up with (every write makes a new one)."""
        return self._revision

    def rebuild_hint(self) -> str:
        """The sentence that tells a user how to recover lost or damaged segments."""
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
                with self.locked():
                    self._create_schema(con)
            meta = dict(con.execute("SELECT name, value FROM meta").fetchall())
            if meta.get("format") == _FORMAT and meta.get("format_version") == "1":
                with self.locked():
                    self._upgrade_v1(con)
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
                f"langchain-understudy reads versions 1 and {_FORMAT_VERSION}: upgrade the "
                f"package, or rebuild the store from its database with `understudy kb rebuild "
                f"--store {self.path}` using the version that wrote it"
            )
            raise KnowledgeStoreError(msg)
        return con

    def _create_schema(self, con: sqlite3.Connection) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            for stmt in (*_SCHEMA, *_SCHEMA_V2):
                con.execute(stmt)
            defaults = _META_DEFAULTS | {
                "format_version": _FORMAT_VERSION,
                "created_at": str(time.time()),
            }
            con.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", defaults.items())
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _upgrade_v1(self, con: sqlite3.Connection) -> None:
        """Turn a version-1 store (one index file) into a store of one segment: that file."""
        con.execute("BEGIN IMMEDIATE")
        try:
            meta = dict(con.execute("SELECT name, value FROM meta").fetchall())
            if meta.get("format_version") != "1":  # another process upgraded it first
                con.execute("COMMIT")
                return
            for stmt in _SCHEMA_V2:
                con.execute(stmt)
            generation = int(meta.get("generation", "0"))
            next_segment = 1
            if generation and int(meta.get("index_size", "0")):
                rows = int(con.execute("SELECT COUNT(*) FROM facts").fetchone()[0])
                dead = int(con.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
                con.execute(
                    "INSERT INTO segments VALUES (1, ?, ?, ?, ?, ?)",
                    (f"index-{generation:08d}.faiss", meta["index_kind"], rows + dead,
                     int(meta["index_size"]), int(meta["index_crc"])),
                )  # fmt: skip
                next_segment = 2
            updates = {
                "format_version": _FORMAT_VERSION,
                "next_segment": str(next_segment),
                "retired_floor": meta.get("revision", "0"),
                "tail_generation": "0",
            }
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(updates.items()))
            con.execute("DELETE FROM meta WHERE name IN ('index_size', 'index_crc')")
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        logger.info("upgraded the knowledge store %s to format %s", self.path, _FORMAT_VERSION)

    def _set_kind_of_empty_store(self, kind: IndexKind) -> None:
        # A store that never held a vector takes whichever kind its first user asks for.
        with self._mutex, self.locked():
            self._con.execute("BEGIN IMMEDIATE")
            updated = self._con.execute(
                "UPDATE meta SET value = ? WHERE name = 'index_kind' AND "
                "(SELECT value FROM meta WHERE name = 'dim') = ''",
                (kind,),
            ).rowcount
            self._con.execute("COMMIT")
        if updated:
            self.kind = kind

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's cross-process write lock."""
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
        """Wait for a background merge, then close the database (the engine is unusable after)."""
        if self._merger is not None:
            self._merger.join()
        with self._mutex:
            self._con.close()

    # -- state ---------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        """The store's ``meta`` table (format, kind, dim, embedding, counters)."""
        try:
            with self._mutex:
                return dict(self._con.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.Error as e:
            msg = f"cannot read the knowledge store database {self.db_path}: {e}"
            raise KnowledgeStoreError(msg) from e

    def dim(self) -> int | None:
        """Vector width (``None`` before the first vector)."""
        dim = self.meta().get("dim", "")
        return int(dim) if dim else None

    def refresh(self, *, force: bool = False) -> None:
        """Catch up with the last commit (any process's): new segments, rows that changed."""
        with self._mutex:
            self._refresh(force)

    def _refresh(self, force: bool) -> None:
        try:
            row = self._con.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.Error as e:
            msg = f"cannot read the knowledge store database {self.db_path}: {e}"
            raise KnowledgeStoreError(msg) from e
        if not force and row is not None and int(row[0]) == self._revision:
            return
        missing: str | None = None
        for attempt in range(6):
            self._con.execute("BEGIN")  # one read snapshot for meta, rows and segments
            try:
                meta = self.meta()
                listed = self._con.execute(
                    "SELECT id, file, kind, vectors, size, crc FROM segments ORDER BY id"
                ).fetchall()
                segments = self._load_segments(meta, listed)
                revision, next_vid = int(meta["revision"]), int(meta["next_vid"])
                full = (
                    force or self._revision is None or self._revision < int(meta["retired_floor"])
                )
                tail = self._tail()
                tail_rows = self._tail_rows(meta, full or tail is None)
                if full:
                    fresh = self._fetch_ids("SELECT vid FROM facts WHERE valid_to IS NULL")
                    gone = np.empty(0, dtype=np.int64)
                else:
                    fresh = self._fetch_ids(
                        "SELECT vid FROM facts WHERE vid >= ? AND valid_to IS NULL",
                        (self._next_vid,),
                    )
                    gone = self._fetch_ids(
                        "SELECT vid FROM retired WHERE rev > ?", (self._revision,)
                    )
                if full and self._revision is None and (segments or tail_rows[0].size):
                    self._check_totals(segments, tail_rows[0].size)
                has_vectors = bool(listed) or bool(
                    self._con.execute("SELECT EXISTS (SELECT 1 FROM tail)").fetchone()[0]
                )
            except FileNotFoundError as e:
                # Either a merge removed the file between our reads (read again), or the
                # file is gone (the same one is missing twice).
                if missing == str(e.filename):
                    break
                missing = str(e.filename)
                time.sleep(0.02 * (attempt + 1))
                continue
            finally:
                self._con.execute("COMMIT")
            current = np.zeros(next_vid + 1, dtype=bool) if full else self._current
            if current.size < next_vid + 1:
                grown = np.zeros(next_vid + 1 + next_vid // 4, dtype=bool)
                grown[: current.size] = current
                current = grown
            current[fresh] = True
            current[gone[gone < current.size]] = False
            self.kind = meta["index_kind"]  # type: ignore[assignment]
            tail = self._updated_tail(tail, tail_rows, meta)
            self._segments = segments + ([tail] if tail is not None else [])
            self._has_segments = has_vectors
            self._current = current
            self._n_current = int(np.count_nonzero(current))
            self._state += 1
            self._revision, self._next_vid = revision, next_vid
            self._as_of_ids, self._bounds = {}, None
            return
        msg = f"the knowledge segment file {missing} is missing. " + self.rebuild_hint()
        raise KnowledgeStoreError(msg)

    def _tail(self) -> _Segment | None:
        tail = self._segments[-1] if self._segments else None
        return tail if tail is not None and tail.id == _TAIL_ID else None

    def _tail_rows(self, meta: dict[str, str], reload: bool) -> tuple[IdArray, FloatArray, bool]:
        """Tail vectors to load: all of them (``True``), or those newer than the last load."""
        if not self._load_index_enabled or not meta["dim"]:
            return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32), True
        reload = reload or meta["tail_generation"] != self._tail_generation
        sql = "SELECT vid, vector FROM tail" + ("" if reload else " WHERE vid >= ?")
        rows = self._con.execute(sql + " ORDER BY vid", () if reload else (self._next_vid,))
        vids, blobs = [], []
        for vid, blob in rows:
            vids.append(vid)
            blobs.append(blob)
        dim = int(meta["dim"])
        vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)
        return np.array(vids, dtype=np.int64), vectors, reload

    def _updated_tail(
        self,
        tail: _Segment | None,
        rows: tuple[IdArray, FloatArray, bool],
        meta: dict[str, str],
    ) -> _Segment | None:
        vids, vectors, reload = rows
        self._tail_generation = meta["tail_generation"] if meta["dim"] else None
        if reload:
            if not vids.size:
                return None
            index = VectorIndex("flat", vectors.shape[1], self.params)
            index.add(vectors, vids)
            return _Segment(_TAIL_ID, "", "flat", index, vids)
        if vids.size and tail is not None:
            tail.index.add(vectors, vids)  # vids only grow: the id list stays sorted
            tail.ids = np.concatenate([tail.ids, vids])
        return tail

    def _load_segments(
        self, meta: dict[str, str], listed: Sequence[Sequence[Any]]
    ) -> list[_Segment]:
        if not self._load_index_enabled:
            return []
        have = {s.id: s for s in self._segments if s.id != _TAIL_ID} | self._written
        self._written = {}
        out = []
        for seg_id, name, kind, vectors, size, crc in listed:
            seg = have.get(seg_id)
            if seg is None:
                path = self.path / name
                logger.debug("loading %s", path)
                index = VectorIndex.load(
                    path, kind, self.params, size=size, crc=crc, rebuild_hint=self.rebuild_hint()
                )
                if index.ntotal != vectors or str(index.dim) != meta["dim"]:
                    msg = (
                        f"the knowledge segment {path} holds {index.ntotal} {index.dim}-d "
                        f"vectors but the database expects {vectors} {meta['dim']}-d ones. "
                        f"{self.rebuild_hint()}"
                    )
                    raise KnowledgeStoreError(msg)
                seg = _Segment(seg_id, name, kind, index, np.sort(index.ids()))
            seg.index.params = self.params
            out.append(seg)
        return out

    def _check_totals(self, segments: Sequence[_Segment], in_tail: int) -> None:
        rows = int(self._con.execute("SELECT COUNT(*) FROM facts").fetchone()[0])
        dead = int(self._con.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
        held = sum(s.index.ntotal for s in segments) + in_tail
        if held != rows + dead:
            msg = (
                f"the knowledge segments in {self.path} hold {held} vectors but the database "
                f"expects {rows + dead}. {self.rebuild_hint()}"
            )
            raise KnowledgeStoreError(msg)

    def _fetch_ids(self, sql: str, params: Sequence[Any] = ()) -> IdArray:
        cur = self._con.execute(sql, params)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def require_index(self) -> None:
        """Raise if the store has vectors but was opened without loading them."""
        if not self._load_index_enabled and self._has_segments:
            msg = "this KnowledgeStore was opened with load_index=False; call rebuild() first"
            raise KnowledgeStoreError(msg)

    def __len__(self) -> int:
        with self._mutex:
            self.refresh()
            return self._n_current

    @property
    def vectors(self) -> int:
        """Vectors held in the loaded segments."""
        return sum(s.index.ntotal for s in self._segments)

    # -- vectors by id -------------------------------------------------------------------------

    def reconstruct(self, vids: IdArray) -> FloatArray:
        """Return the stored vectors of ``vids`` (all must be in some segment)."""
        vids = np.asarray(vids, dtype=np.int64)
        dim = self._segments[0].index.dim if self._segments else 0
        out = np.empty((vids.size, dim), dtype=np.float32)
        todo = np.ones(vids.size, dtype=bool)
        for seg in self._segments:
            if not todo.any():
                break
            if seg.ids.size == 0:
                continue
            pos = np.minimum(np.searchsorted(seg.ids, vids), seg.ids.size - 1)
            here = todo & (seg.ids[pos] == vids)
            if not here.any():
                continue
            out[here] = seg.index.reconstruct(vids[here])
            todo &= ~here
        if todo.any():
            msg = f"vectors {vids[todo][:5].tolist()} are in no segment. {self.rebuild_hint()}"
            raise KnowledgeStoreError(msg)
        return out

    def cached_vectors(self, hashes: Sequence[str]) -> dict[str, FloatArray]:
        """Return stored vectors of texts with these content hashes (those found)."""
        with self._mutex:
            self.refresh()
            if not self._segments or not hashes:
                return {}
            found: dict[str, int] = {}
            for chunk in chunks(hashes):
                rows = self._con.execute(
                    f"SELECT content_hash, MAX(vid) FROM facts WHERE content_hash IN "
                    f"({_marks(len(chunk))}) AND vid < ? GROUP BY content_hash",
                    [*chunk, self._next_vid],
                )
                found.update(rows.fetchall())
            if not found:
                return {}
            vids = np.fromiter(found.values(), dtype=np.int64)
            return dict(zip(found, self.reconstruct(vids), strict=True))

    # -- reading -------------------------------------------------------------------------------

    def _rows(self, vids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        out: dict[int, tuple[Any, ...]] = {}
        for chunk in chunks(list(vids)):
            for row in self._con.execute(
                f"SELECT {_FACT_COLUMNS} FROM facts WHERE vid IN ({_marks(len(chunk))})", chunk
            ):
                out[row[0]] = row
        return out

    def get(self, keys: Sequence[str]) -> list[FactVersion]:
        """Return the current versions of these keys, in the order asked (missing skipped)."""
        found: dict[str, FactVersion] = {}
        with self._mutex:
            for chunk in chunks(sorted(set(keys))):
                for row in self._con.execute(
                    f"SELECT {_FACT_COLUMNS} FROM facts WHERE valid_to IS NULL "
                    f"AND key IN ({_marks(len(chunk))})",
                    chunk,
                ):
                    found[row[1]] = _version(row)
        return [found[k] for k in dict.fromkeys(keys) if k in found]

    def heads(self, keys: Iterable[str]) -> dict[str, Head]:
        """Return the current row of each key that has one."""
        heads: dict[str, Head] = {}
        with self._mutex:
            for chunk in chunks(sorted(keys)):
                rows = self._con.execute(
                    f"SELECT key, vid, content_hash, metadata FROM facts "
                    f"WHERE valid_to IS NULL AND key IN ({_marks(len(chunk))})",
                    chunk,
                )
                for key, vid, h, md in rows:
                    heads[key] = Head(vid, h, md, pending=False)
        return heads

    def history(self, key: str) -> list[FactVersion]:
        """Return every kept version of a fact, oldest first."""
        with self._mutex:
            rows = self._con.execute(
                f"SELECT {_FACT_COLUMNS} FROM facts WHERE key = ? ORDER BY version", (key,)
            ).fetchall()
        return [_version(r) for r in rows]

    def stats(self) -> KnowledgeStats:
        """Return counts and sizes of the store."""
        with self._mutex:
            self.refresh()
            con = self._con
            meta = self.meta()
            versions = int(con.execute("SELECT COUNT(*) FROM facts").fetchone()[0])
            keys = int(con.execute("SELECT COUNT(DISTINCT key) FROM facts").fetchone()[0])
            dead = int(con.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
            listed, held = con.execute("SELECT COUNT(*), SUM(vectors) FROM segments").fetchone()
            held = int(held or 0) + int(con.execute("SELECT COUNT(*) FROM tail").fetchone()[0])
            disk = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
            oldest = con.execute("SELECT MIN(valid_from) FROM facts").fetchone()[0]
            return KnowledgeStats(
                path=self.path,
                index=meta["index_kind"],
                dim=int(meta["dim"]) if meta["dim"] else None,
                embedding=meta["embedding"],
                facts=self._n_current,
                retired_keys=keys - self._n_current,
                versions=versions,
                vectors=held,
                dead_vectors=dead,
                generation=int(meta["generation"]),
                disk_bytes=disk,
                oldest_valid_from=(
                    datetime.fromtimestamp(float(oldest), UTC) if oldest is not None else None
                ),
                segments=int(listed),
            )

    def segments(self) -> list[SegmentInfo]:
        """Return the segments, oldest first, with how many of their vectors are current."""
        with self._mutex:
            self.refresh()
            listed = self._con.execute(
                "SELECT id, file, kind, vectors, size FROM segments ORDER BY id"
            ).fetchall()
            by_id = {s.id: s for s in self._segments}
            out = []
            for seg_id, name, kind, vectors, size in listed:
                seg = by_id.get(seg_id)
                current = int(np.count_nonzero(self._current[seg.ids])) if seg else -1
                out.append(SegmentInfo(seg_id, name, kind, int(vectors), current, int(size)))
            tail = self._tail()
            if tail is not None:
                n = tail.index.ntotal
                current = int(np.count_nonzero(self._current[tail.ids]))
                out.append(SegmentInfo(_TAIL_ID, f"{DB_NAME} (tail)", "flat", n, current,
                                       n * tail.index.dim * 4))  # fmt: skip
            return out

    # -- search --------------------------------------------------------------------------------

    def _current_bits(self) -> npt.NDArray[np.uint8]:
        if self._bits is None or self._bits[0] != self._state:
            self._bits = (self._state, np.packbits(self._current, bitorder="little"))
        return self._bits[1]

    def _current_in(self, seg: _Segment) -> IdSet | None:
        """The current rows of a segment (``None``: all of them), cached until rows change."""
        cached = self._in_view.get(seg.id)
        if cached is not None and cached[0] == self._state:
            return cached[1]
        mask = self._current[seg.ids]
        ids = None if mask.all() else IdSet(seg.ids[mask], self._current_bits(), sorted_unique=True)
        if len(self._in_view) > 4 * len(self._segments) + 8:
            self._in_view.clear()
        self._in_view[seg.id] = (self._state, ids)
        return ids

    def _allowed(self, flt: MetadataFilter | None, as_of: TimeLike | None) -> IdSet | None:
        """The rows a search may return (``None``: the current ones)."""
        if flt is None and as_of is None:
            return None
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

    def search(
        self,
        query: Sequence[float] | FloatArray,
        k: int,
        flt: MetadataFilter | None = None,
        as_of: TimeLike | None = None,
        *,
        with_vectors: bool = False,
    ) -> tuple[list[tuple[FactVersion, float]], FloatArray | None]:
        """Return the ``k`` rows in view nearest to ``query`` (cosine, best first).

        Args:
            query: The query vector (normalised here).
            k: Results wanted; fewer only when fewer rows are in view.
            flt: A metadata filter.
            as_of: Search the rows valid at this time instead of the current ones.
            with_vectors: Also return the hits' stored vectors (for MMR).
        """
        with self._mutex:
            self.refresh()
            self.require_index()
            if not self._segments or k <= 0:
                return [], None
            q = normalize(query, self._segments[0].index.dim)[0]
            allowed = self._allowed(flt, as_of)
            if allowed is not None and len(allowed) == 0:
                return [], None
            found_ids, found_scores = [], []
            single = len(self._segments) == 1
            for seg in self._segments:
                if allowed is None:
                    sub = self._current_in(seg)
                else:
                    sub = allowed if single else allowed.within(seg.ids)
                if sub is not None and len(sub) == 0:
                    continue
                ids, scores = seg.index.search(q, k, sub, self.params)
                found_ids.append(ids)
                found_scores.append(scores)
            if not found_ids:
                return [], None
            ids = np.concatenate(found_ids)
            scores = np.concatenate(found_scores)
            if len(found_ids) > 1:
                order = np.lexsort((ids, -scores))[:k]
                ids, scores = ids[order], scores[order]
            rows = self._rows(ids.tolist())
            hits = [
                (_version(rows[v]), float(s))
                for v, s in zip(ids.tolist(), scores.tolist(), strict=True)
                if v in rows
            ]
            vectors = None
            if with_vectors:
                kept = np.array([v for v in ids.tolist() if v in rows], dtype=np.int64)
                vectors = self.reconstruct(kept)
        return hits, vectors

    # -- writing -------------------------------------------------------------------------------

    def write(
        self,
        facts: list[Fact],
        vectors: Mapping[int, FloatArray],
        sources: Sequence[str],
        *,
        embed: Callable[[str], FloatArray],
        embedding: str,
    ) -> UpsertResult:
        """Write facts (and retire what ``sources`` no longer hold) in one atomic commit.

        Args:
            facts: The facts, checked by :func:`prepare_facts`.
            vectors: Unit vectors by position in ``facts``, for the facts that need one.
            sources: Sources whose current facts not named in ``facts`` are retired.
            embed: Embeds one text: for a fact another process changed after ``vectors``
                were computed.
            embedding: Name of the embeddings, recorded by the first write.
        """
        with self._mutex, self.locked():
            self.refresh()
            self.require_index()
            return self._apply(facts, vectors, sources, embed, embedding)

    def _apply(
        self,
        facts: list[Fact],
        vecs: Mapping[int, FloatArray],
        sources: Sequence[str],
        embed: Callable[[str], FloatArray],
        embedding: str,
    ) -> UpsertResult:
        now = time.time()
        meta = self.meta()
        next_vid = int(meta["next_vid"])
        keys = {f.key for f in facts}
        heads = self.heads(keys)
        versions: dict[str, int] = {}
        for chunk in chunks(sorted(keys)):
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

        def close(head: Head, valid_to: float) -> None:
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
            if same_fact(head, fact):
                statuses.append("unchanged")
                continue
            valid_from = fact.valid_from if fact.valid_from is not None else now
            if head is not None:
                close(head, valid_from)
            statuses.append("added" if head is None else "replaced")
            vec = vecs.get(i)
            if vec is None:  # changed by another process since we embedded: embed now
                vec = embed(fact.text)
            vid, next_vid = next_vid, next_vid + 1
            version = versions.get(fact.key, 0) + 1
            versions[fact.key] = version
            pending[vid] = [vid, fact.key, version, valid_from, None, now, fact.text,
                            fact.meta_json, fact.content_hash]  # fmt: skip
            pending_vecs[vid] = vec
            heads[fact.key] = Head(vid, fact.content_hash, fact.meta_json, pending=True)

        # A source's missing facts end when its new version begins (a file's new mtime).
        retire_at: dict[str, float] = {}
        for fact in facts:
            if fact.source is not None:
                start = fact.valid_from if fact.valid_from is not None else now
                retire_at[fact.source] = max(retire_at.get(fact.source, start), start)
        for chunk in chunks(list(sources)):
            rows = self._con.execute(
                "SELECT key, vid, json_extract(metadata, '$.source') FROM facts WHERE "
                f"valid_to IS NULL AND json_extract(metadata, '$.source') IN ({_marks(len(chunk))})",
                chunk,
            ).fetchall()
            for key, vid, source in rows:
                if key not in keys:
                    close(Head(vid, "", "", pending=False), retire_at.get(source, now))
                    retired_by_source[source] = retired_by_source.get(source, 0) + 1

        self._commit(
            closes=closes,
            erase=erase,
            rows=list(pending.values()),
            vectors=pending_vecs,
            next_vid=next_vid,
            embedding=embedding,
        )
        self._maintain()
        return UpsertResult(
            ids=[f.key for f in facts],
            added=statuses.count("added"),
            replaced=statuses.count("replaced"),
            unchanged=statuses.count("unchanged"),
            retired=sum(retired_by_source.values()),
            statuses=statuses,
            retired_by_source=retired_by_source,
        )

    def _segment_kind(self, n: int) -> IndexKind:
        return self.kind if n >= _FLAT_BELOW else "flat"

    def _commit(
        self,
        *,
        closes: Sequence[tuple[float, int]] = (),
        erase: Sequence[int] = (),
        rows: Sequence[Sequence[Any]] = (),
        vectors: Mapping[int, FloatArray] | None = None,
        next_vid: int | None = None,
        embedding: str | None = None,
        drop_segments: Sequence[int] = (),
        add_segment: VectorIndex | None = None,
        undead: Sequence[int] | None = None,
        tail_upto: int | None = None,
        extra_meta: Mapping[str, str] | None = None,
    ) -> None:
        """Apply one write: rows first, then any segment file, then one commit that lists it.

        Args:
            closes: ``(valid_to, vid)`` of rows whose validity ends.
            erase: Rows to delete (their vectors become dead).
            rows: New rows.
            vectors: Their vectors by vid: appended to the tail, or, with the tail, written as a
                new segment when the tail would pass ``_TAIL_MAX``.
            next_vid: The next free vid.
            embedding: Name of the embeddings (recorded if none is yet).
            drop_segments: Segment files that ``add_segment`` replaces (a merge).
            add_segment: A segment built from ``drop_segments`` (or from scratch).
            undead: Dead vids the merge dropped (``None`` with a rebuild: all of them).
            tail_upto: The merge also took the tail's vectors up to this vid.
            extra_meta: Meta values to set.
        """
        if not (closes or erase or rows or vectors or drop_segments or add_segment or extra_meta):
            return  # nothing changed: no new revision for readers to reload
        con = self._con
        meta = self.meta()
        revision = int(meta["revision"]) + 1
        next_segment = int(meta["next_segment"])
        written: list[tuple[int, str, VectorIndex]] = []
        tail_changed = tail_upto is not None
        con.execute("BEGIN IMMEDIATE")
        try:
            for name, value in (extra_meta or {}).items():
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
            if undead is None and add_segment is not None:
                con.execute("DELETE FROM dead")
            elif undead:
                con.executemany("DELETE FROM dead WHERE vid = ?", [(v,) for v in undead])
            if tail_upto is not None:
                con.execute("DELETE FROM tail WHERE vid <= ?", (tail_upto,))
            if closes:
                con.executemany("UPDATE facts SET valid_to = ? WHERE vid = ?", closes)
            if erase:
                con.executemany(
                    "INSERT OR IGNORE INTO dead (vid) VALUES (?)", [(v,) for v in erase]
                )
                con.executemany("DELETE FROM facts WHERE vid = ?", [(v,) for v in erase])
            if closes or erase:
                con.executemany(
                    "INSERT INTO retired (rev, vid) VALUES (?, ?)",
                    [(revision, v) for _, v in closes] + [(revision, v) for v in erase],
                )
            if rows:
                con.executemany(f"INSERT INTO facts ({_FACT_COLUMNS}) VALUES ({_marks(9)})", rows)
            new: list[VectorIndex] = [add_segment] if add_segment is not None else []
            if vectors:
                flushed = self._add_vectors(vectors, meta)
                if flushed is not None:
                    new.append(flushed)
                    tail_changed = True
            for index in new:
                if index.ntotal == 0:
                    continue
                name = f"seg-{next_segment:08d}.faiss"
                written.append((next_segment, name, index))
                size, crc = index.save(self.path / name)
                con.execute(
                    "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)",
                    (next_segment, name, index.kind, index.ntotal, size, crc),
                )
                next_segment += 1
            if drop_segments:
                con.executemany("DELETE FROM segments WHERE id = ?", [(s,) for s in drop_segments])
            updates: dict[str, str] = {"revision": str(revision)}
            if new or drop_segments:
                updates["generation"] = str(int(meta["generation"]) + 1)
                updates["next_segment"] = str(next_segment)
            if tail_changed:
                updates["tail_generation"] = str(int(meta["tail_generation"]) + 1)
            if next_vid is not None:
                updates["next_vid"] = str(next_vid)
            if not meta.get("embedding") and (rows or vectors) and embedding:
                updates["embedding"] = embedding
            floor = int(meta["retired_floor"])
            if revision - floor > 2 * _RETIRED_LOG:
                floor = revision - _RETIRED_LOG
                con.execute("DELETE FROM retired WHERE rev <= ?", (floor,))
                updates["retired_floor"] = str(floor)
            con.executemany(
                "UPDATE meta SET value = ? WHERE name = ?", [(v, k) for k, v in updates.items()]
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            for _, name, _ in written:  # never listed: remove it (a later write would anyway)
                (self.path / name).unlink(missing_ok=True)
            raise
        for seg_id, name, index in written:
            self._written[seg_id] = _Segment(seg_id, name, index.kind, index, np.sort(index.ids()))
        files = {s.id: s.file for s in self._segments if s.id != _TAIL_ID}
        stale = [self.path / files[i] for i in drop_segments if i in files]
        self._remove_stale_files(stale)
        self.refresh()

    def _add_vectors(self, vectors: Mapping[int, FloatArray], meta: dict[str, str]) -> Any:
        """Append new vectors to the tail, or return the segment of the tail and them.

        Runs inside the write's transaction.
        """
        con = self._con
        ids = np.fromiter(vectors.keys(), dtype=np.int64)
        # rows of already-normalised arrays: stack only
        stacked = np.ascontiguousarray(np.stack(list(vectors.values())), dtype=np.float32)
        dim = int(meta["dim"]) if meta["dim"] else None
        if dim is not None and stacked.shape[1] != dim:
            normalize(stacked[:1], dim)  # raises the dimension error
        if dim is None:
            con.execute("UPDATE meta SET value = ? WHERE name = 'dim'", (str(stacked.shape[1]),))
        tail = self._tail()
        in_tail = tail.index.ntotal if tail is not None else 0
        if in_tail + ids.size <= _TAIL_MAX:
            little = stacked.astype("<f4", copy=False)
            con.executemany(
                "INSERT INTO tail (vid, vector) VALUES (?, ?)",
                [(int(v), little[i].tobytes()) for i, v in enumerate(ids.tolist())],
            )
            return None
        parts: list[tuple[VectorIndex | FloatArray, IdArray]] = []
        if tail is not None:
            dead = self._dead()
            gone = dead[np.isin(dead, tail.ids)] if dead.size else dead
            parts.append((tail.index, np.setdiff1d(tail.ids, gone, assume_unique=True)))
            con.executemany("DELETE FROM dead WHERE vid = ?", [(int(v),) for v in gone])
        con.execute("DELETE FROM tail")
        parts.append((stacked, ids))
        total = sum(int(i.size) for _, i in parts)
        return merge_indexes(parts, self._segment_kind(total), self.params, stacked.shape[1])

    def _remove_stale_files(self, merged: Sequence[Path]) -> None:
        """Remove the files a merge replaced, and any file no commit lists.

        Runs under the write lock: segment files are only ever written under it, so no other
        writer is between writing a file and listing it. A reader that has not loaded a removed
        file yet reads the segment list again. Large merged files go in a background thread
        (freeing a gigabyte file takes a while); one that outlives a killed process is removed
        by the next write's check.
        """
        sizes = [path.stat().st_size if path.exists() else 0 for path in merged]
        if sum(sizes) > _UNLINK_IN_BACKGROUND:
            threading.Thread(target=_unlink_all, args=(list(merged),), daemon=True).start()
        else:
            _unlink_all(merged)
        listed = {r[0] for r in self._con.execute("SELECT file FROM segments")}
        for pattern in (_SEGMENT_GLOB, _LEGACY_GLOB, ".*.tmp"):
            for path in self.path.glob(pattern):
                if path.name not in listed and path not in merged:
                    path.unlink(missing_ok=True)

    # -- merging -------------------------------------------------------------------------------

    def _dead(self) -> IdArray:
        return self._fetch_ids("SELECT vid FROM dead ORDER BY vid")

    def _parts(
        self, segments: Sequence[_Segment], dead: IdArray
    ) -> tuple[list[tuple[VectorIndex | FloatArray, IdArray]], IdArray, int | None]:
        """What a merge of ``segments`` copies: ``(parts, dead vids dropped, tail's last vid)``.

        The tail's vectors are copied out, so the merge may run while the tail grows.
        """
        parts: list[tuple[VectorIndex | FloatArray, IdArray]] = []
        held = np.concatenate([s.ids for s in segments]) if segments else dead[:0]
        gone = dead[np.isin(dead, held)] if dead.size else dead
        tail_upto = None
        for seg in segments:
            keep = seg.ids if gone.size == 0 else np.setdiff1d(seg.ids, gone, assume_unique=True)
            if seg.id == _TAIL_ID:
                tail_upto = int(seg.ids[-1]) if seg.ids.size else None
                if keep.size:
                    parts.append((seg.index.reconstruct(keep), keep))
            elif keep.size:
                parts.append((seg.index, keep))
        return parts, gone, tail_upto

    def _merge_commit(self, segments: Sequence[_Segment], dead: IdArray) -> None:
        """Merge ``segments`` into one, dropping ``dead`` vectors (under the lock)."""
        if not segments:
            return
        parts, gone, tail_upto = self._parts(segments, dead)
        n = sum(int(ids.size) for _, ids in parts)
        logger.info(
            "merging %d segments of %s: %d vectors kept, %d dropped",
            len(segments), self.path, n, gone.size,
        )  # fmt: skip
        dim = segments[0].index.dim
        merged = merge_indexes(parts, self._segment_kind(n), self.params, dim)
        self._commit(
            drop_segments=[s.id for s in segments if s.id != _TAIL_ID],
            add_segment=merged,
            undead=gone.tolist(),
            tail_upto=tail_upto,
        )

    def _maintain(self) -> None:
        """Merge what must not wait, under the write lock already held.

        That is: the segments holding erased vectors once those pass ``compact_threshold``, and
        any full tier of segment files whose merge stays within ``_INLINE_MERGE_MAX`` vectors.
        A larger full tier is merged in a background thread with ``background_merges``.
        """
        dead = self._dead()
        if dead.size and dead.size > self.compact_threshold * self.vectors:
            holding = [s for s in self._segments if np.isin(s.ids, dead).any()]
            self._merge_commit(holding, dead)
        while True:
            tiers: dict[int, list[_Segment]] = {}
            for seg in self._segments:
                if seg.id != _TAIL_ID:
                    tiers.setdefault(_tier(seg.index.ntotal), []).append(seg)
            full = sorted(t for t, segs in tiers.items() if len(segs) >= _FANOUT)
            small = [t for t in full if sum(s.index.ntotal for s in tiers[t]) <= _INLINE_MERGE_MAX]
            if small:
                self._merge_commit(tiers[small[0]], self._dead())
                continue
            if full and self.background_merges:
                self._start_background_merge([s.id for s in tiers[full[0]]])
            return

    def _start_background_merge(self, seg_ids: list[int]) -> None:
        if self._merger is not None and self._merger.is_alive():
            return  # one at a time; the next write after it looks again
        # Not a daemon: the interpreter waits for a merge in progress before it exits.
        self._merger = threading.Thread(
            target=self._background_merge, args=(seg_ids,), name="knowledge-merge"
        )
        self._merger.start()

    def _background_merge(self, seg_ids: list[int]) -> None:
        """Merge segment files without the write lock, then commit under it."""
        try:
            with self._mutex:
                segments = [s for s in self._segments if s.id in seg_ids]
                if len(segments) != len(seg_ids):
                    return
                parts, gone, _ = self._parts(segments, self._dead())
            n = sum(int(ids.size) for _, ids in parts)
            dim = segments[0].index.dim
            merged = merge_indexes(parts, self._segment_kind(n), self.params, dim)
            with self._mutex, self.locked():
                self.refresh()
                if not set(seg_ids) <= {s.id for s in self._segments}:
                    return  # merged by someone else meanwhile
                self._commit(drop_segments=seg_ids, add_segment=merged, undead=gone.tolist())
            logger.info("merged %d segments of %s in the background", len(seg_ids), self.path)
        except Exception:  # a failed merge changes nothing; the next one tries again
            logger.warning("background merge of %s failed", self.path, exc_info=True)

    def compact(self, *, drop_history_before: TimeLike | None = None) -> int:
        """Merge every segment and the tail into one of the store's kind; return vectors dropped.

        The new segment is built without the write lock (writers carry on meanwhile; what they
        write stays where they put it) and committed under it.

        Args:
            drop_history_before: First erase versions whose validity ended before this time.
        """
        with self._mutex, self.locked():
            self.refresh()
            self.require_index()
            if drop_history_before is not None:
                ts = to_timestamp(drop_history_before, what="drop_history_before")
                erase = self._fetch_ids(
                    "SELECT vid FROM facts WHERE valid_to IS NOT NULL AND valid_to <= ?", (ts,)
                ).tolist()
                self._commit(erase=erase)
            segments = list(self._segments)
            if not segments:
                return 0
            parts, gone, tail_upto = self._parts(segments, self._dead())
            tail_generation = self._tail_generation
        before = sum(s.index.ntotal for s in segments)
        only = segments[0]
        if len(segments) == 1 and not gone.size and only.kind == self.kind and only.id != _TAIL_ID:
            return 0
        total = sum(int(ids.size) for _, ids in parts)
        dim = segments[0].index.dim
        merged = (
            merge_indexes(parts, self.kind, self.params, dim)
            if total
            else VectorIndex("flat", dim, self.params)
        )
        with self._mutex, self.locked():
            self.refresh()
            present = {s.id for s in self._segments}
            files = [s.id for s in segments if s.id != _TAIL_ID]
            if tail_generation != self._tail_generation or not all(i in present for i in files):
                msg = (
                    f"another process merged segments of {self.path} while this compaction ran; "
                    "run `understudy kb compact` again"
                )
                raise KnowledgeStoreError(msg)
            self._commit(
                drop_segments=files, add_segment=merged, undead=gone.tolist(), tail_upto=tail_upto
            )
        return before - merged.ntotal

    def rebuild(
        self,
        embed: Callable[[list[str]], FloatArray],
        *,
        kind: IndexKind | None,
        embedding: str,
        batch_size: int,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Re-embed every stored version into one new segment; return the number of vectors.

        Args:
            embed: Embeds a batch of texts into unit vectors.
            kind: New index kind (``None`` keeps the store's).
            embedding: Name of the embeddings, recorded in the store.
            batch_size: Texts per call to ``embed``.
            on_progress: Called with the number of texts embedded after each batch.
        """
        if kind is not None and kind not in INDEX_KINDS:
            msg = f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}"
            raise ConfigError(msg)
        with self._mutex, self.locked():
            self.refresh()
            rows = self._con.execute("SELECT vid, text FROM facts ORDER BY vid").fetchall()
            kind = kind or self.kind
            first: dict[str, int] = {}
            for i, (_, text) in enumerate(rows):
                first.setdefault(sha256_text(text), i)
            by_hash: dict[str, FloatArray] = {}
            unique = list(first)
            for batch in chunks(unique, batch_size):
                out = embed([rows[first[h]][1] for h in batch])
                by_hash.update(zip(batch, out, strict=True))
                if on_progress is not None:
                    on_progress(len(batch))
            new: VectorIndex | None = None
            extra = {"index_kind": kind, "embedding": embedding}
            if rows:
                vids = np.array([r[0] for r in rows], dtype=np.int64)
                vecs = np.stack([by_hash[sha256_text(t)] for _, t in rows])
                new = VectorIndex(kind if len(rows) >= _FLAT_BELOW else "flat", vecs.shape[1],
                                  self.params)  # fmt: skip
                new.add(vecs, vids)
                extra["dim"] = str(new.dim)
            self.kind = kind
            self._load_index_enabled = True
            self._segments = []
            listed = [r[0] for r in self._con.execute("SELECT id FROM segments")]
            self._commit(
                drop_segments=listed,
                add_segment=new if new is not None else VectorIndex("flat", 1, self.params),
                undead=None,
                tail_upto=2**62,
                extra_meta=extra,
            )
            self.refresh(force=True)
            return new.ntotal if new is not None else 0

    def delete(self, keys: Sequence[str], *, purge: bool) -> None:
        """Delete the current versions of ``keys`` (``purge``: every version)."""
        with self._mutex, self.locked():
            self.refresh()
            self.require_index()
            now = time.time()
            closes: list[tuple[float, int]] = []
            erase: list[int] = []
            for chunk in chunks(sorted(set(keys))):
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
                self._maintain()


def _unlink_all(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
