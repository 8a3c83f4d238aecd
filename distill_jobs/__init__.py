"""Distillation jobs: traces in, a gated, registered GGUF student out.

``TraceStore`` + ``TraceRecorder`` capture the teacher's calls; ``DistillJob`` turns them into a
student by sequence-level knowledge distillation, packages, evaluates, gates and registers it;
``run_schedule`` runs it repeatedly.
"""

from langchain_understudy.distill_jobs.dataset import Example, build_examples, split_examples
from langchain_understudy.distill_jobs.evaluation import EvalReport, evaluate_student
from langchain_understudy.distill_jobs.job import (
    DistillConfig,
    DistillJob,
    JobLockedError,
    JobResult,
)
from langchain_understudy.distill_jobs.recorder import TraceRecorder
from langchain_understudy.distill_jobs.redact import BUILTIN_KINDS, PiiMatch, Redactor, redact_text
from langchain_understudy.distill_jobs.schedule import run_schedule
from langchain_understudy.distill_jobs.traces import (
    ImportReport,
    ModelStats,
    Trace,
    TraceStats,
    TraceStore,
    snapshot_hash,
)
from langchain_understudy.distill_jobs.training import TrainResult, TrainSettings, train_student

__all__ = [
    "BUILTIN_KINDS",
    "DistillConfig",
    "DistillJob",
    "EvalReport",
    "Example",
    "ImportReport",
    "JobLockedError",
    "JobResult",
    "ModelStats",
    "PiiMatch",
    "Redactor",
    "Trace",
    "TraceRecorder",
    "TraceStats",
    "TraceStore",
    "TrainResult",
    "TrainSettings",
    "build_examples",
    "evaluate_student",
    "redact_text",
    "run_schedule",
    "snapshot_hash",
    "split_examples",
    "train_student",
]
