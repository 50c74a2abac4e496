"""`GET /v1/usage`: a team's own usage (proxy/usage.py), to the team, from the admin API."""

from __future__ import annotations

import asyncio
import datetime as dt

from aiohttp import web

from proxy.admin import CALLER_TEAM
from proxy.admin import RUNTIME
from proxy.admin import TEAM
from proxy.admin import Route
from proxy.admin import problem
from proxy.admin import query_param
from proxy.admin import while_connected
from proxy.audit.query import RecordQuery
from proxy.audit.query import parse_time
from proxy.record_source import RecordSource
from proxy.record_source import unreadable
from proxy.report_api import FLUSH_TIMEOUT
from proxy.usage import team_usage

# The longest a team's usage is counted for before the answer is a 503 (and its query stops:
# PostgreSQL's is cancelled, SQLite's told to stop by record_source.in_worker).
USAGE_TIMEOUT = 60.0


def start_of_today() -> str:
    """Midnight UTC today, in the records' `ts` form: the day the daily quotas count."""
    return parse_time(dt.datetime.now(dt.UTC).date().isoformat())


async def usage_endpoint(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    team = request[CALLER_TEAM]
    q = request.query
    try:
        if q.get("since"):
            since: str | None = parse_time(q["since"])
        else:  # today, unless a window's end is named: then all before it
            since = None if q.get("until") else start_of_today()
        until = parse_time(q["until"]) if q.get("until") else None
        query = RecordQuery(
            since=since,
            until=until,
            team=team,
            site=q.get("site"),
            project=q.get("project"),
        )
    except ValueError as e:
        return problem(400, str(e))
    counting = await rt.counting.take(f"usage:{team}")
    if counting is None:
        # One count per team at a time in the fleet: each is a scan of the team's records in
        # the window; polls that pile up would keep as many database backends busy.
        resp = problem(
            429,
            "this team's usage is being counted for an earlier request; ask again once it has "
            "answered",
        )
        resp.headers["Retry-After"] = "5"
        return resp
    try:
        await rt.fetch_log.flushed(timeout=FLUSH_TIMEOUT)
        source = RecordSource(rt.settings.data_dir, rt.settings.audit_dsn)
        rows = await while_connected(
            request, asyncio.wait_for(source.team_usage(query), USAGE_TIMEOUT)
        )
    except TimeoutError:
        return problem(
            503,
            f"counting this window's records took over {USAGE_TIMEOUT:g} s; ask for a "
            "shorter one (since, until)",
        )
    except unreadable() as e:
        return problem(503, f"the fetch log store cannot be read: {e}")
    finally:
        await rt.counting.let_go(f"usage:{team}", counting)
    body = team_usage(team, rows, since=since, until=until)
    body["filters"] = {k: v for k, v in (("site", query.site), ("project", query.project)) if v}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


ROUTES: list[Route] = [
    Route(
        "GET",
        "/v1/usage",
        usage_endpoint,
        (TEAM,),
        "The calling team's own requests, per site and project, from the fetch log (today, "
        "UTC, unless since/until say otherwise); the sites' budgets: /v1/budgets?site=",
        {
            "200": "the team's usage (JSON)",
            "400": "a bad time",
            "429": "this team's usage is being counted for an earlier request (Retry-After)",
            "503": "the fetch log store cannot be read, or the window took over 60 s to count",
        },
        parameters=(
            query_param(
                "since",
                "records from this time on (ISO 8601; default: today 00:00 UTC, or the first "
                "record if `until` is given)",
            ),
            query_param("until", "records before this time (ISO 8601)"),
            query_param("site", "only this site (a policy site id or a registrable domain)"),
            query_param("project", "only this project"),
        ),
    ),
]
