"""Metrics an SRE relies on: bounded `site` labels, upstream error kinds from mitmproxy's real
messages, Redis round trips, fetch-log lag, the origin-file cache; and the decision log line that
joins every fetch record.

The bounded-label test drives thousands of domains through a real gateway process and reads its
/metrics the way Prometheus does.
"""

from __future__ import annotations

import asyncio
import http.client
import queue
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics
from proxy.audit.sqlite_store import SQLiteStore
from proxy.budgets import RedisBudgetStore
from proxy.budgets.spec import BudgetSpec
from proxy.metrics import OTHER
from proxy.metrics import DomainSlots
from proxy.metrics import SiteLabels
from proxy.metrics import upstream_error_kind
from proxy.originfiles import GuardedResolver
from proxy.originfiles import MemoryCache
from proxy.originfiles import OriginFileFetcher
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import key_prefix  # noqa: F401
from tests.budget_fixtures import redis_server  # noqa: F401
from tests.optout_fixtures import USER_AGENT
from tests.optout_fixtures import origin_server
from tests.optout_fixtures import private_guard
from tests.optout_fixtures import static_resolver
from tests.support import ADMIN_TOKEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import RESPECT_ALL
from tests.support import ROOT
from tests.support import Gateway
from tests.support import LocalCA
from tests.support import Reply
from tests.support import Site
from tests.support import basic
from tests.support import curl
from tests.support import free_port
from tests.support import policy_with
from tests.support import write_policy
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- upstream error kinds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("[Errno 111] Connect call failed ('127.0.0.1', 5)", "connect"),
        (
            "Multiple exceptions: [Errno 111] Connect call failed ('::1', 80, 0, 0), "
            "[Errno 111] Connect call failed ('127.0.0.1', 80)",
            "connect",
        ),
        ("[Errno 113] Connect call failed ('10.1.2.3', 80)", "connect"),
        ("Upstream proxy 10.0.0.5:3128 refused HTTP CONNECT request: 502 Bad Gateway", "connect"),
        ("[Errno 110] Connect call failed ('10.1.2.3', 80)", "timeout"),
        ("timed out", "timeout"),
        ("server closed connection", "reset"),
        ("connection closed", "reset"),
        ("[Errno 104] Connection reset by peer", "reset"),
        (
            "HTTP/1 protocol error: peer closed connection without sending complete message "
            "body (received 3 bytes, expected 100)",
            "reset",
        ),
        ("Certificate verify failed: unable to get local issuer certificate", "tls"),
        ("The remote server does not speak TLS.", "tls"),
        ("OpenSSL Error([('SSL routines', '', 'sslv3 alert handshake failure')])", "tls"),
        ("Cannot parse HTTP response: Bad HTTP response line: b'NOT HTTP'", "other"),
        ("Client disconnected.", None),  # the scraper hung up: not the site's error
        ("Connection killed.", None),  # the gateway killed the flow (a withheld stream)
    ],
)
def test_upstream_error_kind(message: str, kind: str | None) -> None:
    assert upstream_error_kind(message) == kind


