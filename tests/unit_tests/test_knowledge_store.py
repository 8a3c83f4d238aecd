"""KnowledgeStore with fake embeddings: upsert, history, time travel, filters, persistence, errors."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

import langchain_understudy.retrieval as retrieval
from langchain_understudy.errors import ConfigError, KnowledgeStoreError
from langchain_understudy.retrieval import KnowledgeStore

KINDS = ["flat", "hnsw", "ivf"]


class CountingEmbeddings(Embeddings):
    """Deterministic random unit-ish vectors per text; counts what it embeds."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.texts = 0

    def vector(self, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.size).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.texts += len(texts)
        return [self.vector(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.vector(text)


@pytest.fixture
def emb() -> CountingEmbeddings:
    return CountingEmbeddings()


@pytest.fixture
def store(tmp_path: Path, emb: CountingEmbeddings) -> KnowledgeStore:
    return KnowledgeStore(tmp_path / "kb", emb)


def test_public_names_are_pinned() -> None:
    assert retrieval.__all__ == [
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
    from langchain_core.vectorstores import VectorStore

    assert issubclass(KnowledgeStore, VectorStore)


@pytest.mark.parametrize("kind", KINDS)
def test_every_fact_finds_itself(tmp_path: Path, emb: CountingEmbeddings, kind: str) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, index=kind)  # type: ignore[arg-type]
    texts = [f"fact number {i}" for i in range(300)]
    ids = store.add_texts(texts, ids=[f"k{i}" for i in range(300)])
    assert ids == [f"k{i}" for i in range(300)]
    for i in range(0, 300, 37):
        (doc, score), *_ = store.similarity_search_with_score(texts[i], k=3)
        assert doc.id == f"k{i}" and doc.page_content == texts[i]
        assert score == pytest.approx(1.0, abs=1e-5)


def test_upsert_replaces_without_orphans_or_duplicates(store: KnowledgeStore) -> None:
    store.add_texts(["Pro costs $20", "Basic is free"], ids=["pro", "basic"])
    result = store.upsert(["Pro costs $25"], ids=["pro"])
    assert (result.added, result.replaced, result.unchanged) == (0, 1, 0)
    assert len(store) == 2
    docs = store.similarity_search("Pro costs $20", k=10)
    assert sorted(d.id for d in docs) == ["basic", "pro"]  # the old version is not current
    assert store.get_by_ids(["pro"])[0].page_content == "Pro costs $25"
    stats = store.stats()
    assert (stats.facts, stats.versions, stats.vectors) == (2, 3, 3)
    assert [v.text for v in store.history("pro")] == ["Pro costs $20", "Pro costs $25"]


def test_writing_the_same_fact_again_changes_nothing(
    store: KnowledgeStore, emb: CountingEmbeddings
) -> None:
    store.add_texts(["a", "b"], [{"x": 1}, {"x": 2}], ids=["1", "2"])
    before = (emb.texts, replace(store.stats(), disk_bytes=0), store._engine.revision)
    result = store.upsert(["a", "b"], [{"x": 1}, {"x": 2}], ids=["1", "2"])
    assert (result.unchanged, result.added, result.replaced) == (2, 0, 0)
    assert (emb.texts, replace(store.stats(), disk_bytes=0), store._engine.revision) == before
    # New metadata is a new version, but the text's vector comes from the cache.
    result = store.upsert(["a"], [{"x": 3}], ids=["1"])
    assert result.replaced == 1 and emb.texts == before[0]
    store.add_texts(["b"], ids=["copy-of-b"])
    assert emb.texts == before[0]


def test_duplicate_keys_in_one_write_keep_the_last(store: KnowledgeStore) -> None:
    result = store.upsert(["one", "two", "three"], ids=["k", "k", "k"])
    assert result.statuses == ["added", "replaced", "replaced"]
    assert [d.page_content for d in store.similarity_search("one", k=5)] == ["three"]
    assert [v.text for v in store.history("k")] == ["one", "two", "three"]


def test_as_of_time_travel(store: KnowledgeStore) -> None:
    store.add_texts(["Pro costs $20"], [{"as_of": "2024-01-01"}], ids=["pro"])
    store.add_texts(["Pro costs $25"], [{"as_of": datetime(2024, 6, 1)}], ids=["pro"])
    store.add_texts(["Team costs $50"], [{"as_of": "2024-03-01T00:00:00+02:00"}], ids=["team"])

    def at(t: Any) -> list[str]:
        return sorted(d.page_content for d in store.similarity_search("price", k=10, as_of=t))

    assert at("2023-12-31") == []
    assert at("2024-02-01") == ["Pro costs $20"]
    assert at(datetime(2024, 3, 1, tzinfo=UTC)) == ["Pro costs $20", "Team costs $50"]
    assert at("2024-06-01") == ["Pro costs $25", "Team costs $50"]
    assert at(None) == ["Pro costs $25", "Team costs $50"]
    # metadata comes back as written (datetimes as ISO strings)
    assert store.get_by_ids(["pro"])[0].metadata == {"as_of": "2024-06-01T00:00:00"}
    store.delete(["team"])
    assert at(None) == ["Pro costs $25"]
    assert at("2024-07-01") == ["Pro costs $25", "Team costs $50"]  # deleted later than that
    assert at(datetime.now(UTC) + timedelta(seconds=5)) == ["Pro costs $25"]
    hits = store.similarity_search_with_score("Pro costs $20", k=1, as_of="2024-05-31")
    assert hits[0][0].page_content == "Pro costs $20" and hits[0][1] == pytest.approx(1.0)


def test_history_never_leaks_into_the_current_view(store: KnowledgeStore) -> None:
    for i in range(30):
        store.add_texts([f"version {i}"], ids=["k"])
    store.add_texts([f"other {i}" for i in range(5)])
    docs = store.similarity_search("version 3", k=10)
    assert [d.id for d in docs].count("k") == 1
    assert len(docs) == 6
    assert store.similarity_search("version 3", k=1, filter={"as_of": {"$gte": "2000-01-01"}})


def test_delete(store: KnowledgeStore) -> None:
    store.add_texts(["a", "b", "c"], ids=["1", "2", "3"])
    assert store.delete(["1", "missing"]) is True
    assert store.delete([]) is True
    assert sorted(d.id or "" for d in store.similarity_search("a", k=5)) == ["2", "3"]
    assert store.get_by_ids(["1", "2"]) == [Document(id="2", page_content="b", metadata={})]
    with pytest.raises(ConfigError, match="pass the keys to delete"):
        store.delete(None)
    store.add_texts(["a again"], ids=["1"])
    assert [v.version for v in store.history("1")] == [1, 2]


def test_purge_erases_history_and_compacts(tmp_path: Path, emb: CountingEmbeddings) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, compact_threshold=0.25)
    store.add_texts([f"t{i}" for i in range(8)], ids=[f"k{i}" for i in range(8)])
    store.add_texts(["t0 v2"], ids=["k0"])
    store.delete(["k0", "k1"], purge=True)
    assert store.history("k0") == []
    stats = store.stats()
    # 3 of 9 vectors erased (> 25%): compacted away in the same write
    assert (stats.vectors, stats.dead_vectors, stats.versions) == (6, 0, 6)
    assert store.similarity_search("t0", k=10, as_of=datetime.now(UTC)) != []
    assert "k0" not in {d.id for d in store.similarity_search("t0", k=10, as_of="2100-01-01")}
    store.delete(["k2"], purge=True)  # 1 of 6: below the threshold, waits for compaction
    assert store.stats().dead_vectors == 1
    assert store.compact() == 1
    assert store.stats().vectors == 5


def test_compact_can_drop_old_history(store: KnowledgeStore) -> None:
    store.add_texts(["old"], [{"as_of": "2020-01-01"}], ids=["k"])
    store.add_texts(["new"], [{"as_of": "2021-01-01"}], ids=["k"])
    assert store.similarity_search("old", k=1, as_of="2020-06-01")[0].page_content == "old"
    assert store.compact(drop_history_before="2022-01-01") == 1
    assert store.similarity_search("old", k=1, as_of="2020-06-01") == []
    assert [v.text for v in store.history("k")] == ["new"]


def test_without_history_replaced_versions_are_erased(
    tmp_path: Path, emb: CountingEmbeddings
) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, keep_history=False)
    for i in range(10):
        store.add_texts([f"v{i}"], [{"as_of": f"2024-01-{i + 1:02d}"}], ids=["k"])
    assert [v.text for v in store.history("k")] == ["v9"]
    assert store.similarity_search("v1", k=5, as_of="2024-01-03") == []
    assert store.stats().vectors <= 2  # compaction keeps erased vectors below a quarter


