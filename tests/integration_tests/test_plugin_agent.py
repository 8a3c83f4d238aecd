"""Plugin tools against a real store and a real GGUF student: the langchain-tests integration suite
for each tool, and a real ``create_agent`` agent whose scripted model calls them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import COLORS
from langchain.agents import create_agent
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_tests.integration_tests import ToolsIntegrationTests
from pydantic import PrivateAttr

from langchain_understudy.plugin import (
    AskUnderstudyTool,
    KnowledgeSearchTool,
    StudentTool,
    UnderstudyToolkit,
)
from langchain_understudy.retrieval import KnowledgeStore
from langchain_understudy.router import ChatUnderstudy
from langchain_understudy.students import ChatStudent

pytestmark = pytest.mark.slow

COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": COLORS}},
    "required": ["color"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeStore:
    s = KnowledgeStore(tmp_path_factory.mktemp("kb") / "kb", DeterministicFakeEmbedding(size=32))
    s.add_texts(
        ["The Pro plan costs 39 EUR a month."], [{"as_of": "2025-01-01"}], ids=["price.pro"]
    )
    s.add_texts(
        ["The Pro plan costs 49 EUR a month."], [{"as_of": "2026-01-01"}], ids=["price.pro"]
    )
    s.add_texts(["Refunds are available within 30 days."], [{"as_of": "2026-01-01"}],
                ids=["policy.refund"])  # fmt: skip
    return s


@pytest.fixture(scope="module")
def student(trained_gguf: Path) -> ChatStudent:
    return ChatStudent(model_path=trained_gguf, n_ctx=256, max_tokens=8)


@pytest.fixture(scope="module")
def json_student(trained_gguf: Path) -> ChatStudent:
    return ChatStudent(model_path=trained_gguf, n_ctx=256, max_tokens=32)


@pytest.fixture(scope="module")
def understudy(student: ChatStudent) -> ChatUnderstudy:
    return ChatUnderstudy(student=student, mode="pre")


class TestKnowledgeSearchToolIntegration(ToolsIntegrationTests):
    @pytest.fixture
    def tool(self, store: KnowledgeStore) -> KnowledgeSearchTool:  # type: ignore[override]
        return KnowledgeSearchTool(store=store)

    @property
    def tool_constructor(self) -> type[KnowledgeSearchTool]:
        return KnowledgeSearchTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"query": "Pro plan price", "as_of": "2025-06-01", "k": 1}


class TestAskUnderstudyToolIntegration(ToolsIntegrationTests):
    @pytest.fixture
    def tool(self, understudy: ChatUnderstudy) -> AskUnderstudyTool:  # type: ignore[override]
        return AskUnderstudyTool(llm=understudy)

    @property
    def tool_constructor(self) -> type[AskUnderstudyTool]:
        return AskUnderstudyTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": "What color is the lamp 3? It is green."}


class TestStudentToolIntegration(ToolsIntegrationTests):
    @pytest.fixture
    def tool(self, json_student: ChatStudent) -> StudentTool:  # type: ignore[override]
        return StudentTool(student=json_student, name="color_of", result_schema=COLOR_SCHEMA,
                           description="Name the colour stated in a sentence.")  # fmt: skip

    @property
    def tool_constructor(self) -> type[StudentTool]:
        return StudentTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"text": "What color is the boat 12? It is purple."}


def test_knowledge_search_time_travel(store: KnowledgeStore) -> None:
    tool = KnowledgeSearchTool(store=store, k=2)  # both current facts (fake embeddings)
    now = tool.invoke({"query": "Pro plan price"})
    assert "49 EUR" in now and "39 EUR" not in now
    old = tool.invoke({"query": "Pro plan price", "as_of": "2025-06-01"})
    assert "39 EUR" in old and "as of 2025-01-01" in old and "Refunds" not in old


def test_student_tool_output_follows_the_schema(json_student: ChatStudent) -> None:
    tool = StudentTool(student=json_student, name="color_of", result_schema=COLOR_SCHEMA)
    for text in ("What color is the car 1? It is red.", "What color is the tree 2? It is blue."):
        out = json.loads(tool.invoke({"text": text}))
        assert set(out) == {"color"} and out["color"] in COLORS


def test_ask_understudy_reports_the_student(understudy: ChatUnderstudy) -> None:
    text = AskUnderstudyTool(llm=understudy).invoke(
        {"question": "What color is the dog 5? It is red."}
    )
    answer, line = text.rsplit("\n", 1)
    assert answer.strip() in COLORS
    assert line.startswith("[answered by the local student") and "threshold" in line


class ScriptedToolCaller(BaseChatModel):
    """A tool-calling chat model that follows a script: tool calls first, then a final answer.

    The final answer quotes every tool result it was sent, so the test can see that the results
    reached the model.
    """

    script: list[list[dict[str, Any]]]
    _turn: int = PrivateAttr(default=0)
    _seen: list[list[BaseMessage]] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedToolCaller:  # type: ignore[override]
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:  # fmt: skip
        self._seen.append(list(messages))
        if self._turn < len(self.script):
            calls = self.script[self._turn]
            msg = AIMessage(content="", tool_calls=[
                {"name": c["name"], "args": c["args"], "id": f"call_{self._turn}_{i}", "type": "tool_call"}
                for i, c in enumerate(calls)
            ])  # fmt: skip
        else:
            results = [m.content for m in messages if isinstance(m, ToolMessage)]
            msg = AIMessage(content="FINAL: " + " | ".join(str(r) for r in results))
        self._turn += 1
        return ChatResult(generations=[ChatGeneration(message=msg)])


def test_agent_calls_the_tools_and_sees_their_results(
    store: KnowledgeStore, json_student: ChatStudent, understudy: ChatUnderstudy
) -> None:
    color_tool = StudentTool(student=json_student, name="color_of", result_schema=COLOR_SCHEMA,
                             description="Name the colour stated in a sentence.")  # fmt: skip
    tools = UnderstudyToolkit(llm=understudy, knowledge=store, students=[color_tool]).get_tools()
    model = ScriptedToolCaller(
        script=[
            [{"name": "knowledge_search", "args": {"query": "Pro plan price", "k": 2}}],
            [
                {
                    "name": "ask_understudy",
                    "args": {"question": "What color is the cat 9? It is white."},
                },
                {"name": "color_of", "args": {"text": "What color is the house 4? It is orange."}},
            ],
        ]
    )
    agent = create_agent(model, tools)
    state = agent.invoke(
        {"messages": [{"role": "user", "content": "Tell me about Pro and colours."}]}
    )
    msgs = state["messages"]
    tool_msgs = [m for m in msgs if isinstance(m, ToolMessage)]
    assert [m.name for m in tool_msgs] == ["knowledge_search", "ask_understudy", "color_of"]
    assert "price.pro" in tool_msgs[0].content and "49 EUR" in tool_msgs[0].content
    assert "price.pro" in [d.id for d in tool_msgs[0].artifact]
    assert "[answered by the local student" in tool_msgs[1].content
    assert tool_msgs[1].artifact["answered_by"] == "student"
    assert json.loads(tool_msgs[2].content)["color"] in COLORS
    # the model was sent every tool result, and its final answer quotes them
    final = msgs[-1]
    assert isinstance(final, AIMessage) and final.content.startswith("FINAL: ")
    for m in tool_msgs:
        assert str(m.content) in final.content
    last_input = model._seen[-1]
    assert sum(isinstance(m, ToolMessage) for m in last_input) == 3
