"""``DistillJob``: traces in, a gated, registered and (maybe) promoted GGUF student out."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from langchain_understudy.config import FactSelection, QuantType, TeacherSettings, read_toml
from langchain_understudy.distill_jobs._distributed import ranks_from_env
from langchain_understudy.distill_jobs.dataset import (
    Example,
    FactLookup,
    build_examples,
    load_examples,
    save_examples,
    split_examples,
)
from langchain_understudy.distill_jobs.scratch import ScratchSize
from langchain_understudy.errors import ConfigError, UnderstudyError
from langchain_understudy.prompting import Fact, last_user_text, select_facts
from langchain_understudy.students.answer_space import (
    ANSWER_SPACE_FILE,
    AnswerSpace,
    infer_answer_space,
)
from langchain_understudy.students.exemplars import EXEMPLAR_FILES
from langchain_understudy.students.registry import SIGNAL_REFERENCE_FILE

__all__ = ["DistillConfig", "DistillJob", "JobLockedError", "JobResult", "RelabelSection"]

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnowledgeSection(FactSelection):
    """Facts attached to each example's prompt, chosen and written exactly as at serving time."""

    path: Path | None = None
    """Knowledge store folder; ``None``: no facts."""
    as_of: Literal["trace", "now"] = "trace"
    """``trace``: each prompt carries the facts as they stood when the teacher answered it (what
    the teacher saw; traces older than the store get its oldest facts); ``now``: current facts."""


class LoraSection(_Section):
    """LoRA adapters on a base checkpoint, merged into its weights before export."""

    r: int = Field(default=16, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(default=32, ge=1)
    """Scaling numerator (the update is scaled by ``alpha / r``)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    """Linear layers that get adapters (llama names)."""


class StudentSection(_Section):
    """The student to train: from scratch (default), from a pretrained base or a local checkpoint."""

    base: str | None = None
    """A pretrained base to fine-tune: ``"smollm2-135m-instruct"`` (bundled, offline) or the path
    of any llama-family ``.gguf`` (dequantized once, cached by its sha256); ``None``: from scratch
    (or ``base_checkpoint``)."""
    base_checkpoint: Path | None = None
    """A local Hugging Face checkpoint of the llama family to fine-tune; ``None``: from scratch."""
    lora: LoraSection | None = None
    """Train LoRA adapters on the base instead of every weight; merged before export."""
    keep_layers: int | None = Field(default=None, ge=1)
    """With a base: keep only its bottom N transformer blocks, a smaller and faster student
    that still starts from pretrained weights; ``None``: every block."""
    train_layers: int | None = Field(default=None, ge=1)
    """With a base: train only the top N transformer blocks and the final norm (embeddings and
    lower blocks frozen; backward stops there, so steps are cheaper); ``None``: every weight."""
    hidden: int = Field(default=256, ge=32, le=8192)
    """From scratch: embedding width (a multiple of 256 lets k-quants apply to every tensor)."""
    layers: int = Field(default=4, ge=1, le=64)
    """From scratch: transformer blocks."""
    heads: int = Field(default=4, ge=1, le=128)
    """From scratch: attention heads."""
    kv_heads: int = Field(default=2, ge=1, le=128)
    """From scratch: key/value heads."""
    ffn: int = Field(default=768, ge=32)
    """From scratch: feed-forward width."""
    context: int = Field(default=512, ge=64, le=32768)
    """From scratch: context length in tokens."""
    vocab_size: int = Field(default=4096, ge=300, le=200_000)
    """From scratch: BPE vocabulary size."""

    @model_validator(mode="after")
    def _lora_needs_a_base(self) -> StudentSection:
        if self.base is not None and self.base_checkpoint is not None:
            msg = "set student.base or student.base_checkpoint, not both"
            raise ValueError(msg)
        pretrained = self.base is not None or self.base_checkpoint is not None
        for name, value in (
            ("lora", self.lora),
            ("train_layers", self.train_layers),
            ("keep_layers", self.keep_layers),
        ):
            if value is not None and not pretrained:
                msg = (
                    f"student.{name} needs student.base (or base_checkpoint): it adapts an "
                    "existing model, a from-scratch student trains every weight"
                )
                raise ValueError(msg)
        return self

    @property
    def pretrained(self) -> bool:
        """Whether the student starts from a pretrained base."""
        return self.base is not None or self.base_checkpoint is not None


class TrainingSection(_Section):
    """Optimisation."""

    epochs: float = Field(default=3.0, gt=0)
    """Passes over the training set."""
    max_steps: int = Field(default=-1, ge=-1)
    """Hard step limit (-1: from epochs)."""
    max_minutes: float | None = Field(default=None, gt=0)
    """Time budget; the learning-rate schedule anneals within it."""
    learning_rate: float | None = Field(default=None, gt=0, le=1.0)
    """Peak learning rate; ``None``: 1e-3 from scratch or with LoRA, 1e-4 when every weight
    of a pretrained base (or its top ``train_layers``) is trained."""
    batch_size: int = Field(default=32, ge=1, le=4096)
    """Examples per step (per device)."""
    save_every: int = Field(default=200, ge=1)
    """Checkpoint interval in steps (for ``--resume``)."""
    save_every_minutes: float | None = Field(default=None, gt=0)
    """Also checkpoint every this many minutes of training. Each checkpoint records its step
    and training seconds (``understudy_checkpoint.json``) and holds the tokenizer, so it exports
    on its own (``training_checkpoints``: learning curves by time)."""
    keep_checkpoints: int = Field(default=2, ge=0)
    """Newest checkpoints kept while training (deleted once the student is registered);
    ``0``: keep every one, also after the run."""
    seed: int = 0
    """Seed for initialisation and data order."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for training (torch) and evaluation (llama.cpp); ``None``: all cores."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding per step; the order stays
    random between groups)."""


class PackageSection(_Section):
    """Export and quantization."""

    dtype: Literal["f16", "f32"] = "f16"
    """Export precision before quantization."""
    quant_types: list[QuantType] = Field(default_factory=lambda: list[QuantType](["Q8_0"]))
    """Types built; each is evaluated."""
    serve: QuantType = "Q8_0"
    """The type registered and served (must be in ``quant_types`` or be the export dtype)."""
    eval_threads: int | None = Field(default=None, ge=1)
    """llama.cpp threads for the held-out evaluation (``None``: ``training.threads``). On a
    machine busy with other work, fewer threads than cores avoid llama.cpp's spin-wait cliff."""
    answer_schema: str = "infer"
    """The shape the student answers in, applied as a grammar when serving: ``"infer"`` derives
    it from the training answers (a closed label set, a JSON schema, or free text),
    ``"off"`` never constrains, or the path of a JSON schema file. The top-level
    ``json_schema`` overrides it."""

    @model_validator(mode="after")
    def _serve_is_built(self) -> PackageSection:
        built = {q.upper() for q in self.quant_types} | {self.dtype.upper()}
        if self.serve.upper() not in built:
            msg = (
                f"package.serve = {self.serve!r} is not built: add it to package.quant_types "
                f"({self.quant_types}) or serve the export dtype {self.dtype.upper()!r}"
            )
            raise ValueError(msg)
        return self


