"""The FAISS side of the knowledge store: id-mapped inner-product indexes over unit vectors.

Every vector carries the int64 id of its SQLite row (``IndexIDMap2``), so an index can hold all
versions of all facts and a search can be restricted to any subset of rows with an id selector.
The storage engine keeps one such index per segment. Files are written with
``faiss.serialize_index`` (never pickle), checked with a CRC32 on load.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss as _faiss_module
import numpy as np
import numpy.typing as npt

from langchain_understudy.errors import KnowledgeStoreError

# FAISS's bundled stubs miss most of its SWIG API (search parameters, selectors, ...).
faiss: Any = _faiss_module

__all__ = [
    "INDEX_KINDS",
    "IdSet",
    "IndexKind",
    "IndexParams",
    "VectorIndex",
    "merge_indexes",
    "normalize",
]

IndexKind = Literal["flat", "hnsw", "ivf"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "hnsw", "ivf")

_MAGIC = b"IxM2"  # FAISS's fourcc for IndexIDMap2
_CHUNK = 65_536  # vectors per block when scanning a subset exactly
_EXACT_MIN = 4_096  # subsets up to this size (or 1/20 of the index) are scanned exactly
# IVF k-means trains on at most this many vectors per cell, for 10 iterations: the centroids are
# as good as with FAISS's default 256 per cell and 25 iterations on clustered text embeddings,
# and a million-vector index trains in minutes instead of most of an hour on two cores.
_IVF_TRAIN_PER_CELL = 40
_IVF_TRAIN_ITERATIONS = 10

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class IndexParams:
    """Build and search parameters of a vector index.

    Attributes:
        hnsw_m: HNSW graph degree (build time; more = better recall, more memory).
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (raised to ``k`` when smaller).
        nlist: IVF cell count; ``None`` picks about ``4 * sqrt(n)`` when the index is trained.
        nprobe: IVF cells visited per query.
    """

    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    nlist: int | None = None
    nprobe: int = 16


def normalize(vectors: Any, dim: int | None = None) -> FloatArray:
    """Return ``vectors`` as a C-contiguous float32 matrix of unit rows (zero rows stay zero)."""
    arr = np.array(vectors, dtype=np.float32, copy=True, ndmin=2, order="C")
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        width = arr.shape[-1] if arr.ndim >= 1 else 0
        msg = (
            f"embedding has {width} dimensions but this knowledge store holds {dim}-dimensional "
            "vectors; use the embeddings the store was built with, or re-embed everything with "
            "`understudy kb rebuild`"
        )
        raise KnowledgeStoreError(msg)
    if not np.all(np.isfinite(arr)):
        msg = "an embedding contains NaN or infinity; check the embedding model's output"
        raise KnowledgeStoreError(msg)
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))[:, None]
    np.divide(arr, norms, out=arr, where=norms > 0)
    return arr


class IdSet:
    """A set of row ids for a filtered search, with its FAISS bitmap built once on demand.

    Args:
        ids: The ids.
        bits: A bitmap (little-endian bit order, bit ``i`` set for id ``i``) to select with
            instead of one built from ``ids``. It may also select ids that are not in ``ids``
            but are absent from the index searched: the storage engine shares one bitmap of
            all current rows between the segments, each with the ids it holds.
        sorted_unique: ``ids`` is sorted without repeats already.
    """

    def __init__(
        self,
        ids: IdArray,
        bits: npt.NDArray[np.uint8] | None = None,
        *,
        sorted_unique: bool = False,
    ) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.ids = ids if sorted_unique else np.unique(ids)
        self._bits = bits

    def __len__(self) -> int:
        return int(self.ids.size)

    def bits(self) -> npt.NDArray[np.uint8]:
        """The selection bitmap (built from ``ids`` on first use unless one was given)."""
        if self._bits is None:
            n = int(self.ids[-1]) + 1 if self.ids.size else 1
            flags = np.zeros(n, dtype=bool)
            flags[self.ids] = True
            self._bits = np.packbits(flags, bitorder="little")
        return self._bits

    def within(self, sorted_ids: IdArray) -> IdSet:
        """Return the members that are also in ``sorted_ids`` (sharing this set's bitmap)."""
        if sorted_ids.size == 0 or self.ids.size == 0:
            return IdSet(np.empty(0, dtype=np.int64), sorted_unique=True)
        pos = np.minimum(np.searchsorted(sorted_ids, self.ids), sorted_ids.size - 1)
        return IdSet(self.ids[sorted_ids[pos] == self.ids], self.bits(), sorted_unique=True)

    def selector(self) -> tuple[Any, npt.NDArray[np.uint8]]:
        """Return an ``IDSelectorBitmap`` and the buffer it points into (keep both alive)."""
        bits = self.bits()
        # FAISS takes the bitmap's length in bytes; ids past it are not selected.
        return faiss.IDSelectorBitmap(bits.size, faiss.swig_ptr(bits)), bits


def auto_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about ``4 * sqrt(n)``, at least 39 training points per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


class VectorIndex:
    """An ``IndexIDMap2`` over a flat, HNSW or IVF inner-product index of unit vectors."""

    def __init__(
        self, kind: IndexKind, dim: int, params: IndexParams, index: Any | None = None
    ) -> None:
        if kind not in INDEX_KINDS:
            msg = f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}"
            raise KnowledgeStoreError(msg)
        self.kind = kind
        self.dim = dim
        self.params = params
        self._index: Any = index
        if index is None and kind != "ivf":  # IVF is built at its first add: it needs training
            self._index = faiss.IndexIDMap2(self._base(0))

    # -- construction ---------------------------------------------------------------------------

    def _base(self, n_total: int) -> Any:
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            base = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = self.params.ef_construction
            return base
        nlist = min(self.params.nlist or auto_nlist(n_total), max(1, n_total))
        quantizer = faiss.IndexFlatIP(self.dim)
        # FAISS's Python layer keeps ``quantizer`` alive as long as the IVF index.
        base = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.cp.max_points_per_centroid = _IVF_TRAIN_PER_CELL
        base.cp.niter = _IVF_TRAIN_ITERATIONS
        return base

    @property
    def ntotal(self) -> int:
        """Vectors held, current or not."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def nlist(self) -> int | None:
        """IVF cell count (``None`` for other kinds or before training)."""
        if self.kind != "ivf" or self._index is None:
            return None
        return int(faiss.extract_index_ivf(self._index.index).nlist)

    def ids(self) -> IdArray:
        """Every id in the index."""
        if self._index is None or self._index.ntotal == 0:
            return np.empty(0, dtype=np.int64)
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def train(self, sample: FloatArray, n_total: int) -> None:
        """Train an IVF index for ``n_total`` vectors on ``sample`` (a no-op for other kinds)."""
        if self._index is not None:
            return
        base = self._base(n_total)
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        cap = _IVF_TRAIN_PER_CELL * int(base.nlist)
        if len(sample) > cap:  # evenly spread, so the sample sees every part of the data
            rows = np.linspace(0, len(sample) - 1, cap).astype(np.int64)
            sample = np.ascontiguousarray(sample[rows])
        base.train(sample)
        base.make_direct_map()  # so stored vectors can be read back (cache, MMR, merges)
        self._index = faiss.IndexIDMap2(base)

    def add(self, vectors: FloatArray, ids: IdArray) -> None:
        """Add unit vectors under the given ids (ids must be new).

        An untrained IVF index trains on these vectors first, with cells for their number.
        """
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self._index is None:
            self.train(vectors, len(vectors))
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def reconstruct(self, ids: IdArray) -> FloatArray:
        """Return the stored vectors of ``ids`` (all must be present)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray(self._index.reconstruct_batch(ids), dtype=np.float32)

    def rebuilt(self, keep: IdArray, kind: IndexKind | None = None) -> VectorIndex:
        """Return a new index holding only the vectors of ``keep`` (compaction, kind change)."""
        keep = np.asarray(keep, dtype=np.int64)
        return merge_indexes([(self, keep)], kind or self.kind, self.params, self.dim)

    # -- search ---------------------------------------------------------------------------------

    def _params(
        self, k: int, sel: Any = None, *, wide: bool = False, params: IndexParams | None = None
    ) -> Any:
        params = params or self.params
        if self.kind == "hnsw":
            ef = max(params.ef_search, k)
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef * 8 if wide else ef)
        if self.kind == "ivf":
            nlist = self.nlist or 1
            nprobe = nlist if wide else min(params.nprobe, nlist)
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(
        self,
        query: FloatArray,
        k: int,
        allowed: IdSet | None = None,
        params: IndexParams | None = None,
    ) -> tuple[IdArray, FloatArray]:
        """Return the ids and inner products of the ``k`` nearest vectors, best first.

        With ``allowed``, only those ids are candidates, and ``min(k, len(allowed))`` results
        come back: small subsets are scanned exactly, large ones go through FAISS with an id
        selector, and an approximate search that comes back short is redone exactly.
        ``params`` overrides the search-time parameters (``ef_search``, ``nprobe``).
        """
        n = self.ntotal
        if n == 0 or k <= 0 or (allowed is not None and len(allowed) == 0):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        if allowed is None:
            want = min(k, n)
            ids, scores = self._faiss_search(q, want, None, params=params)
            if len(ids) < want:
                ids, scores = self._faiss_search(q, want, None, wide=True, params=params)
            if len(ids) < want:
                return self._exact(q, k, self.ids())
            return ids, scores
        want = min(k, len(allowed))
        if len(allowed) <= max(_EXACT_MIN, n // 20):
            return self._exact(q, k, allowed.ids)
        sel, _bits = allowed.selector()
        ids, scores = self._faiss_search(q, want, sel, params=params)
        if len(ids) < want:
            return self._exact(q, k, allowed.ids)
        return ids, scores

    def _faiss_search(
        self,
        q: FloatArray,
        k: int,
        sel: Any,
        *,
        wide: bool = False,
        params: IndexParams | None = None,
    ) -> tuple[IdArray, FloatArray]:
        search_params = self._params(k, sel, wide=wide, params=params)
        with _one_omp_thread():
            if search_params is None:
                scores, ids = self._index.search(q, k)
            else:
                scores, ids = self._index.search(q, k, params=search_params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

    def _exact(self, q: FloatArray, k: int, ids: IdArray) -> tuple[IdArray, FloatArray]:
        best_ids = np.empty(0, dtype=np.int64)
        best_scores = np.empty(0, dtype=np.float32)
        for start in range(0, ids.size, _CHUNK):
            block = ids[start : start + _CHUNK]
            scores = self.reconstruct(block) @ q[0]
            best_ids = np.concatenate([best_ids, block])
            best_scores = np.concatenate([best_scores, scores.astype(np.float32)])
            if best_ids.size > k:
                top = np.argpartition(-best_scores, k - 1)[:k]
                best_ids, best_scores = best_ids[top], best_scores[top]
        order = np.lexsort((best_ids, -best_scores))[:k]
        return best_ids[order], best_scores[order]

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: Path) -> tuple[int, int]:
        """Write the index to ``path`` atomically; return ``(size, crc32)`` of the file."""
        buf = faiss.serialize_index(self._index)
        crc = zlib.crc32(buf.data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(buf.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return int(buf.size), crc

    @classmethod
    def load(
        cls,
        path: Path,
        kind: IndexKind,
        params: IndexParams,
        *,
        size: int | None,
        crc: int | None,
        rebuild_hint: str,
    ) -> VectorIndex:
        """Read an index written by :meth:`save`, checking that it is whole and of the right kind.

        Raises:
            KnowledgeStoreError: the file is missing, truncated, altered or not such an index;
                the message ends with ``rebuild_hint``.
        """
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise
        except OSError as e:
            msg = f"cannot read the knowledge index {path}: {e}. {rebuild_hint}"
            raise KnowledgeStoreError(msg) from e
        problem = None
        if data.size < 4 or data[:4].tobytes() != _MAGIC:
            problem = "is not a FAISS index written by this package"
        elif size is not None and data.size != size:
            problem = f"has {data.size} bytes where {size} were written (truncated or replaced)"
        elif crc is not None and zlib.crc32(data.data) != crc:
            problem = "fails its checksum (corrupted or altered)"
        index = None
        if problem is None:
            try:
                index = faiss.deserialize_index(data)
            except RuntimeError as e:
                problem = f"cannot be parsed by FAISS ({str(e).splitlines()[0][:200]})"
        if index is None or problem is not None:
            msg = f"the knowledge index {path} {problem}. {rebuild_hint}"
            raise KnowledgeStoreError(msg)
        base = faiss.downcast_index(index.index)
        found = {
            faiss.IndexFlatIP: "flat",
            faiss.IndexHNSWFlat: "hnsw",
            faiss.IndexIVFFlat: "ivf",
        }.get(type(base))
        if found != kind or base.metric_type != faiss.METRIC_INNER_PRODUCT:
            msg = (
                f"the knowledge index {path} holds a {type(base).__name__} index, not the "
                f"{kind!r} index its database records. {rebuild_hint}"
            )
            raise KnowledgeStoreError(msg)
        return cls(kind, int(index.d), params, index)


def merge_indexes(
    parts: Sequence[tuple[VectorIndex | FloatArray, IdArray]],
    kind: IndexKind,
    params: IndexParams,
    dim: int,
) -> VectorIndex:
    """Return one new index of ``kind`` holding, from each part, the vectors of the ids given.

    Vectors are copied block by block, so a merge never holds more than one block beyond the
    parts and the result. An IVF result is trained first on an even sample of all the parts.

    Args:
        parts: ``(source, ids)`` pairs: an index holding every id, or a matrix whose rows are
            the vectors of ``ids`` in order. No id may be in two parts.
        kind: The kind of the new index.
        params: Its parameters.
        dim: Vector width.
    """

    def take(source: VectorIndex | FloatArray, ids: IdArray, rows: slice) -> FloatArray:
        if isinstance(source, VectorIndex):
            return source.reconstruct(np.ascontiguousarray(ids[rows]))
        return np.ascontiguousarray(source[rows], dtype=np.float32)

    new = VectorIndex(kind, dim, params)
    total = sum(int(ids.size) for _, ids in parts)
    if kind == "ivf" and total:
        nlist = min(params.nlist or auto_nlist(total), total)
        step = max(1, total // (_IVF_TRAIN_PER_CELL * nlist))
        sample = np.concatenate([take(src, ids, slice(None, None, step)) for src, ids in parts])
        new.train(sample, total)
    for src, ids in parts:
        for start in range(0, ids.size, _CHUNK):
            rows = slice(start, start + _CHUNK)
            new.add(take(src, ids, rows), np.ascontiguousarray(ids[rows], dtype=np.int64))
    return new


@contextlib.contextmanager
def _one_omp_thread() -> Iterator[None]:
    """Search one query on the calling thread only.

    FAISS parallelises over queries, so a single query gains nothing from an OpenMP team, and on
    a busy machine waking one costs milliseconds (measured: flat 100k p50 16 ms alone, 56 ms with
    a team of two on a loaded 2-core box). The setting is per OS thread and restored afterwards.
    """
    before = faiss.omp_get_max_threads()
    if before == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
