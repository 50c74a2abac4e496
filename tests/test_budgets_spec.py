"""A site's budgets from the policy, Crawl-delay, local shares, and Retry-After parsing."""

from __future__ import annotations

import email.utils

import pytest
import yaml

from proxy.budgets import PausePolicy
from proxy.budgets import parse_retry_after
from proxy.budgets import spec_for
from proxy.budgets.spec import CRAWL_DELAY_RULE
from proxy.budgets.spec import Budget
from proxy.policy import parse_policy
from proxy.sites import SiteDirectory
from tests.support import policy_with


def directory(**defaults: object) -> SiteDirectory:
    policy = policy_with(
        defaults={
            "rate": "2/s",
            "burst": 3,
            "max_concurrency": 4,
            "requests_per_day": 100,
            "requests_per_month": 1000,
            "bytes_per_day": "5MB",
            "on_exceed": "delay",
            "max_delay": "1500ms",
            "fail_mode": "local",
            **defaults,
        },
        sites=[
            {
                "id": "archive",
                "match": ["archive.example.org"],
                "rate": "30/min",
                "requests_per_day": 20,
                "bytes_per_day": None,
            }
        ],
    )
    return SiteDirectory(parse_policy(yaml.safe_dump(policy)).policy)


def test_spec_from_defaults():
    spec = spec_for(directory().site_for("images.example.com"))
    assert spec.key == "example.com"
    assert (spec.interval_us, spec.burst, spec.rate_text) == (500_000, 3, "2/s")
    assert spec.max_concurrency == 4
    assert (spec.requests_per_day, spec.requests_per_month) == (100, 1000)
    assert spec.bytes_per_day == 5_000_000
    assert (spec.on_exceed, spec.max_delay, spec.fail_mode) == ("delay", 1.5, "local")
    assert spec.rule_for(Budget.RATE) == "defaults.rate"
    assert spec.rule_for(Budget.REQUESTS_PER_DAY) == "defaults.requests_per_day"


def test_spec_names_the_site_rule_that_set_a_budget():
    spec = spec_for(directory().site_for("archive.example.org"))
    assert spec.key == "archive"
    assert spec.interval_us == 2_000_000  # 30/min
    assert spec.rule_for(Budget.RATE) == "sites.archive.rate"
    assert spec.rule_for(Budget.REQUESTS_PER_DAY) == "sites.archive.requests_per_day"
    # Not overridden by the rule: the defaults' value and rule.
    assert spec.rule_for(Budget.CONCURRENCY) == "defaults.max_concurrency"
    assert spec.rule_for(Budget.REQUESTS_PER_MONTH) == "defaults.requests_per_month"
    # A quota a site rule sets to null has no limit, as in `defaults` (it used to mean "not
    # overridden": the default's limit applied, silently).
    assert spec.bytes_per_day is None
    assert spec.rule_for(Budget.BYTES_PER_DAY) == "sites.archive.bytes_per_day"


def test_unlimited_quotas():
    spec = spec_for(
        directory(requests_per_day=None, requests_per_month=None, bytes_per_day=None).site_for(
            "example.net"
        )
    )
    assert (spec.requests_per_day, spec.requests_per_month, spec.bytes_per_day) == (None,) * 3


def test_crawl_delay_slows_the_rate_but_never_speeds_it_up():
    spec = spec_for(directory().site_for("example.com"))  # 2/s, burst 3
    slower = spec.with_min_interval(5)
    assert (slower.interval_us, slower.burst) == (5_000_000, 1)
    assert slower.rule_for(Budget.RATE) == CRAWL_DELAY_RULE
    assert "Crawl-delay" in slower.rate_text
    assert spec.with_min_interval(0.1) is spec  # faster than the policy: the policy wins
    assert spec.with_min_interval(None) is spec
    assert spec.with_min_interval(0) is spec


def test_local_share_keeps_replicas_within_the_budget():
    spec = spec_for(directory().site_for("example.com"))  # 2/s burst 3, conc 4, 100/d, 1000/m
    share = spec.share(3, day_used=40, month_used=100, bytes_used=2_000_000)
    assert share.interval_us == 3 * spec.interval_us  # a third of the rate
    assert share.burst == 1
    assert share.max_concurrency == 1
    assert share.requests_per_day == 20  # (100 - 40) // 3
    assert share.requests_per_month == 300
    assert share.bytes_per_day == 1_000_000
    assert 3 * share.requests_per_day + 40 <= 100
    # Quota already spent: nothing left to share.
    assert spec.share(2, day_used=150).requests_per_day == 0
    assert spec.share(1) == spec


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("-3", None),
        ("1.5", None),  # RFC 9110 10.2.3: delay-seconds is an integer
    ],
)
def test_retry_after_seconds(header: str | None, seconds: float | None):
    assert parse_retry_after(header) == seconds


def test_retry_after_http_date():
    now = 1_790_000_000.0
    header = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(90.0)
    # A date in the past: retry now.
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now=now) == 0.0
    # The obsolete RFC 850 form is still an HTTP-date.
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now=784111777.0) == 0.0


def test_pause_policy_clamps_what_sites_ask_for():
    policy = PausePolicy(min_pause=1.0, max_pause=3600.0)
    assert policy.clamp(0) == 1.0
    assert policy.clamp(30) == 30
    assert policy.clamp(10**9) == 3600.0
