"""Finished HTTP streams freed when they finish, not by Python's cyclic garbage collector.

mitmproxy keeps one `HttpStream` layer per request, and every one of them ends as cyclic
garbage: it stores bound methods of itself as its `client_state`/`server_state`, and its
context's `layers` list holds it. Reference counting can then never free the stream, its flow,
the request and response with their headers, nor what crawlwarden hangs on the flow (~34 objects
per request); they wait for the collector, which the allocations trigger ~35 times a second at
800 requests/s, and whose older-generation passes stop the event loop for 1-6 ms with every
request in flight waiting (bench/README.md).

Changes to mitmproxy's classes, made once at start-up by the gateway (proxy/app.py):

- `HttpStream.client_state`/`server_state` keep the state's function and bind it on each read,
  so the stream holds no method of itself. Reads and comparisons behave as before (a bound
  method equals another of the same function and object).
- `HttpLayer.streams` drops a finished stream (mitmproxy's `DropStream`) from its context's
  layers on the next turn of the event loop, after the stream's last step has run. Nothing
  routes an event to a dropped stream (mitmproxy ignores late data for it); `stack_pos` copes
  with a layer missing from the list and the stream's `mode` has been read and cached by then.

- An HTTP/1 connection to a site that is done (closed after its exchange: mitmproxy sends each
  request of an HTTP/2 scraper on a connection of its own) lets go of its request and response,
  and the closed connection leaves `HttpLayer.connections` (`closed`, called by
  addons/http_guard.py, which sees the layer told of the close), where mitmproxy kept it and
  its layers for as long as the scraper's connection lasted: a browser's HTTP/2 connection
  held every answer it had been given, bodies too (+155 MiB for each ten 15 MiB images).

- The scraper's HTTP/2 connection forgets a stream once it is closed. mitmproxy's
  `Http2Server.streams` (stream id -> state) drops a stream when the scraper resets it or ends
  its request after the answer was sent, never when the answer ends it (the usual order): one
  entry per request for as long as the connection lasts. Each new stream now first drops the
  oldest entries whose h2 stream is closed (amortised one look per request; a stream still
  open there keeps the later ones until it closes).

All are checked against the running mitmproxy on install: if its classes no longer look like
this, nothing is changed and the collector frees the streams as before (slower, still correct).
tests/test_gateway_e2e.py watches the gateway's `python_gc_objects_collected_total` per request.
Breaking the cycle belongs in mitmproxy; this is the gateway's copy until it does.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
import weakref
from typing import Any

import h2.connection
import h2.stream
from mitmproxy import connection
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http import _http2

from addons.patches import install_once


class _StateSlot:
    """A stream's current state handler, stored as its function (no reference to the stream)."""

    def __init__(self, name: str):
        self.key = f"_crawlwarden_{name}"

    def __get__(self, stream: Any, owner: type | None = None) -> Any:
        if stream is None:
            return self
        handler = stream.__dict__[self.key]
        if isinstance(handler, types.FunctionType):
            return types.MethodType(handler, stream)
        return handler

    def __set__(self, stream: Any, handler: Any) -> None:
        if isinstance(handler, types.MethodType) and handler.__self__ is stream:
            handler = handler.__func__
        stream.__dict__[self.key] = handler


