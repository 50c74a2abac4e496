"""Who may read /metrics: anyone by default (DESIGN.md), only the holders of a metrics,
auditor or admin token once the policy has a token of role `metrics` (its series have every
team's requests per site, which no team sees of another's in the admin API)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.runtime import Runtime
from tests.runtime_fixtures import ADMIN
from tests.runtime_fixtures import AUDITOR
from tests.runtime_fixtures import admin_client
from tests.runtime_fixtures import running
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import base_policy
from tests.support import basic
from tests.support import sha256_hex
from tests.support import write_policy

METRICS_TOKEN = "prometheus-scrape-token"
METRICS = {"Authorization": f"Bearer {METRICS_TOKEN}"}
TEAM_BASIC = {"Authorization": basic(TEAM, TEAM_TOKEN)}


def closed_policy() -> dict[str, Any]:
    policy = base_policy()
    policy["admin_tokens"] = [
        {"role": "admin", "token_sha256": sha256_hex(ADMIN_TOKEN)},
        {"role": "auditor", "token_sha256": sha256_hex(AUDITOR_TOKEN)},
        {"role": "metrics", "token_sha256": sha256_hex(METRICS_TOKEN), "name": "prometheus"},
    ]
    return policy


@pytest.fixture
async def closed(tmp_path: Path) -> AsyncIterator[tuple[Runtime, TestClient]]:
    async with running(tmp_path, closed_policy(), "gw-metrics") as rt:
        async with admin_client(rt) as client:
            yield rt, client


async def test_metrics_are_public_without_a_metrics_token(tmp_path: Path) -> None:
    async with running(tmp_path, base_policy(), "gw-metrics-open") as rt:
        async with admin_client(rt) as client:
            resp = await client.get("/metrics")
            assert resp.status == 200
            assert "crawlwarden_policy_info" in await resp.text()


@pytest.mark.parametrize("headers", [METRICS, AUDITOR, ADMIN], ids=["metrics", "auditor", "admin"])
async def test_a_metrics_token_closes_metrics_to_all_but_its_readers(
    closed: tuple[Runtime, TestClient], headers: dict[str, str]
) -> None:
    _, client = closed
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200
    assert "crawlwarden_policy_info" in await resp.text()


async def test_without_a_token_or_with_a_teams_credentials_metrics_are_refused(
    closed: tuple[Runtime, TestClient],
) -> None:
    _, client = closed
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert "Bearer" in resp.headers.getall("WWW-Authenticate")[0]
    assert "crawlwarden_" not in await resp.text()
    resp = await client.get("/metrics", headers=TEAM_BASIC)
    assert resp.status == 403
    body = await resp.json()
    assert "metrics, auditor, admin" in body["error"], body
    resp = await client.get("/metrics", headers={"Authorization": "Bearer not-a-token"})
    assert resp.status == 401
    # the public endpoints stay public
    for path in ("/healthz", "/readyz", "/policy"):
        assert (await client.get(path)).status == 200, path


async def test_a_metrics_token_opens_nothing_else(closed: tuple[Runtime, TestClient]) -> None:
    _, client = closed
    for path in ("/v1/fetches", "/v1/reports/sites", "/v1/budgets?site=site-a.test", "/v1/usage"):
        resp = await client.get(path, headers=METRICS)
        assert resp.status == 403, (path, resp.status)
        assert "the metrics role may not do this" in (await resp.json())["error"]
    resp = await client.post("/v1/policy/reload", headers=METRICS)
    assert resp.status == 403


async def test_a_reload_closes_and_reopens_metrics(tmp_path: Path) -> None:
    async with running(tmp_path, base_policy(), "gw-metrics-reload") as rt:
        async with admin_client(rt) as client:
            assert (await client.get("/metrics")).status == 200
            write_policy(tmp_path / "policy.yaml", closed_policy())
            assert (await client.post("/v1/policy/reload", headers=ADMIN)).status == 200
            assert (await client.get("/metrics")).status == 401
            assert (await client.get("/metrics", headers=METRICS)).status == 200
            write_policy(tmp_path / "policy.yaml", base_policy())
            assert (await client.post("/v1/policy/reload", headers=ADMIN)).status == 200
            assert (await client.get("/metrics")).status == 200
