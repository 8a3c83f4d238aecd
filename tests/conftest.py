"""Shared fixtures: tiny students built on the fly (seconds), never downloaded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WORDS = (
    "plan price limit policy refund invoice seat team pro basic enterprise storage upload api key "
    "the a of to and is for with on per month year user admin support ticket region eu us data "
    "Zürich café naïve résumé 東京 données straße ĳ 😀 über"
).split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Varied lines: words, unicode, digits, punctuation and whitespace runs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100_000)))
        if rng.random() < 0.3:
            words.insert(
                rng.randrange(len(words)), f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
            )
        sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
        line = sep.join(words) + rng.choice([".", "?", "!", "", ":", " - ok"])
        lines.append(line)
    return lines


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama checkpoint with a byte-level BPE tokenizer trained on ~3k lines."""
    from langchain_understudy.distill_jobs.scratch import (
        ScratchSize,
        build_tokenizer,
        init_student,
        save_student,
    )

    out = tmp_path_factory.mktemp("tiny_ckpt")
    tok = build_tokenizer(corpus(), out, vocab_size=600)
    model = init_student(
        tok, ScratchSize(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, context=512), seed=0
    )
    save_student(model, tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from langchain_understudy.students import export_gguf

    return export_gguf(
        tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "tiny.f32.gguf", dtype="f32"
    )


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_f32: Path) -> Path:
    """The tiny student quantized to Q8_0, as students are served."""
    from langchain_understudy.students import quantize_gguf

    return quantize_gguf(tiny_gguf_f32, tiny_gguf_f32.with_name("tiny.Q8_0.gguf"), "Q8_0")


def tiny_job_toml(name: str, tables: str = "") -> str:
    """A job file (paths relative to it) that learns the colour task in seconds; ``tables`` adds
    or extends TOML tables after the tiny ``[student]`` and ``[training]`` ones."""
    return f"""
name = "{name}"
traces = "traces.sqlite"
registry = "students"
work_dir = "runs"
heldout_fraction = 0.1
{_TINY_JOB_TABLES}{tables}"""


_TINY_JOB_TABLES = """
[student]
hidden = 64
layers = 2
heads = 4
kv_heads = 2
ffn = 128
context = 128
vocab_size = 400

[training]
epochs = 4
batch_size = 16
learning_rate = 3e-3
"""

COLORS = "red green blue yellow black white orange purple".split()
ITEMS = "car house cat dog tree boat lamp chair".split()


def color_traces(n: int = 600, seed: int = 0, start: int = 0) -> list[dict]:
    """A task a tiny student learns in seconds: name the colour stated in the question.

    Traces in the OpenAI chat fine-tuning format, as `understudy traces import` reads them.
    """
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        c, it = rng.choice(COLORS), rng.choice(ITEMS)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What color is the {it} {i}? It is {c}."},
                    {"role": "assistant", "content": c},
                ],
                "metadata": {"model": "teacher-test", "task": "colors"},
            }
        )
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student actually distilled on the colour task (about 15 s on 2 cores)."""
    from langchain_core.messages import HumanMessage

    from langchain_understudy.distill_jobs.dataset import build_examples
    from langchain_understudy.distill_jobs.scratch import ScratchSize
    from langchain_understudy.distill_jobs.training import TrainSettings, train_student

    pairs = [
        ([HumanMessage(t["messages"][0]["content"])], t["messages"][1]["content"], {})
        for t in color_traces()
    ]
    examples, _ = build_examples(pairs)
    out = tmp_path_factory.mktemp("trained")
    settings = TrainSettings(
        epochs=4,
        batch_size=16,
        learning_rate=3e-3,
        vocab_size=400,
        size=ScratchSize(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, context=256),
    )
    return train_student(examples, out, settings).checkpoint_dir


@pytest.fixture(scope="session")
def trained_gguf(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distilled colour student as a Q8_0 GGUF."""
    from langchain_understudy.students import export_gguf, quantize_gguf

    d = tmp_path_factory.mktemp("trained_gguf")
    f16 = export_gguf(trained_checkpoint, d / "colors.f16.gguf")
    return quantize_gguf(f16, d / "colors.Q8_0.gguf", "Q8_0")
