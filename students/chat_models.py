"""``ChatStudent``: a GGUF student served by llama.cpp as a LangChain chat model."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import statistics
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from langchain_understudy.errors import ArtifactError, ConfigError, StudentError
from langchain_understudy.prompting import (
    CALL,
    END,
    Exemplar,
    Fact,
    drop_oldest,
    render_prompt,
    tool_specs,
)
from langchain_understudy.students._engine import Engine, EngineStats, Sampling
from langchain_understudy.students._llama import (
    diagnose_gguf,
    grammar_class,
    load_llama,
)
from langchain_understudy.students._tool_calls import (
    CallStream,
    calls_schema,
    normalize_tool_choice,
)
from langchain_understudy.students.answer_space import (
    ANSWER_SPACE_FILE,
    AnswerSpace,
    labels_grammar,
)
from langchain_understudy.students.exemplars import (
    EXEMPLAR_FILES,
    ExemplarMemory,
    ExemplarRetriever,
)

__all__ = ["ChatStudent", "confidence_from_logprobs"]

logger = logging.getLogger(__name__)

#: Compiled grammars a student keeps (least recently used dropped first).
GRAMMAR_CACHE = 256
#: How many of the least likely generated tokens the confidence averages over.
CONFIDENCE_WEAKEST = 4


def confidence_from_logprobs(logprobs: Sequence[float], weakest: int = CONFIDENCE_WEAKEST) -> float:
    """Turn generated tokens' log-probabilities into a confidence in [0, 1].

    ``confidence = exp(mean of the k lowest log-probabilities)``, ``k = min(weakest, n)``.

    The plain mean probability is length-biased: a long answer full of easy tokens ("the", closing
    braces) scores high even when the one token that matters was a coin flip, and the joint
    probability falls with every token. Averaging the *k weakest* log-probabilities keeps the score
    about the uncertain part of the answer and independent of its length. For an answer of at most
    ``k`` tokens it is the geometric mean of the token probabilities. The end-of-answer token is
    included: being unsure where the answer stops is uncertainty too.

    Example:
        >>> round(confidence_from_logprobs([0.0, 0.0, math.log(0.5)]), 3)
        0.794
    """
    if not logprobs:
        return 0.0
    k = min(weakest, len(logprobs))
    low = sorted(logprobs)[:k]
    return float(min(1.0, max(0.0, math.exp(sum(low) / k))))


@dataclass
class _Generation:
    """One finished or in-flight generation."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    truncated_turns: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    invalid_tool_calls: list[dict[str, Any]] = field(default_factory=list)
    call_logprobs: list[float] = field(default_factory=list)


@dataclass
class _Tools:
    """What the bound tools ask of one call."""

    specs: list[dict[str, Any]]
    choice: str  # "auto", "none", "any" or a tool's name
    grammar: Any = None  # the <|call|> block's grammar; None under "none"

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")


def _utf8(text: str) -> bytes:
    """UTF-8 for llama.cpp; a lone UTF-16 surrogate (not valid Unicode) becomes ``?``."""
    return text.encode("utf-8", errors="replace")


def _cap_strings(schema: Any, limit: int) -> Any:
    """Return a copy of a JSON schema with ``maxLength`` on every unbounded string."""
    if isinstance(schema, list):
        return [_cap_strings(s, limit) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _cap_strings(v, limit) for k, v in schema.items()}
    if out.get("type") == "string" and not ({"maxLength", "enum", "const", "pattern"} & set(out)):
        out["maxLength"] = limit
    return out


