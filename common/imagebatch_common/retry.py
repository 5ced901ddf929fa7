"""When to try again: one ``Retry-After`` parser and one backoff function.

The image fetcher (per image, seconds apart) and the operator's webhook delivery (per
run, minutes to hours apart) both retry against servers that may say how long to wait.
A ``Retry-After`` header is either a number of seconds or an HTTP date; both forms are
read here and nowhere else.
"""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date); ``None`` if absent or bad.

    A date in the past means "now" (0 seconds).
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff(
    base: float, attempt: int, rng: random.Random | None = None, cap: float | None = None
) -> float:
    """Seconds before retry number ``attempt`` (1-based): exponential with equal jitter.

    Half of the delay is fixed and half random, so retries from many clients against one
    struggling server spread out while each still waits at least half the nominal delay.
    """
    ceiling = base * 2.0 ** max(attempt - 1, 0)
    if cap is not None:
        ceiling = min(ceiling, cap)
    jitter = (rng or random).uniform(0, ceiling / 2)
    return ceiling / 2 + jitter
