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
- Byte quota: bytes are counted when a response ends, so a site can overshoot `bytes_per_day` by
  the responses in flight when the quota runs out: at most `max_concurrency` responses of it.
- `fail_mode: local`: each replica gets 1/replicas of the rate and of the quotas left when it last
  heard from Redis (rounded down); burst and concurrency are rounded down but at least 1, so with
  more replicas than slots the replicas together may hold up to `replicas` slots. What a replica
  counts meanwhile is added to Redis when Redis is back.
- A lease outlives its replica by at most the store's `lease_ttl` (live leases are renewed).
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
