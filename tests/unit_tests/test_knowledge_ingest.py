"""Ingestion: what is read, how files become facts, and what re-ingesting costs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings

from langchain_understudy.retrieval import KnowledgeStore, discover, ingest_paths, load_source
from langchain_understudy.retrieval._time import to_iso


class CountingEmbeddings(Embeddings):
    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.texts = 0

    def _vec(self, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.size).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.texts += len(texts)
        return [self._vec(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vec(text)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "plans.md").write_text(
        "# Plans\n\nThe Pro plan costs $25 a month.\n\n## Limits\n\n" + "Uploads are capped. " * 60
    )
    (root / "sub" / "notes.txt").write_text("Support answers within one business day.")
    (root / "facts.jsonl").write_text(
        "\n".join(
            [
                json.dumps(
                    {"key": "refund", "text": "Refunds within 30 days.", "as_of": "2024-01-01"}
                ),
                json.dumps(
                    {
                        "text": "Seats are billed monthly.",
                        "metadata": {"tier": "team"},
                        "region": "eu",
                    }
                ),
                "{not json",
                json.dumps({"key": "empty", "text": ""}),
                json.dumps({"key": "bad-time", "text": "x", "as_of": "soon"}),
                "",
            ]
        )
    )
    (root / "prices.csv").write_text(
        "key,plan,price,as_of\np-basic,Basic,0,2024-01-01\np-pro,Pro,25,\n"
    )
    (root / "faq.csv").write_text("text,topic\nHow do I reset my password?,account\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (root / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (root / "ignored.pdf").write_bytes(b"%PDF-1.4")
    (root / ".hidden" / "secret.txt").write_text("never read")
    (root / ".dotfile.txt").write_text("never read")
    outside = tmp_path / "outside.txt"
    outside.write_text("private, outside the named folder")
    (root / "link.txt").symlink_to(outside)
    (root / "inner-link.txt").symlink_to(root / "sub" / "notes.txt")
    return root


def test_discover_reads_only_what_was_named(docs: Path, tmp_path: Path) -> None:
    files, skipped = discover([docs, tmp_path / "missing.md", docs / "ignored.pdf"])
    names = sorted(str(f.relative_to(docs)) for f in files)
    # inner-link.txt and sub/notes.txt are one file: read once
    assert names == ["facts.jsonl", "faq.csv", "image.txt", "inner-link.txt", "latin1.md",
                     "plans.md", "prices.csv"]  # fmt: skip
    why = {Path(s.path).name: s.status for s in skipped}
    assert why["link.txt"] == "skipped: symlink to outside"
    assert why["missing.md"] == "skipped: not found"
    assert why["ignored.pdf"].startswith("skipped: unsupported type")
    # A file named explicitly is read even through a symlink: the user named it.
    files, skipped = discover([docs / "link.txt"])
    assert len(files) == 1 and not skipped


def test_load_source_kinds(docs: Path) -> None:
    chunks, rep = load_source(docs / "plans.md", chunk_size=200, chunk_overlap=20)
    assert rep.kind == "markdown" and rep.facts == len(chunks) > 3
    src = str((docs / "plans.md").resolve())
    assert [c.id for c in chunks[:2]] == [f"{src}#0", f"{src}#1"]
    assert chunks[0].metadata["source"] == src and chunks[0].metadata["as_of"].endswith("Z")

    facts, rep = load_source(docs / "facts.jsonl")
    assert [f.id for f in facts] == ["refund", f"{(docs / 'facts.jsonl').resolve()}#L2"]
    assert facts[0].metadata["as_of"] == "2024-01-01"
    assert facts[1].metadata == {
        "tier": "team",
        "region": "eu",
        "source": facts[1].metadata["source"],
    }
    assert rep.bad_records == 3 and rep.status.startswith("3 bad line(s) skipped, first: line 3")

    rows, rep = load_source(docs / "prices.csv")
    assert [r.id for r in rows] == ["p-basic", "p-pro"]
    assert rows[0].page_content == "plan: Basic; price: 0; as_of: 2024-01-01"
    assert rows[0].metadata["as_of"] == "2024-01-01" and "as_of" not in rows[1].metadata
    rows, _ = load_source(docs / "faq.csv")
    assert (
        rows[0].page_content == "How do I reset my password?"
        and rows[0].metadata["topic"] == "account"
    )

    for name, why in [("image.txt", "binary file"), ("latin1.md", "not UTF-8 text")]:
        got, rep = load_source(docs / name)
        assert got == [] and rep.status == f"skipped: {why}"


def test_unreadable_files_are_skipped(docs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = docs / "sub" / "notes.txt"
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == path:  # chmod 0 does not stop root, so refuse the read here
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    _, rep = load_source(path)
    assert rep.status == "skipped: unreadable (Permission denied)"


def test_ingest_then_reingest_costs_nothing_and_retires_stale_chunks(
    docs: Path, tmp_path: Path
) -> None:
    emb = CountingEmbeddings()
    store = KnowledgeStore(tmp_path / "kb", emb)
    store.add_texts(["kept from before"], ids=["before"])
    report = ingest_paths(store, [docs], chunk_size=200, chunk_overlap=20, progress=False)
    by_name = {Path(s.path).name: s for s in report.sources}
    assert by_name["image.txt"].skipped and by_name["latin1.md"].skipped
    assert by_name["link.txt"].skipped
    assert by_name["facts.jsonl"].added == 2 and by_name["prices.csv"].added == 2
    n = report.total("added")
    assert n == report.total("facts") and len(store) == n + 1
    assert store.get_by_ids(["before"])  # nothing already stored is lost
    embedded = emb.texts

    again = ingest_paths(store, [docs], chunk_size=200, chunk_overlap=20, progress=False)
    assert again.total("unchanged") == n and again.total("added") == 0
    assert emb.texts == embedded  # unchanged text is never embedded again

    plans = docs / "plans.md"
    edited = int(plans.stat().st_mtime) + 100
    plans.write_text("# Plans\n\nThe Pro plan costs $30 a month.")
    os.utime(plans, (edited, edited))
    third = ingest_paths(store, [plans], chunk_size=200, chunk_overlap=20, progress=False)
    (rep,) = third.sources
    assert (rep.facts, rep.replaced, rep.retired) == (1, 1, by_name["plans.md"].facts - 1)
    src = str(plans.resolve())
    hits = store.similarity_search("x", k=50, filter={"source": src})
    assert [h.page_content for h in hits] == ["# Plans\n\nThe Pro plan costs $30 a month."]
    assert hits[0].metadata["as_of"] == to_iso(edited)
    # as of before the edit, the old chunks are all still there
    old = store.similarity_search("x", k=50, filter={"source": src}, as_of=edited - 50)
    assert len(old) == by_name["plans.md"].facts

    plans.write_text("")
    (rep,) = ingest_paths(store, [plans], progress=False).sources
    assert rep.retired == 1 and store.similarity_search("x", k=50, filter={"source": src}) == []
