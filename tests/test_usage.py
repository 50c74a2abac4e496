"""A team's own usage (`GET /v1/usage`), read with its proxy credentials from a real gateway.

Two teams send traffic through one gateway: forwarded fetches, rate refusals, a blocklist
refusal, an unknown project; each team's usage must equal what the test counts from
`crawlwarden audit export` for that team alone, and a team must never see another's records or
reach what only auditors and admins may read.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import requests

from proxy.usage import TeamUsage
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import Site
from tests.support import curl
from tests.support import policy_with

HEADERS = {"X-Crawl-Project": PROJECT}


def usage_policy() -> dict[str, Any]:
    return policy_with(
        sites=[{"id": "site-a", "match": ["site-a.test"], "rate": "60/min", "burst": 2}],
        blocklist=[
            {
                "id": "tos-d",
                "match": ["site-d.test"],
                "reason": "Terms section 7 forbid automated collection",
                "source": "https://site-d.test/terms, read 2026-10-01",
            }
        ],
    )


def usage(gw: Gateway, query: str = "", auth: tuple[str, str] = (TEAM, TEAM_TOKEN)) -> Any:
    answer = requests.get(gw.admin + "/v1/usage" + query, auth=auth, timeout=20)
    assert answer.status_code == 200, answer.text
    return answer.json()


def expected_from_export(records: list[dict[str, Any]], team: str) -> dict[str, Any]:
    """The usage figures counted with the test's own code from an export."""
    mine = [r for r in records if r["team"] == team and r["kind"] == "fetch"]
    # a refused CONNECT answered 200 opened a tunnel to nowhere: its request is counted
    mine = [
        r
        for r in mine
        if not (r["method"] == "CONNECT" and r["decision"] == "refused" and r["status"] == 200)
    ]

    def counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
        decisions = Counter(r["decision"] for r in rows)
        reached = [r for r in rows if r["decision"] in ("forwarded", "withheld")]
        refused = [r for r in rows if r["decision"] == "refused"]
        return {
            "requests": len(rows),
            **{d: decisions[d] for d in ("forwarded", "withheld", "refused", "served")},
            "sent_to_site": len(reached),
            "bytes_received": sum(r["response_bytes"] or 0 for r in reached),
            "refused_by_reason": dict(Counter(r["reason"] for r in refused)),
            "last_refusal_url": max(refused, key=lambda r: r["ts"])["url"] if refused else None,
        }

    return {
        "totals": counts(mine),
        "sites": {
            s: counts([r for r in mine if r["site"] == s]) for s in {r["site"] for r in mine}
        },
        "projects": {
            p: counts([r for r in mine if r["project"] == p]) for p in {r["project"] for r in mine}
        },
    }


def as_compared(figures: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in figures.items() if k not in ("withheld_by_reason", "last_refusal")}
    out.pop("site", None)
    out.pop("project", None)
    out["last_refusal_url"] = (figures["last_refusal"] or {}).get("url")
    return out


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory):
    """A gateway two teams have used: (gateway, its export)."""
    with Site() as site, Gateway(tmp_path_factory.mktemp("usage"), usage_policy()) as gw:

        def get(host: str, path: str, user: str = TEAM, token: str = TEAM_TOKEN, **h: str) -> int:
            proxy = gw.proxy_url(user, token)
            return curl(site.url(host, path), proxy=proxy, headers={**HEADERS, **h}).status

        statuses = [get("site-a.test", f"/img/{i}.jpg") for i in range(6)]
        assert statuses[:2] == [200, 200] and 429 in statuses
        assert get("site-b.test", "/page") == 200
        assert get("site-d.test", "/x") == 451
        assert get("site-b.test", "/y", **{"X-Crawl-Project": "not-ours"}) == 403
        assert get("site-b.test", "/other/1", OTHER_TEAM, OTHER_TOKEN) == 200
        assert get("site-d.test", "/other/2", OTHER_TEAM, OTHER_TOKEN) == 451
        yield gw, gw.fetch_records()


def test_a_teams_usage_equals_its_records_in_the_export(traffic) -> None:
    gw, records = traffic
    for team, token in ((TEAM, TEAM_TOKEN), (OTHER_TEAM, OTHER_TOKEN)):
        answer = usage(gw, auth=(team, token))
        expected = expected_from_export(records, team)
        assert answer["team"] == team
        assert as_compared(answer["totals"]) == expected["totals"], team
        assert {s["site"]: as_compared(s) for s in answer["sites"]} == expected["sites"], team
        assert {p["project"]: as_compared(p) for p in answer["projects"]} == expected["projects"], (
            team
        )
    mine = usage(gw)
    site_a = next(s for s in mine["sites"] if s["site"] == "site-a")
    assert site_a["forwarded"] >= 2 and site_a["refused_by_reason"].keys() == {"rate_limited"}
    assert site_a["last_refusal"]["rule"] == "sites.site-a.rate"
    assert mine["sites"][0]["site"] == "site-a"  # the busiest first
    # the other team's fetch of site-b is not in ours, nor its blocklist refusal
    site_b = next(s for s in mine["sites"] if s["site"] == "site-b.test")
    assert site_b["requests"] == 2 and site_b["refused_by_reason"] == {"unknown_project": 1}


