"""Witness notes: the stored records a killed replica never signed, signed by one still running.

The lost replica is a real process killed with SIGKILL after its records reached the store and
before its next checkpoint (a Deployment's pod killed, its node lost); it never runs again under
its id unless a test starts it again.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from proxy.audit.checkpoint import Checkpoint
from proxy.audit.checkpoint import note_hash
from proxy.audit.keys import Signer
from proxy.audit.log import WITNESS_WITHIN
from proxy.audit.log import FetchLog
from proxy.audit.postgres_store import PostgresStore
from proxy.audit.record import GENESIS_HASH
from proxy.audit.record import body_sha256
from proxy.audit.record import chain_hash
from proxy.audit.record import utc_timestamp
from proxy.audit.sqlite_store import SQLiteStore
from tests.pg_fixtures import pg_admin_dsn  # noqa: F401 - fixture
from tests.pg_fixtures import pg_dsn  # noqa: F401 - fixture
from tests.test_audit_log import stored
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import start_writer

# fetch_log's checkpoint_every_seconds: a witness signs after a checkpoint at most
# WITNESS_WITHIN of them old.
INTERVAL = 3600.0

_LOST_REPLICA = """
import asyncio, sys, time
from pathlib import Path
from proxy.audit.keys import load_private_key
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import fetch, fetch_log

AGO = 0.0  # how long ago this replica ran, by its clock (the test's text replaces it)

async def main():
    data, key = Path(sys.argv[1]), Path(sys.argv[2])
    log = fetch_log(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", "gw-lost",
                    load_private_key(key), checkpoint_every_records=10,
                    clock=lambda: time.time() - AGO)
    await log.open()
    for i in range(15):
        log.append(fetch(i, ts=time.time() - AGO))  # signed at 10; 11..15 stored, not signed
    assert await log.flushed()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def lose_a_replica(data: Path, signer: Signer, ago: float = 0.0) -> subprocess.Popen[str]:
    """Start the replica that will be lost; returns it running, its 15 records stored."""
    return await start_writer(_LOST_REPLICA.replace("AGO = 0.0", f"AGO = {ago!r}"), data, signer)


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


def export_and_verify(data: Path, public: Path, out: Path) -> subprocess.CompletedProcess[str]:
    result = cli("audit", "export", "--data-dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    return cli("audit", "verify", out, "--public-key", public)


@dataclass
class Lost:
    signer: Signer
    public: Path
    witness: FetchLog  # open


@pytest.fixture
async def lost(tmp_path: Path) -> AsyncIterator[Lost]:
    """gw-lost killed with records 11..15 stored and unsigned; gw-w running beside it."""
    signer, public = keys(tmp_path)
    running = await lose_a_replica(tmp_path, signer)
    witness = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-w", signer
    )
    await witness.open()
    try:
        try:
            assert await witness.witness_orphans() == []  # running: its spool is locked
        finally:
            kill(running)
        before = export_and_verify(tmp_path, public, tmp_path / "before.jsonl")
        assert before.returncode == 1
        assert "replica gw-lost seq 11" in before.stdout
        assert "come after the last checkpoint" in before.stdout
        yield Lost(signer, public, witness)
    finally:
        await witness.close()


async def test_a_killed_replicas_unsigned_records_are_signed_by_a_witness(
    tmp_path: Path, lost: Lost
) -> None:
    assert await lost.witness.witness_orphans() == [
        {"replica": "gw-lost", "from_seq": 11, "through_seq": 15}
    ]
    assert await lost.witness.witness_orphans() == []  # signed once
    await lost.witness.close()

    after = export_and_verify(tmp_path, lost.public, tmp_path / "after.jsonl")
    assert after.returncode == 0, after.stdout
    assert "replica gw-lost: records 1..15" in after.stdout
    assert "records 11..15 signed as stored by replica gw-w" in after.stdout
    [event] = [r for r in stored(tmp_path, "gw-w") if r["kind"] == "witness"]
    assert "gw-lost" in event["note"] and "11..15" in event["note"]

    # The lost replica comes back under its id after all: its own checkpoints go on from its
    # own last one, and the witness note (not one of them) forks nothing.
    back = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-lost", lost.signer
    )
    await back.open()
    for i in range(3):
        back.append(fetch(100 + i))
    await back.close()
    again = export_and_verify(tmp_path, lost.public, tmp_path / "again.jsonl")
    assert again.returncode == 0, again.stdout
    assert "replica gw-lost: records 1..18" in again.stdout


