"""Shadow and canary candidates on live traffic, with real students from a real registry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conftest import COLORS, ITEMS
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_understudy.config import RolloutSettings
from langchain_understudy.prompting import message_text
from langchain_understudy.router import ChatUnderstudy, Router
from langchain_understudy.students import StudentRegistry


class ColorTeacher(BaseChatModel):
    """Answers the colour task correctly: the colour the question states."""

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **kw: Any) -> ChatResult:
        m = re.search(r"It is (\w+)\.", message_text(messages[-1]))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(m.group(1) if m else ""))])

    @property
    def _llm_type(self) -> str:
        return "color-teacher"


def _questions(n: int, start: int = 10_000) -> list[str]:
    return [
        f"What color is the {ITEMS[i % 8]} {start + i}? It is {COLORS[(i * 3) % 8]}."
        for i in range(n)
    ]


def _llm(reg: StudentRegistry, audit: Path, **rollout: Any) -> ChatUnderstudy:
    return ChatUnderstudy(
        student=reg,
        teacher=ColorTeacher(),
        router=Router(threshold=1.0),  # the student answers every turn
        mode="pre",
        max_tokens=6,
        reload_check_s=0.0,
        audit_log=audit,
        rollout=RolloutSettings(**rollout),
    )


def test_worse_canary_is_rolled_back_and_better_one_promoted(
    trained_gguf: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    reg = StudentRegistry(tmp_path / "students")
    good = reg.register(trained_gguf, {"teacher": "t"}, {})
    reg.promote(good)
    bad = reg.register(tiny_gguf, {"teacher": "t"}, {})  # random weights: a far worse student
    reg.start_canary(bad, share=1.0)
    llm = _llm(
        reg,
        tmp_path / "audit.jsonl",
        teacher_sample_rate=1.0,
        min_checks=20,
        min_requests=20,
        min_agreement=0.8,
    )
    answered = [llm.invoke(q).response_metadata["understudy"] for q in _questions(20)]
    assert llm.live_rollout is not None
    llm.live_rollout.worker.join()
    versions = [m["student_version"] for m in answered]
    assert versions[0] == bad  # share 1.0: every conversation goes to the canary
    assert reg.rollout().canary is None
    assert reg.current_version() == good  # rolled back: the good student still serves
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    rolled = [e for e in events if e.get("event") == "canary rolled back"]
    assert len(rolled) == 1 and rolled[0]["candidate"] == bad
    assert (
        llm.invoke(_questions(1, 50_000)[0]).response_metadata["understudy"]["student_version"]
        == good
    )

    better = reg.register(trained_gguf, {"teacher": "t"}, {})
    reg.start_canary(better, share=1.0)
    for q in _questions(20, 20_000):
        llm.invoke(q)
    llm.live_rollout.worker.join()
    assert reg.current_version() == better  # promoted automatically
    assert llm.live_rollout.events == {"canary rolled back": 1, "canary promoted": 1}


def test_shadow_records_agreement_off_the_request_path(
    trained_gguf: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    from langchain_understudy.router.rollout import LiveLog, summarize

    reg = StudentRegistry(tmp_path / "students")
    reg.promote(reg.register(trained_gguf, {}, {}))
    twin = reg.register(trained_gguf, {}, {})
    reg.set_shadow(twin)
    llm = _llm(reg, tmp_path / "audit.jsonl")
    served = [llm.invoke(q) for q in _questions(12)]
    assert llm.live_rollout is not None
    llm.live_rollout.worker.join()
    assert all(m.response_metadata["understudy"]["student_version"] == "v1" for m in served)
    live = summarize(LiveLog(reg.root / "live.jsonl").read()).get(twin, "shadow")
    assert live is not None and live.n == 12
    assert live.agreement == 1.0  # the same weights agree with every served answer

    from fastapi.testclient import TestClient

    from langchain_understudy.plugin.server import create_app

    text = TestClient(create_app(llm, api_key="")).get("/metrics").text
    assert f'understudy_rollout_checks_total{{candidate="{twin}",kind="shadow"}} 12.0' in text
    assert f'understudy_rollout_agreement{{candidate="{twin}",kind="shadow"}} 1.0' in text
    reg.set_shadow(None)
    reg.set_shadow(reg.register(tiny_gguf, {}, {}))
    for q in _questions(12, 30_000):
        llm.invoke(q)
    llm.live_rollout.worker.join()
    worse = summarize(LiveLog(reg.root / "live.jsonl").read()).get("v3", "shadow")
    assert worse is not None and worse.n == 12 and (worse.agreement or 0) < 0.5
