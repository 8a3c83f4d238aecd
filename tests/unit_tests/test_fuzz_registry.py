"""Generated damage to a student registry: ``registry.json`` edited anywhere (values replaced or
removed, keys renamed, bytes cut or flipped, foreign JSON) and artifacts deleted, truncated,
altered or replaced by folders. Every registry operation returns a sound result or raises
``ArtifactError``; an operation that fails writes nothing; no artifact is ever touched, and the
registry restored from its index reads back exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_strategies import any_text, broken_bytes, fuzz_settings, json_values, mutate

from langchain_understudy.errors import ArtifactError
from langchain_understudy.students import StudentRegistry

FUZZ = fuzz_settings(ci_examples=60)


def _gguf(path: Path, payload: bytes) -> Path:
    path.write_bytes(b"GGUF" + payload * 64)
    return path


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under the registry's versions/ folder."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "versions").rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with three versions (one with an extra artifact), v2 promoted after v1."""
    src = tmp_path_factory.mktemp("src")
    root = tmp_path_factory.mktemp("reg") / "students"
    reg = StudentRegistry(root)
    extra = src / "ood.npy"
    extra.write_bytes(b"\x93NUMPY" + b"\x00" * 32)
    reg.register(_gguf(src / "a.gguf", b"a"), {"teacher": "t"}, {"exact_match": 0.8})
    reg.register(_gguf(src / "b.gguf", b"b"), {"teacher": "t"}, {"exact_match": 0.9},
                 extra_files={"ood_index.npy": extra})  # fmt: skip
    reg.register(_gguf(src / "c.gguf", b"c"))
    reg.promote("v1")
    reg.promote("v2")
    reg.set_shadow("v3")  # the index's rollout state is fuzzed with the rest
    reg.start_canary("v1", share=0.25)
    return root


# -- strategies -------------------------------------------------------------------------------


@st.composite
def edited_index(draw: st.DrawFn, original: dict[str, Any]) -> bytes:
    """The index as a person or a broken disk might leave it."""
    kind = draw(st.sampled_from(["edited", "edited", "foreign", "cut", "flipped", "bytes"]))
    text = json.dumps(original, indent=2)
    if kind == "edited":
        data = json.loads(text)
        mutate(draw, data, most=4)
        if draw(st.booleans()):  # rename a version or point current/history elsewhere
            data.setdefault("versions", {})
            if isinstance(data["versions"], dict) and data["versions"]:
                old = draw(st.sampled_from(sorted(data["versions"], key=str)))
                new = draw(st.sampled_from(["v0", "v01", "x", "", "v9", "../v1", "v1 "]) | any_text)
                data["versions"][new] = data["versions"].pop(old)
        return json.dumps(data, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "foreign":
        return json.dumps(draw(json_values)).encode("utf-8", "surrogatepass")
    if kind == "cut":
        return text.encode()[: draw(st.integers(0, len(text)))]
    if kind == "flipped":
        raw = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    return draw(broken_bytes)


artifact_damage = st.lists(
    st.tuples(
        st.sampled_from(["v1", "v2", "v3"]),
        st.sampled_from(["student.gguf", "ood_index.npy"]),
        st.sampled_from(["delete", "truncate", "flip", "folder"]),
    ),
    max_size=2,
)
operations = st.lists(
    st.sampled_from(
        [
            "list",
            "get",
            "get-unverified",
            "current",
            "current_version",
            "promote",
            "rollback",
            "register",
            "rollout",
            "shadow",
            "canary",
            "end-canary",
        ]
    ),  # fmt: skip
    min_size=1,
    max_size=4,
)


def _damage(root: Path, version: str, name: str, how: str) -> None:
    path = root / "versions" / version / name
    if not path.is_file():
        return
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:10])
    elif how == "flip":
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
        path.mkdir()


def _run(reg: StudentRegistry, op: str, version: str, new_gguf: Path) -> None:
    """One operation; checks what a successful one returns."""
    if op == "list":
        for v in reg.list():
            assert v.path.name == "student.gguf" and v.version.startswith("v")
    elif op in ("get", "get-unverified"):
        v = reg.get(version, verify=op == "get")
        assert v.version == version
    elif op == "current":
        cur = reg.current()
        assert cur is None or reg.verify(cur) == cur
    elif op == "current_version":
        cv = reg.current_version()
        assert cv is None or isinstance(cv, str)
    elif op == "promote":
        assert reg.promote(version).version == version
        assert reg.current_version() == version
    elif op == "rollback":
        before = reg.current_version()
        after = reg.rollback().version
        assert reg.current_version() == after and (after != before or after is not None)
    elif op == "rollout":
        r = reg.rollout()
        assert r.canary is None or 0 < r.canary_share <= 1
    elif op == "shadow":
        assert reg.set_shadow(version).shadow == version != reg.current_version()
    elif op == "canary":
        assert reg.start_canary(version, share=0.5).canary == version != reg.current_version()
    elif op == "end-canary":
        reg.end_canary("stopped", "fuzz")
        assert reg.rollout().canary is None
    else:
        added = reg.register(new_gguf, {"teacher": "t"})
        assert reg.get(added).path.read_bytes() == new_gguf.read_bytes()


# -- properties -------------------------------------------------------------------------------


