"""Opt-out checks wired for the governor and the addon, free of mitmproxy.

Before fetching (`Governor.prefetch_checks`): `robots` (RFC 9309 plus aipref Content-Usage rules)
and `tdmrep` (the origin's /.well-known/tdmrep.json). After the response headers and a bounded
head of the body: `assess_response` (TDMRep header and meta, noai/noimageai, Content-Usage header,
image XMP and C2PA, an EPUB's package document). Each appends or returns every signal seen, and
refuses only when the site's legal basis and `respect` flags make the signal bind
(`proxy.optout.decide`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy import aipref
from proxy import epub
from proxy import imagemeta
from proxy import optout
from proxy import tdmrep
from proxy import units
from proxy.content_coding import BodyDecoder
from proxy.decision import Decision
from proxy.governor import RequestContext
from proxy.optout import Kind
from proxy.optout import OptOutSignal
from proxy.originfiles import DAY
from proxy.originfiles import FetchGate
from proxy.originfiles import FetchRefused
from proxy.originfiles import GuardedResolver
from proxy.originfiles import OnFetch
from proxy.originfiles import OriginFile
from proxy.originfiles import OriginFileCache
from proxy.originfiles import OriginFileFetcher
from proxy.originfiles import TargetCheck
from proxy.originfiles import origin_of
from proxy.policy import Crawler
from proxy.policy import Network
from proxy.policy import UpstreamProxy
from proxy.robots import ALLOW_ALL
from proxy.robots import DISALLOW_ALL
from proxy.robots import PARSE_LIMIT
from proxy.robots import RobotsRules
from proxy.robots import RobotsVerdict
from proxy.robots import parse_robots
from proxy.ssrf import AddressGuard
from proxy.ssrf import OwnListeners
from proxy.ssrf import Resolver

ROBOTS_PATH = "/robots.txt"
# The protocol files themselves are never content: no opt-out refuses them.
_PROTOCOL_PATHS = frozenset({ROBOTS_PATH, tdmrep.WELL_KNOWN_PATH})

# Served to a scraper asking for /robots.txt when the gateway could not read it: the gateway
# treats the origin as disallowed, and says so in the scraper's own terms.
UNREACHABLE_ROBOTS = (
    b"# crawlwarden: this origin's robots.txt could not be fetched (server error or unreachable).\n"
    b"# RFC 9309 2.3.1.4: the crawler assumes complete disallow until it can be fetched.\n"
    b"User-agent: *\nDisallow: /\n"
)


# What one parsed TDMRep rule takes in memory, at most (measured 400-830 bytes by its shape):
# what the parsed files' bound counts beside their bodies. A robots.txt's parsed rules count
# what they hold (RobotsRules.held_bytes: one line may be read as four patterns, and each of
# its characters quoted as three).
BYTES_PER_RULE = 1024
# Files this large are parsed, and rule sets this large matched, on a worker thread: 24 000
# rules took 0.36 s to parse and up to 80 ms a request to match, on the event loop, which held
# every other request (and the Redis replies they waited for: the replica answered 503
# store_unavailable) as long. robots.txt: a match estimated to take longer than
# MATCH_OFF_LOOP_NS goes to a worker thread (RobotsRules.work: the rules found by index cost
# little, those tried one by one their number and their length times the path's).
PARSE_OFF_LOOP = 32 * 1024
MATCH_OFF_LOOP = 1_000
MATCH_OFF_LOOP_NS = 1_000_000


@dataclass(frozen=True, slots=True)
class RobotsEntry:
    file: OriginFile
    rules: RobotsRules

    @property
    def weight(self) -> int:
        return len(self.file.body) + self.rules.held_bytes

    def served(self) -> tuple[int, bytes] | None:
        """What a scraper's own request for /robots.txt is answered with; None: it is not
        answered from here. A file reached through a redirect to another origin is the rules of
        this one (RFC 9309 2.3.1.2), but its body is that other origin's content: served as
        this origin's robots.txt it would hand a scraper, unchecked and unbudgeted, whatever a
        redirect points at. The scraper's request goes to the site then, and the redirect it
        gets is followed through the gateway, checked like any request."""
        if not self.file.same_origin:
            return None
        if self.file.outcome == "ok":
            return 200, self.file.body
        if self.file.outcome == "unavailable":
            return self.file.status or 404, b""
        return 200, UNREACHABLE_ROBOTS


@dataclass(frozen=True, slots=True)
class TdmEntry:
    file: OriginFile
    rules: tdmrep.TdmRules

    @property
    def weight(self) -> int:
        return len(self.file.body) + BYTES_PER_RULE * self.rules.size


class OriginEntries[T: (RobotsEntry, TdmEntry)]:
    """Parsed origin files by origin, in the order they came; the oldest go past `max_entries`
    or past `max_bytes` of file bodies and parsed rules (BYTES_PER_RULE each). A broad crawl
    meets many origins, and a robots.txt may be 500 KiB, parsed 15 MiB: without the byte
    bound, this replica's memory grew with every origin until the entry bound (50 000 of
    them). One dropped is read again from the shared cache when needed."""

    def __init__(self, max_entries: int = 50_000, max_bytes: int = 128 * 2**20):
        self._items: dict[str, T] = {}
        self.bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def get(self, origin: str) -> T | None:
        return self._items.get(origin)

    def put(self, origin: str, entry: T) -> None:
        old = self._items.pop(origin, None)
        if old is not None:
            self.bytes -= old.weight
        self._items[origin] = entry
        self.bytes += entry.weight
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self.bytes -= self._items.pop(oldest).weight

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class Assessment:
    """The verdict on one response: `decision` is a refusal (withhold) or None; `signals` are the
    names of every signal seen in it, binding or not."""

    decision: Decision | None
    signals: tuple[str, ...]


class BodyScan:
    """The bounded, incremental read of a response body that `assess_response` needs.

    Feed decoded body chunks as they arrive and buffer them yourself; `feed()` returns True
    once nothing more is needed: an HTML head was read, an image's metadata or an EPUB's
    package document was found, or the body is of a kind that carries no embedded opt-out.
    Call `finish()` at the end of the body.
    """

    def __init__(self, content_type: str | None, tokens: list[str]):
        self._html = (
            optout.HtmlHeadScanner(tokens, content_type=content_type)
            if optout.is_html(content_type)
            else None
        )
        self._image: imagemeta.ImageMetadataScanner | None = None
        self._epub: epub.EpubScanner | None = None
        self._content_type = content_type
        self._tokens = tokens
        # An image (by its Content-Type) in a format whose metadata is not read (BMP, ICO...).
        self.image_unread = False
        self._head = b""
        self.done = False
        self.undecodable: str | None = None  # why the body could not be read, if it could not
        self.fed = False  # whether any of the body has been read
        self.partial: str | None = None  # why only a part of the body was there to read

    def feed(self, chunk: bytes) -> bool:
        if chunk:
            self.fed = True
        if self.done:
            return True
        if self._html is not None:
            if self._html.seen == 0:
                # An image sent as text/html is read as the image it is: its signature decides,
                # however few bytes the first chunk holds (a page's "<" decides at once).
                self._head += chunk
                fmt = imagemeta.sniff(self._head[:12])
                if fmt is None:
                    return False
                chunk, self._head = self._head, b""
                if fmt is not imagemeta.ImageFormat.OTHER:
                    self._html = None
            if self._html is not None:
                self.done = self._html.feed(chunk)
                return self.done
        if self._epub is not None:
            self.done = self._epub.feed(chunk)
            return self.done
        if self._image is None:
            # The bytes decide, not the Content-Type: octet-stream images are common.
            self._head += chunk
            if epub.maybe_epub(self._head[:4]):
                found = epub.is_epub(self._head[: epub.SNIFF_BYTES], self._content_type)
                if found is None:
                    return False
                self.done = not found  # another kind of ZIP file: nothing read in it
                if found:
                    self._epub = epub.EpubScanner()
                    self.done = self._epub.feed(self._head)
                    self._head = b""
                return self.done
            fmt = imagemeta.sniff(self._head[:12])
            if fmt is None:
                return False
            if fmt is imagemeta.ImageFormat.OTHER and not optout.mime_type(self._content_type):
                # No Content-Type: a browser sniffs it, and a page may be read as one.
                html = optout.sniffs_as_html(self._head)
                if html is None:
                    return False
                if html:
                    self._html = optout.HtmlHeadScanner(
                        self._tokens, content_type=self._content_type
                    )
                    self.done = self._html.feed(self._head)
                    self._head = b""
                    return self.done
            svg = False
            if fmt is imagemeta.ImageFormat.OTHER and optout.is_svg(self._content_type):
                text = self._head.removeprefix(b"\xef\xbb\xbf").lstrip()
                if not text and len(self._head) < 4096:
                    return False  # white space so far
                # As text (UTF-8 or ASCII): one gzipped (.svgz) or in UTF-16 is not read.
                svg = text[:1] == b"<"
            if fmt is imagemeta.ImageFormat.OTHER and not svg:
                self.image_unread = optout.is_image(self._content_type)
                self.done = True
                return True
            self._image = imagemeta.ImageMetadataScanner(svg=svg)
            chunk, self._head = self._head, b""
        self.done = self._image.feed(chunk)
        return self.done

    def read(self, body: bytes, decoder: BodyDecoder) -> bool:
        """`feed` the body's bytes as sent, decoded a piece at a time: no further than the
        scan needs (a page's head, an image's metadata). ValueError: not in its encoding."""
        for piece in decoder.pieces(body):
            if self.feed(piece):
                return True
        return self.done

    def read_as_sent(self, why: str) -> None:
        """The body's Content-Encoding names a coding the gateway does not know: it is read as
        sent (as a browser renders it), and the record says so (`body:undecodable`)."""
        self.undecodable = why

    def cannot_decode(self, why: str) -> None:
        """The body is in an encoding the gateway does not decode, or not valid in it: what it
        carries went unread, and the record says so (`body:undecodable`, never binding)."""
        self.undecodable = why
        self.finish()

    def finish(self) -> None:
        if self._html is not None and self._head:
            self._html.feed(self._head)  # a body too short to tell an image by
            self._head = b""
        if self._image is not None:
            self._image.finish()
        if self._epub is not None:
            self._epub.finish()
        self.done = True

    @property
    def html_head(self) -> optout.HtmlHead | None:
        return self._html.result() if self._html is not None else None

    @property
    def image(self) -> imagemeta.ImageMetadata | None:
        if self._image is None:
            return None
        return self._image.finish()

    @property
    def epub_package(self) -> epub.EpubPackage | None:
        return self._epub.finish() if self._epub is not None else None


class OptOutChecks:
    """Per-replica state of the opt-out checks: the origin-file fetcher and parsed files."""

    def __init__(
        self,
        crawler: Crawler,
        resolver: Resolver,
        guard: AddressGuard,
        *,
        cache: OriginFileCache | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        on_fetch: OnFetch | None = None,
        gate: FetchGate | None = None,
        target_check: TargetCheck | None = None,
        own_listeners: OwnListeners | None = None,
        timeout: float = 10.0,
        ttl: float = DAY,
        error_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
        upstream_proxies: Sequence[UpstreamProxy] = (),
        network: Network | None = None,
    ):
        self.crawler = crawler
        self._resolver = GuardedResolver(resolver, guard, own_listeners)
        self.fetcher = OriginFileFetcher(
            self._resolver,
            user_agent=crawler.user_agent,
            contact=crawler.contact,
            cache=cache,
            ssl_context=ssl_context,
            cafile=cafile,
            on_fetch=on_fetch,
            gate=gate,
            target_check=target_check,
            timeout=timeout,
            limit=PARSE_LIMIT,
            ttl=ttl,
            error_ttl=error_ttl,
            clock=clock,
            upstream_proxies=upstream_proxies,
        )
        if network is not None:
            self._use_network(network)
        self._clock = clock
        self._robots = OriginEntries[RobotsEntry]()
        self._tdm = OriginEntries[TdmEntry]()
        # Large files being parsed on a worker thread, by (kind, origin): the file and its parse.
        self._parsing: dict[tuple[str, str], tuple[OriginFile, asyncio.Future[Any]]] = {}

    @property
    def tokens(self) -> list[str]:
        return list(self.crawler.robots_tokens)

    def use_policy(
        self,
        crawler: Crawler,
        resolver: Resolver,
        guard: AddressGuard,
        upstream_proxies: Sequence[UpstreamProxy],
        network: Network,
    ) -> None:
        """A reloaded policy: new tokens re-parse robots.txt, new network rules guard fetches,
        the egress pool they leave through and their timeouts follow the policy's."""
        if list(crawler.robots_tokens) != list(self.crawler.robots_tokens):
            self._robots.clear()
        self.crawler = crawler
        self.fetcher.user_agent = crawler.user_agent
        self.fetcher.contact = crawler.contact
        self._resolver.resolver = resolver
        self._resolver.guard = guard
        self.fetcher.renew_connections()  # none kept under the old network rules
        self.fetcher.upstream_proxies = list(upstream_proxies)
        self._use_network(network)

    def _use_network(self, network: Network) -> None:
        self.fetcher.use_timeouts(
            connect=units.parse_duration(network.connect_timeout),
            read=units.parse_duration(network.response_timeout),
        )

    # -- per-origin files --------------------------------------------------------------------

    async def _fetch(self, origin: str, path: str, ctx: RequestContext | None) -> OriginFile:
        """The file, from the shared cache or the site; the time the request waited for it is
        its `waited` (the site's time, not the gateway's decision)."""
        started = time.perf_counter()
        try:
            return await self.fetcher.get(origin, path)
        finally:
            if ctx is not None:
                ctx.waited += time.perf_counter() - started

    async def robots_entry(self, origin: str, ctx: RequestContext | None = None) -> RobotsEntry:
        entry = self._robots.get(origin)
        if entry is not None and entry.file.expires_at > self._clock():
            return entry
        file = await self._fetch(origin, ROBOTS_PATH, ctx)
        entry = self._robots.get(origin)
        if entry is None or entry.file is not file:
            if file.outcome == "ok":
                tokens = self.tokens
                rules = await self._parsed(
                    "robots " + " ".join(tokens), origin, file, parse_robots, file.body, tokens
                )
                if self.tokens != tokens:
                    # A reload changed the crawler's tokens while it was parsed (on a worker
                    # thread): those rules are another crawler's (review).
                    return await self.robots_entry(origin, ctx)
                entry = self._robots.get(origin)  # (another request's, parsed meanwhile)
                if entry is not None and entry.file is file:
                    return entry
            elif file.outcome == "unavailable":
                rules = ALLOW_ALL  # RFC 9309 2.3.1.3
            else:
                rules = DISALLOW_ALL  # RFC 9309 2.3.1.4
            entry = RobotsEntry(file, rules)
            self._robots.put(origin, entry)
        return entry

    async def _parsed(
        self, kind: str, origin: str, file: OriginFile, parse: Callable[..., Any], *args: Any
    ) -> Any:
        """`parse(*args)`, the rules of `file`: a small file's on the event loop, a large one's
        on a worker thread, once for all the requests that waited for the file (each of them
        would otherwise parse it again meanwhile: 0.36 s of CPU each for a 500 KiB one)."""
        if len(file.body) <= PARSE_OFF_LOOP:
            return parse(*args)
        key = (kind, origin)
        running = self._parsing.get(key)
        if running is None or running[0] is not file:
            future = asyncio.ensure_future(asyncio.to_thread(parse, *args))
            running = self._parsing[key] = (file, future)

            def done(f: asyncio.Future[Any]) -> None:
                if self._parsing.get(key, (None, None))[1] is f:
                    del self._parsing[key]

            future.add_done_callback(done)
        # (shielded: a request that goes away does not cancel the parse the others wait for)
        return await asyncio.shield(running[1])

    async def tdm_entry(self, origin: str, ctx: RequestContext | None = None) -> TdmEntry:
        entry = self._tdm.get(origin)
        if entry is not None and entry.file.expires_at > self._clock():
            return entry
        file = await self._fetch(origin, tdmrep.WELL_KNOWN_PATH, ctx)
        entry = self._tdm.get(origin)
        if entry is None or entry.file is not file:
            # Anything but a successful response means the origin does not use the protocol.
            rules = tdmrep.NO_RULES
            if file.outcome == "ok":
                rules = await self._parsed(
                    "tdmrep", origin, file, _parse_tdmrep, file.body, file.truncated
                )
                entry = self._tdm.get(origin)  # (another request's, parsed meanwhile)
                if entry is not None and entry.file is file:
                    return entry
            entry = TdmEntry(file, rules)
            self._tdm.put(origin, entry)
        return entry

    def cached_robots(self, origin: str) -> tuple[int, bytes] | None:
        """The answer to a scraper's own GET /robots.txt, if this replica has the file."""
        entry = self._robots.get(origin)
        if entry is None or entry.file.expires_at <= self._clock():
            return None
        return entry.served()

    def crawl_delay(self, origin: str) -> float | None:
        """robots.txt Crawl-delay (seconds) for our tokens, if the file is loaded and has one."""
        entry = self._robots.get(origin)
        return entry.rules.crawl_delay if entry is not None else None

    # -- prefetch checks (Governor.prefetch_checks) -----------------------------------------

    async def robots(self, ctx: RequestContext) -> Decision | None:
        if not (ctx.respect.robots or ctx.respect.content_usage):
            return None  # nothing in robots.txt binds this site: do not even ask for it
        origin = origin_of(ctx.scheme, ctx.host, ctx.port)
        try:
            entry = await self.robots_entry(origin, ctx)
        except FetchRefused as e:
            return _must_read_first(origin, ROBOTS_PATH, e.refusal)
        if _path_only(ctx.path) in _PROTOCOL_PATHS:
            return None
        signals: list[OptOutSignal] = []
        if entry.file.outcome == "unreachable":
            signals.append(
                OptOutSignal(
                    Kind.ROBOTS,
                    "robots:unreachable",
                    True,
                    f"{origin}/robots.txt could not be fetched ({entry.file.error}); "
                    "RFC 9309 2.3.1.4: complete disallow",
                )
            )
        else:
            verdict, usages = await _off_loop_if(
                entry.rules.work(ctx.path, ctx.readings) > MATCH_OFF_LOOP_NS,
                _robots_verdict,
                entry.rules,
                ctx.path,
                ctx.readings,
            )
            if not verdict.allowed:
                signals.append(
                    OptOutSignal(
                        Kind.ROBOTS,
                        "robots:disallow",
                        True,
                        f"{origin}/robots.txt disallows this path for user-agent "
                        f"{verdict.group or '*'}",
                    )
                )
            else:
                signals += optout.usage_signals(aipref.combine(usages), "robots:content-usage")
        decision = self._conclude(ctx, signals)
        if decision is not None and entry.file.outcome == "unreachable":
            # Not the site's opt-out but a robots.txt it could not serve (RFC 9309 2.3.1.4):
            # the scraper may ask again once the gateway reads it again, not drop the URL.
            left = entry.file.expires_at - self._clock()
            decision = dataclasses.replace(decision, retry_after=max(1.0, left))
        return decision

    async def tdmrep(self, ctx: RequestContext) -> Decision | None:
        if not optout.applies(Kind.TDMREP, ctx.basis, ctx.respect):
            return None  # no reservation binds this site (a licence): do not even ask for it
        if _path_only(ctx.path) in _PROTOCOL_PATHS:
            return None
        origin = origin_of(ctx.scheme, ctx.host, ctx.port)
        try:
            entry = await self.tdm_entry(origin, ctx)
        except FetchRefused as e:
            return _must_read_first(origin, tdmrep.WELL_KNOWN_PATH, e.refusal)
        rules = entry.rules
        declaration, unmatched = await _off_loop_if(
            rules.size > MATCH_OFF_LOOP, _tdm_declaration, rules, ctx.path, ctx.readings
        )
        signals = optout.tdm_signals(declaration, "tdmrep")
        if rules.incomplete and unmatched:
            signals.append(
                OptOutSignal(
                    Kind.TDMREP,
                    "tdmrep:incomplete",
                    False,
                    f"{origin}{tdmrep.WELL_KNOWN_PATH} was not read whole ({rules.incomplete}); "
                    "no rule read matches this path",
                )
            )
        return self._conclude(ctx, signals)

    def _conclude(self, ctx: RequestContext, signals: list[OptOutSignal]) -> Decision | None:
        for signal in signals:
            if signal.name not in ctx.signals:
                ctx.signals.append(signal.name)
        return optout.decide(signals, ctx.basis, ctx.respect, site=ctx.site.key)

    # -- after the response -----------------------------------------------------------------

    def body_scan(self, content_type: str | None) -> BodyScan:
        return BodyScan(content_type, self.tokens)

    async def assess_response(
        self,
        ctx: RequestContext,
        status: int,
        headers: list[tuple[str, str]],
        body_prefix: bytes,
        content_type: str | None,
        *,
        scan: BodyScan | None = None,
    ) -> Assessment:
        """The signals of one response and whether to withhold it.

        `body_prefix` is the decoded body as far as it was read (Content-Encoding removed); or
        pass the `BodyScan` that was fed while reading and an empty prefix. `status` is
        accepted for symmetry with the fetch record: header signals apply to any status.
        """
        scan = self._scanned(scan, body_prefix, content_type)
        image = scan.image
        signals = self._header_signals(scan, headers, content_type)
        if image is not None:
            if image.c2pa_store is not None:
                # c2pa-python is native code that holds the thread: keep the loop free.
                signals += await asyncio.to_thread(imagemeta.image_signals, image)
            else:
                signals += imagemeta.image_signals(image)
        return self._assessment(ctx, signals)

    def assess_response_sync(
        self,
        ctx: RequestContext,
        status: int,
        headers: list[tuple[str, str]],
        body_prefix: bytes,
        content_type: str | None,
        *,
        scan: BodyScan | None = None,
    ) -> Assessment:
        """`assess_response` for synchronous callers (a mitmproxy stream callback): the same
        answer, with a C2PA store read on the calling thread (about a millisecond)."""
        scan = self._scanned(scan, body_prefix, content_type)
        image = scan.image
        signals = self._header_signals(scan, headers, content_type)
        if image is not None:
            signals += imagemeta.image_signals(image)
        return self._assessment(ctx, signals)

    def _header_signals(
        self, scan: BodyScan, headers: list[tuple[str, str]], content_type: str | None
    ) -> list[OptOutSignal]:
        # An image is an image by its bytes too: noimageai binds an octet-stream JPEG.
        read = scan.image
        image = optout.is_image(content_type) or (
            read is not None and read.format is not imagemeta.ImageFormat.PDF
        )
        signals = optout.response_signals(
            headers, content_type, self.tokens, scan.html_head, image=image
        )
        if scan.image_unread:
            signals.append(
                OptOutSignal(
                    Kind.IMAGE_METADATA,
                    "image-metadata:unread",
                    False,
                    f"the gateway reads no metadata in images of this format ({content_type})",
                )
            )
        package = scan.epub_package
        if package is not None:
            signals += epub.epub_signals(package)
        if scan.undecodable is not None:
            signals.append(
                OptOutSignal(
                    Kind.NOAI,
                    "body:undecodable",
                    False,
                    f"the body was not read in its Content-Encoding: {scan.undecodable}",
                )
            )
        if scan.partial is not None:
            signals.append(OptOutSignal(Kind.NOAI, "body:partial", False, scan.partial))
        return signals

    def _scanned(self, scan: BodyScan | None, body: bytes, content_type: str | None) -> BodyScan:
        if scan is None:
            scan = self.body_scan(content_type)
            scan.feed(body)
            scan.finish()
        return scan

    def _assessment(self, ctx: RequestContext, signals: list[OptOutSignal]) -> Assessment:
        decision = optout.decide(signals, ctx.basis, ctx.respect, site=ctx.site.key)
        return Assessment(decision, tuple(dict.fromkeys(s.name for s in signals)))

    async def close(self) -> None:
        await self.fetcher.close()