class GateSection(_Section):
    """When a candidate may replace the serving student."""

    min_exact_match: float = Field(default=0.0, ge=0, le=1)
    """Absolute floor on held-out exact match."""
    min_improvement: float = Field(default=0.0, ge=-1, le=1)
    """Candidate exact match must be at least serving + this, on the same held-out set."""
    max_latency_p95_ms: float | None = Field(default=None, gt=0)
    """Ceiling on the candidate's p95 latency per answer."""
    promote: bool = True
    """Promote when the gate passes (``False``: register only)."""


class ExemplarSection(_Section):
    """Exemplar memory: the job indexes its own training traces (request → teacher answer).

    Each training prompt shows the ``k`` most similar past answers (distinct ones, never the
    example's own); the index is registered with the student and serving retrieves from it the
    same way. Exemplars are how the teacher answered before; ``[knowledge]`` facts are how the
    world is now.
    """

    k: int = Field(default=4, ge=1, le=64)
    """Past answers shown per prompt."""
    distinct_by: Literal["answer"] | None = "answer"
    """``"answer"``: ``k`` different answers (the most similar request for each);
    ``None``: the ``k`` most similar requests, repeats allowed."""
    order: Literal["similarity", "vote"] = "similarity"
    """``"similarity"``: the answer of the closest request first. ``"vote"`` (with distinct
    answers): first the answer whose requests have the largest summed similarity among the
    ``vote_k`` nearest, a weighted kNN vote, for label-like answers many requests share
    (intents, routes); where the answer is read from the request itself, the closest request's
    answer is the better hint."""
    vote_k: int = Field(default=30, ge=1, le=1024)
    """Nearest past requests that vote with ``order = "vote"``."""

    @property
    def vote_neighbours(self) -> int | None:
        """``vote_k`` when answers are ranked by vote, else ``None`` (similarity order)."""
        return self.vote_k if self.order == "vote" and self.distinct_by == "answer" else None


class RelabelSection(_Section):
    """Optional teacher relabelling before the dataset is built (needs ``[teacher]``)."""

    mode: Literal["off", "missing", "all"] = "off"
    """``missing``: answer prompts that have none (imported with ``--unanswered``, or failed
    calls); ``all``: every prompt the configured teacher has not answered yet; ``off``: never."""
    max_concurrency: int = Field(default=4, ge=1, le=256)
    """Teacher calls in flight at once."""
    max_calls: int | None = Field(default=None, ge=1)
    """Budget of teacher calls per run, retries included (``None``: no limit); what is left is
    asked on the next run."""


