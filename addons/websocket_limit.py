"""A WebSocket message the gateway holds is bounded, as a buffered body is.

mitmproxy holds each message's fragments until its last one arrives, and neither it nor wsproto
sets a size limit: a site that streams one message that never ends (continuation frames, 1 MiB
each) grew the gateway by every byte, while the scraper received nothing of it. Past
MAX_MESSAGE_BYTES (the 32 MiB a body of unknown length is buffered to) both sides are closed
with 1009 ("message too big", RFC 6455 7.4.1) and the conversation ends: its record has what came
before, and the log says why (`websocket_message_too_big`).

Installed once at start-up by the gateway (proxy/app.py), next to addons/interim.py; only where
mitmproxy's WebSocket layer still gathers a message's fragments as this assumes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Generator
from typing import Any

import structlog
import wsproto
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import websocket
from wsproto.connection import ConnectionState

from addons.patches import install_once

log = structlog.get_logger("crawlwarden.websocket")

MAX_MESSAGE_BYTES = 32 * 2**20
TOO_BIG = 1009  # RFC 6455 7.4.1: a message too big to process


def _looks_as_expected() -> bool:
    layer = getattr(websocket, "WebsocketLayer", None)
    relay = getattr(layer, "relay_messages", None)
    connection = getattr(websocket, "WebsocketConnection", None)
    if relay is None or connection is None:
        return False
    source = inspect.getsource(relay)
    return (
        "src_ws.frame_buf[-1] +=" in source
        and "WebsocketEndHook(self.flow)" in source
        and "self._handle_event = self.done" in source
    )


def held(layer: Any) -> int:
    """The bytes of unfinished messages the layer holds, from either side."""
    return max(sum(map(len, ws.frame_buf)) for ws in (layer.server_ws, layer.client_ws))


@install_once(_looks_as_expected)
def install() -> None:
    """Bound what mitmproxy's WebSocket layer holds of a message (once per process)."""
    layer_class = websocket.WebsocketLayer
    original = layer_class.relay_messages

    @functools.wraps(original)
    def relay_messages(self: Any, event: events.Event) -> Generator[Any, Any, None]:
        yield from original(self, event)
        if self._handle_event == self.done or held(self) <= MAX_MESSAGE_BYTES:
            return
        log.warning(
            "websocket_message_too_big",
            url=self.flow.request.pretty_url,
            held=held(self),
            limit=MAX_MESSAGE_BYTES,
        )
        for ws in (self.server_ws, self.client_ws):
            ws.frame_buf = [b""]
            if ws.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
                close = wsproto.events.CloseConnection(TOO_BIG, "message too big")
                yield ws.send2(close)
            yield commands.CloseConnection(ws.conn)
        if self.flow.websocket is not None:
            self.flow.websocket.close_code = TOO_BIG
            self.flow.websocket.close_reason = "message too big"
        yield websocket.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done

    layer_class.relay_messages = relay_messages  # type: ignore[method-assign]