async def test_witnessed_records_rewritten_afterwards_fail_verify(
    tmp_path: Path, lost: Lost
) -> None:
    assert await lost.witness.witness_orphans()
    await lost.witness.close()
    # Rewrite record 13 and relink 13..15 (every hash recomputed): the chain links again, but
    # the witness signed the old head.
    rewrite_from(tmp_path / "fetchlog.sqlite3", "gw-lost", 13, url="https://a.example/other")
    result = export_and_verify(tmp_path, lost.public, tmp_path / "rewritten.jsonl")
    assert result.returncode == 1
    assert "the witness note of replica gw-w" in result.stdout
    assert "signed another hash" in result.stdout


async def test_a_witness_note_whose_checkpoint_is_gone_fails_verify(
    tmp_path: Path, lost: Lost
) -> None:
    # A witness note's prev is the checkpoint the witness read as the chain's last. Before the
    # witness opened it with its own key, a database writer could plant a row past the real
    # ones, have the tail witnessed after it and delete the row again. Deleting the real one
    # after the witness signed leaves the same log: a note continuing from a checkpoint the
    # export does not hold, which verify must see offline.
    assert await lost.witness.witness_orphans()
    await lost.witness.close()
    db = sqlite3.connect(tmp_path / "fetchlog.sqlite3")
    [(number, note)] = db.execute(
        "SELECT number, note FROM fetch_checkpoints WHERE replica = 'gw-lost' "
        "ORDER BY number DESC LIMIT 1"
    )
    db.execute("DELETE FROM fetch_checkpoints WHERE replica = 'gw-lost' AND number = ?", (number,))
    db.commit()
    db.close()
    result = export_and_verify(tmp_path, lost.public, tmp_path / "x.jsonl")
    assert result.returncode == 1, result.stdout
    assert (
        f"FAILED: replica gw-lost seq 15: the witness note of replica gw-w continues from the "
        f"signed note with SHA-256 {note_hash(note)}"
    ) in result.stdout


async def test_a_witness_note_verifies_in_a_window_and_after_its_checkpoint_is_purged(
    tmp_path: Path, lost: Lost
) -> None:
    # Legitimate exports where the witness note's checkpoint is not the file's: a --since
    # window starting among the witnessed records (it widens to that checkpoint), and retention
    # having cut that checkpoint (the purge note names it as the last one deleted).
    assert await lost.witness.witness_orphans()
    db = sqlite3.connect(tmp_path / "fetchlog.sqlite3")
    ts = dict(db.execute("SELECT seq, ts FROM fetch_records WHERE replica = 'gw-lost'"))
    db.close()
    window = tmp_path / "window.jsonl"
    exported = cli("audit", "export", "--data-dir", tmp_path, "--since", ts[12], "--output", window)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in window.read_text().splitlines()]
    first = [(x["type"], x["seq"]) for x in lines if x.get("replica") == "gw-lost"][:2]
    assert first == [("checkpoint", 10), ("record", 11)]
    result = cli("audit", "verify", window, "--public-key", lost.public)
    assert result.returncode == 0, result.stdout

    # Cut records 1..12 and checkpoints #1..#2 (the witness note's) of the lost chain.
    at = (_epoch(ts[12]) + _epoch(ts[13])) / 2
    [cut] = await lost.witness.purge_orphans(now=at + 86400, days=1)
    assert (cut["replica"], cut["through_seq"], cut["through_number"]) == ("gw-lost", 12, 2)
    await lost.witness.close()
    result = export_and_verify(tmp_path, lost.public, tmp_path / "purged.jsonl")
    assert result.returncode == 0, result.stdout
    assert "replica gw-lost: records 13..15" in result.stdout