def _must_read_first(origin: str, path: str, refusal: Decision) -> Decision:
    """The budget's refusal of the gateway's own fetch of a file the request needs read first,
    as the request's refusal: the same reason and Retry-After, and what it was for."""
    return dataclasses.replace(
        refusal,
        detail=f"{origin}{path} must be read before this request, and the site's budget has "
        f"no room for that request now: {refusal.detail}",
    )


def _path_only(path: str) -> str:
    return path.split("?", 1)[0].split("#", 1)[0]


async def _off_loop_if[**P, R](
    off: bool, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """`work(*args)`, on a worker thread if `off`: CPU-bound work too long for the event loop."""
    if off:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


def _parse_tdmrep(body: bytes, truncated: bool) -> tdmrep.TdmRules:
    return tdmrep.parse_tdmrep(body, truncated=truncated)


def _robots_verdict(
    rules: RobotsRules, path: str, readings: Sequence[str]
) -> tuple[RobotsVerdict, list[aipref.UsagePreferences]]:
    """The verdict on a request and the Content-Usage rules that apply to it. Every path the
    site may serve for this one (`readings`) is checked: a Disallow of any refuses, and its
    Content-Usage rules combine, most restrictive first ("//gallery/a.jpg" is /gallery/a.jpg
    to a site that merges slashes)."""
    verdict = rules.verdict(path)
    usages = [verdict.content_usage]
    for reading in readings if verdict.allowed else ():
        other = rules.verdict(reading)
        if not other.allowed:
            return other, usages
        usages.append(other.content_usage)
    return verdict, usages


def _tdm_declaration(
    rules: tdmrep.TdmRules, path: str, readings: Sequence[str]
) -> tuple[tdmrep.TdmDeclaration, bool]:
    """The declaration for a request (reserved under one reading of its path: reserved), and
    whether no rule read matches the path under any reading."""
    found = [rules.find(p) for p in (path, *readings)]
    declaration = found[0] if found[0] is not None else tdmrep.UNSET
    for other in found[1:]:
        if other is not None and other.reservation == 1 and declaration.reservation != 1:
            declaration = other
    return declaration, all(f is None for f in found)
