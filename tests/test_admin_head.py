"""HEAD on the admin API's GET endpoints: the same status and headers as GET, no body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.runtime_fixtures import admin_client
from tests.runtime_fixtures import running
from tests.support import AUDITOR_TOKEN
from tests.support import base_policy


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    async with running(tmp_path, base_policy(), "gw-head") as rt, admin_client(rt) as c:
        yield c


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/policy", "/openapi.json"])
async def test_public_get_endpoints_answer_head(client: TestClient, path: str) -> None:
    get = await client.get(path)
    head = await client.head(path)
    assert head.status == get.status == 200
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert await head.read() == b""


async def test_head_keeps_the_role_check(client: TestClient) -> None:
    assert (await client.head("/v1/budgets?site=x.test")).status == 401
    ok = await client.head(
        "/v1/budgets?site=x.test", headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}
    )
    assert ok.status == 200
    assert await ok.read() == b""


async def test_head_is_not_offered_for_post_endpoints(client: TestClient) -> None:
    assert (await client.head("/v1/policy/reload")).status == 405
