"""The crawlwarden addon: mitmproxy hooks in, governor decisions out.

It holds no policy logic: it reads the flow, asks the governor, and turns the Decision into a
response; then it accounts for the fetch and writes its record.
"""

from __future__ import annotations

import hashlib
import time
import uuid
import weakref
from dataclasses import dataclass
from dataclasses import field

import structlog
from mitmproxy import connection
from mitmproxy import http
from mitmproxy.net import server_spec
from mitmproxy.proxy import layer
from mitmproxy.proxy import layers
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import HTTPMode

from addons.streaming import ResponseStream
from proxy import metrics
from proxy.audit.record import FetchRecord
from proxy.audit.record import utc_timestamp
from proxy.blocklist import normalize_url
from proxy.budgets import Lease
from proxy.decision import Decision
from proxy.decision import Outcome
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.decision import render_refusal
from proxy.governor import RequestContext
from proxy.identity import Identity
from proxy.optout_checks import ROBOTS_PATH
from proxy.optout_checks import Assessment
from proxy.optout_checks import BodyScan
from proxy.originfiles import origin_of
from proxy.runtime import Runtime
from proxy.sites import normalize_host
from proxy.ssrf import IPAddress

log = structlog.get_logger("crawlwarden.decision")

META = "crawlwarden"
# Bodies up to this size are buffered whole, so an opt-out in them can still become a 451; larger
# ones are streamed (see addons/streaming.py). mitmproxy's stream_large_bodies must be above it.
BUFFER_LIMIT = 16 * 2**20
# Headers the scraper sends us that must never reach a site (DESIGN.md, "What a scraper sees").
_STRIPPED_PREFIX = "x-crawl-"
_HOP_BY_HOP = ("proxy-authorization", "proxy-connection", "proxy-authenticate")
_NO_UPSTREAM_LAYERS = (layers.TCPLayer, layers.UDPLayer, layers.DNSLayer, layers.RawQuicLayer)


@dataclass(slots=True)
class Tunnel:
    """A CONNECT tunnel: who opened it and where it goes; every request inside inherits it."""

    identity: Identity
    host: str
    port: int
    address: IPAddress


@dataclass(slots=True)
class FlowState:
    """What we know of one request, carried in flow.metadata between hooks."""

    id: str
    started: float
    identity: Identity | None
    client_ip: str | None
    method: str
    url: str
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
    def of(cls, resp: http.Response, stream: ResponseStream | None) -> SiteAnswer:
        if stream is not None:
            size: int | None = stream.received
            digest: str | None = stream.sha256
        elif resp.stream:
            size = digest = None  # streamed by mitmproxy past its buffer limit: not seen by us
        else:
            body = resp.raw_content or b""
            size, digest = len(body), hashlib.sha256(body).hexdigest()
        return cls(
            resp.status_code,
            resp.headers.get("content-type"),
            size,
            digest,
            resp.timestamp_end or time.time(),
            resp.headers.get("retry-after"),
        )


