"""A fresh PostgreSQL database for each test that asks for one (real PostgreSQL, no mocks).

Import the fixtures into a test module:

    from tests.pg_fixtures import pg_dsn  # noqa: F401

The server is the machine's PostgreSQL on 127.0.0.1:5432, user postgres, trust auth (override with
CRAWLWARDEN_TEST_PG, a DSN of a role that may create databases). Each test gets its own database,
dropped afterwards. Without a reachable server the tests skip, except under CI=true, where they
fail: CI must never pass by skipping the PostgreSQL tests.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

ADMIN_DSN = os.environ.get("CRAWLWARDEN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def run_sync(fn: Callable[[], Any]) -> Any:
    """Run a coroutine function to completion on its own loop in a thread (fixtures are sync)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(fn())
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    async def probe() -> None:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
        await conn.close()

    try:
        run_sync(probe)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        message = (
            f"PostgreSQL is not reachable at {ADMIN_DSN} ({e!r}); start it (apt-get install "
            "postgresql, trust auth for 127.0.0.1) or set CRAWLWARDEN_TEST_PG"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return ADMIN_DSN


@pytest.fixture
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """The DSN of a database created for this test and dropped after it."""
    name = f"crawlwarden_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_sync(create)
    try:
        yield dsn_for(name)
    finally:
        run_sync(drop)
