"""Witness notes: the stored records a killed replica never signed, signed by one still running.

The lost replica is a real process killed with SIGKILL after its records reached the store and
before its next checkpoint (a Deployment's pod killed, its node lost); it never runs again under
its id unless a test starts it again.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.audit.keys import Signer
from proxy.audit.log import FetchLog
from proxy.audit.record import body_sha256
from proxy.audit.record import chain_hash
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_log import stored
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import start_writer

_LOST_REPLICA = """
import asyncio, sys
from pathlib import Path
from proxy.audit.keys import load_private_key
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import fetch, fetch_log

async def main():
    data, key = Path(sys.argv[1]), Path(sys.argv[2])
    log = fetch_log(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", "gw-lost",
                    load_private_key(key), checkpoint_every_records=10)
    await log.open()
    for i in range(15):
        log.append(fetch(i))  # signed at 10; 11..15 stored, not signed
    assert await log.flushed()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def lose_a_replica(data: Path, signer: Signer) -> subprocess.Popen[str]:
    """Start the replica that will be lost; returns it running, its 15 records stored."""
    return await start_writer(_LOST_REPLICA, data, signer)


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


async def test_records_that_do_not_link_are_not_witnessed(tmp_path: Path, lost: Lost) -> None:
    db = sqlite3.connect(tmp_path / "fetchlog.sqlite3")
    db.execute(
        "UPDATE fetch_records SET body = replace(body, 'faces-v2', 'faces-v3') "
        "WHERE replica = 'gw-lost' AND seq = 14"
    )
    db.commit()
    db.close()
    assert await lost.witness.witness_orphans() == []
    await lost.witness.close()
    result = export_and_verify(tmp_path, lost.public, tmp_path / "x.jsonl")
    assert result.returncode == 1
    assert "come after the last checkpoint" in result.stdout  # still unproven, not signed


async def test_rows_no_gateway_signed_are_not_witnessed(tmp_path: Path, lost: Lost) -> None:
    # Without a checkpoint of its own, nothing says a gateway wrote a chain (rows put in the
    # store by hand look the same): it is not signed.
    db = sqlite3.connect(tmp_path / "fetchlog.sqlite3")
    db.execute("DELETE FROM fetch_checkpoints WHERE replica = 'gw-lost'")
    db.commit()
    db.close()
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


def rewrite_from(path: Path, replica: str, seq: int, **changes: str) -> None:
    """Change record `seq` and recompute every hash from it on, as a forger with the database
    would: the chain links again."""
    import json

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


def append_linked(path: Path, replica: str, **fields: str) -> None:
    """One more record at the end of a chain, linked as a forger with the database would."""
    import json

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
