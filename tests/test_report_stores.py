"""The report's figures as each fetch-log store counts them (SQLite, and PostgreSQL on a real
server) against the same figures counted by the test's own code from the records themselves
(tests/test_report_support.py: the report's definitions applied to an export).

The records hold what the report must count or leave out: several sites, days and minutes;
every decision; opt-out reasons with their signals (and one with none);
a site's 429 and 503; legal bases and policy versions; the gateway's own reads; a WebSocket's
bytes; a tunnel opened to nowhere; records with no site; an unauthenticated_refusals event.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from proxy.audit.postgres_store import PostgresStore
from proxy.audit.query import RecordQuery
from proxy.audit.record import FetchRecord
from proxy.audit.sqlite_store import SQLiteStore
from proxy.record_source import SQLITE_NAME
from proxy.record_source import RecordSource
from proxy.report import build_report
from tests import pg_fixtures
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_report import SHARED_FIGURES
from tests.test_report_support import figures_from_export

pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn

DAY1 = dt.datetime(2026, 3, 1, 23, 58, tzinfo=dt.UTC).timestamp()


def logged_records() -> list[FetchRecord]:
    out = [fetch(i, DAY1 + i * 7, policy_version=f"v{i % 2}") for i in range(80)]  # 2 days
    at = DAY1 + 600
    noai = ["x-robots-tag:noai", "meta:noai"]
    out += [
        fetch(1, at, decision="withheld", reason="noai_directive", signals=noai, status=451),
        fetch(2, at + 1, decision="refused", reason="robots_disallowed", signals=["robots"]),
        fetch(3, at + 2, decision="refused", reason="tdm_reserved", signals=[]),
        fetch(4, at + 3, decision="refused", reason="rate_limited", signals=["not-an-optout"]),
        fetch(5, at + 4, status=429, response_bytes=10),
        fetch(6, at + 5, status=503, response_bytes=10),
        fetch(7, at + 6, decision="refused", status=503, reason="site_paused"),  # not reached
        fetch(8, at + 7, legal_basis="licence:LIC-1"),
        fetch(9, at + 8, legal_basis=None),
        fetch(10, at + 9, decision="served", reason="robots_cache", response_bytes=55),
        fetch(11, at + 10, kind="gateway_fetch", status=503, response_bytes=70),
        fetch(12, at + 11, kind="gateway_fetch", decision="refused", reason="rate_limited"),
        fetch(13, at + 12, kind="websocket", status=101, response_bytes=900, reason="ok"),
        fetch(
            14, at + 13, method="CONNECT", decision="refused", reason="tos_blocklist", status=200
        ),
        fetch(15, at + 14, site=None, decision="refused", reason="auth_required", status=407),
        fetch(16, at + 15, site="", decision="refused", reason="bad_request", status=400),
        fetch(17, at + 16, kind="policy", decision="event", reason="ok", site=None),
    ]
    return out


async def write(store: Any, tmp_path: Path) -> None:
    log = fetch_log(store, tmp_path / "spool", "gw-r", None)
    await log.open()
    for rec in logged_records():
        log.append(rec)
    log.new_event("unauthenticated_refusals", json.dumps({"refused": 7}))
    await log.close()


async def check_the_report_counts_as_the_records_say(source: RecordSource) -> None:
    records: list[dict[str, Any]] = []
    await source.scan(RecordQuery(), records.append)
    for since in (None, "2026-03-02T00:00:00.000000Z"):
        picked = [r for r in records if since is None or r["ts"] >= since]
        report = await build_report(source, since=since)
        sites = sorted({r["site"] for r in picked if r["site"] and r["kind"] != "policy"})
        assert [s["site"] for s in sorted(report["sites"], key=lambda s: s["site"])] == sites
        for row in report["sites"]:
            expected = figures_from_export(picked, row["site"])
            assert {k: row[k] for k in SHARED_FIGURES} == {
                k: expected[k] for k in SHARED_FIGURES
            }, (row["site"], since)
        counted = [
            r
            for r in picked
            if r["kind"] in ("fetch", "gateway_fetch", "websocket")
            and not (r["method"] == "CONNECT" and r["decision"] == "refused" and r["status"] == 200)
        ]
        events = [r for r in picked if r["kind"] == "unauthenticated_refusals"]
        assert report["totals"]["refused_without_site"] == sum(
            not r["site"] for r in counted
        ) + 7 * len(events)
        assert report["period"]["first_record"] == min(r["ts"] for r in counted)
        assert report["period"]["last_record"] == max(r["ts"] for r in counted)
        [span] = report["checkpoints"]
        seqs = [r["seq"] for r in picked]
        assert (span["first_seq"], span["last_seq"]) == (min(seqs), max(seqs))
    # what the records hold, so that the comparison above compares something
    whole = {s["site"]: s for s in (await build_report(source))["sites"]}
    signals = sorted(
        (s["site"], s["optout_signals"]) for s in whole.values() if s["optout_signals"]
    )
    assert signals == [
        ("b.example", {"meta:noai": 1, "x-robots-tag:noai": 1}),
        ("c.example", {"robots": 1}),  # (not "not-an-optout": a rate refusal's)
    ]
    assert sum(s["site_429"] for s in whole.values()) == 1
    assert sum(s["site_503"] for s in whole.values()) == 2  # the site's and the gateway read's
    assert sum(s["bytes_received"] for s in whole.values()) > 0
    assert any(s["legal_bases"] for s in whole.values())


async def test_sqlite_counts_the_report_as_the_records_say(tmp_path: Path) -> None:
    await write(SQLiteStore(tmp_path / "data" / SQLITE_NAME), tmp_path)
    await check_the_report_counts_as_the_records_say(RecordSource(tmp_path / "data"))


async def test_postgresql_counts_the_report_as_the_records_say(tmp_path: Path, pg_dsn: str) -> None:
    await write(PostgresStore(pg_dsn), tmp_path)
    await check_the_report_counts_as_the_records_say(RecordSource(tmp_path, pg_dsn))
