"""A team's own usage (`GET /v1/usage`), read with its proxy credentials from a real gateway.

Two teams send traffic through one gateway: forwarded fetches, rate refusals, a blocklist
refusal, an unknown project; each team's usage must equal what the test counts from
`crawlwarden audit export` for that team alone, and a team must never see another's records or
reach what only auditors and admins may read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.audit.postgres_store import PostgresStore
from proxy.audit.query import RecordQuery
from proxy.audit.record import FetchRecord
from proxy.audit.sqlite_store import SQLiteStore
from proxy.audit.usage_query import UsageGroup
from proxy.audit.usage_query import UsageRows
from proxy.record_source import SQLITE_NAME
from proxy.record_source import RecordSource
from proxy.usage import team_usage
from tests import pg_fixtures
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
from tests.test_audit_support import TEAMS
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log

HEADERS = {"X-Crawl-Project": PROJECT}
pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn


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
    websockets = [r for r in records if r["team"] == team and r["kind"] == "websocket"]
    mine = [r for r in records if r["team"] == team and r["kind"] == "fetch"]
    # a refused CONNECT answered 200 opened a tunnel to nowhere: its request is counted
    mine = [
        r
        for r in mine
        if not (r["method"] == "CONNECT" and r["decision"] == "refused" and r["status"] == 200)
    ]

    def counts(rows: list[dict[str, Any]], talks: list[dict[str, Any]]) -> dict[str, Any]:
        decisions = Counter(r["decision"] for r in rows)
        reached = [r for r in rows if r["decision"] in ("forwarded", "withheld")]
        refused = [r for r in rows if r["decision"] == "refused"]
        return {
            "requests": len(rows),
            **{d: decisions[d] for d in ("forwarded", "withheld", "refused", "served")},
            "sent_to_site": len(reached),
            # and a WebSocket's messages from the site: bytes, no request
            "bytes_received": sum(r["response_bytes"] or 0 for r in reached + talks),
            "refused_by_reason": dict(Counter(r["reason"] for r in refused)),
            "last_refusal_url": max(refused, key=lambda r: (r["ts"], r["replica"], r["seq"]))["url"]
            if refused
            else None,
        }

    def by(name: str) -> dict[str | None, dict[str, Any]]:
        keys = {r[name] for r in mine + websockets}
        return {
            k: counts([r for r in mine if r[name] == k], [r for r in websockets if r[name] == k])
            for k in keys
        }

    return {"totals": counts(mine, websockets), "sites": by("site"), "projects": by("project")}


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
    # a window's end alone: everything before it (not today's start, after its end: a 400)
    before = usage(gw, f"?until={first}")
    assert before["period"]["since"] is None and before["totals"]["requests"] == 0
    assert usage(gw, "?until=2999-01-01")["totals"] == usage(gw)["totals"]
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


def logged_records() -> list[FetchRecord]:
    """Records of every kind the usage counts or leaves out, over two days and two teams."""
    day1, day2 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    out = []
    for i in range(60):
        when = (day1 if i < 20 else day2).timestamp() + i
        out.append(fetch(i, when, team=TEAMS[i % 2], project=("p1", "p2", None)[i % 3]))
    at = day2.timestamp() + 100
    team = TEAMS[0]
    talked = {"decision": "forwarded", "reason": "ok"}  # (a WebSocket's record, as written)
    out += [
        # a tunnel opened to nowhere: its request inside is recorded and counted on its own
        fetch(
            1,
            at,
            team=team,
            method="CONNECT",
            decision="refused",
            reason="tos_blocklist",
            status=200,
            response_bytes=0,
        ),
        fetch(2, at + 1, team=team, decision="refused", reason="tos_blocklist", status=451),
        fetch(3, at + 2, team=team, decision="withheld", reason="noai_directive", status=451),
        fetch(4, at + 3, team=team, decision="served", reason="robots_cache", response_bytes=9),
        fetch(
            5,
            at + 4,
            team=team,
            site=None,
            decision="refused",
            reason="bad_request",
            status=400,
            response_bytes=None,
        ),
        fetch(6, at + 5, team=team, kind="gateway_fetch", response_bytes=77),
        # a WebSocket's messages from the site: bytes, no request (one on a site of its own)
        fetch(8, at + 7, team=team, kind="websocket", status=101, response_bytes=500, **talked),
        fetch(
            9,
            at + 8,
            team=team,
            kind="websocket",
            status=101,
            site="ws.example",
            response_bytes=40,
            **talked,
        ),
        fetch(
            7,
            at + 6,
            team=team,
            decision="refused",
            reason="rate_limited",
            status=429,
            url="https://a.example/tied.jpg",
        ),
        # the same ts, another project: the later in chain order is the newest (on both stores
        # alike, and across the groups the totals add up)
        fetch(
            10,
            at + 6,
            team=team,
            project="p-tied",
            decision="refused",
            reason="rate_limited",
            status=429,
            url="https://a.example/newest.jpg",
        ),
    ]
    return out


def usage_from_records(records: list[dict[str, Any]], team: str, since: str) -> dict[str, Any]:
    """What the store's counting must give, counted here from the records themselves."""
    picked = [r for r in records if r["ts"] >= since]
    return expected_from_export(picked, team)


