"""Reason codes, statuses and the refusal a scraper receives."""

from __future__ import annotations

import json

from proxy.decision import STATUS
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.decision import render_refusal

# DESIGN.md, "What a scraper sees".
CONTRACT = {
    "auth_required": 407,
    "unknown_project": 403,
    "tos_blocklist": 451,
    "takedown": 451,
    "robots_disallowed": 451,
    "tdm_reserved": 451,
    "noai_directive": 451,
    "content_usage": 451,
    "image_optout": 451,
    "private_address": 403,
    "ip_literal": 403,  # an extension of DESIGN.md's list (README)
    "rate_limited": 429,
    "concurrency": 429,
    "quota_requests": 429,
    "quota_bytes": 429,
    "site_paused": 429,
    "store_unavailable": 503,
    "audit_unavailable": 503,
}


def test_status_codes_follow_the_contract():
    for code, status in CONTRACT.items():
        assert STATUS[Reason(code)] == status
    assert all(r in STATUS for r in Reason if r is not Reason.OK)


def test_refusal_body_and_headers():
    decision = refuse(
        Reason.RATE_LIMITED, "too fast", rule="defaults.rate", retry_after=1.2, site="a.test"
    )
    r = render_refusal(decision)
    assert r.status == 429
    assert r.headers["X-Crawlwarden-Reason"] == "rate_limited"
    assert r.headers["Retry-After"] == "2"  # rounded up, never early
    assert json.loads(r.body) == {
        "decision": "refused",
        "reason": "rate_limited",
        "rule": "defaults.rate",
        "site": "a.test",
        "detail": "too fast",
        "retry_after": 2,
    }
    auth = render_refusal(refuse(Reason.AUTH_REQUIRED, "creds"))
    assert auth.headers["Proxy-Authenticate"].startswith("Basic realm=")
    assert "Retry-After" not in auth.headers
