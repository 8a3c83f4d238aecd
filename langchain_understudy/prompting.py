"""The one prompt format a student sees, in training and in serving.

Every piece of text a student reads is built by :func:`render_prompt`: the distillation job calls it
to build training examples and :class:`~langchain_understudy.students.ChatStudent` calls it to serve a
request. Keeping both on one function is what prevents train/serve skew.

The format is plain text with role markers that a tokenizer trained by the distillation job keeps as
single special tokens (a pretrained base reads them as ordinary text)::

    <|system|>
    You are a helpful assistant.
    <|tools|>
    get_price(plan: basic|pro): Price of a plan.
    <|examples|>
    [1] how much is the pro plan => 49 EUR a month.
    <|facts|>
    [1] (pricing.pro, as of 2026-01-01) The Pro plan costs 49 EUR a month.
    <|user|>
    How much is Pro?
    <|assistant|>
    49 EUR a month.<|end|>

Tool calls are part of the answer: an assistant turn that calls tools ends with ``<|call|>`` and a
JSON array of ``{"name": ..., "arguments": {...}}`` objects (arguments in the order the tool's
schema lists them, required ones first, which is the order the serving grammar allows), and a
tool's result is a ``<|tool|>`` turn::

    <|assistant|>
    <|call|>[{"name": "get_price", "arguments": {"plan": "pro"}}]<|end|>
    <|tool|>
    get_price: 49 EUR a month
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

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
    "CALL",
    "END",
    "EXEMPLARS",
    "TOOLS",
    "ROLE_MARKERS",
    "SPECIAL_TOKENS",
    "Exemplar",
    "Fact",
    "document_to_fact",
    "answer_text",
    "drop_oldest",
    "last_user_text",
    "message_text",
    "order_arguments",
    "model_name_of",
    "render_answer",
    "render_prompt",
    "render_turns",
    "select_facts",
    "split_answer",
    "tool_signature",
    "tool_specs",
]

SYSTEM = "<|system|>"
FACTS = "<|facts|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
TOOL = "<|tool|>"
EXEMPLARS = "<|examples|>"
TOOLS = "<|tools|>"
CALL = "<|call|>"
END = "<|end|>"
ROLE_MARKERS: dict[str, str] = {
    "system": SYSTEM,
    "facts": FACTS,
    "user": USER,
    "assistant": ASSISTANT,
    "tool": TOOL,
}
#: Tokens a student tokenizer must keep whole; `END` closes every assistant turn.
SPECIAL_TOKENS: tuple[str, ...] = (*ROLE_MARKERS.values(), EXEMPLARS, END, TOOLS, CALL)


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


def _content_text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content.strip()
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts).strip()


def message_text(message: BaseMessage) -> str:
    """Return a message's content as text, tool calls rendered as JSON lines.

    This is the text that keys, signals and logs use; the text a *student* reads and writes
    for a tool-calling turn is :func:`answer_text`.
    """
    text = _content_text(message)
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


def tool_specs(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Normalise bound tools to ``{"name", "description", "parameters"}`` dicts.

    Accepts what ``bind_tools`` accepts: OpenAI tool dicts (``{"type": "function", "function":
    {...}}``), bare function dicts, LangChain tools, pydantic models and typed functions. The
    parameters always come out as a JSON-schema object (``{"type": "object", "properties": {}}``
    for a tool without arguments).

    Example:
        >>> tool_specs([{"type": "function", "function": {"name": "now"}}])
        [{'name': 'now', 'description': '', 'parameters': {'type': 'object', 'properties': {}}}]
    """
    from langchain_core.utils.function_calling import convert_to_openai_tool

    out: list[dict[str, Any]] = []
    for tool in tools or ():
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            fn: Mapping[str, Any] = tool["function"]
        elif isinstance(tool, Mapping) and "name" in tool and "parameters" in tool:
            fn = tool
        else:
            fn = convert_to_openai_tool(tool)["function"]
        params = dict(fn.get("parameters") or {})
        params.setdefault("type", "object")
        if params["type"] == "object":
            params.setdefault("properties", {})
        out.append(
            {
                "name": str(fn["name"]),
                "description": str(fn.get("description") or ""),
                "parameters": params,
            }
        )
    return out