class DistillConfig(_Section):
    """A distillation job, usually loaded from TOML with :meth:`from_toml`.

    Example:
        >>> cfg = DistillConfig(traces="traces.sqlite", registry="students")
        >>> cfg.package.serve
        'Q8_0'
    """

    name: str = "understudy"
    """Job name, used in run folders and provenance."""
    traces: Path = Path(".understudy/traces.sqlite")
    """Trace store (SQLite) to read."""
    registry: Path = Path(".understudy/students")
    """Student registry to register into."""
    work_dir: Path = Path(".understudy/runs")
    """Run folders (checkpoints, datasets, reports) go here."""
    dataset: Literal["all", "since_last_build"] = "all"
    """Train on all traces, or only on those recorded since the last build."""
    skip_if_no_new_traces: bool = True
    """Do nothing (exit 0) when no trace arrived since the last build: safe to schedule often."""
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of conversations held out for evaluation (by hash: never trained on)."""
    min_examples: int = Field(default=20, ge=2)
    """Refuse to train on fewer examples."""
    system: str | None = None
    """System line used when a conversation has none (at serving time too)."""
    json_schema: dict[str, Any] | None = None
    """Constrain the student's answers to this JSON schema during evaluation."""
    max_answer_chars: int = Field(default=4000, ge=1)
    """Drop traces whose answer is longer."""
    exclude_tags: list[str] = Field(default_factory=list)
    """Drop traces carrying any of these tags."""
    knowledge: KnowledgeSection = Field(default_factory=KnowledgeSection)
    """Facts for prompts."""
    exemplars: ExemplarSection | None = None
    """Exemplar memory over the training traces (``None``: off)."""
    student: StudentSection = Field(default_factory=StudentSection)
    """Student shape or base checkpoint."""
    training: TrainingSection = Field(default_factory=TrainingSection)
    """Optimisation."""
    package: PackageSection = Field(default_factory=PackageSection)
    """Export and quantization."""
    gate: GateSection = Field(default_factory=GateSection)
    """Promotion gate."""
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    """The teacher asked by ``[relabel]`` (same table as in ``understudy.toml``; its retry and
    backoff settings apply)."""
    relabel: RelabelSection = Field(default_factory=RelabelSection)
    """Teacher relabelling."""

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> DistillConfig:
        """Load a job file; relative paths are relative to the file."""
        p = Path(path)
        data = read_toml(p, "job config", "write one with `understudy distill init`")
        for key in ("traces", "registry", "work_dir"):
            if key in data and not isinstance(data[key], str):
                msg = f"invalid job config {p}: {key} must be a path string, got {data[key]!r}"
                raise ConfigError(msg)
        for table in ("knowledge", "student", "teacher", "package", "exemplars"):
            if table in data and not isinstance(data[table], dict):
                msg = f"invalid job config {p}: [{table}] must be a table, got {data[table]!r}"
                raise ConfigError(msg)
        base = p.resolve().parent
        for key in ("traces", "registry", "work_dir"):
            if key in data:
                data[key] = str(base / Path(data[key]).expanduser())
        for section, key in (
            ("knowledge", "path"),
            ("student", "base_checkpoint"),
            ("teacher", "path"),
        ):
            value = data.get(section, {}).get(key)
            if isinstance(value, str) and value:
                data[section][key] = str(base / Path(value).expanduser())
        schema_file = data.get("package", {}).get("answer_schema")
        if isinstance(schema_file, str) and schema_file not in ("infer", "off"):
            data["package"]["answer_schema"] = str(base / Path(schema_file).expanduser())
        student_base = data.get("student", {}).get("base")
        if isinstance(student_base, str) and student_base.endswith(".gguf"):
            data["student"]["base"] = str(base / Path(student_base).expanduser())
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msg = f"invalid job config {p}: {e}"
            raise ConfigError(msg) from e


class JobLockedError(UnderstudyError):
    """Another run of the same job holds the lock."""


@dataclass
class JobResult:
    """The outcome of one run."""

    status: Literal["promoted", "registered", "rejected", "skipped"]
    reason: str
    run_dir: Path | None = None
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    serving_metrics: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


#: The run's examples, both splits, as built (a resumed run trains on these, not on the store).
DATASET_FILE = "dataset.jsonl"


@dataclass
class _Run:
    """One run of a job as its stages fill it in (``state`` is the run's ``state.json``)."""

    dir: Path
    state: dict[str, Any]
    traces: list[Any] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    train: list[Example] = field(default_factory=list)
    held: list[Example] = field(default_factory=list)
    space: AnswerSpace | None = None
    trained: Any = None  # TrainResult (torch is imported lazily)
    files: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] | None = None


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