def _single_token(llm: Any, text: str) -> int | None:
    """The token id of ``text`` when the tokenizer keeps it as one token, else ``None``."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    return ids[0] if len(ids) == 1 else None


def _require_complete(message: AIMessage) -> AIMessage:
    """Refuse JSON cut off by ``max_tokens``: grammar-valid only once it is complete."""
    if message.response_metadata.get("finish_reason") == "length":
        msg = (
            "the student reached max_tokens before closing the JSON object; raise max_tokens "
            "or add maxLength to the schema's strings"
        )
        raise OutputParserException(msg, llm_output=str(message.content))
    return message


class ChatStudent(BaseChatModel):
    """A distilled student in GGUF, run by llama.cpp, as a LangChain chat model.

    The model file is loaded on first use. Calls are thread-safe: each is one sequence of the
    engine's single llama.cpp context, decoded together with the others (``n_parallel`` slots). Messages are
    rendered by :func:`langchain_understudy.prompting.render_prompt`, the same function the
    distillation job trains with. Retrieved facts can be passed per call as ``facts=[...]``.

    Every returned message carries ``usage_metadata`` and ``response_metadata`` with
    ``model_name``, ``finish_reason``, ``confidence`` (see :func:`confidence_from_logprobs`) and
    ``answer_entropy`` (the mean entropy, in nats, of the next-token distributions the answer's
    tokens were picked from); both are ``None`` with ``confidence=False``.

    Conversations longer than the context: an answer always gets room for
    ``min(max_tokens, n_ctx // 4)`` tokens (``max_tokens`` is capped to what the context has left
    beyond that). With ``overflow="truncate"`` (default) the oldest non-system turns are dropped
    with a warning until that fits, and
    ``response_metadata["truncated_turns"]`` says how many; with ``overflow="error"``, or when the
    last turn alone does not fit, :class:`~langchain_understudy.errors.StudentError` is raised.

    Example:
        >>> from langchain_understudy.students import ChatStudent
        >>> student = ChatStudent(model_path="student.Q8_0.gguf", max_tokens=64)  # doctest: +SKIP
        >>> student.invoke("What does the Pro plan cost?").content  # doctest: +SKIP
        '49 EUR a month.'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model_path: Path
    """The GGUF file."""
    n_ctx: int = Field(default=2048, ge=64)
    """Context window in tokens."""
    n_threads: int | None = Field(default=None, ge=1)
    """CPU threads; ``None`` lets llama.cpp choose."""
    n_gpu_layers: int = Field(default=0, ge=-1)
    """Layers to offload to a GPU (``-1``: all); needs a CUDA or Metal build of llama-cpp-python."""
    n_batch: int = Field(default=512, ge=1)
    """Prompt tokens evaluated per llama.cpp batch."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 decodes greedily (deterministic)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass when ``temperature > 0``."""
    max_tokens: int = Field(default=256, ge=1)
    """Cap on generated tokens per call."""
    stop: list[str] | None = None
    """Extra stop strings; the end-of-answer marker always stops."""
    seed: int = 0
    """Sampling seed."""
    confidence: bool = True
    """Compute ``response_metadata["confidence"]`` (costs one softmax per generated token)."""
    overflow: Literal["truncate", "error"] = "truncate"
    """Drop oldest turns (with a warning) or raise when a conversation exceeds the context."""
    system_prompt: str | None = None
    """System line used when the conversation has none."""
    json_schema: dict[str, Any] | None = None
    """Constrain every answer to this JSON schema with a llama.cpp grammar."""
    json_max_string_length: int | None = Field(default=None, ge=1)
    """Cap on every JSON string the grammar allows (added as ``maxLength`` where a schema has
    none), so a small student cannot run away inside a string before ``max_tokens``."""
    n_parallel: int = Field(default=4, ge=1, le=64)
    """Calls decoded together, as sequences of one llama.cpp context (continuous batching):
    each slot holds its own ``n_ctx``-token KV range; calls beyond that wait for a free slot."""
    exemplars: ExemplarRetriever | None = None
    """Exemplar memory the student was distilled with: each prompt shows the teacher's past
    answers to the most similar requests (see :meth:`from_registry`). A per-call
    ``exemplars=[...]`` replaces the lookup."""
    answer_space: AnswerSpace | None = None
    """The shape of the teacher's answers, inferred by the distillation job: a closed set of
    labels, or a JSON schema that every answer follows (see :meth:`from_registry`)."""
    closed_answers: Literal["seen", "candidates", "off"] = "seen"
    """With a ``labels`` answer space: answer only with a label seen in training (``"seen"``),
    only with one of this request's exemplar answers (``"candidates"``; all labels when there
    are none), or freely (``"off"``). A ``json`` answer space always applies its schema unless
    ``json_schema`` is given."""
    student_version: str | None = None
    """Registry version this student was loaded from, reported in metadata."""
    model_name: str | None = Field(default=None, alias="model")
    """Name reported as ``model_name``; defaults to the file name."""
    verbose: bool = False
    """Let llama.cpp print its logs."""

    _llm: Any = PrivateAttr(default=None)
    _engine: Engine | None = PrivateAttr(default=None)
    _engine_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _grammars: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_file(self) -> ChatStudent:
        path = Path(self.model_path)
        if not path.is_file():
            raise ArtifactError(diagnose_gguf(path))
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ArtifactError(diagnose_gguf(path))
        if self.json_schema is not None:
            self._grammar(self.json_schema)
        return self

    @classmethod
    def from_registry(
        cls,
        registry: Any,
        version: str | None = None,
        *,
        embeddings: Any = None,
        **kwargs: Any,
    ) -> ChatStudent:
        """Build a student from a registry version (default: the promoted one).

        Args:
            registry: A :class:`~langchain_understudy.students.StudentRegistry` or its folder.
            version: A version id; ``None`` serves the promoted version.
            embeddings: LangChain ``Embeddings`` for the student's exemplar memory (the ones
                the distillation job used, by default
                ``langchain_understudy.retrieval.default_embeddings()``); required when the
                version was distilled with exemplars.
            **kwargs: Other ``ChatStudent`` fields.
        """
        from langchain_understudy.students.registry import StudentRegistry

        reg = registry if isinstance(registry, StudentRegistry) else StudentRegistry(registry)
        v = reg.get(version) if version else reg.current()
        if v is None:
            msg = f"no student is promoted in {reg.root}; run `understudy students promote V`"
            raise ArtifactError(msg)
        return cls.from_version(v, embeddings=embeddings, **kwargs)

    @classmethod
    def from_version(cls, version: Any, *, embeddings: Any = None, **kwargs: Any) -> ChatStudent:
        """Build a student from a :class:`~langchain_understudy.students.StudentVersion`.

        Loads what was registered with it: the exemplar memory (with ``embeddings``, a LangChain
        ``Embeddings`` or a no-argument factory called only when the version has a memory) and
        the answer space.
        """
        kwargs.setdefault("student_version", version.version)
        if "exemplars" not in kwargs and all(f in version.files for f in EXEMPLAR_FILES):
            settings = version.provenance.get("exemplars") or {}
            if callable(embeddings) and not hasattr(embeddings, "embed_query"):
                embeddings = embeddings()  # a factory: loaded only for a memory that needs it
            if embeddings is None:
                msg = (
                    f"student {version.version} was distilled with exemplar memory; pass "
                    "embeddings= (the job's, by default "
                    "langchain_understudy.retrieval.default_embeddings()) or serve it through "
                    "ChatUnderstudy / load_understudy, which pass them"
                )
                raise ConfigError(msg)
            memory = ExemplarMemory.load(*(version.artifact(f) for f in EXEMPLAR_FILES))
            distinct = settings.get("distinct_by", "answer") == "answer"
            kwargs["exemplars"] = ExemplarRetriever(
                memory,
                embeddings.embed_query,
                k=int(settings.get("k", 4)),
                distinct=distinct,
                # versions registered before vote ordering have no "order": similarity
                vote_k=int(settings.get("vote_k", 30))
                if distinct and settings.get("order") == "vote"
                else None,
            )
        if "answer_space" not in kwargs and ANSWER_SPACE_FILE in version.files:
            kwargs["answer_space"] = AnswerSpace.load(version.artifact(ANSWER_SPACE_FILE))
        return cls(model_path=version.path, **kwargs)

    # -- LangChain plumbing -------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "understudy-student"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_path": str(self.model_path),
            "n_ctx": self.n_ctx,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "student_version": self.student_version,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "understudy"
        params["ls_model_name"] = str(kwargs.get("model") or self._model_name)
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    @property
    def _model_name(self) -> str:
        return self.model_name or Path(self.model_path).name

    # -- runtime ------------------------------------------------------------------------------
    def _load(self) -> Any:
        return load_llama(
            Path(self.model_path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            seed=self.seed,
            n_batch=self.n_batch,
            verbose=self.verbose,
        )

    def _get_engine(self) -> tuple[Any, Engine]:
        """The loaded model (its tokenizer) and the engine decoding for it, made on first use."""
        with self._engine_lock:
            if self._engine is None:
                llm = self._load()
                self._engine = Engine(
                    llm,
                    slots=self.n_parallel,
                    n_ctx=self.n_ctx,
                    n_batch=self.n_batch,
                    n_threads=self.n_threads,
                )
                self._llm = llm
            return self._llm, self._engine

    def load(self) -> ChatStudent:
        """Load the model now instead of on first use; returns ``self``."""
        self._get_engine()
        return self

    @property
    def engine_stats(self) -> EngineStats | None:
        """What the decoding engine has done (``None`` before the model is loaded)."""
        return self._engine.stats if self._engine is not None else None

    def count_tokens(self, text: str) -> int:
        """Return how many tokens the student's tokenizer makes of ``text``."""
        llm, _ = self._get_engine()
        return len(llm.tokenize(_utf8(text), add_bos=True, special=True))

    def _grammar(self, schema: Mapping[str, Any]) -> Any:
        if self.json_max_string_length:
            schema = _cap_strings(schema, self.json_max_string_length)
        # not sort_keys: the grammar writes properties in the schema's order
        key = json.dumps(schema)

        def build(grammar_class: Any) -> Any:
            try:
                return grammar_class.from_json_schema(key, verbose=False)
            except Exception as e:
                msg = f"invalid JSON schema for constrained generation: {e}; schema: {key[:200]}"
                raise ConfigError(msg) from e

        return self._cached_grammar("schema:" + key, build)

    def _cached_grammar(self, key: str, build: Callable[[Any], Any]) -> Any:
        """Compile a grammar once, keeping the newest :data:`GRAMMAR_CACHE` of them.

        Per-request schemas and candidate sets must not grow the cache without bound.
        """
        grammar = self._grammars.pop(key, None)
        if grammar is None:
            grammar = build(grammar_class())
            while len(self._grammars) >= GRAMMAR_CACHE:
                self._grammars.pop(next(iter(self._grammars)))
        self._grammars[key] = grammar  # re-inserted: most recently used last
        return grammar

    def _space_grammar(self, closed: str, exemplars: Sequence[Exemplar] | None) -> Any:
        """The grammar the answer space asks for (``None``: unconstrained)."""
        space = self.answer_space
        if space is None:
            return None
        if space.kind == "json" and space.schema:
            return self._grammar(space.schema)
        if space.kind != "labels" or closed == "off" or not space.labels:
            return None
        labels = space.labels
        if closed == "candidates" and exemplars:
            allowed = set(labels)
            labels = [e.answer for e in exemplars if e.answer in allowed] or labels
        return self._cached_grammar(
            "labels:" + json.dumps(labels),
            lambda grammar_class: grammar_class.from_string(labels_grammar(labels), verbose=False),
        )

    def _tools(self, kwargs: Mapping[str, Any]) -> _Tools | None:
        """The bound tools of a call (``tools=`` / ``tool_choice=``), or ``None``."""
        specs = tool_specs(kwargs.get("tools"))
        if not specs:
            normalize_tool_choice(kwargs.get("tool_choice"), [])  # a forced choice needs tools
            return None
        choice = normalize_tool_choice(kwargs.get("tool_choice"), [t["name"] for t in specs])
        if choice == "none":
            return _Tools(specs, choice)
        schema = calls_schema(
            specs,
            only=None if choice in ("auto", "any") else choice,
            parallel=kwargs.get("parallel_tool_calls") is not False,
        )
        return _Tools(specs, choice, self._grammar(schema))

    def _prompt_tokens(
        self,
        llm: Any,
        messages: Sequence[BaseMessage],
        facts: Sequence[Fact | str] | None,
        max_tokens: int,
        exemplars: Sequence[Exemplar] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        prefix: str = "",
    ) -> tuple[list[int], int]:
        msgs = list(messages)
        dropped = 0
        # room an answer must have; beyond it, max_tokens is capped to what the context has left
        reserve = min(max_tokens, max(1, self.n_ctx // 4))
        while True:
            text = render_prompt(
                msgs, facts, system=self.system_prompt, exemplars=exemplars, tools=tools
            )
            tokens = llm.tokenize(_utf8(text + prefix), add_bos=True, special=True)
            if len(tokens) + reserve <= self.n_ctx:
                return tokens, dropped
            shorter = drop_oldest(msgs)
            if self.overflow == "error" or shorter is None:
                msg = (
                    f"conversation needs {len(tokens)} prompt tokens + {reserve} for the answer, "
                    f"more than the student's context of {self.n_ctx}; shorten it, lower "
                    "max_tokens, or raise n_ctx (up to what the student was trained for)"
                )
                raise StudentError(msg)
            msgs = shorter
            dropped += 1

    def _run(
        self,
        messages: Sequence[BaseMessage],
        stop: list[str] | None,
        on_text: Callable[[str, float | None], None] | None = None,
        on_calls: Callable[[list[dict[str, Any]]], None] | None = None,
        **kwargs: Any,
    ) -> _Generation:
        """Generate one answer: text, or (with tools bound) text and/or a ``<|call|>`` block.

        Under ``tool_choice="auto"`` the student writes freely until it ends or writes
        ``<|call|>``; from there the calls are decoded under the tools' grammar. A forced choice
        starts the answer with ``<|call|>``. ``"none"`` shows the tools but stops at a call.
        """
        max_tokens = int(kwargs.get("max_tokens") or self.max_tokens)
        temperature = float(kwargs.get("temperature", self.temperature))
        exemplars = kwargs.get("exemplars")
        if exemplars is None and self.exemplars is not None:
            exemplars = self.exemplars.for_messages(messages)
        tools = self._tools(kwargs)
        schema = kwargs.get("json_schema", self.json_schema)
        if schema is not None:
            grammar = self._grammar(schema)
        elif tools is not None and tools.choice != "none":
            grammar = None  # the answer space's labels would rule out a call
        else:
            grammar = self._space_grammar(
                kwargs.get("closed_answers", self.closed_answers), exemplars
            )
        stops = [s for s in [*(self.stop or []), *(stop or []), END] if s]
        if tools is not None:
            stops.append(CALL)
        want_conf = bool(kwargs.get("confidence", self.confidence))
        facts = kwargs.get("facts")
        specs = tools.specs if tools else None
        llm, _ = self._get_engine()
        prefix = CALL if tools is not None and tools.forced else ""
        tokens, dropped = self._prompt_tokens(
            llm, messages, facts, max_tokens, exemplars, specs, prefix
        )
        if dropped:
            warnings.warn(
                f"conversation exceeded the student's context ({self.n_ctx} tokens); "
                f"dropped the {dropped} oldest turn(s)",
                stacklevel=3,
            )
        gen = _Generation(prompt_tokens=len(tokens), truncated_turns=dropped)
        budget = min(max_tokens, self.n_ctx - len(tokens))
        if not prefix:
            marker = _single_token(llm, CALL) if tools is not None else None
            hit = self._decode(
                llm,
                tokens,
                gen,
                stops,
                budget,
                temperature,
                grammar,
                want_conf,
                on_text,
                marker,
            )
            if hit != CALL or tools is None or tools.choice == "none":
                gen.text = gen.text.strip() if hit == CALL else gen.text
                return gen
            prefix = gen.text + CALL
            gen.text = gen.text.strip()
            tokens, _ = self._prompt_tokens(
                llm, messages, facts, max_tokens, exemplars, specs, prefix
            )
            budget = min(budget - gen.completion_tokens, self.n_ctx - len(tokens))
        if tools is not None:  # always, once a call has begun
            self._decode_calls(llm, tokens, gen, budget, temperature, tools, want_conf, on_calls)
        return gen

    def _decode_calls(
        self,
        llm: Any,
        tokens: list[int],
        gen: _Generation,
        budget: int,
        temperature: float,
        tools: _Tools,
        want_conf: bool,
        on_calls: Callable[[list[dict[str, Any]]], None] | None,
    ) -> None:
        """Decode the ``<|call|>`` block under the tools' grammar into ``gen.tool_calls``."""
        stream = CallStream()

        def feed(delta: str, _lp: float | None) -> None:
            chunks = stream.feed(delta)
            if chunks and on_calls is not None:
                on_calls(chunks)

        calls = _Generation()
        if budget > 0:
            self._decode(
                llm, tokens, calls, [], budget, temperature, tools.grammar, want_conf, feed
            )
        gen.completion_tokens += calls.completion_tokens
        gen.logprobs += calls.logprobs
        gen.entropies += calls.entropies
        gen.call_logprobs = calls.logprobs
        gen.tool_calls = stream.calls()
        gen.invalid_tool_calls = stream.unfinished()
        if calls.finish_reason == "length" or budget <= 0:
            gen.finish_reason = "length"
        else:
            gen.finish_reason = "tool_calls" if gen.tool_calls else "stop"

    def _decode(
        self,
        llm: Any,
        tokens: list[int],
        gen: _Generation,
        stops: list[str],
        max_tokens: int,
        temperature: float,
        grammar: Any,
        want_conf: bool,
        on_text: Callable[[str, float | None], None] | None,
        marker: int | None = None,
    ) -> str | None:
        """Decode into ``gen``; return the stop string that ended it (``None``: EOS or length).

        ``marker`` is a token that counts as the stop string ``<|call|>`` (a tokenizer that keeps
        the marker as one control token detokenizes it to nothing).
        """
        _, engine = self._get_engine()
        hold = max((len(s) for s in stops), default=1) - 1
        raw = bytearray()
        emitted = 0  # characters of decoded text already handed out
        gen.finish_reason = "length"
        sampling = Sampling(
            temperature=temperature,
            top_p=self.top_p,
            seed=self.seed,
            grammar=grammar,
            logprobs=want_conf,
        )
        hit: str | None = None
        with engine.generate(tokens, max_tokens=max_tokens, sampling=sampling) as tokens_out:
            for token, logprob, entropy, end in tokens_out:
                if logprob is not None:
                    gen.logprobs.append(logprob)
                if entropy is not None:
                    gen.entropies.append(entropy)
                if token == marker:
                    hit = CALL
                if hit or end:
                    gen.finish_reason = "stop"
                    break
                gen.completion_tokens += 1
                raw += llm.detokenize([token], special=False)
                text = raw.decode("utf-8", errors="ignore")
                found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
                if found:
                    cut, hit = min(found)
                    text = text[:cut]
                    if on_text and len(text) > emitted:
                        on_text(text[emitted:], None)
                    gen.text = text
                    gen.finish_reason = "stop"
                    return hit
                safe = len(text) - hold
                if on_text and safe > emitted:
                    on_text(text[emitted:safe], gen.logprobs[-1] if gen.logprobs else None)
                    emitted = safe
                gen.text = text
                if gen.completion_tokens >= max_tokens:
                    break
        if on_text and len(gen.text) > emitted:
            on_text(gen.text[emitted:], None)
        return hit

    def _metadata(self, gen: _Generation) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "model_name": self._model_name,
            "finish_reason": gen.finish_reason,
            "confidence": confidence_from_logprobs(gen.logprobs) if gen.logprobs else None,
            "answer_entropy": statistics.fmean(gen.entropies) if gen.entropies else None,
            "model_provider": "understudy",
        }
        if self.student_version:
            meta["student_version"] = self.student_version
        if gen.truncated_turns:
            meta["truncated_turns"] = gen.truncated_turns
        if gen.call_logprobs:
            meta["tool_call_confidence"] = confidence_from_logprobs(gen.call_logprobs)
        return meta

    @staticmethod
    def _usage(gen: _Generation) -> UsageMetadata:
        return UsageMetadata(
            input_tokens=gen.prompt_tokens,
            output_tokens=gen.completion_tokens,
            total_tokens=gen.prompt_tokens + gen.completion_tokens,
        )

    def _message(self, gen: _Generation) -> AIMessage:
        return AIMessage(
            content=gen.text,
            tool_calls=gen.tool_calls,
            invalid_tool_calls=gen.invalid_tool_calls,
            response_metadata=self._metadata(gen),
            usage_metadata=self._usage(gen),
        )

    def _event_chunk(self, kind: str, value: Any) -> ChatGenerationChunk:
        """One streamed event as a chunk: ``text``, ``calls`` (tool-call chunks) or ``done``."""
        if kind == "text":
            return ChatGenerationChunk(message=AIMessageChunk(content=value))
        if kind == "calls":
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=value))
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                response_metadata=self._metadata(value),
                usage_metadata=self._usage(value),
                chunk_position="last",
            )
        )

    def _worker(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        put: Callable[[tuple[str, Any]], None],
        kwargs: dict[str, Any],
    ) -> Callable[[], None]:
        """A thread body that runs one generation and reports it as events through ``put``."""

        def work() -> None:
            try:
                gen = self._run(
                    messages,
                    stop,
                    lambda t, _lp: put(("text", t)),
                    lambda calls: put(("calls", calls)),
                    **kwargs,
                )
                put(("done", gen))
            except BaseException as e:  # re-raised in the caller's thread
                put(("error", e))

        return work

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        on_text = None
        if run_manager is not None:

            def on_text(text: str, _lp: float | None) -> None:
                run_manager.on_llm_new_token(text)

        gen = self._run(messages, stop, on_text, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=self._message(gen))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        work = self._worker(messages, stop, events.put, kwargs)
        thread = threading.Thread(target=work, daemon=True, name="understudy-student")
        thread.start()
        while True:
            kind, value = events.get()
            if kind == "error":
                thread.join()
                raise value
            chunk = self._event_chunk(kind, value)
            if run_manager is not None and kind != "done":
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            if kind == "done":
                thread.join()
                return

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        gen = await asyncio.to_thread(self._run, messages, stop, None, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=self._message(gen))])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        task = loop.run_in_executor(None, self._worker(messages, stop, put, kwargs))
        while True:
            kind, value = await events.get()
            if kind == "error":
                await task
                raise value
            chunk = self._event_chunk(kind, value)
            if run_manager is not None and kind != "done":
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            if kind == "done":
                await task
            yield chunk
            if kind == "done":
                return

    # -- tools --------------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; the student calls them under a grammar built from their schemas.

        Args:
            tools: OpenAI tool dicts, LangChain tools, pydantic models or typed functions.
            tool_choice: ``"auto"`` (default: answer in text or call), ``"any"`` /
                ``"required"`` / ``True`` (must call), ``"none"`` (never call; the tools are
                still shown), or a tool's name (must call that tool).
            parallel_tool_calls: ``False`` allows one call per turn (default: several).
            **kwargs: Other call arguments to bind.

        Every call the student writes names a bound tool, and its arguments have the types,
        enums and required keys of that tool's JSON schema (numeric bounds and string
        patterns beyond what llama.cpp's schema converter supports are not enforced).

        Example:
            >>> from langchain_core.tools import tool
            >>> @tool
            ... def get_weather(city: str) -> str:
            ...     \"\"\"Weather in a city.\"\"\"
            ...     return "sunny"
            >>> student = ChatStudent(model_path="student.gguf")  # doctest: +SKIP
            >>> student.bind_tools([get_weather], tool_choice="any").invoke(
            ...     "Weather in Paris?").tool_calls[0]["args"]  # doctest: +SKIP
            {'city': 'Paris'}
        """
        specs = tool_specs(tools)
        choice = normalize_tool_choice(tool_choice, [t["name"] for t in specs])
        formatted = [{"type": "function", "function": spec} for spec in specs]
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    # -- structured output --------------------------------------------------------------------
    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Return a runnable whose output follows ``schema``, enforced by a llama.cpp grammar.

        Args:
            schema: A pydantic model class, a TypedDict, or a JSON schema dict.
            include_raw: Return ``{"raw", "parsed", "parsing_error"}`` instead of the parsed value.
            method: ``"json_schema"`` and ``"json_mode"`` decode the answer itself under the
                schema's grammar; ``"function_calling"`` binds the schema as a tool the student
                must call (the ``<|call|>`` format it was distilled with) and parses the call's
                arguments. Both are enforced by a llama.cpp grammar.
            **kwargs: Ignored (accepted for interface compatibility, e.g. ``strict``).
        """
        if method not in ("json_schema", "json_mode", "function_calling"):
            msg = f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}"
            raise ConfigError(msg)
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if isinstance(schema, dict) and "title" not in schema and "properties" in schema:
            json_schema = dict(schema)  # a plain JSON schema is used as is
        else:
            json_schema = convert_to_json_schema(schema)
        structured = {"kwargs": {"method": method}, "schema": json_schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            tool = schema if is_pydantic else json_schema
            name = tool_specs([tool])[0]["name"]
            llm = self.bind_tools(
                [tool],
                tool_choice=name,
                parallel_tool_calls=False,
                ls_structured_output_format=structured,
            )
            parser = RunnableLambda(_require_complete) | (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        else:
            llm = self.bind(json_schema=json_schema, ls_structured_output_format=structured)
            parser = RunnableLambda(_require_complete) | (
                PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else JsonOutputParser()
            )
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(
            parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None
        )
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks(
            [fallback], exception_key="parsing_error"
        )
