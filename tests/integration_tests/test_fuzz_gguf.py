"""Generated damage to a real tiny GGUF student: truncated at any byte, bits flipped in the header
or anywhere, foreign files, folders. Loading it and asking one question answers or raises
``ArtifactError``/``StudentError``; the process never dies and keeps serving; a registry copy
that was damaged is refused by its checksum before llama.cpp ever sees it.

llama.cpp can abort the whole process on a damaged file, so each load runs in a worker process
(this file run as a script); a worker that dies is a finding, and a new one takes over.
"""

from __future__ import annotations

import hashlib
import json
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit_tests"))
from test_fuzz_strategies import fuzz_settings  # noqa: E402

pytestmark = pytest.mark.slow
FUZZ = fuzz_settings(ci_examples=20)
ANSWER_TIMEOUT_S = 120
#: Where a damaged file that killed or hung the worker is kept, to be turned into a found case.
FINDINGS = Path(tempfile.gettempdir()) / "understudy-fuzz-findings"


def _serve_worker() -> None:
    """Worker loop: one JSON request per line (a GGUF path), one JSON outcome per line."""
    from langchain_understudy.errors import UnderstudyError
    from langchain_understudy.students import ChatStudent

    for line in sys.stdin:
        path = json.loads(line)["path"]
        try:
            answer = ChatStudent(model_path=path, n_ctx=128, max_tokens=4).invoke("hi").content
            out: dict[str, Any] = {"outcome": "answer", "text": answer}
        except UnderstudyError as e:
            out = {"outcome": "error", "type": type(e).__name__, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the test as a finding
            out = {"outcome": "unhandled", "type": type(e).__name__, "message": str(e)}
        print(json.dumps(out), flush=True)


class Worker:
    """A process answering load-and-ask requests; restarted when it dies."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="gguf-worker-", suffix=".log")  # noqa: SIM115
        self.proc = self._start()
        self.deaths = 0

    def _start(self) -> subprocess.Popen[str]:
        self.log.seek(0)
        self.log.truncate(0)
        return subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,  # llama.cpp's load log, and its last words when it aborts
            text=True,
        )

    def _last_words(self) -> str:
        lines = Path(self.log.name).read_bytes().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-5:])

    def ask(self, path: Path, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, Any]:
        """The outcome; ``{"outcome": "died", ...}`` when the process ended, ``{"outcome":
        "hung"}`` when it had not answered after ``timeout`` seconds (it is then replaced)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = self._start()
            return {"outcome": "hung", "seconds": timeout}
        line = self.proc.stdout.readline()
        if line:
            return dict(json.loads(line))
        code = self.proc.wait()
        self.deaths += 1
        words = self._last_words()
        self.proc = self._start()
        return {"outcome": "died", "code": code, "last_words": words}

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- strategies -------------------------------------------------------------------------------


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip-header", "flip-header", "flip-any", "foreign"]))
    raw = bytearray(original)
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if kind == "foreign":
        return draw(
            st.sampled_from([b"", b"GGUF", b"GGUF\x03\x00\x00\x00", b"PK\x03\x04", b"\x7fELF"])
            | st.binary(max_size=2048)
            | st.binary(max_size=512).map(lambda b: b"GGUF" + b)
        )
    header = 16_000 if kind == "flip-header" else len(raw)  # metadata and tensor infos first
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, min(header, len(raw)) - 1))
        raw[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


# -- properties -------------------------------------------------------------------------------


def test_any_damaged_gguf_answers_or_raises_and_the_process_survives(
    tiny_gguf: Path, tmp_path: Path, worker: Worker
) -> None:
    original = tiny_gguf.read_bytes()
    digest = _sha(tiny_gguf)
    path = tmp_path / "damaged.gguf"

    @FUZZ
    @given(raw=damaged(original))
    def case(raw: bytes) -> None:
        path.write_bytes(raw)
        got = worker.ask(path)
        if got["outcome"] not in ("answer", "error"):  # kept for a regression test
            FINDINGS.mkdir(parents=True, exist_ok=True)
            got["kept"] = str(FINDINGS / f"{hashlib.sha256(raw).hexdigest()[:16]}.gguf")
            shutil.copyfile(path, got["kept"])
        assert got["outcome"] in ("answer", "error"), got
        if got["outcome"] == "error":
            assert got["type"] in ("ArtifactError", "StudentError") and got["message"], got
        else:
            assert isinstance(got["text"], str)

    case()
    assert _sha(tiny_gguf) == digest
    assert worker.ask(tiny_gguf)["outcome"] == "answer"  # still serving


def test_the_diagnosis_of_any_damaged_gguf_names_the_file(tiny_gguf: Path, tmp_path: Path) -> None:
    from langchain_understudy.students._llama import diagnose_gguf, gguf_problem

    original = tiny_gguf.read_bytes()
    path = tmp_path / "damaged.gguf"

    @FUZZ
    @given(raw=damaged(original))
    def case(raw: bytes) -> None:
        path.write_bytes(raw)
        problem = gguf_problem(path)
        message = diagnose_gguf(path)  # what a failed load tells the user
        assert str(path) in message and (problem is None or message == problem)
        if len(raw) < len(original) or not raw.startswith(b"GGUF"):
            assert problem is not None  # cut short or foreign: always refused up front

    case()


def test_a_damaged_registry_copy_is_refused_before_loading(tiny_gguf: Path, tmp_path: Path) -> None:
    from langchain_understudy.errors import ArtifactError
    from langchain_understudy.students import ChatStudent, StudentRegistry

    original = tiny_gguf.read_bytes()
    pristine = tmp_path / "pristine"
    reg = StudentRegistry(pristine)
    reg.promote(reg.register(tiny_gguf, {"teacher": "t"}))
    root = tmp_path / "reg"

    @FUZZ
    @given(raw=damaged(original))
    def case(raw: bytes) -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)
        (root / "versions" / "v1" / "student.gguf").write_bytes(raw)
        if raw == original:
            return
        with pytest.raises(ArtifactError, match="sha256|missing"):
            ChatStudent.from_registry(root)

    case()
    assert (
        ChatStudent.from_registry(pristine, n_ctx=128, max_tokens=2).invoke("hi").content
        is not None
    )


