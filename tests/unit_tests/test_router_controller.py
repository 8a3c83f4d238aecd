"""TeacherRateController: the teacher-call rate holds its target when the traffic mix shifts."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_understudy.errors import ConfigError
from langchain_understudy.router import (
    ChatUnderstudy,
    ResilientTeacher,
    Router,
    TeacherRateController,
)
from langchain_understudy.router.policy import _rate_quantile, threshold_for_teacher_rate
from langchain_understudy.router.signals import RoutingContext, SignalSpec

TARGET = 0.2


def _mix(rng: np.random.Generator, n: int, out_of_scope: float) -> np.ndarray:
    """Escalation scores: in-scope requests score low, out-of-scope ones high (overlapping)."""
    oos = rng.random(n) < out_of_scope
    return np.where(oos, rng.beta(6, 2, n), rng.beta(2, 6, n))


def _serve(
    scores: np.ndarray,
    threshold: float,
    controller: TeacherRateController | None,
    forced: np.ndarray | None = None,
) -> np.ndarray:
    """Route a score stream; ``forced`` requests go up whatever their score (student failures)."""
    out = np.zeros(len(scores), dtype=bool)
    for i, s in enumerate(scores):
        t = (
            threshold
            if controller is None or controller.threshold is None
            else controller.threshold
        )
        out[i] = s >= t or (forced is not None and forced[i])
        if controller is not None:
            controller.observe(float(s), bool(out[i]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rate_returns_to_target_after_a_traffic_shift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # calibrated offline on a 3% out-of-scope mix; live traffic then shifts to 18%
    threshold = threshold_for_teacher_rate(_mix(rng, 3000, 0.03), TARGET)
    before, after = _mix(rng, 2000, 0.03), _mix(rng, 6000, 0.18)
    stream = np.concatenate([before, after])
    fixed = _serve(stream, threshold, None)
    steered = _serve(stream, threshold, TeacherRateController(TARGET, window=500))
    settled = slice(len(before) + 1000, None)  # two windows after the shift
    assert fixed[settled].mean() > TARGET + 0.08  # the offline threshold overspends
    assert abs(steered[settled].mean() - TARGET) <= 0.02
    assert abs(steered[: len(before)].mean() - TARGET) <= 0.03  # and holds before the shift


def test_integral_term_covers_escalations_the_scores_do_not_show() -> None:
    rng = np.random.default_rng(7)
    stream = _mix(rng, 8000, 0.18)
    forced = rng.random(len(stream)) < 0.05  # e.g. the student fails and the teacher answers
    threshold = threshold_for_teacher_rate(stream[:1000], TARGET)
    quantile_only = _serve(stream, threshold, TeacherRateController(TARGET, gain=0.0), forced)
    with_integral = _serve(stream, threshold, TeacherRateController(TARGET, gain=0.5), forced)
    assert quantile_only[2000:].mean() > TARGET + 0.03
    assert abs(with_integral[2000:].mean() - TARGET) <= 0.02


def test_quantile_matches_the_offline_calibration_rule() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        scores = np.round(rng.random(n), int(rng.integers(1, 3)))  # ties included
        scores[rng.random(n) < 0.1] = 1.0
        rate = float(rng.random())
        expected = threshold_for_teacher_rate(scores, rate)
        assert _rate_quantile(sorted(scores.tolist()), rate) == pytest.approx(expected)


def test_warm_up_bounds_window_and_reset() -> None:
    c = TeacherRateController(0.1, window=50, min_requests=20, bounds=(0.3, 0.6))
    for i in range(19):
        assert c.observe(0.01 * i, False) is None  # the router's own threshold holds
    c.observe(0.0, False)
    assert c.threshold == 0.3  # every score is low: the floor holds
    for _ in range(50):
        c.observe(1.0, True)
    assert c.threshold == 0.6 and c.observed_rate == 1.0 and c.requests == 70
    state = c.state()
    assert state["target"] == 0.1 and state["window"] == 50
    c.reset()
    assert c.threshold is None and c.observed_rate is None and c.requests == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 0.0}, "target teacher rate must be in"),
        ({"target": 0.2, "window": 5}, "window must be at least"),
        ({"target": 0.2, "window": 50, "min_requests": 51}, "min_requests must be in"),
        ({"target": 0.2, "gain": -1.0}, "gain must be"),
        ({"target": 0.2, "bounds": (0.8, 0.2)}, "bounds must be"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TeacherRateController(**kwargs)


# -- wired into ChatUnderstudy ----------------------------------------------------------------------
def _risk(ctx: RoutingContext) -> float:
    m = re.search(r"risk=([0-9.]+)", str(ctx.messages[-1].content))
    return float(m.group(1)) if m else 0.0


class _Student(BaseChatModel):
    @property
    def _llm_type(self) -> str:
        return "confident-student"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        msg = AIMessage("ok", response_metadata={"confidence": 0.99, "model_name": "s"})
        return ChatResult(generations=[ChatGeneration(message=msg)])


def _llm(teacher: Any) -> ChatUnderstudy:
    router = Router(
        threshold=0.9, signals=[SignalSpec("risk", _risk, "pre", True, (0.0, 1.0), (0.0, 1.0))]
    )
    return ChatUnderstudy(
        student=_Student(),
        teacher=teacher,
        router=router,
        rate_controller=TeacherRateController(0.25, window=100, min_requests=40),
    )


def test_chat_understudy_steers_and_budgets_still_cap() -> None:
    rng = np.random.default_rng(11)
    scores = rng.random(240)
    open_llm = _llm(FakeListChatModel(responses=["teacher"]))
    now = [0.0]
    guard = ResilientTeacher(
        FakeListChatModel(responses=["teacher"]), calls_per_minute=10, clock=lambda: now[0]
    )
    capped = _llm(guard)
    metas = []
    for s in scores:
        open_meta = open_llm.invoke(f"risk={s:.3f}").response_metadata["understudy"]
        metas.append(capped.invoke(f"risk={s:.3f}").response_metadata["understudy"])
        assert metas[-1]["threshold"] == open_meta["threshold"]  # refusals do not wind it up
    assert metas[0]["threshold"] == 0.9  # the calibrated threshold until warmed up
    steered = metas[-1]["threshold"]
    assert 0.6 < steered < 0.9 and capped.current_threshold() == steered
    assert guard.attempts == 10  # the per-minute budget is still a hard cap
    blocked = [m for m in metas if m["escalation_blocked"]]
    assert blocked and all("budget exhausted" in m["blocked_reason"] for m in blocked)
    assert capped.rate_controller is not None
    assert abs((capped.rate_controller.observed_rate or 0) - 0.25) <= 0.08
