"""Students from scratch: a byte-level BPE tokenizer trained on traces and a small llama config."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_understudy.prompting import END, SPECIAL_TOKENS

__all__ = ["PAD", "ScratchSize", "build_tokenizer", "init_student"]

PAD = "<|pad|>"


@dataclass(frozen=True)
class ScratchSize:
    """Shape of a from-scratch llama student.

    Attributes:
        hidden: Embedding width.
        layers: Transformer blocks.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention when fewer than ``heads``).
        ffn: Feed-forward width.
        context: Maximum positions.
    """

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 768
    context: int = 512


def build_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 4096,
    min_frequency: int = 2,
) -> Any:
    """Train a byte-level BPE tokenizer and save it as a fast HF tokenizer.

    Text is split before BPE with Qwen2's pre-tokenizer regex (llama.cpp's ``qwen2``), which keeps
    every digit a token of its own: a small student then copies numbers it has never seen (prices,
    times, counts) digit by digit instead of needing a merged token for each. The prompt format's
    role markers and end marker are single special tokens; ``<|end|>`` is the end-of-sequence
    token, so llama.cpp stops on it natively.

    Returns:
        The ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from langchain_understudy.students.export import QWEN2_SPLIT_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return fast


def init_student(tokenizer: Any, size: ScratchSize = ScratchSize(), *, seed: int = 0) -> Any:
    """Return a randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save_student(model: Any, tokenizer: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Save model and tokenizer as a Hugging Face checkpoint folder (safetensors)."""
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
