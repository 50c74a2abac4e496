"""The addon's hooks called directly (mitmproxy.test.taddons/tflow), with a stub resolver.

Tests send traffic only to loopback, so name resolution that returns private or changing answers
is exercised here, at the hook level: the address checked is the address connected to.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons.gateway import Gateway
from proxy import runtime as runtime_module
from proxy.audit import spool as spool_module
from proxy.governor import compile_policy
from proxy.policy import parse_policy
from proxy.runtime import Runtime
from proxy.runtime import Settings
from proxy.ssrf import Resolver
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Reply
from tests.support import Site
from tests.support import base_policy
from tests.support import basic


class ChangingDNS:
    """Answers each lookup of a name with the next address of its list (DNS rebinding)."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        self.lookups.append(host)
        return [ipaddress.ip_address(self.answers[host].pop(0))]


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator:
    runtimes: list[Runtime] = []

    async def make(
        dns: ChangingDNS,
        *,
        egress: dict | None = None,
        respect: dict | None = None,
        **network: object,
    ) -> Gateway:
        policy = base_policy()
        policy["network"] = {"allow_private": [], "static_hosts": {}, **network}
        policy["egress"] = {**policy["egress"], **(egress or {})}
        policy["defaults"]["respect"] = {**policy["defaults"]["respect"], **(respect or {})}
        loaded = parse_policy(yaml.safe_dump(policy))
        static = dict(loaded.policy.network.static_hosts)
        compiled = compile_policy(loaded, resolver=Resolver(static, lookup=dns, ttl=0))
        rt = Runtime(Settings(policy_file=tmp_path / "p.yaml", data_dir=tmp_path), compiled)
        await rt.start()
        runtimes.append(rt)
        return Gateway(rt)

    yield make
    for rt in runtimes:
        await rt.stop()


def request_flow(host: str, port: int = 80, scheme: str = "http"):
    req = tutils.treq(host=host, port=port, scheme=scheme.encode(), path=b"/img.jpg")
    req.content = b""  # a GET: no body (one is refused, tests/test_hostile.py)
    req.headers["Proxy-Authorization"] = basic(TEAM, TEAM_TOKEN)
    req.headers["X-Crawl-Project"] = PROJECT
    return tflow.tflow(req=req)


async def test_the_checked_address_is_pinned_for_the_connection(make_gateway):
    dns = ChangingDNS({"rebind.example": ["93.184.216.34", "127.0.0.1"]})
    gw = await make_gateway(dns)
    with taddons.context(gw):
        flow = request_flow("rebind.example")
        await gw.requestheaders(flow)
        assert flow.response is None  # allowed
        # mitmproxy connects to flow.request.host: the address we checked, not the name.
        assert flow.request.host == "93.184.216.34"
        assert dns.lookups == ["rebind.example"]
        # A second lookup would answer 127.0.0.1; nothing looks again before connecting.
        data = server_hooks.ServerConnectionHookData(
            client=flow.client_conn,
            server=connection.Server(address=(flow.request.host, flow.request.port)),
        )
        gw.server_connect(data)
        assert data.server.error is None
        assert dns.lookups == ["rebind.example"]


