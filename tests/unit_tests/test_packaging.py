"""A plain (non-editable) install gives working imports and no generic top-level modules."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("students", "retrieval", "router", "distill_jobs", "plugin")


@pytest.mark.slow
def test_wheel_installs_into_a_throwaway_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("langchain_understudy-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # dependencies come from the project's environment; its editable finder is not loaded
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = {p.name for p in site.iterdir()}
    assert "langchain_understudy" in installed
    assert not installed & set(SUBPACKAGES), "a generic top-level package was installed"
    code = (
        "import langchain_understudy as lu, importlib;"
        f"mods=[importlib.import_module('langchain_understudy.'+m) for m in {SUBPACKAGES!r}];"
        "import langchain_understudy.plugin.cli as cli;"
        "print(lu.__file__); print(lu.__version__);"
        "print(cli.build_parser().prog)"
    )
    out = subprocess.run(
        [str(py), "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout
    assert str(site) in out.splitlines()[0]
    assert out.splitlines()[1] == "0.1.0"
    assert out.splitlines()[2] == "understudy"  # the CLI's subcommand modules all import
    assert (site / "langchain_understudy" / "py.typed").exists()


def test_import_is_cheap_and_never_imports_torch_or_llama_cpp() -> None:
    code = (
        "import sys, langchain_understudy as lu; lu.__version__;"
        "import langchain_understudy.students, langchain_understudy.config;"
        "print(sorted(m for m in ('torch','llama_cpp','transformers','faiss') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_only_the_engine_modules_touch_llama_cpp() -> None:
    """llama-cpp-python, and its private internals (``Llama._model``, ``Llama._ctx``), are
    reached through ``students/_llama.py`` (loading) and ``students/_engine.py`` (decoding)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    offenders, internals = [], []
    for d in ("langchain_understudy", *SUBPACKAGES):
        for f in (root / d).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if (  # a Llama's internals, by this project's name for one: ``llm._model``
                    isinstance(node, ast.Attribute)
                    and node.attr in ("_model", "_ctx")
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "llm"
                ):
                    internals.append(str(f.relative_to(root)))
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in names):
                    offenders.append(str(f.relative_to(root)))
    assert sorted(set(offenders)) == ["students/_engine.py", "students/_llama.py"]
    assert sorted(set(internals)) == ["students/_engine.py"]


def test_the_makefile_builds_the_llama_cpp_python_release_pyproject_pins() -> None:
    import re
    import tomllib

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("llama-cpp-python")]
    built = re.search(r"^LLAMA_CPP_VERSION := (\S+)$", (root / "Makefile").read_text(), re.M)
    assert built is not None and pin == f"llama-cpp-python=={built.group(1)}"


def test_public_api_is_pinned() -> None:
    import langchain_understudy as lu
    import langchain_understudy.students as students

    assert lu.__all__ == [
        "__version__",
        "ArtifactError",
        "ChatStudent",
        "ChatUnderstudy",
        "ConfigError",
        "DistillConfig",
        "DistillJob",
        "KnowledgeStore",
        "KnowledgeStoreError",
        "LearnedRouter",
        "ResilientTeacher",
        "Router",
        "StudentError",
        "StudentRegistry",
        "TeacherUnavailableError",
        "TraceError",
        "TraceRecorder",
        "TraceStore",
        "UnderstudyConfig",
        "UnderstudyError",
        "export_gguf",
        "load_config",
        "quantize_gguf",
        "render_prompt",
    ]
    assert students.__all__ == [
        "QUANT_TYPES",
        "SUPPORTED_ARCHITECTURES",
        "ChatStudent",
        "StudentRegistry",
        "StudentVersion",
        "confidence_from_logprobs",
        "export_gguf",
        "quantize_gguf",
        "sha256_file",
    ]
    for name in lu.__all__:
        assert getattr(lu, name) is not None
