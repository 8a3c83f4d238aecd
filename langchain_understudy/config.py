"""One configuration model for the whole package, loadable from TOML and the environment.

Every field can be overridden by an ``UNDERSTUDY_*`` environment variable; nested fields use a double
underscore, e.g. ``UNDERSTUDY_ROUTER__THRESHOLD=0.4`` or ``UNDERSTUDY_TEACHER__KIND=openai``.

Example:
    >>> cfg = UnderstudyConfig(student={"n_ctx": 1024})
    >>> cfg.student.n_ctx
    1024
"""

from __future__ import annotations

import os
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from langchain_understudy.errors import ConfigError

__all__ = [
    "FactSelection",
    "KnowledgeSettings",
    "RolloutSettings",
    "RouterSettings",
    "ServerSettings",
    "StudentSettings",
    "TeacherSettings",
    "TraceSettings",
    "UnderstudyConfig",
    "cache_dir",
    "load_config",
    "reference_table",
]

QuantType = Literal["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]


def cache_dir(kind: str) -> Path:
    """Where derived files of one kind are cached.

    ``$UNDERSTUDY_CACHE_DIR/<kind>``, else ``~/.cache/langchain-understudy/<kind>``. Everything
    kept there can be rebuilt from its source.
    """
    root = os.environ.get("UNDERSTUDY_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "langchain-understudy"
    return base / kind


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class StudentSettings(_Section):
    """How the student is found and run."""

    registry: Path = Path(".understudy/students")
    """Folder of the student registry; the promoted version is served."""
    model_path: Path | None = None
    """A GGUF file to serve instead of the registry's promoted version."""
    n_ctx: int = Field(default=2048, ge=64, le=1_048_576)
    """Context window in tokens; must not exceed what the student was trained for."""
    n_threads: int | None = Field(default=None, ge=1, le=1024)
    """CPU threads for llama.cpp; ``None`` lets llama.cpp choose."""
    n_gpu_layers: int = Field(default=0, ge=-1)
    """Layers offloaded to the GPU (``-1``: all); needs a CUDA/Metal build of llama-cpp-python."""
    max_tokens: int = Field(default=256, ge=1, le=131_072)
    """Default cap on generated tokens."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature; 0 is greedy and deterministic."""
    overflow: Literal["truncate", "error"] = "truncate"
    """What to do when a conversation exceeds the context: drop oldest turns or raise."""
    n_parallel: int = Field(default=4, ge=1, le=64)
    """Requests decoded together in one llama.cpp context (continuous batching); each slot holds
    an ``n_ctx``-token KV range, and requests beyond ``n_parallel`` wait for a free slot. (The old
    name ``n_instances`` is accepted with a warning.)"""

    @model_validator(mode="before")
    @classmethod
    def _renamed_n_instances(cls, data: Any) -> Any:
        if isinstance(data, dict) and "n_instances" in data:
            data = dict(data)
            warnings.warn(
                "[student] n_instances is now n_parallel (requests decoded together in one "
                "llama.cpp context); rename it in understudy.toml",
                DeprecationWarning,
                stacklevel=2,
            )
            data.setdefault("n_parallel", data.pop("n_instances"))
        return data

    def chat_student_kwargs(self) -> dict[str, Any]:
        """The ``ChatStudent`` options these settings describe (everything but the model file)."""
        return {
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
            "n_gpu_layers": self.n_gpu_layers,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "overflow": self.overflow,
            "n_parallel": self.n_parallel,
        }


class FactSelection(_Section):
    """How retrieved documents become the facts a prompt shows.

    The distillation job and the router share these fields; a student must be served with the
    values it was trained with (its registry entry records them under ``provenance["facts"]``).
    """

    k: int = Field(default=4, ge=1, le=100)
    """Facts per prompt."""
    distinct_by: str | None = None
    """Metadata key: keep only the most relevant fact per value (``"answer"`` over past teacher
    answers shows ``k`` different answers); ``None`` keeps the ``k`` most relevant facts."""
    fetch_k: int | None = Field(default=None, ge=1, le=10_000)
    """Documents fetched before ``distinct_by`` picks ``k``; ``None``: ``10 * k`` with
    ``distinct_by``, else ``k``."""
    fact_details: bool = True
    """Show each fact's key and date in the prompt; ``False``: the text alone."""

    def fetch_count(self) -> int:
        """How many documents to fetch for one prompt."""
        if self.fetch_k is not None:
            return max(self.fetch_k, self.k)
        return 10 * self.k if self.distinct_by else self.k


class KnowledgeSettings(FactSelection):
    """Where current facts live."""

    path: Path | None = None
    """Folder of the knowledge store; ``None`` disables retrieval."""
    index: Literal["flat", "hnsw", "ivf"] = "flat"
    """FAISS index kind."""
    min_relevance: float = Field(default=0.0, ge=0.0, le=1.0)
    """Facts below this relevance score are not shown to the student."""
    embedding_model: Path | None = None
    """A sentence-transformers folder or an embedding ``.gguf``; ``None`` uses the bundled
    all-MiniLM-L6-v2. BERT folders and GGUFs run in llama.cpp (no torch); other architectures
    need sentence-transformers (the ``train`` extra)."""


class TeacherSettings(_Section):
    """The large model that answers what the student should not."""

    kind: Literal["none", "openai", "gguf", "import"] = "none"
    """``openai``: any OpenAI-compatible endpoint; ``gguf``: a larger local GGUF;
    ``import``: a ``module:factory`` returning a LangChain chat model; ``none``: student only."""
    model: str = "gpt-4o-mini"
    """Model name sent to an OpenAI-compatible endpoint."""
    base_url: str | None = None
    """Endpoint URL for ``openai`` (vLLM, llama.cpp server, Ollama, a hosted API)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; the key itself never goes in the file."""
    path: Path | None = None
    """GGUF file for ``gguf``."""
    factory: str | None = None
    """``module:callable`` for ``import``."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """Per-call timeout."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries with exponential backoff before the teacher counts as down."""
    calls_per_minute: int | None = Field(default=None, ge=1)
    """Budget: teacher calls allowed per minute (``None``: unlimited)."""
    calls_per_day: int | None = Field(default=None, ge=1)
    """Budget: teacher calls allowed per day (``None``: unlimited)."""
    backoff_s: float = Field(default=0.5, ge=0, le=60)
    """First pause between retries; doubles each retry."""
    max_backoff_s: float = Field(default=8.0, ge=0, le=600)
    """Longest pause between retries."""
    failure_threshold: int = Field(default=3, ge=1, le=100)
    """Consecutive failed attempts that open the circuit breaker."""
    reset_after_s: float = Field(default=30.0, ge=0, le=86400)
    """How long an open circuit refuses calls before one trial call."""

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            msg = f"must be 'module:callable', got {v!r}"
            raise ValueError(msg)
        return v


class RouterSettings(_Section):
    """How requests are split between student and teacher."""

    mode: Literal["pre", "cascade", "auto"] = "auto"
    """``pre`` decides before generating, ``cascade`` after, ``auto`` both."""
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """Escalate when the escalation score is at or above this value. With a ``policy`` file,
    the policy's calibrated threshold applies unless this is set."""
    target_teacher_rate: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Steer the threshold online so this share of requests goes to the teacher (a
    ``TeacherRateController`` over the last ``rate_window`` requests); ``None`` keeps the
    calibrated threshold fixed."""
    rate_window: int = Field(default=500, ge=10)
    """Requests the teacher-rate controller looks back over."""
    always_teacher_patterns: list[str] = Field(default_factory=list)
    """Regular expressions; a conversation matching any goes to the teacher."""
    never_teacher_patterns: list[str] = Field(default_factory=list)
    """Regular expressions; a matching conversation never leaves the machine."""
    private_tags: list[str] = Field(default_factory=lambda: ["private"])
    """Run tags that forbid escalation."""
    block_pii: bool = True
    """Forbid escalation when PII is detected in the conversation."""
    audit_log: Path | None = None
    """JSONL file where every routing decision is appended."""
    policy: Path | None = None
    """JSON file of a fitted router policy (`understudy router calibrate --fit default|learned
    --router-out`); ``None`` uses the built-in ramps."""
    always_teacher_tags: list[str] = Field(default_factory=list)
    """Run tags that always send the conversation to the teacher."""
    reload_check_s: float = Field(default=2.0, ge=0)
    """How often the registry is checked for a newly promoted student."""


class RolloutSettings(_Section):
    """Shadow and canary candidates on live traffic, and the drift watch (registry students only).

    Which version is the shadow or the canary is registry state (``understudy students shadow`` /
    ``canary``); these settings say how the checks run and when a canary is decided.
    """

    log: Path | None = None
    """JSONL file of live checks and rollout events; ``None``: ``live.jsonl`` in the registry."""
    queue_size: int = Field(default=64, ge=1)
    """Checks waiting for the background worker; more are dropped, never waited for."""
    teacher_sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of the canary's turns also put to the teacher (in the background) to measure
    agreement; these calls count against the teacher's budgets."""
    min_agreement: float = Field(default=0.9, ge=0.0, le=1.0)
    """Live agreement a candidate needs: with the teacher for a canary, with the served answers for
    ``require_live_agreement``."""
    min_checks: int = Field(default=50, ge=1)
    """Teacher checks a canary needs before it can be promoted."""
    min_requests: int = Field(default=200, ge=1)
    """Canary turns before promotion; live checks ``require_live_agreement`` needs."""
    max_error_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    """Largest share of failed canary turns."""
    max_latency_p95_ms: float | None = Field(default=None, gt=0)
    """Largest p95 latency of the canary's answers (``None``: not checked)."""
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """Smallest mean confidence of the canary's answers (``None``: not checked)."""
    auto: bool = True
    """Promote or roll back the canary automatically when its figures decide."""
    require_live_agreement: bool = False
    """`understudy students promote V` refuses a version whose shadow or canary agreement is below
    ``min_agreement`` over fewer than ``min_requests`` checks (``--force`` overrides)."""
    drift_window: int = Field(default=500, ge=10)
    """Live values per signal the drift watch compares with the held-out ones."""
    drift_min_samples: int = Field(default=100, ge=10)
    """Live values needed before a signal's drift is judged."""
    drift_alarm_psi: float = Field(default=0.25, gt=0)
    """PSI at or above which a signal raises the drift alarm (when its KS statistic is also
    beyond the 1% critical value for the two sample sizes, so that sampling noise does not)."""


class TraceSettings(_Section):
    """Where teacher traces are recorded."""

    path: Path = Path(".understudy/traces.sqlite")
    """SQLite file of the trace store."""
    redact: bool = True
    """Redact PII before writing."""


class ServerSettings(_Section):
    """The OpenAI-compatible server."""

    host: str = "127.0.0.1"
    """Bind address; anything but loopback requires ``api_key_env`` to be set."""
    port: int = Field(default=8321, ge=0, le=65535)
    """TCP port."""
    api_key_env: str = "UNDERSTUDY_API_KEY"
    """Environment variable holding the bearer key clients must send."""
    max_request_bytes: int = Field(default=1_000_000, ge=1024)
    """Largest request body accepted."""
    max_tokens_limit: int = Field(default=2048, ge=1)
    """Largest ``max_tokens`` a client may ask for."""


class UnderstudyConfig(BaseSettings):
    """The whole configuration: student, knowledge, teacher, router, traces and server."""

    model_config = SettingsConfigDict(
        env_prefix="UNDERSTUDY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    student: StudentSettings = Field(default_factory=StudentSettings)
    """The student runtime."""
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    """The knowledge store."""
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    """The teacher."""
    router: RouterSettings = Field(default_factory=RouterSettings)
    """The router."""
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    """Shadow, canary and drift watch."""
    traces: TraceSettings = Field(default_factory=TraceSettings)
    """The trace store."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    """The HTTP server."""


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths in a TOML file relative to the file, not to the working directory."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = _resolve_paths(value, base)
        elif key in {
            "registry",
            "model_path",
            "path",
            "embedding_model",
            "audit_log",
            "policy",
            "log",
        } and isinstance(value, str):
            p = Path(os.path.expanduser(value))
            out[key] = str(p if p.is_absolute() else base / p)
        else:
            out[key] = value
    return out


def read_toml(path: Path, what: str, create_hint: str) -> dict[str, Any]:
    """Read a TOML file, turning every way it can be unreadable into a :class:`ConfigError`.

    Args:
        path: The file.
        what: How messages name it ("config file", "job config").
        create_hint: What to do when it does not exist.
    """
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        msg = f"{what} {path} does not exist; {create_hint}"
        raise ConfigError(msg) from e
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{what} {path} cannot be read as UTF-8 text: {e}"
        raise ConfigError(msg) from e
    except RecursionError as e:
        msg = f"{what} {path} nests arrays or tables too deeply to read; flatten it"
        raise ConfigError(msg) from e
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: over-long integers
        msg = f"{what} {path} is not valid TOML: {e}"
        raise ConfigError(msg) from e


def load_config(path: str | os.PathLike[str] | None = None) -> UnderstudyConfig:
    """Load the configuration from a TOML file, then apply ``UNDERSTUDY_*`` overrides.

    Args:
        path: A TOML file; ``None`` uses only defaults and the environment.

    Raises:
        ConfigError: the file is missing, is not TOML, or holds an invalid value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = read_toml(p, "config file", f"create one with `understudy init {p}`")
        data = _resolve_paths(data, p.resolve().parent)
    try:
        return _from_file_then_env(data)
    except ValidationError as e:
        msg = f"invalid configuration{f' in {path}' if path else ''}: {e}"
        raise ConfigError(msg) from e


def _from_file_then_env(data: dict[str, Any]) -> UnderstudyConfig:
    # Environment variables win over the file: build from env alone, then deep-merge.
    env_cfg = UnderstudyConfig()
    env_set = env_cfg.model_dump(exclude_unset=True)
    merged = _deep_merge(data, env_set)
    return UnderstudyConfig.model_validate(merged)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def reference_table() -> str:
    """The README's configuration reference (a Markdown table), generated from these models.

    Example:
        >>> reference_table().splitlines()[0]
        '| field | default | meaning |'
    """
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for section, field in UnderstudyConfig.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name, f in model.model_fields.items():
            default = f.get_default(call_default_factory=True)
            meaning = " ".join((f.description or "").split())
            rows.append(f"| `{section}.{name}` | `{default}` | {meaning} |")
    return "\n".join(rows)
