"""`understudy distill run` with teacher relabelling: a real GGUF teacher answers the prompts that
arrived without an answer, and the student is distilled from those answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import color_traces, tiny_job_toml

from langchain_understudy.distill_jobs.traces import RELABELLED, TraceStore
from langchain_understudy.plugin.cli import main
from langchain_understudy.students import StudentRegistry

pytestmark = pytest.mark.slow

JOB = tiny_job_toml(
    "colors-relabel",
    """
[teacher]
kind = "gguf"
path = "{teacher}"

[relabel]
mode = "missing"
max_concurrency = 2

[gate]
min_exact_match = 0.5
""",
)


def test_unanswered_prompts_are_answered_by_the_teacher_then_distilled(
    tmp_path: Path, trained_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [{"messages": t["messages"][:1]} for t in color_traces(400, seed=7, start=5000)]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    store_path = str(tmp_path / "traces.sqlite")
    assert main(["traces", "import", str(f), "--store", store_path]) == 0  # refused: no answers
    assert TraceStore(store_path).count() == 0
    capsys.readouterr()
    assert main(["traces", "import", str(f), "--store", store_path, "--unanswered"]) == 0
    assert TraceStore(store_path).count() == 400

    (tmp_path / "job.toml").write_text(JOB.format(teacher=trained_gguf))
    assert main(["distill", "run", "--config", str(tmp_path / "job.toml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "promoted" in out
    assert "relabelled (answered / failed / over budget)  400 / 0 / 0" in out

    store = TraceStore(store_path)
    relabelled = [t for t in store.iter_traces() if RELABELLED in t.tags]
    assert len(relabelled) == 400
    assert {t.model for t in relabelled} == {trained_gguf.name}
    # the GGUF teacher names the colour stated in each prompt
    right = sum(
        str(t.messages[-1].content).endswith(f"It is {t.answer.content}.") for t in relabelled
    )
    assert right / len(relabelled) >= 0.9

    version = StudentRegistry(tmp_path / "students").current()
    assert version is not None
    assert version.metrics["relabel"]["answered"] == 400
    assert version.metrics["exact_match"] >= 0.5  # chance is 1 in 8; the tiny student varies by CPU
    assert version.provenance["teacher_model"] == trained_gguf.name
    timings = json.loads(version.artifact("report.json").read_text())["timings_s"]
    stages = ("relabel", "dataset", "train", "package", "evaluate")
    assert timings["total"] >= sum(timings[s] for s in stages)  # relabelling counts in the total

    # a second run has nothing left to ask and no new traces: it does nothing
    assert main(["distill", "run", "--config", str(tmp_path / "job.toml"), "--quiet"]) == 0
    assert "skipped" in capsys.readouterr().out
