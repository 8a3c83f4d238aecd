"""A small, conservative detector for personal data that must not leave the machine.

It finds e-mail addresses, phone numbers, payment card numbers (Luhn-checked) and IBANs
(mod-97-checked). It is a guard for routing, not a redaction tool: when in doubt it reports a match,
because a false positive only keeps a conversation on the local student.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PII_KINDS", "PiiMatch", "find_pii"]

PII_KINDS: tuple[str, ...] = ("email", "phone", "card", "iban")

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b")
# digit runs with the separators people type in card and phone numbers
_DIGITS = re.compile(r"(?<![\w.,])(?:\+|00)?\d(?:[\d \-.()/]{5,22})\d(?![\w])")
_DATE = re.compile(r"^\d{1,4}([-./])\d{1,2}\1\d{1,4}$")
_DECIMAL = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class PiiMatch:
    """One piece of personal data found in a text.

    Attributes:
        kind: ``"email"``, ``"phone"``, ``"card"`` or ``"iban"``.
        start: Offset of the match in the text.
        end: Offset just past the match.
    """

    kind: str
    start: int
    end: int


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def find_pii(text: str, kinds: tuple[str, ...] = PII_KINDS) -> list[PiiMatch]:
    """Return the personal data found in ``text``, in order of appearance.

    Args:
        text: Any text.
        kinds: Which kinds to look for.

    Example:
        >>> [m.kind for m in find_pii("mail me at ana@example.org or call +41 44 668 18 00")]
        ['email', 'phone']
    """
    found: list[PiiMatch] = []
    if "email" in kinds:
        found += [PiiMatch("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if "iban" in kinds:
        found += [
            PiiMatch("iban", m.start(), m.end())
            for m in _IBAN.finditer(text)
            if _iban_ok(m.group())
        ]
    taken = [(m.start, m.end) for m in found]
    for m in _DIGITS.finditer(text):
        if any(s < m.end() and m.start() < e for s, e in taken):
            continue
        raw = m.group().strip()
        digits = re.sub(r"\D", "", raw)
        if _DATE.match(raw) or _DECIMAL.match(raw):
            continue
        if "card" in kinds and 13 <= len(digits) <= 19 and _luhn_ok(digits):
            found.append(PiiMatch("card", m.start(), m.end()))
        elif "phone" in kinds and 8 <= len(digits) <= 15:
            found.append(PiiMatch("phone", m.start(), m.end()))
    return sorted(found, key=lambda p: p.start)
