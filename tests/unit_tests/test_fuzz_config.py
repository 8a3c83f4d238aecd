"""Generated ``understudy.toml`` and job TOML files: the starter config and the tiny job edited
anywhere (values of other types, removed keys, unknown keys, tables turned into values), cut,
bit-flipped, non-UTF-8, deeply nested. Loading returns a config or raises ``ConfigError``.
"""

from __future__ import annotations

import math
import os
import tomllib
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_job_toml
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_strategies import broken_bytes, fuzz_settings, json_values, mutate

from langchain_understudy.config import UnderstudyConfig, load_config
from langchain_understudy.distill_jobs.job import DistillConfig
from langchain_understudy.errors import ConfigError
from langchain_understudy.plugin._cli_app import STARTER_CONFIG

FUZZ = fuzz_settings(ci_examples=60)

# -- a small TOML writer (the standard library only reads TOML) ------------------------------


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) and k.isascii() else _str(k)


def _str(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF:
            out.append(f"\\u{ord(c):04x}")  # a surrogate escape is invalid TOML: kept on purpose
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if v is None:
        return '""'  # TOML has no null
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of ``data``: top-level dicts as tables, deeper ones inline."""
    head = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"[{_key(k)}]\n" + "\n".join(f"{_key(str(kk))} = {_value(vv)}" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(head) + "\n\n" + "\n\n".join(tables) + "\n"


# -- strategies -------------------------------------------------------------------------------

STARTER = tomllib.loads(STARTER_CONFIG)
JOB = tomllib.loads(tiny_job_toml("fuzz"))
toml_values = json_values | st.datetimes().map(lambda d: d) | st.dates() | st.times()


@st.composite
def toml_files(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["edited", "edited", "edited", "lines", "bytes", "deep"]))
    data = tomllib.loads(to_toml(base))
    if kind == "edited":
        mutate(draw, data, most=3)
        for _ in range(draw(st.integers(0, 2))):  # unknown keys, at the top or in a table
            table = draw(
                st.sampled_from([None, *[k for k, v in data.items() if isinstance(v, dict)]])
            )
            target = data if table is None else data[table]
            target[draw(st.sampled_from(["extra", "n_ctx", "path", "kind", "x"]))] = draw(
                toml_values
            )
        return to_toml(data).encode("utf-8", "surrogatepass")
    text = to_toml(data)
    if kind == "lines":
        lines = text.splitlines()
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(lines) - 1))
            op = draw(st.sampled_from(["drop", "dup", "cut"]))
            if op == "drop":
                del lines[i]
            elif op == "dup":
                lines.insert(i, lines[i])
            else:
                lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
            if not lines:
                break
        return "\n".join(lines).encode()
    if kind == "bytes":
        raw = bytearray(text.encode())
        at = draw(st.integers(0, len(raw)))
        return bytes(raw[:at]) + draw(broken_bytes) + bytes(raw[at:])
    depth = draw(st.integers(1, 3000))
    return text.encode() + b"\nextra = " + b"[" * depth + b"1" + b"]" * depth + b"\n"


def _load(loader: Any, path: Path) -> Any:
    try:
        return loader(path)
    except ConfigError as e:
        assert str(e)
        return None


# -- properties -------------------------------------------------------------------------------


def test_starter_config_and_tiny_job_load(tmp_path: Path) -> None:
    (tmp_path / "understudy.toml").write_text(STARTER_CONFIG, encoding="utf-8")
    (tmp_path / "job.toml").write_text(to_toml(JOB), encoding="utf-8")  # through the writer
    assert load_config(tmp_path / "understudy.toml").server.port == 8321
    assert DistillConfig.from_toml(tmp_path / "job.toml").name == "fuzz"


def test_any_understudy_toml_loads_or_raises_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("UNDERSTUDY_"):
            monkeypatch.delenv(name)
    path = tmp_path / "understudy.toml"

    @FUZZ
    @given(raw=toml_files(STARTER))
    def case(raw: bytes) -> None:
        path.write_bytes(raw)
        cfg = _load(load_config, path)
        if cfg is not None:  # a loaded config is a valid one
            assert isinstance(cfg, UnderstudyConfig)
            UnderstudyConfig.model_validate(cfg.model_dump())

    case()


def test_any_job_toml_loads_or_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"

    @FUZZ
    @given(raw=toml_files(JOB))
    def case(raw: bytes) -> None:
        path.write_bytes(raw)
        job = _load(DistillConfig.from_toml, path)
        if job is not None:
            assert isinstance(job, DistillConfig)
            # a path the file names is resolved against the file, not the working directory
            named = tomllib.loads(raw.decode()).get("traces")
            assert not isinstance(named, str) or job.traces == tmp_path / named

    case()


# -- cases the fuzzing found, kept as regression tests (config.read_toml and from_toml's type
# checks turn each into a ConfigError) --------------------------------------------------------

_CONFIG_BUGS = {
    "non-utf8": STARTER_CONFIG.encode() + b"\n# caf\xe9\n",
    "deep-array": STARTER_CONFIG.encode() + b"\n[extra]\nx = " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "huge-integer": STARTER_CONFIG.encode().replace(b"port = 8321", b"port = " + b"9" * 5000),
}
_JOB_BUGS = {
    **_CONFIG_BUGS,
    "knowledge-not-a-table": tiny_job_toml("j")
    .encode()
    .replace(b'name = "j"', b'name = "j"\nknowledge = 5'),
    "traces-not-a-string": tiny_job_toml("j")
    .encode()
    .replace(b'traces = "traces.sqlite"', b"traces = 5"),
}


@pytest.mark.parametrize("name", sorted(_CONFIG_BUGS))
def test_found_bad_understudy_toml_is_a_config_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "understudy.toml"
    path.write_bytes(_CONFIG_BUGS[name])
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("name", sorted(_JOB_BUGS))
def test_found_bad_job_toml_is_a_config_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(_JOB_BUGS[name])
    with pytest.raises(ConfigError):
        DistillConfig.from_toml(path)