def _epoch(rfc3339: str) -> float:
    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_records_that_do_not_link_are_not_witnessed(tmp_path: Path, lost: Lost) -> None:
    store_sql(
        tmp_path / "fetchlog.sqlite3",
        "UPDATE fetch_records SET body = replace(body, 'faces-v2', 'faces-v3') "
        "WHERE replica = 'gw-lost' AND seq = 14",
    )
    assert await lost.witness.witness_orphans() == []
    await lost.witness.close()
    result = export_and_verify(tmp_path, lost.public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "come after the last checkpoint" in result.stdout  # still unproven, not signed


async def test_rows_no_gateway_signed_are_not_witnessed(tmp_path: Path, lost: Lost) -> None:
    # Without a checkpoint of its own, nothing says a gateway wrote a chain (rows put in the
    # store by hand look the same): it is not signed.
    store_sql(
        tmp_path / "fetchlog.sqlite3", "DELETE FROM fetch_checkpoints WHERE replica = 'gw-lost'"
    )
    assert await lost.witness.witness_orphans() == []


async def test_records_added_to_a_witnessed_chain_are_not_witnessed_again(
    tmp_path: Path, lost: Lost
) -> None:
    assert await lost.witness.witness_orphans()
    append_linked(tmp_path / "fetchlog.sqlite3", "gw-lost", url="https://a.example/forged")
    assert await lost.witness.witness_orphans() == []
    await lost.witness.close()
    result = export_and_verify(tmp_path, lost.public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "replica gw-lost seq 16" in result.stdout
    assert "come after the last checkpoint" in result.stdout


async def test_rows_after_a_shutdown_checkpoint_are_not_witnessed(tmp_path: Path) -> None:
    # A replica that stopped cleanly signed everything it wrote (the end of every pod of a
    # rolled Deployment): rows after its shutdown checkpoint were signed by the next witness.
    signer, public = keys(tmp_path)
    witness = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-w", signer
    )
    await witness.open()
    try:
        gone = fetch_log(
            SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-a", signer
        )
        await gone.open()
        for i in range(5):
            gone.append(fetch(i))
        assert await witness.witness_orphans() == []  # running
        await gone.close()  # a shutdown checkpoint at seq 5
        append_linked(tmp_path / "fetchlog.sqlite3", "gw-a", url="https://a.example/forged")
        assert await witness.witness_orphans() == []
    finally:
        await witness.close()
    result = export_and_verify(tmp_path, public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "replica gw-a seq 6" in result.stdout


@pytest.mark.parametrize("intervals", [WITNESS_WITHIN - 1, WITNESS_WITHIN + 1])
async def test_a_killed_replica_is_witnessed_only_while_its_last_checkpoint_is_recent(
    tmp_path: Path, intervals: int
) -> None:
    # Killed `intervals` checkpoint intervals ago (its clock then): its last checkpoint is that
    # old. Older than a run killed and looked at since can leave, the records after it are
    # the database's word alone: reported, not signed.
    signer, public = keys(tmp_path)
    kill(await lose_a_replica(tmp_path, signer, ago=intervals * INTERVAL))
    witness = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-w", signer
    )
    await witness.open()
    try:
        with capture_logs() as logs:
            done = await witness.witness_orphans()
            assert await witness.witness_orphans() == []
    finally:
        await witness.close()
    refused = [e for e in logs if e["event"] == "witness_refused"]
    if intervals <= WITNESS_WITHIN:
        assert done == [{"replica": "gw-lost", "from_seq": 11, "through_seq": 15}]
        assert not refused
        result = export_and_verify(tmp_path, public, tmp_path / "x.jsonl")
        assert result.returncode == 0, result.stdout
        return
    assert done == []
    [event] = refused  # once, not at every look
    assert event["log_level"] == "error" and event["replica"] == "gw-lost"
    assert event["through_seq"] == 15 and "was not signed within the last" in event["reason"]
    result = export_and_verify(tmp_path, public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "replica gw-lost seq 11" in result.stdout
    assert "come after the last checkpoint" in result.stdout


async def test_with_a_short_interval_a_kill_a_replacement_finds_minutes_later_is_witnessed(
    tmp_path: Path,
) -> None:
    # Review: with checkpoint_every_seconds 10 the window was 70 s, while Kubernetes replaces a
    # pod lost with its node after about 5 minutes: its tail stayed unsigned for good. The
    # window is never under 15 minutes.
    signer, public = keys(tmp_path)
    kill(await lose_a_replica(tmp_path, signer, ago=10 * 60))
    witness = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw-w",
        signer,
        checkpoint_every_seconds=10,
    )
    await witness.open()
    try:
        done = await witness.witness_orphans()
    finally:
        await witness.close()
    assert done == [{"replica": "gw-lost", "from_seq": 11, "through_seq": 15}]
    assert export_and_verify(tmp_path, public, tmp_path / "x.jsonl").returncode == 0


async def stop_cleanly(gone: FetchLog, ago: float) -> None:
    """A run of `gone`'s replica `ago` seconds back (its clock): records 1..3, a periodic
    checkpoint, records 4..6 and a clean stop, whose shutdown checkpoint signs 4..6."""
    then = time.time() - ago
    gone.clock = lambda: then
    await gone.open()
    for i in range(3):
        gone.append(fetch(i, ts=then))
    gone.checkpoint()
    for i in range(3, 6):
        gone.append(fetch(i, ts=then))
    await gone.close()


async def test_a_shutdown_checkpoint_deleted_long_after_the_stop_is_not_witnessed(
    tmp_path: Path,
) -> None:
    # A database writer without the key deletes the shutdown checkpoint of a replica that
    # stopped cleanly long ago, rewrites a record it alone signed and adds one, every hash
    # recomputed: the chain's last checkpoint is a periodic one again, and the records after
    # it link. They must not be signed as stored.
    signer, public = keys(tmp_path)
    path = tmp_path / "fetchlog.sqlite3"
    gone = fetch_log(SQLiteStore(path), tmp_path / "spool", "gw-a", signer)
    await stop_cleanly(gone, ago=(WITNESS_WITHIN + 1) * INTERVAL)
    store_sql(
        path,
        "DELETE FROM fetch_checkpoints WHERE replica = 'gw-a' AND number = "
        "(SELECT max(number) FROM fetch_checkpoints WHERE replica = 'gw-a')",
    )
    rewrite_from(path, "gw-a", 4, url="https://a.example/rewritten")
    append_linked(path, "gw-a", url="https://a.example/never-fetched")
    witness = fetch_log(SQLiteStore(path), tmp_path / "spool", "gw-w", signer)
    await witness.open()
    try:
        assert await witness.witness_orphans() == []
    finally:
        await witness.close()
    result = export_and_verify(tmp_path, public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "replica gw-a seq 4" in result.stdout
    assert "come after the last checkpoint" in result.stdout


async def test_on_postgresql_a_shutdown_checkpoint_deleted_long_after_the_stop_is_not_witnessed(
    tmp_path: Path,
    pg_dsn: str,  # noqa: F811
) -> None:
    # The same forgery on the fleet's shared store (where it was found).
    signer, public = keys(tmp_path)
    gone = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool", "gw-a", signer)
    await stop_cleanly(gone, ago=(WITNESS_WITHIN + 1) * INTERVAL)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "DELETE FROM fetch_checkpoints WHERE replica = 'gw-a' AND number = "
            "(SELECT max(number) FROM fetch_checkpoints WHERE replica = 'gw-a')"
        )
        rows = await conn.fetch(
            "SELECT seq, body FROM fetch_records WHERE replica = 'gw-a' AND seq >= 3 ORDER BY seq"
        )
        recs = [json.loads(body) for _, body in rows]
        recs[1]["url"] = "https://a.example/rewritten"  # record 4
        recs.append({**recs[-1], "seq": 7, "id": "f" * 32, "url": "https://a.example/never"})
        for prev, rec in itertools.pairwise(recs):
            rec["prev_hash"] = prev["hash"]
            rec["hash"] = chain_hash(rec["prev_hash"], body_sha256(rec))
            await conn.execute(
                "DELETE FROM fetch_records WHERE replica = 'gw-a' AND seq = $1", rec["seq"]
            )
            await conn.execute(
                "INSERT INTO fetch_records (replica, seq, id, ts, kind, decision, reason, url, "
                "hash, body) VALUES ('gw-a', $1, $2, $3::text::timestamptz, 'fetch', $4, $5, $6, "
                "$7, $8)",
                rec["seq"],
                rec["id"],
                rec["ts"],
                rec["decision"],
                rec["reason"],
                rec["url"],
                rec["hash"],
                json.dumps(rec),
            )
    finally:
        await conn.close()
    witness = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool", "gw-w", signer)
    await witness.open()
    try:
        assert await witness.witness_orphans() == []
    finally:
        await witness.close()
    out = tmp_path / "x.jsonl"
    exported = cli("audit", "export", "--audit-dsn", pg_dsn, "--output", out)
    assert exported.returncode == 0, exported.stderr
    result = cli("audit", "verify", out, "--public-key", public)
    assert result.returncode == 1
    assert "replica gw-a seq 4" in result.stdout
    assert "come after the last checkpoint" in result.stdout


@pytest.mark.parametrize("planted", ["signed with another key", "another chain's"])
async def test_a_checkpoint_row_the_chain_never_signed_is_not_trusted(
    tmp_path: Path, planted: str
) -> None:
    # The stored row of a checkpoint is the database's word: a periodic checkpoint of this
    # chain signed a moment ago with a key of the writer's own, or the genuine, recent start
    # checkpoint of the witness's own chain (seq 0, so every record of this one links to it),
    # planted after the real ones of a chain that stopped long ago, its records dated anew to
    # match. Neither may let its records be signed as stored.
    signer, _ = keys(tmp_path)
    path = tmp_path / "fetchlog.sqlite3"
    gone = fetch_log(SQLiteStore(path), tmp_path / "spool", "gw-a", signer)
    await stop_cleanly(gone, ago=(WITNESS_WITHIN + 1) * INTERVAL)
    redate(path, "gw-a", utc_timestamp(time.time()))
    rewrite_from(path, "gw-a", 4, url="https://a.example/rewritten")
    witness = fetch_log(SQLiteStore(path), tmp_path / "spool", "gw-w", signer)
    await witness.open()
    try:
        assert await witness.flushed()
        db = sqlite3.connect(path)
        if planted == "signed with another key":
            other, _ = keys(tmp_path, "writer")
            [(head,)] = db.execute(
                "SELECT hash FROM fetch_records WHERE replica = 'gw-a' AND seq = 6"
            )
            note = Checkpoint("gw-a", 4, 6, head, utc_timestamp(time.time()), kind="periodic").sign(
                other
            )
        else:
            [(note,)] = db.execute(
                "SELECT note FROM fetch_checkpoints WHERE replica = 'gw-w' AND kind = 'start'"
            )
        db.execute(
            "INSERT INTO fetch_checkpoints (replica, number, seq, time, kind, note) "
            "VALUES ('gw-a', 4, 0, '2026-01-01T00:00:00.000000Z', 'periodic', ?)",
            (note,),
        )
        db.commit()
        db.close()
        append_linked(path, "gw-a", url="https://a.example/never-fetched")
        with capture_logs() as logs:
            assert await witness.witness_orphans() == []
    finally:
        await witness.close()
    [event] = [e for e in logs if e["event"] == "witness_refused"]
    assert "its last checkpoint is not one it signed" in event["reason"]


async def test_a_witness_that_saw_a_shutdown_checkpoint_refuses_the_chain_once_it_is_gone(
    tmp_path: Path,
) -> None:
    # Within the window a witness cannot tell a deleted shutdown checkpoint from a kill by the
    # store alone; one it saw at an earlier look it can.
    signer, public = keys(tmp_path)
    path = tmp_path / "fetchlog.sqlite3"
    witness = fetch_log(SQLiteStore(path), tmp_path / "spool", "gw-w", signer)
    await witness.open()
    try:
        gone = fetch_log(SQLiteStore(path), tmp_path / "spool", "gw-a", signer)
        await stop_cleanly(gone, ago=0.0)
        assert await witness.witness_orphans() == []  # signed through seq 6 by itself
        store_sql(
            path, "DELETE FROM fetch_checkpoints WHERE replica = 'gw-a' AND kind = 'shutdown'"
        )
        rewrite_from(path, "gw-a", 5, url="https://a.example/rewritten")
        with capture_logs() as logs:
            assert await witness.witness_orphans() == []
    finally:
        await witness.close()
    [event] = [e for e in logs if e["event"] == "witness_refused"]
    assert "seen earlier is gone" in event["reason"]
    result = export_and_verify(tmp_path, public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "replica gw-a seq 4" in result.stdout


async def test_a_witness_note_deleted_from_the_store_is_not_signed_again_differently(
    tmp_path: Path, lost: Lost
) -> None:
    assert await lost.witness.witness_orphans()
    store_sql(
        tmp_path / "fetchlog.sqlite3", "DELETE FROM fetch_witnesses WHERE replica = 'gw-lost'"
    )
    rewrite_from(tmp_path / "fetchlog.sqlite3", "gw-lost", 13, url="https://a.example/other")
    with capture_logs() as logs:
        assert await lost.witness.witness_orphans() == []
    [event] = [e for e in logs if e["event"] == "witness_refused"]
    assert "witness note this replica signed for it is gone" in event["reason"]
    await lost.witness.close()
    result = export_and_verify(tmp_path, lost.public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "replica gw-lost seq 11" in result.stdout


@pytest.mark.parametrize("days", [-365.0, 1.0])
async def test_records_dated_far_from_their_checkpoint_are_not_witnessed(
    tmp_path: Path, lost: Lost, days: float
) -> None:
    # Records after a checkpoint were written after it, before the kill: one dated a year
    # before it, or tomorrow, was not (a request under way at the checkpoint is dated a little
    # before it, by its start).
    when = utc_timestamp(time.time() + days * 86400)
    rewrite_from(tmp_path / "fetchlog.sqlite3", "gw-lost", 13, ts=when)
    with capture_logs() as logs:
        assert await lost.witness.witness_orphans() == []
    [event] = [e for e in logs if e["event"] == "witness_refused"]
    assert f"record 13 is dated {when!r}" in event["reason"]


_RESTARTED_THEN_KILLED = """
import asyncio, sys
from pathlib import Path
import structlog
from proxy.audit.keys import load_private_key
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import fetch, fetch_log

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: "ready"

async def main():
    data, key = Path(sys.argv[1]), Path(sys.argv[2])
    def run():
        return fetch_log(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", "gw-k",
                         load_private_key(key), checkpoint_every_records=1000)
    first = run()
    await first.open()
    for i in range(3):
        first.append(fetch(i))
    await first.close()  # a clean stop: signed through seq 3
    log = run()  # the pod restarted under its id, killed before its first periodic checkpoint
    await log.open()
    for i in range(4):
        log.append(fetch(10 + i))
    assert await log.flushed()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_run_killed_before_its_first_periodic_checkpoint_is_witnessed(
    tmp_path: Path,
) -> None:
    # Every run signs a start checkpoint: the records of one killed at once (here: after a
    # clean stop and a restart under the same id) follow a checkpoint of its own.
    signer, public = keys(tmp_path)
    killed = await start_writer(_RESTARTED_THEN_KILLED, tmp_path, signer)
    kill(killed)
    witness = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-w", signer
    )
    await witness.open()
    try:
        assert await witness.witness_orphans() == [
            {"replica": "gw-k", "from_seq": 4, "through_seq": 7}
        ]
    finally:
        await witness.close()
    result = export_and_verify(tmp_path, public, tmp_path / "x.jsonl")
    assert result.returncode == 0, result.stdout
    assert "replica gw-k: records 1..7" in result.stdout
    assert "records 4..7 signed as stored by replica gw-w" in result.stdout


def store_sql(path: Path, statement: str, *params: object) -> None:
    """One statement on the SQLite store, as someone with the database file would run it."""
    db = sqlite3.connect(path)
    db.execute(statement, params)
    db.commit()
    db.close()


def rewrite_from(path: Path, replica: str, seq: int, **changes: str) -> None:
    """Change record `seq` and recompute every hash from it on, as a forger with the database
    would: the chain links again."""
    db = sqlite3.connect(path)
    rows = db.execute(
        "SELECT seq, body FROM fetch_records WHERE replica = ? AND seq >= ? ORDER BY seq",
        (replica, seq - 1),
    ).fetchall()
    prev = json.loads(rows[0][1])["hash"]
    for number, body in rows[1:]:
        rec = json.loads(body)
        if number == seq:
            rec.update(changes)
        rec["prev_hash"] = prev
        rec["hash"] = prev = chain_hash(prev, body_sha256(rec))
        db.execute(
            "UPDATE fetch_records SET body = ?, hash = ? WHERE replica = ? AND seq = ?",
            (json.dumps(rec), rec["hash"], replica, number),
        )
    db.commit()
    db.close()


def redate(path: Path, replica: str, ts: str) -> None:
    """Date every record of a chain `ts` and recompute every hash from genesis, as a forger
    with the database would."""
    db = sqlite3.connect(path)
    prev = GENESIS_HASH
    rows = db.execute(
        "SELECT seq, body FROM fetch_records WHERE replica = ? ORDER BY seq", (replica,)
    ).fetchall()
    for seq, body in rows:
        rec = {**json.loads(body), "ts": ts, "prev_hash": prev}
        rec["hash"] = prev = chain_hash(prev, body_sha256(rec))
        db.execute(
            "UPDATE fetch_records SET body = ?, hash = ?, ts = ? WHERE replica = ? AND seq = ?",
            (json.dumps(rec), rec["hash"], ts, replica, seq),
        )
    db.commit()
    db.close()


def append_linked(path: Path, replica: str, **fields: str) -> None:
    """One more record at the end of a chain, linked as a forger with the database would."""
    db = sqlite3.connect(path)
    seq, body = db.execute(
        "SELECT seq, body FROM fetch_records WHERE replica = ? ORDER BY seq DESC LIMIT 1",
        (replica,),
    ).fetchone()
    rec = {**json.loads(body), **fields, "seq": seq + 1, "prev_hash": json.loads(body)["hash"]}
    rec["hash"] = chain_hash(rec["prev_hash"], body_sha256(rec))
    db.execute(
        "INSERT INTO fetch_records (replica, seq, id, ts, kind, decision, url, hash, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            replica,
            seq + 1,
            rec["id"],
            rec["ts"],
            "fetch",
            rec["decision"],
            rec["url"],
            rec["hash"],
            json.dumps(rec),
        ),
    )
    db.commit()
    db.close()