@pytest.mark.parametrize(
    ("answer", "denied_class"),
    [
        ("10.0.0.7", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("fe80::1", "link_local"),
    ],
)
async def test_names_resolving_to_private_addresses_are_refused(make_gateway, answer, denied_class):
    gw = await make_gateway(ChangingDNS({"inside.example": [answer]}))
    with taddons.context(gw):
        flow = request_flow("inside.example")
        await gw.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 403
        assert flow.response.headers["X-Crawlwarden-Reason"] == "private_address"
        assert denied_class in flow.response.get_text()


async def test_connect_pins_the_tunnel_and_its_sni(make_gateway):
    dns = ChangingDNS({"img.example": ["93.184.216.34", "10.0.0.1"]})
    gw = await make_gateway(dns)
    with taddons.context(gw):
        flow = request_flow("img.example", 443, "https")
        flow.request.method = "CONNECT"
        await gw.http_connect(flow)
        assert flow.response is None
        assert flow.request.host == "93.184.216.34"
        assert flow.server_conn.sni == "img.example"
        assert dns.lookups == ["img.example"]


async def test_unpinned_connections_are_refused_at_connect_time(make_gateway):
    gw = await make_gateway(ChangingDNS({}))
    with taddons.context(gw):
        for address, refused in [
            (("somewhere.example", 80), True),
            (("10.1.1.1", 80), True),
            (("93.184.216.34", 80), False),
        ]:
            data = server_hooks.ServerConnectionHookData(
                client=tflow.tclient_conn(), server=connection.Server(address=address)
            )
            gw.server_connect(data)
            assert (data.server.error is not None) is refused, address


# -- every path to a site checks the address it connects to -------------------------------------


@pytest.mark.parametrize(
    ("answer", "denied_class"),
    [
        ("10.0.0.7", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 form of 169.254.169.254
        ("fd00:ec2::254", "metadata"),
        ("100.64.1.1", "cgnat"),
        ("0.0.0.0", "unspecified"),
    ],
)
async def test_connect_to_a_name_resolving_to_a_private_address_is_refused(
    make_gateway, answer, denied_class
):
    gw = await make_gateway(ChangingDNS({"inside.example": [answer]}))
    with taddons.context(gw):
        flow = request_flow("inside.example", 443, "https")
        flow.request.method = "CONNECT"
        await gw.http_connect(flow)
        # The tunnel opens to nowhere, so that its requests are answered with the refusal.
        assert flow.response is None and flow.request.host == "inside.example"  # not pinned
        tunnel = gw.tunnels[flow.client_conn]
        assert tunnel.refusal is not None
        inner = request_flow("inside.example", 443, "https")
        inner.client_conn = flow.client_conn
        await gw.requestheaders(inner)
        assert inner.response is not None and inner.response.status_code == 403
        assert inner.response.headers["X-Crawlwarden-Reason"] == "private_address"
        assert denied_class in inner.response.get_text()
        for address in (("inside.example", 443), ("93.184.216.34", 443)):
            data = server_hooks.ServerConnectionHookData(
                client=flow.client_conn, server=connection.Server(address=address)
            )
            gw.server_connect(data)
            assert data.server.error is not None, address  # nothing to connect to


async def test_requests_inside_a_tunnel_go_to_the_address_checked_at_connect(make_gateway):
    dns = ChangingDNS({"img.example": ["93.184.216.34", "127.0.0.1"]})
    gw = await make_gateway(dns)
    with taddons.context(gw):
        connect = request_flow("img.example", 443, "https")
        connect.request.method = "CONNECT"
        await gw.http_connect(connect)
        assert connect.response is None
        inner = request_flow("img.example", 443, "https")
        inner.client_conn = connect.client_conn
        inner.request.host = "93.184.216.34"  # what mitmproxy carries into the tunnel
        inner.request.headers["Host"] = "img.example"
        await gw.requestheaders(inner)
        assert inner.response is None
        assert dns.lookups == ["img.example"]  # the second answer (127.0.0.1) is never asked for
        data = server_hooks.ServerConnectionHookData(
            client=inner.client_conn, server=connection.Server(address=("93.184.216.34", 443))
        )
        gw.server_connect(data)
        assert data.server.error is None


async def test_through_an_upstream_proxy_the_checked_address_is_what_the_proxy_is_given(
    make_gateway,
):
    pool = {"upstream_proxies": [{"name": "pool-a", "url": "http://10.9.9.9:3128"}]}
    dns = ChangingDNS(
        {"img.example": ["93.184.216.34", "10.0.0.1"], "inside.example": ["192.168.1.5"]}
    )
    gw = await make_gateway(dns, egress=pool)
    with taddons.context(gw):
        flow = request_flow("img.example")
        await gw.requestheaders(flow)
        assert flow.response is None
        # The proxy is asked for the pinned address, so it cannot resolve the name differently.
        assert flow.request.host == "93.184.216.34"
        assert flow.server_conn.via is not None and flow.server_conn.via[1] == ("10.9.9.9", 3128)
        # A name resolving to a private address is refused before the proxy is contacted.
        private = request_flow("inside.example")
        await gw.requestheaders(private)
        assert private.response is not None and private.response.status_code == 403
        # The proxy itself is the one private address the gateway may connect to.
        for address, refused in [(("10.9.9.9", 3128), False), (("10.9.9.9", 80), True)]:
            data = server_hooks.ServerConnectionHookData(
                client=flow.client_conn, server=connection.Server(address=address)
            )
            gw.server_connect(data)
            assert (data.server.error is not None) is refused, address
        assert dns.lookups == ["img.example", "inside.example"]


async def test_the_gateways_own_robots_fetch_checks_its_own_answer(make_gateway):
    """robots.txt is fetched by the gateway (proxy/originfiles.py GuardedResolver): a name that
    answers a public address for the request check and a private one for the robots fetch gets
    no robots fetch at all, and so, by RFC 9309 2.3.1.4, no request either."""
    dns = ChangingDNS({"rebind.example": ["93.184.216.34", "10.0.0.9"]})
    gw = await make_gateway(dns, respect={"robots": True})
    fetches: list[tuple[str, str | None]] = []
    gw.rt.optouts.fetcher._on_fetch = lambda f: fetches.append((f.url, f.error))
    with taddons.context(gw):
        flow = request_flow("rebind.example")
        await gw.requestheaders(flow)
    assert dns.lookups == ["rebind.example", "rebind.example"]
    assert flow.response is not None and flow.response.status_code == 451
    assert flow.response.headers["X-Crawlwarden-Reason"] == "robots_disallowed"
    [(url, error)] = fetches
    assert url == "http://rebind.example/robots.txt"
    assert error is not None and "10.0.0.9" in error and "SSRF guard" in error


async def test_a_robots_redirect_to_a_metadata_address_is_not_followed(make_gateway):
    with Site() as site:
        site.routes["/robots.txt"] = Reply(
            status=301,
            body=b"",
            headers={"Location": "http://169.254.169.254/latest/meta-data/"},
        )
        gw = await make_gateway(
            ChangingDNS({}),
            respect={"robots": True},
            allow_private=["127.0.0.0/8"],
            static_hosts={"*.test": "127.0.0.1"},
        )
        fetches: list[tuple[str, str | None]] = []
        gw.rt.optouts.fetcher._on_fetch = lambda f: fetches.append((f.url, f.error))
        with taddons.context(gw):
            flow = request_flow("site-a.test", site.port)
            await gw.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 451
        assert site.count("/robots.txt") == 1
        refused = [e for u, e in fetches if "169.254.169.254" in u]
        assert refused and "metadata" in (refused[0] or "")


# -- hooks fail closed -------------------------------------------------------------------------


async def test_a_hook_that_raises_kills_the_flow_and_still_records_it(make_gateway):
    """mitmproxy carries on with a flow whose hook raised, as if the hook had passed: the
    gateway kills it instead (nothing leaves) and records it, its budget lease released."""
    gw = await make_gateway(ChangingDNS({"img.example": ["93.184.216.34"]}))

    def broken(ctx):
        raise RuntimeError("a bug")

    with taddons.context(gw):
        flow = request_flow("img.example")
        gw.rt.governor.check_request = broken
        seq = gw.rt.fetch_log.seq
        await gw.requestheaders(flow)
        assert flow.error is not None and flow.error.msg == "Connection killed."
        assert flow.response is None or flow.response.status_code != 200
        assert gw.rt.fetch_log.seq == seq + 1
        assert gw.rt.in_flight == 0
        # And after admission (a lease held): the lease comes back.
        flow = request_flow("img.example")
        del gw.rt.governor.check_request
        gw.rt.fetch_log.begin = broken
        await gw.requestheaders(flow)
        assert flow.error is not None
        assert gw.rt.in_flight == 0
        await gw.rt.budgets.flush()  # settlements are batched
        usage = await gw.rt.budgets.usage(gw.rt.governor.site_for("img.example"))
        assert usage["budgets"]["concurrency"]["used"] == 0


async def test_once_the_drain_is_over_nothing_more_is_forwarded(make_gateway):
    """A request that gets to the forwarding step after the drain's wait ended (its Redis
    admission was still under way) is refused, its lease given back: the site never sees a
    request the stopping gateway might not record."""
    gw = await make_gateway(ChangingDNS({"img.example": ["93.184.216.34"]}))
    with taddons.context(gw):
        gw.rt.draining = gw.rt.stopping = True
        flow = request_flow("img.example")
        seq = gw.rt.fetch_log.seq
        await gw.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 503
        assert flow.response.headers["X-Crawlwarden-Reason"] == "draining"
        assert flow.response.headers["Retry-After"] == "1"
        assert gw.rt.in_flight == 0
        assert gw.rt.fetch_log.spool.unfinished() == []  # nothing begun
        await gw.response(flow)
        assert flow.response.headers["connection"] == "close"
        assert gw.rt.fetch_log.seq == seq + 1  # the refusal is recorded
        await gw.rt.budgets.flush()
        usage = await gw.rt.budgets.usage(gw.rt.governor.site_for("img.example"))
        assert usage["budgets"]["concurrency"]["used"] == 0


async def test_while_draining_http1_answers_close_their_connection(make_gateway):
    gw = await make_gateway(ChangingDNS({"img.example": ["93.184.216.34"] * 3}))
    with taddons.context(gw):
        gw.rt.draining = True  # still forwarding
        answers = {}
        for version in ("HTTP/1.1", "HTTP/2.0"):
            flow = request_flow("img.example")
            flow.request.http_version = version
            await gw.requestheaders(flow)
            assert flow.response is None  # forwarded
            flow.response = tutils.tresp(http_version=version.encode())
            gw.responseheaders(flow)
            await gw.response(flow)
            answers[version] = flow.response.headers.get("connection")
        # HTTP/2 has no Connection header (RFC 9113 8.2.2): its connection ends at the stop.
        assert answers == {"HTTP/1.1": "close", "HTTP/2.0": None}


async def test_every_request_leaves_the_deciding_count(make_gateway):
    """The drain waits for requests being decided as well as those in flight (so refusals are
    recorded before the fetch log closes): each way out of the hooks leaves the count, or every
    stop would wait out its whole drain time."""
    gw = await make_gateway(ChangingDNS({"img.example": ["93.184.216.34"] * 4}))
    rt = gw.rt
    with taddons.context(gw):
        # Forwarded, then answered.
        flow = request_flow("img.example")
        await gw.requestheaders(flow)
        assert (rt.deciding, rt.in_flight) == (0, 1)
        flow.response = tutils.tresp()
        gw.responseheaders(flow)
        await gw.response(flow)
        assert (rt.deciding, rt.in_flight) == (0, 0)
        # Refused, counted until its answer is recorded (response hook, or error hook).
        for end in ("response", "error"):
            flow = request_flow("img.example")
            flow.request.headers["X-Crawl-Project"] = "no-such-project"
            await gw.requestheaders(flow)
            assert flow.response is not None and rt.deciding == 1
            if end == "response":
                await gw.response(flow)
            else:
                flow.error = tflow.terr()  # the client went away first
                gw.error(flow)
            assert rt.deciding == 0
        # No credentials.
        flow = request_flow("img.example")
        del flow.request.headers["Proxy-Authorization"]
        await gw.requestheaders(flow)
        await gw.response(flow)
        assert rt.deciding == 0
        # A tunnel accepted (its requests are counted one by one), and one refused.
        for host in ("img.example", "10.0.0.1"):
            connect = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=host, port=443))
            connect.request.headers["Proxy-Authorization"] = basic(TEAM, TEAM_TOKEN)
            await gw.http_connect(connect)
            assert rt.deciding == 0
        # A hook that raised: recorded on the way out.
        gw.rt.governor.check_request = lambda ctx: 1 / 0
        await gw.requestheaders(request_flow("img.example"))
        assert (rt.deciding, rt.in_flight) == (0, 0)


