"""A connection is read no faster than the gateway relays what it read.

mitmproxy reads each connection in a loop, hands every read to its layers and then waits for its
own write buffers only (`ConnectionHandler.drain_writers`). Two other places kept what was read
without bound:

- A layer waiting for a hook keeps each event that comes meanwhile in a queue of its own: a site
  sending small WebSocket messages faster than the hooks relay them (each message is a
  `websocket_message` hook) made the gateway hold all it sent, 300 MiB and more. After each read,
  the loop now also waits while the WebSocket layers waiting for a hook hold more than
  MAX_QUEUED_BYTES of what was read (on every connection of the client's handler, the client's
  and the sites'). Every hook's end wakes the wait.
- HTTP/2 to the scraper: what a stream may not send yet (its scraper gives it no window: a
  browser pausing a video, a scraper that stopped reading) waits in the stream's send buffer,
  and the site's connection was read on: a 96 MiB download held whole. A site's connection is
  now not read while the scraper's HTTP/2 send buffers hold more than MAX_QUEUED_BYTES and some
  of it is for a stream this connection answers; each read of the scraper's connection (its
  WINDOW_UPDATE, a stream's reset) wakes the wait. The scraper's connection is always read, and
  a site's connection serving only streams the scraper reads goes on. On an HTTP/2 connection
  to the site, addons/stream_window.py holds a paused stream back alone (its site gets no more
  window), and such streams have a bound of their own, MAX_HELD_AT_SITE (a page's several
  paused videos stay under it); past either bound the connection's other streams wait with
  them until HttpGuard resets the paused ones at `response_timeout` (addons/http_guard.py,
  `let_go`).

- HTTP/2 to the scraper, answers the gateway held whole (up to 16 MiB, so an opt-out in one can
  still refuse it) and handed to a stream at once: their sites are done with them, so no read
  waits, and a scraper that asked for one after another and read none made the gateway hold
  them all (60 of 4 MiB: +272 MiB). A scraper connection's next requests now wait, before they
  reach the site, while its HTTP/2 streams hold more than MAX_UNREAD_ANSWERS of such answers
  (`unread_answers`, `room_for_answers`, used by addons/gateway.py); each read of the scraper's
  connection wakes the wait, and HttpGuard's reset of an answer left unread for
  `response_timeout` makes room too (`room_made`). Requests it sent together, before any
  answer came, have gone to their sites: the site connections bringing answers the gateway
  holds whole for it are not read meanwhile either.

Either way the socket's buffers fill and TCP slows the sender, as when the gateway cannot write;
what is held stays within one read (64 KiB) per connection of the bound.

Not HTTP streams waiting for a hook: a request held for its budget, with its body coming,
stopping the reads stalled the connection's other HTTP/2 streams and hid the client's leaving
until the held request's turn; a request's body is bounded by `network.max_request_body_bytes`
instead (addons/http_guard.py).

Installed once at start-up by the gateway (proxy/app.py), next to addons/websocket_limit.py;
only where mitmproxy's connection handler and layers still look as this assumes.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import inspect
import struct
import termios
import time
import weakref
from collections.abc import Coroutine
from typing import Any

from mitmproxy import connection
from mitmproxy.proxy import commands
from mitmproxy.proxy import layer
from mitmproxy.proxy import server
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy.layers.http import _http_h2

from addons import stream_window
from addons.patches import install_once
from proxy import metrics

MAX_QUEUED_BYTES = 4 * 2**20
# What the streams from HTTP/2 sites that addons/stream_window.py gives windows as the scraper
# makes room (each stops at most a window ahead: ~1.5 MiB) may hold in all on a scraper's HTTP/2
# connection before its site connections wait too: a page's several paused videos, not a hundred.
MAX_HELD_AT_SITE = 16 * 2**20
# What answers held whole (addons/gateway.py, BUFFER_LIMIT) and handed to a scraper's HTTP/2
# streams may wait unread there before the connection's next requests wait for room: four of the
# largest, or what a browser leaves of a page's several paused short videos (it reads the first
# 6 MiB or so of each).
MAX_UNREAD_ANSWERS = 64 * 2**20
# How long a site's connection waits for the scraper's HTTP/2 buffers before it looks again
# (a stream the gateway itself ends frees its buffer with no read of the scraper's to say so).
_RECHECK_SECONDS = 1.0


def _looks_as_expected() -> bool:
    handler = getattr(server, "ConnectionHandler", None)
    if handler is None or not hasattr(handler, "drain_writers"):
        return False
    loop = inspect.getsource(handler.handle_connection)
    handle = inspect.getsource(layer.Layer.handle_event)
    return (
        "await self.drain_writers()" in loop
        and "command.blocking = self" in handle
        and "self._paused_event_queue.append(event)" in handle
        and "await self.server_event(events.HookCompleted(hook))"
        in inspect.getsource(handler.hook_task)
        and "self.stream_buffers = " in inspect.getsource(_http_h2.BufferedH2Connection.__init__)
        and "self.h2_conn = BufferedH2Connection("
        in inspect.getsource(_http2.Http2Connection.__init__)
        and "self.streams = {}" in inspect.getsource(http_layers.HttpLayer.__init__)
        and "self.connections = {}" in inspect.getsource(http_layers.HttpLayer.__init__)
        and "self.context.server = self.flow.server_conn = connection"
        in inspect.getsource(http_layers.HttpStream.make_server_connection)
        and "self.server_state = self.state_consume_response_body"
        in inspect.getsource(http_layers.HttpStream.state_wait_for_response_headers)
        and "self.server_state = self.state_wait_for_response_headers"
        in inspect.getsource(http_layers.HttpStream.state_wait_for_request_headers)
    )


class _Waiting:
    """A handler's layers paused for a hook (while paused or with events queued), and what wakes
    a read loop waiting for them."""

    __slots__ = ("changed", "layers")

    def __init__(self) -> None:
        self.layers: dict[int, layer.Layer] = {}
        self.changed: asyncio.Event | None = None  # (made by a loop that waits)

    def queued(self) -> int:
        """The bytes of the events the paused layers hold; layers done with drop out."""
        total = 0
        for key, paused in list(self.layers.items()):
            queue = paused._paused_event_queue
            if paused._paused is None and not queue:
                del self.layers[key]
                continue
            for event in queue:
                data = getattr(event, "data", None)
                if isinstance(data, (bytes, bytearray)):
                    total += len(data)
        return total

    async def change(self) -> None:
        """Until a hook ends."""
        if self.changed is None:
            self.changed = asyncio.Event()
        await self.changed.wait()

    def wake(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = None


def _http_layers(client: connection.Client) -> list[http_layers.HttpLayer]:
    """The HTTP layers of a scraper's connection (one, and one per CONNECT tunnel in it)."""
    return client.__dict__.setdefault("_crawlwarden_http", [])


