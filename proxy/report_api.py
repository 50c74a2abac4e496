"""`GET /v1/reports/sites`: the insubstantiality report (proxy/report.py) from the admin API."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.admin import RUNTIME
from proxy.admin import Route
from proxy.admin import problem
from proxy.admin import query_param
from proxy.admin import while_connected
from proxy.audit.query import check_window
from proxy.audit.query import parse_time
from proxy.record_source import RecordSource
from proxy.record_source import unreadable
from proxy.report import CSP
from proxy.report import MEDIA_TYPES
from proxy.report import RENDERERS
from proxy.report import build_report

# This replica's records still on their way to the store are waited for, this long at most.
FLUSH_TIMEOUT = 10.0
# The longest a report is made for before the answer is a 503 (and its query stops: PostgreSQL's
# is cancelled, SQLite's told to stop by record_source.in_worker). Longer: `crawlwarden report`.
REPORT_TIMEOUT = 60.0


async def sites_report(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    q = request.query
    fmt = q.get("format", "json")
    if fmt not in RENDERERS:
        return problem(400, "format must be html, csv or json")
    try:
        since = parse_time(q["since"]) if q.get("since") else None
        until = parse_time(q["until"]) if q.get("until") else None
        check_window(since, until)
    except ValueError as e:
        return problem(400, str(e))
    reporting = await rt.counting.take("report")
    if reporting is None:
        # One report at a time in the fleet: each is a scan of the window's records, and
        # reloads of the report page would keep as many database backends busy.
        resp = problem(
            429,
            "a report is being made for an earlier request; ask again once it has answered",
        )
        resp.headers["Retry-After"] = "5"
        return resp
    try:
        await rt.fetch_log.flushed(timeout=FLUSH_TIMEOUT)
        making = build_report(
            RecordSource(rt.settings.data_dir, rt.settings.audit_dsn),
            since=since,
            until=until,
            policy=rt.compiled.loaded.policy,
            policy_version=rt.policy_version,
            policy_source=str(rt.settings.policy_file),
        )
        report = await while_connected(request, asyncio.wait_for(making, REPORT_TIMEOUT))
    except TimeoutError:
        return problem(
            503,
            f"making the report of this window took over {REPORT_TIMEOUT:g} s; ask for a "
            "shorter one (since, until), or make it with `crawlwarden report`",
        )
    except unreadable() as e:
        return problem(503, f"the fetch log store cannot be read: {e}")
    finally:
        await rt.counting.let_go("report", reporting)
    # On a worker thread: the report of a broad crawl (tens of thousands of sites) takes a
    # second or more to render, which held every request the replica was deciding.
    text = await asyncio.to_thread(RENDERERS[fmt], report)
    return web.Response(
        text=text,
        content_type=MEDIA_TYPES[fmt],
        charset="utf-8",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP},
    )


ROUTES: list[Route] = [
    Route(
        "GET",
        "/v1/reports/sites",
        sites_report,
        ("auditor",),
        "The insubstantiality report: per site, traffic against its budgets, from the fetch log",
        {
            "200": "the report (JSON, CSV or HTML)",
            "400": "a bad time or format",
            "429": "a report is being made for an earlier request (Retry-After)",
            "503": "the fetch log store cannot be read, or the report took over 60 s to make",
        },
        parameters=(
            query_param("since", "records from this time on (ISO 8601, UTC if no zone)"),
            query_param("until", "records before this time (ISO 8601)"),
            query_param("format", "json (default), csv or html", enum=["json", "csv", "html"]),
        ),
    ),
]
