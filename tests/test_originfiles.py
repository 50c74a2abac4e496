"""The gateway's own fetches: SSRF guard and static hosts, TLS trust, the fetch-log callback,
single flight under cancellation, and the caches."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.originfiles import CacheUnavailable
from proxy.originfiles import FetchRefused
from proxy.originfiles import GuardedResolver
from proxy.originfiles import MemoryCache
from proxy.originfiles import OriginFetch
from proxy.originfiles import OriginFile
from proxy.originfiles import OriginFileFetcher
from proxy.originfiles import RedisCache
from proxy.originfiles import TargetRefused
from proxy.originfiles import origin_of
from proxy.policy import Network
from proxy.policy import UpstreamProxy
from proxy.robots import DISALLOW_ALL
from proxy.ssrf import AddressGuard
from proxy.ssrf import Resolver
from tests.optout_fixtures import TOKEN
from tests.optout_fixtures import USER_AGENT
from tests.optout_fixtures import make_checks
from tests.optout_fixtures import make_policy
from tests.optout_fixtures import origin_server
from tests.optout_fixtures import private_guard
from tests.optout_fixtures import request_context
from tests.optout_fixtures import static_resolver
from tests.support import LocalCA
from tests.support import free_port


def fetcher(**kwargs) -> OriginFileFetcher:  # type: ignore[no-untyped-def]
    resolver = GuardedResolver(static_resolver(), kwargs.pop("guard", private_guard()))
    return OriginFileFetcher(resolver, user_agent=USER_AGENT, **kwargs)


def test_origin_keys() -> None:
    assert origin_of("HTTPS", "Site-A.test.", 443) == "https://site-a.test:443"
    assert origin_of("http", "[::1]", 8080) == "http://[::1]:8080"


async def test_names_resolve_through_static_hosts_and_the_guard() -> None:
    resolver = GuardedResolver(static_resolver(), private_guard())
    results = await resolver.resolve("Site-A.test", 80)
    assert [(r["host"], r["port"], r["family"]) for r in results] == [
        ("127.0.0.1", 80, socket.AF_INET)
    ]
    closed = GuardedResolver(static_resolver(), AddressGuard())  # loopback not admitted
    with pytest.raises(TargetRefused, match="loopback"):
        await closed.resolve("site-a.test", 80)


async def test_a_name_the_guard_refuses_is_never_connected_to() -> None:
    fetched: list[tuple[str, int | None, str | None]] = []
    async with origin_server({"/robots.txt": "User-agent: *\nDisallow: /\n"}) as site:
        f = fetcher(
            guard=AddressGuard(), on_fetch=lambda f: fetched.append((f.url, f.status, f.error))
        )
        try:
            file = await f.fetch(site.origin() + "/robots.txt")
        finally:
            await f.close()
        assert site.hits["/robots.txt"] == 0
    assert file.outcome == "unreachable" and "SSRF guard" in (file.error or "")
    assert fetched[0][1] is None and "loopback" in (fetched[0][2] or "")


async def test_an_ip_literal_is_checked_too() -> None:
    async with origin_server({"/robots.txt": "x"}) as site:
        f = fetcher(guard=AddressGuard())
        try:
            file = await f.fetch(f"http://127.0.0.1:{site.port}/robots.txt")
        finally:
            await f.close()
        assert site.hits["/robots.txt"] == 0
    assert file.outcome == "unreachable" and "SSRF guard" in (file.error or "")


async def test_unknown_names_go_to_the_lookup_only_when_not_static() -> None:
    asked: list[str] = []

    async def lookup(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append(host)
        return [ipaddress.ip_address("10.0.0.7")]

    resolver = GuardedResolver(Resolver({}, lookup=lookup), private_guard())
    with pytest.raises(TargetRefused, match="private"):
        await resolver.resolve("internal.example", 80)
    assert asked == ["internal.example"]


async def test_https_trusts_the_configured_ca(test_ca: LocalCA) -> None:
    body = "User-agent: *\nDisallow: /x\n"
    async with origin_server({"/robots.txt": body}, test_ca.server_context()) as site:
        trusting = fetcher(cafile=str(test_ca.ca_cert))
        default = fetcher()
        try:
            ok = await trusting.fetch(site.origin(scheme="https") + "/robots.txt")
            refused = await default.fetch(site.origin(scheme="https") + "/robots.txt")
        finally:
            await trusting.close()
            await default.close()
    assert ok.outcome == "ok" and ok.body == body.encode()
    assert refused.outcome == "unreachable" and "certificate" in (refused.error or "").lower()


async def test_every_gateway_fetch_is_reported_for_the_fetch_log() -> None:
    records: list[OriginFetch] = []
    body = b"User-agent: *\nDisallow: /private\n"
    routes = {
        "/robots.txt": web.Response(status=301, headers={"Location": "/real-robots.txt"}),
        "/real-robots.txt": web.Response(body=body, content_type="text/plain"),
    }
    not_found = b"<html><body>No such file</body></html>"
    routes["/.well-known/tdmrep.json"] = web.Response(
        status=404, body=not_found, content_type="text/html"
    )
    began = time.time()
    async with origin_server(routes) as site:
        f = fetcher(on_fetch=records.append)
        try:
            await f.fetch(site.origin() + "/robots.txt")
            await f.fetch(site.origin() + "/.well-known/tdmrep.json")
        finally:
            await f.close()
    base = site.origin()
    # (the Content-Type as sent: the redirect sends none)
    assert [dataclasses.replace(r, started=0.0, duration=0.0) for r in records] == [
        OriginFetch(
            base + "/robots.txt",
            301,
            0,
            hashlib.sha256(b"").hexdigest(),
            None,
            None,
            "127.0.0.1",
            content_type=None,
        ),
        OriginFetch(
            base + "/real-robots.txt",
            200,
            len(body),
            hashlib.sha256(body).hexdigest(),
            None,
            None,
            "127.0.0.1",  # the local address of the connection the answer came on
            content_type="text/plain",
        ),
        # An error page is what the site sent too: its size and hash, not an empty body's.
        OriginFetch(
            base + "/.well-known/tdmrep.json",
            404,
            len(not_found),
            hashlib.sha256(not_found).hexdigest(),
            None,
            None,
            "127.0.0.1",
            content_type="text/html",
        ),
    ]
    assert all(began <= r.started <= time.time() and r.duration > 0 for r in records)


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="User-agent: *\nDisallow: /\n")

    async with origin_server({"/robots.txt": slow}) as site:
        f = fetcher()
        try:
            first = asyncio.create_task(f.get(site.origin(), "/robots.txt"))
            second = asyncio.create_task(f.get(site.origin(), "/robots.txt"))
            await asyncio.sleep(0.1)
            first.cancel()
            release.set()
            file = await second
            assert first.cancelled() and file.outcome == "ok"
        finally:
            await f.close()
        assert site.hits["/robots.txt"] == 1


async def test_cache_control_max_age_shortens_the_day() -> None:
    now = [0.0]
    route = web.Response(text="User-agent: *\n", headers={"Cache-Control": "public, max-age=600"})
    async with origin_server({"/robots.txt": route}) as site:
        f = fetcher(clock=lambda: now[0])
        try:
            file = await f.get(site.origin(), "/robots.txt")
            assert file.expires_at == 600
            now[0] = 601
            await f.get(site.origin(), "/robots.txt")
        finally:
            await f.close()
        assert site.hits["/robots.txt"] == 2


class BrokenRedis:
    async def get(self, key: str) -> bytes:
        raise ConnectionError("redis is down")

    async def set(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("redis is down")


async def test_a_shared_cache_outage_falls_back_to_fetching() -> None:
    cache = RedisCache(BrokenRedis())
    with pytest.raises(CacheUnavailable):
        await cache.get("k")
    async with origin_server({"/robots.txt": "User-agent: *\nDisallow: /x\n"}) as site:
        checks = make_checks(cache=cache)
        try:
            decision = await checks.robots(request_context(make_policy(), site.origin() + "/x"))
        finally:
            await checks.close()
    assert decision is not None


async def test_after_a_failure_the_shared_cache_is_left_alone_for_a_while() -> None:
    # A hung Redis costs its client timeout on every call: not on each request for a new origin.
    calls = 0
    now = [0.0]

    class Hung(BrokenRedis):
        async def get(self, key: str) -> bytes:
            nonlocal calls
            calls += 1
            raise TimeoutError("timed out")

    cache = RedisCache(Hung(), pause=5.0, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(CacheUnavailable):
            await cache.get("k")
    with pytest.raises(CacheUnavailable):
        await cache.put("k", sample())
    assert calls == 1
    now[0] = 5.0
    with pytest.raises(CacheUnavailable):
        await cache.get("k")
    assert calls == 2  # asked again once the pause is over


def sample(body: bytes = b"x", expires: float = 100.0) -> OriginFile:
    return OriginFile("http://a.test:80/robots.txt", "ok", 200, body, 0.0, expires)


def test_an_origin_file_survives_serialization() -> None:
    file = OriginFile(
        "http://a.test:80/robots.txt", "unreachable", 503, b"\x00\xff", 1.5, 301.5, "status 503"
    )
    assert OriginFile.from_bytes(file.to_bytes()) == file


async def test_memory_cache_expires_and_stays_bounded() -> None:
    now = [0.0]
    cache = MemoryCache(max_entries=3, max_bytes=10, clock=lambda: now[0])
    await cache.put("a", sample(expires=5))
    assert await cache.get("a") is not None
    now[0] = 5
    assert await cache.get("a") is None
    for key in "bcde":
        await cache.put(key, sample())
    assert await cache.get("b") is None and await cache.get("e") is not None
    await cache.put("big", sample(b"y" * 9))
    assert await cache.get("c") is None and await cache.get("big") is not None


async def test_a_policy_reload_with_new_tokens_reparses() -> None:
    robots = "User-agent: *\nDisallow: /\n\nUser-agent: NewBot\nAllow: /\n"
    async with origin_server({"/robots.txt": robots}) as site:
        policy = make_policy()
        checks = make_checks(policy)
        try:
            url = site.origin() + "/page"
            assert await checks.robots(request_context(policy, url)) is not None
            crawler = policy.crawler.model_copy(update={"robots_tokens": ["NewBot", TOKEN]})
            checks.use_policy(crawler, static_resolver(), private_guard(), [], Network())
            assert await checks.robots(request_context(policy, url)) is None
        finally:
            await checks.close()
        assert site.hits["/robots.txt"] == 1  # re-parsed from the cache, not re-fetched


async def test_through_an_upstream_proxy_the_guard_still_decides_and_the_proxy_is_named() -> None:
    fetched: list[tuple[str | None, str | None]] = []
    down = UpstreamProxy(name="pool-a", url=f"http://127.0.0.1:{free_port()}")  # nothing there

    def record(fetch: OriginFetch) -> None:
        fetched.append((fetch.error, fetch.upstream_proxy))

    async with origin_server({"/robots.txt": "User-agent: *\nAllow: /\n"}) as site:
        f = fetcher(guard=AddressGuard(), upstream_proxies=[down], on_fetch=record)
        try:
            refused = await f.fetch(site.origin() + "/robots.txt")  # the guard refuses loopback
        finally:
            await f.close()
        f = fetcher(upstream_proxies=[down], on_fetch=record)
        try:
            unreachable = await f.fetch(site.origin() + "/robots.txt")  # the proxy is down
        finally:
            await f.close()
        assert site.hits["/robots.txt"] == 0  # never fetched around the proxy
    assert refused.outcome == "unreachable" and "SSRF guard" in (refused.error or "")
    assert unreachable.outcome == "unreachable" and unreachable.error
    assert [via for _, via in fetched] == ["pool-a", "pool-a"]


async def test_a_policy_reload_moves_the_fetches_to_its_egress_pool() -> None:
    down = UpstreamProxy(name="pool-a", url=f"http://127.0.0.1:{free_port()}")  # nothing there
    async with origin_server({"/robots.txt": "User-agent: *\nAllow: /\n"}) as site:
        policy = make_policy()
        checks = make_checks(policy)
        try:
            checks.use_policy(policy.crawler, static_resolver(), private_guard(), [down], Network())
            # RFC 9309 2.3.1.4: robots.txt unreachable (through the pool): nothing allowed.
            assert await checks.robots(request_context(policy, site.origin() + "/a")) is not None
            checks.use_policy(policy.crawler, static_resolver(), private_guard(), [], Network())
            other = site.origin("site-b.test") + "/a"
            assert await checks.robots(request_context(policy, other)) is None
        finally:
            await checks.close()
        assert site.hits["/robots.txt"] == 1  # the direct fetch only


@contextlib.asynccontextmanager
async def connect_proxy() -> AsyncIterator[tuple[UpstreamProxy, list[str]]]:
    """A minimal HTTP CONNECT proxy on loopback (tunnels only); the targets asked for."""
    targets: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        assert method == "CONNECT", head
        targets.append(target)
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield UpstreamProxy(name="tunnel", url=f"http://127.0.0.1:{port}"), targets
    finally:
        server.close()


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "through-proxy"])
async def test_https_checks_the_sites_name_not_the_address_connected_to(
    test_ca: LocalCA, through_proxy: bool
) -> None:
    # The fetch connects to the address the guard checked (127.0.0.1, through the proxy's tunnel
    # or not) and must still verify the certificate against the site's name. These certificates
    # carry no address: one for the site's name is accepted, one for another name is not.
    body = "User-agent: *\nDisallow: /x\n"
    results = {}
    async with connect_proxy() as (proxy, targets):
        pool = [proxy] if through_proxy else []
        for name in ("site-a.test", "other.test"):
            tls = test_ca.server_context_for(name)
            async with origin_server({"/robots.txt": body}, tls) as site:
                f = fetcher(cafile=str(test_ca.ca_cert), upstream_proxies=pool)
                try:
                    results[name] = await f.fetch(site.origin(scheme="https") + "/robots.txt")
                finally:
                    await f.close()
    right, wrong = results["site-a.test"], results["other.test"]
    assert right.outcome == "ok" and right.body == body.encode(), right.error
    assert wrong.outcome == "unreachable"
    assert "site-a.test" in (wrong.error or "") and "certificate" in (wrong.error or "").lower()
    if through_proxy:  # both went through the tunnel, to the checked address
        assert len(targets) == 2 and all(t.startswith("127.0.0.1:") for t in targets), targets
    else:
        assert targets == []


@pytest.mark.parametrize("given_by", ["start", "reload"])
async def test_the_policys_network_timeouts_bound_the_gateways_own_fetches(given_by: str) -> None:
    # A site that accepts and then says nothing: the fetch gives up after the policy's
    # network.response_timeout, not after the fetch's own 10 s total.
    released = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await released.wait()
        return web.Response(text="too late")

    fetched: list[OriginFetch] = []
    quick = Network(response_timeout="0.3s", connect_timeout="0.3s")
    async with origin_server({"/robots.txt": silent}) as site:
        policy = make_policy()
        if given_by == "start":
            checks = make_checks(policy, network=quick, on_fetch=fetched.append)
        else:
            checks = make_checks(policy, on_fetch=fetched.append)
            checks.use_policy(policy.crawler, static_resolver(), private_guard(), [], quick)
        try:
            started = time.monotonic()
            entry = await checks.robots_entry(site.origin())
            waited = time.monotonic() - started
        finally:
            released.set()
            await checks.close()
    assert entry.file.outcome == "unreachable"  # RFC 9309 2.3.1.4: nothing allowed
    assert entry.rules is DISALLOW_ALL
    assert waited < 5, waited
    [fetch] = fetched
    assert fetch.status is None
    assert fetch.error == "timed out: the site sent nothing for 0.3s (network.response_timeout)"


async def test_a_request_the_gate_refuses_is_not_made_and_nothing_is_cached() -> None:
    asked: list[str] = []
    settled: list[int] = []
    body = b"User-agent: *\nDisallow: /private\n"
    room = False

    async def gate(url: str):  # type: ignore[no-untyped-def]
        asked.append(url)
        if not room:
            raise FetchRefused("no room in the site's budget")
        return settled.append

    routes = {"/robots.txt": web.Response(body=body)}
    async with origin_server(routes) as site:
        f = fetcher(gate=gate)
        try:
            with pytest.raises(FetchRefused):
                await f.get(site.origin(), "/robots.txt")
            assert site.requests == []  # the site was not asked
            room = True
            file = await f.get(site.origin(), "/robots.txt")  # not a cached refusal
        finally:
            await f.close()
    assert file.outcome == "ok" and file.body == body
    assert asked == [site.origin() + "/robots.txt"] * 2
    assert settled == [len(body)]  # the size of what came back, to settle the budget
