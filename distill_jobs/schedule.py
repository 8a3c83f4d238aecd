"""Run a distillation job repeatedly, on an interval or a cron expression, one run at a time."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from langchain_understudy.errors import ConfigError

__all__ = ["next_run", "parse_every", "run_schedule"]

logger = logging.getLogger(__name__)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> timedelta:
    """Parse ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"`` (or combinations like ``"1h30m"``)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        msg = f"--every must look like 30m, 6h or 1d, got {text!r}"
        raise ConfigError(msg)
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        msg = f"--every must be positive, got {text!r}"
        raise ConfigError(msg)
    return timedelta(seconds=seconds)


def next_run(now: datetime, *, every: timedelta | None = None, cron: str | None = None) -> datetime:
    """Return when the next run is due after ``now``."""
    if cron is not None:
        from croniter import croniter

        if not croniter.is_valid(cron):
            msg = f"--cron must be a 5-field cron expression like '0 3 * * *', got {cron!r}"
            raise ConfigError(msg)
        nxt: datetime = croniter(cron, now).get_next(datetime)
        return nxt
    if every is None:
        msg = "give --every or --cron"
        raise ConfigError(msg)
    return now + every


def run_schedule(
    run_once: Callable[[], str],
    *,
    every: timedelta | None = None,
    cron: str | None = None,
    max_runs: int | None = None,
    run_now: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    log: Callable[[str], None] = logger.info,
) -> int:
    """Call ``run_once`` on schedule until ``max_runs`` runs happened (forever when ``None``).

    ``run_once`` returns a one-line outcome that is logged; an exception is logged and the schedule
    goes on (a failed run never touches the serving student). Returns the number of runs.
    """
    runs = 0
    due = clock() if run_now else next_run(clock(), every=every, cron=cron)
    while max_runs is None or runs < max_runs:
        wait = (due - clock()).total_seconds()
        if wait > 0:
            log(f"next run at {due.isoformat(timespec='seconds')}")
            sleep(wait)
        started = clock()
        try:
            outcome = run_once()
        except Exception as e:  # keep the schedule alive; the outcome says what failed
            outcome = f"failed: {type(e).__name__}: {e}"
        runs += 1
        log(f"{started.isoformat(timespec='seconds')} run {runs}: {outcome}")
        # keep to the schedule's own slots; slots missed while a run was going are skipped
        due = next_run(due, every=every, cron=cron)
        while due <= clock():
            due = next_run(due, every=every, cron=cron)
    return runs
