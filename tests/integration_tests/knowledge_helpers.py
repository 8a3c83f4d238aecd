"""Helpers for the knowledge-store integration tests (imported explicitly, also by child processes)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings

HERE = Path(__file__).resolve().parent


class HashEmbeddings(Embeddings):
    """Deterministic vectors from a text's sha256, identical in every process."""

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def _vec(self, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.size).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vec(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vec(text)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run MiniLM on one thread: on a shared 2-core machine two torch threads stall each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


def snapshot(store: Any, queries: list[str]) -> dict[str, Any]:
    """What a reader sees: counts and search results (used to compare states across crashes)."""
    st = store.stats()
    return {
        "facts": st.facts,
        "versions": st.versions,
        "vectors": st.vectors,
        "results": [
            [
                (d.id, d.page_content, round(s, 5))
                for d, s in store.similarity_search_with_score(q, k=5)
            ]
            for q in queries
        ],
        "past": [d.id for d in store.similarity_search(queries[0], k=5, as_of="2024-01-02")],
    }


def _crash_at(stage: str) -> None:
    """Arrange for this process to SIGKILL itself at ``stage`` of the next write."""
    from langchain_understudy.retrieval import _engine, _faiss

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    save = _faiss.VectorIndex.save
    if stage == "index-half-written":

        def half_save(self: Any, path: Path) -> Any:
            buf = _faiss.faiss.serialize_index(self._index)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(buf.data[: buf.size // 2])
                f.flush()
                os.fsync(f.fileno())
            die()

        _faiss.VectorIndex.save = half_save  # type: ignore[method-assign]
    elif stage == "index-renamed":

        def save_then_die(self: Any, path: Path) -> Any:
            save(self, path)
            die()

        _faiss.VectorIndex.save = save_then_die  # type: ignore[method-assign]
    elif stage in ("before-commit", "after-commit"):
        real_commit = _engine.FactEngine._commit

        class Proxy:
            def __init__(self, con: Any) -> None:
                self._con = con

            def execute(self, sql: str, *args: Any) -> Any:
                if sql == "COMMIT" and stage == "before-commit":
                    die()
                out = self._con.execute(sql, *args)
                if sql == "COMMIT":
                    die()
                return out

            def __getattr__(self, name: str) -> Any:
                return getattr(self._con, name)

        def commit(self: Any, **kw: Any) -> Any:
            if kw.get("rows"):
                self._con = Proxy(self._con)
            return real_commit(self, **kw)

        _engine.FactEngine._commit = commit  # type: ignore[method-assign]


def big_write(path: str, n: int, stage: str | None) -> None:
    """Child process: one large write (new facts, replacements, deletions of nothing)."""
    from langchain_understudy.retrieval import KnowledgeStore

    store = KnowledgeStore(path, HashEmbeddings())
    if stage:
        _crash_at(stage)
    texts = [f"new fact {i}" for i in range(n)] + [f"replaced fact {i}" for i in range(50)]
    ids = [f"new-{i}" for i in range(n)] + [f"base-{i}" for i in range(50)]
    vectors = HashEmbeddings().embed_documents(texts)
    print("writing", flush=True)
    store.add_embeddings(list(zip(texts, vectors, strict=True)), ids=ids)
    print("done", flush=True)


def writer(path: str, name: str, rounds: int, per_round: int) -> None:
    """Child process: many small writes racing another writer."""
    from langchain_understudy.retrieval import KnowledgeStore

    store = KnowledgeStore(path, HashEmbeddings(), lock_timeout=120)
    start = Path(path).parent / "go"
    while not start.exists():  # both writers start together
        pass
    for r in range(rounds):
        ids = [f"{name}-{r}-{i}" for i in range(per_round)]
        store.add_texts([f"{name} fact {r} {i}" for i in range(per_round)], ids=ids)
        store.add_texts([f"shared written by {name} in round {r}"], ids=["shared"])
        if r % 3 == 0:
            store.delete([f"{name}-{r}-0"])
    print(json.dumps({"name": name, "len": len(store)}), flush=True)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "big_write":
        big_write(args[0], int(args[1]), args[2] if len(args) > 2 and args[2] else None)
    elif cmd == "writer":
        writer(args[0], args[1], int(args[2]), int(args[3]))
