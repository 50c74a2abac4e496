"""The Redis budget store: budgets shared by every replica (`--redis-url`).

Key layout, for site S under prefix P (default "cw:"); the `{S}` hash tag puts all keys of a
site in one Redis Cluster slot:

    P{S}:rate     string  GCRA theoretical arrival time (us)
    P{S}:conc     zset    concurrency leases: member lease id, score expiry (us)
    P{S}:day      hash    p = day id (days since epoch, UTC), n = requests, b = response bytes,
                          g = generation, f/fb = the floor of n/b from an earlier generation
    P{S}:month    hash    p = month id (year * 12 + month - 1), n = requests, g, f
    P{S}:pause    string  end of the site's pause (us)
    P{S}:backoff  hash    level = backoff doublings so far, expires = when the level resets (us)
    Ppauses       channel '<microseconds left> <site>' as each pause is stored (follow_pauses)

Every request costs one EVALSHA (`scripts.ADMIT`). Settlements are batched, off the request's
critical path, and written with the admissions of the same event-loop turn (resp.py). Scripts
are sent by their SHA-1; on NOSCRIPT (a fresh or restarted Redis) the full script goes once
with EVAL, which also caches it.

Timeouts are short and there is no retry with backoff inside redis-py: a slow Redis must turn
into a fast fallback decision (`BudgetEngine`), not a stalled request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError
from redis.exceptions import NoScriptError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError

from proxy import metrics
from proxy.budgets import scripts
from proxy.budgets.gcra import CONCURRENCY_WAIT_US
from proxy.budgets.gcra import to_us
from proxy.budgets.pause import PausePolicy
from proxy.budgets.resp import FastRedis
from proxy.budgets.resp import ReplyError
from proxy.budgets.scripts import Script
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec
from proxy.budgets.store import Carryover
from proxy.budgets.store import Settlement
from proxy.budgets.store import Snapshot
from proxy.budgets.store import StoreMisconfigured
from proxy.budgets.store import StoreUnavailable
from proxy.budgets.store import StoreVerdict

_CODES: dict[int, Budget | None] = {
    1: None,  # paused
    2: Budget.REQUESTS_PER_DAY,
    3: Budget.REQUESTS_PER_MONTH,
    4: Budget.BYTES_PER_DAY,
    5: Budget.RATE,
    6: Budget.CONCURRENCY,
}
log = structlog.get_logger("crawlwarden.budgets")
_BATCH = 256
_MAX_CACHED_KEYS = 100_000


class SiteKeys(NamedTuple):
    rate: str
    conc: str
    day: str
    month: str
    pause: str
    backoff: str


def site_keys(prefix: str, site: str) -> SiteKeys:
    # A brace inside the tag would end it early and split the site over slots.
    tag = site.replace("{", "%7B").replace("}", "%7D")
    base = f"{prefix}{{{tag}}}:"
    return SiteKeys(*(base + name for name in SiteKeys._fields))


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _now_arg(now_us: int | None) -> str:
    return "" if now_us is None else str(now_us)


# ADMIT's last arguments: the site as this replica last saw it (scripts.ADMIT), or never.
_NOT_SEEN = ("", 0, 0, 0, 0, "", "")


def _seen_args(seen: Snapshot) -> tuple[int | str, ...]:
    return (
        seen.now_us,
        seen.day_requests,
        seen.day_bytes,
        seen.month_requests,
        seen.paused_until_us,
        seen.day_generation,
        seen.month_generation,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _snapshot(reply: Sequence[Any]) -> Snapshot:
    """Seven integers and two generations, as the scripts return a site's state."""
    now, tat, cn, dn, db, mn, paused_until, day_gen, month_gen = reply
    return Snapshot(
        int(now),
        int(tat),
        int(cn),
        int(dn),
        int(db),
        int(mn),
        int(paused_until),
        _text(day_gen),
        _text(month_gen),
    )


