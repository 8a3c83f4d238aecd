"""Generated JSONL files through ``understudy traces import``: lines of every shape, broken
encodings, deep nesting, huge numbers and lone surrogates. The command imports the good lines,
reports the bad ones and exits 0 (1 with ``--strict``), never raises; the traces stored before
are all still there, unchanged, when the store is reopened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage
from test_fuzz_strategies import (
    any_text,
    broken_bytes,
    encode,
    fuzz_settings,
    json_values,
    mutate,
    nested_json,
)

from langchain_understudy.distill_jobs.traces import MAX_JSON_DEPTH, Trace, TraceStore
from langchain_understudy.plugin.cli import main

FUZZ = fuzz_settings(ci_examples=30)

# -- strategies -------------------------------------------------------------------------------

message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": any_text
        | st.lists(
            any_text | st.fixed_dictionaries({"type": st.just("text"), "text": any_text}),
            max_size=3,
        ),
    },
    optional={"name": any_text},
)
tool_call = st.fixed_dictionaries(
    {
        "id": any_text,
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": any_text, "arguments": json_values.map(json.dumps) | any_text}
        ),
    }
)
answer = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": any_text},
    optional={"tool_calls": st.lists(tool_call, max_size=2)},
)
tool_result = st.fixed_dictionaries(
    {"role": st.just("tool"), "content": any_text, "tool_call_id": any_text}
)
metadata = st.fixed_dictionaries(
    {},
    optional={
        "id": any_text,
        "created_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
        | any_text
        | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-02-30"]),
        "model": any_text,
        "latency_ms": st.floats() | st.integers() | json_values,
        "tags": st.lists(any_text, max_size=3) | json_values,
        "run_id": json_values,
        "error": json_values,
        "extra": json_values,
    },
)


@st.composite
def trace_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A line of the OpenAI fine-tuning format, then possibly broken anywhere inside."""
    prompt = draw(st.lists(message | tool_result, min_size=1, max_size=3))
    obj: dict[str, Any] = {"messages": [*prompt, draw(answer)]}
    if draw(st.booleans()):
        obj["metadata"] = draw(metadata)
    if draw(st.integers(0, 4)) == 0:
        obj["tools"] = draw(st.lists(json_values, max_size=2) | json_values)
    return mutate(draw, obj)


QA = '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}'


def _with_metadata(value: str) -> bytes:
    return f'{{"messages": [{QA}], "metadata": {{"x": {value}}}}}'.encode()


