"""The retry schedule: what an HTTP status means, how long to wait before trying again.

Pure functions, no I/O and no clock of their own: the caller passes ``now`` and
the random draw, so the schedule is reproducible in tests.

- :func:`classify` maps a webhook's HTTP status to ``delivered`` / ``retry`` /
  ``permanent`` (Standard Webhooks: 2xx done, listed 4xx never, the rest again).
- :func:`backoff` is exponential backoff with *full* jitter (AWS architecture
  blog, "Exponential Backoff And Jitter"): a uniform draw in ``[0, cap)`` where
  the cap doubles per attempt up to ``max_seconds``.
- :func:`parse_retry_after` reads an HTTP ``Retry-After`` header (RFC 9110
  §10.2.3): delta-seconds or an HTTP-date, capped at :data:`MAX_RETRY_AFTER_SECONDS`
  so a receiver cannot park a message for a week.

Settings read by the callers: ``delivery.retry_initial_seconds``,
``delivery.retry_max_seconds``, ``delivery.permanent_statuses``.
"""

from __future__ import annotations

import datetime
import email.utils
import math
from collections.abc import Collection
from typing import Literal

#: Longest wait a ``Retry-After`` header can ask for; longer values are cut to this.
MAX_RETRY_AFTER_SECONDS = 3600.0
#: Beyond this exponent the doubling cap is certainly above any ``max_seconds``.
_MAX_EXPONENT = 1000

Classification = Literal["delivered", "retry", "permanent"]


def classify(status: int, permanent_statuses: Collection[int]) -> Classification:
    """What a webhook's answer means for this delivery.

    2xx is ``delivered``; a status in ``permanent_statuses`` (e.g. 400, 410) is
    ``permanent``; everything else, 3xx (redirects are not followed), 408, 429,
    5xx and every other 4xx (401/403/404 recover once the receiver is fixed), is
    ``retry``.
    """
    if 200 <= status <= 299:
        return "delivered"
    if status in permanent_statuses:
        return "permanent"
    return "retry"


def backoff(attempt: int, *, initial_seconds: float, max_seconds: float, rand: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first one).

    ``rand * min(max_seconds, initial_seconds * 2 ** (attempt - 1))`` with ``rand``
    a uniform draw in ``[0, 1)``: the result is always within ``[0, max_seconds]``.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand}")
    if initial_seconds < 0 or max_seconds < 0:
        raise ValueError("initial_seconds and max_seconds must not be negative")
    cap = min(max_seconds, math.ldexp(initial_seconds, min(attempt - 1, _MAX_EXPONENT)))
    return rand * cap


def parse_retry_after(
    value: str | None, now: float, *, cap_seconds: float = MAX_RETRY_AFTER_SECONDS
) -> float | None:
    """Seconds a ``Retry-After`` header asks us to wait, or ``None`` if absent or invalid.

    ``now`` is the current Unix time (for the HTTP-date form). A date in the past
    means "now" (``0.0``); a negative or malformed value is ignored (``None``);
    anything above ``cap_seconds`` is cut to it.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # Compare lengths first: int() of a huge digit string is slow or refused.
        if len(text) > 12:
            return cap_seconds
        return min(float(int(text)), cap_seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; parsedate_to_datetime leaves "-0000" naive.
        when = when.replace(tzinfo=datetime.UTC)
    delay = when.timestamp() - now
    return min(max(delay, 0.0), cap_seconds)
