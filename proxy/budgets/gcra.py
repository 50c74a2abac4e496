"""The pure arithmetic of budgets: GCRA and calendar periods, in integer microseconds.

Both stores use these rules; the Redis store's Lua script (`scripts.py`) is a line-by-line copy,
and the tests hold the two against each other. Integer microseconds keep both exact: Redis `TIME`
is (seconds, microseconds), and every value stays below 2**53, where Lua's doubles are exact.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US
# What a refusal for concurrency reports as its wait: a slot frees when some response ends, which
# no store can predict; a second is a short, fair estimate.
CONCURRENCY_WAIT_US = SECOND_US
_EPOCH = dt.date(1970, 1, 1)


class GcraResult(NamedTuple):
    allowed: bool
    tat: int  # theoretical arrival time after this request (unchanged when refused)
    wait: int  # microseconds until a request would conform; 0 when allowed


def gcra(tat: int, now: int, interval: int, burst: int) -> GcraResult:
    """Generic Cell Rate Algorithm (ITU-T I.371), virtual scheduling form.

    `interval` is the emission interval T (period / requests); `burst` requests may arrive at once
    (tolerance tau = (burst - 1) * T). A request conforms when tat - now <= tau.
    """
    tat = max(tat, now)
    tau = (burst - 1) * interval
    if tat - now > tau:
        return GcraResult(False, tat, tat - tau - now)
    return GcraResult(True, tat + interval, 0)


def burst_in_use(tat: int, now: int, interval: int) -> int:
    """How many of the burst's slots are taken at `now` (what `usage` reports as used)."""
    ahead = tat - now
    if ahead <= 0:
        return 0
    return -(-ahead // interval)  # ceil


class Period(NamedTuple):
    id: int  # day: days since 1970-01-01; month: year * 12 + month - 1
    end: int  # microseconds since the epoch when the next period starts (UTC)


def utc_day(now: int) -> Period:
    """The calendar day (UTC) that `now` falls in."""
    day = now // DAY_US
    return Period(day, (day + 1) * DAY_US)


def utc_month(now: int) -> Period:
    """The calendar month (UTC) that `now` falls in; it ends on the first of the next month."""
    date = _EPOCH + dt.timedelta(days=now // DAY_US)
    following = dt.date(date.year + date.month // 12, date.month % 12 + 1, 1)
    return Period(date.year * 12 + date.month - 1, (following - _EPOCH).days * DAY_US)


def to_us(seconds: float) -> int:
    return round(seconds * SECOND_US)


def to_seconds(us: int) -> float:
    return us / SECOND_US
