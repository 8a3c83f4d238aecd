from __future__ import annotations

import io
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_understudy.distill_jobs import traces as traces_module
from langchain_understudy.distill_jobs.redact import Redactor
from langchain_understudy.distill_jobs.traces import Trace, TraceStore, snapshot_hash
from langchain_understudy.errors import TraceError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_all_is_pinned() -> None:
    assert traces_module.__all__ == [
        "RELABELLED",
        "UNANSWERED",
        "ImportReport",
        "ModelStats",
        "Trace",
        "TraceStats",
        "TraceStore",
        "snapshot_hash",
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TraceStore]:
    s = TraceStore(tmp_path / "sub" / "traces.sqlite")
    yield s
    s.close()


def _tool_conversation() -> tuple[list[Any], AIMessage]:
    prompt = [
        SystemMessage("You are support."),
        HumanMessage("Where is order 42?"),
        AIMessage("", tool_calls=[{"name": "track", "args": {"order": 42}, "id": "call_1"}]),
        ToolMessage('{"status": "shipped"}', tool_call_id="call_1"),
    ]
    return prompt, AIMessage("Order 42 has shipped.")


def test_add_and_read_back_everything(store: TraceStore) -> None:
    prompt, answer = _tool_conversation()
    t = store.add(
        prompt,
        answer,
        model="teacher-1",
        latency_ms=12.5,
        tags=["support"],
        metadata={"user": "u1", "n": 2},
        run_id="run-1",
        parent_run_id="parent-1",
        created_at=T0,
    )
    assert t.id == "run-1"
    assert store.path.exists() and store.count() == 1
    (back,) = store.iter_traces()
    assert back.id == "run-1" and back.run_id == "run-1" and back.parent_run_id == "parent-1"
    assert [type(m) for m in back.messages] == [SystemMessage, HumanMessage, AIMessage, ToolMessage]
    assert isinstance(back.messages[2], AIMessage)
    assert back.messages[2].tool_calls[0]["args"] == {"order": 42}
    assert back.answer == answer
    assert back.model == "teacher-1" and back.latency_ms == 12.5
    assert back.tags == ["support"] and back.metadata == {"user": "u1", "n": 2}
    assert back.created_at == T0 and back.error is None
    assert back.content_hash == t.content_hash
    assert store.get("run-1") == back and store.get("nope") is None
    # WAL mode, JSON (not pickle) in the file
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw = conn.execute("SELECT messages, answer FROM traces").fetchone()
    assert json.loads(raw[0])[0]["type"] == "system"
    assert json.loads(raw[1])["data"]["content"] == "Order 42 has shipped."


def test_same_id_is_written_once_and_chunks_are_stored_as_messages(store: TraceStore) -> None:
    store.add([HumanMessage("hi")], AIMessage("a"), run_id="r")
    store.add([HumanMessage("hi")], AIMessage("b"), run_id="r")
    assert store.count() == 1
    chunk = AIMessageChunk(content="hel") + AIMessageChunk(
        content="lo", tool_call_chunks=[{"name": "f", "args": '{"x": 1}', "id": "c", "index": 0}]
    )
    t = store.add([HumanMessage("hi")], chunk)
    back = store.get(t.id)
    assert back is not None and type(back.answer) is AIMessage
    assert back.answer.content == "hello" and back.answer.tool_calls[0]["args"] == {"x": 1}


def test_filters_since_until_tags_errors(store: TraceStore) -> None:
    for i in range(6):
        store.add(
            [HumanMessage(f"q{i}")],
            AIMessage(f"a{i}"),
            tags=["even"] if i % 2 == 0 else ["odd", "x"],
            created_at=T0 + timedelta(hours=i),
            error="ValueError: boom" if i == 5 else None,
        )
    got = [t.answer.content for t in store.iter_traces(since=T0 + timedelta(hours=2))]
    assert got == ["a2", "a3", "a4", "a5"]
    got = [t.answer.content for t in store.iter_traces(until="2026-01-01T02:00:00Z")]
    assert got == ["a0", "a1"]
    # naive times are UTC; dates work too
    assert store.count(since=datetime(2026, 1, 1, 3)) == 3
    assert store.count(since=T0.date()) == 6
    assert store.count(tags=["odd"]) == 3 and store.count(tags=["even", "x"]) == 6
    assert store.count(include_errors=False) == 5
    with pytest.raises(TraceError, match="ISO-8601"):
        store.count(since="last tuesday")