async def check_the_store_counts_as_the_records_say(source: RecordSource) -> None:
    records: list[dict[str, Any]] = []
    await source.scan(RecordQuery(), records.append)
    for team in TEAMS:
        for since in ("2026-01-01T00:00:00.000000Z", "2026-01-02T00:00:00.000000Z"):
            rows = await source.team_usage(RecordQuery(team=team, since=since))
            answer = team_usage(team, rows, since=since, until=None)
            expected = usage_from_records(records, team, since)
            assert as_compared(answer["totals"]) == expected["totals"], (team, since)
            sites = {s["site"]: as_compared(s) for s in answer["sites"]}
            assert sites == expected["sites"], (team, since)
            projects = {p["project"]: as_compared(p) for p in answer["projects"]}
            assert projects == expected["projects"], (team, since)
    mine = team_usage(
        TEAMS[0], await source.team_usage(RecordQuery(team=TEAMS[0])), since=None, until=None
    )
    # the fewest requests last: one (no site known), none (only a WebSocket's bytes)
    assert [(s["site"], s["requests"]) for s in mine["sites"]][-2:] == [
        (None, 1),
        ("ws.example", 0),
    ]
    assert mine["sites"][-1]["bytes_received"] == 40
    assert mine["totals"]["withheld_by_reason"] == {"noai_directive": 1}
    assert mine["totals"]["served"] == 1
    assert mine["totals"]["last_refusal"]["url"] == "https://a.example/newest.jpg"
    assert mine["period"]["first_record"].startswith("2026-01-01T00:00:00")
    assert mine["period"]["last_record"].startswith("2026-01-02T00:01:48")  # the last WebSocket


async def write(store: Any, tmp_path: Path) -> None:
    log = fetch_log(store, tmp_path / "spool", "gw-u", None)
    await log.open()
    for rec in logged_records():
        log.append(rec)
    await log.close()


async def test_sqlite_counts_a_teams_usage_as_its_records_say(tmp_path: Path) -> None:
    await write(SQLiteStore(tmp_path / "data" / SQLITE_NAME), tmp_path)
    await check_the_store_counts_as_the_records_say(RecordSource(tmp_path / "data"))


async def test_postgresql_counts_a_teams_usage_as_its_records_say(
    tmp_path: Path, pg_dsn: str
) -> None:
    await write(PostgresStore(pg_dsn), tmp_path)
    await check_the_store_counts_as_the_records_say(RecordSource(tmp_path, pg_dsn))


def test_the_busiest_first_and_on_a_tie_no_site_last() -> None:
    groups = [
        UsageGroup(site, "p", "refused", "rate_limited", n, 0, "t", "t")
        for site, n in (("quiet", 1), (None, 5), ("busy", 3), ("also-quiet", 1), ("", 1))
    ]
    answer = team_usage("a", UsageRows(groups, []), since=None, until=None)
    assert [s["site"] for s in answer["sites"]] == [None, "busy", "", "also-quiet", "quiet"]


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
