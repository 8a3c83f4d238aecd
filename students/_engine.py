"""Continuous batching: many generations decoded together in one llama.cpp context.

One engine thread owns the context, so llama.cpp is only ever called from that thread, however
many caller threads (or event loops) submit work. The context holds ``slots`` sequences; each
generation is one sequence with its own ``seq_id``, KV range (``n_ctx`` tokens per slot), sampler
chain and grammar. Every step decodes one ``llama_batch`` that carries the next token of every
generating sequence, plus prompt tokens of sequences that are still reading their prompt (up to
``n_batch`` tokens in all, so a long prompt is read over several steps while the others keep
generating). A request joins between two steps when a slot is free, and waits in order when none
is; a sequence leaves when it ends (an end-of-generation token or its token budget) or when its
caller closes it (a stop string, a disconnect).

The engine only picks tokens. What a token means (stop strings, the tool-call marker, streaming,
confidence) is the caller's business: it reads ``(token, logprob, entropy, end)`` from the
:class:`Generation` it got from :meth:`Engine.generate`, and closes it when it has what it needs.

The context gets its own ggml thread pool (:class:`_ThreadPool`), made once and kept for the
engine's life. Without one, ggml makes a thread pool for every decode call and tears it down after
it; a step of a small student is a fraction of a millisecond, so that costs more than the step
(``bench/thread_pool.py`` measures both).

This module and ``_llama.py`` are the only ones that touch ``llama_cpp``; the llama-cpp-python
internals read here (``Llama._model.model``, ``._model.vocab``, ``.context_params``, a
``LlamaGrammar``'s ``_grammar`` and ``_root`` text, and ggml's thread-pool functions in the
shared libraries the wheel ships) are tested against the release pyproject pins.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from langchain_understudy.errors import StudentError

__all__ = ["Engine", "EngineStats", "Generation", "Sampling"]

logger = logging.getLogger(__name__)

#: ggml's ``GGML_MAX_N_THREADS`` (the size of a thread pool's CPU mask) in the pinned llama.cpp.
_GGML_MAX_N_THREADS = 512


class _ThreadPoolParams(ctypes.Structure):
    """ggml's ``struct ggml_threadpool_params``."""

    _fields_ = [  # noqa: RUF012 - the ctypes layout
        ("cpumask", ctypes.c_bool * _GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class _ThreadPool:
    """ggml thread pools made once and attached to one llama.cpp context.

    One pool of ``n_threads`` for generation and, when ``n_threads_batch`` differs, a second for
    prompt reading. ``None`` from :meth:`attach` when the libraries do not export the thread-pool
    functions (another llama.cpp build): the context then keeps ggml's pool per decode call.
    """

    _api: tuple[Any, Any, Any] | None = None

    def __init__(self, handles: list[int], cpu: Any) -> None:
        self._handles, self._cpu = handles, cpu

    @classmethod
    def _functions(cls) -> tuple[Any, Any, Any]:
        if cls._api is None:
            from pathlib import Path

            import llama_cpp.llama_cpp as bindings

            # the folder of the libllama llama_cpp loaded (LLAMA_CPP_LIB_PATH may move it), so
            # that ggml's functions come from the same copy as the context
            lib = Path(bindings._lib._name).parent
            base = ctypes.CDLL(str(lib / "libggml-base.so"))
            cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"))
            base.ggml_threadpool_params_default.restype = _ThreadPoolParams
            base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
            cpu.ggml_threadpool_new.restype = ctypes.c_void_p
            cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadPoolParams)]
            cpu.ggml_threadpool_free.restype = None
            cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
            llama = ctypes.CDLL(str(lib / "libllama.so"))
            llama.llama_attach_threadpool.restype = None
            llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p] * 3
            llama.llama_detach_threadpool.restype = None
            llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
            cls._api = (base, cpu, llama)
        return cls._api

    @classmethod
    def attach(cls, ctx: Any, n_threads: int, n_threads_batch: int) -> _ThreadPool | None:
        """Make the pools and attach them to ``ctx``."""
        try:
            base, cpu, llama = cls._functions()
        except (OSError, AttributeError) as e:
            logger.debug("no ggml thread pool (%s): llama.cpp makes one per decode", e)
            return None
        handles: list[int] = []
        for n in dict.fromkeys((n_threads, n_threads_batch)):
            params = base.ggml_threadpool_params_default(n)
            handle = cpu.ggml_threadpool_new(ctypes.byref(params))
            if not handle:
                for h in handles:
                    cpu.ggml_threadpool_free(h)
                return None
            handles.append(handle)
        llama.llama_attach_threadpool(ctx, handles[0], handles[-1])
        return cls(handles, cpu)

    @classmethod
    def attach_checked(
        cls, ctx: Any, n_threads: int, n_threads_batch: int, probe: Any
    ) -> _ThreadPool | None:
        """:meth:`attach`, kept only if ``probe()`` (logits of a fixed decode) agrees with it.

        With this llama.cpp build a persistent pool of more than one thread computes NaN for
        some k-quant files (a SmolLM2 Q4_K_M student: every logit NaN, where ggml's pool per
        call is right), so the pool is checked against the per-call one on each new context.
        """
        reference = probe()
        pool = cls.attach(ctx, n_threads, n_threads_batch)
        if pool is None:
            return None
        got = probe()
        scale = max(1.0, float(np.abs(reference).max()))
        if np.all(np.isfinite(got)) and float(np.abs(got - reference).max()) <= 1e-3 * scale:
            return pool
        cls._functions()[2].llama_detach_threadpool(ctx)
        pool.free()
        logger.warning(
            "llama.cpp's persistent thread pool computed different logits for this model; "
            "using ggml's pool per decode call instead (slower, correct)"
        )
        return None

    def free(self) -> None:
        """Free the pools (after the context that used them)."""
        for handle in self._handles:
            self._cpu.ggml_threadpool_free(handle)
        self._handles = []


