"""langchain-understudy: a distilled local student for a LangChain agent's routine work.

Importing the package is cheap: public names are loaded on first access, and nothing here imports
torch or llama.cpp.

Example:
    >>> import langchain_understudy
    >>> langchain_understudy.__version__  # doctest: +SKIP
    '0.1.0'
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("langchain-understudy")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "UnderstudyConfig": "langchain_understudy.config",
    "load_config": "langchain_understudy.config",
    "UnderstudyError": "langchain_understudy.errors",
    "ArtifactError": "langchain_understudy.errors",
    "ConfigError": "langchain_understudy.errors",
    "StudentError": "langchain_understudy.errors",
    "KnowledgeStoreError": "langchain_understudy.errors",
    "TraceError": "langchain_understudy.errors",
    "TeacherUnavailableError": "langchain_understudy.errors",
    "render_prompt": "langchain_understudy.prompting",
    "ChatStudent": "langchain_understudy.students",
    "StudentRegistry": "langchain_understudy.students",
    "export_gguf": "langchain_understudy.students",
    "quantize_gguf": "langchain_understudy.students",
    "KnowledgeStore": "langchain_understudy.retrieval",
    "ChatUnderstudy": "langchain_understudy.router",
    "Router": "langchain_understudy.router",
    "LearnedRouter": "langchain_understudy.router",
    "ResilientTeacher": "langchain_understudy.router",
    "TraceStore": "langchain_understudy.distill_jobs",
    "TraceRecorder": "langchain_understudy.distill_jobs",
    "DistillConfig": "langchain_understudy.distill_jobs",
    "DistillJob": "langchain_understudy.distill_jobs",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'langchain_understudy' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
