"""`understudy distill init` and the README's job file: both are valid job configurations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from langchain_understudy.distill_jobs.job import DistillConfig, PackageSection
from langchain_understudy.plugin.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_distill_init_writes_a_valid_pretrained_exemplar_job(tmp_path: Path, capsys) -> None:
    path = tmp_path / "job.toml"
    assert main(["distill", "init", str(path)]) == 0
    cfg = DistillConfig.from_toml(path)
    assert cfg.student.base == "smollm2-135m-instruct"
    assert cfg.exemplars is not None and cfg.exemplars.distinct_by == "answer"
    assert cfg.package.serve in cfg.package.quant_types
    assert cfg.traces == tmp_path / ".understudy" / "traces.sqlite"  # relative to the file
    assert "understudy distill run --config" in capsys.readouterr().out


def test_distill_init_never_overwrites_without_force(tmp_path: Path, capsys) -> None:
    path = tmp_path / "job.toml"
    path.write_text("# mine\n")
    assert main(["distill", "init", str(path)]) == 1
    assert path.read_text() == "# mine\n"
    assert "--force" in capsys.readouterr().err
    assert main(["distill", "init", str(path), "--force"]) == 0
    DistillConfig.from_toml(path)


def test_readme_job_file_is_a_valid_job(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(# job\.toml.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no job.toml block"
    path = tmp_path / "job.toml"
    path.write_text(blocks[0], encoding="utf-8")
    cfg = DistillConfig.from_toml(path)
    assert cfg.name == "support-bot"
    assert cfg.exemplars is not None


def test_a_served_type_that_is_never_built_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"package.serve = 'Q8_0' is not built"):
        PackageSection(quant_types=["Q4_K_M"], serve="Q8_0")
    assert PackageSection(quant_types=["Q4_K_M"], serve="F16").serve == "F16"  # the export dtype
