"""Inferring the answer space from the teacher's answers."""

from __future__ import annotations

import json
import random

import pytest

from langchain_understudy.errors import ArtifactError
from langchain_understudy.students.answer_space import (
    AnswerSpace,
    infer_answer_space,
    infer_json_schema,
    labels_grammar,
)


def _valid(schema: dict, value: object) -> bool:
    """A small reference validator for the keywords the inferrer writes."""
    if "anyOf" in schema:
        return any(_valid(s, value) for s in schema["anyOf"])
    kind = schema.get("type")
    checks = {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }
    if not checks[kind]:
        return False
    if kind == "string":
        return ("enum" not in schema or value in schema["enum"]) and len(value) <= schema.get(
            "maxLength", 10**9
        )
    if kind == "array":
        return all(_valid(schema["items"], x) for x in value)
    if kind == "object":
        props = schema["properties"]
        return (
            all(k in value for k in schema["required"])
            and all(k in props for k in value)
            and all(_valid(props[k], v) for k, v in value.items())
        )
    return True


def test_closed_label_sets_are_found() -> None:
    answers = ["transfer", "balance", "freeze_account"] * 20
    space = infer_answer_space(answers)
    assert space.kind == "labels"
    assert space.labels == ["balance", "freeze_account", "transfer"]


def test_prose_and_rare_answers_are_free() -> None:
    rng = random.Random(0)
    prose = [f"Your order {rng.randint(0, 10**6)} ships on day {i}." for i in range(200)]
    assert infer_answer_space(prose).kind == "free"
    assert infer_answer_space(["a", "b", "c"]).kind == "free"  # seen once each: not a closed set


def test_json_answers_get_a_schema_every_answer_satisfies() -> None:
    rng = random.Random(1)
    objs = []
    for i in range(300):
        o = {"intent": rng.choice(["buy", "sell", "hold"]), "amount": rng.randint(1, 99)}
        if rng.random() < 0.5:
            o["note"] = f"free text number {i}"
        if rng.random() < 0.3:
            o["tags"] = [rng.choice(["a", "b"]) for _ in range(rng.randint(0, 3))]
        objs.append(o)
    space = infer_answer_space([json.dumps(o) for o in objs])
    assert space.kind == "json"
    schema = space.schema
    assert schema["required"] == ["amount", "intent"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["intent"]["enum"] == ["buy", "hold", "sell"]
    assert schema["properties"]["amount"] == {"type": "integer"}
    assert all(_valid(schema, o) for o in objs)
    assert not _valid(schema, {"intent": "buy", "amount": 3, "other": 1})  # closed key set


def test_a_few_broken_answers_do_not_lose_the_json_shape() -> None:
    answers = [json.dumps({"k": i}) for i in range(99)] + ["not json"]
    assert infer_answer_space(answers).kind == "json"
    assert infer_answer_space(answers[:50] + ["x"] * 50).kind != "json"


def test_mixed_types_become_any_of() -> None:
    schema = infer_json_schema([1, 2.5, "x", None])
    assert {s["type"] for s in schema["anyOf"]} == {"number", "string", "null"}


def test_round_trip_and_damaged_file(tmp_path) -> None:
    space = infer_answer_space(['{"a": "x"}'] * 5)
    assert AnswerSpace.load(space.save(tmp_path / "s.json")).schema == space.schema
    (tmp_path / "bad.json").write_text('{"kind": "weird"}')
    with pytest.raises(ArtifactError, match="re-run the distillation job"):
        AnswerSpace.load(tmp_path / "bad.json")


def test_labels_grammar_escapes_quotes_and_newlines() -> None:
    g = labels_grammar(['say "hi"', "a\\b", "two\nlines"])
    assert g == 'root ::= "say \\"hi\\"" | "a\\\\b" | "two\\nlines"'
    with pytest.raises(ValueError):
        labels_grammar([])
