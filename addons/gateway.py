"""The crawlwarden addon: mitmproxy hooks in, governor decisions out.

It holds no policy logic: it reads the flow, asks the governor, and turns the Decision into a
response; then it accounts for the fetch and writes its record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

import structlog
from mitmproxy import connection
from mitmproxy import ctx
from mitmproxy import http
from mitmproxy import tls
from mitmproxy.net import server_spec
from mitmproxy.proxy import layer
from mitmproxy.proxy import layers
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers import tls as proxy_tls
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.http import is_h3_alpn

from addons import named_connections
from addons import read_backpressure
from addons import websocket_limit
from addons.buffered_bytes import RECEIVED
from addons.client_events import ERROR_ANSWER
from addons.client_events import LATE_STREAM
from addons.http_guard import ANSWER_NOW
from addons.http_guard import BODY_REFUSED
from addons.http_guard import CLIENT_RESET
from addons.http_guard import FORWARDED
from addons.http_guard import HELD
from addons.http_guard import PINNED
from addons.http_guard import SCRAPER_STALLED
from addons.http_guard import STOP_DOWNLOAD
from addons.http_guard import STOPPED
from addons.http_guard import TIMEOUT
from addons.http_guard import Limits
from addons.http_guard import guard_http_layers
from addons.http_guard import refusal_response
from addons.streaming import HOLD_LIMIT
from addons.streaming import ResponseStream
from proxy import inputs
from proxy import metrics
from proxy import optout
from proxy import websocket
from proxy.audit.log import FetchLogClosed
from proxy.audit.record import FetchRecord
from proxy.audit.record import utc_timestamp
from proxy.auth_throttle import AuthThrottle
from proxy.blocklist import authority
from proxy.blocklist import normalize_url
from proxy.budgets import Admission
from proxy.budgets import Lease
from proxy.budgets.pause import THROTTLE_STATUSES
from proxy.content_coding import BodyDecoder
from proxy.content_coding import decodable_only
from proxy.content_coding import undecodable
from proxy.decision import Decision
from proxy.decision import Outcome
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.governor import CompiledPolicy
from proxy.governor import RequestContext
from proxy.identity import Caller
from proxy.identity import Identity
from proxy.optout_checks import ROBOTS_PATH
from proxy.optout_checks import Assessment
from proxy.optout_checks import BodyScan
from proxy.originfiles import origin_of
from proxy.policy import UpstreamProxy
from proxy.runtime import Runtime
from proxy.sites import is_ip_literal
from proxy.ssrf import IPAddress
from proxy.websocket import Conversation

log = structlog.get_logger("crawlwarden.decision")
# On a scraper's connection while its requests wait for it to read its answers (logged once).
_UNREAD_NOTED = "_crawlwarden_unread_noted"

META = "crawlwarden"
# Bodies up to this size are buffered whole, so an opt-out in them can still become a 451; larger
# ones are streamed (see addons/streaming.py). mitmproxy's stream_large_bodies must be above it.
BUFFER_LIMIT = 16 * 2**20
HASH_OFF_LOOP = 2**20  # a buffered body this large is hashed off the event loop
# Headers the scraper sends us that must never reach a site (DESIGN.md, "What a scraper sees"):
# ours (X-Crawl-Project, X-Crawl-Account, and our answers' X-Crawlwarden-*), a browser's
# User-Agent Client Hints (`Sec-CH-UA`, `-Platform`, `-Full-Version-List`...), which name the
# browser where the site must see the crawler's one User-Agent, and claims of another client
# address (`X-Forwarded-For: 1.2.3.4`, and the other names site stacks read one from) or of
# another device's User-Agent (`Device-Stock-UA`, what device detection reads before the
# User-Agent): the site is spoken to by the gateway, from its egress, as the crawler.
_OWN_PREFIX = b"x-crawl-"  # X-Crawl-Project, X-Crawl-Account: for the gateway only
_STRIPPED_PREFIXES = (_OWN_PREFIX, b"x-crawlwarden-", b"sec-ch-ua", b"x-forwarded")
_HOP_BY_HOP = frozenset(
    (
        b"proxy-authorization",
        b"proxy-connection",
        b"proxy-authenticate",
        b"forwarded",
        # Hop-by-hop whether Connection names it or not (RFC 9110 10.1.4): `TE: gzip` would let
        # a site answer in a transfer coding.
        b"te",
        # another client address
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-originating-ip",
        b"x-remote-addr",
        b"x-remote-ip",
        b"x-proxyuser-ip",
        # another device's User-Agent
        b"x-original-user-agent",
        b"x-device-user-agent",
        b"device-stock-ua",
        b"x-operamini-phone-ua",
        b"x-ucbrowser-device-ua",
        b"x-skyfire-phone",
        b"x-bolt-phone-ua",
    )
)
# Connection options the gateway passes on; a field the scraper's Connection header names is
# hop-by-hop (RFC 9110 7.6.1): removed, or the next hop would drop it (`Connection: User-Agent`
# took the crawler's User-Agent and From away before the site).
_CONNECTION_OPTIONS = frozenset(("close", "keep-alive", "upgrade"))
# Answers that never carry content (101: what follows it is another protocol's).
_NO_CONTENT = frozenset((101, 204, 304))
# Records of requests that reached the site: they may take one of the bounded site labels.
_REACHED = frozenset((str(Outcome.FORWARDED), str(Outcome.WITHHELD)))
_ABSENT = inputs.RecordedValue(None, None)  # a CONNECT's project and account: no header
# Names one client connection's https:// requests without CONNECT keep a checked address for.
_MAX_TLS_PINS = 256
_NO_UPSTREAM_LAYERS = (layers.TCPLayer, layers.UDPLayer, layers.DNSLayer, layers.RawQuicLayer)


@dataclass(slots=True)
class Tunnel:
    """A CONNECT tunnel: who opened it and where it goes; every request inside inherits it.

    A tunnel to a host the policy refuses (a whole-domain blocklist entry or takedown, a private
    or unresolvable address, an IP literal) is opened all the same, to nowhere (`refusal` set,
    nothing pinned, no connection allowed): each request inside it is answered with the refusal
    and its JSON, which a browser or Scrapy shows, where a refused CONNECT is only "tunnel
    connection failed". (The address a tunnel goes to is pinned on its CONNECT's request.)"""

    caller: Caller
    host: str
    port: int
    refusal: Decision | None = None
    # The CONNECT's credentials and the policy they were checked under (the CONNECT's own, not
    # the one in force once its lookup is done): after a reload, the next request inside is
    # checked again (a team removed or its token changed is cut off).
    credentials: str | None = None
    policy_version: str = ""
    # Where it goes: the address pinned at its CONNECT, the one `network.static_hosts` gave its
    # host then, and the policy version that address (or `refusal`) was last checked under: after
    # a reload, the next request inside checks it again.
    address: IPAddress | None = None
    static: IPAddress | None = None
    address_version: str = ""
    # The pool's proxy its connection goes through (egress.upstream_proxies), chosen at its
    # CONNECT: on the record of each request inside it. After a reload that takes it out of
    # the pool (or gives its name another URL, or brings in a pool), the next request inside is
    # answered 421: the tunnel's connection was made the old way.
    egress: UpstreamProxy | None = None


@dataclass(slots=True)
class FlowState:
    """What we know of one request, carried in flow.metadata between hooks."""

    id: str
    started: float
    identity: Identity | None
    client_ip: str | None
    method: str
    url: str
    # The policy the request came under: what it is decided, sent and recorded by, though a
    # reload come while it is under way; except a refusal a reload brought in while it waited
    # (a blocklist entry, a token revoked), recorded under the policy that refused it.
    compiled: CompiledPolicy
    site: str | None = None
    project: str | None = None
    account: str | None = None
    decision: Decision | None = None
    basis: str | None = None
    upstream_proxy: str | None = None
    signals: list[str] = field(default_factory=list)
    ctx: RequestContext | None = None
    forwarded: bool = False
    recorded: bool = False
    lease: Lease | None = None
    stream: ResponseStream | None = None
    answer: SiteAnswer | None = None
    withheld: Decision | None = None
    cached_robots: bool = False
    refused_tunnel: bool = False  # a CONNECT opened to answer its requests with a refusal
    # A CORS preflight's X-Crawl-* header names, kept from the site and allowed in its answer.
    cors_own_headers: tuple[str, ...] = ()
    settled: bool = False  # in-flight count and budget lease released
    throttle_noted: bool = False  # a 429/503 head told the budgets (the site pauses from then)
    conversation: Conversation | None = None  # a WebSocket's messages, once upgraded


@dataclass(frozen=True, slots=True)
class SiteAnswer:
    """The site's response as received, before the gateway delivers or withholds it."""

    status: int
    content_type: str | None
    body_bytes: int | None
    sha256: str | None
    finished: float
    retry_after: str | None

    @classmethod
    async def of(cls, resp: http.Response, stream: ResponseStream | None) -> SiteAnswer:
        if stream is not None:
            return cls.streamed(resp, stream)
        if resp.stream:
            size = digest = None  # streamed by mitmproxy without the gateway's stream (_assess)
        else:
            body = resp.raw_content or b""
            size, digest = len(body), await _sha256(body)
        return cls._of(resp, size, digest)

    @classmethod
    def streamed(cls, resp: http.Response, stream: ResponseStream) -> SiteAnswer:
        """What the gateway's stream received: the whole body, or what came before the site
        broke it off."""
        return cls._of(resp, stream.received, stream.sha256)

    @classmethod
    def broken_off(cls, flow: http.HTTPFlow) -> SiteAnswer:
        """A response whose body mitmproxy was still buffering when the fetch ended: its head,
        and the bytes of its body that had come (addons/buffered_bytes.py); no hash."""
        assert flow.response is not None
        return cls._of(flow.response, flow.metadata.get(RECEIVED, 0), None)

    @classmethod
    def _of(cls, resp: http.Response, size: int | None, digest: str | None) -> SiteAnswer:
        ctype = resp.headers.get("content-type")
        return cls(
            resp.status_code,
            None
            if ctype is None
            else inputs.recordable(ctype),  # the site's bytes, maybe not UTF-8
            size,
            digest,
            resp.timestamp_end or time.time(),
            resp.headers.get("retry-after"),
        )


def _fail_closed(
    hook: Callable[[Gateway, http.HTTPFlow], Awaitable[None]],
) -> Callable[[Gateway, http.HTTPFlow], Awaitable[None]]:
    """mitmproxy logs an exception in an addon hook and carries on with the flow as if the hook
    had returned: a request hook that fails would forward an ungoverned request. Fail closed:
    the flow is killed (nothing more leaves, nothing more is delivered) and still recorded."""

    @functools.wraps(hook)
    async def run(self: Gateway, flow: http.HTTPFlow) -> None:
        try:
            await hook(self, flow)
        except Exception as e:
            log.exception(
                "hook_failed", hook=hook.__name__, url=inputs.recordable(flow.request.url)
            )
            self._fail(flow, e)

    return run


