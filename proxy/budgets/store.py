"""The budget store protocol: one atomic check-and-consume per request, and its bookkeeping.

Two implementations: `MemoryBudgetStore` (one process: embedded mode, and the fallback when the
shared store is down) and `RedisBudgetStore` (shared by every replica). They follow the same
rules (`gcra.py`) and the tests hold them against each other.

`now_us` parameters exist for tests only: production callers leave them out, and each store uses
its own clock (Redis: `TIME`, the one clock of all replicas).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Protocol

from proxy.budgets.pause import PausePolicy
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time."""


class StoreMisconfigured(Exception):
    """The store answered and refused this gateway (a wrong password, a database index that does
    not exist, an ACL without the commands it needs): not an outage to ride out, a setting to
    fix. A replica started so would have refused every request while it reported ready."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A site's state as the store saw it at `now_us` (after consumption, when allowed)."""

    now_us: int
    tat_us: int  # GCRA theoretical arrival time
    in_flight: int  # live concurrency leases
    day_requests: int
    day_bytes: int
    month_requests: int
    paused_until_us: int  # 0: never paused
    # which generation of the shared store counted the day and the month ('' none: in-process,
    # or a count an older replica's script started); scripts.count_raise. Bookkeeping of the
    # store, not the site's state: two snapshots of the same state are equal.
    day_generation: str = field(default="", compare=False)
    month_generation: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class StoreVerdict:
    allowed: bool
    # the budget that refused (the one that frees up last, when several do); None when allowed
    # or when the site is paused
    budget: Budget | None
    paused: bool
    wait_us: int  # until the refusing budget frees up (concurrency: an estimate, see gcra.py)
    snapshot: Snapshot
    # Refused, and consumed all the same (`admit(charge=True)`): the request had gone already,
    # and the budgets it went past count it.
    charged: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do once a response is over: free the lease, count the bytes."""

    site: str
    lease_id: str | None
    response_bytes: int


@dataclass(frozen=True, slots=True)
class Carryover:
    """Usage counted elsewhere (the local fallback, failed settlements) to add to a store."""

    site: str
    day: int  # the utc_day id the counts belong to
    day_requests: int
    day_bytes: int
    month: int  # the utc_month id
    month_requests: int
    paused_for_us: int = 0  # a pause still running, to carry over too
    # the generations the counts were seen in (Snapshot), for a floor written back (at_least)
    day_generation: str = ""
    month_generation: str = ""


class BudgetStore(Protocol):
    name: str  # the `store` label of crawlwarden_store_errors_total
    shared: bool  # shared by replicas (may fail; the engine then falls back)
    lease_ttl: float  # seconds a concurrency lease lives unless renewed

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def admit(
        self,
        spec: BudgetSpec,
        lease_id: str,
        *,
        now_us: int | None = None,
        seen: Snapshot | None = None,
        charge: bool = False,
    ) -> StoreVerdict:
        """Check every budget of the site; consume all of them (and take a lease) or none.
        `seen`: the site as this replica last saw it in a shared store, which raises counts the
        store has lost (scripts.ADMIT); an in-process store loses none. `charge`: consume them
        whatever the answer (a request admitted ahead of the store's word has gone already);
        the verdict still says which budget it went past."""
        ...

    async def settle(self, batch: Sequence[Settlement], *, now_us: int | None = None) -> None:
        """Release leases and add response bytes to today's count, as one batch."""
        ...

    async def renew(self, leases: Sequence[tuple[str, str]], *, now_us: int | None = None) -> None:
        """Extend live (site, lease id) leases by `lease_ttl`, so only dead replicas' expire."""
        ...

    async def pause(
        self,
        site: str,
        seconds: float | None,
        policy: PausePolicy,
        *,
        now_us: int | None = None,
    ) -> float:
        """Pause the site for `seconds`, or by backoff when None; returns the pause left (s)."""
        ...

    async def follow_pauses(self, on_pause: Callable[[str, float], None]) -> None:
        """Until cancelled, call `on_pause(site, seconds left)` for each pause another replica
        stores (and this one); an in-process store returns at once: it has no others."""
        ...

    async def snapshot(self, site: str, *, now_us: int | None = None) -> Snapshot: ...

    async def carry_over(
        self, items: Sequence[Carryover], *, now_us: int | None = None, at_least: bool = False
    ) -> None:
        """Add usage counted elsewhere, for the periods that are still current; `at_least`:
        raise the counts to at least these instead (usage seen before the store lost it)."""
        ...
