"""Connections to sites the gateway keeps and reuses, and the names and addresses they are for:
an https:// request sent without CONNECT goes to the address checked for its name
(addons/named_connections.py), a tunnel to the one checked at its CONNECT."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path
from typing import Any

import requests
from mitmproxy import connection

from addons import named_connections
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import H2Client
from tests.support import LocalCA
from tests.support import Site
from tests.support import basic
from tests.support import policy_with
from tests.support import tls_tunnel

AUTH = {"Proxy-Authorization": basic(TEAM, TEAM_TOKEN), "X-Crawl-Project": PROJECT}


# A reload's network: every .test name moved to 127.0.0.2, the only private address admitted.
MOVED_TO_127_0_0_2 = {"allow_private": ["127.0.0.2/32"], "static_hosts": {"*.test": "127.0.0.2"}}


def _get(client: http.client.HTTPConnection, url: str) -> tuple[int, bytes]:
    client.request("GET", url, headers=AUTH)
    answer = client.getresponse()
    return answer.status, answer.read()


def test_a_reload_that_moves_a_name_is_not_ridden_past_on_its_old_connection(
    workdir: Path, test_ca: LocalCA
):
    # HTTPS probe: the connection opened for site-a.test was reused for the next request to
    # that name after a reload sent the name to 127.0.0.2 and took 127.0.0.1 out of
    # network.allow_private: the request reached an address the policy in force neither
    # resolved nor admitted (a tunnel is refused 421 in that case).
    with Site(tls=test_ca) as old, Site(tls=test_ca, address=("127.0.0.2", old.port)) as new:
        policy = policy_with(
            network={"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
        )
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            client = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            try:
                assert _get(client, old.url("site-a.test", "/one"))[0] == 200
                gw.reload_with(lambda p: p.update(network=MOVED_TO_127_0_0_2))
                assert _get(client, old.url("site-a.test", "/two"))[0] == 200
                assert _get(client, old.url("site-a.test", "/three"))[0] == 200
            finally:
                client.close()
    assert [s.path for s in old.seen] == ["/one"]
    assert [s.path for s in new.seen] == ["/two", "/three"]
    assert new.connections == 1  # and the new connection is reused in turn


def test_an_ip_literal_request_does_not_ride_a_connection_opened_for_a_name(
    workdir: Path, test_ca: LocalCA
):
    # HTTPS probe: `GET https://127.0.0.1:P/` after `GET https://site-a.test:P/` on one client
    # connection rode the TLS connection opened for site-a.test (same address, port, TLS):
    # its certificate had been checked for the name, never for the address, and the site
    # served it in site-a.test's TLS session. On a connection of its own the site's
    # certificate (naming site-a.test only) fails the check against the address.
    policy = policy_with(
        network={
            "allow_private": ["127.0.0.0/8"],
            "allow_ip_literals": ["127.0.0.0/8"],
            "static_hosts": {"*.test": "127.0.0.1"},
        }
    )
    with Site(tls=test_ca, names=("site-a.test",)) as named:
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            client = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            try:
                assert _get(client, named.url("site-a.test", "/one"))[0] == 200
                status, _ = _get(client, named.url("127.0.0.1", "/two"))
            finally:
                client.close()
            [record] = [r for r in gw.fetch_records() if r["url"].endswith("/two")]
    assert status == 502
    assert [s.path for s in named.seen] == ["/one"]
    assert (record["site"], record["decision"]) == ("127.0.0.1", "forwarded"), record
    assert "IP address mismatch" in record["note"], record


def test_a_tunnel_to_an_ip_literal_names_no_other_host_to_the_site(workdir: Path, test_ca: LocalCA):
    # HTTPS probe: CONNECT 127.0.0.1:P (network.allow_ip_literals), then a ClientHello naming
    # site-b.test, which the blocklist refuses: the request was decided, charged and recorded as
    # 127.0.0.1's, and the gateway's TLS connection to the site named site-b.test (SNI) and
    # checked the certificate against it. A front end that routes by SNI serves the refused site.
    entry = {"id": "blk-b", "match": ["site-b.test"], "reason": "r", "source": "s"}
    policy = policy_with(
        blocklist=[entry],
        network={
            "allow_private": ["127.0.0.0/8"],
            "allow_ip_literals": ["127.0.0.0/8"],
            "static_hosts": {"*.test": "127.0.0.1"},
        },
    )
    names: list[str | None] = []
    with Site(tls=test_ca) as site, Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        site._tls_context.sni_callback = lambda _sock, name, _ctx: names.append(name)
        target = f"127.0.0.1:{site.port}"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            raw.sendall(
                f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n\r\n".encode()
            )
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            context = ssl.create_default_context(cafile=str(gw.ca_cert))
            with context.wrap_socket(raw, server_hostname="site-b.test") as tls:
                tls.sendall(
                    f"GET /x HTTP/1.1\r\nHost: {target}\r\nX-Crawl-Project: {PROJECT}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        [record] = [r for r in gw.fetch_records() if r["url"].endswith("/x")]
    # No SNI (RFC 6066: none for an address), the certificate checked against 127.0.0.1.
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert names == [None]
    assert (record["site"], record["decision"]) == ("127.0.0.1", "forwarded")


def test_an_http2_request_in_a_tunnel_names_the_checked_authority_to_the_site(
    workdir: Path, test_ca: LocalCA
):
    # HTTPS probe: in a tunnel to site-a.test:P, an HTTP/2 stream with :authority site-a.test:1
    # was decided and recorded as https://site-a.test:P/..., and the site was sent
    # site-a.test:1 (its :authority, or the Host of an HTTP/1 site); an HTTP/1 request's Host
    # is replaced with the host the gateway checked.
    with Site(tls=test_ca) as site:
        with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
            with tls_tunnel(gw, f"site-a.test:{site.port}", alpn="h2") as tls:
                answer = H2Client(tls).get("site-a.test:1", "/h2", ("x-crawl-project", PROJECT))
            [record] = [r for r in gw.fetch_records() if r["url"].endswith("/h2")]
    assert answer.headers[":status"] == "200"
    assert record["url"] == f"https://site-a.test:{site.port}/h2"
    assert [(s.host, s.path) for s in site.seen] == [(f"site-a.test:{site.port}", "/h2")]


def test_the_gateways_own_fetches_follow_a_reload_that_moves_their_site(workdir: Path):
    # HTTPS probe: robots.txt was read over a connection that aiohttp kept, by host name; after
    # a reload that sent the name to 127.0.0.2 and took 127.0.0.1 out of
    # network.allow_private, the next file (tdmrep.json, respected from then on) was read
    # over that connection, from the address the policy in force no longer admits.
    with Site() as old, Site(address=("127.0.0.2", old.port)) as new:
        policy = policy_with(
            defaults={"respect": {"robots": True, "tdmrep": False}},
            network={"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}},
        )
        with Gateway(workdir, policy) as gw:
            proxies = {"http": gw.proxy_url()}
            headers = {"X-Crawl-Project": PROJECT}
            first = requests.get(
                old.url("site-a.test", "/one"), proxies=proxies, headers=headers, timeout=10
            )
            assert first.status_code == 200

            def move(p: dict[str, Any]) -> None:
                p["network"] = MOVED_TO_127_0_0_2
                p["defaults"]["respect"]["tdmrep"] = True

            gw.reload_with(move)
            second = requests.get(
                old.url("site-a.test", "/two"), proxies=proxies, headers=headers, timeout=10
            )
            assert second.status_code == 200
    assert [s.path for s in old.seen] == ["/robots.txt", "/one"]
    assert [s.path for s in new.seen] == ["/.well-known/tdmrep.json", "/two"]


def test_forgetting_a_clients_connections_for_a_name_leaves_other_clients_alone():
    # forget() scanned every client's connections and dropped all of them for the name: the
    # other clients' next requests opened new connections, their old ones left idle (review).
    name = ("site-a.test", 443)
    clients = [
        connection.Client(
            peername=("127.0.0.1", n), sockname=("127.0.0.1", 8080), timestamp_start=0
        )
        for n in (1, 2)
    ]
    servers = [connection.Server(address=("127.0.0.1", 443)) for _ in clients]
    for client, server in zip(clients, servers, strict=True):
        named_connections.remember(client, server, name)
    named_connections.forget(clients[0], name, unless_at=("127.0.0.2", 443))  # moved, for it
    assert servers[0] not in named_connections.NAMED
    assert named_connections.NAMED.get(servers[1]) == name
    named_connections.forget(clients[1], name, unless_at=("127.0.0.1", 443))  # not moved
    assert named_connections.NAMED.get(servers[1]) == name
