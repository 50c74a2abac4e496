"""Prometheus metrics (prefix `crawlwarden_`), the names of DESIGN.md's contract.

Label values are bounded: `site` is a policy site id or one of at most `top_n` domains (see
`SiteLabels`), everything else `_other`; `team` is a policy team or `_none`; every other label
takes values from a fixed set. No per-URL or per-account labels.

Label sets that dashboards and alerts read are created at import with value 0 (upstream error
kinds, store errors, fetch-log outcomes, origin-file cache results): `increase()` then sees the
first error, and a panel shows 0 rather than "No data" on a healthy gateway.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from importlib import metadata
from typing import Any

from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import Info
from prometheus_client import disable_created_metrics

# `_created` series double every counter's cardinality and no dashboard reads them.
disable_created_metrics()

OTHER = "_other"
# Domains (besides policy site ids) that may have a `site` label of their own, per process.
DEFAULT_TOP_SITES = 50

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,  # around the 2 ms governance target: 2-5 ms in one bucket read as ~5 ms at p99
    0.004,
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
    "Signals the opt-out checks recorded, by site and signal: opt-outs (binding or not), "
    "their absence (e.g. tdm-header:not-reserved) and what could not be read (...:unread, "
    "...:incomplete, body:undecodable)",
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
    "Fetch records by outcome (stored; retry: had to wait for the store, each counted once; "
    "spool_error, lost; not_kept: a refusal counted, not recorded, the spool past its headroom; "
    "set_aside: refused by the store for what it holds, logged whole and left out of it; "
    "counted_unauthenticated: a refusal of no team's past its client address's share, counted "
    "into an unauthenticated_refusals event)",
    ["outcome"],
)
AUDIT_SPOOL_BYTES = Gauge("crawlwarden_audit_spool_bytes", "Size of the local fetch-log spool")
BUDGET_ADMITTED_AHEAD = Counter(
    "crawlwarden_budget_admitted_ahead_total",
    "Requests admitted ahead of Redis's answer (the site's budgets far from their limits on this"
    " replica's last view), by what Redis said then: confirmed; overshot (other replicas took"
    " what was left meanwhile; counted all the same); unconfirmed (Redis did not answer; counted"
    " in the replica's local share, handed over when it is back)",
    ["outcome"],
)
STORE_ERRORS = Counter(
    "crawlwarden_store_errors_total", "Errors talking to a backing store", ["store"]
)
POLICY_INFO = Gauge("crawlwarden_policy_info", "The policy version in force (value 1)", ["version"])
# Refused reloads (SRE additions to DESIGN.md's list): every replica mounting one ConfigMap
# refuses the same file, so policy_info shows no skew while a restart with that file may fail.
POLICY_RELOAD_FAILURES = Counter(
    "crawlwarden_policy_reload_failures_total",
    "Policy reloads (SIGHUP, POST /v1/policy/reload) refused: invalid file, a signing key that"
    " cannot be read, or a change only a restart applies; the policy in force stayed",
)
POLICY_LAST_RELOAD_SUCCESS = Gauge(
    "crawlwarden_policy_last_reload_success",
    "1 if the last policy reload was applied (or none was asked since start); 0 if it was"
    " refused: the policy file is not what runs, and a restart with it may fail",
)
IN_FLIGHT = Gauge("crawlwarden_requests_in_flight", "Requests forwarded and not yet answered")
UNREAD_ANSWER_BYTES = Gauge(
    "crawlwarden_unread_answer_bytes",
    "Bytes of answers the gateway held whole and handed to HTTP/2 clients that have not read"
    " them yet (past 64 MiB on a connection, its next requests wait)",
)
UPSTREAM_ERRORS = Counter(
    "crawlwarden_upstream_errors_total",
    "Forwarded requests the site failed: no response, or a body cut short; by kind (connect,"
    " tls, timeout, reset, other)",
    ["kind"],
)
SITE_RESPONSES_THROTTLED = Counter(
    "crawlwarden_site_throttle_responses_total",
    "429 and 503 answers received from sites: our traffic was not insubstantial",
    ["site", "status"],
)
BUILD_INFO = Info("crawlwarden_build", "Build information")

# -- shared state and the fetch log (SRE additions to DESIGN.md's list) -----------------------

REDIS_DURATION = Histogram(
    "crawlwarden_redis_duration_seconds",
    "Round trip of one Redis call, by operation (budget scripts, origin-file cache)",
    ["op"],
    buckets=_LATENCY_BUCKETS,
)
AUDIT_LAG = Gauge(
    "crawlwarden_audit_lag_seconds",
    "Age of the oldest fetch record not yet in the store (0: everything is stored)",
)
AUDIT_SPOOL_LIMIT_BYTES = Gauge(
    "crawlwarden_audit_spool_limit_bytes",
    "spool_max_bytes: past it the fetch log refuses records and the gateway fails closed",
)
AUDIT_AVAILABLE = Gauge(
    "crawlwarden_audit_available",
    "1 while the fetch log accepts records; 0 when its spool is full or cannot be written",
)
AUDIT_CHAIN_FORKED = Gauge(
    "crawlwarden_audit_chain_forked",
    "1 when the store holds records or checkpoints of this replica's chain that another gateway"
    " wrote under the same replica id: this one ships nothing more and refuses (its own records"
    " stay in its spool); 0 otherwise",
)
ORIGIN_FILE_CACHE = Counter(
    "crawlwarden_origin_file_cache_total",
    "robots.txt and tdmrep.json lookups behind each replica's parsed copies: hit (in the cache,"
    " shared by replicas with Redis), miss (fetched from the origin), coalesced (waited for a"
    " fetch already under way)",
    ["file", "result"],
)

UPSTREAM_ERROR_KINDS = ("connect", "tls", "timeout", "reset", "other")
ORIGIN_FILES = {"/robots.txt": "robots", "/.well-known/tdmrep.json": "tdmrep"}
for _kind in UPSTREAM_ERROR_KINDS:
    UPSTREAM_ERRORS.labels(kind=_kind)
for _store in ("redis", "originfiles", "audit"):
    STORE_ERRORS.labels(store=_store)
for _outcome in ("confirmed", "overshot", "unconfirmed"):
    BUDGET_ADMITTED_AHEAD.labels(outcome=_outcome)
for _outcome in (
    "stored",
    "retry",
    "spool_error",
    "lost",
    "not_kept",
    "set_aside",
    "counted_unauthenticated",
):
    AUDIT_RECORDS.labels(outcome=_outcome)
# A running process has loaded its policy at start (it does not start without one).
POLICY_LAST_RELOAD_SUCCESS.set(1)
for _file in ORIGIN_FILES.values():
    for _result in ("hit", "miss", "coalesced"):
        ORIGIN_FILE_CACHE.labels(file=_file, result=_result)

try:
    _VERSION = metadata.version("crawlwarden")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0+unknown"
BUILD_INFO.info({"version": _VERSION})


# Children of the per-request series, resolved once: `labels()` validates and locks on every call,
# and these are touched several times per request. The label sets are bounded (see above), so
# the caches are too; the cap only guards against a bug.
GOVERNANCE_SECONDS = REQUEST_DURATION.labels(phase="governance")
UPSTREAM_SECONDS = REQUEST_DURATION.labels(phase="upstream")
TOTAL_SECONDS = REQUEST_DURATION.labels(phase="total")
_CHILD_CACHE_MAX = 50_000
_requests_children: dict[tuple[str, str, str, str], Any] = {}
_bytes_children: dict[tuple[str, str], Any] = {}


def count_request(site: str, team: str, decision: str, reason: str) -> None:
    """crawlwarden_requests_total{site,team,decision,reason} += 1."""
    key = (site, team, decision, reason)
    child = _requests_children.get(key)
    if child is None:
        if len(_requests_children) >= _CHILD_CACHE_MAX:
            _requests_children.clear()
        child = _requests_children[key] = REQUESTS.labels(
            site=site, team=team, decision=decision, reason=reason
        )
    child.inc()


def count_response_bytes(site: str, team: str, n: int) -> None:
    """crawlwarden_upstream_response_bytes_total{site,team} += n."""
    key = (site, team)
    child = _bytes_children.get(key)
    if child is None:
        if len(_bytes_children) >= _CHILD_CACHE_MAX:
            _bytes_children.clear()
        child = _bytes_children[key] = UPSTREAM_RESPONSE_BYTES.labels(site=site, team=team)
    child.inc(n)


_redis_children: dict[str, Any] = {}


def observe_redis(op: str, started: float) -> None:
    """crawlwarden_redis_duration_seconds{op} of a call begun at `started` (perf_counter); the
    operations are a fixed set (script names, ping, script_load, the origin-file cache's)."""
    child = _redis_children.get(op)
    if child is None:
        child = _redis_children[op] = REDIS_DURATION.labels(op=op)
    child.observe(time.perf_counter() - started)


def set_policy_version(version: str) -> None:
    POLICY_INFO.clear()
    POLICY_INFO.labels(version=version).set(1)


def policy_reload_succeeded() -> None:
    POLICY_LAST_RELOAD_SUCCESS.set(1)


def policy_reload_failed() -> None:
    POLICY_RELOAD_FAILURES.inc()
    POLICY_LAST_RELOAD_SUCCESS.set(0)


def origin_file(path: str) -> str:
    """The `file` label of an origin-file path."""
    return ORIGIN_FILES.get(path, "other")


def upstream_error_kind(message: str) -> str | None:
    """The `kind` of an upstream error from mitmproxy's flow error message; None when the error
    is not the site's (the scraper hung up, or the gateway killed the flow itself).

    The messages are mitmproxy's own (12.x), e.g. "[Errno 111] Connect call failed (...)",
    "server closed connection", "Certificate verify failed: ...", "The remote server does not
    speak TLS.", "HTTP/1 protocol error: peer closed connection without sending complete message
    body"; OS errors keep their errno text ("[Errno 110] ...": ETIMEDOUT).
    """
    text = message.lower()
    if text.startswith("client disconnected") or text == "connection killed.":
        return None
    for kind, needles in _ERROR_KINDS:
        if any(n in text for n in needles):
            return kind
    return "other"


# Order matters: "connect" would match "connection" in a reset's message, so it comes last and
# looks for whole phrases.
_ERROR_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("timeout", ("timeout", "timed out", "[errno 110]")),
    ("tls", ("tls", "ssl", "certificate", "handshake")),
    (
        "reset",
        (
            "reset",
            "broken pipe",
            "server closed connection",
            "peer closed",
            "closed by peer",
            "connection closed",
            "eof",
            "[errno 104]",
            "[errno 32]",
        ),
    ),
    (
        "connect",
        (
            "connect call failed",
            "connection refused",
            "unreachable",
            "no route",
            "cannot open connection",
            "connection killed:",
            "refused http connect",
            "name or service not known",
        ),
    ),
)


