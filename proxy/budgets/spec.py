"""A site's budgets, parsed once from its policy settings.

`BudgetSpec` is what the stores enforce. It is built from `Site.settings` when a site is first
seen under a policy version and reused until the policy changes; nothing is parsed per request.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from dataclasses import replace
from typing import Literal

from proxy import units
from proxy.budgets.gcra import to_us
from proxy.sites import Site


class Budget(enum.StrEnum):
    """The budgets of a site; also the `budget` label of `crawlwarden_budget_used_ratio`."""

    RATE = "rate"
    CONCURRENCY = "concurrency"
    REQUESTS_PER_DAY = "requests_per_day"
    REQUESTS_PER_MONTH = "requests_per_month"
    BYTES_PER_DAY = "bytes_per_day"


# The policy field behind each budget, for the `rule` of a refusal ("sites.<id>.rate").
FIELD = {
    Budget.RATE: "rate",
    Budget.CONCURRENCY: "max_concurrency",
    Budget.REQUESTS_PER_DAY: "requests_per_day",
    Budget.REQUESTS_PER_MONTH: "requests_per_month",
    Budget.BYTES_PER_DAY: "bytes_per_day",
}

CRAWL_DELAY_RULE = "robots.crawl_delay"


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """Every limit of one site. `None` quotas are unlimited (still counted, for visibility)."""

    key: str
    interval_us: int  # GCRA emission interval
    burst: int
    rate_text: str
    max_concurrency: int
    requests_per_day: int | None
    requests_per_month: int | None
    bytes_per_day: int | None
    on_exceed: Literal["reject", "delay"] = "reject"
    max_delay: float = 10.0
    fail_mode: Literal["closed", "local"] = "closed"
    admit_ahead: bool = True  # (engine._room_ahead)
    # policy rule id per policy field, e.g. {"rate": "sites.archive.rate", ...}
    rules: tuple[tuple[str, str], ...] = ()

    def rule(self, field: str) -> str:
        return dict(self.rules).get(field, f"defaults.{field}")

    def rule_for(self, budget: Budget) -> str:
        return self.rule(FIELD[budget])

    def with_min_interval(self, seconds: float | None) -> BudgetSpec:
        """The spec with robots.txt's Crawl-delay applied: the slower of the two rates wins.

        Crawl-delay asks for a pause between successive requests, so when it binds there is no
        burst either.
        """
        if not seconds or seconds <= 0:
            return self
        interval = to_us(seconds)
        if interval <= self.interval_us:
            return self
        rules = (*((f, r) for f, r in self.rules if f != "rate"), ("rate", CRAWL_DELAY_RULE))
        return replace(
            self,
            interval_us=interval,
            burst=1,
            rate_text=f"1 per {seconds:g}s (robots.txt Crawl-delay)",
            rules=rules,
        )

    def share(
        self,
        replicas: int,
        *,
        day_used: int = 0,
        month_used: int = 0,
        bytes_used: int = 0,
    ) -> BudgetSpec:
        """This replica's share of the site's budgets while the shared store is unreachable.

        Each of `replicas` replicas gets 1/replicas of the rate and of what was left of each quota
        when this replica last heard from the shared store (`*_used`), rounded down, so the
        replicas together stay within the budget. Burst and concurrency are rounded down too
        but never below 1: with more replicas than slots, the replicas together may hold up to
        `replicas` slots (documented in the package docstring).
        """
        n = max(1, replicas)

        def left(limit: int | None, used: int) -> int | None:
            return None if limit is None else max(0, limit - used) // n

        return replace(
            self,
            interval_us=self.interval_us * n,
            burst=max(1, self.burst // n),
            rate_text=f"{self.rate_text} / {n} replicas" if n > 1 else self.rate_text,
            max_concurrency=max(1, self.max_concurrency // n),
            requests_per_day=left(self.requests_per_day, day_used),
            requests_per_month=left(self.requests_per_month, month_used),
            bytes_per_day=left(self.bytes_per_day, bytes_used),
        )


def spec_for(site: Site) -> BudgetSpec:
    """Parse a site's settings once. The policy was validated at load, so this cannot fail."""
    s = site.settings
    rate = units.parse_rate(s.rate)
    overridden = set(site.rule.overrides()) if site.rule is not None else set()
    prefix = f"sites.{site.rule.id}" if site.rule is not None else "defaults"
    rules = tuple(
        (name, f"{prefix}.{name}" if name in overridden else f"defaults.{name}")
        for name in (*FIELD.values(), "burst", "on_exceed", "max_delay", "fail_mode")
    )
    return BudgetSpec(
        key=site.key,
        interval_us=max(1, to_us(rate.interval)),
        burst=s.burst,
        rate_text=rate.text,
        max_concurrency=s.max_concurrency,
        requests_per_day=s.requests_per_day,
        requests_per_month=s.requests_per_month,
        bytes_per_day=None if s.bytes_per_day is None else units.parse_size(s.bytes_per_day),
        on_exceed=s.on_exceed,
        max_delay=units.parse_duration(s.max_delay),
        fail_mode=s.fail_mode,
        admit_ahead=s.admit_ahead,
        rules=rules,
    )


def used_ratio(used: float, limit: float | None) -> float:
    """0..1 for the gauge; an unlimited budget is never used up, a zero budget always is."""
    if limit is None:
        return 0.0
    if limit <= 0:
        return 1.0
    return min(1.0, max(0.0, used / limit)) if math.isfinite(used) else 1.0
