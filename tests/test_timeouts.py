"""Sites that hang, reset or trickle, and clients that hold connections without asking anything,
against a real gateway (addons/http_guard.py enforces the policy's network timeouts).

After each fault the gateway serves again, the site's budgets are exact (every admitted request
counted once, every concurrency slot given back) and no fetch record is missing: each request a
misbehaving site received has its record, counted against the site's own count.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy import InvalidPolicy
from proxy.policy import parse_policy
from tests.support import AUDITOR_TOKEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import H2Answer
from tests.support import H2Client
from tests.support import LocalCA
from tests.support import RawSite
from tests.support import Reply
from tests.support import Site
from tests.support import basic
from tests.support import policy_with
from tests.support import tls_tunnel

HEADERS = {"X-Crawl-Project": PROJECT}
CONNECT_TIMEOUT = 1.0
RESPONSE_TIMEOUT = 1.5
TRANSFER_TIMEOUT = 3.0
IDLE_CLIENT_TIMEOUT = 1.5
# mitmproxy's own inactivity timeout, just above every deadline (Limits.watchdog).
WATCHDOG = 3.0
SLACK = 1.5  # a busy CI machine


class Upstream(RawSite):
    """A TCP server on 127.0.0.1 that misbehaves after reading a request, counting requests."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self._lock = threading.Lock()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            if not conn.recv(65536):
                return
            with self._lock:
                self.requests += 1
            if self.mode == "hang":
                time.sleep(30)
            elif self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            elif self.mode == "trickle_head":
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.3)
            elif self.mode == "trickle_body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                for _ in range(1000):
                    conn.sendall(b"x")
                    time.sleep(0.3)
            elif self.mode == "stall_body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
                time.sleep(30)
            elif self.mode == "throttle_cut":
                conn.sendall(
                    b"HTTP/1.1 503 Busy\r\nRetry-After: 30\r\nContent-Length: 1000\r\n\r\nab"
                )
                time.sleep(0.2)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            elif self.mode == "throttle_slow":
                conn.sendall(
                    b"HTTP/1.1 429 Slow Down\r\nRetry-After: 30\r\nContent-Length: 20\r\n\r\n"
                )
                for _ in range(20):
                    conn.sendall(b"x")
                    time.sleep(0.1)
            elif self.mode == "cut_body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
                time.sleep(0.2)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
        except OSError:
            pass


