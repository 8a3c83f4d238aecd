"""The distillation objective, pinned against a naive reference implementation."""

from __future__ import annotations

import math

import pytest
from conftest import corpus
from langchain_core.messages import HumanMessage

from langchain_understudy.distill_jobs.dataset import build_examples
from langchain_understudy.distill_jobs.scratch import ScratchSize, build_tokenizer, init_student
from langchain_understudy.distill_jobs.training import (
    IGNORE_INDEX,
    distillation_loss,
    encode_example,
    pad_batch,
)


def test_loss_is_cross_entropy_on_teacher_tokens_only(tmp_path) -> None:
    import torch

    tok = build_tokenizer(corpus(500), tmp_path, vocab_size=400)
    model = init_student(
        tok, ScratchSize(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, context=128)
    ).eval()
    examples, _ = build_examples(
        [
            ([HumanMessage("short q")], "the answer is 42", {}),
            ([HumanMessage("a much longer question here")], "no", {}),
        ]
    )
    feats = [encode_example(tok, ex, 128) for ex in examples]
    assert all(f is not None for f in feats)
    batch = pad_batch(feats, tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    # naive reference: mean over answer tokens of -log p(token | everything before it)
    total, count = 0.0, 0
    for ex, f in zip(examples, feats, strict=True):
        ids = f["input_ids"]
        n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
        assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # prompt masked
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for t in range(n_prompt, len(ids)):
            logp = torch.log_softmax(logits[t - 1].double(), -1)[ids[t]].item()
            total -= logp
            count += 1
    assert count == sum(
        len(tok(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples
    )
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
    assert math.isfinite(out.loss.item())
    # the training loss computes logits only from the first answer position on: same value
    with torch.no_grad():
        assert distillation_loss(model, batch).item() == pytest.approx(total / count, rel=1e-5)


def test_overlong_examples_are_skipped(tmp_path) -> None:
    tok = build_tokenizer(corpus(300), tmp_path, vocab_size=400)
    examples, _ = build_examples([([HumanMessage("word " * 200)], "x", {})])
    assert encode_example(tok, examples[0], 64) is None


def test_overlong_conversations_lose_their_oldest_turns_as_in_serving(tmp_path) -> None:
    from langchain_core.messages import AIMessage, SystemMessage

    from langchain_understudy.prompting import drop_oldest

    tok = build_tokenizer(corpus(300), tmp_path, vocab_size=400)
    convo = [SystemMessage("be brief")]
    for i in range(12):
        convo += [HumanMessage(f"question number {i} " * 3), AIMessage(f"answer {i}")]
    convo.append(HumanMessage("and the last one"))
    (ex,), _ = build_examples([(convo, "done", {})], system="default line")
    full = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    f = encode_example(tok, ex, full // 2)
    assert f is not None and len(f["input_ids"]) <= full // 2
    # the kept prompt is the one serving would build: the oldest turns gone, the rest intact
    messages = list(convo)
    while True:
        text = ex.prompt_of(messages)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        answer = [
            t for t, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != IGNORE_INDEX
        ]
        if len(ids) + len(answer) <= full // 2:
            break
        messages = drop_oldest(messages)
    assert f["input_ids"][: len(ids)] == ids
    assert "be brief" in text and "and the last one" in text and "question number 0" not in text