# -- cases the fuzzing found, kept as regression tests -----------------------------------------


def _duplicate_a_token(src: Path, dst: Path) -> None:
    """Copy ``src`` with one vocabulary token overwritten by another of the same length."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    field = reader.fields["tokenizer.ggml.tokens"]
    parts = [field.parts[i] for i in field.data]
    base = reader.data.ctypes.data
    by_len: dict[int, list[np.ndarray]] = {}
    for p in parts:
        by_len.setdefault(len(p), []).append(p)
    a, b = next(ps for n, ps in sorted(by_len.items()) if n >= 2 and len(ps) >= 2)[:2]
    raw = bytearray(src.read_bytes())
    at = b.ctypes.data - base
    raw[at : at + len(b)] = bytes(a)
    dst.write_bytes(bytes(raw))


def test_found_duplicated_token_is_diagnosed(tiny_gguf: Path, tmp_path: Path) -> None:
    from langchain_understudy.students._llama import diagnose_gguf

    bad = tmp_path / "dup.gguf"
    _duplicate_a_token(tiny_gguf, bad)
    assert "twice" in diagnose_gguf(bad)


def test_found_duplicated_token_is_an_artifact_error_not_an_abort(
    tiny_gguf: Path, tmp_path: Path, worker: Worker
) -> None:
    bad = tmp_path / "dup.gguf"
    _duplicate_a_token(tiny_gguf, bad)
    got = worker.ask(bad)
    assert got["outcome"] == "error" and got["type"] == "ArtifactError", got


def _string_turned_array(src: Path, dst: Path) -> None:
    """Copy ``src`` with one bit flipped: the first metadata value's type, string (8) → array (9).

    The string's bytes are then read as an array header claiming billions of items.
    """
    raw = bytearray(src.read_bytes())
    key_len = int.from_bytes(raw[24:32], "little")
    at = 32 + key_len  # the value type of the first key-value pair
    assert raw[at] == 8
    raw[at] = 9
    dst.write_bytes(bytes(raw))


def test_found_string_turned_array_is_diagnosed_at_once(tiny_gguf: Path, tmp_path: Path) -> None:
    # found by fuzzing: llama.cpp refuses it, and then the gguf reader behind diagnose_gguf
    # looped for hours on it, so loading hung
    from langchain_understudy.students._llama import diagnose_gguf

    bad = tmp_path / "array.gguf"
    _string_turned_array(tiny_gguf, bad)
    assert "claims" in diagnose_gguf(bad)


def test_found_string_turned_array_is_an_artifact_error_not_a_hang(
    tiny_gguf: Path, tmp_path: Path, worker: Worker
) -> None:
    bad = tmp_path / "array.gguf"
    _string_turned_array(tiny_gguf, bad)
    got = worker.ask(bad, timeout=20)
    assert got["outcome"] == "error" and got["type"] == "ArtifactError", got


def _set_scalar(src: Path, dst: Path, key: str, value: float) -> None:
    """Copy ``src`` with the 4-byte metadata value ``key`` (an int or a float) set to ``value``."""
    import struct

    import gguf

    reader = gguf.GGUFReader(str(src))
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    at = part.ctypes.data - reader.data.ctypes.data
    fmt = "<f" if part.dtype.kind == "f" else "<I"
    raw = bytearray(src.read_bytes())
    raw[at : at + 4] = struct.pack(fmt, value)
    dst.write_bytes(bytes(raw))


#: Found by fuzzing (flipped bits in the header), each aborting llama.cpp or the tokenizer:
#: no layers or more than llama.cpp supports (an assertion in its loader), a context length that
#: reads as -1 (llama-cpp-python sizes its tokenize buffer by it), a negative or NaN norm epsilon
#: (an assertion in the first decode).
FOUND_HPARAMS = [
    ("llama.block_count", 0, "block_count is 0"),
    ("llama.block_count", 514, "block_count is 514"),
    ("llama.block_count", 3, "block_count is 3"),
    ("llama.context_length", 0xFFFFFFFF, "context_length is 4294967295"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "epsilon is -1.0"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "epsilon is nan"),
]


@pytest.mark.parametrize(("key", "value", "said"), FOUND_HPARAMS)
def test_found_impossible_setting_is_an_artifact_error_not_an_abort(
    tiny_gguf: Path, tmp_path: Path, worker: Worker, key: str, value: float, said: str
) -> None:
    bad = tmp_path / "setting.gguf"
    _set_scalar(tiny_gguf, bad, key, value)
    got = worker.ask(bad, timeout=60)
    assert got["outcome"] == "error" and got["type"] == "ArtifactError", got
    assert said in got["message"] and "re-export" in got["message"]


if __name__ == "__main__":
    _serve_worker()