def test_snapshot_hash_is_stable_and_content_only(tmp_path: Path, store: TraceStore) -> None:
    for i in range(3):
        store.add([HumanMessage(f"q{i}")], AIMessage(f"a{i}"), created_at=T0 + timedelta(hours=i))
    h = store.snapshot_hash()
    assert len(h) == 64 and h == store.snapshot_hash()
    assert h == snapshot_hash(store.iter_traces())
    # another store, other order, ids, times and metadata: same content, same hash
    with TraceStore(tmp_path / "other.sqlite") as other:
        for i in reversed(range(3)):
            other.add([HumanMessage(f"q{i}")], AIMessage(f"a{i}"), metadata={"m": i}, model="x")
        assert other.snapshot_hash() == h
    assert store.snapshot_hash(since=T0 + timedelta(hours=1)) != h
    store.add([HumanMessage("q0")], AIMessage("a0"))  # a duplicate still changes the snapshot
    assert store.snapshot_hash() != h


def test_stats(store: TraceStore) -> None:
    prompt, answer = _tool_conversation()
    store.add(prompt, answer, model="big", latency_ms=10.0, tags=["a"])
    store.add(prompt, answer, model="big", latency_ms=30.0, tags=["a", "b"])
    store.add(
        [HumanMessage("x")],
        AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}]),
        latency_ms=20.0,
    )
    store.add([HumanMessage("y")], AIMessage(""), model="big", error="TimeoutError")
    s = store.stats()
    assert (s.traces, s.errors, s.distinct, s.tool_call_answers) == (4, 1, 3, 1)
    assert s.latency_p50_ms == 20.0 and s.latency_p95_ms == 30.0
    assert s.models["big"].traces == 3 and s.models["big"].errors == 1
    assert s.models["big"].mean_latency_ms == 20.0 and s.models[""].traces == 1
    assert s.tags == {"a": 2, "b": 1}
    assert s.first is not None and s.last is not None and s.first <= s.last


def test_openai_round_trip_with_tools() -> None:
    prompt, answer = _tool_conversation()
    t = Trace(prompt, answer, model="m", tags=["t"], metadata={"k": "v", "tools": [{"x": 1}]})
    line = t.to_openai()
    assert line["tools"] == [{"x": 1}]
    assert [m["role"] for m in line["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    call = line["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "track", "arguments": '{"order": 42}'}
    assert line["metadata"]["model"] == "m" and line["metadata"]["k"] == "v"
    back = Trace.from_openai(json.loads(json.dumps(line)))
    assert back.id == t.id and back.model == "m" and back.tags == ["t"]
    assert back.metadata == {"k": "v", "tools": [{"x": 1}]}
    assert back.content_hash == t.content_hash and back.created_at == t.created_at


def test_from_openai_accepts_variants() -> None:
    t = Trace.from_openai(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
                },
            ]
        }
    )
    assert isinstance(t.messages[0], SystemMessage) and t.messages[1].name == "bob"
    assert t.answer.tool_calls == [
        {"name": "f", "args": {"a": 1}, "id": "call_0", "type": "tool_call"}
    ]
    assert t.id.startswith("sha-") and t.metadata == {}


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([1, 2], "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "no prompt before"),
        ({"messages": [{"role": "bot", "content": "a"}]}, r"messages\[0\].role must be one of"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "no 'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, "string or a list of parts"),
        (
            {"messages": [{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
            "without a 'tool_call_id'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}],
                    },
                ]
            },
            r"tool_calls\[0\].function.arguments is not valid JSON",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "tool_calls": [{"name": "f"}]},
                ]
            },
            "must look like",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                "metadata": 3,
            },
            "'metadata' must be a JSON object",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                "metadata": {"latency_ms": "fast"},
            },
            "latency_ms must be a number",
        ),
    ],
)
def test_from_openai_rejects_with_a_precise_message(obj: Any, needle: str) -> None:
    with pytest.raises(TraceError, match=needle):
        Trace.from_openai(obj)


