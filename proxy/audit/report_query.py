"""The insubstantiality report's figures (proxy/report.py) counted by the fetch-log store itself.

A month of a fleet is tens of millions of records; read one by one through the replica that
answered `GET /v1/reports/sites` (a JSON body each, on its event loop for PostgreSQL), the
report took that replica's CPU from its scrapers for as long. The store groups them instead and
hands over a row per site and group: kinds, decisions, reasons and bytes per UTC day; each
site's busiest minute; its distinct URLs; the opt-out signals, site statuses, legal bases and
policy versions counted. proxy/report.py adds them up into its figures (its docstring defines
them); the records counted are those of kinds `fetch`, `gateway_fetch` and `websocket`, without
a tunnel opened to nowhere (proxy/audit/dialect.py, `counted`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.audit.dialect import POSTGRES
from proxy.audit.dialect import REACHED
from proxy.audit.dialect import SQLITE
from proxy.audit.dialect import Dialect
from proxy.audit.dialect import Results
from proxy.audit.dialect import Statements
from proxy.audit.dialect import postgres_results
from proxy.audit.dialect import sqlite_results
from proxy.audit.query import RecordQuery
from proxy.audit.unauthenticated import EVENT_KIND as UNAUTHENTICATED_REFUSALS
from proxy.websocket import KIND as WEBSOCKET

KINDS = ("fetch", "gateway_fetch", WEBSOCKET)
_HAS_SITE = "coalesce(site, '') <> ''"


@dataclass
class ReportRows:
    # (site, kind, decision, reason, day, records, bytes, first ts, last ts)
    groups: list[tuple[str, str, str, str | None, str, int, int, str, str]]
    peak_minutes: list[tuple[str, str, int]]  # (site, minute, records)
    distinct_urls: list[tuple[str, int]]
    signals: list[tuple[str, str, int]]  # (site, signal, times)
    statuses: list[tuple[str, int, int]]  # (site, status, records)
    legal_bases: list[tuple[str, str, int]]
    policy_versions: list[tuple[str, str, int]]
    first_ts: str | None
    last_ts: str | None
    without_site: int  # counted records with no site
    replicas: list[tuple[str, int, int]]  # (replica, first seq, last seq), every record
    unauthenticated: list[dict[str, Any]]  # the unauthenticated_refusals events, whole


# (S608 below: the SQL texts hold no value; the values are parameters, RecordQuery's.)


def _statements(query: RecordQuery, d: Dialect, optout_reasons: frozenset[str]) -> Statements:
    """One statement counts every figure from the window's counted records, read once (`r`,
    materialised: each figure used to be its own statement, each reading and parsing every
    record again, in 2.5-3x the time), each figure a JSON array of its rows; two more read the
    replicas' chains and the unauthenticated_refusals events."""
    optouts = ", ".join(f"'{reason}'" for reason in sorted(optout_reasons))
    counted, params = d.counted(
        query,
        KINDS,
        "site, kind, decision, reason, ts, url",
        {
            "response_bytes": "number",
            "status": "number",
            "legal_basis": "text",
            "policy_version": "text",
            "signals": "json",
        },
    )
    by_minute = (
        f"SELECT site, {d.minute} AS minute, count(*) AS n FROM r "  # noqa: S608
        f"WHERE {_HAS_SITE} AND kind IN ('fetch', 'gateway_fetch') AND {REACHED} "
        "GROUP BY site, minute"
    )

    def per_site(column: str, *conditions: str) -> str:
        rows = (
            f"SELECT site, {column} AS v, count(*) AS n FROM r "  # noqa: S608
            f"WHERE {' AND '.join((_HAS_SITE, *conditions))} GROUP BY site, {column}"
        )
        return d.rows_json(rows, "site, v, n")

    figures = {
        "groups": d.rows_json(
            f"SELECT site, kind, decision, reason, {d.day} AS day, count(*) AS n, "  # noqa: S608
            f"coalesce(sum(coalesce(response_bytes, 0)), 0) AS size, "
            f"{d.ts_text('min(ts)')} AS a, {d.ts_text('max(ts)')} AS b FROM r "
            f"WHERE {_HAS_SITE} GROUP BY site, kind, decision, reason, day",
            "site, kind, decision, reason, day, n, size, a, b",
        ),
        # each site's busiest minute of its traffic, the earliest on a tie
        "peak_minutes": d.rows_json(
            "SELECT site, minute, n FROM (SELECT site, minute, n, row_number() OVER "  # noqa: S608
            f"(PARTITION BY site ORDER BY n DESC, minute) AS k FROM ({by_minute}) AS m) AS p "
            "WHERE k = 1",
            "site, minute, n",
        ),
        "distinct_urls": d.rows_json(
            f"SELECT site, count(DISTINCT url) AS n FROM r "  # noqa: S608
            f"WHERE {_HAS_SITE} AND kind = 'fetch' AND {REACHED} GROUP BY site",
            "site, n",
        ),
        "signals": d.rows_json(
            f"SELECT site, e.value AS v, count(*) AS n FROM r, {d.elements('r.signals')} "  # noqa: S608
            f"WHERE {_HAS_SITE} AND kind = 'fetch' AND decision IN ('refused', 'withheld') "
            f"AND reason IN ({optouts}) GROUP BY site, e.value",
            "site, v, n",
        ),
        "statuses": per_site("status", REACHED, "status IN (429, 503)"),
        "legal_bases": per_site(
            "legal_basis", "kind = 'fetch'", REACHED, "coalesce(legal_basis, '') <> ''"
        ),
        "policy_versions": per_site("policy_version", "coalesce(policy_version, '') <> ''"),
        "span": d.rows_json(
            f"SELECT {d.ts_text('min(ts)')} AS a, {d.ts_text('max(ts)')} AS b, "  # noqa: S608
            f"coalesce(sum(CASE WHEN {_HAS_SITE} THEN 0 ELSE 1 END), 0) AS n FROM r",
            "a, b, n",
        ),
    }
    where, where_params = d.where(query)
    events, event_params = d.where(query, f"kind = '{UNAUTHENTICATED_REFUSALS}'")
    pairs = ", ".join(f"'{name}', {sql}" for name, sql in figures.items())
    return {
        "figures": (
            f"WITH r AS MATERIALIZED ({counted}) SELECT {d.json_object}({pairs})",
            params,
        ),
        "replicas": (
            f"SELECT replica, min(seq), max(seq) FROM fetch_records {where} "  # noqa: S608
            "GROUP BY replica",
            where_params,
        ),
        "unauthenticated": (
            f"SELECT body FROM fetch_records {events} ORDER BY replica, seq",  # noqa: S608
            event_params,
        ),
    }


