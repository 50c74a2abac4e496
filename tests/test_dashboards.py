"""The Grafana dashboards, evaluated by a real Prometheus scraping a real gateway fleet.

Two gateway replicas share a throwaway redis-server; a third scrape target is dead (a replica
down). The test drives traffic that exercises every decision the dashboards show: refusals
(auth, project, blocklist, takedown when the API exists), budgets (rate, quota, concurrency, a
site's 429 and the pause after it), opt-outs (robots.txt, TDMRep, withheld images and pages),
upstream errors, bytes. Then every expression of every panel, with Grafana's variables
substituted, goes through Prometheus's HTTP API and must return data: a panel that would show
"No data" for this traffic fails the test. The alert rules are loaded by the same Prometheus
and must evaluate cleanly, and the alerts this traffic should raise must be pending.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import _binary as redis_binary
from tests.optout_fixtures import jpeg_with_xmp
from tests.optout_fixtures import xmp_packet
from tests.prometheus_fixtures import Prometheus
from tests.prometheus_fixtures import prometheus_tool
from tests.support import ADMIN_TOKEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import RESPECT_ALL
from tests.support import ROOT
from tests.support import TEAM
from tests.support import Gateway
from tests.support import Reply
from tests.support import Site
from tests.support import curl
from tests.support import free_port
from tests.support import policy_with
from tests.support import wait_for

DASHBOARDS = ROOT / "dashboards"
ALERTS = DASHBOARDS / "alerts.yaml"
UIDS = {
    "traffic-and-compliance.json": "crawlwarden-traffic",
    "gateway-operations.json": "crawlwarden-operations",
}
# Grafana's variables as the test evaluates them: every site, team and replica; windows long
# enough to hold the whole traffic phase.
VARIABLES = {
    "site": ".*",
    "team": ".*",
    "job": ".*",
    "instance": ".*",
    "__rate_interval": "2m",
    "__interval": "15s",
    "__range": "10m",
}
RESPECT_NONE = dict.fromkeys(RESPECT_ALL, False)
ROBOTS = b"User-agent: TestBot\nDisallow: /private/\n"
TDMREP = json.dumps([{"location": "/reserved/*", "tdm-reservation": 1}]).encode()
VISION = {"X-Crawl-Project": PROJECT}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def expressions() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every query of every panel."""
    found = []
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                found.append((name, panel["title"], target["expr"]))
    return found


