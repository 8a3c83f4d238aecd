"""Versioned student artifacts with provenance, integrity checks, promotion and rollback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from langchain_understudy.errors import ArtifactError

__all__ = [
    "SIGNAL_REFERENCE_FILE",
    "RolloutState",
    "StudentRegistry",
    "StudentVersion",
    "sha256_file",
]

_FORMAT = 1
_MODEL_FILE = "student.gguf"
SIGNAL_REFERENCE_FILE = "signal_reference.json"
"""Artifact with the routing signals measured on the student's held-out traces (drift watch)."""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def publish(tmp: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Atomically move a finished temporary file into place with normal permissions.

    ``mkstemp`` creates files readable by their owner only; a published artifact gets the mode
    any new file would get under the current umask.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dst)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


_VERSION = re.compile(r"v[1-9][0-9]{0,8}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def _plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name (no folder part, not hidden), safe to join."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
    )


def _index_problem(data: dict[str, Any]) -> str | None:
    """Say what is wrong with a registry index's structure, or ``None`` when it is sound."""
    versions = data.get("versions")
    if not isinstance(versions, dict):
        return "'versions' must be an object of version id -> entry"
    for version, entry in versions.items():
        where = f"versions.{version!r}"
        if not _VERSION.fullmatch(version):
            return f"{where}: version ids look like 'v1', 'v2', ..."
        if not isinstance(entry, dict):
            return f"{where} must be an object"
        files = entry.get("files")
        if not isinstance(files, dict) or _MODEL_FILE not in files:
            return (
                f"{where}.files must be an object of file name -> sha256 including {_MODEL_FILE!r}"
            )
        for name, digest in files.items():
            if not _plain_name(name):
                return f"{where}.files: {name!r} is not a plain file name"
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                return f"{where}.files[{name!r}] must be a sha256 hex digest"
        for key in ("provenance", "metrics"):
            if not isinstance(entry.get(key, {}), dict):
                return f"{where}.{key} must be an object"
        if not isinstance(entry.get("created_at", ""), str):
            return f"{where}.created_at must be a string"
    current = data.get("current")
    if current is not None and (not isinstance(current, str) or current not in versions):
        return f"'current' must be null or a registered version, got {current!r}"
    history = data.get("history", [])
    if not isinstance(history, list) or any(
        not isinstance(v, str) or v not in versions for v in history
    ):
        return "'history' must be a list of registered versions"
    return _rollout_problem(data.get("rollout"), versions)


def _rollout_problem(rollout: Any, versions: Mapping[str, Any]) -> str | None:
    if rollout is None:
        return None
    if not isinstance(rollout, dict):
        return "'rollout' must be an object"
    shadow = rollout.get("shadow")
    if shadow is not None and (not isinstance(shadow, str) or shadow not in versions):
        return f"'rollout.shadow' must be null or a registered version, got {shadow!r}"
    canary = rollout.get("canary")
    if canary is not None:
        named = canary.get("version") if isinstance(canary, dict) else None
        if not isinstance(named, str) or named not in versions:
            return "'rollout.canary' must be null or an object naming a registered version"
        share = canary.get("share")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            return "'rollout.canary.share' must be a number in (0, 1]"
        if not isinstance(canary.get("since", ""), str):
            return "'rollout.canary.since' must be a string"
    if not isinstance(rollout.get("ended", []), list):
        return "'rollout.ended' must be a list"
    return None


@dataclass(frozen=True)
class RolloutState:
    """Which registered candidates run beside the promoted student.

    Attributes:
        shadow: The version answering live traffic in the shadow (never served), or ``None``.
        canary: The version serving a share of the conversations, or ``None``.
        canary_share: That share, in (0, 1].
        canary_since: When the canary started (ISO-8601); live checks before it do not count.
    """

    shadow: str | None = None
    canary: str | None = None
    canary_share: float = 0.0
    canary_since: str = ""