def _server(mode: str) -> int:
    """A TCP server on 127.0.0.1 that misbehaves after reading a request."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.recv(65536)
            if mode == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "partial":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(sock.getsockname()[1])


def test_real_upstream_failures_are_counted_by_kind(workdir: Path, test_ca: LocalCA) -> None:
    """What mitmproxy reports for a refused connect, a reset, a body cut short and a TLS
    failure lands in the right `kind` (the messages are mitmproxy's, not ours)."""
    with Gateway(workdir, policy_with()) as gw, Site(tls=test_ca) as untrusted, Site() as plain:
        proxy = gw.proxy_url(OTHER_TEAM, OTHER_TOKEN)
        cases = [
            (f"http://e.test:{free_port()}/", "connect"),
            (f"http://e.test:{_server('close')}/", "reset"),
            (f"http://e.test:{_server('rst')}/", "reset"),
            (f"http://e.test:{_server('partial')}/", "reset"),
            # The gateway is not given the test CA: the site's certificate does not verify.
            (untrusted.url("e.test", "/"), "tls"),
            (f"https://e.test:{plain.port}/", "tls"),
        ]
        expected: dict[str, int] = {}
        for url, kind in cases:
            result = curl(url, proxy=proxy, cacert=gw.ca_cert)
            assert result.status == 502 or result.returncode != 0, url
            expected[kind] = expected.get(kind, 0) + 1
        text = requests.get(gw.admin + "/metrics", timeout=5).text
        kinds = {
            s.labels["kind"]: s.value
            for f in text_string_to_metric_families(text)
            if f.name == "crawlwarden_upstream_errors"
            for s in f.samples
        }
        assert set(kinds) == set(metrics.UPSTREAM_ERROR_KINDS)  # all present, 0 included
        for kind in metrics.UPSTREAM_ERROR_KINDS:
            assert kinds[kind] == expected.get(kind, 0), (kind, kinds)


# -- bounded site labels: the rules --------------------------------------------------------------


def test_half_the_slots_are_open_to_the_first_domains_seen() -> None:
    slots = DomainSlots(10)
    labels = SiteLabels(["licensed"], slots=slots)
    assert [labels.observe(f"d{i}.test") for i in range(5)] == [f"d{i}.test" for i in range(5)]
    assert labels.observe("late.test") == OTHER
    assert labels.label("d3.test") == "d3.test"
    assert labels.observe("licensed") == "licensed"  # policy ids always
    assert labels.observe(None) == OTHER


def test_one_off_domains_never_earn_a_slot_repeated_ones_do() -> None:
    slots = DomainSlots(10, admit_after=3, window=50)
    labels = SiteLabels([], slots=slots)
    for i in range(5):
        labels.observe(f"open{i}.test")
    for i in range(10_000):
        assert labels.observe(f"once{i}.test") == OTHER
    assert [labels.observe("busy.test") for _ in range(3)] == [OTHER, OTHER, "busy.test"]
    assert labels.label("busy.test") == "busy.test"
    # `label()` (gauges) does not count towards a slot.
    for _ in range(5):
        assert labels.label("gauged.test") == OTHER
    # Never more than top_n domains, however many repeat.
    for i in range(100):
        for _ in range(3):
            labels.observe(f"heavy{i}.test")
    assert len(slots.granted) == 10


def test_refused_requests_take_no_slot() -> None:
    # Blocklisted domains, refused three times each, took every slot: the sites that carried
    # the traffic were `_other` for the life of the process.
    slots = DomainSlots(4, admit_after=3, window=50)
    labels = SiteLabels([], slots=slots)
    for i in range(10):
        for _ in range(3):
            assert labels.peek(f"blocked{i}.test") == OTHER
    assert not slots.granted
    assert labels.observe("busy.test") == "busy.test"
    assert labels.peek("busy.test") == "busy.test"  # a refusal of a labelled site keeps it


def test_repeats_spread_wider_than_the_window_do_not_earn_a_slot() -> None:
    slots = DomainSlots(4, admit_after=3, window=20)
    labels = SiteLabels([], slots=slots)
    for i in range(2):
        labels.observe(f"open{i}.test")
    for round_ in range(5):
        labels.observe("sparse.test")
        for i in range(30):  # more distinct domains in between than the window keeps
            labels.observe(f"filler{round_}-{i}.test")
    assert labels.label("sparse.test") == OTHER


def test_a_reload_keeps_the_slots_of_the_process() -> None:
    """runtime.reload() builds a new SiteLabels; the slots, like the series, stay."""
    first = SiteLabels(["a"], top_n=1_000_003)
    second = SiteLabels(["a", "b"], top_n=1_000_003)
    name = f"{uuid.uuid4().hex}.test"
    assert first.observe(name) == name
    assert metrics.process_slots(1_000_003).granted == {name}
    assert second.label(name) == name


# -- bounded site labels: a real gateway, thousands of domains ------------------------------------

TOP_N = metrics.DEFAULT_TOP_SITES
POLICY_SITES = ["licensed", "archive"]
SITE_FAMILIES = {
    "crawlwarden_requests",
    "crawlwarden_upstream_response_bytes",
    "crawlwarden_budget_used_ratio",
    "crawlwarden_optout_signals",
    "crawlwarden_site_throttle_responses",
}


def bounded_policy(extra_block: bool = False) -> dict[str, Any]:
    blocklist = [
        # Refusals that need no network: thousands of domains, cheaply, each still a `site`.
        {
            "id": "bulk",
            "match": ["invalid"],
            "reason": "test domains",
            "source": "RFC 2606",
        }
    ]
    if extra_block:
        blocklist.append(
            {"id": "later", "match": ["blocked.test"], "reason": "reloaded", "source": "test"}
        )
    return policy_with(
        sites=[
            {
                "id": "licensed",
                "match": ["*.licensed.test"],
                "legal_basis": {"kind": "licence", "ref": "LIC-7", "expires": "2099-01-01"},
            },
            {"id": "archive", "match": ["archive.test"]},
        ],
        blocklist=blocklist,
    )


class Clients:
    """Several keep-alive proxy clients taking (host, port, path) jobs in order from a queue."""

    def __init__(self, gw: Gateway, threads: int = 6):
        self.gw = gw
        self.threads = threads
        self.statuses: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def run(self, jobs: list[tuple[str, int, str]]) -> None:
        work: queue.SimpleQueue[tuple[str, int, str] | None] = queue.SimpleQueue()
        for job in jobs:
            work.put(job)
        for _ in range(self.threads):
            work.put(None)
        workers = [threading.Thread(target=self._worker, args=(work,)) for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)

    def _worker(self, work: queue.SimpleQueue[tuple[str, int, str] | None]) -> None:
        auth = basic(OTHER_TEAM, OTHER_TOKEN)
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=20)
        while (job := work.get()) is not None:
            host, port, path = job
            for attempt in range(2):
                try:
                    conn.request(
                        "GET", f"http://{host}:{port}{path}", headers={"Proxy-Authorization": auth}
                    )
                    resp = conn.getresponse()
                    resp.read()
                    break
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=20)
                    if attempt:
                        raise
            with self._lock:
                self.statuses.setdefault(host, []).append(resp.status)
        conn.close()

    @property
    def sent(self) -> int:
        return sum(len(v) for v in self.statuses.values())