def test_registry_with_any_damage_answers_or_raises_artifact_error(
    pristine: Path, tmp_path: Path
) -> None:
    original = json.loads((pristine / "registry.json").read_text())
    artifacts = _snapshot(pristine)
    new_gguf = _gguf(tmp_path / "new.gguf", b"n")
    root = tmp_path / "students"

    @FUZZ
    @given(
        data=st.data(),
        damage=artifact_damage,
        ops=operations,
        version=st.sampled_from(["v1", "v2", "v3", "v4", "v0", "x"]),
    )
    def case(data: st.DataObject, damage: list[Any], ops: list[str], version: str) -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)
        index = root / "registry.json"
        index.write_bytes(data.draw(edited_index(original)))
        for v, name, how in damage:
            _damage(root, v, name, how)
        reg = StudentRegistry(root)
        for op in ops:
            kept = _snapshot(root)
            before = index.read_bytes()
            try:
                _run(reg, op, version, new_gguf)
            except ArtifactError as e:
                assert str(e)
                assert index.read_bytes() == before  # a failed operation writes nothing
            after = _snapshot(root)
            # artifacts are never changed or removed; register may only add a version
            assert {k: v for k, v in after.items() if k in kept} == kept

    case()
    # the untouched registry still reads back exactly as registered
    reg = StudentRegistry(pristine)
    assert [v.version for v in reg.list()] == ["v1", "v2", "v3"]
    assert reg.current() is not None and reg.current_version() == "v2"
    assert _snapshot(pristine) == artifacts


# -- cases the fuzzing found, kept as regression tests -----------------------------------------


def _edit(index: dict[str, Any], change: str) -> Any:
    data = json.loads(json.dumps(index))
    if change == "entry-without-files":
        del data["versions"]["v1"]["files"]
    elif change == "entry-not-an-object":
        data["versions"]["v1"] = "v1"
    elif change == "version-id-not-vN":
        data["versions"]["latest"] = data["versions"].pop("v3")
    elif change == "current-a-list":  # found by the fuzzing in the first version of the check
        data["current"] = []
    elif change == "no-current-key":
        del data["current"]
    elif change == "history-not-a-list":
        data["history"] = "v1"
    elif change == "versions-a-list":
        data["versions"] = []
    elif change == "artifact-outside-the-folder":
        data["versions"]["v1"]["files"]["../../../../etc/hostname"] = "0" * 64
    elif change == "canary-version-a-list":  # found by bench/fuzz.py (TypeError: unhashable)
        data["rollout"]["canary"]["version"] = []
    return data


EDITS = [
    # each was an unhandled KeyError, TypeError, ValueError or AttributeError, or (the path) read
    # a file outside the registry
    "entry-without-files",
    "entry-not-an-object",
    "version-id-not-vN",
    "history-not-a-list",
    "versions-a-list",
    "artifact-outside-the-folder",
    "current-a-list",
    "canary-version-a-list",
]


@pytest.mark.parametrize("change", EDITS)
def test_found_damaged_index_is_an_artifact_error(
    pristine: Path, tmp_path: Path, change: str
) -> None:
    root = tmp_path / "students"
    shutil.copytree(pristine, root)
    index = root / "registry.json"
    index.write_text(json.dumps(_edit(json.loads(index.read_text()), change)))
    before = index.read_bytes()
    reg = StudentRegistry(root)
    for op in (
        reg.list,
        reg.current,
        reg.rollback,
        lambda: reg.promote("v2"),
        lambda: reg.get("v1"),
    ):
        with pytest.raises(ArtifactError, match="damaged|no student version"):
            op()
    assert index.read_bytes() == before


def test_found_index_without_current_key_reads_as_nothing_promoted(
    pristine: Path, tmp_path: Path
) -> None:
    # was a KeyError on 'current'
    root = tmp_path / "students"
    shutil.copytree(pristine, root)
    index = root / "registry.json"
    index.write_text(json.dumps(_edit(json.loads(index.read_text()), "no-current-key")))
    reg = StudentRegistry(root)
    assert reg.current() is None and reg.current_version() is None
    assert reg.promote("v1").version == "v1"


@pytest.mark.parametrize(
    "raw", [b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000, b'{"format": 1, "n": ' + b"9" * 5000 + b"}"]
)
def test_found_unreadable_index_is_an_artifact_error(
    pristine: Path, tmp_path: Path, raw: bytes
) -> None:
    # non-UTF-8 bytes, deep nesting and over-long integers escaped as other exceptions
    root = tmp_path / "students"
    shutil.copytree(pristine, root)
    (root / "registry.json").write_bytes(raw)
    with pytest.raises(ArtifactError, match="unreadable|not a langchain-understudy registry"):
        StudentRegistry(root).list()


def test_found_register_after_an_index_lost_a_version_keeps_its_folder(
    pristine: Path, tmp_path: Path
) -> None:
    # found by fuzzing: with v3 gone from registry.json, register chose v3 again and failed on
    # the existing versions/v3 folder (OSError: Directory not empty)
    root = tmp_path / "students"
    shutil.copytree(pristine, root)
    index = root / "registry.json"
    data = json.loads(index.read_text())
    del data["versions"]["v3"]
    data["rollout"]["shadow"] = None  # else the index is damaged: its shadow is gone too
    index.write_text(json.dumps(data))
    kept = (root / "versions" / "v3" / "student.gguf").read_bytes()
    added = StudentRegistry(root).register(_gguf(tmp_path / "n.gguf", b"n"))
    assert added == "v4" and (root / "versions" / "v3" / "student.gguf").read_bytes() == kept


def test_found_artifact_replaced_by_a_folder_is_an_artifact_error(
    pristine: Path, tmp_path: Path
) -> None:
    # was IsADirectoryError out of sha256_file
    root = tmp_path / "students"
    shutil.copytree(pristine, root)
    _damage(root, "v2", "student.gguf", "folder")
    with pytest.raises(ArtifactError, match="missing"):
        StudentRegistry(root).current()
