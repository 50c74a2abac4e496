"""Admin API endpoints of takedowns and the API blocklist (DESIGN.md, "Admin API").

`ROUTES` goes to `proxy.admin.make_app(runtime, extra_routes=...)`. Changes need the `admin` role;
reads admit `auditor` too. Every change is a fetch-log event (proxy/takedowns.py).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any

from aiohttp import web

from proxy.admin import RUNTIME
from proxy.admin import BadBody
from proxy.admin import Route
from proxy.admin import json_body
from proxy.admin import problem
from proxy.audit.query import RecordQuery
from proxy.audit.schema import SchemaTooNew
from proxy.inputs import csv_cell
from proxy.record_source import RecordSource
from proxy.runtime import Runtime
from proxy.takedowns import MANIFEST_FIELDS
from proxy.takedowns import Actor
from proxy.takedowns import Conflict
from proxy.takedowns import InvalidRequest
from proxy.takedowns import NotFound
from proxy.takedowns import StateUnavailable
from proxy.takedowns import Takedown
from proxy.takedowns import TakedownRegistry
from proxy.takedowns import covering
from proxy.takedowns import hosts_of
from proxy.takedowns import manifest_row

# Records of this replica still on their way to the store are waited for, this long at most,
# before a manifest is read: a fetch made just before the takedown was filed must be in it.
FLUSH_TIMEOUT = 10.0


def _registry(request: web.Request) -> TakedownRegistry:
    return request.app[RUNTIME].takedowns


def _actor(request: web.Request) -> Actor:
    rt = request.app[RUNTIME]
    holder = rt.compiled.admins.holder_of(request.headers.get("Authorization"))
    return Actor(*holder) if holder is not None else Actor("unknown", "unknown")


def _source(rt: Runtime) -> RecordSource:
    return RecordSource(rt.settings.data_dir, rt.settings.audit_dsn)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        return await json_body(request)
    except BadBody as e:
        raise InvalidRequest(str(e)) from e


def _cannot_record(rt: Runtime) -> web.Response | None:
    if rt.fetch_log.available:
        return None
    return problem(503, "the fetch log cannot take records now, so no change is made; retry later")


async def manifests(rt: Runtime, takedowns: list[Takedown]) -> dict[str, list[dict[str, Any]]]:
    """Each takedown's manifest rows, in chain order, from one pass over the fetch log."""
    out: dict[str, list[dict[str, Any]]] = {td.id: [] for td in takedowns}
    if not takedowns:
        return out
    await rt.fetch_log.flushed(timeout=FLUSH_TIMEOUT)
    match = covering(takedowns)

    def visit(rec: dict[str, Any]) -> None:
        for takedown_id in match(rec):
            out[takedown_id].append(manifest_row(rec))

    # The whole log, not up to the filing: a replica the takedown had not reached yet forwarded
    # what it covers after it was filed (`covers`). Only the records whose URL holds one of the
    # takedowns' hosts are read (the store cuts them by their url column; 150 000 records read
    # whole took 4 s a listing).
    await _source(rt).scan(RecordQuery(url_contains=hosts_of(takedowns)), visit)
    return out


