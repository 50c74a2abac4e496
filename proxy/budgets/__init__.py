"""Per-site budgets shared by every replica: rate, concurrency, quotas and pauses.

The guideline's "Necessity" principle, enforced: collection from one source stays minimal and
insubstantial, and our visits must not materially increase a site's traffic.

    engine = BudgetEngine(RedisBudgetStore(url), replicas=3, site_label=labels.label)
    await engine.start()
    admission = await engine.admit(site)           # Decision + Lease, all budgets or none
    ...forward, or answer admission.decision...
    engine.finish(admission.lease, response_bytes=n)
    engine.site_answered(site, status, response.headers.get("retry-after"))

Modules: `spec` (a site's budgets, parsed once), `gcra` (the arithmetic, shared with the Lua),
`store` (the protocol), `memory` and `redis_store` (the two stores), `scripts` (the Lua),
`pause` (Retry-After and backoff), `engine` (delay mode, failure handling, settlement, gauges).

Known bounds, by design:
- Byte quota: bytes are counted when a response ends, so `bytes_per_day` is overshot by the
  responses in flight when it runs out. A lease is freed by the same script that counts its
  bytes, so that is at most `max_concurrency` responses of the site, each of any size.
- `fail_mode: local` (Redis unreachable): each replica enforces 1/replicas of the rate and of
  what was left of each quota when it last heard from Redis, rounded down. Together they can
  exceed a quota only by what other replicas admitted after the stalest one last heard from
  Redis. Burst and concurrency are rounded down but at least 1, so with more replicas than
  slots the replicas together may hold up to `replicas` slots. What each replica counts
  meanwhile (requests, bytes, pauses) is added to Redis when Redis is back.
- A lease outlives a dead replica by at most the store's `lease_ttl` (30 s); live leases are
  renewed every lease_ttl / 3, so a long download keeps its slot.
- The gauges lag the store by at most a second (published once a second, and on `usage`).
"""

from proxy.budgets.engine import Admission
from proxy.budgets.engine import BudgetEngine
from proxy.budgets.engine import Lease
from proxy.budgets.memory import MemoryBudgetStore
from proxy.budgets.pause import PausePolicy
from proxy.budgets.pause import parse_retry_after
from proxy.budgets.redis_store import RedisBudgetStore
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec
from proxy.budgets.spec import spec_for
from proxy.budgets.store import BudgetStore
from proxy.budgets.store import StoreUnavailable

__all__ = [
    "Admission",
    "Budget",
    "BudgetEngine",
    "BudgetSpec",
    "BudgetStore",
    "Lease",
    "MemoryBudgetStore",
    "PausePolicy",
    "RedisBudgetStore",
    "StoreUnavailable",
    "parse_retry_after",
    "spec_for",
]
