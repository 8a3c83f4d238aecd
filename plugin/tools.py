"""LangChain tools over the understudy: fact search, routed delegation, typed task students.

* :class:`KnowledgeSearchTool` searches the knowledge store for current facts (or the facts as they
  stood at a past time) and returns them keyed and dated.
* :class:`AskUnderstudyTool` delegates a self-contained sub-question to a routed
  :class:`~langchain_understudy.router.ChatUnderstudy`; the result says who answered and why.
* :class:`StudentTool` turns a task-specific student (a classifier, an extractor) into a typed tool
  whose output follows a JSON schema, enforced by grammar-constrained decoding.
* :class:`UnderstudyToolkit` bundles them for an agent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForToolRun,
    CallbackManagerForToolRun,
)
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool, BaseToolkit
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, ConfigDict, Field, model_validator

from langchain_understudy.errors import ConfigError
from langchain_understudy.prompting import message_text

__all__ = [
    "AskUnderstudyInput",
    "AskUnderstudyTool",
    "KnowledgeSearchInput",
    "KnowledgeSearchTool",
    "StudentInput",
    "StudentTool",
    "UnderstudyToolkit",
]


# -- knowledge search -------------------------------------------------------------------------------


class KnowledgeSearchInput(BaseModel):
    """Arguments of :class:`KnowledgeSearchTool`."""

    query: str = Field(min_length=1, max_length=2000, description="What to look up, in words.")
    as_of: str | None = Field(
        default=None,
        description=(
            "An ISO-8601 date or time (e.g. '2024-06-01'): return the facts as they stood then. "
            "Omit for the current facts."
        ),
    )
    k: int | None = Field(default=None, ge=1, le=50, description="How many facts to return.")


def _as_of_text(doc: Document) -> str | None:
    value = (doc.metadata or {}).get("as_of")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value) if value else None


def format_facts(pairs: Sequence[tuple[Document, float]]) -> str:
    """Render scored documents as numbered, keyed, dated lines (what the tool returns).

    Example:
        >>> doc = Document("Pro costs 49 EUR.", id="price.pro", metadata={"as_of": "2026-01-01"})
        >>> format_facts([(doc, 0.91)])
        '[1] (price.pro, as of 2026-01-01, relevance 0.91) Pro costs 49 EUR.'
    """
    lines = []
    for i, (doc, score) in enumerate(pairs, 1):
        tags = [t for t in (doc.id, f"as of {_as_of_text(doc)}" if _as_of_text(doc) else None) if t]
        tags.append(f"relevance {score:.2f}")
        lines.append(f"[{i}] ({', '.join(tags)}) {doc.page_content.strip()}")
    return "\n".join(lines)


class KnowledgeSearchTool(BaseTool):
    """Search the knowledge store for current facts, or for the facts as of a past time.

    The content returned to the model lists the facts one per line with their key, their date and
    a relevance score; the artifact holds the matching LangChain ``Document`` objects.

    Args:
        store: A :class:`~langchain_understudy.retrieval.KnowledgeStore` or any LangChain
            ``VectorStore`` (``as_of`` needs a store that supports it).
        k: Facts returned when the call does not say.
        min_relevance: Facts below this relevance are left out.

    Example:
        >>> from langchain_understudy.retrieval import KnowledgeStore
        >>> tool = KnowledgeSearchTool(store=KnowledgeStore("kb"))  # doctest: +SKIP
        >>> print(tool.invoke({"query": "Pro plan price"}))  # doctest: +SKIP
        [1] (price.pro, as of 2026-01-01, relevance 0.91) The Pro plan costs 49 EUR a month.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "knowledge_search"
    description: str = (
        "Look up facts (plans, prices, limits, policies, ...) in the knowledge store. Returns the "
        "current facts, keyed and dated; pass as_of to see the facts as they stood at a past time."
    )
    args_schema: type[BaseModel] = KnowledgeSearchInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    store: Any
    """The vector store to search."""
    k: int = Field(default=4, ge=1, le=50)
    """Facts returned when the call does not say."""
    min_relevance: float = Field(default=0.0, ge=0.0, le=1.0)
    """Facts below this relevance are left out."""

    @model_validator(mode="after")
    def _check_store(self) -> KnowledgeSearchTool:
        if not hasattr(self.store, "similarity_search_with_relevance_scores"):
            msg = (
                f"store must be a LangChain VectorStore (a KnowledgeStore), got "
                f"{type(self.store).__name__}"
            )
            raise ConfigError(msg)
        return self

    def _search(self, query: str, as_of: str | None, k: int | None) -> tuple[str, list[Document]]:
        kwargs: dict[str, Any] = {"as_of": as_of} if as_of else {}
        pairs = self.store.similarity_search_with_relevance_scores(query, k=k or self.k, **kwargs)
        pairs = [(d, float(s)) for d, s in pairs if float(s) >= self.min_relevance]
        if not pairs:
            when = f" as of {as_of}" if as_of else ""
            return f"No facts found for {query!r}{when}.", []
        return format_facts(pairs), [d for d, _ in pairs]

    def _run(
        self,
        query: str,
        as_of: str | None = None,
        k: int | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, list[Document]]:
        return self._search(query, as_of, k)

    async def _arun(
        self,
        query: str,
        as_of: str | None = None,
        k: int | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, list[Document]]:
        import asyncio

        return await asyncio.to_thread(self._search, query, as_of, k)


