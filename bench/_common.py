"""Shared helpers for the benchmarks: traces files, job runs, result files, machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"


# CLINC150 follow-up turns that only make sense with the conversation before them
FOLLOW_RECENT = (
    "Same again, please.",
    "Do that one more time.",
    "And again?",
    "Can you repeat that for me?",
    "Once more, like before.",
)
FOLLOW_FIRST = (
    "Back to my first question.",
    "What about the first one?",
    "And the first thing I asked?",
)
FOLLOW_OTHER = ("And the other one?",)


def clinc_conversation(
    query: str,
    intent: str,
    pool: list[list[str]] | list[tuple[str, str]],
    rng: Any,
    dependent_fraction: float,
) -> tuple[list[tuple[str, str]], str, bool]:
    """A 2-4 turn conversation ending with ``query`` (or a follow-up that needs the history).

    Earlier turns are other (query, intent) rows from ``pool`` answered with their intent. Returns
    the ``(role, text)`` turns, the intent that answers the last turn, and whether the last turn
    depends on the earlier ones.
    """
    n_turns = rng.choice((2, 3, 4))
    history = [rng.choice(pool) for _ in range(n_turns - 1)]
    turns: list[tuple[str, str]] = []
    for hq, hi in history:
        turns += [("user", hq), ("assistant", hi)]
    if intent != "oos" and rng.random() < dependent_fraction:
        kind = rng.choice(("recent", "first", "other") if n_turns == 2 else ("recent", "first"))
        if kind == "recent":
            text, ref = rng.choice(FOLLOW_RECENT), history[-1][1]
        elif kind == "first":
            text, ref = rng.choice(FOLLOW_FIRST), history[0][1]
        else:
            text, ref = rng.choice(FOLLOW_OTHER), history[0][1]
        return [*turns, ("user", text)], ref, True
    return [*turns, ("user", query)], intent, False


def require_data(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: the benchmarks read ../shared/data beside the repository"
        )
    return path


def write_traces(
    path: Path, rows: Iterable[tuple[list[dict[str, str]], str, dict[str, Any]]]
) -> int:
    """Write (messages, teacher answer, metadata) as OpenAI chat fine-tuning JSONL."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for messages, answer, meta in rows:
            obj = {
                "messages": [*messages, {"role": "assistant", "content": answer}],
                "metadata": meta,
            }
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def stop_process(proc: Any, timeout_s: float = 20) -> None:
    """Terminate a server subprocess; kill it if it has not exited after ``timeout_s``."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    return out


def table(headers: list[str], rows: list[list[Any]]) -> str:
    from langchain_understudy.plugin._table import format_table

    return format_table(headers, rows)


def cached_minilm(cache_file: Path, texts: list[str]) -> object:
    """The bundled MiniLM embeddings with vectors for ``texts`` computed once and kept on disk.

    The store records the embeddings' name, which stays the bundled model's, so the cache is only
    a shortcut for benchmark reruns; the vectors are the model's own.
    """
    import numpy as np

    from langchain_understudy.retrieval.embeddings import SentenceTransformerEmbeddings

    class Cached(SentenceTransformerEmbeddings):
        def __init__(self, table: dict[str, np.ndarray]) -> None:
            super().__init__()
            self.table = table

        def embed_documents(self, docs: list[str]) -> list[list[float]]:
            missing = [d for d in dict.fromkeys(docs) if d not in self.table]
            if missing:
                for d, v in zip(missing, super().embed_documents(missing), strict=True):
                    self.table[d] = np.asarray(v, dtype=np.float32)
            return [self.table[d].tolist() for d in docs]

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    unique = list(dict.fromkeys(texts))
    if cache_file.exists():
        z = np.load(cache_file, allow_pickle=False)
        keys = [str(k) for k in z["texts"]]
        table = dict(zip(keys, z["vectors"], strict=True))
    else:
        table = {}
    emb = Cached(table)
    todo = [t for t in unique if t not in table]
    if todo:
        from tqdm import tqdm

        for i in tqdm(range(0, len(todo), 512), desc="embed (cached for reruns)"):
            emb.embed_documents(todo[i : i + 512])
        np.savez(cache_file, texts=np.array(list(table)), vectors=np.stack(list(table.values())))
    return emb


def checkpoint_curve(
    run_dir: Path,
    make_student: Any,
    examples: list[Any],
    *,
    quant: str = "Q8_0",
    desc: str = "checkpoint",
    save_every: int | None = None,
) -> list[dict[str, Any]]:
    """Exact match of every kept training checkpoint of a job run, by training minutes.

    Each checkpoint (``[training] save_every_minutes``, ``keep_checkpoints``) is exported to GGUF
    and quantized as the job's package stage does, then served by ``make_student(gguf_path)``
    (the registered student's exemplars and answer space, another file) on ``examples``.
    Checkpoints at multiples of ``save_every`` (the step-interval ones) are left out.
    """
    from langchain_understudy.distill_jobs.evaluation import evaluate_student
    from langchain_understudy.distill_jobs.training import training_checkpoints
    from langchain_understudy.students import export_gguf, quantize_gguf

    points = []
    for step, seconds, ckpt in training_checkpoints(run_dir / "train"):
        if seconds is None or (save_every and step % save_every == 0):
            continue
        f16 = export_gguf(ckpt, run_dir / f"curve-{step}.f16.gguf")
        gguf = quantize_gguf(f16, run_dir / f"curve-{step}.{quant}.gguf", quant)
        f16.unlink()
        rep = evaluate_student(make_student(gguf), examples, desc=f"{desc} {seconds / 60:.1f} min")
        points.append({"step": step, "train_minutes": seconds / 60, "exact_match": rep.exact_match})
        gguf.unlink()
        print(f"checkpoint {step}: {seconds / 60:.1f} min, exact match {rep.exact_match:.4f}")
    return points


def plot_curve(
    path: Path, curves: dict[str, list[dict[str, Any]]], baselines: dict[str, float], title: str
) -> Path:
    """Accuracy against training minutes, one line per student, dashed lines for baselines."""
    from langchain_understudy._extras import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for name, points in curves.items():
        ax.plot(
            [p["train_minutes"] for p in points],
            [p["exact_match"] for p in points],
            marker="o",
            label=name,
        )
    for name, value in baselines.items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.annotate(name, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8)
    ax.set_xlabel("CPU training minutes (2 threads)")
    ax.set_ylabel("test exact match")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
