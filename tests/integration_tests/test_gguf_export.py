"""GGUF export checked by llama.cpp itself: same token ids, same logits, quantization agreement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from langchain_understudy.errors import ArtifactError, ConfigError
from langchain_understudy.students import export_gguf, quantize_gguf

pytestmark = pytest.mark.slow

VARIED = [
    "The Pro plan costs 49.00 EUR per month.",
    "Zürich café naïve résumé 東京 données straße 😀",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "whitespace   runs\t\ttabs\n\nnewlines    end   ",
    "  leading spaces and trailing   ",
    "MiXeD CaSe it's we'll they've I'd",
    "emoji 🚀🔥 and symbols #$%^&*()[]{}<>~`|\\",
    "",
]


def _llama(path: Path, *, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=2, logits_all=logits_all, verbose=False, seed=0
    )


def test_token_ids_match_hf_tokenizer(tiny_checkpoint: Path, tiny_gguf_f32: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    llm = _llama(tiny_gguf_f32)
    for text in VARIED:
        expected = hf.encode(text, add_special_tokens=False)
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert got == expected, text
    # role markers are single special tokens on both sides
    marked = "<|user|>\nhi<|end|>"
    assert llm.tokenize(marked.encode(), add_bos=False, special=True) == hf.encode(
        marked, add_special_tokens=False
    )


def _torch_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_logits_match_torch_at_f32(tiny_checkpoint: Path, tiny_gguf_f32: Path) -> None:
    llm = _llama(tiny_gguf_f32, logits_all=True)
    ids = llm.tokenize(" ".join(VARIED).encode(), add_bos=False)[:120]
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    ref = _torch_logits(tiny_checkpoint, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3


def test_q8_0_agrees_with_f32_on_top1(tiny_gguf_f32: Path, tiny_gguf: Path) -> None:
    text = " ".join(VARIED * 3).encode()
    ref_llm = _llama(tiny_gguf_f32, logits_all=True)
    ids = ref_llm.tokenize(text, add_bos=False)[:250]
    ref_llm.eval(ids)
    ref = np.array(ref_llm.scores[: len(ids)]).argmax(-1)
    q8 = _llama(tiny_gguf, logits_all=True)
    q8.eval(ids)
    got = np.array(q8.scores[: len(ids)]).argmax(-1)
    assert (ref == got).mean() >= 0.99
    assert tiny_gguf.stat().st_size < 0.5 * tiny_gguf_f32.stat().st_size


@pytest.mark.parametrize("qtype", ["F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"])
def test_every_quant_type_loads(tiny_gguf_f32: Path, tmp_path: Path, qtype: str) -> None:
    out = quantize_gguf(tiny_gguf_f32, tmp_path / f"m.{qtype}.gguf", qtype)
    llm = _llama(out)
    assert len(llm.tokenize(b"plan price", add_bos=False)) > 0
    llm.eval(llm.tokenize(b"plan price", add_bos=False))


def test_f16_export_and_provenance_metadata(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import gguf

    out = export_gguf(
        tiny_checkpoint, tmp_path / "m.gguf", dtype="f16", provenance={"teacher_model": "t-1"}
    )
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields

    def s(key: str) -> str:
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert s("general.architecture") == "llama"
    assert s("tokenizer.ggml.model") == "gpt2"
    assert s("tokenizer.ggml.pre") == "qwen2"  # the job's tokenizers split every digit
    assert s("understudy.teacher_model") == "t-1"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_unsupported_architecture_names_supported(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        export_gguf(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_tokenizer_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="supported"):
        export_gguf(ckpt, tmp_path / "x.gguf")


def test_quantize_refuses_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        quantize_gguf(tmp_path / "nope.gguf", tmp_path / "out.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ArtifactError, match="not a readable GGUF"):
        quantize_gguf(bad, tmp_path / "out.gguf")
    with pytest.raises(ConfigError, match="qtype must be one of"):
        quantize_gguf(bad, tmp_path / "out.gguf", "Q3_XYZ")
