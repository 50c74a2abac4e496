"""Prometheus metrics (prefix `crawlwarden_`), the names of DESIGN.md's contract.

Label values are bounded: `site` is a policy site id or one of the first `top_n` domains seen,
everything else `_other`; no per-URL or per-account labels.
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import Info
from prometheus_client import disable_created_metrics

# `_created` series double every counter's cardinality and no dashboard reads them.
disable_created_metrics()

OTHER = "_other"

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

REQUESTS = Counter(
    "crawlwarden_requests_total",
    "Requests through the gateway by site, team, decision and reason",
    ["site", "team", "decision", "reason"],
)
UPSTREAM_RESPONSE_BYTES = Counter(
    "crawlwarden_upstream_response_bytes_total",
    "Response body bytes received from sites",
    ["site", "team"],
)
BUDGET_USED_RATIO = Gauge(
    "crawlwarden_budget_used_ratio",
    "Share of a site's budget in use (rate, concurrency, quotas), 0..1",
    ["site", "budget"],
)
OPTOUT_SIGNALS = Counter(
    "crawlwarden_optout_signals_total",
    "Opt-out signals seen, by site and signal",
    ["site", "signal"],
)
REQUEST_DURATION = Histogram(
    "crawlwarden_request_duration_seconds",
    "Time spent per request: governance (our decision), upstream (the site), total",
    ["phase"],
    buckets=_LATENCY_BUCKETS,
)
AUDIT_QUEUE_DEPTH = Gauge(
    "crawlwarden_audit_queue_depth", "Fetch records in the spool not yet in the store"
)
AUDIT_RECORDS = Counter(
    "crawlwarden_audit_records_total",
    "Fetch records by outcome (stored, retry, refused_full)",
    ["outcome"],
)
AUDIT_SPOOL_BYTES = Gauge("crawlwarden_audit_spool_bytes", "Size of the local fetch-log spool")
STORE_ERRORS = Counter(
    "crawlwarden_store_errors_total", "Errors talking to a backing store", ["store"]
)
POLICY_INFO = Gauge("crawlwarden_policy_info", "The policy version in force (value 1)", ["version"])
IN_FLIGHT = Gauge("crawlwarden_requests_in_flight", "Requests forwarded and not yet answered")
UPSTREAM_ERRORS = Counter(
    "crawlwarden_upstream_errors_total",
    "Forwarded requests that got no response, by kind (connect, tls, timeout, reset, other)",
    ["kind"],
)
SITE_RESPONSES_THROTTLED = Counter(
    "crawlwarden_site_throttle_responses_total",
    "429 and 503 answers received from sites: our traffic was not insubstantial",
    ["site", "status"],
)
BUILD_INFO = Info("crawlwarden_build", "Build information")

try:
    _VERSION = metadata.version("crawlwarden")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0+unknown"
BUILD_INFO.info({"version": _VERSION})


def set_policy_version(version: str) -> None:
    POLICY_INFO.clear()
    POLICY_INFO.labels(version=version).set(1)


class SiteLabels:
    """Bounded `site` label values."""

    def __init__(self, policy_sites: list[str], top_n: int = 50):
        self._known = set(policy_sites)
        self._top_n = top_n
        self._seen: set[str] = set()

    def label(self, site: str | None) -> str:
        if site is None:
            return OTHER
        if site in self._known or site in self._seen:
            return site
        if len(self._seen) < self._top_n:
            self._seen.add(site)
            return site
        return OTHER
