"""GET /v1/fetches and GET /v1/audit/public-key on a real admin app over a real SQLite log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from aiohttp.test_utils import TestServer

from proxy.admin import make_app
from proxy.audit.api import ROUTES
from proxy.runtime import Runtime
from proxy.runtime import Settings
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import base_policy
from tests.support import write_policy
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import keys

AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    settings = Settings(
        policy_file=write_policy(tmp_path / "policy.yaml", base_policy()),
        data_dir=tmp_path / "data",
        replica_id="gw-api",
    )
    runtime = Runtime.from_settings(settings)
    signer, _ = keys(tmp_path)
    runtime.fetch_log.signer = signer
    runtime.fetch_log.checkpoint_every_records = 10
    await runtime.start()
    for i in range(45):
        runtime.record(fetch(i))
    assert await runtime.fetch_log.flushed()
    async with TestClient(TestServer(make_app(runtime, ROUTES))) as c:
        yield c
    await runtime.stop()


async def test_pages_concatenate_into_one_verifiable_export(
    client: TestClient, tmp_path: Path
) -> None:
    pages: list[str] = []
    url = "/v1/fetches?limit=20"
    while url:
        resp = await client.get(url, headers=AUDITOR)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        pages.append(await resp.text())
        link = resp.headers.get("Link")
        url = link[1 : link.index(">")] if link else ""
        assert ("X-Next-Cursor" in resp.headers) == bool(link)
    assert len(pages) == 3  # 20 + 20 + 5 records
    assert pages[0].startswith('{"type":"export"')
    assert not pages[1].startswith('{"type":"export"')
    export = tmp_path / "api.jsonl"
    export.write_text("".join(pages))
    public = tmp_path / "key.pub"
    resp = await client.get("/v1/audit/public-key")  # public: no token
    assert resp.status == 200
    public.write_bytes(await resp.read())
    # Checkpoints every 10 records: 41..45, exported from the live log, are not signed yet.
    unproven = cli("audit", "verify", export, "--public-key", public)
    assert unproven.returncode == 1, unproven.stdout
    assert "records 41..45 come after the last checkpoint" in unproven.stdout
    verified = cli("audit", "verify", export, "--public-key", public, "--allow-unsigned")
    assert verified.returncode == 0, verified.stdout
    assert "replica gw-api: records 1..45 (45 in full)" in verified.stdout
    assert "warning: replica gw-api: records 41..45 come after" in verified.stdout


async def test_filters_csv_and_roles(client: TestClient) -> None:
    resp = await client.get("/v1/fetches?site=a.example&format=csv", headers=AUDITOR)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    rows = (await resp.text()).splitlines()
    assert rows[0].startswith("type,id,ts")
    assert sum(r.startswith("record,") for r in rows) == 15
    assert sum(r.startswith("redacted,") for r in rows) == 30

    resp = await client.get("/v1/fetches?decision=refused&team=vision-data", headers=AUDITOR)
    body = await resp.text()
    assert '"filters":{"team":"vision-data","decision":"refused"}' in body

    assert (await client.get("/v1/fetches")).status == 401
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await client.get("/v1/fetches", headers=admin)).status == 403
    resp = await client.get("/v1/fetches?replica=gw-api", headers=AUDITOR)
    assert '"filters":{"replica":"gw-api"}' in await resp.text()  # the header says so
    for bad in ("limit=0", "format=xml", "since=yesterday", "cursor=%%%", "decision=bogus"):
        resp = await client.get(f"/v1/fetches?{bad}", headers=AUDITOR)
        assert resp.status == 400, bad


async def test_routes_are_documented_in_openapi(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    fetches = document["paths"]["/v1/fetches"]["get"]
    names = {p["name"] for p in fetches["parameters"]}
    assert {"since", "until", "site", "team", "project", "decision", "cursor", "format"} <= names
    assert "auditor" in fetches["description"]
    assert "security" not in document["paths"]["/v1/audit/public-key"]["get"]
