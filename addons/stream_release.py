"""Finished HTTP streams freed when they finish, not by Python's cyclic garbage collector.

mitmproxy keeps one `HttpStream` layer per request, and every one of them ends as cyclic
garbage: it stores bound methods of itself as its `client_state`/`server_state`, and its
context's `layers` list holds it. Reference counting can then never free the stream, its flow,
the request and response with their headers, nor what crawlwarden hangs on the flow (~34 objects
per request); they wait for the collector, which the allocations trigger ~35 times a second at
800 requests/s, and whose older-generation passes stop the event loop for 1-6 ms with every
request in flight waiting (bench/README.md).

Two changes to mitmproxy's classes, made once at start-up by the gateway (proxy/app.py):

- `HttpStream.client_state`/`server_state` keep the state's function and bind it on each read,
  so the stream holds no method of itself. Reads and comparisons behave as before (a bound
  method equals another of the same function and object).
- `HttpLayer.streams` drops a finished stream (mitmproxy's `DropStream`) from its context's
  layers on the next turn of the event loop, after the stream's last step has run. Nothing
  routes an event to a dropped stream (mitmproxy ignores late data for it); `stack_pos` copes
  with a layer missing from the list and the stream's `mode` has been read and cached by then.

Both are checked against the running mitmproxy on install: if its classes no longer look like
this, nothing is changed and the collector frees the streams as before (slower, still correct).
tests/test_gateway_e2e.py watches the gateway's `python_gc_objects_collected_total` per request.
Breaking the cycle belongs in mitmproxy; this is the gateway's copy until it does.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
from typing import Any

from mitmproxy.proxy.layers import http as http_layers

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
    """HttpLayer.streams: a stream popped (finished) leaves its context's layers next turn."""

    def pop(self, stream_id: int, *default: Any) -> Any:
        stream = super().pop(stream_id, *default)
        if isinstance(stream, http_layers.HttpStream):
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


def _looks_as_expected() -> bool:
    """mitmproxy's classes are as this module assumes (checked, not trusted, on an upgrade)."""
    try:
        stream_init = inspect.getsource(http_layers.HttpStream.__init__)
        layer_init = inspect.getsource(inspect.unwrap(http_layers.HttpLayer.__init__))
    except (OSError, TypeError):  # installed without its sources: cannot tell, change nothing
        return False
    ours_or_nothing = vars(http_layers.HttpStream).get("client_state")  # no class attribute
    return (
        "self.client_state = self.state_uninitialized" in stream_init
        and "self.server_state = self.state_uninitialized" in stream_init
        and "self.streams = {}" in layer_init
        and (ours_or_nothing is None or isinstance(ours_or_nothing, _StateSlot))
    )


@install_once(_looks_as_expected)
def install() -> None:
    """Apply both changes (once per process); False if this mitmproxy does not look as expected."""
    http_layers.HttpStream.client_state = _StateSlot("client_state")
    http_layers.HttpStream.server_state = _StateSlot("server_state")
    original_init = http_layers.HttpLayer.__init__

    @functools.wraps(original_init)
    def __init__(self: http_layers.HttpLayer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.streams = _Streams(self.streams)

    http_layers.HttpLayer.__init__ = __init__  # type: ignore[method-assign]
