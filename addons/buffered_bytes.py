"""How much of a site's answer has come while mitmproxy still holds it whole.

An answer of up to 16 MiB is buffered by mitmproxy before any addon sees its body (so that an
opt-out in it can still make it a 451). When the scraper hung up before the body was whole (a
short timeout on a slow site, a browser leaving the page, or on purpose, again and again), the
bytes the site had sent were in mitmproxy's buffer only: the record said 0 and the site's
`bytes_per_day` was charged nothing. This counts them in `flow.metadata[RECEIVED]` as they come,
for the gateway's record and budget of a fetch that ends early.

Installed once at start-up by the gateway (proxy/app.py), next to addons/interim.py; only where
mitmproxy's HTTP stream still gathers a buffered body as this assumes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Generator
from typing import Any

from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import ResponseData

from addons.patches import install_once

# flow.metadata key: bytes of the body received so far, while mitmproxy buffers it.
RECEIVED = "crawlwarden.body_received"


def _looks_as_expected() -> bool:
    stream = getattr(http_layers, "HttpStream", None)
    consume = getattr(stream, "state_consume_response_body", None)
    if consume is None:
        return False
    return "self.response_body_buf += event.data" in inspect.getsource(consume)


@install_once(_looks_as_expected)
def install() -> None:
    """Count what mitmproxy buffers of each answer (once per process)."""
    original = http_layers.HttpStream.state_consume_response_body

    @functools.wraps(original)
    def state_consume_response_body(
        self: http_layers.HttpStream, event: events.Event
    ) -> Generator[Any, Any, None]:
        if isinstance(event, ResponseData):
            metadata = self.flow.metadata
            metadata[RECEIVED] = metadata.get(RECEIVED, 0) + len(event.data)
        return original(self, event)

    http_layers.HttpStream.state_consume_response_body = state_consume_response_body  # type: ignore[method-assign]
