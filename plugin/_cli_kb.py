"""``understudy kb ...``: ingest, add, search, delete, inspect and repair the knowledge store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_understudy.plugin._table import format_table

if TYPE_CHECKING:
    from langchain_understudy.retrieval._faiss import IndexKind

__all__ = ["register"]

_DEFAULT_STORE = Path(".understudy/knowledge")
_TEXT_WIDTH = 72


def _settings(args: argparse.Namespace) -> Any:
    from langchain_understudy.config import load_config

    return load_config(args.config).knowledge


def _embeddings(model: Path | None) -> Any:
    from langchain_understudy.retrieval import load_embeddings

    return load_embeddings(model)


def _open(
    args: argparse.Namespace,
    *,
    create: bool = False,
    load_index: bool = True,
    index: IndexKind | None = None,
) -> Any:
    from langchain_understudy.retrieval import KnowledgeStore
    from langchain_understudy.retrieval.vectorstores import DB_NAME

    settings = _settings(args)
    path = args.store or settings.path or _DEFAULT_STORE
    if index is None and create and not (Path(path) / DB_NAME).exists():
        index = settings.index  # the configured kind applies to new stores only
    return KnowledgeStore(
        path,
        _embeddings(settings.embedding_model),
        index=index,
        create=create,
        load_index=load_index,
    )


def _short(text: str, width: int = _TEXT_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _ingest(args: argparse.Namespace) -> int:
    from langchain_understudy.retrieval import ingest_paths

    store = _open(args, create=True, index=args.index)
    report = ingest_paths(
        store,
        args.paths,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        progress=not args.quiet,
    )
    rows = [
        [s.path, s.kind, s.facts, s.added, s.replaced, s.unchanged, s.retired, s.status]
        for s in report.sources
    ]
    if not rows:
        print("nothing to ingest: no .txt, .md, .jsonl or .csv files under the paths given")
        return 1
    headers = ["file", "type", "facts", "added", "replaced", "unchanged", "retired", "status"]
    print(format_table(headers, rows))
    total = [report.total(a) for a in ("facts", "added", "replaced", "unchanged", "retired")]
    print(
        f"{len(report.sources) - len(report.skipped)} file(s) read, {len(report.skipped)} "
        f"skipped; {total[0]} facts: {total[1]} added, {total[2]} replaced, {total[3]} "
        f"unchanged, {total[4]} retired -> {store.path} ({len(store)} current facts)"
    )
    return 0


def _add(args: argparse.Namespace) -> int:
    store = _open(args, create=True, index=args.index)
    metadata: dict[str, Any] = {}
    if args.metadata:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as e:
            print(f"error: --metadata must be a JSON object: {e}", file=sys.stderr)
            return 2
        if not isinstance(metadata, dict):
            print("error: --metadata must be a JSON object", file=sys.stderr)
            return 2
    if args.as_of:
        metadata["as_of"] = args.as_of
    result = store.upsert([args.text], [metadata], ids=[args.key])
    version = store.history(args.key)[-1].version
    print(f"{result.statuses[0]} {args.key} (version {version}) in {store.path}")
    return 0


def _search(args: argparse.Namespace) -> int:
    store = _open(args)
    flt = None
    if args.filter:
        try:
            flt = json.loads(args.filter)
        except json.JSONDecodeError as e:
            print(f"error: --filter must be JSON such as '{{\"source\": \"faq.md\"}}': {e}",
                  file=sys.stderr)  # fmt: skip
            return 2
    hits = store.similarity_search_with_relevance_scores(
        args.query, k=args.k, filter=flt, as_of=args.as_of
    )
    if not hits:
        when = f" as of {args.as_of}" if args.as_of else ""
        print(f"no facts found{when} in {store.path}")
        return 0
    rows = [
        [i, doc.id, f"{score:.3f}", doc.metadata.get("as_of", ""), _short(doc.page_content)]
        for i, (doc, score) in enumerate(hits, start=1)
    ]
    print(format_table(["#", "key", "relevance", "as_of", "text"], rows))
    return 0


def _delete(args: argparse.Namespace) -> int:
    store = _open(args)
    present = {d.id for d in store.get_by_ids(args.keys)}
    store.delete(args.keys, purge=args.purge)
    for key in args.keys:
        if key in present:
            print(f"{'purged' if args.purge else 'deleted'} {key}")
        else:
            print(f"not found: {key} (nothing to delete)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    st = _open(args).stats()
    rows = [
        ["store", st.path],
        ["index", st.index],
        ["embedding", st.embedding or "-"],
        ["dimensions", st.dim or "-"],
        ["current facts", st.facts],
        ["deleted keys", st.retired_keys],
        ["versions kept", st.versions],
        ["vectors", st.vectors],
        ["vectors to compact", st.dead_vectors],
        ["segments", st.segments],
        ["index generation", st.generation],
        ["disk", f"{st.disk_bytes / 1e6:.2f} MB"],
    ]
    print(format_table(["stat", "value"], rows))
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    store = _open(args, load_index=False)
    total = store.stats().versions
    with tqdm(total=total, unit="fact", desc="re-embed", disable=args.quiet or not total) as bar:
        n = store.rebuild(index=args.index, on_progress=bar.update)
    print(f"rebuilt the {store.stats().index} index of {store.path}: {n} vectors")
    return 0


def _compact(args: argparse.Namespace) -> int:
    dropped = _open(args).compact(drop_history_before=args.drop_history_before)
    print(f"compacted: {dropped} vectors dropped")
    return 0


def _segments(args: argparse.Namespace) -> int:
    segs = _open(args).segments()
    rows = [[s.id, s.file, s.kind, s.vectors, s.current, f"{s.bytes / 1e6:.2f} MB"] for s in segs]
    print(format_table(["#", "file", "index", "vectors", "current", "size"], rows))
    print(f"{len(segs)} segment(s); `understudy kb compact` merges them into one")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        type=Path,
        help=f"knowledge store folder (default: [knowledge] path in config, else {_DEFAULT_STORE})",
    )
    p.add_argument("--config", type=Path, help="understudy.toml")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``kb`` command group."""
    p = sub.add_parser("kb", help="the knowledge store: ingest, add, search, delete facts")
    s = p.add_subparsers(dest="kb_command", metavar="ACTION", required=True)

    ingest = s.add_parser(
        "ingest", help="read .txt/.md/.jsonl/.csv files or folders into the store"
    )
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ingest.add_argument("--chunk-size", type=int, default=800, help="characters per chunk")
    ingest.add_argument("--chunk-overlap", type=int, default=80, help="characters of overlap")
    ingest.add_argument("--index", choices=["flat", "hnsw", "ivf"], help="index kind (new store)")
    ingest.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _common(ingest)
    ingest.set_defaults(func=_ingest)

    add = s.add_parser("add", help="add or replace one fact")
    add.add_argument("text")
    add.add_argument("--key", required=True, help="the fact's stable key")
    add.add_argument("--as-of", help="when the fact became true (ISO-8601; default: now)")
    add.add_argument("--metadata", help='extra metadata as JSON, e.g. \'{"tier": "pro"}\'')
    add.add_argument("--index", choices=["flat", "hnsw", "ivf"], help="index kind (new store)")
    _common(add)
    add.set_defaults(func=_add)

    search = s.add_parser("search", help="find the facts nearest to a query")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=4, help="results (default 4)")
    search.add_argument("--as-of", help="search the facts as they stood at this time (ISO-8601)")
    search.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"source": "faq.md"}\'')
    _common(search)
    search.set_defaults(func=_search)

    delete = s.add_parser("delete", help="delete facts by key (history is kept unless --purge)")
    delete.add_argument("keys", nargs="+", metavar="KEY")
    delete.add_argument("--purge", action="store_true", help="erase every version")
    _common(delete)
    delete.set_defaults(func=_delete)

    stats = s.add_parser("stats", help="counts and sizes")
    _common(stats)
    stats.set_defaults(func=_stats)

    rebuild = s.add_parser("rebuild", help="re-embed every fact into a new index (repair)")
    rebuild.add_argument("--index", choices=["flat", "hnsw", "ivf"], help="switch index kind")
    rebuild.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _common(rebuild)
    rebuild.set_defaults(func=_rebuild)

    compact = s.add_parser(
        "compact", help="merge the segments into one, dropping erased vectors (and old history)"
    )
    compact.add_argument("--drop-history-before", help="also erase versions ended before (ISO)")
    _common(compact)
    compact.set_defaults(func=_compact)

    segments = s.add_parser("segments", help="the files that hold the vectors")
    _common(segments)
    segments.set_defaults(func=_segments)
