"""The job under ``torchrun --nproc-per-node 2`` (DDP over gloo on CPU): one student, registered once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import color_traces, tiny_job_toml

from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.students import StudentRegistry

pytestmark = pytest.mark.slow


def test_two_ranks_train_one_student_and_register_it_once(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(t) + "\n" for t in color_traces(400)))
    TraceStore(tmp_path / "traces.sqlite").import_jsonl(tmp_path / "t.jsonl")
    (tmp_path / "job.toml").write_text(tiny_job_toml("ddp"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "langchain_understudy.plugin.cli",
        "distill",
        "run",
        "--config",
        str(tmp_path / "job.toml"),
        "--quiet",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = StudentRegistry(tmp_path / "students").list()
    assert len(versions) == 1  # rank 1 trained but did not register
    v = versions[0]
    assert StudentRegistry(tmp_path / "students").current_version() == v.version
    assert v.metrics["world_size"] == 2
    assert v.metrics["exact_match"] >= 0.9
    assert "rank 1 of 2 trained" in proc.stdout
    runs = list((tmp_path / "runs").glob("ddp-*"))
    assert len(runs) == 1  # both ranks worked in the one run folder rank 0 chose