def _figures(results: Results) -> dict[str, list[list[Any]]]:
    """Each figure's rows, by name (the figures statement's one JSON object)."""
    [(figures,)] = results["figures"]
    return json.loads(figures)


def _rows(results: Results) -> ReportRows:
    figures = _figures(results)
    [(first, last, without_site)] = figures["span"]
    return ReportRows(
        groups=[
            (site, kind, decision, reason, day, int(n), int(size), a, b)
            for site, kind, decision, reason, day, n, size, a, b in figures["groups"]
        ],
        peak_minutes=[(site, minute, int(n)) for site, minute, n in figures["peak_minutes"]],
        distinct_urls=[(site, int(n)) for site, n in figures["distinct_urls"]],
        signals=[(site, str(signal), int(n)) for site, signal, n in figures["signals"]],
        statuses=[(site, int(status), int(n)) for site, status, n in figures["statuses"]],
        legal_bases=[(site, basis, int(n)) for site, basis, n in figures["legal_bases"]],
        policy_versions=[(site, v, int(n)) for site, v, n in figures["policy_versions"]],
        first_ts=first,
        last_ts=last,
        without_site=int(without_site),
        replicas=[(r, int(a), int(b)) for r, a, b in results["replicas"]],
        unauthenticated=[json.loads(body) for (body,) in results["unauthenticated"]],
    )


def _report(results: Results | None) -> ReportRows:
    if results is None:  # no records table yet
        return ReportRows([], [], [], [], [], [], [], None, None, 0, [], [])
    return _rows(results)


def sqlite_report(
    path: Path,
    query: RecordQuery,
    optout_reasons: frozenset[str],
    stop: threading.Event | None = None,
) -> ReportRows:
    """From a SQLite fetch log (blocking: run it in a worker thread; `stop`: sqlite_results)."""
    return _report(sqlite_results(path, _statements(query, SQLITE, optout_reasons), stop))


async def postgres_report(
    dsn: str, query: RecordQuery, optout_reasons: frozenset[str]
) -> ReportRows:
    return _report(await postgres_results(dsn, _statements(query, POSTGRES, optout_reasons)))
