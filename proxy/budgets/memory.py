"""The in-process budget store: embedded mode, and each replica's fallback when Redis is down.

Every method runs without an `await` in between its reads and writes, so each is atomic on the
event loop, just as the Lua script is atomic in Redis.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

from proxy.budgets.gcra import CONCURRENCY_WAIT_US
from proxy.budgets.gcra import DAY_US
from proxy.budgets.gcra import gcra
from proxy.budgets.gcra import to_us
from proxy.budgets.gcra import utc_day
from proxy.budgets.gcra import utc_month
from proxy.budgets.pause import PausePolicy
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec
from proxy.budgets.store import Carryover
from proxy.budgets.store import Settlement
from proxy.budgets.store import Snapshot
from proxy.budgets.store import StoreVerdict

# About 500 bytes a site: ~500 MB at the bound, reached only by a million sites whose counts still
# matter (used this month). Shared mode (Redis) keeps them without a bound of its own.
MAX_SITES = 1_000_000
_MAX_BACKOFF_LEVEL = 40
# While the store is full of sites whose counts matter, a new site waits this long for the next
# look for spent ones (a look reads every site).
_FULL_RECHECK_US = 10_000_000


class BudgetStoreFull(Exception):
    """The in-process store holds MAX_SITES sites whose counts still decide admissions: a new
    site is refused rather than one of theirs forgotten."""


def wall_clock_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class _SiteState:
    tat: int = 0
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> expiry (us)
    day: int = -1
    day_end: int = 0
    day_requests: int = 0
    day_bytes: int = 0
    month: int = -1
    month_end: int = 0
    month_requests: int = 0
    paused_until: int = 0
    backoff_level: int = 0
    backoff_expires: int = 0

    def roll(self, now: int) -> None:
        """Start new counters when a calendar day or month (UTC) has begun."""
        if self.day_end - DAY_US <= now < self.day_end:
            return  # still the same day, hence the same month
        day = utc_day(now)
        if day.id != self.day:
            self.day, self.day_end, self.day_requests, self.day_bytes = day.id, day.end, 0, 0
        month = utc_month(now)
        if month.id != self.month:
            self.month, self.month_end, self.month_requests = month.id, month.end, 0

    def expire_leases(self, now: int) -> None:
        if self.leases:
            for lease_id in [k for k, exp in self.leases.items() if exp <= now]:
                del self.leases[lease_id]

    def spent(self, now: int) -> bool:
        """Nothing here changes a later admission or hand-back to the shared store: forgetting
        it is the same as keeping it (no lease, pause or back-off running, the rate slot past,
        no count of the current day or month)."""
        return (
            self.tat <= now
            and self.paused_until <= now
            and self.backoff_expires <= now
            and all(expiry <= now for expiry in self.leases.values())
            and (self.day_end <= now or not (self.day_requests or self.day_bytes))
            and (self.month_end <= now or not self.month_requests)
        )

    def snapshot(self, now: int, *, expired: bool = False) -> Snapshot:
        """`expired`: expire_leases(now) ran already, every lease left is live."""
        live = len(self.leases) if expired else sum(1 for e in self.leases.values() if e > now)
        return Snapshot(
            now_us=now,
            tat_us=max(self.tat, now),
            in_flight=live,
            day_requests=self.day_requests,
            day_bytes=self.day_bytes,
            month_requests=self.month_requests,
            paused_until_us=self.paused_until,
        )


class MemoryBudgetStore:
    name = "memory"
    shared = False

    def __init__(
        self,
        *,
        lease_ttl: float = 30.0,
        clock: Callable[[], int] | None = None,
        max_sites: int = MAX_SITES,
    ):
        """`clock` returns microseconds since the epoch (tests pass a controllable one)."""
        self.lease_ttl = lease_ttl
        self.max_sites = max_sites
        self._clock = clock or wall_clock_us
        self._sites: dict[str, _SiteState] = {}
        self._full_until = 0

    def _state(self, site: str, now: int, *, admitting: bool = False) -> _SiteState:
        """The site's state, made when it is new. The store is bounded by forgetting spent
        sites, never counts that still decide (a scraper going through as many other sites
        used to reset every idle site's quota). Full of sites that matter, it refuses a new
        site's admission (`admitting`); settling, pausing or carrying over what was already
        admitted still get a state."""
        state = self._sites.get(site)
        if state is None:
            if admitting and len(self._sites) >= self.max_sites and not self._forget_spent(now):
                raise BudgetStoreFull(
                    f"the gateway's in-process budget store is full: it keeps the counts of "
                    f"{len(self._sites)} sites used this month, and forgetting one would reset "
                    "its quotas; a new site waits until counts expire (at the end of the UTC day "
                    "or month), or use shared mode (Redis)"
                )
            state = self._sites[site] = _SiteState()
        return state

    def _forget_spent(self, now: int) -> bool:
        """Drop every spent site; whether that made room (looked for at most every 10 s)."""
        if now < self._full_until:
            return False
        for key in [k for k, s in self._sites.items() if s.spent(now)]:
            del self._sites[key]
        if len(self._sites) < self.max_sites:
            return True
        self._full_until = now + _FULL_RECHECK_US
        return False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def admit(
        self,
        spec: BudgetSpec,
        lease_id: str,
        *,
        now_us: int | None = None,
        seen: Snapshot | None = None,  # nothing here is lost (store.py)
        charge: bool = False,
    ) -> StoreVerdict:
        return self.admit_now(spec, lease_id, now_us=now_us, charge=charge)

    def admit_now(
        self, spec: BudgetSpec, lease_id: str, *, now_us: int | None = None, charge: bool = False
    ) -> StoreVerdict:
        """`admit`, without a suspension: what the engine counts in the same step."""
        now = self._clock() if now_us is None else now_us
        s = self._state(spec.key, now, admitting=True)
        s.roll(now)
        # Same order and tie-break as the Lua script: the budget that frees up last is reported.
        refusal: tuple[Budget | None, int] | None = None

        def fail(budget: Budget | None, wait: int) -> None:
            nonlocal refusal
            if refusal is None or wait > refusal[1]:
                refusal = (budget, wait)

        if s.paused_until > now:
            fail(None, s.paused_until - now)
        if spec.requests_per_day is not None and s.day_requests >= spec.requests_per_day:
            fail(Budget.REQUESTS_PER_DAY, s.day_end - now)
        if spec.requests_per_month is not None and s.month_requests >= spec.requests_per_month:
            fail(Budget.REQUESTS_PER_MONTH, s.month_end - now)
        if spec.bytes_per_day is not None and s.day_bytes >= spec.bytes_per_day:
            fail(Budget.BYTES_PER_DAY, s.day_end - now)
        rate = gcra(s.tat, now, spec.interval_us, spec.burst)
        if not rate.allowed:
            fail(Budget.RATE, rate.wait)
        s.expire_leases(now)
        if len(s.leases) >= spec.max_concurrency:
            oldest = min(s.leases.values(), default=now + to_us(self.lease_ttl))
            fail(Budget.CONCURRENCY, min(oldest - now, CONCURRENCY_WAIT_US))
        if refusal is not None and not charge:
            budget, wait = refusal
            return StoreVerdict(False, budget, budget is None, wait, s.snapshot(now, expired=True))
        s.tat = max(s.tat, now) + spec.interval_us  # (rate.tat when it conforms)
        s.leases[lease_id] = now + to_us(self.lease_ttl)
        s.day_requests += 1
        s.month_requests += 1
        if refusal is not None:
            budget, wait = refusal
            snap = s.snapshot(now, expired=True)
            return StoreVerdict(False, budget, budget is None, wait, snap, charged=True)
        return StoreVerdict(True, None, False, 0, s.snapshot(now, expired=True))

    async def settle(self, batch: Sequence[Settlement], *, now_us: int | None = None) -> None:
        now = self._clock() if now_us is None else now_us
        for item in batch:
            s = self._sites.get(item.site)
            if s is None:
                if item.response_bytes <= 0:
                    continue
                s = self._state(item.site, now)
            if item.lease_id is not None:
                s.leases.pop(item.lease_id, None)
            if item.response_bytes > 0:
                s.roll(now)
                s.day_bytes += item.response_bytes

    async def renew(self, leases: Sequence[tuple[str, str]], *, now_us: int | None = None) -> None:
        now = self._clock() if now_us is None else now_us
        expiry = now + to_us(self.lease_ttl)
        for site, lease_id in leases:
            s = self._sites.get(site)
            if s is not None and lease_id in s.leases and s.leases[lease_id] > now:
                s.leases[lease_id] = expiry

    async def follow_pauses(self, on_pause: Callable[[str, float], None]) -> None:
        return  # one process: the engine holds its pauses itself

    async def pause(
        self,
        site: str,
        seconds: float | None,
        policy: PausePolicy,
        *,
        now_us: int | None = None,
    ) -> float:
        now = self._clock() if now_us is None else now_us
        s = self._state(site, now)
        if s.backoff_expires <= now:
            s.backoff_level = 0
        if seconds is None:
            if s.paused_until > now:
                # A late answer to a request sent before the pause began: no escalation.
                return (s.paused_until - now) / 1e6
            s.backoff_level = min(s.backoff_level + 1, _MAX_BACKOFF_LEVEL)
            want = min(to_us(policy.cap), to_us(policy.base) * 2 ** (s.backoff_level - 1))
            s.backoff_expires = now + want + to_us(policy.reset_after)
        else:
            want = to_us(seconds)
        s.paused_until = max(s.paused_until, now + want)
        return (s.paused_until - now) / 1e6

    async def snapshot(self, site: str, *, now_us: int | None = None) -> Snapshot:
        now = self._clock() if now_us is None else now_us
        s = self._sites.get(site)
        if s is None:
            return Snapshot(now, now, 0, 0, 0, 0, 0)
        s.roll(now)
        return s.snapshot(now)

    async def carry_over(
        self, items: Sequence[Carryover], *, now_us: int | None = None, at_least: bool = False
    ) -> None:
        now = self._clock() if now_us is None else now_us
        merge = max if at_least else operator.add
        for item in items:
            s = self._state(item.site, now)
            s.roll(now)
            if item.day == s.day:
                s.day_requests = merge(s.day_requests, item.day_requests)
                s.day_bytes = merge(s.day_bytes, item.day_bytes)
            if item.month == s.month:
                s.month_requests = merge(s.month_requests, item.month_requests)
            if item.paused_for_us > 0:
                s.paused_until = max(s.paused_until, now + item.paused_for_us)

    def sites(self) -> list[tuple[str, _SiteState]]:
        """Every site's state as it is now, for embedded mode's saved counts
        (proxy/budgets/saved.py), which reads it on a worker thread and changes nothing."""
        return list(self._sites.items())

    # -- for the engine's hand-back to the shared store --------------------------------------

    def usage_since_start(self, *, now_us: int | None = None) -> list[Carryover]:
        """Everything this store counted in the current periods, and pauses still running."""
        now = self._clock() if now_us is None else now_us
        out = []
        for key, s in self._sites.items():
            s.roll(now)
            paused_for = max(0, s.paused_until - now)
            if s.day_requests or s.day_bytes or s.month_requests or paused_for:
                out.append(
                    Carryover(
                        key,
                        s.day,
                        s.day_requests,
                        s.day_bytes,
                        s.month,
                        s.month_requests,
                        paused_for,
                    )
                )
        return out