class DomainSlots:
    """The domains of this process that have a `site` label of their own (at most `top_n`).

    Half the slots go to the first domains seen, so a small deployment sees every site by name
    at once. The other half are earned: a domain gets one after `admit_after` requests while it
    is among the `window` most recently seen unlabelled domains, so the one-off domains of a
    broad crawl cannot take every slot before the sites that carry the traffic show up.

    A slot is never taken back. A true top-N that re-ranks would move series between a domain
    and `_other` (counter resets, gauges left behind, dashboards that flap), and each replica
    would rank differently anyway; a site that must always be shown by name gets a policy site
    rule, whose id is always a label. The slots belong to the process, not to a policy: the
    series of a label live as long as the process, so a reload must not grant N more.
    """

    def __init__(
        self, top_n: int = DEFAULT_TOP_SITES, *, admit_after: int = 3, window: int | None = None
    ):
        self.top_n = top_n
        self.open_slots = top_n // 2
        self.admit_after = admit_after
        self.window = window if window is not None else 10 * top_n
        self.granted: set[str] = set()
        self._candidates: OrderedDict[str, int] = OrderedDict()

    def label(self, domain: str) -> str:
        if domain in self.granted:
            return domain
        if len(self.granted) < self.open_slots:
            self.granted.add(domain)
            return domain
        return OTHER

    def peek(self, domain: str) -> str:
        """The domain's label if it has a slot, else `_other`: takes and earns nothing."""
        return domain if domain in self.granted else OTHER

    def observe(self, domain: str) -> str:
        label = self.label(domain)
        if label != OTHER or len(self.granted) >= self.top_n:
            return label
        seen = self._candidates.pop(domain, 0) + 1
        if seen >= self.admit_after:
            self.granted.add(domain)
            return domain
        self._candidates[domain] = seen
        if len(self._candidates) > self.window:
            self._candidates.popitem(last=False)
        return OTHER


