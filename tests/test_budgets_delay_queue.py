"""Delay mode's queue: first come, first served, also when the store is a round trip away.

The refusal at once of a request whose turn is past max_delay counted as "ahead" the requests
still on their first round trip to the store, later ones among them: an earlier request was
refused and a later one took its slot (found by the review of the change that added it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.budgets import BudgetEngine
from proxy.budgets import RedisBudgetStore
from tests.budget_fixtures import key_prefix  # noqa: F401
from tests.budget_fixtures import redis_server  # noqa: F401
from tests.test_budgets_engine import make_site


class SlowStore:
    """A real Redis store 40 ms away (a Redis in another zone): each admit takes a round trip."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.02)
        try:
            return await self.inner.admit(*args, **kwargs)
        finally:
            await asyncio.sleep(0.02)


@pytest.mark.timeout(30)
async def test_earlier_request_is_not_refused_for_a_later_ones_sake(redis_server, key_prefix):  # noqa: F811
    # 5/s: slots every 0.2 s. max_delay 0.45 s: C (turn at +0.4) and D (+0.6) are each ~0.1 s
    # from the edge, so a loaded host that wakes them late does not flip either.
    site = make_site(rate="5/s", burst=1, on_exceed="delay", max_delay="450ms")
    engine = BudgetEngine(SlowStore(RedisBudgetStore(redis_server.url, key_prefix=key_prefix)))
    await engine.start()
    try:
        first = await engine.admit(site)  # takes the slot at T; next slots T+0.2, T+0.4, T+0.6
        assert first.decision.allowed
        results: dict[str, Any] = {}

        async def go(name: str, after: float) -> None:
            await asyncio.sleep(after)
            results[name] = await engine.admit(site)

        # B, C, D arrive 10 ms apart, in that order.
        await asyncio.gather(go("B", 0.0), go("C", 0.01), go("D", 0.02))
    finally:
        await engine.close()
    got = {k: (v.decision.allowed, round(v.waited, 2)) for k, v in results.items()}
    # First come, first served: B at ~T+0.2, C at ~T+0.4 (both within 0.45 s of arriving);
    # D's turn (T+0.6) is past its max_delay.
    assert results["B"].decision.allowed, got
    assert results["C"].decision.allowed, got
    assert not results["D"].decision.allowed, got


@pytest.mark.timeout(30)
async def test_a_request_whose_turn_under_a_crawl_delay_is_past_max_delay_is_refused_at_once(
    redis_server,  # noqa: F811
    key_prefix,  # noqa: F811
):
    # A Crawl-delay's wait was no budget the queue knew: every request behind the next one
    # was held a whole delay, then refused (review); under a plain rate they are refused at
    # once, as the README says.
    site = make_site(rate="100/s", burst=10, on_exceed="delay", max_delay="1500ms")
    engine = BudgetEngine(RedisBudgetStore(redis_server.url, key_prefix=key_prefix))
    await engine.start()
    try:
        engine.set_min_interval(site.key, 1.0)
        assert (await engine.admit(site)).decision.allowed
        results = await asyncio.gather(*(engine.admit(site) for _ in range(5)))
    finally:
        await engine.close()
    admitted = [r for r in results if r.decision.allowed]
    refused = [r for r in results if not r.decision.allowed]
    assert len(admitted) == 1 and len(refused) == 4
    assert all(r.waited < 0.5 for r in refused), [round(r.waited, 2) for r in refused]
