"""ChatUnderstudy end to end on the tiny GGUF: modes, metadata, audit log, teacher faults, privacy,
knowledge, registry promotions and the out-of-distribution index."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _understudy_fakes import FakeTeacher
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore
from pydantic import PrivateAttr

from langchain_understudy.errors import ConfigError, StudentError
from langchain_understudy.router import (
    ChatUnderstudy,
    OODIndex,
    PrivacyPolicy,
    ResilientTeacher,
    Router,
    RoutingRules,
    SignalSpec,
)
from langchain_understudy.router.signals import DEFAULT_SIGNALS
from langchain_understudy.students import ChatStudent, StudentRegistry

pytestmark = pytest.mark.slow

REQUIRED = {
    "answered_by",
    "reason",
    "score",
    "threshold",
    "student_version",
    "teacher_model",
    "latency_ms",
    "escalation_blocked",
    "blocked_reason",
    "signals",
    "absent",
    "failed",
}


@pytest.fixture(scope="module")
def student(tiny_gguf: Path) -> ChatStudent:
    return ChatStudent(model_path=tiny_gguf, n_ctx=512, max_tokens=8).load()


def _meta(msg: BaseMessage) -> dict[str, Any]:
    return msg.response_metadata["understudy"]  # type: ignore[no-any-return]


def _fast(teacher: BaseChatModel, **kw: Any) -> ResilientTeacher:
    kw.setdefault("max_retries", 1)
    return ResilientTeacher(teacher, backoff_s=0.0, sleep=lambda s: None, **kw)


def test_student_answers_with_full_metadata(student: ChatStudent, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    llm = ChatUnderstudy(
        student=student, teacher=FakeTeacher(), router=Router(threshold=1.0), audit_log=log
    )
    msg = llm.invoke("What does the Pro plan cost? my secret phrase")
    meta = _meta(msg)
    assert REQUIRED <= set(meta)
    assert meta["answered_by"] == "student" and meta["stage"] == "post"
    assert meta["teacher_model"] == "fake-teacher-1"
    assert meta["escalation_blocked"] is False and meta["latency_ms"] > 0
    assert set(meta["signals"]) == {
        "user_turns",
        "context_fraction",
        "depends_on_history",
        "student_confidence",
    }
    assert "ood_distance" in meta["absent"] and "retrieval_similarity" in meta["absent"]
    assert msg.response_metadata["model_name"] == student.model_path.name
    assert msg.usage_metadata is not None
    llm.invoke("second")
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["answered_by"] == "student" and rec["conversation_sha256"]
    assert "secret phrase" not in log.read_text()  # no message text in the audit log


def test_cascade_escalates_low_confidence(student: ChatStudent) -> None:
    teacher = FakeTeacher()
    llm = ChatUnderstudy(student=student, teacher=teacher, mode="cascade")
    msg = llm.invoke("Hello")
    meta = _meta(msg)
    assert msg.content == "teacher: Hello"
    assert meta["answered_by"] == "teacher" and meta["stage"] == "cascade"
    assert meta["student_draft_discarded"] is True
    assert meta["deciding_signals"] == ["student_confidence"]
    assert msg.response_metadata["model_name"] == "fake-teacher-1"


def test_pre_mode_sends_long_dependent_conversations_up(student: ChatStudent) -> None:
    teacher = FakeTeacher()
    turns: list[BaseMessage] = []
    for i in range(6):
        turns += [HumanMessage(f"question {i} about invoices"), AIMessage(f"answer {i}")]
    turns.append(HumanMessage("and the other one?"))
    llm = ChatUnderstudy(student=student, teacher=teacher, mode="pre", router=Router(threshold=0.5))
    meta = _meta(llm.invoke(turns))
    assert meta["answered_by"] == "teacher" and meta["stage"] == "pre"
    assert set(meta["deciding_signals"]) & {"user_turns", "depends_on_history"}
    assert "student_confidence" not in meta["signals"]  # the student never ran
    assert len(teacher.calls) == 1 and teacher.calls[0][-1].content == "and the other one?"


def test_teacher_down_student_answers_and_says_why(student: ChatStudent) -> None:
    teacher = FakeTeacher(fail=True)
    llm = ChatUnderstudy(student=student, teacher=_fast(teacher), router=Router(threshold=0.0))
    msg = llm.invoke("Hello")
    meta = _meta(msg)
    assert meta["answered_by"] == "student"
    assert meta["escalation_blocked"] is True
    assert "503 Service Unavailable" in meta["blocked_reason"]
    assert len(teacher.calls) == 2  # one retry


def test_budget_and_circuit_block_escalation(student: ChatStudent) -> None:
    teacher = FakeTeacher()
    llm = ChatUnderstudy(
        student=student, teacher=_fast(teacher, calls_per_minute=1), router=Router(threshold=0.0)
    )
    assert _meta(llm.invoke("one"))["answered_by"] == "teacher"
    meta = _meta(llm.invoke("two"))
    assert meta["answered_by"] == "student" and "budget exhausted" in meta["blocked_reason"]

    broken = FakeTeacher(fail=True)
    guard = _fast(broken, max_retries=0, failure_threshold=2, reset_after_s=600)
    llm = ChatUnderstudy(student=student, teacher=guard, router=Router(threshold=0.0))
    for _ in range(2):
        llm.invoke("x")
    meta = _meta(llm.invoke("x"))
    assert "circuit open" in meta["blocked_reason"] and len(broken.calls) == 2


@pytest.mark.parametrize(
    ("text", "config", "kwargs", "why"),
    [
        ("mail me at ana@example.org", {}, {}, "personal data detected (email)"),
        ("my IBAN is DE89 3704 0044 0532 0130 00", {}, {}, "personal data detected (iban)"),
        ("plain question", {"tags": ["private"]}, {}, "run tagged 'private'"),
        ("about my salary", {}, {"rules": ["(?i)salary"]}, "never goes to the teacher"),
    ],
)
def test_private_conversations_never_reach_the_teacher(
    student: ChatStudent, text: str, config: dict[str, Any], kwargs: dict[str, Any], why: str
) -> None:
    teacher = FakeTeacher()
    rules = RoutingRules(never_teacher_patterns=kwargs.get("rules", []))
    llm = ChatUnderstudy(
        student=student, teacher=teacher, router=Router(threshold=0.0, rules=rules)
    )
    for msg in (llm.invoke(text, config=config), list(llm.stream(text, config=config))[-1]):
        meta = _meta(msg)
        assert meta["answered_by"] == "student"
        assert meta["escalation_blocked"] is True and why in meta["blocked_reason"]
    assert teacher.calls == []


async def test_private_async_and_pii_switch(student: ChatStudent) -> None:
    teacher = FakeTeacher()
    llm = ChatUnderstudy(student=student, teacher=teacher, router=Router(threshold=0.0))
    meta = _meta(await llm.ainvoke("call me on +41 44 668 18 00"))
    assert meta["answered_by"] == "student" and "phone" in meta["blocked_reason"]
    assert teacher.calls == []
    open_llm = ChatUnderstudy(
        student=student,
        teacher=teacher,
        router=Router(threshold=0.0),
        privacy=PrivacyPolicy(block_pii=False),
    )
    assert _meta(await open_llm.ainvoke("call me on +41 44 668 18 00"))["answered_by"] == "teacher"


def test_no_teacher_reports_blocked(student: ChatStudent) -> None:
    meta = _meta(ChatUnderstudy(student=student, router=Router(threshold=0.0)).invoke("hi"))
    assert meta["answered_by"] == "student" and meta["blocked_reason"] == "no teacher configured"
    assert meta["teacher_model"] is None


def test_failing_signal_escalates(student: ChatStudent) -> None:
    def broken(ctx: Any) -> float:
        raise RuntimeError("feature store offline")

    spec = SignalSpec("broken", broken, "pre", True, (0.0, 1.0), (0.0, 1.0))
    router = Router(threshold=1.0, signals=[*DEFAULT_SIGNALS, spec])
    teacher = FakeTeacher()
    meta = _meta(ChatUnderstudy(student=student, teacher=teacher, router=router).invoke("hi"))
    assert meta["answered_by"] == "teacher" and meta["score"] == 1.0
    assert meta["failed"] == {"broken": "raised RuntimeError: feature store offline"}
    assert "signal broken failed" in meta["reason"]


def test_student_failure_falls_back_to_teacher(tiny_gguf: Path) -> None:
    small = ChatStudent(model_path=tiny_gguf, n_ctx=64, max_tokens=32, overflow="error")
    long_text = "price plan " * 60
    teacher = FakeTeacher()
    llm = ChatUnderstudy(
        student=small, teacher=teacher, mode="cascade", router=Router(threshold=1.0)
    )
    meta = _meta(llm.invoke(long_text))
    assert meta["answered_by"] == "teacher" and meta["reason"].startswith("student failed")
    with pytest.raises(StudentError):
        ChatUnderstudy(student=small, mode="cascade").invoke(long_text)


class _Store(InMemoryVectorStore):
    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda s: (1.0 + s) / 2.0


class _SpyStudent(BaseChatModel):
    _seen: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "spy"

    def _generate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        self._seen.append(kw)
        meta = {"confidence": 0.99, "model_name": "spy"}
        return ChatResult(
            generations=[ChatGeneration(message=AIMessage("ok", response_metadata=meta))]
        )


def test_knowledge_facts_reach_the_student_and_feed_the_signal() -> None:
    store = _Store(DeterministicFakeEmbedding(size=16))
    store.add_documents(
        [
            Document("Pro costs 49 EUR a month.", id="price.pro", metadata={"as_of": "2026-01-01"}),
            Document("Basic is free.", id="price.basic", metadata={"as_of": "2025-06-01"}),
        ]
    )
    spy = _SpyStudent()
    llm = ChatUnderstudy(student=spy, knowledge=store, k=2, router=Router(threshold=1.0))
    meta = _meta(llm.invoke("What does Pro cost?"))
    facts = spy._seen[-1]["facts"]
    assert {f.key for f in facts} == {"price.pro", "price.basic"}
    assert {f.as_of for f in facts} == {"2026-01-01", "2025-06-01"}
    assert 0.0 <= meta["signals"]["retrieval_similarity"] <= 1.0
    assert sorted(meta["facts"]) == ["price.basic", "price.pro"]
    # min_relevance hides weak facts from the student (the signal still sees them)
    strict = ChatUnderstudy(
        student=spy, knowledge=store, min_relevance=1.0, router=Router(threshold=1.0)
    )
    strict.invoke("What does Pro cost?")
    assert "facts" not in spy._seen[-1]
    # a store that cannot score fails the signal, which escalates
    broken = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    teacher = FakeTeacher()
    meta = _meta(ChatUnderstudy(student=spy, teacher=teacher, knowledge=broken).invoke("q"))
    assert meta["answered_by"] == "teacher" and "retrieval_similarity" in meta["failed"]


def test_retriever_without_scores_gives_facts_but_no_signal() -> None:
    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
            return [Document("fact one", id="f1")]

    spy = _SpyStudent()
    meta = _meta(
        ChatUnderstudy(student=spy, knowledge=Fixed(), router=Router(threshold=1.0)).invoke("q")
    )
    assert [f.key for f in spy._seen[-1]["facts"]] == ["f1"]
    assert meta["absent"]["retrieval_similarity"] == "the retriever gives no relevance scores"


def _ood_files(folder: Path, texts: list[str]) -> None:
    emb = DeterministicFakeEmbedding(size=16)
    vecs = np.asarray(emb.embed_documents(texts), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    np.save(folder / "ood_index.npy", vecs, allow_pickle=False)
    (folder / "ood_meta.json").write_text(json.dumps({"embedding": "fake", "n": len(texts)}))


def test_registry_promotions_are_followed(tiny_gguf: Path, tmp_path: Path) -> None:
    reg = StudentRegistry(tmp_path / "students")
    v1 = reg.register(tiny_gguf, {"teacher": "t"})
    _ood_files(tmp_path, ["What does Pro cost?", "How do I reset my password?"])
    v2 = reg.register(
        tiny_gguf,
        {"teacher": "t"},
        extra_files={
            "ood_index.npy": tmp_path / "ood_index.npy",
            "ood_meta.json": tmp_path / "ood_meta.json",
        },
    )
    reg.promote(v1)
    llm = ChatUnderstudy(
        student=reg,
        teacher=FakeTeacher(),
        router=Router(threshold=1.0),
        embeddings=DeterministicFakeEmbedding(size=16),
        reload_check_s=0.0,
        student_kwargs={"n_ctx": 256, "max_tokens": 4},
    )
    meta = _meta(llm.invoke("What does Pro cost?"))
    assert meta["student_version"] == v1
    assert "registered without ood_index.npy" in meta["absent"]["ood_distance"]
    reg.promote(v2)
    meta = _meta(llm.invoke("What does Pro cost?"))
    assert meta["student_version"] == v2
    assert meta["signals"]["ood_distance"] == pytest.approx(0.0, abs=1e-5)
    meta = _meta(llm.invoke("Something else entirely"))
    assert meta["signals"]["ood_distance"] > 0.1


def test_ood_index_beside_a_plain_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "student.gguf"
    shutil.copyfile(tiny_gguf, gguf)
    _ood_files(tmp_path, ["hello there"])
    s = ChatStudent(model_path=gguf, n_ctx=256, max_tokens=4)
    llm = ChatUnderstudy(student=s, embeddings=DeterministicFakeEmbedding(size=16))
    ins = llm.inspect([HumanMessage("hello there")])
    assert ins.signals["ood_distance"] == pytest.approx(0.0, abs=1e-5)
    assert ins.embedding_ms > 0 and ins.overhead_ms >= ins.embedding_ms
    ex = ins.to_example(1.0, out_of_scope=False)
    assert ex.signals["student_confidence"] is not None
    # an index of the wrong width fails the signal and escalates
    bad = ChatUnderstudy(
        student=s, embeddings=DeterministicFakeEmbedding(size=8), teacher=FakeTeacher()
    )
    meta = _meta(bad.invoke("hello there"))
    assert "dimensions" in meta["failed"]["ood_distance"] and meta["answered_by"] == "teacher"
    assert OODIndex.load(tmp_path).dimension == 16


def test_trace_callbacks_see_teacher_calls_only(student: ChatStudent) -> None:
    class Recorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.starts: list[Any] = []

        def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
            self.starts.append(messages)

    rec = Recorder()
    teacher = FakeTeacher()
    up = ChatUnderstudy(
        student=student, teacher=teacher, router=Router(threshold=0.0), trace_callbacks=[rec]
    )
    up.invoke("escalate me")
    assert len(rec.starts) == 1 and rec.starts[0][0][-1].content == "escalate me"
    down = ChatUnderstudy(
        student=student,
        teacher=teacher,
        mode="pre",
        router=Router(threshold=1.0),
        trace_callbacks=[rec],
    )
    down.invoke("stay local")
    assert len(rec.starts) == 1


def test_streaming(student: ChatStudent) -> None:
    live = ChatUnderstudy(
        student=student, teacher=FakeTeacher(), mode="pre", router=Router(threshold=1.0)
    )
    chunks = list(live.stream("Hello"))
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last"
    assert _meta(chunks[-1])["answered_by"] == "student"
    assert all("understudy" not in c.response_metadata for c in chunks[:-1])
    up = ChatUnderstudy(student=student, teacher=FakeTeacher(), router=Router(threshold=0.0))
    chunks = list(up.stream("Hello"))
    assert len(chunks) == 1 and chunks[0].content == "teacher: Hello"
    # auto mode without any possible escalation streams live and still runs the cascade check
    alone = ChatUnderstudy(student=student, mode="auto")
    chunks = list(alone.stream("Hello"))
    meta = _meta(chunks[-1])
    assert len(chunks) > 2 and meta["stage"] == "post"
    assert meta["escalation_blocked"] is True and meta["blocked_reason"] == "no teacher configured"


async def test_async_paths(student: ChatStudent) -> None:
    llm = ChatUnderstudy(student=student, teacher=FakeTeacher(), mode="cascade")
    assert _meta(await llm.ainvoke("Hello"))["answered_by"] == "teacher"
    live = ChatUnderstudy(
        student=student, teacher=FakeTeacher(), mode="pre", router=Router(threshold=1.0)
    )
    chunks = [c async for c in live.astream("Hello")]
    assert len(chunks) > 2 and _meta(chunks[-1])["answered_by"] == "student"
    down = ChatUnderstudy(
        student=student, teacher=_fast(FakeTeacher(fail=True)), router=Router(threshold=0.0)
    )
    meta = _meta(await down.ainvoke("Hello"))
    assert meta["answered_by"] == "student" and meta["escalation_blocked"]


def test_concurrent_batch(student: ChatStudent) -> None:
    llm = ChatUnderstudy(student=student, teacher=FakeTeacher(), mode="auto")
    out = llm.batch([f"q{i}" for i in range(6)], config={"max_concurrency": 3})
    assert [m.content for m in out] == [f"teacher: q{i}" for i in range(6)]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="student must be"):
        ChatUnderstudy(student="not a model")
    with pytest.raises(ConfigError, match="teacher must be"):
        ChatUnderstudy(student=_SpyStudent(), teacher="gpt-4")


def test_from_config(tiny_gguf: Path, tmp_path: Path) -> None:
    from langchain_understudy.config import UnderstudyConfig

    cfg = UnderstudyConfig(
        student={"model_path": tiny_gguf, "n_ctx": 256, "max_tokens": 4},
        router={
            "threshold": 0.0,
            "audit_log": tmp_path / "audit.jsonl",
            "private_tags": ["secret"],
        },
    )
    llm = ChatUnderstudy.from_config(cfg, teacher=FakeTeacher())
    assert _meta(llm.invoke("hi"))["answered_by"] == "teacher"
    meta = _meta(llm.invoke("hi", config={"tags": ["secret"]}))
    assert meta["answered_by"] == "student" and "'secret'" in meta["blocked_reason"]
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 2
    alone = ChatUnderstudy.from_config(cfg)  # teacher.kind = "none"
    assert alone.resilient_teacher is None