_PROCESS_SLOTS: dict[int, DomainSlots] = {}


def process_slots(top_n: int) -> DomainSlots:
    slots = _PROCESS_SLOTS.get(top_n)
    if slots is None:
        slots = _PROCESS_SLOTS[top_n] = DomainSlots(top_n)
    return slots


class SiteLabels:
    """Bounded `site` label values: a policy site id, a domain with a slot, or `_other`.

    `observe()` is for a request that reached the site: it counts towards earning a slot.
    `peek()` is for a refused one: it takes no slot. `label()` is for gauges and other per-site
    updates that are not requests: it does not count (an open slot is still taken at once).
    """

    def __init__(
        self,
        policy_sites: list[str],
        top_n: int = DEFAULT_TOP_SITES,
        *,
        slots: DomainSlots | None = None,
    ):
        self._known = set(policy_sites)
        self._slots = slots if slots is not None else process_slots(top_n)

    def label(self, site: str | None) -> str:
        if site is None:
            return OTHER
        if site in self._known:
            return site
        return self._slots.label(site)

    def observe(self, site: str | None) -> str:
        if site is None:
            return OTHER
        if site in self._known:
            return site
        return self._slots.observe(site)

    def peek(self, site: str | None) -> str:
        """For a refused request: the label the site has, never a slot for it (a crawl's
        refusals, blocklisted domains say, would otherwise take the slots of the sites that
        carry its traffic)."""
        if site is None:
            return OTHER
        if site in self._known:
            return site
        return self._slots.peek(site)
