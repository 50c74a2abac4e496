"""A connection's task that is cancelled still tells the layers, and closes its socket.

mitmproxy runs a task per connection. For a site's connection, `ConnectionHandler.open_connection`
waits for a free slot (at most five connections per address and scraper connection), connects,
tells the layers (`OpenConnectionCompleted`) and then reads the connection in a loop
(`handle_connection`), which hands every read to the layers (`server_event`) and, once the peer
closes or the task is cancelled (the layers closed the connection: `CloseConnection` cancels its
task), tells them `ConnectionClosed` and closes the socket. The task catches its cancellation
only while it connects, reads or drains. Cancelled anywhere else, it ended with the layers never
told, the request waiting on it forever:

- Handing over an event may wait: `server_event` takes a lock, and mitmproxy runs its tasks
  eagerly (asyncio's eager task factory), so a hook started while the lock is held runs at once
  and waits there to hand back its `HookCompleted`. A loop whose layers closed its connection as
  they handled one read, with the next read already in its buffer, met the cancellation in that
  wait: no `ConnectionClosed`, the socket left open. The gateway closes a site's connection so to
  stop the download of a withheld image (addons/http_guard.py): under load the request hung until
  its scraper gave up, and the site blocked in its send.
- A connection waiting for its slot (an HTTP/2 scraper's sixth request at once to a site, each on
  a connection of its own), or for a hook before or after connecting, closed by the layers (the
  gateway's connect or response timeout): no `OpenConnectionCompleted`, and the request was
  never answered nor recorded.

Wrapped once at start-up (proxy/app.py), each where mitmproxy's own code still looks as assumed:
a connection whose task ends cancelled before the layers were told it opened is told it failed
(the cancellation's reason, as when cancelled while connecting; a socket already connected
is closed); a read loop that ends cancelled with its connection still among the handler's
transports (mitmproxy removes it last) ends as mitmproxy's own would have: the connection marked
closed, `ConnectionClosed` to the layers, the socket closed. The event being handed over is
dropped: its connection was closed. Then the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Coroutine
from typing import Any

from mitmproxy import connection
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy import server
from mitmproxy.proxy import server_hooks

from addons.patches import install_once

# On an OpenConnection command: the layers have been told how it went.
_TOLD = "_crawlwarden_told"


def _looks_as_expected() -> bool:
    handler = getattr(server, "ConnectionHandler", None)
    if handler is None:
        return False
    try:
        loop = inspect.getsource(handler.handle_connection)
        opening = inspect.getsource(handler.open_connection)
        hand_over = inspect.getsource(handler.server_event)
    except (OSError, TypeError):
        return False
    return (
        "await self.server_event(events.DataReceived(connection, data))" in loop
        and "await self.server_event(events.ConnectionClosed(connection))" in loop
        and "self.transports.pop(connection)" in loop
        and "async with self.max_conns[command.connection.address]:" in opening
        and "await self.server_event(events.OpenConnectionCompleted(command, None))" in opening
        and "await self.handle_connection(command.connection)" in opening
        and "async with self._server_event_lock" in hand_over
    )


@install_once(_looks_as_expected)
def install() -> None:
    """Make mitmproxy's connection tasks tell the layers however cancelled (once per process)."""
    handler_class = server.ConnectionHandler
    original_loop = handler_class.handle_connection
    original_open = handler_class.open_connection
    original_hand_over = handler_class.server_event

    @functools.wraps(original_loop)
    async def handle_connection(self: Any, conn: connection.Connection) -> None:
        try:
            await original_loop(self, conn)
        except asyncio.CancelledError:
            if conn in self.transports:  # (mitmproxy's own end removes it)
                await _closed(self, conn)
            raise

    @functools.wraps(original_open)
    async def open_connection(self: Any, command: commands.OpenConnection) -> None:
        try:
            await original_open(self, command)
        except asyncio.CancelledError as e:
            if not command.__dict__.get(_TOLD):
                await _not_opened(self, command, str(e) or "connection cancelled")
            raise

    # A plain function that hands mitmproxy the original coroutine for every other event: no
    # extra coroutine on the request path.
    @functools.wraps(original_hand_over)
    def server_event(self: Any, event: events.Event) -> Coroutine[Any, Any, None]:
        if isinstance(event, events.OpenConnectionCompleted):
            return _telling(original_hand_over(self, event), event.command)
        return original_hand_over(self, event)

    handler_class.handle_connection = handle_connection  # type: ignore[method-assign,assignment]
    handler_class.open_connection = open_connection  # type: ignore[method-assign]
    handler_class.server_event = server_event  # type: ignore[method-assign]


async def _telling(hand_over: Coroutine[Any, Any, None], command: commands.Command) -> None:
    await hand_over
    command.__dict__[_TOLD] = True  # (not reached if cancelled while waiting to hand it over)


async def _not_opened(handler: Any, command: commands.OpenConnection, why: str) -> None:
    """What mitmproxy does when cancelled while connecting, where the cancellation skipped it."""
    conn = command.connection
    error = conn.error or why
    conn.error = error
    io = handler.transports.get(conn)
    if io is not None and io.writer is not None:  # (connected, the layers not told yet)
        with contextlib.suppress(OSError):
            io.writer.close()
    conn.state = connection.ConnectionState.CLOSED
    data = server_hooks.ServerConnectionHookData(client=handler.client, server=conn)
    await handler.handle_hook(server_hooks.ServerConnectErrorHook(data))
    await handler.server_event(events.OpenConnectionCompleted(command, error))


async def _closed(handler: Any, conn: connection.Connection) -> None:
    """What mitmproxy's read loop does once cancelled, where the cancellation skipped it."""
    conn.state = connection.ConnectionState.CLOSED
    await handler.server_event(events.ConnectionClosed(conn))
    io = handler.transports.get(conn)
    if io is not None and io.writer is not None:
        with contextlib.suppress(OSError):
            io.writer.close()
    handler.transports.pop(conn, None)