def describe(
    registry: TakedownRegistry, td: Takedown, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """A takedown with its confirmations and which teams still owe one. A team owes one for
    every fetch the manifest lists of its, and is done once a confirmation of its counts as
    many deleted as the distinct URLs whose content it received (forwarded, with a body):
    `deleted: 0` closes nothing where content went to it, and a retried confirmation does not
    count twice (the largest of a team's confirmations counts: confirm the total so far)."""
    per_team = Counter(r["team"] for r in rows if r.get("team"))
    received: dict[str, set[str]] = {team: set() for team in per_team}
    for r in rows:
        if r.get("team") and r.get("decision") == "forwarded" and r.get("content_sha256"):
            received[r["team"]].add(r.get("url") or "")
    confirmations = registry.state.confirmations_of(td.id)
    deleted = Counter[str]()
    for c in confirmations:
        deleted[c.team] = max(deleted[c.team], c.deleted)
    outstanding = sorted(
        team for team in per_team if team not in deleted or deleted[team] < len(received[team])
    )
    # (a team confirmed in part is outstanding, and only that)
    confirmed = sorted(deleted.keys() - set(outstanding))
    return {
        **td.to_dict(),
        "manifest": {
            "records": len(rows),
            "teams": dict(sorted(per_team.items())),
            "urls": {team: len(received[team]) for team in sorted(received)},
            "href": f"/v1/takedowns/{td.id}/manifest",
        },
        "confirmations": [c.to_dict() for c in confirmations],
        "teams_confirmed": confirmed,
        "teams_outstanding": outstanding,
        "status": "outstanding" if outstanding else "complete",
    }


# -- handlers ------------------------------------------------------------------------------


async def file_takedown(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if (refused := _cannot_record(rt)) is not None:
        return refused
    try:
        td = await _registry(request).file_takedown(await _body(request), _actor(request))
    except InvalidRequest as e:
        return problem(400, str(e))
    except StateUnavailable as e:
        return problem(503, f"{e}; the takedown is not filed, retry")
    body = {
        **td.to_dict(),
        "in_force": True,
        "manifest": {"href": f"/v1/takedowns/{td.id}/manifest"},
        "confirmations": [],
    }
    return web.json_response(body, status=201, headers={"Location": f"/v1/takedowns/{td.id}"})


async def list_takedowns(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    registry = _registry(request)
    takedowns = sorted(registry.state.takedowns.values(), key=lambda t: (t.filed, t.id))
    try:
        rows = await manifests(rt, takedowns)
    except (OSError, FileNotFoundError, SchemaTooNew) as e:
        return problem(503, f"the fetch log store cannot be read: {e}")
    return web.json_response(
        {"takedowns": [describe(registry, td, rows[td.id]) for td in takedowns]}
    )


def _takedown(request: web.Request) -> Takedown | web.Response:
    takedown_id = request.match_info["id"]
    td = _registry(request).state.takedowns.get(takedown_id)
    if td is None:
        return problem(404, f"no takedown {takedown_id}; GET /v1/takedowns lists them")
    return td


async def show_takedown(request: web.Request) -> web.Response:
    td = _takedown(request)
    if isinstance(td, web.Response):
        return td
    try:
        rows = await manifests(request.app[RUNTIME], [td])
    except (OSError, FileNotFoundError, SchemaTooNew) as e:
        return problem(503, f"the fetch log store cannot be read: {e}")
    return web.json_response(describe(_registry(request), td, rows[td.id]))


async def takedown_manifest(request: web.Request) -> web.Response:
    td = _takedown(request)
    if isinstance(td, web.Response):
        return td
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        return problem(400, "format must be json or csv")
    try:
        rows = (await manifests(request.app[RUNTIME], [td]))[td.id]
    except (OSError, FileNotFoundError, SchemaTooNew) as e:
        return problem(503, f"the fetch log store cannot be read: {e}")
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_FIELDS))
        writer.writeheader()
        writer.writerows(
            {k: csv_cell(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows
        )
        return web.Response(
            text=buf.getvalue(),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{td.id}-manifest.csv"'},
        )
    return web.json_response(
        {
            "takedown": td.to_dict(),
            "covers": "fetches (kind fetch) forwarded or withheld whose URL the takedown "
            "blocks: before it was filed, or after while it was reaching every replica",
            "records": rows,
        }
    )


async def confirm_deletion(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if (refused := _cannot_record(rt)) is not None:
        return refused
    try:
        body = await _body(request)
        registry = _registry(request)
        await _check_confirming_team(rt, registry, request.match_info["id"], body.get("team"))
        confirmation = await registry.confirm(request.match_info["id"], body, _actor(request))
    except NotFound as e:
        return problem(404, str(e))
    except InvalidRequest as e:
        return problem(400, str(e))
    except StateUnavailable as e:
        return problem(503, f"{e}; the confirmation is not recorded, retry")
    return web.json_response(confirmation.to_dict(), status=201)


async def _check_confirming_team(
    rt: Runtime, registry: TakedownRegistry, takedown_id: str, team: Any
) -> None:
    """A team of the policy, or one the takedown's manifest names (a team since removed from
    the policy still owes its confirmation): a misspelt name would be taken as a confirmation
    while the real team stays outstanding."""
    names = {t.name for t in rt.compiled.loaded.policy.teams}
    if not isinstance(team, str) or team in names:
        return  # (the registry says what is wrong with a name that is not text)
    takedown = registry.state.takedowns.get(takedown_id)
    if takedown is None:
        return  # the registry answers 404
    rows = (await manifests(rt, [takedown]))[takedown_id]
    if team not in {r.get("team") for r in rows}:
        known = ", ".join(sorted(names))
        raise InvalidRequest(
            f"team: {team!r} is no team of the policy ({known}) and has no fetch in the "
            "takedown's manifest"
        )


async def add_block(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if (refused := _cannot_record(rt)) is not None:
        return refused
    try:
        block = await _registry(request).add_block(await _body(request), _actor(request))
    except InvalidRequest as e:
        return problem(400, str(e))
    except StateUnavailable as e:
        return problem(503, f"{e}; the entry is not added, retry")
    return web.json_response(
        block.to_dict(), status=201, headers={"Location": f"/v1/blocklist/{block.id}"}
    )


async def remove_block(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if (refused := _cannot_record(rt)) is not None:
        return refused
    block_id = request.match_info["id"]
    if rt.compiled.loaded.policy.blocklist and any(
        b.id == block_id for b in rt.compiled.loaded.policy.blocklist
    ):
        return problem(
            409, f"{block_id} is in the policy file: remove it there and reload the policy"
        )
    try:
        block = await _registry(request).remove_block(block_id, _actor(request))
    except NotFound as e:
        return problem(404, str(e))
    except Conflict as e:
        return problem(409, str(e))
    except StateUnavailable as e:
        return problem(503, f"{e}; the entry stays, retry")
    return web.json_response(block.to_dict())


async def list_blocks(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    policy_entries = [
        {
            "id": b.id,
            "origin": "policy",
            "active": True,
            "match": list(b.match),
            "reason": b.reason,
            "source": b.source,
            "policy_version": rt.policy_version,
        }
        for b in rt.compiled.loaded.policy.blocklist
    ]
    registry = _registry(request)
    api_entries = [
        b.to_dict() for b in sorted(registry.state.blocks.values(), key=lambda b: (b.added, b.id))
    ]
    return web.json_response(
        {
            "entries": policy_entries + api_entries,
            "takedowns_in_force": len(registry.state.takedowns),
            "shared_state": registry.redis is not None,
            "shared_state_reachable": registry.shared_ok,
            "version": registry.state.version,
        }
    )


# -- routes --------------------------------------------------------------------------------

_SCOPED_TARGETS = {
    "scope": {"type": "string", "enum": ["url", "prefix", "domain"]},
    "targets": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string"},
        "description": "URLs (scope url), URL prefixes (prefix) or domains, subdomains "
        "included (domain); a URL or prefix covers http and https alike",
    },
}
_ID = ({"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},)

ROUTES: list[Route] = [
    Route(
        "POST",
        "/v1/takedowns",
        file_takedown,
        ("admin",),
        "File a rights holder's takedown: in force on every replica within a second",
        {
            "201": "filed and in force; Location names it",
            "400": "a field is missing or invalid",
            "503": "the shared store or the fetch log cannot take the change",
        },
        request_body={
            "type": "object",
            "required": ["rights_holder", "contact", "scope", "targets", "reason"],
            "properties": {
                "rights_holder": {"type": "string"},
                "contact": {"type": "string"},
                **_SCOPED_TARGETS,
                "reason": {"type": "string"},
            },
        },
    ),
    Route(
        "GET",
        "/v1/takedowns",
        list_takedowns,
        ("admin", "auditor"),
        "Every takedown with its confirmations and the teams still to confirm deletion",
        {"200": "the takedowns", "503": "the fetch log store cannot be read"},
    ),
    Route(
        "GET",
        "/v1/takedowns/{id}",
        show_takedown,
        ("admin", "auditor"),
        "One takedown: manifest size per team, confirmations, teams outstanding",
        {"200": "the takedown", "404": "no such takedown"},
        parameters=_ID,
    ),
    Route(
        "GET",
        "/v1/takedowns/{id}/manifest",
        takedown_manifest,
        ("admin", "auditor"),
        "The fetches a takedown covers that reached the site: what each team must delete",
        {"200": "manifest rows (JSON, or CSV with ?format=csv)", "404": "no such takedown"},
        parameters=(
            *_ID,
            {
                "name": "format",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["json", "csv"]},
            },
        ),
    ),
    Route(
        "POST",
        "/v1/takedowns/{id}/confirmations",
        confirm_deletion,
        ("admin",),
        "Record a team's deletion of what the manifest lists for it",
        {"201": "recorded", "400": "invalid body", "404": "no such takedown"},
        parameters=_ID,
        request_body={
            "type": "object",
            "required": ["team", "deleted"],
            "properties": {
                "team": {"type": "string"},
                "deleted": {"type": "integer", "minimum": 0},
            },
        },
    ),
    Route(
        "GET",
        "/v1/blocklist",
        list_blocks,
        ("admin", "auditor"),
        "The blocklist: the policy's entries and those added through the API (removed ones too)",
        {"200": "the entries"},
    ),
    Route(
        "POST",
        "/v1/blocklist",
        add_block,
        ("admin",),
        "Add a blocklist entry (reason tos_blocklist): in force on every replica within a second",
        {"201": "added and in force", "400": "a field is missing or invalid"},
        request_body={
            "type": "object",
            "required": ["scope", "targets", "reason", "source"],
            "properties": {
                **_SCOPED_TARGETS,
                "reason": {"type": "string"},
                "source": {"type": "string", "description": "where the prohibition is written"},
            },
        },
    ),
    Route(
        "DELETE",
        "/v1/blocklist/{id}",
        remove_block,
        ("admin",),
        "Remove a blocklist entry added through the API (policy entries live in the policy)",
        {
            "200": "removed; the entry is kept as removed",
            "404": "no such API entry",
            "409": "already removed, or a policy entry",
        },
        parameters=_ID,
    ),
]
