"""ChatStudent behaviour on a real distilled GGUF: answers, facts, limits, threads, bad input."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from langchain_understudy.errors import ArtifactError, ConfigError, StudentError
from langchain_understudy.students import ChatStudent, StudentRegistry, confidence_from_logprobs

pytestmark = pytest.mark.slow

Q = "What color is the boat 123456? It is purple."


@pytest.fixture(scope="module")
def student(trained_gguf: Path) -> ChatStudent:
    return ChatStudent(model_path=trained_gguf, n_ctx=256, max_tokens=8)


def test_answers_like_the_teacher(student: ChatStudent) -> None:
    msg = student.invoke(Q)
    assert msg.content == "purple"
    meta = msg.response_metadata
    assert meta["finish_reason"] == "stop" and meta["model_name"] == "colors.Q8_0.gguf"
    assert 0.5 < meta["confidence"] <= 1.0
    # a confident answer comes from peaked distributions: entropy well under log(vocabulary)
    assert 0.0 <= meta["answer_entropy"] < 1.0
    assert student.invoke(Q, confidence=False).response_metadata["answer_entropy"] is None
    usage = msg.usage_metadata
    assert usage is not None and usage["output_tokens"] >= 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_stream_equals_invoke_and_ends_with_metadata(student: ChatStudent) -> None:
    chunks = list(student.stream(Q))
    assert "".join(str(c.content) for c in chunks) == student.invoke(Q).content
    assert chunks[-1].response_metadata["finish_reason"] == "stop"
    assert chunks[-1].usage_metadata is not None


async def test_native_async(student: ChatStudent) -> None:
    results = await asyncio.gather(*(student.ainvoke(Q) for _ in range(3)))
    assert {r.content for r in results} == {"purple"}
    text = "".join([str(c.content) async for c in student.astream(Q)])
    assert text == "purple"


def test_safe_from_many_threads(trained_gguf: Path) -> None:
    student = ChatStudent(model_path=trained_gguf, n_ctx=256, max_tokens=8, n_parallel=2)
    questions = [
        f"What color is the cat {i}? It is {c}."
        for i, c in enumerate(["red", "blue", "green", "white"] * 4)
    ]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: student.invoke(q).content, questions))
    assert answers == [q.rsplit(" ", 1)[-1].rstrip(".") for q in questions]
    stats = student.engine_stats
    assert stats is not None and stats.max_active == 2  # two slots, decoded together
    deadline = time.monotonic() + 10  # the engine frees the last slot just after its answer
    while stats.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.finished == len(questions) and stats.active == 0


def test_engine_own_thread_pool_decodes_the_same_tokens(trained_gguf: Path) -> None:
    from langchain_understudy.students._engine import Engine, Sampling
    from langchain_understudy.students._llama import load_llama

    llm = load_llama(trained_gguf, n_ctx=256, n_threads=2, n_gpu_layers=0, seed=0)
    prompt = llm.tokenize(b"What color is the cat? It is blue.")
    out = {}
    for pool in (True, False):
        engine = Engine(llm, slots=2, n_ctx=256, n_batch=64, n_threads=2, thread_pool=pool)
        with engine.generate(prompt, max_tokens=12, sampling=Sampling()) as gen:
            out[pool] = [token for token, _, _, _ in gen]
        assert (engine._loop._pool is not None) is pool  # ggml's thread pool functions found
        engine.close()  # the context, then the pool, are freed
    assert out[True] == out[False] and out[True]


def test_a_thread_pool_that_changes_the_logits_is_not_kept(
    trained_gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # this llama.cpp build's persistent pool computes NaN for some k-quant files; the engine
    # compares a probe decode with and without the pool and keeps ggml's pool per call then
    import numpy as np

    from langchain_understudy.students._engine import Engine, Sampling, _ThreadPool
    from langchain_understudy.students._llama import load_llama

    llm = load_llama(trained_gguf, n_ctx=256, n_threads=2, n_gpu_layers=0, seed=0)
    answers = iter([np.zeros(4), np.full(4, np.nan)])  # before the pool, then with it
    with caplog.at_level("WARNING", logger="langchain_understudy"):
        assert _ThreadPool.attach_checked(llm.ctx, 2, 2, lambda: next(answers)) is None
    assert "thread pool computed different logits" in caplog.text
    import llama_cpp

    llm.reset()
    llm.eval(llm.tokenize(b"What color is the cat?"))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (llm.n_vocab(),))
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0  # computed without the pool
    # a pool that agrees is kept, and the engine's own probe agrees on this student
    kept = _ThreadPool.attach_checked(llm.ctx, 2, 2, lambda: np.ones(4))
    assert kept is not None
    _ThreadPool._functions()[2].llama_detach_threadpool(llm.ctx)
    kept.free()
    engine = Engine(llm, slots=1, n_ctx=64, n_batch=8, n_threads=2)
    assert engine._loop._pool is not None
    with engine.generate(llm.tokenize(b"What color"), max_tokens=2, sampling=Sampling()) as gen:
        assert len(list(gen)) >= 1
    engine.close()


def test_stop_and_max_tokens(student: ChatStudent) -> None:
    cut = student.invoke(Q, stop=["rp"])
    assert cut.content == "pu"
    one = student.invoke(Q, max_tokens=1)
    assert one.response_metadata["finish_reason"] == "length"
    assert one.usage_metadata["output_tokens"] == 1


def test_structured_output_is_valid_json_by_construction(student: ChatStudent) -> None:
    class Answer(BaseModel):
        color: str
        sure: bool

    capped = student.model_copy(update={"json_max_string_length": 10, "max_tokens": 40})
    result = capped.with_structured_output(Answer).invoke(Q)
    assert isinstance(result, Answer)
    raw = capped.invoke(
        Q,
        json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    )
    assert isinstance(json.loads(str(raw.content))["n"], int)


def test_invalid_json_schema_is_refused(trained_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="invalid JSON schema"):
        ChatStudent(
            model_path=trained_gguf,
            json_schema={"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
        )


def test_context_overflow_drops_oldest_turns_or_raises(trained_gguf: Path) -> None:
    long_history = []
    for i in range(30):
        long_history += [HumanMessage(f"What color is the lamp {i}? It is red."), AIMessage("red")]
    convo = [*long_history, HumanMessage(Q)]
    student = ChatStudent(model_path=trained_gguf, n_ctx=128, max_tokens=8)
    with pytest.warns(UserWarning, match="dropped the .* oldest turn"):
        msg = student.invoke(convo)
    dropped = msg.response_metadata["truncated_turns"]
    assert dropped > 0
    # the answer is the one to the conversation without its oldest turns, which fits as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = student.invoke(convo[dropped:])
    assert not kept.response_metadata.get("truncated_turns")
    assert msg.content == kept.content
    strict = ChatStudent(model_path=trained_gguf, n_ctx=128, max_tokens=8, overflow="error")
    with pytest.raises(StudentError, match="more than the student's context of 128"):
        strict.invoke(convo)
    with pytest.raises(StudentError, match="context"):
        student.invoke("purple " * 400)  # the last turn alone cannot fit


def test_bad_files_get_clear_errors(tmp_path: Path, trained_gguf: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        ChatStudent(model_path=tmp_path / "missing.gguf")
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        ChatStudent(model_path=foreign)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(trained_gguf.read_bytes()[: trained_gguf.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        ChatStudent(model_path=truncated).invoke("hi")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(path), "alienformer")
    w.add_tensor("x.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ArtifactError, match="alienformer"):
        ChatStudent(model_path=path).invoke("hi")


def test_from_registry_follows_the_promoted_version(tmp_path: Path, trained_gguf: Path) -> None:
    reg = StudentRegistry(tmp_path / "reg")
    with pytest.raises(ArtifactError, match="no student is promoted"):
        ChatStudent.from_registry(reg)
    reg.promote(reg.register(trained_gguf, {"teacher_model": "t"}))
    student = ChatStudent.from_registry(tmp_path / "reg", max_tokens=8, n_ctx=256)
    msg = student.invoke(Q)
    assert msg.response_metadata["student_version"] == "v1" and msg.content == "purple"


def test_confidence_formula() -> None:
    import math

    assert confidence_from_logprobs([]) == 0.0
    assert confidence_from_logprobs([0.0] * 50) == 1.0
    one_doubt = [math.log(0.5)] + [0.0] * 200
    # length does not dilute the one uncertain token: same score for short and long answers
    assert confidence_from_logprobs(one_doubt) == pytest.approx(
        confidence_from_logprobs(one_doubt[:4])
    )
    assert confidence_from_logprobs(one_doubt) < 0.9


def test_callbacks_see_tokens(student: ChatStudent) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    seen: list[str] = []
    lock = threading.Lock()

    class Tokens(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: object) -> None:
            with lock:
                seen.append(token)

    student.invoke(Q, config={"callbacks": [Tokens()]})
    assert "".join(seen) == "purple"
