"""Routing signals: small functions of a conversation that say how risky it is for the student.

Each signal is a plain function ``f(ctx: RoutingContext) -> float``. It either returns a number, or
raises :class:`SignalAbsent` when it cannot apply (no knowledge store, no out-of-distribution index,
no student answer yet): an absent signal is left out of the decision and the response says why. Any
other exception, or a value that is not a finite number in the signal's documented range, is a
*failure*, and the router escalates on failures (see :class:`~langchain_understudy.router.Router`).

Signals run at one of two stages: ``"pre"`` signals are known before the student generates,
``"post"`` signals need the student's answer (its confidence). :data:`DEFAULT_SIGNALS` lists them
with the direction in which they grow riskier, their valid range and a transparent default ramp from
raw value to risk.

Rules are not scored: :class:`RoutingRules` says which conversations always go to the teacher
(patterns, tags) and which never leave the machine.

Example:
    >>> from langchain_core.messages import AIMessage, HumanMessage
    >>> ctx = RoutingContext([HumanMessage("Book a table"), AIMessage("Where?"), HumanMessage("and the other one?")])
    >>> user_turns(ctx), depends_on_history(ctx) > 0.5
    (2.0, True)
"""  # noqa: E501

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.prompting import Fact, document_to_fact, message_text, render_prompt

if TYPE_CHECKING:
    from langchain_core.documents import Document

__all__ = [
    "DEFAULT_SIGNALS",
    "MAX_RAMP_RISK",
    "OODIndex",
    "RoutingContext",
    "RoutingRules",
    "SignalAbsent",
    "SignalSpec",
    "TOOL_SIGNALS",
    "context_fraction",
    "depends_on_history",
    "document_to_fact",
    "ood_distance",
    "retrieval_similarity",
    "call_args_from_history",
    "tools_unseen",
    "student_confidence",
    "tool_call_confidence",
    "user_turns",
]

Stage = Literal["pre", "post"]

MAX_RAMP_RISK = 0.99
"""Highest risk a default ramp gives; 1.0 is reserved for rules and failing signals."""


