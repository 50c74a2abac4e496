"""proxy/counting.py against a real redis-server: one count per name at a time, across replicas
(each a Counting of its own on the same Redis), and what a claim that is let go leaves."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from proxy.counting import Counting
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import key_prefix  # noqa: F401 - fixture
from tests.budget_fixtures import own_redis  # noqa: F401 - fixture


def test_one_count_per_name_across_replicas(
    own_redis: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
) -> None:
    async def run() -> None:
        redis = Redis.from_url(own_redis.url)
        here, there = Counting(redis, key_prefix), Counting(redis, key_prefix)
        try:
            token = await here.take("usage:team-a")
            assert token is not None
            assert await here.take("usage:team-a") is None  # the same replica
            assert await there.take("usage:team-a") is None  # another one
            assert await there.take("usage:team-b") is not None  # another name
            await here.let_go("usage:team-a", token)
            again = await there.take("usage:team-a")
            assert again is not None
            # A claim that expired and was taken by another request is not deleted by the
            # late let go of the first.
            await redis.set(key_prefix + "usage:team-a", "someone-else")
            await there.let_go("usage:team-a", again)
            assert await redis.get(key_prefix + "usage:team-a") == b"someone-else"
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_a_claim_given_up_while_redis_is_asked_leaves_nothing_taken(
    own_redis: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
) -> None:
    async def run() -> None:
        redis, stalled = Redis.from_url(own_redis.url), Redis.from_url(own_redis.url)
        counting = Counting(redis, key_prefix)
        try:
            sleeping = asyncio.ensure_future(stalled.execute_command("DEBUG", "SLEEP", "1"))
            await asyncio.sleep(0.1)
            taking = asyncio.ensure_future(counting.take("report"))
            await asyncio.sleep(0.1)
            taking.cancel()
            await asyncio.gather(taking, sleeping, return_exceptions=True)
            assert taking.cancelled()
            assert await counting.take("report") is not None  # (was: None for good)
        finally:
            await redis.aclose()
            await stalled.aclose()

    asyncio.run(run())