# Seconds after its scraper's connection closed that a request mitmproxy has not ended is
# let go by the gateway (recorded interrupted, its budget settled).
ABANDON_AFTER = 2.0


# How often a request held for its budget (on_exceed: delay) is checked against the policy in
# force: a takedown, a blocklist entry or a reload that refuses it answers it within this.
HELD_RECHECK_SECONDS = 1.0


class Gateway:
    def __init__(self, runtime: Runtime, throttle: AuthThrottle | None = None):
        self.rt = runtime
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, Tunnel] = (
            weakref.WeakKeyDictionary()
        )
        # The local address of each client's latest upstream TCP connection: through an upstream
        # proxy, the flow's server connection is a tunnel and has no socket of its own.
        self.egress_ips: weakref.WeakKeyDictionary[connection.Client, str] = (
            weakref.WeakKeyDictionary()
        )
        self._proxy_turn = 0
        # The pool's proxy each client connection's requests leave through (a team not pinned).
        self._pool_choices: weakref.WeakKeyDictionary[connection.Client, UpstreamProxy] = (
            weakref.WeakKeyDictionary()
        )
        self.throttle = throttle or AuthThrottle()
        # Delay-mode admissions under way, per client: given up when the client goes away.
        self._held: weakref.WeakKeyDictionary[connection.Client, set[asyncio.Future[Admission]]] = (
            weakref.WeakKeyDictionary()
        )
        self._limits: tuple[str, Limits] | None = None
        # Forwarded and not yet settled, by request id: what a drain that runs out records.
        self._under_way: dict[str, tuple[http.HTTPFlow, FlowState]] = {}
        # Requests come in and not yet forwarded or recorded (held for a budget, say), by id:
        # Runtime.deciding is how many (what a drain waits for).
        self._deciding: dict[str, tuple[http.HTTPFlow, FlowState]] = {}
        # WebSockets open (their conversation not yet recorded), by upgrade request id: what a
        # stop ends first (end_conversations).
        self._talking: dict[str, http.HTTPFlow] = {}
        # Per client, the checked address of each (name, port) its https:// requests sent
        # without CONNECT go to: mitmproxy connects to the name, server_connect to this.
        self._tls_pins: weakref.WeakKeyDictionary[connection.Client, dict[tuple[str, int], str]] = (
            weakref.WeakKeyDictionary()
        )

    # -- connection layering ---------------------------------------------------------------

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Only HTTP leaves the gateway: no raw TCP, UDP or DNS passthrough inside a tunnel.
        Every HTTP layer runs under an HttpGuard (timeouts, head size, slow clients)."""
        if isinstance(nextlayer.layer, _NO_UPSTREAM_LAYERS):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)
        if nextlayer.layer is not None:
            nextlayer.layer = guard_http_layers(nextlayer.layer, self.limits)
            # A reload may have changed the timeouts: mitmproxy's backstop follows, for the
            # connections accepted from now on.
            watchdog = self.limits().watchdog
            if ctx.options.tcp_timeout != watchdog:
                ctx.options.update(tcp_timeout=watchdog)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """A client that sends no SNI inside a tunnel: the certificate the gateway makes names
        the tunnel's host. mitmproxy names the address the CONNECT was pinned to instead, and a
        client that checks the certificate against the host it asked for fails its handshake."""
        client = data.context.client
        if client.sni is not None:
            return
        tunnel = self.tunnels.get(client)
        if tunnel is not None and not is_ip_literal(tunnel.host):
            client.sni = tunnel.host

    def tls_start_client(self, data: tls.TlsData) -> None:
        """HTTP/3 is QUIC's: over TCP (a tunnel, TLS to the proxy port) mitmproxy still agrees
        on ALPN h3 with a client that offers it first (it counts h3 among the HTTP ALPNs
        whatever the transport), and its HTTP/3 layer over TCP crashes on the first bytes: no
        answer, no record, the connection held until mitmproxy's watchdog. Such a client is
        given the next HTTP ALPN it offers, or none (it then speaks HTTP/1). Runs after
        mitmproxy's TlsConfig, which made the connection."""
        if data.ssl_conn is None or data.is_dtls:
            return
        app = data.ssl_conn.get_app_data()
        if not isinstance(app, dict):
            return
        if _tls_to_the_proxy_itself(data.context.layers):
            # An HTTPS proxy URL (TLS to the proxy port): mitmproxy takes no CONNECT on an
            # HTTP/2 stream (GOAWAY, no answer, no record), and means to keep such connections
            # to HTTP/1.1, but its check misses our layer stack. A browser with an https://
            # proxy offers h2 first and then could load no https:// page at all.
            app["client_alpn"] = b"http/1.1"
            return
        if app.get("client_alpn") is not None:
            return
        offers = [o for o in data.conn.alpn_offers or () if o in proxy_tls.HTTP_ALPNS]
        if not offers or not is_h3_alpn(offers[0]):
            return
        usable = (o for o in offers if not is_h3_alpn(o) and (o != b"h2" or app.get("http2")))
        app["client_alpn"] = next(usable, b"")  # b"": no ALPN agreed

    def limits(self) -> Limits:
        """The policy's network limits, parsed once per policy version."""
        version = self.rt.policy_version
        if self._limits is None or self._limits[0] != version:
            self._limits = (version, Limits.of(self.rt.compiled.loaded.policy.network))
        return self._limits[1]

    # -- CONNECT ---------------------------------------------------------------------------

    @_fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        gov = self.rt.governor
        checked = inputs.check_host(flow.request.host)
        host = checked.host or flow.request.host
        port = flow.request.port
        state = self._new_state(
            flow, f"https://{inputs.recordable(_bracket(host))}:{port}", "CONNECT"
        )
        credentials = flow.request.headers.get("proxy-authorization")
        caller = await self._authenticate(flow, state, credentials)
        if caller is None:
            return self._refuse_connect(flow, state, _auth_required(), started)
        project = inputs.agreed_value(_ABSENT, "project", caller.project)
        account = inputs.agreed_value(_ABSENT, "account", caller.account)
        state.project, state.account = project.value, account.value
        problem = checked.problem or project.problem or account.problem
        if problem is not None or checked.host is None:
            return self._refuse_connect(flow, state, _bad_request(problem), started)
        site = gov.site_for(host)
        state.site = site.key
        basis, _ = site.terms_on(dt.datetime.now(dt.UTC).date())
        state.basis = f"{basis.kind}:{basis.ref}"  # on a refused tunnel's record too
        decision = gov.check_host(host)
        address = None
        if decision.allowed:
            address, decision = await gov.target_address(host, port, site.key)
        if not decision.allowed or address is None:
            # Recorded as the attempt it is; mitmproxy answers 200 and connects nowhere (lazy
            # strategy; server_connect refuses a name that was never pinned to an address).
            self.tunnels[flow.client_conn] = Tunnel(
                caller,
                host,
                port,
                decision,
                credentials,
                state.compiled.version,
                address_version=state.compiled.version,
            )
            state.decision = decision
            state.refused_tunnel = True
            self._observe_governance(started)
            return self._record(flow, state)
        state.recorded = True  # a tunnel is not a fetch: each request inside it is recorded
        self._decided(state)
        # Pin the checked address: the tunnel connects there, and nowhere else.
        flow.request.data.host = str(address)
        # The TLS name (SNI, and what the site's certificate is checked against) is the host
        # decided on, not the scraper's SNI: an IP literal's is its address (no SNI).
        flow.server_conn.sni = host
        egress = self._choose_upstream_proxy(flow, caller.identity, state)
        self.tunnels[flow.client_conn] = Tunnel(
            caller,
            host,
            port,
            None,
            credentials,
            state.compiled.version,
            address=address,
            static=state.compiled.resolver.static_address(host),
            address_version=state.compiled.version,
            egress=egress,
        )

    def _refuse_connect(
        self, flow: http.HTTPFlow, state: FlowState, decision: Decision, started: float
    ) -> None:
        state.decision = decision
        self._respond(flow, decision)
        self._observe_governance(started)
        self._record(flow, state)

    async def _tunnel_refusal_now(self, tunnel: Tunnel, site: str) -> Decision | None:
        """A refused tunnel's host decided again under the policy in force: the refusal, or
        None if it is admitted now."""
        gov = self.rt.governor
        decision = gov.check_host(tunnel.host)
        if decision.allowed:
            decision = (await gov.target_address(tunnel.host, tunnel.port, site))[1]
        if decision.allowed:
            return None
        tunnel.refusal, tunnel.address_version = decision, self.rt.policy_version
        return decision

    def _tunnel_caller(self, tunnel: Tunnel) -> Caller | None:
        """The tunnel's caller under the policy in force: checked again after a reload."""
        version = self.rt.policy_version
        if tunnel.policy_version == version:
            return tunnel.caller
        caller = self.rt.governor.authenticate(tunnel.credentials)
        if (
            caller is not None
            and caller.identity.upstream_proxy == tunnel.caller.identity.upstream_proxy
            and self._egress_holds(tunnel)
        ):
            tunnel.caller, tunnel.policy_version = caller, version  # its projects may differ
        return caller

    def _egress_holds(self, tunnel: Tunnel) -> bool:
        """Whether the policy in force still sends the tunnel's traffic the way its connection
        goes: through the same proxy of the pool (name and URL), or, with no pool, directly."""
        if tunnel.refusal is not None:
            return True  # it has no connection
        pool = self.rt.compiled.loaded.policy.egress.upstream_proxies
        if tunnel.egress is None:
            return not pool
        return any(p == tunnel.egress for p in pool)

    async def _authenticate(
        self, flow: http.HTTPFlow, state: FlowState, header: str | None
    ) -> Caller | None:
        """The caller of a Proxy-Authorization header, or None after the throttle's delay.

        Wrong credentials (not missing ones) are answered later the more an address has sent
        recently (proxy/auth_throttle.py); past its bound the flow is dropped unanswered."""
        caller = self.rt.governor.authenticate(header)
        state.identity = None if caller is None else caller.identity
        if caller is not None or header is None:
            return caller
        penalty = self.throttle.failed(state.client_ip)
        if penalty.drop:
            state.decision = _auth_required()
            flow.kill()
            return None
        try:
            if penalty.delay > 0:
                await asyncio.sleep(penalty.delay)
        finally:
            self.throttle.answered(state.client_ip)
        return None

    # -- requests --------------------------------------------------------------------------

    @_fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        req = flow.request
        gov = self.rt.governor
        tunnel = self.tunnels.get(flow.client_conn)
        scheme = req.scheme
        if tunnel is not None:
            # The host a request in a tunnel names: its absolute-form target's over its Host
            # header (RFC 9112 3.2.2), as the site's server reads it, and as mitmproxy, which
            # leaves such a target as sent inside a tunnel, would forward it.
            raw_host = _host_only(req.authority or req.host_header) or tunnel.host
            port = tunnel.port
            if req.authority and not (req.is_http2 or req.is_http3):
                req.authority = ""  # forwarded in origin-form, its host in the Host header
        else:
            raw_host = req.host
            port = req.port
        canonical = inputs.canonical_target(req.path)
        if canonical != req.path:
            req.path = canonical  # what the site will serve: decided on, recorded, forwarded
        checked = inputs.check_host(raw_host)
        bad_target = inputs.target_problem(req.path)
        if checked.host is not None and bad_target is None:
            host = checked.host
            url = normalize_url(
                f"{scheme}://{_bracket(host)}:{port}{inputs.without_surrogates(req.path)}"
            )
        else:  # refused below; recorded as it came (a target that is no path: one segment)
            host = checked.host or inputs.recordable(raw_host)
            target = inputs.recordable(req.path)
            if bad_target is not None:
                target = "/" + urllib.parse.quote(target, safe="")
            url = f"{scheme}://{host}:{port}{target}"
        state = self._new_state(flow, url, req.method)
        project = inputs.check_recorded_value("X-Crawl-Project", req.headers.get("x-crawl-project"))
        account = inputs.check_recorded_value("X-Crawl-Account", req.headers.get("x-crawl-account"))
        # Recorded once the caller is known (below): a request without valid credentials is no
        # team's, and its project and account are claims of no one the gateway knows.
        credentials = req.headers.get("proxy-authorization")
        # Before _sanitize, which takes out what Connection names: never the framing.
        framing_named = inputs.connection_problem(req.headers.get("connection"))
        broken_field = inputs.field_problem(req.headers.fields)
        self._sanitize(req)
        if req.method == "OPTIONS":
            state.cors_own_headers = _hide_own_headers(req)
        if flow.error is not None:
            # mitmproxy has refused it already (request smuggling, invalid headers, a host it
            # cannot encode); the error hook records this refusal. Nothing is admitted. Where
            # mitmproxy would send its HTML page, the client gets the gateway's answer: the
            # reason header, the request id and the JSON body (addons/client_events.py).
            state.decision = _bad_request(flow.error.msg)
            flow.metadata[ERROR_ANSWER] = refusal_response(
                state.decision, request_id=state.id, method=req.method
            )
            return None

        if tunnel is not None:
            caller = self._tunnel_caller(tunnel)
            state.identity = None if caller is None else caller.identity
            if caller is not None and caller is not tunnel.caller:
                # Not taken on by the tunnel: the team's egress changed with the policy, and
                # this tunnel's connection was made the old way. 421: clients retry on a new
                # connection.
                return self._refuse(
                    flow,
                    state,
                    refuse(
                        Reason.MISDIRECTED,
                        "the policy changed this team's egress since this tunnel was opened; "
                        "open a new one",
                    ),
                    started,
                    close=True,
                )
            if caller is None:
                return self._refuse(flow, state, _auth_required(), started, close=True)
        else:
            caller = await self._authenticate(flow, state, credentials)
            if flow.error is not None:
                return None  # dropped by the throttle
        if caller is None:
            return self._refuse(flow, state, _auth_required(), started)
        identity = caller.identity
        project = inputs.agreed_value(project, "project", caller.project)
        account = inputs.agreed_value(account, "account", caller.account)
        state.project, state.account = project.value, account.value
        problem = (
            checked.problem
            or bad_target
            or framing_named
            or broken_field
            or project.problem
            or account.problem
        )
        if problem is not None:
            return self._refuse(flow, state, _bad_request(problem), started)
        if (refused := self._framing_refusal(req, gov.site_for(host).key)) is not None:
            state.site = refused.site  # on the record, and in the site's report
            return self._refuse(flow, state, refused, started)
        if tunnel is not None and host != tunnel.host:
            # On the record and in the report of the site it named (it was null: the attempt
            # counted for no site).
            state.site = gov.site_for(host).key
            return self._refuse(
                flow,
                state,
                refuse(
                    Reason.MISDIRECTED,
                    f"this tunnel was opened for {tunnel.host}; open one for {host}",
                    site=state.site,
                ),
                started,
            )
        ctx = gov.context(
            identity,
            method=req.method,
            scheme=scheme,
            host=host,
            port=port,
            url=url,
            path=req.path,
            project=state.project,
            account=state.account,
        )
        state.site = ctx.site.key
        state.basis = f"{ctx.basis.kind}:{ctx.basis.ref}"
        if tunnel is not None and tunnel.refusal is not None:
            # The scraper's next request opens a new tunnel, decided anew: a name that did not
            # resolve, or a blocklist entry since lifted, is not stuck to the connection.
            # (HTTP/2 has no such header: its tunnel ends with the connection, and a reload
            # since it was opened decides its host again: refused as it now is, or, admitted,
            # 421 for a new connection, as a tunnel opened to nowhere cannot carry it.)
            refused = tunnel.refusal
            if tunnel.address_version != state.compiled.version:
                refused = await self._tunnel_refusal_now(tunnel, ctx.site.key) or refuse(
                    Reason.MISDIRECTED,
                    f"the policy no longer refuses {host}, but this tunnel was opened to "
                    "nowhere; open a new one",
                    site=ctx.site.key,
                )
            return self._refuse(flow, state, refused, started, close=True)
        checked_against = gov.blocklist
        decision = gov.check_request(ctx)
        if decision.allowed and tunnel is None:
            address, decision = await gov.target_address(host, port, ctx.site.key)
            if address is not None:
                # Pin the checked address (no second lookup, no DNS rebinding window).
                req.data.host = str(address)
        elif (
            decision.allowed
            and tunnel is not None
            and tunnel.address is not None
            and tunnel.address_version != state.compiled.version
        ):
            # A reload applies to open tunnels too: the address pinned at CONNECT, under the
            # policy now in force (network.allow_private narrowed, static_hosts moved).
            decision = gov.still_pinned(host, port, ctx.site.key, tunnel.address, tunnel.static)
            if decision.allowed:
                tunnel.address_version = state.compiled.version
            else:
                return self._refuse(flow, state, decision, started, close=True)
        if decision.allowed:
            decision = await gov.check_prefetch(ctx)
        if decision.allowed and not self.rt.fetch_log.available:
            decision = _audit_unavailable(ctx.site.key)
        state.signals.extend(ctx.signals)
        state.ctx = ctx
        if not decision.allowed:
            # This replica is not ready while its fetch log takes nothing: an HTTP/1 scraper's
            # next connection goes to another one.
            closing = decision.reason is Reason.AUDIT_UNAVAILABLE
            return self._refuse(flow, state, decision, started, close=closing)
        if req.method in ("GET", "HEAD") and req.path.split("?", 1)[0] == ROBOTS_PATH:
            cached = self.rt.optouts.cached_robots(origin_of(scheme, host, port))
            if cached is not None:
                # The gateway has just read this file for the whole fleet: no second fetch.
                return self._serve_cached_robots(flow, state, cached, started)
        # Budgets last: what they count is exactly what is forwarded (DESIGN.md step 4).
        # Held for its turn in delay mode, and in either mode while its HTTP/2 connection has
        # answers unread past the bound (addons/read_backpressure.py).
        if (
            ctx.site.settings.on_exceed == "delay"
            or read_backpressure.unread_answers(flow.client_conn)
            > read_backpressure.MAX_UNREAD_ANSWERS
        ):

            def refused_meanwhile() -> Decision | None:
                """What the policy in force refuses this held request for now: its team after
                a reload, a blocklist entry or takedown since it came (None: nothing)."""
                if self.rt.policy_version != state.compiled.version and (
                    (now := self._team_refusal_now(tunnel, credentials, ctx, state)) is not None
                ):
                    return now
                if gov.blocklist is not checked_against:
                    blocked = gov.check_blocked(ctx)
                    if not blocked.allowed:
                        return blocked
                return None

            admission = await self._admit_held(flow, ctx, refused_meanwhile)
            if isinstance(admission, Decision):
                # Refused while held, within a second of the takedown or reload that says so,
                # not when its turn comes; recorded under the policy in force.
                state.compiled = self.rt.compiled
                closing = admission.reason in (Reason.AUTH_REQUIRED, Reason.MISDIRECTED)
                return self._refuse(flow, state, admission, started, close=closing)
            if admission is not None:
                ctx.waited += admission.waited
            if admission is None and self.rt.stopping:
                return self._refuse(flow, state, _draining(ctx.site.key), started, close=True)
            if admission is None:  # its client went away (or cancelled it) while it was held
                state.decision = refuse(
                    Reason.INTERRUPTED,
                    "the client went away or cancelled the request while it was held for the "
                    "site's budget or for the client to read the answers it was given",
                    site=ctx.site.key,
                )
                if flow.killable:
                    flow.kill()  # nothing leaves for it
                return self._record(flow, state)
        else:
            admission = await self.rt.admit(ctx)
        if self.rt.policy_version != state.compiled.version and (
            (now := self._team_refusal_now(tunnel, credentials, ctx, state)) is not None
        ):
            # A reload while it waited (held for its turn, or for the site's robots.txt) took
            # its team's token, its project or its egress away: not forwarded, and recorded
            # under the policy that said so (also where its budget refused it in the end: who
            # may send it comes first).
            if admission.decision.allowed:
                self.rt.budgets.finish(admission.lease)
            state.compiled = self.rt.compiled
            closing = now.reason is not Reason.UNKNOWN_PROJECT
            return self._refuse(flow, state, now, started, close=closing)
        if not admission.decision.allowed:
            return self._refuse(flow, state, admission.decision, started)
        if gov.blocklist is not checked_against:
            # A takedown or blocklist change while it waited (for its turn, for the site's
            # robots.txt): "in force at once" covers requests already under way.
            blocked = gov.check_blocked(ctx)
            if not blocked.allowed:
                self.rt.budgets.finish(admission.lease)
                # Refused by a rule of the policy in force now (a reload may have brought it):
                # its record names that policy's version, not the one the request came under.
                state.compiled = self.rt.compiled
                return self._refuse(flow, state, blocked, started)

        state.decision = decision
        state.lease = admission.lease
        crawler = state.compiled.loaded.policy.crawler
        req.headers["User-Agent"] = crawler.user_agent
        req.headers["From"] = crawler.contact
        if optout.body_signals_bind(ctx.basis, ctx.respect):
            _ask_for_a_readable_body(req)
        _name_the_checked_host(req, scheme, host, port)
        if tunnel is not None:
            # its connection's, chosen at CONNECT
            state.upstream_proxy = None if tunnel.egress is None else tunnel.egress.name
        else:
            self._choose_upstream_proxy(flow, identity, state)
            if scheme == "https":  # (through an upstream proxy too: it is asked for the address)
                self._name_the_tls_target(flow, host, port)
        refusal: Decision | None = None
        if self.rt.stopping:
            # The drain is over: a request forwarded now might outlive the fetch log.
            refusal = _draining(ctx.site.key)
        else:
            try:
                # In the spool before the request leaves: a kill -9 from here on cannot lose it.
                self.rt.fetch_log.begin(self._build_record(flow, state, forwarded=True))
            except OSError:
                refusal = _audit_unavailable(ctx.site.key)
        if refusal is not None:
            self.rt.budgets.finish(state.lease)  # admitted, but it never leaves
            state.lease = None
            closing = refusal.reason is Reason.AUDIT_UNAVAILABLE  # as at _audit_unavailable above
            return self._refuse(flow, state, refusal, started, close=closing)
        state.forwarded = True
        flow.metadata[FORWARDED] = state.id
        self._under_way[state.id] = (flow, state)
        self._decided(state)
        self.rt.in_flight += 1
        metrics.IN_FLIGHT.set(self.rt.in_flight)
        self._observe_governance(started, ctx)

    def _team_refusal_now(
        self,
        tunnel: Tunnel | None,
        credentials: str | None,
        ctx: RequestContext,
        state: FlowState,
    ) -> Decision | None:
        """Why the policy in force now refuses the team of a request decided under an earlier
        one (`state.compiled`): its credentials, its project, or its egress (the upstream proxy
        its connection goes through: the team's pin, or the pool) changed. None if it still
        admits it."""
        caller = self.rt.governor.authenticate(tunnel.credentials if tunnel else credentials)
        if caller is None:
            return _auth_required()
        project = self.rt.governor.check_project(caller.identity, ctx)
        if not project.allowed:
            return project
        pool = self.rt.compiled.loaded.policy.egress.upstream_proxies
        before = state.compiled.loaded.policy.egress.upstream_proxies
        if (
            caller.identity.upstream_proxy != ctx.identity.upstream_proxy
            or (tunnel is not None and not self._egress_holds(tunnel))
            or (tunnel is None and list(pool) != list(before))
        ):
            return refuse(
                Reason.MISDIRECTED,
                "the policy changed this team's egress while the request waited; send it again",
                site=ctx.site.key,
            )
        return None

    def _framing_refusal(self, req: http.Request, site: str | None) -> Decision | None:
        """A head past the limit (one that arrived whole; partial ones are HttpGuard's), or a
        body the gateway will not take (proxy/inputs.py). `site`: the target's site key."""
        limits = self.limits()
        limit = limits.max_header_bytes
        head = len(req.method) + len(req.path) + len(req.host_header or "") + 16
        head += sum(len(k) + len(v) + 4 for k, v in req.headers.fields)
        if head > limit:
            return refuse(
                Reason.HEADERS_TOO_LARGE,
                f"the request head is larger than {limit} bytes (network.max_request_header_bytes)",
                rule="network.max_request_header_bytes",
                site=site,
            )
        framing = inputs.check_body_framing(
            req.headers.get("content-length"),
            req.headers.get("transfer-encoding"),
            limits.max_body_bytes,
            req.method,
        )
        if framing.unexpected is not None:
            return refuse(Reason.BAD_REQUEST, framing.unexpected, site=site)
        if framing.length_required is not None:
            return refuse(Reason.LENGTH_REQUIRED, framing.length_required, site=site)
        if framing.too_large is not None:
            return refuse(
                Reason.REQUEST_TOO_LARGE,
                framing.too_large,
                rule="network.max_request_body_bytes",
                site=site,
            )
        return None

    def _refuse(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        decision: Decision,
        started: float,
        *,
        close: bool = False,
    ) -> None:
        """Answer with the refusal; `close`: and end an HTTP/1 connection after it (a tunnel
        whose every next request would be refused the same: the scraper opens a new one)."""
        state.decision = decision
        self._respond(flow, decision)
        self._observe_governance(started, state.ctx)
        req = flow.request
        if close and req.http_version.startswith("HTTP/1") and flow.response is not None:
            flow.response.headers["connection"] = "close"
        # mitmproxy switches to streaming for a body past its buffer before this hook; a flow
        # with an answer cannot stream (it would raise), and must not read the body anyway.
        req.stream = False
        req.headers.pop("expect", None)  # no "100 Continue" for a body that is not wanted
        if req.http_version.startswith("HTTP/1"):
            if req.headers.get("transfer-encoding") or _declared_length(req) > 0:
                flow.metadata[ANSWER_NOW] = True  # HttpGuard answers before the body, then closes
        elif _declared_length(req) > 0:
            # HttpGuard answers on the stream before the body and asks the client to stop
            # sending it. One of no declared length is answered once past the body limit.
            flow.metadata[ANSWER_NOW] = True

    def _serve_cached_robots(
        self, flow: http.HTTPFlow, state: FlowState, cached: tuple[int, bytes], started: float
    ) -> None:
        status, body = cached
        state.decision = refuse(Reason.ROBOTS_CACHE, "answered from the gateway's robots.txt cache")
        state.cached_robots = True
        head = flow.request.method == "HEAD"
        flow.response = http.Response.make(
            status,
            b"" if head else body,  # RFC 9110 9.3.2: the GET's head, no content
            {"Content-Type": "text/plain; charset=utf-8", "X-Crawlwarden-Reason": "robots_cache"},
        )
        if head:
            flow.response.headers["content-length"] = str(len(body))
        flow.response.headers["x-crawlwarden-request-id"] = state.id
        self._observe_governance(started, state.ctx)

    # -- responses -------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._close_if_draining(flow)  # before a streamed head goes out
        state: FlowState | None = flow.metadata.get(META)
        resp = flow.response
        if state is None or not state.forwarded or resp is None or state.ctx is None:
            return
        # On every answer, also one streamed (its head goes out before the response hook):
        # the scraper links what it saved to its record.
        resp.headers["x-crawlwarden-request-id"] = state.id
        if resp.status_code in THROTTLE_STATUSES:
            # The status line is the site's answer: it pauses from now, not once its body is
            # over (a busy site sends it slowly), nor never (the site or scraper broke it off).
            state.throttle_noted = True
            self.rt.budgets.site_answered(
                state.ctx.site, resp.status_code, resp.headers.get("retry-after")
            )
        length = resp.headers.get("content-length", "")
        if state.method == "HEAD" or resp.status_code in _NO_CONTENT:
            pass  # no content whatever Content-Length says: held whole for the response hook
        elif not length.isdigit():
            # Buffered whole by mitmproxy up to stream_large_bodies, then streamed: by this
            # gateway's stream from there on (addons/client_events.py).
            flow.metadata[LATE_STREAM] = functools.partial(self._stream, state, flow, resp)
        elif int(length) > BUFFER_LIMIT:
            resp.stream = self._stream(state, flow, resp)
        # Else buffered whole and read in the response hook, where a 451 can still replace it.
        if state.cors_own_headers:
            _allow_own_headers(resp, state.cors_own_headers)

    def _stream(self, state: FlowState, flow: http.HTTPFlow, resp: http.Response) -> ResponseStream:
        """A large body streamed, hashed on the way, held back until its metadata is read; once
        withheld, no more of it is downloaded (HttpGuard closes the site's connection, or resets
        its stream)."""
        assert state.ctx is not None
        ctx = state.ctx
        headers = _header_list(resp.headers)
        ctype = resp.headers.get("content-type")
        optouts = self.rt.optouts
        status = resp.status_code

        def assess(scan: BodyScan) -> Assessment:
            assessment = optouts.assess_response_sync(ctx, status, headers, b"", ctype, scan=scan)
            if assessment.decision is not None:
                flow.metadata[STOP_DOWNLOAD] = (
                    "the body was withheld once the opt-out in it was read; the gateway then "
                    "stopped the site's transfer and downloaded no more of it "
                    "(response_bytes and content_sha256 are of what had come)"
                )
            return assessment

        scan = optouts.body_scan(ctype)
        _note_a_part(scan, flow.request, resp)
        state.stream = ResponseStream(scan, _body_codings(resp.headers), assess)
        return state.stream

    @_fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        self._close_if_draining(flow)  # refusals too
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.recorded or flow.request.method == "CONNECT":
            return
        resp = flow.response
        if resp is not None and state.forwarded and state.ctx is not None:
            await self._assess(flow, state, resp)
            if state.recorded:
                return  # a drain that ran out recorded it meanwhile (record_unfinished)
        # Every answer has its request id already: the site's since responseheaders, the
        # gateway's own since it was made (refusal_response, the robots.txt cache).
        self._settle(state)
        # A streamed answer has gone out by now; a buffered one is still the gateway's to give.
        buffered = resp is not None and not resp.stream and state.stream is None
        self._record(flow, state, deliverable=buffered)

    def _close_if_draining(self, flow: http.HTTPFlow) -> None:
        """While the replica drains, an HTTP/1 answer closes its connection: the scraper's
        next request opens a new one, to a replica that is not stopping."""
        resp = flow.response
        if (
            self.rt.draining
            and resp is not None
            and resp.status_code != 101
            and flow.request.method != "CONNECT"
            and flow.request.http_version.startswith("HTTP/1")
        ):
            resp.headers["connection"] = "close"

    async def _assess(self, flow: http.HTTPFlow, state: FlowState, resp: http.Response) -> None:
        """Read the opt-outs a response carries; withhold it when one binds (DESIGN.md step 6)."""
        assert state.ctx is not None
        state.answer = await SiteAnswer.of(resp, state.stream)
        if state.stream is not None:
            assessment = state.stream.assessment
            if assessment is None:  # a stream that ended before anything was decided
                assessment = self.rt.optouts.assess_response_sync(
                    state.ctx, resp.status_code, _header_list(resp.headers), b"", None
                )
        elif resp.stream:
            # Streamed by mitmproxy without the gateway's stream (a client connection handler
            # that addons/client_events.py does not know: none so far): neither read nor hashed.
            assessment = await self.rt.optouts.assess_response(
                state.ctx, resp.status_code, _header_list(resp.headers), b"", None
            )
        else:
            content_type = resp.headers.get("content-type")
            scan = self.rt.optouts.body_scan(content_type)
            _note_a_part(scan, flow.request, resp)
            _read_body(scan, resp)
            assessment = await self.rt.optouts.assess_response(
                state.ctx,
                resp.status_code,
                _header_list(resp.headers),
                b"",
                content_type,
                scan=scan,
            )
        for name in assessment.signals:
            if name not in state.signals:
                state.signals.append(name)
        if assessment.decision is None:
            return
        state.withheld = assessment.decision
        if state.stream is not None or resp.stream:
            # The status line has gone out: deliver nothing more, break the transfer.
            flow.kill()
            return
        flow.response = refusal_response(
            assessment.decision, Outcome.WITHHELD, state.id, flow.request.method
        )

    # -- WebSockets ------------------------------------------------------------------------

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is not None and state.forwarded:
            state.conversation = Conversation(time.time())
            self._talking[state.id] = flow

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        ws = flow.websocket
        if ws is None or not ws.messages:
            return
        message = ws.messages[-1]
        # mitmproxy keeps every message in the flow for as long as the connection is open (a
        # browser's live feed held the gateway's memory by every byte it ever sent): the newest
        # is kept, for the hooks after this one; the conversation holds what the record needs.
        del ws.messages[:-1]
        state: FlowState | None = flow.metadata.get(META)
        talk = state.conversation if state is not None else None
        if talk is None:
            return
        content, from_client = message.content, message.from_client
        if len(content) < HASH_OFF_LOOP:
            talk.add(from_client=from_client, content=content)
        else:  # hashed on a worker thread, as a large body is (_sha256); the layer waits for it
            await asyncio.to_thread(talk.add, from_client=from_client, content=content)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        talk = state.conversation if state is not None else None
        if state is None or talk is None:
            return
        state.conversation = None  # recorded once
        self._talking.pop(state.id, None)
        unfinished = flow.metadata.get(websocket_limit.UNFINISHED)
        if unfinished is not None:
            talk.unfinished_site_bytes, talk.unfinished_client_bytes = unfinished
        if state.ctx is not None:
            self.rt.budgets.charge(state.ctx.site.key, talk.site_bytes)
        rec = self._build_record(flow, state)
        rec.id = uuid.uuid4().hex
        rec.ts = utc_timestamp(talk.started)
        rec.kind = websocket.KIND
        rec.status = 101
        rec.egress_ip = str(flow.server_conn.sockname[0]) if flow.server_conn.sockname else None
        rec.request_bytes = talk.client_bytes
        rec.response_bytes = talk.site_bytes
        rec.content_sha256 = talk.sha256
        ws = flow.websocket
        ended = (
            websocket.closed(ws.close_code, ws.close_reason, ws.closed_by_client)
            if ws is not None
            else websocket.closed(None, None, None)
        )
        rec.note = talk.note(state.id, inputs.recordable(ended))
        rec.duration_ms = round(max(0.0, time.time() - talk.started) * 1000, 3)
        try:
            try:
                self.rt.record(rec)
            except OSError:  # no room in the spool: written first once it has
                self.rt.fetch_log.keep_until_room(rec)
        except FetchLogClosed:
            # (what the record would have said, for reconciling by hand)
            log.warning("websocket_not_recorded", **rec.to_dict())
            return
        if rec.response_bytes and rec.site is not None:
            label = self.rt.site_labels.observe(rec.site)
            metrics.count_response_bytes(label, rec.team or "_none", rec.response_bytes)

    def error(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.recorded:
            return
        refused_body = flow.metadata.get(BODY_REFUSED)
        if state.forwarded and refused_body is not None:
            # HttpGuard stopped a body of no declared length at the limit, or one on a GET: the
            # site never saw the request, so it is refused, as one that declared it is.
            reason, detail = refused_body
            state.decision = refuse(
                reason,
                detail,
                rule="network.max_request_body_bytes"
                if reason is Reason.REQUEST_TOO_LARGE
                else None,
                site=state.site,
            )
            flow.metadata[ERROR_ANSWER] = refusal_response(
                state.decision, Outcome.REFUSED, state.id, flow.request.method
            )
            self._settle(state)
            state.forwarded = False
            self._record(flow, state)
            return
        if state.forwarded:
            message = flow.error.msg if flow.error else "no response"
            kind = metrics.upstream_error_kind(message)
            if _h2_words(message) and (
                flow.server_conn.alpn != b"h2" or flow.metadata.get(CLIENT_RESET)
            ):
                # mitmproxy words a reset, and an HTTP/2 connection's close, the same from
                # either side; a site spoken to over HTTP/1 has no HTTP/2 stream or connection,
                # and HttpGuard saw the scraper's own resets: the scraper cancelled the stream
                # (a browser leaving a page) or closed its connection (gave up), which is no
                # error of the site's.
                kind = None
            stopped = flow.metadata.get(STOPPED) or flow.metadata.get(SCRAPER_STALLED)
            timeout = flow.metadata.get(TIMEOUT)
            if stopped is not None:
                # The gateway's own doing (HttpGuard): the body was withheld, or the scraper
                # stalled it (made no room at the response or transfer timeout).
                kind = None
            elif timeout is not None:
                # HttpGuard closed the connection at one of the policy's network timeouts.
                kind = "timeout"
                message = f"{timeout[1]} (network.{timeout[0]}_timeout)"
            elif kind is not None and flow.response is None and not flow.client_conn.connected:
                # The scraper left first (its connection is closed before this hook, which
                # precedes any answer to it): mitmproxy then ends the connection to the site
                # it was still making ("connection closed"), no failure of the site's.
                kind = None
            if kind is not None:
                metrics.UPSTREAM_ERRORS.labels(kind=kind).inc()
            if stopped is not None:
                state.decision = refuse(Reason.INTERRUPTED, stopped, site=state.site)
                if flow.response is None:  # (one that shared its connection to the site)
                    flow.metadata[ERROR_ANSWER] = refusal_response(
                        state.decision, Outcome.FORWARDED, state.id, flow.request.method
                    )
            elif flow.request.timestamp_end is None and not flow.request.stream:
                # Gone, cancelled (or closed as too slow) before its request was complete:
                # mitmproxy sends a request on only once it has all of it (unless it streams
                # it), so the site never saw this one. Refused: taken nothing but the admission.
                self._settle(state)
                state.forwarded = False
                state.decision = refuse(
                    Reason.INTERRUPTED,
                    "the client cancelled its request (an HTTP/2 stream reset) before it was "
                    "sent to the site"
                    if flow.metadata.get(CLIENT_RESET)
                    else "the client did not finish sending its request; nothing of it was sent "
                    "to the site",
                    site=state.site,
                )
            elif kind is None and flow.response is None and not _reached(flow):
                # The connection to the site was not made yet: nothing was sent to it.
                self._settle(state)
                state.forwarded = False
                state.decision = refuse(
                    Reason.INTERRUPTED,
                    "the client went away before the gateway's connection to the site was "
                    "made; nothing was sent to the site",
                    site=state.site,
                )
            elif flow.request.timestamp_end is None:
                # A streamed body: the site had the start of it.
                state.decision = refuse(
                    Reason.INTERRUPTED,
                    "the client did not finish sending its request",
                    site=state.site,
                )
            elif kind is None and flow.response is None:
                state.decision = refuse(
                    Reason.INTERRUPTED,
                    "the client hung up before the site answered",
                    site=state.site,
                )
            elif kind is None:  # (the gateway's own kills are recorded before this hook)
                state.decision = refuse(
                    Reason.INTERRUPTED,
                    "the client hung up while the answer was being delivered"
                    if state.stream is not None
                    else "the client hung up while the gateway was receiving the answer "
                    "(nothing of it was delivered)",
                    site=state.site,
                )
            elif kind is not None:  # the site's failure, before its answer or mid-body
                if timeout is not None:
                    reason, rule = Reason.UPSTREAM_TIMEOUT, f"network.{timeout[0]}_timeout"
                else:
                    reason, rule = Reason.UPSTREAM_ERROR, None
                state.decision = refuse(reason, message, rule=rule, site=state.site)
                # Sent where mitmproxy would send its HTML error page (no response head has
                # gone out; addons/client_events.py): the reason and request id, as for refusals.
                flow.metadata[ERROR_ANSWER] = refusal_response(
                    state.decision, Outcome.FORWARDED, state.id, flow.request.method
                )
            if state.stream is not None and flow.response is not None and state.answer is None:
                self._cut_short(state, flow.response, state.stream)  # mid-body, either side
            elif flow.response is not None and state.answer is None and not state.settled:
                # Buffered, and broken off mid-body by either side: the site sent what came of
                # it, charged to its bytes_per_day and on the record (not hashed: not whole).
                state.answer = SiteAnswer.broken_off(flow)
        self._finish(flow, state)

    def release_held(self) -> int:
        """The drain ran out: requests held for a budget (`on_exceed: delay`) are answered
        503 draining now, by their own hooks, not dropped by the stop. Returns how many."""
        held = [waiting for waiting_set in self._held.values() for waiting in waiting_set]
        for waiting in held:
            waiting.cancel()
        return len(held)

    async def end_conversations(self, timeout: float) -> int:
        """The gateway stops: every WebSocket still open is closed from here (1001 "going
        away" to both sides) and recorded before the fetch log closes, `timeout` seconds at
        most. Returns how many were open; what is left open after it is logged as before
        (`websocket_not_recorded`) when mitmproxy ends it."""
        open_now = list(self._talking.values())
        if not open_now:
            return 0
        server = ctx.master.addons.get("proxyserver")
        for flow in open_now:
            try:
                server.inject_event(websocket_limit.going_away(flow))
            except ValueError:  # its client connection has just gone: ending on its own
                pass
        deadline = time.monotonic() + timeout
        while self._talking and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(open_now)

    def record_unfinished(self) -> int:
        """The drain ran out: every request still under way is stopped and recorded now, as
        interrupted, with what had come of its response (status, bytes, hash, signals), and its
        budget settled with those bytes; one still being decided (nothing of it left) is
        recorded refused `draining`. Returns how many."""
        unfinished = list(self._under_way.values())
        self._let_go(
            unfinished,
            "the gateway stopped: its drain time (--drain-seconds) ran out while this "
            "response was under way",
        )
        undecided = list(self._deciding.values())
        for flow, state in undecided:
            if state.lease is not None and not state.forwarded:
                self.rt.budgets.finish(state.lease)  # admitted, but it never left
                state.lease = None
            if state.decision is None or state.decision.allowed:  # else: refused, unsent
                state.decision = refuse(
                    Reason.DRAINING,
                    "the gateway stopped: its drain time (--drain-seconds) ran out while this "
                    "request was being decided; nothing of it was forwarded",
                    site=state.site,
                )
            self._record(flow, state)
            if flow.killable:
                flow.kill()
        return len(unfinished) + len(undecided)

    def _let_go(self, flows: list[tuple[http.HTTPFlow, FlowState]], why: str) -> None:
        """Stop requests the gateway gives up on, each recorded interrupted (`why`) with what
        had come of its response, its budget settled with those bytes (once: one mitmproxy
        ended meanwhile is left as it was recorded)."""
        for flow, state in flows:
            if state.settled or state.recorded:
                continue
            state.decision = refuse(Reason.INTERRUPTED, why, site=state.site)
            resp = flow.response
            if resp is not None and state.answer is None:
                if state.stream is not None:
                    self._cut_short(state, resp, state.stream)
                else:  # buffered: what came of its body, counted as it came
                    state.answer = SiteAnswer.broken_off(flow)
            self._finish(flow, state)
            if flow.killable:
                flow.kill()

    def _cut_short(self, state: FlowState, resp: http.Response, stream: ResponseStream) -> None:
        """A streamed body the site broke off: the record has the bytes that came and their
        hash, and what the scan found in them (an opt-out found makes it withheld: nothing of
        the body was delivered)."""
        state.answer = SiteAnswer.streamed(resp, stream)
        assessment = stream.cut_short()
        if assessment is None:
            return
        for name in assessment.signals:
            if name not in state.signals:
                state.signals.append(name)
        if assessment.decision is not None:
            state.withheld = assessment.decision

    def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        self._settle(state)
        self._record(flow, state)

    def _settle(self, state: FlowState) -> None:
        """A forwarded request's in-flight count and budget lease given back (once)."""
        if state.forwarded and not state.settled:
            state.settled = True
            self._under_way.pop(state.id, None)
            self.rt.in_flight -= 1
            metrics.IN_FLIGHT.set(self.rt.in_flight)
            answer = state.answer
            if answer is not None and state.ctx is not None and not state.throttle_noted:
                # A 429/503 from the site pauses it for every replica (its Retry-After honoured).
                self.rt.budgets.site_answered(state.ctx.site, answer.status, answer.retry_after)
            received = answer.body_bytes if answer is not None else None
            if received is None and state.stream is not None:
                received = state.stream.received
            self.rt.budgets.finish(state.lease, response_bytes=received or 0)

    def _fail(self, flow: http.HTTPFlow, error: Exception) -> None:
        """After a hook raised: nothing more leaves or is delivered; the fetch is still
        recorded and its budget lease released, if the hook got that far."""
        if flow.killable:
            flow.kill()
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.recorded:
            return
        if state.lease is not None and not state.forwarded:
            self.rt.budgets.finish(state.lease)  # admitted, but it never left
            state.lease = None
        state.decision = refuse(
            Reason.INTERRUPTED,
            f"the gateway failed on this request ({type(error).__name__}) and stopped it",
            site=state.site,
        )
        try:
            self._finish(flow, state)
        except Exception:
            log.exception("record_failed", id=state.id)

    # -- connection bookkeeping ------------------------------------------------------------

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client, None)
        for waiting in self._held.pop(client, ()):
            waiting.cancel()
        gone = [
            (flow, state) for flow, state in self._under_way.values() if flow.client_conn is client
        ]
        if gone:
            # mitmproxy ends most of them itself (their error hook); not an HTTP/2 stream still
            # waiting for its connection to the site when the browser closed: no hook ever came,
            # and its concurrency slot was renewed for good. What is left then is let go here.
            asyncio.get_running_loop().call_later(
                ABANDON_AFTER,
                self._let_go,
                gone,
                "the scraper went away while the request was under way",
            )

    async def _admit_held(
        self,
        flow: http.HTTPFlow,
        ctx: RequestContext,
        refused_meanwhile: Callable[[], Decision | None],
    ) -> Admission | Decision | None:
        """A delay-mode admission, given up (None, nothing consumed) if the client goes away
        while its request is held: a dead request must neither take the budget nor make live
        ones wait behind it. Asked every HELD_RECHECK_SECONDS whether the policy now refuses
        it (`refused_meanwhile`): then given up too, and that refusal returned (a takedown
        answered a request held for a minute only when its turn came: a docs probe)."""
        if flow.metadata.get(CLIENT_RESET):
            return None  # cancelled (an HTTP/2 stream reset) before its turn came
        waiting = asyncio.ensure_future(self._admit_with_room(flow, ctx))
        held = self._held.setdefault(flow.client_conn, set())
        held.add(waiting)
        flow.metadata[HELD] = waiting  # HttpGuard cancels it when the scraper resets the stream
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=HELD_RECHECK_SECONDS)
                if done:
                    return waiting.result()  # (CancelledError if let go: below)
                refusal = refused_meanwhile()
                if refusal is not None:
                    waiting.cancel()
                    await asyncio.wait({waiting})
                    if not waiting.cancelled() and waiting.exception() is None:
                        late = waiting.result()  # its turn came as it was let go
                        if late.decision.allowed:
                            self.rt.budgets.finish(late.lease)
                    return refusal
        except asyncio.CancelledError:
            if not waiting.done():
                waiting.cancel()  # this hook's own cancel: the admission goes with it
            if waiting.cancelled() and (
                self.rt.stopping
                or not flow.client_conn.connected
                or flow.metadata.get(CLIENT_RESET)
            ):
                # Let go by client_disconnected, HttpGuard or the end of the drain
                # (release_held), not this hook's own cancel.
                return None
            raise
        finally:
            held.discard(waiting)
            flow.metadata.pop(HELD, None)

    async def _admit_with_room(self, flow: http.HTTPFlow, ctx: RequestContext) -> Admission:
        """The site's admission, once the scraper's HTTP/2 connection is down to
        MAX_UNREAD_ANSWERS of answers it has not read; if answers that came while the request
        was held for its turn took it past that again, it waits once more, its budgets taken
        (given back if it is let go meanwhile). The waits count as its `waited`."""
        client = flow.client_conn
        unread = read_backpressure.unread_answers(client)
        if unread > read_backpressure.MAX_UNREAD_ANSWERS and not client.__dict__.get(_UNREAD_NOTED):
            client.__dict__[_UNREAD_NOTED] = True  # (once until the client reads)
            log.info(
                "requests_held_for_unread_answers",
                client_ip=flow.metadata[META].client_ip,
                site=ctx.site.key,
                unread_bytes=unread,
                detail="the client's HTTP/2 connection has not read the answers it was given; "
                "its next requests wait until it does",
            )
        for_room = await read_backpressure.room_for_answers(client)
        admission = await self.rt.admit(ctx)
        if admission.decision.allowed:
            try:
                for_room += await read_backpressure.room_for_answers(client)
            except BaseException:
                self.rt.budgets.finish(admission.lease)
                raise
        if not for_room:
            return admission
        client.__dict__.pop(_UNREAD_NOTED, None)
        return replace(admission, waited=admission.waited + for_room)

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """The CONNECT an upstream proxy is sent for an https:// request sent without CONNECT
        names the address checked for it: the request keeps the site's name (SNI and the
        certificate check, `_name_the_tls_target`), and the upstream proxy resolves nothing."""
        pins = self._tls_pins.get(flow.client_conn)
        pinned = None if pins is None else pins.get((flow.request.host, flow.request.port))
        if pinned is None:
            return
        authority = f"{_bracket(pinned)}:{flow.request.port}"
        flow.request.host = pinned
        flow.request.authority = authority
        if "host" in flow.request.headers:
            flow.request.headers["host"] = authority

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Last line of the SSRF guard: only checked, pinned addresses are ever connected to.

        Every request path pins the address it checked before mitmproxy connects, so a host name
        here means a path we did not govern; refuse it rather than let mitmproxy resolve it.
        """
        if data.server.address is None:
            return
        pins = self._tls_pins.get(data.client)
        if pins is not None and (pinned := pins.get(data.server.address)) is not None:
            # An https:// request sent without CONNECT: its TLS name (SNI, and what the site's
            # certificate is checked against) stays the site's, its connection goes to the
            # address checked for it, and is reused for the name (addons/named_connections.py).
            named_connections.remember(data.client, data.server, data.server.address)
            data.server.address = (pinned, data.server.address[1])
        tunnel = self.tunnels.get(data.client)
        if tunnel is not None and tunnel.refusal is not None:
            # A tunnel to nowhere: whatever asks for a connection in it (an IP literal the
            # SSRF guard would admit, say) gets none.
            data.server.error = f"the tunnel to {tunnel.host} was refused: {tunnel.refusal.reason}"
            return
        reason = self.rt.governor.connect_refusal(data.server.address[0], data.server.address[1])
        if reason is not None:
            data.server.error = reason

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.sockname:
            self.egress_ips[data.client] = str(data.server.sockname[0])

    # -- helpers ---------------------------------------------------------------------------

    def _name_the_tls_target(self, flow: http.HTTPFlow, host: str, port: int) -> None:
        """An https:// request sent without CONNECT (absolute-form, to an http:// or https://
        proxy URL): mitmproxy opens its TLS connection to the request's host, names it in SNI
        and checks the site's certificate against it. With the pinned address as the host it
        would send no SNI and check the certificate against the address: a site's own
        certificate (naming its name) refused, any certificate naming the address taken for
        the site's, and one connection shared by every name on that address. So the request
        keeps the name, and server_connect connects to the address checked for it (through an
        upstream proxy, http_connect_upstream asks the proxy for that address)."""
        pinned = flow.request.host
        if pinned == host:
            return  # named by its address (network.allow_ip_literals)
        pins = self._tls_pins.setdefault(flow.client_conn, {})
        previous = pins.pop((host, port), None)
        if previous is not None and previous != pinned:
            # Moved (a reload, a new DNS answer): the connection to the name's earlier address
            # is not reused for it. (A client's connections are its own: one new to the name
            # has none to it.)
            named_connections.forget(flow.client_conn, (host, port), unless_at=(pinned, port))
        pins[(host, port)] = pinned
        if len(pins) > _MAX_TLS_PINS:
            oldest = next(iter(pins))  # the client has moved on from it
            del pins[oldest]
            # reused only with its pin, checked again
            named_connections.forget(flow.client_conn, oldest)
        flow.metadata[PINNED] = (pinned, port)
        flow.request.data.host = host

    def _decided(self, state: FlowState) -> None:
        """No longer being decided: forwarded (counted in flight from here), or recorded."""
        if self._deciding.pop(state.id, None) is not None:
            self.rt.deciding = len(self._deciding)

    def _new_state(self, flow: http.HTTPFlow, url: str, method: str) -> FlowState:
        """The flow's state, on the flow from the start (a hook that fails still records it)."""
        peer = flow.client_conn.peername
        state = FlowState(
            id=uuid.uuid4().hex,
            started=flow.request.timestamp_start or time.time(),
            identity=None,
            client_ip=str(peer[0]) if peer else None,
            method=method,
            url=url,
            compiled=self.rt.compiled,
        )
        flow.metadata[META] = state
        self._deciding[state.id] = (flow, state)
        self.rt.deciding = len(self._deciding)
        return state

    def _sanitize(self, req: http.Request) -> None:
        # One pass over the raw fields (names compared as ASCII, as HTTP does), not a deletion
        # per header: this runs on every request.
        fields = req.headers.fields
        named = _connection_named(req.headers.get("connection"))
        kept = tuple(
            field
            for field in fields
            if not (
                (name := _field_name(field[0])).startswith(_STRIPPED_PREFIXES)
                or name in _HOP_BY_HOP
                or name in named
            )
        )
        if len(kept) != len(fields):
            req.headers.fields = kept
        if named:
            options = [
                t
                for t in inputs.header_tokens(req.headers.get("connection"))
                if t in _CONNECTION_OPTIONS
            ]
            if options:
                req.headers["connection"] = ", ".join(options)
            else:
                req.headers.pop("connection", None)

    def _respond(self, flow: http.HTTPFlow, decision: Decision) -> None:
        state: FlowState | None = flow.metadata.get(META)
        flow.response = refusal_response(
            decision, request_id=state.id if state else None, method=flow.request.method
        )

    def _choose_upstream_proxy(
        self, flow: http.HTTPFlow, identity: Identity, state: FlowState
    ) -> UpstreamProxy | None:
        pool = state.compiled.loaded.policy.egress.upstream_proxies
        if not pool:
            return None
        chosen: UpstreamProxy | None
        if identity.upstream_proxy is not None:
            chosen = next(p for p in pool if p.name == identity.upstream_proxy)
        else:
            # Spread over the pool per client connection: its requests keep one proxy (one
            # egress for the site to see, and keep-alive connections stay reused).
            kept = self._pool_choices.get(flow.client_conn)
            chosen = next((p for p in pool if p == kept), None)  # (one the pool still has)
            if chosen is None:
                chosen = pool[self._proxy_turn % len(pool)]
                self._proxy_turn += 1
                self._pool_choices[flow.client_conn] = chosen
        flow.server_conn.via = server_spec.parse(chosen.url, "http")
        state.upstream_proxy = chosen.name
        return chosen

    def _observe_governance(self, started: float, ctx: RequestContext | None = None) -> None:
        """The gateway's decision time: not what the request waited for the site's files or,
        in delay mode, for its budget (`ctx.waited`)."""
        waited = ctx.waited if ctx is not None else 0.0
        metrics.GOVERNANCE_SECONDS.observe(max(0.0, time.perf_counter() - started - waited))

    def _build_record(
        self, flow: http.HTTPFlow, state: FlowState, *, forwarded: bool | None = None
    ) -> FetchRecord:
        decision = state.decision
        policy = state.compiled.loaded.policy
        forwarded = state.forwarded if forwarded is None else forwarded
        return FetchRecord(
            id=state.id,
            ts=utc_timestamp(state.started),
            method=state.method,
            url=state.url,
            decision=str(Outcome.FORWARDED if forwarded else Outcome.REFUSED),
            reason=str(decision.reason if decision else Reason.OK),
            rule=decision.rule if decision else None,
            team=state.identity.team if state.identity else None,
            project=state.project,
            account=state.account,
            client_ip=state.client_ip,
            egress_provider=policy.egress.provider,
            egress_public_ips=[str(ip) for ip in policy.egress.public_ips],
            upstream_proxy=state.upstream_proxy,
            site=state.site,
            signals=list(state.signals),
            legal_basis=state.basis,
            policy_version=state.compiled.version,
            user_agent=policy.crawler.user_agent,
        )

    def _record(self, flow: http.HTTPFlow, state: FlowState, *, deliverable: bool = False) -> None:
        """Write the request's record (once). `deliverable`: its answer has not gone out yet
        (the response hook, a buffered answer), so it is not delivered if its record cannot be
        written."""
        if state.recorded:
            return  # one record per request, whoever gets there first
        state.recorded = True
        self._decided(state)
        rec = self._finished_record(flow, state)
        try:
            data = self.rt.record(rec)
        except FetchLogClosed:
            # Still under way when the gateway stopped: if it was forwarded, the fetch log
            # recorded it as interrupted when it closed.
            log.info("record_after_stop", id=rec.id, decision=rec.decision, reason=rec.reason)
            return
        except OSError:  # no room in the spool (a full disk): logged by the fetch log
            rec, data = self._record_when_room(flow, state, deliverable=deliverable), None
        self._count(flow, state, rec, data)

    def _record_when_room(
        self, flow: http.HTTPFlow, state: FlowState, *, deliverable: bool
    ) -> FetchRecord:
        """A record the spool had no room for. An answer not yet delivered is replaced with
        503 audit_unavailable, as the request hooks refuse while the fetch log takes nothing: a
        scraper never has an answer whose record could be lost (a crash before the spool has
        room would leave only its begin: "interrupted, response unknown"). A forwarded
        request's record (its begin is in the spool) is kept and written once the spool has
        room; any other is then a refusal, counted like those past the spool's limit."""
        if deliverable:
            refusal = _audit_unavailable(state.site)
            if state.forwarded:
                state.withheld = state.withheld or refusal
            else:  # the robots.txt cache's answer
                state.decision, state.cached_robots = refusal, False
            outcome = Outcome.WITHHELD if state.forwarded else Outcome.REFUSED
            flow.response = refusal_response(refusal, outcome, state.id, flow.request.method)
            if flow.request.http_version.startswith("HTTP/1"):
                flow.response.headers["connection"] = "close"  # as _refuse does for it
        rec = self._finished_record(flow, state)
        if state.forwarded or self.rt.fetch_log.has_begun(rec.id):
            # (begun and refused before it left: its begin closes only with its record)
            self.rt.fetch_log.keep_until_room(rec)
            return rec
        try:
            self.rt.record(rec)  # a refusal: counted, not raised (FetchLog.append)
        except OSError:
            # A robots.txt cache answer that went out before the spool filled (its client gone
            # while it was delivered): nothing left the gateway for it.
            log.error("record_not_written", id=rec.id, decision=rec.decision, reason=rec.reason)
        return rec

    def _finished_record(self, flow: http.HTTPFlow, state: FlowState) -> FetchRecord:
        """The request's record as it ended: its answer, or why there was none."""
        rec = self._build_record(flow, state)
        now = time.time()
        answer = state.answer
        if state.forwarded:
            server = flow.server_conn
            rec.egress_ip = (
                str(server.sockname[0])
                if server.sockname
                else self.egress_ips.get(flow.client_conn)
            )
            rec.request_bytes = len(flow.request.raw_content or b"")
        if answer is not None:
            rec.status = answer.status
            rec.content_type = answer.content_type
            rec.response_bytes = answer.body_bytes or 0
            if state.method == "HEAD" or answer.status in _NO_CONTENT:
                # No content came (RFC 9110 6.4.1): no content ID, not the empty body's hash.
                rec.content_sha256 = None
            else:
                rec.content_sha256 = answer.sha256
                if answer.sha256 is None:
                    rec.note = "streamed past the buffer limit by mitmproxy: body not hashed"
            now = answer.finished
        elif state.refused_tunnel:
            rec.status = 200
            rec.note = (
                "tunnel opened to nowhere: each request in it is answered with this refusal "
                "and recorded"
            )
        elif flow.response is not None:
            rec.status = flow.response.status_code
            if state.cached_robots:
                body = flow.response.raw_content or b""
                rec.decision = str(Outcome.SERVED)
                if state.method != "HEAD":
                    rec.content_sha256 = hashlib.sha256(body).hexdigest()
                rec.response_bytes = len(body)
                rec.note = "served from the gateway's robots.txt cache"
        elif not state.forwarded and (refused := flow.metadata.get(ERROR_ANSWER)) is not None:
            rec.status = refused.status_code  # a refusal sent where mitmproxy's error page goes
        if state.withheld is not None:
            rec.decision = str(Outcome.WITHHELD)
            rec.reason = str(state.withheld.reason)
            rec.rule = state.withheld.rule
            rec.note = "withheld: the body was not delivered to the scraper"
            if state.withheld.reason is Reason.AUDIT_UNAVAILABLE:
                rec.note += (
                    " (the fetch log's spool had no room for this record when the answer "
                    "came: the scraper was answered 503 audit_unavailable; written once it had)"
                )
            if state.decision is not None and state.decision.reason in _NOTED_REASONS:
                rec.note += f"; then {inputs.recordable(state.decision.detail)}"  # broken off, say
        elif state.decision is not None and state.decision.reason in _NOTED_REASONS:
            rec.note = inputs.recordable(state.decision.detail)  # what went wrong, for the auditor
        rec.duration_ms = round(max(0.0, now - state.started) * 1000, 3)
        return rec

    def _count(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        rec: FetchRecord,
        data: dict[str, object] | None,
    ) -> None:
        """A recorded decision's metrics and its canonical log line."""
        if state.answer is not None and flow.request.timestamp_end:
            metrics.UPSTREAM_SECONDS.observe(
                max(0.0, state.answer.finished - flow.request.timestamp_end)
            )
        metrics.TOTAL_SECONDS.observe(rec.duration_ms / 1000)
        labels = self.rt.site_labels
        site_label = labels.observe(rec.site) if rec.decision in _REACHED else labels.peek(rec.site)
        team_label = rec.team or "_none"
        if not state.refused_tunnel:
            # A tunnel opened to nowhere is no request to the site: each request in it is
            # counted on its own (as the report leaves the tunnel's record out).
            metrics.count_request(site_label, team_label, rec.decision, rec.reason)
        if rec.response_bytes:
            metrics.count_response_bytes(site_label, team_label, rec.response_bytes)
        for signal in rec.signals:
            metrics.OPTOUT_SIGNALS.labels(site=site_label, signal=signal).inc()
        # One canonical line per decision, joinable with the fetch record by id/replica/seq.
        log.info(
            "decision",
            id=rec.id,
            replica=self.rt.replica,
            # None: counted, not kept (a refusal), or kept until the spool has room
            seq=data["seq"] if data is not None else None,
            team=rec.team,
            project=rec.project,
            client_ip=rec.client_ip,
            method=rec.method,
            url=rec.url,
            site=rec.site,
            decision=rec.decision,
            reason=rec.reason,
            rule=rec.rule,
            status=rec.status,
            signals=rec.signals,
            response_bytes=rec.response_bytes,
            duration_ms=rec.duration_ms,
        )