def _line(q: str, a: str, **meta: Any) -> str:
    obj: dict[str, Any] = {
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    }
    if meta:
        obj["metadata"] = meta
    return json.dumps(obj)


def test_import_reports_malformed_lines_and_keeps_valid_ones(
    tmp_path: Path, store: TraceStore
) -> None:
    src = tmp_path / "in.jsonl"
    lines = [
        _line("q1", "a1", model="gpt", tags=["x"]),
        "{not json",
        _line("q2", "a2"),
        "",
        json.dumps({"messages": [{"role": "user", "content": "q3"}]}),
        _line("q1", "a1", model="gpt", tags=["x"]),  # repeated in the file
        _line("reach me at jo@example.com", "ok"),
    ]
    src.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n" + _line("q4", "a4").encode())
    seen: list[int] = []
    report = store.import_jsonl(src, redactor=Redactor(), tags=["imported"], progress=seen.append)
    assert report.added == 4 and report.duplicates == 1 and report.lines == 8
    assert report.errors == [
        "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 5: the last message must be the assistant's answer, got role 'user'; "
        "drop prompts without an answer or add the teacher's reply",
        "line 8: not valid UTF-8 (byte 0); re-save the file as UTF-8",
    ]
    assert report.malformed == 3 and not report.ok
    assert sum(seen) == src.stat().st_size
    texts = sorted(str(t.messages[0].content) for t in store.iter_traces())
    assert texts == ["q1", "q2", "q4", "reach me at <EMAIL>"]
    assert all("imported" in t.tags for t in store.iter_traces())
    # importing again adds nothing, even with other tags
    again = store.import_jsonl(src, redactor=Redactor(), tags=["again"])
    assert again.added == 0 and again.duplicates == 5 and store.count() == 4


def test_import_missing_file(tmp_path: Path, store: TraceStore) -> None:
    with pytest.raises(TraceError, match="check the path"):
        store.import_jsonl(tmp_path / "missing.jsonl")


def test_export_then_import_round_trip(tmp_path: Path, store: TraceStore) -> None:
    prompt, answer = _tool_conversation()
    store.add(prompt, answer, model="m", tags=["a"], created_at=T0)
    store.add([HumanMessage("q")], AIMessage("a"), created_at=T0 + timedelta(days=1))
    store.add([HumanMessage("e")], AIMessage(""), error="RuntimeError: x")
    out = tmp_path / "out" / "export.jsonl"
    assert store.export_jsonl(out) == 2  # errors are left out by default
    assert store.export_jsonl(tmp_path / "all.jsonl", include_errors=True) == 3
    assert store.export_jsonl(tmp_path / "since.jsonl", since=T0 + timedelta(hours=1)) == 1
    buf = io.StringIO()
    assert store.export_jsonl(buf, tags=["a"]) == 1
    assert json.loads(buf.getvalue())["metadata"]["tags"] == ["a"]
    # importing an export into the same store adds nothing (ids travel in metadata)
    assert store.import_jsonl(out).duplicates == 2
    with TraceStore(tmp_path / "copy.sqlite") as copy:
        report = copy.import_jsonl(out)
        assert report.added == 2 and report.ok
        assert copy.snapshot_hash() == store.snapshot_hash(include_errors=False)
        first = next(copy.iter_traces())
        assert first.model == "m" and first.created_at == T0 and first.messages == prompt


def test_not_a_store(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_text("hello, not sqlite" * 100)
    with pytest.raises(TraceError, match="is not a trace store"):
        TraceStore(bad)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    TraceStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE store_info SET value='99' WHERE key='schema_version'")
    with pytest.raises(TraceError, match="upgrade the package"):
        TraceStore(path)


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    stores = [TraceStore(path) for _ in range(3)]  # three connections, as three processes would

    def write(k: int) -> None:
        for i in range(50):
            stores[k].add([HumanMessage(f"{k}-{i}")], AIMessage("a"))
            if i % 10 == 0:
                assert sum(1 for _ in stores[(k + 1) % 3].iter_traces()) >= 0

    threads = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert stores[0].count() == 150
    for s in stores:
        s.close()