@pytest.mark.parametrize("kind", KINDS)
def test_filters_run_inside_the_search(tmp_path: Path, emb: CountingEmbeddings, kind: str) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, index=kind, hnsw_m=16, ef_construction=40)  # type: ignore[arg-type]
    n = 6000
    metas = [{"tier": "gold" if i % 1000 == 7 else "plain", "n": i} for i in range(n)]
    store.add_embeddings(
        [(f"fact {i}", emb.vector(f"fact {i}")) for i in range(n)],
        metas,
        ids=[str(i) for i in range(n)],
    )
    # Rare matches (6 of 6000), none near the query: all of them still come back.
    docs = store.similarity_search("fact 1", k=5, filter={"tier": "gold"})
    assert len(docs) == 5 and all(d.metadata["tier"] == "gold" for d in docs)
    assert len(store.similarity_search("fact 1", k=50, filter={"tier": "gold"})) == 6
    # Broad matches (5000 of 6000): the selector path, still exact for flat.
    flt = {"n": {"$lt": 5000}}
    got = store.similarity_search_with_score("fact 1", k=10, filter=flt)
    assert len(got) == 10 and all(d.metadata["n"] < 5000 for d, _ in got)
    if kind == "flat":
        q = np.array(emb.vector("fact 1"))
        q /= np.linalg.norm(q)
        vecs = np.array([emb.vector(f"fact {i}") for i in range(5000)])
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        want = np.argsort(-(vecs @ q))[:10]
        assert [d.id for d, _ in got] == [str(i) for i in want]
    # $in, $or, callables
    docs = store.similarity_search("fact 1", k=3, filter={"n": {"$in": [3, 4, 5999]}})
    assert sorted(d.id or "" for d in docs) == ["3", "4", "5999"]
    docs = store.similarity_search("x", k=4, filter={"$or": [{"n": 1}, {"n": 2}]})
    assert sorted(d.id or "" for d in docs) == ["1", "2"]
    docs = store.similarity_search("x", k=4, filter=lambda md: md["n"] in (10, 20))
    assert sorted(d.id or "" for d in docs) == ["10", "20"]


