"""``understudy router calibrate|eval`` and ``bench/router_clinc.py`` end to end on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from langchain_understudy.plugin.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLINC = ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"


def _traces(path: Path) -> Path:
    rows = []
    for i in range(12):
        msgs = [{"role": "user", "content": f"what is the price of plan {i}"}]
        if i % 3 == 0:
            msgs = [
                {"role": "user", "content": "book a table"},
                {"role": "assistant", "content": "done"},
                {"role": "user", "content": "and the other one?"},
            ]
        answer = "\n\n\n\n" if i % 2 else "no"  # the random student emits newlines
        rows.append(
            {
                "messages": [*msgs, {"role": "assistant", "content": answer}],
                "metadata": {"out_of_scope": i % 4 == 0},
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_router_calibrate_and_eval_cli(
    tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traces = _traces(tmp_path / "held_out.jsonl")
    cfg = tmp_path / "understudy.toml"
    cfg.write_text('# mine\n[router]\nmode = "auto"  # comment stays\nthreshold = 0.5\n')
    common = ["--traces", str(traces), "--gguf", str(tiny_gguf), "--config", str(cfg),
              "--max-tokens", "4"]  # fmt: skip
    assert main(["router", "calibrate", *common, "--target-quality", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "quality @ threshold" in out and "wrote router.threshold" in out
    data = tomllib.loads(cfg.read_text())
    assert data["router"]["mode"] == "auto" and "# comment stays" in cfg.read_text()
    assert data["router"]["threshold"] != 0.5

    policy = tmp_path / "policy.json"
    rc = main(["router", "calibrate", *common, "--target-teacher-rate", "0.5", "--fit",
               "learned", "--router-out", str(policy)])  # fmt: skip
    assert rc == 0 and json.loads(policy.read_text())["kind"] == "learned"

    out_dir = tmp_path / "eval"
    rc = main(["router", "eval", *common, "--router", str(policy), "--out", str(out_dir)])
    assert rc == 0
    report = json.loads((out_dir / "router_eval.json").read_text())
    assert report["n"] == 12 and report["n_out_of_scope"] == 3
    assert len({p["threshold"] for p in report["curve"]}) >= 20
    assert set(report["cpt"]) == {"50", "80", "95"} and "apgr" in report
    written = tomllib.loads(cfg.read_text())["router"]["threshold"]
    assert report["at_threshold"]["threshold"] == pytest.approx(written)
    assert (out_dir / "router_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "AUROC" in capsys.readouterr().out

    # without --router-out the fitted policy goes next to the config, which then points at it
    rc = main(["router", "calibrate", *common, "--target-quality", "0.9", "--fit", "default"])
    assert rc == 0
    saved = tomllib.loads(cfg.read_text())["router"]["policy"]
    assert Path(saved).name == "router_policy.json" and Path(saved).exists()


@pytest.mark.skipif(not CLINC.exists(), reason="needs ../shared/data/clinc150 (present in CI)")
def test_clinc_bench_smoke(tiny_gguf: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "router_clinc.py"), "--gguf", str(tiny_gguf),
         "--limit", "6", "--ood-from-train", "--max-tokens", "2", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "router_clinc.json").read_text())
    assert set(out["variants"]) == {"single", "multi"}
    single, multi = out["variants"]["single"], out["variants"]["multi"]
    assert single["n_test"] == 8 and single["n_test_out_of_scope"] == 2
    for variant in (single, multi):
        for policy in ("calibrated", "learned"):
            rep = variant["policies"][policy]
            assert rep["signal_auroc"].keys() >= {"ood_distance", "student_confidence"}
            assert rep["overhead_ms"]["p95_excluding_embedding"] is not None
            assert "accuracy>=0.985" in rep["goals"]
    assert (tmp_path / "router_clinc_single.png").exists()
    assert (tmp_path / "router_clinc_multi.png").exists()
