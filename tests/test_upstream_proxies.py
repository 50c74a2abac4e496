"""egress.upstream_proxies: requests leave through a pool of real upstream proxies (mitmdump)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import VENV_BIN
from tests.support import Gateway
from tests.support import LocalCA
from tests.support import Reply
from tests.support import Site
from tests.support import basic
from tests.support import exchange
from tests.support import free_port
from tests.support import our_team
from tests.support import policy_with
from tests.support import wait_for


class UpstreamProxy:
    """A bare mitmdump in regular mode that passes TLS through untouched and logs each flow."""

    def __init__(self, workdir: Path, name: str):
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.confdir = workdir / f"{name}-conf"
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "mitmdump"),
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                str(self.port),
                "--set",
                f"confdir={self.confdir}",
                "--set",
                "ignore_hosts=.*",
                "--set",
                "flow_detail=1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        assert wait_for(listening, timeout=20), self.log.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def flows(self) -> str:
        time.sleep(0.2)
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        # (a stopping mitmdump waits for its open connections to end, asyncio's
        # Server.wait_closed on Python 3.12: in a CI run one was still running 10 s after
        # SIGTERM, its leftover process then failing the worker's next test; what it relayed is
        # in its log already)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def pool(workdir: Path) -> Iterator[dict[str, UpstreamProxy]]:
    proxies = {name: UpstreamProxy(workdir, name) for name in ("pool-a", "pool-b")}
    yield proxies
    for p in proxies.values():
        p.stop()


def _through(pool: dict[str, UpstreamProxy]) -> dict[str, object]:
    """The policy's `egress` with every proxy of `pool` in its upstream_proxies."""
    proxies = [{"name": name, "url": p.url} for name, p in pool.items()]
    return {"provider": "test-transit", "public_ips": ["203.0.113.7"], "upstream_proxies": proxies}


def test_requests_leave_through_the_pool_and_a_team_can_be_pinned(
    workdir: Path, site: Site, pool: dict[str, UpstreamProxy]
):
    policy = policy_with(egress=_through(pool))
    policy["teams"][1]["upstream_proxy"] = "pool-b"
    with Gateway(workdir, policy) as gw:
        # Four separate connections from the first team: spread over the pool.
        for i in range(4):
            r = requests.get(
                site.url("site-a.test", f"/spread/{i}"),
                proxies={"http": gw.proxy_url()},
                headers={"X-Crawl-Project": PROJECT, "Connection": "close"},
                timeout=10,
            )
            assert r.status_code == 200
        # The pinned team always uses pool-b.
        for i in range(3):
            r = requests.get(
                site.url("site-a.test", f"/pinned/{i}"),
                proxies={"http": gw.proxy_url(OTHER_TEAM, OTHER_TOKEN)},
                headers={"Connection": "close"},
                timeout=10,
            )
            assert r.status_code == 200
        records = gw.fetch_records()
    by_path = {r["url"].split(str(site.port), 1)[1]: r for r in records}
    spread = [by_path[f"/spread/{i}"]["upstream_proxy"] for i in range(4)]
    assert sorted(spread) == ["pool-a", "pool-a", "pool-b", "pool-b"]
    assert {by_path[f"/pinned/{i}"]["upstream_proxy"] for i in range(3)} == {"pool-b"}
    assert all(r["egress_ip"] == "127.0.0.1" for r in records)
    # The site saw every request, each through one of the proxies.
    assert site.count() == 7
    assert site.connections == 7
    log_b = pool["pool-b"].flows()
    assert "127.0.0.1" in log_b


def test_the_gateways_own_fetches_leave_through_the_pool(
    workdir: Path, site: Site, tls_site: Site, test_ca: LocalCA, pool: dict[str, UpstreamProxy]
):
    # robots.txt is read through the same egress as the requests it decides on, and its fetch
    # record names the proxy: the log's egress is the one the site saw.
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nDisallow: /private/\n")
    tls_site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n")
    policy = policy_with(
        defaults={"respect": {"robots": True}},
        egress=_through(pool),
    )
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        refused = requests.get(
            site.url("site-a.test", "/private/x"),
            proxies={"http": gw.proxy_url()},
            headers={"X-Crawl-Project": PROJECT},
            timeout=10,
        )
        allowed = requests.get(
            tls_site.url("site-b.test", "/open"),
            proxies={"https": gw.proxy_url()},
            headers={"X-Crawl-Project": PROJECT},
            verify=str(gw.ca_cert),
            timeout=10,
        )
        records = gw.fetch_records()
    assert refused.status_code == 451
    assert refused.headers["X-Crawlwarden-Reason"] == "robots_disallowed"
    assert allowed.status_code == 200
    own = {r["url"]: r for r in records if r["kind"] == "gateway_fetch"}
    assert set(own) == {
        f"http://site-a.test:{site.port}/robots.txt",
        f"https://site-b.test:{tls_site.port}/robots.txt",
        f"https://site-b.test:{tls_site.port}/.well-known/tdmrep.json",  # TDMRep: on (default)
    }
    assert all(r["upstream_proxy"] in pool and r["status"] == 200 for r in own.values()), own
    assert all(r["egress_ip"] == "127.0.0.1" for r in own.values()), own  # to the proxy
    # Each robots.txt reached its site once, through a proxy of the pool: plain HTTP as a
    # request the proxy forwarded (to the address the SSRF guard admitted, as for scraper
    # requests), HTTPS as tunnels: the scraper's own, and the gateway's beside it.
    assert site.count("/robots.txt") == 1 and tls_site.count("/robots.txt") == 1
    proxied = "".join(p.flows() for p in pool.values())
    assert f"GET http://127.0.0.1:{site.port}/robots.txt" in proxied, proxied
    assert proxied.count(f"server connect 127.0.0.1:{tls_site.port}") >= 2, proxied