def substitute(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"unknown variable ${name} in {expr}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# -- the dashboards as files -----------------------------------------------------------------


def test_dashboards_are_current_grafana_json_with_stable_uids_and_variables():
    boards = dashboards()
    assert set(boards) == set(UIDS)
    for name, board in boards.items():
        assert board["uid"] == UIDS[name]
        assert board["schemaVersion"] >= 41
        assert board["title"].startswith("crawlwarden / ")
        variables = {v["name"]: v for v in board["templating"]["list"]}
        ds = variables["datasource"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
        for var in ("site", "team"):
            assert variables[var]["type"] == "query"
            assert variables[var]["definition"].startswith("label_values(crawlwarden_"), var
            assert variables[var]["allValue"] == ".*" and variables[var]["includeAll"]
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), name
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            assert panel.get("description"), panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                assert target["expr"].strip()


def test_the_panels_the_issue_asks_for_are_there():
    exprs: dict[str, str] = {}
    for board, _title, expr in expressions():
        exprs[board] = exprs.get(board, "") + "\n" + expr
    traffic, ops = exprs["traffic-and-compliance.json"], exprs["gateway-operations.json"]
    tables = json.dumps(dashboards()["traffic-and-compliance.json"])
    for needle in (
        "sum by (site) (rate(crawlwarden_requests_total",
        "sum by (team, decision)",
        "sum by (reason)",
        "max by (site, budget) (crawlwarden_budget_used_ratio",
        "crawlwarden_optout_signals_total",
        "crawlwarden_upstream_response_bytes_total",
        "crawlwarden_site_throttle_responses_total",
        'reason="takedown"',
    ):
        assert needle in traffic, needle
    assert "groupingToMatrix" in tables  # budget use per site as a table
    governance = 'crawlwarden_request_duration_seconds_bucket{job=~"$job", instance=~"$instance"'
    for needle in (
        f'histogram_quantile(0.5, sum by (le) (rate({governance}, phase="governance"}}',
        f'histogram_quantile(0.99, sum by (le) (rate({governance}, phase="governance"}}',
        'phase="upstream"',
        "crawlwarden_upstream_errors_total",
        "crawlwarden_requests_in_flight",
        "crawlwarden_audit_lag_seconds",
        "crawlwarden_store_errors_total",
        "crawlwarden_redis_duration_seconds_bucket",
        "crawlwarden_origin_file_cache_total",
        "sum(up{",
        "crawlwarden_build_info",
        "crawlwarden_policy_info",
        "crawlwarden_policy_last_reload_success",
    ):
        assert needle in ops, needle


PER_SECOND_UNITS = {"reqps", "ops", "cps", "rps", "wps", "iops", "Bps", "bps", "binBps", "binbps"}
_RATE_SUM = re.compile(r"^\s*sum(\s+by\s*\([^)]*\))?\s*\(\s*rate\(")


def test_rate_series_have_a_per_second_unit_and_levels_do_not():
    """A `sum(rate(...))` series is per second: a panel showing it as `short` reads 0.2 errors/s
    as "0.2 errors"; a gauge beside it (a queue depth) must not be labelled per second."""
    wrong = []
    for name, board in dashboards().items():
        for panel in panels(board):
            if panel["type"] != "timeseries":
                continue
            config = panel.get("fieldConfig", {})
            default = config.get("defaults", {}).get("unit")
            by_ref = {
                o["matcher"]["options"]: p["value"]
                for o in config.get("overrides", [])
                if o["matcher"]["id"] == "byFrameRefID"
                for p in o["properties"]
                if p["id"] == "unit"
            }
            for target in panel["targets"]:
                unit = by_ref.get(target["refId"], default)
                expr = target["expr"]
                if _RATE_SUM.match(expr) and unit not in PER_SECOND_UNITS:
                    wrong.append(f"{name} / {panel['title']} {target['refId']}: rate as {unit}")
                if "rate(" not in expr and unit in PER_SECOND_UNITS:
                    wrong.append(f"{name} / {panel['title']} {target['refId']}: level as {unit}")
    assert not wrong, "\n".join(wrong)


def panel_expr(board: str, title: str) -> str:
    [expr] = [e for b, t, e in expressions() if b == board and t == title]
    return substitute(expr)


@pytest.mark.parametrize(
    ("title", "series", "labels"),
    [
        (
            "Bytes per site and team",
            'crawlwarden_upstream_response_bytes_total{site="open.test", team="vision-data"}',
            '{site="open.test", team="vision-data"}',
        ),
        (
            "Refusals by site, team and reason",
            'crawlwarden_requests_total{site="quota", team="vision-data", decision="refused",'
            ' reason="quota_requests"}',
            '{site="quota", team="vision-data", reason="quota_requests"}',
        ),
    ],
)
def test_range_totals_count_a_series_born_in_the_range_whole(
    tmp_path: Path, title: str, series: str, labels: str
):
    """A series that appears between two scrapes already holds its first events (a new team's
    first burst: 198216 bytes), then grows (579 more). Over a range that holds all of it, the
    table must show everything (198795), not only what came after its first sample."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("groups: []\n")
    tests = tmp_path / "test.yaml"
    born = "_ _ _ _ 198216 198795 198795 198795 198795 198795 198795"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(rules)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": series, "values": born},
                            # An older series of the same metric: only its growth in the range.
                            {"series": series.replace('site="', 'site="old'), "values": "0+10x10"},
                            # One born and gone inside the range (a pod replaced): its increase.
                            {
                                "series": series.replace('site="', 'site="gone'),
                                "values": "_ 5 15 25 35 _ _ _ _ _ _",
                            },
                        ],
                        "promql_expr_test": [
                            {
                                "expr": panel_expr("traffic-and-compliance.json", title),
                                "eval_time": "10m",  # $__range is 10m: [0m, 10m]
                                "exp_samples": [
                                    {"labels": labels, "value": 198795},
                                    {"labels": labels.replace('site="', 'site="old'), "value": 100},
                                    {"labels": labels.replace('site="', 'site="gone'), "value": 40},
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [prometheus_tool("promtool"), "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- a fleet, traffic, Prometheus -------------------------------------------------------------


@dataclass
class Fleet:
    prometheus: Prometheus
    gateways: list[Gateway]
    site: Site
    dead_target: str
    takedowns: bool

    def gateway_totals(self) -> float:
        total = 0.0
        for gw in self.gateways:
            text = requests.get(gw.admin + "/metrics", timeout=5).text
            for family in text_string_to_metric_families(text):
                if family.name == "crawlwarden_requests":
                    total += sum(
                        s.value for s in family.samples if s.name == "crawlwarden_requests_total"
                    )
        return total


def fleet_policy() -> dict[str, Any]:
    return policy_with(
        defaults={"respect": RESPECT_ALL},
        sites=[
            # Their budgets count the gateway's own reads of robots.txt and tdmrep.json too:
            # two of each site's requests, then room for two (tight) and four (quota) of ours.
            {"id": "tight", "match": ["tight.test"], "rate": "1/min", "burst": 4},
            {"id": "quota", "match": ["quota.test"], "requests_per_day": 6},
            {"id": "narrow", "match": ["narrow.test"], "max_concurrency": 1},
            {"id": "errors", "match": ["err.test"], "respect": RESPECT_NONE},
            {
                "id": "licensed",
                "match": ["*.licensed.test"],
                "legal_basis": {"kind": "licence", "ref": "LIC-7", "expires": "2099-01-01"},
                "respect": {"tdmrep": False, "noai": False, "image_metadata": False},
            },
        ],
        blocklist=[
            {
                "id": "tos-blocked",
                "match": ["blocked.test"],
                "reason": "Terms section 7 forbid automated collection",
                "source": "https://blocked.test/terms",
            }
        ],
    )


def serve(site: Site) -> None:
    site.routes["/robots.txt"] = Reply(body=ROBOTS)
    site.routes["/.well-known/tdmrep.json"] = Reply(
        body=TDMREP, headers={"Content-Type": "application/json"}
    )
    site.routes["/big"] = Reply(body=b"x" * 65536, headers={"Content-Type": "image/jpeg"})
    site.routes["/slow"] = Reply(body=b"slow", delay=1.5)
    site.routes["/busy"] = Reply(status=429, body=b"slow down", headers={"Retry-After": "30"})
    site.routes["/img/noai.jpg"] = Reply(
        body=jpeg_with_xmp(xmp_packet(None)),
        headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noimageai"},
    )
    site.routes["/img/xmp.jpg"] = Reply(
        body=jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")),
        headers={"Content-Type": "image/jpeg"},
    )
    site.routes["/usage.txt"] = Reply(
        body=b"no training", headers={"Content-Type": "text/plain", "Content-Usage": "train-ai=n"}
    )


def closing_server() -> int:
    """Reads a request, then closes the connection without an answer (a reset, for mitmproxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return int(sock.getsockname()[1])


class Traffic:
    def __init__(self, fleet_gateways: list[Gateway], site: Site):
        self.gateways = fleet_gateways
        self.site = site
        self.statuses: dict[str, list[int]] = {}

    def get(
        self,
        host: str,
        path: str = "/",
        *,
        via: int = 0,
        team: str = TEAM,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
        label: str | None = None,
    ) -> int:
        gw = self.gateways[via]
        if token is None:
            token = {TEAM: "vision-secret-token", OTHER_TEAM: OTHER_TOKEN}[team]
            headers = {**(VISION if team == TEAM else {}), **(headers or {})}
        url = f"http://{host}:{port or self.site.port}{path}"
        proxy = f"http://{team}:{token}@127.0.0.1:{gw.port}" if token else gw.proxy
        try:
            r = requests.get(url, proxies={"http": proxy}, headers=headers, timeout=30)
            status = r.status_code
        except requests.RequestException:
            status = 0
        self.statuses.setdefault(label or f"{host}{path}", []).append(status)
        return status


def drive(traffic: Traffic, gateways: list[Gateway], site: Site, takedowns: bool) -> None:
    t = traffic
    # Forwarded, by two teams, through both replicas; bytes.
    for i in range(6):
        assert t.get("open.test", f"/page/{i}") == 200
        assert t.get("open.test", f"/text/{i}", team=OTHER_TEAM, via=1) == 200
    for _ in range(3):
        assert t.get("www.open.test", "/big") == 200
    assert t.get("www.licensed.test", "/big", via=1) == 200
    # Refusals that need no network.
    assert t.get("open.test", "/", token="") == 407
    assert t.get("open.test", "/", headers={"X-Crawl-Project": "not-ours"}) == 403
    assert t.get("blocked.test", "/photo.jpg") == 451
    if takedowns:
        status, body = gateways[0].admin_request(
            "POST",
            "/v1/takedowns",
            token=ADMIN_TOKEN,
            body={
                "rights_holder": "Example Photo Agency",
                "contact": "legal@agency.example",
                "scope": "domain",
                "targets": ["removed.test"],
                "reason": "unlicensed copies",
            },
        )
        assert status == 201, body
        assert wait_for(lambda: t.get("removed.test", "/a.jpg", label="takedown") == 451, 10)
    # Opt-outs: before the request (robots.txt, TDMRep) and in the response (withheld).
    assert t.get("open.test", "/private/a.jpg") == 451
    assert t.get("open.test", "/reserved/b.jpg", team=OTHER_TEAM) == 451
    assert t.get("open.test", "/img/noai.jpg") == 451
    assert t.get("open.test", "/img/xmp.jpg", team=OTHER_TEAM) == 451
    assert t.get("open.test", "/usage.txt") == 451
    # Budgets: rate (burst 2), daily quota (4), concurrency (1).
    assert [t.get("tight.test", f"/r{i}") for i in range(4)] == [200, 200, 429, 429]
    assert [t.get("quota.test", f"/q{i}") for i in range(6)] == [200] * 4 + [429] * 2
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(t.get("narrow.test", "/slow")))
        for _ in range(3)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(results) == [200, 429, 429], results
    # A site that answers 429: counted, then paused (Retry-After: 30).
    assert t.get("busy.test", "/busy") == 429
    assert t.get("busy.test", "/again") == 429
    # Upstream errors: connection refused, connection closed, TLS to a plain server.
    assert t.get("err.test", "/", team=OTHER_TEAM, port=free_port()) == 502
    assert t.get("err.test", "/", team=OTHER_TEAM, port=closing_server()) == 502
    tls = curl(
        f"https://err.test:{site.port}/",
        proxy=gateways[0].proxy_url(OTHER_TEAM, OTHER_TOKEN),
        cacert=gateways[0].ca_cert,
    )
    assert tls.status == 502, tls.stderr


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    binary = prometheus_tool("prometheus")
    workdir = tmp_path_factory.mktemp("dashboards")
    redis = RedisServer(redis_binary(), workdir)
    redis.start()
    site = Site().__enter__()
    serve(site)
    policy = fleet_policy()
    gateways = [
        Gateway(workdir, policy, name=f"gw{i}", extra_args=["--redis-url", redis.url])
        for i in range(2)
    ]
    prometheus: Prometheus | None = None
    try:
        for gw in gateways:
            gw.launch()
        for gw in gateways:
            gw.wait_ready(60)
        dead = f"127.0.0.1:{free_port()}"  # a replica that does not answer
        prometheus = Prometheus(
            binary,
            workdir,
            [*(f"127.0.0.1:{gw.admin_port}" for gw in gateways), dead],
            rule_files=[ALERTS],
        ).start()
        # Two scrapes of each replica before any traffic: a counter's first sample must come
        # before its increments, or increase() and rate() cannot see them.
        assert wait_for(
            lambda: (
                prometheus is not None
                and prometheus.value('count(count_over_time(up{job="crawlwarden"}[1m]) >= 2)') == 3
            ),
            timeout=30,
            interval=0.25,
        ), prometheus.logs()
        openapi = requests.get(gateways[0].admin + "/openapi.json", timeout=5).json()
        takedowns = "/v1/takedowns" in openapi["paths"]
        drive(Traffic(gateways, site), gateways, site, takedowns)
        fleet = Fleet(prometheus, gateways, site, dead, takedowns)
        # Prometheus has the final counters, and a few more scrapes for rate() and gauges.
        total = fleet.gateway_totals()
        assert wait_for(
            lambda: (
                prometheus is not None
                and prometheus.value('sum(crawlwarden_requests_total{job="crawlwarden"})') == total
            ),
            timeout=30,
            interval=0.5,
        ), prometheus.logs()
        time.sleep(3)
        yield fleet
    finally:
        if prometheus is not None:
            prometheus.stop()
        for gw in gateways:
            gw.stop()
        site.__exit__(None, None, None)
        redis.kill()


def test_every_panel_expression_returns_data(fleet: Fleet):
    prom = fleet.prometheus
    failures = []
    for board, title, expr in expressions():
        query = substitute(expr)
        if 'reason="takedown"' in query and not fleet.takedowns and "vector(0)" not in query:
            # Takedowns are issue 6: until the gateway has POST /v1/takedowns, nothing can
            # make a takedown refusal. The query must still evaluate.
            prom.query(query)
            continue
        result = prom.query(query)
        if not result:
            failures.append(f"{board} / {title}: no data for {query}")
        elif not any(math.isfinite(v) for _, v in result):
            failures.append(f"{board} / {title}: only NaN/Inf for {query}: {result}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "expr",
    [
        *(
            f'sum(crawlwarden_requests_total{{reason="{reason}"}})'
            for reason in (
                "ok",
                "auth_required",
                "unknown_project",
                "tos_blocklist",
                "robots_disallowed",
                "tdm_reserved",
                "noai_directive",
                "image_optout",
                "content_usage",
                "rate_limited",
                "quota_requests",
                "concurrency",
                "site_paused",
                "upstream_error",
            )
        ),
        'sum(crawlwarden_requests_total{decision="withheld"})',
        'sum(crawlwarden_site_throttle_responses_total{site="busy.test", status="429"})',
        *(f'crawlwarden_upstream_errors_total{{kind="{k}"}}' for k in ("connect", "reset", "tls")),
        'max(crawlwarden_budget_used_ratio{site="quota", budget="requests_per_day"}) == 1',
        "sum(crawlwarden_optout_signals_total)",
        'sum(crawlwarden_origin_file_cache_total{result="hit"})',
        'sum(crawlwarden_origin_file_cache_total{result="miss"})',
        'sum(crawlwarden_redis_duration_seconds_count{op="admit"})',
        'sum(crawlwarden_upstream_response_bytes_total{site="open.test"}) >= 3 * 65536',
        'sum(up{job="crawlwarden"}) == 2',
        'count(up{job="crawlwarden"} == 0) == 1',
        "count(crawlwarden_build_info) == 2",
        'sum(crawlwarden_request_duration_seconds_count{phase="governance"})',
    ],
)
def test_the_traffic_reached_each_metric(fleet: Fleet, expr: str):
    """The data above is this traffic's, not zeros: each decision and each error happened."""
    # Always summed: a bare selector returns one series per replica, in no set order.
    value = fleet.prometheus.value(f"sum({expr})")
    assert math.isfinite(value) and value > 0, expr


def test_takedown_refusals_reach_the_dashboards(fleet: Fleet):
    if not fleet.takedowns:
        pytest.skip("the gateway has no POST /v1/takedowns yet (issue 6)")
    value = fleet.prometheus.value('sum(crawlwarden_requests_total{reason="takedown"})')
    assert value >= 1


def test_alert_rules_evaluate_and_this_traffic_raises_the_expected_alerts(fleet: Fleet):
    prom = fleet.prometheus
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 15
    for rule in rules:
        assert rule["health"] == "ok", rule
    # A policy file the replica refuses: it keeps its policy, and the refusal alerts.
    refusing = fleet.gateways[1]
    good = refusing.policy_file.read_text()
    refusing.policy_file.write_text("version: 1\ncrawler: {user_agent: 3\n")
    refusing.signal(signal.SIGHUP)
    assert wait_for(lambda: bool(refusing.log_events("policy_reload_failed")))
    refusing.policy_file.write_text(good)
    expected = {
        ("CrawlwardenSiteThrottling", "site", "busy.test"),
        ("CrawlwardenQuotaNearlySpent", "site", "quota"),
        ("CrawlwardenBudgetSaturated", "site", "tight"),
        ("CrawlwardenReplicaDown", "instance", fleet.dead_target),
        ("CrawlwardenPolicyReloadFailing", "instance", f"127.0.0.1:{refusing.admin_port}"),
    }

    def active() -> set[tuple[str, str, str]]:
        alerts = prom.api("alerts")["alerts"]
        return {
            (a["labels"]["alertname"], key, a["labels"].get(key, ""))
            for a in alerts
            if a["state"] in ("pending", "firing")
            for key in ("site", "instance")
        }

    assert wait_for(lambda: expected <= active(), timeout=20, interval=0.5), active()
    # Nothing went wrong with the fleet itself.
    quiet = {
        "CrawlwardenRedisErrors",
        "CrawlwardenFetchLogFailing",
        "CrawlwardenFetchLogRecordLost",
        "CrawlwardenAllReplicasDown",
    }
    assert not quiet & {name for name, _, _ in active()}