# -- delegation to the routed understudy ----------------------------------------------------------------


class AskUnderstudyInput(BaseModel):
    """Arguments of :class:`AskUnderstudyTool`."""

    question: str = Field(
        min_length=1,
        max_length=8000,
        description="A self-contained question; include any context the answer needs.",
    )


def _who(meta: dict[str, Any]) -> str:
    by = meta.get("answered_by", "unknown")
    if by == "student":
        version = meta.get("student_version")
        return f"the local student{f' {version}' if version else ''}"
    if by == "teacher":
        return f"the teacher ({meta.get('teacher_model') or 'unknown model'})"
    return str(by)


class AskUnderstudyTool(BaseTool):
    """Delegate a routine sub-question to the routed understudy.

    The local student answers when the router trusts it and the teacher otherwise. The content
    returned to the model is the answer followed by one line saying who answered and why; the
    artifact is the routing metadata (``response_metadata["understudy"]``).

    Args:
        llm: A :class:`~langchain_understudy.router.ChatUnderstudy` (any chat model works; the
            routing line then says "unknown").
        system: An optional system line sent with every question.

    Example:
        >>> from langchain_understudy.plugin import load_understudy
        >>> tool = AskUnderstudyTool(llm=load_understudy("understudy.toml"))  # doctest: +SKIP
        >>> print(tool.invoke({"question": "What does the Pro plan cost?"}))  # doctest: +SKIP
        The Pro plan costs 49 EUR a month.
        [answered by the local student v3: score 0.05 < threshold 0.50]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "ask_understudy"
    description: str = (
        "Ask a routine, self-contained question (product facts, prices, limits, policies, short "
        "lookups) to a cheaper local assistant that escalates hard questions on its own. The "
        "result says who answered."
    )
    args_schema: type[BaseModel] = AskUnderstudyInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    llm: BaseChatModel
    """The routed chat model."""
    system: str | None = None
    """A system line sent with every question."""

    def _messages(self, question: str) -> list[BaseMessage]:
        msgs: list[BaseMessage] = [SystemMessage(self.system)] if self.system else []
        return [*msgs, HumanMessage(question)]

    @staticmethod
    def _result(answer: BaseMessage) -> tuple[str, dict[str, Any]]:
        meta = dict(answer.response_metadata.get("understudy") or {})
        who = _who(meta) if meta else "unknown"
        reason = meta.get("reason")
        if meta.get("escalation_blocked") and meta.get("blocked_reason"):
            reason = f"{reason}; escalation blocked: {meta['blocked_reason']}"
        line = f"[answered by {who}{f': {reason}' if reason else ''}]"
        artifact = {"answered_by": meta.get("answered_by", "unknown"), **meta}
        return f"{message_text(answer)}\n{line}", artifact

    def _run(
        self, question: str, run_manager: CallbackManagerForToolRun | None = None
    ) -> tuple[str, dict[str, Any]]:
        callbacks = run_manager.get_child() if run_manager is not None else None
        answer = self.llm.invoke(self._messages(question), config={"callbacks": callbacks})
        return self._result(answer)

    async def _arun(
        self, question: str, run_manager: AsyncCallbackManagerForToolRun | None = None
    ) -> tuple[str, dict[str, Any]]:
        callbacks = run_manager.get_child() if run_manager is not None else None
        answer = await self.llm.ainvoke(self._messages(question), config={"callbacks": callbacks})
        return self._result(answer)


# -- typed task students ------------------------------------------------------------------------------


class StudentInput(BaseModel):
    """Default arguments of :class:`StudentTool`: the text the student works on."""

    text: str = Field(min_length=1, max_length=20_000, description="The text to process.")


class StudentTool(BaseTool):
    """A task-specific student (classifier, extractor, ...) as a typed tool.

    The student's output is constrained to ``result_schema`` by grammar-constrained decoding
    (``with_structured_output``), so the tool always returns a JSON object that follows it: the
    content is that object as JSON text and the artifact is the parsed ``dict``.

    The call's arguments become the student's user turn: the single field's value when the input
    schema has one field (the default, ``text``), else the arguments as JSON.

    Args:
        student: A :class:`~langchain_understudy.students.ChatStudent` (or any chat model with
            ``with_structured_output``).
        name: The tool name the agent calls.
        description: What the tool does, for the agent.
        result_schema: A JSON schema ``dict`` or a pydantic model class.
        args_schema: The input model (default :class:`StudentInput`).
        system: A system line for the student (the one it was distilled with, if any).

    Example:
        >>> from langchain_understudy.students import ChatStudent
        >>> tool = StudentTool(  # doctest: +SKIP
        ...     student=ChatStudent(model_path="ticket-router.Q8_0.gguf"),
        ...     name="classify_ticket",
        ...     description="Classify a support ticket by team.",
        ...     result_schema={
        ...         "type": "object",
        ...         "properties": {"team": {"enum": ["billing", "tech", "sales"]}},
        ...         "required": ["team"],
        ...     },
        ... )
        >>> tool.invoke({"text": "I was charged twice"})  # doctest: +SKIP
        '{"team": "billing"}'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "student"
    description: str = "Run a task-specific local student model on a text."
    args_schema: type[BaseModel] = StudentInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    student: BaseChatModel
    """The student model."""
    result_schema: dict[str, Any] | type[BaseModel]
    """The JSON schema the output follows."""
    system: str | None = None
    """System line for the student."""

    @model_validator(mode="after")
    def _check_schema(self) -> StudentTool:
        schema = self.result_json_schema
        if schema.get("type") != "object":
            msg = (
                f"result_schema must describe a JSON object (type 'object'), got type "
                f"{schema.get('type')!r}"
            )
            raise ConfigError(msg)
        return self

    @property
    def result_json_schema(self) -> dict[str, Any]:
        """The output schema as a JSON schema ``dict``."""
        if isinstance(self.result_schema, dict):
            return dict(self.result_schema)
        return convert_to_json_schema(self.result_schema)

    def _user_text(self, kwargs: dict[str, Any]) -> str:
        if len(kwargs) == 1:
            (value,) = kwargs.values()
            if isinstance(value, str):
                return value
        return json.dumps(kwargs, ensure_ascii=False, sort_keys=True, default=str)

    def _messages(self, kwargs: dict[str, Any]) -> list[BaseMessage]:
        msgs: list[BaseMessage] = [SystemMessage(self.system)] if self.system else []
        return [*msgs, HumanMessage(self._user_text(kwargs))]

    def _structured(self) -> Any:
        schema = self.result_json_schema
        if "title" not in schema and "properties" in schema:
            return self.student.with_structured_output(schema)
        return self.student.with_structured_output(schema, method="json_schema")

    @staticmethod
    def _result(parsed: Any) -> tuple[str, dict[str, Any]]:
        if isinstance(parsed, BaseModel):
            parsed = parsed.model_dump(mode="json")
        if isinstance(parsed, AIMessage):  # a model without structured output support
            parsed = json.loads(message_text(parsed))
        out = dict(parsed)
        return json.dumps(out, ensure_ascii=False, sort_keys=True), out

    def _run(
        self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        callbacks = run_manager.get_child() if run_manager is not None else None
        parsed = self._structured().invoke(self._messages(kwargs), config={"callbacks": callbacks})
        return self._result(parsed)

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        callbacks = run_manager.get_child() if run_manager is not None else None
        parsed = await self._structured().ainvoke(
            self._messages(kwargs), config={"callbacks": callbacks}
        )
        return self._result(parsed)


# -- toolkit ----------------------------------------------------------------------------------------------


class UnderstudyToolkit(BaseToolkit):
    """The understudy's tools for an agent: fact search, delegation and task students.

    Args:
        llm: A routed :class:`~langchain_understudy.router.ChatUnderstudy`; adds
            :class:`AskUnderstudyTool`.
        knowledge: A knowledge store; adds :class:`KnowledgeSearchTool`.
        students: Task-specific :class:`StudentTool` instances, added as they are.
        k: Facts returned by the search tool by default.

    Example:
        >>> from langchain_understudy.plugin import load_understudy
        >>> llm = load_understudy("understudy.toml")  # doctest: +SKIP
        >>> tools = UnderstudyToolkit(llm=llm, knowledge=llm.knowledge).get_tools()  # doctest: +SKIP
        >>> [t.name for t in tools]  # doctest: +SKIP
        ['knowledge_search', 'ask_understudy']
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: BaseChatModel | None = None
    """The routed chat model behind ``ask_understudy``."""
    knowledge: Any = None
    """The store behind ``knowledge_search``."""
    students: list[StudentTool] = Field(default_factory=list)
    """Task-specific students."""
    k: int = Field(default=4, ge=1, le=50)
    """Facts returned by ``knowledge_search`` by default."""

    @model_validator(mode="after")
    def _check_any(self) -> UnderstudyToolkit:
        if self.llm is None and self.knowledge is None and not self.students:
            msg = "UnderstudyToolkit needs at least one of llm, knowledge or students"
            raise ConfigError(msg)
        return self

    def get_tools(self) -> list[BaseTool]:
        """Return the tools, search first."""
        tools: list[BaseTool] = []
        if self.knowledge is not None:
            tools.append(KnowledgeSearchTool(store=self.knowledge, k=self.k))
        if self.llm is not None:
            tools.append(AskUnderstudyTool(llm=self.llm))
        tools.extend(self.students)
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            msg = f"tool names must be unique, got {names}; give each StudentTool its own name"
            raise ConfigError(msg)
        return tools