def _h2_holds(client: connection.Client) -> bool:
    """Whether an HTTP/2 connection of the scraper's holds anything it may not send yet."""
    for http in client.__dict__.get("_crawlwarden_http", ()):
        h2 = http.connections.get(http.context.client)
        if isinstance(h2, _http2.Http2Server) and h2.h2_conn.stream_buffers:
            return True
    return False


def _h2_ahead(client: connection.Client, site: connection.Connection) -> int:
    """What the scraper's HTTP/2 send buffers hold for streams whose answers come on the
    connection `site` (the site's, or, through an upstream proxy, the one its tunnel goes
    through), if they hold more than MAX_HELD_AT_SITE in all for streams from HTTP/2 sites
    that addons/stream_window.py gives windows as the scraper makes room (each stops a window
    ahead), or more than MAX_QUEUED_BYTES for the others; or, while they hold more than
    MAX_UNREAD_ANSWERS of answers their sites are done with, what they hold of those if an
    answer the gateway holds whole is coming on `site`; else 0."""
    others = windowed = mine = unread = 0
    for http in client.__dict__.get("_crawlwarden_http", ()):
        h2 = http.connections.get(http.context.client)
        if not isinstance(h2, _http2.Http2Server):
            continue
        for stream_id, chunks in h2.h2_conn.stream_buffers.items():
            held = sum(len(chunk.data) for chunk in chunks)
            if not held:
                continue
            stream = http.streams.get(stream_id)
            if stream is None:  # (a finished answer, held whole before it went on)
                others += held
                unread += held
                continue
            server = stream.context.server
            top = http.connections.get(server)
            if stream_window.windowed(stream_window.h2_under(top)):
                windowed += held
            else:
                others += held
            if _comes_on(http, server, site):
                mine += held
    if mine and (others > MAX_QUEUED_BYTES or windowed > MAX_HELD_AT_SITE):
        return mine
    if unread > MAX_UNREAD_ANSWERS and _whole_answer_on(client, site):
        return unread
    return 0


def _comes_on(
    http: http_layers.HttpLayer, server: connection.Server, site: connection.Connection
) -> bool:
    """Whether what comes from `server` comes on `site` (itself, or the connection to the
    upstream proxy its tunnel goes through)."""
    top = http.connections.get(server)
    return site is server or site is getattr(top, "tunnel_connection", None)


