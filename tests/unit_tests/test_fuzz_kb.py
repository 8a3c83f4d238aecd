"""Generated folders through ``understudy kb ingest``: ``.txt``/``.md``/``.jsonl``/``.csv`` files
with broken encodings, binary content, huge lines, odd records and file names that are not
UTF-8. The command reads what it can, reports what it skips, never raises, and every fact stored
before is still there, unchanged, when the store is reopened.

The embeddings are a deterministic hash (this is about reading files, not about vectors); the
store is the real FAISS + SQLite one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.embeddings import Embeddings
from test_fuzz_strategies import (
    any_text,
    broken_bytes,
    encode,
    fuzz_settings,
    json_values,
    mutate,
    nested_json,
    valid_text,
)

from langchain_understudy.plugin import _cli_kb
from langchain_understudy.plugin.cli import main
from langchain_understudy.retrieval import KnowledgeStore, load_source

FUZZ = fuzz_settings(ci_examples=25)
#: Cases ingested into one store before the large-budget run starts again from a freshly seeded one.
FRESH_STORE_EVERY = 250
SEED_KEYS = [f"seed/{i}" for i in range(4)]


class HashEmbeddings(Embeddings):
    """A fixed random vector per text (sha256-seeded), 16 dimensions."""

    def _vec(self, text: str) -> list[float]:
        seed = int.from_bytes(
            hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "little"
        )
        return np.random.default_rng(seed).standard_normal(16).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vec(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vec(text)


# -- strategies -------------------------------------------------------------------------------

as_of = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.floats(),
    st.integers(),
    any_text,
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", 1e300, -1e300]),
    json_values,
)


@st.composite
def jsonl_record(draw: st.DrawFn) -> bytes:
    record: dict[str, Any] = {"text": draw(any_text)}
    for key, values in (
        ("key", any_text),
        ("as_of", as_of),
        ("metadata", json_values),
        ("tier", any_text),
    ):
        if draw(st.booleans()):
            record[key] = draw(values)
    mutate(draw, record)
    return encode(record)


jsonl_line = st.one_of(
    jsonl_record(),
    json_values.map(encode),
    nested_json.map(lambda t: f'{{"text": "x", "metadata": {{"m": {t}}}}}'.encode()),
    st.integers(4000, 6000).map(lambda n: b'{"text": "x", "n": ' + b"9" * n + b"}"),
    broken_bytes,
)


@st.composite
def csv_text(draw: st.DrawFn) -> bytes:
    header = draw(
        st.lists(
            st.sampled_from(["text", "key", "as_of", "tier", "", "text "]) | any_text,
            min_size=1,
            max_size=4,
        )
    )
    rows = draw(st.lists(st.lists(any_text | as_of.map(str), max_size=6), max_size=5))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogatepass")


def _text_file(draw: st.DrawFn, huge_repeats: int) -> bytes:
    kind = draw(st.sampled_from(["text", "huge-line", "broken", "bom", "utf16", "crlf"]))
    if kind == "huge-line":
        return (draw(valid_text) or "x").encode() * draw(st.integers(1, huge_repeats))
    if kind == "broken":
        return draw(valid_text).encode() + draw(broken_bytes)
    if kind == "bom":
        return b"\xef\xbb\xbf" + draw(valid_text).encode()
    if kind == "utf16":
        return draw(valid_text).encode("utf-16")
    text = draw(any_text)
    return (text.replace("\n", "\r\n") if kind == "crlf" else text).encode("utf-8", "surrogatepass")


@st.composite
def files(draw: st.DrawFn, huge_repeats: int = 20_000) -> list[tuple[bytes, bytes]]:
    """Up to four (file name, content) pairs; names may be any bytes but ``/`` and NUL.

    A huge line repeats a text up to ``huge_repeats`` times (up to 800 kB).
    """
    out = []
    for _ in range(draw(st.integers(1, 4))):
        suffix = draw(
            st.sampled_from([b".txt", b".md", b".markdown", b".jsonl", b".csv", b".TXT", b".bin"])
        )
        stem = draw(
            st.binary(min_size=1, max_size=12).filter(
                lambda b: b"/" not in b and b"\x00" not in b and not b.startswith(b".")
            )
        )
        if suffix == b".jsonl":
            content = b"\n".join(
                ln.replace(b"\n", b" ") for ln in draw(st.lists(jsonl_line, max_size=6))
            )
        elif suffix == b".csv":
            content = draw(csv_text() | broken_bytes)
        else:
            content = _text_file(draw, huge_repeats)
        out.append((stem + suffix, content))
    return out


@st.composite
def ingest_cases(draw: st.DrawFn) -> tuple[tuple[int, int], list[tuple[bytes, bytes]]]:
    """A chunking setting and the files to ingest with it.

    Huge lines come with the default 800-character chunks (up to 1,000 facts a file); with the
    tiny chunk settings a line is at most 500 repeats (20 kB), or one case would store 800,000
    facts and the large-budget run would spend its time on a few cases.
    """
    chunk = draw(st.sampled_from([(800, 80), (50, 0), (10, 9)]))
    return chunk, draw(files(huge_repeats=20_000 if chunk[0] >= 800 else 500))


# -- the store before the batch --------------------------------------------------------------


def _store(path: Path) -> KnowledgeStore:
    return KnowledgeStore(path, HashEmbeddings())


def _seed(path: Path) -> dict[str, str]:
    store = _store(path)
    texts = [
        f"seed fact {i}: the Pro plan costs {10 + i} EUR, Zürich 東京"
        for i in range(len(SEED_KEYS))
    ]
    store.upsert(texts, [{"source": "seed"}] * len(texts), ids=SEED_KEYS)
    store.close()
    return dict(zip(SEED_KEYS, texts, strict=True))


def _kept(path: Path, seeded: dict[str, str]) -> int:
    """Reopen the store: every seeded fact is there with its text; returns the fact count."""
    store = _store(path)
    try:
        got = {d.id: d.page_content for d in store.get_by_ids(list(seeded))}
        assert got == seeded
        return len(store)
    finally:
        store.close()


# -- properties -------------------------------------------------------------------------------


def test_kb_ingest_of_any_files_never_fails_and_keeps_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli_kb, "_embeddings", lambda _model: HashEmbeddings())
    store = tmp_path / "kb"
    seeded = _seed(store)
    n = itertools.count()

    @FUZZ
    @given(case_input=ingest_cases())
    def case(case_input: tuple[tuple[int, int], list[tuple[bytes, bytes]]]) -> None:
        chunk, named = case_input
        i = next(n)
        if i and i % FRESH_STORE_EVERY == 0:  # a store that grew over every case slows each one
            shutil.rmtree(store)
            assert _seed(store) == seeded
        folder = tmp_path / f"in{i}"
        folder.mkdir()
        for name, content in named:
            with open(os.path.join(os.fsencode(folder), name), "wb") as f:
                f.write(content)
        before = _kept(store, seeded)
        argv = ["kb", "ingest", str(folder), "--store", str(store), "-q"]
        argv += ["--chunk-size", str(chunk[0]), "--chunk-overlap", str(chunk[1])]
        assert main(argv) in (0, 1)
        assert _kept(store, seeded) >= before
        # every fact read from the files is in the store, readable, with its text
        texts: dict[str, set[str]] = {}
        for path in folder.iterdir():
            docs, rep = load_source(path, chunk_size=chunk[0], chunk_overlap=chunk[1])
            assert rep.skipped or rep.facts == len(docs)
            for d in docs:
                texts.setdefault(str(d.id), set()).add(d.page_content)
        reopened = _store(store)
        try:
            got = {d.id: d for d in reopened.get_by_ids(list(texts))}
            assert set(got) == set(texts) - set(SEED_KEYS)
            for key, doc in got.items():
                assert doc.page_content in texts[key]
        finally:
            reopened.close()

    case()
    assert _kept(store, seeded) >= len(seeded)


# -- cases the fuzzing found, kept as regression tests -----------------------------------------

_QA = b'{"key": "k", "text": "fact"'
FOUND: dict[str, tuple[bytes, bytes]] = {
    # a file name that is not UTF-8: its source key reached SQLite, UnicodeEncodeError
    "file-name-not-utf8": (b"\x80.txt", b"a fact"),
    # a lone surrogate escape in a record: UnicodeEncodeError from SQLite
    "record-lone-surrogate": (b"a.jsonl", _QA + b', "tier": "\\udc80"}\n' + b'{"text": "ok"}'),
    # 5,000 nested arrays: RecursionError out of json.loads
    "record-deep-nesting": (
        b"b.jsonl",
        _QA + b', "m": ' + b"[" * 5000 + b"]" * 5000 + b'}\n{"text": "ok"}',
    ),
    # an integer of more than 4,300 digits: ValueError out of json.loads
    "record-huge-integer": (b"c.jsonl", _QA + b', "n": ' + b"9" * 5000 + b'}\n{"text": "ok"}'),
    # epoch seconds far past year 9999, or a time before year 1 in UTC: stored, and then every
    # read of that fact failed (OverflowError / ValueError turning the time back into ISO)
    "record-as-of-out-of-range": (b"d.jsonl", _QA + b', "as_of": 1e300}\n{"text": "ok"}'),
    "record-as-of-before-year-one": (
        b"e.jsonl",
        _QA + b', "as_of": "0001-01-01T00:00:00+01:00"}\n{"text": "ok"}',
    ),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_case_is_skipped_with_a_reason(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_cli_kb, "_embeddings", lambda _model: HashEmbeddings())
    store = tmp_path / "kb"
    seeded = _seed(store)
    file_name, content = FOUND[name]
    folder = tmp_path / "in"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), file_name), "wb") as f:
        f.write(content)
    (folder / "good.jsonl").write_text(json.dumps({"key": "good", "text": "kept"}) + "\n")
    assert main(["kb", "ingest", str(folder), "--store", str(store), "-q"]) == 0
    assert _kept(store, seeded) == len(seeded) + 1 + (name.startswith("record"))


@pytest.mark.parametrize("as_of", [1e300, "0001-01-01T00:00:00+01:00"])
def test_found_out_of_range_as_of_through_upsert_is_refused_or_readable(
    tmp_path: Path, as_of: Any
) -> None:
    from langchain_understudy.errors import UnderstudyError

    store = _store(tmp_path / "kb")
    try:
        store.upsert(["a fact"], [{"as_of": as_of}], ids=["k"])
    except UnderstudyError:
        return
    assert [d.id for d in store.get_by_ids(["k"])] == ["k"]
