"""Knowledge store at scale: ingest vs embedding throughput, writes, search latency, recall, memory.

    .venv/bin/python bench/kb_scale.py                  # 10k, 100k (flat, hnsw, ivf), 1M (flat, ivf)
    .venv/bin/python bench/kb_scale.py --sizes 10000 --ingest-texts 0    # a quick run

1. Ingest: the bundled all-MiniLM-L6-v2 embeds N fact sentences on its own (``embed_documents``,
   the store's batch size), then ``KnowledgeStore.add_texts`` and ``understudy kb ingest``'s
   ``ingest_paths`` (from a .jsonl) ingest the same sentences into fresh stores; runs alternate and
   the best of each is kept. Ratio = ingest rate / embedding rate (goal >= 0.9).
2. Scale: n random unit vectors (384-d) drawn around n/100 random unit "topic" centres (cosine
   ~0.7 to their centre), queries drawn the same way. Isotropic random vectors have no
   nearest-neighbour structure in 384-d (all points nearly equidistant), so no ANN index can be
   judged on them (``--isotropic`` adds such a row at 100k: HNSW recall@10 ~0.2 there). Each
   store is built with one ``add_embeddings`` call; search latency is one query at a time
   through ``similarity_search_with_score_by_vector`` (embedding excluded; SQLite fetch of the
   10 facts included), as wall-clock and on-CPU time (on a shared machine the gap is time the OS
   gave other processes), and, for reference, the FAISS call alone; recall@10 is against exact
   search. Memory per vector = RSS growth of a fresh process opening the store / n.
   HNSW is built with M=16, efConstruction=40; at 1M the default kinds are flat and IVF
   (``4 * sqrt(n)`` cells, k-means on 40 vectors per cell): an HNSW graph of 1M vectors good
   enough for recall 0.95 takes far longer to build on 2 shared cores (``--kinds-1m hnsw`` runs
   it anyway). Bytes scanned per query: flat reads every vector; IVF reads its centroids and the
   ``nprobe`` cells visited.
3. Writes: into each store just built (one segment), ``--upserts-1`` single-fact upserts, each
   replacing a random existing fact with a new vector, then ``--upserts-100`` writes of 100 facts
   (50 new keys, 50 replaced), timed one ``add_embeddings`` call each (precomputed vectors: no
   embedding time). Each write appends a segment; small segments merge inside the write that
   fills a tier, and those merges are in the timings. Afterwards the search is timed again over
   the segments the writes left, then after ``compact()`` (its time reported too).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "kb_scale.json"
DIM = 384


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- 1. ingest vs embedding ---------------------------------------------------------------------


def fact_sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    plans = ["Basic", "Pro", "Team", "Enterprise", "Starter", "Business"]
    things = ["file storage", "API requests", "seats", "projects", "audit log retention",
              "support tickets", "custom domains", "build minutes", "guest users", "backups"]  # fmt: skip
    units = ["per month", "per user", "per workspace", "per day", "in total"]
    verbs = ["includes", "allows", "is limited to", "offers", "comes with"]
    out = []
    for i in range(n):
        out.append(
            f"The {rng.choice(plans)} plan {rng.choice(verbs)} {int(rng.integers(1, 5000))} "
            f"{rng.choice(things)} {rng.choice(units)} in region {int(rng.integers(1, 40))}, "
            f"as agreed in contract {i}."
        )
    return out


class TimedEmbeddings:
    """Wraps the model and adds up the time spent inside it (to attribute ingest time)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        t = time.perf_counter()
        out = self.inner.embed_documents(texts)
        self.seconds += time.perf_counter() - t
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed_documents(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return self.embed_query(text)


def bench_ingest(n_texts: int, rounds: int, work: Path) -> dict[str, Any]:
    from langchain_understudy.retrieval import KnowledgeStore, default_embeddings, ingest_paths

    emb: Any = TimedEmbeddings(default_embeddings())
    texts = fact_sentences(n_texts)
    emb.embed_documents(texts[:32])  # load the model and warm up
    batch = KnowledgeStore(work / "probe", emb).embed_batch_size
    embed_s: list[float] = []
    add_s: list[float] = []
    cli_s: list[float] = []
    add_model_s: list[float] = []  # time inside the model during add_texts
    cli_model_s: list[float] = []
    jsonl = work / "facts.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"key": f"f{i}", "text": t}) for i, t in enumerate(texts))
    )
    store = None
    for r in range(rounds):

        def embed_only() -> None:
            t = time.perf_counter()
            for start in range(0, len(texts), batch):
                emb.embed_documents(texts[start : start + batch])
            embed_s.append(time.perf_counter() - t)

        def add(r: int = r) -> None:
            store = KnowledgeStore(work / f"add{r}", emb)
            inside = emb.seconds
            t = time.perf_counter()
            store.add_texts(texts, ids=[f"f{i}" for i in range(len(texts))])
            add_s.append(time.perf_counter() - t)
            add_model_s.append(emb.seconds - inside)
            store.close()

        def cli(r: int = r) -> KnowledgeStore:
            store = KnowledgeStore(work / f"cli{r}", emb)
            inside = emb.seconds
            t = time.perf_counter()
            ingest_paths(store, [jsonl], progress=False)
            cli_s.append(time.perf_counter() - t)
            cli_model_s.append(emb.seconds - inside)
            return store

        # Alternate the order so drift in machine load favours neither side.
        if r % 2 == 0:
            embed_only()
            add()
            store = cli()
        else:
            store = cli()
            add()
            embed_only()
        log(f"ingest round {r}: embed {embed_s[-1]:.2f}s add_texts {add_s[-1]:.2f}s "
            f"ingest_paths {cli_s[-1]:.2f}s")  # fmt: skip
    # Re-ingesting the unchanged file: the content-hash cache means no embedding at all.
    assert store is not None
    t = time.perf_counter()
    ingest_paths(store, [jsonl], progress=False)
    reingest = time.perf_counter() - t
    store.close()
    embed_rate = n_texts / min(embed_s)
    return {
        "texts": n_texts,
        "rounds": rounds,
        "embed_texts_per_s": embed_rate,
        "add_texts_per_s": n_texts / min(add_s),
        "ingest_paths_per_s": n_texts / min(cli_s),
        # Wall-clock best-of runs, taken apart in time (load on a shared box drifts ~20%):
        "ratio_add_texts": (n_texts / min(add_s)) / embed_rate,
        "ratio_ingest_paths": (n_texts / min(cli_s)) / embed_rate,
        # Same calls, attributed: the share of ingest time the model itself was running.
        "attributed_ratio_add_texts": sum(add_model_s) / sum(add_s),
        "attributed_ratio_ingest_paths": sum(cli_model_s) / sum(cli_s),
        "store_overhead_ms_per_text_add_texts": 1000
        * (sum(add_s) - sum(add_model_s))
        / (n_texts * rounds),
        "store_overhead_ms_per_text_ingest_paths": 1000
        * (sum(cli_s) - sum(cli_model_s))
        / (n_texts * rounds),
        "reingest_unchanged_s": reingest,
        "embed_seconds": embed_s,
        "add_texts_seconds": add_s,
        "ingest_paths_seconds": cli_s,
    }


