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


def suite_tool_traces() -> list[tuple[list, object, dict]]:
    """(conversation, teacher answer, metadata) triples that call the tools of langchain-tests'
    tool-calling suites, as a teacher would, with the tools recorded in the metadata."""
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_tests.integration_tests.chat_models import (
        magic_function,
        magic_function_no_args,
        unicode_customer,
    )

    @tool
    def get_weather(location: str) -> str:
        """Get the weather at a location."""
        return "It's sunny."

    prompt = ChatPromptTemplate.from_messages(
        [("human", "Hello. Please respond in the style of {answer_style}.")]
    )
    chain = prompt | GenericFakeChatModel(messages=iter(["hello matey"])) | StrOutputParser()
    greeting = chain.as_tool(
        name="greeting_generator",
        description="Generate a greeting in a particular style of speaking.",
    )
    rng = random.Random(0)
    out: list[tuple[list, object, dict]] = []

    def call(tool_obj: object, question: str, name: str, args: dict) -> None:
        meta = {"tools": [convert_to_openai_tool(tool_obj)]}
        answer = AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"c{len(out)}"}])
        out.append(([HumanMessage(question)], answer, meta))

    for n in [3, *rng.sample(range(1000), 40)]:
        call(
            magic_function,
            f"What is the value of magic_function({n})? Use the tool.",
            "magic_function",
            {"input": n},
        )
    for q in [
        "What is the value of magic_function_no_args()? Use the tool.",
        "Use the tool: magic_function_no_args()",
        "Call magic_function_no_args now.",
    ]:
        call(magic_function_no_args, q, "magic_function_no_args", {})
    for style in ["Pirate", "Shakespeare", "Cowboy", "Robot", "Yoda", "Surfer", "Knight"]:
        call(
            greeting,
            f"Using the tool, generate a {style} greeting.",
            "greeting_generator",
            {"answer_style": style},
        )
    for city in ["San Francisco, CA", "Paris", "Boston, MA", "Tokyo", "Berlin", "Austin, TX"]:
        question = f"What is the weather in {city}?"
        call(get_weather, question, "get_weather", {"location": city})
        asked = out[-1][1]
        result = ToolMessage("It's sunny.", tool_call_id=asked.tool_calls[0]["id"])
        meta = {"tools": [convert_to_openai_tool(get_weather)]}
        out.append(([HumanMessage(question), asked, result], "It's sunny.", meta))
    for name, what in [
        ("你好啊集团", "Hello Group) - a Chinese technology company"),
        ("こんにちは株式会社", "Hello Corporation) - a Japanese company"),
        ("Café Zürich", "Cafe Zurich) - a Swiss bakery"),
    ]:
        call(
            unicode_customer,
            f"Create a customer named '{name}' ({what}",
            "unicode_customer",
            {"customer_name": name, "description": what.split(") - ")[1]},
        )
    for a, b in [(1, 2), (3, 4), (2, 5), (7, 1)]:
        out.append(([HumanMessage(f"What is {a} + {b}")], str(a + b), {}))
    out.append(([HumanMessage("Hello")], "Hello!", {}))
    out.append(([HumanMessage("hello")], "Hello!", {}))
    return out


@pytest.fixture(scope="session")
def tool_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student distilled to call the langchain-tests suites' tools (about 30 s)."""
    from langchain_understudy.distill_jobs.dataset import build_examples
    from langchain_understudy.distill_jobs.scratch import ScratchSize
    from langchain_understudy.distill_jobs.training import TrainSettings, train_student
    from langchain_understudy.students import export_gguf, quantize_gguf

    examples, _ = build_examples(suite_tool_traces())
    out = tmp_path_factory.mktemp("tool_student")
    settings = TrainSettings(
        epochs=40,
        batch_size=8,
        learning_rate=3e-3,
        vocab_size=600,
        size=ScratchSize(hidden=96, layers=2, heads=4, kv_heads=2, ffn=192, context=512),
    )
    ckpt = train_student(examples, out, settings).checkpoint_dir
    f16 = export_gguf(ckpt, out / "tools.f16.gguf")
    return quantize_gguf(f16, out / "tools.Q8_0.gguf", "Q8_0")
