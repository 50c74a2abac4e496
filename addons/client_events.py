"""What mitmproxy's HTTP layer tells the client connection's handler, where the gateway has a say.

Each stream of an HTTP layer hands what goes to the client to the handler of the client
connection (`Http1Server`, `Http2Server`) as events, and the handler turns them into bytes. Two of
those events are decided by mitmproxy alone, and no addon hook sees them:

- a `ResponseProtocolError`: the site failed (refused, reset, TLS), HttpGuard closed it at a
  deadline, or HttpGuard stopped a request body of no declared length at the policy's limit.
  mitmproxy writes its own HTML page. Where it would, the client gets the answer the gateway's
  error hook left in `ERROR_ANSWER` instead (502 `upstream_error`, 504 `upstream_timeout`, 413
  `request_too_large`, with the reason and request id): over HTTP/1 the connection is then
  closed, as after mitmproxy's page; over HTTP/2 only that stream ends (and is reset with
  NO_ERROR if the client is still sending its request).
- a request head whose body length it cannot take (two different `Content-Length`s, a negative
  one, a list): mitmproxy's HTTP/1 reader answers its HTML page at once and closes, then hands
  the head on, so the gateway's hooks record it (`bad_request`) and leave their answer. The
  page and the close are left out here; the stream's error then gets the gateway's answer,
  as above.
- the `ResponseHeaders` of a body of unknown length that mitmproxy began to stream itself, having
  buffered `stream_large_bodies` of it (it sets `response.stream = True`): the gateway's stream
  (a callable the gateway left in `LATE_STREAM`) takes over before the first byte passes, so the
  body is still hashed whole and an opt-out in it still binds.

`watch()` shadows the handler's `handle_event` on the instance, holding the layer and the handler
weakly, so no reference cycle outlives the connection.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from collections.abc import Iterable

import h2.errors
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import HttpLayer
from mitmproxy.proxy.layers.http import ReceiveHttp
from mitmproxy.proxy.layers.http import RequestHeaders
from mitmproxy.proxy.layers.http import ResponseData
from mitmproxy.proxy.layers.http import ResponseEndOfMessage
from mitmproxy.proxy.layers.http import ResponseHeaders
from mitmproxy.proxy.layers.http import ResponseProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server

# flow.metadata keys, set by addons/gateway.py.
# The gateway's answer (an http.Response) for a forwarded flow that failed.
ERROR_ANSWER = "crawlwarden.error_answer"
# A body of unknown length: what makes the gateway's stream callable, if mitmproxy streams it.
LATE_STREAM = "crawlwarden.late_stream"

Handler = Http1Server | Http2Server


def watch(http_layer: HttpLayer) -> None:
    """Watch the events to the client connection's handler (made by the layer's Start)."""
    handler = http_layer.connections.get(http_layer.context.client)
    if isinstance(handler, Http1Server | Http2Server):
        handler.handle_event = functools.partial(  # type: ignore[method-assign]
            _handle_event, weakref.ref(http_layer), weakref.ref(handler)
        )


def _handle_event(
    http_layer: weakref.ref[HttpLayer], handler: weakref.ref[Handler], event: events.Event
) -> layer.CommandGenerator[None]:
    conn, stack = handler(), http_layer()
    assert conn is not None  # it is the one called
    if (
        isinstance(conn, Http1Server)
        and isinstance(event, events.DataReceived)
        and conn.state == conn.read_headers
    ):
        return _without_its_error_page(conn, type(conn).handle_event(conn, event))
    if isinstance(event, ResponseProtocolError | ResponseHeaders) and stack is not None:
        stream = stack.streams.get(event.stream_id)
        metadata = stream.flow.metadata if stream is not None else {}
        if isinstance(event, ResponseProtocolError):
            answer: http.Response | None = metadata.pop(ERROR_ANSWER, None)
            if answer is not None and _head_not_sent(conn, event.stream_id):
                return _answer(conn, event.stream_id, answer)
        elif event.response.stream is True:
            late: Callable[[], Callable[[bytes], Iterable[bytes]]] | None = metadata.pop(
                LATE_STREAM, None
            )
            if late is not None:
                event.response.stream = late()
    return type(conn).handle_event(conn, event)


def _without_its_error_page(
    conn: Http1Server, commands_: Iterable[commands.Command]
) -> layer.CommandGenerator[None]:
    """The HTTP/1 reader's commands for a read, less the error page and close it sends for a
    request head it then hands on to the stream (which answers it with the gateway's answer).
    (Reading a head issues no command that waits for an answer.)"""
    issued = list(commands_)
    if (
        len(issued) >= 3
        and conn.state == conn.done
        and isinstance(issued[0], commands.SendData)
        and issued[0].connection is conn.conn
        and issued[0].data.startswith(b"HTTP/1.1 400 ")
        and isinstance(issued[1], commands.CloseConnection)
        and issued[1].connection is conn.conn
        and isinstance(issued[2], ReceiveHttp)
        and isinstance(issued[2].event, RequestHeaders)
    ):
        issued = issued[2:]
    yield from issued


def _head_not_sent(conn: Handler, stream_id: int) -> bool:
    """Where mitmproxy would send its error page: the client can be written to and has had no
    response head on this stream."""
    if isinstance(conn, Http1Server):
        return conn.response is None and bool(conn.conn.state & ConnectionState.CAN_WRITE)
    h2_stream = conn.h2_conn.streams.get(stream_id)
    return (
        h2_stream is not None
        and conn.is_open_for_us(stream_id)
        and not h2_stream.state_machine.headers_sent
    )


def _answer(conn: Handler, stream_id: int, answer: http.Response) -> layer.CommandGenerator[None]:
    if isinstance(conn, Http1Server):
        answer.headers["Connection"] = "close"  # closed next, as mitmproxy does after its page
        yield commands.SendData(conn.conn, http1.assemble_response(answer))
        yield commands.CloseConnection(conn.conn)
        return
    handle = type(conn).handle_event
    yield from handle(conn, ResponseHeaders(stream_id, answer, end_stream=False))
    yield from handle(conn, ResponseData(stream_id, answer.content or b""))
    yield from handle(conn, ResponseEndOfMessage(stream_id))
    if not conn.is_closed(stream_id) and not conn.h2_conn.stream_buffers.get(stream_id):
        # The client is still sending its request (one refused before its end): the answer is
        # complete, so ask it to stop, without an error (RFC 9113 section 8.1).
        conn.h2_conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        yield commands.SendData(conn.conn, conn.h2_conn.data_to_send())
