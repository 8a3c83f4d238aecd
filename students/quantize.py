"""Quantize a GGUF with llama.cpp's own quantizer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.students.registry import publish

__all__ = ["QUANT_TYPES", "quantize_gguf"]

#: Supported target types → llama.cpp ``llama_ftype`` values.
QUANT_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
}
# Row-length block size each target needs. llama.cpp itself falls back for k-quant tensors whose
# rows are not a multiple of 256 (to Q4_0/Q5_0/Q5_1/Q8_0 or F16); those fallbacks need 32.
_BLOCK = {"F32": 1, "F16": 1, "Q4_0": 32, "Q8_0": 32, "Q4_K_M": 32, "Q5_K_M": 32, "Q6_K": 32}


def _check_shapes(src: Path, qtype: str) -> None:
    import gguf

    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:
        msg = f"{src} is not a readable GGUF file ({e}); re-export it with export_gguf"
        raise ArtifactError(msg) from e
    block = _BLOCK[qtype]
    for t in reader.tensors:
        if len(t.shape) < 2:
            continue  # 1-D tensors (norms, biases) stay f32 whatever the target
        if int(t.shape[0]) % block:
            msg = (
                f"cannot quantize {src.name} to {qtype}: tensor {t.name} has rows of "
                f"{int(t.shape[0])} values, not a multiple of {block}. Use F16, or a model whose "
                f"hidden and feed-forward sizes are multiples of {block} (256 for full k-quant use)."
            )
            raise ConfigError(msg)


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str = "Q8_0",
    *,
    n_threads: int = 0,
) -> Path:
    """Quantize ``src`` to ``dst`` with llama.cpp's quantizer.

    k-quant targets (``Q4_K_M``, ``Q5_K_M``, ``Q6_K``) need rows that are multiples of 256;
    llama.cpp quantizes tensors that are not with a compatible fallback type (``Q5_0``, ``Q8_0``,
    ... per its own rules), which is what tiny students get. Rows that no supported type can take
    (not a multiple of 32) raise :class:`ConfigError` before llama.cpp is called.

    Args:
        src: An f32/f16 GGUF (from :func:`export_gguf`).
        dst: Output path, written atomically.
        qtype: One of :data:`QUANT_TYPES`.
        n_threads: Threads for the quantizer; 0 lets llama.cpp choose.

    Returns:
        ``dst`` as a path.
    """
    qtype = qtype.upper()
    if qtype not in QUANT_TYPES:
        msg = f"qtype must be one of {', '.join(QUANT_TYPES)}, got {qtype!r}"
        raise ConfigError(msg)
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_file():
        msg = f"cannot quantize {src_p}: no such file"
        raise ArtifactError(msg)
    _check_shapes(src_p, qtype)
    from langchain_understudy.students._llama import llama_quantize

    dst_p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst_p.name + ".", suffix=".tmp", dir=dst_p.parent)
    os.close(fd)
    try:
        llama_quantize(src_p, Path(tmp), QUANT_TYPES[qtype], n_threads=n_threads)
        publish(tmp, dst_p)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dst_p