@dataclass(frozen=True)
class StudentVersion:
    """One registered student.

    Attributes:
        version: The version id, ``"v1"``, ``"v2"``, ...
        path: The GGUF file in the registry.
        files: Every artifact of the version (relative name → sha256), the GGUF included.
        provenance: Where it came from: teacher model id, trace snapshot hash, base checkpoint,
            training config, ...
        metrics: Evaluation results on held-out traces.
        created_at: ISO-8601 registration time.
    """

    version: str
    path: Path
    files: dict[str, str]
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def folder(self) -> Path:
        """The version's folder in the registry."""
        return self.path.parent

    def artifact(self, name: str) -> Path:
        """Return the path of an extra artifact registered with this version."""
        if name not in self.files:
            msg = f"{self.version} has no artifact {name!r}; it has {sorted(self.files)}"
            raise ArtifactError(msg)
        return self.folder / name

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class StudentRegistry:
    """A folder of student versions: register, list, promote, roll back.

    Metadata is one JSON file written atomically under a file lock; artifacts are copied into
    ``versions/<version>/`` and their sha256 is checked every time a version is loaded, so a tampered
    or truncated file is refused rather than served.

    Example:
        >>> reg = StudentRegistry(".understudy/students")  # doctest: +SKIP
        >>> v = reg.register("student.Q8_0.gguf", {"teacher": "gpt-4o"}, {"exact_match": 0.95})
        >>> reg.promote(v)
        >>> reg.current().path
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._index = self.root / "registry.json"
        self._lock = FileLock(str(self.root / ".registry.lock"), timeout=60)

    # -- metadata -------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        if not self._index.exists():
            return {"format": _FORMAT, "versions": {}, "current": None, "history": []}
        try:
            data = json.loads(self._index.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
            msg = f"registry index {self._index} is unreadable ({e}); restore it from a backup"
            raise ArtifactError(msg) from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            msg = f"{self._index} is not a langchain-understudy registry (format {_FORMAT})"
            raise ArtifactError(msg)
        problem = _index_problem(data)
        if problem is not None:
            msg = (
                f"registry index {self._index} is damaged: {problem}; restore it from a backup "
                "(the artifacts under versions/ are untouched)"
            )
            raise ArtifactError(msg)
        data.setdefault("current", None)
        data.setdefault("history", [])
        return data

    def _entry(self, data: dict[str, Any], version: str) -> StudentVersion:
        try:
            e = data["versions"][version]
        except KeyError as err:
            known = ", ".join(data["versions"]) or "none"
            msg = f"no student version {version!r}; registered: {known}"
            raise ArtifactError(msg) from err
        folder = self.root / "versions" / version
        return StudentVersion(
            version=version,
            path=folder / _MODEL_FILE,
            files=dict(e["files"]),
            provenance=dict(e.get("provenance", {})),
            metrics=dict(e.get("metrics", {})),
            created_at=e.get("created_at", ""),
        )

    def verify(self, version: str | StudentVersion) -> StudentVersion:
        """Check every artifact of a version against its recorded sha256.

        Raises:
            ArtifactError: a file is missing, truncated or altered.
        """
        v = version if isinstance(version, StudentVersion) else self._entry(self._read(), version)
        for name, digest in v.files.items():
            path = v.folder / name
            if not path.is_file():
                msg = f"{v.version}: artifact {path} is missing; re-register or roll back"
                raise ArtifactError(msg)
            try:
                actual = sha256_file(path)
            except OSError as e:
                msg = f"{v.version}: artifact {path} cannot be read ({e}); check its permissions"
                raise ArtifactError(msg) from e
            if actual != digest:
                msg = (
                    f"{v.version}: artifact {path} does not match its recorded sha256 (tampered "
                    "or truncated); refusing to load it. Re-register the student or roll back."
                )
                raise ArtifactError(msg)
        return v

    # -- public API -----------------------------------------------------------------------------
    def register(
        self,
        gguf_path: str | os.PathLike[str],
        provenance: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> str:
        """Copy a GGUF (and optional extra artifacts) into the registry as a new version.

        Args:
            gguf_path: The student model.
            provenance: Free-form JSON-serialisable provenance.
            metrics: Free-form JSON-serialisable evaluation results.
            extra_files: Other artifacts that belong to this student (name → source path), for
                example the router's out-of-distribution index.

        Returns:
            The new version id.
        """
        src = Path(gguf_path)
        if not src.is_file():
            msg = f"cannot register {src}: no such file"
            raise ArtifactError(msg)
        with open(src, "rb") as f:
            if f.read(4) != b"GGUF":
                msg = f"cannot register {src}: not a GGUF file"
                raise ArtifactError(msg)
        json.dumps(dict(provenance or {}), default=str)  # fail early on unserialisable input
        with self._lock:
            data = self._read()
            # A folder the index no longer lists (an edited or restored registry.json) keeps
            # its number: a new version never lands on an existing folder.
            on_disk = (p.name for p in (self.root / "versions").glob("v*"))
            taken = [int(v[1:]) for v in (*data["versions"], *on_disk) if _VERSION.fullmatch(v)]
            n = 1 + max(taken, default=0)
            version = f"v{n}"
            folder = self.root / "versions" / version
            staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.root))
            try:
                files: dict[str, str] = {}
                sources = {_MODEL_FILE: src, **{k: Path(p) for k, p in (extra_files or {}).items()}}
                for name, path in sources.items():
                    if "/" in name or name.startswith("."):
                        msg = f"artifact name must be a plain file name, got {name!r}"
                        raise ArtifactError(msg)
                    shutil.copyfile(path, staging / name)
                    files[name] = sha256_file(staging / name)
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            data["versions"][version] = {
                "files": files,
                "provenance": dict(provenance or {}),
                "metrics": dict(metrics or {}),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            write_json_atomic(self._index, data)
        return version

    def list(self) -> list[StudentVersion]:
        """Return every registered version, oldest first."""
        data = self._read()
        return [self._entry(data, v) for v in sorted(data["versions"], key=lambda s: int(s[1:]))]

    def get(self, version: str, *, verify: bool = True) -> StudentVersion:
        """Return a version, its artifacts checked against their sha256 unless ``verify=False``."""
        v = self._entry(self._read(), version)
        return self.verify(v) if verify else v

    def current(self, *, verify: bool = True) -> StudentVersion | None:
        """Return the promoted version, or ``None`` when nothing has been promoted."""
        data = self._read()
        if not data["current"]:
            return None
        v = self._entry(data, data["current"])
        return self.verify(v) if verify else v

    def current_version(self) -> str | None:
        """Return the promoted version id without checking artifacts (cheap)."""
        cur = self._read()["current"]
        return str(cur) if cur else None

    def promote(self, version: str) -> StudentVersion:
        """Serve ``version`` from now on; the previously served one can be restored by rollback.

        Raises:
            ArtifactError: the version is unknown or its artifacts fail the integrity check.
        """
        with self._lock:
            data = self._read()
            v = self.verify(self._entry(data, version))
            if data["current"] != version:
                if data["current"]:
                    data["history"].append(data["current"])
                data["current"] = version
                r = data.get("rollout") or {}
                if r.get("shadow") == version:
                    r["shadow"] = None  # a promoted student is no longer a candidate
                canary = r.get("canary")
                if canary and canary.get("version") == version:
                    r["canary"] = None
                    r.setdefault("ended", []).append(
                        {**canary, "outcome": "promoted", "at": datetime.now(UTC).isoformat()}
                    )
                write_json_atomic(self._index, data)
        return v

    def rollout(self) -> RolloutState:
        """The shadow and canary candidates (cheap: artifacts are not checked)."""
        r = self._read().get("rollout") or {}
        canary = r.get("canary") or {}
        return RolloutState(
            shadow=r.get("shadow"),
            canary=canary.get("version"),
            canary_share=float(canary.get("share", 0.0)),
            canary_since=str(canary.get("since", "")),
        )

    def set_shadow(self, version: str | None) -> RolloutState:
        """Run ``version`` in the shadow of the promoted student (``None`` stops the shadow).

        Raises:
            ArtifactError: the version is unknown, fails its integrity check, or is the one served.
        """
        with self._lock:
            data = self._read()
            if version is not None:
                self.verify(self._entry(data, version))
                if version == data["current"]:
                    msg = f"{version} is the promoted student; shadow a candidate instead"
                    raise ArtifactError(msg)
            data.setdefault("rollout", {})["shadow"] = version
            write_json_atomic(self._index, data)
        return self.rollout()

    def start_canary(self, version: str, share: float) -> RolloutState:
        """Serve ``version`` to ``share`` of the conversations, beside the promoted student.

        Raises:
            ArtifactError: the version is unknown, fails its integrity check, or is the one
                served; or nothing is promoted to compare it with.
            ValueError: ``share`` is not in (0, 1].
        """
        if not 0 < share <= 1:
            msg = f"a canary share is in (0, 1], got {share}"
            raise ValueError(msg)
        with self._lock:
            data = self._read()
            self.verify(self._entry(data, version))
            if not data["current"]:
                msg = "nothing is promoted yet: promote a student before starting a canary"
                raise ArtifactError(msg)
            if version == data["current"]:
                msg = f"{version} is already the promoted student"
                raise ArtifactError(msg)
            data.setdefault("rollout", {})["canary"] = {
                "version": version,
                "share": float(share),
                "since": datetime.now(UTC).isoformat(),
            }
            write_json_atomic(self._index, data)
        return self.rollout()

    def end_canary(self, outcome: str, reason: str = "") -> str | None:
        """Stop the canary (``outcome``: ``"rolled back"``, ``"stopped"``, ...); return its version.

        The promoted student keeps serving; the outcome is kept under ``rollout.ended``. Ending
        when no canary runs does nothing and returns ``None``.
        """
        with self._lock:
            data = self._read()
            r = data.setdefault("rollout", {})
            canary = r.get("canary")
            if not canary:
                return None
            r["canary"] = None
            r.setdefault("ended", []).append(
                {
                    **canary,
                    "outcome": outcome,
                    "reason": reason,
                    "at": datetime.now(UTC).isoformat(),
                }
            )
            write_json_atomic(self._index, data)
            return str(canary["version"])

    def rollback(self) -> StudentVersion:
        """Serve the previously promoted version again.

        Raises:
            ArtifactError: there is no earlier promoted version.
        """
        with self._lock:
            data = self._read()
            if not data["history"]:
                msg = "nothing to roll back to: no version was promoted before the current one"
                raise ArtifactError(msg)
            previous = data["history"].pop()
            v = self.verify(self._entry(data, previous))
            data["current"] = previous
            write_json_atomic(self._index, data)
        return v
