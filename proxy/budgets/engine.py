"""The budget engine: one admission decision per request, against a shared or in-process store.

What it adds to a store:
- specs parsed once per site and policy version, with robots.txt Crawl-delay applied;
- shared mode: a request decided ahead of the store's answer where this replica's view of the
  site, a moment old, shows every budget far from its limit (`_room_ahead`), counted behind it;
- `on_exceed: delay`: wait (FIFO per site on this replica) until the store says a request fits,
  sleeping exactly as long as the store reports, never polling faster, up to `max_delay`;
- store failure: count it, answer from `fail_mode` (closed: 503 `store_unavailable`; local: a
  per-replica share of each budget in process), probe with backoff, and go back by itself, handing
  over what it counted meanwhile;
- settlement (lease release, response bytes) batched off the request's critical path;
- lease renewal, so only a dead replica's leases expire;
- site pauses from 429/503 answers, and the budget gauges.

It never raises to its caller: every failure becomes a `Decision`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import secrets
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Coroutine
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Any

import structlog

from proxy import metrics
from proxy.budgets.gcra import burst_in_use
from proxy.budgets.gcra import to_seconds
from proxy.budgets.gcra import utc_day
from proxy.budgets.gcra import utc_month
from proxy.budgets.memory import BudgetStoreFull
from proxy.budgets.memory import MemoryBudgetStore
from proxy.budgets.memory import wall_clock_us
from proxy.budgets.pause import THROTTLE_STATUSES
from proxy.budgets.pause import PausePolicy
from proxy.budgets.pause import parse_retry_after
from proxy.budgets.spec import CRAWL_DELAY_RULE
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec
from proxy.budgets.spec import spec_for
from proxy.budgets.spec import used_ratio
from proxy.budgets.store import BudgetStore
from proxy.budgets.store import Carryover
from proxy.budgets.store import Settlement
from proxy.budgets.store import Snapshot
from proxy.budgets.store import StoreMisconfigured
from proxy.budgets.store import StoreVerdict
from proxy.decision import Decision
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.sites import Site

log = structlog.get_logger("crawlwarden.budgets")

_REASONS = {
    Budget.RATE: Reason.RATE_LIMITED,
    Budget.CONCURRENCY: Reason.CONCURRENCY,
    Budget.REQUESTS_PER_DAY: Reason.QUOTA_REQUESTS,
    Budget.REQUESTS_PER_MONTH: Reason.QUOTA_REQUESTS,
    Budget.BYTES_PER_DAY: Reason.QUOTA_BYTES,
}
_MAX_TRACKED_SITES = 50_000  # per-site tables (specs, last views, gauges): ~2 KB a site
_MAX_ORPHANS = 100_000  # leases of unanswered admissions kept to give back
_SLOT_POLL_FIRST = 0.05  # delay mode: first look for a slot freed by another replica
_SLOT_POLL_MAX = 0.2
# Admission ahead of the shared store's word (_room_ahead): how old this replica's last view of
# the site may be. A busy site's view is renewed by every answer (a round trip, milliseconds); a
# site asked less often than this waits for the store.
AHEAD_VIEW_AGE = 0.25
# How many of a site's requests this replica admits ahead before the store has counted them:
# what another replica's pause, or its last slots taken, lets through here at most (a pause is
# heard at once, published by Redis: follow_pauses; the rest with the next answer). And all
# the replicas' requests admitted ahead together take at most 1/AHEAD_SHARE of any limit.
AHEAD_MAX = 8
AHEAD_SHARE = 32


def _beyond(last: _Try, remaining: float) -> bool:
    """Whether a delayed request can no longer be admitted in the `remaining` seconds. A rate
    or quota says when it has room; a concurrency slot frees whenever a response ends, which no
    estimate knows: that one is looked for until the time is up."""
    if last.budget is Budget.CONCURRENCY:
        return remaining <= 0
    return last.wait > remaining


GAUGE_INTERVAL = 1.0
# A site's gauges come from the snapshot of its latest admission, aged to each publication: the
# rate's burst drains with time, and this replica's requests that ended since give their slot
# back (an admission's snapshot counts its own burst slot and lease: a site asked once every
# 3 s at `rate: 1/s` showed its rate and concurrency at 1.0 for good, and
# CrawlwardenBudgetSaturated fired for a crawl refused nothing). What other replicas did since
# is not known here: a site that gets no traffic would keep its last values (a spent quota stays
# at 1.0 after the UTC day renews), so its state is read again from the store at this interval
# while it stays quiet.
GAUGE_REFRESH = 15.0
_MAX_REFRESHED = 200
_MAX_AGED = 1000  # sites aged at each publication: ~7 ms of the event loop a second at most


class _StoreFailed(Exception):
    """The shared store failed while gauges were read again (counted where it was seen)."""


@dataclass(frozen=True, slots=True)
class _Seen:
    """A site's state as an admission (or a read) saw it, to age at each publication."""

    spec: BudgetSpec
    snapshot: Snapshot
    at: float  # time.monotonic() when seen
    ended: int  # this replica's requests of the site that had ended by then (_ended)


@dataclass(frozen=True, slots=True)
class Lease:
    """An admitted request's hold on its site's budgets; give it back with `engine.finish`."""

    site: str
    id: str
    local: bool = False  # issued by this replica's fallback while the shared store was down
    store: BudgetStore | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Admission:
    decision: Decision
    lease: Lease | None = None
    waited: float = 0.0  # seconds held back in delay mode


@dataclass(slots=True)
class _Try:
    admission: Admission
    wait: float = 0.0  # seconds until the refusing budget frees up
    waitable: bool = False  # worth waiting for in delay mode
    budget: Budget | None = None


@dataclass(slots=True)
class _Unconfirmed:
    """A request admitted ahead that the shared store has not counted yet (_admit_ahead)."""

    spec: BudgetSpec
    settlement: Settlement | None = None  # queued by `finish` meanwhile: sent once it is counted
    # where it was counted instead, the store having stopped answering (_count_unconfirmed_here)
    store: BudgetStore | None = None