def test_filter_on_as_of_ranges(store: KnowledgeStore) -> None:
    days = [f"2024-01-{d:02d}" for d in range(1, 11)]
    store.add_texts([f"day {d}" for d in days], [{"as_of": d} for d in days], ids=days)
    docs = store.similarity_search(
        "day", k=10, filter={"as_of": {"$gte": "2024-01-04", "$lt": "2024-01-07"}}
    )
    assert sorted(d.id or "" for d in docs) == days[3:6]


def test_relevance_scores_are_in_unit_interval_and_ordered(store: KnowledgeStore) -> None:
    store.add_texts([f"text {i}" for i in range(40)])
    store.add_embeddings([("opposite", [-x for x in CountingEmbeddings().vector("text 0")])])
    hits = store.similarity_search_with_relevance_scores("text 0", k=41)
    scores = [s for _, s in hits]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(1.0) and scores[-1] == pytest.approx(0.0, abs=1e-6)
    cosines = [s for _, s in store.similarity_search_with_score("text 0", k=41)]
    np.testing.assert_allclose(scores, [(1 + c) / 2 for c in cosines], rtol=1e-6)
    above = store.similarity_search_with_relevance_scores("text 0", k=41, score_threshold=0.6)
    assert 1 <= len(above) < 41


def test_max_marginal_relevance_prefers_diversity(
    store: KnowledgeStore, emb: CountingEmbeddings
) -> None:
    base = np.array(emb.vector("topic"))
    near = [(f"near {i}", (base + 0.01 * np.random.default_rng(i).standard_normal(16)).tolist())
            for i in range(5)]  # fmt: skip
    store.add_embeddings([*near, ("topic", base.tolist()), ("elsewhere", emb.vector("x"))])
    plain = store.similarity_search("topic", k=2)
    mmr = store.max_marginal_relevance_search("topic", k=2, fetch_k=7, lambda_mult=0.1)
    assert plain[1].page_content.startswith("near")
    assert mmr[0].page_content == "topic" and mmr[1].page_content == "elsewhere"
    assert store.max_marginal_relevance_search("topic", k=3, filter={"nope": 1}) == []


