"""``understudy router``: writing the threshold into the config and reading trace files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from langchain_understudy.errors import ConfigError, TraceError
from langchain_understudy.plugin._cli_router import read_traces, set_router_settings

CONFIG = """# my understudy
[student]
n_ctx = 1024  # trained for 1k

[router]
mode = "auto"   # keep this comment
threshold = 0.5
always_teacher_patterns = ["(?i)lawyer"]

[traces]
redact = true
"""


def test_replaces_threshold_and_keeps_the_rest(tmp_path: Path) -> None:
    p = tmp_path / "understudy.toml"
    p.write_text(CONFIG)
    set_router_settings(p, {"threshold": 0.4213})
    text = p.read_text()
    assert text == CONFIG.replace("threshold = 0.5", "threshold = 0.4213")
    from langchain_understudy.config import load_config

    assert load_config(p).router.threshold == pytest.approx(0.4213)


def test_adds_missing_key_inside_the_table(tmp_path: Path) -> None:
    p = tmp_path / "u.toml"
    p.write_text(CONFIG.replace("threshold = 0.5\n", ""))
    set_router_settings(p, {"threshold": 0.3, "policy": "/x/router.json"})
    data = tomllib.loads(p.read_text())
    assert data["router"]["threshold"] == 0.3 and data["router"]["policy"] == "/x/router.json"
    assert data["traces"] == {"redact": True}
    lines = p.read_text().splitlines()
    assert lines.index("threshold = 0.3") < lines.index("[traces]")


def test_appends_table_or_creates_file(tmp_path: Path) -> None:
    p = tmp_path / "u.toml"
    p.write_text("[student]\nn_ctx = 512")
    set_router_settings(p, {"threshold": 0.25})
    assert tomllib.loads(p.read_text()) == {
        "student": {"n_ctx": 512},
        "router": {"threshold": 0.25},
    }
    q = tmp_path / "new" / "u.toml"
    set_router_settings(q, {"threshold": 0.7})
    assert tomllib.loads(q.read_text()) == {"router": {"threshold": 0.7}}


def test_refuses_what_it_cannot_edit(tmp_path: Path) -> None:
    p = tmp_path / "u.toml"
    p.write_text('router = { mode = "pre" }\n')
    before = p.read_text()
    with pytest.raises(ConfigError):
        set_router_settings(p, {"threshold": 0.3})
    assert p.read_text() == before
    p.write_text("[router\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        set_router_settings(p, {"threshold": 0.3})


def test_read_traces(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ],
            "metadata": {"out_of_scope": True},
        },
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = read_traces(p)
    assert [(len(m), a, o) for m, a, o in got] == [(1, "a1", False), (2, "a2", True)]
    assert len(read_traces(p, limit=1)) == 1
    p.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(TraceError, match=":1:"):
        read_traces(p)
    with pytest.raises(TraceError, match="cannot read"):
        read_traces(tmp_path / "missing.jsonl")
