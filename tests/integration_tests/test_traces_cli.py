"""``understudy traces import|stats|export`` end to end, through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage

from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.plugin.cli import main


def _write_jsonl(path: Path, n: int = 30) -> None:
    lines = []
    for i in range(n):
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You route banking questions."},
                        {"role": "user", "content": f"Question {i} from jo{i}@example.com"},
                        {"role": "assistant", "content": f"intent_{i % 5}"},
                    ],
                    "metadata": {"model": "teacher-xl", "tags": ["clinc"], "latency_ms": 100 + i},
                }
            )
        )
    tool_line = {
        "messages": [
            {"role": "user", "content": "balance?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {
                            "name": "get_balance",
                            "arguments": '{"iban": "DE89370400440532013000"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_9", "content": "120 EUR"},
            {"role": "assistant", "content": "You have 120 EUR."},
        ]
    }
    lines.insert(7, "this is not json")
    lines.insert(12, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    lines.insert(20, json.dumps({"messages": "nope"}))
    lines.append(json.dumps(tool_line))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_import_stats_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "teacher.jsonl"
    _write_jsonl(src)
    store = tmp_path / "traces.sqlite"

    assert main(["traces", "import", str(src), "--store", str(store), "--tag", "batch1"]) == 0
    out, err = capsys.readouterr()
    header, _rule, row = out.strip().splitlines()
    assert header.split() == ["file", "lines", "added", "duplicates", "malformed", "in", "store"]
    assert row.split()[1:] == ["34", "31", "0", "3", "31"]
    assert "line 8: not valid JSON (Expecting value at column 1)" in err
    assert "line 13: the last message must be the assistant's answer, got role 'user'" in err
    assert "line 21: 'messages' must be a non-empty list" in err
    assert "skipped 3 malformed lines" in err

    # again: nothing new, and --strict turns malformed lines into a failure exit code
    assert main(["traces", "import", str(src), "--store", str(store), "--strict"]) == 1
    out, _ = capsys.readouterr()
    assert out.strip().splitlines()[-1].split()[1:] == ["34", "0", "31", "3", "31"]

    with TraceStore(store) as s:
        traces = list(s.iter_traces())
        assert len(traces) == 31
        assert all("batch1" in t.tags for t in traces)
        assert traces[0].messages[1].content == "Question 0 from <EMAIL>"  # redacted by default
        tool = next(t for t in traces if t.messages[-1].type == "tool")
        call = tool.messages[1]
        assert isinstance(call, AIMessage) and call.tool_calls[0]["args"] == {"iban": "<IBAN>"}

    assert main(["traces", "stats", "--store", str(store)]) == 0
    out, _ = capsys.readouterr()
    assert "teacher-xl" in out and "clinc" in out and "batch1" in out
    summary = out.splitlines()[2].split()
    assert summary[1:5] == ["31", "0", "31", "0"]  # traces, errors, distinct, tool-call answers

    exported = tmp_path / "out" / "export.jsonl"
    assert (
        main(["traces", "export", "--store", str(store), "--out", str(exported), "--tag", "clinc"])
        == 0
    )
    assert f"wrote 30 traces to {exported}" in capsys.readouterr().out
    rows = [json.loads(line) for line in exported.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 30 and rows[0]["messages"][-1] == {
        "role": "assistant",
        "content": "intent_0",
    }
    assert rows[0]["metadata"]["model"] == "teacher-xl" and rows[0]["metadata"]["latency_ms"] == 100

    assert main(["traces", "export", "--store", str(store), "--since", "1h"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 31 and "exported 31 traces" in err
    assert main(["traces", "export", "--store", str(store), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == ""

    # the export imports cleanly into a fresh store with the same content
    fresh = tmp_path / "fresh.sqlite"
    assert main(["traces", "import", str(exported), "--store", str(fresh), "--strict"]) == 0
    with TraceStore(store) as a, TraceStore(fresh) as b:
        assert b.snapshot_hash() == a.snapshot_hash(tags=["clinc"])


def test_store_from_config_and_no_redact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "understudy.toml"
    cfg.write_text('[traces]\npath = "data/traces.sqlite"\nredact = false\n', encoding="utf-8")
    src = tmp_path / "one.jsonl"
    src.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "mail a@b.io"},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        ),
        encoding="utf-8",
    )
    assert main(["traces", "import", str(src), "--config", str(cfg)]) == 0
    capsys.readouterr()
    with TraceStore(tmp_path / "data" / "traces.sqlite") as s:
        (t,) = s.iter_traces()
        assert t.messages[0].content == "mail a@b.io"  # traces.redact = false in the config
    assert main(["traces", "stats", "--config", str(cfg)]) == 0
    assert "traces.sqlite" in capsys.readouterr().out


def test_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "traces",
                "import",
                str(tmp_path / "missing.jsonl"),
                "--store",
                str(tmp_path / "s.sqlite"),
            ]
        )
        == 1
    )
    assert "is not a file" in capsys.readouterr().err
    assert not (tmp_path / "s.sqlite").exists()
    assert main(["traces", "stats", "--store", str(tmp_path / "none.sqlite")]) == 1
    assert "no trace store at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["traces", "export", "--store", str(tmp_path / "s.sqlite"), "--since", "last week"])
    assert e.value.code == 2
    assert "duration ago like 90m, 12h, 7d" in capsys.readouterr().err
