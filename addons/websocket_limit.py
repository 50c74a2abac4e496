"""A WebSocket message the gateway holds is bounded, as a buffered body is.

mitmproxy holds each message's fragments until its last one arrives, and neither it nor wsproto
sets a size limit: a site that streams one message that never ends (continuation frames, 1 MiB
each) grew the gateway by every byte, while the scraper received nothing of it. Past
MAX_MESSAGE_BYTES (the 32 MiB a body of unknown length is buffered to) both sides are closed
with 1009 ("message too big", RFC 6455 7.4.1) and the conversation ends: its record has what came
before, and the log says why (`websocket_message_too_big`).

With permessage-deflate the bound is on the message as inflated: wsproto inflated all it had of a
frame at once (1 MB of zeros on the wire is 1 GiB), so the gateway's memory rose by hundreds of
MiB for one frame before anything could look at it. A message is inflated no further than
MAX_MESSAGE_BYTES (zlib's `max_length`); past it, both sides are closed as above.

When the gateway stops, it ends the conversations still open itself (`going_away`): both sides
are closed with 1001 ("going away", RFC 6455 7.4.1: a server going down), so that each has its
record before the fetch log closes; left to the stop, they ended with the process, unrecorded.

Installed once at start-up by the gateway (proxy/app.py), next to addons/interim.py; only where
mitmproxy's WebSocket layer still gathers a message's fragments as this assumes.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections.abc import Generator
from typing import Any

import structlog
import wsproto
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import websocket
from mitmproxy.websocket import WebSocketMessage
from wsproto.connection import ConnectionState
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.frame_protocol import Opcode
from wsproto.frame_protocol import ParseFailed

from addons.patches import install_once

log = structlog.get_logger("crawlwarden.websocket")

MAX_MESSAGE_BYTES = 32 * 2**20
TOO_BIG = 1009  # RFC 6455 7.4.1: a message too big to process
TOO_BIG_REASON = "message too big"
GOING_AWAY = 1001  # RFC 6455 7.4.1: an endpoint going away (a server going down)
# flow.metadata key: the bytes of a message each side had not finished when the conversation
# ended, (site, client): held by mitmproxy, never delivered (set as the end hook is issued).
UNFINISHED = "crawlwarden.websocket_unfinished"
# PerMessageDeflate attributes: what its current message inflated to, and that it went past
_INFLATED = "_crawlwarden_inflated"
_OVER = "_crawlwarden_over"


def _looks_as_expected() -> bool:
    layer = getattr(websocket, "WebsocketLayer", None)
    relay = getattr(layer, "relay_messages", None)
    connection = getattr(websocket, "WebsocketConnection", None)
    if relay is None or connection is None:
        return False
    source = inspect.getsource(relay)
    inflate = inspect.getsource(PerMessageDeflate.frame_inbound_payload_data)
    return (
        "src_ws.frame_buf[-1] +=" in source
        and "WebsocketEndHook(self.flow)" in source
        and "self._handle_event = self.done" in source
        and "self._decompressor.decompress(bytes(data))" in inflate
        and "self._inbound_is_compressible" in inflate
        and "self._proto = FrameProtocol(" in inspect.getsource(wsproto.Connection.__init__)
    )


def held(layer: Any) -> int:
    """The bytes of unfinished messages the layer holds, from either side."""
    return max(sum(map(len, ws.frame_buf)) for ws in (layer.server_ws, layer.client_ws))


def _inflate(extension: PerMessageDeflate, data: bytes) -> bytes | CloseReason:
    """wsproto's inflation of a frame's payload (as it comes), to MAX_MESSAGE_BYTES a message:
    past it, wsproto is told the message is too big (it closes with 1009, as mitmproxy relays)."""
    if not extension._inbound_compressed or not extension._inbound_is_compressible:
        return data
    assert extension._decompressor is not None
    inflated = getattr(extension, _INFLATED, 0)
    try:
        # max_length is room + 1 (never 0, which zlib reads as "no limit"): one byte more says
        # the message is over; the rest of the input is left in the decompressor, unread
        out = extension._decompressor.decompress(data, MAX_MESSAGE_BYTES - inflated + 1)
    except zlib.error:
        return CloseReason.INVALID_FRAME_PAYLOAD_DATA
    inflated += len(out)
    if inflated > MAX_MESSAGE_BYTES:
        setattr(extension, _OVER, inflated)
        raise ParseFailed(TOO_BIG_REASON, CloseReason.MESSAGE_TOO_BIG)
    setattr(extension, _INFLATED, inflated)
    return out


def _inflated_past_the_limit(layer: Any) -> int | None:
    """What a message a side sent inflated to before it was stopped (None: none was)."""
    for ws in (layer.server_ws, layer.client_ws):
        for extension in getattr(getattr(ws, "_proto", None), "extensions", ()):
            over = getattr(extension, _OVER, None)
            if over is not None:
                return over
    return None


def _bound_inflation() -> None:
    original_payload = PerMessageDeflate.frame_inbound_payload_data
    original_complete = PerMessageDeflate.frame_inbound_complete

    @functools.wraps(original_payload)
    def frame_inbound_payload_data(self: Any, proto: Any, data: bytes) -> bytes | CloseReason:
        return _inflate(self, bytes(data))

    @functools.wraps(original_complete)
    def frame_inbound_complete(self: Any, proto: Any, fin: bool) -> bytes | CloseReason | None:
        if not self._inbound_is_compressible:
            # A control frame (a ping between a message's fragments, RFC 6455 5.4): the message
            # goes on. wsproto forgot here that it was compressed, and passed the rest of it on
            # still deflated: 20 MiB reached the scraper as 2.6 MB of garbage.
            return None
        if fin:  # the message's last frame (the sync tail inflates to a few bytes at most)
            setattr(self, _INFLATED, 0)
        return original_complete(self, proto, fin)

    PerMessageDeflate.frame_inbound_payload_data = frame_inbound_payload_data  # type: ignore[method-assign]
    PerMessageDeflate.frame_inbound_complete = frame_inbound_complete  # type: ignore[method-assign]


@install_once(_looks_as_expected)
def install() -> None:
    """Bound what mitmproxy's WebSocket layer holds of a message (once per process)."""
    _bound_inflation()
    layer_class = websocket.WebsocketLayer
    original = layer_class.relay_messages

    @functools.wraps(original)
    def relay_messages(self: Any, event: events.Event) -> Generator[Any, Any, None]:
        if isinstance(event, GoingAway):
            yield from _close_both(self, GOING_AWAY, "going away")
            return
        relayed = original(self, event)
        reply = None
        while True:
            try:
                command = relayed.send(reply)
            except StopIteration:
                break
            if isinstance(command, websocket.WebsocketEndHook):
                _note_unfinished(self)
                inflated = _inflated_past_the_limit(self)
                if inflated is not None and self.flow.websocket is not None:
                    # wsproto's close reads as the sender's: it was the gateway's (both sides)
                    self.flow.websocket.closed_by_client = None
                    _too_big(self, inflated=inflated)
            reply = yield command
        if self._handle_event == self.done or held(self) <= MAX_MESSAGE_BYTES:
            return
        _too_big(self, held=held(self))
        yield from _close_both(self, TOO_BIG, TOO_BIG_REASON)

    layer_class.relay_messages = relay_messages  # type: ignore[method-assign]


