"""The package's errors: one base class and a few subclasses a caller can catch."""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "KnowledgeStoreError",
    "StudentError",
    "TeacherUnavailableError",
    "TraceError",
    "UnderstudyError",
]


class UnderstudyError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(UnderstudyError):
    """A configuration value or argument is invalid; the message says what is accepted."""


class ArtifactError(UnderstudyError):
    """A model file or registry entry is missing, foreign, truncated or tampered with."""


class StudentError(UnderstudyError):
    """The student cannot serve a request (context overflow, bad schema, runtime failure)."""


class KnowledgeStoreError(UnderstudyError):
    """The knowledge store cannot be read or written as asked."""


class TraceError(UnderstudyError):
    """A trace cannot be recorded, imported or parsed."""


class TeacherUnavailableError(UnderstudyError):
    """The teacher is down, over budget or forbidden for this conversation."""