def test_filters_and_the_window(traffic) -> None:
    gw, records = traffic
    only_a = usage(gw, "?site=site-a")
    assert [s["site"] for s in only_a["sites"]] == ["site-a"]
    assert only_a["filters"] == {"site": "site-a"}
    by_project = usage(gw, "?project=not-ours")
    assert by_project["totals"]["requests"] == 1
    # Today (UTC) by default; a window that ends before the first record holds nothing.
    first = min(r["ts"] for r in records)
    assert usage(gw)["period"]["since"].endswith("T00:00:00.000000Z")
    assert usage(gw, f"?since=2000-01-01&until={first}")["totals"]["requests"] == 0
    answer = requests.get(
        gw.admin + "/v1/usage?since=tomorrow", auth=(TEAM, TEAM_TOKEN), timeout=10
    )
    assert answer.status_code == 400 and "invalid time" in answer.json()["error"]
    answer = requests.get(gw.admin + "/v1/usage?tema=x", auth=(TEAM, TEAM_TOKEN), timeout=10)
    assert answer.status_code == 400 and answer.json()["unknown_parameters"] == ["tema"]


def test_what_a_teams_credentials_open_and_what_they_do_not(traffic) -> None:
    gw, _ = traffic
    team = (TEAM, TEAM_TOKEN)
    # what curl -u sends, as README shows it
    answer = curl(gw.admin + "/v1/usage", extra=["-u", f"{TEAM}:{TEAM_TOKEN}"])
    assert answer.status == 200 and json.loads(answer.body)["team"] == TEAM
    # the proxy user name's project and account parts name the same team
    assert usage(gw, auth=(f"{TEAM}+{PROJECT}", TEAM_TOKEN))["team"] == TEAM
    # the sites' budgets (shared by every team) are readable too
    budgets = requests.get(gw.admin + "/v1/budgets?site=site-a", auth=team, timeout=10)
    assert budgets.status_code == 200 and budgets.json()["site"] == "site-a"
    for method, path in (
        ("GET", "/v1/fetches"),
        ("GET", "/v1/reports/sites"),
        ("GET", "/v1/takedowns"),
        ("POST", "/v1/policy/reload"),
    ):
        refused = requests.request(method, gw.admin + path, auth=team, timeout=10)
        assert refused.status_code == 403, (path, refused.text)
        assert "the team role may not do this" in refused.json()["error"]
    for token in (ADMIN_TOKEN, AUDITOR_TOKEN):
        answer = requests.get(
            gw.admin + "/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert answer.status_code == 403, answer.text
    for auth in ((TEAM, OTHER_TOKEN), (TEAM, "wrong"), ("no-such-team", TEAM_TOKEN)):
        answer = requests.get(gw.admin + "/v1/usage", auth=auth, timeout=10)
        assert answer.status_code == 401, auth
    answer = requests.get(gw.admin + "/v1/usage", timeout=10)
    assert answer.status_code == 401
    offered = answer.headers["WWW-Authenticate"]
    assert "Basic" in offered and "Bearer" in offered


def record(ts: int, **fields: Any) -> dict[str, Any]:
    base = {"kind": "fetch", "team": "a", "site": "s", "project": "p", "method": "GET"}
    return {**base, "ts": f"2026-01-01T00:00:{ts:02d}Z", "status": 200, **fields}


def test_usage_counts_only_the_named_teams_fetches() -> None:
    usage = TeamUsage("a")
    usage.visit(record(1, decision="forwarded", response_bytes=10))
    usage.visit(record(2, team="b", decision="forwarded", response_bytes=99))
    usage.visit(record(3, kind="gateway_fetch", decision="forwarded", response_bytes=7))
    # a tunnel opened to nowhere: its request inside is recorded and counted on its own
    usage.visit(record(4, decision="refused", method="CONNECT", reason="tos_blocklist"))
    usage.visit(record(5, decision="withheld", reason="noai_directive", response_bytes=3))
    usage.visit(record(6, decision="refused", reason="rate_limited", url="http://s/x", status=429))
    figures = usage.figures(since=None, until=None)
    totals = figures["totals"]
    assert [totals[k] for k in ("requests", "forwarded", "withheld", "refused")] == [3, 1, 1, 1]
    assert totals["bytes_received"] == 13 and totals["sent_to_site"] == 2
    assert totals["withheld_by_reason"] == {"noai_directive": 1}
    assert totals["last_refusal"]["url"] == "http://s/x"
    assert figures["period"]["first_record"] == "2026-01-01T00:00:01Z"


def test_the_busiest_first_and_on_a_tie_no_site_last() -> None:
    usage = TeamUsage("a")
    for site, n in (("quiet", 1), (None, 5), ("busy", 3), ("also-quiet", 1), ("", 1)):
        for i in range(n):
            usage.visit(record(i, site=site, decision="refused", reason="rate_limited"))
    sites = [s["site"] for s in usage.figures(since=None, until=None)["sites"]]
    assert sites == [None, "busy", "", "also-quiet", "quiet"]


def test_the_usage_route_is_in_the_api_document() -> None:
    from proxy.admin import ROUTES
    from proxy.admin import openapi
    from proxy.app import ADMIN_ROUTES

    document = openapi([*ROUTES, *ADMIN_ROUTES])
    operation = document["paths"]["/v1/usage"]["get"]
    assert operation["security"] == [{"basic": []}]
    assert {p["name"] for p in operation["parameters"]} == {"since", "until", "site", "project"}
    # a team reads the sites' budgets with the same credentials
    assert document["paths"]["/v1/budgets"]["get"]["security"] == [{"bearer": []}, {"basic": []}]
    assert document["paths"]["/v1/fetches"]["get"]["security"] == [{"bearer": []}]
