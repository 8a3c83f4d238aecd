"""Loading, quantizing and embedding with ``llama_cpp``, and checking GGUFs before llama.cpp does.

With ``_engine.py`` (the decoding engine) this is the only module that imports ``llama_cpp``.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
from pathlib import Path
from typing import Any

from langchain_understudy.errors import ArtifactError, ConfigError

__all__ = [
    "diagnose_gguf",
    "embed_token_ids",
    "gguf_problem",
    "grammar_class",
    "llama_quantize",
    "load_embedding_llama",
    "load_llama",
]


#: Sizes of GGUF's fixed-size value types (type id → bytes); 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _header_problem(data: bytes | mmap.mmap) -> str | None:
    """Walk a GGUF header checking every count and length against the bytes that are left.

    One flipped bit can turn a length into billions, and then both the ``gguf`` reader and
    llama.cpp loop (or allocate) for as long as that says; this walk refuses such a header in
    time proportional to the file.
    """
    import struct

    size = len(data)
    at = 0

    def take(fmt: str) -> Any:
        nonlocal at
        n = struct.calcsize(fmt)
        if at + n > size:
            raise ValueError(f"the header ends early (byte {at} of {size})")
        (value,) = struct.unpack_from(fmt, data, at)
        at += n
        return value

    def string() -> None:
        nonlocal at
        n = take("<Q")
        if n > size - at:
            raise ValueError(f"a string at byte {at} claims {n} bytes")
        at += n

    def value(kind: int, depth: int = 0) -> None:
        nonlocal at
        if kind in _GGUF_SIZES:
            take(f"<{ {1: 'B', 2: 'H', 4: 'I', 8: 'Q'}[_GGUF_SIZES[kind]] }")
        elif kind == 8:
            string()
        elif kind == 9 and depth == 0:
            inner, count = take("<I"), take("<Q")
            least = _GGUF_SIZES.get(inner, 8)  # a string or an array takes 8 bytes at least
            if count * least > size - at:
                raise ValueError(f"an array at byte {at} claims {count} items")
            if inner in _GGUF_SIZES:
                at += count * least
            else:
                for _ in range(count):
                    value(inner, depth + 1)
        else:
            raise ValueError(f"unknown value type {kind} at byte {at}")

    try:
        if take("<I") != 0x46554747:  # b"GGUF"
            raise ValueError("bad magic")
        version = take("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = take("<Q"), take("<Q")
        if n_tensors > size or n_kv > size:
            raise ValueError(f"it claims {n_tensors} tensors and {n_kv} metadata keys")
        for _ in range(n_kv):
            string()
            value(take("<I"))
        for _ in range(n_tensors):
            string()
            dims = take("<I")
            if not 1 <= dims <= 4:
                raise ValueError(f"a tensor with {dims} dimensions")
            for _ in range(dims):
                take("<Q")
            take("<I")
            take("<Q")
    except ValueError as e:
        return str(e)
    return None


def gguf_problem(path: Path) -> str | None:
    """Say why a file is not a sound GGUF, or return ``None`` when its structure checks out.

    Checks, without llama.cpp: the file exists and is a file, starts with the GGUF magic, every
    count and length in its header fits in the file, every tensor's data lies inside the file,
    and the vocabulary (when present) has as many token types and scores as tokens and no token
    twice. llama.cpp aborts the whole process on some of these (a duplicated token trips an
    assertion in its vocabulary loader) and loops for hours on others (a flipped bit that turns
    a string into an array of billions), so a caller can run this first and raise a clear error.
    """
    if not path.exists():
        return f"{path} does not exist; check the path or run `understudy students list`"
    if path.is_dir():
        return f"{path} is a folder; pass the .gguf file inside it"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e}); check its permissions"
    if magic != b"GGUF":
        return (
            f"{path} is not a GGUF file (starts with {magic!r}); export a Hugging Face checkpoint "
            "with `understudy students export CKPT OUT.gguf`"
        )
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            header = _header_problem(data)
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e}); check its permissions"
    if header is not None:
        return f"{path} is truncated or corrupt ({header}); re-export or re-copy it"
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        field = reader.fields.get("tokenizer.ggml.tokens")
        tokens = [bytes(field.parts[i]) for i in field.data] if field is not None else []
        counts = {
            key: len(per_token.data)
            for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores")
            if (per_token := reader.fields.get(key)) is not None
        }
    except Exception as e:  # noqa: BLE001 - gguf raises many types on short or garbled files
        return f"{path} is truncated or corrupt ({type(e).__name__}: {e}); re-export or re-copy it"
    if end > size:
        return f"{path} is truncated ({size} bytes, needs {end}); re-export or re-copy it"
    hparams = _hparams_problem(reader)
    if hparams is not None:
        return f"{path} is corrupt: {hparams}; re-export or re-copy it"
    for key, n in counts.items():
        if n != len(tokens):
            return (
                f"{path} is corrupt: {key} has {n} entries for {len(tokens)} tokens; re-export or "
                "re-copy it"
            )
    seen: set[bytes] = set()
    for token in tokens:
        if token in seen:
            return (
                f"{path} is corrupt: the vocabulary holds the token {token!r} twice (a damaged "
                "copy?); re-export or re-copy it"
            )
        seen.add(token)
    return None


#: Largest ``context_length`` taken as sound: llama-cpp-python allocates that many token ids to
#: tokenize, so a flipped high bit would ask for gigabytes.
MAX_CONTEXT_LENGTH = 1 << 27


def _architecture(reader: Any) -> str | None:
    """``general.architecture`` ("" when absent, ``None`` when it is not readable text)."""
    field = reader.fields.get("general.architecture")
    try:
        return bytes(field.parts[field.data[0]]).decode() if field else ""
    except (IndexError, UnicodeDecodeError):
        return None


def _scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or len(field.data) != 1 or len(field.types) != 1:
        return None
    part = field.parts[field.data[0]]
    return part.item() if getattr(part, "size", 0) == 1 else None


def _hparams_problem(reader: Any) -> str | None:
    """Say which model setting is impossible, or return ``None``.

    The settings checked are the ones that make llama.cpp abort the process (no layers, more than
    it supports, a negative norm epsilon) or allocate without bound (the context length).
    """
    arch = _architecture(reader)
    if arch is None:
        return "general.architecture is not readable text"
    blocks = {
        int(parts[1])
        for t in reader.tensors
        if (parts := str(t.name).split("."))[0] == "blk" and len(parts) > 2 and parts[1].isdigit()
    }
    n_layer = _scalar(reader, f"{arch}.block_count")
    if n_layer is not None and blocks and n_layer != max(blocks) + 1:
        return f"{arch}.block_count is {n_layer}, but the file holds {max(blocks) + 1} blocks"
    n_ctx = _scalar(reader, f"{arch}.context_length")
    if n_ctx is not None and not 0 < n_ctx <= MAX_CONTEXT_LENGTH:
        return f"{arch}.context_length is {n_ctx}"
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        eps = _scalar(reader, key)
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            return f"{key} is {eps}"
    return None


def diagnose_gguf(path: Path) -> str:
    """Explain why a file is not a loadable GGUF: missing, foreign, truncated or unsupported."""
    problem = gguf_problem(path)
    if problem is not None:
        return problem
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _architecture(reader)
    arch = "unreadable" if arch is None else arch or "unknown"
    return (
        f"llama.cpp could not load {path} (architecture {arch!r}); this llama-cpp-python build may "
        "not support that architecture: upgrade llama-cpp-python or export a llama/qwen2 student"
    )


def load_llama(
    path: Path,
    *,
    n_ctx: int,
    n_threads: int | None,
    n_gpu_layers: int,
    seed: int,
    n_batch: int = 512,
    logits_all: bool = False,
    verbose: bool = False,
) -> Any:
    """Load a GGUF into a ``llama_cpp.Llama``, turning llama.cpp's failures into clear errors."""
    import llama_cpp

    if not path.is_file():
        raise ArtifactError(diagnose_gguf(path))
    # some damage (a duplicated vocabulary token) makes llama.cpp abort the whole process, so
    # the structure is checked before llama.cpp sees the file
    problem = gguf_problem(path)
    if problem is not None:
        raise ArtifactError(problem)
    stderr = io.StringIO()
    try:
        # llama.cpp prints its load log to stderr; keep it for the error message instead.
        with contextlib.redirect_stderr(stderr):
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                n_batch=min(n_batch, n_ctx),
                seed=seed,
                logits_all=logits_all,
                verbose=verbose,
            )
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(diagnose_gguf(path)) from e


