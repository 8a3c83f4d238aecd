"""The controller arm of ``bench/router_clinc.py`` on a synthetic CLINC-like shift (no student)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from langchain_understudy.router import RoutedExample, Router

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        name = "bench_router_clinc"
        spec = importlib.util.spec_from_file_location(name, BENCH / "router_clinc.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _examples(rng: np.random.Generator, n: int, out_of_scope: float) -> list[RoutedExample]:
    """In-scope requests sit near the training prompts and are mostly answered right."""
    out = []
    for _ in range(n):
        oos = bool(rng.random() < out_of_scope)
        ood = rng.normal(0.55, 0.1) if oos else rng.normal(0.3, 0.1)
        right = (not oos) and rng.random() < 0.9
        conf = rng.beta(8, 2) if right else rng.beta(3, 3)
        out.append(
            RoutedExample(
                {"ood_distance": float(np.clip(ood, 0.0, 2.0)), "student_confidence": conf},
                float(right),
                out_of_scope=oos,
            )
        )
    return out


def test_controller_arm_holds_the_rate_where_the_fixed_threshold_drifts(
    bench: ModuleType,
) -> None:
    rng = np.random.default_rng(0)
    cal, test = _examples(rng, 3000, 0.03), _examples(rng, 5500, 0.18)
    router = Router().fit(cal)
    router.calibrate(cal, target_teacher_rate=0.2, mode="auto")
    fixed = float((router.scores(test, "auto") >= router.threshold).mean())
    ctrl = bench.serve_with_controller(router, test, target=0.2, window=500, gain=0.5, seed=0)
    assert fixed > 0.23  # calibrated on the 3% mix, the threshold overspends on the 18% mix
    assert abs(ctrl["teacher_rate"] - 0.2) <= 0.02
    assert abs(ctrl["teacher_rate_settled"] - 0.2) <= 0.02
    assert ctrl["final_threshold"] > ctrl["start_threshold"]
    assert 0.0 < ctrl["quality"] <= 1.0 and len(ctrl["teacher_rate_per_window"]) == 11


def test_saved_examples_round_trip(bench: ModuleType, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    collected = {
        "single": {
            "cal": _examples(rng, 5, 0.2),
            "test": [*_examples(rng, 4, 0.2), RoutedExample({"x": None}, 0.0, failed=("x",))],
            "test_dependent": [False, True, False, False, False],
        }
    }
    path = bench.save_examples(tmp_path / "ex.json", collected, {"student": "s v1"})
    again, about = bench.load_examples(path)
    assert again == collected and about == {"student": "s v1"}