class Blackhole:
    """A listener whose accept queue is full: the kernel drops further SYNs, connect() hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self.requests = 0
        self._fill = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fill.append(s)
        time.sleep(0.2)

    def close(self) -> None:
        for s in self._fill:
            s.close()
        self.sock.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, test_ca: LocalCA) -> Iterator[Gateway]:
    network = {
        "allow_private": ["127.0.0.0/8"],
        "static_hosts": {"*.test": "127.0.0.1"},
        "connect_timeout": f"{CONNECT_TIMEOUT}s",
        "response_timeout": f"{RESPONSE_TIMEOUT}s",
        "transfer_timeout": f"{TRANSFER_TIMEOUT}s",
        "idle_client_timeout": f"{IDLE_CLIENT_TIMEOUT}s",
    }
    policy = policy_with(
        network=network,
        sites=[
            *({"id": f"fault-{i}", "match": [f"fault-{i}.test"]} for i in range(7)),
            # A name the test certificate carries, for the TLS case.
            {"id": "fault-tls", "match": ["site-d.test"]},
        ],
    )
    workdir = tmp_path_factory.mktemp("timeouts")
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        yield gw


def upstream_errors(gw: Gateway) -> dict[str, float]:
    text = requests.get(gw.admin + "/metrics", timeout=5).text
    return {
        s.labels["kind"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "crawlwarden_upstream_errors"
        for s in f.samples
    }


def budgets(gw: Gateway, site: str) -> dict[str, dict]:
    status, body = gw.admin_request("GET", f"/v1/budgets?site={site}", token=AUDITOR_TOKEN)
    assert status == 200, body
    return body["budgets"]


# mode, site, expected status, reason, the timeout named in the note, the seconds it takes
FAULTS = [
    ("hang", "fault-0", 504, "upstream_timeout", "response_timeout", RESPONSE_TIMEOUT),
    ("stall_body", "fault-1", 504, "upstream_timeout", "response_timeout", RESPONSE_TIMEOUT),
    ("trickle_head", "fault-2", 504, "upstream_timeout", "transfer_timeout", TRANSFER_TIMEOUT),
    ("trickle_body", "fault-3", 504, "upstream_timeout", "transfer_timeout", TRANSFER_TIMEOUT),
    ("connect", "fault-4", 504, "upstream_timeout", "connect_timeout", CONNECT_TIMEOUT),
    ("reset", "fault-5", 502, "upstream_error", None, 0.0),
    # The head came, then the site hung up mid-body: nothing of it has gone to the client yet.
    ("cut_body", "fault-6", 502, "upstream_error", None, 0.2),
]


@pytest.mark.parametrize(
    ("mode", "site_id", "status", "reason", "timeout", "takes"),
    FAULTS,
    ids=[f[0] for f in FAULTS],
)
def test_a_misbehaving_site_times_out_is_recorded_and_the_gateway_serves_on(
    gateway: Gateway,
    site: Site,
    mode: str,
    site_id: str,
    status: int,
    reason: str,
    timeout: str | None,
    takes: float,
):
    upstream = Blackhole() if mode == "connect" else Upstream(mode)
    kind = "timeout" if timeout else "reset"
    before = upstream_errors(gateway)[kind]
    try:
        url = f"http://{site_id}.test:{upstream.port}/{mode}"
        started = time.monotonic()
        r = requests.get(url, proxies={"http": gateway.proxy_url()}, headers=HEADERS, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        upstream.close()
    assert r.status_code == status
    assert takes - 0.1 <= elapsed <= takes + SLACK, elapsed
    # The gateway's own answer (not mitmproxy's HTML page): the scraper can tell a slow site
    # from a broken one, and find the record.
    assert r.headers["X-Crawlwarden-Reason"] == reason
    assert r.json()["decision"] == "forwarded" and r.json()["reason"] == reason
    if timeout is not None:
        assert r.json()["rule"] == f"network.{timeout}"
    # No record missing: one per request the site received (a connect that never was: one).
    records = gateway.fetch_records(site=site_id)
    assert len(records) == max(upstream.requests, 1) == 1
    # Recorded as such, and counted by kind.
    [rec] = records
    assert rec["decision"] == "forwarded" and rec["reason"] == reason
    assert rec["id"] == r.headers["x-crawlwarden-request-id"]
    if timeout is not None:
        assert f"network.{timeout}" in rec["note"] and rec["rule"] == f"network.{timeout}"
    assert upstream_errors(gateway)[kind] == before + 1
    # Budgets exact: the request counted once, its concurrency slot given back.
    used = budgets(gateway, site_id)
    assert used["requests_per_day"]["used"] == 1
    assert used["concurrency"]["used"] == 0
    # And the gateway serves again.
    ok = requests.get(
        site.url("site-a.test"), proxies={"http": gateway.proxy_url()}, headers=HEADERS, timeout=10
    )
    assert ok.status_code == 200


@pytest.mark.parametrize("mode", ["throttle_cut", "throttle_slow", "throttle_left"])
def test_a_site_is_paused_from_the_head_of_its_429_or_503(gateway: Gateway, site: Site, mode: str):
    """The status line is the site's answer: its pause holds from then on, also while its body
    is still coming (a busy site is slow), when it breaks the body off, or when the scraper
    gives up on it first."""
    upstream = Upstream("throttle_slow" if mode == "throttle_left" else mode)
    host = f"{mode.replace('_', '-')}.test"
    url = f"http://{host}:{upstream.port}/{mode}"
    proxies = {"http": gateway.proxy_url()}
    try:
        if mode == "throttle_left":
            client = socket.create_connection(("127.0.0.1", gateway.port))
            client.sendall(
                f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: "
                f"{basic(TEAM, TEAM_TOKEN)}\r\nX-Crawl-Project: {PROJECT}\r\n\r\n".encode()
            )
            time.sleep(0.5)  # the head has come, the body is on its way
            client.close()
            time.sleep(0.3)
        else:
            answer: list[requests.Response] = []
            first = threading.Thread(
                target=lambda: answer.append(
                    requests.get(url, proxies=proxies, headers=HEADERS, timeout=30)
                )
            )
            first.start()
            time.sleep(0.5)  # throttle_slow: the head has come, the body is on its way
        r = requests.get(url, proxies=proxies, headers=HEADERS, timeout=30)
        assert r.headers.get("X-Crawlwarden-Reason") == "site_paused", (r.status_code, r.text)
        assert r.status_code == 429
        assert 25 <= int(r.headers["Retry-After"]) <= 30
        assert upstream.requests == 1
        if mode != "throttle_left":
            first.join()
            assert answer[0].status_code in (429, 502)
    finally:
        upstream.close()


def test_a_site_that_hangs_inside_a_tls_tunnel_times_out(gateway: Gateway, tls_site: Site):
    tls_site.routes["/slow"] = Reply(body=b"late", delay=RESPONSE_TIMEOUT + 2)
    tls_site.routes["/fast"] = Reply(body=b"fast")
    session = requests.Session()
    session.proxies = {"https": gateway.proxy_url()}
    started = time.monotonic()
    r = session.get(
        tls_site.url("site-d.test", "/slow"),
        headers=HEADERS,
        verify=str(gateway.ca_cert),
        timeout=30,
    )
    assert r.status_code == 504
    assert time.monotonic() - started <= RESPONSE_TIMEOUT + SLACK
    assert r.headers["X-Crawlwarden-Reason"] == "upstream_timeout"
    again = session.get(
        tls_site.url("site-d.test", "/fast"), headers=HEADERS, verify=str(gateway.ca_cert)
    )
    assert again.status_code == 200 and again.content == b"fast"
    records = gateway.fetch_records(site="fault-tls")
    assert [r["reason"] for r in records] == ["upstream_timeout", "ok"]
    assert len(records) == tls_site.count()


def test_a_site_that_never_finishes_its_tls_handshake_is_silent(gateway: Gateway):
    # The site takes the connection and the gateway's ClientHello, then says nothing. The
    # request waits for its connection to be established (the handshake), yet it is the site
    # that is silent: ended at the response timeout, not left to the transfer timeout.
    upstream = Upstream("hang")
    try:
        started = time.monotonic()
        r = requests.get(
            f"https://tls-hang.test:{upstream.port}/",
            proxies={"https": gateway.proxy_url()},
            headers=HEADERS,
            verify=str(gateway.ca_cert),
            timeout=30,
        )
        elapsed = time.monotonic() - started
    finally:
        upstream.close()
    assert r.status_code == 504 and r.headers["X-Crawlwarden-Reason"] == "upstream_timeout"
    assert r.json()["rule"] == "network.response_timeout", r.json()
    assert RESPONSE_TIMEOUT - 0.1 <= elapsed <= RESPONSE_TIMEOUT + SLACK, elapsed
    assert upstream.requests == 1  # (its ClientHello)
    [record] = gateway.fetch_records(site="tls-hang.test")
    assert (record["reason"], record["rule"]) == ("upstream_timeout", "network.response_timeout")


def test_over_http2_a_stream_that_times_out_gets_the_gateways_answer_and_the_rest_go_on(
    gateway: Gateway, tls_site: Site
):
    # A browser speaks HTTP/2 in its tunnels: the site's failure ends that one stream, with the
    # gateway's answer (not mitmproxy's HTML page), and the connection serves the next request.
    tls_site.routes["/slow-h2"] = Reply(body=b"late", delay=RESPONSE_TIMEOUT + 2)
    tls_site.routes["/fast-h2"] = Reply(body=b"fast")
    authority = f"site-d.test:{tls_site.port}"
    with tls_tunnel(gateway, authority, alpn="h2") as tls:
        client = H2Client(tls)
        project = ("x-crawl-project", PROJECT)
        started = time.monotonic()
        slow = client.get(authority, "/slow-h2", project)
        elapsed = time.monotonic() - started
        fast = client.get(authority, "/fast-h2", project)
    assert slow.end == "ended" and slow.headers[":status"] == "504", slow
    assert elapsed <= RESPONSE_TIMEOUT + SLACK, elapsed
    assert slow.headers["x-crawlwarden-reason"] == "upstream_timeout"
    assert slow.json()["rule"] == "network.response_timeout"
    assert (fast.end, fast.headers[":status"], fast.body) == ("ended", "200", b"fast")
    records = {r["url"].rsplit("/", 1)[1]: r for r in gateway.fetch_records(site="fault-tls")}
    assert records["slow-h2"]["reason"] == "upstream_timeout"
    assert records["slow-h2"]["id"] == slow.headers["x-crawlwarden-request-id"]
    assert records["fast-h2"]["reason"] == "ok"


# -- clients that hold connections -----------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the gateway closed `sock` (EOF or reset), None if it stayed open."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - started


def test_slow_loris_clients_are_closed_and_do_not_block_others(gateway: Gateway, site: Site):
    auth = basic(TEAM, TEAM_TOKEN)
    silent = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(20)]
    trickling = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(20)]
    slow_bodies = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(5)]
    stop = threading.Event()

    def trickle() -> None:
        for s in trickling:
            s.sendall(b"GET http://site-a.test/ HTTP/1.1\r\n")
        for s in slow_bodies:
            s.sendall(
                f"POST {site.url('site-a.test', '/upload')} HTTP/1.1\r\n"
                f"Proxy-Authorization: {auth}\r\nX-Crawl-Project: {PROJECT}\r\n"
                "Content-Length: 1000\r\n\r\n".encode()
            )
        while not stop.is_set():
            for s in trickling + slow_bodies:
                try:
                    s.sendall(b"X-A: b\r\n" if s in trickling else b"x")
                except OSError:
                    pass
            time.sleep(0.2)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        # Other clients are served at full speed meanwhile.
        session = requests.Session()
        session.proxies = {"http": gateway.proxy_url()}
        for i in range(20):
            started = time.monotonic()
            r = session.get(site.url("site-a.test", f"/ok/{i}"), headers=HEADERS, timeout=10)
            assert r.status_code == 200
            assert time.monotonic() - started < 1.0
        closed = [_closed_within(s, IDLE_CLIENT_TIMEOUT + SLACK) for s in trickling + slow_bodies]
        assert all(t is not None for t in closed), closed
        closed = [_closed_within(s, WATCHDOG + SLACK) for s in silent]
        assert all(t is not None for t in closed), closed
    finally:
        stop.set()
        for s in silent + trickling + slow_bodies:
            s.close()
    assert site.count("/upload") == 0  # an upload that never completed never left
    uploads = [r for r in gateway.fetch_records() if r["url"].endswith("/upload")]
    assert len(uploads) == 5
    assert {(r["decision"], r["reason"], r["note"]) for r in uploads} == {
        (
            "refused",
            "interrupted",
            "the client did not finish sending its request; nothing of it was sent to the site",
        )
    }
    assert any(e["event"] == "slow_client_closed" for e in gateway.log_events())


def test_an_idle_keep_alive_connection_is_closed(gateway: Gateway, site: Site):
    auth = basic(TEAM, TEAM_TOKEN)
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(
            f"GET {site.url('site-a.test', '/keep')} HTTP/1.1\r\nHost: site-a.test\r\n"
            f"Proxy-Authorization: {auth}\r\nX-Crawl-Project: {PROJECT}\r\n\r\n".encode()
        )
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        waited = _closed_within(s, IDLE_CLIENT_TIMEOUT + SLACK)
    assert waited is not None and waited >= IDLE_CLIENT_TIMEOUT - 0.2


def test_a_tunnel_that_never_speaks_tls_is_closed(gateway: Gateway, tls_site: Site):
    auth = basic(TEAM, TEAM_TOKEN)
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(
            f"CONNECT site-c.test:{tls_site.port} HTTP/1.1\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert _closed_within(s, IDLE_CLIENT_TIMEOUT + SLACK) is not None
    # ...and one that completed TLS but sends no request, likewise.
    with socket.create_connection(("127.0.0.1", gateway.port)) as raw:
        raw.sendall(
            f"CONNECT site-c.test:{tls_site.port} HTTP/1.1\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        raw.settimeout(5)
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(gateway.ca_cert))
        with context.wrap_socket(raw, server_hostname="site-c.test") as tls:
            assert _closed_within(tls, IDLE_CLIENT_TIMEOUT + WATCHDOG + SLACK) is not None
    assert tls_site.count() == 0


# -- the policy keys -------------------------------------------------------------------------


def test_timeouts_have_defaults_and_nonsense_is_a_field_error():
    policy = policy_with()
    policy["network"] = {}
    network = parse_policy(yaml.safe_dump(policy)).policy.network
    assert (network.connect_timeout, network.response_timeout) == ("10s", "30s")
    assert (network.transfer_timeout, network.idle_client_timeout) == ("5m", "60s")
    assert network.max_request_header_bytes == "64KiB"
    assert network.max_request_body_bytes == "1MiB"
    for key, value in [
        ("connect_timeout", "0s"),
        ("response_timeout", -1),
        ("transfer_timeout", "soon"),
        ("idle_client_timeout", ".inf"),
        ("max_request_header_bytes", "1KB"),
        ("max_request_body_bytes", "lots"),
    ]:
        policy["network"] = {key: value}
        with pytest.raises(InvalidPolicy) as e:
            parse_policy(yaml.safe_dump(policy).replace("'.inf'", ".inf"))
        assert [err.path for err in e.value.errors] == [f"network.{key}"]


def test_a_reload_changes_the_timeouts_of_the_next_requests(gateway: Gateway):
    """The timeouts are policy: a reload applies them to the exchanges that start after it."""
    original = gateway.policy_file.read_text()
    policy = yaml.safe_load(original)
    policy["network"]["response_timeout"] = "0.5s"
    gateway.policy_file.write_text(yaml.safe_dump(policy))
    upstream = Upstream("hang")
    try:
        status, body = gateway.admin_request(
            "POST", "/v1/policy/reload", token="admin-secret-token"
        )
        assert status == 200, body
        started = time.monotonic()
        r = requests.get(
            f"http://fault-0.test:{upstream.port}/after-reload",
            proxies={"http": gateway.proxy_url()},
            headers=HEADERS,
            timeout=30,
        )
        assert r.status_code == 504
        assert time.monotonic() - started < RESPONSE_TIMEOUT
    finally:
        upstream.close()
        gateway.policy_file.write_text(original)
        status, _ = gateway.admin_request("POST", "/v1/policy/reload", token="admin-secret-token")
        assert status == 200


def _seven_at_once(
    workdir: Path, test_ca: LocalCA, paths: list[str], **network: str
) -> tuple[list[H2Answer], list[dict]]:
    """A browser's HTTP/2 connection asking a TLS site (tests.test_optout_e2e's CountingSite)
    for seven paths at once, through a gateway with these network timeouts: the answers, the
    records."""
    from tests.test_optout_e2e import CountingSite

    site = CountingSite(b"", 0, tls=test_ca.server_context_for("site-c.test"))
    authority = f"site-c.test:{site.port}"
    loopback = {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
    try:
        policy = policy_with(network={**loopback, **network})
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            with tls_tunnel(gw, authority, alpn="h2", timeout=60) as tls:
                pages = H2Client(tls).get_together(
                    authority, [(path, 0) for path in paths], ("x-crawl-project", PROJECT)
                )
            return pages, gw.fetch_records()
    finally:
        site.close()


def test_over_http2_requests_waiting_for_a_connection_to_the_site_are_not_timed_out(
    workdir: Path, test_ca: LocalCA
):
    # A browser asks for seven slow pages of one site at once. mitmproxy opens at most five
    # connections to a site for one scraper connection: the other two wait for one to be free.
    # The connect timeout (1 s here) counted that wait: the two were closed while waiting, and,
    # mitmproxy never telling its layers so (addons/connection_tasks.py), never answered.
    # The transfer timeout (12 s) counted it too: each page takes 8 s, the last two 16 s in
    # all, and were ended as the site's doing (504) when their own exchange had taken 4 s.
    pages, records = _seven_at_once(
        workdir,
        test_ca,
        [f"/slow{i}" for i in range(7)],
        connect_timeout="1s",
        transfer_timeout="12s",
    )
    assert [(p.end, p.headers.get(":status"), p.body) for p in pages] == [
        ("ended", "200", b"s" * 8)
    ] * 7
    assert sorted((r["reason"], r["status"]) for r in records) == [("ok", 200)] * 7
    waited = sorted(r["duration_ms"] for r in records)[-2:]
    assert all(ms > 12_000 for ms in waited), waited  # (the last two after a first one ended)


def test_over_http2_a_request_sent_while_another_still_waits_is_silent_from_its_own_connect(
    workdir: Path, test_ca: LocalCA
):
    # Five pages that send a byte a second take mitmproxy's five connections to the site: one
    # for 3 s, four for 8 s. Two more requests wait: the first is sent when the short page's
    # connection is gone (~3 s), the second only at ~8 s; each answer comes 1.5 s after it is
    # sent. While the second still waited, the gateway took it to share the first's connection
    # (a request not on a connection yet could be on any to the site) and so counted the
    # first's silence as its own stream's, from its request: 504 at 4 s, "the site sent no
    # response headers for 2s", after 1 s of the site's silence (CI, once in four runs of the
    # test below). A request waiting for a connection shares none.
    paths = ["/brief0", *(f"/slow{i}" for i in range(1, 5)), "/late1", "/late2"]
    pages, records = _seven_at_once(workdir, test_ca, paths, response_timeout="2s")
    assert [(p.end, p.headers.get(":status"), p.body) for p in pages] == [
        ("ended", "200", b"bbbb"),
        *[("ended", "200", b"s" * 8)] * 4,
        *[("ended", "200", b"late")] * 2,
    ]
    by_path = {r["url"].rsplit("/", 1)[1]: (r["reason"], r["status"]) for r in records}
    assert by_path == {name.lstrip("/"): ("ok", 200) for name in paths}


def test_over_http2_a_request_waiting_for_a_connection_is_not_timed_out_for_the_sites_silence(
    workdir: Path, test_ca: LocalCA
):
    # Five requests to a site that never answers take mitmproxy's five connections to it for
    # this scraper connection; two more wait. At the response timeout the five are ended
    # (504, the site was silent). The two waiting had their silence counted from their request,
    # and so were ended with them as if the site had been silent to them, their connections
    # closed before they were sent (2 runs of 3 here; the third, one came a moment late): now
    # they are sent once the five's connections are gone, and answered. All seven are asked
    # for in the same moment.
    paths = [*(f"/silent{i}" for i in range(5)), "/photo1", "/photo2"]
    pages, records = _seven_at_once(workdir, test_ca, paths, response_timeout="2s")
    assert [(p.end, p.headers.get(":status")) for p in pages] == [("ended", "504")] * 5 + [
        ("ended", "200")
    ] * 2
    assert [p.headers.get("x-crawlwarden-reason") for p in pages[:5]] == ["upstream_timeout"] * 5
    by_path = {r["url"].rsplit("/", 1)[1]: (r["reason"], r["status"]) for r in records}
    assert by_path == {
        **{f"silent{i}": ("upstream_timeout", None) for i in range(5)},  # no answer came
        "photo1": ("ok", 200),
        "photo2": ("ok", 200),
    }
