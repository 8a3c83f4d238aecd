"""Pretrained bases (a GGUF dequantized and cached) and exemplar memory, through the real job.

The tiny base is a random llama exported to GGUF (seconds); one slow test loads the real bundled
SmolLM2 file for the GGUF → checkpoint → GGUF round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import color_traces, corpus, tiny_job_toml
from langchain_core.messages import HumanMessage

from langchain_understudy.distill_jobs.bases import BASE_INFO_FILE, resolve_base
from langchain_understudy.distill_jobs.job import DistillConfig, DistillJob
from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.errors import ConfigError
from langchain_understudy.students import ChatStudent, StudentRegistry, export_gguf
from langchain_understudy.students.export import TOKENIZER_METADATA_FILE

pytestmark = pytest.mark.slow


def _same_tokens_and_logits(checkpoint: Path, gguf: Path, texts: list[str]) -> None:
    """llama.cpp's token ids equal the HF tokenizer's; its logits equal torch's."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    ids = tok(texts[0], add_special_tokens=False)["input_ids"][:48]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory, tiny_gguf_f32: Path) -> dict:
    d = tmp_path_factory.mktemp("pretrained_job")
    base = d / "base.gguf"
    base.write_bytes(tiny_gguf_f32.read_bytes())
    (d / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in color_traces(400)))
    TraceStore(d / "traces.sqlite").import_jsonl(d / "traces.jsonl")
    toml = tiny_job_toml("pre", '\n[exemplars]\nk = 3\n\n[package]\ndtype = "f32"\n')
    # the tiny [student] table describes a from-scratch model; a base replaces it
    toml = toml.replace("[student]\n", '[student]\nbase = "base.gguf"\n', 1)
    # and the base's tiny shape keys are ignored; drop its top block (keep_layers)
    toml = toml.replace("layers = 2\n", "keep_layers = 1\n", 1)
    (d / "job.toml").write_text(toml)
    cfg = DistillConfig.from_toml(d / "job.toml")
    job = DistillJob(cfg, progress=False)
    result = job.run()
    return {"dir": d, "cfg": cfg, "result": result, "job": job}


def test_gguf_base_is_dequantized_once_and_cached(tmp_path: Path, tiny_gguf_f32: Path) -> None:
    first = resolve_base(tiny_gguf_f32, cache_dir=tmp_path)
    info = json.loads((first / BASE_INFO_FILE).read_text())
    assert info["architecture"] == "LlamaForCausalLM"
    assert (first / TOKENIZER_METADATA_FILE).is_file()
    stamp = (first / BASE_INFO_FILE).stat().st_mtime_ns
    assert resolve_base(tiny_gguf_f32, cache_dir=tmp_path) == first  # keyed by sha256
    assert (first / BASE_INFO_FILE).stat().st_mtime_ns == stamp  # not converted again


def test_unknown_or_foreign_bases_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a built-in base"):
        resolve_base("no-such-model", cache_dir=tmp_path)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(ConfigError, match="could not load"):
        resolve_base(foreign, cache_dir=tmp_path)


def test_job_fine_tunes_a_gguf_base_and_keeps_its_tokenizer(pretrained_run: dict) -> None:
    result = pretrained_run["result"]
    assert result.status == "promoted", result.reason
    assert result.metrics["exact_match"] >= 0.9
    run_dir = result.run_dir
    final = run_dir / "train" / "final"
    assert (final / TOKENIZER_METADATA_FILE).is_file()
    assert json.loads((final / "config.json").read_text())["num_hidden_layers"] == 1
    _same_tokens_and_logits(final, run_dir / "student.f32.gguf", corpus(40, seed=3))


def test_exemplar_memory_is_registered_and_served(pretrained_run: dict) -> None:
    from langchain_understudy.retrieval.embeddings import default_embeddings

    cfg = pretrained_run["cfg"]
    reg = StudentRegistry(cfg.registry)
    v = reg.current()
    assert v is not None
    assert {"exemplars.npy", "exemplars.jsonl", "ood_index.npy"} <= set(v.files)
    assert v.provenance["exemplars"]["k"] == 3
    assert v.provenance["base"].endswith("base.gguf")
    rows = (v.artifact("exemplars.jsonl")).read_text().splitlines()
    assert len(rows) == pretrained_run["result"].metrics["n_train"]

    with pytest.raises(ConfigError, match="exemplar memory"):
        ChatStudent.from_registry(reg)  # without the embeddings it would serve blind
    student = ChatStudent.from_registry(reg, embeddings=default_embeddings(), max_tokens=8)
    assert student.exemplars is not None
    shown = student.exemplars.for_messages([HumanMessage("What color is the boat? It is red.")])
    assert len(shown) == 3
    assert len({e.answer for e in shown}) == 3  # distinct past answers
    answer = student.invoke("What color is the lamp 9001? It is green.")
    assert answer.content == "green"


def test_training_prompts_never_show_their_own_answer(pretrained_run: dict) -> None:
    job = pretrained_run["job"]
    run_dir = pretrained_run["result"].run_dir
    from langchain_understudy.students.exemplars import ExemplarMemory

    memory = ExemplarMemory.load(run_dir / "exemplars.npy", run_dir / "exemplars.jsonl")
    found = memory.search(job._train_vectors[:50], k=3, exclude_keys=memory.keys[:50])
    for i, exemplars in enumerate(found):
        assert memory.queries[i] not in [e.query for e in exemplars]


def test_base_and_base_checkpoint_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        DistillConfig(student={"base": "smollm2-135m-instruct", "base_checkpoint": "x"})
    with pytest.raises(ValueError, match="train_layers needs"):
        DistillConfig(student={"train_layers": 2})


def test_real_smollm2_round_trips_through_gguf(tmp_path: Path) -> None:
    """The bundled SmolLM2-135M-Instruct: GGUF → checkpoint → GGUF keeps tokens and logits."""
    from langchain_understudy.distill_jobs.bases import builtin_base_path

    try:
        builtin_base_path("smollm2-135m-instruct")
    except ConfigError as e:
        pytest.skip(str(e))
    ckpt = resolve_base("smollm2-135m-instruct")
    out = export_gguf(ckpt, tmp_path / "smol.f32.gguf", dtype="f32")
    texts = [
        "The capital of France is",
        *corpus(20, seed=5),
        "<|user|>\nhow much is pro? 1,000 EUR\n<|assistant|>\n",
    ]
    _same_tokens_and_logits(ckpt, out, texts)
