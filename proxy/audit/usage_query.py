"""A team's usage (proxy/usage.py) counted by the fetch-log store itself, SQLite or PostgreSQL.

A busy team's day is millions of records; read one by one through a replica (a JSON body each)
it took that replica's CPU for as long, on its event loop for PostgreSQL, for an endpoint a team
may well poll. The store groups them instead (the `team, ts` index picks the rows) and hands
over one row per site, project, decision and reason, and each site and project's newest
refusal. What is counted is proxy/usage.py's definition: records of kind `fetch`, except a
refused CONNECT answered 200 (a tunnel opened to nowhere, its requests recorded on their own:
proxy/audit/dialect.py's `counted`); bytes are the `response_bytes` of those that reached the
site (forwarded or withheld), and of its WebSocket conversations (kind `websocket`: bytes, no
request).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import NamedTuple

from proxy.audit.dialect import POSTGRES
from proxy.audit.dialect import REACHED
from proxy.audit.dialect import SQLITE
from proxy.audit.dialect import Dialect
from proxy.audit.dialect import Results
from proxy.audit.dialect import Statements
from proxy.audit.dialect import postgres_results
from proxy.audit.dialect import sqlite_results
from proxy.audit.dialect import ts_text
from proxy.audit.query import RecordQuery
from proxy.websocket import KIND as WEBSOCKET


class UsageGroup(NamedTuple):
    """The records of one site, project, decision and reason."""

    site: str | None
    project: str | None
    decision: str
    reason: str | None
    requests: int
    bytes_received: int
    first_ts: str
    last_ts: str


@dataclass(frozen=True)
class UsageRows:
    groups: list[UsageGroup]
    # The newest refused record of each site and project, whole.
    last_refusals: list[dict[str, Any]]


# (S608 below: the SQL texts hold no value; the values are parameters, sql_where's.)


def _counted(query: RecordQuery, dialect: Dialect) -> tuple[str, list[Any]]:
    """The team's counted records, as a subquery `r`: kinds `fetch` and `websocket`, no tunnel
    to nowhere."""
    sql, params = dialect.counted(
        query,
        ("fetch", WEBSOCKET),
        "replica, seq, ts, kind, site, project, decision, reason, body",
        {"response_bytes": "number"},
    )
    return f"({sql}) AS r", params


def _groups_sql(query: RecordQuery, dialect: Dialect) -> tuple[str, list[Any]]:
    counted, params = _counted(query, dialect)
    sql = (
        "SELECT site, project, decision, reason, "  # noqa: S608
        "coalesce(sum(CASE WHEN kind = 'fetch' THEN 1 END), 0), "
        f"coalesce(sum(CASE WHEN {REACHED} OR kind = '{WEBSOCKET}' THEN response_bytes END), 0), "
        f"min(ts), max(ts) FROM {counted} GROUP BY site, project, decision, reason"
    )
    return sql, params


def _last_refusals_sql(query: RecordQuery, dialect: Dialect) -> tuple[str, list[Any]]:
    """Each site and project's newest refusal; on a tie in `ts`, the last in chain order (the
    same on both stores)."""
    counted, params = _counted(query, dialect)
    sql = (
        "SELECT body FROM (SELECT body, row_number() OVER (PARTITION BY site, project "  # noqa: S608
        f"ORDER BY ts DESC, replica DESC, seq DESC) AS k FROM {counted} "
        "WHERE decision = 'refused' AND kind = 'fetch') AS n WHERE k = 1"
    )
    return sql, params


def _group(row: Any) -> UsageGroup:
    site, project, decision, reason, requests, size, first, last = tuple(row)
    return UsageGroup(
        site, project, decision, reason, int(requests), int(size), ts_text(first), ts_text(last)
    )


def _statements(query: RecordQuery, dialect: Dialect) -> Statements:
    return {"groups": _groups_sql(query, dialect), "last": _last_refusals_sql(query, dialect)}


def _usage(results: Results | None) -> UsageRows:
    if results is None:
        return UsageRows([], [])
    return UsageRows(
        [_group(row) for row in results["groups"]],
        [json.loads(body) for (body,) in results["last"]],
    )


def sqlite_usage(path: Path, query: RecordQuery, stop: threading.Event | None = None) -> UsageRows:
    """From a SQLite fetch log (blocking: run it in a worker thread; `stop`: sqlite_results)."""
    return _usage(sqlite_results(path, _statements(query, SQLITE), stop))


async def postgres_usage(dsn: str, query: RecordQuery) -> UsageRows:
    return _usage(await postgres_results(dsn, _statements(query, POSTGRES)))