@dataclass(frozen=True)
class Sampling:
    """How one generation picks its tokens."""

    temperature: float = 0.0
    """0 picks the most likely token."""
    top_p: float = 1.0
    """Nucleus mass when ``temperature > 0``."""
    seed: int = 0
    """Seed of the random pick when ``temperature > 0``."""
    grammar: Any = None
    """A llama-cpp-python ``LlamaGrammar`` the tokens must follow, or ``None``."""
    logprobs: bool = False
    """Report each token's log-probability under the raw (unconstrained) distribution."""


@dataclass
class EngineStats:
    """What the engine has done so far (read by ``/metrics`` and the benchmarks)."""

    slots: int = 0
    """Sequences the context holds (``n_parallel``)."""
    steps: int = 0
    """``llama_decode`` calls."""
    tokens: int = 0
    """Tokens decoded, prompt tokens included."""
    generated: int = 0
    """Tokens picked for generations."""
    decode_seconds: float = 0.0
    """Wall time spent inside ``llama_decode`` (the rest of a step is sampling and bookkeeping)."""
    finished: int = 0
    """Generations that ended or were closed."""
    max_active: int = 0
    """Most sequences decoded in one step."""
    active: int = 0
    """Sequences in the context now."""
    waiting: int = 0
    """Generations waiting for a free slot now."""


_END = object()
#: Engine threads still running: stopped and joined at interpreter exit, because a thread still
#: inside llama.cpp while the process tears down its C++ statics aborts the process.
_RUNNING: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_STOP_TIMEOUT_S = 30


@atexit.register
def _stop_all() -> None:
    for thread in list(_RUNNING):
        loop = getattr(thread, "loop", None)
        if loop is not None:
            loop.inbox.put(("stop", None))
    for thread in list(_RUNNING):
        thread.join(timeout=_STOP_TIMEOUT_S)


