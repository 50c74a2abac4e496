"""A WebSocket connection is read no faster than the gateway relays what it read.

mitmproxy reads each connection in a loop, hands every read to its layers and then waits for its
own write buffers only (`ConnectionHandler.drain_writers`). A layer waiting for a hook keeps each
event that comes meanwhile in a queue of its own, and nothing bounds that queue: a site sending
small WebSocket messages faster than the hooks relay them (each message is a
`websocket_message` hook) made the gateway hold all it sent, 300 MiB and more, until it had
relayed it.

After each read, the loop now also waits while the WebSocket layers waiting for a hook hold more
than MAX_QUEUED_BYTES of what was read (on every connection of the client's handler, the
client's and the sites'): the socket's buffers fill and TCP slows the sender, as it does when
the gateway cannot write. Every hook's end wakes the wait. What those queues hold stays within
one read (64 KiB) of the bound.

Only WebSocket layers: an HTTP stream waits for a hook too (a request held for its budget, with
its body coming), but stopping the reads for it stalled the connection's other HTTP/2 streams
and hid the client's leaving until the held request's turn; a request's body is bounded by
`network.max_request_body_bytes` instead (addons/http_guard.py).

Installed once at start-up by the gateway (proxy/app.py), next to addons/websocket_limit.py;
only where mitmproxy's connection handler and layers still look as this assumes.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Coroutine
from typing import Any

from mitmproxy.proxy import commands
from mitmproxy.proxy import layer
from mitmproxy.proxy import server
from mitmproxy.proxy.layers import websocket

from addons.patches import install_once

MAX_QUEUED_BYTES = 4 * 2**20


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


def _waiting(handler: Any) -> _Waiting:
    try:
        return handler._crawlwarden_waiting
    except AttributeError:
        handler._crawlwarden_waiting = waiting = _Waiting()
        return waiting


@install_once(_looks_as_expected)
def install() -> None:
    """Make mitmproxy's read loops wait for the layers as for the writers (once per process)."""
    handler_class = server.ConnectionHandler
    original_hook_task = handler_class.hook_task
    original_drain = handler_class.drain_writers

    # Plain functions that hand mitmproxy the original coroutine where nothing is to be done (an
    # HTTP hook, no WebSocket waiting): no extra coroutine on every request's hooks and reads.
    @functools.wraps(original_hook_task)
    def hook_task(self: Any, hook: commands.StartHook) -> Coroutine[Any, Any, None]:
        paused = hook.blocking
        if not isinstance(paused, websocket.WebsocketLayer):
            return original_hook_task(self, hook)
        return _websocket_hook(self, hook, paused)

    async def _websocket_hook(self: Any, hook: commands.StartHook, paused: layer.Layer) -> None:
        waiting = _waiting(self)
        waiting.layers[id(paused)] = paused
        try:
            await original_hook_task(self, hook)
        finally:
            if paused._paused is None and not paused._paused_event_queue:
                waiting.layers.pop(id(paused), None)  # (re-paused: its next hook holds it)
            waiting.wake()

    @functools.wraps(original_drain)
    def drain_writers(self: Any) -> Coroutine[Any, Any, None]:
        waiting = getattr(self, "_crawlwarden_waiting", None)
        if waiting is None or not waiting.layers:
            return original_drain(self)
        return _drain_and_wait(self, waiting)

    async def _drain_and_wait(self: Any, waiting: _Waiting) -> None:
        await original_drain(self)
        while waiting.queued() > MAX_QUEUED_BYTES:
            await waiting.change()

    handler_class.hook_task = hook_task  # type: ignore[method-assign]
    handler_class.drain_writers = drain_writers  # type: ignore[method-assign]
