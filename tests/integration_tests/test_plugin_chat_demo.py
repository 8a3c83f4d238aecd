"""`load_understudy` from a config file, `understudy chat` driven through a real process's stdin,
and the demo end to end in its quick mode."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import COLORS
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import BaseChatModel, FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage

from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.errors import ArtifactError
from langchain_understudy.plugin import load_understudy
from langchain_understudy.plugin.demo import run_demo
from langchain_understudy.retrieval import KnowledgeStore
from langchain_understudy.students import StudentRegistry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def make_teacher() -> BaseChatModel:
    """Teacher factory named by `teacher.factory` in the test config."""
    return FakeListChatModel(responses=["the teacher's answer"] * 10)


@pytest.fixture(scope="module")
def home(trained_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("home")
    reg = StudentRegistry(d / "students")
    reg.promote(reg.register(trained_gguf, {"teacher_model": "teacher-test"}, {"exact_match": 1.0}))
    store = KnowledgeStore(d / "kb", DeterministicFakeEmbedding(size=16))
    store.add_texts(["Cars in the showroom are red."], [{"as_of": "2026-01-01"}], ids=["cars"])
    (d / "local.toml").write_text(
        '[student]\nregistry = "students"\nn_ctx = 256\nmax_tokens = 8\n'
        '[router]\nmode = "pre"\naudit_log = "audit.jsonl"\n'
    )
    (d / "teacher.toml").write_text(
        '[student]\nregistry = "students"\nn_ctx = 256\nmax_tokens = 8\n'
        '[knowledge]\npath = "kb"\nk = 1\n'
        '[router]\nmode = "pre"\n'
        f'[teacher]\nkind = "import"\nfactory = "{Path(__file__).stem}:make_teacher"\n'
        '[traces]\npath = "traces.sqlite"\n'
    )
    return d


def test_load_understudy_wires_student_store_teacher_and_recorder(home: Path) -> None:
    llm = load_understudy(home / "teacher.toml", embeddings=DeterministicFakeEmbedding(size=16))
    assert llm.current_student().student_version == "v1"
    assert llm.knowledge is not None and llm.k == 1
    msg = llm.invoke("What color is the car 2? It is red.")
    meta = msg.response_metadata["understudy"]
    assert meta["facts"] == ["cars"] and meta["student_version"] == "v1"
    follow = llm.invoke([HumanMessage("What color is the car 2? It is red."), AIMessage("red"),
                         HumanMessage("and the other one, same again?")])  # fmt: skip
    assert follow.response_metadata["understudy"]["answered_by"] == "teacher"
    assert follow.content == "the teacher's answer"
    teacher_answers = [m for m in (msg, follow)
                       if m.response_metadata["understudy"]["answered_by"] == "teacher"]  # fmt: skip
    recorder = llm.trace_callbacks[0]
    recorder.flush()
    traces = list(TraceStore(home / "traces.sqlite").iter_traces())  # teacher calls only
    assert [t.answer.content for t in traces] == [m.content for m in teacher_answers]


def test_load_understudy_fails_early_without_a_promoted_student(tmp_path: Path) -> None:
    (tmp_path / "u.toml").write_text('[student]\nregistry = "empty"\n')
    with pytest.raises(ArtifactError, match="no student is promoted"):
        load_understudy(tmp_path / "u.toml")


def test_chat_command_through_stdin(home: Path) -> None:
    runner = textwrap.dedent(
        """
        import argparse, sys
        from langchain_understudy.plugin import _cli_app
        parser = argparse.ArgumentParser()
        _cli_app.register(parser.add_subparsers())
        args = parser.parse_args(sys.argv[1:])
        sys.exit(args.func(args))
        """
    )
    script = "What color is the tree 6? It is black.\n/why\n/facts\n/reset\n/exit\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", runner, "chat", "--config", str(home / "local.toml")],
        input=script, capture_output=True, text=True, timeout=120, env=env, cwd=home,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "student v1" in out[0] and "no teacher configured" in out[0]
    assert out[2].strip() in COLORS  # the streamed answer
    assert out[3].startswith("[student v1") and "answered locally]" in out[3]
    assert any(line.strip() == "answered_by: student" for line in out)
    assert "no knowledge store configured" in proc.stdout
    assert "conversation cleared" in proc.stdout
    assert (home / "audit.jsonl").exists()


def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(
        tmp_path / "demo",
        quick=True,
        embeddings=DeterministicFakeEmbedding(size=32),
        out=out,
        progress=False,
    )
    text = out.getvalue()
    for n in range(1, 6):
        assert f"[{n}/5]" in text
    assert result.job_status == "promoted" and result.version == "v1"
    assert "stand-in teacher" in text and "generated by bench/make_demo_traces.py" in text
    assert len(result.rows) == 16 and "answered by" in text and "correct" in text
    by_q = {r.question: r for r in result.rows}
    # follow-ups and out-of-scope requests go to the (stand-in) teacher, which gets them right
    for q in ("And what about the Team plan?", "Write a short poem about the sea."):
        assert by_q[q].answered_by == "teacher" and by_q[q].correct
    assert result.before is not None and result.after is not None
    assert result.after.meta["student_version"] == "v1"  # no retraining
    # the drift watch's held-out reference carries the knowledge store's relevance too
    v1 = StudentRegistry(tmp_path / "demo" / "students").get("v1")
    ref = json.loads(v1.artifact("signal_reference.json").read_text())["signals"]
    assert len(ref["retrieval_similarity"]) == v1.provenance["n_heldout"] > 0
    assert all(0.0 <= x <= 1.0 for x in ref["retrieval_similarity"])
    assert len(ref["answer_entropy"]) == v1.provenance["n_heldout"]  # the student's own answers
    assert all(x >= 0.0 for x in ref["answer_entropy"])
    assert result.after.meta["answer_entropy"] >= 0.0  # what the drift watch compares with it
    report = result.report
    assert report is not None and report.is_file()
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 2 and "quality vs teacher-call rate" in html
    assert str(report.resolve()) in text
    assert (tmp_path / "demo" / "understudy.toml").is_file()
    # a second run clears its own folder and starts again
    again = run_demo(tmp_path / "demo", quick=True, embeddings=DeterministicFakeEmbedding(size=32),
                     out=io.StringIO(), progress=False)  # fmt: skip
    assert again.version == "v1"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    from langchain_understudy.errors import ConfigError

    with pytest.raises(ConfigError, match="not made by `understudy demo`"):
        run_demo(tmp_path, quick=True, out=io.StringIO(), progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