def _whole_answer_on(client: connection.Client, site: connection.Connection) -> bool:
    """Whether an answer for one of the scraper's HTTP/2 streams that the gateway holds whole
    until its end is coming on `site`: its stream is in one of the states from its request's
    way to the site until such an answer is all read (the head awaited, the body read in full;
    looked up now, as other addons wrap them at start-up)."""
    stream_class = http_layers.HttpStream
    whole = (stream_class.state_wait_for_response_headers, stream_class.state_consume_response_body)
    for http in client.__dict__.get("_crawlwarden_http", ()):
        if not isinstance(http.connections.get(http.context.client), _http2.Http2Server):
            continue
        for stream in http.streams.values():
            state = getattr(stream.server_state, "__func__", None)
            if state in whole and _comes_on(http, stream.context.server, site):
                return True
    return False


def _scraper_transport(handler: Any) -> asyncio.WriteTransport | None:
    io = handler.transports.get(handler.client)
    return getattr(getattr(io, "writer", None), "transport", None)


def _scraper_full(handler: Any) -> bool:
    """Whether the scraper's connection has more waiting to be written than its transport
    takes before a drain waits (mitmproxy's drain after a read then waits for the scraper)."""
    transport = _scraper_transport(handler)
    if transport is None:
        return False
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]


def _unsent(transport: asyncio.WriteTransport) -> int:
    """What the scraper has not taken yet of what was written to it: the transport's buffer
    and, on Linux, the socket's send queue (which a slow reader empties long before the
    transport writes again)."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            pass
        else:
            unsent += struct.unpack("i", queued)[0]
    return unsent


# On a site's connection: since when (monotonic) its reads wait for the scraper to take what
# came (while they do), and when they last stopped waiting.
_HELD_SINCE = "_crawlwarden_held_since"
_HELD_UNTIL = "_crawlwarden_held_until"


def _hold(site: connection.Connection) -> None:
    site.__dict__[_HELD_SINCE] = time.monotonic()


def _release(site: connection.Connection) -> None:
    site.__dict__.pop(_HELD_SINCE, None)
    site.__dict__[_HELD_UNTIL] = time.monotonic()


def held_for_scraper(site: connection.Connection) -> float | None:
    """Since when (monotonic) the gateway has not read the site's connection because its
    scraper has not taken what came on it (an HTTP/1 scraper not reading, an HTTP/2 stream
    given no window); None if it is read."""
    return site.__dict__.get(_HELD_SINCE)


def last_held_for_scraper(site: connection.Connection) -> float:
    """When (monotonic) the gateway last went back to reading the site's connection after
    waiting for its scraper (0.0: never waited)."""
    return site.__dict__.get(_HELD_UNTIL, 0.0)


def let_go(client: connection.Client, site: connection.Connection) -> None:
    """The gateway ended what the site's connection waited for (HttpGuard reset the streams
    the scraper gave no window): it is read again now, not at the next look."""
    if site.__dict__.get(_HELD_SINCE) is not None:
        _release(site)
    waiting = client.__dict__.get(_WAITING)
    if waiting is not None:
        waiting.wake()


def _reading(handler: Any) -> connection.Connection | None:
    """The connection whose read loop is running now."""
    task = asyncio.current_task()
    for conn, io in handler.transports.items():
        if io.handler is task:
            return conn
    return None


_WAITING = "_crawlwarden_waiting"  # on the scraper's connection (its handler's reads)


def _waiting(client: connection.Client) -> _Waiting:
    try:
        return client.__dict__[_WAITING]
    except KeyError:
        client.__dict__[_WAITING] = waiting = _Waiting()
        return waiting


# The scrapers' connections that have asked for something over HTTP/2 (for the gauge).
_H2_SCRAPERS: weakref.WeakSet[connection.Client] = weakref.WeakSet()


def unread_answers(client: connection.Client) -> int:
    """What the scraper's HTTP/2 streams hold of answers their sites are done with (held whole
    by the gateway, then handed over at once) that the scraper has not taken yet."""
    unread = 0
    for http in client.__dict__.get("_crawlwarden_http", ()):
        h2 = http.connections.get(http.context.client)
        if not isinstance(h2, _http2.Http2Server):
            continue
        _H2_SCRAPERS.add(client)
        for stream_id, chunks in h2.h2_conn.stream_buffers.items():
            if stream_id not in http.streams:
                unread += sum(len(chunk.data) for chunk in chunks)
    return unread


async def room_for_answers(client: connection.Client) -> float:
    """Until the scraper's unread answers are down to MAX_UNREAD_ANSWERS (at once if they
    are): how long it waited (seconds). Woken by each read of the scraper's connection and by
    `room_made`, looked at again every _RECHECK_SECONDS."""
    if unread_answers(client) <= MAX_UNREAD_ANSWERS:
        return 0.0
    started = time.monotonic()
    waiting = _waiting(client)
    while client.connected and unread_answers(client) > MAX_UNREAD_ANSWERS:
        try:
            await asyncio.wait_for(waiting.change(), _RECHECK_SECONDS)
        except TimeoutError:
            pass
    return time.monotonic() - started


def unread_everywhere() -> float:
    """`unread_answers` of every open scraper connection of the gateway's."""
    return float(sum(unread_answers(c) for c in list(_H2_SCRAPERS) if c.connected))


