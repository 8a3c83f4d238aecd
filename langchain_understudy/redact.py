r"""PII detection and redaction: emails, phone numbers, payment cards and IBANs.

One detector for the whole package: trace recording redacts with it before a trace is written
anywhere, and the router's privacy rules use it to keep conversations with personal data on the
machine. Each kind of PII is found by a deliberately
loose candidate pattern and then *validated*: card numbers must pass the Luhn check and start like
a card, IBANs must have their country's length and pass the ISO 13616 mod-97 check, phone numbers
must look like a dialled number (international ``+``/``00`` prefix, North American grouping, or a
national number with a trunk ``0`` and separators). Validation is what keeps order numbers, dates,
amounts and ids out of the redacted set. When a candidate fails, its sub-spans (whole groups of
digits) are tried, so a card number next to another number is still found.

Example:
    >>> r = Redactor(patterns={"ticket": r"TCK-\d{6}"})
    >>> r.redact("Mail jane.doe@example.com about TCK-123456, order 4111-1111-1111-1112.")
    'Mail <EMAIL> about <TICKET>, order 4111-1111-1111-1112.'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage, messages_from_dict, messages_to_dict

from langchain_understudy.errors import ConfigError

__all__ = ["BUILTIN_KINDS", "PiiMatch", "Redactor", "redact_text"]

#: Kinds of PII found without configuration; each becomes ``<KIND>`` in redacted text.
BUILTIN_KINDS: tuple[str, ...] = ("EMAIL", "IBAN", "CARD", "PHONE")

# Keys of LangChain message dicts (and tool calls) that hold structure, never user text.
_STRUCTURAL_KEYS = frozenset({"type", "id", "tool_call_id", "run_id", "index"})

# IBAN length per country (ISO 13616 registry); an unknown country code is not an IBAN.
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

_EMAIL = re.compile(
    r"(?<![\w.%+\-])[\w.%+\-]+@(?:[^\W_](?:[\w\-]{0,61}[^\W_])?\.)+[A-Za-z]{2,63}(?![\w\-])"
)
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ \-]?[A-Za-z0-9]){11,32}(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\w\-.,])\d(?:[ \-]?\d){12,18}(?![\w]|[\-.,]\d)")
_PHONE = re.compile(
    # The lookahead is redundant but lets the engine skip letters quickly.
    r"(?=[+(\d])(?<![\w+\-./,])(?:"
    # international: +CC or 00CC, then groups (an optional "(0)" trunk included)
    r"(?:\+|00)[1-9]\d{0,3}(?:[ .\-]?(?:\(\d{1,4}\)|\d{1,4})){1,7}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    r"|(?:\(\d{3}\)[ ]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}"
    # national with a trunk 0: 030 12345678, 020 7946 0958, 06 12 34 56 78, 0171/1234567
    r"|(?:\(0\d{1,4}\)|0\d{1,4})(?:[ /\-.]\d{2,8}){1,5}"
    r")(?![\w]|[\-./,]\d)"
)
_NANP = re.compile(r"(?:\(\d{3}\)[ ]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}")
_DATE_START = re.compile(r"\d{1,4}[./\-]\d{1,2}[./\-]\d{1,4}")
_IP_LIKE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_GROUP = re.compile(r"[^ .\-/]+")


@dataclass(frozen=True)
class PiiMatch:
    """One piece of PII found in a text.

    Attributes:
        kind: ``EMAIL``, ``PHONE``, ``CARD``, ``IBAN`` or the upper-cased name of a custom pattern.
        start: Offset of the first character.
        end: Offset just past the last character.
        text: The matched text.
    """

    kind: str
    start: int
    end: int
    text: str

    @property
    def placeholder(self) -> str:
        """The text that replaces the match, e.g. ``<EMAIL>``."""
        return f"<{self.kind}>"


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_DIGITS = re.compile(r"\d")
_NON_DIGITS = re.compile(r"\D+")


def _is_card(text: str) -> bool:
    digits = _NON_DIGITS.sub("", text)
    # Card numbers start with 2-6 (Mastercard, Amex, Visa, Discover, JCB, UnionPay, ...).
    if not (13 <= len(digits) <= 19 and digits[0] in "23456"):
        return False
    if len(digits) != len(text):
        seps = {c for c in text if not c.isdigit()}
        if len(seps) > 1:  # "4111 1111-1111 1111" is not how anyone writes a card number
            return False
        # Printed groupings: 4-4-4-4(-3) and friends, Amex 4-6-5, Diners 4-6-4.
        sizes = [len(g) for g in text.split(seps.pop())]
        fours = all(n == 4 for n in sizes[:-1]) and sizes[-1] in (3, 4)
        if not (fours or sizes in ([4, 6, 5], [4, 6, 4])):
            return False
    # Repeated digits (0000 0000 ...) pass Luhn but are placeholders, not cards.
    return len(set(digits)) > 1 and _luhn_ok(digits)


def _is_iban(text: str) -> bool:
    compact = text.replace(" ", "").replace("-", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _is_phone(text: str) -> bool:
    digits = _NON_DIGITS.sub("", text)
    if not 7 <= len(digits) <= 17 or len(set(digits)) < 3:  # 000 0000 0000: a filler
        return False
    if text.startswith("+"):
        return 8 <= len(digits) <= 15
    if text.startswith("00") and text[2:3] != "0":
        # The written-out international prefix is also how order ids start; ask for more digits.
        return 10 <= len(digits) - 2 <= 15
    if _DATE_START.match(text) or _IP_LIKE.fullmatch(text):
        return False
    if _NANP.fullmatch(text):
        return True
    # A national number: trunk 0 then a non-zero area digit, written with separators.
    has_sep = len(digits) != len(text.lstrip("(").replace(")", ""))
    return has_sep and digits[:1] == "0" and digits[1:2] != "0" and 9 <= len(digits) <= 12


_Validator = Callable[[str], bool]
_CACHE_SIZE = 2048
_CACHE_MAX_CHARS = 64_000


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    validate: _Validator | None = None
    # Which parts of a failed candidate to try: none, its prefixes (the start is anchored by
    # a country code or "+"), or any run of whole groups (a card after a quantity).
    trim: str = "none"
    # Cheap tests that must pass before the regex runs at all: the text has an "@", or at
    # least this many digits (a card has 13, a phone number 7).
    needs_at: bool = False
    min_digits: int = 0
    # Run the regex only in a window around each occurrence of this character (an email's
    # "@"): scanning every position of a long text for a local part is the slow part.
    anchor: str | None = None


_BUILTIN: dict[str, _Detector] = {
    "EMAIL": _Detector("EMAIL", _EMAIL, needs_at=True, anchor="@"),
    "IBAN": _Detector("IBAN", _IBAN, _is_iban, trim="end", min_digits=2),
    "CARD": _Detector("CARD", _CARD, _is_card, trim="any", min_digits=13),
    "PHONE": _Detector("PHONE", _PHONE, _is_phone, trim="any", min_digits=7),
}


def _sub_spans(text: str, start: int, trim: str) -> Iterable[tuple[int, int]]:
    """Spans of whole groups inside ``text``, longest first (absolute offsets)."""
    groups = [(m.start(), m.end()) for m in _GROUP.finditer(text)]
    n = len(groups)
    for size in range(n - 1, 0, -1):
        for i in range(0, n - size + 1 if trim == "any" else 1):
            yield start + groups[i][0], start + groups[i + size - 1][1]


class Redactor:
    """Finds PII in text and replaces it with typed placeholders such as ``<EMAIL>``.

    Args:
        patterns: Extra patterns, ``name -> regular expression``; a match becomes ``<NAME>``
            (the name upper-cased). Custom patterns are not validated beyond the regex.
        builtins: Which built-in kinds to detect (default: all of :data:`BUILTIN_KINDS`).

    Raises:
        ConfigError: a pattern does not compile, a name is not an identifier, or a built-in kind
            is unknown.

    Example:
        >>> Redactor().redact("IBAN DE89 3704 0044 0532 0130 00, call +49 30 1234567")
        'IBAN <IBAN>, call <PHONE>'
    """

    def __init__(
        self,
        patterns: Mapping[str, str | re.Pattern[str]] | None = None,
        *,
        builtins: Iterable[str] = BUILTIN_KINDS,
    ) -> None:
        # An agent re-sends its system prompt and the whole history on every call, and the
        # router checks that history on every request: remember recent findings so each
        # distinct text is scanned once, for redaction and privacy checks alike.
        self._cached = functools.lru_cache(maxsize=_CACHE_SIZE)(self._find)
        self._detectors: list[_Detector] = []
        for kind in builtins:
            key = kind.upper()
            if key not in _BUILTIN:
                msg = f"unknown built-in PII kind {kind!r}; use some of {', '.join(BUILTIN_KINDS)}"
                raise ConfigError(msg)
            self._detectors.append(_BUILTIN[key])
        for name, pattern in (patterns or {}).items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                msg = (
                    f"redaction pattern name must be letters, digits and '_' (it becomes "
                    f"the placeholder <{name.upper()}>), got {name!r}"
                )
                raise ConfigError(msg)
            try:
                compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
            except re.error as e:
                msg = f"redaction pattern {name!r} is not a valid regular expression ({e}); fix it"
                raise ConfigError(msg) from e
            self._detectors.append(_Detector(name.upper(), compiled))

    @property
    def kinds(self) -> list[str]:
        """The placeholder kinds this redactor produces."""
        return [d.kind for d in self._detectors]

    def find(self, text: str) -> list[PiiMatch]:
        """Return the PII in ``text``, in order, without overlaps (earliest, then longest, wins)."""
        if len(text) <= _CACHE_MAX_CHARS:
            return list(self._cached(text))
        return list(self._find(text))

    def _find(self, text: str) -> tuple[PiiMatch, ...]:
        found: list[PiiMatch] = []
        digits = len(text) - len(_DIGITS.sub("", text))
        for d in self._detectors:
            if digits < d.min_digits or (d.needs_at and "@" not in text):
                continue
            for m in self._candidates(text, d):
                if any(p.start <= m.start() and m.end() <= p.end for p in found):
                    continue  # inside PII already found (a card-like run inside an IBAN)
                span = self._validated_span(text, m, d)
                if span is not None and span[1] > span[0]:
                    found.append(PiiMatch(d.kind, span[0], span[1], text[span[0] : span[1]]))
        if len(found) > 1:
            found.sort(key=lambda p: (p.start, p.start - p.end))
        out: list[PiiMatch] = []
        end = -1
        for p in found:
            if p.start >= end:
                out.append(p)
                end = p.end
        return tuple(out)

    @staticmethod
    def _candidates(text: str, d: _Detector) -> Iterable[re.Match[str]]:
        if d.anchor is None:
            yield from d.pattern.finditer(text)
            return
        # Walk back from each "@" over characters a local part may hold, then match once there.
        end = -1
        i = text.find(d.anchor)
        while i >= 0:
            j = i
            while j > 0 and i - j < 64 and (text[j - 1].isalnum() or text[j - 1] in "._%+-"):
                j -= 1
            m = d.pattern.match(text, j, min(len(text), i + 256)) if j >= end else None
            if m is not None:
                end = m.end()
                yield m
            i = text.find(d.anchor, max(i + 1, end))

    @staticmethod
    def _validated_span(text: str, m: re.Match[str], d: _Detector) -> tuple[int, int] | None:
        if d.validate is None or d.validate(m.group()):
            return m.start(), m.end()
        if d.trim == "none":
            return None
        # A loose candidate may have swallowed a neighbouring number or word; try its parts.
        for start, end in _sub_spans(m.group(), m.start(), d.trim):
            if d.validate(text[start:end]):
                return start, end
        return None

    def redact(self, text: str) -> str:
        """Return ``text`` with every match replaced by its placeholder."""
        matches = self.find(text)
        if not matches:
            return text
        parts: list[str] = []
        pos = 0
        for p in matches:
            parts.append(text[pos : p.start])
            parts.append(p.placeholder)
            pos = p.end
        parts.append(text[pos:])
        return "".join(parts)

    def redact_value(self, value: Any) -> Any:
        """Redact every string inside nested dicts and lists (keys and structural fields kept)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {
                k: v if k in _STRUCTURAL_KEYS else self.redact_value(v) for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.redact_value(v) for v in value]
        return value

    def redact_message_dicts(self, dicts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Redact messages already in ``messages_to_dict`` form (content, tool calls, kwargs)."""
        return [
            {"type": d["type"], "data": self.redact_value(d["data"])} if "data" in d else dict(d)
            for d in dicts
        ]

    def redact_messages(self, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
        """Return redacted copies of ``messages``; tool-call arguments are redacted too."""
        return messages_from_dict(self.redact_message_dicts(messages_to_dict(messages)))


_DEFAULT: Redactor | None = None


def redact_text(text: str) -> str:
    """Redact ``text`` with the built-in detectors.

    Example:
        >>> redact_text("reach me at jane@example.com or (555) 123-4567")
        'reach me at <EMAIL> or <PHONE>'
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Redactor()
    return _DEFAULT.redact(text)