def _reached(flow: http.HTTPFlow) -> bool:
    """Whether the connection to the site (its TLS too, for https) was made for this flow."""
    server = flow.server_conn
    if server.timestamp_tcp_setup is None:
        return False
    return server.tls is False or server.timestamp_tls_setup is not None


def _h2_words(message: str) -> bool:
    """Whether mitmproxy's flow error is one its HTTP/2 layer gives for either side."""
    return message.startswith("stream reset by client") or message == "peer closed connection"


def _audit_unavailable(site: str | None) -> Decision:
    return refuse(
        Reason.AUDIT_UNAVAILABLE,
        "the fetch log cannot take more records; fetching resumes when it recovers",
        rule="audit.spool_max_bytes",  # the bound its spool reached (or a spool it cannot write)
        site=site,
        retry_after=30,
    )


def _draining(site: str) -> Decision:
    return refuse(
        Reason.DRAINING,
        "this gateway replica is stopping; retry on a new connection",
        retry_after=1,
        site=site,
    )


def _auth_required() -> Decision:
    return refuse(
        Reason.AUTH_REQUIRED,
        "send Proxy-Authorization: Basic base64(team:token) with your team's token",
        rule="teams",
    )


def _bad_request(problem: str | None) -> Decision:
    return refuse(Reason.BAD_REQUEST, problem or "the request could not be understood")