def room_made(client: connection.Client) -> None:
    """The gateway dropped an answer of the scraper's (HttpGuard reset its stream): requests
    waiting in `room_for_answers` look again now."""
    waiting = client.__dict__.get(_WAITING)
    if waiting is not None:
        waiting.wake()


@install_once(_looks_as_expected)
def install() -> None:
    """Make mitmproxy's read loops wait for the layers as for the writers (once per process)."""
    handler_class = server.ConnectionHandler
    original_hook_task = handler_class.hook_task
    original_drain = handler_class.drain_writers
    original_init = http_layers.HttpLayer.__init__

    # Plain functions that hand mitmproxy the original coroutine where nothing is to be done (an
    # HTTP hook, no WebSocket waiting): no extra coroutine on every request's hooks and reads.
    @functools.wraps(original_hook_task)
    def hook_task(self: Any, hook: commands.StartHook) -> Coroutine[Any, Any, None]:
        paused = hook.blocking
        if not isinstance(paused, websocket.WebsocketLayer):
            return original_hook_task(self, hook)
        return _websocket_hook(self, hook, paused)

    async def _websocket_hook(self: Any, hook: commands.StartHook, paused: layer.Layer) -> None:
        waiting = _waiting(self.client)
        waiting.layers[id(paused)] = paused
        try:
            await original_hook_task(self, hook)
        finally:
            if paused._paused is None and not paused._paused_event_queue:
                waiting.layers.pop(id(paused), None)  # (re-paused: its next hook holds it)
            waiting.wake()

    @functools.wraps(original_init)
    def http_layer_init(self: http_layers.HttpLayer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _http_layers(self.context.client).append(self)

    @functools.wraps(original_drain)
    def drain_writers(self: Any) -> Coroutine[Any, Any, None]:
        waiting = self.client.__dict__.get(_WAITING)
        if (
            (waiting is None or not (waiting.layers or waiting.changed))
            and not _h2_holds(self.client)
            and not _scraper_full(self)
        ):
            return original_drain(self)
        return _drain_and_wait(self, _waiting(self.client))

    async def _drain_and_wait(self: Any, waiting: _Waiting) -> None:
        site = _reading(self)
        if site is self.client:
            site = None
        # The site's connection while its read waits for the scraper (the drain does if the
        # scraper's connection is full).
        held = site if site is not None and _scraper_full(self) else None
        try:
            if held is not None:
                _hold(held)
                await _drain_for(self, held)
            else:
                await original_drain(self)
            if site is None:
                waiting.wake()  # (the scraper's read may have given streams window, or reset them)
            ahead = 0
            while True:
                if waiting.queued() > MAX_QUEUED_BYTES:
                    await waiting.change()
                elif site is not None and (buffered := _h2_ahead(self.client, site)):
                    if held is None or buffered < ahead:  # (it took some: held from now on)
                        held = site
                        _hold(held)
                    ahead = buffered
                    try:
                        await asyncio.wait_for(waiting.change(), _RECHECK_SECONDS)
                    except TimeoutError:
                        pass
                else:
                    return
        finally:
            if held is not None:
                _release(held)

    async def _drain_for(self: Any, site: connection.Connection) -> None:
        """The drain, while the site's connection waits for the scraper: held afresh each
        time the scraper has taken some of what waits for it (a slow reader is no stalled
        one)."""
        transport = _scraper_transport(self)
        unsent = _unsent(transport) if transport is not None else 0
        drain = asyncio.ensure_future(original_drain(self))
        try:
            while not (await asyncio.wait((drain,), timeout=_RECHECK_SECONDS))[0]:
                if transport is not None:
                    now = _unsent(transport)
                    if now < unsent:
                        _hold(site)
                    unsent = now
        finally:
            if not drain.done():
                drain.cancel()
        drain.result()

    metrics.UNREAD_ANSWER_BYTES.set_function(unread_everywhere)
    http_layers.HttpLayer.__init__ = http_layer_init  # type: ignore[method-assign]
    handler_class.hook_task = hook_task  # type: ignore[method-assign]
    handler_class.drain_writers = drain_writers  # type: ignore[method-assign]