# -- 2. scale -----------------------------------------------------------------------------------


def unit(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


def topic_vectors(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // 100), DIM), dtype=np.float32))
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
        x[start : start + m] = unit(centres[rng.integers(0, len(centres), m)] + noise)
    noise = rng.standard_normal((n_queries, DIM), dtype=np.float32) / np.sqrt(DIM)
    q = unit(centres[rng.integers(0, len(centres), n_queries)] + noise)
    return x, q


def isotropic_vectors(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        unit(rng.standard_normal((n, DIM), dtype=np.float32)),
        unit(rng.standard_normal((n_queries, DIM), dtype=np.float32)),
    )


def exact_top10(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(DIM)
    index.add(x)
    _, ids = index.search(q, 10)  # batched: BLAS
    return ids


def memory_child(path: str) -> None:
    """Child process: print the RSS growth of opening the store at ``path``."""
    from langchain_understudy.retrieval import KnowledgeStore

    gc.collect()
    before = rss_bytes()
    store = KnowledgeStore(path, create=False)
    after = rss_bytes()
    print(json.dumps({"rss_growth": after - before, "facts": len(store)}))


def measure_memory(path: Path) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["rss_growth"])


def latencies(fn: Any, queries: np.ndarray, warmup: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and on-CPU milliseconds per call (the gap is time the OS ran someone else)."""
    for v in queries[:warmup]:
        fn(v)
    wall, cpu = [], []
    for v in queries:
        c = time.thread_time()
        t = time.perf_counter()
        fn(v)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return np.array(wall) * 1000.0, np.array(cpu) * 1000.0


def measure_search(store: Any, queries: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    found: list[list[int]] = []

    def search(v: np.ndarray) -> None:
        hits = store.similarity_search_with_score_by_vector(v, k=10)
        found.append([int(d.id or -1) for d, _ in hits])

    ms, cpu = latencies(search, queries)
    found = found[-len(queries) :]
    largest = max(store._engine._segments, key=lambda s: s.index.ntotal).index
    params = store.params
    raw, _ = latencies(lambda v: largest.search(v, 10, None, params), queries)
    recall = [len(set(f) & set(g.tolist())) / 10 for f, g in zip(found, gt, strict=True)]
    return {
        "queries": len(queries),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_p50_ms": float(np.percentile(cpu, 50)),
        "cpu_p99_ms": float(np.percentile(cpu, 99)),
        "faiss_p50_ms": float(np.percentile(raw, 50)),
        "faiss_p99_ms": float(np.percentile(raw, 99)),
        "recall_at_10": float(np.mean(recall)),
    }


def bytes_scanned(store: Any, n: int) -> int:
    """Bytes of vectors one query reads from the largest segment (flat: all; IVF: its cells)."""
    index = max(store._engine._segments, key=lambda s: s.index.ntotal).index
    if index.kind == "flat":
        return n * DIM * 4
    if index.kind == "ivf" and index.nlist:
        probed = min(store.params.nprobe, index.nlist)
        return (index.nlist + probed * n // index.nlist) * DIM * 4
    return 0  # HNSW: depends on the walk


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.array(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "mean_ms": float(a.mean())}  # fmt: skip


def measure_upserts(store: Any, n: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Time single-fact and 100-fact upserts into a store of ``n`` facts (precomputed vectors)."""
    rng = np.random.default_rng(seed)

    def vectors(m: int) -> list[list[float]]:
        return unit(rng.standard_normal((m, DIM), dtype=np.float32)).tolist()

    one: list[float] = []
    for i in range(args.upserts_1):
        key = str(int(rng.integers(0, n)))
        (vec,) = vectors(1)
        t = time.perf_counter()
        store.add_embeddings([(f"fact {key} revised {i}", vec)], ids=[key])
        one.append((time.perf_counter() - t) * 1000.0)
    hundred: list[float] = []
    for r in range(args.upserts_100):
        keys = [str(int(k)) for k in rng.choice(n, 50, replace=False)]
        keys += [f"new-{r}-{i}" for i in range(50)]
        pairs = list(zip([f"fact {k} batch {r}" for k in keys], vectors(100), strict=True))
        t = time.perf_counter()
        store.add_embeddings(pairs, ids=keys)
        hundred.append((time.perf_counter() - t) * 1000.0)
    return {
        "upsert_1": percentiles(one) | {"writes": len(one)},
        "upsert_100": percentiles(hundred) | {"writes": len(hundred)},
        "segments_after": len(store.segments()),
    }


def bench_store(
    kind: str,
    x: np.ndarray,
    q: np.ndarray,
    gt: np.ndarray,
    work: Path,
    args: argparse.Namespace,
    data: str,
) -> list[dict[str, Any]]:
    from langchain_understudy.retrieval import KnowledgeStore

    n = len(x)
    path = work / f"{kind}-{n}-{data}"
    big = n >= 1_000_000
    ef_construction = args.ef_construction_1m if big else args.ef_construction
    store = KnowledgeStore(
        path,
        index=kind,  # type: ignore[arg-type]
        hnsw_m=args.hnsw_m,
        ef_construction=ef_construction,
    )
    load = os.getloadavg()
    t = time.perf_counter()
    store.upsert([f"fact {i}" for i in range(n)], ids=[str(i) for i in range(n)], vectors=x)
    build_s = time.perf_counter() - t
    log(f"{kind} {n} {data}: built in {build_s:.1f}s (load {load[0]:.1f})")
    index_bytes = sum(p.stat().st_size for p in path.glob("seg-*.faiss"))
    sqlite_bytes = sum(p.stat().st_size for p in path.glob("knowledge.sqlite*"))
    queries = q[: args.flat_queries_1m] if kind == "flat" and big else q
    rows = []
    if kind == "hnsw":
        settings = [("ef_search", v) for v in (args.ef_search_1m if big else args.ef_search)]
    elif kind == "ivf":
        settings = [("nprobe", v) for v in args.nprobe]
    else:
        settings = [("", 0)]
    for name, value in settings:
        if name:
            store.params = replace(store.params, **{name: value})
        row = measure_search(store, queries, gt[: len(queries)])
        row |= {
            "n": n,
            "kind": kind,
            "data": data,
            "ef_search": value if kind == "hnsw" else None,
            "nprobe": value if kind == "ivf" else None,
            "nlist": store._engine._segments[0].index.nlist,
            "hnsw_m": args.hnsw_m if kind == "hnsw" else None,
            "ef_construction": ef_construction if kind == "hnsw" else None,
            "build_s": build_s,
            "build_load_average": load,
            "add_vectors_per_s": n / build_s,
            "bytes_scanned_per_query": bytes_scanned(store, n),
            "index_bytes_per_vector": index_bytes / n,
            "sqlite_bytes_per_vector": sqlite_bytes / n,
        }
        rows.append(row)
        log(f"  {name}={value}: p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
            f"recall@10 {row['recall_at_10']:.3f}")  # fmt: skip
    best = max(rows, key=lambda r: (r["recall_at_10"] >= 0.95, -r["p99_ms"]))
    if best["kind"] == "hnsw":
        store.params = replace(store.params, ef_search=best["ef_search"])
    elif best["kind"] == "ivf":
        store.params = replace(store.params, nprobe=best["nprobe"])
    writes: dict[str, Any] = {"n": n, "kind": kind, "data": data,
                              "load_average_before": os.getloadavg()}  # fmt: skip
    if args.upserts_1 or args.upserts_100:
        writes |= measure_upserts(store, n, args, seed=n + 7)
        log(f"  upsert 1: p50 {writes['upsert_1']['p50_ms']:.1f} ms p99 "
            f"{writes['upsert_1']['p99_ms']:.1f} ms; upsert 100: p50 "
            f"{writes['upsert_100']['p50_ms']:.1f} ms p99 {writes['upsert_100']['p99_ms']:.1f} ms; "
            f"{writes['segments_after']} segments")  # fmt: skip
        # Ground truth for the queries has changed little (a few hundred of n facts); the
        # search is timed again over the segments the writes left, and after compaction.
        after = measure_search(store, queries[:100], gt[:100])
        compact_s, compacted = None, None
        if n <= args.compact_up_to:
            t = time.perf_counter()
            store.compact()
            compact_s = time.perf_counter() - t
            compacted = measure_search(store, queries[:100], gt[:100])
        writes |= {
            "search_after_writes": {k: after[k] for k in ("p50_ms", "p99_ms", "cpu_p99_ms")},
            "compact_s": compact_s,
            "search_after_compact": (
                {k: compacted[k] for k in ("p50_ms", "p99_ms", "cpu_p99_ms")} if compacted else None
            ),
            "search_setting": {"ef_search": best["ef_search"], "nprobe": best["nprobe"]},
        }
        log(f"  search after writes p99 {after['p99_ms']:.2f} ms; compact {compact_s} s; "
            f"after compact {writes['search_after_compact']}")  # fmt: skip
    writes["load_average_after"] = os.getloadavg()
    store.close()
    del store
    gc.collect()
    mem = measure_memory(path)
    for row in rows:
        row["rss_bytes_per_vector"] = mem / n
    shutil.rmtree(path, ignore_errors=True)
    for row in rows:
        row["writes"] = writes
    return rows


def read_bandwidth(mb: int = 512, rounds: int = 5) -> float:
    """Single-thread read bandwidth in bytes/s (best of ``rounds`` sums over ``mb`` MB).

    A flat search reads every vector once, so bytes scanned / this is the floor of its latency.
    """
    a = np.ones(mb * 1024 * 1024 // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        a.sum()  # float32, numpy's own SIMD loop on this thread
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def machine() -> dict[str, Any]:
    import faiss
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "read_bytes_per_s_one_thread": read_bandwidth(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "uptime_at_start": subprocess.run(
            ["uptime"], capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def setting(row: dict[str, Any]) -> str:
    if row["kind"] == "hnsw":
        return f"M {row['hnsw_m']} / efC {row['ef_construction']} / efS {row['ef_search']}"
    if row["kind"] == "ivf":
        return f"nlist {row['nlist']} / nprobe {row['nprobe']}"
    return "-"


def markdown(result: dict[str, Any]) -> str:
    ing = result["ingest"]
    lines = []
    if ing:
        lines += [
            f"Ingest ({ing['texts']} fact sentences, all-MiniLM-L6-v2 on "
            f"{result['machine']['torch_threads']} torch thread(s)): embedding alone "
            f"{ing['embed_texts_per_s']:.0f} texts/s; `add_texts` {ing['add_texts_per_s']:.0f}/s "
            f"({ing['ratio_add_texts']:.2f}x); `kb ingest` of a .jsonl "
            f"{ing['ingest_paths_per_s']:.0f}/s ({ing['ratio_ingest_paths']:.2f}x) (best runs, "
            "wall clock). Attributed on the same calls, the model is busy "
            f"**{ing['attributed_ratio_add_texts']:.3f}** of `add_texts` time and "
            f"**{ing['attributed_ratio_ingest_paths']:.3f}** of `kb ingest` time (store overhead "
            f"{ing['store_overhead_ms_per_text_add_texts']:.2f} / "
            f"{ing['store_overhead_ms_per_text_ingest_paths']:.2f} ms per text); re-ingesting "
            f"the unchanged file takes {ing['reingest_unchanged_s']:.2f} s.",
            "",
        ]
    lines += [
        "| vectors | index | parameters | build s | p50 ms | p99 ms | p99 ms on CPU "
        "| FAISS-only p99 ms | recall@10 | MB scanned/query | RSS B/vector |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["scale"]:
        scanned = (
            f"{r['bytes_scanned_per_query'] / 1e6:.1f}" if r["bytes_scanned_per_query"] else "–"
        )
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {setting(r)} | {r['build_s']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_p99_ms']:.2f} | "
            f"{r['faiss_p99_ms']:.2f} | {r['recall_at_10']:.3f} | {scanned} | "
            f"{r['rss_bytes_per_vector']:,.0f} |"
        )
    lines += [
        "",
        "| facts | index | upsert 1: p50 / p99 ms | upsert 100: p50 / p99 ms | segments after "
        "| search p99 ms after writes | compact s | search p99 ms after compact |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for r in result["scale"]:
        w = r["writes"]
        if (w["n"], w["kind"], w["data"]) in seen or "upsert_1" not in w:
            continue
        seen.add((w["n"], w["kind"], w["data"]))
        lines.append(
            f"| {w['n']:,} | {w['kind']} | {w['upsert_1']['p50_ms']:.1f} / "
            f"{w['upsert_1']['p99_ms']:.1f} | {w['upsert_100']['p50_ms']:.1f} / "
            f"{w['upsert_100']['p99_ms']:.1f} | {w['segments_after']} | "
            f"{w['search_after_writes']['p99_ms']:.2f} | "
            + (
                f"{w['compact_s']:.1f} | {w['search_after_compact']['p99_ms']:.2f} |"
                if w["compact_s"] is not None
                else "– | – |"
            )
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--kinds", default="flat,hnsw,ivf", help="index kinds below 1M vectors")
    p.add_argument("--kinds-1m", default="flat,ivf", help="index kinds from 1M vectors on")
    p.add_argument("--nprobe", default="4,8,16,32", help="IVF cells searched, to report")
    p.add_argument("--upserts-1", type=int, default=200, help="single-fact writes per store")
    p.add_argument("--upserts-100", type=int, default=30, help="100-fact writes per store")
    p.add_argument("--compact-up-to", type=int, default=100_000,
                   help="time compact() after the writes in stores up to this size")  # fmt: skip
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--flat-queries-1m", type=int, default=100, help="flat at 1M is slow")
    p.add_argument("--ingest-texts", type=int, default=1000)
    p.add_argument("--ingest-rounds", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="MiniLM threads (1: two threads stall each other on a busy 2-core box)")  # fmt: skip
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", default="16,32,64", help="HNSW search beams to report")
    p.add_argument(
        "--ef-construction-1m",
        type=int,
        default=20,
        help="HNSW build beam from 1M vectors on (efConstruction 40 took 11 min here)",
    )
    p.add_argument("--ef-search-1m", default="64,128,256")
    p.add_argument("--isotropic", action="store_true", help="add an isotropic-data row at 100k")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    args.ef_search = [int(v) for v in args.ef_search.split(",")]
    args.ef_search_1m = [int(v) for v in args.ef_search_1m.split(",")]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]

    import torch

    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "params": vars(args) | {"out": str(args.out)}}
    work = Path(tempfile.mkdtemp(prefix="kb_scale_"))
    try:
        result["ingest"] = (
            bench_ingest(args.ingest_texts, args.ingest_rounds, work) if args.ingest_texts else {}
        )
        rows: list[dict[str, Any]] = []
        for n in sizes:
            x, q = topic_vectors(n, args.queries, seed=n)
            gt = exact_top10(x, q)
            kinds = (args.kinds_1m if n >= 1_000_000 else args.kinds).split(",")
            for kind in kinds:
                rows += bench_store(kind, x, q, gt, work, args, "topics")
            if n == 100_000 and "hnsw" in kinds and args.isotropic:
                x, q = isotropic_vectors(n, args.queries, seed=1)
                gt = exact_top10(x, q)
                rows += bench_store("hnsw", x, q, gt, work, args, "isotropic")
            del x, q, gt
            gc.collect()
        result["scale"] = rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["total_seconds"] = time.perf_counter() - started
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    print(f"\nwrote {args.out} in {result['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
