"""Tool calls for a student: the choice, the grammar's schema, and a streaming parser.

A student writes its calls as ``<|call|>`` followed by a JSON array of
``{"name": ..., "arguments": {...}}`` objects (see :mod:`langchain_understudy.prompting`). The
array is decoded under a grammar built from :func:`calls_schema`, so every call names a bound
tool and its arguments have the types, enums and required keys of that tool's schema.
:class:`CallStream` turns the decoded text into LangChain tool-call chunks while it grows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_understudy.errors import ConfigError

__all__ = ["CallStream", "calls_schema", "normalize_tool_choice"]

_FORCED = {"any", "required"}


def normalize_tool_choice(choice: Any, names: Sequence[str]) -> str:
    """Return ``"auto"``, ``"none"``, ``"any"`` or a tool's name.

    Accepts every form LangChain and the OpenAI API use: ``None``/``"auto"``, ``"none"``,
    ``"any"``/``"required"``/``True``, a tool name, and ``{"type": "function", "function":
    {"name": ...}}``.

    Raises:
        ConfigError: An unknown choice, or a tool name that is not bound.
    """
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        if not isinstance(name, str):
            msg = f"tool_choice must name a tool as {{'function': {{'name': ...}}}}, got {choice!r}"
            raise ConfigError(msg)
        choice = name
    if choice is None or choice == "auto":
        return "auto" if names else "none"
    if choice is False or choice == "none":
        return "none"
    if choice is True or choice in _FORCED:
        if not names:
            msg = f"tool_choice={choice!r} needs at least one bound tool; pass tools= too"
            raise ConfigError(msg)
        return "any"
    if isinstance(choice, str) and choice in names:
        return choice
    msg = (
        f"tool_choice must be 'auto', 'none', 'any', 'required' or one of the bound tools "
        f"{list(names)}, got {choice!r}"
    )
    raise ConfigError(msg)


def _hoist_defs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Move a tool schema's ``$defs`` to the root of the combined schema (refs stay valid)."""
    out = dict(schema)
    for key in ("$defs", "definitions"):
        if isinstance(out.get(key), Mapping):
            for name, sub in out.pop(key).items():
                defs.setdefault(name, sub)
    return out


def calls_schema(
    tools: Sequence[Mapping[str, Any]], *, only: str | None = None, parallel: bool = True
) -> dict[str, Any]:
    """The JSON schema of a ``<|call|>`` block: an array of calls to the given tools.

    Args:
        tools: Tool specs from :func:`~langchain_understudy.prompting.tool_specs`.
        only: Restrict the calls to this tool (a named ``tool_choice``).
        parallel: Allow several calls in one turn; ``False`` allows exactly one.
    """
    defs: dict[str, Any] = {}
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": _hoist_defs(dict(t.get("parameters") or {}), defs),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if only is None or t["name"] == only
    ]
    if not items:
        msg = f"no bound tool is named {only!r}"
        raise ConfigError(msg)
    schema: dict[str, Any] = {
        "type": "array",
        "items": items[0] if len(items) == 1 else {"anyOf": items},
        "minItems": 1,
    }
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass
class _Call:
    id: str
    name: str
    args: str = ""
    done: bool = False


@dataclass
class CallStream:
    """Parse a growing ``<|call|>`` array into tool calls and tool-call chunks.

    Feed it the decoded text as it grows; :meth:`feed` returns LangChain ``tool_call_chunks``
    for what is new (a call's id and name once its name is complete, then fragments of its
    arguments' JSON). The streaming and the non-streaming paths both go through it, so the ids
    a stream shows are the ids of the final message.

    Example:
        >>> s = CallStream()
        >>> [(c["name"], c["args"]) for c in s.feed('[{"name": "now", "arguments": {')]
        [('now', '{')]
        >>> s.feed('}}]')[0]["args"], s.calls()[0]["args"]
        ('}', {})
    """

    text: str = ""
    _calls: list[_Call] = field(default_factory=list)
    _at: int = 0  # next character of `text` to read
    _depth: int = 0  # JSON nesting inside the current call's arguments
    _in_string: bool = False
    _escape: bool = False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Add decoded text; return the tool-call chunks it completes."""
        self.text += delta
        out: list[dict[str, Any]] = []
        while self._at < len(self.text):
            call = self._calls[-1] if self._calls and not self._calls[-1].done else None
            if call is None:
                if not self._start_call(out):
                    break
                continue
            start = self._at
            self._scan_arguments(call)
            if self._at > start:
                index = len(self._calls) - 1
                fragment = self.text[start : self._at]
                call.args += fragment
                if out and out[-1]["index"] == index:
                    out[-1]["args"] += fragment  # one chunk per call and event
                else:
                    out.append(_chunk(index, None, None, fragment))
        return out

    def _start_call(self, out: list[dict[str, Any]]) -> bool:
        rest = self.text[self._at :]
        skip = len(rest) - len(rest.lstrip(" \n\t[,}]"))
        if skip == len(rest):
            self._at = len(self.text)
            return False
        m = _HEAD.match(rest, skip)
        if m is None:
            return False  # the head is not complete yet
        name = json.loads(m.group(1))
        call = _Call(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
        self._calls.append(call)
        out.append(_chunk(len(self._calls) - 1, call.id, name, ""))
        self._at += m.end()
        return True

    def _scan_arguments(self, call: _Call) -> None:
        text = self.text
        while self._at < len(text):
            ch = text[self._at]
            self._at += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    call.done = True
                    return

    def calls(self) -> list[dict[str, Any]]:
        """The complete calls so far, as LangChain ``ToolCall`` dicts."""
        return [
            {"name": c.name, "args": json.loads(c.args), "id": c.id, "type": "tool_call"}
            for c in self._calls
            if c.done
        ]

    def unfinished(self) -> list[dict[str, Any]]:
        """Calls cut off before their arguments closed, as LangChain ``InvalidToolCall`` dicts."""
        return [
            {
                "name": c.name,
                "args": c.args,
                "id": c.id,
                "error": "the student reached max_tokens before the call's arguments closed",
                "type": "invalid_tool_call",
            }
            for c in self._calls
            if not c.done
        ]


def _chunk(index: int, id_: str | None, name: str | None, args: str) -> dict[str, Any]:
    return {"index": index, "id": id_, "name": name, "args": args, "type": "tool_call_chunk"}