async def test_begin_line_fails_answer_is_503_with_connection_close(make_gateway, monkeypatch):
    gw = await make_gateway(ChangingDNS({"img.example": ["93.184.216.34"] * 3}))
    real_write = os.write
    full = {"on": False}

    def write(fd, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(spool_module.os, "write", write)
    with taddons.context(gw):
        flow = request_flow("img.example")
        flow.request.http_version = "HTTP/1.1"
        full["on"] = True  # the disk fills: the begin line cannot be written
        await gw.requestheaders(flow)
        got = (
            flow.response.status_code if flow.response else None,
            flow.response.headers.get("x-crawlwarden-reason") if flow.response else None,
            flow.response.headers.get("connection") if flow.response else None,
        )
        assert got[:2] == (503, "audit_unavailable"), got
        # As the governance path's: the scraper's next connection goes to a ready replica.
        assert got[2] == "close", got


# -- bounded per-site state -------------------------------------------------------------------


async def test_crawl_delays_kept_are_bounded_and_hold_again_once_forgotten(
    make_gateway, monkeypatch
):
    """A broad crawl: each origin's robots.txt Crawl-delay is kept for its site's rate, in
    tables as bounded as the other per-site ones (docs/kubernetes.md). Past the bound they are
    forgotten, and an origin's delay is set again from its parsed robots.txt before its next
    request is admitted: forgetting never lets a site be fetched faster than it asked."""
    monkeypatch.setattr(runtime_module, "MAX_CRAWL_DELAY_ORIGINS", 3)
    with Site() as site:
        site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nCrawl-delay: 30\nAllow: /\n")
        gw = await make_gateway(
            ChangingDNS({}),
            respect={"robots": True},
            allow_private=["127.0.0.0/8"],
            static_hosts={"*.test": "127.0.0.1"},
        )
        rt = gw.rt
        hosts = [f"site-{i}.test" for i in range(5)]
        with taddons.context(gw):
            for host in hosts:
                flow = request_flow(host, site.port)
                await gw.requestheaders(flow)
                # Its robots.txt read has just gone: the request waits the delay after it.
                assert flow.response is not None and flow.response.status_code == 429
                assert json.loads(flow.response.content)["rule"] == "robots.crawl_delay"
            assert sum(map(len, rt._crawl_delays.values())) <= 3
            assert len(rt.budgets._min_interval) <= 3
            # site-0's delay was forgotten: its next request still waits its 30 s.
            flow = request_flow(hosts[0], site.port)
            await gw.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 429
        assert flow.response.headers["X-Crawlwarden-Reason"] == "rate_limited"
        assert json.loads(flow.response.content)["rule"] == "robots.crawl_delay"
        # Sites without a Crawl-delay leave nothing behind.
        site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n")
        with taddons.context(gw):
            for i in range(5, 10):
                flow = request_flow(f"site-{i}.test", site.port)
                await gw.requestheaders(flow)
                assert flow.response is None
        assert all(f"site-{i}.test" not in rt._crawl_delays for i in range(5, 10))


async def test_a_redirecting_tdmrep_json_under_a_crawl_delay_is_read_and_the_request_goes(
    make_gateway,
):
    """The gateway's tdmrep.json read was slowed to the Crawl-delay its robots.txt read had just
    brought: the delay's burst of 1 refused the redirect's second hop, every time, and every
    request to the origin was refused for good (review)."""
    with Site() as site:
        site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nCrawl-delay: 1\nAllow: /\n")
        site.routes["/.well-known/tdmrep.json"] = Reply(
            status=301, headers={"Location": "/tdmrep-real.json"}, body=b""
        )
        site.routes["/tdmrep-real.json"] = Reply(
            body=b"[]", headers={"Content-Type": "application/json"}
        )
        gw = await make_gateway(
            ChangingDNS({}),
            respect={"robots": True, "tdmrep": True},
            allow_private=["127.0.0.0/8"],
            static_hosts={"*.test": "127.0.0.1"},
        )
        with taddons.context(gw):
            flow = request_flow("site-a.test", site.port)
            await gw.requestheaders(flow)
            # Read whole (both hops); the request itself waits the delay after the last read.
            assert site.paths()["/tdmrep-real.json"] == 1
            assert flow.response is not None
            assert "must be read" not in json.loads(flow.response.content)["detail"]
            await asyncio.sleep(1.1)
            flow = request_flow("site-a.test", site.port)
            await gw.requestheaders(flow)
        assert flow.response is None, flow.response and flow.response.content
        assert site.paths()["/.well-known/tdmrep.json"] == 1


async def test_a_websocket_keeps_only_its_newest_message_in_memory(make_gateway):
    # mitmproxy keeps every message of a WebSocket in its flow while it is open: a browser's
    # live feed grew the gateway by every byte it sent.
    gw = await make_gateway(ChangingDNS({}))
    with taddons.context(gw):
        flow = tflow.twebsocketflow()
        assert len(flow.websocket.messages) > 1
        newest = flow.websocket.messages[-1]
        await gw.websocket_message(flow)
        assert flow.websocket.messages == [newest]
