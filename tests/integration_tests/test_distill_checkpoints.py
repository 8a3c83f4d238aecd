"""Checkpoints by training time: each records its step and seconds and exports to GGUF alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import color_traces

pytestmark = pytest.mark.slow


def _train(out: Path, **kw: object):
    from langchain_core.messages import HumanMessage

    from langchain_understudy.distill_jobs.dataset import build_examples
    from langchain_understudy.distill_jobs.scratch import ScratchSize
    from langchain_understudy.distill_jobs.training import TrainSettings, train_student

    pairs = [
        ([HumanMessage(t["messages"][0]["content"])], t["messages"][1]["content"], {})
        for t in color_traces()[:64]
    ]
    examples, _ = build_examples(pairs)
    settings = TrainSettings(
        max_steps=5,
        batch_size=8,
        save_every=1000,
        vocab_size=300,
        size=ScratchSize(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, context=128),
        **kw,  # type: ignore[arg-type]
    )
    return train_student(examples, out, settings, progress_bar=False)


def _logits(path: Path, text: str) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False
    )
    ids = llm.tokenize(text.encode())
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    assert np.abs(out).max() > 0
    return out


def test_time_checkpoints_record_their_seconds_and_export_alone(tmp_path: Path) -> None:
    from langchain_understudy.distill_jobs.training import (
        CHECKPOINT_INFO_FILE,
        training_checkpoints,
    )
    from langchain_understudy.students import export_gguf

    # a checkpoint after every step (1 ms of training each), all of them kept
    result = _train(tmp_path, save_every_minutes=1e-5, keep_checkpoints=None)
    found = training_checkpoints(tmp_path)
    assert [step for step, _, _ in found] == [1, 2, 3, 4, 5]
    seconds = [s for _, s, _ in found]
    assert all(s is not None and s > 0 for s in seconds)
    assert seconds == sorted(seconds) and seconds[-1] <= result.seconds + 1e-6
    info = json.loads((found[2][2] / CHECKPOINT_INFO_FILE).read_text())
    assert info["step"] == 3

    # the last checkpoint is the final model: the same GGUF logits; an earlier one differs
    last = export_gguf(found[-1][2], tmp_path / "last.gguf", dtype="f32")
    final = export_gguf(result.checkpoint_dir, tmp_path / "final.gguf", dtype="f32")
    first = export_gguf(found[0][2], tmp_path / "first.gguf", dtype="f32")
    text = "What color is the boat 3? It is"
    np.testing.assert_allclose(_logits(last, text), _logits(final, text), atol=1e-5)
    assert np.abs(_logits(first, text) - _logits(final, text)).max() > 1e-3


def test_step_checkpoints_keep_the_newest_two_by_default(tmp_path: Path) -> None:
    from langchain_understudy.distill_jobs.training import training_checkpoints

    _train(tmp_path, save_every_minutes=1e-5)
    assert [step for step, _, _ in training_checkpoints(tmp_path)] == [4, 5]
