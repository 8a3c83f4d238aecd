"""Crash safety and cross-process writers: killed children, racing children."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from knowledge_helpers import HERE, HashEmbeddings, child_env, snapshot

from langchain_understudy.retrieval import KnowledgeStore

pytestmark = pytest.mark.slow

_QUERIES = ["base fact 3", "base fact 77", "new fact 5", "replaced fact 7"]


def _base_store(path: Path) -> dict:
    store = KnowledgeStore(path, HashEmbeddings())
    texts = [f"base fact {i}" for i in range(200)]
    store.add_texts(texts, [{"as_of": "2024-01-01"}] * 200, ids=[f"base-{i}" for i in range(200)])
    store.add_texts(["base fact 3 v2"], [{"as_of": "2024-01-03"}], ids=["base-3"])
    snap = snapshot(store, _QUERIES)
    store.close()
    return snap


def _child(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "knowledge_helpers.py"), *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("stage", "survives"),
    [
        ("index-half-written", False),
        ("index-renamed", False),
        ("before-commit", False),
        ("after-commit", True),
    ],
)
def test_kill_at_each_stage_of_a_write(tmp_path: Path, stage: str, survives: bool) -> None:
    path = tmp_path / "kb"
    before = _base_store(path)
    proc = _child(["big_write", str(path), "3000", stage])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "writing" in out and "done" not in out
    store = KnowledgeStore(path, HashEmbeddings())
    after = snapshot(store, _QUERIES)
    if survives:
        assert after["facts"] == before["facts"] + 3000 and after["versions"] == 3251
        assert after["past"] == before["past"]
    else:
        assert after == before
    # ... and the store takes writes again, leaving no temp files behind
    store.add_texts(["after the crash"], ids=["later"])
    assert store.similarity_search("after the crash", k=1)[0].id == "later"
    assert not list(path.glob(".*.tmp"))
    listed = {s.file for s in store.segments() if s.id}  # id 0: the tail, in SQLite
    assert {p.name for p in path.glob("seg-*.faiss")} == listed


@pytest.mark.parametrize(("stage", "survives"), [("before-commit", False), ("after-commit", True)])
def test_kill_during_a_small_write_to_the_tail(tmp_path: Path, stage: str, survives: bool) -> None:
    path = tmp_path / "kb"
    before = _base_store(path)
    proc = _child(["big_write", str(path), "20", stage])  # 70 vectors: SQLite only, no file
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    store = KnowledgeStore(path, HashEmbeddings())
    after = snapshot(store, _QUERIES)
    assert not list(path.glob("seg-*.faiss"))
    if survives:
        assert after["facts"] == before["facts"] + 20 and after["versions"] == 271
        assert [d.id for d in store.similarity_search("new fact 19", k=1)] == ["new-19"]
        assert after["past"] == before["past"]
    else:
        assert after == before
    store.add_texts(["after the crash"], ids=["later"])
    assert store.similarity_search("after the crash", k=1)[0].id == "later"


def test_kill_at_random_moments_leaves_old_or_new_state(tmp_path: Path) -> None:
    path = tmp_path / "kb"
    before = _base_store(path)
    # The write takes about a second here: kills early, midway and late in it.
    for delay in (0.1, 0.5, 0.9):
        proc = _child(["big_write", str(path), "10000", ""])
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        store = KnowledgeStore(path, HashEmbeddings())
        after = snapshot(store, _QUERIES)
        if after["facts"] == before["facts"]:
            assert after == before
        else:  # the write had committed: all of it is there
            assert after["facts"] == before["facts"] + 10000
            assert [d.id for d in store.similarity_search("new fact 9999", k=1)] == ["new-9999"]
            return
        store.close()


def test_two_processes_writing_concurrently_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kb"
    KnowledgeStore(path, HashEmbeddings()).close()
    rounds, per_round = 12, 5
    procs = [_child(["writer", str(path), name, str(rounds), str(per_round)]) for name in "ab"]
    time.sleep(0.5)
    (tmp_path / "go").touch()
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        json.loads(out.strip().splitlines()[-1])
    store = KnowledgeStore(path, HashEmbeddings())
    deleted = {f"{n}-{r}-0" for n in "ab" for r in range(0, rounds, 3)}
    expected = {f"{n}-{r}-{i}" for n in "ab" for r in range(rounds) for i in range(per_round)}
    expected -= deleted
    found = {d.id for d in store.get_by_ids(sorted(expected | deleted))}
    assert found == expected
    assert len(store) == len(expected) + 1  # + "shared"
    stats = store.stats()
    # every write is a version: facts + 2 * rounds versions of "shared", nothing lost or doubled
    assert stats.versions == 2 * rounds * per_round + 2 * rounds
    assert stats.vectors == stats.versions
    assert len(store.history("shared")) == 2 * rounds
    for key in ("a-5-3", "b-11-4"):
        name, r, i = key.split("-")
        assert store.similarity_search(f"{name} fact {r} {i}", k=1)[0].id == key


def test_compaction_while_another_process_writes_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kb"
    seed = KnowledgeStore(path, HashEmbeddings())
    seed.add_texts([f"seed {i}" for i in range(1500)], ids=[f"seed-{i}" for i in range(1500)])
    seed.add_texts([f"seed {i} v2" for i in range(10)], ids=[f"seed-{i}" for i in range(10)])
    rounds, per_round = 12, 5
    proc = _child(["writer", str(path), "a", str(rounds), str(per_round)])
    time.sleep(0.5)
    (tmp_path / "go").touch()
    compactions = 0
    while proc.poll() is None:  # merge everything again and again while the writer writes
        seed.compact()
        compactions += 1
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert compactions >= 1
    store = KnowledgeStore(path, HashEmbeddings())
    written = {f"a-{r}-{i}" for r in range(rounds) for i in range(per_round)}
    deleted = {f"a-{r}-0" for r in range(0, rounds, 3)}
    assert {d.id for d in store.get_by_ids(sorted(written))} == written - deleted
    assert len(store) == 1500 + len(written - deleted) + 1
    stats = store.stats()
    assert stats.vectors == stats.versions == 1510 + rounds * per_round + rounds
    assert store.similarity_search("a fact 7 3", k=1)[0].id == "a-7-3"
    assert store.similarity_search("seed 3 v2", k=1)[0].id == "seed-3"