class SignalAbsent(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Raised by a signal that does not apply to this request; the message says why."""


class OODIndex:
    """The student's training prompts as unit vectors, for the out-of-distribution signal.

    The distillation job registers two artifacts with every student: ``ood_index.npy`` (a float32
    array ``(n, d)`` of L2-normalised embeddings of the training conversations' last user turn) and
    ``ood_meta.json`` (``{"embedding": name, "n": n}``).

    Up to ``exact_below`` vectors the search is exact (one matrix-vector product). Above it, an
    inverted-file index is built once at load time (spherical k-means into about ``2 * sqrt(n)``
    cells, deterministic) and a query scans the ``nprobe`` nearest cells only, which keeps the
    signal well under a millisecond for tens of thousands of prompts; a neighbour in an unprobed
    cell can be missed, which only makes the distance slightly larger.

    Args:
        vectors: ``(n, d)`` embeddings (normalised again here).
        embedding: Name of the embedding model that made them.
        k: Neighbours averaged by :meth:`distance`.
        exact_below: Largest ``n`` searched exactly.
        nlist: Cells of the inverted file (``None``: ``2 * sqrt(n)``).
        nprobe: Cells scanned per query.
        seed: Seed of the k-means initialisation.

    Example:
        >>> idx = OODIndex(np.eye(3, dtype=np.float32))
        >>> round(idx.distance(np.array([1.0, 0.0, 0.0])), 3)
        0.0
    """

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        embedding: str | None = None,
        k: int = 1,
        exact_below: int = 4096,
        nlist: int | None = None,
        nprobe: int = 16,
        seed: int = 0,
    ) -> None:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[0] == 0:
            msg = f"ood index must be a non-empty (n, d) array, got shape {v.shape}"
            raise ArtifactError(msg)
        if not np.isfinite(v).all():
            msg = "ood index holds NaN or infinite values; rebuild it with the distillation job"
            raise ArtifactError(msg)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        self.vectors = v / np.maximum(norms, 1e-12)
        self.embedding = embedding
        self.k = max(1, min(int(k), v.shape[0]))
        self.nprobe = max(1, int(nprobe))
        self._centroids: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        n = v.shape[0]
        if n > exact_below:
            cells = nlist or max(2, int(2 * math.sqrt(n)))
            self._build_ivf(min(cells, n), seed)

    def _build_ivf(self, nlist: int, seed: int) -> None:
        v = self.vectors
        rng = np.random.default_rng(seed)
        sample = v[rng.choice(v.shape[0], min(v.shape[0], nlist * 64), replace=False)]
        cent = sample[rng.choice(sample.shape[0], nlist, replace=False)].copy()
        for _ in range(10):
            assign = np.argmax(sample @ cent.T, axis=1)
            sums = np.zeros_like(cent)
            np.add.at(sums, assign, sample)
            counts = np.bincount(assign, minlength=nlist)
            filled = counts > 0
            cent[filled] = sums[filled] / np.maximum(
                np.linalg.norm(sums[filled], axis=1, keepdims=True), 1e-12
            )
        assign_all = np.concatenate(
            [np.argmax(v[i : i + 8192] @ cent.T, axis=1) for i in range(0, v.shape[0], 8192)]
        )
        order = np.argsort(assign_all, kind="stable")
        self.vectors = np.ascontiguousarray(v[order])
        self._offsets = np.searchsorted(assign_all[order], np.arange(nlist + 1))
        self._centroids = cent

    @property
    def dimension(self) -> int:
        """Embedding width."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @classmethod
    def load(cls, folder_or_file: str | Path, **kwargs: Any) -> OODIndex:
        """Load ``ood_index.npy`` (and ``ood_meta.json`` beside it) without pickle.

        Args:
            folder_or_file: The ``.npy`` file or the folder holding it.
            **kwargs: Search options of the constructor (``k``, ``nprobe``, ...).

        Raises:
            ArtifactError: the file is missing or not a numeric array.
        """
        import json

        p = Path(folder_or_file)
        npy = p / "ood_index.npy" if p.is_dir() else p
        try:
            vectors = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            msg = f"cannot read the out-of-distribution index {npy} ({e}); re-run the distillation job"
            raise ArtifactError(msg) from e
        meta_path = npy.with_name("ood_meta.json")
        embedding = None
        if meta_path.exists():
            try:
                embedding = json.loads(meta_path.read_text(encoding="utf-8")).get("embedding")
            except (OSError, ValueError, AttributeError) as e:
                msg = f"{meta_path} is not valid JSON ({e}); re-run the distillation job"
                raise ArtifactError(msg) from e
        if not np.issubdtype(vectors.dtype, np.number):
            msg = f"{npy} holds {vectors.dtype} values, not numbers; re-run the distillation job"
            raise ArtifactError(msg)
        return cls(vectors, embedding=embedding, **kwargs)

    def distance(self, query: Sequence[float] | np.ndarray) -> float:
        """Return the cosine distance (``1 - cos``, in [0, 2]) to the ``k`` nearest prompts."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dimension:
            msg = (
                f"query embedding has {q.shape[0]} dimensions, the ood index {self.dimension}; "
                "use the embedding model the index was built with"
                + (f" ({self.embedding})" if self.embedding else "")
            )
            raise ConfigError(msg)
        n = float(np.linalg.norm(q))
        if not math.isfinite(n) or n == 0.0:
            msg = "query embedding is zero or not finite"
            raise ValueError(msg)
        q = q / n
        if self._centroids is None or self._offsets is None:
            sims = self.vectors @ q
        else:
            cs = self._centroids @ q
            probe = min(self.nprobe, cs.shape[0])
            cells = np.argpartition(-cs, probe - 1)[:probe]
            off = self._offsets
            sims = np.concatenate([self.vectors[off[c] : off[c + 1]] @ q for c in cells])
        k = min(self.k, sims.shape[0])
        if k == 1:
            best = float(sims.max())
        else:
            best = float(np.partition(sims, -k)[-k:].mean())
        return float(min(2.0, max(0.0, 1.0 - best)))


@dataclass
class RoutingContext:
    """Everything a signal may look at for one request.

    Attributes:
        messages: The conversation, last message the one to answer.
        retrieved: ``(document, relevance in [0, 1])`` pairs from the knowledge store, best first;
            ``None`` when no knowledge store is configured (or it gives no scores).
        facts_shown: The facts the student will see; ``None`` derives them from ``retrieved``.
        retrieval_error: Why the knowledge-store query failed, if it did.
        student_output: The student's answer (cascade stage), or ``None`` before generation.
        n_ctx: The student's context window in tokens.
        count_tokens: The student's tokenizer as a counting function; ``None`` estimates 4
            characters per token.
        ood_index: The student's training-prompt index, or ``None``.
        embed_query: Embeds one text for the out-of-distribution signal.
        tags: The run's tags.
        absent_reasons: Why an optional input is missing, by signal name, reported when that
            signal is absent.
        bound_tools: Names of the tools bound to this call.
        trained_tools: Names of the tools the student was distilled to call (from its
            provenance); ``None`` when unknown.
        timings_ms: Time spent in expensive steps (``"embedding"``), filled in by the signals.
    """

    messages: Sequence[BaseMessage]
    retrieved: Sequence[tuple[Document, float]] | None = None
    facts_shown: Sequence[Fact] | None = None
    retrieval_error: str | None = None
    student_output: AIMessage | None = None
    n_ctx: int | None = None
    count_tokens: Callable[[str], int] | None = None
    ood_index: OODIndex | None = None
    embed_query: Callable[[str], Sequence[float]] | None = None
    tags: Sequence[str] = ()
    absent_reasons: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    bound_tools: Sequence[str] = ()
    trained_tools: frozenset[str] | None = None
    _query_vector: np.ndarray | None = field(default=None, repr=False)

    def user_texts(self) -> list[str]:
        """Text of every user turn, oldest first."""
        return [message_text(m) for m in self.messages if _is_user(m)]

    def last_user_text(self) -> str:
        """Text of the last user turn (empty when there is none)."""
        texts = self.user_texts()
        return texts[-1] if texts else ""

    def facts(self) -> list[Fact]:
        """The facts the student sees with this conversation."""
        if self.facts_shown is not None:
            return list(self.facts_shown)
        return [document_to_fact(d) for d, _ in (self.retrieved or [])]

    def query_vector(self) -> np.ndarray:
        """Embedding of the last user turn, computed once and timed as ``"embedding"``."""
        if self._query_vector is None:
            if self.embed_query is None:
                raise SignalAbsent(
                    self.absent_reasons.get("embedding", "no embedding model configured")
                )
            t0 = time.perf_counter()
            self._query_vector = np.asarray(
                self.embed_query(self.last_user_text()), dtype=np.float32
            )
            self.timings_ms["embedding"] = (time.perf_counter() - t0) * 1000.0
        return self._query_vector


def _is_user(m: BaseMessage) -> bool:
    return isinstance(m, HumanMessage) or m.type == "human" or getattr(m, "role", None) == "user"


# -- signals ---------------------------------------------------------------------------------------


def user_turns(ctx: RoutingContext) -> float:
    """Number of user turns in the conversation (1 for a single question).

    Long conversations are where a small student loses track; the teacher keeps them.
    """
    return float(sum(1 for m in ctx.messages if _is_user(m)))


def context_fraction(ctx: RoutingContext) -> float:
    """Prompt tokens (conversation and retrieved facts, as the student sees them) / ``n_ctx``.

    Values near or above 1 mean the student would have to drop turns to answer.
    """
    if not ctx.n_ctx:
        raise SignalAbsent(ctx.absent_reasons.get("context_fraction", "student context unknown"))
    text = render_prompt(list(ctx.messages), ctx.facts() or None)
    n = ctx.count_tokens(text) if ctx.count_tokens is not None else math.ceil(len(text) / 4)
    return float(n) / float(ctx.n_ctx)


_OPENERS = re.compile(
    r"^\s*(and|but|also|or|so|then|plus|what about|how about|same|ok(ay)?,? and|now)\b", re.I
)
_BACKREF = re.compile(
    r"\b(the other( one)?s?|that one|this one|those ones?|the (first|second|last|previous|former|"
    r"latter|same) (one|ones|thing|question|request)|same (again|thing|one|question|for)|again|"
    r"as (before|above|earlier)|instead|previous(ly)?|earlier|mentioned|the above|"
    r"one more time|do (it|that|the same))\b",
    re.I,
)
_PRONOUN = re.compile(r"\b(it|its|that|this|those|these|them|they|there|he|she|him|her)\b", re.I)


def depends_on_history(ctx: RoutingContext) -> float:
    """How strongly the last user turn seems to depend on earlier turns, in [0, 1].

    0 when there are no earlier user turns. Otherwise a noisy-or of cues in the last turn: it opens
    with a continuation ("and", "what about", "same"; weight 0.6), it refers back explicitly ("the
    other one", "again", "as before"; 0.6), it leans on a pronoun ("it", "that", "them"; 0.3), it is
    a fragment of at most four words (0.3). A student trained on single questions cannot resolve
    such turns, so they are a reason to escalate.
    """
    if len(ctx.user_texts()) < 2:
        return 0.0
    text = ctx.last_user_text()
    weights = []
    if _OPENERS.search(text):
        weights.append(0.6)
    if _BACKREF.search(text):
        weights.append(0.6)
    if _PRONOUN.search(text):
        weights.append(0.3)
    if len(re.findall(r"\w+", text)) <= 4:
        weights.append(0.3)
    keep = 1.0
    for w in weights:
        keep *= 1.0 - w
    return 1.0 - keep


def retrieval_similarity(ctx: RoutingContext) -> float:
    """Relevance score (in [0, 1]) of the best fact the knowledge store found; 0 when none.

    A low value means the store holds nothing about the question, so the student would be
    answering from memory.
    """
    if ctx.retrieval_error is not None:
        msg = f"the knowledge store query failed: {ctx.retrieval_error}"
        raise RuntimeError(msg)
    if ctx.retrieved is None:
        raise SignalAbsent(
            ctx.absent_reasons.get("retrieval_similarity", "no knowledge store configured")
        )
    return max((float(s) for _, s in ctx.retrieved), default=0.0)


def ood_distance(ctx: RoutingContext) -> float:
    """Cosine distance from the last user turn to the nearest training prompt, in [0, 2].

    The index comes with the student (``ood_index.npy``). Far from everything the student was
    trained on means out of distribution: the teacher should answer.
    """
    if ctx.ood_index is None:
        raise SignalAbsent(
            ctx.absent_reasons.get(
                "ood_distance", "the student has no out-of-distribution index (ood_index.npy)"
            )
        )
    return ctx.ood_index.distance(ctx.query_vector())


def student_confidence(ctx: RoutingContext) -> float:
    """The student's own confidence in its answer (``response_metadata["confidence"]``), in [0, 1].

    Derived from the generated tokens' log-probabilities; only known after generation.
    """
    if ctx.student_output is None:
        raise SignalAbsent("the student has not answered yet")
    value = ctx.student_output.response_metadata.get("confidence")
    if value is None:
        raise SignalAbsent("the student did not report a confidence")
    return float(value)


def _student_calls(ctx: RoutingContext) -> list[dict[str, Any]]:
    if ctx.student_output is None:
        raise SignalAbsent("the student has not answered yet")
    calls = list(getattr(ctx.student_output, "tool_calls", None) or [])
    if not calls:
        raise SignalAbsent("the student's answer calls no tool")
    return calls


def tool_call_confidence(ctx: RoutingContext) -> float:
    """The student's confidence in the tool calls it wrote (their tokens only), in [0, 1].

    Read from ``response_metadata["tool_call_confidence"]``; absent on turns without a call.
    """
    _student_calls(ctx)
    value = ctx.student_output.response_metadata.get("tool_call_confidence")  # type: ignore[union-attr]
    if value is None:
        raise SignalAbsent("the student did not report a tool-call confidence")
    return float(value)


def tools_unseen(ctx: RoutingContext) -> float:
    """Share of the bound tools the student was never distilled to call, in [0, 1].

    An agent that binds a new tool needs the teacher until traces with it have been distilled:
    the student cannot call a tool it never saw called (and may answer in words instead).
    Absent without bound tools, or for a student whose provenance does not list its tools.
    """
    if not ctx.bound_tools:
        raise SignalAbsent("no tools are bound")
    if ctx.trained_tools is None:
        raise SignalAbsent(
            ctx.absent_reasons.get("tools_unseen", "the tools the student learnt are unknown")
        )
    names = set(ctx.bound_tools)
    return len(names - ctx.trained_tools) / len(names)


def call_args_from_history(ctx: RoutingContext) -> float:
    """Share of the student's call arguments whose value is not in the last user turn, in [0, 1].

    An argument the user just typed is copied; one that must come from earlier turns (a date
    agreed three turns ago) is where small students slip. Absent on turns without a call or
    without arguments.
    """
    values = [
        " ".join(str(v).casefold().split())
        for call in _student_calls(ctx)
        for v in (call.get("args") or {}).values()
        if v not in (None, "")
    ]
    if not values:
        raise SignalAbsent("the student's calls have no arguments")
    last = " ".join(ctx.last_user_text().casefold().split())
    return sum(1 for v in values if v not in last) / len(values)


@dataclass(frozen=True)
class SignalSpec:
    """How a signal is read.

    Attributes:
        name: Key in metadata and in fitted routers.
        fn: The signal function.
        stage: ``"pre"`` (before generation) or ``"post"`` (needs the student's answer).
        higher_is_riskier: Direction; ``False`` for similarity and confidence.
        valid: Inclusive range of valid values; anything else (or NaN) is a failure.
        ramp: Default risk ramp ``(safe, risky)``: the risk is 0 at ``safe``, rises linearly to
            :data:`MAX_RAMP_RISK` at ``risky`` and stays there (either order). A score of exactly
            1 is reserved for rules and failing signals, so a threshold of 1 escalates only those.
    """

    name: str
    fn: Callable[[RoutingContext], float]
    stage: Stage
    higher_is_riskier: bool
    valid: tuple[float, float]
    ramp: tuple[float, float]

    def default_risk(self, value: float) -> float:
        """Map a raw value to a risk in [0, 1] with the default ramp."""
        safe, risky = self.ramp
        return MAX_RAMP_RISK * float(min(1.0, max(0.0, (value - safe) / (risky - safe))))


DEFAULT_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("user_turns", user_turns, "pre", True, (0.0, math.inf), (1.0, 6.0)),
    SignalSpec("context_fraction", context_fraction, "pre", True, (0.0, math.inf), (0.5, 1.0)),
    SignalSpec("depends_on_history", depends_on_history, "pre", True, (0.0, 1.0), (0.3, 0.8)),
    SignalSpec("retrieval_similarity", retrieval_similarity, "pre", False, (0.0, 1.0), (0.8, 0.5)),
    SignalSpec("ood_distance", ood_distance, "pre", True, (0.0, 2.0), (0.3, 0.7)),
    SignalSpec("student_confidence", student_confidence, "post", False, (0.0, 1.0), (0.8, 0.2)),
)
"""The built-in signals, in evaluation order."""

TOOL_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("tools_unseen", tools_unseen, "pre", True, (0.0, 1.0), (0.0, 0.5)),
    SignalSpec("tool_call_confidence", tool_call_confidence, "post", False, (0.0, 1.0), (0.8, 0.2)),
    SignalSpec(
        "call_args_from_history", call_args_from_history, "post", True, (0.0, 1.0), (0.3, 1.0)
    ),
)
"""Signals for tool-calling turns: before generation, the share of bound tools the student never
learnt to call (absent without tools); after it, the student's confidence on its calls and the
share of their arguments not in the last user turn (absent on turns without a call). Opt in with
``Router(signals=(*DEFAULT_SIGNALS, *TOOL_SIGNALS))``."""


# -- rules -----------------------------------------------------------------------------------------


def _compile(patterns: Iterable[str], what: str) -> tuple[re.Pattern[str], ...]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            msg = f"{what} must be regular expressions, got {p!r} ({e})"
            raise ConfigError(msg) from e
    return tuple(out)


class RoutingRules:
    r"""Rules that override the score: always send to the teacher, or never let a conversation out.

    Patterns are Python regular expressions searched in the text of every non-system message (use
    ``(?i)`` for case-insensitive). Tags are the LangChain run tags of the call.

    Args:
        always_teacher_patterns: A match sends the conversation to the teacher.
        never_teacher_patterns: A match keeps the conversation on this machine, whatever the score.
        always_teacher_tags: A run tagged with any of these goes to the teacher.

    Example:
        >>> from langchain_core.messages import HumanMessage
        >>> rules = RoutingRules(always_teacher_patterns=[r"(?i)legal"])
        >>> rules.always(RoutingContext([HumanMessage("A legal question")]))
        "pattern '(?i)legal' always goes to the teacher"
    """

    def __init__(
        self,
        *,
        always_teacher_patterns: Iterable[str] = (),
        never_teacher_patterns: Iterable[str] = (),
        always_teacher_tags: Iterable[str] = (),
    ) -> None:
        self.always_teacher_patterns = _compile(always_teacher_patterns, "always_teacher_patterns")
        self.never_teacher_patterns = _compile(never_teacher_patterns, "never_teacher_patterns")
        self.always_teacher_tags = tuple(always_teacher_tags)

    @staticmethod
    def _text(ctx: RoutingContext) -> str:
        return "\n".join(message_text(m) for m in ctx.messages if not isinstance(m, SystemMessage))

    def always(self, ctx: RoutingContext) -> str | None:
        """Return why the conversation must go to the teacher, or ``None``."""
        tags = set(ctx.tags)
        for t in self.always_teacher_tags:
            if t in tags:
                return f"tag {t!r} always goes to the teacher"
        if self.always_teacher_patterns:
            text = self._text(ctx)
            for p in self.always_teacher_patterns:
                if p.search(text):
                    return f"pattern {p.pattern!r} always goes to the teacher"
        return None

    def never(self, ctx: RoutingContext) -> str | None:
        """Return why the conversation must stay on this machine, or ``None``."""
        if self.never_teacher_patterns:
            text = self._text(ctx)
            for p in self.never_teacher_patterns:
                if p.search(text):
                    return f"pattern {p.pattern!r} never goes to the teacher"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "always_teacher_patterns": [p.pattern for p in self.always_teacher_patterns],
            "never_teacher_patterns": [p.pattern for p in self.never_teacher_patterns],
            "always_teacher_tags": list(self.always_teacher_tags),
        }
