"""Plugin tools: the langchain-tests unit suite for each tool, plus the toolkit and formatting."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_tests.unit_tests import ToolsUnitTests

import langchain_understudy.plugin as plugin
from langchain_understudy.errors import ConfigError
from langchain_understudy.plugin.tools import (
    AskUnderstudyTool,
    KnowledgeSearchTool,
    StudentTool,
    UnderstudyToolkit,
    format_facts,
)
from langchain_understudy.retrieval import KnowledgeStore

COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
}


def _store() -> KnowledgeStore:
    store = KnowledgeStore(Path(tempfile.mkdtemp()) / "kb", DeterministicFakeEmbedding(size=16))
    store.add_texts(
        ["The Pro plan costs 49 EUR a month."], [{"as_of": "2026-01-01"}], ids=["price.pro"]
    )
    return store


def _fake_llm() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage("fine")] * 10))


class TestKnowledgeSearchToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[KnowledgeSearchTool]:
        return KnowledgeSearchTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"store": _store()}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"query": "Pro plan price", "as_of": "2026-02-01", "k": 2}


class TestAskUnderstudyToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[AskUnderstudyTool]:
        return AskUnderstudyTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"llm": _fake_llm()}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": "What does the Pro plan cost?"}


class TestStudentToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[StudentTool]:
        return StudentTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {
            "student": _fake_llm(),
            "name": "color_of",
            "description": "Name the colour stated in a sentence.",
            "result_schema": COLOR_SCHEMA,
        }

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"text": "What color is the car? It is red."}


def test_public_names_are_pinned() -> None:
    assert plugin.__all__ == [
        "AskUnderstudyTool",
        "KnowledgeSearchTool",
        "StudentTool",
        "UnderstudyToolkit",
        "load_understudy",
    ]
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None


def test_format_facts_is_keyed_dated_and_scored() -> None:
    doc = Document("Pro costs 49 EUR.", id="price.pro", metadata={"as_of": "2026-01-01"})
    plain = Document("No key, no date.")
    assert format_facts([(doc, 0.912), (plain, 0.5)]) == (
        "[1] (price.pro, as of 2026-01-01, relevance 0.91) Pro costs 49 EUR.\n"
        "[2] (relevance 0.50) No key, no date."
    )


def test_knowledge_search_returns_facts_and_documents() -> None:
    tool = KnowledgeSearchTool(store=_store(), k=3)
    text = tool.invoke({"query": "price"})
    assert "price.pro" in text and "49 EUR" in text
    msg = tool.invoke({"type": "tool_call", "id": "1", "name": tool.name, "args": {"query": "x"}})
    assert msg.artifact[0].id == "price.pro"
    # before the fact existed there is nothing to return, and the tool says so
    assert tool.invoke({"query": "price", "as_of": "2020-01-01"}).startswith("No facts found")


def test_knowledge_search_rejects_a_non_store() -> None:
    with pytest.raises(ConfigError, match="VectorStore"):
        KnowledgeSearchTool(store=object())


def test_student_tool_needs_an_object_schema() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        StudentTool(student=_fake_llm(), result_schema={"type": "string"})


def test_ask_understudy_says_who_answered_even_for_a_plain_model() -> None:
    tool = AskUnderstudyTool(llm=_fake_llm())
    assert tool.invoke({"question": "hi"}) == "fine\n[answered by unknown]"


def test_toolkit_lists_tools_and_refuses_duplicates() -> None:
    student = StudentTool(student=_fake_llm(), name="color_of", result_schema=COLOR_SCHEMA)
    kit = UnderstudyToolkit(llm=_fake_llm(), knowledge=_store(), students=[student])
    assert [t.name for t in kit.get_tools()] == ["knowledge_search", "ask_understudy", "color_of"]
    clash = StudentTool(student=_fake_llm(), name="ask_understudy", result_schema=COLOR_SCHEMA)
    with pytest.raises(ConfigError, match="unique"):
        UnderstudyToolkit(llm=_fake_llm(), students=[clash]).get_tools()
    with pytest.raises(ConfigError, match="at least one"):
        UnderstudyToolkit()
