"""The admin API refuses what it does not understand: an unknown query parameter (a misspelt
filter would return everything unfiltered), an unknown body field, an unknown path or method,
each with the API's JSON problem body, never aiohttp's plain text."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from proxy.runtime import Runtime
from tests.runtime_fixtures import ADMIN
from tests.runtime_fixtures import AUDITOR
from tests.runtime_fixtures import admin_client
from tests.runtime_fixtures import running
from tests.support import base_policy

TAKEDOWN = {
    "rights_holder": "Example Pictures Ltd",
    "contact": "legal@pictures.example",
    "scope": "prefix",
    "targets": ["https://photos.example.com/gallery/"],
    "reason": "copyright",
}
BLOCK = {"scope": "domain", "targets": ["a.example"], "reason": "r", "source": "s"}


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with running(tmp_path, base_policy(), "gw-strict") as rt:
        yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[TestClient]:
    async with admin_client(runtime) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "headers", "unknown", "accepted"),
    [
        ("/v1/fetches?tema=team-b", AUDITOR, "tema", "team"),
        ("/v1/fetches?team=team-b&sience=2026-01-01", AUDITOR, "sience", "since"),
        ("/v1/reports/sites?form=csv", AUDITOR, "form", "format"),
        ("/v1/budgets?site=x.test&sight=y", AUDITOR, "sight", "site"),
        ("/v1/takedowns/td-x/manifest?fromat=csv", AUDITOR, "fromat", "format"),
        ("/v1/takedowns?status=outstanding", AUDITOR, "status", None),
        ("/v1/blocklist?active=1", AUDITOR, "active", None),
        ("/policy?fmt=json", {}, "fmt", "format"),
    ],
)
async def test_an_unknown_query_parameter_is_refused_by_name(
    client: TestClient, path: str, headers: dict[str, str], unknown: str, accepted: str | None
) -> None:
    resp = await client.get(path, headers=headers)
    assert resp.status == 400
    body = await resp.json()
    assert unknown in body["error"]
    assert body["unknown_parameters"] == [unknown]
    if accepted is not None:
        assert accepted in body["accepted_parameters"]
        assert accepted in body["error"]
    else:
        assert body["accepted_parameters"] == []


ANY_QUERY = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/audit/public-key"]


@pytest.mark.parametrize("path", ANY_QUERY)
async def test_public_endpoints_without_parameters_answer_whatever_the_query(
    client: TestClient, path: str
) -> None:
    # a probe's cache-buster or a scrape config's params: a 400 would read as the gateway down
    for query in ("?x=1", "?name[]=a", "?v=1&v=2", "?t="):
        assert (await client.get(path + query)).status in (200, 503), query
    # and the API document (which has all but itself) does not say otherwise (it listed a 400)
    document = await (await client.get("/openapi.json")).json()
    if path != "/openapi.json":
        assert "400" not in document["paths"][path]["get"]["responses"]


async def test_a_parameter_given_twice_is_refused(client: TestClient) -> None:
    resp = await client.get("/v1/fetches?team=team-a&team=team-b", headers=AUDITOR)
    assert resp.status == 400
    assert "team" in (await resp.json())["error"]


async def test_known_parameters_still_work(client: TestClient) -> None:
    assert (await client.get("/v1/fetches?team=team-b&limit=5", headers=AUDITOR)).status == 200
    assert (await client.get("/policy?format=json")).status == 200
    assert (await client.get("/v1/reports/sites?format=csv", headers=AUDITOR)).status == 200


async def test_the_token_is_checked_before_the_parameters(client: TestClient) -> None:
    assert (await client.get("/v1/fetches?tema=team-b")).status == 401


async def test_the_openapi_document_lists_the_query_parameters(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    names = [p["name"] for p in document["paths"]["/policy"]["get"]["parameters"]]
    assert names == ["format"]
    fetches = document["paths"]["/v1/fetches"]["get"]["responses"]
    assert "unknown query parameter" in fetches["400"]["description"]


async def test_an_unknown_path_is_a_json_404(client: TestClient) -> None:
    resp = await client.get("/v1/fetchs", headers=AUDITOR)
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert "/v1/fetchs" in (await resp.json())["error"]


async def test_a_wrong_method_is_a_json_405_with_allow(client: TestClient) -> None:
    resp = await client.put("/v1/takedowns", json={"reason": "r"}, headers=ADMIN)
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert set(resp.headers["Allow"].split(",")) >= {"GET", "POST"}
    body = await resp.json()
    assert "PUT" in body["error"]
    assert "POST" in body["allowed_methods"]


async def test_a_body_too_large_is_a_json_413(client: TestClient) -> None:
    big = io.BytesIO(b"{" + b" " * (2 << 20))
    resp = await client.post("/v1/takedowns", data=big, headers=ADMIN)
    assert resp.status == 413
    assert resp.content_type == "application/json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/takedowns", {**TAKEDOWN, "expires": "2027-01-01"}),
        ("/v1/blocklist", {**BLOCK, "expires": "2027-01-01"}),
    ],
)
async def test_an_unknown_body_field_is_refused_by_name(
    runtime: Runtime, client: TestClient, path: str, body: dict[str, object]
) -> None:
    resp = await client.post(path, json=body, headers=ADMIN)
    assert resp.status == 400
    problem = await resp.json()
    assert "expires" in problem["error"]
    assert problem["unknown_fields"] == ["expires"]
    assert problem["missing_fields"] == []
    assert "reason" in problem["accepted_fields"]
    assert runtime.takedowns.state.takedowns == {}
    assert runtime.takedowns.state.blocks == {}


async def test_a_confirmation_with_an_unknown_field_is_refused(client: TestClient) -> None:
    filed = await (await client.post("/v1/takedowns", json=TAKEDOWN, headers=ADMIN)).json()
    resp = await client.post(
        f"/v1/takedowns/{filed['id']}/confirmations",
        json={"team": "vision-data", "deleted": 3, "note": "all gone"},
        headers=ADMIN,
    )
    assert resp.status == 400
    assert (await resp.json())["unknown_fields"] == ["note"]


async def test_every_missing_field_is_named_at_once(client: TestClient) -> None:
    resp = await client.post("/v1/takedowns", json={"scope": "url", "x": 1}, headers=ADMIN)
    assert resp.status == 400
    problem = await resp.json()
    assert problem["missing_fields"] == ["rights_holder", "contact", "targets", "reason"]
    assert problem["unknown_fields"] == ["x"]
    for name in problem["missing_fields"]:
        assert name in problem["error"]


async def test_a_body_where_none_is_taken_is_refused(client: TestClient) -> None:
    resp = await client.post("/v1/policy/reload", json={"dry_run": True}, headers=ADMIN)
    assert resp.status == 400
    assert "dry_run" in (await resp.json())["error"]
    resp = await client.delete("/v1/blocklist/bl-x", data=b"reason=mistake", headers=ADMIN)
    assert resp.status == 400
    assert (await client.post("/v1/policy/reload", headers=ADMIN)).status == 200
    assert (await client.post("/v1/policy/reload", json={}, headers=ADMIN)).status == 200


async def test_the_openapi_document_says_bodies_are_closed(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    for path, method in (
        ("/v1/takedowns", "post"),
        ("/v1/blocklist", "post"),
        ("/v1/takedowns/{id}/confirmations", "post"),
    ):
        body = document["paths"][path][method]["requestBody"]
        assert body["content"]["application/json"]["schema"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "path",
    [
        "/v1/fetches?team=",
        "/v1/fetches?since=&team=team-b",
        "/v1/reports/sites?until=",
        "/v1/budgets?site=",
    ],
)
async def test_an_empty_parameter_is_refused_not_taken_as_no_filter(
    client: TestClient, path: str
) -> None:
    # `?team=$TEAM` with TEAM unset returned every team's records, unfiltered.
    resp = await client.get(path, headers=AUDITOR)
    assert resp.status == 400
    body = await resp.json()
    assert body["empty_parameters"] == [path.split("?")[1].split("=")[0]]


async def test_a_field_given_twice_is_refused(runtime: Runtime, client: TestClient) -> None:
    # JSON parsers keep the last of two equal keys, others the first: which reason was filed?
    body = (
        b'{"rights_holder": "R", "contact": "c@r.example", "scope": "domain",'
        b' "targets": ["a.example"], "reason": "copyright", "reason": "mistake"}'
    )
    resp = await client.post("/v1/takedowns", data=body, headers=ADMIN)
    assert resp.status == 400
    assert "reason" in (await resp.json())["error"]
    assert runtime.takedowns.state.takedowns == {}
