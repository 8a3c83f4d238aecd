"""The distillation job end to end on a tiny task: traces in, a gated, promoted GGUF student out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import color_traces, tiny_job_toml
from filelock import FileLock

from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob, JobLockedError
from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.plugin.cli import main
from langchain_understudy.students import StudentRegistry

pytestmark = pytest.mark.slow

JOB = tiny_job_toml(
    "colors",
    """save_every = 20

[package]
quant_types = ["Q8_0", "Q4_K_M"]
serve = "Q8_0"

[gate]
min_exact_match = 0.8
""",
)


def _write_traces(path: Path, traces: list[dict]) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    return path


def _more_traces(job_dir: Path, n: int, *, seed: int, start: int) -> None:
    """Import ``n`` new colour traces into the job's store."""
    f = _write_traces(job_dir / f"more{seed}.jsonl", color_traces(n, seed=seed, start=start))
    TraceStore(job_dir / "traces.sqlite").import_jsonl(f)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("job")
    (d / "job.toml").write_text(JOB)
    assert (
        main(
            [
                "traces",
                "import",
                str(_write_traces(d / "t.jsonl", color_traces())),
                "--store",
                str(d / "traces.sqlite"),
            ]
        )
        == 0
    )
    return d


@pytest.fixture(scope="module")
def first_run(job_dir: Path) -> dict:
    result = DistillJob(DistillConfig.from_toml(job_dir / "job.toml"), progress=False).run()
    return {"result": result}


def test_first_run_registers_and_promotes(job_dir: Path, first_run: dict) -> None:
    result = first_run["result"]
    assert result.status == "promoted", result.reason
    reg = StudentRegistry(job_dir / "students")
    current = reg.current()
    assert current is not None and current.version == result.version == "v1"
    assert result.metrics["exact_match"] >= 0.8
    assert set(result.metrics["by_quant"]) == {"F16", "Q8_0", "Q4_K_M"}
    prov = current.provenance
    assert prov["teacher_model"] == "teacher-test"
    assert len(prov["trace_snapshot"]) == 16 and prov["quant"] == "Q8_0"
    assert prov["n_heldout"] > 0 and prov["config"]["student"]["hidden"] == 64
    # a registered run keeps its final checkpoint, not the ones it resumed from
    assert (result.run_dir / "train" / "final").is_dir()
    assert not (result.run_dir / "train" / "checkpoints").exists()
    assert prov["tools"] == []  # the tools it learnt to call (the colour traces call none)
    for name in ("ood_index.npy", "loss.png", "report.json", "heldout_eval.jsonl"):
        assert current.artifact(name).exists()
    # held-out conversations never appear in the training set
    run = result.run_dir
    train = {json.loads(line)["metadata"]["key"] for line in open(run / "train.jsonl")}
    held = {json.loads(line)["metadata"]["key"] for line in open(run / "heldout.jsonl")}
    assert train and held and not train & held


def test_rerun_without_new_traces_is_a_no_op(job_dir: Path, first_run: dict) -> None:
    result = DistillJob(DistillConfig.from_toml(job_dir / "job.toml"), progress=False).run()
    assert result.status == "skipped"
    assert StudentRegistry(job_dir / "students").current_version() == "v1"


def test_gate_rejects_a_student_that_does_not_beat_the_serving_one(
    job_dir: Path, first_run: dict
) -> None:
    _more_traces(job_dir, 40, seed=1, start=10_000)
    cfg = _one_epoch(job_dir)
    cfg.gate.min_exact_match = 0.0
    cfg.gate.min_improvement = 0.5  # impossible: must beat serving by 50 points
    result = DistillJob(cfg, progress=False).run()
    assert result.status == "rejected"
    assert "does not beat" in result.reason
    reg = StudentRegistry(job_dir / "students")
    assert reg.current_version() == "v1"  # serving student untouched
    assert [v.version for v in reg.list()] == ["v1", "v2"]


