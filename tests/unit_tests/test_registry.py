"""StudentRegistry: versions, provenance, integrity checks, promote and rollback; and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from langchain_understudy.errors import ArtifactError
from langchain_understudy.plugin.cli import main
from langchain_understudy.students import StudentRegistry


def _fake_gguf(path: Path, payload: bytes = b"weights") -> Path:
    path.write_bytes(b"GGUF" + payload * 100)
    return path


def test_register_promote_rollback(tmp_path: Path) -> None:
    reg = StudentRegistry(tmp_path / "reg")
    assert reg.current() is None and reg.list() == []
    v1 = reg.register(
        _fake_gguf(tmp_path / "a.gguf", b"a"), {"teacher_model": "t"}, {"exact_match": 0.9}
    )
    v2 = reg.register(
        _fake_gguf(tmp_path / "b.gguf", b"b"), {"teacher_model": "t"}, {"exact_match": 0.95}
    )
    assert (v1, v2) == ("v1", "v2")
    assert reg.current() is None  # registering never promotes
    reg.promote(v1)
    reg.promote(v2)
    cur = reg.current()
    assert cur is not None and cur.version == "v2" and cur.metrics["exact_match"] == 0.95
    assert cur.path.read_bytes().startswith(b"GGUFb")
    assert reg.rollback().version == "v1"
    assert reg.current_version() == "v1"
    with pytest.raises(ArtifactError, match="nothing to roll back"):
        reg.rollback()
    # the source file can go away: the registry holds its own copy
    (tmp_path / "a.gguf").unlink()
    assert reg.get("v1").path.exists()


def test_extra_artifacts_are_checked_too(tmp_path: Path) -> None:
    reg = StudentRegistry(tmp_path / "reg")
    extra = tmp_path / "ood.npy"
    extra.write_bytes(b"\x93NUMPY")
    v = reg.register(_fake_gguf(tmp_path / "a.gguf"), extra_files={"ood_index.npy": extra})
    assert reg.get(v).artifact("ood_index.npy").read_bytes() == b"\x93NUMPY"
    reg.get(v).artifact("ood_index.npy").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        reg.get(v)


@pytest.mark.parametrize("damage", ["tamper", "truncate", "delete"])
def test_damaged_artifact_is_refused(tmp_path: Path, damage: str) -> None:
    reg = StudentRegistry(tmp_path / "reg")
    v = reg.register(_fake_gguf(tmp_path / "a.gguf"))
    path = reg.get(v).path
    if damage == "tamper":
        data = bytearray(path.read_bytes())
        data[10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    else:
        path.unlink()
    with pytest.raises(ArtifactError, match="missing|tampered or truncated"):
        reg.promote(v)
    assert reg.current_version() is None


def test_foreign_files_and_unknown_versions(tmp_path: Path) -> None:
    reg = StudentRegistry(tmp_path / "reg")
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        reg.register(bad)
    with pytest.raises(ArtifactError, match="no such file"):
        reg.register(tmp_path / "missing.gguf")
    with pytest.raises(ArtifactError, match="no student version 'v9'"):
        reg.get("v9")
    (tmp_path / "reg").mkdir(exist_ok=True)
    (tmp_path / "reg" / "registry.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        reg.list()


def test_metadata_is_plain_json_written_atomically(tmp_path: Path) -> None:
    reg = StudentRegistry(tmp_path / "reg")
    v = reg.register(_fake_gguf(tmp_path / "a.gguf"), {"base_checkpoint": None}, {"f1": 0.5})
    data = json.loads((tmp_path / "reg" / "registry.json").read_text())
    assert data["versions"][v]["metrics"] == {"f1": 0.5}
    assert not [p for p in (tmp_path / "reg").rglob("*.tmp")]


def test_students_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "reg"
    reg = StudentRegistry(root)
    reg.register(_fake_gguf(tmp_path / "a.gguf", b"a"), {"quant": "Q8_0"}, {"exact_match": 0.9})
    reg.register(_fake_gguf(tmp_path / "b.gguf", b"b"), {"quant": "Q4_K_M"}, {"exact_match": 0.8})
    assert main(["students", "promote", "v1", "--registry", str(root)]) == 0
    assert main(["students", "promote", "v2", "--registry", str(root)]) == 0
    assert main(["students", "list", "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert "* v2" in out and "Q4_K_M" in out and "0.9" in out
    assert main(["students", "rollback", "--registry", str(root)]) == 0
    assert "now serving v1" in capsys.readouterr().out
    assert main(["students", "show", "v1", "--registry", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert main(["students", "show", "v7", "--registry", str(root)]) == 1
    assert "no student version" in capsys.readouterr().err