class _Streams(dict[int, Any]):
    """HttpLayer.streams: a stream popped (finished) leaves its context's layers next turn, and
    its connection to the site the layer's connections, if closed (`forget_closed`)."""

    def __init__(self, streams: dict[int, Any], http: http_layers.HttpLayer):
        super().__init__(streams)
        self.http = weakref.ref(http)

    def pop(self, stream_id: int, *default: Any) -> Any:
        stream = super().pop(stream_id, *default)
        if isinstance(stream, http_layers.HttpStream):
            if (http := self.http()) is not None:
                forget_closed(http, stream.context.server)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (mitmproxy's layer tests): the collector's job
                return stream
            loop.call_soon(_leave_context, stream)
        return stream


def _leave_context(stream: http_layers.HttpStream) -> None:
    layers = stream.context.layers
    if layers and layers[-1] is stream:
        layers.pop()


_installed = False  # (forget_closed reads what install() checked)


# On a connection to a site: its ConnectionClosed has reached the HTTP layer (mitmproxy marks a
# connection closed when it closes it, and tells the layers later; until then it looks it up).
_CLOSE_SEEN = "_crawlwarden_close_seen"


def closed(http: http_layers.HttpLayer, server: connection.Server) -> None:
    """The HTTP layer has been told that a connection to a site closed (called by
    addons/http_guard.py, which sees every event of the layer, after the layer has)."""
    server.__dict__[_CLOSE_SEEN] = True
    forget_closed(http, server)


def forget_closed(http: http_layers.HttpLayer, server: connection.Connection) -> None:
    """A closed connection to a site leaves the HTTP layer's connections once the layer has been
    told it closed and no stream of the layer still names it (a stream may still send to it;
    mitmproxy looks it up then), unless it is the layer's own (a tunnel's). Called when it
    closes, and when a stream ends."""
    if (
        not _installed
        or not server.__dict__.get(_CLOSE_SEEN)
        or server.state is not connection.ConnectionState.CLOSED
        or server is http.context.server
        or server in http.waiting_for_establishment
        or any(stream.context.server is server for stream in http.streams.values())
    ):
        return
    http.connections.pop(server, None)


class _H2Streams(dict[int, Any]):
    """Http2Server.streams: a new stream first drops the oldest entries already closed."""

    def __init__(self, h2_conn: Any):
        super().__init__()
        self.h2_conn = h2_conn  # (the layer's own: no reference back to the layer)

    def __setitem__(self, stream_id: int, state: Any) -> None:
        if stream_id not in self:
            while self:
                oldest = next(iter(self))
                if not _h2_closed(self.h2_conn, oldest):
                    break
                del self[oldest]
        super().__setitem__(stream_id, state)


def _h2_closed(h2_conn: Any, stream_id: int) -> bool:
    """mitmproxy's `Http2Connection.is_closed`, from the h2 connection alone."""
    stream = h2_conn.streams.get(stream_id)
    return (
        stream is None
        or stream.state_machine.state is h2.stream.StreamState.CLOSED
        or h2_conn.state_machine.state is h2.connection.ConnectionState.CLOSED
    )


def _looks_as_expected() -> bool:
    """mitmproxy's classes are as this module assumes (checked, not trusted, on an upgrade)."""
    try:
        stream_init = inspect.getsource(http_layers.HttpStream.__init__)
        layer_init = inspect.getsource(inspect.unwrap(http_layers.HttpLayer.__init__))
        h2_init = inspect.getsource(_http2.Http2Connection.__init__)
        h2_closed = inspect.getsource(_http2.Http2Connection.is_closed)
        h2_server_init = inspect.getsource(_http2.Http2Server.__init__)
        h2_server_events = inspect.getsource(_http2.Http2Server.handle_h2_event)
    except (OSError, TypeError):  # installed without its sources: cannot tell, change nothing
        return False
    ours_or_nothing = vars(http_layers.HttpStream).get("client_state")  # no class attribute
    return (
        "self.client_state = self.state_uninitialized" in stream_init
        and "self.server_state = self.state_uninitialized" in stream_init
        and "self.streams = {}" in layer_init
        and "self.connections = {}" in layer_init
        and "self.waiting_for_establishment" in layer_init
        and "yield commands.CloseConnection(self.conn)\n                self.state = self.done"
        in inspect.getsource(_http1.Http1Connection.mark_done)
        and (ours_or_nothing is None or isinstance(ours_or_nothing, _StateSlot))
        and "self.h2_conn = BufferedH2Connection(self.h2_conf)\n        self.streams = {}"
        in h2_init
        and "stream.state_machine.state is not h2.stream.StreamState.CLOSED" in h2_closed
        and "h2.connection.ConnectionState.CLOSED" in h2_closed
        and "self.streams[event.stream_id] = StreamState.HEADERS_RECEIVED" in h2_server_events
        and "def __init__(self, context: Context):" in h2_server_init
    )


@install_once(_looks_as_expected)
def install() -> None:
    """Apply the changes (once per process); False if this mitmproxy does not look as expected."""
    http_layers.HttpStream.client_state = _StateSlot("client_state")
    http_layers.HttpStream.server_state = _StateSlot("server_state")
    original_init = http_layers.HttpLayer.__init__

    @functools.wraps(original_init)
    def __init__(self: http_layers.HttpLayer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.streams = _Streams(self.streams, self)

    http_layers.HttpLayer.__init__ = __init__  # type: ignore[method-assign]
    original_mark_done = _http1.Http1Connection.mark_done

    @functools.wraps(original_mark_done)
    def mark_done(
        self: _http1.Http1Connection, *, request: bool = False, response: bool = False
    ) -> Any:
        yield from original_mark_done(self, request=request, response=response)
        if isinstance(self, _http1.Http1Client) and self.state == self.done:
            self.request = self.response = None  # (nothing reads them once it is done)

    _http1.Http1Connection.mark_done = mark_done  # type: ignore[method-assign]
    original_h2_init = _http2.Http2Server.__init__

    @functools.wraps(original_h2_init)
    def h2_server_init(self: _http2.Http2Server, *args: Any, **kwargs: Any) -> None:
        original_h2_init(self, *args, **kwargs)
        self.streams = _H2Streams(self.h2_conn)

    _http2.Http2Server.__init__ = h2_server_init  # type: ignore[method-assign]
    global _installed
    _installed = True