class Gateway:
    def __init__(self, runtime: Runtime):
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

    # -- connection layering ---------------------------------------------------------------

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Only HTTP leaves the gateway: no raw TCP, UDP or DNS passthrough inside a tunnel."""
        if isinstance(nextlayer.layer, _NO_UPSTREAM_LAYERS):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)

    # -- CONNECT ---------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        gov = self.rt.governor
        host = normalize_host(flow.request.host)
        port = flow.request.port
        state = self._new_state(flow, f"https://{host}:{port}", "CONNECT")
        flow.metadata[META] = state
        identity = gov.authenticate(flow.request.headers.get("proxy-authorization"))
        state.identity = identity
        if identity is None:
            return self._refuse_connect(flow, state, _auth_required(), started)
        site = gov.site_for(host)
        state.site = site.key
        decision = gov.check_host(host)
        address = None
        if decision.allowed:
            address, decision = await gov.target_address(host, site.key)
        if not decision.allowed or address is None:
            return self._refuse_connect(flow, state, decision, started)
        self.tunnels[flow.client_conn] = Tunnel(identity, host, port, address)
        state.recorded = True  # a tunnel is not a fetch: each request inside it is recorded
        # Pin the checked address: the tunnel connects there, and nowhere else.
        flow.request.data.host = str(address)
        if host != str(address):
            flow.server_conn.sni = host
        self._choose_upstream_proxy(flow, identity, state)

    def _refuse_connect(
        self, flow: http.HTTPFlow, state: FlowState, decision: Decision, started: float
    ) -> None:
        state.decision = decision
        self._respond(flow, decision)
        self._observe_governance(started)
        self._record(flow, state)

    # -- requests --------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        req = flow.request
        gov = self.rt.governor
        tunnel = self.tunnels.get(flow.client_conn)
        scheme = req.scheme
        if tunnel is not None:
            identity: Identity | None = tunnel.identity
            host = normalize_host(_host_only(req.host_header) or tunnel.host)
            port = tunnel.port
        else:
            identity = gov.authenticate(req.headers.get("proxy-authorization"))
            host = normalize_host(req.host)
            port = req.port
        url = normalize_url(f"{scheme}://{_bracket(host)}:{port}{req.path}")
        state = self._new_state(flow, url, req.method)
        state.identity = identity
        state.project = _header(req.headers, "x-crawl-project")
        state.account = _header(req.headers, "x-crawl-account")
        flow.metadata[META] = state
        self._sanitize(req)

        if identity is None:
            return self._refuse(flow, state, _auth_required(), started)
        if tunnel is not None and host != tunnel.host:
            return self._refuse(
                flow,
                state,
                refuse(
                    Reason.MISDIRECTED,
                    f"this tunnel was opened for {tunnel.host}; open one for {host}",
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
        decision = gov.check_request(ctx)
        if decision.allowed and tunnel is None:
            address, decision = await gov.target_address(host, ctx.site.key)
            if address is not None:
                # Pin the checked address (no second lookup, no DNS rebinding window).
                req.data.host = str(address)
        if decision.allowed:
            decision = await gov.check_prefetch(ctx)
        if decision.allowed and not self.rt.fetch_log.available:
            decision = _audit_unavailable(ctx.site.key)
        state.signals.extend(ctx.signals)
        state.ctx = ctx
        if not decision.allowed:
            return self._refuse(flow, state, decision, started)
        if req.method in ("GET", "HEAD") and req.path.split("?", 1)[0] == ROBOTS_PATH:
            cached = self.rt.optouts.cached_robots(origin_of(scheme, host, port))
            if cached is not None:
                # The gateway has just read this file for the whole fleet: no second fetch.
                return self._serve_cached_robots(flow, state, cached, started)
        # Budgets last: what they count is exactly what is forwarded (DESIGN.md step 4).
        admission = await self.rt.admit(ctx)
        if not admission.decision.allowed:
            return self._refuse(flow, state, admission.decision, started)

        state.decision = decision
        state.lease = admission.lease
        crawler = self.rt.compiled.loaded.policy.crawler
        req.headers["User-Agent"] = crawler.user_agent
        req.headers["From"] = crawler.contact
        if tunnel is None:
            self._choose_upstream_proxy(flow, identity, state)
        try:
            # In the spool before the request leaves: a kill -9 from here on cannot lose it.
            self.rt.fetch_log.begin(self._build_record(flow, state, forwarded=True))
        except OSError:
            self.rt.budgets.finish(state.lease)
            state.lease = None
            return self._refuse(flow, state, _audit_unavailable(ctx.site.key), started)
        state.forwarded = True
        self.rt.in_flight += 1
        metrics.IN_FLIGHT.set(self.rt.in_flight)
        self._observe_governance(started)

    def _refuse(
        self, flow: http.HTTPFlow, state: FlowState, decision: Decision, started: float
    ) -> None:
        state.decision = decision
        self._respond(flow, decision)
        self._observe_governance(started)

    def _serve_cached_robots(
        self, flow: http.HTTPFlow, state: FlowState, cached: tuple[int, bytes], started: float
    ) -> None:
        status, body = cached
        state.decision = refuse(Reason.ROBOTS_CACHE, "answered from the gateway's robots.txt cache")
        state.cached_robots = True
        flow.response = http.Response.make(
            status,
            body,
            {"Content-Type": "text/plain; charset=utf-8", "X-Crawlwarden-Reason": "robots_cache"},
        )
        flow.response.headers["x-crawlwarden-request-id"] = state.id
        self._observe_governance(started)

    # -- responses -------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        resp = flow.response
        if state is None or not state.forwarded or resp is None or state.ctx is None:
            return
        length = resp.headers.get("content-length", "")
        if not length.isdigit() or int(length) <= BUFFER_LIMIT:
            # Buffered whole and read in the response hook, where a 451 can still replace it.
            # Bodies of unknown length too: mitmproxy buffers them up to stream_large_bodies.
            return
        # Large: stream it, hashing on the way, holding it back until its metadata is read.
        ctx = state.ctx
        headers = _header_list(resp.headers)
        ctype = resp.headers.get("content-type")
        optouts = self.rt.optouts
        status = resp.status_code

        def assess(scan: BodyScan) -> Assessment:
            return optouts.assess_response_sync(ctx, status, headers, b"", ctype, scan=scan)

        state.stream = ResponseStream(
            optouts.body_scan(ctype), resp.headers.get("content-encoding", ""), assess
        )
        resp.stream = state.stream

    async def response(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.recorded or flow.request.method == "CONNECT":
            return
        resp = flow.response
        if resp is not None and state.forwarded and state.ctx is not None:
            await self._assess(flow, state, resp)
        if flow.response is not None:
            flow.response.headers["x-crawlwarden-request-id"] = state.id
        self._finish(flow, state)

    async def _assess(self, flow: http.HTTPFlow, state: FlowState, resp: http.Response) -> None:
        """Read the opt-outs a response carries; withhold it when one binds (DESIGN.md step 6)."""
        assert state.ctx is not None
        state.answer = SiteAnswer.of(resp, state.stream)
        if state.stream is not None:
            assessment = state.stream.assessment
            if assessment is None:  # a stream that ended before anything was decided
                assessment = self.rt.optouts.assess_response_sync(
                    state.ctx, resp.status_code, _header_list(resp.headers), b"", None
                )
        elif resp.stream:
            # Streamed by mitmproxy itself past its buffer: neither read nor hashed by us.
            assessment = await self.rt.optouts.assess_response(
                state.ctx, resp.status_code, _header_list(resp.headers), b"", None
            )
        else:
            assessment = await self.rt.optouts.assess_response(
                state.ctx,
                resp.status_code,
                _header_list(resp.headers),
                _decoded_body(resp),
                resp.headers.get("content-type"),
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
        refusal = render_refusal(assessment.decision, Outcome.WITHHELD)
        flow.response = http.Response.make(refusal.status, refusal.body, refusal.headers)

    def error(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.recorded:
            return
        if state.forwarded:
            message = flow.error.msg if flow.error else "no response"
            kind = metrics.upstream_error_kind(message)
            if kind is not None:  # also a body cut short after the response headers
                metrics.UPSTREAM_ERRORS.labels(kind=kind).inc()
            if flow.response is None:
                reason = Reason.UPSTREAM_TIMEOUT if kind == "timeout" else Reason.UPSTREAM_ERROR
                state.decision = refuse(reason, message, site=state.site)
        self._finish(flow, state)

    def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if state.forwarded:
            self.rt.in_flight -= 1
            metrics.IN_FLIGHT.set(self.rt.in_flight)
            answer = state.answer
            if answer is not None and state.ctx is not None:
                # A 429/503 from the site pauses it for every replica (its Retry-After honoured).
                self.rt.budgets.site_answered(state.ctx.site, answer.status, answer.retry_after)
            received = answer.body_bytes if answer is not None else None
            if received is None and state.stream is not None:
                received = state.stream.received
            self.rt.budgets.finish(state.lease, response_bytes=received or 0)
        self._record(flow, state)

    # -- connection bookkeeping ------------------------------------------------------------

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client, None)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Last line of the SSRF guard: only checked, pinned addresses are ever connected to.

        Every request path pins the address it checked before mitmproxy connects, so a host name
        here means a path we did not govern; refuse it rather than let mitmproxy resolve it.
        """
        if data.server.address is None:
            return
        reason = self.rt.governor.connect_refusal(data.server.address[0], data.server.address[1])
        if reason is not None:
            data.server.error = reason

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.sockname:
            self.egress_ips[data.client] = str(data.server.sockname[0])

    # -- helpers ---------------------------------------------------------------------------

    def _new_state(self, flow: http.HTTPFlow, url: str, method: str) -> FlowState:
        peer = flow.client_conn.peername
        return FlowState(
            id=uuid.uuid4().hex,
            started=flow.request.timestamp_start or time.time(),
            identity=None,
            client_ip=str(peer[0]) if peer else None,
            method=method,
            url=url,
        )

    def _sanitize(self, req: http.Request) -> None:
        for name in list(req.headers.keys()):
            lowered = name.lower()
            if lowered.startswith(_STRIPPED_PREFIX) or lowered in _HOP_BY_HOP:
                del req.headers[name]

    def _respond(self, flow: http.HTTPFlow, decision: Decision) -> None:
        refusal = render_refusal(decision)
        flow.response = http.Response.make(refusal.status, refusal.body, refusal.headers)
        state: FlowState | None = flow.metadata.get(META)
        if state is not None:
            flow.response.headers["x-crawlwarden-request-id"] = state.id

    def _choose_upstream_proxy(
        self, flow: http.HTTPFlow, identity: Identity, state: FlowState
    ) -> None:
        pool = self.rt.compiled.loaded.policy.egress.upstream_proxies
        if not pool:
            return
        if identity.upstream_proxy is not None:
            chosen = next(p for p in pool if p.name == identity.upstream_proxy)
        else:
            # Spread over the pool per client connection, so keep-alive connections stay reused.
            chosen = pool[self._proxy_turn % len(pool)]
            self._proxy_turn += 1
        flow.server_conn.via = server_spec.parse(chosen.url, "http")
        state.upstream_proxy = chosen.name

    def _observe_governance(self, started: float) -> None:
        metrics.GOVERNANCE_SECONDS.observe(time.perf_counter() - started)

    def _build_record(
        self, flow: http.HTTPFlow, state: FlowState, *, forwarded: bool | None = None
    ) -> FetchRecord:
        decision = state.decision
        policy = self.rt.compiled.loaded.policy
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
            policy_version=self.rt.policy_version,
            user_agent=policy.crawler.user_agent,
        )

    def _record(self, flow: http.HTTPFlow, state: FlowState) -> None:
        state.recorded = True
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
            rec.content_sha256 = answer.sha256
            if answer.sha256 is None:
                rec.note = "streamed past the buffer limit by mitmproxy: body not hashed"
            if flow.request.timestamp_end:
                metrics.UPSTREAM_SECONDS.observe(
                    max(0.0, answer.finished - flow.request.timestamp_end)
                )
            now = answer.finished
        elif flow.response is not None:
            rec.status = flow.response.status_code
            if state.cached_robots:
                body = flow.response.raw_content or b""
                rec.content_sha256 = hashlib.sha256(body).hexdigest()
                rec.note = "served from the gateway's robots.txt cache"
        if state.withheld is not None:
            rec.decision = str(Outcome.WITHHELD)
            rec.reason = str(state.withheld.reason)
            rec.rule = state.withheld.rule
            rec.note = "withheld: the body was not delivered to the scraper"
        rec.duration_ms = round(max(0.0, now - state.started) * 1000, 3)
        metrics.TOTAL_SECONDS.observe(rec.duration_ms / 1000)
        data = self.rt.record(rec)
        site_label = self.rt.site_labels.observe(rec.site)
        team_label = rec.team or "_none"
        metrics.count_request(site_label, team_label, rec.decision, rec.reason)
        if rec.response_bytes:
            metrics.count_response_bytes(site_label, team_label, rec.response_bytes)
        for signal in rec.signals:
            metrics.OPTOUT_SIGNALS.labels(site=site_label, signal=signal).inc()
        # One canonical line per decision, joinable with the fetch record by id/replica/seq.
        log.info(
            "decision",
            id=rec.id,
            replica=data["replica"],
            seq=data["seq"],
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


def _audit_unavailable(site: str) -> Decision:
    return refuse(
        Reason.AUDIT_UNAVAILABLE,
        "the fetch log cannot take more records; fetching resumes when it recovers",
        site=site,
        retry_after=30,
    )


def _auth_required() -> Decision:
    return refuse(
        Reason.AUTH_REQUIRED,
        "send Proxy-Authorization: Basic base64(team:token) with your team's token",
        rule="teams",
    )


def _header(headers: http.Headers, name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _header_list(headers: http.Headers) -> list[tuple[str, str]]:
    return list(headers.items(multi=True))


def _decoded_body(resp: http.Response) -> bytes:
    """The body with its Content-Encoding removed (what the opt-out scanners read)."""
    if not resp.headers.get("content-encoding"):
        return resp.raw_content or b""
    try:
        return resp.get_content(strict=True) or b""
    except ValueError:
        return b""


def _host_only(authority: str | None) -> str | None:
    if not authority:
        return None
    if authority.startswith("["):
        return authority[1 : authority.find("]")]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
