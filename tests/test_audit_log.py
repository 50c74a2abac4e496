"""FetchLog on a real SQLite store: chain, checkpoints, spool replay after kill -9, limits."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from proxy.audit.checkpoint import note_text
from proxy.audit.checkpoint import open_note
from proxy.audit.checkpoint import parse_text
from proxy.audit.keys import Signer
from proxy.audit.keys import SigningKeyError
from proxy.audit.keys import load_signer
from proxy.audit.log import FetchLog
from proxy.audit.query import RecordQuery
from proxy.audit.record import GENESIS_HASH
from proxy.audit.record import chain_record
from proxy.audit.record import record_hash
from proxy.audit.spool import Spool
from proxy.audit.spool import Spooled
from proxy.audit.spool import SpoolReadError
from proxy.audit.sqlite_store import SQLiteStore
from proxy.audit.sqlite_store import read_records
from proxy.audit.store import ChainForked
from proxy.audit.store import KeyGoneBack
from proxy.audit.store import ReplicaInUse
from tests.support import unwritable
from tests.test_audit_support import REPO
from tests.test_audit_support import a_batch_that_does_not_follow_the_stored_chain_is_refused
from tests.test_audit_support import another_hash_fails_the_write_and_a_retry_does_not
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import start_writer


def stored(data: Path, replica: str | None = None) -> list[dict]:
    return list(read_records(data / "fetchlog.sqlite3", RecordQuery(replica=replica)))


async def stored_checkpoints(data: Path, replica: str) -> list[dict]:
    store = SQLiteStore(data / "fetchlog.sqlite3", readonly=True)
    await store.open()
    try:
        return await store.checkpoints(replica, 0, 10**9)
    finally:
        await store.close()


def export_and_verify(data: Path, public: Path, out: Path, *, exit_code: int = 0) -> str:
    """Export the data dir's fetch log, verify it (exiting `exit_code`); verify's output."""
    result = cli("audit", "export", "--data-dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    verified = cli("audit", "verify", out, "--public-key", public)
    assert verified.returncode == exit_code, verified.stdout
    return verified.stdout


async def test_chain_and_a_signed_checkpoint_every_n_records(tmp_path: Path) -> None:
    signer, public = keys(tmp_path)
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-1", signer)
    await log.open()
    for i in range(35):
        log.append(fetch(i))
    await log.close()
    records = stored(tmp_path, "gw-1")
    assert [r["seq"] for r in records] == list(range(1, 36))
    assert records[0]["prev_hash"] == GENESIS_HASH
    for before, rec in itertools.pairwise(records):
        assert rec["prev_hash"] == before["hash"]
        assert record_hash(rec) == rec["hash"]
    checkpoints = await stored_checkpoints(tmp_path, "gw-1")
    opened = [open_note(c["note"], signer.verifier) for c in checkpoints]
    assert [(c.number, c.seq, c.kind) for c in opened] == [
        (1, 0, "start"),
        (2, 10, "periodic"),
        (3, 20, "periodic"),
        (4, 30, "periodic"),
        (5, 35, "shutdown"),
    ]
    assert opened[0].hash == GENESIS_HASH
    assert opened[3].hash == records[29]["hash"]
    assert "records 1..35" in export_and_verify(tmp_path, public, tmp_path / "e.jsonl")


async def test_idle_replica_still_checkpoints_every_t_seconds(tmp_path: Path) -> None:
    signer, _ = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw-idle",
        signer,
        checkpoint_every_seconds=0.2,
    )
    await log.open()
    await asyncio.sleep(0.75)
    log.append(fetch(1))
    await asyncio.sleep(0.3)
    assert await log.flushed()
    checkpoints = [
        parse_text(note_text(c["note"])) for c in await stored_checkpoints(tmp_path, "gw-idle")
    ]
    await log.close()
    idle = [c for c in checkpoints if c.seq == 0]
    assert len(idle) >= 3  # no record at all, and still signed every 0.2 s
    assert any(c.seq == 1 for c in checkpoints)
    assert [c.number for c in checkpoints] == list(range(1, len(checkpoints) + 1))


async def test_a_checkpoint_interval_shortened_below_the_time_since_the_last_signs_at_once(
    tmp_path: Path,
) -> None:
    # Review: the shortened interval restarted the timer, so a replica quiet for 1.2 s whose
    # interval went from an hour to 1 s signed a second later, not at once (from an hour to a
    # minute, 59 minutes after they were due: a minute more unsigned than the policy says).
    signer, _ = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-overdue", signer
    )  # checkpoint_every_seconds=3600
    await log.open()
    started = log.checkpoint_number
    await asyncio.sleep(1.2)
    log.checkpoint_every_seconds = 1.0  # already overdue
    await asyncio.sleep(0.2)
    signed = log.checkpoint_number
    await log.close()
    assert signed == started + 1


async def test_a_shorter_checkpoint_interval_applies_without_waiting_out_the_old_one(
    tmp_path: Path,
) -> None:
    # A reload that lowered audit.checkpoint_every_seconds (an hour to 60 s, say) left the idle
    # timer running on the old interval: no checkpoint until it ran out (an SRE's reload probe).
    signer, _ = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-reload", signer
    )  # checkpoint_every_seconds=3600
    await log.open()
    await asyncio.sleep(0.1)
    log.checkpoint_every_seconds = 0.2  # what Runtime.reload sets
    await asyncio.sleep(0.75)
    assert await log.flushed()
    checkpoints = [
        parse_text(note_text(c["note"])) for c in await stored_checkpoints(tmp_path, "gw-reload")
    ]
    await log.close()
    assert len(checkpoints) >= 3  # the start's, then one every 0.2 s


_KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from proxy.audit.keys import load_private_key
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import fetch, fetch_log

async def main():
    data, key = Path(sys.argv[1]), Path(sys.argv[2])
    log = fetch_log(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", "gw-k",
                    load_private_key(key), checkpoint_every_records=1000, ship_interval=3600)
    await log.open()
    for i in range(25):
        log.append(fetch(i))
    log.checkpoint()
    assert await log.flushed()
    for i in range(25, 40):
        log.append(fetch(i))       # in the spool only: the ship loop sleeps for an hour
    for i in range(3):
        log.begin(fetch(100 + i))  # requests that left and never came back
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_kill_9_loses_nothing_and_in_flight_requests_become_interrupted(
    tmp_path: Path,
) -> None:
    signer, public = keys(tmp_path)
    proc = await start_writer(_KILLED_WRITER, tmp_path, signer)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)  # reaps it and closes its pipes
    assert len(stored(tmp_path, "gw-k")) == 25  # the other 15 were only in the spool

    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-k", signer)
    await log.open()
    assert log.seq == 43  # 40 replayed + 3 interrupted, chained on
    log.append(fetch(200))
    await log.close()
    records = stored(tmp_path, "gw-k")
    assert [r["seq"] for r in records] == list(range(1, 45))
    interrupted = [r for r in records if r["reason"] == "interrupted"]
    assert [r["seq"] for r in interrupted] == [41, 42, 43]
    assert all("response is unknown" in r["note"] for r in interrupted)
    assert export_and_verify(tmp_path, public, tmp_path / "e.jsonl").count("records 1..44") == 1
    # Everything is stored: the spool is down to the current (empty) segment.
    assert log.spool.size == 0 or len(log.spool.segments) == 1


async def test_spool_past_its_limit_fails_closed_until_shipped(tmp_path: Path) -> None:
    signer, _ = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw-full",
        signer,
        spool_max_bytes=8000,
        ship_interval=3600,
        batch_size=10**6,
        checkpoint_every_records=10**6,
    )
    await log.open()
    assert log.available
    while log.available:
        log.append(fetch(log.seq))
    assert log.spool.size >= 8000
    # Every record and the run's start checkpoint wait to be stored.
    assert REGISTRY.get_sample_value("crawlwarden_audit_queue_depth") == log.seq + 1
    assert await log.flushed()
    assert log.available  # stored, the segment retired: fetching resumes
    assert REGISTRY.get_sample_value("crawlwarden_audit_queue_depth") == 0
    await log.close()


async def test_close_flushes_records_still_in_flight(tmp_path: Path) -> None:
    signer, public = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw-c",
        signer,
        ship_interval=3600,
        batch_size=10**6,
        checkpoint_every_records=10**6,
    )
    await log.open()
    for i in range(50):
        log.append(fetch(i))
    await log.close()
    assert len(stored(tmp_path, "gw-c")) == 50
    assert "last checkpoint #2 at seq 50" in export_and_verify(
        tmp_path, public, tmp_path / "e.jsonl"
    )


async def test_close_records_what_is_still_in_flight_as_interrupted(tmp_path: Path) -> None:
    """Requests still in flight at a stop (the drain ran out) are recorded when the log closes,
    once: the next run of the replica does not replay them again."""
    signer, public = keys(tmp_path)
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-u", signer)
    await log.open()
    sent = [fetch(i) for i in (1, 2, 3)]
    for rec in sent:
        log.begin(rec)
    log.append(sent[1])  # answered; the others are still out
    await log.close()
    records = stored(tmp_path, "gw-u")
    assert [(r["id"], r["decision"], r["reason"]) for r in records] == [
        (sent[1].id, "forwarded", "ok"),
        (sent[0].id, "forwarded", "interrupted"),
        (sent[2].id, "forwarded", "interrupted"),
    ]
    assert all("response is unknown" in r["note"] for r in records[1:])
    assert "records 1..3" in export_and_verify(tmp_path, public, tmp_path / "e.jsonl")
    again = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-u", signer
    )
    await again.open()
    assert again.seq == 3
    await again.close()
    assert len(stored(tmp_path, "gw-u")) == 3


async def test_restart_continues_the_chain_and_the_checkpoint_chain(tmp_path: Path) -> None:
    signer, public = keys(tmp_path)
    for run in range(3):
        log = fetch_log(
            SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-r", signer
        )
        await log.open()
        assert log.seq == run * 15
        for i in range(15):
            log.append(fetch(i))
        await log.close()
    out = export_and_verify(tmp_path, public, tmp_path / "e.jsonl")
    assert "records 1..45" in out
    # Per run a start checkpoint, one after 10 records and one at shutdown, numbered across
    # restarts.
    assert "last checkpoint #9 at seq 45" in out


async def test_a_failed_spool_write_leaves_no_hole_in_the_chain(tmp_path: Path) -> None:
    signer, _ = keys(tmp_path)
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-e", signer)
    await log.open()
    log.append(fetch(1))
    fd = log.spool._fd
    assert fd is not None
    os.close(fd)  # the disk goes away under the spool
    with pytest.raises(OSError):
        log.append(fetch(2))
    assert log.seq == 1
    assert not log.available  # the gateway now answers 503 audit_unavailable
    log.spool._fd = None
    await log.close()


_DISK_FILLS_UP = """
import asyncio, resource, sys, time
from pathlib import Path
import structlog
from proxy.audit.keys import load_private_key
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import fetch, fetch_log

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

