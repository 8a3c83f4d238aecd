"""Evaluation metrics against hand-computed values and a naive reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from langchain_understudy.errors import ConfigError
from langchain_understudy.router import (
    RoutedExample,
    Router,
    apgr,
    auroc,
    cpt,
    evaluate_router,
    plot_report,
    quality_curve,
)
from langchain_understudy.router.evaluation import CurvePoint, exact_match, normalize_answer


def _naive_auroc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed_and_against_naive_reference() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert auroc([0.1, 0.2], [1, 1]) is None
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=200).astype(float)  # many ties
    y = rng.random(200) < 0.3
    assert auroc(s, y) == pytest.approx(_naive_auroc(list(s), list(y)))


def test_curve_apgr_cpt_hand_computed() -> None:
    # Perfect separation: the two errors have the highest scores.
    points = quality_curve([0.9, 0.1, 0.8, 0.2], [0, 1, 0, 1], n_thresholds=20)
    assert len({p.threshold for p in points}) >= 20
    rates = sorted({p.teacher_rate for p in points})
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert points[0].teacher_rate == 0.0 and points[0].quality == 0.5
    assert points[-1].teacher_rate == 1.0 and points[-1].quality == 1.0
    # quality: 0.5, 0.75, 1, 1, 1 at 0, 25, 50, 75, 100 %; AUC = 0.875; APGR = 0.375 / 0.5
    assert apgr(points) == pytest.approx(0.75)
    assert cpt(points, 0.5) == pytest.approx(0.25)
    assert cpt(points, 0.8) == pytest.approx(0.25 + 0.25 * (0.9 - 0.75) / 0.25)
    assert cpt(points, 0.95) == pytest.approx(0.25 + 0.25 * (0.975 - 0.75) / 0.25)
    assert cpt(points, 0.0) == 0.0


def test_random_routing_scores_half_and_reversed_scores_less() -> None:
    # identical scores: nothing to rank on, the curve jumps straight from 0 % to 100 %
    flat = quality_curve([0.5] * 4, [0, 1, 0, 1])
    assert apgr(flat) == pytest.approx(0.5)
    worst = quality_curve([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1], n_thresholds=20)
    assert apgr(worst) == pytest.approx(0.25)


def test_no_gap_gives_none() -> None:
    points = quality_curve([0.1, 0.2], [1, 1])
    assert apgr(points) is None and cpt(points, 0.5) is None


def test_curve_requires_endpoints() -> None:
    with pytest.raises(ConfigError, match="0 % and 100 %"):
        apgr([CurvePoint(0.5, 0.5, 0.8)])


def test_oos_recall_along_the_curve() -> None:
    points = quality_curve([0.9, 0.1, 0.8, 0.2], [0, 1, 0, 1], out_of_scope=[1, 0, 0, 0])
    by_rate = {p.teacher_rate: p.oos_recall for p in points}
    assert by_rate[0.0] == 0.0 and by_rate[0.25] == 1.0


def _examples() -> list[RoutedExample]:
    rows = [
        # ood, correct, oos, overhead, embedding
        (0.05, 1.0, False, 1.0, 0.5),
        (0.10, 1.0, False, 2.0, 0.5),
        (0.20, 1.0, False, 3.0, 1.0),
        (0.30, 0.0, False, 4.0, 1.0),
        (0.80, 0.0, True, 5.0, 1.0),
        (0.90, 0.0, True, 6.0, 2.0),
    ]
    return [
        RoutedExample(
            {"ood_distance": o, "user_turns": 1.0},
            c,
            out_of_scope=oos,
            overhead_ms=ms,
            embedding_ms=emb,
        )  # fmt: skip
        for o, c, oos, ms, emb in rows
    ]


def test_evaluate_router_report(tmp_path: Path) -> None:
    ex = _examples()
    router = Router(threshold=0.5)
    rep = evaluate_router(router, ex, mode="pre", n_thresholds=25)
    assert rep.n == 6 and rep.n_out_of_scope == 2
    assert rep.student_quality == pytest.approx(0.5)
    # ramp risk of ood 0.8 and 0.9 is 0.99 >= 0.5; ood 0.3 has risk 0
    assert rep.at_threshold["teacher_rate"] == pytest.approx(2 / 6)
    assert rep.at_threshold["quality"] == pytest.approx(5 / 6)
    assert rep.at_threshold["oos_recall"] == 1.0
    assert rep.signal_auroc["ood_distance"] == 1.0
    assert rep.signal_auroc["user_turns"] == 0.5
    assert rep.signal_auroc["student_confidence"] is None
    assert rep.overhead_ms["p50"] == pytest.approx(3.5)
    assert rep.overhead_ms["p50_excluding_embedding"] == pytest.approx(
        np.median([0.5, 1.5, 2, 3, 4, 4])
    )
    assert rep.overhead_ms["p95"] == pytest.approx(np.percentile([1, 2, 3, 4, 5, 6], 95))
    assert set(rep.cpt) == {"50", "80", "95"}
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["curve"][0]["teacher_rate"] == 0.0
    png = plot_report([rep, rep], tmp_path / "curve.png", labels=["a", "b"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_needs_examples() -> None:
    with pytest.raises(ConfigError, match="needs examples"):
        evaluate_router(Router(), [])


def test_exact_match_normalisation() -> None:
    assert normalize_answer('  "Transfer."  ') == "transfer"
    assert exact_match("Book  Flight!", "book flight") == 1.0
    assert exact_match("book_flight", "book flight") == 0.0