@pytest.mark.parametrize("kind", KINDS)
def test_reopening_gives_the_same_results(
    tmp_path: Path, emb: CountingEmbeddings, kind: str
) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, index=kind)  # type: ignore[arg-type]
    store.add_texts([f"t{i}" for i in range(200)], [{"i": i} for i in range(200)])
    store.add_texts(["t5 changed"], ids=[store.similarity_search("t5", k=1)[0].id or ""])
    queries = ["t1", "t5", "t77", "zzz"]
    before = [store.similarity_search_with_score(q, k=5) for q in queries]
    store.close()
    again = KnowledgeStore(tmp_path / "kb", emb)
    assert [again.similarity_search_with_score(q, k=5) for q in queries] == before
    assert again.stats().index == kind
    with pytest.raises(ConfigError, match="kb rebuild --index"):
        KnowledgeStore(tmp_path / "kb", emb, index="flat" if kind != "flat" else "hnsw")


def test_instances_see_each_others_writes(tmp_path: Path, emb: CountingEmbeddings) -> None:
    a = KnowledgeStore(tmp_path / "kb", emb)
    b = KnowledgeStore(tmp_path / "kb", emb)
    a.add_texts(["from a"], ids=["a"])
    assert b.get_by_ids(["a"]) and b.similarity_search("from a", k=1)[0].id == "a"
    b.add_texts(["from b"], ids=["b"])
    a.delete(["a"])
    assert [d.id for d in b.similarity_search("from a", k=5)] == ["b"]
    assert b.stats().versions == 2


def test_embedding_cache_survives_reopen(tmp_path: Path) -> None:
    emb = CountingEmbeddings()
    KnowledgeStore(tmp_path / "kb", emb).add_texts(["same text"], ids=["x"])
    emb2 = CountingEmbeddings()
    KnowledgeStore(tmp_path / "kb", emb2).add_texts(["same text"], ids=["y"])
    assert emb2.texts == 0


def test_store_refuses_other_embeddings(tmp_path: Path, emb: CountingEmbeddings) -> None:
    KnowledgeStore(tmp_path / "kb", emb).add_texts(["hello"])
    other = KnowledgeStore(tmp_path / "kb", CountingEmbeddings(size=8))
    with pytest.raises(KnowledgeStoreError, match=r"built with embeddings .*kb rebuild"):
        other.similarity_search("hello")
    with pytest.raises(KnowledgeStoreError, match="8 dimensions .* 16-dimensional"):
        other.similarity_search_by_vector([0.1] * 8)


