"""Site pauses: a site that answers 429 or 503 is left alone for a while, by every replica.

A 429 is the clearest sign that our traffic is not insubstantial (CEPIC guideline, "Necessity":
visits must not materially increase a site's traffic). The site's own `Retry-After` (RFC 9110
10.2.3: delay-seconds or an HTTP-date) is honoured; without one we back off exponentially.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import time
from dataclasses import dataclass

THROTTLE_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class PausePolicy:
    """How long to leave a site alone after it throttles us.

    With a Retry-After: that long, at least `min_pause` (a 429 says we were too fast even when the
    header says 0) and at most `max_pause` (a broken header must not silence a site for a year).
    Without one: `base`, doubling with each throttling answer after the previous pause ended, up
    to `cap`. The doubling starts over once the site has not throttled us for `reset_after` after
    a pause ended.
    """

    base: float = 5.0
    cap: float = 600.0
    reset_after: float = 600.0
    min_pause: float = 1.0
    max_pause: float = 86_400.0

    def clamp(self, seconds: float) -> float:
        return min(self.max_pause, max(self.min_pause, seconds))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header; None when absent or unreadable (the caller
    then backs off), `math.inf` for delay-seconds too long to count.

    >>> parse_retry_after("120")
    120.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        # RFC 9110 delay-seconds: 1*DIGIT, ASCII digits only ("²" and "٣" are digits to
        # str.isdigit, not to HTTP). More digits than a float holds exactly are longer than any
        # pause (and int() refuses a string of more than 4300 digits): the caller clamps.
        return float(int(value)) if len(value) <= 15 else math.inf
    if "," in value:
        parts = [part.strip() for part in value.split(",")]
        if all(part.isascii() and part.isdigit() for part in parts):
            # The field sent more than once (an application and a CDN in front of it), read as
            # one list: the longest of the waits asked for.
            return max(parse_retry_after(part) or 0.0 for part in parts)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 5.6.7: HTTP-dates are always GMT, whatever the sender wrote.
        when = when.replace(tzinfo=dt.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)