class Generation:
    """One generation's tokens, in order, as ``(token, logprob, entropy, end)``.

    ``logprob`` (of the token) and ``entropy`` (of the distribution it was picked from, in nats,
    before any grammar) are ``None`` unless :attr:`Sampling.logprobs` was asked for; ``end`` says
    the token
    is an end-of-generation token (the last item). Iteration stops when the sequence ends or
    reaches its budget; :meth:`close` (or leaving a ``with`` block) frees the slot early.
    """

    def __init__(self, loop: _Loop, tokens: list[int], max_tokens: int, sampling: Sampling) -> None:
        self._loop = loop
        self.prompt = tokens
        self.max_tokens = max_tokens
        self.sampling = sampling
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        # engine-thread state
        self.slot = -1
        self.read = 0  # prompt tokens already in the KV cache
        self.made = 0  # tokens picked so far
        self.last = -1  # the last picked token, fed back in the next step
        self.sampler: Any = None

    def __iter__(self) -> Iterator[tuple[int, float | None, float | None, bool]]:
        while True:
            item = self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop generating and free the slot (a no-op once the generation has ended)."""
        if not self._closed:
            self._closed = True
            self._loop.inbox.put(("cancel", self))

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # engine thread
    def _emit(self, item: Any) -> None:
        self._out.put(item)


class Engine:
    """A llama.cpp context with ``slots`` sequences, decoded by one engine thread.

    ``llm`` is a loaded ``llama_cpp.Llama``; the engine makes its own context from the same
    weights (``n_ctx`` tokens per slot) and keeps ``llm`` alive while it runs. ``thread_pool``
    (default) gives the context one ggml thread pool for its life; ``False`` leaves ggml to make
    one per decode call (kept for ``bench/thread_pool.py``). The thread stops,
    and the context is freed, when the engine is garbage-collected or :meth:`close` is called.
    """

    def __init__(
        self,
        llm: Any,
        *,
        slots: int,
        n_ctx: int,
        n_batch: int,
        n_threads: int | None,
        thread_pool: bool = True,
    ) -> None:
        self.slots = slots
        self.n_ctx = n_ctx
        self._loop = _Loop(
            llm,
            slots=slots,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            thread_pool=thread_pool,
        )
        self._thread = threading.Thread(
            target=self._loop.run, daemon=True, name="understudy-engine"
        )
        self._thread.loop = self._loop  # type: ignore[attr-defined]  # for _stop_all
        self._thread.start()
        _RUNNING.add(self._thread)
        self._finalizer = weakref.finalize(self, self._loop.inbox.put, ("stop", None))

    @property
    def stats(self) -> EngineStats:
        return self._loop.stats

    def generate(
        self, tokens: Sequence[int], *, max_tokens: int, sampling: Sampling | None = None
    ) -> Generation:
        """Queue a generation from ``tokens`` (the prompt) of at most ``max_tokens`` tokens.

        The caller must keep ``len(tokens) + max_tokens`` within :attr:`n_ctx`.
        """
        tokens = list(tokens)
        max_tokens = max(1, max_tokens)
        if not tokens:
            raise StudentError("an empty prompt cannot be decoded")
        if len(tokens) + max_tokens > self.n_ctx:
            raise StudentError(
                f"{len(tokens)} prompt tokens + {max_tokens} to generate exceed the slot's "
                f"context of {self.n_ctx} tokens"
            )
        gen = Generation(self._loop, tokens, max_tokens, sampling or Sampling())
        self._loop.inbox.put(("submit", gen))
        return gen

    def close(self) -> None:
        """Stop the engine thread (generations in flight end with an error) and free the context."""
        self._finalizer()
        self._thread.join(timeout=_STOP_TIMEOUT_S)


@dataclass
class _Slots:
    free: list[int]
    busy: dict[int, Generation] = field(default_factory=dict)


class _Loop:
    """The engine thread's state: the context, the batch, the sequences."""

    def __init__(
        self,
        llm: Any,
        *,
        slots: int,
        n_ctx: int,
        n_batch: int,
        n_threads: int | None,
        thread_pool: bool,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._llm = llm  # keeps the weights alive while the context uses them
        self._vocab = llm._model.vocab
        self.n_vocab = int(llm.n_vocab())
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = n_ctx * slots
        params.n_seq_max = slots
        self.n_batch = max(n_batch, slots)
        params.n_batch = params.n_ubatch = self.n_batch
        if n_threads is not None:
            params.n_threads = params.n_threads_batch = n_threads
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not ctx:
            raise StudentError(
                f"llama.cpp could not make a context of {slots} slots × {n_ctx} tokens; "
                "lower n_parallel or n_ctx"
            )
        self._ctx = ctx
        self.n_ctx = n_ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._pool = (
            _ThreadPool.attach_checked(
                ctx, int(params.n_threads), int(params.n_threads_batch), self._probe_logits
            )
            if thread_pool
            else None
        )
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.stats = EngineStats(slots=slots)
        self._slots = _Slots(free=list(range(slots - 1, -1, -1)))
        self._waiting: deque[Generation] = deque()

    def _probe_logits(self) -> np.ndarray:
        """The last logits of a fixed decode of up to 16 tokens on slot 0 (then forgotten)."""
        lib = self._lib
        n = min(16, self.n_batch, self.n_ctx)
        ids = (lib.llama_token * n)(*[(i * 7919) % self.n_vocab for i in range(1, n + 1)])
        if lib.llama_decode(self._ctx, lib.llama_batch_get_one(ids, n)) != 0:
            raise StudentError(f"llama.cpp could not decode a {n}-token probe")
        out = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, -1), (self.n_vocab,))
        logits = out.copy()
        lib.llama_memory_seq_rm(self._mem, 0, -1, -1)
        return logits

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while self._handle(self.inbox.get() if not self._slots.busy else None):
                self._admit()
                if self._slots.busy:
                    self._step()
        finally:
            err = StudentError("the student's engine stopped")
            for gen in [*self._slots.busy.values(), *self._waiting]:
                gen._emit(err)
            self._free()

    def _handle(self, first: tuple[str, Any] | None) -> bool:
        """Apply ``first`` and whatever else the inbox holds; ``False`` once asked to stop."""
        message = first
        while True:
            if message is not None:
                kind, gen = message
                if kind == "stop":
                    return False
                if kind == "submit":
                    self._waiting.append(gen)
                elif kind == "cancel":
                    if gen in self._waiting:
                        self._waiting.remove(gen)
                        gen._emit(_END)
                    elif gen.slot >= 0:
                        self._finish(gen)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
        self.stats.waiting = len(self._waiting)
        return True

    def _admit(self) -> None:
        while self._waiting and self._slots.free:
            gen = self._waiting.popleft()
            try:
                gen.sampler = self._sampler(gen.sampling)
            except StudentError as e:
                gen._emit(e)
                continue
            gen.slot = self._slots.free.pop()
            self._slots.busy[gen.slot] = gen
        self.stats.active = len(self._slots.busy)
        self.stats.waiting = len(self._waiting)

    def _step(self) -> None:
        lib, batch = self._lib, self._batch
        n = 0
        picks: list[tuple[Generation, int]] = []  # sequences whose next token is read at index

        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
            n += 1

        generating = [g for g in self._slots.busy.values() if g.read == len(g.prompt)]
        reading = [g for g in self._slots.busy.values() if g.read < len(g.prompt)]
        for gen in generating:
            picks.append((gen, n))
            add(gen.last, len(gen.prompt) + gen.made - 1, gen.slot, True)
        for gen in reading:
            room = self.n_batch - n
            if room <= 0:
                break
            chunk = gen.prompt[gen.read : gen.read + room]
            for i, token in enumerate(chunk):
                last = gen.read + i == len(gen.prompt) - 1
                if last:
                    picks.append((gen, n))
                add(token, gen.read + i, gen.slot, last)
            gen.read += len(chunk)
        batch.n_tokens = n
        started = time.perf_counter()
        status = lib.llama_decode(self._ctx, batch)
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.steps += 1
        self.stats.tokens += n
        self.stats.max_active = max(self.stats.max_active, len(generating) + len(reading))
        if status != 0:
            err = StudentError(
                f"llama.cpp could not decode a batch of {n} tokens (status {status})"
            )
            for gen in list(self._slots.busy.values()):
                gen._emit(err)
                self._finish(gen, end=False)
            return
        for gen, index in picks:
            self._pick(gen, index)

    def _pick(self, gen: Generation, index: int) -> None:
        lib = self._lib
        token = int(lib.llama_sampler_sample(gen.sampler, self._ctx, index))
        logprob = entropy = None
        if gen.sampling.logprobs:
            ptr = lib.llama_get_logits_ith(self._ctx, index)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            shifted = logits - float(logits.max())
            weights = np.exp(shifted)
            total = float(weights.sum())
            log_total = math.log(total)
            logprob = float(shifted[token]) - log_total
            # entropy of the next-token distribution: log Z - E[shifted logit]
            spread = float(weights @ shifted)
            if not math.isfinite(spread):  # a logit of -inf: weight 0, it adds nothing
                kept = weights > 0
                spread = float(weights[kept] @ shifted[kept])
            entropy = max(0.0, log_total - spread / total)
        end = bool(lib.llama_vocab_is_eog(self._vocab, token))
        gen.made += 1
        gen.last = token
        self.stats.generated += 1
        gen._emit((token, logprob, entropy, end))
        if end or gen.made >= gen.max_tokens:
            self._finish(gen)

    def _finish(self, gen: Generation, *, end: bool = True) -> None:
        """Free ``gen``'s slot and sampler; tell its reader it ended (``end``)."""
        if gen.slot < 0:
            return
        self._lib.llama_memory_seq_rm(self._mem, gen.slot, -1, -1)
        self._lib.llama_sampler_free(gen.sampler)
        del self._slots.busy[gen.slot]
        self._slots.free.append(gen.slot)
        gen.slot, gen.sampler = -1, None
        self.stats.finished += 1
        self.stats.active = len(self._slots.busy)
        if end:
            gen._emit(_END)

    def _sampler(self, s: Sampling) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.grammar is not None:
            grammar = lib.llama_sampler_init_grammar(
                self._vocab, s.grammar._grammar.encode("utf-8"), s.grammar._root.encode("utf-8")
            )
            if not grammar:
                lib.llama_sampler_free(chain)
                raise StudentError("llama.cpp refused the answer's grammar")
            lib.llama_sampler_chain_add(chain, grammar)
        if s.temperature > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return chain

    def _free(self) -> None:
        for gen in list(self._slots.busy.values()):
            self._lib.llama_sampler_free(gen.sampler)
        self._slots.busy.clear()
        self._waiting.clear()
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._pool is not None:
            self._pool.free()
            self._pool = None
        self._llm = None
