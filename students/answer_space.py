"""The answer space: what shape the teacher's answers take, inferred from its traces.

The distillation job looks at every training answer and registers one of three shapes with the
student (``answer_space.json``):

* ``labels``: the answers come from a small closed set (intents, routing decisions). Serving
  constrains the student, with a llama.cpp grammar, to answer with one of them.
* ``json``: (nearly) every answer is a JSON object. A JSON schema is inferred (keys, value types,
  enums for keys with few values, required keys, no other keys) and serving decodes under it, so
  every answer is valid JSON of the teacher's shape.
* ``free``: anything else (prose); no constraint.

An explicit schema (``json_schema=`` on the student, or ``[package] answer_schema = "path.json"``)
always wins over the inferred one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_understudy.errors import ArtifactError

__all__ = [
    "ANSWER_SPACE_FILE",
    "AnswerSpace",
    "infer_answer_space",
    "infer_json_schema",
    "labels_grammar",
]

#: The registry artifact an answer space is stored as.
ANSWER_SPACE_FILE = "answer_space.json"


@dataclass
class AnswerSpace:
    """The shape of a student's answers.

    Attributes:
        kind: ``"labels"``, ``"json"`` or ``"free"``.
        labels: The closed set of answers (``labels``).
        schema: The JSON schema of the answers (``json``).
        stats: How the shape was inferred (answers seen, share that parsed, ...).
    """

    kind: Literal["labels", "json", "free"]
    labels: list[str] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind,
            "labels": self.labels,
            "schema": self.schema,
            "stats": self.stats,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``answer_space.json``."""
        out = Path(path)
        out.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AnswerSpace:
        """Read a file written by :meth:`save`; a damaged file raises ``ArtifactError``."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            kind = d["kind"]
            if kind not in ("labels", "json", "free"):
                raise ValueError(f"unknown kind {kind!r}")
            labels = [str(x) for x in d.get("labels") or []]
            schema = d.get("schema")
            if schema is not None and not isinstance(schema, dict):
                raise ValueError("schema must be an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = f"answer space {path} is unreadable ({e}); re-run the distillation job"
            raise ArtifactError(msg) from e
        return cls(kind, labels, schema, dict(d.get("stats") or {}))


def infer_answer_space(
    answers: Sequence[str],
    *,
    max_labels: int = 512,
    max_label_chars: int = 80,
    min_repeats: float = 3.0,
    json_share: float = 0.98,
) -> AnswerSpace:
    """Infer the shape of a teacher's answers.

    Args:
        answers: The teacher's answers (training traces only).
        max_labels: At most this many distinct answers make a closed set.
        max_label_chars: Longer answers are never labels.
        min_repeats: A closed set needs each distinct answer to appear this often on average
            (otherwise the answers are free text that happens to be short).
        json_share: At least this share of answers must be JSON objects for a ``json`` space;
            the schema is inferred from those that parse.

    Example:
        >>> infer_answer_space(["yes", "no"] * 5).labels
        ['no', 'yes']
        >>> infer_answer_space(['{"a": 1}', '{"a": 2}']).schema["required"]
        ['a']
    """
    texts = [a.strip() for a in answers]
    n = len(texts)
    if not n:
        return AnswerSpace("free", stats={"n": 0})
    objects = []
    for t in texts:
        if t.startswith("{"):
            try:
                value = json.loads(t)
            except ValueError:
                continue
            if isinstance(value, dict):
                objects.append(value)
    if len(objects) / n >= json_share:
        stats = {"n": n, "json_share": len(objects) / n}
        return AnswerSpace("json", schema=infer_json_schema(objects), stats=stats)
    counts = Counter(texts)
    if (
        len(counts) <= max_labels
        and n / len(counts) >= min_repeats
        and all(0 < len(t) <= max_label_chars for t in counts)
    ):
        return AnswerSpace("labels", labels=sorted(counts), stats={"n": n, "distinct": len(counts)})
    return AnswerSpace("free", stats={"n": n, "distinct": len(counts)})


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def infer_json_schema(
    values: Sequence[Any], *, max_enum: int = 12, min_enum_repeats: int = 3
) -> dict[str, Any]:
    """Infer a JSON schema that every value in ``values`` satisfies.

    Objects: the keys seen, each key's schema from its values, ``required`` for keys present in
    every object, no other keys (``additionalProperties: false``). Strings: an ``enum`` when a key
    has at most ``max_enum`` distinct values, each seen ``min_enum_repeats`` times on average;
    otherwise a string with ``maxLength`` twice the longest seen (a small student cannot run
    away inside one). Integers stay integers; mixed types become ``anyOf``.
    """
    by_kind: dict[str, list[Any]] = {}
    for v in values:
        by_kind.setdefault(_kind(v), []).append(v)
    if by_kind.get("integer") and by_kind.get("number"):
        by_kind["number"] += by_kind.pop("integer")
    parts = [
        _schema_of(kind, vs, max_enum, min_enum_repeats) for kind, vs in sorted(by_kind.items())
    ]
    if not parts:
        return {}
    return parts[0] if len(parts) == 1 else {"anyOf": parts}


def _schema_of(kind: str, values: list[Any], max_enum: int, min_repeats: int) -> dict[str, Any]:
    if kind == "object":
        keys: Counter[str] = Counter(k for v in values for k in v)
        props = {
            k: infer_json_schema(
                [v[k] for v in values if k in v], max_enum=max_enum, min_enum_repeats=min_repeats
            )
            for k in keys
        }
        required = sorted(k for k, c in keys.items() if c == len(values))
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }
    if kind == "array":
        items = [x for v in values for x in v]
        return {
            "type": "array",
            "items": infer_json_schema(items, max_enum=max_enum, min_enum_repeats=min_repeats),
        }
    if kind == "string":
        distinct = sorted(set(values))
        if len(distinct) <= max_enum and len(values) >= min_repeats * len(distinct):
            return {"type": "string", "enum": distinct}
        return {"type": "string", "maxLength": max(8, 2 * max(len(v) for v in values))}
    return {"type": kind}


def _gbnf_literal(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def labels_grammar(labels: Sequence[str]) -> str:
    """A GBNF grammar whose only sentences are the given labels.

    Example:
        >>> labels_grammar(["yes", "no"])
        'root ::= "yes" | "no"'
    """
    if not labels:
        msg = "a closed answer set needs at least one label"
        raise ValueError(msg)
    return "root ::= " + " | ".join(_gbnf_literal(t) for t in dict.fromkeys(labels))