def test_rebuild_switches_embeddings_and_index_kind(
    tmp_path: Path, emb: CountingEmbeddings
) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb)
    store.add_texts(["a", "b"], ids=["1", "2"])
    store.add_texts(["a2"], [{"as_of": "2030-01-01"}], ids=["1"])
    other = CountingEmbeddings(size=8)
    moved = KnowledgeStore(tmp_path / "kb", other, load_index=False)
    assert moved.rebuild(index="hnsw") == 3
    assert other.texts == 3
    again = KnowledgeStore(tmp_path / "kb", CountingEmbeddings(size=8))
    assert again.stats().index == "hnsw" and again.stats().dim == 8
    assert again.similarity_search("a2", k=1)[0].id == "1"
    assert again.similarity_search("a", k=1, as_of="2029-01-01")[0].page_content == "a"


def test_damaged_index_says_how_to_rebuild(tmp_path: Path, emb: CountingEmbeddings) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb)
    store.add_texts(["a", "b"], ids=["1", "2"])
    store.compact()  # from the tail in SQLite to a segment file
    (index_file,) = (tmp_path / "kb").glob("seg-*.faiss")
    data = bytearray(index_file.read_bytes())
    data[-20] ^= 0x55
    index_file.write_bytes(bytes(data))
    with pytest.raises(KnowledgeStoreError, match="checksum.*understudy kb rebuild --store"):
        KnowledgeStore(tmp_path / "kb", emb)
    index_file.unlink()
    with pytest.raises(KnowledgeStoreError, match="missing.*understudy kb rebuild"):
        KnowledgeStore(tmp_path / "kb", emb)
    broken = KnowledgeStore(tmp_path / "kb", emb, load_index=False)
    with pytest.raises(KnowledgeStoreError, match="rebuild"):
        broken.add_texts(["c"])
    assert broken.rebuild() == 2
    assert KnowledgeStore(tmp_path / "kb", emb).similarity_search("b", k=1)[0].id == "2"


def test_foreign_files_are_refused_clearly(tmp_path: Path, emb: CountingEmbeddings) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KnowledgeStoreError, match="is a file"):
        KnowledgeStore(tmp_path / "file", emb)
    with pytest.raises(KnowledgeStoreError, match="no knowledge store at"):
        KnowledgeStore(tmp_path / "absent", emb, create=False)
    assert not (tmp_path / "absent").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "knowledge.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(KnowledgeStoreError, match="not a knowledge store database.*kb ingest"):
        KnowledgeStore(tmp_path / "junk", emb)
    (tmp_path / "other").mkdir()
    con = sqlite3.connect(tmp_path / "other" / "knowledge.sqlite")
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(KnowledgeStoreError, match="not a knowledge store database"):
        KnowledgeStore(tmp_path / "other", emb)


def test_bad_inputs_say_what_is_accepted(store: KnowledgeStore) -> None:
    with pytest.raises(ConfigError, match="ISO-8601"):
        store.add_texts(["x"], [{"as_of": "yesterday"}])
    with pytest.raises(ConfigError, match="cannot be stored as JSON"):
        store.add_texts(["x"], [{"obj": object()}])
    with pytest.raises(ConfigError, match="one per text"):
        store.add_texts(["x", "y"], [{}])
    with pytest.raises(ConfigError, match="unexpected argument"):
        store.similarity_search("x", asof="2024-01-01")
    with pytest.raises(ConfigError, match="index must be one of"):
        KnowledgeStore(store.path, index="annoy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs path="):
        KnowledgeStore.from_texts(["x"], CountingEmbeddings())
    assert len(store) == 0


