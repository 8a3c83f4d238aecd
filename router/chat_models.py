"""``ChatUnderstudy``: a chat model that lets the student answer what it can and escalates the rest.

One request goes through these steps:

1. The current student is resolved (a registry is re-read every few seconds, so a promotion is
   picked up without a restart), facts are retrieved from the knowledge store for the last user
   turn, and the privacy policy says whether the conversation may leave the machine at all.
2. ``pre``/``auto``: the router scores the conversation before generation and may escalate.
3. The student answers with the retrieved facts in its prompt.
4. ``cascade``/``auto``: the router looks at the student's answer (its confidence) and may escalate.
5. Escalation goes through :class:`~langchain_understudy.router.teachers.ResilientTeacher`; when the
   teacher is down, over budget, absent or forbidden for this conversation, the student's answer is
   returned and the metadata says that the escalation was blocked, and why.

Steps 2-5 are one I/O-free flow (:mod:`langchain_understudy.router._flow`); ``invoke``,
``ainvoke``, ``stream`` and ``astream`` only carry out its steps. Every answer carries
``response_metadata["understudy"]`` (who answered, why, the score and threshold, versions,
latency, signals) and every decision is appended to the audit log. With a
:class:`~langchain_understudy.router.policy.TeacherRateController` the threshold is steered online
so the teacher-call rate holds its target.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from langchain_understudy.config import FactSelection, RolloutSettings
from langchain_understudy.errors import (
    ArtifactError,
    ConfigError,
    StudentError,
    TeacherUnavailableError,
)
from langchain_understudy.prompting import Fact, message_text, select_facts, tool_specs
from langchain_understudy.router._flow import (
    AskTeacher,
    Done,
    FlowRequest,
    RoutingFlow,
    RunStudent,
    Score,
    Step,
    merge_signals,
)
from langchain_understudy.router.policy import (
    Decision,
    RoutedExample,
    Router,
    SignalReading,
    TeacherRateController,
)
from langchain_understudy.router.rollout import LiveRollout
from langchain_understudy.router.signals import OODIndex, RoutingContext
from langchain_understudy.router.teachers import PrivacyPolicy, ResilientTeacher, model_name_of

if TYPE_CHECKING:
    from langchain_core.documents import Document

    from langchain_understudy.config import UnderstudyConfig

__all__ = ["ChatUnderstudy", "Inspection"]

logger = logging.getLogger(__name__)

_TAGS_KW = "_understudy_run_tags"

_NO_OOD = (
    "the student has no out-of-distribution index (ood_index.npy); the distillation job "
    "registers one with every student"
)


@dataclass
class _Active:
    """The student in service and what came with it."""

    model: BaseChatModel
    version: str | None
    ood: OODIndex | None
    ood_absent: str
    facts: dict[str, Any] | None = None  # the fact selection the student was trained with
    tools: frozenset[str] | None = None  # the tools the student was trained to call


class _StudentSource:
    """Resolves the student for each request; a registry is polled for promotions."""

    def __init__(
        self,
        student: Any,
        *,
        student_kwargs: dict[str, Any],
        ood_index: Any,
        check_every_s: float,
        embeddings: Callable[[], Any],
    ) -> None:
        self._student = student
        self._kwargs = student_kwargs
        self._embeddings = embeddings
        self._ood_arg = ood_index
        self._every = check_every_s
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._checked = -math.inf
        self._versions: dict[str, _Active] = {}
        self._versions_lock = threading.Lock()
        self.is_registry = hasattr(student, "current_version") and hasattr(student, "current")

    def get(self) -> _Active:
        now = time.monotonic()
        if self._active is not None and (not self.is_registry or now - self._checked < self._every):
            return self._active
        with self._lock:
            if self._active is None or (self.is_registry and now - self._checked >= self._every):
                self._active = self._resolve(self._active)
                self._checked = now
            return self._active

    def _explicit_ood(self) -> tuple[OODIndex | None, str]:
        arg = self._ood_arg
        if isinstance(arg, OODIndex):
            return arg, ""
        if arg is not None:
            return OODIndex.load(arg), ""
        return None, _NO_OOD

    def _resolve(self, current: _Active | None) -> _Active:
        if not self.is_registry:
            model = self._student
            if self._ood_arg is not None:
                ood, why = self._explicit_ood()
            else:
                ood, why = None, _NO_OOD
                path = getattr(model, "model_path", None)
                if path is not None and (Path(path).parent / "ood_index.npy").is_file():
                    ood = OODIndex.load(Path(path).parent / "ood_index.npy")
            return _Active(model, getattr(model, "student_version", None), ood, why)
        reg = self._student
        version = reg.current_version()
        if version is None:
            msg = f"no student is promoted in {reg.root}; run `understudy students promote V`"
            raise ArtifactError(msg)
        if current is not None and current.version == version:
            return current
        active = self.version(version)
        if current is not None:
            logger.info("student promoted: now serving %s (was %s)", version, current.version)
        return active

    def version(self, version: str) -> _Active:
        """A registry version ready to serve (loaded once; the shadow and canary use this too)."""
        with self._versions_lock:
            if version in self._versions:
                return self._versions[version]
        active = self._load(version)
        with self._versions_lock:
            self._versions[version] = active
            while len(self._versions) > 3:  # the served student, a shadow, a canary
                self._versions.pop(next(iter(self._versions)))
            return active

    def _load(self, version: str) -> _Active:
        from langchain_understudy.students import ChatStudent

        v = self._student.get(version)
        # a student distilled with exemplar memory retrieves past answers with our embeddings
        model = ChatStudent.from_version(v, embeddings=self._embeddings, **self._kwargs)
        if self._ood_arg is not None:
            ood, why = self._explicit_ood()
        elif "ood_index.npy" in v.files:
            ood, why = OODIndex.load(v.artifact("ood_index.npy")), ""
        else:
            ood, why = None, f"student {v.version} was registered without ood_index.npy"
        facts = v.provenance.get("facts")
        tools = v.provenance.get("tools")
        return _Active(
            model,
            v.version,
            ood,
            why,
            facts if isinstance(facts, dict) else None,
            frozenset(str(t) for t in tools) if isinstance(tools, list) else None,
        )


@dataclass
class _Request:
    """One request: the student that serves it and its routing flow."""

    active: _Active
    flow: RoutingFlow
    canary: str | None = None  # the canary version serving this conversation

    @property
    def ctx(self) -> RoutingContext:
        return self.flow.request.ctx


@dataclass(frozen=True)
class Inspection:
    """Every signal and the student's answer for one conversation, without calling the teacher.

    Attributes:
        signals: Raw values by signal name; ``None`` for absent signals.
        absent: Why absent signals did not apply.
        failed: Why failing signals failed.
        answer: The student's answer (``None`` when not generated).
        pre: The decision the router would make before generation.
        post: The decision after generation (``None`` when not generated).
        overhead_ms: Router overhead (signals, rules, scoring of both stages), embedding included.
        embedding_ms: The embedding part of ``overhead_ms``.
        retrieval_ms: Time of the knowledge-store query (shared with the student's prompt, so not
            router overhead).
    """

    signals: dict[str, float | None]
    absent: dict[str, str]
    failed: dict[str, str]
    answer: AIMessage | None
    pre: Decision
    post: Decision | None
    overhead_ms: float
    embedding_ms: float
    retrieval_ms: float

    def to_example(self, student_correct: float, *, out_of_scope: bool = False) -> RoutedExample:
        """A :class:`~langchain_understudy.router.policy.RoutedExample` for fitting/evaluation."""
        return RoutedExample(
            signals=dict(self.signals),
            student_correct=float(student_correct),
            out_of_scope=out_of_scope,
            failed=tuple(self.failed),
            overhead_ms=self.overhead_ms,
            embedding_ms=self.embedding_ms,
        )


def _chunk_of(message: AIMessage) -> AIMessageChunk:
    calls = [
        {
            "index": i,
            "id": c.get("id"),
            "name": c["name"],
            "args": json.dumps(c["args"], ensure_ascii=False),
            "type": "tool_call_chunk",
        }
        for i, c in enumerate(message.tool_calls)
    ]
    return AIMessageChunk(
        content=message.content,
        tool_call_chunks=calls,  # type: ignore[arg-type]
        additional_kwargs=dict(message.additional_kwargs),
        response_metadata=dict(message.response_metadata),
        usage_metadata=message.usage_metadata,
        id=message.id,
        chunk_position="last",
    )


class ChatUnderstudy(BaseChatModel):
    """A routed chat model: the local student answers routine requests, the teacher the hard ones.

    Args:
        student: A :class:`~langchain_understudy.students.ChatStudent`, any chat model, or a
            :class:`~langchain_understudy.students.StudentRegistry` (its promoted version is
            served and promotions are picked up within ``reload_check_s`` seconds).
        teacher: Any LangChain chat model (wrapped in a
            :class:`~langchain_understudy.router.teachers.ResilientTeacher` with default limits),
            a ``ResilientTeacher``, or ``None`` (student only; escalations are reported blocked).
        knowledge: A LangChain ``VectorStore`` (queried with
            ``similarity_search_with_relevance_scores``) or ``BaseRetriever`` whose facts are put in
            the student's prompt.
        router: The routing policy (default: ``Router()``).
        mode: ``"pre"``, ``"cascade"`` or ``"auto"``.
        rate_controller: A :class:`~langchain_understudy.router.policy.TeacherRateController`
            that steers the threshold online so the teacher-call rate holds its target.

    Every answer carries ``response_metadata["understudy"]``, a dict with these keys:

    * ``answered_by``: ``"student"`` or ``"teacher"``;
    * ``reason``: why the router decided as it did (the deciding signal, rule or failing
      signal), or ``"student failed: ..."``;
    * ``score``, ``threshold``, ``stage``, ``deciding_signals``, ``rule``: the last decision (its
      escalation score, the threshold it was compared with, ``"pre"``/``"post"``/``"cascade"``,
      the signals that set the score, the *always* rule that matched); ``mode``;
    * ``escalation_blocked``: a bool, ``True`` when the router wanted the teacher but the student
      answered; ``blocked_reason``: why (privacy, no teacher, a *never* rule, circuit open,
      budget spent, teacher failing), else ``None``;
    * ``student_draft_discarded``: ``True`` when the teacher's answer replaced the student's;
    * ``student_version``, ``student_model``, ``teacher_model`` (``None`` without a teacher);
    * ``latency_ms``, ``router_overhead_ms``, ``retrieval_ms``; ``facts``: keys of the facts shown;
    * ``signals`` (raw values), ``absent`` and ``failed`` (signal name → why);
    * ``answer_entropy``: the mean entropy of the student's next-token distributions over its
      answer (``None`` when the student did not answer), which the drift watch follows.

    Streaming: in ``pre`` mode the student's tokens stream as they are generated. In ``cascade`` and
    ``auto`` mode the student's answer must be complete before the router can judge it, so it
    arrives as one chunk (unless escalation is impossible anyway). Teacher answers always arrive as
    one chunk, so that a teacher failing mid-answer can still fall back to the student.

    Example:
        >>> from langchain_core.language_models.fake_chat_models import FakeListChatModel
        >>> from langchain_understudy.students import ChatStudent
        >>> llm = ChatUnderstudy(  # doctest: +SKIP
        ...     student=ChatStudent(model_path="student.Q8_0.gguf"),
        ...     teacher=FakeListChatModel(responses=["I am the teacher."]),
        ... )
        >>> msg = llm.invoke("What does the Pro plan cost?")  # doctest: +SKIP
        >>> msg.response_metadata["understudy"]["answered_by"]  # doctest: +SKIP
        'student'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    student: Any
    """A ``ChatStudent`` (or any chat model) or a ``StudentRegistry``."""
    teacher: Any = None
    """A chat model, a ``ResilientTeacher``, or ``None``."""
    knowledge: Any = None
    """A LangChain ``VectorStore`` or ``BaseRetriever``; ``None`` disables retrieval."""
    router: Router | None = None
    """The routing policy; ``None`` uses ``Router()``."""
    mode: Literal["pre", "cascade", "auto"] = "auto"
    """``pre`` decides before generating, ``cascade`` after, ``auto`` both."""
    k: int = Field(default=4, ge=1, le=100)
    """Facts retrieved per request."""
    min_relevance: float = Field(default=0.0, ge=0.0, le=1.0)
    """Facts below this relevance are not shown to the student."""
    distinct_by: str | None = None
    """Keep only the most relevant fact per value of this metadata key (as the student was
    trained; see :class:`~langchain_understudy.config.FactSelection`)."""
    fetch_k: int | None = Field(default=None, ge=1)
    """Documents fetched before ``distinct_by`` picks ``k`` (``None``: ``10 * k`` with it)."""
    fact_details: bool = True
    """Show each fact's key and date in the student's prompt."""
    ood_index: Any = None
    """An ``OODIndex`` or a path to ``ood_index.npy``; ``None`` uses the student's own."""
    embeddings: Any = None
    """LangChain ``Embeddings`` for the out-of-distribution signal; ``None`` uses the bundled
    all-MiniLM-L6-v2 when the student has an index."""
    privacy: PrivacyPolicy | None = None
    """Which conversations never leave the machine; ``None`` uses ``PrivacyPolicy()``."""
    audit_log: Path | None = None
    """JSONL file every routing decision is appended to (no message text is written)."""
    trace_callbacks: list[BaseCallbackHandler] | None = None
    """Callbacks attached to teacher calls only (e.g. a ``TraceRecorder`` for the next
    distillation run)."""
    student_kwargs: dict[str, Any] = Field(default_factory=dict)
    """``ChatStudent`` options used when the student comes from a registry."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Cap on generated tokens, passed to the student and the teacher."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature passed to the student (``None``: the student's own)."""
    stop: list[str] | None = None
    """Stop sequences."""
    reload_check_s: float = Field(default=2.0, ge=0.0)
    """How often a registry is checked for a newly promoted student."""
    model_name: str = Field(default="understudy", alias="model")
    """Name reported to tracing."""
    rate_controller: TeacherRateController | None = None
    """Steers the threshold online so the teacher-call rate holds its target (``None``: the
    router's threshold stays as calibrated)."""
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    """How shadow and canary candidates are checked and decided, and the drift watch (a registry
    student only; which versions run is registry state: ``understudy students shadow/canary``)."""

    _source: _StudentSource = PrivateAttr()
    _guard: ResilientTeacher | None = PrivateAttr(default=None)
    _router: Router = PrivateAttr()
    _privacy: PrivacyPolicy = PrivateAttr()
    _audit_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _embed_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _embedder: Any = PrivateAttr(default=None)
    _rollout: LiveRollout | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _setup(self) -> ChatUnderstudy:
        if self.student is None:
            msg = "ChatUnderstudy needs a student: a ChatStudent, a chat model or a StudentRegistry"
            raise ConfigError(msg)
        is_registry = hasattr(self.student, "current_version")
        if not is_registry and not isinstance(self.student, BaseChatModel):
            msg = (
                f"student must be a ChatStudent, a chat model or a StudentRegistry, got "
                f"{type(self.student).__name__}"
            )
            raise ConfigError(msg)
        self._source = _StudentSource(
            self.student,
            student_kwargs=dict(self.student_kwargs),
            ood_index=self.ood_index,
            check_every_s=self.reload_check_s,
            embeddings=self._embedder_model,
        )
        if isinstance(self.teacher, ResilientTeacher):
            self._guard = self.teacher
        elif isinstance(self.teacher, BaseChatModel):
            self._guard = ResilientTeacher(self.teacher)
        elif self.teacher is not None:
            msg = (
                f"teacher must be a LangChain chat model, a ResilientTeacher or None, got "
                f"{type(self.teacher).__name__}"
            )
            raise ConfigError(msg)
        self._router = self.router if self.router is not None else Router()
        self._privacy = self.privacy if self.privacy is not None else PrivacyPolicy()
        if is_registry:
            self._rollout = LiveRollout(
                self.student,
                self.rollout,
                check_every_s=self.reload_check_s,
                on_event=self._audit,
            )
        return self

    @classmethod
    def from_config(
        cls,
        config: UnderstudyConfig,
        *,
        knowledge: Any = None,
        teacher: Any = None,
        **kwargs: Any,
    ) -> ChatUnderstudy:
        """Build from an :class:`~langchain_understudy.config.UnderstudyConfig`.

        The student comes from ``student.model_path`` or else the registry; the teacher from
        ``teacher`` settings (unless one is passed); router, privacy and audit log from ``router``.
        The knowledge store is not opened here: pass it as ``knowledge``.
        """
        s = config.student
        opts: dict[str, Any] = s.chat_student_kwargs()
        student: Any
        if s.model_path is not None:
            from langchain_understudy.students import ChatStudent

            student = ChatStudent(model_path=s.model_path, **opts)
        else:
            from langchain_understudy.students import StudentRegistry

            student = StudentRegistry(s.registry)
        r = config.router
        params: dict[str, Any] = {
            "student": student,
            "student_kwargs": opts,
            "teacher": teacher
            if teacher is not None
            else ResilientTeacher.from_settings(config.teacher),
            "knowledge": knowledge,
            "router": Router.from_settings(r),
            "mode": r.mode,
            "privacy": PrivacyPolicy.from_settings(r),
            "audit_log": r.audit_log,
            "min_relevance": config.knowledge.min_relevance,
            "rollout": config.rollout,
        }
        target = getattr(r, "target_teacher_rate", None)
        if target is not None:
            params["rate_controller"] = TeacherRateController(
                target, window=getattr(r, "rate_window", 500)
            )
        # fact selection: what the config sets, else what the served student was trained with
        kn = config.knowledge
        for name in ("k", "distinct_by", "fetch_k", "fact_details"):
            if name in kn.model_fields_set:
                params[name] = getattr(kn, name)
        params.update(kwargs)
        return cls(**params)

    # -- LangChain plumbing -----------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "understudy"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "mode": self.mode,
            "threshold": self.current_threshold(),
            "router": self._router.kind,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "understudy"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    @property
    def active_router(self) -> Router:
        """The routing policy in use."""
        return self._router

    @property
    def resilient_teacher(self) -> ResilientTeacher | None:
        """The guarded teacher, or ``None``."""
        return self._guard

    @property
    def live_rollout(self) -> LiveRollout | None:
        """The shadow, canary and drift watch of a registry student (``None`` otherwise)."""
        return self._rollout

    def current_student(self) -> BaseChatModel:
        """The student in service now (following registry promotions)."""
        return self._source.get().model

    # -- run tags ---------------------------------------------------------------------------------------
    def _config_tags(self, config: RunnableConfig | None) -> list[str]:
        cfg = ensure_config(config)
        manager = CallbackManager.configure(
            cfg.get("callbacks"), None, False, cfg.get("tags"), self.tags
        )
        return list(manager.tags)

    @staticmethod
    def _run_tags(run_manager: Any, kwargs: dict[str, Any]) -> tuple[list[str], str | None]:
        tags = list(kwargs.pop(_TAGS_KW, None) or [])
        run_id = None
        if run_manager is not None:
            tags += [t for t in run_manager.tags if t not in tags]
            run_id = str(run_manager.run_id)
        return tags, run_id

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """Stream the answer (see the class docstring for what streams live)."""
        # BaseChatModel.stream does not hand the run's tags to _stream; privacy rules need them.
        kwargs[_TAGS_KW] = self._config_tags(config)
        yield from super().stream(input, config, stop=stop, **kwargs)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """Async :meth:`stream`."""
        kwargs[_TAGS_KW] = self._config_tags(config)
        async for chunk in super().astream(input, config, stop=stop, **kwargs):
            yield chunk

    # -- request preparation ----------------------------------------------------------------------
    def _embedder_model(self) -> Any:
        """The embeddings (``embeddings`` or the bundled MiniLM), loaded once on first use."""
        with self._embed_lock:
            if self._embedder is None:
                if self.embeddings is not None:
                    self._embedder = self.embeddings
                else:
                    from langchain_understudy.retrieval.embeddings import default_embeddings

                    self._embedder = default_embeddings()
            return self._embedder

    def _embed_fn(self) -> Callable[[str], Sequence[float]]:
        fn: Callable[[str], Sequence[float]] = self._embedder_model().embed_query
        return fn

    def fact_selection(self, trained: dict[str, Any] | None = None) -> FactSelection:
        """How facts are chosen for the student's prompt.

        Fields set on this model win; the rest follow ``trained`` (the selection the served
        student was trained with, from its registry entry), then the defaults.
        """
        fields = ("k", "distinct_by", "fetch_k", "fact_details")
        values = {f: v for f, v in (trained or {}).items() if f in fields}
        values.update({f: getattr(self, f) for f in fields if f in self.model_fields_set})
        return FactSelection(**values)

    def _retrieve(
        self, query: str, trained: dict[str, Any] | None = None
    ) -> tuple[list[tuple[Document, float]] | None, list[Fact], str | None, str | None]:
        """Return (scored docs or None, facts for the student, error, absent reason)."""
        kn = self.knowledge
        if kn is None:
            return None, [], None, "no knowledge store configured"
        if not query:
            return [], [], None, None
        sel = self.fact_selection(trained)

        def pick(docs: Sequence[Document]) -> list[Fact]:
            return select_facts(docs, sel.k, distinct_by=sel.distinct_by, details=sel.fact_details)

        try:
            if hasattr(kn, "similarity_search_with_relevance_scores"):
                pairs = [
                    (d, float(s))
                    for d, s in kn.similarity_search_with_relevance_scores(
                        query, k=sel.fetch_count()
                    )
                ]
            else:
                docs = kn.invoke(query)
                scores = [d.metadata.get("relevance_score", d.metadata.get("score")) for d in docs]
                if all(s is None for s in scores):
                    return None, pick(docs), None, "the retriever gives no relevance scores"
                pairs = [
                    (d, float(s) if s is not None else 0.0)
                    for d, s in zip(docs, scores, strict=True)
                ][: sel.fetch_count()]
        except Exception as e:  # noqa: BLE001 - a failing store escalates through its signal
            logger.warning("knowledge store query failed: %s", e)
            return None, [], f"{type(e).__name__}: {e}", None
        facts = pick([d for d, s in pairs if s >= self.min_relevance])
        return pairs, facts, None, None

    def _begin(
        self,
        messages: list[BaseMessage],
        tags: Sequence[str],
        run_id: str | None,
        stream: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> _Request:
        t0 = time.perf_counter()
        active = self._source.get()
        canary = self._rollout.cohort(messages, tags) if self._rollout is not None else None
        if canary is not None:
            try:
                active = self._source.version(canary)
            except ArtifactError as e:  # a broken candidate must not take requests down
                logger.error("canary %s cannot serve: %s", canary, e)
                canary = None
        last_user = ""
        for m in reversed(messages):
            if m.type == "human":
                last_user = message_text(m)
                break
        tr = time.perf_counter()
        retrieved, facts, error, no_store = self._retrieve(last_user, active.facts)
        retrieval_ms = (time.perf_counter() - tr) * 1000.0
        absent = {"ood_distance": active.ood_absent}
        if active.tools is None:
            absent["tools_unseen"] = "the student's provenance does not list the tools it learnt"
        if no_store:
            absent["retrieval_similarity"] = no_store
        model = active.model
        n_ctx = getattr(model, "n_ctx", None)
        ctx = RoutingContext(
            messages=messages,
            retrieved=retrieved,
            facts_shown=facts,
            retrieval_error=error,
            n_ctx=n_ctx if isinstance(n_ctx, int) else None,
            count_tokens=getattr(model, "count_tokens", None),
            ood_index=active.ood,
            embed_query=self._embed_fn() if active.ood is not None else None,
            tags=tuple(tags),
            absent_reasons=absent,
            bound_tools=tuple(t["name"] for t in tool_specs(tools)) if tools else (),
            trained_tools=active.tools,
        )
        guard = self._guard
        request = FlowRequest(
            messages=messages,
            ctx=ctx,
            mode=self.mode,
            threshold=self.current_threshold(),
            facts=facts,
            forbidden=self._privacy.check(messages, tags),
            has_teacher=guard is not None,
            stream=stream,
            teacher_refusal=guard.blocked_reason() if stream and guard is not None else None,
            student_version=active.version,
            student_model=model_name_of(model),
            teacher_model=guard.model_name if guard is not None else None,
            tags=list(tags),
            run_id=run_id,
            retrieval_ms=retrieval_ms,
            started=t0,
        )
        return _Request(active, RoutingFlow(request), canary)

    def _start(
        self, messages: list[BaseMessage], run_manager: Any, kwargs: dict[str, Any], stream: bool
    ) -> _Request:
        tags, run_id = self._run_tags(run_manager, kwargs)
        return self._begin(messages, tags, run_id, stream, kwargs.get("tools"))

    def current_threshold(self) -> float:
        """The threshold the next request is routed with (steered by ``rate_controller``)."""
        steered = self.rate_controller.threshold if self.rate_controller is not None else None
        return self._router.threshold if steered is None else steered

    def _student_kwargs(
        self, stop: list[str] | None, kwargs: dict[str, Any], facts: Sequence[Fact]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v for k, v in kwargs.items() if k not in {"model", "tags", "callbacks", _TAGS_KW}
        }
        if facts:
            out["facts"] = list(facts)
        if self.max_tokens is not None:
            out.setdefault("max_tokens", self.max_tokens)
        if self.temperature is not None:
            out.setdefault("temperature", self.temperature)
        stops = [*(self.stop or []), *(stop or [])]
        if stops:
            out["stop"] = stops
        return out

    def _teacher_kwargs(
        self, stop: list[str] | None, kwargs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        stops = [*(self.stop or []), *(stop or [])]
        out: dict[str, Any] = {
            "stop": stops or None,
            "callbacks": list(self.trace_callbacks or []),
            "tags": ["understudy:teacher"],
        }
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        kw = kwargs or {}
        if kw.get("tools"):
            # the OpenAI wire format, which ChatOpenAI and OpenAI-compatible teachers take
            out["tools"] = kw["tools"]
            choice = kw.get("tool_choice", "auto")
            out["tool_choice"] = (
                "required"
                if choice == "any"
                else choice
                if choice in ("auto", "none")
                else {"type": "function", "function": {"name": choice}}
            )
            if kw.get("parallel_tool_calls") is not None:
                out["parallel_tool_calls"] = kw["parallel_tool_calls"]
        return out

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools for the student and the teacher alike; each turn is routed as usual.

        The student decodes calls under a grammar built from the tools' schemas
        (:meth:`ChatStudent.bind_tools <langchain_understudy.students.ChatStudent.bind_tools>`);
        the teacher receives the same tools in the OpenAI format as call arguments
        (``tools=``, ``tool_choice=``), which ChatOpenAI and OpenAI-compatible teachers accept.
        Whoever answers a turn also answers the tool calls it makes; the next turn, with the
        tools' results, is routed afresh.
        """
        from langchain_understudy.students._tool_calls import normalize_tool_choice

        specs = tool_specs(tools)
        choice = normalize_tool_choice(tool_choice, [t["name"] for t in specs])
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        formatted = [{"type": "function", "function": spec} for spec in specs]
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    # -- the end of every request -------------------------------------------------------------------
    def _complete(
        self, req: _Request, done: Done, stop: list[str] | None, kw: dict[str, Any]
    ) -> AIMessage:
        """Append the audit line, feed the rate controller and the rollout, return the answer."""
        if self.rate_controller is not None:
            self.rate_controller.observe(done.score, done.asked_teacher)
        self._audit(done.audit)
        if self._rollout is not None:
            messages, facts = req.flow.request.messages, req.flow.request.facts

            def run_candidate(version: str) -> AIMessage:
                model = self._source.version(version).model
                return _as_ai(model.invoke(messages, **self._student_kwargs(stop, kw, facts)))

            guard = self._guard
            ask = (
                None
                if guard is None or req.flow.request.forbidden is not None
                else lambda: _as_ai(guard.invoke(messages, **self._teacher_kwargs(stop, kw)))
            )
            self._rollout.after(
                served_version=req.active.version,
                canary=req.canary,
                meta=done.meta,
                answer=done.message,
                run_candidate=run_candidate,
                ask_teacher=ask,
            )
        return done.message

    def _audit(self, record: dict[str, Any]) -> None:
        if self.audit_log is None:
            return
        line = json.dumps(record, ensure_ascii=False, default=str, sort_keys=True) + "\n"
        path = Path(self.audit_log)
        try:
            with self._audit_lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line)
        except OSError as e:
            # The answer matters more than the log line; say so loudly and go on.
            logger.error("cannot append to the audit log %s: %s", path, e)

    def _final_chunk(
        self,
        req: _Request,
        done: Done,
        pieces: list[AIMessageChunk],
        stop: list[str] | None,
        kw: dict[str, Any],
    ) -> AIMessageChunk:
        """The chunk that ends a stream: the whole answer, or the last live piece and metadata."""
        message = self._complete(req, done, stop, kw)
        if not done.streamed:
            return _chunk_of(message)
        last = pieces[-1] if pieces and pieces[-1].chunk_position == "last" else None
        rm = dict(last.response_metadata) if last is not None else {}
        if not any("model_name" in p.response_metadata for p in pieces):
            rm.setdefault("model_name", message.response_metadata.get("model_name"))
        rm["understudy"] = done.meta
        return AIMessageChunk(
            content=last.content if last is not None else "",
            response_metadata=rm,
            usage_metadata=last.usage_metadata if last is not None else None,
            chunk_position="last",
        )

    # -- drivers: carry out the flow's steps -------------------------------------------------------
    def _do(self, req: _Request, step: Step, stop: list[str] | None, kw: dict[str, Any]) -> Any:
        """Carry out one step of the flow (sync) and return what the flow is sent back."""
        if isinstance(step, Score):
            return self._router.decide(
                step.ctx, step.stage, reuse=step.reuse, threshold=step.threshold
            )
        if isinstance(step, AskTeacher):
            assert self._guard is not None
            try:
                return self._guard.invoke(step.messages, **self._teacher_kwargs(stop, kw))
            except TeacherUnavailableError as e:
                return e
        assert isinstance(step, RunStudent)
        try:
            model = req.active.model
            return _as_ai(model.invoke(step.messages, **self._student_kwargs(stop, kw, step.facts)))
        except StudentError as e:
            return e

    async def _ado(
        self, req: _Request, step: Step, stop: list[str] | None, kw: dict[str, Any]
    ) -> Any:
        """Async :meth:`_do`; signals (embedding included) run in a worker thread."""
        if isinstance(step, Score):
            return await asyncio.to_thread(
                self._router.decide,
                step.ctx,
                step.stage,
                reuse=step.reuse,
                threshold=step.threshold,
            )
        if isinstance(step, AskTeacher):
            assert self._guard is not None
            try:
                return await self._guard.ainvoke(step.messages, **self._teacher_kwargs(stop, kw))
            except TeacherUnavailableError as e:
                return e
        assert isinstance(step, RunStudent)
        try:
            model = req.active.model
            kwargs = self._student_kwargs(stop, kw, step.facts)
            return _as_ai(await model.ainvoke(step.messages, **kwargs))
        except StudentError as e:
            return e

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        req = self._start(messages, run_manager, kwargs, stream=False)
        steps = req.flow.steps()
        step = next(steps)
        while not isinstance(step, Done):
            step = steps.send(self._do(req, step, stop, kwargs))
        return ChatResult(
            generations=[ChatGeneration(message=self._complete(req, step, stop, kwargs))]
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        req = await asyncio.to_thread(self._start, messages, run_manager, kwargs, False)
        steps = req.flow.steps()
        step = next(steps)
        while not isinstance(step, Done):
            step = steps.send(await self._ado(req, step, stop, kwargs))
        return ChatResult(
            generations=[ChatGeneration(message=self._complete(req, step, stop, kwargs))]
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        req = self._start(messages, run_manager, kwargs, stream=True)
        steps = req.flow.steps()
        pieces: list[AIMessageChunk] = []
        step = next(steps)
        while not isinstance(step, Done):
            if not (isinstance(step, RunStudent) and step.live):
                step = steps.send(self._do(req, step, stop, kwargs))
                continue
            student_kw = self._student_kwargs(stop, kwargs, step.facts)
            live = req.active.model.stream(step.messages, **student_kw)
            try:
                for piece in _until_last(live, pieces):
                    yield self._emit(piece, run_manager)
                result: Any = _joined(pieces)
            except StudentError as e:
                if pieces:  # part of the answer is already out: nothing can replace it
                    raise
                result = e
            step = steps.send(result)
        yield self._emit(self._final_chunk(req, step, pieces, stop, kwargs), run_manager)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        req = await asyncio.to_thread(self._start, messages, run_manager, kwargs, True)
        steps = req.flow.steps()
        pieces: list[AIMessageChunk] = []
        step = next(steps)
        while not isinstance(step, Done):
            if not (isinstance(step, RunStudent) and step.live):
                step = steps.send(await self._ado(req, step, stop, kwargs))
                continue
            student_kw = self._student_kwargs(stop, kwargs, step.facts)
            live = req.active.model.astream(step.messages, **student_kw)
            try:
                async for piece in _auntil_last(live, pieces):
                    yield await self._aemit(piece, run_manager)
                result: Any = _joined(pieces)
            except StudentError as e:
                if pieces:  # part of the answer is already out: nothing can replace it
                    raise
                result = e
            step = steps.send(result)
        yield await self._aemit(self._final_chunk(req, step, pieces, stop, kwargs), run_manager)

    @staticmethod
    def _emit(
        chunk: AIMessageChunk,
        run_manager: CallbackManagerForLLMRun | None,
    ) -> ChatGenerationChunk:
        gen = ChatGenerationChunk(message=chunk)
        if run_manager is not None and isinstance(chunk.content, str):
            run_manager.on_llm_new_token(chunk.content, chunk=gen)
        return gen

    @staticmethod
    async def _aemit(
        chunk: AIMessageChunk,
        run_manager: AsyncCallbackManagerForLLMRun | None,
    ) -> ChatGenerationChunk:
        gen = ChatGenerationChunk(message=chunk)
        if run_manager is not None and isinstance(chunk.content, str):
            await run_manager.on_llm_new_token(chunk.content, chunk=gen)
        return gen

    # -- offline inspection -------------------------------------------------------------------------
    def inspect(
        self, messages: Sequence[BaseMessage], *, generate: bool = True, **kwargs: Any
    ) -> Inspection:
        """Compute every signal and (optionally) the student's answer; never calls the teacher.

        Used to build held-out examples for fitting, calibrating and evaluating the router.

        Args:
            messages: The conversation.
            generate: Also run the student (needed for its confidence).
            **kwargs: Passed to the student.
        """
        msgs = list(messages)
        req = self._begin(msgs, (), None, tools=kwargs.get("tools"))
        pre = self._router.decide(req.ctx, "pre")
        answer: AIMessage | None = None
        post: Decision | None = None
        if generate:
            facts = req.flow.request.facts
            answer = _as_ai(
                req.active.model.invoke(msgs, **self._student_kwargs(None, kwargs, facts))
            )
            req.ctx.student_output = answer
            post = self._router.decide(req.ctx, "post", reuse=SignalReading.of(pre))
        values, absent, failed = merge_signals(d for d in (pre, post) if d is not None)
        signals: dict[str, float | None] = {s.name: None for s in self._router.signals}
        signals.update(values)
        return Inspection(
            signals=signals,
            absent=absent,
            failed=failed,
            answer=answer,
            pre=pre,
            post=post,
            overhead_ms=pre.elapsed_ms + (post.elapsed_ms if post else 0.0),
            embedding_ms=pre.embedding_ms + (post.embedding_ms if post else 0.0),
            retrieval_ms=req.flow.request.retrieval_ms,
        )


def _as_ai(message: Any) -> AIMessage:
    if isinstance(message, AIMessage):
        return message
    if isinstance(message, BaseMessage):
        return AIMessage(content=message.content, response_metadata=dict(message.response_metadata))
    return AIMessage(content=str(message))


def _plain(piece: AIMessageChunk) -> AIMessageChunk:
    """A copy of a student chunk without metadata (that travels on the last chunk only)."""
    return AIMessageChunk(
        content=piece.content, id=piece.id, tool_call_chunks=piece.tool_call_chunks
    )


def _as_chunk(piece: Any) -> AIMessageChunk:
    if isinstance(piece, AIMessageChunk):
        return piece
    return AIMessageChunk(content=str(getattr(piece, "content", piece)))


def _until_last(stream: Iterator[Any], pieces: list[AIMessageChunk]) -> Iterator[AIMessageChunk]:
    """The student's chunks as they come, content only, each kept in ``pieces``.

    The last chunk (it carries the metadata) is kept but not yielded: the driver sends it with
    the routing metadata once the flow is done.
    """
    for raw in stream:
        piece = _as_chunk(raw)
        pieces.append(piece)
        if piece.chunk_position == "last":
            return
        yield _plain(piece)


async def _auntil_last(
    stream: AsyncIterator[Any], pieces: list[AIMessageChunk]
) -> AsyncIterator[AIMessageChunk]:
    """Async :func:`_until_last`."""
    async for raw in stream:
        piece = _as_chunk(raw)
        pieces.append(piece)
        if piece.chunk_position == "last":
            return
        yield _plain(piece)


def _joined(pieces: Sequence[AIMessageChunk]) -> AIMessage:
    """The whole answer of a live-streamed student, for the flow's post-generation check."""
    full = AIMessageChunk(content="")
    for p in pieces:
        full = full + p
    return AIMessage(content=full.content, response_metadata=dict(full.response_metadata))
