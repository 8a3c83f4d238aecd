"""The Router policies: scoring, failing signals, rules, fitting, calibration and persistence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from langchain_core.messages import AIMessage, HumanMessage

import langchain_understudy.router as router_pkg
from langchain_understudy.errors import ConfigError
from langchain_understudy.router import LearnedRouter, RoutedExample, Router, load_router
from langchain_understudy.router.policy import threshold_for_quality, threshold_for_teacher_rate
from langchain_understudy.router.signals import (
    DEFAULT_SIGNALS,
    RoutingContext,
    RoutingRules,
    SignalSpec,
)


def test_public_names_are_pinned() -> None:
    assert router_pkg.__all__ == [
        "DEFAULT_SIGNALS",
        "ChatUnderstudy",
        "Decision",
        "Inspection",
        "LearnedRouter",
        "OODIndex",
        "PrivacyPolicy",
        "ResilientTeacher",
        "RoutedExample",
        "Router",
        "RouterReport",
        "RoutingContext",
        "RoutingRules",
        "SignalAbsent",
        "SignalSpec",
        "TeacherRateController",
        "apgr",
        "auroc",
        "collect_examples",
        "cpt",
        "evaluate_router",
        "load_router",
        "plot_report",
        "quality_curve",
        "teacher_from_settings",
    ]
    for name in router_pkg.__all__:
        assert getattr(router_pkg, name) is not None


def _const(value: object, stage: str = "pre", name: str = "probe") -> SignalSpec:
    return SignalSpec(name, lambda ctx: value, stage, True, (0.0, 1.0), (0.0, 1.0))  # type: ignore[arg-type,return-value]


def _ctx(text: str = "hi", **kw: object) -> RoutingContext:
    return RoutingContext([HumanMessage(text)], **kw)  # type: ignore[arg-type]


def test_default_router_single_turn_does_not_escalate() -> None:
    d = Router().decide(_ctx(), "pre")
    assert not d.escalate
    assert d.score == 0.0
    assert d.signals == {"user_turns": 1.0, "depends_on_history": 0.0}
    assert set(d.absent) == {"context_fraction", "retrieval_similarity", "ood_distance"}
    assert d.failed == {}
    assert "student_confidence" not in d.signals  # post-generation only


def test_score_is_the_largest_risk_and_reason_names_it() -> None:
    specs = [_const(0.2, name="a"), _const(0.7, name="b")]
    d = Router(threshold=0.5, signals=specs).decide(_ctx(), "pre")
    assert d.score == pytest.approx(0.7 * 0.99)
    assert d.escalate and d.deciding == ("b",)
    assert d.reason.startswith("b=0.7 (risk 0.693)")
    low = Router(threshold=0.8, signals=specs).decide(_ctx(), "pre")
    assert not low.escalate and "highest: b=0.7" in low.reason


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (float("nan"), "returned nan"),
        (float("inf"), "returned inf"),
        (1.5, "outside its range"),
        ("0.3", "not a number"),
        (None, "not a number"),
    ],
)
def test_garbage_signal_escalates_and_says_so(value: object, why: str) -> None:
    r = Router(threshold=0.99, signals=[_const(value), _const(0.0, name="ok")])
    d = r.decide(_ctx(), "pre")
    assert d.escalate and d.score == 1.0
    assert why in d.failed["probe"]
    assert "signal probe failed" in d.reason and "escalates" in d.reason


def test_raising_signal_escalates() -> None:
    def boom(ctx: RoutingContext) -> float:
        raise OSError("index file vanished")

    spec = SignalSpec("boom", boom, "pre", True, (0.0, 1.0), (0.0, 1.0))
    d = Router(signals=[spec]).decide(_ctx(), "pre")
    assert d.escalate and d.failed == {"boom": "raised OSError: index file vanished"}


def test_stages_select_signals() -> None:
    r = Router()
    assert [s.name for s in r.stage_signals("cascade")] == ["student_confidence"]
    assert len(r.stage_signals("post")) == len(DEFAULT_SIGNALS)
    ctx = _ctx(student_output=AIMessage("x", response_metadata={"confidence": 0.1}))
    d = r.decide(ctx, "cascade")
    assert d.escalate and d.deciding == ("student_confidence",)
    with pytest.raises(ConfigError):
        r.stage_signals("later")  # type: ignore[arg-type]


def test_rules_force_and_forbid() -> None:
    rules = RoutingRules(always_teacher_patterns=["refund"], never_teacher_patterns=["secret"])
    r = Router(threshold=0.9, rules=rules)
    d = r.decide(_ctx("I want a refund"), "pre")
    assert d.escalate and d.score == 1.0 and d.rule and d.reason.startswith("rule:")
    d = r.decide(_ctx("a secret refund"), "pre")
    assert d.escalate and d.forbidden  # the caller must not escalate


def test_threshold_bounds() -> None:
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\], got 1.5"):
        Router(threshold=1.5)


def _examples(n: int = 400, seed: int = 0) -> list[RoutedExample]:
    """OOD distance and low confidence predict errors; user_turns is noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ood = float(rng.uniform(0.0, 1.0))
        conf = float(rng.uniform(0.0, 1.0))
        p_err = 1 / (1 + math.exp(-(6 * ood - 4 * conf - 0.5)))
        out.append(
            RoutedExample(
                {
                    "user_turns": float(rng.integers(1, 4)),
                    "ood_distance": ood,
                    "student_confidence": conf,
                    "retrieval_similarity": None,
                },
                float(rng.random() >= p_err),
                out_of_scope=ood > 0.9,
            )
        )
    return out