def test_from_texts_and_retriever(tmp_path: Path, emb: CountingEmbeddings) -> None:
    store = KnowledgeStore.from_texts(
        ["old price", "other"], emb, [{"as_of": "2024-01-01"}, {}], ids=["p", "o"],
        path=tmp_path / "kb",
    )  # fmt: skip
    store.add_texts(["new price"], [{"as_of": "2024-06-01"}], ids=["p"])
    retriever = store.as_retriever(search_kwargs={"k": 1, "as_of": "2024-03-01"})
    assert retriever.invoke("new price")[0].page_content == "old price"
    assert (
        store.as_retriever(search_kwargs={"k": 1}).invoke("new price")[0].page_content
        == "new price"
    )


def test_replace_sources_retires_what_a_source_no_longer_has(store: KnowledgeStore) -> None:
    store.add_texts(["a", "b", "c"], [{"source": "f"}] * 3, ids=["f#0", "f#1", "f#2"])
    store.add_texts(["x"], [{"source": "g"}], ids=["g#0"])
    result = store.upsert(["a"], [{"source": "f"}], ids=["f#0"], replace_sources=["f"])
    assert (result.unchanged, result.retired, result.retired_by_source) == (1, 2, {"f": 2})
    assert sorted(d.id or "" for d in store.similarity_search("a", k=10)) == ["f#0", "g#0"]


async def test_async_api(store: KnowledgeStore) -> None:
    ids = await store.aadd_texts(["old"], [{"as_of": "2024-01-01"}], ids=["k"])
    await store.aadd_documents(
        [Document(page_content="new", metadata={"as_of": "2024-02-01"}, id="k")]
    )
    assert ids == ["k"]
    assert (await store.asimilarity_search("x", k=1))[0].page_content == "new"
    old = await store.asimilarity_search("x", k=1, as_of="2024-01-15")
    assert old[0].page_content == "old"
    scored = await store.asimilarity_search_with_relevance_scores("new", k=1)
    assert scored[0][1] == pytest.approx(1.0)
    assert (await store.amax_marginal_relevance_search("new", k=1))[0].id == "k"
    assert (await store.aget_by_ids(["k"]))[0].page_content == "new"
    await store.adelete(["k"])
    assert await store.asimilarity_search("x", k=1) == []


def test_ivf_segments_get_cells_for_their_size(tmp_path: Path, emb: CountingEmbeddings) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, index="ivf")
    store.add_texts([f"a{i}" for i in range(50)])
    assert [(s.kind, s.vectors) for s in store.segments()] == [("flat", 50)]  # the tail
    store.add_texts([f"b{i}" for i in range(3000)])  # tail + this write: one IVF segment
    store.add_texts([f"c{i}" for i in range(10)])
    large, tail = store._engine._segments
    assert (large.index.kind, large.index.ntotal, tail.index.ntotal) == ("ivf", 3050, 10)
    assert large.index.nlist is not None and large.index.nlist >= 70
    for text in ("a17", "b17", "c7"):
        assert store.similarity_search(text, k=1)[0].page_content == text
    assert len(store.similarity_search("b17", k=40)) == 40
    assert store.compact() == 0
    (merged,) = store._engine._segments
    assert merged.index.kind == "ivf" and merged.index.ntotal == 3060
    assert store.similarity_search("c7", k=1)[0].page_content == "c7"


