"""Retention: old records are purged under a signed purge note, and what remains verifies."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.audit.postgres_store import PostgresStore
from proxy.audit.sqlite_store import SQLiteStore
from tests import pg_fixtures
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import read_lines

pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn

DAY = 86400.0
NOW = 1_790_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":

        async def sqlite_execute(sql: str) -> None:
            db = sqlite3.connect(tmp_path / "fetchlog.sqlite3")
            db.execute(sql)
            db.commit()
            db.close()

        return {
            "store": lambda: SQLiteStore(tmp_path / "fetchlog.sqlite3"),
            "args": ["--data-dir", str(tmp_path)],
            "execute": sqlite_execute,
        }
    dsn = request.getfixturevalue("pg_dsn")

    async def pg_execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    return {
        "store": lambda: PostgresStore(dsn),
        "args": ["--audit-dsn", dsn],
        "execute": pg_execute,
    }


def export_and_verify(source: dict[str, Any], public: Path, out: Path, *extra: str) -> str:
    result = cli("audit", "export", *source["args"], "--output", out, *extra)
    assert result.returncode == 0, result.stderr
    verified = cli("audit", "verify", out, "--public-key", public)
    assert verified.returncode == 0, verified.stdout
    return verified.stdout


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_purge_cuts_old_records_and_the_rest_still_verifies(
    source: dict[str, Any], tmp_path: Path
) -> None:
    signer, public = keys(tmp_path)
    log = fetch_log(source["store"](), tmp_path / "spool", "gw-p", signer, clock=lambda: NOW)
    await log.open()
    for i in range(30):
        log.append(fetch(i, ts=NOW - 500 * DAY + i * 60))  # older than 400 days
    for i in range(20):
        log.append(fetch(i, ts=NOW - 10 * DAY + i * 60))
    assert await log.flushed()

    result = await log.purge(now=NOW, days=400)
    assert result is not None
    assert result["deleted"] == 30 and result["through_seq"] == 30
    assert await log.purge(now=NOW, days=400) is None  # nothing old is left
    await log.close()

    out = export_and_verify(source, public, tmp_path / "after.jsonl")
    assert "replica gw-p: records 31..51" in out  # 51 is the purge record itself
    items = read_lines(tmp_path / "after.jsonl")
    purge_notes = [x for x in items if x["type"] == "purge"]
    assert len(purge_notes) == 1 and purge_notes[0]["seq"] == 30
    # Checkpoints #1..#4 (the start one at seq 0, then seq 10, 20, 30) are gone.
    assert "\npurge 4\n" in purge_notes[0]["note"]
    event = next(x for x in items if x["type"] == "record" and x["kind"] == "purge")
    assert event["seq"] == 51 and "older than" in event["note"]
    assert event["reason"] == "retention"

    # Without its purge note, the first remaining record is anchored by nothing.
    stripped = tmp_path / "stripped.jsonl"
    stripped.write_text(
        "".join(
            line + "\n"
            for line in (tmp_path / "after.jsonl").read_text().splitlines()
            if '"type":"purge"' not in line
        )
    )
    bad = cli("audit", "verify", stripped, "--public-key", public)
    assert bad.returncode == 1
    assert "records before seq 31 are missing" in bad.stdout

    # An old window right after the cut is anchored by the purge note as well.
    out = export_and_verify(
        source,
        public,
        tmp_path / "window.jsonl",
        "--since",
        iso(NOW - 11 * DAY),
        "--until",
        iso(NOW - 10 * DAY + 150),
    )
    assert "replica gw-p: records 31..40" in out

    # A restart resumes what was purged and keeps purging from there.
    log = fetch_log(source["store"](), tmp_path / "spool", "gw-p", signer, clock=lambda: NOW)
    await log.open()
    assert log.purged_seq == 30 and log.purged_number == 4
    result = await log.purge(now=NOW + 390 * DAY + 570, days=400)
    assert result is not None and result["through_seq"] == 40
    await log.close()
    out = export_and_verify(source, public, tmp_path / "second.jsonl")
    assert "replica gw-p: records 41..52" in out


async def test_retention_reaches_the_chains_of_replicas_that_no_longer_run(
    source: dict[str, Any], tmp_path: Path
) -> None:
    signer, public = keys(tmp_path)
    spool = tmp_path / "spool"
    # A replica that ran 500 days ago and is gone (a Deployment's old pod): nobody else would
    # ever purge its chain.
    gone = fetch_log(source["store"](), spool, "gw-gone", signer, clock=lambda: NOW - 500 * DAY)
    await gone.open()
    for i in range(25):
        gone.append(fetch(i, ts=NOW - 500 * DAY + i))
    await gone.close()
    # One that still runs, with old records of its own: its own purge is its business.
    live = fetch_log(source["store"](), spool, "gw-live", signer, clock=lambda: NOW)
    await live.open()
    for i in range(5):
        live.append(fetch(i, ts=NOW - 500 * DAY + i))
    assert await live.flushed()

    new = fetch_log(source["store"](), spool, "gw-new", signer, clock=lambda: NOW)
    await new.open()
    new.append(fetch(1, ts=NOW))
    purged = await new.purge_orphans(now=NOW, days=400)
    assert [(p["replica"], p["deleted"], p["through_seq"]) for p in purged] == [("gw-gone", 25, 25)]
    assert await new.purge_orphans(now=NOW, days=400) == []  # nothing old left, live one held
    await new.close()
    await live.close()

    out = export_and_verify(source, public, tmp_path / "after.jsonl")
    assert "replica gw-live: records 1..5" in out  # untouched while it ran
    assert "gw-gone: records" not in out  # all of it was older than the period
    items = read_lines(tmp_path / "after.jsonl")
    event = next(x for x in items if x["type"] == "record" and x["kind"] == "purge")
    assert event["replica"] == "gw-new"
    assert "records up to seq 25 of replica gw-gone (that replica no longer runs)" in event["note"]

    # Once gw-live has stopped, the next round reaches its old records too.
    again = fetch_log(source["store"](), spool, "gw-new", signer, clock=lambda: NOW)
    await again.open()
    purged = await again.purge_orphans(now=NOW, days=400)
    assert [(p["replica"], p["deleted"]) for p in purged] == [("gw-live", 5)]
    await again.close()
    out = export_and_verify(source, public, tmp_path / "later.jsonl")
    assert "gw-live: records" not in out

    # gw-gone runs again under its id after all (a StatefulSet scaled back up), its spool
    # still on the volume: its chain goes on after the purge note. It used to ship the purged
    # records again from its spool, or start over at seq 1 without it, and to number its
    # checkpoints from #1 again: a second, different checkpoint #1 of the same chain.
    back = fetch_log(source["store"](), spool, "gw-gone", signer, clock=lambda: NOW)
    await back.open()
    for i in range(3):
        back.append(fetch(100 + i, ts=NOW))
    await back.close()
    out = export_and_verify(source, public, tmp_path / "back.jsonl")
    assert "replica gw-gone: records 26..28" in out
    items = [x for x in read_lines(tmp_path / "back.jsonl") if x.get("replica") == "gw-gone"]
    [purge_line] = [x for x in items if x["type"] == "purge"]  # what anchors record 26
    assert purge_line["seq"] == 25
    numbers = [x["number"] for x in items if x["type"] == "checkpoint"]
    assert numbers and min(numbers) == purge_line["number"] + 1


async def test_oldest_records_deleted_without_a_purge_note_fail_a_whole_export(
    source: dict[str, Any], tmp_path: Path
) -> None:
    # A database writer, not retention, deletes the start of a chain up to a checkpoint: the
    # export used to begin at the first record left, anchored by that checkpoint as a --since
    # window is, and to verify though its header said it had no filters.
    signer, public = keys(tmp_path)
    log = fetch_log(source["store"](), tmp_path / "spool", "gw-h", signer, clock=lambda: NOW)
    await log.open()
    for i in range(30):
        log.append(fetch(i, ts=NOW - 10 * DAY + i * 60))
    await log.close()  # checkpoints #1 (start, seq 0), #2..#4 (seq 10, 20, 30), #5 (shutdown)
    export_and_verify(source, public, tmp_path / "before.jsonl")

    await source["execute"]("DELETE FROM fetch_records WHERE replica = 'gw-h' AND seq <= 20")
    for step in ("records", "and-checkpoints"):
        out = tmp_path / f"{step}.jsonl"
        result = cli("audit", "export", *source["args"], "--output", out)
        assert result.returncode == 0, result.stderr
        head = read_lines(out)[0]
        assert head["filters"] == {}
        # The export says it covers the chain from seq 1, though the store holds 21..30 only.
        assert head["replicas"] == [{"replica": "gw-h", "first": 1, "last": 30}]
        verified = cli("audit", "verify", out, "--public-key", public)
        assert verified.returncode == 1, verified.stdout
        first = verified.stdout.splitlines()[0]
        assert first.startswith("FAILED: replica gw-h seq 21 "), first
        assert "records before seq 21 are missing: seq 1..20" in first, first
        # Then the checkpoints that sign only deleted records go too (the one at seq 20 stays).
        await source["execute"]("DELETE FROM fetch_checkpoints WHERE replica = 'gw-h' AND seq < 20")

    # A time window says what it cannot prove (that it holds every record of its time) and
    # still starts right after the checkpoint below it.
    out = export_and_verify(
        source, public, tmp_path / "window.jsonl", "--since", iso(NOW - 10 * DAY + 25 * 60)
    )
    assert "replica gw-h: records 21..30" in out