async def main():
    data, key = Path(sys.argv[1]), Path(sys.argv[2])
    log = fetch_log(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", "gw-full",
                    load_private_key(key), ship_interval=3600, batch_size=10**6)
    await log.open()
    for i in range(3):
        log.append(fetch(i))
    segment = log.spool.current
    # The disk fills up: no file may grow past a little more than the segment holds now (the
    # failing write is cut part-way, as on a full disk; Python ignores SIGXFSZ).
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.size + 700, hard))
    failed = 0
    for i in range(3, 10):
        try:
            log.append(fetch(i))
        except OSError:
            failed += 1
    assert failed, "no write failed"
    assert segment.path.stat().st_size == segment.size, "a part-written line was left"
    assert not log.available
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
    assert not log.available  # looked for again after SPOOL_RETRY_SECONDS, not at once
    time.sleep(1.1)
    assert log.available
    for i in range(10, 13):
        log.append(fetch(i))
    await log.close()
    print("ok", log.seq, failed, flush=True)

asyncio.run(main())
"""


def test_a_spool_that_had_no_room_takes_records_again_once_it_has(tmp_path: Path) -> None:
    # A full disk used to keep the replica failing closed (503 audit_unavailable, not ready)
    # until someone restarted it, though the alert says "until the spool has room again".
    signer, public = keys(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _DISK_FILLS_UP, str(tmp_path), str(signer.source)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    _, seq, failed = done.stdout.split()
    assert int(failed) >= 1
    # Every record written went into the chain once, in order, and verifies: no hole, no
    # damaged line, the failed writes never took a seq.
    assert [r["seq"] for r in stored(tmp_path, "gw-full")] == list(range(1, int(seq) + 1))
    assert f"records 1..{seq}" in export_and_verify(tmp_path, public, tmp_path / "e.jsonl")


def test_embedded_gateway_makes_its_own_key_and_a_shared_store_needs_one(tmp_path: Path) -> None:
    signer = load_signer(None, tmp_path, shared_store=False)
    key = tmp_path / "audit-signing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "audit-signing.pub").exists()
    again = load_signer(None, tmp_path, shared_store=False)
    assert again.verifier.key_id == signer.verifier.key_id  # the same key on the next start
    with pytest.raises(SigningKeyError, match=r"audit\.signing_key_file"):
        load_signer(None, tmp_path, shared_store=True)
    assert load_signer(key, tmp_path, shared_store=True).verifier.key_id == signer.verifier.key_id


def test_a_key_the_gateway_cannot_write_in_its_data_dir_says_where_and_what_to_do(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with unwritable(data), pytest.raises(SigningKeyError) as caught:
        load_signer(None, data, shared_store=False)
    message = str(caught.value)
    assert f"{data / 'audit-signing.key'}" in message
    assert "audit.signing_key_file" in message and str(data) in message


async def test_a_record_with_bytes_that_were_not_utf8_is_kept_not_lost(tmp_path):
    """mitmproxy hands over non-UTF-8 bytes as lone surrogates; the record must survive."""
    log = fetch_log(SQLiteStore(tmp_path / "log.sqlite3"), tmp_path, "r1", None)
    await log.open()
    try:
        rec = log.append(fetch(1, url="http://site-a.test/\udcff\udcfe", account="acc\udc80"))
        assert rec["url"] == "http://site-a.test/\\xff\\xfe"
        assert rec["account"] == "acc\\x80"
        assert await log.flushed()
    finally:
        await log.close()


# -- memory during a store outage --------------------------------------------------------------


class OutageStore(SQLiteStore):
    """A real SQLite store whose writes fail while `down` (the database unreachable)."""

    down = False

    async def write(self, records, checkpoints=()):  # type: ignore[no-untyped-def]
        if self.down:
            raise ConnectionRefusedError("fetch-log database unreachable")
        await super().write(records, checkpoints)


def bulky(i: int):  # a record the size of a real one with signals, headers and a note (~3 KB)
    return fetch(i, note="n" * 2500)


async def log_in_an_outage(
    tmp_path: Path, replica: str, signer, records: int, memory_records: int
) -> tuple[FetchLog, OutageStore]:
    """An open fetch log whose store has gone down, with `records` appended meanwhile."""
    store = OutageStore(tmp_path / "fetchlog.sqlite3")
    log = fetch_log(store, tmp_path / "spool", replica, signer, memory_records=memory_records)
    await log.open()
    store.down = True
    for i in range(records):
        log.append(bulky(i))
    return log, store


async def test_a_store_outage_costs_spool_disk_not_memory(tmp_path: Path) -> None:
    signer, public = keys(tmp_path)
    log, store = await log_in_an_outage(tmp_path, "gw-o", signer, 50, memory_records=20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50, 1050):
            last = log.append(bulky(i))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert log.held_in_memory == 20
    assert len(last.json_text) > 2500
    # Each record held back costs its place in the spool and its age (~360 bytes with the
    # checkpoints signed meanwhile), not its ~3 KB of JSON.
    assert grown / 1000 < 600, f"{grown / 1000:.0f} bytes of memory per record held back"
    assert stored(tmp_path, "gw-o") == []

    store.down = False  # the database is back: everything is shipped, read back from the spool
    assert await log.flushed(timeout=30)
    assert log.held_in_memory == 0
    await log.close()
    records = stored(tmp_path, "gw-o")
    assert [r["seq"] for r in records] == list(range(1, 1051))
    assert records[-1] == dict(last)
    assert "records 1..1050" in export_and_verify(tmp_path, public, tmp_path / "e.jsonl")


async def test_a_record_waiting_out_an_outage_counts_once_as_retry(tmp_path: Path) -> None:
    # Every failed attempt counted the same waiting records again: the dashboard showed records
    # retried by the second with nearly nothing waiting.
    def retried() -> float:
        return REGISTRY.get_sample_value("crawlwarden_audit_records_total", {"outcome": "retry"})

    signer, _ = keys(tmp_path)
    before = retried()
    log, store = await log_in_an_outage(tmp_path, "gw-r", signer, 20, memory_records=100)
    try:
        await asyncio.sleep(2.0)  # several attempts, backing off
        assert retried() - before == 20
        store.down = False
        assert await log.flushed(timeout=30)
        log.append(fetch(99))
        assert await log.flushed(timeout=10)
        assert retried() - before == 20  # a record stored at once is no retry
    finally:
        await log.close()


async def test_a_replayed_spool_is_read_back_a_bounded_batch_at_a_time(tmp_path: Path) -> None:
    signer, public = keys(tmp_path)
    first, _ = await log_in_an_outage(tmp_path, "gw-p", signer, 300, memory_records=5)
    await first.close(timeout=0.2)  # stopped during the outage: all 300 wait in the spool
    assert stored(tmp_path, "gw-p") == []

    second = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw-p",
        signer,
        memory_records=5,
        batch_size=64,
    )
    await second.open()
    assert second.seq == 300
    assert second.held_in_memory == 0  # the replay holds places, not records
    second.append(bulky(300))
    await second.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-p")] == list(range(1, 302))
    assert "records 1..301" in export_and_verify(tmp_path, public, tmp_path / "e.jsonl")


async def test_a_record_damaged_in_the_spool_is_reported_as_a_hole_and_the_rest_shipped(
    tmp_path: Path,
) -> None:
    signer, public = keys(tmp_path)
    log, store = await log_in_an_outage(tmp_path, "gw-d", signer, 6, memory_records=2)
    # Record 4, held as its place in the spool (after the start checkpoint and records 1..3).
    place = log._queue[4]
    assert isinstance(place, Spooled) and place.seq == 4
    with log.spool._path(place.segment).open("r+b") as f:  # the disk damages it
        f.seek(place.offset + 10)
        f.write(b"\x00\x00")
    assert log.spool.read([place]) == [None]
    lost = REGISTRY.get_sample_value("crawlwarden_audit_records_total", {"outcome": "lost"}) or 0
    store.down = False
    assert await log.flushed(timeout=10)
    await log.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-d")] == [1, 2, 3, 5, 6]
    assert REGISTRY.get_sample_value("crawlwarden_audit_records_total", {"outcome": "lost"}) == (
        lost + 1
    )
    # An auditor sees the hole: verification fails at record 5, whose predecessor is missing.
    verified = export_and_verify(tmp_path, public, tmp_path / "e.jsonl", exit_code=1)
    assert "records seq 4..4 are missing" in verified


async def test_a_spool_segment_that_cannot_be_read_is_retried_not_skipped(tmp_path: Path) -> None:
    log, store = await log_in_an_outage(tmp_path, "gw-m", None, 3, memory_records=1)
    place = log._queue[1]
    assert isinstance(place, Spooled)
    segment = log.spool._path(place.segment)
    hidden = segment.rename(segment.with_suffix(".hidden"))  # the volume goes away
    with pytest.raises(SpoolReadError, match="cannot read record 2"):
        log.spool.read([place])
    store.down = False
    assert not await log.flushed(timeout=1.0)
    assert stored(tmp_path, "gw-m") == []  # nothing skipped while the segment is unreadable
    hidden.rename(segment)  # back
    assert await log.flushed(timeout=15)
    await log.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-m")] == [1, 2, 3]


async def test_two_gateways_on_one_data_dir_and_replica_id_cannot_share_its_spool(
    tmp_path: Path,
) -> None:
    first = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-1", None)
    await first.open()
    second = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-1", None)
    with pytest.raises(ReplicaInUse, match="is in use by another running gateway"):
        await second.open()
    await second.close()
    first.append(fetch(1))
    await first.close()
    third = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-1", None)
    await third.open()  # the lock went with the first one
    assert third.seq == 1
    await third.close()


async def test_a_sqlite_record_stored_with_another_hash_fails_the_write_and_a_retry_does_not(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "fetchlog.sqlite3")
    await store.open()
    try:
        await another_hash_fails_the_write_and_a_retry_does_not(store)
    finally:
        await store.close()
    assert [r["note"] for r in stored(tmp_path, "gw-x")] == ["ours"] * 5


async def test_a_batch_that_does_not_follow_the_stored_chain_is_not_stored(
    tmp_path: Path,
) -> None:
    """No stored row at its seqs, yet its first record follows another record than the one
    stored before it (a gateway restarted after another one wrote its chain: it continues
    its own head): stored, it would break the chain for good."""
    store = SQLiteStore(tmp_path / "fetchlog.sqlite3")
    await store.open()
    try:
        await a_batch_that_does_not_follow_the_stored_chain_is_refused(store)
    finally:
        await store.close()


async def test_a_log_whose_chain_another_writer_continued_keeps_its_records_and_stops(
    tmp_path: Path,
) -> None:
    """Two logs of one replica id on one store (two data dirs' spools, one fetch log file):
    the second continued the chain from the same head. The first one's records of those seqs
    were dropped by INSERT OR IGNORE; now it stops shipping, keeps them, and says so."""
    signer, public = keys(tmp_path)
    a = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool-a", "gw-t", signer)
    await a.open()
    for i in range(3):
        a.append(fetch(i))
    assert await a.flushed()
    b = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool-b", "gw-t", signer)
    await b.open()
    for i in range(3):
        b.append(fetch(10 + i))
    await b.close()
    theirs = stored(tmp_path, "gw-t")
    for i in range(3):
        a.append(fetch(20 + i))
    assert not await a.flushed(timeout=2.0)
    assert a.chain_forked is not None and a.chain_forked.records == (4, 6)
    assert not a.store_ok and not a.available
    a_seq = a.seq
    await a.close()
    assert stored(tmp_path, "gw-t") == theirs
    assert "records 1..6" in export_and_verify(tmp_path, public, tmp_path / "e.jsonl")
    # Restarted as it is, it would skip its records 4..6 as stored, retire them, and go on
    # from the other writer's head: it refuses to start instead, its spool untouched.
    again = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool-a", "gw-t", signer
    )
    with pytest.raises(ChainForked, match=r"records 4\.\.6 of replica 'gw-t'"):
        await again.open()
    await again.close()  # what the gateway's stop does next: nothing more
    assert stored(tmp_path, "gw-t") == theirs
    spool = Spool(tmp_path / "spool-a" / "gw-t")
    try:
        kept = [r.spooled.seq for r in spool.open().records]
    finally:
        spool.close()
    assert set(range(4, a_seq + 1)) <= set(kept)


async def test_a_damaged_spool_line_of_a_stored_record_is_no_other_writers(
    tmp_path: Path,
) -> None:
    """Its hash no longer the stored one's because the disk damaged it, not because another
    gateway wrote that seq: the gateway starts as before."""
    signer, _ = keys(tmp_path)
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-d", signer)
    await log.open()
    for i in range(3):
        log.append(fetch(i))
    await log.close()
    head = stored(tmp_path, "gw-d")[-1]["hash"]
    (segment,) = [p for p in (tmp_path / "spool" / "gw-d").iterdir() if head in p.read_text()]
    segment.write_text(segment.read_text().replace(head, "0" * 64))
    again = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-d", signer
    )
    await again.open()
    assert (again.seq, again.head) == (3, head)
    await again.close()


def test_the_record_text_is_its_hashed_canonical_json_with_the_links_after():
    """One serialisation for the hash and the spool line: the text reads back to the record,
    and the hash of what is read back is the hash the record got."""
    data = {
        "replica": "r1",
        "seq": 7,
        "url": 'https://site-a.test/caf\u00e9?q="x"\\',
        "signals": ["noai", "tdm-reservation"],
        "status": None,
        "prev_hash": GENESIS_HASH,
        "hash": None,
    }
    text = chain_record(data)
    assert json.loads(text) == data
    assert data["hash"] == record_hash(json.loads(text)) != GENESIS_HASH
    body_keys = sorted(k for k in data if k not in ("prev_hash", "hash"))
    assert list(json.loads(text)) == [*body_keys, "prev_hash", "hash"]
    data["prev_hash"] = "not hex"
    with pytest.raises(ValueError):
        chain_record(data)  # a link that is not hex is never written unescaped


async def test_sqlite_store_writes_batches_larger_than_one_insert(tmp_path: Path) -> None:
    """A batch spans several multi-row INSERTs (one per 256 rows); a record written again (a
    replay after a crash) is ignored, whichever INSERT of the batch carries it."""
    store = SQLiteStore(tmp_path / "fetchlog.sqlite3")
    await store.open()

    def record(seq: int, note: str) -> dict[str, object]:
        rec = fetch(seq).to_dict()
        prev_hash = f"{seq - 1:064x}" if seq > 1 else GENESIS_HASH
        rec.update(replica="r1", seq=seq, prev_hash=prev_hash, hash=f"{seq:064x}", note=note)
        return rec

    try:
        await store.write([record(seq, "first") for seq in range(1, 601)])
        await store.write([record(seq, "again") for seq in range(500, 801)])
        assert await store.last("r1") == (800, f"{800:064x}")
    finally:
        await store.close()
    rows = list(read_records(tmp_path / "fetchlog.sqlite3", RecordQuery(replica="r1")))
    assert [r["seq"] for r in rows] == list(range(1, 801))
    assert {r["note"] for r in rows[:600]} == {"first"}
    assert {r["note"] for r in rows[600:]} == {"again"}


async def test_a_damaged_last_record_does_not_hold_the_log_back(tmp_path: Path) -> None:
    """The newest record lost on disk: nothing later will be stored past it, yet the log is done
    with it (a hole verify reports), so flushing and closing do not wait for it forever."""
    log, store = await log_in_an_outage(tmp_path, "gw-l", None, 3, memory_records=1)
    place = log._queue[-1]
    assert isinstance(place, Spooled) and place.seq == 3
    with log.spool._path(place.segment).open("r+b") as f:
        f.seek(place.offset + 10)
        f.write(b"\x00\x00")
    store.down = False
    assert await log.flushed(timeout=5)
    await log.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-l")] == [1, 2]


async def test_a_changed_signing_key_is_recorded_and_both_keys_verify_the_log(
    tmp_path: Path,
) -> None:
    # An embedded gateway given audit.signing_key_file later (as a fleet needs) went on under the
    # new key silently, and no single key verified its log again.
    old, old_public = keys(tmp_path, "old")
    new, new_public = keys(tmp_path, "new")
    for signer, first in ((old, 0), (new, 3)):
        log = fetch_log(
            SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-k", signer
        )
        await log.open()
        for i in range(first, first + 3):
            log.append(fetch(i))
        await log.close()
    [event] = [r for r in stored(tmp_path, "gw-k") if r["kind"] == "signing_key"]
    assert "--public-key OLD --public-key NEW" in event["note"]
    out = tmp_path / "e.jsonl"
    assert cli("audit", "export", "--data-dir", tmp_path, "--output", out).returncode == 0
    for only in (old_public, new_public):
        result = cli("audit", "verify", out, "--public-key", only)
        assert result.returncode == 1 and "signed with another key" in result.stdout
    both = cli("audit", "verify", out, "--public-key", old_public, "--public-key", new_public)
    assert both.returncode == 0, both.stdout
    assert "replica gw-k: records 1..7" in both.stdout  # 6 fetches and the key change
    # The keys in the order they were used: a leaked old key cannot sign past the rotation.
    swapped = cli("audit", "verify", out, "--public-key", new_public, "--public-key", old_public)
    assert swapped.returncode == 1 and "in the order they were used" in swapped.stdout
    # Each key must sign something: a log (re-)signed with the old key alone does not pass as
    # one signed with both.
    items = [json.loads(line) for line in out.read_text().splitlines()]
    only_old = tmp_path / "only-old.jsonl"
    only_old.write_text(
        "".join(
            json.dumps(item) + "\n" for item in items if item.get("seq", 0) <= 3
        )  # the old key's part: records 1..3 and their checkpoints
    )
    result = cli(
        "audit", "verify", only_old, "--public-key", old_public, "--public-key", new_public
    )
    assert result.returncode == 1 and "signs nothing in the file" in result.stdout


async def test_a_key_gone_back_to_is_refused_and_the_log_stays_verifiable(
    tmp_path: Path,
) -> None:
    # Old key, new key, old key again (a policy's signing_key_file added, then taken out, an
    # embedded gateway back on the key in its data dir; a key rotation rolled back): the
    # gateway went on under the old key, and no `audit verify` of its log could pass again.
    old, old_public = keys(tmp_path, "old")
    new, new_public = keys(tmp_path, "new")

    def open_with(signer: Signer) -> FetchLog:
        return fetch_log(
            SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-r", signer
        )

    for signer, first in ((old, 0), (new, 3)):
        log = open_with(signer)
        await log.open()
        for i in range(first, first + 3):
            log.append(fetch(i))
        await log.close()
    back = open_with(old)
    with pytest.raises(KeyGoneBack, match=r"signed checkpoint #1 of replica gw-r's fetch log"):
        await back.open()
    assert back.closed
    again = open_with(new)  # the key that signed last: it goes on
    await again.open()
    again.append(fetch(6))
    await again.close()
    out = tmp_path / "e.jsonl"
    assert cli("audit", "export", "--data-dir", tmp_path, "--output", out).returncode == 0
    both = cli("audit", "verify", out, "--public-key", old_public, "--public-key", new_public)
    assert both.returncode == 0, both.stdout


async def test_an_old_key_signing_after_the_rotation_fails_verify(tmp_path: Path) -> None:
    # With several keys any key was taken for any note: a chain signed with a leaked old key
    # after the fleet had moved to the new one passed, as long as another chain had the new key.
    old, old_public = keys(tmp_path, "old")
    new, new_public = keys(tmp_path, "new")
    t0 = 1_790_000_000.0

    async def run(replica: str, signer: Signer, at: float) -> None:
        log = fetch_log(
            SQLiteStore(tmp_path / "fetchlog.sqlite3"),
            tmp_path / "spool",
            replica,
            signer,
            clock=lambda: at,
        )
        await log.open()
        for i in range(3):
            log.append(fetch(i, ts=at))
        await log.close()

    await run("gw-b", old, t0)
    await run("gw-b", new, t0 + 600)  # the rotation
    await run("gw-a", old, t0 + 7200)  # the old key, two hours later
    out = tmp_path / "e.jsonl"
    assert cli("audit", "export", "--data-dir", tmp_path, "--output", out).returncode == 0
    keys_given = ["--public-key", old_public, "--public-key", new_public]
    result = cli("audit", "verify", out, *keys_given)
    assert result.returncode == 1
    assert "replica gw-a" in result.stdout and "after a later key had taken over" in result.stdout
    # A rollout that took that long: said so, it passes.
    slow = cli("audit", "verify", out, *keys_given, "--rotation-grace", "7200")
    assert slow.returncode == 0, slow.stdout
