"""Takedowns and API blocklist changes on a real admin app, a real Runtime and a real SQLite log.

The fleet behaviour (two gateway processes on one Redis, restarts, the manifest against an
export, the CLI) is in tests/test_takedowns_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from aiohttp.test_utils import TestServer

from proxy.admin import make_app
from proxy.app import ADMIN_ROUTES
from proxy.audit.query import RecordQuery
from proxy.audit.sqlite_store import read_records
from proxy.blocklist import Scope
from proxy.decision import Reason
from proxy.identity import Identity
from proxy.runtime import Runtime
from proxy.runtime import Settings
from proxy.takedowns import STATE_FILE
from proxy.takedowns import Actor
from proxy.takedowns import BlockState
from proxy.takedowns import Confirmation
from proxy.takedowns import InvalidRequest
from proxy.takedowns import Takedown
from proxy.takedowns import covering
from proxy.takedowns import covers
from proxy.takedowns import expand_schemes
from proxy.takedowns import normalize_target
from proxy.takedowns_api import describe
from tests.runtime_fixtures import ADMIN
from tests.runtime_fixtures import AUDITOR
from tests.runtime_fixtures import admin_client
from tests.runtime_fixtures import running
from tests.support import ADMIN_TOKEN
from tests.support import base_policy
from tests.support import sha256_hex
from tests.support import write_policy
from tests.test_audit_support import fetch

TAKEDOWN = {
    "rights_holder": "Example Pictures Ltd",
    "contact": "legal@pictures.example",
    "scope": "prefix",
    "targets": ["https://Photos.Example.com/gallery/"],
    "reason": "copyright: unlicensed reproduction of our catalogue",
}


# -- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "target", "normalized"),
    [
        (Scope.DOMAIN, "Example.COM", "example.com"),
        (Scope.DOMAIN, "*.example.com.", "example.com"),
        (Scope.URL, "HTTPS://Example.com:443/a/b.jpg?x=1", "https://example.com/a/b.jpg?x=1"),
        (Scope.PREFIX, "http://example.com:8080", "http://example.com:8080/"),
    ],
)
def test_targets_are_normalized_like_the_blocklist(scope: Scope, target: str, normalized: str):
    assert normalize_target(scope, target) == normalized


@pytest.mark.parametrize(
    ("scope", "target"),
    [
        (Scope.DOMAIN, "https://example.com/"),
        (Scope.DOMAIN, "localhost"),
        (Scope.DOMAIN, "exa mple.com"),
        (Scope.URL, "ftp://example.com/a"),
        (Scope.PREFIX, "example.com/a"),
        (Scope.URL, "http://[::1/x.jpg"),
        (Scope.URL, "http://[example.com]/x.jpg"),
        (Scope.URL, "http://exa mple.com/x.jpg"),
        (Scope.URL, "http://example.com/x.jpg\nfoo"),
        (Scope.URL, "http://example.com\t/x.jpg"),
        (Scope.PREFIX, "http://example.com:99999/x/"),
        (Scope.PREFIX, "http://0x7f.1/x/"),  # 127.0.0.1 to a resolver: the gateway refuses it
    ],
)
def test_invalid_targets_are_refused(scope: Scope, target: str):
    with pytest.raises(InvalidRequest, match="targets"):
        normalize_target(scope, target)


def test_a_url_or_prefix_covers_http_and_https():
    assert expand_schemes(Scope.PREFIX, ["https://a.example/x/"]) == [
        "https://a.example/x/",
        "http://a.example/x/",
    ]
    assert expand_schemes(Scope.URL, ["http://a.example:8080/x"]) == [
        "http://a.example:8080/x",
        "https://a.example:8080/x",
    ]
    assert expand_schemes(Scope.DOMAIN, ["a.example"]) == ["a.example"]


def _takedown(scope: Scope, *targets: str, filed: str = "2026-06-01T00:00:00.000000Z") -> Takedown:
    return Takedown(
        id="td-1",
        filed=filed,
        rights_holder="RH",
        contact="c@example",
        scope=scope,
        targets=targets,
        reason="r",
        filed_by=Actor("admin", "sha256:0"),
    )


def _rec(url: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "fetch",
        "decision": "forwarded",
        "ts": "2026-05-01T00:00:00.000000Z",
        "url": url,
        **fields,
    }


@pytest.mark.parametrize(
    ("takedown", "record", "covered"),
    [
        (_takedown(Scope.DOMAIN, "example.com"), _rec("https://cdn.example.com/a.jpg"), True),
        (_takedown(Scope.DOMAIN, "example.com"), _rec("https://notexample.com/a.jpg"), False),
        (_takedown(Scope.PREFIX, "https://example.com/g/"), _rec("http://example.com/g/1"), True),
        (_takedown(Scope.PREFIX, "https://example.com/g/"), _rec("https://example.com/h/1"), False),
        (
            _takedown(Scope.URL, "https://example.com/a.jpg"),
            _rec("https://example.com/a.jpg"),
            True,
        ),
        (
            _takedown(Scope.URL, "https://example.com/a.jpg"),
            _rec("https://example.com/a.jpg?size=2"),  # the same file with any query
            True,
        ),
        (
            _takedown(Scope.URL, "https://example.com/view?id=1"),
            _rec("https://example.com/view?id=2"),
            False,
        ),
        (
            _takedown(Scope.URL, "https://example.com/a.jpg"),
            _rec("https://example.com//a.jpg"),  # as enforcement reads it
            True,
        ),
        (
            _takedown(Scope.URL, "https://example.com/a.jpg"),
            _rec("https://example.com/x/../a.jpg"),
            True,
        ),
        # withheld fetches reached the site too; refused ones and events do not count
        (
            _takedown(Scope.DOMAIN, "example.com"),
            _rec("https://example.com/a", decision="withheld"),
            True,
        ),
        (
            _takedown(Scope.DOMAIN, "example.com"),
            _rec("https://example.com/a", decision="refused"),
            False,
        ),
        (
            _takedown(Scope.DOMAIN, "example.com"),
            _rec("https://example.com/a", kind="gateway_fetch"),
            False,
        ),
        # After the filing, on a replica the takedown had not reached yet: taken all the same.
        (
            _takedown(Scope.DOMAIN, "example.com"),
            _rec("https://example.com/a", ts="2026-06-01T00:00:00.000000Z"),
            True,
        ),
        (
            _takedown(Scope.DOMAIN, "example.com"),
            _rec("https://example.com/a", ts="2026-06-01T00:00:00.500000Z", decision="withheld"),
            True,
        ),
        (
            _takedown(Scope.DOMAIN, "example.com"),
            _rec("https://example.com/a", ts="2026-06-01T00:00:00.500000Z", decision="refused"),
            False,
        ),
        (
            _takedown(Scope.PREFIX, "https://example.com/g/"),
            _rec("https://example.com/h/1", ts="2026-06-01T00:00:00.500000Z"),
            False,
        ),
    ],
)
def test_the_manifest_covers_earlier_fetches_that_reached_the_site(
    takedown: Takedown, record: dict[str, Any], covered: bool
):
    assert covers(takedown)(record) is covered


def test_one_reading_of_a_record_finds_every_takedown_that_covers_it():
    # Listing takedowns read each record's URL once per takedown: 20 takedowns over 150 000
    # records took 26 s (broad-crawl probe). Read once, it must still find them all.
    domain = dataclasses.replace(_takedown(Scope.DOMAIN, "example.com"), id="td-domain")
    prefix = dataclasses.replace(_takedown(Scope.PREFIX, "https://example.com/g/"), id="td-g")
    other = dataclasses.replace(_takedown(Scope.DOMAIN, "example.org"), id="td-other")
    match = covering([domain, prefix, other])
    assert match(_rec("https://example.com/g/1")) == ["td-domain", "td-g"]
    assert match(_rec("https://example.com/h/1")) == ["td-domain"]
    assert match(_rec("https://example.net/g/1")) == []
    assert match(_rec("https://example.org/g/1", decision="refused")) == []


# -- the API on one embedded replica -------------------------------------------------------


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        policy_file=write_policy(tmp_path / "policy.yaml", base_policy()),
        data_dir=tmp_path / "data",
        replica_id="gw-td",
    )


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with running(tmp_path, base_policy(), "gw-td") as rt:  # (as _settings says)
        yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[TestClient]:
    async with admin_client(runtime) as c:
        yield c


def _decision(rt: Runtime, url: str) -> Reason:
    from urllib.parse import urlsplit

    from proxy.blocklist import normalize_url

    parts = urlsplit(url)
    ctx = rt.governor.context(
        Identity("vision-data", frozenset(), None),
        method="GET",
        scheme=parts.scheme,
        host=parts.hostname or "",
        port=parts.port or 443,
        url=normalize_url(url),
        path=parts.path,
        project=None,
        account=None,
    )
    return rt.governor.check_request(ctx).reason


def _events(rt: Runtime) -> list[dict[str, Any]]:
    query = RecordQuery()
    return [r for r in read_records(rt.settings.sqlite_path, query) if r["decision"] == "event"]


async def test_a_takedown_is_in_force_at_once_and_recorded_with_who_filed_it(
    runtime: Runtime, client: TestClient
):
    url = "https://photos.example.com/gallery/cat.jpg"
    assert _decision(runtime, url) is Reason.OK
    resp = await client.post("/v1/takedowns", json=TAKEDOWN, headers=ADMIN)
    assert resp.status == 201
    filed = await resp.json()
    assert resp.headers["Location"] == f"/v1/takedowns/{filed['id']}"
    assert filed["targets"] == ["https://photos.example.com/gallery/"]
    # Which of the policy's admin_tokens filed it; nothing derived from the token (a cut
    # SHA-256 of it let auditors test guesses offline: admin probe 4).
    # (under the old key, which replicas of the previous release read)
    assert filed["filed_by"] == {"role": "admin", "token_fingerprint": "admin_tokens[0]"}
    assert _decision(runtime, url) is Reason.TAKEDOWN
    assert _decision(runtime, "http://photos.example.com/gallery/cat.jpg") is Reason.TAKEDOWN
    assert _decision(runtime, "https://photos.example.com/other/cat.jpg") is Reason.OK

    assert await runtime.fetch_log.flushed()
    [event] = _events(runtime)
    assert event["kind"] == "takedown" and event["rule"] == filed["id"]
    note = json.loads(event["note"])
    assert note["takedown"]["rights_holder"] == "Example Pictures Ltd"
    assert note["takedown"]["filed_by"]["role"] == "admin"
    text = json.dumps(event)
    assert ADMIN_TOKEN not in text and sha256_hex(ADMIN_TOKEN)[:8] not in text

    listed = await (await client.get("/v1/takedowns", headers=AUDITOR)).json()
    assert [t["id"] for t in listed["takedowns"]] == [filed["id"]]
    shown = await client.get(f"/v1/takedowns/{filed['id']}", headers=AUDITOR)
    assert shown.status == 200
    assert (await shown.json())["status"] == "complete"  # nothing was fetched before it


async def test_takedowns_survive_a_restart(tmp_path: Path):
    settings = _settings(tmp_path)
    rt = Runtime.from_settings(settings)
    await rt.start()
    td = await rt.takedowns.file_takedown(
        {**TAKEDOWN, "scope": "domain", "targets": ["pictures.example"]}, Actor("admin", "x")
    )
    await rt.stop()
    assert (settings.data_dir / STATE_FILE).exists()

    again = Runtime.from_settings(settings)
    await again.start()
    try:
        assert td.id in again.takedowns.state.takedowns
        assert _decision(again, "https://img.pictures.example/a.jpg") is Reason.TAKEDOWN
    finally:
        await again.stop()


async def test_takedowns_lost_with_their_file_are_read_back_from_the_fetch_log(tmp_path: Path):
    """The data dir's file gone (a new pod on an emptyDir, the fetch log elsewhere) and no shared
    state: the takedowns, confirmations and blocklist changes were forgotten, and what a rights
    holder had taken down was fetched again (auditor probe). The fetch log records every change."""
    settings = _settings(tmp_path)
    admin = Actor("admin", "admin_tokens[0]")
    rt = Runtime.from_settings(settings)
    await rt.start()
    try:
        # a new data dir: its empty log read, nothing found, and the file written
        assert rt.takedowns.restored is not None
        await rt.takedowns.restored
        assert (settings.data_dir / STATE_FILE).exists()
        td = await rt.takedowns.file_takedown(
            {**TAKEDOWN, "scope": "domain", "targets": ["pictures.example"]}, admin
        )
        await rt.takedowns.confirm(td.id, {"team": "vision-data", "deleted": 3}, admin)
        kept = {"reason": "terms", "source": "https://stock.example/terms", "scope": "domain"}
        blocked = await rt.takedowns.add_block({**kept, "targets": ["stock.example"]}, admin)
        gone = await rt.takedowns.add_block({**kept, "targets": ["free.example"]}, admin)
        await rt.takedowns.remove_block(gone.id, admin)
        assert await rt.fetch_log.flushed()
        before = rt.takedowns.state.to_json()
    finally:
        await rt.stop()
    (settings.data_dir / STATE_FILE).unlink()

    again = Runtime.from_settings(settings)
    await again.start()
    try:
        assert again.takedowns.restored is not None
        await again.takedowns.restored
        state = again.takedowns.state
        assert {**state.to_json(), "version": 0} == {**before, "version": 0}
        assert _decision(again, "https://img.pictures.example/a.jpg") is Reason.TAKEDOWN
        assert _decision(again, "https://www.stock.example/a.jpg") is Reason.TOS_BLOCKLIST
        assert _decision(again, "https://free.example/a.jpg") is Reason.OK  # removed stays so
        assert not state.blocks[gone.id].active and state.blocks[blocked.id].active
        assert (settings.data_dir / STATE_FILE).exists()  # kept for the next start
    finally:
        await again.stop()

    third = Runtime.from_settings(settings)
    await third.start()
    try:
        assert third.takedowns.restored is None  # its file is there: the log is not read
        assert td.id in third.takedowns.state.takedowns
    finally:
        await third.stop()

    # a file that does not read is as lost as one that is not there
    (settings.data_dir / STATE_FILE).write_text("{not json")
    fourth = Runtime.from_settings(settings)
    await fourth.start()
    try:
        assert fourth.takedowns.restored is not None
        await fourth.takedowns.restored
        assert _decision(fourth, "https://img.pictures.example/a.jpg") is Reason.TAKEDOWN
    finally:
        await fourth.stop()


def test_the_history_keeps_a_removal_and_passes_over_what_does_not_read() -> None:
    from proxy.takedowns_history import restore
    from proxy.takedowns_history import state_from_events

    admin = {"role": "admin", "token_fingerprint": "admin_tokens[0]"}
    entry = {
        "id": "bl-1",
        "origin": "api",
        "added": "2026-11-30T00:00:00.000000Z",
        "scope": "domain",
        "targets": ["stock.example"],
        "reason": "terms",
        "source": "https://stock.example/terms",
        "added_by": admin,
        "removed": None,
        "removed_by": None,
        "active": True,
    }
    removed = {**entry, "removed": "2026-11-30T01:00:00.000000Z", "removed_by": admin}

    def event(kind: str, note: Any) -> dict[str, Any]:
        text = note if isinstance(note, str) else json.dumps({"change": "x", "entry": note})
        return {"id": kind, "kind": kind, "decision": "event", "note": text}

    # the removal recorded by one replica, the addition by another after it in chain order
    state = state_from_events(
        [event("blocklist_remove", removed), event("blocklist_add", entry), event("takedown", "{")]
    )
    assert list(state.blocks) == ["bl-1"] and not state.blocks["bl-1"].active
    assert not state.takedowns
    # a copy that has the entry active takes the removal; one that has it removed keeps it
    active = BlockState.from_json({"blocklist": {"bl-1": entry}})
    assert restore(active, state).blocklist == ["bl-1"]
    assert not restore(active, state).state.blocks["bl-1"].active
    assert not restore(state, BlockState.from_json({"blocklist": {"bl-1": entry}}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scope": "everything"}, "scope"),
        ({"targets": []}, "targets"),
        ({"targets": ["not a url"], "scope": "url"}, "targets"),
        ({"rights_holder": ""}, "rights_holder"),
        ({"reason": None}, "reason"),
    ],
)
async def test_an_invalid_takedown_is_refused_and_changes_nothing(
    runtime: Runtime, client: TestClient, change: dict[str, Any], message: str
):
    resp = await client.post("/v1/takedowns", json={**TAKEDOWN, **change}, headers=ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"].startswith(message)
    assert runtime.takedowns.state.takedowns == {}


async def test_roles(client: TestClient):
    assert (await client.post("/v1/takedowns", json=TAKEDOWN)).status == 401
    assert (await client.post("/v1/takedowns", json=TAKEDOWN, headers=AUDITOR)).status == 403
    filed = await (await client.post("/v1/takedowns", json=TAKEDOWN, headers=ADMIN)).json()
    confirm = f"/v1/takedowns/{filed['id']}/confirmations"
    body = {"team": "vision-data", "deleted": 1}
    assert (await client.post(confirm, json=body, headers=AUDITOR)).status == 403
    assert (
        await client.get(f"/v1/takedowns/{filed['id']}/manifest", headers=AUDITOR)
    ).status == 200
    assert (await client.get("/v1/blocklist", headers=AUDITOR)).status == 200
    block = {"scope": "domain", "targets": ["a.example"], "reason": "r", "source": "s"}
    assert (await client.post("/v1/blocklist", json=block, headers=AUDITOR)).status == 403
    assert (await client.get("/v1/takedowns/td-nope", headers=AUDITOR)).status == 404
    document = await (await client.get("/openapi.json")).json()
    for path in ("/v1/takedowns", "/v1/takedowns/{id}/manifest", "/v1/blocklist/{id}"):
        assert path in document["paths"]


async def test_confirmations_are_recorded_per_team(runtime: Runtime, client: TestClient):
    filed = await (await client.post("/v1/takedowns", json=TAKEDOWN, headers=ADMIN)).json()
    path = f"/v1/takedowns/{filed['id']}/confirmations"
    assert (await client.post(path, json={"team": "x", "deleted": -1}, headers=ADMIN)).status == 400
    resp = await client.post(path, json={"team": "vision-data", "deleted": 12}, headers=ADMIN)
    assert resp.status == 201
    shown = await (await client.get(f"/v1/takedowns/{filed['id']}", headers=ADMIN)).json()
    assert shown["teams_confirmed"] == ["vision-data"]
    assert shown["confirmations"][0]["deleted"] == 12
    assert await runtime.fetch_log.flushed()
    kinds = [(e["kind"], e["team"]) for e in _events(runtime)]
    assert kinds == [("takedown", None), ("takedown_confirmation", "vision-data")]
    missing = await client.post(
        "/v1/takedowns/td-nope/confirmations", json={"team": "a", "deleted": 1}, headers=ADMIN
    )
    assert missing.status == 404


async def test_a_confirmation_names_a_team_that_owes_one(runtime: Runtime, client: TestClient):
    # A team since removed from the policy, with a fetch the takedown covers, still owes one.
    runtime.record(fetch(1, url="https://photos.example.com/gallery/a.jpg", team="departed-team"))
    assert await runtime.fetch_log.flushed()
    filed = await (await client.post("/v1/takedowns", json=TAKEDOWN, headers=ADMIN)).json()
    path = f"/v1/takedowns/{filed['id']}/confirmations"
    misspelt = await client.post(path, json={"team": "vision-dta", "deleted": 0}, headers=ADMIN)
    assert misspelt.status == 400
    assert "'vision-dta' is no team of the policy" in (await misspelt.json())["error"]
    departed = await client.post(path, json={"team": "departed-team", "deleted": 1}, headers=ADMIN)
    assert departed.status == 201
    shown = await (await client.get(f"/v1/takedowns/{filed['id']}", headers=ADMIN)).json()
    assert shown["teams_confirmed"] == ["departed-team"]


async def test_blocklist_entries_are_added_removed_and_recorded(
    runtime: Runtime, client: TestClient
):
    body = {
        "scope": "domain",
        "targets": ["stock.example"],
        "reason": "Terms section 4 forbid automated collection",
        "source": "https://stock.example/terms, read 2026-11-01",
    }
    resp = await client.post("/v1/blocklist", json=body, headers=ADMIN)
    assert resp.status == 201
    entry = await resp.json()
    assert _decision(runtime, "https://www.stock.example/a.jpg") is Reason.TOS_BLOCKLIST
    listed = await (await client.get("/v1/blocklist", headers=AUDITOR)).json()
    assert [e["id"] for e in listed["entries"]] == [entry["id"]]

    removed = await client.delete(f"/v1/blocklist/{entry['id']}", headers=ADMIN)
    assert removed.status == 200
    assert (await removed.json())["active"] is False
    assert _decision(runtime, "https://www.stock.example/a.jpg") is Reason.OK
    assert (await client.delete(f"/v1/blocklist/{entry['id']}", headers=ADMIN)).status == 409
    assert (await client.delete("/v1/blocklist/bl-nope", headers=ADMIN)).status == 404

    assert await runtime.fetch_log.flushed()
    events = _events(runtime)
    assert [e["kind"] for e in events] == ["blocklist_add", "blocklist_remove"]
    for event in events:
        note = json.loads(event["note"])
        assert event["rule"] == entry["id"]
        assert note["entry"]["added_by"]["role"] == "admin"
        assert ADMIN_TOKEN not in event["note"]
    assert json.loads(events[1]["note"])["entry"]["removed_by"]["role"] == "admin"


async def test_a_policy_entry_cannot_be_deleted_through_the_api(tmp_path: Path):
    policy = base_policy()
    policy["blocklist"] = [
        {"id": "tos-x", "match": ["x.example"], "reason": "terms", "source": "https://x/terms"}
    ]
    settings = Settings(
        policy_file=write_policy(tmp_path / "policy.yaml", policy),
        data_dir=tmp_path / "data",
        replica_id="gw-td",
    )
    rt = Runtime.from_settings(settings)
    await rt.start()
    try:
        async with TestClient(TestServer(make_app(rt, ADMIN_ROUTES))) as c:
            assert (await c.delete("/v1/blocklist/tos-x", headers=ADMIN)).status == 409
            listed = await (await c.get("/v1/blocklist", headers=ADMIN)).json()
            assert listed["entries"][0]["origin"] == "policy"
    finally:
        await rt.stop()


def test_a_team_is_done_when_a_confirmation_counts_the_urls_whose_content_it_received() -> None:
    # Review: confirmations added up (a retried one closed the team early), and withheld or
    # refused rows counted, which left a truthful team unable to close without overstating.
    td = _takedown(Scope.PREFIX, "https://photos.example.com/gallery/")
    rows = [
        _rec("https://photos.example.com/gallery/1.jpg", team="a", content_sha256="ab" * 32),
        _rec("https://photos.example.com/gallery/1.jpg", team="a", content_sha256="cd" * 32),
        _rec("https://photos.example.com/gallery/2.jpg", team="a", content_sha256="ef" * 32),
        _rec("https://photos.example.com/gallery/3.jpg", team="b", decision="withheld"),
    ]
    state = BlockState()
    registry = SimpleNamespace(state=state)

    def confirm(n: int, team: str, deleted: int) -> dict[str, Any]:
        c = Confirmation(f"c{n}", td.id, team, deleted, f"2026-06-0{n}T00:00:00Z", Actor("a", "x"))
        state.confirmations[c.key] = c
        return describe(registry, td, rows)  # type: ignore[arg-type]

    shown = describe(registry, td, rows)  # type: ignore[arg-type]
    assert shown["manifest"]["urls"] == {"a": 2, "b": 0}
    assert shown["teams_outstanding"] == ["a", "b"]
    assert confirm(1, "a", 1)["teams_outstanding"] == ["a", "b"]
    shown = confirm(2, "a", 1)
    assert shown["teams_outstanding"] == ["a", "b"]  # a retry, not 2
    # confirmed in part: outstanding, not listed as confirmed too (auditor probe)
    assert shown["teams_confirmed"] == []
    shown = confirm(3, "b", 0)
    assert shown["teams_outstanding"] == ["a"]  # it received nothing
    assert shown["teams_confirmed"] == ["b"]
    shown = confirm(4, "a", 2)
    assert shown["teams_outstanding"] == [] and shown["status"] == "complete"
    assert shown["teams_confirmed"] == ["a", "b"]
