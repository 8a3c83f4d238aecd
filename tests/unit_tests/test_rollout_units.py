"""The rollout engine: agreement, intervals, canary decisions, drift statistics, registry state."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from langchain_understudy.errors import ArtifactError
from langchain_understudy.router.rollout import (
    CanaryPolicy,
    CheckWorker,
    DriftMonitor,
    LiveSummary,
    agreement,
    conversation_key,
    drift_values,
    in_canary,
    psi,
    wilson_interval,
)
from langchain_understudy.students import StudentRegistry


def test_agreement_ignores_case_and_punctuation_but_not_tool_calls() -> None:
    assert agreement(AIMessage("Red."), AIMessage(" red"))
    assert not agreement(AIMessage("red"), AIMessage("blue"))
    call = {"name": "f", "args": {"x": 1}, "id": "a"}
    assert agreement(
        AIMessage("", tool_calls=[call]), AIMessage("", tool_calls=[{**call, "id": "b"}])
    )
    assert not agreement(
        AIMessage("", tool_calls=[call]), AIMessage("", tool_calls=[{**call, "args": {"x": 2}}])
    )


def test_wilson_interval_brackets_the_rate() -> None:
    lo, hi = wilson_interval(90, 100)
    assert 0.82 < lo < 0.9 < hi < 0.95
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_canary_share_is_sticky_per_conversation_and_close_to_the_share() -> None:
    first = [HumanMessage("hello there")]
    later = [*first, AIMessage("hi"), HumanMessage("and now?")]
    assert conversation_key(first) == conversation_key(later)
    assert conversation_key(first, ["conversation:42"]) == "conversation:42"
    hits = sum(in_canary(f"conv{i}", 0.2, salt="v2") for i in range(5000))
    assert 900 < hits < 1100


def _summary(agree: int, n: int, errors: int = 0) -> LiveSummary:
    s = LiveSummary("v2", "canary")
    for i in range(n):
        s.add(
            {"agree_teacher": i < agree, "error": "boom" if i < errors else None, "latency_ms": 5}
        )
    return s


def test_canary_policy_promotes_holds_and_rolls_back() -> None:
    p = CanaryPolicy(min_agreement=0.9, min_checks=50, min_requests=50)
    assert p.decide(_summary(30, 30))[0] is None  # not enough yet
    assert p.decide(_summary(49, 50))[0] == "promote"
    assert p.decide(_summary(3, 12))[0] == "rollback"  # clearly worse: early
    assert p.decide(_summary(44, 50))[0] == "rollback"  # 0.88 once the counts are in
    assert p.decide(_summary(50, 50, errors=5))[0] == "rollback"


def test_check_worker_drops_instead_of_blocking() -> None:
    import threading

    gate = threading.Event()
    w = CheckWorker(maxsize=2)
    accepted = [w.submit(gate.wait) for _ in range(6)]
    assert accepted.count(False) >= 3 and w.dropped == accepted.count(False)
    gate.set()
    w.join()


def test_drift_alarm_on_shift_not_on_same_distribution() -> None:
    rng = random.Random(0)
    ref = [rng.gauss(0.3, 0.05) for _ in range(400)]
    same = DriftMonitor({"ood_distance": ref}, window=500, min_samples=100)
    for _ in range(500):
        same.observe({"ood_distance": rng.gauss(0.3, 0.05)})
    assert not same.report()["alarm"]
    shifted = DriftMonitor({"ood_distance": ref}, window=500, min_samples=100)
    for i in range(500):  # noqa: B007 - read after the loop
        shifted.observe({"ood_distance": rng.gauss(0.7, 0.05)})
        if shifted.report()["alarm"]:
            break
    assert i < 150 and shifted.report()["alarm_signals"] == ["ood_distance"]
    assert psi(ref, ref) < 0.01


def test_drift_watch_follows_answer_entropy_from_metadata_and_audit_records() -> None:
    rng = random.Random(1)
    monitor = DriftMonitor({"answer_entropy": [rng.uniform(0, 0.5) for _ in range(300)]})
    for _ in range(200):  # the student grows unsure: its answers come from flatter distributions
        meta = {"signals": {"ood_distance": 0.2}, "answer_entropy": rng.uniform(1.5, 3.0)}
        monitor.observe(drift_values(meta))
    monitor.observe(drift_values({"answer_entropy": None}))  # an escalated request: no answer
    report = monitor.report()
    assert report["alarm_signals"] == ["answer_entropy"]
    assert report["signals"]["answer_entropy"]["n"] == 200


def test_registry_rollout_state_is_checked(tmp_path: Path) -> None:
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    reg = StudentRegistry(tmp_path / "reg")
    v1, v2 = reg.register(fake, {}, {}), reg.register(fake, {}, {})
    with pytest.raises(ArtifactError, match="promote a student"):
        reg.start_canary(v2, 0.1)
    reg.promote(v1)
    with pytest.raises(ArtifactError, match="already the promoted"):
        reg.start_canary(v1, 0.1)
    with pytest.raises(ValueError, match="share"):
        reg.start_canary(v2, 1.5)
    st = reg.start_canary(v2, 0.25)
    assert (st.canary, st.canary_share) == (v2, 0.25)
    assert StudentRegistry(tmp_path / "reg").rollout().canary == v2  # persisted
    reg.promote(v2)  # promoting the canary ends it
    assert reg.rollout().canary is None
    assert reg.end_canary("stopped") is None


def test_cli_shadow_canary_compare_and_promote_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_understudy.plugin.cli import main
    from langchain_understudy.router.rollout import LiveLog

    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    reg = StudentRegistry(tmp_path / "reg")
    reg.promote(reg.register(fake, {}, {}))
    v2 = reg.register(fake, {}, {})
    r = ["--registry", str(reg.root)]
    assert main(["students", "shadow", v2, *r]) == 0
    assert reg.rollout().shadow == v2
    log = LiveLog(reg.root / "live.jsonl")
    for i in range(10):
        log.append({"kind": "shadow", "candidate": v2, "agree_served": i < 9, "latency_ms": 3})
    assert main(["students", "compare", *r]) == 0
    out = capsys.readouterr().out
    assert "shadow" in out and "0.900" in out
    assert main(["students", "canary", v2, "--share", "0.2", *r]) == 0
    assert reg.rollout().canary_share == 0.2
    assert main(["students", "canary", "--stop", *r]) == 0
    assert reg.rollout().canary is None
    (tmp_path / "understudy.toml").write_text(
        "[rollout]\nrequire_live_agreement = true\nmin_requests = 20\n"
    )
    cfg = ["--config", str(tmp_path / "understudy.toml")]
    assert main(["students", "promote", v2, *r, *cfg]) == 2  # 10 checks < 20
    assert "refused" in capsys.readouterr().out
    assert reg.current_version() == "v1"
    assert main(["students", "promote", v2, "--force", *r, *cfg]) == 0
    assert reg.current_version() == v2
