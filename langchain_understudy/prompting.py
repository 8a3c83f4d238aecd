"""The one prompt format a student sees, in training and in serving.

Every piece of text a student reads is built by :func:`render_prompt`: the distillation job calls it
to build training examples and :class:`~langchain_understudy.students.ChatStudent` calls it to serve a
request. Keeping both on one function is what prevents train/serve skew.

The format is plain text with role markers that a tokenizer trained by the distillation job keeps as
single special tokens (a pretrained base reads them as ordinary text)::

    <|system|>
    You are a helpful assistant.
    <|examples|>
    [1] how much is the pro plan => 49 EUR a month.
    <|facts|>
    [1] (pricing.pro, as of 2026-01-01) The Pro plan costs 49 EUR a month.
    <|user|>
    How much is Pro?
    <|assistant|>
    49 EUR a month.<|end|>

Example:
    >>> from langchain_core.messages import HumanMessage
    >>> print(render_prompt([HumanMessage("hi")]), end="")
    <|user|>
    hi
    <|assistant|>
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

__all__ = [
    "END",
    "EXEMPLARS",
    "ROLE_MARKERS",
    "SPECIAL_TOKENS",
    "Exemplar",
    "Fact",
    "document_to_fact",
    "last_user_text",
    "message_text",
    "model_name_of",
    "render_answer",
    "render_prompt",
    "render_turns",
    "select_facts",
]

SYSTEM = "<|system|>"
FACTS = "<|facts|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
TOOL = "<|tool|>"
EXEMPLARS = "<|examples|>"
END = "<|end|>"
ROLE_MARKERS: dict[str, str] = {
    "system": SYSTEM,
    "facts": FACTS,
    "user": USER,
    "assistant": ASSISTANT,
    "tool": TOOL,
}
#: Tokens a student tokenizer must keep whole; `END` closes every assistant turn.
SPECIAL_TOKENS: tuple[str, ...] = (*ROLE_MARKERS.values(), EXEMPLARS, END)


@dataclass(frozen=True)
class Fact:
    """A retrieved fact as the student sees it.

    Attributes:
        text: The fact's text.
        key: The fact's stable key in the knowledge store, if any.
        as_of: When the fact became true, as an ISO-8601 string, if known.
    """

    text: str
    key: str | None = None
    as_of: str | None = None


@dataclass(frozen=True)
class Exemplar:
    """A past teacher answer to a similar request, shown to the student as a hint.

    Exemplars are how the teacher answered before (the distillation job's exemplar memory);
    facts are how the world is now (the knowledge store). A prompt shows both, in separate
    sections.

    Attributes:
        query: The past request (its last user turn).
        answer: The teacher's answer to it.
    """

    query: str
    answer: str


def document_to_fact(doc: Document) -> Fact:
    """Turn a retrieved LangChain ``Document`` into the :class:`Fact` a prompt shows.

    Key = the document's id, ``as_of`` in ISO-8601. Training (the distillation job) and serving
    (the router) both call this, so the student sees facts written one way.
    """
    as_of = doc.metadata.get("as_of") if doc.metadata else None
    if isinstance(as_of, (datetime, date)):
        as_of = as_of.isoformat()
    return Fact(text=doc.page_content, key=doc.id, as_of=str(as_of) if as_of else None)


def select_facts(
    docs: Iterable[Document],
    k: int,
    *,
    distinct_by: str | None = None,
    details: bool = True,
) -> list[Fact]:
    """Choose the facts a prompt shows from retrieved documents (most relevant first).

    Training (the distillation job) and serving (the router) both call this with the settings the
    student was trained with, so a student always reads facts picked and written one way.

    Args:
        docs: Retrieved documents, most relevant first.
        k: How many facts to keep.
        distinct_by: A metadata key; only the most relevant document per value of it is kept
            (documents without the key are always kept). With past teacher answers stored as
            facts, ``"answer"`` shows ``k`` *different* past answers instead of ``k`` copies of
            the most common one; fetch more than ``k`` documents for it to have a choice.
        details: Show each fact's key and date; ``False`` shows the text alone, which keeps
            prompts short when keys are opaque ids.

    Example:
        >>> docs = [Document("a => x", metadata={"answer": "x"}),
        ...         Document("b => x", metadata={"answer": "x"}),
        ...         Document("c => y", metadata={"answer": "y"})]
        >>> [f.text for f in select_facts(docs, 2, distinct_by="answer")]
        ['a => x', 'c => y']
    """
    out: list[Fact] = []
    seen: set[str] = set()
    for doc in docs:
        if len(out) >= k:
            break
        if distinct_by is not None and doc.metadata and distinct_by in doc.metadata:
            value = json.dumps(doc.metadata[distinct_by], sort_keys=True, default=str)
            if value in seen:
                continue
            seen.add(value)
        fact = document_to_fact(doc)
        out.append(fact if details else Fact(text=fact.text))
    return out


def model_name_of(model: object) -> str:
    """Best-effort name of a LangChain chat model, as traces, metadata and audit logs record it.

    Example:
        >>> from langchain_core.language_models.fake_chat_models import FakeListChatModel
        >>> model_name_of(FakeListChatModel(responses=["x"]))
        'fake-list-chat-model'
    """
    for attr in ("model_name", "model", "model_id", "model_path"):
        v = getattr(model, attr, None)
        if isinstance(v, str):
            if v:
                return v
        elif isinstance(v, os.PathLike):
            return os.path.basename(os.fspath(v))
    llm_type = getattr(model, "_llm_type", None)
    return str(llm_type or type(model).__name__)


def message_text(message: BaseMessage) -> str:
    """Return a message's content as text, tool calls rendered as JSON lines."""
    content = message.content
    if isinstance(content, str):
        text = content
    else:
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        text = "".join(parts)
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = [
            json.dumps({"tool": c["name"], "args": c["args"]}, sort_keys=True)
            for c in message.tool_calls
        ]
        text = "\n".join([t for t in [text, *calls] if t])
    return text.strip()


def last_user_text(messages: Sequence[BaseMessage]) -> str:
    """The text of the last user turn: what facts, exemplars and routing signals are found by."""
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return message_text(m)
    return message_text(messages[-1]) if messages else ""


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(message, ChatMessage):
        return {"human": "user", "ai": "assistant"}.get(message.role, message.role)
    return {"human": "user", "ai": "assistant"}.get(message.type, "user")


def render_turns(messages: Sequence[BaseMessage]) -> list[tuple[str, str]]:
    """Return the conversation as ``(role, text)`` pairs, system messages merged first."""
    system = [message_text(m) for m in messages if _role(m) == "system"]
    turns: list[tuple[str, str]] = []
    if any(system):
        turns.append(("system", "\n".join(s for s in system if s)))
    for m in messages:
        role = _role(m)
        if role == "system":
            continue
        turns.append((role if role in ROLE_MARKERS else "user", message_text(m)))
    return turns


def _render_facts(facts: Sequence[Fact | str]) -> str:
    lines = []
    for i, fact in enumerate(facts, 1):
        if isinstance(fact, str):
            lines.append(f"[{i}] {fact.strip()}")
            continue
        tags = ", ".join(t for t in (fact.key, f"as of {fact.as_of}" if fact.as_of else None) if t)
        prefix = f"[{i}] ({tags}) " if tags else f"[{i}] "
        lines.append(prefix + fact.text.strip())
    return "\n".join(lines)


def _render_exemplars(exemplars: Sequence[Exemplar]) -> str:
    lines = []
    for i, ex in enumerate(exemplars, 1):
        query = " ".join(ex.query.split())
        lines.append(f"[{i}] {query} => {ex.answer.strip()}")
    return "\n".join(lines)


def render_prompt(
    messages: Sequence[BaseMessage],
    facts: Sequence[Fact | str] | None = None,
    *,
    system: str | None = None,
    exemplars: Sequence[Exemplar] | None = None,
) -> str:
    r"""Render a conversation (and retrieved facts) as the text a student continues.

    Args:
        messages: The conversation so far; its last message is normally the user's turn.
            A trailing assistant message is *not* included: the prompt always ends with the
            assistant marker the student completes.
        facts: Facts retrieved for this turn, most relevant first; placed after the system
            line and before the conversation.
        system: A default system line used when the conversation has none.
        exemplars: Past teacher answers to similar requests (most similar first), placed
            before the facts.

    Returns:
        The prompt text, ending with ``"<|assistant|>\\n"``.
    """
    turns = render_turns(messages)
    if turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    if system and not (turns and turns[0][0] == "system"):
        turns.insert(0, ("system", system))
    out: list[str] = []
    body = turns
    if turns and turns[0][0] == "system":
        out.append(f"{SYSTEM}\n{turns[0][1]}\n")
        body = turns[1:]
    if exemplars:
        out.append(f"{EXEMPLARS}\n{_render_exemplars(exemplars)}\n")
    if facts:
        out.append(f"{FACTS}\n{_render_facts(facts)}\n")
    for role, text in body:
        marker = ROLE_MARKERS[role]
        close = END if role == "assistant" else ""
        out.append(f"{marker}\n{text}{close}\n")
    out.append(f"{ASSISTANT}\n")
    return "".join(out)


def render_answer(answer: str | BaseMessage) -> str:
    """Render the assistant's answer as the training target that follows :func:`render_prompt`."""
    text = message_text(answer) if isinstance(answer, BaseMessage) else answer.strip()
    return f"{text}{END}"