@dataclass(slots=True)
class _SiteQueue:
    """Delayed requests of one site on this replica take turns, first come first served."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    users: int = 0
    waiting: int = 0  # blocked on the lock, in the order they came (behind its holder)
    # The first in line waits for the rate's next slot: the loop time the store named for it
    # (0: not known, or it waits for something else). Each one behind it comes one emission
    # interval later at the soonest (other replicas only make it later).
    rate_turn: float = 0.0


def _most_used(a: list[float], b: list[float]) -> list[float]:
    """Per budget, the larger ratio of two sites: what `_other` shows of the sites it stands for."""
    return [max(x, y) for x, y in zip(a, b, strict=True)]


def _ratios(spec: BudgetSpec, snap: Snapshot) -> list[float]:
    """How used each budget is, in `Budget` order (rate, concurrency, day, month, bytes)."""
    return [
        used_ratio(burst_in_use(snap.tat_us, snap.now_us, spec.interval_us), spec.burst),
        used_ratio(snap.in_flight, spec.max_concurrency),
        used_ratio(snap.day_requests, spec.requests_per_day),
        used_ratio(snap.month_requests, spec.requests_per_month),
        used_ratio(snap.day_bytes, spec.bytes_per_day),
    ]


class BudgetEngine:
    def __init__(
        self,
        store: BudgetStore,
        *,
        replicas: int = 1,
        site_label: Callable[[str], str] = lambda key: key,
        site_label_held: Callable[[str], str] | None = None,
        pause_policy: PausePolicy | None = None,
        probe_max_interval: float = 5.0,
    ):
        """`store`: `MemoryBudgetStore()` (embedded) or `RedisBudgetStore(url)` (shared).

        `replicas`: how many gateway replicas share the store. With `fail_mode: local`, each
        replica enforces 1/replicas of every budget while the shared store is unreachable, so
        all of them together stay within the policy. Give the deployment's replica count (the
        Helm chart's `replicaCount`; with an autoscaler, its maximum).

        `site_label`: maps a site key to its bounded `site` label for the gauges.
        `site_label_held`: the label a site has already, taking none (`_other` if it has
        none): a read of the admin API must not take a label slot for the name asked about.
        """
        self._store = store
        self.replicas = max(1, replicas)
        self._site_label = site_label
        self._site_label_held = site_label_held or site_label
        self._pause_policy = pause_policy or PausePolicy()
        self._probe_max = probe_max_interval
        self._fallback: MemoryBudgetStore | None = (
            MemoryBudgetStore(lease_ttl=store.lease_ttl) if store.shared else None
        )
        self._down = False
        self._last_error = ""
        self._probe_delay = 0.1
        # Run when the shared store is back, before the counts of the outage are added to it:
        # a store that lost its data meanwhile gets its floor back first (ReplicaRegistry),
        # and the outage's counts then go on top of it, not under it.
        self.before_handover: Callable[[], Awaitable[object]] | None = None

        self._policy_version: str | None = None
        # The site a budget key names under the policy in force (use_policy_version): what a
        # request held across a reload is admitted by.
        self._in_use: Callable[[str], Site | None] | None = None
        self._specs: dict[str, tuple[object, BudgetSpec]] = {}
        self._local_specs: dict[str, BudgetSpec] = {}
        self._min_interval: dict[str, float] = {}
        # When this replica last admitted a request to each site (monotonic): a Crawl-delay
        # holds from there (_crawl_delay_left).
        self._last_admitted: dict[str, float] = {}
        self._last_seen: dict[str, Snapshot] = {}
        self._seen_at: dict[str, float] = {}  # site -> monotonic time of its _last_seen
        # Admitted ahead of the store's word (_admit_ahead), until the store has counted them:
        # how many per site, and each by its lease id (what `finish` queued meanwhile is sent
        # once the store has the lease it frees), and the tasks counting them.
        self._ahead: dict[str, int] = {}
        self._unconfirmed: dict[str, _Unconfirmed] = {}
        self._confirming: set[asyncio.Task[None]] = set()
        self._local_pause: dict[str, float] = {}  # site -> monotonic end, set synchronously

        self._nonce = secrets.token_hex(6)
        self._seq = itertools.count(1)
        self._live: dict[str, Lease] = {}
        self._pending: list[tuple[BudgetStore, Settlement]] = []
        self._unsynced: list[Carryover] = []
        self._orphans: list[Settlement] = []  # leases of admissions whose answer never came
        self._wake = asyncio.Event()
        self._settle_lock = asyncio.Lock()
        self._queues: dict[str, _SiteQueue] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pausing: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._gauges: dict[str, tuple[Any, ...]] = {}
        self._observed: dict[str, tuple[BudgetSpec, float]] = {}
        # Unlabelled sites seen with some budget in use, for `_other` to be read again when
        # they go quiet (it kept its last value: a budget alert firing on an idle gateway).
        self._other_seen: dict[str, BudgetSpec] = {}
        self._other_published = 0.0
        self._unpublished: dict[str, _Seen] = {}
        # Sites whose rate or concurrency was in use when last published: aged again at each
        # publication until both are free. And how many requests of each site ended here.
        self._aging: dict[str, _Seen] = {}
        self._ended: dict[str, int] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def store_available(self) -> bool:
        """False while the shared store is unreachable (for `/readyz` or a dashboard)."""
        return not self._down

    async def start(self) -> None:
        try:
            await self._store.start()
        except StoreMisconfigured:
            raise  # not an outage to ride out: the replica does not start
        except Exception as e:
            self._store_failed(e)
        self._loops = [
            asyncio.create_task(self._settle_loop(), name="budgets-settle"),
            asyncio.create_task(self._renew_loop(), name="budgets-renew"),
            asyncio.create_task(self._gauge_loop(), name="budgets-gauges"),
        ]
        if self._store.shared:
            follow = self._store.follow_pauses(self._extend_local_pause)
            self._loops.append(asyncio.create_task(follow, name="budgets-pauses"))

    async def close(self) -> None:
        """Settle what is queued (best effort, bounded), stop the background work, close.

        Leases still live are not released: their requests never finished, and the leases lapse
        after the store's lease_ttl, as a crashed replica's would.
        """
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(2.0):
                await self.flush()
        except TimeoutError:
            log.warning("budget_close_timeout", pending=len(self._pending))
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        self._loops = []
        try:
            await self._store.close()
        except Exception as e:
            log.warning("budget_store_close_failed", error=str(e))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- specs -------------------------------------------------------------------------------

    def use_policy_version(
        self, version: str, in_use: Callable[[str], Site | None] | None = None
    ) -> None:
        """A new policy is in force: parse every site's budgets again on first use. The sites
        whose gauges are followed are followed under their new budgets (`in_use`: the site a
        key names now), read again at the next refresh; a key no longer in use (a rule renamed
        or removed) loses its gauges, which would otherwise show its last ratio for good."""
        if version == self._policy_version:
            return
        self._policy_version = version
        self._specs.clear()
        self._local_specs.clear()
        self._aging.clear()  # their specs may have changed: read again below
        self._in_use = in_use
        if in_use is None:
            return
        observed: dict[str, tuple[BudgetSpec, float]] = {}
        for key in self._observed:
            if (site := in_use(key)) is not None:
                observed[key] = (self.spec(site), 0.0)  # 0: read again at the next refresh
        self._observed = observed
        self._other_seen = {
            key: self.spec(site) for key in self._other_seen if (site := in_use(key)) is not None
        }
        self._other_published = 0.0
        followed = {self._site_label(key) for key in observed}
        for label in [label for label in self._gauges if label not in followed]:
            if label == metrics.OTHER:
                continue
            del self._gauges[label]
            for budget in Budget:
                metrics.BUDGET_USED_RATIO.remove(label, str(budget))

    def set_min_interval(self, site_key: str, seconds: float | None) -> None:
        """robots.txt Crawl-delay for a site: the slower of it and the policy's rate applies.

        None or 0 removes it. A delay first set is counted from this replica's last request to
        the site (the robots.txt read, say).
        """
        if seconds and seconds > 0:
            self._min_interval[site_key] = float(seconds)
        else:
            self._min_interval.pop(site_key, None)
        self._specs.pop(site_key, None)
        self._local_specs.pop(site_key, None)

    def forget_min_intervals(self) -> None:
        """Forget every Crawl-delay set (the caller sets each again before its site's next
        admission): what keeps their table bounded."""
        self._min_interval.clear()
        self._specs.clear()
        self._local_specs.clear()

    def spec(self, site: Site) -> BudgetSpec:
        cached = self._specs.get(site.key)
        # Identity, not equality: a reloaded policy builds new settings objects, so a stale
        # spec is never used even if use_policy_version was not called.
        if cached is not None and cached[0] is site.settings:
            return cached[1]
        spec = spec_for(site).with_min_interval(self._min_interval.get(site.key))
        if len(self._specs) >= _MAX_TRACKED_SITES:
            self._specs.clear()
        self._specs[site.key] = (site.settings, spec)
        self._local_specs.pop(site.key, None)
        return spec

    def _local_spec(self, spec: BudgetSpec) -> BudgetSpec:
        local = self._local_specs.get(spec.key)
        if local is None:
            seen = self._last_seen.get(spec.key)
            now = wall_clock_us()
            day_used = bytes_used = month_used = 0
            if seen is not None:
                if utc_day(seen.now_us).id == utc_day(now).id:
                    day_used, bytes_used = seen.day_requests, seen.day_bytes
                if utc_month(seen.now_us).id == utc_month(now).id:
                    month_used = seen.month_requests
            local = spec.share(
                self.replicas, day_used=day_used, month_used=month_used, bytes_used=bytes_used
            )
            self._local_specs[spec.key] = local
        return local

    # -- admission ---------------------------------------------------------------------------

    async def admit(self, site: Site) -> Admission:
        """Check and consume every budget of the site, all or nothing.

        Allowed: the decision carries Reason.OK and the Admission a lease, to hand back with
        `finish` once the response is over (also when it failed). Refused: the reason, the
        policy rule, and an accurate retry_after.
        """
        try:
            spec = self.spec(site)
            if spec.on_exceed == "delay":
                return await self._admit_delayed(spec)
            return (await self._attempt(spec)).admission
        except BudgetStoreFull as e:
            log.warning("budget_store_full", site=site.key, error=str(e))
            return Admission(
                refuse(Reason.STORE_UNAVAILABLE, str(e), retry_after=60.0, site=site.key)
            )
        except Exception as e:  # a bug here must cost one request, not the gateway
            log.exception("budget_admit_failed", site=site.key)
            return Admission(
                refuse(
                    Reason.STORE_UNAVAILABLE,
                    f"the budget check failed ({type(e).__name__}); try again shortly",
                    retry_after=1.0,
                    site=site.key,
                )
            )

    async def _attempt(self, spec: BudgetSpec) -> _Try:
        spacing = self._crawl_delay_left(spec.key)
        if spacing > 0:
            return self._spaced(spec, spacing)
        tried = await self._attempt_store(spec)
        if tried.admission.decision.allowed:
            if len(self._last_admitted) >= _MAX_TRACKED_SITES:
                self._last_admitted.clear()
            self._last_admitted[spec.key] = time.monotonic()
        return tried

    def _crawl_delay_left(self, key: str) -> float:
        """How long until the site's Crawl-delay has passed since this replica last sent it a
        request. The shared rate holds it from then on; but the rate's state when the delay
        was first read (with the robots.txt read itself) was spaced by the policy's rate, so
        the next request went that much sooner (a site owner's advocate's probe)."""
        interval = self._min_interval.get(key)
        last = self._last_admitted.get(key)
        if interval is None or last is None:
            return 0.0
        return last + interval - time.monotonic()

    def _spaced(self, spec: BudgetSpec, wait: float) -> _Try:
        interval = self._min_interval.get(spec.key, 0.0)
        decision = refuse(
            Reason.RATE_LIMITED,
            f"{spec.key}'s robots.txt asks for {interval:g}s between requests (Crawl-delay); "
            f"the next is {wait:.1f}s away",
            rule=CRAWL_DELAY_RULE,
            retry_after=wait,
            site=spec.key,
        )
        # (the rate's: a held request whose turn is past max_delay is refused at once)
        return _Try(Admission(decision), wait=wait, waitable=True, budget=Budget.RATE)

    async def _attempt_store(self, spec: BudgetSpec) -> _Try:
        paused = self._local_pause_left(spec.key)
        if paused > 0:
            return self._paused(spec, paused)
        lease_id = f"{self._nonce}-{next(self._seq)}"
        if self._down:
            return await self._attempt_fallback(spec, lease_id)
        if self._store.shared and self._room_ahead(spec):
            return self._admit_ahead(spec, lease_id)
        try:
            seen = self._last_seen.get(spec.key) if self._store.shared else None
            verdict = await self._store.admit(spec, lease_id, seen=seen)
        except BudgetStoreFull:
            raise  # the in-process store works, and says no (embedded mode)
        except Exception as e:
            if self._store.shared:
                # A call that timed out may still run when the store answers again (a stalled
                # Redis runs what it had read): its slot would be held, by no request, until the
                # lease lapses. Given back on recovery; releasing a lease never taken is a no-op.
                self._orphans.append(Settlement(spec.key, lease_id, 0))
                del self._orphans[:-_MAX_ORPHANS]
            self._store_failed(e)
            return await self._attempt_fallback(spec, lease_id)
        if self._store.shared:
            self._saw(spec.key, verdict.snapshot)
        return self._judge(spec, verdict, self._store, lease_id, local=False)

    def _saw(self, key: str, snapshot: Snapshot) -> None:
        if len(self._last_seen) >= _MAX_TRACKED_SITES:
            self._last_seen.clear()
            self._seen_at.clear()
        self._last_seen[key] = snapshot
        self._seen_at[key] = time.monotonic()

    # -- ahead of the shared store's word ----------------------------------------------------
    # On a busy event loop the store's answer waits for the loop's turn (milliseconds), not for
    # Redis. Where this replica's view of a site, at most AHEAD_VIEW_AGE old, shows every
    # budget at most half used and large, a request goes at once and the same script counts it
    # behind it, whatever it says (still one round trip; the counts stay exact). Large: all the
    # replicas together admit ahead at most 1/AHEAD_SHARE of it (this replica 1/replicas of
    # that, and at most AHEAD_MAX). So a budget is passed only when other replicas spend the
    # other half of it within that moment, and by at most 1/AHEAD_SHARE of it: the rate's next
    # slots then come that much later, a quota is spent that much sooner. A polite budget (a
    # burst, a concurrency, a quota under AHEAD_SHARE x replicas) is never decided ahead.

    def _room_ahead(self, spec: BudgetSpec) -> bool:
        if not spec.admit_ahead:
            return False
        seen = self._last_seen.get(spec.key)
        if seen is None or time.monotonic() - self._seen_at.get(spec.key, 0.0) > AHEAD_VIEW_AGE:
            return False
        ahead = self._ahead.get(spec.key, 0)
        if ahead >= AHEAD_MAX or seen.paused_until_us > seen.now_us:
            return False
        share = (ahead + 1) * AHEAD_SHARE * self.replicas  # this one included
        return (
            _far(spec.burst, burst_in_use(seen.tat_us, seen.now_us, spec.interval_us), share)
            and _far(spec.max_concurrency, seen.in_flight, share)
            and _far(spec.requests_per_day, seen.day_requests, share)
            and _far(spec.requests_per_month, seen.month_requests, share)
            # bytes are counted after the answers, which no count ahead knows: half left
            and (spec.bytes_per_day is None or 2 * seen.day_bytes <= spec.bytes_per_day)
        )

    def _admit_ahead(self, spec: BudgetSpec, lease_id: str) -> _Try:
        seen = self._last_seen[spec.key]
        self._ahead[spec.key] = self._ahead.get(spec.key, 0) + 1
        self._unconfirmed[lease_id] = _Unconfirmed(spec)
        task = self._spawn(self._confirm(spec, lease_id, seen))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)
        lease = Lease(spec.key, lease_id, False, self._store)
        self._live[lease_id] = lease
        return _Try(Admission(Decision(allowed=True, site=spec.key), lease))

    async def _confirm(self, spec: BudgetSpec, lease_id: str, seen: Snapshot) -> None:
        """The store counts a request admitted ahead (whatever it would have said)."""
        outcome = "confirmed"
        try:
            try:
                verdict = await self._store.admit(spec, lease_id, seen=seen, charge=True)
            except Exception as e:
                outcome = "unconfirmed"
                # A call that timed out may have run: its lease is given back on recovery.
                self._orphans.append(Settlement(spec.key, lease_id, 0))
                del self._orphans[:-_MAX_ORPHANS]
                self._store_failed(e)  # (counts it here, with the others unconfirmed)
                return
            counted = self._unconfirmed.get(lease_id)
            if counted is not None and counted.store is not None:
                # Counted here already (the store stopped answering meanwhile): its lease in
                # the store is given back on recovery, with the leases of calls that timed out.
                self._orphans.append(Settlement(spec.key, lease_id, 0))
            self._saw(spec.key, verdict.snapshot)
            self._unpublished[spec.key] = self._seen(spec, verdict.snapshot)
            if not verdict.allowed:
                outcome = "overshot"
                past = "paused" if verdict.budget is None else str(verdict.budget)
                log.warning(
                    "budget_overshot_ahead",
                    site=spec.key,
                    budget=past,
                    detail=f"admitted ahead of Redis's answer, on this replica's view of "
                    f"{spec.key} a moment old; other replicas "
                    + ("paused it" if verdict.budget is None else f"spent its {past}")
                    + " meanwhile; counted all the same",
                )
        finally:
            left = self._ahead.get(spec.key, 1) - 1
            if left > 0:
                self._ahead[spec.key] = left
            else:
                self._ahead.pop(spec.key, None)
            unconfirmed = self._unconfirmed.pop(lease_id, None)
            if unconfirmed is not None and unconfirmed.settlement is not None:
                self._pending.append((unconfirmed.store or self._store, unconfirmed.settlement))
                self._wake.set()
            metrics.BUDGET_ADMITTED_AHEAD.labels(outcome=outcome).inc()

    def _count_unconfirmed_here(self) -> None:
        """The shared store stopped answering: the requests admitted ahead that it has not
        counted are counted by this replica's fallback at once, with those it admits from now
        on (in its share of the budgets, handed over on recovery), their leases there. One the
        store counted all the same (a late answer) is then counted twice: over, never under."""
        for lease_id, unconfirmed in self._unconfirmed.items():
            if unconfirmed.store is not None or self._fallback is None:
                continue
            spec = unconfirmed.spec
            try:
                self._fallback.admit_now(self._local_spec(spec), lease_id, charge=True)
            except BudgetStoreFull as e:
                log.warning("budget_store_full", site=spec.key, error=str(e))
                continue
            unconfirmed.store = self._fallback
            if lease_id in self._live:
                self._live[lease_id] = Lease(spec.key, lease_id, True, self._fallback)

    async def _attempt_fallback(self, spec: BudgetSpec, lease_id: str) -> _Try:
        if self._fallback is None or spec.fail_mode == "closed":
            return _Try(
                Admission(
                    refuse(
                        Reason.STORE_UNAVAILABLE,
                        f"the shared budget store is unreachable ({self._last_error}) and "
                        f"{spec.key}'s policy fails closed",
                        rule=spec.rule("fail_mode"),
                        retry_after=max(1.0, self._probe_delay),
                        site=spec.key,
                    )
                )
            )
        local = self._local_spec(spec)
        verdict = await self._fallback.admit(local, lease_id)
        return self._judge(local, verdict, self._fallback, lease_id, local=True)

    def _judge(
        self,
        spec: BudgetSpec,
        verdict: StoreVerdict,
        store: BudgetStore,
        lease_id: str,
        *,
        local: bool,
    ) -> _Try:
        # The gauges are set once a second from the latest snapshot, not on every request.
        self._unpublished[spec.key] = self._seen(spec, verdict.snapshot)
        if verdict.allowed:
            lease = Lease(spec.key, lease_id, local, store)
            self._live[lease_id] = lease
            return _Try(Admission(Decision(allowed=True, site=spec.key), lease))
        wait = to_seconds(verdict.wait_us)
        if verdict.paused or verdict.budget is None:
            return self._paused(spec, wait)
        budget = verdict.budget
        snap = verdict.snapshot
        share = f" (this replica's 1/{self.replicas} share while Redis is down)" if local else ""
        if budget is Budget.CONCURRENCY:
            detail = (
                f"{spec.key} already has {snap.in_flight} requests in flight; "
                f"max_concurrency is {spec.max_concurrency}{share}"
            )
        elif budget is Budget.RATE:
            detail = (
                f"{spec.key} allows {spec.rate_text} with burst {spec.burst}{share}; "
                f"the next request fits in {wait:.3f}s"
            )
        elif budget is Budget.REQUESTS_PER_DAY:
            detail = (
                f"{spec.key} had its {spec.requests_per_day} requests for "
                f"{_date(snap.now_us)} (UTC){share}; the quota renews at 00:00 UTC"
            )
        elif budget is Budget.REQUESTS_PER_MONTH:
            detail = (
                f"{spec.key} had its {spec.requests_per_month} requests for "
                f"{_date(snap.now_us)[:7]} (UTC){share}; the quota renews on the 1st, 00:00 UTC"
            )
        else:
            detail = (
                f"{spec.key} sent {snap.day_bytes} of its {spec.bytes_per_day} bytes for "
                f"{_date(snap.now_us)} (UTC){share}; the quota renews at 00:00 UTC"
            )
        decision = refuse(
            _REASONS[budget],
            detail,
            rule=spec.rule_for(budget),
            retry_after=wait,
            site=spec.key,
        )
        return _Try(Admission(decision), wait=wait, waitable=True, budget=budget)

    def _paused(self, spec: BudgetSpec, wait: float) -> _Try:
        decision = refuse(
            Reason.SITE_PAUSED,
            f"{spec.key} answered 429 or 503 recently; every replica leaves it alone for "
            f"{wait:.1f}s more, as it asked (Retry-After) or by backoff",
            retry_after=wait,
            site=spec.key,
        )
        return _Try(Admission(decision), wait=wait, waitable=True)

    # -- delay mode --------------------------------------------------------------------------

    def _current_spec(self, spec: BudgetSpec, version: str | None) -> tuple[BudgetSpec, str | None]:
        """A held request's budgets under the policy in force now, and that policy's version: a
        reload while it waited (a lower max_concurrency, rate or quota, a shorter max_delay, or
        on_exceed: refuse) applies to it as to a request that comes after it. A key the new
        policy no longer uses keeps its budgets."""
        if version == self._policy_version or self._in_use is None:
            return spec, version
        site = self._in_use(spec.key)
        return (spec if site is None else self.spec(site)), self._policy_version

    async def _admit_delayed(self, spec: BudgetSpec) -> Admission:
        loop = asyncio.get_running_loop()
        version = self._policy_version
        started = loop.time()
        deadline = started + spec.max_delay
        queue = self._queues.get(spec.key)
        if queue is None:
            queue = self._queues[spec.key] = _SiteQueue()
        queue.users += 1
        try:
            last: _Try | None = None
            if not queue.lock.locked():
                last = await self._attempt(spec)
                if last.admission.decision.allowed or not last.waitable:
                    return last.admission
                if _beyond(last, spec.max_delay):
                    return self._gave_up(spec, last, started)
            if queue.lock.locked():
                last = None  # by the time our turn comes, that answer is stale: ask again then
                if (refused := self._turn_too_far(spec, queue, deadline, started)) is not None:
                    return refused
            queue.waiting += 1
            try:
                try:
                    async with asyncio.timeout_at(deadline):
                        await queue.lock.acquire()
                finally:
                    queue.waiting -= 1
            except TimeoutError:
                # Our turn never came; one last look, then that answer stands.
                spec, version = self._current_spec(spec, version)
                return self._held(await self._attempt(spec), started)
            try:
                if last is not None:  # (asked before taking the lock)
                    queue.rate_turn = loop.time() + last.wait if last.budget is Budget.RATE else 0.0
                polls = 0
                while True:
                    if last is not None:
                        remaining = deadline - loop.time()
                        if _beyond(last, remaining):
                            return self._gave_up(spec, last, started)
                        if last.budget is Budget.CONCURRENCY:
                            # Woken by a release on this replica, or look again for one on
                            # another replica, slowly.
                            poll = min(_SLOT_POLL_FIRST * 2**polls, _SLOT_POLL_MAX, remaining)
                            polls += 1
                            try:
                                async with asyncio.timeout(poll):
                                    await queue.released.wait()
                            except TimeoutError:
                                pass
                        else:
                            await asyncio.sleep(max(0.001, last.wait))
                    queue.released.clear()  # a release from here on wakes us up
                    spec, version = self._current_spec(spec, version)
                    deadline = started + spec.max_delay  # a reload may have changed it too
                    last = await self._attempt(spec)
                    if (
                        last.admission.decision.allowed
                        or not last.waitable
                        or spec.on_exceed != "delay"  # (a reload made it `refuse`)
                    ):
                        return self._held(last, started)
                    queue.rate_turn = loop.time() + last.wait if last.budget is Budget.RATE else 0.0
            finally:
                queue.rate_turn = 0.0
                queue.lock.release()
        finally:
            queue.users -= 1
            if queue.users == 0:
                self._queues.pop(spec.key, None)

    def _turn_too_far(
        self, spec: BudgetSpec, queue: _SiteQueue, deadline: float, started: float
    ) -> Admission | None:
        """A refusal at once for a request queued behind others whose turn cannot come before
        its deadline (the soonest: one emission interval after each one ahead of it); None
        when it may, or when nothing says when."""
        if not queue.rate_turn:
            return None
        # The lock's holder and those already waiting for it (not those still asking the
        # store before they queue: they may have come after this one).
        ahead = 1 + queue.waiting
        soonest = queue.rate_turn + ahead * spec.interval_us / 1e6
        now = asyncio.get_running_loop().time()
        if soonest <= deadline:
            return None
        head = _Try(
            Admission(
                refuse(
                    Reason.RATE_LIMITED,
                    f"{ahead} request(s) of this site wait ahead of this one for the rate "
                    f"({spec.rate_text})",
                    rule=spec.rule("rate"),
                    retry_after=soonest - now,
                    site=spec.key,
                )
            ),
            wait=soonest - now,
            waitable=True,
            budget=Budget.RATE,
        )
        return self._gave_up(spec, head, started)

    def _held(self, last: _Try, started: float) -> Admission:
        waited = asyncio.get_running_loop().time() - started
        return Admission(last.admission.decision, last.admission.lease, waited)

    def _gave_up(self, spec: BudgetSpec, last: _Try, started: float) -> Admission:
        waited = asyncio.get_running_loop().time() - started
        d = last.admission.decision
        held = f"held {waited:.3g}s, " if waited >= 0.001 else ""
        detail = (
            f"{d.detail}; on_exceed is delay, but that is beyond max_delay "
            f"({held}{spec.max_delay:g}s in all, {spec.rule('max_delay')})"
        )
        return Admission(
            refuse(d.reason, detail, rule=d.rule, retry_after=d.retry_after, site=d.site),
            None,
            waited,
        )

    # -- after the response ------------------------------------------------------------------

    def finish(self, lease: Lease | None, response_bytes: int = 0) -> None:
        """The request is over: free its concurrency slot, count its response bytes.

        Returns at once; the store hears of it in the next settlement batch (one pipeline).
        Call it exactly once per admitted request, also when the upstream failed (with the
        bytes received, if any); a second call is ignored, a missing one costs the slot until
        the lease lapses.

        Bytes are only known after the response, so `bytes_per_day` is overshot by what is in
        flight when it runs out. The slot is freed in the same script that counts the bytes,
        so that is at most `max_concurrency` responses of the site (each of any size): the one
        that crossed the limit and the others in flight with it.
        """
        if lease is None or (live := self._live.pop(lease.id, None)) is None:
            return
        lease = live  # (one admitted ahead is the fallback's if the store did not count it)
        if len(self._ended) >= _MAX_TRACKED_SITES:
            self._ended.clear()  # a gauge then shows a slot taken until the site's next snapshot
        self._ended[lease.site] = self._ended.get(lease.site, 0) + 1
        store = lease.store or self._store
        settlement = Settlement(lease.site, lease.id, max(0, response_bytes))
        if (unconfirmed := self._unconfirmed.get(lease.id)) is not None:
            # Admitted ahead, not yet counted: freed once it is (_confirm), not before (a
            # release first, then the lease's count, would hold its slot until it lapses).
            unconfirmed.settlement = settlement
            return
        self._pending.append((store, settlement))
        self._wake.set()

    def charge(self, site_key: str, response_bytes: int) -> None:
        """Count bytes the site sent after its request was finished (a WebSocket's messages)
        against its `bytes_per_day`; in the next settlement batch, as `finish` does."""
        if response_bytes <= 0:
            return
        self._pending.append((self._store, Settlement(site_key, None, response_bytes)))
        self._wake.set()

    async def flush(self) -> None:
        """Settle everything `finish` queued so far (once the store has counted the requests
        admitted ahead) and store the pauses asked for so far."""
        if self._confirming:
            await asyncio.gather(*self._confirming, return_exceptions=True)
        async with self._settle_lock:
            await self._settle_pending()
        if self._pausing:
            await asyncio.gather(*self._pausing, return_exceptions=True)

    async def _settle_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._settle_lock:
                await self._settle_pending()

    async def _settle_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            by_store: dict[int, tuple[BudgetStore, list[Settlement]]] = {}
            for store, item in batch:
                by_store.setdefault(id(store), (store, []))[1].append(item)
            for store, items in by_store.values():
                await self._settle(store, items)
            for _, item in batch:
                queue = self._queues.get(item.site)
                if queue is not None:
                    queue.released.set()

    async def _settle(self, store: BudgetStore, items: list[Settlement]) -> None:
        if store is self._store and self._down:
            self._keep_unsynced(items)
            return
        try:
            await store.settle(items)
        except Exception as e:
            if store is self._store:
                self._store_failed(e)
                # The leases lapse by themselves; the bytes are handed over on recovery.
                self._keep_unsynced(items)
            else:
                log.exception("budget_settle_failed", store=store.name)

    def _keep_unsynced(self, items: list[Settlement]) -> None:
        now = wall_clock_us()
        day, month = utc_day(now).id, utc_month(now).id
        for item in items:
            if item.response_bytes > 0:
                self._unsynced.append(Carryover(item.site, day, 0, item.response_bytes, month, 0))
        del self._unsynced[:-_MAX_TRACKED_SITES]

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self._store.lease_ttl / 3))
            by_store: dict[int, tuple[BudgetStore, list[tuple[str, str]]]] = {}
            for lease in list(self._live.values()):
                store = lease.store or self._store
                if store is self._store and self._down:
                    continue
                by_store.setdefault(id(store), (store, []))[1].append((lease.site, lease.id))
            for store, leases in by_store.values():
                try:
                    await store.renew(leases)
                except Exception as e:
                    if store is self._store:
                        self._store_failed(e)
                    else:
                        log.exception("budget_renew_failed", store=store.name)

    # -- site pauses -------------------------------------------------------------------------

    def site_answered(self, site: Site, status: int, retry_after_header: str | None = None) -> None:
        """Tell the engine how the site answered; a 429 or 503 pauses it on every replica.

        Returns at once. The pause holds on this replica from now on and on the others once the
        store has it (one round trip).
        """
        if status not in THROTTLE_STATUSES:
            return
        try:
            label = self._site_label(site.key)
            metrics.SITE_RESPONSES_THROTTLED.labels(site=label, status=str(status)).inc()
            seconds = parse_retry_after(retry_after_header)
            if seconds is not None:
                seconds = self._pause_policy.clamp(seconds)
            log.warning(
                "site_throttled",
                site=site.key,
                status=status,
                retry_after=retry_after_header,
                pause=seconds if seconds is not None else "backoff",
            )
            now = time.monotonic()
            # At least this long; the store may make it longer (backoff, an earlier pause).
            guard = seconds if seconds is not None else self._pause_policy.base
            if site.key not in self._local_pause and len(self._local_pause) >= _MAX_TRACKED_SITES:
                # Pauses over, of sites not asked again since (_local_pause_left drops the
                # others'): a broad crawl meets many sites that throttle once. While as many
                # run, the half that ends last is kept: the store holds every pause, this is
                # only the replica's own guard; and the next pass is half the bound away.
                running = sorted((e, k) for k, e in self._local_pause.items() if e > now)
                kept = running[-(_MAX_TRACKED_SITES // 2) :] if _MAX_TRACKED_SITES > 1 else []
                self._local_pause = {k: e for e, k in kept}
            self._local_pause[site.key] = max(self._local_pause.get(site.key, 0.0), now + guard)
            task = self._spawn(self._pause(site.key, seconds))
            self._pausing.add(task)
            task.add_done_callback(self._pausing.discard)
        except Exception:
            log.exception("site_answered_failed", site=site.key)

    def _local_pause_left(self, key: str) -> float:
        if not self._local_pause:
            return 0.0
        end = self._local_pause.get(key)
        if end is None:
            return 0.0
        left = end - time.monotonic()
        if left <= 0:
            del self._local_pause[key]
        return left

    async def _pause(self, key: str, seconds: float | None) -> None:
        policy = self._pause_policy
        if not self._down:
            try:
                left = await self._store.pause(key, seconds, policy)
            except Exception as e:
                self._store_failed(e)
            else:
                if self._fallback is not None:
                    # Mirror it, so it holds here even if the shared store goes away.
                    await self._fallback.pause(key, left, policy)
                self._extend_local_pause(key, left)
                return
        if self._fallback is not None:
            left = await self._fallback.pause(key, seconds, policy)
            self._extend_local_pause(key, left)

    def _extend_local_pause(self, key: str, left: float) -> None:
        end = time.monotonic() + left
        if key not in self._local_pause and len(self._local_pause) >= _MAX_TRACKED_SITES:
            return  # let go past the bound (site_answered): the store holds the pause
        if end > self._local_pause.get(key, 0.0):
            self._local_pause[key] = end

    # -- store failure and recovery ----------------------------------------------------------

    def _store_failed(self, exc: BaseException) -> None:
        metrics.STORE_ERRORS.labels(store=self._store.name).inc()
        self._last_error = str(exc) or type(exc).__name__
        if not self._store.shared:
            log.error("budget_store_error", store=self._store.name, error=self._last_error)
            return
        if self._down:
            return
        self._down = True
        self._count_unconfirmed_here()
        self._probe_delay = 0.1
        log.warning("budget_store_unavailable", store=self._store.name, error=self._last_error)
        self._spawn(self._probe())

    async def _probe(self) -> None:
        """Look for the shared store again, backing off; hand over local counts when it is back."""
        while True:
            await asyncio.sleep(self._probe_delay)
            orphans, self._orphans = self._orphans, []
            try:
                await self._store.ping()
                # Before any admission goes to the store again (none does while it is down).
                await self._store.settle(orphans)
            except Exception as e:
                self._orphans = orphans + self._orphans  # and those that timed out meanwhile
                metrics.STORE_ERRORS.labels(store=self._store.name).inc()
                self._last_error = str(e) or type(e).__name__
                self._probe_delay = min(self._probe_delay * 2, self._probe_max)
                continue
            released = len(orphans)
            break
        if self.before_handover is not None:
            try:
                await self.before_handover()
            except Exception:
                log.exception("budget_store_recovery_check_failed", store=self._store.name)
        handover = list(self._unsynced)
        self._unsynced.clear()
        if self._fallback is not None:
            handover.extend(self._fallback.usage_since_start())
            # Counting starts over for the next outage; leases it issued stay with it.
            self._fallback = MemoryBudgetStore(lease_ttl=self._store.lease_ttl)
        self._local_specs.clear()
        self._down = False
        log.info(
            "budget_store_recovered",
            store=self._store.name,
            handed_over=len(handover),
            leases_released=released,
        )
        if handover:
            try:
                await self._store.carry_over(handover)
            except Exception as e:
                self._unsynced.extend(handover)
                self._store_failed(e)

    async def restore_shared_state(self) -> int:
        """The shared store lost its data (Redis restarted without persistence, flushed): write
        back the usage this replica last saw of each site, as a floor (the largest of the
        replicas' views wins; what was counted since the loss stays on top of it, see
        scripts.count_raise), so that a quota does not start over. What no replica saw since it last
        asked (at most the admissions of one heartbeat) is lost, and so is the rate's state
        (a burst may follow). A pause this replica holds goes back too, also one the site asked
        for after the replica last asked the store (its answer came here). Returns how many
        sites were written back."""
        if not self._store.shared or not (self._last_seen or self._local_pause):
            return 0
        now = wall_clock_us()

        def pause_us(site: str, seen_until_us: int = 0) -> int:
            here = int(self._local_pause_left(site) * 1e6)
            return max(0, seen_until_us - now, here)

        items = [
            Carryover(
                site,
                utc_day(seen.now_us).id,
                seen.day_requests,
                seen.day_bytes,
                utc_month(seen.now_us).id,
                seen.month_requests,
                pause_us(site, seen.paused_until_us),
                seen.day_generation,
                seen.month_generation,
            )
            for site, seen in self._last_seen.items()
        ]
        day, month = utc_day(now).id, utc_month(now).id
        items += [
            Carryover(site, day, 0, 0, month, 0, paused)
            for site in list(self._local_pause)
            if site not in self._last_seen and (paused := pause_us(site)) > 0
        ]
        await self._store.carry_over(items, at_least=True)
        return len(items)

    # -- visibility --------------------------------------------------------------------------

    async def _gauge_loop(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(GAUGE_INTERVAL)
            self.publish_gauges()
            if time.monotonic() - last_refresh >= GAUGE_REFRESH:
                last_refresh = time.monotonic()
                await self._refresh_quiet_gauges()

    async def _refresh_quiet_gauges(self) -> None:
        """Re-read the sites whose gauges were not set for GAUGE_REFRESH seconds."""
        cutoff = time.monotonic() - GAUGE_REFRESH
        quiet = [spec for spec, at in self._observed.values() if at < cutoff][:_MAX_REFRESHED]
        for spec in quiet:
            try:
                seen = await self._read_again(spec)
            except _StoreFailed:
                return
            if seen is not None:
                self._observe(*seen)
        if self._other_seen and self._other_published < cutoff:
            await self._refresh_other()

    async def _read_again(self, spec: BudgetSpec) -> tuple[BudgetSpec, Snapshot] | None:
        """The site's state now, from the store that decides for it (None: none does)."""
        store: BudgetStore | None = self._store
        if self._down:
            store = self._fallback if spec.fail_mode == "local" else None
        if store is None:
            return None
        try:
            snap = await store.snapshot(spec.key)
        except Exception as e:
            if store is self._store:
                self._store_failed(e)
            raise _StoreFailed from e
        return (self._local_spec(spec) if store is self._fallback else spec), snap

    async def _refresh_other(self) -> None:
        """`_other` read again from the unlabelled sites last seen in use: the most used of
        them now, 0 once none is (a site no longer in use is no longer followed)."""
        other = [0.0] * len(Budget)
        read = False
        for spec in list(self._other_seen.values())[:_MAX_REFRESHED]:
            try:
                seen = await self._read_again(spec)
            except _StoreFailed:
                return
            if seen is None:
                continue  # no store decides for it now (an outage): not known to be quiet
            read = True
            ratios = _ratios(*seen)
            if not any(ratios):
                del self._other_seen[spec.key]
            other = _most_used(other, ratios)
        if not read:
            return  # kept, as the labelled sites' gauges are
        self._set_gauges(metrics.OTHER, other)
        self._other_published = time.monotonic()

    def publish_gauges(self) -> None:
        """Set `crawlwarden_budget_used_ratio` from the latest state seen of each site, aged to
        now (GAUGE_INTERVAL). The sites without a label of their own share `_other`: it shows,
        per budget, the most used of those seen since the last publication or still in use (the
        last one seen would hide a spent quota behind a quiet site)."""
        latest, self._unpublished = self._unpublished, {}
        now = time.monotonic()
        other: list[float] | None = None
        other_seen_now = False
        for key, seen in [*self._aging.items(), *latest.items()]:
            if key in latest and seen is not latest[key]:
                continue  # seen again since: the newer state decides
            ratios = self._aged_ratios(key, seen, now)
            if self._site_label(key) != metrics.OTHER:
                if key in latest:
                    self._note_observed(seen.spec)
                self._set_gauges(self._site_label(key), ratios)
                continue
            other_seen_now = other_seen_now or key in latest
            other = ratios if other is None else _most_used(other, ratios)
            if any(ratios):
                self._other_seen.pop(key, None)  # (last seen last)
                if len(self._other_seen) >= _MAX_REFRESHED:
                    del self._other_seen[next(iter(self._other_seen))]
                self._other_seen[key] = seen.spec
        if other is not None:
            self._set_gauges(metrics.OTHER, other)
            if other_seen_now:  # (aged states alone leave `_other` to be read again)
                self._other_published = now

    def _seen(self, spec: BudgetSpec, snap: Snapshot) -> _Seen:
        return _Seen(spec, snap, time.monotonic(), self._ended.get(spec.key, 0))

    def _aged_ratios(self, key: str, seen: _Seen, now: float) -> list[float]:
        """The site's ratios now: its rate's burst drained for the time since it was seen, the
        slots of this replica's requests that ended since given back. Followed at the next
        publication while its rate or concurrency is in use."""
        snap = seen.snapshot
        ended = self._ended.get(key, 0) - seen.ended
        aged = replace(
            snap,
            now_us=snap.now_us + int((now - seen.at) * 1e6),
            in_flight=snap.in_flight - ended if 0 <= ended <= snap.in_flight else snap.in_flight,
        )
        ratios = _ratios(seen.spec, aged)
        # Other replicas' requests are in the store's count and end unseen here: past
        # GAUGE_REFRESH the site is followed by reading it again instead (a lease of another
        # replica would hold its concurrency gauge up for good).
        if (ratios[0] or ratios[1]) and now - seen.at < GAUGE_REFRESH:
            if key not in self._aging and len(self._aging) >= _MAX_AGED:
                # the longest followed goes (its gauge is read again once its site is quiet)
                del self._aging[next(iter(self._aging))]
            self._aging[key] = seen
        else:
            self._aging.pop(key, None)
        return ratios

    def _note_observed(self, spec: BudgetSpec) -> None:
        if len(self._observed) >= _MAX_TRACKED_SITES:
            self._observed.clear()
        self._observed[spec.key] = (spec, time.monotonic())

    def _observe(self, spec: BudgetSpec, snap: Snapshot) -> None:
        """A labelled site's state read from the store: its gauges now."""
        label = self._site_label(spec.key)
        if label != metrics.OTHER:  # `_other` sites share one gauge: no single state to refresh
            self._note_observed(spec)
        seen = self._seen(spec, snap)
        self._set_gauges(label, self._aged_ratios(spec.key, seen, seen.at))

    def _set_gauges(self, label: str, ratios: list[float]) -> None:
        gauges = self._gauges.get(label)
        if gauges is None:
            gauges = self._gauges[label] = tuple(
                metrics.BUDGET_USED_RATIO.labels(site=label, budget=str(b)) for b in Budget
            )
        for gauge, ratio in zip(gauges, ratios, strict=True):
            gauge.set(ratio)

    async def usage(self, site: Site) -> dict[str, Any]:
        """Used, limit and remaining per budget of the site (for `GET /v1/budgets?site=`)."""
        spec = self.spec(site)
        source = self._store.name
        snap: Snapshot | None = None
        shown = spec
        if not self._down:
            try:
                snap = await self._store.snapshot(spec.key)
            except Exception as e:
                self._store_failed(e)
        if snap is None and self._fallback is not None and spec.fail_mode == "local":
            shown = self._local_spec(spec)
            snap = await self._fallback.snapshot(spec.key)
            source = "local"
        if snap is None:
            return {
                "site": spec.key,
                "store": "unavailable",
                "error": self._last_error,
                "budgets": _describe(spec, None),
            }
        if self._site_label_held(spec.key) != metrics.OTHER:
            self._unpublished.pop(spec.key, None)
            self._observe(shown, snap)
        out: dict[str, Any] = {
            "site": spec.key,
            "store": source,
            "at": _iso(snap.now_us),
            "paused_until": _iso(snap.paused_until_us)
            if snap.paused_until_us > snap.now_us
            else None,
            "budgets": _describe(shown, snap),
        }
        if source == "local":
            out["share"] = f"1/{self.replicas}"
        return out


def _far(limit: int | None, used: int, share: int) -> bool:
    """No limit, or one at most half used and at least `share` (_room_ahead)."""
    return limit is None or (limit >= share and 2 * used <= limit)


def _describe(spec: BudgetSpec, snap: Snapshot | None) -> dict[str, dict[str, Any]]:
    def entry(budget: Budget, limit: int | None, used: int | None, **extra: Any) -> dict[str, Any]:
        remaining = None if limit is None or used is None else max(0, limit - used)
        ratio = None if used is None else used_ratio(used, limit)
        return {
            "limit": limit,
            "used": used,
            "remaining": remaining,
            "used_ratio": ratio,
            "rule": spec.rule_for(budget),
            **extra,
        }

    if snap is None:
        rate_used = conc = day = month = size = None
        day_end = month_end = None
    else:
        rate_used = burst_in_use(snap.tat_us, snap.now_us, spec.interval_us)
        conc, day, month, size = (
            snap.in_flight,
            snap.day_requests,
            snap.month_requests,
            snap.day_bytes,
        )
        day_end, month_end = _iso(utc_day(snap.now_us).end), _iso(utc_month(snap.now_us).end)
    return {
        str(Budget.RATE): entry(
            Budget.RATE, spec.burst, rate_used, rate=spec.rate_text, unit="burst slots"
        ),
        str(Budget.CONCURRENCY): entry(Budget.CONCURRENCY, spec.max_concurrency, conc),
        str(Budget.REQUESTS_PER_DAY): entry(
            Budget.REQUESTS_PER_DAY, spec.requests_per_day, day, resets_at=day_end
        ),
        str(Budget.REQUESTS_PER_MONTH): entry(
            Budget.REQUESTS_PER_MONTH, spec.requests_per_month, month, resets_at=month_end
        ),
        str(Budget.BYTES_PER_DAY): entry(
            Budget.BYTES_PER_DAY, spec.bytes_per_day, size, resets_at=day_end, unit="bytes"
        ),
    }


def _iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="milliseconds")


def _date(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).date().isoformat()
