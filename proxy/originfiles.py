"""The gateway's own fetches of per-origin files: /robots.txt and /.well-known/tdmrep.json.

- Fetched with aiohttp, with the crawler's User-Agent and From, through the same SSRF guard and
  `network.static_hosts` resolution as scraper traffic (`GuardedResolver`); HTTPS trusts the CA
  file the gateway is given for upstreams (or the system store).
- One fetch per origin and file at a time in a replica, however many requests wait for it
  (single flight); the result is cached in a shared `OriginFileCache` (memory, or Redis so that
  replicas share it) for at most `ttl` (24 h, RFC 9309 2.4; less if Cache-Control max-age says
  so), and failures for `error_ttl` only.
- Redirects are followed up to 5 hops, across origins (RFC 9309 2.3.1.2), each hop guarded:
  the SSRF guard, the gateway's own listeners, and `target_check` (the blocklist and takedowns,
  where the runtime wires them). A hop refused makes the file unreachable.
- At most `limit` bytes of a body are read (RFC 9309 2.5: 500 KiB), its Content-Encoding undone
  by the gateway's own decoder (`proxy.content_coding`), as for the responses it scans: `x-gzip`
  (RFC 9110 8.4.1.3) and stacked codings (`gzip, gzip`) too, which aiohttp left as they came
  (the compressed bytes then read as a file with no rule: everything allowed).
- With `egress.upstream_proxies`, the files are fetched through that pool (one proxy per fetch,
  in turn), as scraper traffic leaves: the site sees the egress the fetch log names. The target
  is resolved and guarded here and the proxy is given the checked address (Host and TLS name
  stay the site's), as the gateway pins scraper requests.
- Every request the gateway makes is reported to `on_fetch` (an `OriginFetch`: what was asked,
  what came back, and the way it left), so that it lands in the fetch log as the gateway's own.
- Every request the gateway makes first passes `gate` (the site's budgets, where the runtime
  wires them): the site sees these requests as it sees the scraper's, and a scraper rotating
  through subdomains, each with its own robots.txt, must not make them a way around the site's
  rate. The gate raises `FetchRefused` when the budget has no room: nothing is fetched, nothing
  cached, and the request that needed the file is refused with the budget's answer.

The outcome is classified as RFC 9309 2.3.1 does, and each file's parser reads it: "ok" (2xx),
"unavailable" (4xx but 429: the file does not exist), "unreachable" (429, 5xx, network errors,
refused addresses, too many redirects).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any
from typing import Literal
from typing import Protocol

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver
from aiohttp.abc import ResolveResult
from yarl import URL

from proxy import metrics
from proxy.content_coding import BodyDecoder
from proxy.content_coding import decodable_only
from proxy.policy import UpstreamProxy
from proxy.sites import normalize_host
from proxy.ssrf import AddressGuard
from proxy.ssrf import OwnListeners
from proxy.ssrf import ResolutionError
from proxy.ssrf import Resolver

log = structlog.get_logger("crawlwarden.originfiles")

type Outcome = Literal["ok", "unavailable", "unreachable"]


@dataclass(frozen=True, slots=True)
class OriginFetch:
    """One request the gateway made for a per-origin file, as the fetch log records it."""

    url: str
    status: int | None  # None: no answer head (refused by the guard, network error)
    body_bytes: int
    sha256: str | None  # of the body read; None without an answer
    error: str | None
    upstream_proxy: str | None  # the pool's proxy it left through
    egress_ip: str | None  # the local address of the connection (to the site or the proxy)
    started: float = 0.0  # wall-clock time the request began
    duration: float = 0.0  # seconds, to the end of the body read
    truncated: bool = False  # the body went on past the read limit: size and hash are of less
    refused: str | None = None  # the gateway's reason for not making it (a redirect hop's target)
    content_type: str | None = None  # the answer's Content-Type, as sent
    retry_after: str | None = None  # the answer's Retry-After, as sent (a 429/503 pauses the site)


@dataclass(frozen=True, slots=True)
class TargetRefusal:
    """Why the gateway does not make one of its own requests: a reason code, and the detail."""

    reason: str
    detail: str


type OnFetch = Callable[[OriginFetch], None]
# Called with the URL of each request the gateway is about to make; returns what to call with
# the response's body size when it is over, or raises FetchRefused.
type FetchGate = Callable[[str], Awaitable[Callable[[int], None]]]
# Called with the URL of each request the gateway is about to make, redirect hops included:
# why the policy forbids it (a blocklist entry, a takedown), or None. A refused hop makes the
# file unreachable, as a refused address does.
type TargetCheck = Callable[[str], TargetRefusal | None]
_PRIVATE_ADDRESS = "private_address"  # the reason of a target the SSRF guard or own ports refuse


class FetchRefused(Exception):
    """The gateway may not make this request now (the site's budget is spent): `refusal` is the
    decision to answer the request that needed the file with."""

    def __init__(self, refusal: Any):
        super().__init__(str(getattr(refusal, "detail", refusal)))
        self.refusal = refusal


DAY = 24 * 3600.0
# The most of a file's body read as sent (compressed), whatever it decodes to: a body that
# decodes to little (gzip members of nothing) ends there, cut short.
_MAX_SENT = 16 * 2**20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@functools.lru_cache(maxsize=4096)
def origin_of(scheme: str, host: str, port: int) -> str:
    """The origin key of a request: scheme, normalized host and explicit port.

    Cached: it is asked three times per request (robots.txt, TDMRep, Crawl-delay) for the few
    origins a crawl is busy with at a time."""
    host = normalize_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme.lower()}://{host}:{port}"


# -- resolution through the SSRF guard -------------------------------------------------------


class TargetRefused(OSError):
    """The SSRF guard refused every address of a name."""


class GuardedResolver(AbstractResolver):
    """aiohttp name resolution by `proxy.ssrf.Resolver` (static hosts, then cached DNS), keeping
    only the addresses `AddressGuard` admits, and never one of the gateway's own listeners (a
    redirect to its admin port would have read /metrics through the robots.txt cache)."""

    def __init__(self, resolver: Resolver, guard: AddressGuard, own: OwnListeners | None = None):
        self.resolver = resolver
        self.guard = guard
        self.own = own if own is not None else OwnListeners()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = normalize_host(host)
        try:
            addresses = await self.resolver.resolve(name)
        except ResolutionError as e:
            raise OSError(str(e)) from e
        results: list[ResolveResult] = []
        refused: list[str] = []
        for ip in addresses:
            verdict = self.guard.check(ip)
            if not verdict.allowed:
                refused.append(f"{ip} ({verdict.denied_class})")
                continue
            if (listener := self.own.listener_at(ip, port)) is not None:
                refused.append(f"{ip}:{port} (this gateway's own {listener})")
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not results:
            raise TargetRefused(
                f"{host} resolves to {', '.join(refused)}, which the SSRF guard refuses"
            )
        return results

    def check_literal(self, host: str, port: int) -> str | None:
        """aiohttp connects to IP literals without asking the resolver: check them here."""
        try:
            ip = ipaddress.ip_address(normalize_host(host))
        except ValueError:
            return None
        verdict = self.guard.check(ip)
        if not verdict.allowed:
            return f"{ip} is a {verdict.denied_class} address, which the SSRF guard refuses"
        if (listener := self.own.listener_at(ip, port)) is not None:
            return f"{ip}:{port} is this gateway's own {listener}, never a site"
        return None

    async def close(self) -> None:
        return None


# -- what is fetched and cached --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginFile:
    """One fetched file as cached: the outcome, the (possibly truncated) body, when it expires."""

    url: str
    outcome: Outcome
    status: int | None
    body: bytes
    fetched_at: float
    expires_at: float
    error: str | None = None
    truncated: bool = False
    final_url: str | None = None

    @property
    def same_origin(self) -> bool:
        """The body came from the origin it was asked of (no redirect led to another)."""
        if self.final_url is None or self.final_url == self.url:
            return True
        asked, final = URL(self.url), URL(self.final_url)
        return (asked.scheme, asked.host, asked.port) == (final.scheme, final.host, final.port)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["body"] = base64.b64encode(self.body).decode("ascii")
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> OriginFile:
        data = json.loads(raw)
        data["body"] = base64.b64decode(data["body"])
        return cls(**data)


class OriginFileCache(Protocol):
    """Where fetched origin files are kept until they expire; shared by replicas if remote."""

    async def get(self, key: str) -> OriginFile | None: ...

    async def put(self, key: str, file: OriginFile) -> None: ...

    async def close(self) -> None: ...


class CacheUnavailable(Exception):
    pass


class MemoryCache:
    """An in-process cache, bounded in entries and body bytes (least recently used out)."""

    def __init__(
        self,
        max_entries: int = 20_000,
        max_bytes: int = 256 * 2**20,
        clock: Callable[[], float] = time.time,
    ):
        self._items: OrderedDict[str, OriginFile] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock

    async def get(self, key: str) -> OriginFile | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at <= self._clock():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return item

    async def put(self, key: str, file: OriginFile) -> None:
        self._remove(key)
        self._items[key] = file
        self._bytes += len(file.body)
        while self._items and (
            len(self._items) > self._max_entries or self._bytes > self._max_bytes
        ):
            self._remove(next(iter(self._items)))

    def _remove(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body)

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0


class RedisCache:
    """Origin files in Redis, so that every replica reads the one fetch; keys expire with the
    file (PEXPIREAT), so nothing outlives its 24 hours.

    After a failure the cache is not asked for `pause` seconds: a Redis that hangs (rather than
    refusing connections) would otherwise cost each request for a new origin its client timeout
    twice per file, a get and a put."""

    def __init__(
        self,
        client: object,
        prefix: str = "crawlwarden:originfile:",
        *,
        pause: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._client = client  # a redis.asyncio.Redis (or Cluster) client
        self._prefix = prefix
        self._pause = pause
        self._clock = clock
        self._down_until = 0.0
        self._down_reason = ""

    def _check_up(self) -> None:
        if self._clock() < self._down_until:
            raise CacheUnavailable(f"not asked again yet after: {self._down_reason}")

    def _went_down(self, e: Exception) -> CacheUnavailable:
        self._down_until = self._clock() + self._pause
        self._down_reason = str(e) or type(e).__name__
        return CacheUnavailable(self._down_reason)

    async def get(self, key: str) -> OriginFile | None:
        self._check_up()
        started = time.perf_counter()
        try:
            raw = await self._client.get(self._prefix + key)  # type: ignore[attr-defined]
        except Exception as e:  # any client error: the cache is down
            raise self._went_down(e) from e
        finally:
            metrics.observe_redis("originfile_get", started)
        if raw is None:
            return None
        try:
            return OriginFile.from_bytes(raw)
        except (ValueError, TypeError, KeyError):
            return None

    async def put(self, key: str, file: OriginFile) -> None:
        self._check_up()
        started = time.perf_counter()
        try:
            await self._client.set(  # type: ignore[attr-defined]
                self._prefix + key, file.to_bytes(), pxat=int(file.expires_at * 1000)
            )
        except Exception as e:
            raise self._went_down(e) from e
        finally:
            metrics.observe_redis("originfile_put", started)

    async def close(self) -> None:
        return None  # the client belongs to the caller


# -- the fetcher -----------------------------------------------------------------------------


class OriginFileFetcher:
    def __init__(
        self,
        resolver: GuardedResolver,
        *,
        user_agent: str,
        contact: str | None = None,
        cache: OriginFileCache | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        on_fetch: OnFetch | None = None,
        gate: FetchGate | None = None,
        target_check: TargetCheck | None = None,
        timeout: float = 10.0,
        max_redirects: int = 5,
        limit: int = 500 * 1024,
        ttl: float = DAY,
        error_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
        upstream_proxies: Sequence[UpstreamProxy] = (),
    ):
        self.resolver = resolver
        self.upstream_proxies = list(upstream_proxies)
        self._proxy_turn = 0
        self.user_agent = user_agent
        self.contact = contact
        self.cache: OriginFileCache = cache if cache is not None else MemoryCache(clock=clock)
        if ssl_context is None:
            ssl_context = ssl.create_default_context(cafile=cafile)
        self._ssl = ssl_context
        self._on_fetch = on_fetch
        self.gate = gate
        self.target_check = target_check
        self._total_timeout = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_redirects = max_redirects
        self._limit = limit
        self._ttl = min(ttl, DAY)
        self._error_ttl = error_ttl
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._proxied_session: aiohttp.ClientSession | None = None
        # A reload came: the direct session's kept connections are not reused (renew_connections).
        self._renew = False
        self._retiring: set[asyncio.Task[None]] = set()
        self._flights: dict[str, asyncio.Task[OriginFile]] = {}

    def use_timeouts(self, *, connect: float, read: float) -> None:
        """The policy's `network.connect_timeout` and `network.response_timeout` for these
        fetches too, each within the fetch's own total (a request that needs the file waits
        for it: never longer than the total, whatever the policy allows a site)."""
        total = self._total_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=total, sock_connect=min(connect, total), sock_read=min(read, total)
        )

    def _timeout_message(self, e: TimeoutError) -> str:
        """Which limit a timed-out fetch ran into, named as the policy names it."""
        t = self._timeout
        if isinstance(e, aiohttp.ConnectionTimeoutError) and t.sock_connect is not None:
            return f"timed out: no connection within {t.sock_connect:g}s (network.connect_timeout)"
        if isinstance(e, aiohttp.SocketTimeoutError) and t.sock_read is not None:
            return (
                f"timed out: the site sent nothing for {t.sock_read:g}s (network.response_timeout)"
            )
        return f"timed out: not complete within {t.total:g}s"

    async def get(self, origin: str, path: str) -> OriginFile:
        """The file at `path` on `origin`, from the cache or fetched once for all waiters."""
        key = f"{origin}{path}"
        task = self._flights.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, origin + path, metrics.origin_file(path)))
            self._flights[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        else:
            metrics.ORIGIN_FILE_CACHE.labels(
                file=metrics.origin_file(path), result="coalesced"
            ).inc()
        # A waiter that gives up (cancelled) must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    def _forget(self, key: str, task: asyncio.Task[OriginFile]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]

    async def _load(self, key: str, url: str, file_label: str = "other") -> OriginFile:
        try:
            cached = await self.cache.get(key)
        except CacheUnavailable as e:
            metrics.STORE_ERRORS.labels(store="originfiles").inc()
            log.warning("origin file cache unavailable", error=str(e))
            cached = None
        if cached is not None and cached.expires_at > self._clock():
            metrics.ORIGIN_FILE_CACHE.labels(file=file_label, result="hit").inc()
            return cached
        metrics.ORIGIN_FILE_CACHE.labels(file=file_label, result="miss").inc()
        file = await self.fetch(url)
        try:
            await self.cache.put(key, file)
        except CacheUnavailable as e:
            metrics.STORE_ERRORS.labels(store="originfiles").inc()
            log.warning("origin file cache unavailable", error=str(e))
        return file

    async def fetch(self, url: str) -> OriginFile:
        """Fetch now, uncached, following redirects; raises only FetchRefused (the gate)."""
        started = self._clock()
        current = URL(url)
        for _hop in range(self._max_redirects + 1):
            result = await self._request(current)
            if isinstance(result, str):
                return self._file(url, "unreachable", None, started, error=result, final=current)
            status, headers, body, truncated = result
            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    return self._file(
                        url, "unreachable", status, started, "redirect without Location", current
                    )
                nxt = current.join(URL(location))
                if nxt.scheme not in ("http", "https") or not nxt.host:
                    return self._file(
                        url, "unreachable", status, started, f"redirect to {location}", current
                    )
                current = nxt
                continue
            if 200 <= status < 300:
                return self._file(
                    url,
                    "ok",
                    status,
                    started,
                    None,
                    current,
                    body=body,
                    truncated=truncated,
                    ttl=_max_age(headers.get("cache-control")),
                )
            if 400 <= status < 500 and status != 429:
                return self._file(url, "unavailable", status, started, None, current, ttl=self._ttl)
            # 429 and 5xx: the server could not answer (RFC 9309 2.3.1.4; 429 as Google does).
            return self._file(url, "unreachable", status, started, f"status {status}", current)
        return self._file(
            url,
            "unreachable",
            None,
            started,
            f"more than {self._max_redirects} redirects",
            current,
        )

    def _file(
        self,
        url: str,
        outcome: Outcome,
        status: int | None,
        started: float,
        error: str | None,
        final: URL,
        *,
        body: bytes = b"",
        truncated: bool = False,
        ttl: float | None = None,
    ) -> OriginFile:
        if outcome == "unreachable":
            lifetime = self._error_ttl
        else:
            lifetime = self._ttl if ttl is None else max(60.0, min(ttl, self._ttl))
        return OriginFile(
            url=url,
            outcome=outcome,
            status=status,
            body=body,
            fetched_at=started,
            expires_at=started + lifetime,
            error=error,
            truncated=truncated,
            final_url=str(final),
        )

    async def _request(self, url: URL) -> tuple[int, dict[str, str], bytes, bool] | str:
        """One GET: (status, headers, body, truncated), or an error message."""
        began = (time.time(), time.monotonic())
        refused = self._refusal(url)
        if refused is not None:
            self._report(str(url), None, b"", refused.detail, None, None, began, refused=refused)
            return refused.detail
        headers = {
            "User-Agent": self.user_agent,
            "Accept": "*/*",
            "Accept-Encoding": decodable_only("gzip, deflate, br, zstd"),
        }
        if self.contact:
            headers["From"] = self.contact
        target = url
        tls_name: str | None = None
        egress_ip: str | None = None
        release = await self.gate(str(url)) if self.gate is not None else None
        # After the wait for the budget, under the policy in force then (a reload meanwhile
        # retires the session, may change the pool; a takedown may come): reviews.
        if self.gate is not None and (refused := self._refusal(url)) is not None:
            if release is not None:
                release(0)
            self._report(str(url), None, b"", refused.detail, None, None, began, refused=refused)
            return refused.detail
        proxy = self._next_proxy()
        via = proxy.name if proxy is not None else None
        session = self._client()
        began = (time.time(), time.monotonic())  # (after a wait for the budget, if any)
        body = b""
        status: int | None = None
        head: dict[str, str] = {}
        try:
            if proxy is not None:
                # The proxy connects where it is told: tell it the address the guard admitted.
                host = url.raw_host or ""
                (first, *_) = await self.resolver.resolve(host, url.port or 0)
                target = url.with_host(first["host"])
                name = f"[{host}]" if ":" in host else host  # an IPv6 literal
                headers["Host"] = name if url.is_default_port() else f"{name}:{url.port}"
                if url.scheme == "https":
                    tls_name = host
                session = self._proxied_client()
            async with session.get(
                target,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                proxy=proxy.url if proxy is not None else None,
                server_hostname=tls_name,
            ) as resp:
                egress_ip = _local_address(resp)
                status = resp.status
                head = {k.lower(): v for k, v in resp.headers.items()}
                if "retry-after" in head:  # sent twice: the longest wait (parse_retry_after)
                    head["retry-after"] = ", ".join(resp.headers.getall("Retry-After"))
                # Every answer's body, an error page's too: the fetch record's size and hash
                # are of it as decoded, its Content-Encoding undone (only a 2xx body is parsed).
                body, truncated = await self._read(resp, head.get("content-encoding", ""))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            message = self._timeout_message(e) if isinstance(e, TimeoutError) else _error_message(e)
            guarded = _guard_refusal(e)
            refusal = None if guarded is None else TargetRefusal(_PRIVATE_ADDRESS, guarded)
            # A head that came before the break is the site's answer all the same: its status
            # (a 429/503 pauses the site) and Retry-After are on the record.
            self._report(
                str(url),
                status,
                b"",
                message,
                via,
                egress_ip,
                began,
                refused=refusal,
                content_type=head.get("content-type"),
                retry_after=head.get("retry-after"),
            )
            return message
        finally:
            if release is not None:
                release(len(body))
        self._report(
            str(url),
            status,
            body,
            None,
            via,
            egress_ip,
            began,
            truncated,
            content_type=head.get("content-type"),
            retry_after=head.get("retry-after"),
        )
        return status, head, body, truncated

    def _refusal(self, url: URL) -> TargetRefusal | None:
        """Why the gateway may not ask for `url` (an address the guard refuses, a blocklisted
        or taken-down URL), or None."""
        literal = self.resolver.check_literal(url.host or "", url.port or 0)
        if literal is not None:
            return TargetRefusal(_PRIVATE_ADDRESS, literal)
        return self.target_check(str(url)) if self.target_check is not None else None

    def _next_proxy(self) -> UpstreamProxy | None:
        pool = self.upstream_proxies
        if not pool:
            return None
        self._proxy_turn += 1
        return pool[self._proxy_turn % len(pool)]

    async def _read(self, resp: aiohttp.ClientResponse, coding: str) -> tuple[bytes, bool]:
        """The body decoded (its Content-Encoding undone), `limit` bytes of it at most, and
        whether it went on past that. A body not valid in its coding is a ClientPayloadError,
        as aiohttp's own decoding raised (the file is then unreachable)."""
        decoder = BodyDecoder.of(coding, self._limit + 1)
        chunks: list[bytes] = []
        size = sent = 0
        cut = False
        while size <= self._limit:
            if sent >= _MAX_SENT:
                # Read to the cap: cut short only if the file goes on past it.
                cut = bool(await resp.content.read(1))
                break
            data = await resp.content.read(min(65536, _MAX_SENT - sent))
            sent += len(data)
            try:
                for piece in decoder.pieces(data):
                    chunks.append(piece)
                    size += len(piece)
            except ValueError as e:
                raise aiohttp.ClientPayloadError(str(e)) from e
            if not data:
                break
        body = b"".join(chunks)
        return body[: self._limit], len(body) > self._limit or cut

    def _report(
        self,
        url: str,
        status: int | None,
        body: bytes,
        error: str | None,
        via: str | None,
        egress_ip: str | None,
        began: tuple[float, float],
        truncated: bool = False,
        *,
        refused: TargetRefusal | None = None,
        content_type: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """`began`: the request's start, wall clock and monotonic. `refused`: it was not made."""
        if self._on_fetch is None:
            return
        # No hash of a body broken off (its bytes are not kept): the record has the error.
        digest = hashlib.sha256(body).hexdigest() if status is not None and error is None else None
        duration = max(0.0, time.monotonic() - began[1])
        fetch = OriginFetch(
            url,
            status,
            len(body),
            digest,
            error,
            via,
            egress_ip,
            began[0],
            duration,
            truncated,
            None if refused is None else refused.reason,
            content_type,
            retry_after,
        )
        try:
            self._on_fetch(fetch)
        except Exception:  # a broken recorder must not break the check
            log.exception("on_fetch callback failed", url=url)

    def renew_connections(self) -> None:
        """A reload: fetches from now on open new connections. aiohttp keeps a site's by its
        host name; one kept across a reload that moved the host (`network.static_hosts`) or
        took its address out of `network.allow_private` would still be read from."""
        self._renew = True

    def _client(self) -> aiohttp.ClientSession:
        if self._renew:
            self._renew = False
            if self._session is not None and not self._session.closed:
                # Closed once the fetches under way on it are over (each within its total).
                retiring = asyncio.get_running_loop().create_task(
                    _close_after(self._session, self._total_timeout + 1.0)
                )
                self._retiring.add(retiring)
                retiring.add_done_callback(self._retiring.discard)
            self._session = None
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=self.resolver, use_dns_cache=False, ssl=self._ssl, limit=64
            )
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False
            )
        return self._session

    def _proxied_client(self) -> aiohttp.ClientSession:
        """For fetches through an upstream proxy: the proxy's own address (the operator's, often
        private) is not the SSRF guard's business; the target was guarded in `_request`."""
        if self._proxied_session is None or self._proxied_session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64)
            self._proxied_session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False
            )
        return self._proxied_session

    async def close(self) -> None:
        for task in list(self._flights.values()):
            task.cancel()
        self._flights.clear()
        for retiring in list(self._retiring):
            retiring.cancel()  # (closes its session)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for session in (self._session, self._proxied_session):
            if session is not None:
                await session.close()
        self._session = self._proxied_session = None


async def _close_after(session: aiohttp.ClientSession, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        await session.close()


def _local_address(resp: aiohttp.ClientResponse) -> str | None:
    """The local address of the connection an answer came on (to the site, or to the proxy).

    aiohttp hands the connection back to its pool as soon as an answer's body is complete (an
    empty one: before the caller sees the response), so `resp.connection` can be None already;
    the protocol it came on (`_protocol`, not public) still knows its transport then. None when
    neither says."""
    connection = resp.connection
    protocol = connection.protocol if connection is not None else getattr(resp, "_protocol", None)
    transport = getattr(protocol, "transport", None)
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return str(sockname[0]) if sockname else None


def _max_age(cache_control: str | None) -> float | None:
    if not cache_control:
        return None
    m = re.search(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", cache_control, re.IGNORECASE)
    return float(m.group(1)) if m else None


def _guard_refusal(e: BaseException) -> str | None:
    """The SSRF guard's (or own-ports') refusal inside a connection error, if it was one."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, TargetRefused):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _error_message(e: BaseException) -> str:
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, TargetRefused):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {e}"