class RedisBudgetStore:
    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "cw:",
        lease_ttl: float = 30.0,
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 16,
    ):
        self.url = url
        self.key_prefix = key_prefix
        self.lease_ttl = lease_ttl
        self.pause_channel = f"{key_prefix}pauses"  # (follow_pauses)
        # Few connections: Redis runs one script at a time anyway, and a burst of requests then
        # queues for a pooled connection instead of opening dozens at once (on a busy event
        # loop, that is what makes connects time out).
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=max(2.0, socket_timeout * 2),  # waiting for a free pooled connection
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # One immediate retry on a broken connection (a pooled socket that died with a
            # restarted Redis), none on a timeout: a timed-out EVALSHA may have run already.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        # The admission on every request's path and the settlement after it take a lean
        # pipelined connection (see resp.py); everything else, and any URL it does not handle
        # (rediss://, unix sockets), redis-py.
        self._fast: FastRedis | None
        try:
            self._fast = FastRedis(url, timeout=socket_timeout, connect_timeout=connect_timeout)
        except ValueError:
            self._fast = None
        self._keys: dict[str, SiteKeys] = {}
        # Tokens naming a count generation a settlement or a carry-over starts (scripts.py).
        self._nonce = secrets.token_hex(6)
        self._seq = itertools.count(1)

    def _token(self) -> str:
        return f"{self._nonce}.{next(self._seq)}"

    def keys(self, site: str) -> SiteKeys:
        keys = self._keys.get(site)
        if keys is None:
            if len(self._keys) >= _MAX_CACHED_KEYS:
                self._keys.clear()
            keys = self._keys[site] = site_keys(self.key_prefix, site)
        return keys

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts once; also proves Redis is there and the scripts compile."""
        try:
            for script in scripts.ALL:
                started = time.perf_counter()
                try:
                    sha = await self._redis.script_load(script.source)
                finally:
                    metrics.observe_redis("script_load", started)
                if sha != script.sha:  # a check, not an assert: the gateway runs under -O
                    raise StoreUnavailable(
                        f"redis at {self._where()}: {script.name}: Redis computed the SHA-1 "
                        f"{sha}, not {script.sha}"
                    )
        except (AuthenticationError, NoPermissionError) as e:
            raise StoreMisconfigured(_misconfigured(self._where(), e)) from e
        except ResponseError as e:
            if "DB index" in str(e):
                raise StoreMisconfigured(_misconfigured(self._where(), e)) from e
            raise StoreUnavailable(f"redis at {self._where()}: {e}") from e
        except (TimeoutError, RedisError, OSError) as e:
            raise StoreUnavailable(f"redis at {self._where()}: {e}") from e

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self._redis.aclose()
        await self._pool.disconnect()

    async def ping(self) -> None:
        started = time.perf_counter()
        try:
            await self._redis.ping()
        except (TimeoutError, RedisError, OSError) as e:
            raise StoreUnavailable(f"redis at {self._where()}: {e}") from e
        finally:
            metrics.observe_redis("ping", started)

    def _where(self) -> str:
        kwargs = self._pool.connection_kwargs
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        started = time.perf_counter()
        try:
            try:
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self._redis.eval(script.source, len(keys), *keys, *args)
        except (TimeoutError, RedisError, OSError) as e:
            raise StoreUnavailable(f"redis at {self._where()}: {script.name}: {e}") from e
        finally:
            # Failed calls too: a timeout is the round trip an SRE most needs to see.
            metrics.observe_redis(script.name, started)

    async def _eval_fast(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """`_eval` over the lean connection; a NOSCRIPT (fresh Redis) goes the redis-py way."""
        if self._fast is None:
            return await self._eval(script, keys, args)
        started = time.perf_counter()
        try:
            return await self._fast.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except ReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise StoreUnavailable(f"redis at {self._where()}: {script.name}: {e}") from e
        except (TimeoutError, OSError) as e:
            raise StoreUnavailable(f"redis at {self._where()}: {script.name}: {e}") from e
        finally:
            metrics.observe_redis(script.name, started)
        return await self._eval(script, keys, args)

    async def _pipeline(
        self, script: Script, calls: Sequence[tuple[Sequence[str], list[Any]]]
    ) -> None:
        """Run many calls of one script in one round trip (per _BATCH calls)."""
        try:
            for start in range(0, len(calls), _BATCH):
                chunk = calls[start : start + _BATCH]
                started = time.perf_counter()
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for keys, args in chunk:
                            pipe.evalsha(script.sha, len(keys), *keys, *args)
                        results = await pipe.execute(raise_on_error=False)
                finally:
                    metrics.observe_redis(script.name, started)
                missing = [
                    c for c, r in zip(chunk, results, strict=True) if isinstance(r, NoScriptError)
                ]
                failed = [
                    r
                    for r in results
                    if isinstance(r, Exception) and not isinstance(r, NoScriptError)
                ]
                if failed:
                    raise failed[0]
                if missing:
                    # NOSCRIPT calls did not run; send the script once, then those calls again.
                    await self._redis.script_load(script.source)
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for keys, args in missing:
                            pipe.evalsha(script.sha, len(keys), *keys, *args)
                        await pipe.execute()
        except (TimeoutError, RedisError, OSError) as e:
            raise StoreUnavailable(f"redis at {self._where()}: {script.name}: {e}") from e

    async def _pipeline_fast(
        self, script: Script, calls: Sequence[tuple[Sequence[str], list[Any]]]
    ) -> None:
        """`_pipeline` over the lean connection: the calls go out with the admissions of the same
        loop turn. Calls answered NOSCRIPT (a fresh Redis) go the redis-py way, which loads it."""
        if self._fast is None:
            return await self._pipeline(script, calls)
        started = time.perf_counter()
        try:
            replies = await self._fast.call_many(
                [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
            )
        except (TimeoutError, OSError) as e:
            raise StoreUnavailable(f"redis at {self._where()}: {script.name}: {e}") from e
        finally:
            metrics.observe_redis(script.name, started)
        missing = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, ReplyError):
                if not str(reply).startswith("NOSCRIPT"):
                    raise StoreUnavailable(f"redis at {self._where()}: {script.name}: {reply}")
                missing.append(call)
        if missing:
            await self._pipeline(script, missing)
        return None

    # -- the protocol ------------------------------------------------------------------------

    async def admit(
        self,
        spec: BudgetSpec,
        lease_id: str,
        *,
        now_us: int | None = None,
        seen: Snapshot | None = None,
        charge: bool = False,
    ) -> StoreVerdict:
        k = self.keys(spec.key)
        floor = _NOT_SEEN if seen is None else _seen_args(seen)
        r = await self._eval_fast(
            scripts.ADMIT,
            (k.rate, k.conc, k.day, k.month, k.pause),
            [
                spec.interval_us,
                spec.burst,
                spec.max_concurrency,
                lease_id,
                to_us(self.lease_ttl),
                _limit(spec.requests_per_day),
                _limit(spec.requests_per_month),
                _limit(spec.bytes_per_day),
                CONCURRENCY_WAIT_US,
                _now_arg(now_us),
                *floor,
                "1" if charge else "",
            ],
        )
        code, wait = int(r[0]), int(r[1])
        snap = _snapshot(r[2:])
        if code == 0:
            return StoreVerdict(True, None, False, 0, snap)
        return StoreVerdict(False, _CODES[code], code == 1, wait, snap, charged=charge)

    async def settle(self, batch: Sequence[Settlement], *, now_us: int | None = None) -> None:
        calls = []
        for item in batch:
            k = self.keys(item.site)
            calls.append(
                (
                    (k.conc, k.day),
                    [
                        item.lease_id or "",
                        max(0, item.response_bytes),
                        _now_arg(now_us),
                        self._token(),
                    ],
                )
            )
        if calls:
            await self._pipeline_fast(scripts.SETTLE, calls)

    async def renew(self, leases: Sequence[tuple[str, str]], *, now_us: int | None = None) -> None:
        by_site: dict[str, list[str]] = {}
        for site, lease_id in leases:
            by_site.setdefault(site, []).append(lease_id)
        calls = [
            ((self.keys(site).conc,), [to_us(self.lease_ttl), _now_arg(now_us), *ids])
            for site, ids in by_site.items()
        ]
        if calls:
            await self._pipeline(scripts.RENEW, calls)

    async def pause(
        self,
        site: str,
        seconds: float | None,
        policy: PausePolicy,
        *,
        now_us: int | None = None,
    ) -> float:
        k = self.keys(site)
        left = await self._eval(
            scripts.PAUSE,
            (k.pause, k.backoff),
            [
                -1 if seconds is None else to_us(seconds),
                to_us(policy.base),
                to_us(policy.cap),
                to_us(policy.reset_after),
                _now_arg(now_us),
                self.pause_channel,
                site,
            ],
        )
        return int(left) / 1e6

    async def follow_pauses(self, on_pause: Callable[[str, float], None]) -> None:
        """Hear every replica's pauses as they are stored: `on_pause(site, seconds left)`. Runs
        until cancelled; a lost subscription is made again (a pause published meanwhile is
        missed here, and held from this replica's next admission of the site, as without)."""
        backoff = 0.5
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.pause_channel)
                backoff = 0.5
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None:
                        continue
                    left, _, site = _text(message["data"]).partition(" ")
                    try:
                        seconds = int(left) / 1e6
                    except ValueError:
                        log.warning("budget_pause_message_unreadable", data=str(message["data"]))
                        continue
                    on_pause(site, seconds)
            except asyncio.CancelledError:
                raise
            except NoPermissionError as e:
                # A setting, not an outage: asking again every few seconds would only keep
                # the Redis errors alert firing. Said once; pauses then reach this replica
                # with its next answer for their site.
                log.error(
                    "budget_pause_follow_refused",
                    channel=self.pause_channel,
                    error=str(e),
                    detail="the Redis user may not subscribe to this channel (ACL): another "
                    "replica's pause holds here from this replica's next answer for the site; "
                    "allow the channel (docs/kubernetes.md)",
                )
                return
            except Exception as e:  # whatever happens (Redis, a bug), keep following
                metrics.STORE_ERRORS.labels(store=self.name).inc()
                log.warning("budget_pause_follow_failed", error=repr(e), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()

    async def snapshot(self, site: str, *, now_us: int | None = None) -> Snapshot:
        k = self.keys(site)
        r = await self._eval(
            scripts.USAGE, (k.rate, k.conc, k.day, k.month, k.pause), [_now_arg(now_us)]
        )
        return _snapshot(r)

    async def carry_over(
        self, items: Sequence[Carryover], *, now_us: int | None = None, at_least: bool = False
    ) -> None:
        calls = []
        for item in items:
            k = self.keys(item.site)
            calls.append(
                (
                    (k.day, k.month, k.pause),
                    [
                        item.day,
                        item.day_requests,
                        item.day_bytes,
                        item.month,
                        item.month_requests,
                        item.paused_for_us,
                        _now_arg(now_us),
                        "max" if at_least else "add",
                        item.day_generation,
                        item.month_generation,
                        self._token(),
                    ],
                )
            )
        if calls:
            await self._pipeline(scripts.CARRY_OVER, calls)


def _misconfigured(where: str, error: Exception) -> str:
    return (
        f"redis at {where} refused this gateway: {error}; check --redis-url "
        "(CRAWLWARDEN_REDIS_URL): its password, user and database index"
    )