def _format_1_store(path: Path, emb: CountingEmbeddings, texts: list[str]) -> None:
    """Write a store as format 1 wrote it: one index file, named by its generation."""
    import zlib

    from langchain_understudy.retrieval._faiss import faiss, normalize
    from langchain_understudy.retrieval.embeddings import embeddings_name

    path.mkdir()
    con = sqlite3.connect(path / "knowledge.sqlite")
    con.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
    con.execute(
        "CREATE TABLE facts (vid INTEGER PRIMARY KEY, key TEXT NOT NULL, version INTEGER NOT "
        "NULL, valid_from REAL NOT NULL, valid_to REAL, written_at REAL NOT NULL, text TEXT NOT "
        "NULL, metadata TEXT NOT NULL, content_hash TEXT NOT NULL)"
    )
    con.execute("CREATE TABLE dead (vid INTEGER PRIMARY KEY)")
    rows = [
        (i + 1, f"k{i}", 1, 1.7e9, None, 1.7e9, t, "{}", hashlib.sha256(t.encode()).hexdigest())
        for i, t in enumerate(texts)
    ]
    con.executemany("INSERT INTO facts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.size))
    vectors = normalize(emb.embed_documents(texts))
    index.add_with_ids(vectors, np.arange(1, len(texts) + 1, dtype=np.int64))
    data = faiss.serialize_index(index)
    (path / "index-00000003.faiss").write_bytes(data.tobytes())
    meta = {
        "format": "langchain-understudy knowledge store",
        "format_version": "1",
        "created_at": "1700000000",
        "index_kind": "flat",
        "dim": str(emb.size),
        "embedding": embeddings_name(emb),
        "generation": "3",
        "revision": "7",
        "next_vid": str(len(texts) + 1),
        "index_size": str(data.size),
        "index_crc": str(zlib.crc32(data.tobytes())),
    }
    con.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    con.commit()
    con.close()


def test_stores_of_format_1_open_and_upgrade_in_place(
    tmp_path: Path, emb: CountingEmbeddings
) -> None:
    texts = [f"old fact {i}" for i in range(20)]
    _format_1_store(tmp_path / "kb", emb, texts)
    store = KnowledgeStore(tmp_path / "kb", emb)
    assert store.similarity_search("old fact 7", k=1)[0].id == "k7"
    assert len(store) == 20 and store.stats().vectors == 20
    assert [s.file for s in store.segments()] == ["index-00000003.faiss"]  # not rewritten
    store.add_texts(["old fact 7, revised"], ids=["k7"])
    assert store.similarity_search("old fact 7, revised", k=1)[0].page_content.endswith("revised")
    assert [v.version for v in store.history("k7")] == [1, 2]
    store.compact()
    assert not list((tmp_path / "kb").glob("index-*.faiss"))
    again = KnowledgeStore(tmp_path / "kb", emb)
    assert again.similarity_search("old fact 3", k=1)[0].id == "k3"
    assert again._engine.meta()["format_version"] == "2"


def test_a_newer_format_is_refused_clearly(tmp_path: Path, emb: CountingEmbeddings) -> None:
    KnowledgeStore(tmp_path / "kb", emb).add_texts(["x"])
    con = sqlite3.connect(tmp_path / "kb" / "knowledge.sqlite")
    con.execute("UPDATE meta SET value = '9' WHERE name = 'format_version'")
    con.commit()
    con.close()
    with pytest.raises(KnowledgeStoreError, match="format version '9'.*upgrade the package"):
        KnowledgeStore(tmp_path / "kb", emb)


def test_small_writes_go_to_the_tail_and_large_ones_to_segments(
    tmp_path: Path, emb: CountingEmbeddings
) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb, index="hnsw")
    store.add_texts([f"bulk {i}" for i in range(1500)], ids=[f"b{i}" for i in range(1500)])
    (bulk,) = store.segments()
    assert (bulk.kind, bulk.vectors) == ("hnsw", 1500)
    between = datetime.now(UTC)
    mtime = (tmp_path / "kb" / bulk.file).stat().st_mtime_ns
    for i in range(8):  # single-fact writes: rows and vector in SQLite, no file written
        store.add_texts([f"single {i}"], ids=[f"s{i}"])
    store.add_texts(["single 8"], ids=["b3"])
    segs = store.segments()
    assert [(s.kind, s.vectors, s.current) for s in segs] == [("hnsw", 1500, 1499),
                                                             ("flat", 9, 9)]  # fmt: skip
    assert segs[1].file.endswith("(tail)") and len(list((tmp_path / "kb").glob("*.faiss"))) == 1
    assert (tmp_path / "kb" / bulk.file).stat().st_mtime_ns == mtime
    other = KnowledgeStore(tmp_path / "kb", emb)  # another reader sees the tail too
    for reader in (store, other):
        for key, text in (("s3", "single 3"), ("b3", "single 8"), ("b5", "bulk 5")):
            (doc, score), *_ = reader.similarity_search_with_score(text, k=2)
            assert doc.id == key and score == pytest.approx(1.0, abs=1e-5)
    past = store.similarity_search("bulk 3", k=1, as_of=between)
    assert [d.page_content for d in past] == ["bulk 3"]  # the replaced version, in the segment
    assert store.compact() == 0  # nothing erased: history stays, all in one segment
    (one,) = store.segments()
    assert (one.kind, one.vectors, one.current) == ("hnsw", 1509, 1508)
    assert other.similarity_search("single 8", k=1)[0].id == "b3"
    assert store.history("b3")[0].text == "bulk 3"


