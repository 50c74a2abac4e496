"""How much of a site's answer has come while mitmproxy still holds it whole, and when the site
last sent any of it.

An answer of up to 16 MiB is buffered by mitmproxy before any addon sees its body (so that an
opt-out in it can still make it a 451). When the scraper hung up before the body was whole (a
short timeout on a slow site, a browser leaving the page, or on purpose, again and again), the
bytes the site had sent were in mitmproxy's buffer only: the record said 0 and the site's
`bytes_per_day` was charged nothing. This counts them in `flow.metadata[RECEIVED]` as they come,
for the gateway's record and budget of a fetch that ends early.

Held whole or streamed, the time each piece of an answer came is kept in `flow.metadata[HEARD]`
(monotonic): on an HTTP/2 connection to the site that other requests share, HttpGuard counts a
stream's silence from it, not from the connection's last data (`response_timeout`).

Installed once at start-up by the gateway (proxy/app.py), next to addons/interim.py; only where
mitmproxy's HTTP stream still gathers a buffered body as this assumes.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Generator
from typing import Any

from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import ResponseData

from addons.patches import install_once

# flow.metadata key: bytes of the body received so far, while mitmproxy buffers it.
RECEIVED = "crawlwarden.body_received"
# flow.metadata key: when (monotonic) the site last sent a piece of the body, once installed.
HEARD = "crawlwarden.site_heard"
installed = False


def _looks_as_expected() -> bool:
    stream = getattr(http_layers, "HttpStream", None)
    consume = getattr(stream, "state_consume_response_body", None)
    relay = getattr(stream, "state_stream_response_body", None)
    if consume is None or relay is None:
        return False
    return "self.response_body_buf += event.data" in inspect.getsource(
        consume
    ) and "if isinstance(event, ResponseData):" in inspect.getsource(relay)


@install_once(_looks_as_expected)
def install() -> None:
    """Count what mitmproxy buffers of each answer, and note when each piece came (once per
    process)."""
    global installed
    original = http_layers.HttpStream.state_consume_response_body
    original_relay = http_layers.HttpStream.state_stream_response_body

    @functools.wraps(original)
    def state_consume_response_body(
        self: http_layers.HttpStream, event: events.Event
    ) -> Generator[Any, Any, None]:
        if isinstance(event, ResponseData):
            metadata = self.flow.metadata
            metadata[RECEIVED] = metadata.get(RECEIVED, 0) + len(event.data)
            metadata[HEARD] = time.monotonic()
        return original(self, event)

    @functools.wraps(original_relay)
    def state_stream_response_body(
        self: http_layers.HttpStream, event: events.Event
    ) -> Generator[Any, Any, None]:
        if isinstance(event, ResponseData):
            self.flow.metadata[HEARD] = time.monotonic()
        return original_relay(self, event)

    http_layers.HttpStream.state_consume_response_body = state_consume_response_body  # type: ignore[method-assign]
    http_layers.HttpStream.state_stream_response_body = state_stream_response_body  # type: ignore[method-assign]
    installed = True
