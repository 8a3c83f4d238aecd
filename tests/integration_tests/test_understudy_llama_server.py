"""A real OpenAI-compatible teacher: ``python -m llama_cpp.server`` on 127.0.0.1, reached through
``ChatOpenAI``, then killed mid-test: the student must take over and say that it did."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from langchain_understudy.config import TeacherSettings
from langchain_understudy.router import ChatUnderstudy, ResilientTeacher, Router
from langchain_understudy.students import ChatStudent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def llama_server(tiny_gguf: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    for dep in ("fastapi", "uvicorn", "sse_starlette"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"needs llama-cpp-python[server] ({dep} is missing)")
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf),
         "--model_alias", "tiny-teacher", "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "512"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"llama_cpp.server exited: {(tmp_path / 'server.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/models", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not start within 90 s")
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


async def test_real_teacher_then_killed(
    llama_server: tuple[subprocess.Popen[bytes], str],
    tiny_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc, url = llama_server
    monkeypatch.delenv("UNDERSTUDY_TEST_TEACHER_KEY", raising=False)
    settings = TeacherSettings(
        kind="openai",
        base_url=url,
        model="tiny-teacher",
        api_key_env="UNDERSTUDY_TEST_TEACHER_KEY",  # unset: a loopback server needs no key
        timeout_s=20,
        max_retries=1,
    )
    teacher = ResilientTeacher.from_settings(settings, backoff_s=0.05, failure_threshold=3)
    assert teacher is not None
    audit = tmp_path / "audit.jsonl"
    student = ChatStudent(model_path=tiny_gguf, n_ctx=512, max_tokens=8)
    llm = ChatUnderstudy(
        student=student,
        teacher=teacher,
        router=Router(threshold=0.0),
        max_tokens=8,
        audit_log=audit,
    )

    # 1. the server answers as the teacher, sync and async
    msg = llm.invoke("Hello")
    meta = msg.response_metadata["understudy"]
    assert meta["answered_by"] == "teacher", meta
    assert meta["teacher_model"] == "tiny-teacher"
    assert isinstance(msg.content, str) and msg.usage_metadata is not None
    amsg = await llm.ainvoke("Hello again")
    assert amsg.response_metadata["understudy"]["answered_by"] == "teacher"

    # 2. the server dies mid-test
    proc.kill()
    proc.wait(timeout=30)
    msg = llm.invoke("Are you there?")
    meta = msg.response_metadata["understudy"]
    assert meta["answered_by"] == "student"
    assert meta["escalation_blocked"] is True
    assert "teacher failed 2 time(s)" in meta["blocked_reason"]
    assert "Connection" in meta["blocked_reason"] or "connect" in meta["blocked_reason"].lower()
    assert msg.response_metadata["model_name"] == tiny_gguf.name

    # 3. after three failed attempts the circuit opens: no more waiting on a dead teacher
    msg = llm.invoke("Still there?")
    meta = msg.response_metadata["understudy"]
    assert meta["answered_by"] == "student" and "circuit open" in meta["blocked_reason"]
    chunks = [c async for c in llm.astream("Stream it")]
    assert chunks[-1].response_metadata["understudy"]["escalation_blocked"] is True

    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["answered_by"] for r in records] == [
        "teacher",
        "teacher",
        "student",
        "student",
        "student",
    ]
