"""Traces → training examples: dedupe, filter, deterministic split, retrieved facts, one prompt format."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, messages_from_dict, messages_to_dict

from langchain_understudy.prompting import (
    Exemplar,
    Fact,
    answer_text,
    last_user_text,
    message_text,
    render_answer,
    render_prompt,
    tool_specs,
)

__all__ = [
    "Example",
    "FactLookup",
    "build_examples",
    "conversation_key",
    "last_user_text",
    "load_examples",
    "save_examples",
    "split_examples",
]

#: ``lookup(examples) -> facts per example``, batched so embeddings are batched. A fact whose
#: ``source_key`` metadata equals the example's key must not be returned (it would leak the
#: answer); ``example.created_at`` says when the teacher answered, for facts as of that time.
FactLookup = Callable[[Sequence["Example"]], list[list[Fact]]]


@dataclass
class Example:
    """One training or evaluation example.

    Attributes:
        key: Hash of the conversation (prompt messages), stable across runs.
        messages: The conversation the teacher answered.
        answer: The teacher's answer as the student writes it: its text, then its tool calls
            as a ``<|call|>`` block (:func:`~langchain_understudy.prompting.answer_text`).
        facts: Facts retrieved for it (empty without a knowledge store).
        exemplars: Past teacher answers to similar requests; ``None``: not looked up (a
            student with an exemplar memory looks them up itself when it answers).
        prompt: The rendered prompt, exactly as the student sees it when serving.
        target: The rendered answer the student is trained to produce.
        metadata: The trace's metadata.
        created_at: When the teacher answered, if known.
        tools: The tools bound to the teacher's call (from the trace's ``metadata["tools"]``),
            as :func:`~langchain_understudy.prompting.tool_specs` returns them; the prompt lists
            them and the student is served with the same tools bound.
        system: The default system line the prompt was rendered with (see :meth:`render`).
    """

    key: str
    messages: list[BaseMessage]
    answer: str
    facts: list[Fact] = field(default_factory=list)
    prompt: str = ""
    target: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    exemplars: list[Exemplar] | None = None
    tools: list[dict[str, Any]] | None = None
    system: str | None = None

    def render(self, system: str | None = None) -> None:
        """Build :attr:`prompt` and :attr:`target` with the one prompt format serving uses."""
        self.system = system
        self.prompt = self.prompt_of(self.messages)
        self.target = render_answer(self.answer)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_record` turns back into an equal example."""
        return {
            "key": self.key,
            "messages": messages_to_dict(self.messages),
            "answer": self.answer,
            "facts": [asdict(f) for f in self.facts],
            "prompt": self.prompt,
            "target": self.target,
            "metadata": self.metadata,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "exemplars": None if self.exemplars is None else [asdict(e) for e in self.exemplars],
            "tools": self.tools,
            "system": self.system,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Example:
        """The example a :meth:`to_record` dict holds, prompt and target as they were."""
        exemplars = record.get("exemplars")
        return cls(
            key=record["key"],
            messages=messages_from_dict(record["messages"]),
            answer=record["answer"],
            facts=[Fact(**f) for f in record.get("facts") or ()],
            prompt=record.get("prompt", ""),
            target=record.get("target", ""),
            metadata=record.get("metadata") or {},
            created_at=datetime.fromisoformat(record["created_at"])
            if record.get("created_at")
            else None,
            exemplars=None if exemplars is None else [Exemplar(**e) for e in exemplars],
            tools=record.get("tools"),
            system=record.get("system"),
        )

    def prompt_of(self, messages: Sequence[BaseMessage]) -> str:
        """The prompt over ``messages`` with this example's system line, tools and context."""
        return render_prompt(
            messages, self.facts, system=self.system, exemplars=self.exemplars, tools=self.tools
        )


def conversation_key(messages: Sequence[BaseMessage]) -> str:
    """Return a stable hash of a conversation's roles and texts."""
    payload = json.dumps([[m.type, message_text(m)] for m in messages], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def build_examples(
    pairs: Iterable[tuple[Sequence[BaseMessage], AIMessage | str, dict[str, Any]]],
    *,
    facts: FactLookup | None = None,
    system: str | None = None,
    min_answer_chars: int = 1,
    max_answer_chars: int = 4000,
) -> tuple[list[Example], dict[str, int]]:
    """Turn (conversation, teacher answer, metadata) triples into deduplicated examples.

    Conversations that appear more than once keep their latest answer. Empty, overlong or failed
    answers are dropped. Tools listed in the metadata (``"tools"``, OpenAI format, as trace import
    and :class:`~langchain_understudy.distill_jobs.TraceRecorder` record them) are shown in the
    prompt, and the teacher's tool calls become the ``<|call|>`` block of the target.
    A ``created_at`` entry in the metadata (a ``datetime``) is moved to
    :attr:`Example.created_at`. Prompts are built by :func:`~langchain_understudy.prompting.render_prompt`,
    the same function the student serves with.

    Returns:
        The examples and a count of what was dropped and why.
    """
    by_key: dict[str, Example] = {}
    dropped = {"empty_answer": 0, "long_answer": 0, "error": 0, "duplicate": 0, "bad_tools": 0}
    for messages, answer, meta in pairs:
        if meta.get("error"):
            dropped["error"] += 1
            continue
        try:
            tools = tool_specs(meta["tools"]) if meta.get("tools") else None
        except (ValueError, TypeError, KeyError, AttributeError):
            dropped["bad_tools"] += 1  # trace import refuses these; a hand-edited store may not
            continue
        text = (
            answer_text(answer, tools) if isinstance(answer, BaseMessage) else str(answer).strip()
        )
        if len(text) < min_answer_chars:
            dropped["empty_answer"] += 1
            continue
        if len(text) > max_answer_chars:
            dropped["long_answer"] += 1
            continue
        key = conversation_key(messages)
        if key in by_key:
            dropped["duplicate"] += 1
        meta = dict(meta)
        created = meta.pop("created_at", None)
        by_key[key] = Example(
            key=key,
            messages=list(messages),
            answer=text,
            metadata=meta,
            created_at=created if isinstance(created, datetime) else None,
            tools=tools,
        )
    examples = list(by_key.values())
    if facts is not None and examples:
        found = facts(examples)
        for ex, fs in zip(examples, found, strict=True):
            ex.facts = fs
    for ex in examples:
        ex.render(system)
    return examples, dropped


def split_examples(
    examples: Sequence[Example], heldout_fraction: float, *, salt: str = "understudy"
) -> tuple[list[Example], list[Example]]:
    """Split deterministically by a hash of each conversation.

    The same conversation always lands on the same side, run after run, so held-out examples are
    never trained on.
    """
    train: list[Example] = []
    held: list[Example] = []
    cut = int(heldout_fraction * 10_000)
    for ex in examples:
        bucket = int(hashlib.sha256(f"{salt}:{ex.key}".encode()).hexdigest(), 16) % 10_000
        (held if bucket < cut else train).append(ex)
    return train, held


def save_examples(path: str | os.PathLike[str], splits: dict[str, Sequence[Example]]) -> None:
    """Write named splits of examples as JSON lines (``{"split": name, **record}``)."""
    with open(path, "w", encoding="utf-8") as f:
        for name, examples in splits.items():
            for ex in examples:
                f.write(json.dumps({"split": name, **ex.to_record()}, default=str) + "\n")


def load_examples(path: str | os.PathLike[str]) -> dict[str, list[Example]]:
    """Read what :func:`save_examples` wrote: split name → examples, in their order."""
    out: dict[str, list[Example]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            out.setdefault(record.pop("split"), []).append(Example.from_record(record))
    return out
