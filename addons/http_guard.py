"""HttpGuard: a mitmproxy layer above every HTTP layer, for what mitmproxy itself leaves unbounded.

mitmproxy 12 has no per-request timeouts (and a flow in transit cannot be killed, mitmproxy#4711),
buffers a request head of any size (a FIXME in its HTTP/1 reader), and reads the whole body of a
request before sending the answer an addon set for it, refusals included. A layer sees every event
of one client connection and every command its HTTP layer issues, in mitmproxy's own sans-IO
model, so it can bound all of that without reaching into sockets:

- `idle_client_timeout`: a client connection with no request in flight (nothing sent yet, a
  request head or body trickling in, an idle keep-alive) is closed after this long. Against
  slow-loris; a connection that never sends a byte is left to mitmproxy's `tcp_timeout`, which
  `Limits.watchdog` sets just above every other timeout.
- `max_request_header_bytes`: an HTTP/1 request head larger than this is answered 431 and the
  connection closed, before mitmproxy buffers more of it.
- `max_request_body_bytes` for a body that declared no length (HTTP/2 without `Content-Length`;
  HTTP/1 chunked bodies are refused from their head): once mitmproxy has buffered more than this,
  the flow fails as if the site had (`BODY_REFUSED`), so the gateway records and answers
  `request_too_large`; a request already refused gets its refusal then. The site never sees it:
  past its own threshold mitmproxy would stream the request body on to the site, unbounded (and
  crash on a refused one).
- answer now: a request the gateway refused in `requestheaders` whose body is still on its way
  (the addon sets `ANSWER_NOW`) is answered at once. HTTP/1: the connection half-closed and the
  body drained and discarded for a moment (a "lingering close", so the client reads the answer).
  HTTP/2: the answer on its stream, then RST_STREAM NO_ERROR if the client is still sending.
- `connect_timeout`, `response_timeout` (the longest a site may stay silent mid-exchange) and
  `transfer_timeout` (request complete to response complete): the upstream connection is closed
  and the flow tagged with `TIMEOUT`, so the gateway records and answers `upstream_timeout` (a
  client that already has the response head gets a cut-off body). On an HTTP/2 connection to
  the site that other requests share, only the flow's stream is reset (`_end_at_site`), and the
  silence is the stream's: counted from the last piece of its own answer (addons/
  buffered_bytes.py notes when each came), or from when its request was all sent, not from the
  connection's last data.
- A site's connection the gateway does not read because the scraper has not taken what came
  (addons/read_backpressure.py) is not silent: a scraper that makes no room for that long, or
  is still being waited for at the transfer timeout, has the connection closed as its own doing
  (`SCRAPER_STALLED`, recorded `interrupted`), with the requests sharing it; on an HTTP/2
  connection to the site (and from an HTTP/2 scraper), only the streams the scraper gives no
  window are reset, to the site and to the scraper, and the connection goes on. So is a stream
  whose window to the site the gateway holds back for its scraper (addons/stream_window.py).
- A request waiting for one of mitmproxy's connections to the site (it opens five at most for
  one scraper connection: an HTTP/2 scraper's sixth request at once to a site waits), or for a
  stream of its HTTP/2 connection to the site (the site's limit on streams at once reached),
  has not been sent: none of the three counts that wait. The connect timeout counts from the
  connect, the silence and the transfer from the connect's start or from when the request left
  mitmproxy's stream queue; a connect that times out ends only the requests that waited for it.
- an answer held whole (up to 16 MiB) that an HTTP/2 scraper takes nothing more of for
  `response_timeout` is dropped, its stream reset (`_expire_unread`).

It also has `addons/client_events.py` watch what the HTTP layer tells the client connection's
handler (the gateway's answer instead of mitmproxy's error page, and more).

All timers of a connection share one mitmproxy wakeup for the earliest deadline.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import structlog
from h2.stream import StreamClosedBy
from h2.stream import StreamState
from mitmproxy import connection
from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import HttpLayer
from mitmproxy.proxy.layers.http import ErrorCode
from mitmproxy.proxy.layers.http import HttpConnectHook
from mitmproxy.proxy.layers.http import HttpErrorHook
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.proxy.layers.http import HttpResponseHook
from mitmproxy.proxy.layers.http import RequestProtocolError
from mitmproxy.proxy.layers.http import ResponseProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Client
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.layers.websocket import WebsocketEndHook

from addons import buffered_bytes
from addons import client_events
from addons import read_backpressure
from addons import stream_release
from addons import stream_window
from proxy import inputs
from proxy import units
from proxy.decision import Decision
from proxy.decision import Outcome
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.decision import render_refusal
from proxy.policy import Network

log = structlog.get_logger("crawlwarden.guard")

# flow.metadata keys shared with addons/gateway.py.
FORWARDED = "crawlwarden.forwarded"  # request id of a flow the gateway forwards: deadlines apply
ANSWER_NOW = "crawlwarden.answer_now"  # refused with its body still to come: answer, then close
TIMEOUT = "crawlwarden.timeout"  # set here: which deadline closed the upstream connection
# Set here: (reason, detail) of a body refused once it came (no declared length and too long, or
# on a method that has none).
BODY_REFUSED = "crawlwarden.body_refused"
# Set here: the scraper reset this flow's HTTP/2 stream (RST_STREAM, a browser leaving a page
# keeps its connection). mitmproxy words a reset from either side the same, and holds it back
# from a flow whose hook is under way: the gateway lets a held request go at once, and records
# a cancelled one as the scraper's doing, not the site's.
CLIENT_RESET = "crawlwarden.client_reset"
# Set by the gateway while a request is held for its budget: what to cancel on CLIENT_RESET.
HELD = "crawlwarden.held"
# Set by the gateway: a streamed body it withholds (an opt-out found in it), nothing more of it
# to be delivered; here, on the site's next data, its connection is closed (its stream reset,
# if HTTP/2 streams of other requests share it) and the flow tagged STOPPED, so the rest is not
# downloaded for nothing. The error hook that follows records it withheld.
STOP_DOWNLOAD = "crawlwarden.stop_download"
STOPPED = "crawlwarden.stopped"
# Set here: why the connection to the site was closed when the scraper made no room for more of
# the answer for `response_timeout` (the gateway had stopped reading the site for it, addons/
# read_backpressure.py); the gateway records it `interrupted`, the scraper's doing.
SCRAPER_STALLED = "crawlwarden.scraper_stalled"
# Set here, on an HTTP/2 connection to the site (monotonic): when a request that waited for a
# stream (the site's limit on streams at once reached) was sent, its deadlines counting from
# then; when a request was last seen still being sent, its silence counting from then.
_SENT = "crawlwarden.sent_from_queue"
_SENDING = "crawlwarden.still_sending"
# Set here (monotonic): when the window of a flow's stream to the site, held back while its
# scraper took nothing (addons/stream_window.py), last went back to the site.
_GIVEN_BACK = "crawlwarden.window_given_back"
# Set by the gateway: the checked (address, port) an https:// request sent without CONNECT is
# connected to, its host keeping the site's name (for the TLS name; see Gateway.server_connect).
PINNED = "crawlwarden.pinned"

# How long a refused request's body is read and discarded after the answer went out.
LINGER_SECONDS = 2.0

# Client connections whose tunnel has an HttpGuard of its own (see _expire, "tunnel").
_guarded_tunnels: weakref.WeakSet[connection.Client] = weakref.WeakSet()


class Limits(NamedTuple):
    connect: float
    response: float
    transfer: float
    idle_client: float
    max_header_bytes: int
    max_body_bytes: int

    @classmethod
    def of(cls, network: Network) -> Limits:
        return cls(
            connect=units.parse_duration(network.connect_timeout),
            response=units.parse_duration(network.response_timeout),
            transfer=units.parse_duration(network.transfer_timeout),
            idle_client=units.parse_duration(network.idle_client_timeout),
            max_header_bytes=units.parse_size(network.max_request_header_bytes),
            max_body_bytes=units.parse_size(network.max_request_body_bytes),
        )

    @property
    def watchdog(self) -> int:
        """mitmproxy's `tcp_timeout` (no event at all on a connection): a backstop just above
        the deadlines this layer enforces, so they always fire first."""
        return math.ceil(max(self.connect, self.response, self.idle_client)) + 1


def refusal_response(
    decision: Decision,
    outcome: Outcome = Outcome.REFUSED,
    request_id: str | None = None,
    method: str = "",
) -> http.Response:
    """The gateway's own answer for a decision (proxy.decision.render_refusal) as a response;
    to a HEAD (`method`) without content (RFC 9110 9.3.2: an HTTP/2 client takes DATA on one for
    a protocol error, and never sees the reason, which the headers still give)."""
    refusal = render_refusal(decision, outcome)
    body = b"" if method == "HEAD" else refusal.body
    answer = http.Response.make(refusal.status, body, refusal.headers)
    if request_id is not None:
        answer.headers["x-crawlwarden-request-id"] = request_id
    return answer


def guard_http_layers(top: layer.Layer, limits: Callable[[], Limits]) -> layer.Layer:
    """`top` (a layer chosen in next_layer) with its HTTP layer, if any, under an HttpGuard."""
    if isinstance(top, HttpLayer):
        return HttpGuard(top, limits)
    parent: Any = top
    while (child := getattr(parent, "child_layer", None)) is not None:
        if isinstance(child, HttpLayer):
            parent.child_layer = HttpGuard(child, limits)
            break
        parent = child
    return top


class HttpGuard(layer.Layer):
    def __init__(self, child: HttpLayer, limits: Callable[[], Limits]):
        super().__init__(child.context)
        # Invisible in the layer stack: mitmproxy reads it (HttpStream.mode, next_layer matching).
        self.context.layers.remove(self)
        self.child = child
        self.limits = limits
        self.client = child.context.client
        # (kind, key) -> (when, subject): one deadline per kind and flow or connection, dropped
        # as soon as it no longer applies, so a finished flow is not kept alive by its timers.
        self._deadlines: dict[tuple[str, Any], tuple[float, Any]] = {}
        self._wakeups: dict[commands.RequestWakeup, float] = {}
        self._in_flight: dict[str, http.HTTPFlow] = {}
        self._forwarded: dict[str, tuple[http.HTTPFlow, float]] = {}
        self._opening: set[connection.Server] = set()
        self._upstreams: dict[connection.Server, float] = {}  # transport -> last data received
        self._unsized: dict[int, http.HTTPFlow] = {}  # stream id -> flow, its body of no length
        # HTTP/2 stream id -> bytes of its finished answer the scraper had not taken at the
        # last look (the answer waits in mitmproxy's send buffer for the stream's window).
        self._unread: dict[int, int] = {}
        self._answering: dict[str, int] = {}  # flow id -> its HTTP/2 stream, in its response hook
        # flow id -> (flow, its stream id, the site's HTTP/2 layer) for a request seen waiting in
        # that layer's queue for a stream (the site's limit on streams at once reached).
        self._queued: dict[str, tuple[http.HTTPFlow, int, Http2Client]] = {}
        self._idle_round = 0
        self._tunnel = False  # a CONNECT was accepted: the tunnel's own guard takes over
        self._draining = False  # answered now; the rest of the request is discarded
        if child.context.layers and _is_tunnel(child):
            _guarded_tunnels.add(self.client)

    def __repr__(self) -> str:
        return f"HttpGuard({self.child!r})"

    # -- events in, commands out -----------------------------------------------------------

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command in self._wakeups:
            del self._wakeups[event.command]
            yield from self._expire()
            yield from self._arm()
            return
        if self._draining and isinstance(event, events.DataReceived):
            if event.connection is self.client:
                return  # a refused request's body, or bytes after a refused head: dropped
        if self._tunnel:
            yield from self.child.handle_event(event)
            if isinstance(event, events.ConnectionClosed) and isinstance(
                event.connection, connection.Server
            ):
                # mitmproxy's layer of the CONNECT also keeps every connection opened inside the
                # tunnel (each OpenConnection passes through it): forgotten once closed too.
                stream_release.closed(self.child, event.connection)
            return
        if isinstance(event, events.Start):
            self._idle()
        streams = self._h2_streams(event)
        for command in self.child.handle_event(event):
            self._observe_command(command)
            if streams and isinstance(command, HttpErrorHook):
                # Before the hook runs: a blocking hook pauses this generator until it is done.
                self._note_resets(streams)
            yield command
        if streams:
            self._note_resets(streams)
        if isinstance(event, events.Start):
            client_events.watch(self.child)
        yield from self._observe_event(event)
        yield from self._arm()

    def _h2_streams(self, event: events.Event) -> dict[int, http.HTTPFlow] | None:
        """The flows of the scraper's HTTP/2 streams, before its data is read (a stream it
        resets may be gone from the layer after)."""
        if not (
            isinstance(event, events.DataReceived)
            and event.connection is self.client
            and self.child.streams
            and isinstance(self.child.connections.get(self.client), Http2Server)
        ):
            return None
        return {sid: stream.flow for sid, stream in self.child.streams.items()}

    def _note_resets(self, streams: dict[int, http.HTTPFlow]) -> None:
        server = self.child.connections.get(self.client)
        if not isinstance(server, Http2Server):
            return
        for stream_id, flow in streams.items():
            if flow.metadata.get(CLIENT_RESET) or not _reset_by_peer(server, stream_id):
                continue
            flow.metadata[CLIENT_RESET] = True
            held = flow.metadata.get(HELD)
            if held is not None:
                held.cancel()

    def _observe_command(self, command: commands.Command) -> None:
        if isinstance(command, commands.OpenConnection) and isinstance(
            command.connection, connection.Server
        ):
            server = command.connection
            self._opening.add(server)
            self._upstreams[server] = time.monotonic()
            self._add(self.limits().connect, "connect", server, server)
        elif isinstance(command, HttpRequestHeadersHook | HttpConnectHook):
            self._in_flight[command.flow.id] = command.flow
        elif isinstance(command, HttpRequestHook):
            self._check_complete_body(command.flow)
        elif isinstance(command, HttpResponseHook) and isinstance(
            self.child.connections.get(self.client), Http2Server
        ):
            for stream_id, stream in self.child.streams.items():  # (gone when the hook ends)
                if stream.flow is command.flow:
                    self._answering[command.flow.id] = stream_id
        elif self._queued and isinstance(command, commands.SendData):
            self._note_sent()

    def _observe_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection is self.client:
                yield from self._check_head()
                if stream_window.installed:
                    yield from self._give_back()
                if self._unsized:
                    yield from self._check_unsized_bodies()
            elif event.connection in self._upstreams:
                self._upstreams[event.connection] = time.monotonic()  # type: ignore[index]
                yield from self._stop_withheld(event.connection)  # type: ignore[arg-type]
        elif isinstance(event, events.OpenConnectionCompleted):
            server = event.command.connection
            if isinstance(server, connection.Server) and server in self._opening:
                self._opening.discard(server)
                self._deadlines.pop(("connect", server), None)
                self._upstreams[server] = time.monotonic()
        elif isinstance(event, events.ConnectionClosed):
            if isinstance(event.connection, connection.Server):
                self._upstreams.pop(event.connection, None)
                self._opening.discard(event.connection)
                self._deadlines.pop(("connect", event.connection), None)
                stream_release.closed(self.child, event.connection)
        elif isinstance(event, events.HookCompleted):
            yield from self._hook_completed(event.command)

    def _give_back(self) -> layer.CommandGenerator[None]:
        """The windows of the site's streams whose scrapers have made room go back to the site
        (addons/stream_window.py); their silence counts from now."""
        for stream_id in (yield from stream_window.give_back(self.child)):
            if (stream := self.child.streams.get(stream_id)) is not None:
                stream.flow.metadata[_GIVEN_BACK] = time.monotonic()

    def _stream_held(self, flow: http.HTTPFlow) -> float | None:
        """Since when the window of the flow's stream to the site has been held back for its
        scraper (addons/stream_window.py), if it is."""
        return stream_window.held_since(self._h2_to_site(flow), self._stream_of(flow))

    def _hook_completed(self, hook: commands.StartHook) -> layer.CommandGenerator[None]:
        limits = self.limits()
        if isinstance(hook, HttpRequestHeadersHook):
            flow = hook.flow
            if flow.request.timestamp_end is not None:
                return  # the whole request is in: mitmproxy answers it the usual way
            if flow.metadata.get(ANSWER_NOW) and flow.response is not None:
                yield from self._answer_now(flow)
            else:
                self._add(limits.idle_client, "body", flow.id, flow)
                if "content-length" not in flow.request.headers:
                    for stream_id, stream in self.child.streams.items():
                        if stream.flow is flow:
                            self._unsized[stream_id] = flow
        elif isinstance(hook, HttpRequestHook):
            flow = hook.flow
            if flow.metadata.get(FORWARDED) and flow.response is None:
                self._forwarded[flow.id] = (flow, time.monotonic())
                self._add(limits.response, "silence", flow.id, flow)
                self._add(limits.transfer, "transfer", flow.id, flow)
        elif isinstance(hook, HttpConnectHook):
            answer = hook.flow.response  # mitmproxy has set its 200 by now, unless refused
            if hook.flow.error is None and (answer is None or answer.status_code == 200):
                self._tunnel = True
                self._add(limits.idle_client, "tunnel", None, None)
            else:
                self._done(hook.flow)
        elif isinstance(hook, HttpResponseHook):
            if hook.flow.websocket is None:
                self._watch_unread(hook.flow)
                self._done(hook.flow)
        elif isinstance(hook, HttpErrorHook | WebsocketEndHook):
            self._done(hook.flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        self._forwarded.pop(flow.id, None)
        self._queued.pop(flow.id, None)
        self._answering.pop(flow.id, None)
        if self._unsized:
            self._unsized = {k: f for k, f in self._unsized.items() if f is not flow}
        for kind in ("body", "silence", "transfer"):
            self._deadlines.pop((kind, flow.id), None)
        if self._in_flight.pop(flow.id, None) is not None and not self._in_flight:
            self._idle()

    def _idle(self) -> None:
        self._idle_round += 1
        self._add(self.limits().idle_client, "idle", None, self._idle_round)

    # -- the client side -------------------------------------------------------------------

    def _check_head(self) -> layer.CommandGenerator[None]:
        """An HTTP/1 request head, or bytes pipelined behind a request, past the limit."""
        conn = self.child.connections.get(self.client)
        if not isinstance(conn, Http1Server):
            return  # HTTP/2: the HPACK decoder bounds header lists itself
        limit = self.limits().max_header_bytes
        if len(conn.buf) <= limit:
            return
        if conn.state == conn.read_headers:
            log.warning(
                "request_refused",
                reason=str(Reason.HEADERS_TOO_LARGE),
                client_ip=_peer(self.client),
                limit=limit,
            )
            answer = refusal_response(
                refuse(
                    Reason.HEADERS_TOO_LARGE,
                    f"the request head is larger than {limit} bytes "
                    "(network.max_request_header_bytes)",
                )
            )
            answer.headers["Connection"] = "close"
            yield commands.SendData(self.client, http1.assemble_response(answer))
        if conn.state in (conn.read_headers, conn.wait):
            conn.buf = type(conn.buf)()  # drop what was held, then the connection
            self._draining = True
            yield commands.CloseConnection(self.client)

    def _check_unsized_bodies(self) -> layer.CommandGenerator[None]:
        """A body of no declared length that mitmproxy is buffering, past the policy's limit:
        the flow fails now (past mitmproxy's threshold it would stream it to the site, or, for a
        request already refused, crash on the answer it has). A refused request's answer goes
        out then; a forwarded one's is `request_too_large`."""
        limit = self.limits().max_body_bytes
        for stream_id, flow in list(self._unsized.items()):
            stream = self.child.streams.get(stream_id)
            if stream is None or stream.flow is not flow or flow.request.timestamp_end:
                del self._unsized[stream_id]  # complete: _check_complete_body has it
            elif len(stream.request_body_buf) > limit:
                del self._unsized[stream_id]
                if flow.response is not None:
                    flow.metadata[client_events.ERROR_ANSWER] = flow.response
                else:
                    flow.metadata[BODY_REFUSED] = (Reason.REQUEST_TOO_LARGE, _too_large(limit))
                yield from self._fail_stream(stream_id, stream, "request body too large")

    def _fail_stream(
        self, stream_id: int, stream: Any, message: str
    ) -> layer.CommandGenerator[None]:
        """End an HTTP/2 stream as if its site had failed: mitmproxy calls the error hook, and
        the client gets the flow's ERROR_ANSWER, if it has one (addons/client_events.py), then
        RST_STREAM NO_ERROR if it is still sending."""
        failed = ResponseProtocolError(stream_id, message, ErrorCode.REQUEST_TOO_LARGE)
        for command in self.child.event_to_child(stream, failed):
            self._observe_command(command)
            yield command

    def _check_complete_body(self, flow: http.HTTPFlow) -> None:
        """A body of no declared length that came whole past the limit before it was checked
        (with its head, or in one read), or that a GET, HEAD or TRACE has (HTTP/2 DATA frames:
        forwarded to an HTTP/1 site, it would be read there as another request): killed before
        the request hook, so mitmproxy ends the flow in the error hook. A declared length over
        the limit, or on such a method, was refused from the head."""
        body = flow.request.raw_content
        if not body or not flow.metadata.get(FORWARDED) or not flow.killable:
            return
        limit = self.limits().max_body_bytes
        headers = flow.request.headers
        if len(body) > limit:
            flow.metadata[BODY_REFUSED] = (Reason.REQUEST_TOO_LARGE, _too_large(limit))
            flow.kill()
        elif (unexpected := inputs.unexpected_body(flow.request.method)) is not None:
            flow.metadata[BODY_REFUSED] = (Reason.BAD_REQUEST, unexpected)
            flow.kill()
        elif "content-length" not in headers and "transfer-encoding" not in headers:
            # An HTTP/2 body of no declared length: mitmproxy would send it to an HTTP/1 site
            # after a head without one, and the site would read it as another request.
            headers["content-length"] = str(len(body))

    def _answer_now(self, flow: http.HTTPFlow) -> layer.CommandGenerator[None]:
        answer = flow.response
        assert answer is not None
        conn = self.child.connections.get(self.client)
        if flow.request.is_http2:
            # On its stream, before the body (which mitmproxy would read whole first).
            for stream_id, stream in self.child.streams.items():
                if stream.flow is flow:
                    flow.metadata[client_events.ERROR_ANSWER] = answer
                    yield from self._fail_stream(stream_id, stream, "refused before its body")
            return
        if not isinstance(conn, Http1Server):
            return
        answer.headers["Connection"] = "close"
        self._draining = True
        yield commands.SendData(self.client, http1.assemble_response(answer))
        yield commands.CloseTcpConnection(self.client, half_close=True)
        self._add(LINGER_SECONDS, "linger", None, None)

    # -- deadlines -------------------------------------------------------------------------

    def _add(self, delay: float, kind: str, key: Any, subject: Any) -> None:
        self._deadlines[(kind, key)] = (time.monotonic() + delay, subject)

    def _arm(self) -> layer.CommandGenerator[None]:
        """One wakeup for the earliest deadline, unless one is already due no later."""
        if not self._deadlines:
            return
        when = min(when for when, _ in self._deadlines.values())
        if self._wakeups and min(self._wakeups.values()) <= when + 0.001:
            return
        wakeup = commands.RequestWakeup(max(0.0, when - time.monotonic()))
        self._wakeups[wakeup] = when
        yield wakeup

    def _expire(self) -> layer.CommandGenerator[None]:
        now = time.monotonic()
        if self._queued:
            self._note_sent()  # (also those sent by a command of this guard's own)
        due = sorted(
            ((when, kind, key) for (kind, key), (when, _) in self._deadlines.items()),
            key=lambda item: item[0],
        )
        for when, kind, key in due:
            if when > now + 0.001:
                break
            entry = self._deadlines.pop((kind, key), None)
            if entry is not None:  # an earlier expiry in this round may have dropped it
                yield from getattr(self, f"_expire_{kind}")(entry[1], now)

    def _expire_idle(self, round_: int, now: float) -> layer.CommandGenerator[None]:
        if round_ == self._idle_round and not self._in_flight and not self._tunnel:
            yield commands.CloseConnection(self.client)

    def _watch_unread(self, flow: http.HTTPFlow) -> None:
        """An answer mitmproxy has handed to the scraper's HTTP/2 stream whole (one the gateway
        held until its end: up to 16 MiB) but could not send all of: looked at again after
        `response_timeout`."""
        stream_id = self._answering.pop(flow.id, None)
        server = self.child.connections.get(self.client)
        if stream_id is None or not isinstance(server, Http2Server):
            return
        if left := stream_window.buffered(server, stream_id):
            self._unread[stream_id] = left
            self._add(self.limits().response, "unread", stream_id, stream_id)

    def _expire_unread(self, stream_id: int, now: float) -> layer.CommandGenerator[None]:
        """The scraper took none of the rest of an answer for `response_timeout`: the stream is
        reset (CANCEL), so the gateway does not hold it for as long as the connection lasts.
        One that took some is looked at again later."""
        last = self._unread.pop(stream_id, None)
        server = self.child.connections.get(self.client)
        if last is None or not isinstance(server, Http2Server):
            return
        left = stream_window.buffered(server, stream_id)
        if not left:
            return
        limit = self.limits().response
        if left < last:
            self._unread[stream_id] = left
            self._add(limit, "unread", stream_id, stream_id)
            return
        log.warning(
            "unread_answer_dropped",
            client_ip=_peer(self.client),
            stream=stream_id,
            bytes=left,
            detail=f"the client made no room for more of an answer for {limit:g}s "
            "(network.response_timeout); its HTTP/2 stream was reset",
        )
        yield from server.handle_event(
            ResponseProtocolError(stream_id, "answer not read", ErrorCode.CANCEL)
        )
        read_backpressure.room_made(self.client)

    def _expire_tunnel(self, _: None, now: float) -> layer.CommandGenerator[None]:
        if self.client not in _guarded_tunnels:  # no request inside the tunnel yet
            yield commands.CloseConnection(self.client)

    def _expire_linger(self, _: None, now: float) -> layer.CommandGenerator[None]:
        yield commands.CloseConnection(self.client)

    def _expire_body(self, flow: http.HTTPFlow, now: float) -> layer.CommandGenerator[None]:
        if flow.id in self._in_flight and flow.request.timestamp_end is None:
            log.warning(
                "slow_client_closed",
                client_ip=_peer(self.client),
                detail="the request body did not arrive within network.idle_client_timeout",
            )
            yield commands.CloseConnection(self.client)

    def _expire_connect(
        self, server: connection.Server, now: float
    ) -> layer.CommandGenerator[None]:
        if server not in self._opening:
            return
        limit = self.limits().connect
        if server.timestamp_start is None:
            # Not connecting yet: waiting for one of mitmproxy's connections per site (five for
            # each scraper connection) to be free. Its time counts from when it connects.
            self._add(limit, "connect", server, server)
            return
        if (left := _began(server) + limit - time.monotonic()) > 0.001:
            self._add(left, "connect", server, server)
            return
        for flow in self._waiting_on(server):
            if flow.id in self._forwarded and flow.response is None:
                self._give_up(flow, "connect", f"no connection to the site within {limit:g}s")
        self._opening.discard(server)
        yield commands.CloseConnection(server)

    def _expire_silence(self, flow: http.HTTPFlow, now: float) -> layer.CommandGenerator[None]:
        entry = self._forwarded.get(flow.id)
        if entry is None or (flow.response is not None and flow.response.timestamp_end):
            return
        limit = self.limits().response
        awaited = self._awaited(flow)
        if awaited is not None and awaited.timestamp_start is None:
            # Not sent yet, nor connecting: its connection waits for one of mitmproxy's. The
            # site's silence counts from the connect on (which the connect timeout bounds).
            self._add(limit, "silence", flow.id, flow)
            return
        if self._held_back(flow, limit, "silence"):
            return
        carriers = self._transports(flow)
        held = [t for s in carriers if (t := read_backpressure.held_for_scraper(s)) is not None]
        if (stream_held := self._stream_held(flow)) is not None:
            held.append(stream_held)
        if held:
            # Not read, or its stream given no window, because the scraper has not taken
            # what came: its silence, not the site's.
            since = min(held)
            if now - since + 0.001 < limit:
                self._deadlines[("silence", flow.id)] = (since + limit, flow)
                return
            why = f"made no room for more of the answer for {limit:g}s (network.response_timeout)"
            yield from self._end_stalled(flow, carriers, why, "silence")
            return
        if self._uploading(flow, carriers):
            # Its request still going out on a connection others share: silence counts from
            # when it is all sent (looked at every second till then; the transfer timeout
            # still counts from the request).
            flow.metadata[_SENDING] = now
            self._add(min(limit, 1.0), "silence", flow.id, flow)
            return
        heard = max(
            [
                entry[1],
                *self._site_heard(flow, carriers),
                *(read_backpressure.last_held_for_scraper(s) for s in carriers),
                flow.metadata.get(_GIVEN_BACK, 0.0),
                _began(awaited),
            ]
        )
        if now - heard + 0.001 < limit:
            self._deadlines[("silence", flow.id)] = (heard + limit, flow)
            return
        waited = "response headers" if flow.response is None else "more of the response body"
        self._give_up(flow, "response", f"the site sent no {waited} for {limit:g}s")
        yield from self._end_at_site(flow)

    def _site_heard(self, flow: http.HTTPFlow, carriers: list[connection.Server]) -> list[float]:
        """When the site was last heard from for a flow: on a connection of its own, the
        connection's last data; on an HTTP/2 connection to the site that other requests
        share, the flow's own answer's (its head, the last piece of its body)."""
        if buffered_bytes.installed and self._sharers(flow, carriers):
            head = flow.response.timestamp_start if flow.response is not None else None
            own = [flow.metadata.get(buffered_bytes.HEARD, 0.0), _monotonic(head)]
            return [*own, flow.metadata.get(_SENT, 0.0), flow.metadata.get(_SENDING, 0.0)]
        return [self._upstreams.get(s, 0.0) for s in carriers]

    def _uploading(self, flow: http.HTTPFlow, carriers: list[connection.Server]) -> bool:
        """Whether the flow's request is still being sent, on an HTTP/2 connection to the site
        that other requests share (where its silence is its own, `_site_heard`)."""
        sent = self._h2_to_site(flow)
        ours = None if sent is None else sent.our_stream_id.get(self._stream_of(flow) or 0)
        if sent is None or ours is None or not self._sharers(flow, carriers):
            return False
        stream = sent.h2_conn.streams.get(ours)
        return stream is not None and stream.state_machine.state is StreamState.OPEN

    def _expire_transfer(self, flow: http.HTTPFlow, now: float) -> layer.CommandGenerator[None]:
        if flow.id not in self._forwarded:
            return
        if flow.response is not None and flow.response.timestamp_end:
            return
        limit = self.limits().transfer
        if self._held_back(flow, limit, "transfer"):
            return
        if (late := self._sent_late(flow, limit)) is not None:
            self._add(late, "transfer", flow.id, flow)
            return
        carriers = self._transports(flow)
        if self._stream_held(flow) is not None or any(
            read_backpressure.held_for_scraper(s) is not None for s in carriers
        ):
            # The site waits to be read for the scraper: it is the scraper that is slow.
            why = f"took longer than {limit:g}s to take the answer (network.transfer_timeout)"
            yield from self._end_stalled(flow, carriers, why, "transfer")
            return
        detail = f"the exchange with the site took longer than {limit:g}s"
        self._give_up(flow, "transfer", detail)
        yield from self._end_at_site(flow)

    def _end_stalled(
        self, flow: http.HTTPFlow, carriers: list[connection.Server], why: str, kind: str
    ) -> layer.CommandGenerator[None]:
        """End what a scraper stalled (`why` it did) at the deadline `kind` of `flow`.

        An HTTP/2 connection to the site goes on, for the requests that share it or come
        later: the streams the scraper gives no window (their answers wait in its send buffers)
        are reset, to the site and to the scraper, and the others are read again; `flow`, if
        not one of them, is looked at again after `response_timeout`. Else the connection to
        the site is closed, tagged as the scraper's doing on the flow and on those that shared
        it."""
        sharing = self._sharers(flow, carriers)
        h2 = bool(sharing) or self._h2_to_site(flow) is not None
        stalled = self._stalled_streams(carriers) if h2 else []
        if stalled:
            for stream_id, stalled_flow in stalled:
                yield from self._reset_stalled(stream_id, stalled_flow, why)
            for carrier in carriers:
                read_backpressure.let_go(self.client, carrier)
            if flow.id in self._forwarded:
                self._add(self.limits().response, kind, flow.id, flow)
            return
        flow.metadata.setdefault(
            SCRAPER_STALLED, f"the client {why}; the gateway closed its connection to the site"
        )
        for other in sharing:
            other.metadata.setdefault(
                SCRAPER_STALLED,
                "the gateway closed its connection to the site, which this request shared "
                f"with another of the client's: the client {why}",
            )
        yield from self._close_upstream(flow)

    def _end_at_site(self, flow: http.HTTPFlow) -> layer.CommandGenerator[None]:
        """End a flow the site failed at a deadline (tagged `TIMEOUT`). On an HTTP/2 connection
        to the site that other requests share, only its stream: reset to the site, and ended in
        mitmproxy's stream as if the site had reset it (the gateway's error hook records it and
        answers the scraper, or its stream is reset if the answer had begun). Else the
        connection to the site is closed."""
        stream_id = self._stream_of(flow)
        site = self.child.connections.get(flow.server_conn)
        sent = stream_window.h2_under(site)
        shared = self._sharers(flow, self._transports(flow))
        if not shared or site is None or sent is None or stream_id not in sent.our_stream_id:
            yield from self._close_upstream(flow)
            return
        self._forget(flow)
        why = flow.metadata[TIMEOUT][1]
        yield from self.child.event_to_child(
            site, RequestProtocolError(stream_id, why, ErrorCode.CANCEL)
        )
        if (stream := self.child.streams.get(stream_id)) is not None:
            yield from self.child.event_to_child(
                stream, ResponseProtocolError(stream_id, why, ErrorCode.GENERIC_SERVER_ERROR)
            )

    def _stalled_streams(
        self, carriers: list[connection.Server]
    ) -> list[tuple[int, http.HTTPFlow]]:
        """The scraper's HTTP/2 streams answered on these connections whose answers wait in
        its send buffers: those it gives no window."""
        scraper = self.child.connections.get(self.client)
        if not isinstance(scraper, Http2Server):
            return []
        out = []
        for stream_id, chunks in list(scraper.h2_conn.stream_buffers.items()):
            stream = self.child.streams.get(stream_id)
            if not chunks or stream is None or stream.flow.id not in self._forwarded:
                continue
            if set(self._transports(stream.flow)) & set(carriers):
                out.append((stream_id, stream.flow))
        return out

    def _reset_stalled(
        self, stream_id: int, flow: http.HTTPFlow, why: str
    ) -> layer.CommandGenerator[None]:
        """Reset one stream the scraper stalled, tagged as its doing."""
        note = f"the client {why}; the gateway reset its stream"
        flow.metadata.setdefault(SCRAPER_STALLED, note)
        yield from self._reset_stream(stream_id, flow, note)

    def _reset_stream(
        self, stream_id: int, flow: http.HTTPFlow, note: str
    ) -> layer.CommandGenerator[None]:
        """End one stream the gateway stops, the site's connection going on: reset to the site
        as if the scraper had cancelled it (mitmproxy's stream then resets its stream to the
        site and ends the flow, in the error hook, which records it by the flow's tags), and
        to the scraper (what waited for it is dropped)."""
        self._forget(flow)
        stream = self.child.streams.get(stream_id)
        if stream is not None:
            yield from self.child.event_to_child(
                stream, RequestProtocolError(stream_id, note, ErrorCode.CANCEL)
            )
        scraper = self.child.connections.get(self.client)
        if isinstance(scraper, Http2Server):
            yield from scraper.handle_event(
                ResponseProtocolError(stream_id, note, ErrorCode.CANCEL)
            )

    def _sent_late(self, flow: http.HTTPFlow, limit: float) -> float | None:
        """Seconds left of a flow's `transfer_timeout` counted from when the connect its
        request waited for began, or from when it left the queue for a stream of an HTTP/2
        connection to the site (None: counted from the request, as armed, it is over). A
        request waits uncounted while its connection waits for one of mitmproxy's."""
        awaited = self._awaited(flow)
        server = awaited if awaited is not None else self._carrier(flow.server_conn)
        if server.timestamp_start is None:
            return limit if awaited is not None else None
        left = max(_began(server), flow.metadata.get(_SENT, 0.0)) + limit - time.monotonic()
        return left if left > 0.001 else None

    def _held_back(self, flow: http.HTTPFlow, limit: float, kind: str) -> bool:
        """Whether a flow's request waits in mitmproxy's queue for a stream of the HTTP/2
        connection to the site (the site takes that many at once): not sent yet, so its
        deadline `kind` is looked at again after `limit`, and counts from when it is sent."""
        sent = self._h2_to_site(flow)
        stream_id = self._stream_of(flow)
        if sent is None or stream_id is None or stream_id not in sent.stream_queue:
            return False
        self._queued[flow.id] = (flow, stream_id, sent)
        self._add(limit, kind, flow.id, flow)
        return True

    def _note_sent(self) -> None:
        """The queued requests that have left mitmproxy's stream queue were sent now."""
        for flow_id, (flow, stream_id, sent) in list(self._queued.items()):
            if stream_id not in sent.stream_queue:
                del self._queued[flow_id]
                flow.metadata[_SENT] = time.monotonic()

    def _awaited(self, flow: http.HTTPFlow) -> connection.Connection | None:
        """The TCP connection a flow's request waits for, if mitmproxy's HTTP layer has not
        given it one yet: to the site, or to the upstream proxy its tunnel goes through."""
        for server, asks in self.child.waiting_for_establishment.items():
            if any(_asker(self.child, ask) is flow for ask in asks):
                return self._carrier(server)
        return None

    def _waiting_on(self, carrier: connection.Server) -> list[http.HTTPFlow]:
        """The flows whose requests wait for this TCP connection to be established."""
        return [
            flow
            for server, asks in self.child.waiting_for_establishment.items()
            if self._carrier(server) is carrier
            for ask in asks
            if (flow := _asker(self.child, ask)) is not None
        ]

    def _carrier(self, server: connection.Connection) -> connection.Connection:
        """The TCP connection mitmproxy opens for a connection its HTTP layer asked for: the
        same, or the upstream proxy's that its tunnel goes through."""
        tunnel = getattr(self.child.connections.get(server), "tunnel_connection", None)
        return tunnel if isinstance(tunnel, connection.Connection) else server

    @staticmethod
    def _give_up(flow: http.HTTPFlow, kind: str, detail: str) -> None:
        """Tag the flow: closing its upstream connection next ends it in the gateway's error
        hook, which records and answers `upstream_timeout` with this."""
        flow.metadata.setdefault(TIMEOUT, (kind, detail))

    def _transports(self, flow: http.HTTPFlow) -> list[connection.Server]:
        """The TCP connections carrying a flow: its server connection, or, through an upstream
        proxy, the connection its tunnel goes through (mitmproxy's tunnel layer for the flow's
        connection knows it); else every connection to the proxy (any may carry it)."""
        if flow.server_conn in self._upstreams:
            return [flow.server_conn]
        tunnel = getattr(self.child.connections.get(flow.server_conn), "tunnel_connection", None)
        if tunnel is not None and tunnel in self._upstreams:
            return [tunnel]
        targets = _targets(flow)
        return [s for s in self._upstreams if s.address in targets]

    def _stop_withheld(self, server: connection.Server) -> layer.CommandGenerator[None]:
        """A body the gateway withholds stops coming: its connection to the site is closed, or,
        HTTP/2 to the site with other requests on it, its stream reset."""
        for flow, _ in list(self._forwarded.values()):
            if STOP_DOWNLOAD not in flow.metadata or STOPPED in flow.metadata:
                continue
            carriers = self._transports(flow)
            if server not in carriers:
                continue
            if not self._sharers(flow, carriers):
                flow.metadata[STOPPED] = flow.metadata[STOP_DOWNLOAD]
                yield from self._close_upstream(flow)
            elif (stream_id := self._stream_of(flow)) is not None:
                flow.metadata[STOPPED] = flow.metadata[STOP_DOWNLOAD]
                yield from self._reset_stream(stream_id, flow, flow.metadata[STOPPED])

    def _h2_to_site(self, flow: http.HTTPFlow) -> Http2Client | None:
        """mitmproxy's HTTP/2 layer of the flow's connection to the site, if it speaks HTTP/2."""
        return stream_window.h2_under(self.child.connections.get(flow.server_conn))

    def _stream_of(self, flow: http.HTTPFlow) -> int | None:
        """The id of the flow's stream in the HTTP layer (the scraper's HTTP/2 stream)."""
        return next((i for i, s in self.child.streams.items() if s.flow is flow), None)

    def _sharers(
        self, flow: http.HTTPFlow, carriers: list[connection.Server]
    ) -> list[http.HTTPFlow]:
        """The client's other requests under way on these connections (HTTP/2 to the site).
        One still waiting for a connection is on none (`_transports` would take it to be on
        any to its site)."""
        shared = set(carriers)
        return [
            other
            for other, _ in self._forwarded.values()
            if other is not flow
            and self._awaited(other) is None
            and shared & set(self._transports(other))
        ]

    def _forget(self, flow: http.HTTPFlow) -> None:
        """No deadline of the site's for a flow whose end is on its way."""
        self._forwarded.pop(flow.id, None)
        self._queued.pop(flow.id, None)
        for kind in ("silence", "transfer"):
            self._deadlines.pop((kind, flow.id), None)

    def _close_upstream(self, flow: http.HTTPFlow) -> layer.CommandGenerator[None]:
        self._forget(flow)
        for server in self._transports(flow):
            self._opening.discard(server)
            yield commands.CloseConnection(server)