# Refusals whose detail the fetch record keeps as its note.
_NOTED_REASONS = frozenset(
    {Reason.UPSTREAM_TIMEOUT, Reason.UPSTREAM_ERROR, Reason.INTERRUPTED, Reason.BAD_REQUEST}
)


async def _sha256(body: bytes) -> str:
    """A buffered body's hash; from HASH_OFF_LOOP up on a worker thread (hashlib lets go of the
    GIL): ~1 ms per MiB that every other request on the event loop would wait for."""
    if len(body) < HASH_OFF_LOOP:
        return hashlib.sha256(body).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())


def _hide_own_headers(req: http.Request) -> tuple[str, ...]:
    """A CORS preflight asks the site whether the real request may carry its headers
    (`Access-Control-Request-Headers`). X-Crawl-* are the gateway's and never reach the site:
    their names are taken out of the question, and returned for `_allow_own_headers`."""
    asked = req.headers.get("access-control-request-headers")
    if asked is None:
        return ()
    names = _field_names(asked)
    own = tuple(name for name in names if name.lower().encode().startswith(_OWN_PREFIX))
    if own:
        rest = [name for name in names if name not in own]
        if rest:
            req.headers["access-control-request-headers"] = ",".join(rest)
        else:
            del req.headers["access-control-request-headers"]
    return own


