"""Sequence-level knowledge distillation: cross-entropy on the teacher's answer tokens only.

Training runs through Hugging Face ``Trainer``, so the same code runs on one CPU here and on many GPUs
under ``accelerate launch`` or ``torchrun`` (DDP/FSDP) without changes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from langchain_understudy.distill_jobs.dataset import Example
from langchain_understudy.distill_jobs.scratch import (
    ScratchSize,
    build_tokenizer,
    init_student,
)
from langchain_understudy.errors import ConfigError
from langchain_understudy.prompting import END, drop_oldest

__all__ = [
    "IGNORE_INDEX",
    "LoraSettings",
    "distillation_loss",
    "TrainResult",
    "TrainSettings",
    "encode_example",
    "pad_batch",
    "plot_loss",
    "train_student",
]

#: Label value for prompt and padding positions: excluded from the loss.
IGNORE_INDEX = -100


@dataclass
class LoraSettings:
    """LoRA adapters trained on a base checkpoint and merged into it before export."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainSettings:
    """Optimisation settings (mirrors the ``[training]`` table of a job config)."""

    epochs: float = 3.0
    max_steps: int = -1
    max_minutes: float | None = None
    learning_rate: float = 1e-3
    batch_size: int = 32
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    save_every: int = 200
    save_every_minutes: float | None = None
    keep_checkpoints: int | None = 2
    seed: int = 0
    vocab_size: int = 4096
    size: ScratchSize = field(default_factory=ScratchSize)
    base_checkpoint: str | None = None
    threads: int | None = None
    lora: LoraSettings | None = None
    train_layers: int | None = None
    keep_layers: int | None = None
    group_by_length: bool = False


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint_dir: Path
    steps: int
    seconds: float
    final_loss: float | None
    losses: list[tuple[int, float]]
    n_train: int
    n_skipped_long: int
    n_params: int
    n_trainable: int | None = None
    world_size: int = 1

    def save(self, out_dir: Path) -> None:
        """Record the result next to the checkpoint so a resumed job can skip training."""
        d = asdict(self)
        d["checkpoint_dir"] = str(self.checkpoint_dir)
        (out_dir / "result.json").write_text(json.dumps(d))

    @classmethod
    def load(cls, out_dir: Path) -> TrainResult:
        """Read a result written by :meth:`save`."""
        d = json.loads((out_dir / "result.json").read_text())
        d["checkpoint_dir"] = Path(d["checkpoint_dir"])
        d["losses"] = [tuple(x) for x in d["losses"]]
        return cls(**d)


def end_as_eos(tokenizer: Any) -> bool:
    """Whether answers end on the tokenizer's EOS instead of the ``<|end|>`` marker.

    A pretrained base has no ``<|end|>`` token; its answers end on its own end-of-sequence token,
    so llama.cpp stops natively (one token, not the five the marker splits into).
    """
    return END not in tokenizer.get_vocab() and tokenizer.eos_token_id is not None


def encode_example(
    tokenizer: Any, example: Example, max_len: int, *, eos_ends: bool | None = None
) -> dict[str, list[int]] | None:
    """Tokenize prompt and target separately, exactly as serving sees them; mask the prompt.

    Args:
        tokenizer: The student's tokenizer.
        example: The example.
        max_len: Longest sequence kept.
        eos_ends: :func:`end_as_eos` of the tokenizer (computed when ``None``; pass it when
            encoding many examples).

    A conversation too long for ``max_len`` loses its oldest turns, one at a time, as serving
    shortens it (:func:`~langchain_understudy.prompting.drop_oldest`). Returns ``None`` when
    even the last turn (with the system line, tools and facts) does not fit.
    """
    text, eos = example.target, []
    if eos_ends is None:
        eos_ends = end_as_eos(tokenizer)
    if eos_ends and text.endswith(END):
        text, eos = text[: -len(END)], [tokenizer.eos_token_id]
    target = [*tokenizer(text, add_special_tokens=False)["input_ids"], *eos]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    prompt_text, messages = example.prompt, example.messages
    while True:
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = [*bos, *prompt, *target]
        if len(ids) <= max_len:
            break
        shorter = drop_oldest(messages)
        if shorter is None:
            return None
        messages = shorter
        prompt_text = example.prompt_of(messages)
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + list(target)
    return {"input_ids": ids, "labels": labels}


