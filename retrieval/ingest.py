"""Ingestion: files the user names → facts in a ``KnowledgeStore``.

Supported: ``.txt`` and ``.md`` (chunked with ``langchain-text-splitters``; a chunk's key is
``<file>#<n>`` and its ``as_of`` the file's modification time), ``.jsonl`` (one fact per line:
``key``, ``text``, optional ``as_of``, ``metadata`` and any other fields as metadata) and ``.csv``
(a header row; a ``text`` column, else every column rendered as ``name: value``; optional ``key``
and ``as_of`` columns).

Only what the user names is read: folders are walked without following symlinks, hidden entries
are skipped, and a symlinked file pointing outside the named folder is reported and skipped, as
are unreadable, binary and non-UTF-8 files and files whose names are not UTF-8. Records that
cannot be stored (lone surrogate escapes, nesting deeper than :data:`MAX_JSON_DEPTH`, times out
of range) are reported as bad records. Re-ingesting a file replaces its facts in one
transaction (chunks it no longer has are retired), and unchanged text is never re-embedded.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.documents import Document

from langchain_understudy.errors import ConfigError
from langchain_understudy.retrieval._time import from_timestamp, to_iso, to_timestamp
from langchain_understudy.retrieval.vectorstores import KnowledgeStore

__all__ = [
    "SUPPORTED_SUFFIXES",
    "IngestReport",
    "SourceReport",
    "discover",
    "ingest_paths",
    "load_source",
]

#: Deepest nesting of arrays and objects accepted in a ``.jsonl`` record.
MAX_JSON_DEPTH = 100

SUPPORTED_SUFFIXES: dict[str, str] = {
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".jsonl": "jsonl",
    ".csv": "csv",
}


@dataclass
class SourceReport:
    """What happened to one file.

    Attributes:
        path: The file as found under what the user named.
        kind: ``text``, ``markdown``, ``jsonl``, ``csv`` or ``""`` when skipped before reading.
        facts: Facts read from the file.
        added: New keys written.
        replaced: Keys whose text or metadata changed.
        unchanged: Facts identical to what was stored (not re-embedded).
        retired: Facts of an earlier ingest of this file that it no longer has.
        bad_records: Lines or rows skipped in a ``.jsonl``/``.csv`` file.
        status: ``"ok"``, or why the file (or some of its records) was skipped.
        source: The ``source`` its facts carry in metadata (the absolute path by default).
    """

    path: str
    kind: str = ""
    facts: int = 0
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    retired: int = 0
    bad_records: int = 0
    status: str = "ok"
    source: str = ""

    @property
    def skipped(self) -> bool:
        """Whether the whole file was skipped."""
        return self.status.startswith("skipped")


@dataclass
class IngestReport:
    """The outcome of :func:`ingest_paths`: one :class:`SourceReport` per file considered."""

    sources: list[SourceReport] = field(default_factory=list)

    def total(self, attr: str) -> int:
        """Sum one count (``facts``, ``added``, ...) over all files."""
        return sum(int(getattr(s, attr)) for s in self.sources)

    @property
    def skipped(self) -> list[SourceReport]:
        """Files skipped entirely."""
        return [s for s in self.sources if s.skipped]


def discover(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[SourceReport]]:
    """Expand what the user named into files to read, and reports for what is skipped.

    A named file is read if its type is supported; a named folder is walked (no symlinked
    folders, no hidden entries) for supported files. Symlinked files must resolve inside the
    named folder.
    """
    files: list[Path] = []
    skipped: list[SourceReport] = []
    seen: set[Path] = set()

    def take(path: Path, root: Path | None) -> None:
        if path.is_symlink():
            target = path.resolve()
            inside = root is not None and target.is_relative_to(root.resolve())
            if root is not None and not inside:
                skipped.append(SourceReport(str(path), status="skipped: symlink to outside"))
                return
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            files.append(path)

    for named in paths:
        path = Path(named)
        if not path.exists():
            skipped.append(SourceReport(str(path), status="skipped: not found"))
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    child = Path(dirpath) / name
                    if name.startswith(".") or child.suffix.lower() not in SUPPORTED_SUFFIXES:
                        continue
                    take(child, path)
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            kinds = ", ".join(SUPPORTED_SUFFIXES)
            skipped.append(
                SourceReport(str(path), status=f"skipped: unsupported type (use {kinds})")
            )
        elif not path.is_file():
            skipped.append(SourceReport(str(path), status="skipped: not a regular file"))
        else:
            take(path, None)
    return files, skipped


class _SkipFile(Exception):
    """The file cannot be used; the message says why."""


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _SkipFile(f"unreadable ({e.strerror or e})") from e
    if b"\x00" in data[:65536]:
        raise _SkipFile("binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _SkipFile("not UTF-8 text") from e


def load_source(
    path: Path,
    *,
    source: str | None = None,
    chunk_size: int = 800,
    chunk_overlap: int = 80,
) -> tuple[list[Document], SourceReport]:
    """Read one file into facts (``Document`` with ``id`` = key).

    Args:
        path: The file.
        source: The ``source`` recorded in metadata and used in keys (default: absolute path).
        chunk_size: Characters per chunk of ``.txt``/``.md`` files.
        chunk_overlap: Characters shared by consecutive chunks.

    Returns:
        The facts and a report (``status`` says why, when the file or records were skipped).
    """
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower(), "")
    if not _is_text(str(path)):
        # Undecodable name bytes come back from the OS as lone surrogates, which no store can
        # hold; the report shows them escaped.
        shown = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
        return [], SourceReport(shown, kind, status="skipped: file name is not UTF-8 (rename it)")
    src = source or str(path.resolve())
    report = SourceReport(str(path), kind=kind, source=src)
    try:
        text = _read_text(path)
        if kind in ("text", "markdown"):
            mtime = to_iso(path.stat().st_mtime)
            docs = _chunk(text, kind, src, mtime, chunk_size, chunk_overlap)
        elif kind == "jsonl":
            docs, bad = _jsonl(text, src)
            _note_bad(report, bad, "line")
        elif kind == "csv":
            docs, bad = _csv(text, src)
            _note_bad(report, bad, "row")
        else:
            raise _SkipFile(f"unsupported type {path.suffix or '(none)'}")
    except _SkipFile as e:
        report.status = f"skipped: {e}"
        return [], report
    report.facts = len(docs)
    return docs, report


def _note_bad(report: SourceReport, bad: list[str], what: str) -> None:
    report.bad_records = len(bad)
    if bad:
        report.status = f"{len(bad)} bad {what}(s) skipped, first: {bad[0]}"


def _chunk(
    text: str, kind: str, src: str, mtime: str, chunk_size: int, chunk_overlap: int
) -> list[Document]:
    from langchain_text_splitters import MarkdownTextSplitter, RecursiveCharacterTextSplitter

    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        msg = (
            f"chunk_size must be >= 1 and 0 <= chunk_overlap < chunk_size, got {chunk_size} "
            f"and {chunk_overlap}"
        )
        raise ConfigError(msg)
    cls = MarkdownTextSplitter if kind == "markdown" else RecursiveCharacterTextSplitter
    splitter = cls(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    chunks = [c for c in splitter.split_text(text) if c.strip()]
    return [
        Document(
            id=f"{src}#{i}",
            page_content=chunk,
            metadata={"source": src, "chunk": i, "as_of": mtime},
        )
        for i, chunk in enumerate(chunks)
    ]


def _is_text(value: str) -> bool:
    """Whether ``value`` is valid Unicode (no lone surrogates), so it can be stored as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_value(value: Any) -> str | None:
    """Return why a parsed JSON value cannot be stored, or ``None`` when it can.

    A value cannot be stored when it is nested deeper than :data:`MAX_JSON_DEPTH` or holds a
    string with a lone UTF-16 surrogate (a high or low half alone). The walk is iterative, so a
    deep value cannot exhaust the stack here.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return "holds a lone UTF-16 surrogate, which is not valid Unicode"
        elif isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                return f"is nested more than {MAX_JSON_DEPTH} levels deep"
            if isinstance(item, dict):
                stack += [(k, depth + 1) for k in item]
                stack += [(v, depth + 1) for v in item.values()]
            else:
                stack += [(v, depth + 1) for v in item]
    return None


def _fact(record: dict[str, Any], src: str, where: str, default_key: str) -> Document | str:
    """Return a fact, or why the record was skipped."""
    bad = _bad_value(record)
    if bad is not None:
        return f"{where}: {bad}"
    text = record.pop("text", None)
    if not isinstance(text, str) or not text.strip():
        return f"{where}: needs a non-empty 'text'"
    key = record.pop("key", None) or record.pop("id", None) or default_key
    metadata = record.pop("metadata", None) or {}
    if not isinstance(metadata, dict):
        return f"{where}: 'metadata' must be an object"
    metadata = {**record, **metadata}
    as_of = metadata.get("as_of")
    if as_of in ("", None):
        metadata.pop("as_of", None)
    else:
        try:
            from_timestamp(to_timestamp(as_of))  # a time the store can also write back
        except ConfigError as e:
            return f"{where}: {e}"
        except (OverflowError, ValueError, OSError):
            return f"{where}: as_of {as_of!r} is out of range; use a time between years 1 and 9999"
    metadata.setdefault("source", src)
    return Document(id=str(key), page_content=text, metadata=metadata)


def _jsonl(text: str, src: str) -> tuple[list[Document], list[str]]:
    docs: list[Document] = []
    bad: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: invalid JSON ({e.msg})")
            continue
        except RecursionError:
            bad.append(f"line {n}: nested more than {MAX_JSON_DEPTH} levels deep")
            continue
        except ValueError as e:  # an integer of more digits than Python converts
            bad.append(f"line {n}: invalid JSON ({e})")
            continue
        if not isinstance(record, dict):
            bad.append(f"line {n}: not a JSON object")
            continue
        fact = _fact(record, src, f"line {n}", f"{src}#L{n}")
        if isinstance(fact, Document):
            docs.append(fact)
        else:
            bad.append(fact)
    return docs, bad


def _csv(text: str, src: str) -> tuple[list[Document], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise _SkipFile("empty CSV (a header row is needed)")
    docs: list[Document] = []
    bad: list[str] = []
    try:
        for n, row in enumerate(reader, start=2):
            values = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if None in row:
                bad.append(f"row {n}: more fields than the header")
                continue
            if "text" not in values:
                shown = [f"{k}: {v}" for k, v in values.items() if v and k not in ("key", "id")]
                values["text"] = "; ".join(shown)
            record: dict[str, Any] = {k: v for k, v in values.items() if v != "" or k == "text"}
            fact = _fact(record, src, f"row {n}", f"{src}#R{n}")
            if isinstance(fact, Document):
                docs.append(fact)
            else:
                bad.append(fact)
    except csv.Error as e:
        raise _SkipFile(f"malformed CSV ({e})") from e
    return docs, bad


def ingest_paths(
    store: KnowledgeStore,
    paths: Sequence[str | os.PathLike[str]],
    *,
    chunk_size: int = 800,
    chunk_overlap: int = 80,
    batch_facts: int = 5000,
    progress: bool = True,
    on_file: Callable[[SourceReport], None] | None = None,
) -> IngestReport:
    """Read the named files and folders into ``store``.

    Files are written in batches of about ``batch_facts`` facts, one transaction each; a file's
    facts are never split across batches, so a file is replaced whole or not at all.

    Args:
        store: The knowledge store.
        paths: Files and folders the user named (nothing else is read).
        chunk_size: Characters per chunk of ``.txt``/``.md`` files.
        chunk_overlap: Characters shared by consecutive chunks.
        batch_facts: Facts per write transaction.
        progress: Show a tqdm progress bar of facts embedded.
        on_file: Called with each file's report once it is read.
    """
    from tqdm.auto import tqdm

    files, skipped = discover(paths)
    report = IngestReport(sources=list(skipped))
    loaded: list[tuple[list[Document], SourceReport]] = []
    for path in files:
        docs, rep = load_source(path, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
        report.sources.append(rep)
        if on_file is not None:
            on_file(rep)
        if not rep.skipped:
            loaded.append((docs, rep))
    total = sum(len(docs) for docs, _ in loaded)
    with tqdm(total=total, unit="fact", desc="ingest", disable=not progress or not total) as bar:
        batch: list[tuple[list[Document], SourceReport]] = []
        size = 0
        for item in loaded:
            batch.append(item)
            size += len(item[0])
            if size >= batch_facts:
                _write_batch(store, batch, bar.update)
                batch, size = [], 0
        if batch:
            _write_batch(store, batch, bar.update)
    return report


def _write_batch(
    store: KnowledgeStore,
    batch: list[tuple[list[Document], SourceReport]],
    on_progress: Callable[[int], None],
) -> None:
    docs = [d for ds, _ in batch for d in ds]
    sources = [rep.source for _, rep in batch]
    result = store.upsert(
        [d.page_content for d in docs],
        [d.metadata for d in docs],
        ids=[d.id for d in docs],
        replace_sources=sources,
        on_progress=on_progress,
    )
    start = 0
    for (ds, rep), src in zip(batch, sources, strict=True):
        statuses = result.statuses[start : start + len(ds)]
        start += len(ds)
        rep.added = statuses.count("added")
        rep.replaced = statuses.count("replaced")
        rep.unchanged = statuses.count("unchanged")
        rep.retired = result.retired_by_source.get(src, 0)