def test_segments_of_one_size_merge(tmp_path: Path, emb: CountingEmbeddings) -> None:
    store = KnowledgeStore(tmp_path / "kb", emb)
    for r in range(8):  # each write overflows the tail: one segment file each
        store.add_texts([f"r{r} t{i}" for i in range(1100)])
        assert len(store.segments()) == (r + 1 if r < 7 else 1)
    (merged,) = store.segments()
    assert merged.vectors == 8800 and store.stats().segments == 1
    assert store.similarity_search("r3 t5", k=1)[0].page_content == "r3 t5"


def test_a_reader_far_behind_reloads_what_the_log_no_longer_holds(
    tmp_path: Path, emb: CountingEmbeddings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_understudy.retrieval import _engine

    monkeypatch.setattr(_engine, "_RETIRED_LOG", 2)  # keep only the last few revisions' log
    writer = KnowledgeStore(tmp_path / "kb", emb)
    writer.add_texts([f"fact {i}" for i in range(10)], ids=[f"k{i}" for i in range(10)])
    reader = KnowledgeStore(tmp_path / "kb", emb)
    assert len(reader) == 10
    for i in range(8):  # retire k0..k7, one revision each: the log is trimmed meanwhile
        writer.delete([f"k{i}"])
    assert int(writer._engine.meta()["retired_floor"]) > reader._engine.revision
    assert len(reader) == 2
    assert sorted(d.id or "" for d in reader.similarity_search("fact 1", k=10)) == ["k8", "k9"]
    writer.delete(["k8"])  # caught up: the next change comes from the log
    assert [d.id for d in reader.similarity_search("fact 1", k=10)] == ["k9"]


def test_a_store_opened_without_its_index_refuses_searches(
    tmp_path: Path, emb: CountingEmbeddings
) -> None:
    KnowledgeStore(tmp_path / "kb", emb).add_texts(["only in the tail"], ids=["t"])
    bare = KnowledgeStore(tmp_path / "kb", emb, load_index=False)
    with pytest.raises(KnowledgeStoreError, match="load_index=False; call rebuild"):
        bare.similarity_search("only in the tail")
    assert bare.rebuild() == 1
    assert bare.similarity_search("only in the tail", k=1)[0].id == "t"


def test_large_segments_merge_in_the_background(
    tmp_path: Path, emb: CountingEmbeddings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_understudy.retrieval import _engine

    monkeypatch.setattr(_engine, "_INLINE_MERGE_MAX", 0)  # every merge counts as large here
    quiet = KnowledgeStore(tmp_path / "quiet", emb)
    busy = KnowledgeStore(tmp_path / "busy", emb, background_merges=True)
    for store in (quiet, busy):
        for r in range(8):
            store.add_texts([f"r{r} t{i}" for i in range(1100)])
    assert len(quiet.segments()) == 8  # left for compact()
    merger = busy._engine._merger
    assert merger is not None
    merger.join(timeout=60)
    (merged,) = busy.segments()
    assert merged.vectors == 8800
    assert busy.similarity_search("r6 t5", k=1)[0].page_content == "r6 t5"
    busy.close()
