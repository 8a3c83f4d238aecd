"""A student fine-tuned from a local checkpoint with LoRA: adapters trained, merged, exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import color_traces
from safetensors.torch import load_file

from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.errors import ConfigError
from langchain_understudy.students import ChatStudent, StudentRegistry

pytestmark = pytest.mark.slow


def test_lora_adapters_are_merged_into_a_plain_llama_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(t) + "\n" for t in color_traces(200, seed=3)))
    TraceStore(tmp_path / "traces.sqlite").import_jsonl(f)
    cfg = DistillConfig(
        traces=tmp_path / "traces.sqlite",
        registry=tmp_path / "students",
        work_dir=tmp_path / "runs",
        student={
            "base_checkpoint": tiny_checkpoint,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        training={"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3},
        package={"quant_types": ["Q8_0"]},
    )
    result = DistillJob(cfg, progress=False).run()
    assert result.status in ("promoted", "registered")
    m = result.metrics
    assert 0 < m["n_trainable"] < m["n_params"] / 10  # only the adapters were trained

    final = Path(result.run_dir or "") / "train" / "final"
    merged = load_file(str(final / "model.safetensors"))
    base = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert not any("lora" in k for k in merged)  # a plain checkpoint: adapters merged
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)

    version = StudentRegistry(cfg.registry).get(result.version or "")
    assert version.provenance["base_checkpoint"] == str(tiny_checkpoint)
    student = ChatStudent(model_path=version.path, n_ctx=256, max_tokens=4)
    assert isinstance(student.invoke("What color is the cup? It is red.").content, str)


def test_lora_without_a_base_checkpoint_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[student]\nlora = { r = 8 }\n")
    with pytest.raises(
        ConfigError, match=r"student.lora needs student.base \(or base_checkpoint\)"
    ):
        DistillConfig.from_toml(job)