class DistillJob:
    """Run a distillation job: relabel → dataset → train → export → quantize → evaluate → register.

    Each stage (``dataset``, ``train``, ``package``, ``evaluate``, ``register``) is one method
    that writes its outputs into a run folder and records itself in ``state.json`` (``done`` and
    ``timings_s``), so ``run(resume=True)`` continues an interrupted run from the first stage not
    done: on the run's own ``dataset.jsonl`` (not on whatever the trace store holds by then),
    training from its last checkpoint. Nothing
    touches the serving student until the gate has passed; a crash leaves it as it was. A file
    lock makes concurrent runs of the same job exit with :class:`JobLockedError`.

    Args:
        config: The job.
        progress: Show progress bars.
        embeddings: LangChain ``Embeddings`` for the knowledge store and the out-of-distribution
            index (default: the bundled all-MiniLM-L6-v2); must be the ones that built the store.
        teacher: A LangChain chat model asked by ``[relabel]`` (``understudy distill run`` builds
            it from the job's ``[teacher]`` table); ``None`` with relabelling on is an error.

    Example:
        >>> job = DistillJob(DistillConfig.from_toml("job.toml"))  # doctest: +SKIP
        >>> result = job.run()  # doctest: +SKIP
        >>> result.status, result.version  # doctest: +SKIP
        ('promoted', 'v3')
    """

    def __init__(
        self,
        config: DistillConfig,
        *,
        progress: bool = True,
        embeddings: Any = None,
        teacher: Any = None,
    ) -> None:
        self.config = config
        self.embeddings = embeddings
        self.teacher = teacher
        self.progress = progress
        self.work_dir = Path(config.work_dir)
        self._train_vectors: Any = None
        self.ranks = ranks_from_env()

    # -- state ----------------------------------------------------------------------------------
    def _lock(self) -> FileLock:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.work_dir / f".{self.config.name}.lock"), timeout=0)

    def _state(self, run_dir: Path) -> dict[str, Any]:
        f = run_dir / "state.json"
        return json.loads(f.read_text()) if f.exists() else {"done": []}

    def _save_state(self, run_dir: Path, state: dict[str, Any]) -> None:
        from langchain_understudy.students.registry import write_json_atomic

        write_json_atomic(run_dir / "state.json", state)

    def _resumable_run(self) -> Path | None:
        runs = sorted(self.work_dir.glob(f"{self.config.name}-*"))
        for run in reversed(runs):
            state = self._state(run)
            if "finished" not in state:
                return run
        return None

    # -- stages ---------------------------------------------------------------------------------
    def _traces(self) -> tuple[list[Any], str, str | None]:
        from langchain_understudy.distill_jobs.traces import TraceStore, snapshot_hash

        store = TraceStore(self.config.traces)
        last = self._last_build_until()
        new = [
            t for t in store.iter_traces(since=last) if last is None or _iso(t.created_at) > last
        ]
        if last is not None and self.config.skip_if_no_new_traces and not new:
            return [], "", last
        selected = new if self.config.dataset == "since_last_build" else list(store.iter_traces())
        excluded = set(self.config.exclude_tags)
        if excluded:
            selected = [t for t in selected if not excluded & set(t.tags or [])]
        until = max((_iso(t.created_at) for t in selected), default=None)
        return selected, snapshot_hash(selected)[:16], until

    def _last_build_until(self) -> str | None:
        from langchain_understudy.students.registry import StudentRegistry

        reg = StudentRegistry(self.config.registry)
        untils = [
            v.provenance.get("traces_until")
            for v in reg.list()
            if v.provenance.get("job") == self.config.name
        ]
        found = [str(u) for u in untils if u]
        return max(found) if found else None

    def _fact_lookup(self) -> FactLookup | None:
        kn = self.config.knowledge
        if kn.path is None:
            return None
        from langchain_understudy.retrieval import KnowledgeStore

        store = KnowledgeStore(kn.path, self.embeddings, create=False)
        oldest = store.stats().oldest_valid_from
        fetch = kn.fetch_count() + 1

        def when(ex: Example) -> datetime | None:
            if kn.as_of == "now" or ex.created_at is None:
                return None
            t = ex.created_at if ex.created_at.tzinfo else ex.created_at.replace(tzinfo=UTC)
            # before the store's first fact nothing was recorded: the oldest facts stand in
            return max(t, oldest) if oldest is not None else t

        def lookup(examples: Sequence[Example]) -> list[list[Fact]]:
            out: list[list[Fact]] = []
            step = 512
            for start in range(0, len(examples), step):
                batch = examples[start : start + step]
                vectors = store.embeddings.embed_documents(
                    [last_user_text(ex.messages) for ex in batch]
                )
                for vec, ex in zip(vectors, batch, strict=True):
                    docs = store.similarity_search_by_vector(vec, k=fetch, as_of=when(ex))
                    # a fact derived from this very trace would leak the answer: skip it
                    docs = [d for d in docs if d.metadata.get("source_key") != ex.key]
                    out.append(
                        select_facts(
                            docs, kn.k, distinct_by=kn.distinct_by, details=kn.fact_details
                        )
                    )
            return out

        return lookup

    def _dataset(
        self, run_dir: Path, traces: list[Any]
    ) -> tuple[list[Example], list[Example], dict[str, int]]:
        pairs = [
            (
                t.messages,
                t.answer,
                {
                    **(t.metadata or {}),
                    "error": getattr(t, "error", None),
                    "created_at": getattr(t, "created_at", None),
                },
            )
            for t in traces
        ]
        examples, dropped = build_examples(
            pairs,
            facts=self._fact_lookup(),
            system=self.config.system,
            max_answer_chars=self.config.max_answer_chars,
        )
        train, held = split_examples(examples, self.config.heldout_fraction)
        if len(train) < self.config.min_examples or not held:
            msg = (
                f"only {len(train)} training and {len(held)} held-out examples after filtering "
                f"(dropped: {dropped}); record more traces or lower min_examples"
            )
            raise ConfigError(msg)
        self._train_vectors = self._embed_queries(train)
        if self.config.exemplars is not None:
            self._attach_exemplars(run_dir, train, held)
        if self.ranks.main:
            _write_examples(run_dir / "train.jsonl", train)
            _write_examples(run_dir / "heldout.jsonl", held)
        return train, held, dropped

    def _embed_queries(self, examples: Sequence[Example]) -> Any:
        """Unit vectors of each example's last user turn (exemplar memory and OOD index)."""
        import numpy as np

        from langchain_understudy.retrieval.embeddings import default_embeddings

        emb = self.embeddings or default_embeddings()
        self.embeddings = emb
        vecs = np.asarray(
            emb.embed_documents([last_user_text(ex.messages) for ex in examples]), dtype=np.float32
        )
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    def _attach_exemplars(
        self, run_dir: Path, train: Sequence[Example], held: Sequence[Example]
    ) -> None:
        """Index the training traces and show each prompt its k most similar past answers."""
        from langchain_understudy.students.exemplars import ExemplarMemory

        cfg = self.config.exemplars
        assert cfg is not None
        memory = ExemplarMemory.build(
            [last_user_text(ex.messages) for ex in train],
            [ex.answer for ex in train],
            [ex.key for ex in train],
            self._train_vectors,
        )
        search = functools.partial(
            memory.search, k=cfg.k, distinct=cfg.distinct_by == "answer", vote_k=cfg.vote_neighbours
        )
        found = search(self._train_vectors, exclude_keys=[ex.key for ex in train])
        if held:
            found += search(self._embed_queries(held))
        for ex, exemplars in zip([*train, *held], found, strict=True):
            ex.exemplars = exemplars
            ex.render(self.config.system)
        if self.ranks.main:
            memory.save(run_dir)

    def _train_settings(self) -> Any:
        from langchain_understudy.distill_jobs.training import LoraSettings, TrainSettings

        s, t = self.config.student, self.config.training
        return TrainSettings(
            epochs=t.epochs,
            max_steps=t.max_steps,
            max_minutes=t.max_minutes,
            learning_rate=t.learning_rate or (1e-4 if s.pretrained and s.lora is None else 1e-3),
            batch_size=t.batch_size,
            save_every=t.save_every,
            save_every_minutes=t.save_every_minutes,
            keep_checkpoints=t.keep_checkpoints or None,
            seed=t.seed,
            threads=t.threads,
            vocab_size=s.vocab_size,
            size=ScratchSize(s.hidden, s.layers, s.heads, s.kv_heads, s.ffn, s.context),
            base_checkpoint=self._base_checkpoint(),
            train_layers=s.train_layers,
            keep_layers=s.keep_layers,
            group_by_length=t.group_by_length,
            lora=LoraSettings(**s.lora.model_dump()) if s.lora is not None else None,
        )

    def run(self, *, resume: bool = False, trigger: Mapping[str, Any] | None = None) -> JobResult:
        """Run the job once (or continue the last interrupted run with ``resume=True``).

        ``trigger`` says why this run happened (for example the drift report that raised the
        alarm, from ``understudy distill schedule --when-drift``); it is recorded in the new
        student's provenance as ``trigger``.

        Raises:
            JobLockedError: another run of this job is in progress.
            ConfigError: too few examples, an invalid configuration, or the ``train`` extra
                (torch, transformers) not installed.
        """
        from langchain_understudy._extras import require

        require("train", "distillation")
        self.ranks = ranks_from_env()
        try:
            return self._run_ranked(resume, trigger)
        finally:
            self.ranks.close()

    def _run_ranked(self, resume: bool, trigger: Mapping[str, Any] | None) -> JobResult:
        if not self.ranks.main:  # rank 0 holds the lock for the whole launch
            return self._run_locked(resume, trigger)
        lock = self._lock()
        try:
            lock.acquire()
        except Timeout as e:
            msg = (
                f"another run of job {self.config.name!r} is in progress (lock "
                f"{lock.lock_file}); this run exits without doing anything"
            )
            raise JobLockedError(msg) from e
        try:
            return self._run_locked(resume, trigger)
        finally:
            lock.release()

    def _relabel(self) -> dict[str, Any] | None:
        cfg = self.config.relabel
        if cfg.mode == "off":
            return None
        if self.teacher is None:
            msg = (
                f"relabel.mode = {cfg.mode!r} needs a teacher: set [teacher] in the job config "
                "(understudy distill run builds it) or pass DistillJob(..., teacher=model)"
            )
            raise ConfigError(msg)
        from tqdm import tqdm

        from langchain_understudy.distill_jobs.relabel import relabel_traces
        from langchain_understudy.distill_jobs.traces import TraceStore

        t = self.config.teacher
        with tqdm(desc="relabel (teacher)", unit="prompt", disable=not self.progress) as bar:
            report = relabel_traces(
                TraceStore(self.config.traces),
                self.teacher,
                mode=cfg.mode,
                max_concurrency=cfg.max_concurrency,
                max_calls=cfg.max_calls,
                max_retries=t.max_retries,
                backoff_s=t.backoff_s,
                max_backoff_s=t.max_backoff_s,
                progress=bar.update,
            )
        logger.info("relabelling: %s", report.summary())
        return report.summary()

    def _run_locked(self, resume: bool, trigger: Mapping[str, Any] | None) -> JobResult:
        started = time.perf_counter()  # the total counts relabelling too
        ranks = self.ranks
        run = self._open_run(resume)
        if run is None:
            return JobResult("skipped", "no new traces since the last build")
        with self._stage(run, "dataset"):
            self._dataset_stage(run)
        with self._stage(run, "train"):
            self._train_stage(run, resume)
        if not ranks.main:
            why = f"rank {ranks.rank} of {ranks.world} trained; rank 0 packages and registers"
            return JobResult("skipped", why, run.dir)
        with self._stage(run, "package"):
            self._package_stage(run)
        with self._stage(run, "evaluate"):
            self._evaluate_stage(run)
        with self._stage(run, "register"):
            result = self._register_stage(run, trigger, started)
        if self.config.training.keep_checkpoints:
            shutil.rmtree(run.dir / "train" / "checkpoints", ignore_errors=True)
        return result

    # -- the run's stages, in order; each records itself in state.json (``done``, ``timings_s``)
    def _open_run(self, resume: bool) -> _Run | None:
        """The run: the last unfinished one with ``resume``, else a new one (``None``: no new traces).

        Rank 0 decides (and relabels, for a new dataset) and the other ranks follow. A resumed
        run whose dataset was built keeps it: no relabelling, and the trace store is not read.
        """
        run: _Run | None = None
        if self.ranks.main:
            run = self._pick_run(resume)
            if run is not None:  # written before the other ranks read it
                self._save_state(run.dir, run.state)
                (run.dir / "config.json").write_text(self.config.model_dump_json(indent=2))
        shared = self.ranks.share(str(run.dir) if run is not None else "")
        if not shared:
            return None
        if run is None:  # another rank: the state rank 0 has written
            run = _Run(Path(shared), self._state(Path(shared)))
        run.timings = run.state.setdefault("timings_s", {})
        return run

    def _pick_run(self, resume: bool) -> _Run | None:
        found = self._resumable_run() if resume else None
        if found is not None:
            state = self._state(found)
            if "dataset" in state["done"] and (found / DATASET_FILE).is_file():
                return _Run(found, state)
            if state["done"]:  # stages done, but no dataset.jsonl: an older version's run
                msg = (
                    f"{found} was started by an older version of the job (no {DATASET_FILE}), "
                    "so it cannot be resumed on the data it trained on; run without --resume"
                )
                raise ConfigError(msg)
        t0 = time.perf_counter()
        relabelled = self._relabel()  # before the traces are read: they include its answers
        relabel_s = time.perf_counter() - t0
        traces, snapshot, until = self._traces()
        if not traces:
            return None
        if found is None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            found = self.work_dir / f"{self.config.name}-{stamp}-{snapshot[:8]}"
            found.mkdir(parents=True)
        run = _Run(found, self._state(found), traces=traces)
        run.state["done"] = []  # no dataset yet: nothing after it ran either
        run.state["timings_s"] = {"relabel": relabel_s} if relabelled is not None else {}
        run.state.update(
            relabel=relabelled,
            snapshot=snapshot,
            traces_until=until,
            n_traces=len(traces),
            teacher_model=_teacher_model(traces),
        )
        return run

    @contextmanager
    def _stage(self, run: _Run, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        if name not in run.state["done"]:
            run.state["done"].append(name)
            run.timings[name] = time.perf_counter() - t  # resumed stages keep their first time
        if self.ranks.main:
            self._save_state(run.dir, run.state)

    def _dataset_stage(self, run: _Run) -> None:
        """Build the examples once and train every rank, and every resume, on that file.

        Rank 0 builds them (facts, exemplars, answer space, OOD index) from the run's traces and
        writes ``dataset.jsonl``; the other ranks wait, then read it.
        """
        ranks = self.ranks
        built = "dataset" not in run.state["done"] and ranks.main
        failure: Exception | None = None
        if built:
            try:
                run.train, run.held, run.state["dropped"] = self._dataset(run.dir, run.traces)
                save_examples(run.dir / DATASET_FILE, {"train": run.train, "heldout": run.held})
                run.space = self._answer_space(run.train)
                run.space.save(run.dir / ANSWER_SPACE_FILE)
                self._ood_index(run.dir, run.train)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, then it is raised
                failure = e
        # rank 0 has written the dataset the others read, or tells them why it could not
        why = ranks.share(f"{type(failure).__name__}: {failure}" if failure else "")
        if failure is not None:
            raise failure
        if why:
            raise ConfigError(f"rank 0 could not build the dataset ({why})")
        if not built:  # another rank, or a resumed run: the dataset as rank 0 wrote it
            splits = load_examples(run.dir / DATASET_FILE)
            run.train, run.held = splits.get("train", []), splits.get("heldout", [])
            run.space = AnswerSpace.load(run.dir / ANSWER_SPACE_FILE)

    def _train_stage(self, run: _Run, resume: bool) -> None:
        from langchain_understudy.distill_jobs.training import TrainResult, plot_loss, train_student

        if "train" in run.state["done"] and (run.dir / "train" / "final").exists():
            run.trained = TrainResult.load(run.dir / "train")  # resumed after training
            return
        run.trained = train_student(
            run.train,
            run.dir / "train",
            self._train_settings(),
            resume=resume,
            progress_bar=self.progress,
        )
        if self.ranks.main:
            plot_loss(
                run.trained.losses,
                run.dir / "loss.png",
                title=f"{self.config.name}: distillation loss",
            )

    def _package_stage(self, run: _Run) -> None:
        """Export the checkpoint to GGUF and quantize it (``state["files"]``: type → file)."""
        done = run.state.get("files") or {}
        if "package" in run.state["done"] and all((run.dir / f).is_file() for f in done.values()):
            run.files = {q: run.dir / f for q, f in done.items()}
            return
        from langchain_understudy.students import export_gguf, quantize_gguf

        pkg = self.config.package
        assert run.trained is not None
        base = export_gguf(
            run.trained.checkpoint_dir,
            run.dir / f"student.{pkg.dtype}.gguf",
            dtype=pkg.dtype,
            provenance=self._provenance_head(run),
        )
        run.files = {pkg.dtype.upper(): base}
        for q in pkg.quant_types:
            if q.upper() != pkg.dtype.upper():
                run.files[q] = quantize_gguf(base, run.dir / f"student.{q}.gguf", q)
        run.state["files"] = {q: p.name for q, p in run.files.items()}

    def _evaluate_stage(self, run: _Run) -> None:
        """Every built type, and the serving student, on the same held-out examples."""
        from langchain_understudy.distill_jobs.evaluation import EvalReport
        from langchain_understudy.students import StudentRegistry

        rows_file = run.dir / "heldout_eval.jsonl"
        if "evaluate" in run.state["done"] and rows_file.is_file():
            summaries = run.state["evaluation"]
            rows = [json.loads(ln) for ln in rows_file.read_text(encoding="utf-8").splitlines()]
            run.reports = {
                q: EvalReport(**s, rows=rows if q == self.config.package.serve else [])
                for q, s in summaries["by_quant"].items()
            }
            run.serving = summaries["serving"]
            return
        run.reports = {
            q: self._evaluate(run.held, f"evaluate {q}", path, run.space)
            for q, path in run.files.items()
        }
        _write_rows(rows_file, run.reports[self.config.package.serve].rows)
        serving = StudentRegistry(self.config.registry).current()
        run.serving = None
        if serving is not None:
            try:
                desc = f"evaluate serving {serving.version}"
                run.serving = self._evaluate(run.held, desc, serving).summary()
            except UnderstudyError as e:  # a broken serving student must not block a fix
                logger.warning("could not evaluate serving student %s: %s", serving.version, e)
        run.state["evaluation"] = {
            "by_quant": {q: r.summary() for q, r in run.reports.items()},
            "serving": run.serving,
        }

    def _evaluate(
        self, held: Sequence[Example], desc: str, source: Any, space: AnswerSpace | None = None
    ) -> Any:
        """Evaluate ``source`` (a GGUF path, or a registered ``StudentVersion``) as it is served.

        A path answers in ``space``; a version in its own registered answer space. Held-out
        examples carry their own exemplars, so a version's exemplar memory is not loaded.
        """
        from langchain_understudy.distill_jobs.evaluation import evaluate_student
        from langchain_understudy.students import ChatStudent

        options = self._eval_options(held)
        student = (
            ChatStudent(model_path=source, answer_space=space, **options)
            if isinstance(source, Path)
            else ChatStudent.from_version(source, exemplars=None, **options)
        )
        return evaluate_student(student, held, progress=self.progress, desc=desc)

    def _provenance_head(self, run: _Run) -> dict[str, Any]:
        s = run.state
        return {
            "job": self.config.name,
            "teacher_model": s["teacher_model"],
            "trace_snapshot": s["snapshot"],
        }

    def _register_stage(
        self, run: _Run, trigger: Mapping[str, Any] | None, started: float
    ) -> JobResult:
        """Gate the candidate, register it with its artifacts, and promote it if it passed."""
        from langchain_understudy.students import StudentRegistry

        assert run.trained is not None and run.space is not None
        serve_key, space, result, state = (
            self.config.package.serve,
            run.space,
            run.trained,
            run.state,
        )
        candidate = run.reports[serve_key]
        passed, reason = self._gate(candidate.summary(), run.serving)
        ood = run.dir / "ood_index.npy"
        reference = self._signal_reference(run.dir, run.held, candidate.rows, ood)
        metrics = {
            **candidate.summary(),
            "by_quant": {name: r.summary() for name, r in run.reports.items()},
            "n_train": result.n_train,
            "train_steps": result.steps,
            "train_seconds": result.seconds,
            "final_loss": result.final_loss,
            "n_params": result.n_params,
            "n_trainable": result.n_trainable,
            "world_size": result.world_size,
            "dropped": state.get("dropped", {}),
            "relabel": state.get("relabel"),
            "answer_space": {"kind": space.kind, "n_labels": len(space.labels), **space.stats},
            "gate": {"passed": passed, "reason": reason},
        }
        provenance = {
            **self._provenance_head(run),
            "traces_until": state["traces_until"],
            "n_traces": state["n_traces"],
            "n_heldout": len(run.held),
            "base_checkpoint": str(self.config.student.base_checkpoint)
            if self.config.student.base_checkpoint
            else None,
            "quant": serve_key,
            "run_dir": str(run.dir),
            "config": json.loads(self.config.model_dump_json()),
            "system": self.config.system,
            "n_ctx": self._n_ctx(),
            "facts": (
                self.config.knowledge.model_dump(
                    include={"k", "distinct_by", "fetch_k", "fact_details"}
                )
                if self.config.knowledge.path is not None
                else None
            ),
            "exemplars": (
                {**self.config.exemplars.model_dump(), "n": len(run.train)}
                if self.config.exemplars is not None
                else None
            ),
            "base": self.config.student.base,
            # the tools the student learnt to call (the router's tools_unseen signal reads it)
            "tools": sorted({t["name"] for ex in run.train for t in ex.tools or ()}),
            "trigger": dict(trigger) if trigger is not None else None,
        }
        timings = {**run.timings, "total": time.perf_counter() - started}
        report = {
            "metrics": metrics,
            "answer_space": space.to_dict(),
            "provenance": provenance,
            "serving": run.serving,
            "timings_s": timings,
        }
        (run.dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        registry = StudentRegistry(self.config.registry)
        version = state.get("version")  # a resumed run that had registered before it stopped
        if version is not None and version not in {v.version for v in registry.list()}:
            version = None
        if version is None:
            version = self._register(registry, run, provenance, metrics, reference, ood)
            state["version"] = version
            self._save_state(run.dir, state)
        status: Literal["promoted", "registered", "rejected"]
        if passed and self.config.gate.promote:
            registry.promote(version)
            status = "promoted"
        else:
            status = "rejected" if not passed else "registered"
        state["finished"] = status
        return JobResult(status, reason, run.dir, version, metrics, run.serving, timings)

    def _register(
        self,
        registry: Any,
        run: _Run,
        provenance: dict[str, Any],
        metrics: dict[str, Any],
        reference: Path,
        ood: Path,
    ) -> str:
        version: str = registry.register(
            run.files[self.config.package.serve],
            provenance,
            metrics,
            extra_files={
                **(
                    {name: run.dir / name for name in EXEMPLAR_FILES}
                    if self.config.exemplars is not None
                    else {}
                ),
                ANSWER_SPACE_FILE: run.dir / ANSWER_SPACE_FILE,
                "ood_index.npy": ood,
                SIGNAL_REFERENCE_FILE: reference,
                "loss.png": run.dir / "loss.png",
                "report.json": run.dir / "report.json",
                "heldout_eval.jsonl": run.dir / "heldout_eval.jsonl",
            },
        )
        return version

    def _eval_options(self, held: Sequence[Example]) -> dict[str, Any]:
        """``ChatStudent`` options for evaluating on the held-out set, as it will be served."""
        return {
            "n_ctx": self._n_ctx(),
            "n_threads": self.config.package.eval_threads or self.config.training.threads,
            "max_tokens": self._max_answer_tokens(held),
            "system_prompt": self.config.system,
            "json_schema": self.config.json_schema,
        }

    def _answer_space(self, train: Sequence[Example]) -> AnswerSpace:
        """The answer space registered with the student (``[package] answer_schema``)."""
        setting = self.config.package.answer_schema
        if self.config.json_schema is not None:
            return AnswerSpace("json", schema=self.config.json_schema, stats={"source": "job"})
        if setting == "off":
            return AnswerSpace("free", stats={"source": "off"})
        if setting == "infer":
            return infer_answer_space([ex.answer for ex in train])
        try:
            schema = json.loads(Path(setting).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            msg = f"package.answer_schema {setting} is not a readable JSON schema file: {e}"
            raise ConfigError(msg) from e
        return AnswerSpace("json", schema=schema, stats={"source": setting})

    def _base_checkpoint(self) -> str | None:
        """The checkpoint folder to fine-tune (a GGUF base is dequantized once and cached)."""
        s = self.config.student
        if s.base is not None:
            from langchain_understudy.distill_jobs.bases import resolve_base

            return str(resolve_base(s.base))
        return str(s.base_checkpoint) if s.base_checkpoint else None

    def _n_ctx(self) -> int:
        return 2048 if self.config.student.pretrained else self.config.student.context

    @staticmethod
    def _max_answer_tokens(held: Sequence[Example]) -> int:
        longest = max((len(ex.answer) for ex in held), default=64)
        return int(min(1024, max(32, longest)))  # ≥1 char per token for byte-level BPE

    def _gate(self, cand: dict[str, Any], serving: dict[str, Any] | None) -> tuple[bool, str]:
        g = self.config.gate
        em = cand["exact_match"]
        if em < g.min_exact_match:
            return False, f"exact match {em:.3f} below the floor {g.min_exact_match:.3f}"
        if g.max_latency_p95_ms and cand["latency_ms_p95"] > g.max_latency_p95_ms:
            return (
                False,
                f"p95 latency {cand['latency_ms_p95']:.1f} ms above {g.max_latency_p95_ms} ms",
            )
        if serving is not None and em < serving["exact_match"] + g.min_improvement:
            return False, (
                f"exact match {em:.3f} does not beat the serving student's "
                f"{serving['exact_match']:.3f} by {g.min_improvement:.3f}"
            )
        vs = f" (serving: {serving['exact_match']:.3f})" if serving else " (nothing served yet)"
        return True, f"exact match {em:.3f}{vs}"

    def _signal_reference(
        self,
        run_dir: Path,
        held: Sequence[Example],
        rows: Sequence[dict[str, Any]],
        ood: Path,
    ) -> Path:
        """The held-out distribution of the routing signals the drift watch compares with.

        ``ood_distance``: cosine distance from each held-out query to its nearest training
        prompt (the index registered with the student); ``student_confidence`` and
        ``answer_entropy``: the candidate's confidence and mean next-token entropy on each
        held-out answer; ``retrieval_similarity`` (with a ``[knowledge]``
        store): the relevance of the best fact the store finds for each held-out query, asked
        the way a served request asks it.
        """
        import numpy as np

        vecs = np.load(ood, allow_pickle=False)
        held_vecs = self._embed_queries(held) if held else np.zeros((0, 1), np.float32)
        distances: list[float] = []
        if len(vecs) and len(held_vecs):
            sims = np.asarray(held_vecs) @ np.asarray(vecs).T
            distances = [float(1.0 - s) for s in sims.max(axis=1)]
        confidence = [float(r["confidence"]) for r in rows if r.get("confidence") is not None]
        entropy = [float(r["answer_entropy"]) for r in rows if r.get("answer_entropy") is not None]
        out = run_dir / SIGNAL_REFERENCE_FILE
        signals = {
            "ood_distance": distances,
            "student_confidence": confidence,
            "answer_entropy": entropy,
        }
        if self.config.knowledge.path is not None and held:
            signals["retrieval_similarity"] = self._retrieval_similarity(held)
        out.write_text(json.dumps({"format": 1, "signals": signals}), encoding="utf-8")
        return out

    def _retrieval_similarity(self, held: Sequence[Example]) -> list[float]:
        from langchain_understudy.retrieval import KnowledgeStore

        path = self.config.knowledge.path
        assert path is not None  # called only with a [knowledge] store
        store = KnowledgeStore(path, self.embeddings, create=False)
        return [
            max(
                (float(s) for _, s in store.similarity_search_with_relevance_scores(q, k=1)),
                default=0.0,
            )
            for q in (last_user_text(ex.messages) for ex in held)
        ]

    def _ood_index(self, run_dir: Path, train: Sequence[Example]) -> Path:
        import numpy as np

        vecs = self._train_vectors
        if vecs is None or len(vecs) != len(train):
            vecs = self._embed_queries(train)
        out = run_dir / "ood_index.npy"
        np.save(out, vecs, allow_pickle=False)
        return out


def _teacher_model(traces: Sequence[Any]) -> str:
    """The model that gave most of the answers trained on (prompts awaiting one do not count)."""
    names = Counter(str(t.model or "unknown") for t in traces if t.has_answer)
    return names.most_common(1)[0][0] if names else "unknown"


def _write_examples(path: Path, examples: Sequence[Example]) -> None:
    from langchain_understudy.prompting import message_text

    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            msgs = [
                {
                    "role": {"human": "user", "ai": "assistant"}.get(m.type, m.type),
                    "content": message_text(m),
                }
                for m in ex.messages
            ]
            msgs.append({"role": "assistant", "content": ex.answer})
            meta = {**ex.metadata, "key": ex.key, "facts": [asdict(fct) for fct in ex.facts]}
            meta.pop("error", None)
            f.write(
                json.dumps({"messages": msgs, "metadata": meta}, ensure_ascii=False, default=str)
                + "\n"
            )


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
