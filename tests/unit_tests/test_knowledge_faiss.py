"""The FAISS layer, pinned against a brute-force numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from langchain_understudy.errors import KnowledgeStoreError
from langchain_understudy.retrieval._faiss import (
    INDEX_KINDS,
    IdSet,
    IndexParams,
    VectorIndex,
    normalize,
)


def _data(n: int = 6000, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return normalize(rng.standard_normal((n, d))), (np.arange(n, dtype=np.int64) * 3 + 11)


def _brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None):
    scores = x @ q
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[np.isfinite(scores[order])]
    return ids[order], scores[order]


def test_normalize_makes_unit_rows_and_keeps_zero_rows() -> None:
    out = normalize([[3.0, 4.0], [0.0, 0.0]])
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    with pytest.raises(KnowledgeStoreError, match="2 dimensions but this knowledge store holds 3"):
        normalize([[1.0, 2.0]], dim=3)
    with pytest.raises(KnowledgeStoreError, match="NaN"):
        normalize([[float("nan"), 1.0]])


def test_flat_search_equals_brute_force_with_and_without_subsets() -> None:
    x, ids = _data()
    vi = VectorIndex("flat", x.shape[1], IndexParams())
    vi.add(x, ids)
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = normalize(rng.standard_normal(x.shape[1]))[0]
        got_ids, got_scores = vi.search(q, 10)
        want_ids, want_scores = _brute(x, ids, q, 10)
        assert got_ids.tolist() == want_ids.tolist()
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5)
        for frac in (0.002, 0.9):  # the exact-subset path and the selector path
            mask = rng.random(len(ids)) < frac
            got_ids, _ = vi.search(q, 10, IdSet(ids[mask]))
            want_ids, _ = _brute(x, ids, q, 10, mask)
            assert got_ids.tolist() == want_ids.tolist()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_neighbours_and_always_fill_k(kind: str) -> None:
    x, ids = _data(4000)
    vi = VectorIndex(kind, x.shape[1], IndexParams())  # type: ignore[arg-type]
    vi.add(x, ids)
    rng = np.random.default_rng(2)
    hits = 0
    for i in rng.choice(len(x), 20, replace=False):
        got, _ = vi.search(x[i], 10)
        assert len(got) == 10 and got[0] == ids[i]
        hits += len(set(got.tolist()) & set(_brute(x, ids, x[i], 10)[0].tolist()))
    assert hits / 200 >= 0.75
    # A subset of 7 far-away ids: exactly those come back, however poor the ANN would do.
    subset = ids[rng.choice(len(ids), 7, replace=False)]
    got, _ = vi.search(x[0], 5, IdSet(subset))
    assert len(got) == 5 and set(got.tolist()) <= set(subset.tolist())
    got, _ = vi.search(x[0], 50, IdSet(subset))
    assert sorted(got.tolist()) == sorted(subset.tolist())


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_save_load_roundtrip_and_rebuilt(kind: str, tmp_path: Path) -> None:
    x, ids = _data(3000)
    vi = VectorIndex(kind, x.shape[1], IndexParams())
    vi.add(x[:2000], ids[:2000])
    vi.add(x[2000:], ids[2000:])
    size, crc = vi.save(tmp_path / "i.faiss")
    back = VectorIndex.load(tmp_path / "i.faiss", kind, IndexParams(), size=size, crc=crc,
                            rebuild_hint="HINT")  # fmt: skip
    assert back.ntotal == 3000 and back.dim == x.shape[1]
    np.testing.assert_allclose(back.reconstruct(ids[[0, 2999]]), x[[0, 2999]], rtol=1e-6)
    assert back.search(x[5], 3)[0].tolist() == vi.search(x[5], 3)[0].tolist()
    smaller = back.rebuilt(ids[::2])
    assert smaller.ntotal == 1500 and set(smaller.ids().tolist()) == set(ids[::2].tolist())
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_rejects_damaged_and_foreign_files(tmp_path: Path) -> None:
    x, ids = _data(200)
    vi = VectorIndex("flat", x.shape[1], IndexParams())
    vi.add(x, ids)
    path = tmp_path / "i.faiss"
    size, crc = vi.save(path)

    def load(kind: str = "flat") -> VectorIndex:
        return VectorIndex.load(path, kind, IndexParams(), size=size, crc=crc,  # type: ignore[arg-type]
                                rebuild_hint="run kb rebuild")  # fmt: skip

    with pytest.raises(KnowledgeStoreError, match="not the 'hnsw' index.*run kb rebuild"):
        load("hnsw")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(KnowledgeStoreError, match="checksum.*run kb rebuild"):
        load()
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(KnowledgeStoreError, match="truncated"):
        load()
    path.write_text("hello, I am a text file")
    with pytest.raises(KnowledgeStoreError, match="not a FAISS index"):
        load()
