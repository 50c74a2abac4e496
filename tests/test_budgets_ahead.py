"""Admission ahead of Redis's answer (proxy/budgets/engine.py `_room_ahead`), with a real
redis-server: a site whose budgets are far from their limits is admitted at once, the same script
counting it behind it; a polite budget always waits for Redis; what goes wrong in between (a
budget spent by another replica, a release before the count, Redis gone, a pause) is counted and
held as the README says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from redis import asyncio as redis_asyncio
from structlog.testing import capture_logs

from proxy.budgets import Admission
from proxy.budgets import BudgetEngine
from proxy.budgets import RedisBudgetStore
from proxy.budgets import engine as engine_module
from proxy.budgets.redis_store import site_keys
from proxy.budgets.spec import BudgetSpec
from proxy.budgets.store import Snapshot
from proxy.budgets.store import StoreVerdict
from proxy.decision import Reason
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import key_prefix  # noqa: F401
from tests.budget_fixtures import own_redis  # noqa: F401
from tests.budget_fixtures import redis_server  # noqa: F401
from tests.support import Gateway
from tests.support import Site
from tests.support import policy_with
from tests.test_budgets_engine import make_site
from tests.test_budgets_engine import sample
from tests.test_faults import HEADERS

AHEAD = "crawlwarden_budget_admitted_ahead_total"


def at_once(call: Coroutine[Any, Any, Admission]) -> Admission | None:
    """The admission, if it was decided without suspending once (nothing awaited on the event
    loop: no Redis round trip). None if it waited: it goes on as a task, to its end."""
    task = asyncio.Task(call, loop=asyncio.get_running_loop(), eager_start=True)
    if task.done():
        return task.result()
    WAITING.add(task)
    task.add_done_callback(WAITING.discard)
    return None


WAITING: set[asyncio.Task[Admission]] = set()


async def waited(call: Coroutine[Any, Any, Admission]) -> Admission:
    """The admission, asserting it waited for Redis."""
    task = asyncio.Task(call, loop=asyncio.get_running_loop(), eager_start=True)
    assert not task.done(), "decided without asking Redis"
    return await task


@asynccontextmanager
async def engines(url: str, prefix: str, n: int, **kw: Any) -> AsyncIterator[list[BudgetEngine]]:
    """n replicas sharing the Redis at `url`, each knowing they are n (proxy/replicas.py)."""
    started: list[BudgetEngine] = []
    try:
        for _ in range(n):
            engine = BudgetEngine(RedisBudgetStore(url, key_prefix=prefix), replicas=n, **kw)
            await engine.start()
            started.append(engine)
        yield started
    finally:
        for engine in started:
            await engine.close()


async def in_redis(url: str, prefix: str, site: str) -> tuple[int, int]:
    """(requests counted today, leases held) of a site, read straight from Redis."""
    keys = site_keys(prefix, site)
    client = redis_asyncio.Redis.from_url(url)
    try:
        day = await client.hget(keys.day, "n")
        leases = await client.zcard(keys.conc)
    finally:
        await client.aclose()
    return int(day or 0), int(leases)


@pytest.mark.timeout(30)
async def test_a_site_far_from_its_limits_is_admitted_without_waiting_for_redis(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
):
    site = make_site(requests_per_day=10_000)
    async with engines(redis_server.url, key_prefix, 1) as (engine,):
        confirmed = sample(AHEAD, outcome="confirmed")
        # No view of the site yet: the first waits for Redis.
        first = await waited(engine.admit(site))
        assert first.decision.allowed
        admitted = []
        for _ in range(5):
            admission = at_once(engine.admit(site))
            assert admission is not None and admission.decision.allowed
            admitted.append(admission)
        # At most AHEAD_MAX of a site at once before Redis has counted them; the next waits.
        for _ in range(engine_module.AHEAD_MAX - 5):
            assert at_once(engine.admit(site)) is not None
        assert (await waited(engine.admit(site))).decision.allowed
        await engine.flush()
        # Counted exactly, once each, by the same script.
        assert await in_redis(redis_server.url, key_prefix, site.key) == (
            2 + engine_module.AHEAD_MAX,
            2 + engine_module.AHEAD_MAX,
        )
        assert sample(AHEAD, outcome="confirmed") - confirmed == engine_module.AHEAD_MAX
        usage = await engine.usage(site)
        assert usage["budgets"]["requests_per_day"]["used"] == 2 + engine_module.AHEAD_MAX


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "budget",
    [
        {"rate": "1/s", "burst": 1},  # the policy's defaults: polite
        {"burst": 31},  # under AHEAD_SHARE x replicas
        {"max_concurrency": 31},
        {"requests_per_day": 31},
        {"requests_per_month": 31},
        {"admit_ahead": False},  # the policy says: always wait for Redis
    ],
    ids=lambda b: ",".join(b),
)
async def test_a_polite_budget_always_waits_for_redis(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
    budget: dict[str, Any],
):
    site = make_site(**budget)
    async with engines(redis_server.url, key_prefix, 1) as (engine,):
        assert (await engine.admit(site)).decision.allowed
        await waited(engine.admit(site))


@pytest.mark.timeout(30)
async def test_a_budget_half_used_waits_for_redis(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
):
    site = make_site(requests_per_day=100)
    async with engines(redis_server.url, key_prefix, 1) as (engine,):
        for _ in range(50):
            admission = await engine.admit(site)
            assert admission.decision.allowed
            engine.finish(admission.lease)
        await engine.flush()
        assert await in_redis(redis_server.url, key_prefix, site.key) == (50, 0)
        # 50 of 100 used: half; one more and it is past half.
        assert at_once(engine.admit(site)) is not None
        await engine.flush()
        await waited(engine.admit(site))


@pytest.mark.timeout(30)
async def test_two_replicas_share_the_room_ahead(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
):
    # 64 = AHEAD_SHARE x 2 replicas: room for one ahead on each; as one replica alone, two.
    site = make_site(max_concurrency=64)
    async with engines(redis_server.url, key_prefix, 2) as (a, b):
        for engine in (a, b):
            assert (await engine.admit(site)).decision.allowed
            assert at_once(engine.admit(site)) is not None
            await waited(engine.admit(site))


class SlowCount:
    """A real Redis store whose counts of requests admitted ahead come late (a busy loop)."""

    def __init__(self, inner: RedisBudgetStore, delay: float):
        self.inner = inner
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def admit(
        self, spec: BudgetSpec, lease_id: str, *, seen: Snapshot | None = None, charge: bool = False
    ) -> StoreVerdict:
        if charge:
            await asyncio.sleep(self.delay)
        return await self.inner.admit(spec, lease_id, seen=seen, charge=charge)


@pytest.mark.timeout(30)
async def test_a_request_over_before_redis_counted_it_frees_its_slot_after(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
):
    site = make_site()
    store = SlowCount(RedisBudgetStore(redis_server.url, key_prefix=key_prefix), delay=0.3)
    engine = BudgetEngine(store, replicas=1)  # type: ignore[arg-type]
    await engine.start()
    try:
        first = await engine.admit(site)
        engine.finish(first.lease, response_bytes=10)
        ahead = at_once(engine.admit(site))
        assert ahead is not None and ahead.decision.allowed
        engine.finish(ahead.lease, response_bytes=20)  # over before Redis counted it
        await asyncio.sleep(0.1)  # the settlement loop runs meanwhile: the first one's only
        assert await in_redis(redis_server.url, key_prefix, site.key) == (1, 0)
        await engine.flush()
        # Counted, then freed: no slot held by a request that is over (it would stay 30 s).
        assert await in_redis(redis_server.url, key_prefix, site.key) == (2, 0)
        assert (await engine.usage(site))["budgets"]["bytes_per_day"]["used"] == 30
    finally:
        await engine.close()


@pytest.mark.timeout(30)
async def test_a_budget_another_replica_spent_meanwhile_is_overshot_counted_and_said(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(engine_module, "AHEAD_VIEW_AGE", 30.0)  # (however slow this host is)
    site = make_site(requests_per_day=200)
    async with engines(redis_server.url, key_prefix, 2) as (here, there):
        overshot = sample(AHEAD, outcome="overshot")
        assert (await here.admit(site)).decision.allowed  # its view: 1 of 200 used
        spent = 0
        for _ in range(300):
            if not (await there.admit(site)).decision.allowed:
                break
            spent += 1
        await there.flush()
        assert spent == 199
        with capture_logs() as logs:
            late = at_once(here.admit(site))
            assert late is not None and late.decision.allowed  # on its view, far from it
            await here.flush()
        assert sample(AHEAD, outcome="overshot") - overshot == 1
        [said] = [e for e in logs if e["event"] == "budget_overshot_ahead"]
        assert said["site"] == site.key and said["budget"] == "requests_per_day"
        # Counted all the same: the quota shows the request that went.
        assert (await here.usage(site))["budgets"]["requests_per_day"]["used"] == 201
        # And its view is Redis's again: the next waits, and is refused.
        refused = (await here.admit(site)).decision
        assert refused.reason is Reason.QUOTA_REQUESTS


@pytest.mark.timeout(30)
async def test_a_pause_another_replica_stores_is_held_at_once(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(engine_module, "AHEAD_VIEW_AGE", 30.0)
    site = make_site()
    async with engines(redis_server.url, key_prefix, 2) as (here, there):
        assert (await there.admit(site)).decision.allowed  # its view: not paused
        client = redis_asyncio.Redis.from_url(redis_server.url)
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 5.0
            channel = f"{key_prefix}pauses"
            while (await client.pubsub_numsub(channel))[0][1] < 2 and loop.time() < deadline:
                await asyncio.sleep(0.01)  # (they subscribe as they start)
        finally:
            await client.aclose()
        here.site_answered(site, 429, "5")
        await here.flush()
        # Redis publishes the pause as it stores it: the other replica holds it without
        # asking, as soon as it hears (its view, a moment old, would let its next request go
        # ahead of Redis's answer, and Redis would say "paused" only behind it).
        deadline = loop.time() + 5.0
        while there._local_pause_left(site.key) <= 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        decided = at_once(there.admit(site))
        assert decided is not None and decided.decision.reason is Reason.SITE_PAUSED
        assert decided.decision.retry_after is not None and 4.0 < decided.decision.retry_after


@pytest.mark.timeout(60)
async def test_redis_gone_before_it_counted_a_request_admitted_ahead(
    own_redis: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(engine_module, "AHEAD_VIEW_AGE", 30.0)
    site = make_site(requests_per_day=1000, fail_mode="closed")
    async with engines(own_redis.url, key_prefix, 1, probe_max_interval=0.2) as (engine,):
        unconfirmed = sample(AHEAD, outcome="unconfirmed")
        first = await engine.admit(site)
        engine.finish(first.lease)
        await engine.flush()
        own_redis.kill()
        ahead = at_once(engine.admit(site))
        assert ahead is not None and ahead.decision.allowed  # it has gone
        engine.finish(ahead.lease)
        await engine.flush()
        assert sample(AHEAD, outcome="unconfirmed") - unconfirmed == 1
        assert not engine.store_available
        # Redis is down and the site fails closed: nothing more goes.
        assert (await engine.admit(site)).decision.reason is Reason.STORE_UNAVAILABLE
        own_redis.start()  # empty: the first request's count is gone with it
        # The request that went is handed over with what the replica counted meanwhile.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        used = None
        while loop.time() < deadline:
            if engine.store_available:
                used = (await engine.usage(site))["budgets"]["requests_per_day"]["used"]
                if used:
                    break
            await asyncio.sleep(0.05)
        assert used == 1


# -- through the gateway ---------------------------------------------------------------------


def test_a_shared_gateway_sends_requests_ahead_of_redis_only_where_the_budgets_are_far(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    policy = policy_with(
        sites=[
            {"id": "polite", "match": ["polite.test"], "burst": 1, "max_concurrency": 2},
            {"id": "bulk", "match": ["bulk.test"]},  # the defaults: far from their limits
        ]
    )
    with Gateway(workdir, policy, extra_args=["--redis-url", own_redis.url]) as gw:

        def fetch(host: str, n: int) -> list[int]:
            proxies = {"http": gw.proxy_url()}
            answers = []
            for k in range(n):
                url = site.url(host, f"/p/{k}")
                answers.append(requests.get(url, proxies=proxies, headers=HEADERS).status_code)
            return answers

        ahead = "crawlwarden_budget_admitted_ahead_total"
        assert fetch("polite.test", 10) == [200] * 10  # (one at a time: within burst 1 at 1000/s)
        assert gw.metric(ahead, outcome="confirmed") == 0.0
        assert fetch("bulk.test", 20) == [200] * 20
        # All but the first went ahead of Redis's answer (their view was a request old), or
        # nearly all on a slow host; each was counted once.
        assert gw.metric(ahead, outcome="confirmed") >= 10
        assert gw.metric(ahead, outcome="overshot") == 0.0
    client = redis.Redis.from_url(own_redis.url)
    try:
        days = {
            name: client.hget(key, "n")
            for name in ("polite", "bulk")
            for key in client.scan_iter(match=f"*{{{name}}}:day")
        }
    finally:
        client.close()
    assert days == {"polite": b"10", "bulk": b"20"}
    assert site.count() == 30


@pytest.mark.timeout(30)
async def test_a_redis_user_that_may_not_hear_pauses_still_stores_them_and_is_told_once(
    own_redis: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
):
    # An ACL'd Redis user allowed the keys and scripts but not the pauses' channel: the PAUSE
    # script's publish must not fail the pause, and following it must not retry for ever (each
    # retry a Redis error, CrawlwardenRedisErrors firing for a setting).
    admin = redis_asyncio.Redis.from_url(own_redis.url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "crawler", "on", ">secret", "~*", "&elsewhere:*", "+@all"
        )
    finally:
        await admin.aclose()
    url = f"redis://crawler:secret@127.0.0.1:{own_redis.port}/0"
    site = make_site()
    errors = sample("crawlwarden_store_errors_total", store="redis")
    with capture_logs() as logs:
        async with engines(url, key_prefix, 2) as (here, there):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while loop.time() < deadline:
                if len([e for e in logs if e["event"] == "budget_pause_follow_refused"]) == 2:
                    break
                await asyncio.sleep(0.02)
            here.site_answered(site, 429, "5")
            await here.flush()
            # Stored all the same: the other replica's next answer holds it.
            assert (await there.admit(site)).decision.reason is Reason.SITE_PAUSED
            await asyncio.sleep(1.0)  # (time for retries, were there any)
    refused = [e for e in logs if e["event"] == "budget_pause_follow_refused"]
    assert len(refused) == 2  # once per replica
    assert refused[0]["channel"] == f"{key_prefix}pauses"
    assert not [e for e in logs if e["event"] == "budget_pause_follow_failed"]
    assert sample("crawlwarden_store_errors_total", store="redis") == errors
