"""Configuration loading/overrides and the single prompt format."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_understudy.config import UnderstudyConfig, load_config
from langchain_understudy.errors import ConfigError
from langchain_understudy.prompting import END, Fact, render_answer, render_prompt


def test_toml_then_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "understudy.toml"
    cfg_file.write_text(
        '[student]\nregistry = "students"\nn_ctx = 1024\n[router]\nthreshold = 0.3\n'
    )
    monkeypatch.setenv("UNDERSTUDY_ROUTER__THRESHOLD", "0.7")
    cfg = load_config(cfg_file)
    assert cfg.student.n_ctx == 1024
    assert cfg.student.registry == tmp_path / "students"  # relative to the file
    assert cfg.router.threshold == 0.7  # environment wins


def test_invalid_values_say_what_is_accepted(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nthreshold = 3\n")
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        load_config(bad)
    bad.write_text("[student]\nunknown_field = 1\n")
    with pytest.raises(ConfigError, match="unknown_field"):
        load_config(bad)
    bad.write_text("[teacher]\nkind = 'import'\nfactory = 'no_colon'\n")
    with pytest.raises(ConfigError, match="must be 'module:callable'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="understudy init"):
        load_config(tmp_path / "missing.toml")
    bad.write_text("[student\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_defaults_are_local_and_safe() -> None:
    cfg = UnderstudyConfig()
    assert cfg.server.host == "127.0.0.1"
    assert cfg.teacher.kind == "none"


def test_prompt_format_is_stable() -> None:
    prompt = render_prompt(
        [
            SystemMessage("Be brief."),
            HumanMessage("Price of Pro?"),
            AIMessage("49 EUR."),
            HumanMessage("And Team?"),
        ],
        [Fact("Team costs 99 EUR.", key="price.team", as_of="2026-01-01"), "Free plan exists."],
    )
    assert prompt == (
        "<|system|>\nBe brief.\n"
        "<|facts|>\n[1] (price.team, as of 2026-01-01) Team costs 99 EUR.\n[2] Free plan exists.\n"
        "<|user|>\nPrice of Pro?\n"
        "<|assistant|>\n49 EUR.<|end|>\n"
        "<|user|>\nAnd Team?\n"
        "<|assistant|>\n"
    )
    assert render_answer(" 99 EUR. ") == f"99 EUR.{END}"


def test_prompt_renders_tool_calls_and_tool_results() -> None:
    ai = AIMessage("", tool_calls=[{"name": "search", "args": {"q": "pro"}, "id": "1"}])
    prompt = render_prompt(
        [HumanMessage("hi"), ai, ToolMessage("found", tool_call_id="1"), HumanMessage("ok")]
    )
    assert '<|assistant|>\n<|call|>[{"name": "search", "arguments": {"q": "pro"}}]<|end|>' in prompt
    # an OpenAI-format result carries only the call's id: it is named after the call it answers,
    # as LangChain's tool node names it
    assert "<|tool|>\nsearch: found\n" in prompt
    assert prompt == render_prompt(
        [
            HumanMessage("hi"),
            ai,
            ToolMessage("found", tool_call_id="1", name="search"),
            HumanMessage("ok"),
        ]
    )
    assert "<|tool|>\nfound\n" in render_prompt(
        [HumanMessage("hi"), ToolMessage("found", tool_call_id="9")]
    )
    # a trailing assistant message (the answer) is never part of the prompt
    assert render_prompt([HumanMessage("q"), AIMessage("a")]) == render_prompt([HumanMessage("q")])
    assert render_prompt([HumanMessage("q")], system="S").startswith("<|system|>\nS\n")


def test_tools_section_and_call_blocks_round_trip() -> None:
    from langchain_core.tools import tool

    from langchain_understudy.prompting import (
        answer_text,
        render_answer,
        split_answer,
        tool_specs,
    )

    @tool
    def book(city: str, nights: int, budget: float | None = None) -> str:
        """Book a hotel."""
        return "ok"

    specs = tool_specs([book, {"type": "function", "function": {"name": "now"}}])
    assert [s["name"] for s in specs] == ["book", "now"]
    assert specs[1]["parameters"] == {"type": "object", "properties": {}}
    prompt = render_prompt([HumanMessage("book Paris")], system="S", tools=specs)
    # the tools follow the system line, one signature per line, before the conversation
    head, rest = prompt.split("<|tools|>\n", 1)
    assert head == "<|system|>\nS\n"
    lines = rest.split("<|user|>")[0].strip().splitlines()
    assert lines == ["book(city, nights: integer, budget?: number|null): Book a hotel.", "now()"]
    # arguments follow the schema's order (required first), whatever order the teacher used
    ai = AIMessage(
        "Booking.",
        tool_calls=[
            {"name": "book", "args": {"budget": 90.0, "nights": 2, "city": "Paris"}, "id": "x"}
        ],
    )
    text = answer_text(ai, specs)
    assert text == (
        'Booking.\n<|call|>[{"name": "book", "arguments": '
        '{"city": "Paris", "nights": 2, "budget": 90.0}}]'
    )
    assert render_answer(ai, specs) == text + "<|end|>"
    assert split_answer(text) == (
        "Booking.",
        [{"name": "book", "args": {"city": "Paris", "nights": 2, "budget": 90.0}}],
    )
    tool_result = ToolMessage("sunny", tool_call_id="x", name="weather")
    assert "<|tool|>\nweather: sunny\n" in render_prompt([HumanMessage("q"), ai, tool_result])
    with pytest.raises(ValueError, match="JSON array"):
        split_answer('<|call|>{"name": "x"}')


def test_the_readme_configuration_reference_is_generated_from_the_models() -> None:
    from langchain_understudy.config import reference_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert reference_table() in readme, (
        "README's configuration table is stale: replace it with the output of "
        "`python -c 'from langchain_understudy.config import reference_table as r; print(r())'`"
    )
