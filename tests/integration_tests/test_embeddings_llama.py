"""The default embeddings run MiniLM in llama.cpp: same vectors as sentence-transformers, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.retrieval import (
    KnowledgeStore,
    LlamaCppEmbeddings,
    SentenceTransformerEmbeddings,
    embeddings_name,
    load_embeddings,
)
from langchain_understudy.retrieval.embeddings import bundled_model_folder
from langchain_understudy.students.embedder import GGUFEmbedder, bert_to_gguf

pytestmark = pytest.mark.slow

TEXTS = [
    "How much is the Pro plan?",
    "what's my credit score",
    "Can I get my money back after 30 days?",
    "set an alarm for 7:45am tomorrow",
    "Café, naïve résumé: ÀÉÎÕÜ",
    "北京欢迎你",
    "emoji 😀 test 🚀",
    "tab\tnew\nline\r\n",
    "",
    "   ",
    "[CLS] literal special [SEP] tokens [MASK]",
    "a" * 300,  # one word over WordPiece's 100-character limit
    "don't stop-believing!!! ﬁ ligature Ωmega ∑",
    "word " * 1000,  # far past the 256-token limit
    "The API allows 1000 requests per minute per workspace.",
]


@pytest.fixture(scope="module")
def reference() -> SentenceTransformerEmbeddings:
    pytest.importorskip("sentence_transformers")
    return SentenceTransformerEmbeddings()


@pytest.fixture(scope="module")
def llama() -> LlamaCppEmbeddings:
    return LlamaCppEmbeddings(n_threads=1)


def test_vectors_match_sentence_transformers_within_1e3_cosine(
    llama: LlamaCppEmbeddings, reference: SentenceTransformerEmbeddings
) -> None:
    ours = np.array(llama.embed_documents(TEXTS))
    theirs = np.array(reference.embed_documents(TEXTS))
    assert ours.shape == theirs.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = (ours * theirs).sum(axis=1)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= 1 - 1e-3, f"{TEXTS[worst][:40]!r}: cosine {cosine[worst]}"


def test_token_ids_are_the_ones_sentence_transformers_uses(
    llama: LlamaCppEmbeddings, reference: SentenceTransformerEmbeddings
) -> None:
    tokenizer = reference._load().tokenizer
    engine = llama._load()
    for text in TEXTS:
        expected = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        assert engine.token_ids([text])[0] == expected, text[:40]


def test_a_store_built_with_sentence_transformers_answers_through_llama_cpp(
    tmp_path: Path, llama: LlamaCppEmbeddings, reference: SentenceTransformerEmbeddings
) -> None:
    facts = {
        "pro": "The Pro plan costs $25 per user per month.",
        "refunds": "Refunds are available within 30 days of purchase.",
        "region": "Customer data is stored in the EU region by default.",
    }
    built = KnowledgeStore(tmp_path / "kb", reference)
    built.add_texts(list(facts.values()), ids=list(facts))
    del built
    assert embeddings_name(llama) == embeddings_name(reference) == "all-MiniLM-L6-v2"
    reopened = KnowledgeStore(tmp_path / "kb", llama)
    for query, key in [
        ("How much is Pro?", "pro"),
        ("money back", "refunds"),
        ("data kept", "region"),
    ]:
        (doc,) = reopened.similarity_search(query, k=1)
        assert doc.id == key


def test_same_vectors_from_any_thread_and_for_lone_surrogates(llama: LlamaCppEmbeddings) -> None:
    main = llama.embed_query("How much is the Pro plan?")
    got: list[list[float]] = []
    workers = [
        threading.Thread(target=lambda: got.append(llama.embed_query("How much is the Pro plan?")))
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(np.allclose(v, main, atol=1e-6) for v in got) and len(got) == 4
    assert np.allclose(llama.embed_query("bad \ud800 text"), llama.embed_query("bad ? text"))


def test_serving_embeddings_never_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from langchain_understudy.retrieval import default_embeddings, KnowledgeStore\n"
        f"kb = KnowledgeStore({str(tmp_path / 'kb')!r}, default_embeddings())\n"
        "kb.add_texts(['The Pro plan costs $25.'], ids=['pro'])\n"
        "print(kb.similarity_search('price of pro', k=1)[0].id)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[:2] == ["pro", "[]"]


def test_conversion_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    folder = tmp_path / "mpnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mpnet"}))
    with pytest.raises(ConfigError, match="only BERT"):
        bert_to_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert isinstance(load_embeddings(folder), SentenceTransformerEmbeddings)
    cls = tmp_path / "cls-pooled"
    cls.mkdir()
    src = bundled_model_folder()
    for name in ("config.json", "modules.json"):
        (cls / name).write_text((src / name).read_text())
    (cls / "1_Pooling").mkdir()
    (cls / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True})
    )
    with pytest.raises(ConfigError, match="mean pooling"):
        bert_to_gguf(cls, tmp_path / "y.gguf")


def test_a_damaged_embedding_gguf_is_a_clear_error(tmp_path: Path) -> None:
    good = bert_to_gguf(bundled_model_folder(), tmp_path / "minilm.gguf", name="all-MiniLM-L6-v2")
    assert GGUFEmbedder(good).name == "all-MiniLM-L6-v2"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        LlamaCppEmbeddings(cut).embed_query("hello")
