"""A lean, pipelined Redis connection for the two calls every request costs: the EVALSHA of its
admission, on its path, and that of its settlement, batched after it.

redis-py spends about 200 us of CPU per call here (connection pool, retry wrapper, a timeout
object per call, its reply parser) on top of the ~100 us a loopback round trip costs a Python
process. This connection is an asyncio Protocol with hiredis' parser: commands from concurrent
requests are written together once per event-loop turn (Redis answers in order, so replies are
matched first in, first out), and nothing is allocated per call but the future and the bytes.

It does only what the hot path needs. Anything unusual — a `rediss://` or unix-socket URL, a
NOSCRIPT reply, a timeout, a dropped connection — is either handed back to redis-py by the caller
or turned into an OSError/TimeoutError that the budget engine treats as "store unavailable".
A timed-out call closes the connection: its reply may still come, and the FIFO would then match
every later reply to the wrong caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote
from urllib.parse import urlsplit

import hiredis


class ReplyError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT); the connection itself is fine."""


def pack(args: tuple[bytes | str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Commands of this loop turn, written together by one flush (see FastRedis._send).
        self.outbox: list[bytes] = []
        self.flush_scheduled = False

    def flush(self) -> None:
        self.flush_scheduled = False
        data, self.outbox = b"".join(self.outbox), []
        if self.closed or self.transport is None:
            self.fail(ConnectionError("connection to Redis lost"))
            return
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiters:
                self.fail(ConnectionError("a Redis reply nobody asked for"))
                return
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError(f"connection to Redis lost: {exc or 'closed by Redis'}")
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def fail(self, error: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class FastRedis:
    """One pipelined connection to the Redis of `url`, opened on first use, again after loss."""

    def __init__(self, url: str, *, timeout: float, connect_timeout: float):
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"{url}: only redis://host[:port][/db] takes the fast path")
        self.host = parts.hostname
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def call(self, *args: bytes | str | int) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return await self._send(await self._connect(), args)
        try:
            return await self._send(protocol, args)
        except ConnectionError:
            # A connection that died with a restarted Redis is only found out by using it: one
            # more try on a fresh connection, as redis-py does (never after a timeout, which may
            # mean the script ran).
            return await self._send(await self._connect(), args)

    async def call_many(self, calls: Sequence[tuple[bytes | str | int, ...]]) -> list[Any]:
        """Several commands in one write (with whatever else this loop turn sends); their
        replies in order, an error reply as a `ReplyError` value rather than raised.

        As `call`, a connection found dead before any reply came is retried once on a fresh
        one; one that breaks part way raises (some of the commands may have run)."""
        protocol = self._protocol
        stale = protocol is not None and not protocol.closed  # may have died unnoticed
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        waiters = [self._enqueue(protocol, args) for args in calls]
        try:
            replies = await self._wait(protocol, waiters)
        except ConnectionError:
            answered = any(not w.cancelled() and w.exception() is None for w in waiters)
            if not stale or answered:
                raise
            protocol = await self._connect()
            replies = await self._wait(protocol, [self._enqueue(protocol, a) for a in calls])
        return [ReplyError(str(r)) if isinstance(r, hiredis.ReplyError) else r for r in replies]

    def _enqueue(self, protocol: _Protocol, args: tuple[bytes | str | int, ...]) -> Any:
        """Queue one command for this loop turn's write; its reply's future."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        protocol.waiters.append(waiter)
        protocol.outbox.append(pack(args))
        if not protocol.flush_scheduled:
            protocol.flush_scheduled = True
            loop.call_soon(protocol.flush)
        return waiter

    async def _wait(self, protocol: _Protocol, waiters: list[asyncio.Future[Any]]) -> list[Any]:
        # Replies come in order: when the last is in, so are the others (no gather needed). A
        # failure fails the connection and so every waiter still pending, the last one too; an
        # error *reply* is a value (hiredis hands it over as a ReplyError instance).
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout, self._timed_out, protocol, waiters[-1])
        try:
            last = await waiters[-1]
        except BaseException:
            for w in waiters[:-1]:  # as gather would: none left pending, no error unretrieved
                if not w.done():
                    w.cancel()
                elif not w.cancelled():
                    w.exception()
            raise
        finally:
            timer.cancel()
        return [w.result() for w in waiters[:-1]] + [last]

    async def _send(self, protocol: _Protocol, args: tuple[bytes | str | int, ...]) -> Any:
        (reply,) = await self._wait(protocol, [self._enqueue(protocol, args)])
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    def _timed_out(self, protocol: _Protocol, waiter: asyncio.Future[Any]) -> None:
        if not waiter.done():
            protocol.fail(TimeoutError(f"no answer from Redis within {self.timeout:g}s"))
            if self._protocol is protocol:
                self._protocol = None

    async def _connect(self) -> _Protocol:
        # One connection attempt at a time, however many requests are waiting for it.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        protocol = await asyncio.shield(self._connecting)
        self._protocol = protocol
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        try:
            async with asyncio.timeout(self.timeout):
                if self.password is not None:
                    auth = ("AUTH", self.username, self.password) if self.username else None
                    await self._direct(protocol, *(auth or ("AUTH", self.password)))
                if self.db:
                    await self._direct(protocol, "SELECT", self.db)
        except BaseException:
            protocol.fail(ConnectionError("Redis refused the connection's setup"))
            raise
        return protocol

    @staticmethod
    async def _direct(protocol: _Protocol, *args: bytes | str | int) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiters.append(waiter)
        assert protocol.transport is not None
        protocol.transport.write(pack(args))
        reply = await waiter
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
