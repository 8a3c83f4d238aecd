"""Knowledge store at scale: ingest vs embedding throughput, search latency, recall, memory.

    .venv/bin/python bench/kb_scale.py                  # 10k, 100k, 1M x flat, hnsw (~10 min)
    .venv/bin/python bench/kb_scale.py --sizes 10000    # a quick run

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
   HNSW is built with M=16, efConstruction=40 (20 from 1M vectors on: at 40 the 1M build took
   11 minutes on the 2 shared cores this was written on).
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
    vindex, params = store._vindex, store.params
    raw, _ = latencies(lambda v: vindex.search(v, 10, None, params), queries)
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
    t = time.perf_counter()
    store.upsert([f"fact {i}" for i in range(n)], ids=[str(i) for i in range(n)], vectors=x)
    build_s = time.perf_counter() - t
    log(f"{kind} {n} {data}: built in {build_s:.1f}s")
    index_bytes = sum(p.stat().st_size for p in path.glob("index-*.faiss"))
    sqlite_bytes = sum(p.stat().st_size for p in path.glob("knowledge.sqlite*"))
    queries = q[: args.flat_queries_1m] if kind == "flat" and big else q
    rows = []
    efs = [None] if kind == "flat" else (args.ef_search_1m if big else args.ef_search)
    for ef in efs:
        if ef is not None:
            store.params = replace(store.params, ef_search=ef)
        row = measure_search(store, queries, gt[: len(queries)])
        row |= {
            "n": n,
            "kind": kind,
            "data": data,
            "ef_search": ef,
            "hnsw_m": args.hnsw_m if kind == "hnsw" else None,
            "ef_construction": ef_construction if kind == "hnsw" else None,
            "build_s": build_s,
            "add_vectors_per_s": n / build_s,
            "index_bytes_per_vector": index_bytes / n,
            "sqlite_bytes_per_vector": sqlite_bytes / n,
        }
        rows.append(row)
        log(f"  ef={ef}: p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
            f"recall@10 {row['recall_at_10']:.3f}")  # fmt: skip
    store.close()
    del store
    gc.collect()
    mem = measure_memory(path)
    for row in rows:
        row["rss_bytes_per_vector"] = mem / n
    shutil.rmtree(path, ignore_errors=True)
    return rows


def machine() -> dict[str, Any]:
    import faiss
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def hnsw(row: dict[str, Any]) -> str:
    if row["kind"] != "hnsw":
        return "-"
    return f"{row['hnsw_m']} / {row['ef_construction']} / {row['ef_search']}"


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
        "| vectors | index | data | M / efC / efSearch | build (vectors/s) | p50 ms | p99 ms | p99 ms on CPU "
        "| FAISS-only p99 ms | recall@10 | index B/vector | RSS B/vector |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["scale"]:
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['data']} | {hnsw(r)} | "
            f"{r['add_vectors_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['cpu_p99_ms']:.2f} | {r['faiss_p99_ms']:.2f} | {r['recall_at_10']:.3f} | "
            f"{r['index_bytes_per_vector']:,.0f} | {r['rss_bytes_per_vector']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--kinds", default="flat,hnsw")
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
    sizes = [int(v) for v in args.sizes.split(",")]
    kinds = args.kinds.split(",")

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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    print(f"\nwrote {args.out} in {result['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
