"""Decisions are values: what the gateway does with one request, and why.

This module is the one place that maps a reason code to the status a scraper sees
(DESIGN.md, "What a scraper sees").
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from dataclasses import field


class Reason(enum.StrEnum):
    OK = "ok"
    AUTH_REQUIRED = "auth_required"
    UNKNOWN_PROJECT = "unknown_project"
    BAD_REQUEST = "bad_request"
    # Request framing the gateway does not take (proxy/inputs.py, addons/http_guard.py).
    LENGTH_REQUIRED = "length_required"
    REQUEST_TOO_LARGE = "request_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    MISDIRECTED = "misdirected"
    TOS_BLOCKLIST = "tos_blocklist"
    TAKEDOWN = "takedown"
    ROBOTS_DISALLOWED = "robots_disallowed"
    TDM_RESERVED = "tdm_reserved"
    NOAI_DIRECTIVE = "noai_directive"
    CONTENT_USAGE = "content_usage"
    IMAGE_OPTOUT = "image_optout"
    PRIVATE_ADDRESS = "private_address"
    IP_LITERAL = "ip_literal"  # a target named by its address, outside network.allow_ip_literals
    UNRESOLVABLE = "unresolvable"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY = "concurrency"
    QUOTA_REQUESTS = "quota_requests"
    QUOTA_BYTES = "quota_bytes"
    SITE_PAUSED = "site_paused"
    STORE_UNAVAILABLE = "store_unavailable"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    DRAINING = "draining"  # the replica is stopping: retry, on another one
    # Outcomes of forwarded requests that did not get a response from the site.
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERRUPTED = "interrupted"
    # A scraper's GET /robots.txt answered from the gateway's own copy.
    ROBOTS_CACHE = "robots_cache"


STATUS: dict[Reason, int] = {
    Reason.AUTH_REQUIRED: 407,
    Reason.UNKNOWN_PROJECT: 403,
    Reason.BAD_REQUEST: 400,
    Reason.LENGTH_REQUIRED: 411,
    Reason.REQUEST_TOO_LARGE: 413,
    Reason.HEADERS_TOO_LARGE: 431,  # RFC 6585 section 5
    # RFC 9110 15.5.20: a request inside a CONNECT tunnel for another host than the tunnel's.
    Reason.MISDIRECTED: 421,
    Reason.TOS_BLOCKLIST: 451,
    Reason.TAKEDOWN: 451,
    Reason.ROBOTS_DISALLOWED: 451,
    Reason.TDM_RESERVED: 451,
    Reason.NOAI_DIRECTIVE: 451,
    Reason.CONTENT_USAGE: 451,
    Reason.IMAGE_OPTOUT: 451,
    Reason.PRIVATE_ADDRESS: 403,
    Reason.IP_LITERAL: 403,
    Reason.UNRESOLVABLE: 502,
    Reason.RATE_LIMITED: 429,
    Reason.CONCURRENCY: 429,
    Reason.QUOTA_REQUESTS: 429,
    Reason.QUOTA_BYTES: 429,
    Reason.SITE_PAUSED: 429,
    Reason.STORE_UNAVAILABLE: 503,
    Reason.AUDIT_UNAVAILABLE: 503,
    Reason.DRAINING: 503,
    Reason.UPSTREAM_ERROR: 502,
    Reason.UPSTREAM_TIMEOUT: 504,
    Reason.INTERRUPTED: 502,
    Reason.ROBOTS_CACHE: 200,
}


class Outcome(enum.StrEnum):
    """The `decision` field of a fetch record."""

    FORWARDED = "forwarded"
    REFUSED = "refused"
    WITHHELD = "withheld"
    # Answered by the gateway from its own copy (a scraper's GET /robots.txt): the site saw
    # no request, and the scraper was not refused.
    SERVED = "served"


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request. `allowed` decisions carry Reason.OK."""

    allowed: bool
    reason: Reason = Reason.OK
    rule: str | None = None
    detail: str = ""
    retry_after: float | None = None
    site: str | None = None
    signals: tuple[str, ...] = field(default=())

    @property
    def status(self) -> int:
        return 200 if self.allowed else STATUS[self.reason]


ALLOW = Decision(allowed=True)


def refuse(
    reason: Reason,
    detail: str,
    *,
    rule: str | None = None,
    retry_after: float | None = None,
    site: str | None = None,
    signals: tuple[str, ...] = (),
) -> Decision:
    return Decision(
        allowed=False,
        reason=reason,
        rule=rule,
        detail=detail,
        retry_after=retry_after,
        site=site,
        signals=signals,
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the scraper receives it: status, headers and JSON body."""

    status: int
    headers: dict[str, str]
    body: bytes


def render_refusal(decision: Decision, outcome: Outcome = Outcome.REFUSED) -> Refusal:
    # Retry-After is rounded up: a scraper that honours it must not come back a moment too early.
    retry_after = None if decision.retry_after is None else max(1, math.ceil(decision.retry_after))
    body = {
        "decision": str(outcome),
        "reason": str(decision.reason),
        "rule": decision.rule,
        "site": decision.site,
        "detail": decision.detail,
        "retry_after": retry_after,
    }
    headers = {
        "Content-Type": "application/json",
        "X-Crawlwarden-Reason": str(decision.reason),
        "Cache-Control": "no-store",
    }
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if decision.reason is Reason.AUTH_REQUIRED:
        headers["Proxy-Authenticate"] = 'Basic realm="crawlwarden"'
    return Refusal(STATUS[decision.reason], headers, json.dumps(body).encode() + b"\n")
