"""How many gateway replicas share the Redis store, for the `fail_mode: local` share.

Each replica refreshes its entry in one sorted set every few seconds; entries older than the
expiry belong to replicas that are gone. While Redis is down, the last count seen is kept: that is
the number of replicas the budgets have to be split between. The count is never below the
operator's `--fleet-size` (the chart passes its replica count): a replica that starts while
Redis is down has seen no other.

The heartbeat also watches a marker key the first replica sets: when it is gone, or another has
been set since, Redis has lost its data (restarted without persistence, flushed, evicting), and
the replica writes back the budgets it last saw (`BudgetEngine.restore_shared_state`), logs
`redis_data_lost` and counts a Redis store error. And each heartbeat raises a counter, which
only grows: one that comes back no higher than this replica saw it last means Redis went back
to an older state (loaded an older snapshot, failed over to a replica that lagged), which
brings the marker back with it; the same is done then.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy import metrics
from proxy.budgets import BudgetEngine

log = structlog.get_logger("crawlwarden.replicas")

HEARTBEAT = 5.0
EXPIRY = 20.0


class ReplicaRegistry:
    def __init__(
        self,
        redis: Redis | None,
        replica: str,
        budgets: BudgetEngine,
        prefix: str,
        *,
        fleet_size: int = 1,
    ):
        """`fleet_size`: the fewest replicas there are taken to be (the operator's count: a
        replica that starts while Redis is down has seen no other, and would take the whole
        budget for its share)."""
        self._redis = redis
        self._replica = replica
        self._budgets = budgets
        self._key = f"{prefix}replicas"
        # Set once by the first replica; another value (or none) means Redis lost its data.
        self._marker_key = f"{prefix}fleet"
        self._marker: bytes | None = None
        # Raised by every replica's heartbeat: never lower than a replica saw it, but after a
        # rollback to an older state of Redis.
        self._beats_key = f"{prefix}fleet-beats"
        self._beats: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.fleet_size = max(1, fleet_size)
        self.count = self.fleet_size
        budgets.replicas = max(budgets.replicas, self.count)
        if redis is not None:
            # The marker is looked at before an outage's counts are handed over, not up to a
            # heartbeat after: a floor written back then would be taken over them (max).
            budgets.before_handover = self.look_for_data_loss

    async def start(self) -> None:
        if self._redis is None:
            return
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="replica-heartbeat")

    async def beat(self) -> int:
        """Refresh our entry, drop stale ones, and hand the live count to the budget engine."""
        await self._beat()
        return self.count

    async def look_for_data_loss(self) -> None:
        """Redis is back after an outage: look at the marker now (a first command on a
        connection of before the restart may fail: a few tries)."""
        for _ in range(3):
            if await self._beat():
                return
            await asyncio.sleep(0.1)

    async def _beat(self) -> bool:
        """One heartbeat; False if Redis did not answer it."""
        assert self._redis is not None
        now = time.time()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(self._key, {self._replica: now})
                pipe.zremrangebyscore(self._key, "-inf", now - EXPIRY)
                pipe.zcard(self._key)
                pipe.set(self._marker_key, uuid.uuid4().hex, nx=True)
                pipe.get(self._marker_key)
                pipe.incr(self._beats_key)
                _, _, count, _, marker, beats = await pipe.execute()
        except (RedisError, OSError) as e:
            metrics.STORE_ERRORS.labels(store="redis").inc()
            log.warning("replica_heartbeat_failed", error=repr(e), replicas=self.count)
            return False
        lost = self._marker is not None and marker != self._marker
        rolled_back = self._beats is not None and int(beats) <= self._beats
        if lost or rolled_back:
            await self._data_lost(rolled_back=rolled_back and not lost)
        self._marker, self._beats = marker, int(beats)
        counted = max(self.fleet_size, int(count))
        if counted != self.count:
            log.info("replicas_changed", replicas=counted, seen=int(count), was=self.count)
        self.count = counted
        self._budgets.replicas = self.count
        return True

    async def _data_lost(self, *, rolled_back: bool = False) -> None:
        """The fleet's marker is gone (another was set since), or the heartbeat counter went
        back: Redis lost its data, or went back to an older state of it. The budgets this
        replica last saw are written back as a floor; the takedowns check their own."""
        metrics.STORE_ERRORS.labels(store="redis").inc()
        try:
            restored = await self._budgets.restore_shared_state()
        except Exception as e:  # the store's own errors; the next beat goes on
            log.error("redis_data_lost", restored_sites=0, error=repr(e))
            return
        log.error(
            "redis_data_lost",
            restored_sites=restored,
            detail=(
                "Redis went back to an older state (an older snapshot, a lagging replica)"
                if rolled_back
                else "Redis lost its data (restarted without persistence, flushed, or evicting)"
            )
            + ": budgets were written back from what this replica last saw",
        )

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self.beat()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.zrem(self._key, self._replica)
