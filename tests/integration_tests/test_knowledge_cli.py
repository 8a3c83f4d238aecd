"""``understudy kb ...`` as a new user would try it (real MiniLM, real files)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from knowledge_helpers import one_torch_thread

from langchain_understudy.plugin.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "plans.md").write_text(
        "# Plans\n\nThe Pro plan costs $25 per user per month.\n\n"
        "## Support\n\nSupport answers tickets within one business day.\n"
    )
    (root / "policies.txt").write_text("Refunds are available within 30 days of purchase.")
    (root / "facts.jsonl").write_text(
        json.dumps(
            {"key": "region", "text": "Customer data is stored in the EU.", "as_of": "2024-01-01"}
        )
        + "\n{broken\n"
    )
    (root / "limits.csv").write_text(
        "key,text,tier\napi,The API allows 1000 requests per minute.,pro\n"
    )
    (root / "logo.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "secret.txt").write_text("outside the folder")
    (root / "secret-link.txt").symlink_to(tmp_path / "secret.txt")
    return root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_kb_workflow(docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "kb")
    code, out, _ = run(capsys, "kb", "ingest", str(docs), "--store", store, "-q")
    assert code == 0, out
    assert "skipped: binary file" in out and "skipped: symlink to outside" in out
    assert "1 bad line(s) skipped" in out
    assert "4 file(s) read, 2 skipped; 4 facts: 4 added" in out
    assert "outside the folder" not in out

    code, out, _ = run(capsys, "kb", "search", "How much is Pro?", "-k", "2", "--store", store)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["#", "key", "relevance"] and "$25" in lines[2]

    code, out, _ = run(capsys, "kb", "ingest", str(docs), "--store", store, "-q")
    assert "4 unchanged" in out

    code, out, _ = run(capsys, "kb", "add", "--key", "region", "--as-of", "2024-06-01",
                       "Customer data is stored in the US.", "--store", store)  # fmt: skip
    assert code == 0 and out.startswith("replaced region (version 2)")
    code, out, _ = run(capsys, "kb", "search", "where is data stored", "-k", "1", "--store", store)
    assert "in the US" in out
    code, out, _ = run(capsys, "kb", "search", "where is data stored", "-k", "1",
                       "--as-of", "2024-03-01", "--store", store)  # fmt: skip
    assert "in the EU" in out and "2024-01-01" in out
    code, out, _ = run(capsys, "kb", "search", "where is data stored", "--filter",
                       '{"tier": "pro"}', "--store", store)  # fmt: skip
    assert "1000 requests" in out and "EU" not in out

    code, out, _ = run(capsys, "kb", "delete", "region", "nope", "--store", store)
    assert code == 0 and "deleted region" in out and "not found: nope" in out

    code, out, _ = run(capsys, "kb", "stats", "--store", store)
    assert code == 0
    stats = {line[:18].strip(): line[18:].strip() for line in out.splitlines()[2:]}
    assert stats["embedding"] == "all-MiniLM-L6-v2" and stats["index"] == "flat"
    assert (stats["current facts"], stats["deleted keys"], stats["versions kept"]) == (
        "3",
        "1",
        "5",
    )


def test_kb_errors_and_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "kb"
    code, _, err = run(capsys, "kb", "search", "anything", "--store", str(store))
    assert code == 1 and "no knowledge store at" in err and "kb ingest" in err
    assert not store.exists()

    code, out, _ = run(capsys, "kb", "add", "--key", "a", "Apples are red.", "--store", str(store))
    assert code == 0 and out.startswith("added a (version 1)")
    code, _, err = run(capsys, "kb", "search", "x", "--as-of", "last week", "--store", str(store))
    assert code == 1 and "ISO-8601" in err

    code, out, _ = run(capsys, "kb", "segments", "--store", str(store))
    assert code == 0 and "knowledge.sqlite (tail)" in out and "1 segment(s)" in out
    code, out, _ = run(capsys, "kb", "compact", "--store", str(store))
    assert code == 0 and "0 vectors dropped" in out
    (index,) = store.glob("seg-*.faiss")
    code, out, _ = run(capsys, "kb", "segments", "--store", str(store))
    assert code == 0 and index.name in out and "tail" not in out
    index.write_bytes(b"garbage")
    code, _, err = run(capsys, "kb", "search", "fruit", "--store", str(store))
    assert code == 1 and f"understudy kb rebuild --store {store}" in err
    code, out, _ = run(capsys, "kb", "rebuild", "--index", "hnsw", "-q", "--store", str(store))
    assert code == 0 and "rebuilt the hnsw index" in out and "1 vectors" in out
    code, out, _ = run(capsys, "kb", "search", "fruit", "--store", str(store))
    assert code == 0 and "Apples are red." in out


def test_store_path_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cfg = tmp_path / "understudy.toml"
    cfg.write_text('[knowledge]\npath = "facts-store"\nindex = "hnsw"\n')
    code, out, _ = run(capsys, "kb", "add", "--key", "k", "Pears are green.", "--config", str(cfg))
    assert code == 0
    assert (tmp_path / "facts-store" / "knowledge.sqlite").exists()
    code, out, _ = run(capsys, "kb", "stats", "--config", str(cfg))
    assert "hnsw" in out
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "kb", "add", "--key", "d", "Default location.")
    assert code == 0 and (tmp_path / ".understudy" / "knowledge" / "knowledge.sqlite").exists()