def load_embedding_llama(path: Path, *, n_ctx: int, n_threads: int) -> Any:
    """Load an encoder GGUF (BERT family) that pools each sequence into one vector.

    The pooling the file declares (``<arch>.pooling_type``) is used; every input token is an
    output, as llama.cpp requires in embedding mode.
    """
    import llama_cpp

    problem = gguf_problem(path)
    if problem is not None:
        raise ArtifactError(problem)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=0,
                verbose=False,
            )
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(diagnose_gguf(path)) from e


def embed_token_ids(llm: Any, ids: list[int]) -> Any:
    """Run one tokenized sequence through an embedding ``Llama``; return its pooled vector.

    One sequence per call: on CPU, packing several sequences into one batch was slower here
    (llama.cpp masks attention across the whole batch, so its cost grows with the batch, not
    with each sequence).
    """
    import llama_cpp
    import numpy as np

    n = len(ids)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = n
        memory = llama_cpp.llama_get_memory(llm.ctx)
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        rc = llama_cpp.llama_decode(llm.ctx, batch)
        if rc != 0:
            msg = f"llama.cpp failed to embed a sequence of {n} tokens (code {rc})"
            raise ArtifactError(msg)
        ptr = llama_cpp.llama_get_embeddings_seq(llm.ctx, 0)
        if not ptr:
            msg = "the embedding model returned no pooled vector; is it a sentence-embedding GGUF?"
            raise ArtifactError(msg)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_embd(),)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)


def llama_quantize(src: Path, dst: Path, ftype: int, *, n_threads: int = 0) -> None:
    """Run ``llama_model_quantize``; raise a clear error on failure instead of crashing."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs every tensor it quantizes otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        msg = (
            f"llama.cpp failed to quantize {src} (ftype {ftype}, code {rc}); check that it is an "
            "f32/f16 GGUF written by export_gguf and that the target type fits its tensor shapes"
        )
        raise ConfigError(msg)


def grammar_class() -> Any:
    """llama-cpp-python's ``LlamaGrammar`` (``from_string``, ``from_json_schema``)."""
    from llama_cpp import LlamaGrammar

    return LlamaGrammar
