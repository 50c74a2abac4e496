"""Who is counting the fetch log now: one count per name at a time (a team's usage, the
report), on a replica and, in shared mode, across the fleet.

Each count is a scan of a window's records, and its query holds a database connection of its
own for as long. Polls that pile up kept as many busy: one replica allowed one count per team
at a time, but a team polling through the fleet's Service reached every replica, each opening
its own PostgreSQL connection, so one team's credentials could still take as many of the
server's connections as there are replicas, which the fleet's fetch-log writes need. In shared
mode a Redis key now says who counts for the whole fleet; it expires (`HOLD_SECONDS`), so a
replica that dies while it counts lets go.

Without Redis to ask (it is down), a replica goes by what it counts itself, and says so in its
log (`counting_unshared`): a team's usage stays readable through a Redis outage.
"""

from __future__ import annotations

import uuid

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy import metrics

log = structlog.get_logger("crawlwarden.counting")

# How long a fleet-wide claim lasts if its replica never lets go: longer than any count may
# run (the 10 s wait for the replica's own records, then at most 60 s of counting).
HOLD_SECONDS = 90
# Deletes the claim only if it is still this request's (it may have expired and been taken).
_LET_GO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Counting:
    def __init__(self, redis: Redis | None, prefix: str):
        self._redis = redis
        self._prefix = prefix
        self._here: set[str] = set()  # the names this replica counts now

    async def take(self, name: str) -> str | None:
        """Claims `name` for a count: a token to let go with, or None if an earlier request
        counts it now, on this replica or another."""
        if name in self._here:
            return None
        self._here.add(name)
        token = uuid.uuid4().hex
        if self._redis is None:
            return token
        try:
            taken = await self._redis.set(
                self._prefix + name, token, nx=True, px=HOLD_SECONDS * 1000
            )
        except (RedisError, OSError) as e:
            metrics.STORE_ERRORS.labels(store="redis").inc()
            log.warning(
                "counting_unshared",
                count=name,
                error=repr(e),
                note="Redis did not answer: one count at a time on this replica only",
            )
            return token
        except BaseException:  # (cancelled while asking: nothing taken here either)
            self._here.discard(name)
            raise
        if not taken:
            self._here.discard(name)
            return None
        return token

    async def let_go(self, name: str, token: str) -> None:
        self._here.discard(name)
        if self._redis is None:
            return
        try:
            await self._redis.eval(_LET_GO, 1, self._prefix + name, token)
        except (RedisError, OSError) as e:  # (the claim expires on its own)
            metrics.STORE_ERRORS.labels(store="redis").inc()
            log.warning("counting_not_let_go", count=name, error=repr(e), expires_s=HOLD_SECONDS)