class GoingAway(websocket.WebSocketMessageInjected):
    """The gateway is stopping: the conversation is to end now (mitmproxy's HTTP layer takes
    an injected event to the flow's WebSocket layer; its message is never sent)."""


def going_away(flow: Any) -> GoingAway:
    """The event that ends `flow`'s conversation, both sides closed with 1001, for the proxy
    server's `inject_event`."""
    return GoingAway(flow, WebSocketMessage(Opcode.TEXT, False, b""))


def _close_both(layer: Any, code: int, reason: str) -> Generator[Any, Any, None]:
    """End the conversation from the gateway: a close frame to each side still open, both
    connections closed, the flow says so (closed by neither side), the end hook."""
    _note_unfinished(layer)
    for ws in (layer.server_ws, layer.client_ws):
        ws.frame_buf = [b""]
        if ws.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
            yield ws.send2(wsproto.events.CloseConnection(code, reason))
        yield commands.CloseConnection(ws.conn)
    if layer.flow.websocket is not None:
        layer.flow.websocket.close_code = code
        layer.flow.websocket.close_reason = reason
        layer.flow.websocket.closed_by_client = None
    yield websocket.WebsocketEndHook(layer.flow)
    layer.flow.live = False
    layer._handle_event = layer.done


def _note_unfinished(layer: Any) -> None:
    """What each side had sent of a message it had not finished, as the conversation ends."""
    site, client = (sum(map(len, ws.frame_buf)) for ws in (layer.server_ws, layer.client_ws))
    if site or client:
        layer.flow.metadata[UNFINISHED] = (site, client)


def _too_big(layer: Any, **size: int) -> None:
    log.warning(
        "websocket_message_too_big",
        url=layer.flow.request.pretty_url,
        limit=MAX_MESSAGE_BYTES,
        **size,
    )