def site_labels_by_family(text: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "site" in s.labels:
                found.setdefault(family.name, set()).add(s.labels["site"])
    return found


def requests_total(text: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "crawlwarden_requests"
        for s in f.samples
        if s.name == "crawlwarden_requests_total"
    )


@pytest.fixture
def loopback_site() -> Iterator[Site]:
    with Site() as s:
        s.routes["/page"] = Reply(
            body=b"<html>words</html>",
            headers={"Content-Type": "text/html", "X-Robots-Tag": "noai"},
        )
        s.routes["/busy"] = Reply(status=429, body=b"slow down", headers={"Retry-After": "1"})
        yield s


def test_site_label_stays_bounded_over_thousands_of_domains(
    workdir: Path, loopback_site: Site
) -> None:
    port = loopback_site.port
    gw = Gateway(workdir, bounded_policy()).start()
    try:
        clients = Clients(gw)
        jobs: list[tuple[str, int, str]] = []
        for chunk in range(20):
            jobs += [(f"d{chunk * 100 + i:04d}.invalid", 80, "/") for i in range(100)]
            for h in range(2):  # heavy blocked domains: a burst of 4 each
                jobs += [(f"h{chunk}-{h}.invalid", 80, "/")] * 4
            for f in range(3):  # forwarded domains: bytes, budgets, signals, a 429 now and then
                host = f"f{chunk}-{f}.test"
                jobs += [(host, port, "/"), (host, port, "/page")]
                jobs.append((host, port, "/busy" if f == 0 else "/"))
            jobs += [("www.licensed.test", port, "/"), ("archive.test", port, "/page")]
        clients.run(jobs)

        # A reload builds a new SiteLabels: the process keeps its slots (and its series).
        write_policy(gw.policy_file, bounded_policy(extra_block=True))
        status, body = gw.admin_request("POST", "/v1/policy/reload", token=ADMIN_TOKEN)
        assert status == 200, body
        later: list[tuple[str, int, str]] = []
        for chunk in range(20, 30):
            later += [(f"d{chunk * 100 + i:04d}.invalid", 80, "/") for i in range(100)]
            for h in range(2):
                later += [(f"g{chunk}-{h}.invalid", 80, "/")] * 4
        clients.run(later)

        statuses = clients.statuses
        assert sum(1 for host in statuses if host.startswith("d")) == 3000
        assert {s for host, v in statuses.items() if host.endswith(".invalid") for s in v} == {451}
        assert set(statuses["f0-1.test"]) == {200}

        text = requests.get(gw.admin + "/metrics", timeout=10).text
        by_family = site_labels_by_family(text)
        assert SITE_FAMILIES <= set(by_family), set(by_family)
        bound = TOP_N + len(POLICY_SITES) + 1
        for family, values in by_family.items():
            assert len(values) <= bound, (family, len(values), sorted(values))
        labels = set().union(*by_family.values())
        assert len(labels) <= bound
        assert set(POLICY_SITES) <= labels and OTHER in by_family["crawlwarden_requests"]
        domains = labels - set(POLICY_SITES) - {OTHER}
        assert len(domains) == TOP_N  # every slot taken: the bound was reached, not dodged
        # One-off domains only ever had the open half; the rest went to repeated traffic.
        assert len({d for d in domains if d.startswith("d")}) <= TOP_N // 2
        assert len({d for d in domains if d[0] in "hf"}) >= TOP_N - TOP_N // 2
        assert not {d for d in domains if d.startswith("g")}  # after the reload: no new slots
        # Bounding loses no request: every one is counted, under its site or `_other`.
        assert requests_total(text) == clients.sent
    finally:
        gw.stop()


def test_one_off_domains_of_a_broad_crawl_do_not_earn_slots_with_the_gateways_own_reads(
    workdir: Path,
) -> None:
    """With robots.txt and TDMRep respected, the gateway reads both files before a domain's
    first request: those reads are not the scrapers' traffic and earn no slot, or every
    domain of a broad crawl earned one with its first request (3 = admit_after) and the
    sites that carry the traffic, coming later, were `_other` for the life of the process."""
    with Site() as site:
        site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n")
        site.routes["/.well-known/tdmrep.json"] = Reply(status=404, body=b"")
        policy = bounded_policy()
        policy["defaults"]["respect"] = {**policy["defaults"]["respect"], "robots": True}
        policy["defaults"]["respect"]["tdmrep"] = True
        with Gateway(workdir, policy) as gw:
            clients = Clients(gw, threads=4)
            one_off = [(f"once{i:03d}.test", site.port, "/") for i in range(2 * TOP_N)]
            clients.run(one_off)
            clients.run([("busy.test", site.port, "/")] * 3)
            assert set(clients.statuses["busy.test"]) == {200}
            assert {s for v in clients.statuses.values() for s in v} == {200}
            labels = set().union(*site_labels_by_family(gw_metrics(gw)).values())
        assert "busy.test" in labels
        assert len({d for d in labels if d.startswith("once")}) <= TOP_N // 2


def gw_metrics(gw: Gateway) -> str:
    return requests.get(gw.admin + "/metrics", timeout=10).text


# -- the decision log line joins the fetch record -----------------------------------------------


def test_every_fetch_record_has_one_decision_line_with_its_identifiers(
    workdir: Path, loopback_site: Site
) -> None:
    port = loopback_site.port
    with Gateway(workdir, bounded_policy()) as gw:
        clients = Clients(gw, threads=4)
        jobs = []
        for i in range(40):
            jobs += [(f"j{i}.invalid", 80, "/"), (f"j{i % 5}.test", port, "/page")]
        jobs += [("x.test", port, "/busy"), ("x.test", port, "/")]
        clients.run(jobs)
        curl(loopback_site.url("x.test"), proxy=gw.proxy)  # no credentials: 407
        records = [r for r in gw.fetch_records() if r["kind"] == "fetch"]
        assert len(records) == clients.sent + 1
        lines: dict[str, list[dict[str, Any]]] = {}
        for line in gw.log_events("decision"):
            lines.setdefault(line["id"], []).append(line)
        assert set(lines) == {r["id"] for r in records}
        for rec in records:
            [line] = lines[rec["id"]]
            for key in ("replica", "seq", "team", "site", "decision", "reason", "status", "url"):
                assert line[key] == rec[key], (key, line, rec)
        assert {r["reason"] for r in records} >= {"ok", "tos_blocklist", "auth_required"}


# -- Redis round trips, fetch-log lag, origin-file cache -----------------------------------------


async def test_redis_round_trips_are_timed_per_operation(
    redis_server: RedisServer,  # noqa: F811
    key_prefix: str,  # noqa: F811
) -> None:
    before = {op: sample("crawlwarden_redis_duration_seconds_count", op=op) for op in ("admit",)}
    store = RedisBudgetStore(redis_server.url, key_prefix=key_prefix)
    await store.start()
    try:
        spec = BudgetSpec(
            key="timed.test",
            interval_us=1000,
            burst=1000,
            rate_text="1000/s",
            max_concurrency=1000,
            requests_per_day=None,
            requests_per_month=None,
            bytes_per_day=None,
        )
        for i in range(5):
            await store.admit(replace(spec), f"lease-{i}")
        await store.ping()
    finally:
        await store.close()
    assert sample("crawlwarden_redis_duration_seconds_count", op="admit") == before["admit"] + 5
    assert sample("crawlwarden_redis_duration_seconds_count", op="script_load") >= 6
    assert sample("crawlwarden_redis_duration_seconds_count", op="ping") >= 1


class StoppableStore(SQLiteStore):
    """A real SQLite store that refuses writes while `down` (a store outage)."""

    down = False

    async def write(self, records: Any, checkpoints: Any = ()) -> None:
        if self.down:
            raise OSError("store down")
        await super().write(records, checkpoints)


async def test_fetch_log_lag_is_the_age_of_the_oldest_unstored_record(tmp_path: Path) -> None:
    store = StoppableStore(tmp_path / "fetchlog.sqlite3")
    log = fetch_log(store, tmp_path / "spool", "gw-lag", None, spool_max_bytes=5_000_000)
    await log.open()
    try:
        assert sample("crawlwarden_audit_spool_limit_bytes") == 5_000_000
        assert sample("crawlwarden_audit_available") == 1
        store.down = True
        for i in range(3):
            log.append(fetch(i))
        await asyncio.sleep(0.4)
        assert 0.35 <= sample("crawlwarden_audit_lag_seconds") < 5
        store.down = False
        assert await log.flushed(timeout=15)
        assert sample("crawlwarden_audit_lag_seconds") == 0
    finally:
        await log.close()


async def test_origin_file_cache_counts_hits_misses_and_coalesced_waits() -> None:
    def count(file: str, result: str) -> float:
        return sample("crawlwarden_origin_file_cache_total", file=file, result=result)

    async def slow_tdmrep(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="[]", content_type="application/json")

    routes: dict[str, Any] = {
        "/robots.txt": "User-agent: *\nDisallow:\n",
        "/.well-known/tdmrep.json": slow_tdmrep,
    }
    before = {(f, r): count(f, r) for f in ("robots", "tdmrep") for r in ("hit", "miss")}
    coalesced = count("tdmrep", "coalesced")
    shared = MemoryCache()  # what Redis is for a fleet: one cache behind several fetchers
    one, two = (
        OriginFileFetcher(
            GuardedResolver(static_resolver(), private_guard()),
            user_agent=USER_AGENT,
            cache=shared,
        )
        for _ in range(2)
    )
    try:
        async with origin_server(routes) as site:
            origin = site.origin()
            await one.get(origin, "/robots.txt")
            await asyncio.gather(*(one.get(origin, "/.well-known/tdmrep.json") for _ in range(5)))
            await two.get(origin, "/robots.txt")
            assert site.hits["/robots.txt"] == 1 and site.hits["/.well-known/tdmrep.json"] == 1
    finally:
        await one.close()
        await two.close()
    assert count("robots", "miss") == before["robots", "miss"] + 1
    assert count("robots", "hit") == before["robots", "hit"] + 1
    assert count("tdmrep", "miss") == before["tdmrep", "miss"] + 1
    assert count("tdmrep", "coalesced") == coalesced + 4


def test_metrics_endpoint_shows_the_sre_families_on_a_fresh_gateway(workdir: Path) -> None:
    with Gateway(workdir, policy_with()) as gw:
        text = requests.get(gw.admin + "/metrics", timeout=5).text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "crawlwarden_requests_in_flight",
        "crawlwarden_upstream_errors",
        "crawlwarden_redis_duration_seconds",
        "crawlwarden_audit_lag_seconds",
        "crawlwarden_audit_spool_bytes",
        "crawlwarden_audit_spool_limit_bytes",
        "crawlwarden_audit_available",
        "crawlwarden_origin_file_cache",
        "crawlwarden_build_info",
        "crawlwarden_policy_info",
        "crawlwarden_store_errors",
    ):
        assert name in names, name
    assert 'crawlwarden_store_errors_total{store="redis"} 0.0' in text
    assert "crawlwarden_audit_available 1.0" in text


