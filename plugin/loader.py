"""``load_understudy``: one config file in, a wired :class:`ChatUnderstudy` out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_understudy.config import UnderstudyConfig, load_config

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings

    from langchain_understudy.router import ChatUnderstudy

__all__ = [
    "DEFAULT_CONFIG",
    "load_understudy",
    "open_knowledge",
    "resolve_config",
    "student_from_version",
]

#: The config file looked for when none is named.
DEFAULT_CONFIG = "understudy.toml"


def student_from_version(version: Any, **kwargs: Any) -> Any:
    """A ``ChatStudent`` for a registry version with everything registered with it.

    A student distilled with exemplar memory gets the bundled embeddings (the job's default) to
    retrieve its exemplars with; pass ``embeddings=`` for others.
    """
    from langchain_understudy.retrieval.embeddings import default_embeddings
    from langchain_understudy.students import ChatStudent

    kwargs.setdefault("embeddings", default_embeddings)  # loaded only if the memory needs it
    return ChatStudent.from_version(version, **kwargs)


def resolve_config(
    config: str | os.PathLike[str] | UnderstudyConfig | None,
) -> UnderstudyConfig:
    """Return a config: as given, loaded from a file, or ``./understudy.toml`` when it exists.

    ``None`` uses ``./understudy.toml`` if there is one, else the defaults; ``UNDERSTUDY_*``
    environment variables apply either way.
    """
    if isinstance(config, UnderstudyConfig):
        return config
    if config is None:
        return load_config(DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    return load_config(config)


def open_knowledge(cfg: UnderstudyConfig, embeddings: Embeddings | None = None) -> Any:
    """Open the knowledge store a config names (``None`` when ``knowledge.path`` is unset)."""
    k = cfg.knowledge
    if k.path is None:
        return None
    from langchain_understudy.retrieval import KnowledgeStore

    emb = embeddings
    if emb is None and k.embedding_model is not None:
        from langchain_understudy.retrieval import load_embeddings

        emb = load_embeddings(k.embedding_model)
    # An existing store keeps its own index kind; the setting applies to a new one.
    exists = (Path(k.path) / "knowledge.sqlite").exists()
    return KnowledgeStore(k.path, emb, index=None if exists else k.index)


def load_understudy(
    config: str | os.PathLike[str] | UnderstudyConfig | None = DEFAULT_CONFIG,
    *,
    embeddings: Embeddings | None = None,
    teacher: Any = None,
    record_traces: bool = True,
    **kwargs: Any,
) -> ChatUnderstudy:
    """Build the routed chat model one config file describes.

    Wires the promoted student from the registry (or ``student.model_path``), the knowledge store,
    the router and its privacy rules, the teacher (guarded by timeouts, retries and budgets) and,
    when a teacher is configured, a :class:`~langchain_understudy.distill_jobs.recorder.TraceRecorder`
    on teacher calls so every teacher answer becomes a trace for the next distillation run.

    Args:
        config: A TOML file, an :class:`~langchain_understudy.config.UnderstudyConfig`, or
            ``None`` (``./understudy.toml`` if present, else defaults). ``UNDERSTUDY_*``
            environment variables override the file.
        embeddings: LangChain ``Embeddings`` for the store and the out-of-distribution signal
            (default: ``knowledge.embedding_model`` or the bundled all-MiniLM-L6-v2).
        teacher: A chat model used instead of the configured teacher.
        record_traces: Record teacher calls into ``traces.path``.
        **kwargs: Other :class:`~langchain_understudy.router.ChatUnderstudy` fields.

    Raises:
        ConfigError: the file is missing or invalid, or the teacher cannot be built.
        ArtifactError: no student is promoted and no ``student.model_path`` is set.

    Example:
        >>> from langchain_understudy.plugin import load_understudy
        >>> llm = load_understudy("understudy.toml")  # doctest: +SKIP
        >>> msg = llm.invoke("What does the Pro plan cost?")  # doctest: +SKIP
        >>> msg.response_metadata["understudy"]["answered_by"]  # doctest: +SKIP
        'student'
    """
    from langchain_understudy.router import ChatUnderstudy

    cfg = resolve_config(config)
    knowledge = open_knowledge(cfg, embeddings)
    if embeddings is not None:
        kwargs.setdefault("embeddings", embeddings)
    callbacks = list(kwargs.pop("trace_callbacks", None) or [])
    has_teacher = teacher is not None or cfg.teacher.kind != "none"
    if record_traces and has_teacher:
        from langchain_understudy.distill_jobs.recorder import TraceRecorder

        path = Path(cfg.traces.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        callbacks.append(TraceRecorder(path, redact=cfg.traces.redact, tags=["understudy:teacher"]))
    llm = ChatUnderstudy.from_config(
        cfg, knowledge=knowledge, teacher=teacher, trace_callbacks=callbacks or None, **kwargs
    )
    llm.current_student()  # fail now, with the registry's message, if nothing is promoted
    return llm