def _too_large(limit: int) -> str:
    return (
        f"the request body, of no declared length, is over {limit} bytes "
        "(network.max_request_body_bytes)"
    )


def _targets(flow: http.HTTPFlow) -> set[tuple[str, int]]:
    """Addresses a flow's upstream TCP connection may have: the site's or its proxy's."""
    out = {(flow.request.host, flow.request.port)}
    pinned = flow.metadata.get(PINNED)
    if pinned is not None:
        out.add(pinned)
    via = flow.server_conn.via
    if via is not None:
        out.add((via[1][0], via[1][1]))
    return out


def _began(server: connection.Connection | None) -> float:
    """When a connection's connect began, on the monotonic clock (0: it has not)."""
    return _monotonic(server.timestamp_start if server is not None else None)


def _monotonic(wall: float | None) -> float:
    """One of mitmproxy's wall-clock times on the monotonic clock (0.0 for none)."""
    return 0.0 if wall is None else time.monotonic() - (time.time() - wall)


def _asker(child: HttpLayer, ask: commands.Command) -> http.HTTPFlow | None:
    """The flow of the stream that asked mitmproxy's HTTP layer for a connection."""
    flow = getattr(child.command_sources.get(ask), "flow", None)
    return flow if isinstance(flow, http.HTTPFlow) else None


def _reset_by_peer(server: Http2Server, stream_id: int) -> bool:
    """Whether the scraper's RST_STREAM closed this stream (h2 keeps how each stream closed;
    mitmproxy's own message cannot tell a reset by the scraper from one by the site)."""
    closed_by = server.h2_conn._stream_closed_by(stream_id)
    return closed_by is StreamClosedBy.RECV_RST_STREAM


def _is_tunnel(child: HttpLayer) -> bool:
    """An HTTP layer inside a CONNECT tunnel (its stack holds the outer HTTP layer's stream)."""
    return any(isinstance(lay, HttpLayer) for lay in child.context.layers if lay is not child)


def _peer(client: connection.Client) -> str | None:
    return str(client.peername[0]) if client.peername else None
