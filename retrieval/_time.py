"""Fact times: ``as_of`` values in (datetime, date, ISO-8601 string, epoch seconds), UTC out."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime

from langchain_understudy.errors import ConfigError

__all__ = ["TimeLike", "from_timestamp", "to_iso", "to_timestamp"]

TimeLike = datetime | date | str | int | float
"""What an ``as_of`` may be: a ``datetime``/``date`` (naive means UTC), an ISO-8601 string, or
Unix epoch seconds."""


def to_timestamp(value: object, *, what: str = "as_of") -> float:
    """Return ``value`` as Unix epoch seconds (UTC).

    Args:
        value: A ``datetime`` or ``date`` (naive values are taken as UTC), an ISO-8601 string
            such as ``"2024-05-01"`` or ``"2024-05-01T12:00:00+02:00"``, or epoch seconds.
        what: The name used in error messages.

    Raises:
        ConfigError: ``value`` is none of the above.
    """
    ts = _to_timestamp(value, what)
    try:
        from_timestamp(ts).isoformat()  # every stored time must read back
    except (OverflowError, ValueError, OSError) as e:
        msg = f"{what} {value!r} is outside the times this store can represent (years 1-9999)"
        raise ConfigError(msg) from e
    return ts


def _to_timestamp(value: object, what: str) -> float:
    if isinstance(value, bool):
        pass  # a bool is an int to Python, never a time to a user
    elif isinstance(value, int | float):
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, datetime):
        return _aware(value).timestamp()
    elif isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    elif isinstance(value, str):
        try:
            return _aware(datetime.fromisoformat(value.strip())).timestamp()
        except ValueError as e:
            msg = (
                f"{what} must be an ISO-8601 time such as 2024-05-01 or 2024-05-01T12:00:00Z, "
                f"got {value!r}"
            )
            raise ConfigError(msg) from e
    msg = (
        f"{what} must be a datetime, a date, an ISO-8601 string or epoch seconds, "
        f"got {value!r} ({type(value).__name__})"
    )
    raise ConfigError(msg)


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def from_timestamp(ts: float) -> datetime:
    """Return epoch seconds as an aware UTC ``datetime``."""
    return datetime.fromtimestamp(ts, tz=UTC)


def to_iso(ts: float | None) -> str:
    """Return epoch seconds as a compact ISO-8601 UTC string (``""`` for ``None``)."""
    if ts is None:
        return ""
    dt = from_timestamp(ts)
    spec = "seconds" if dt.microsecond == 0 else "milliseconds"
    return dt.isoformat(timespec=spec).replace("+00:00", "Z")
