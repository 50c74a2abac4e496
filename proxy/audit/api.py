"""Admin API endpoints of the fetch log: `GET /v1/fetches` and `GET /v1/audit/public-key`.

`ROUTES` goes to `proxy.admin.make_app(runtime, extra_routes=ROUTES)`. Pages of /v1/fetches are
pieces of one export (FORMATS.md): the first page starts with the export header, each page ends
where the `X-Next-Cursor` header (and `Link: rel="next"`) says the next one starts, so the NDJSON
pages concatenated in order are one file that `crawlwarden audit verify` accepts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from proxy.admin import RUNTIME
from proxy.admin import Route
from proxy.admin import problem
from proxy.admin import query_param
from proxy.audit.export import Cursor
from proxy.audit.export import csv_header
from proxy.audit.export import csv_row
from proxy.audit.export import header
from proxy.audit.export import lines
from proxy.audit.export import page
from proxy.audit.export import plan
from proxy.audit.export import to_jsonl
from proxy.audit.query import DECISIONS
from proxy.audit.query import RecordQuery
from proxy.audit.query import parse_time
from proxy.audit.schema import SchemaTooNew

DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000
_FLUSH_LINES = 500


def _reader(request: web.Request) -> tuple[Any, str]:
    rt = request.app[RUNTIME]
    if rt.settings.audit_dsn:
        from proxy.audit.postgres_store import PostgresStore

        return PostgresStore(rt.settings.audit_dsn, migrate_schema=False, pool_size=2), "postgresql"
    from proxy.audit.sqlite_store import SQLiteStore

    path = rt.settings.sqlite_path
    return SQLiteStore(path, readonly=True), f"sqlite:{path}"


def _query(request: web.Request) -> tuple[RecordQuery, str, int, Cursor | None]:
    q = request.query
    fmt = q.get("format", "ndjson")
    if fmt not in ("ndjson", "csv"):
        raise ValueError("format must be ndjson or csv")
    limit_text = q.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    query = RecordQuery(
        since=parse_time(q["since"]) if q.get("since") else None,
        until=parse_time(q["until"]) if q.get("until") else None,
        site=q.get("site") or None,
        team=q.get("team") or None,
        project=q.get("project") or None,
        decision=q.get("decision") or None,
        replica=q.get("replica") or None,
    )
    cursor = Cursor.decode(q["cursor"]) if q.get("cursor") else None
    return query, fmt, int(limit_text), cursor


async def list_fetches(request: web.Request) -> web.StreamResponse:
    try:
        query, fmt, limit, cursor = _query(request)
    except ValueError as e:
        return problem(400, str(e))
    reader, source = _reader(request)
    try:
        await reader.open()
    except (OSError, FileNotFoundError, SchemaTooNew) as e:
        return problem(503, f"the fetch log store cannot be read: {e}")
    try:
        spans = await plan(reader, query)
        pieces, next_cursor = page(spans, cursor, limit)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8"
                if fmt == "csv"
                else "application/x-ndjson; charset=utf-8",
                "Cache-Control": "no-store",
            }
        )
        if next_cursor is not None:
            token = next_cursor.encode()
            params = {k: v for k, v in request.query.items() if k != "cursor"}
            params["cursor"] = token
            response.headers["X-Next-Cursor"] = token
            response.headers["Link"] = f'<{request.path}?{urlencode(params)}>; rel="next"'
        await response.prepare(request)
        buffer: list[str] = []
        if fmt == "csv":
            buffer.append(csv_header())
        elif cursor is None:
            buffer.extend(to_jsonl([header(query, spans, source)]))
        async for item in lines(reader, query, pieces):
            buffer.append(csv_row(item) if fmt == "csv" else next(to_jsonl([item])))
            if len(buffer) >= _FLUSH_LINES:
                await response.write("".join(buffer).encode())
                buffer.clear()
        if buffer:
            await response.write("".join(buffer).encode())
        await response.write_eof()
        return response
    finally:
        await reader.close()


async def public_key(request: web.Request) -> web.Response:
    signer = request.app[RUNTIME].fetch_log.signer
    if signer is None:
        return problem(404, "this gateway signs no checkpoints: it has no audit signing key")
    return web.Response(
        body=signer.public_pem(),
        content_type="application/x-pem-file",
        headers={"X-Key-Id": signer.verifier.key_id.hex()},
    )


ROUTES: list[Route] = [
    Route(
        "GET",
        "/v1/fetches",
        list_fetches,
        ("auditor",),
        "Fetch records and signed checkpoints, streamed as NDJSON (verifiable) or CSV",
        {
            "200": "one page; X-Next-Cursor and Link rel=next name the next page, if any",
            "400": "a bad filter, limit or cursor",
            "503": "the fetch log store cannot be read",
        },
        parameters=(
            query_param("since", "records from this time on (ISO 8601, UTC if no zone)"),
            query_param("until", "records before this time (ISO 8601)"),
            query_param("site", "only this site key; other records become redacted lines"),
            query_param("team", "only this team; other records become redacted lines"),
            query_param("project", "only this project; other records become redacted lines"),
            query_param(
                "decision",
                "only this decision; other records become redacted lines",
                enum=list(DECISIONS),
            ),
            query_param("replica", "only this replica's chain"),
            query_param("format", "ndjson (default) or csv", enum=["ndjson", "csv"]),
            query_param(
                "limit",
                f"records and redacted lines per page (default {DEFAULT_LIMIT})",
                type="integer",
                minimum=1,
                maximum=MAX_LIMIT,
            ),
            query_param("cursor", "the X-Next-Cursor of the previous page"),
        ),
    ),
    Route(
        "GET",
        "/v1/audit/public-key",
        public_key,
        (),
        "The Ed25519 public key (PEM) that verifies fetch-log checkpoints",
        {"200": "PEM public key; X-Key-Id is its signed-note key ID", "404": "no signing key"},
    ),
]
