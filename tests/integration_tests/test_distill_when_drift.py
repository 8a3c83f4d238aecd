"""`understudy distill schedule --when-drift`: a scheduled job that runs only when live traffic drifts.

Real job, real registry, real GGUF student served through ``ChatUnderstudy`` with an audit log;
the drift watch reads the signals that log recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import color_traces, tiny_job_toml

from langchain_understudy.config import load_config
from langchain_understudy.plugin.cli import main
from langchain_understudy.router import ChatUnderstudy, Router
from langchain_understudy.students import StudentRegistry

pytestmark = pytest.mark.slow

OFF_TOPIC = [
    "Book me a table for {n} people at an Italian place tonight.",
    "How do I reset the password of my online banking account number {n}?",
    "Translate 'good morning' into Portuguese, formally, for letter {n}.",
    "What is the weather going to be like in Lisbon on day {n}?",
    "Remind me to call the dentist at {n} o'clock.",
]


def _import(d: Path, traces: list[dict], name: str) -> None:
    path = d / name
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    assert main(["traces", "import", str(path), "--store", str(d / "traces.sqlite")]) == 0


def _serve(d: Path, questions: list[str]) -> None:
    cfg = load_config(d / "understudy.toml")
    llm = ChatUnderstudy(
        student=StudentRegistry(d / "students"),
        router=Router(threshold=1.0),  # the student answers every turn: its signals are logged
        mode="pre",
        max_tokens=4,
        audit_log=cfg.router.audit_log,
    )
    for q in questions:
        llm.invoke(q)


def _schedule(d: Path, capsys: pytest.CaptureFixture[str]) -> str:
    args = ["distill", "schedule", "--config", str(d / "job.toml"), "--every", "1h"]
    args += ["--max-runs", "1", "--when-drift", "--serve-config", str(d / "understudy.toml")]
    assert main([*args, "--quiet"]) == 0
    return capsys.readouterr().out


def test_scheduled_job_runs_on_drift_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path
    (d / "job.toml").write_text(tiny_job_toml("drift"))
    (d / "understudy.toml").write_text(
        '[router]\naudit_log = "audit.jsonl"\n\n'
        "[rollout]\ndrift_window = 80\ndrift_min_samples = 60\n"
    )
    _import(d, color_traces(600), "first.jsonl")
    reg = StudentRegistry(d / "students")

    out = _schedule(d, capsys)  # nothing serves yet: the first build always runs
    assert "promoted v1" in out, out
    assert reg.get("v1").provenance["trigger"] == {"kind": "first build"}
    assert set(json.loads(reg.get("v1").artifact("signal_reference.json").read_text())["signals"])
    _import(d, color_traces(200, seed=1, start=5_000), "more.jsonl")  # new traces wait

    # in-distribution traffic: no alarm, the new traces stay unbuilt
    _serve(d, [t["messages"][0]["content"] for t in color_traces(80, seed=2, start=9_000)])
    out = _schedule(d, capsys)
    assert "skipped: no drift on v1" in out, out
    assert [v.version for v in reg.list()] == ["v1"]

    # the traffic turns to requests the student never saw: the alarm triggers a build
    _serve(d, [OFF_TOPIC[i % 5].format(n=i) for i in range(80)])
    out = _schedule(d, capsys)
    assert "v2" in out, out
    trigger = reg.get("v2").provenance["trigger"]
    assert trigger["kind"] == "drift" and trigger["version"] == "v1"
    assert "ood_distance" in trigger["alarm_signals"]
    ood = trigger["signals"]["ood_distance"]
    assert ood["n"] == 80 and ood["psi"] >= trigger["alarm_psi"]