def test_governance_time_is_the_gateways_not_the_wait_for_a_sites_files_or_budget(
    workdir: Path,
) -> None:
    # A robots.txt that took 1 s, or a request held 1 s for its budget, showed as 1 s of
    # "governance": the panel read a slow site (or a polite hold) as a slow gateway.
    def sums(gw: Gateway) -> dict[str, float]:
        text = requests.get(gw.admin + "/metrics", timeout=5).text
        return {
            s.labels["phase"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "crawlwarden_request_duration_seconds_sum"
        }

    policy = policy_with(
        defaults={"respect": {**RESPECT_ALL}},
        sites=[{"id": "held", "match": ["held.test"], "rate": "1/s", "on_exceed": "delay"}],
    )
    with Site() as site, Gateway(workdir, policy) as gw:
        site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n", delay=1.0)
        before = sums(gw)
        for url in (
            site.url("slow.test", "/a"),
            site.url("held.test", "/1"),
            site.url("held.test", "/2"),
        ):
            r = requests.get(
                url,
                proxies={"http": gw.proxy_url()},
                headers={"X-Crawl-Project": PROJECT},
                timeout=30,
            )
            assert r.status_code == 200
        after = sums(gw)
    total = after["total"] - before["total"]
    governance = after["governance"] - before["governance"]
    assert total >= 2.0  # 1 s for slow.test's robots.txt, ~1 s for the held request
    assert governance < 0.5, governance


def test_governance_latency_is_resolved_around_its_2_ms_target():
    # With nothing between 2 and 5 ms, histogram_quantile read any p99 in that range as up to
    # 5 ms (bench/README.md): SREs watching the 2 ms target need the buckets in between.
    bounds = {
        s.labels["le"]
        for f in REGISTRY.collect()
        if f.name == "crawlwarden_request_duration_seconds"
        for s in f.samples
        if s.name.endswith("_bucket") and s.labels.get("phase") == "governance"
    }
    assert {"0.002", "0.003", "0.004", "0.005"} <= bounds


def test_every_counter_series_an_alert_counts_up_from_is_exported_at_zero_from_the_start():
    # increase() of a series that first appears at 1 is 0: an alert on the first lost record,
    # the first store error, would never fire. A fresh gateway process exports them at 0.
    import re
    import subprocess
    import sys

    import yaml

    rules = yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    # Counters read with fixed label values (a site's or a team's series cannot be known ahead).
    wanted = {
        (name, tuple(sorted(re.findall(r'(\w+)="([^"]*)"', matchers))))
        for expr in expressions
        for name, matchers in re.findall(r"(?:increase|rate)\((crawlwarden_\w+)\{([^}]*)\}", expr)
        if name.endswith("_total")
        and re.search(r'\w+="', matchers)
        # (per site and team: no process can export those ahead. An alert on them is a share
        # of a sustained rate, which the first request of a new series does not make or break.)
        and name != "crawlwarden_requests_total"
    }
    assert ("crawlwarden_audit_records_total", (("outcome", "lost"),)) in wanted
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import prometheus_client, proxy.metrics; "
            "print(prometheus_client.generate_latest().decode())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    exported = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(fresh)
        for sample in family.samples
        if sample.value == 0
    }
    for name, labels in wanted:
        assert any(n == name and set(labels) <= set(have) for n, have in exported), (
            f"{name}{dict(labels)} is not exported at 0 from the start"
        )
