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
(the cancellation's reason, as when cancelled while connecting; a socket already connected is
closed). A read loop cancelled while it waits to hand over a read drops that read (its
connection is being closed) and is cancelled again, to end where mitmproxy's loop catches it,
at its next read or drain: `ConnectionClosed`, the socket closed. Only handing over that may wait
goes through the wrapper (the lock held or waited for); the rest is mitmproxy's coroutine as is.
(Wrapping the read loop itself, the first way tried, made an HTTP/2 scraper's 600 requests grow
the gateway's RSS by 8.2-8.6 MiB in four runs of four, 2.6-4.4 MiB in most runs without it, and
failed tests/test_read_backpressure.py's check in CI; why was not found.)
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
        and "cancelled = e\n                break" in loop
        and "async with self.max_conns[command.connection.address]:" in opening
        and "await self.server_event(events.OpenConnectionCompleted(command, None))" in opening
        and "await self.handle_connection(command.connection)" in opening
        and "async with self._server_event_lock" in hand_over
    )


@install_once(_looks_as_expected)
def install() -> None:
    """Make mitmproxy's connection tasks tell the layers however cancelled (once per process)."""
    handler_class = server.ConnectionHandler
    original_open = handler_class.open_connection
    original_hand_over = handler_class.server_event

    @functools.wraps(original_open)
    async def open_connection(self: Any, command: commands.OpenConnection) -> None:
        try:
            await original_open(self, command)
        except asyncio.CancelledError as e:
            if not command.__dict__.get(_TOLD):
                await _not_opened(self, command, str(e) or "connection cancelled")
            raise

    # A plain function that hands mitmproxy the original coroutine where it cannot wait (the
    # lock free, no one waiting for it): no extra coroutine on the request path.
    @functools.wraps(original_hand_over)
    def server_event(self: Any, event: events.Event) -> Coroutine[Any, Any, None]:
        if isinstance(event, events.OpenConnectionCompleted):
            return _telling(original_hand_over(self, event), event.command)
        lock = self._server_event_lock
        if (lock.locked() or getattr(lock, "_waiters", True)) and isinstance(
            event, events.DataReceived | events.ConnectionClosed
        ):
            return _handing_over(original_hand_over(self, event), self, event)
        return original_hand_over(self, event)

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


async def _handing_over(
    hand_over: Coroutine[Any, Any, None], handler: Any, event: events.ConnectionEvent
) -> None:
    """A read loop's event, handed over where the lock may make it wait; if the loop is cancelled
    meanwhile, the loop ends as mitmproxy's does when cancelled while it reads."""
    try:
        await hand_over
    except asyncio.CancelledError as e:
        task = asyncio.current_task()
        io = handler.transports.get(event.connection)
        if task is None or io is None or io.handler is not task:
            raise  # not the connection's own read loop
        why = str(e) or None
        if isinstance(event, events.ConnectionClosed):
            # (handed over again: mitmproxy's loop has left its reads, nothing else to wait for)
            await type(handler).server_event(handler, event)
            if not event.connection.state & connection.ConnectionState.CAN_WRITE:
                return  # nothing left that a cancellation would end: the socket is closed next
        # A read: dropped, its connection being closed. The loop meets the cancellation again
        # where it reads or drains, and ends there as mitmproxy's own does.
        task.cancel(why)
