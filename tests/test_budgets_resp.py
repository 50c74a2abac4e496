"""The lean pipelined Redis connection of admissions and settlements, against real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
from collections.abc import AsyncIterator

import pytest

from proxy.budgets.resp import FastRedis
from proxy.budgets.resp import ReplyError
from proxy.budgets.resp import pack
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import own_redis  # noqa: F401 - fixture


@contextlib.asynccontextmanager
async def lean(url: str, *, timeout: float, connect_timeout: float) -> AsyncIterator[FastRedis]:
    fast = FastRedis(url, timeout=timeout, connect_timeout=connect_timeout)
    try:
        yield fast
    finally:
        await fast.close()


def test_pack_is_resp():
    assert (
        pack(("EVALSHA", b"ab", 2, "k"))
        == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$1\r\nk\r\n"
    )


async def test_concurrent_calls_each_get_their_own_reply(own_redis: RedisServer):  # noqa: F811
    async with lean(own_redis.url, timeout=2, connect_timeout=2) as fast:
        replies = await asyncio.gather(*(fast.call("ECHO", f"m{i}") for i in range(500)))
        assert replies == [f"m{i}".encode() for i in range(500)]
        with pytest.raises(ReplyError, match="NOSCRIPT"):
            await fast.call("EVALSHA", "0" * 40, 0)
        # An error reply leaves the connection usable.
        assert await fast.call("PING") == b"PONG"


async def test_it_selects_the_database_of_the_url(own_redis: RedisServer):  # noqa: F811
    async with lean(own_redis.url.rsplit("/", 1)[0] + "/3", timeout=2, connect_timeout=2) as fast:
        await fast.call("SET", "cw-resp-db", "x")
    out = subprocess.run(
        ["redis-cli", "-p", str(own_redis.port), "-n", "3", "GET", "cw-resp-db"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "x"


async def test_a_timeout_fails_the_call_and_the_next_call_reconnects(own_redis: RedisServer):  # noqa: F811
    async with lean(own_redis.url, timeout=0.3, connect_timeout=2) as fast:
        assert await fast.call("PING") == b"PONG"
        # A command that answers late: its reply must not be handed to the next caller.
        with pytest.raises(TimeoutError):
            await fast.call("BLPOP", "cw-resp-nothing", "0.6")
        await asyncio.sleep(0.5)
        assert await fast.call("ECHO", "after") == b"after"


async def test_redis_restarted_between_calls(own_redis: RedisServer):  # noqa: F811
    async with lean(own_redis.url, timeout=1, connect_timeout=1) as fast:
        assert await fast.call("PING") == b"PONG"
        own_redis.kill()
        with pytest.raises(OSError):
            await fast.call("PING")
        own_redis.start()
        assert await fast.call("PING") == b"PONG"


def test_urls_it_does_not_handle_are_left_to_redis_py():
    for url in ("rediss://h:6380/0", "unix:///tmp/redis.sock"):
        with pytest.raises(ValueError):
            FastRedis(url, timeout=1, connect_timeout=1)


async def test_many_calls_go_out_together_and_error_replies_come_back_as_values(
    own_redis: RedisServer,  # noqa: F811
):
    async with lean(own_redis.url, timeout=2, connect_timeout=2) as fast:
        replies = await fast.call_many(
            [("ECHO", "a"), ("EVALSHA", "0" * 40, 0), ("INCR", "cw-resp-many"), ("ECHO", "b")]
        )
        assert replies[0] == b"a" and replies[2] == 1 and replies[3] == b"b"
        assert isinstance(replies[1], ReplyError) and "NOSCRIPT" in str(replies[1])
        # Interleaved with single calls of the same loop turn, each reply reaches its caller.
        single, many = await asyncio.gather(
            fast.call("ECHO", "one"), fast.call_many([("ECHO", f"m{i}") for i in range(50)])
        )
        assert single == b"one" and many == [f"m{i}".encode() for i in range(50)]


async def test_many_calls_after_a_restart_are_sent_again_once(own_redis: RedisServer):  # noqa: F811
    async with lean(own_redis.url, timeout=1, connect_timeout=1) as fast:
        assert await fast.call("PING") == b"PONG"
        own_redis.kill()
        own_redis.start()
        # The old connection is dead, which only using it shows: nothing ran on it, so the
        # calls go again on a fresh connection, and each runs once.
        assert await fast.call_many([("INCR", "cw-resp-restart")] * 3) == [1, 2, 3]
        own_redis.kill()
        with pytest.raises(OSError):
            await fast.call_many([("PING",)] * 2)


async def test_many_calls_time_out_together(own_redis: RedisServer):  # noqa: F811
    async with lean(own_redis.url, timeout=0.3, connect_timeout=2) as fast:
        with pytest.raises(TimeoutError):
            await fast.call_many([("PING",), ("BLPOP", "cw-resp-nothing", "0.6"), ("PING",)])
        await asyncio.sleep(0.5)
        assert await fast.call_many([("ECHO", "after")]) == [b"after"]


async def test_calls_that_fail_together_leave_no_error_unretrieved(
    own_redis: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
):
    # Only the last reply of a batch is awaited (the others are in by then); when the batch
    # fails, the other replies' errors must be taken too, or asyncio logs each one at collection.
    async with lean(own_redis.url, timeout=0.3, connect_timeout=2) as fast:
        with pytest.raises(TimeoutError):
            await fast.call_many([("PING",), ("BLPOP", "cw-resp-lost", "0.6"), ("PING",)])
        task = asyncio.ensure_future(fast.call_many([("BLPOP", "cw-resp-lost", "1"), ("PING",)]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    gc.collect()
    await asyncio.sleep(0)
    assert "exception was never retrieved" not in caplog.text