def test_fit_calibrates_each_signal_monotonically() -> None:
    ex = _examples()
    r = Router().fit(ex)
    a_ood, _ = r.calibration["ood_distance"]
    a_conf, _ = r.calibration["student_confidence"]
    assert a_ood > 0 and a_conf < 0
    assert "retrieval_similarity" not in r.calibration  # absent everywhere: keeps its ramp
    # calibrated risk ~ observed error rate in a bin
    errs = [1 - e.student_correct for e in ex if (e.signals["ood_distance"] or 0) > 0.8]
    assert r.risk("ood_distance", 0.9) == pytest.approx(np.mean(errs), abs=0.15)


def test_fit_flattens_a_slope_pointing_the_wrong_way() -> None:
    # higher confidence, more errors: nonsense for a confidence signal
    ex = [RoutedExample({"student_confidence": c}, float(c < 0.5)) for c in np.linspace(0, 1, 50)]
    r = Router().fit(ex)
    a, b = r.calibration["student_confidence"]
    assert a == 0.0
    assert r.risk("student_confidence", 0.1) == pytest.approx(0.5, abs=0.05)


def test_learned_router_beats_chance_and_round_trips(tmp_path: Path) -> None:
    from langchain_understudy.router import auroc

    train, test = _examples(seed=1), _examples(seed=2)
    learned = LearnedRouter().fit(train)
    s = learned.scores(test, "auto")
    errs = [e.student_correct < 0.5 for e in test]
    assert (auroc(s, errs) or 0) > 0.75
    assert set(learned.models) == {"pre", "post", "cascade"}
    assert learned.models["cascade"]["features"] == ["student_confidence"]
    path = learned.save(tmp_path / "learned.json")
    again = load_router(path)
    assert isinstance(again, LearnedRouter)
    np.testing.assert_allclose(again.scores(test, "auto"), s)
    d = again.decide(_ctx(), "pre")
    assert "P(student wrong)" in d.reason


def test_default_router_round_trips(tmp_path: Path) -> None:
    r = Router(threshold=0.3, rules=RoutingRules(never_teacher_patterns=["x"])).fit(_examples())
    again = Router.load(r.save(tmp_path / "r.json"))
    assert type(again) is Router
    assert again.threshold == 0.3 and again.calibration == r.calibration
    assert again.rules.to_dict() == r.rules.to_dict()
    with pytest.raises(ConfigError, match="does not exist"):
        load_router(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(ConfigError, match="not a router policy"):
        load_router(tmp_path / "bad.json")


def test_unfitted_learned_router_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="call fit"):
        LearnedRouter().decide(_ctx(), "pre")