def _allow_own_headers(resp: http.Response, own: tuple[str, ...]) -> None:
    """The site's answer to a preflight, with the gateway's own header names allowed where the
    site allowed the request's origin: a browser would otherwise refuse to send the real request
    because of headers the site never sees."""
    if resp.headers.get("access-control-allow-origin") is None:
        return  # the site refused the origin: nothing of ours would change that
    allowed = _field_names(resp.headers.get("access-control-allow-headers", ""))
    present = {name.lower() for name in allowed}
    missing = [name for name in own if name.lower() not in present]
    if missing:
        resp.headers["access-control-allow-headers"] = ", ".join([*allowed, *missing])


def _field_names(value: str) -> list[str]:
    """The names of a comma-separated list of header names (CORS's), empty items left out."""
    return [name for item in value.split(",") if (name := item.strip())]


def _field_name(name: bytes) -> bytes:
    """A field name as the gateway compares it: lower case, and `_` read as `-`. CGI and WSGI
    (PEP 3333), PHP and the servers that feed them name a field HTTP_ + its name upper-cased
    with `-` as `_`: `X_Forwarded_Host` is `X-Forwarded-Host` to the application (Django's
    USE_X_FORWARDED_HOST reads it), and is dropped as that one is."""
    lowered = name.lower()
    return lowered.replace(b"_", b"-") if b"_" in lowered else lowered