line = st.one_of(
    trace_objects().map(encode),
    trace_objects().map(
        lambda o: json.dumps(o, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    json_values.map(encode),
    nested_json.map(lambda t: f'{{"messages": {t}}}'.encode()),
    nested_json.map(_with_metadata),
    broken_bytes,
    st.integers(4000, 6000).map(lambda n: _with_metadata("7" * n)),
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
)
jsonl_files = st.lists(line, max_size=8).map(
    lambda lines: b"\n".join(ln.replace(b"\n", b" ") for ln in lines)
)


# -- the store and its contents before the batch ------------------------------------------------


def _seed(path: Path) -> dict[str, str]:
    """A store with a few traces; returns their ids and content hashes."""
    with TraceStore(path) as store:
        for i in range(5):
            store.add(
                [HumanMessage(f"question {i} Zürich 東京")], AIMessage(f"answer {i}"), tags=["seed"]
            )
        return {t.id: t.content_hash for t in store.iter_traces(tags=["seed"])}


def _kept(path: Path, seeded: dict[str, str]) -> int:
    """Reopen the store: every seeded trace is there, unchanged; returns the trace count."""
    with TraceStore(path) as store:
        for trace_id, digest in seeded.items():
            got = store.get(trace_id)
            assert got is not None and got.content_hash == digest, trace_id
        return store.count(include_errors=True)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, d + 1)
            stack += [(v, d + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _good_traces(data: bytes) -> dict[str, Trace]:
    """The lines a correct import must store: valid UTF-8 JSON in the documented format, nested
    at most ``MAX_JSON_DEPTH`` levels deep, with valid Unicode in every string."""
    out: dict[str, Trace] = {}
    for raw in data.split(b"\n"):
        try:
            obj = json.loads(raw.decode("utf-8"))
            assert _depth(obj) <= MAX_JSON_DEPTH
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere
            trace = Trace.from_openai(obj)
            trace._row()  # ...and writable: SQLite takes valid Unicode only
            json.dumps(trace.to_openai(), ensure_ascii=False).encode("utf-8")
        except Exception:  # noqa: BLE001 - anything wrong with a line makes it a bad line
            continue
        out[trace.id] = trace
    return out


# -- properties -------------------------------------------------------------------------------


def test_traces_import_of_any_jsonl_never_fails_and_keeps_the_store(tmp_path: Path) -> None:
    store = tmp_path / "traces.sqlite"
    seeded = _seed(store)
    src = tmp_path / "in.jsonl"

    @FUZZ
    @given(data=jsonl_files, strict=st.booleans(), redact=st.booleans())
    def case(data: bytes, strict: bool, redact: bool) -> None:
        before = _kept(store, seeded)
        src.write_bytes(data)
        argv = ["traces", "import", str(src), "--store", str(store)]
        argv += ["--strict"] * strict + ["--no-redact"] * (not redact)
        code = main(argv)
        assert code in (0, 1) and (code == 0 or strict)
        after = _kept(store, seeded)
        good = _good_traces(data)
        assert before <= after <= before + len(good)
        if not redact:  # unredacted, each good line is stored under its own id
            with TraceStore(store) as s:
                assert all(s.get(i) is not None for i in good)

    case()
    assert _kept(store, seeded) >= len(seeded)


@pytest.mark.parametrize(
    "extra", [b"\xff\xfe", b"{", b"[1]", b'"just a string"', b"null", b"\xef\xbb\xbf{}"]
)
def test_bad_lines_are_reported_and_good_ones_kept(
    tmp_path: Path, extra: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    src = tmp_path / "in.jsonl"
    src.write_bytes(encode(good) + b"\n" + extra + b"\n")
    store = tmp_path / "t.sqlite"
    assert main(["traces", "import", str(src), "--store", str(store), "--strict"]) == 1
    assert "line 2:" in capsys.readouterr().err
    with TraceStore(store) as s:
        assert [t.answer.content for t in s.iter_traces()] == ["a"]


# -- cases the fuzzing found, kept as regression tests -----------------------------------------

FOUND = {
    # a lone surrogate escape: UnicodeEncodeError from SQLite, the whole batch of good lines lost
    "lone-surrogate": (
        '{"messages": [{"role": "user", "content": "\\ud800"}, '
        '{"role": "assistant", "content": "a"}]}',
        "surrogate",
    ),
    "lone-surrogate-in-metadata-key": (
        f'{{"messages": [{QA}], "metadata": {{"\\udfff": 1}}}}',
        "surrogate",
    ),
    # a lone surrogate escape inside a tool call's arguments (JSON in a string): the line passed
    # its own check, its parsed arguments did not fit SQLite, and the import stopped with exit 1
    "lone-surrogate-in-tool-arguments": (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", '
        '"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", '
        '"arguments": "{\\"\\\\ud800\\": null}"}}]}]}',
        "surrogate",
    ),
    "deep-nesting-in-tool-arguments": (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", '
        '"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", '
        f'"arguments": "{{\\"a\\": {"[" * 5000 + "]" * 5000}}}"}}}}]}}]}}',
        "arguments",
    ),
    # 5,000 nested arrays: RecursionError out of json.loads
    "deep-nesting": (
        f'{{"messages": [{QA}], "metadata": {{"x": {"[" * 5000 + "]" * 5000}}}}}',
        "nested",
    ),
    # an integer of more than 4,300 digits: ValueError out of json.loads
    "huge-integer": (f'{{"messages": [{QA}], "metadata": {{"n": {"7" * 5000}}}}}', "digits"),
    # a time whose UTC form is before year 1: OverflowError out of astimezone
    "time-before-year-one": (
        f'{{"messages": [{QA}], "metadata": {{"created_at": "0001-01-01T00:00:00+01:00"}}}}',
        "created_at",
    ),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_case_is_a_reported_bad_line(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad, hint = FOUND[name]
    store = tmp_path / "t.sqlite"
    seeded = _seed(store)
    good = {
        "messages": [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "yes"}]
    }
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        encode(good)
        + b"\n"
        + bad.encode("ascii")
        + b"\n"
        + encode(good | {"metadata": {"n": 2}})
        + b"\n"
    )
    assert main(["traces", "import", str(src), "--store", str(store), "--no-redact"]) == 0
    err = capsys.readouterr().err
    assert "line 2:" in err and hint in err
    assert _kept(store, seeded) == len(seeded) + 2
