"""PII redaction for traces; the implementation lives in :mod:`langchain_understudy.redact`.

The router's privacy rules use the same detector, so "what is redacted before a trace is written"
and "what never leaves the machine" are one definition.
"""

from __future__ import annotations

from langchain_understudy.redact import BUILTIN_KINDS, PiiMatch, Redactor, redact_text

__all__ = ["BUILTIN_KINDS", "PiiMatch", "Redactor", "redact_text"]
