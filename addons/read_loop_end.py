"""A connection's read loop that ends always tells the layers, and closes its socket.

mitmproxy reads each connection in a loop (`ConnectionHandler.handle_connection`): it hands every
read to the layers (`server_event`); once the peer closes, or the loop is cancelled (the layers
closed the connection: `CloseConnection` cancels its loop), it hands them `ConnectionClosed` and
closes the socket. The loop catches its cancellation while it reads or drains, not while it hands
over an event, and handing over may wait: `server_event` takes a lock, and mitmproxy runs its
tasks eagerly (asyncio's eager task factory), so a hook started while the lock is held runs at
once and waits there to hand back its `HookCompleted`. A loop whose layers closed its connection
as they handled one read, with the next read already in its buffer, met the cancellation in that
wait: it ended with neither `ConnectionClosed` nor the socket's close. The gateway closes a
site's connection that way to stop the download of a withheld image (addons/http_guard.py):
under load the request hung until its scraper gave up, the socket stayed open and the site
blocked in its send.

Wrapped once at start-up (proxy/app.py): a loop that ends cancelled with its connection still
among the handler's transports (mitmproxy removes it last) ends as mitmproxy's own would have:
the connection is marked closed, the layers get `ConnectionClosed`, the socket is closed, and
the cancellation goes on. The read it was handing over is dropped: its connection was closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from typing import Any

from mitmproxy import connection
from mitmproxy.proxy import events
from mitmproxy.proxy import server

from addons.patches import install_once


def _looks_as_expected() -> bool:
    handler = getattr(server, "ConnectionHandler", None)
    if handler is None:
        return False
    try:
        loop = inspect.getsource(handler.handle_connection)
        hand_over = inspect.getsource(handler.server_event)
    except (OSError, TypeError):
        return False
    return (
        "await self.server_event(events.DataReceived(connection, data))" in loop
        and "await self.server_event(events.ConnectionClosed(connection))" in loop
        and "self.transports.pop(connection)" in loop
        and "async with self._server_event_lock" in hand_over
    )


@install_once(_looks_as_expected)
def install() -> None:
    """Make mitmproxy's read loops end with `ConnectionClosed` however cancelled (once per
    process)."""
    handler_class = server.ConnectionHandler
    original = handler_class.handle_connection

    @functools.wraps(original)
    async def handle_connection(self: Any, conn: connection.Connection) -> None:
        try:
            await original(self, conn)
        except asyncio.CancelledError:
            if conn in self.transports:  # (mitmproxy's own end removes it)
                await _end(self, conn)
            raise

    handler_class.handle_connection = handle_connection  # type: ignore[method-assign,assignment]


async def _end(handler: Any, conn: connection.Connection) -> None:
    """What mitmproxy's loop does once cancelled, where the cancellation skipped it."""
    conn.state = connection.ConnectionState.CLOSED
    await handler.server_event(events.ConnectionClosed(conn))
    io = handler.transports.get(conn)
    if io is not None and io.writer is not None:
        with contextlib.suppress(OSError):
            io.writer.close()
    handler.transports.pop(conn, None)