def test_an_https_request_sent_without_connect_through_the_pool_is_checked_against_the_sites_name(
    workdir: Path, pool: dict[str, UpstreamProxy], test_ca: LocalCA
):
    # HTTPS probe (not reproduced then, read in the code): an absolute-form https:// request
    # through an upstream proxy named the pinned address as its TLS name, as one sent directly
    # did: the site's own certificate (naming its name only) was refused.
    policy = policy_with(
        egress={
            "provider": "test-transit",
            "public_ips": ["203.0.113.7"],
            "upstream_proxies": [
                {"name": "pool-a", "url": f"http://127.0.0.1:{pool['pool-a'].port}"}
            ],
        }
    )
    names: list[str | None] = []
    with Site(tls=test_ca, names=("site-c.test",)) as named:
        named._tls_context.sni_callback = lambda _sock, name, _ctx: names.append(name)
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
                authority = f"site-c.test:{named.port}"
                answer = exchange(
                    raw,
                    f"GET https://{authority}/via HTTP/1.1\r\nHost: {authority}\r\n"
                    f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n"
                    f"X-Crawl-Project: {PROJECT}\r\nConnection: close\r\n\r\n",
                )
            [record] = [r for r in gw.fetch_records() if r["url"].endswith("/via")]
    assert answer.startswith(b"HTTP/1.1 200"), answer[:400]
    assert names == ["site-c.test"]
    assert record["upstream_proxy"] == "pool-a"
    # The upstream proxy was asked for the checked address (it resolves no name, and the
    # gateway's SSRF pin holds through it).
    log = pool["pool-a"].flows()
    assert f"127.0.0.1:{named.port}" in log and "site-c.test" not in log, log


@pytest.mark.parametrize("change", ["team pinned elsewhere", "its proxy given another URL"])
def test_a_request_held_across_a_reload_that_moved_its_teams_egress_is_not_forwarded(
    workdir: Path, site: Site, pool: dict[str, UpstreamProxy], change: str
):
    # Held for the site's one slot while a reload pinned its team to another upstream proxy (or
    # pointed its proxy's name at another URL), it left through the one the policy in force no
    # longer gives the team (reviews).
    site.routes["/slow"] = Reply(body=b"slow", delay=3.0)
    policy = policy_with(
        egress=_through(pool),
        sites=[
            {
                "id": "one-at-a-time",
                "match": ["slot.test"],
                "max_concurrency": 1,
                "on_exceed": "delay",
                "max_delay": "20s",
            }
        ],
    )
    our_team(policy)["upstream_proxy"] = "pool-a"
    answers: dict[str, requests.Response] = {}

    def get(path: str) -> None:
        answers[path] = requests.get(
            site.url("slot.test", path),
            proxies={"http": gw.proxy_url()},
            headers={"X-Crawl-Project": PROJECT},
            timeout=20,
        )

    with Gateway(workdir, policy) as gw:
        threads = [threading.Thread(target=get, args=(path,)) for path in ("/slow", "/held")]
        for thread in threads:
            thread.start()
            time.sleep(0.5)

        def move(moved: dict[str, Any]) -> None:
            if change == "team pinned elsewhere":
                our_team(moved)["upstream_proxy"] = "pool-b"
            else:
                [a, b] = moved["egress"]["upstream_proxies"]
                a["url"] = b["url"]

        body = gw.reload_with(move)
        for thread in threads:
            thread.join(timeout=20)
        records = gw.fetch_records()
    assert answers["/slow"].status_code == 200 and answers["/held"].status_code == 421
    assert site.paths().get("/held", 0) == 0
    [held] = [r for r in records if r["url"].endswith("/held")]
    assert (held["reason"], held["policy_version"]) == ("misdirected", body["policy_version"])
    assert "/held" not in pool["pool-a"].flows() + pool["pool-b"].flows()