def test_scores_by_mode_and_failed_examples() -> None:
    ex = [
        RoutedExample({"ood_distance": 0.7, "student_confidence": 0.9}, 1.0),
        RoutedExample({"ood_distance": 0.1, "student_confidence": 0.2}, 0.0),
        RoutedExample({"ood_distance": 0.1}, 1.0, failed=("student_confidence",)),
        RoutedExample({"ood_distance": float("nan")}, 1.0),
    ]
    r = Router()
    pre = r.scores(ex, "pre")
    cascade = r.scores(ex, "cascade")
    auto = r.scores(ex, "auto")
    assert pre[0] == pytest.approx(0.99) and pre[1] == 0.0
    assert cascade[0] == 0.0 and cascade[1] == pytest.approx(0.99)
    assert cascade[2] == 1.0  # failed in its stage
    assert pre[3] == 1.0  # garbage value
    post = np.array([r.example_score(e, "post") for e in ex])
    np.testing.assert_allclose(auto, np.maximum(pre, post))


def test_threshold_for_teacher_rate_hand_computed() -> None:
    s = [0.1, 0.2, 0.3, 0.9]
    assert threshold_for_teacher_rate(s, 0.25) == pytest.approx(0.6)
    assert threshold_for_teacher_rate(s, 0.5) == pytest.approx(0.25)
    assert threshold_for_teacher_rate(s, 1.0) == 0.0
    assert threshold_for_teacher_rate(s, 0.0) == pytest.approx(0.95)
    with pytest.raises(ConfigError):
        threshold_for_teacher_rate(s, 1.2)


def test_threshold_for_quality_hand_computed() -> None:
    s = [0.1, 0.2, 0.8, 0.9]
    c = [1, 1, 0, 1]
    # keeping the 0.8 request on the student costs a wrong answer: quality 0.75
    assert threshold_for_quality(s, c, 0.99) == pytest.approx(0.5)
    assert threshold_for_quality(s, c, 0.75) == pytest.approx(0.95)
    with pytest.raises(ConfigError, match="above what always asking"):
        threshold_for_quality(s, c, 0.99, teacher_quality=0.9)


def test_calibrate_sets_threshold_and_meets_target() -> None:
    ex = _examples()
    r = Router().fit(ex)
    t = r.calibrate(ex, target_teacher_rate=0.2)
    assert r.threshold == t
    assert (r.scores(ex) >= t).mean() <= 0.2
    t2 = r.calibrate(ex, target_quality=0.95)
    s = r.scores(ex)
    c = np.array([e.student_correct for e in ex])
    assert np.where(s >= t2, 1.0, c).mean() >= 0.95
    with pytest.raises(ConfigError, match="exactly one"):
        r.calibrate(ex)
    with pytest.raises(ConfigError, match="exactly one"):
        r.calibrate(ex, target_quality=0.9, target_teacher_rate=0.1)


def test_from_settings() -> None:
    from langchain_understudy.config import RouterSettings

    r = Router.from_settings(
        RouterSettings(threshold=0.3, always_teacher_patterns=["x"], never_teacher_patterns=["y"])
    )
    assert r.threshold == 0.3
    assert r.rules.to_dict()["always_teacher_patterns"] == ["x"]


def test_a_policy_with_the_tool_signals_loads_without_extra_signals(tmp_path: Path) -> None:
    from langchain_understudy.router.signals import DEFAULT_SIGNALS, TOOL_SIGNALS

    r = Router(threshold=0.4, signals=(*DEFAULT_SIGNALS, *TOOL_SIGNALS))
    again = load_router(r.save(tmp_path / "tools.json"))
    assert [s.name for s in again.signals] == [s.name for s in r.signals]
    assert again.threshold == 0.4


def test_a_policy_file_keeps_its_calibrated_threshold_unless_one_is_set(tmp_path: Path) -> None:
    from langchain_understudy.config import RouterSettings

    path = Router(threshold=0.83).save(tmp_path / "calibrated.json")
    assert Router.from_settings(RouterSettings(policy=path)).threshold == 0.83
    assert Router.from_settings(RouterSettings(policy=path, threshold=0.2)).threshold == 0.2
    assert Router.from_settings(RouterSettings()).threshold == 0.5


def test_a_saturated_calibration_stays_below_the_score_kept_for_rules() -> None:
    from langchain_understudy.router.signals import MAX_RAMP_RISK

    r = Router(calibration={"user_turns": (300.0, 1e9)})
    assert r.risk("user_turns", 5.0) == MAX_RAMP_RISK < 1.0