def pad_batch(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def distillation_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over the teacher's tokens, computing logits only where they count.

    The prompt positions are masked out of the loss anyway; projecting them onto the vocabulary
    (49k rows for a pretrained base) is most of the output layer's cost on long prompts with
    short answers. Logits are computed from the first position that predicts a teacher token
    to the end of the batch, which gives exactly the loss of ``model(**batch).loss``.
    """
    import torch

    labels = batch["labels"]
    targets = labels[:, 1:]
    predicts = (targets != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(predicts[0]) if len(predicts) else 0
    width = labels.shape[1]
    keep = torch.arange(first, width - 1, device=labels.device)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    )
    logits = out.logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets[:, first:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def _freeze_below(model: Any, train_layers: int) -> None:
    """Train only the top ``train_layers`` blocks and the final norm of a llama-family model."""
    core = model.get_decoder()
    blocks = list(core.layers)
    if train_layers > len(blocks):
        msg = f"student.train_layers is {train_layers} but the base has {len(blocks)} blocks"
        raise ConfigError(msg)
    for p in model.parameters():
        p.requires_grad = False
    for block in blocks[len(blocks) - train_layers :]:
        for p in block.parameters():
            p.requires_grad = True
    for p in core.norm.parameters():
        p.requires_grad = True


def _keep_bottom(model: Any, keep: int) -> None:
    """Drop all but the bottom ``keep`` transformer blocks of a llama-family model."""
    core = model.get_decoder()
    n = len(core.layers)
    if keep > n:
        msg = f"student.keep_layers is {keep} but the base has {n} blocks"
        raise ConfigError(msg)
    core.layers = core.layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:keep]


def _load_or_create(
    examples: Sequence[Example], out: Path, settings: TrainSettings
) -> tuple[Any, Any, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.base_checkpoint:
        base = Path(settings.base_checkpoint)
        if not (base / "config.json").exists():
            msg = f"base_checkpoint {base} is not a Hugging Face checkpoint folder (no config.json)"
            raise ConfigError(msg)
        tok = AutoTokenizer.from_pretrained(str(base))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(base))
        max_len = min(2048, int(getattr(model.config, "max_position_embeddings", 2048)))
        if settings.keep_layers is not None:
            _keep_bottom(model, settings.keep_layers)
        if settings.train_layers is not None:
            _freeze_below(model, settings.train_layers)
        if settings.lora is not None:
            model = _with_lora(model, settings.lora)
        return model, tok, max_len
    tok_dir = out / "tokenizer"
    texts = (t for ex in examples for t in (ex.prompt, ex.target))
    tok = build_tokenizer(texts, tok_dir, vocab_size=settings.vocab_size)
    model = init_student(tok, settings.size, seed=settings.seed)
    return model, tok, settings.size.context


def _with_lora(model: Any, lora: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    missing = [
        m for m in lora.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())
    ]
    if missing:
        msg = (
            f"LoRA target modules {missing} are not in the base checkpoint; llama-family names "
            "are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
        raise ConfigError(msg)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train_student(
    examples: Sequence[Example],
    out_dir: str | os.PathLike[str],
    settings: TrainSettings,
    *,
    resume: bool = False,
    progress_bar: bool = True,
) -> TrainResult:
    """Train a student on ``examples`` and save a Hugging Face checkpoint in ``out_dir/final``.

    The learning rate follows a cosine schedule over whichever ends first, the step budget or the
    time budget (``max_minutes``), so a run cut short by time still ends annealed.

    Args:
        examples: Training examples (held-out ones must not be passed).
        out_dir: Run folder; checkpoints go to ``out_dir/checkpoints``.
        settings: Optimisation and model settings.
        resume: Continue from the newest checkpoint in ``out_dir/checkpoints``.
        progress_bar: Show steps, examples per second and the time left in the budget.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if resume and (out / "tokenizer").exists() and not settings.base_checkpoint:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        model = init_student(tok, settings.size, seed=settings.seed)
        max_len = settings.size.context
    else:
        model, tok, max_len = _load_or_create(examples, out, settings)
    eos_ends = end_as_eos(tok)
    encoded = [encode_example(tok, ex, max_len, eos_ends=eos_ends) for ex in examples]
    data = [e for e in encoded if e is not None]
    if not data:
        msg = (
            "no training example fits the student's context; raise size.context or shorten prompts"
        )
        raise ConfigError(msg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    budget_s = settings.max_minutes * 60 if settings.max_minutes else None
    start = time.monotonic()
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = (
        settings.max_steps
        if settings.max_steps > 0
        else math.ceil(steps_per_epoch * settings.epochs)
    )
    warmup = max(1, int(settings.warmup_ratio * total))

    def progress(step: int) -> float:
        p = step / total
        if budget_s:
            p = max(p, (time.monotonic() - start) / budget_s)
        return min(1.0, p)

    ckpts = sorted(
        (out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
    )
    resume_from = ckpts[-1] if resume and ckpts else None
    # training seconds before this process: a resumed run's checkpoints keep counting from there
    before_s = (checkpoint_seconds(resume_from) or 0.0) if resume_from else 0.0
    every_s = settings.save_every_minutes * 60 if settings.save_every_minutes else None
    next_save_s = [every_s]

    class _Budget(TrainerCallback):
        """Stop at the time budget; checkpoint every ``save_every_minutes`` too."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            elapsed = time.monotonic() - start
            if budget_s and elapsed >= budget_s:
                control.should_training_stop = True
                control.should_save = True
            due = next_save_s[0]
            if due is not None and every_s is not None and before_s + elapsed >= due:
                control.should_save = True
                next_save_s[0] = (math.floor((before_s + elapsed) / every_s) + 1) * every_s
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # each checkpoint says how long it trained and can be exported on its own
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                seconds = before_s + time.monotonic() - start
                info = {"train_seconds": seconds, "step": state.global_step}
                (ckpt / CHECKPOINT_INFO_FILE).write_text(json.dumps(info))
                _copy_tokenizer_metadata(settings, ckpt)

    class _Progress(TrainerCallback):
        """One bar: steps, examples per second, loss and the time left in the budget."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero and progress_bar:
                from tqdm import tqdm

                # on a terminal the bar redraws; in a log file a line every 30 s is enough
                every = 0.1 if sys.stderr.isatty() else 30.0
                self.bar = tqdm(total=total, desc="train", unit="step", mininterval=every)
                self.bar.update(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is None:
                return
            elapsed = max(1e-9, time.monotonic() - start)
            seen = state.global_step * settings.batch_size * max(1, args.world_size)
            left = (total - state.global_step) * elapsed / max(1, state.global_step)
            if budget_s:
                left = min(left, max(0.0, budget_s - elapsed))
            post = {"ex/s": f"{seen / elapsed:.1f}", "left": f"{left / 60:.1f}min"}
            if self.loss is not None:
                post["loss"] = f"{self.loss:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    class _Trainer(Trainer):
        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            loss = distillation_loss(model, inputs)
            return (loss, None) if return_outputs else loss

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            opt: Any = optimizer or self.optimizer

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(step)))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return self.lr_scheduler

    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.epochs,
        max_steps=total,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        logging_steps=max(1, min(50, total // 50)),
        save_steps=settings.save_every,
        save_total_limit=settings.keep_checkpoints,
        report_to=[],
        seed=settings.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,  # _Progress shows examples/s and the time left instead
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
    )
    trainer = _Trainer(
        model=model,
        args=args,
        processing_class=tok,  # every checkpoint carries the tokenizer: each one exports
        train_dataset=data,
        data_collator=lambda feats: pad_batch(feats, pad_id),
        callbacks=[_Budget(), _Progress()],
    )
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = out / "final"
    main = trainer.is_world_process_zero()  # under DDP only rank 0 writes the checkpoint
    if main:
        final.mkdir(parents=True, exist_ok=True)
    if settings.lora is not None:
        # adapters merged into the base weights: the export sees a plain llama checkpoint
        peft_model: Any = trainer.model
        merged = peft_model.merge_and_unload()
        if main:
            merged.save_pretrained(str(final))
    else:
        trainer.save_model(str(final))
    if main:
        tok.save_pretrained(str(final))
    if main:
        _copy_tokenizer_metadata(settings, final)
    losses = [(int(r["step"]), float(r["loss"])) for r in trainer.state.log_history if "loss" in r]
    result = TrainResult(
        checkpoint_dir=final,
        steps=int(trainer.state.global_step),
        seconds=time.monotonic() - start,
        final_loss=losses[-1][1] if losses else None,
        losses=losses,
        n_train=len(data),
        n_skipped_long=len(encoded) - len(data),
        n_params=n_params,
        n_trainable=n_trainable,
        world_size=int(args.world_size),
    )
    if main:
        result.save(out)
    return result


#: Written into every checkpoint folder: its step and the training seconds it took to get there.
CHECKPOINT_INFO_FILE = "understudy_checkpoint.json"


def _copy_tokenizer_metadata(settings: TrainSettings, folder: Path) -> None:
    """A GGUF base's own tokenizer metadata travels with a checkpoint to the export."""
    from langchain_understudy.students.export import TOKENIZER_METADATA_FILE

    if settings.base_checkpoint:
        meta = Path(settings.base_checkpoint) / TOKENIZER_METADATA_FILE
        if meta.is_file():
            shutil.copy2(meta, folder / TOKENIZER_METADATA_FILE)


def checkpoint_seconds(checkpoint: str | os.PathLike[str]) -> float | None:
    """Training seconds recorded in a checkpoint folder (``None``: not recorded)."""
    try:
        info = json.loads((Path(checkpoint) / CHECKPOINT_INFO_FILE).read_text())
        return float(info["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_checkpoints(out_dir: str | os.PathLike[str]) -> list[tuple[int, float | None, Path]]:
    """The kept checkpoints of a training folder as ``(step, train_seconds, path)``, by step.

    Each one holds the weights and the tokenizer, so :func:`~langchain_understudy.students.
    export_gguf` turns it into a GGUF file (learning curves: evaluate every checkpoint; a
    LoRA run's checkpoints hold adapters only).
    """
    found = []
    for p in Path(out_dir).glob("checkpoints/checkpoint-*"):
        if p.name.split("-")[1].isdigit():
            found.append((int(p.name.split("-")[1]), checkpoint_seconds(p), p))
    return sorted(found, key=lambda t: t[0])


def plot_loss(
    losses: Sequence[tuple[int, float]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Write the training-loss curve as a PNG."""
    from langchain_understudy._extras import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on teacher tokens")
    ax.set_yscale("log")
    ax.set_title(title or "distillation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