def test_concurrent_run_exits_with_a_clear_message(job_dir: Path) -> None:
    cfg = DistillConfig.from_toml(job_dir / "job.toml")
    with FileLock(str(Path(cfg.work_dir) / ".colors.lock")):
        with pytest.raises(JobLockedError, match="in progress"):
            DistillJob(cfg, progress=False).run()


def test_crashed_run_leaves_serving_student_and_resumes_on_its_own_dataset(
    job_dir: Path, first_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import langchain_understudy.distill_jobs.evaluation as evaluation

    _more_traces(job_dir, 40, seed=2, start=20_000)
    cfg = _one_epoch(job_dir)
    reg = StudentRegistry(job_dir / "students")
    before = reg.current_version()
    _run_crashing(cfg, monkeypatch, evaluation, "evaluate_student")
    assert reg.current_version() == before
    (crashed,) = [r for r in Path(cfg.work_dir).glob("colors-*") if "finished" not in _state(r)]
    assert _state(crashed)["done"] == ["dataset", "train", "package"]
    dataset = (crashed / "dataset.jsonl").read_bytes()
    trained_s = _state(crashed)["timings_s"]["train"]
    n_traces = _state(crashed)["n_traces"]
    # traces that arrive after the crash belong to the next run, not to the resumed one
    _more_traces(job_dir, 30, seed=3, start=30_000)
    result = DistillJob(cfg, progress=False).run(resume=True)
    assert result.run_dir == crashed
    assert result.status in {"promoted", "rejected"}
    state = _state(crashed)
    assert state["finished"] == result.status
    assert state["done"] == ["dataset", "train", "package", "evaluate", "register"]
    assert state["timings_s"]["train"] == trained_s  # not trained again
    assert (crashed / "dataset.jsonl").read_bytes() == dataset
    version = reg.get(result.version or "")
    assert version.provenance["n_traces"] == n_traces


def test_run_resumed_after_registering_does_not_register_twice(
    job_dir: Path, first_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _more_traces(job_dir, 40, seed=4, start=40_000)
    cfg = _one_epoch(job_dir)
    cfg.gate.min_exact_match = 0.0
    cfg.gate.min_improvement = -1.0  # the gate passes, so the job promotes after registering
    reg = StudentRegistry(job_dir / "students")
    before = [v.version for v in reg.list()]
    _run_crashing(cfg, monkeypatch, StudentRegistry, "promote")
    registered = [v.version for v in reg.list()]
    assert len(registered) == len(before) + 1  # it had registered when it stopped
    result = DistillJob(cfg, progress=False).run(resume=True)
    assert [v.version for v in reg.list()] == registered  # the same version, not a second one
    assert result.version == registered[-1]


def _one_epoch(job_dir: Path) -> DistillConfig:
    cfg = DistillConfig.from_toml(job_dir / "job.toml")
    cfg.training.epochs = 1
    return cfg


def _run_crashing(
    cfg: DistillConfig, monkeypatch: pytest.MonkeyPatch, target: object, name: str
) -> None:
    """Run the job with ``target.name`` raising, as a crash at that point would stop it."""

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError(f"simulated crash in {name}")

    monkeypatch.setattr(target, name, boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        DistillJob(cfg, progress=False).run()
    monkeypatch.undo()


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def test_cli_eval_on_jsonl(
    job_dir: Path, first_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    held = first_run["result"].run_dir / "heldout.jsonl"
    rc = main(
        [
            "eval",
            "--traces",
            str(held),
            "--registry",
            str(job_dir / "students"),
            "--student",
            "v1",
            "--max-tokens",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "exact_match" in out and "v1" in out


def test_cli_run_reports_skip(
    job_dir: Path, first_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    # one run builds what earlier tests left (the traces that arrived after the crash); then
    # every trace has been built: the CLI run is a no-op that says so
    DistillJob(DistillConfig.from_toml(job_dir / "job.toml"), progress=False).run()
    assert main(["distill", "run", "--config", str(job_dir / "job.toml"), "--quiet"]) == 0
    assert "skipped" in capsys.readouterr().out
