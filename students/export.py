"""Hugging Face checkpoint → GGUF, written with the ``gguf`` package.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` (both written as llama.cpp's ``llama``
architecture, q/k rows permuted for its RoPE layout) and ``Qwen2ForCausalLM`` (``qwen2``, NeoX RoPE, no
permutation), each with a fast byte-level BPE tokenizer (``tokenizer.json``) using the GPT-2, Llama-3 or
Qwen2 pre-tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.students.registry import publish

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_PRE_TOKENIZERS",
    "TOKENIZER_METADATA_FILE",
    "export_gguf",
    "read_safetensors",
    "read_tokenizer_metadata",
]

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# Regexes of the Split pre-tokenizer → llama.cpp's pre-tokenizer name.
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2's pre-tokenizer split (one token per digit); the distillation job's tokenizers use it.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel (GPT-2 regex)": "gpt-2",
    "Split(Llama-3 regex) + ByteLevel": "llama-bpe",
    "Split(Qwen2 regex) + ByteLevel": "qwen2",
}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
#: Version of the metadata this exporter writes under ``understudy.*``.
FORMAT_VERSION = 1
#: A checkpoint made from a GGUF base keeps that file's ``tokenizer.*`` metadata here (JSON);
#: :func:`export_gguf` writes it back verbatim so the student tokenizes exactly as its base.
TOKENIZER_METADATA_FILE = "understudy_tokenizer.json"


def read_tokenizer_metadata(gguf_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every ``tokenizer.*`` key of a GGUF file as JSON-ready data.

    Returns:
        ``{"fields": [{"key", "type", "sub_type", "value"}, ...]}`` with GGUF value-type numbers.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # gguf raises several types for damaged files
        msg = f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})"
        raise ArtifactError(msg) from e
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        fields.append(
            {
                "key": key,
                "type": int(vtype),
                "sub_type": int(sub) if sub is not None else None,
                "value": value,
            }
        )
    if not any(f["key"] == "tokenizer.ggml.tokens" for f in fields):
        msg = f"{gguf_path} has no tokenizer (tokenizer.ggml.tokens); it cannot serve as a base"
        raise ArtifactError(msg)
    return {"fields": fields}


def _write_tokenizer_metadata(w: Any, meta: dict[str, Any]) -> int:
    """Write metadata read by :func:`read_tokenizer_metadata`; returns the vocabulary size."""
    import gguf

    n_tokens = 0
    for f in meta["fields"]:
        sub = gguf.GGUFValueType(f["sub_type"]) if f["sub_type"] is not None else None
        w.add_key_value(f["key"], f["value"], gguf.GGUFValueType(f["type"]), sub_type=sub)
        if f["key"] == "tokenizer.ggml.tokens":
            n_tokens = len(f["value"])
    return n_tokens


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        msg = f"{path} is missing; a checkpoint folder needs config.json and tokenizer.json"
        raise ArtifactError(msg) from e
    except json.JSONDecodeError as e:
        msg = f"{path} is not valid JSON ({e}); re-save the checkpoint with save_pretrained()"
        raise ArtifactError(msg) from e
    if not isinstance(data, dict):
        msg = f"{path} must hold a JSON object"
        raise ArtifactError(msg)
    return data


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def _rope_scaling(cfg: dict[str, Any]) -> tuple[str, float] | None:
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return "linear", float(params["factor"])
    msg = (
        f"RoPE scaling {kind!r} is not supported by export_gguf; supported: none (default) and "
        "'linear'. Convert this checkpoint with llama.cpp's convert_hf_to_gguf.py instead."
    )
    raise ConfigError(msg)


def _pre_tokenizer_name(tok: dict[str, Any]) -> str:
    if tok.get("normalizer") not in (None, {}):
        msg = (
            "tokenizer.json has a normalizer, which llama.cpp's BPE tokenizer does not apply; "
            f"supported pre-tokenizers: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
        raise ConfigError(msg)
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            msg = "a ByteLevel pre-tokenizer with add_prefix_space=True is not supported"
            raise ConfigError(msg)
        if pre.get("use_regex", True):
            return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            regex = parts[0].get("pattern", {}).get("Regex")
            if regex == _LLAMA3_RE:
                return "llama-bpe"
            if regex == QWEN2_SPLIT_REGEX:
                return "qwen2"
    msg = (
        f"unsupported pre-tokenizer {json.dumps(pre)[:200]}; supported: "
        f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}"
    )
    raise ConfigError(msg)


def _token_id(tok_cfg: dict[str, Any], key: str, vocab: Mapping[str, int]) -> int | None:
    value = tok_cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return vocab.get(value)
    return None


def _tokenizer_meta(ckpt: Path, vocab_size: int) -> dict[str, Any]:
    tok = _read_json(ckpt / "tokenizer.json")
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        msg = (
            f"tokenizer model {model.get('type')!r} is not supported; export_gguf needs a byte-level "
            "BPE tokenizer.json (GPT-2, Llama-3 or Qwen2 style)"
        )
        raise ConfigError(msg)
    pre = _pre_tokenizer_name(tok)
    vocab: dict[str, int] = dict(model["vocab"])
    specials: dict[str, bool] = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
        specials[added["content"]] = bool(added.get("special", False))
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_TOKEN_UNUSED] * n
    for text, idx in vocab.items():
        tokens[idx] = text
        if text in specials:
            types[idx] = _TOKEN_CONTROL if specials[text] else _TOKEN_USER_DEFINED
        else:
            types[idx] = _TOKEN_NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tok_cfg_path = ckpt / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    template = tok_cfg.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").exists():
        template = (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    post = json.dumps(tok.get("post_processor") or {})
    add_bos = tok_cfg.get("add_bos_token")
    bos_id = _token_id(tok_cfg, "bos_token", vocab)
    if add_bos is None:
        add_bos = bos_id is not None and tokens[bos_id] in post
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": bos_id,
        "eos": _token_id(tok_cfg, "eos_token", vocab),
        "unk": _token_id(tok_cfg, "unk_token", vocab),
        "pad": _token_id(tok_cfg, "pad_token", vocab),
        "add_bos": bool(add_bos),
        "chat_template": template if isinstance(template, str) else None,
    }


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into numpy arrays: memory-mapped, no pickle, no torch.

    bf16 tensors come back as float32 (the same numbers: bf16 is float32's top half).
    """
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is None:
                msg = f"{path}: tensor {name} is {meta['dtype']}; only F32, F16, BF16 and I64 are read"
                raise ArtifactError(msg)
            start, end = meta["data_offsets"]
            raw = data[start:end]
            array = raw.view(dtype)
            if meta["dtype"] == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[name] = array.reshape(meta["shape"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        msg = f"{path} is not a readable safetensors file ({e}); re-save or re-copy the checkpoint"
        raise ArtifactError(msg) from e
    return out


def _iter_weights(ckpt: Path) -> Iterator[tuple[str, np.ndarray]]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (ckpt / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        msg = (
            f"no model.safetensors in {ckpt}; save the checkpoint with "
            "save_pretrained(safe_serialization=True)"
        )
        raise ArtifactError(msg)
    for name in files:
        for key, array in read_safetensors(ckpt / name).items():
            yield key, np.asarray(array, dtype=np.float32)


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half RoPE to llama.cpp's interleaved layout."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    msg = f"tensor {hf_name!r} has no GGUF mapping; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    raise ConfigError(msg)


def _write_tokenizer(w: Any, tok: dict[str, Any]) -> None:
    """Write a tokenizer read from ``tokenizer.json`` by :func:`_tokenizer_meta`."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, adder in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("unk", w.add_unk_token_id),
        ("pad", w.add_pad_token_id),
    ):
        if tok[key] is not None:
            adder(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(False)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])


def export_gguf(
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    dtype: Literal["f32", "f16"] = "f16",
    provenance: Mapping[str, str | int | float] | None = None,
) -> Path:
    """Convert a Hugging Face checkpoint of the llama family to a GGUF file llama.cpp loads.

    Args:
        checkpoint_dir: Folder with ``config.json``, ``model.safetensors`` (or shards) and
            ``tokenizer.json`` (plus ``tokenizer_config.json`` for special tokens / chat template).
            A checkpoint made from a GGUF base (``understudy_tokenizer.json`` beside the weights)
            gets its base's tokenizer metadata back verbatim: pre-tokenizer, special tokens,
            BOS/EOS and chat template.
        out_path: The GGUF file to write; written atomically (a temporary file, then a rename).
        dtype: ``"f16"`` or ``"f32"`` for 2-D weights; norms and biases are always f32.
        provenance: Extra metadata stored under ``understudy.<key>``.

    Returns:
        The written path.

    Raises:
        ConfigError: the architecture, tokenizer or RoPE scaling is not supported (the message
            lists what is).
        ArtifactError: a required file is missing or unreadable.

    Example:
        >>> export_gguf("runs/42/checkpoint", "student.f16.gguf")  # doctest: +SKIP
        PosixPath('student.f16.gguf')
    """
    import gguf

    if dtype not in ("f16", "f32"):
        msg = f"dtype must be 'f16' or 'f32', got {dtype!r}; quantize afterwards with quantize_gguf"
        raise ConfigError(msg)
    ckpt = Path(checkpoint_dir)
    cfg = _read_json(ckpt / "config.json")
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        msg = f"architecture {hf_arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        raise ConfigError(msg)
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    n_embd = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    vocab_size = int(cfg["vocab_size"])
    base_tok_file = ckpt / TOKENIZER_METADATA_FILE
    base_tok = _read_json(base_tok_file) if base_tok_file.exists() else None
    tok = None if base_tok is not None else _tokenizer_meta(ckpt, vocab_size)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(str(provenance.get("name", ckpt.name)) if provenance else ckpt.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(n_embd)
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        scaling = _rope_scaling(cfg)
        if scaling is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(scaling[1])
        w.add_file_type(
            gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
        )
        if base_tok is not None:
            n_tokens = _write_tokenizer_metadata(w, base_tok)
        else:
            assert tok is not None
            n_tokens = len(tok["tokens"])
            _write_tokenizer(w, tok)
        w.add_vocab_size(n_tokens)
        w.add_uint32("understudy.format_version", FORMAT_VERSION)
        w.add_string("understudy.source_architecture", hf_arch)
        w.add_string("understudy.exported_at", datetime.now(UTC).isoformat(timespec="seconds"))
        for key, value in (provenance or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                w.add_string(f"understudy.{key}", str(value))
            elif isinstance(value, int):
                w.add_int64(f"understudy.{key}", value)
            else:
                w.add_float64(f"understudy.{key}", float(value))

        tied = bool(cfg.get("tie_word_embeddings", False))
        permute = arch == "llama"
        for hf_name, data in _iter_weights(ckpt):
            name = _gguf_name(hf_name)
            if name is None or (tied and name == "output.weight"):
                continue
            if permute and name.endswith("attn_q.weight"):
                data = _permute(data, n_head)
            elif permute and name.endswith("attn_k.weight"):
                data = _permute(data, n_head_kv)
            if name == "token_embd.weight" or name == "output.weight":
                rows = n_tokens
                if data.shape[0] < rows:  # tokenizer has more ids than the embedding: pad
                    pad = np.zeros((rows - data.shape[0], data.shape[1]), dtype=data.dtype)
                    data = np.concatenate([data, pad])
            if data.ndim >= 2 and dtype == "f16":
                data = data.astype(np.float16)
            else:
                data = data.astype(np.float32)
            w.add_tensor(name, np.ascontiguousarray(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
