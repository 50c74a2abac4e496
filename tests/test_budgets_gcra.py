"""GCRA and calendar periods: the arithmetic both budget stores share (proxy/budgets/gcra.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
from fractions import Fraction

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from proxy.budgets import MemoryBudgetStore
from proxy.budgets.gcra import DAY_US
from proxy.budgets.gcra import burst_in_use
from proxy.budgets.gcra import gcra
from proxy.budgets.gcra import utc_day
from proxy.budgets.gcra import utc_month
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds


class TokenBucket:
    """The reference model: a bucket of `burst` tokens refilled at one per `interval`.

    GCRA(T, tau = (burst - 1) * T) admits exactly what this bucket admits; exact fractions, so
    there is no rounding to hide behind.
    """

    def __init__(self, interval: int, burst: int, start: int):
        self.interval = interval
        self.burst = burst
        self.tokens = Fraction(burst)
        self.last = start

    def request(self, now: int) -> tuple[bool, int]:
        self.tokens = min(
            Fraction(self.burst), self.tokens + Fraction(now - self.last, self.interval)
        )
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, 0
        wait = (1 - self.tokens) * self.interval
        assert wait.denominator == 1
        return False, int(wait)


arrivals = st.lists(st.integers(min_value=0, max_value=3_000_000), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(min_value=1, max_value=2_000_000),
    burst=st.integers(min_value=1, max_value=8),
    gaps=arrivals,
)
def test_gcra_matches_the_token_bucket(interval: int, burst: int, gaps: list[int]):
    model = TokenBucket(interval, burst, T0)
    tat, now = 0, T0
    for gap in gaps:
        now += gap
        allowed, new_tat, wait = gcra(tat, now, interval, burst)
        assert (allowed, wait) == model.request(now)
        if allowed:
            tat = new_tat
        # What usage reports as the burst in use never exceeds the burst.
        assert 0 <= burst_in_use(tat, now, interval) <= burst


@settings(max_examples=150, deadline=None)
@given(
    interval=st.integers(min_value=1_000, max_value=2_000_000),
    burst=st.integers(min_value=1, max_value=8),
    gaps=arrivals,
)
def test_memory_store_rate_matches_the_token_bucket(interval: int, burst: int, gaps: list[int]):
    """The in-process store, driven by an injected clock, admits exactly what the model admits."""
    clock = [T0]
    store = MemoryBudgetStore(clock=lambda: clock[0])
    spec = BudgetSpec("gcra.test", interval, burst, "-", 10**6, None, None, None)
    model = TokenBucket(interval, burst, T0)

    async def run() -> None:
        for i, gap in enumerate(gaps):
            clock[0] += gap
            verdict = await store.admit(spec, f"lease-{i}")
            allowed, wait = model.request(clock[0])
            assert verdict.allowed is allowed
            if not allowed:
                assert verdict.budget is Budget.RATE
                assert verdict.wait_us == wait

    asyncio.run(run())


def test_retry_after_is_the_next_slot():
    # 2/s with a burst of 3: three at once, then one every 500 ms.
    tat = 0
    for _ in range(3):
        allowed, tat, _wait = gcra(tat, T0, 500_000, 3)
        assert allowed
    assert gcra(tat, T0, 500_000, 3) == (False, T0 + 1_500_000, 500_000)
    assert gcra(tat, T0 + 499_999, 500_000, 3).allowed is False
    assert gcra(tat, T0 + 500_000, 500_000, 3).allowed is True


@given(st.integers(min_value=0, max_value=4_102_444_800 * 1_000_000 - 1))
def test_utc_periods(now: int):
    moment = dt.datetime.fromtimestamp(now // 1_000_000, dt.UTC)
    day = utc_day(now)
    midnight = dt.datetime.combine(moment.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    assert day.end == int(midnight.timestamp()) * 1_000_000
    assert day.id == now // DAY_US
    month = utc_month(now)
    assert month.id == moment.year * 12 + moment.month - 1
    first = dt.datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=dt.UTC)
    assert month.end == int(first.timestamp()) * 1_000_000


def test_month_ends():
    def at(text: str) -> int:
        return int(dt.datetime.fromisoformat(text).timestamp()) * 1_000_000

    assert utc_month(at("2028-02-29T23:59:59+00:00")).end == at("2028-03-01T00:00:00+00:00")
    assert utc_month(at("2026-12-31T12:00:00+00:00")).end == at("2027-01-01T00:00:00+00:00")
    assert utc_month(at("2027-01-01T00:00:00+00:00")).end == at("2027-02-01T00:00:00+00:00")