def order_arguments(
    args: Mapping[str, Any], parameters: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Order a call's arguments as the serving grammar writes them.

    Required properties first, then optional ones, each in the schema's order; arguments the
    schema does not list come last, in their own order. Training targets use this order so the
    student learns the sequence the grammar allows.

    Example:
        >>> schema = {"properties": {"a": {}, "b": {}}, "required": ["b"]}
        >>> order_arguments({"a": 1, "b": 2, "z": 3}, schema)
        {'b': 2, 'a': 1, 'z': 3}
    """
    props = list((parameters or {}).get("properties") or {})
    required = set((parameters or {}).get("required") or ())
    order = [p for p in props if p in required] + [p for p in props if p not in required]
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(args.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def render_calls(
    calls: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """Render tool calls (``{"name", "args"}``) as the ``<|call|>`` block a student writes."""
    params = {t["name"]: t.get("parameters") for t in tools or ()}
    payload = [
        {
            "name": c["name"],
            "arguments": order_arguments(dict(c.get("args") or {}), params.get(c["name"])),
        }
        for c in calls
    ]
    return CALL + json.dumps(payload, ensure_ascii=False)


def answer_text(
    message: str | BaseMessage, tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """An assistant turn as the student writes it: its text, then its ``<|call|>`` block if any.

    Training targets, assistant turns in a prompt's history, and evaluation's comparison of a
    student's answer with the teacher's all go through this function.
    """
    if isinstance(message, str):
        return message.strip()
    text = _content_text(message)
    if isinstance(message, AIMessage) and message.tool_calls:
        block = render_calls(message.tool_calls, tools)
        return f"{text}\n{block}" if text else block
    return text


def split_answer(text: str) -> tuple[str, list[dict[str, Any]]]:
    r"""Split an answer written by :func:`answer_text` into its text and its tool calls.

    Raises:
        ValueError: The ``<|call|>`` block is not a JSON array of ``{"name", "arguments"}``.

    Example:
        >>> split_answer('Checking.\n<|call|>[{"name": "now", "arguments": {}}]')
        ('Checking.', [{'name': 'now', 'args': {}}])
    """
    head, sep, block = text.partition(CALL)
    if not sep:
        return text.strip(), []
    calls = json.loads(block)
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls
    ):
        msg = "a <|call|> block must be a JSON array of {name, arguments} objects"
        raise ValueError(msg)
    return head.strip(), [
        {"name": c["name"], "args": dict(c.get("arguments") or {})} for c in calls
    ]


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


def render_turns(
    messages: Sequence[BaseMessage], tools: Sequence[Mapping[str, Any]] | None = None
) -> list[tuple[str, str]]:
    """Return the conversation as ``(role, text)`` pairs, system messages merged first.

    Assistant turns that called tools end with their ``<|call|>`` block (:func:`answer_text`);
    a tool result reads ``name: result`` when the tool's name is known: the message's own
    ``name``, else the name of the call its ``tool_call_id`` answers (OpenAI-format traces carry
    only the id; LangChain's tool node sets both, and both must render alike).
    """
    system = [message_text(m) for m in messages if _role(m) == "system"]
    turns: list[tuple[str, str]] = []
    if any(system):
        turns.append(("system", "\n".join(s for s in system if s)))
    called: dict[str, str] = {}  # tool call id -> tool name
    for m in messages:
        role = _role(m)
        if role == "system":
            continue
        if role == "assistant":
            text = answer_text(m, tools)
            for c in getattr(m, "tool_calls", None) or []:
                if c.get("id"):
                    called[c["id"]] = c["name"]
        elif role == "tool":
            text = _content_text(m)
            name = getattr(m, "name", None) or called.get(getattr(m, "tool_call_id", None) or "")
            text = f"{name}: {text}" if name else text
        else:
            text = message_text(m)
        turns.append((role if role in ROLE_MARKERS else "user", text))
    return turns


def _render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(tool_signature(t) for t in tools)


_SCHEMA_NOISE = ("description", "title", "default", "examples")
_SCALARS = ("string", "integer", "number", "boolean", "null")


def _kind(prop: Mapping[str, Any]) -> str | None:
    """``a|b`` for an enum or a union of scalar types, the type's name for a scalar, else None."""
    if "enum" in prop and isinstance(prop["enum"], list):
        return "|".join(v if isinstance(v, str) else json.dumps(v) for v in prop["enum"])
    types = prop.get("type")
    if isinstance(types, str) and types in _SCALARS:
        return types
    if isinstance(types, list) and types and all(t in _SCALARS for t in types):
        return "|".join(types)
    union = prop.get("anyOf") or prop.get("oneOf")
    if isinstance(union, list) and union:
        kinds = [_kind(p) if isinstance(p, Mapping) else None for p in union]
        if all(k is not None for k in kinds):
            return "|".join(k for k in kinds if k is not None)
    return None


def tool_signature(tool: Mapping[str, Any]) -> str:
    """One line that shows a student a tool: its name, arguments and description.

    Required arguments come first, optional ones are marked ``?``; a string argument shows no
    type, an ``enum`` its values, any other type its name (or its schema, without descriptions,
    when it is not a plain scalar). Argument descriptions are left out: a student learns what an
    argument means from the teacher's calls, the serving grammar enforces the full schema, and
    every prompt carries the tools, so each token here is paid on every request.

    Example:
        >>> tool_signature({"name": "book", "description": "Book a hotel.", "parameters": {
        ...     "type": "object", "required": ["city"], "properties": {
        ...     "city": {"type": "string", "description": "Where"},
        ...     "nights": {"type": "integer"},
        ...     "room": {"type": "string", "enum": ["single", "double"]}}}})
        'book(city, nights?: integer, room?: single|double): Book a hotel.'
    """
    params = tool.get("parameters") or {}
    props: Mapping[str, Any] = params.get("properties") or {}
    order = order_arguments(dict.fromkeys(props, None), params)
    required = set(params.get("required") or ())
    args = []
    for name in order:
        prop = props[name] if isinstance(props[name], Mapping) else {}
        kind = _kind(prop)
        if kind is None:
            kind = json.dumps({k: v for k, v in prop.items() if k not in _SCHEMA_NOISE})
        elif kind == "string":
            kind = ""
        mark = "" if name in required else "?"
        args.append(f"{name}{mark}: {kind}" if kind else f"{name}{mark}")
    desc = str(tool.get("description") or "").strip()
    head = f"{tool['name']}({', '.join(args)})"
    return f"{head}: {desc}" if desc else head


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


def drop_oldest(messages: Sequence[BaseMessage]) -> list[BaseMessage] | None:
    """The conversation without its oldest turn, for a prompt that does not fit the context.

    System messages and the last message (the turn being answered) are kept; ``None`` when
    nothing else is left to drop. Serving and training shorten an overlong conversation the same
    way, one turn at a time, so a student learns from the prompts it will be shown.

    Example:
        >>> from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
        >>> convo = [SystemMessage("s"), HumanMessage("a"), AIMessage("b"), HumanMessage("c")]
        >>> [m.content for m in drop_oldest(convo)]
        ['s', 'b', 'c']
        >>> drop_oldest([SystemMessage("s"), HumanMessage("c")]) is None
        True
    """
    msgs = list(messages)
    droppable = [i for i, m in enumerate(msgs[:-1]) if not isinstance(m, SystemMessage)]
    if not droppable:
        return None
    del msgs[droppable[0]]
    return msgs


def render_prompt(
    messages: Sequence[BaseMessage],
    facts: Sequence[Fact | str] | None = None,
    *,
    system: str | None = None,
    exemplars: Sequence[Exemplar] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
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
        tools: The tools bound to the call, as :func:`tool_specs` returns them; listed one
            :func:`tool_signature` per line after the system line.

    Returns:
        The prompt text, ending with ``"<|assistant|>\\n"``.
    """
    turns = render_turns(messages, tools)
    if turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    if system and not (turns and turns[0][0] == "system"):
        turns.insert(0, ("system", system))
    out: list[str] = []
    body = turns
    if turns and turns[0][0] == "system":
        out.append(f"{SYSTEM}\n{turns[0][1]}\n")
        body = turns[1:]
    if tools:
        out.append(f"{TOOLS}\n{_render_tools(tools)}\n")
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


def render_answer(
    answer: str | BaseMessage, tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """Render the assistant's answer as the training target that follows :func:`render_prompt`."""
    return f"{answer_text(answer, tools)}{END}"
