"""The answer space applied by llama.cpp: even a random student answers inside it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import COLORS, ITEMS, tiny_job_toml

from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.prompting import Exemplar
from langchain_understudy.students import ChatStudent, StudentRegistry
from langchain_understudy.students.answer_space import AnswerSpace, infer_answer_space

LABELS = ["transfer", "balance", "freeze_account", 'say "hi"']


@pytest.mark.parametrize("seed", range(3))
def test_a_random_student_answers_only_with_seen_labels(tiny_gguf: Path, seed: int) -> None:
    student = ChatStudent(
        model_path=tiny_gguf,
        answer_space=AnswerSpace("labels", labels=LABELS),
        max_tokens=32,
        temperature=1.0,
        seed=seed,
    )
    for q in ("move money", "how much do I have", "zzz 123"):
        assert student.invoke(q).content in LABELS


def test_candidates_mode_answers_with_one_of_the_exemplars(tiny_gguf: Path) -> None:
    student = ChatStudent(
        model_path=tiny_gguf,
        answer_space=AnswerSpace("labels", labels=LABELS),
        closed_answers="candidates",
        max_tokens=32,
        temperature=1.0,
    )
    shown = [Exemplar("move 5 to savings", "transfer"), Exemplar("lock it", "freeze_account")]
    for seed in range(4):
        out = student.invoke("move money", exemplars=shown, seed=seed).content
        assert out in {"transfer", "freeze_account"}


def test_off_and_explicit_schema_override_the_space(tiny_gguf: Path) -> None:
    space = AnswerSpace("labels", labels=LABELS)
    free = ChatStudent(
        model_path=tiny_gguf, answer_space=space, closed_answers="off", max_tokens=12
    )
    assert free.invoke("move money").content not in LABELS  # a random model, unconstrained
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    explicit = ChatStudent(model_path=tiny_gguf, answer_space=space, max_tokens=40)
    assert set(json.loads(explicit.invoke("q", json_schema=schema).content)) == {"x"}


def test_inferred_json_space_keeps_a_random_student_in_shape(tiny_gguf: Path) -> None:
    rng = random.Random(0)
    answers = [
        json.dumps({"color": rng.choice(COLORS), "item": rng.choice(ITEMS), "n": rng.randint(0, 9)})
        for _ in range(100)
    ]
    space = infer_answer_space(answers)
    student = ChatStudent(model_path=tiny_gguf, answer_space=space, max_tokens=120, temperature=1.0)
    for seed in range(3):
        value = json.loads(student.invoke("what is it?", seed=seed).content)
        assert set(value) == {"color", "item", "n"}
        assert value["color"] in COLORS and value["item"] in ITEMS
        assert isinstance(value["n"], int)


def test_a_job_on_json_traces_registers_their_schema(tmp_path: Path) -> None:
    rng = random.Random(1)
    lines = []
    for i in range(300):
        c, it = rng.choice(COLORS), rng.choice(ITEMS)
        answer = json.dumps({"color": c, "item": it})
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"The {it} {i} is {c}. Extract it."},
                    {"role": "assistant", "content": answer},
                ],
                "metadata": {"model": "teacher-test"},
            }
        )
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    TraceStore(tmp_path / "traces.sqlite").import_jsonl(tmp_path / "t.jsonl")
    (tmp_path / "job.toml").write_text(tiny_job_toml("json"))  # says nothing about schemas
    cfg = DistillConfig.from_toml(tmp_path / "job.toml")
    result = DistillJob(cfg, progress=False).run()
    assert result.metrics["answer_space"]["kind"] == "json"
    assert result.metrics["valid_json"] == 1.0
    student = ChatStudent.from_registry(StudentRegistry(cfg.registry), max_tokens=64)
    assert student.answer_space is not None
    assert student.answer_space.schema["required"] == ["color", "item"]
    value = json.loads(student.invoke("The boat 7 is red. Extract it.").content)
    assert set(value) == {"color", "item"}


def test_per_request_grammars_do_not_grow_without_bound(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_understudy.students import chat_models

    monkeypatch.setattr(chat_models, "GRAMMAR_CACHE", 2)
    student = ChatStudent(
        model_path=tiny_gguf,
        answer_space=AnswerSpace("labels", labels=LABELS),
        closed_answers="candidates",
        max_tokens=32,
    )
    for first, second in [(0, 1), (1, 2), (0, 2), (2, 3)]:
        shown = [Exemplar("q", LABELS[first]), Exemplar("q", LABELS[second])]
        assert student.invoke("move money", exemplars=shown).content in {
            LABELS[first],
            LABELS[second],
        }
        assert len(student._grammars) <= 2
