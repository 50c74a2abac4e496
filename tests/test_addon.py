"""The addon's hooks called directly (mitmproxy.test.taddons/tflow), with a stub resolver.

Tests send traffic only to loopback, so name resolution that returns private or changing answers
is exercised here, at the hook level: the address checked is the address connected to.
"""

from __future__ import annotations

import ipaddress
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
from proxy.governor import compile_policy
from proxy.policy import parse_policy
from proxy.runtime import Runtime
from proxy.runtime import Settings
from proxy.ssrf import Resolver
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
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

    async def make(dns: ChangingDNS, **network: object) -> Gateway:
        policy = base_policy()
        policy["network"] = {"allow_private": [], "static_hosts": {}, **network}
        loaded = parse_policy(yaml.safe_dump(policy))
        compiled = compile_policy(loaded, resolver=Resolver(lookup=dns, ttl=0))
        rt = Runtime(Settings(policy_file=tmp_path / "p.yaml", data_dir=tmp_path), compiled)
        await rt.start()
        runtimes.append(rt)
        return Gateway(rt)

    yield make
    for rt in runtimes:
        await rt.stop()


def request_flow(host: str, port: int = 80, scheme: str = "http"):
    req = tutils.treq(host=host, port=port, scheme=scheme.encode(), path=b"/img.jpg")
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