def _declared_length(req: http.Request) -> int:
    length = req.headers.get("content-length", "").strip()
    return int(length) if length.isdigit() else 0


def _header_list(headers: http.Headers) -> list[tuple[str, str]]:
    return list(headers.items(multi=True))


def _name_the_checked_host(req: http.Request, scheme: str, host: str, port: int) -> None:
    """The site is told the host the gateway checked. A plain request names its target twice,
    in its URL and in its Host header, and a site's server (one address serves many sites on
    shared hosting and CDNs) answers for the Host header: `GET http://allowed.test/` with
    `Host: blocked.test` would fetch the blocked site under the allowed one's checks, budget and
    record. RFC 9112 3.2.2: a proxy replaces the Host header with the request target's host.
    Inside a tunnel (where a Host naming another host is refused 421) it gives an HTTP/1.0
    request without one the tunnel's, not the server's default site, and an HTTP/2 or 3
    request's :authority is the tunnel's too (its port). Fields that would name
    another host or path to the site's framework are dropped (`_TARGET_OVERRIDES`)."""
    named = authority(scheme, host, port)
    sent: list[bytes] = []
    overridden = False
    for name, value in req.headers.fields:
        if len(name) not in _TARGET_NAME_LENGTHS:
            continue  # (lower-casing every field name costs more than this check)
        lowered = _field_name(name)
        if lowered == b"host":
            sent.append(value)
        elif lowered in _TARGET_OVERRIDES:
            overridden = True
    if overridden:  # (by the fields' own names: `X_Original_URL` is not Headers' x-original-url)
        req.headers.fields = tuple(
            field
            for field in req.headers.fields
            if len(field[0]) not in _TARGET_NAME_LENGTHS
            or _field_name(field[0]) not in _TARGET_OVERRIDES
        )
    if req.authority and req.authority != named and (req.is_http2 or req.is_http3):
        # (`site-a.test:1` in a tunnel to site-a.test:443, say: not the port it goes to)
        req.authority = named
    if sent == [named.encode()]:
        return
    if sent or not (req.is_http2 or req.is_http3):  # HTTP/2 and 3 name it in :authority
        req.headers["host"] = named


