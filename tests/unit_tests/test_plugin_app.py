"""`understudy init`, the chat REPL (driven through stdin/stdout) and the demo's stand-in teacher."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage

from langchain_understudy.config import load_config
from langchain_understudy.errors import ConfigError
from langchain_understudy.plugin import _cli_app
from langchain_understudy.plugin.chat_repl import ChatREPL
from langchain_understudy.plugin.demo import StandInTeacher, load_company
from langchain_understudy.retrieval import KnowledgeStore
from langchain_understudy.router import ChatUnderstudy


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    _cli_app.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_init_writes_a_config_that_load_config_accepts(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "understudy.toml"
    assert _cli(["init", str(path)]) == 0
    text = path.read_text()
    assert text.count("#") > 30  # commented
    cfg = load_config(path)
    assert cfg.teacher.kind == "none" and cfg.router.threshold == 0.5
    assert cfg.student.registry == path.parent / ".understudy" / "students"
    assert cfg.knowledge.path == path.parent / ".understudy" / "knowledge"
    assert cfg.server.host == "127.0.0.1"
    assert _cli(["init", str(path)]) == 1  # never overwrites silently
    assert _cli(["init", str(path), "--force"]) == 0


def test_every_starter_field_is_a_real_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # uncommenting the optional lines must still give a valid config
    lines = []
    for line in _cli_app.STARTER_CONFIG.splitlines():
        stripped = line.lstrip("# ")
        if line.startswith("# ") and "=" in stripped and not stripped.startswith(("e.g", "Or")):
            key = stripped.split("=")[0].strip()
            if key.isidentifier():
                line = stripped
        lines.append(line)
    path = tmp_path / "full.toml"
    path.write_text("\n".join(lines))
    monkeypatch.setenv("UNDERSTUDY_ROUTER__THRESHOLD", "0.25")
    cfg = load_config(path)
    assert cfg.teacher.calls_per_minute == 60 and cfg.student.n_threads == 4
    assert cfg.router.threshold == 0.25  # the environment wins over the file


def test_serve_refuses_a_public_address_without_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("UNDERSTUDY_API_KEY", raising=False)
    (tmp_path / "u.toml").write_text('[student]\nregistry = "nothing-here"\n')
    # refused before any model is loaded (the registry here is empty)
    with pytest.raises(ConfigError, match="refusing to listen on '0.0.0.0'"):
        _cli(["serve", "--config", str(tmp_path / "u.toml"), "--host", "0.0.0.0"])


def _store(tmp_path: Path) -> KnowledgeStore:
    store = KnowledgeStore(tmp_path / "kb", DeterministicFakeEmbedding(size=16))
    store.add_texts(
        ["The Pro plan costs 49 EUR a month."], [{"as_of": "2026-01-01"}], ids=["price.pro"]
    )
    return store


def _repl(llm: ChatUnderstudy, script: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = ChatREPL(llm, stdin=io.StringIO(script), stdout=out, show_prompt=True).run()
    return rc, out.getvalue()


def test_repl_streams_and_says_everything_is_local_without_a_teacher(tmp_path: Path) -> None:
    student = FakeListChatModel(responses=["The Pro plan costs 49 EUR a month."] * 3)
    llm = ChatUnderstudy(student=student, knowledge=_store(tmp_path), mode="pre")
    rc, out = _repl(
        llm, "How much is Pro?\n/why\n/facts\n/facts pro price\n/reset\n/why\n/bogus\n/exit\n"
    )
    assert rc == 0
    assert "no teacher configured: everything is answered locally" in out
    assert "you> The Pro plan costs 49 EUR a month.\n" in out
    assert "answered locally]" in out
    assert "answered_by: student" in out and "threshold: 0.5" in out
    assert "(price.pro, as of 2026-01-01) The Pro plan costs 49 EUR a month." in out
    assert "relevance" in out  # /facts QUERY searched the store
    assert "conversation cleared" in out and "nothing answered yet" in out
    assert "unknown command /bogus" in out


def test_repl_shows_the_teacher_and_why(tmp_path: Path) -> None:
    student = FakeListChatModel(responses=["student answer"] * 3)
    teacher = FakeListChatModel(responses=["teacher answer"] * 3)
    llm = ChatUnderstudy(student=student, teacher=teacher, mode="pre")
    script = "How much is the Pro plan?\nAnd what about the other one, same again?\n/why\n"
    rc, out = _repl(llm, script)  # ends at end of input
    assert rc == 0
    assert "teacher:" in out.splitlines()[0]
    assert "student answer" in out and "teacher answer" in out
    assert "[teacher" in out and "depends_on_history" in out


def test_stand_in_teacher_resolves_follow_ups(tmp_path: Path) -> None:
    store = KnowledgeStore(tmp_path / "kb", DeterministicFakeEmbedding(size=16))
    store.add_texts(
        ["The Pro plan costs 49 EUR a month.", "The Team plan costs 99 EUR a month.",
         "The Business plan includes 5000 GB of storage.", "The free trial lasts 14 days."],
        ids=["price.pro", "price.team", "storage.business", "policy.trial"],
    )  # fmt: skip
    t = StandInTeacher(store=store, company=load_company())
    assert t.invoke("How much is the Pro plan?").content == "The Pro plan costs 49 EUR a month."
    follow = [HumanMessage("How much does the Pro plan cost?"), AIMessage("49 EUR"),
              HumanMessage("And what about the Team plan?")]  # fmt: skip
    assert t.resolve_key(follow) == "price.team"
    same = [HumanMessage("How much storage does the Pro plan include?"), AIMessage("…"),
            HumanMessage("Same question for Business.")]  # fmt: skip
    assert t.resolve_key(same) == "storage.business"
    assert t.resolve_key([HumanMessage("How long is the free trial?")]) == "policy.trial"
    assert "can only help" in str(t.invoke("Write a poem about the sea.").content)
    assert "stand-in" in t.model_name and "not an LLM" in t.model_name


def make_fake_teacher() -> FakeListChatModel:
    return FakeListChatModel(responses=["The Pro plan costs 49 EUR a month."])


def test_demo_uses_a_configured_teacher_grounded_in_the_facts(tmp_path: Path) -> None:
    from langchain_understudy.plugin.demo import QUICK, _Demo

    store = _store(tmp_path)
    cfg = tmp_path / "understudy.toml"
    cfg.write_text(
        f'[teacher]\nkind = "import"\nfactory = "{Path(__file__).stem}:make_fake_teacher"\n'
    )
    demo = _Demo(tmp_path / "d", QUICK, cfg, None, io.StringIO(), False)
    teacher, kind = demo.teacher(store)
    assert kind == "real" and teacher.model_name == "fake-list-chat-model"
    assert teacher.invoke("How much is Pro?").content == "The Pro plan costs 49 EUR a month."
    cfg.write_text('[teacher]\nkind = "none"\n')
    assert demo.teacher(store)[1] == "stand-in"