def test_a_request_inside_a_tunnel_through_the_pool_records_its_proxy(
    workdir: Path, tls_site: Site, test_ca: LocalCA, pool: dict[str, UpstreamProxy]
):
    # HTTPS probe: a tunnel through the pool carried its requests through the proxy chosen at
    # CONNECT, but their records named no upstream proxy (only the tunnel's state had it): the
    # fetch log did not say which egress an HTTPS fetch used.
    policy = policy_with(egress=_through(pool))
    policy["teams"][1]["upstream_proxy"] = "pool-b"
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        for user, token, path in ((TEAM, TEAM_TOKEN, "/first"), (OTHER_TEAM, OTHER_TOKEN, "/b")):
            session = requests.Session()
            session.proxies = {"https": gw.proxy_url(user, token)}
            for i in range(2):  # two requests in one tunnel
                r = session.get(
                    tls_site.url("site-a.test", f"{path}/{i}"),
                    headers={"X-Crawl-Project": PROJECT},
                    verify=str(gw.ca_cert),
                    timeout=10,
                )
                assert r.status_code == 200
            session.close()
        records = {r["url"].split(str(tls_site.port), 1)[1]: r for r in gw.fetch_records()}
    assert records["/first/0"]["upstream_proxy"] == records["/first/1"]["upstream_proxy"]
    assert records["/first/0"]["upstream_proxy"] in pool
    assert records["/b/0"]["upstream_proxy"] == records["/b/1"]["upstream_proxy"] == "pool-b"
    # ... and it is the proxy the tunnel went through.
    chosen = pool[records["/first/0"]["upstream_proxy"]]
    assert f"server connect 127.0.0.1:{tls_site.port}" in chosen.flows()
    assert f"server connect 127.0.0.1:{tls_site.port}" in pool["pool-b"].flows()


@pytest.mark.parametrize("change", ["removed", "moved", "added", "kept"])
def test_a_reload_that_changes_a_tunnels_egress_applies_to_it(
    workdir: Path, tls_site: Site, test_ca: LocalCA, pool: dict[str, UpstreamProxy], change: str
):
    # HTTPS probe: a reload that took the proxy a tunnel went through out of the pool (or gave
    # its name another URL, or brought in a pool for a tunnel that went direct) left the tunnel
    # leaving the old way, under the new policy's version. As after a reload that changes a
    # team's pinned proxy, the next request in it is answered 421, for a new tunnel.
    first, second = pool["pool-a"], pool["pool-b"]
    a = {"name": "pool-a", "url": f"http://127.0.0.1:{first.port}"}
    b = {"name": "pool-b", "url": f"http://127.0.0.1:{second.port}"}
    before = [] if change == "added" else [a]
    after = {
        "removed": [b],
        "moved": [{"name": "pool-a", "url": b["url"]}],
        "added": [b],
        "kept": [b, a],  # its proxy still in the pool: the tunnel is kept
    }[change]
    egress = {"provider": "test-transit", "public_ips": ["203.0.113.7"]}
    policy = policy_with(egress={**egress, "upstream_proxies": before})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        session = requests.Session()
        session.proxies = {"https": gw.proxy_url(OTHER_TEAM, OTHER_TOKEN)}
        url = tls_site.url("site-a.test", "/one")
        assert session.get(url, verify=str(gw.ca_cert), timeout=10).status_code == 200
        gw.reload_with(lambda p: p["egress"].update(upstream_proxies=after))
        again = session.get(url, verify=str(gw.ca_cert), timeout=10)  # in the same tunnel
        if change == "kept":
            assert again.status_code == 200
            assert tls_site.count("/one") == 2
            return
        assert (again.status_code, again.headers["X-Crawlwarden-Reason"]) == (421, "misdirected")
        assert again.headers["Connection"] == "close"
        # A new tunnel leaves through the pool in force.
        fresh = requests.get(
            tls_site.url("site-a.test", "/two"),
            proxies={"https": gw.proxy_url(OTHER_TEAM, OTHER_TOKEN)},
            verify=str(gw.ca_cert),
            timeout=10,
        )
        assert fresh.status_code == 200
        records = {
            r["url"].rsplit("/", 1)[1]: r for r in gw.fetch_records() if r["kind"] == "fetch"
        }
    assert tls_site.count("/one") == 1 and tls_site.count("/two") == 1
    assert records["two"]["upstream_proxy"] == after[0]["name"]
    assert f"server connect 127.0.0.1:{tls_site.port}" in second.flows()


def test_the_requests_of_one_scraper_connection_keep_one_proxy_of_the_pool(
    workdir: Path, site: Site, pool: dict[str, UpstreamProxy]
):
    # HTTPS probe: README says connections are spread over the pool; it was each request: one
    # keep-alive connection's requests alternated between the proxies, so the site saw one
    # scraper's requests come from rotating egresses, over a connection per proxy.
    policy = policy_with(egress=_through(pool))
    with Gateway(workdir, policy) as gw:
        for connection in ("first", "second"):
            client = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            try:
                for i in range(3):
                    client.request(
                        "GET",
                        site.url("site-a.test", f"/{connection}/{i}"),
                        headers={"Proxy-Authorization": basic(OTHER_TEAM, OTHER_TOKEN)},
                    )
                    answer = client.getresponse()
                    answer.read()
                    assert answer.status == 200
            finally:
                client.close()
        records = gw.fetch_records()
    used = {
        connection: {r["upstream_proxy"] for r in records if f"/{connection}/" in r["url"]}
        for connection in ("first", "second")
    }
    assert [len(proxies) for proxies in used.values()] == [1, 1], used
    assert used["first"] != used["second"]  # two connections: spread over the pool
    assert site.connections == 2