# Fields that frameworks and servers behind proxies take as the request's host or path instead
# of its own (Symfony, IIS URL Rewrite, Rails, Django with their forwarded-host settings):
# `X-Original-URL: /private/a.jpg` on a request for `/open/` would be served the disallowed
# path. A scraper has no use for them on the way to a site; they are dropped.
_TARGET_OVERRIDES = frozenset(
    {
        b"x-original-url",
        b"x-original-uri",  # (nginx's auth_request idiom)
        b"x-envoy-original-path",
        b"x-original-host",  # (what ASP.NET Core's forwarded-headers middleware keeps)
        b"x-rewrite-url",
        b"x-forwarded-host",
        b"x-forwarded-server",
        b"x-host",
        b"x-http-host-override",
        b"forwarded",
    }
)
_TARGET_NAME_LENGTHS = frozenset({4, *map(len, _TARGET_OVERRIDES)})


def _ask_for_a_readable_body(req: http.Request) -> None:
    """For a site where opt-outs in a body bind: a body the scan can read. The whole body, not a
    range (one past its first bytes carries none of them; RFC 9110 14.2 lets a server ignore
    Range): the scraper gets it whole (200) or not at all (451). Nor Netscape's
    `Request-Range`, which Apache httpd still honours without a Range. In a coding the gateway
    decodes: not Chrome's dictionary-compressed `dcb`/`dcz`, say."""
    ranged = False
    accepted: list[bytes] = []
    for name, value in req.headers.fields:  # one pass: a Headers lookup costs ~1.5 us
        size = len(name)
        if (size == 5 and name.lower() == b"range") or (
            size == 13 and name.lower() == b"request-range"  # Apache still reads it
        ):
            ranged = True
        elif size == 15 and name.lower() == b"accept-encoding":
            accepted.append(value)
    if ranged:
        for ranging in ("range", "request-range", "if-range"):
            req.headers.pop(ranging, None)
    if accepted:
        asked = b", ".join(accepted).decode("latin-1")
        readable = decodable_only(asked)
        if readable != asked or len(accepted) > 1:
            req.headers["accept-encoding"] = readable


def _read_body(scan: BodyScan, resp: http.Response) -> None:
    """Scan a buffered body, decoded no further than the scan reads (a page's head, an image's
    metadata; HOLD_LIMIT at most: a small compressed body may decode to gigabytes). A body in a
    coding the gateway does not know is read as sent, as a browser renders it; so is one that is
    not in the coding it names from its first bytes on (a JPEG labelled gzip: a client that keeps
    the bytes as sent, curl without --compressed, has that image). One that stops being valid
    after some of it decoded is read that far: its headers' signals count. The record says
    either."""
    body = resp.raw_content or b""
    encoding = _body_codings(resp.headers)
    decoder = BodyDecoder.of(encoding, HOLD_LIMIT)
    if decoder.skipped and body:
        scan.read_as_sent(undecodable(encoding))
    try:
        scan.read(body, decoder)
    except ValueError as e:
        if scan.fed:
            scan.cannot_decode(str(e))
        else:
            scan.read_as_sent(f"{e}; read as sent")
            scan.read(body, BodyDecoder.of("", HOLD_LIMIT))
    scan.finish()


def _body_codings(headers: http.Headers) -> str:
    """The codings a body is in as mitmproxy hands it over: its Content-Encoding, then any
    transfer coding but chunked, applied after it (RFC 9112 6.1). The gateway never asks for
    one (it does not pass TE on), but a site may send one all the same (`gzip, chunked`), and
    mitmproxy undoes only chunked."""
    encoding = headers.get("content-encoding", "")
    transfer = headers.get("transfer-encoding")
    if not transfer or transfer.strip().lower() == "chunked":
        return encoding
    codings = [c.strip() for c in transfer.split(",")]
    applied = [c for c in codings if c and c.lower() not in ("chunked", "identity")]
    return ", ".join([encoding, *applied] if encoding.strip() else applied)


def _note_a_part(scan: BodyScan, req: http.Request, resp: http.Response) -> None:
    """A 206 to a request that went without a range (the gateway takes a scraper's out where
    opt-outs in a body bind): a part of the body, maybe without its metadata or head. What the
    scan reads in it counts; the record says the rest went unread (`body:partial`)."""
    if resp.status_code == 206 and "range" not in req.headers:
        scan.partial = (
            f"the site answered 206 ({resp.headers.get('content-range', 'no Content-Range')}) "
            "to a request without a range: only a part of the body was read"
        )


def _connection_named(value: str | None) -> frozenset[bytes]:
    """The fields a Connection header names beyond the options passed on (usually none)."""
    if not value:
        return frozenset()
    return frozenset(
        t.encode("latin-1", "replace")
        for t in inputs.header_tokens(value)
        if t not in _CONNECTION_OPTIONS and t not in inputs.NEVER_HOP_BY_HOP
    )


def _host_only(authority: str | None) -> str | None:
    if not authority:
        return None
    if authority.startswith("["):
        return authority[1 : authority.find("]")]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _tls_to_the_proxy_itself(stack: list[layer.Layer]) -> bool:
    """The TLS a client speaks to the proxy port (an https:// proxy URL), not the TLS of a site
    inside a tunnel: the first layer under the proxy mode, and the only client TLS layer."""
    return (
        len(stack) >= 2
        and isinstance(stack[0], modes.HttpProxy)
        and isinstance(stack[1], layers.ClientTLSLayer)
        and sum(isinstance(x, layers.ClientTLSLayer) for x in stack) == 1
    )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
