"""The PostgreSQL fetch log on a real server (a fresh database per test, tests/pg_fixtures.py)."""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
import uuid
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from proxy.audit.export import lines
from proxy.audit.export import page
from proxy.audit.export import plan
from proxy.audit.postgres_store import SCHEMA_VERSION
from proxy.audit.postgres_store import PostgresStore
from proxy.audit.postgres_store import aread_records
from proxy.audit.postgres_store import read_records
from proxy.audit.query import RecordQuery
from proxy.audit.spool import Spool
from proxy.audit.store import ReplicaInUse
from tests import pg_fixtures
from tests.test_audit_support import a_batch_that_does_not_follow_the_stored_chain_is_refused
from tests.test_audit_support import another_hash_fails_the_write_and_a_retry_does_not
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import replay_over_a_damaged_stored_line
from tests.test_audit_support import stored_row

# Fixtures of a fresh PostgreSQL database per test.
pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn


def export_and_verify(dsn: str, public: Path, out: Path, *extra: str) -> str:
    result = cli("audit", "export", "--audit-dsn", dsn, "--output", out, *extra)
    assert result.returncode == 0, result.stderr
    verified = cli("audit", "verify", out, "--public-key", public)
    assert verified.returncode == 0, verified.stdout
    return verified.stdout


async def test_replicas_starting_at_once_migrate_the_schema_once(pg_dsn: str) -> None:
    stores = [PostgresStore(pg_dsn) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))
    again = PostgresStore(pg_dsn)
    await again.open()  # idempotent on an up-to-date schema
    await again.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        version = await conn.fetchval(
            "SELECT version FROM crawlwarden_schema_version WHERE component = 'fetchlog'"
        )
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert version == SCHEMA_VERSION
    assert {"fetch_records_ts", "fetch_records_site_ts", "fetch_records_team_ts"} <= indexes


async def test_a_database_dropped_and_made_again_gets_its_schema_back_without_a_restart(
    pg_dsn: str, tmp_path: Path
) -> None:
    # Migrations ran at start only: the gateway retried "relation does not exist" forever
    # while its spool grew, until restarted.
    signer, _ = keys(tmp_path)
    log = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool", "gw-d", signer)
    await log.open()
    try:
        log.append(fetch(1))
        assert await log.flushed(timeout=10)
        conn = await asyncpg.connect(pg_dsn)
        try:  # what DROP DATABASE and CREATE DATABASE leave: nothing
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()
        log.append(fetch(2))
        assert await log.flushed(timeout=20)
    finally:
        await log.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM fetch_records WHERE replica = 'gw-d'")
    finally:
        await conn.close()
    assert stored >= 1  # what came after the drop (and the shutdown checkpoint's record)


async def test_three_replicas_write_at_once_and_each_chain_verifies(
    pg_dsn: str, tmp_path: Path
) -> None:
    signer, public = keys(tmp_path)
    logs = [
        fetch_log(
            PostgresStore(pg_dsn),
            tmp_path / "spool",
            f"gw-{n}",
            signer,
            checkpoint_every_records=50,
            batch_size=64,
        )
        for n in range(3)
    ]
    await asyncio.gather(*(log.open() for log in logs))

    async def write(log_index: int) -> None:
        for i in range(300):
            logs[log_index].append(fetch(i))
            if i % 7 == 0:
                await asyncio.sleep(0)  # let the other replicas and the ship loops run

    await asyncio.gather(*(write(n) for n in range(3)))
    await asyncio.gather(*(log.close() for log in logs))
    out = export_and_verify(pg_dsn, public, tmp_path / "all.jsonl")
    assert "verified 3 replica(s), 900 records" in out
    for n in range(3):
        assert f"replica gw-{n}: records 1..300 (300 in full)" in out

    # A restarted replica continues its own chain; the others are untouched.
    log = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool", "gw-1", signer)
    await log.open()
    assert log.seq == 300
    for i in range(5):
        log.append(fetch(i))
    await log.close()
    out = export_and_verify(pg_dsn, public, tmp_path / "again.jsonl")
    assert "replica gw-1: records 1..305" in out
    # Filtered exports from PostgreSQL verify as well (other teams' records redacted).
    out = export_and_verify(
        pg_dsn, public, tmp_path / "team.jsonl", "--team", "vision-data", "--site", "a.example"
    )
    assert "redacted to digests" in out


async def test_read_records_sync_and_async(pg_dsn: str, tmp_path: Path) -> None:
    signer, _ = keys(tmp_path)
    log = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool", "gw-r", signer)
    await log.open()
    for i in range(12):
        log.append(fetch(i))
    await log.close()
    query = RecordQuery(site="a.example")
    seen = [r["seq"] async for r in aread_records(pg_dsn, query)]
    assert seen == [1, 4, 7, 10]
    synced = await asyncio.to_thread(lambda: [r["seq"] for r in read_records(pg_dsn, query)])
    assert synced == seen


class Relay:
    """A TCP relay in front of PostgreSQL that a test can cut and restore (a real outage)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.server: asyncio.Server | None = None
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.stalled = False
        self.held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for a, b in list(self.pairs):
            a.transport.abort()
            b.transport.abort()
        for w in self.held:
            w.transport.abort()
        self.held = []
        await self.server.wait_closed()
        self.server = None

    def stall(self) -> None:
        """PostgreSQL's host gone without a word (a partition, a dead node): connections stay
        open and nothing more passes either way, new ones are accepted and never answered."""
        self.stalled = True
        for a, b in self.pairs:
            a.transport.pause_reading()
            b.transport.pause_reading()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stalled:
            self.held.append(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.pairs.discard(pair)


async def test_store_down_spool_grows_fails_closed_and_recovery_ships_everything(
    pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer, public = keys(tmp_path)
    url = urllib.parse.urlsplit(pg_dsn)
    relay = Relay((url.hostname or "127.0.0.1", url.port or 5432))
    await relay.start()
    relayed = urllib.parse.urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{relay.port}"))
    log = fetch_log(
        PostgresStore(relayed), tmp_path / "spool", "gw-down", signer, spool_max_bytes=40_000
    )
    await log.open()
    for i in range(20):
        log.append(fetch(i))
    assert await log.flushed()
    errors_before = (
        REGISTRY.get_sample_value("crawlwarden_store_errors_total", {"store": "audit"}) or 0.0
    )

    await relay.stop()  # PostgreSQL unreachable from here on
    while log.available:
        log.append(fetch(log.seq))
        await asyncio.sleep(0.001)
    written = log.seq
    await asyncio.sleep(0.5)
    assert not log.store_ok
    assert log.spool.size >= 40_000  # the spool took every record
    assert REGISTRY.get_sample_value("crawlwarden_audit_queue_depth") >= written - 20
    assert (
        REGISTRY.get_sample_value("crawlwarden_store_errors_total", {"store": "audit"}) or 0.0
    ) > errors_before

    await relay.start()  # PostgreSQL is back
    assert await log.flushed(timeout=60)
    assert log.store_ok and log.available
    # The outage is the fetch log's to report (fetchlog_store_error, once a write fails), not
    # asyncpg's: its pool's floor of one connection made it log a warning with a traceback
    # every few seconds for as long as PostgreSQL was away.
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("asyncpg")]
    assert REGISTRY.get_sample_value("crawlwarden_audit_queue_depth") == 0
    await log.close()
    await relay.stop()
    out = export_and_verify(pg_dsn, public, tmp_path / "e.jsonl")
    assert f"replica gw-down: records 1..{written} ({written} in full)" in out


@pytest.mark.timeout(60)  # the close used to hang for good
async def test_close_is_bounded_when_postgresql_stops_answering(
    pg_dsn: str, tmp_path: Path
) -> None:
    # A stop (SIGTERM) while PostgreSQL's host is gone without a reset: after its flush wait the
    # fetch log must let go of connections that never answer, not wait out their command timeout
    # (60 s) and a graceful pool close that never ends, or the kubelet's SIGKILL comes first
    # (docs/kubernetes.md: "waits the whole 30 s, then exits and logs
    # fetchlog_unshipped_at_exit").
    signer, _ = keys(tmp_path)
    url = urllib.parse.urlsplit(pg_dsn)
    relay = Relay((url.hostname or "127.0.0.1", url.port or 5432))
    await relay.start()
    relayed = urllib.parse.urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{relay.port}"))
    log = fetch_log(PostgresStore(relayed), tmp_path / "spool", "gw-stalled", signer)
    await log.open()
    for i in range(3):
        log.append(fetch(i))
    assert await log.flushed()
    relay.stall()
    for i in range(3, 6):
        log.append(fetch(i))
    await asyncio.sleep(0.5)  # a write is under way on a connection that will never answer
    flush = 2.0
    began = asyncio.get_running_loop().time()
    with capture_logs() as logs:
        await log.close(timeout=flush)
    took = asyncio.get_running_loop().time() - began
    await relay.stop()
    assert took < flush + 10, f"close took {took:.1f} s after a {flush} s flush wait"
    [unshipped] = [e for e in logs if e["event"] == "fetchlog_unshipped_at_exit"]
    assert unshipped["records"] >= 3 and unshipped["kept_in"] == "spool"


async def test_a_second_process_with_the_same_replica_id_is_refused(
    pg_dsn: str, tmp_path: Path
) -> None:
    signer, public = keys(tmp_path)
    store = PostgresStore(pg_dsn)
    first = fetch_log(store, tmp_path / "spool-a", "gw-same", signer)
    await first.open()
    first.append(fetch(1))
    # Should its machine vanish, PostgreSQL notices within a minute and frees the id.
    assert store._claim is not None
    assert await store._claim.fetchval("SHOW tcp_keepalives_idle") == "30"
    # Another host (its own data dir) started with the same --replica-id by mistake: were it
    # let in, both would continue the chain from seq 1 and the store would keep one of each
    # pair of records with the same seq.
    second = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool-b", "gw-same", signer)
    with pytest.raises(ReplicaInUse, match="replica id 'gw-same' is in use"):
        await second.open()
    await second.close()
    other = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool-c", "gw-other", signer)
    await other.open()  # another id is not held up
    other.append(fetch(2))
    await other.close()
    first.append(fetch(3))
    await first.close()

    # Its lock went with its session: the id can be taken again, and the chain continues.
    again = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool-b", "gw-same", signer)
    await again.open()
    assert again.seq == 2
    await again.close()
    assert "records 1..2" in export_and_verify(pg_dsn, public, tmp_path / "e.jsonl")


async def test_a_replica_id_lock_lost_with_its_session_is_taken_again_before_the_next_write(
    pg_dsn: str, tmp_path: Path
) -> None:
    signer, _ = keys(tmp_path)
    store = PostgresStore(pg_dsn)
    log = fetch_log(store, tmp_path / "spool-a", "gw-lost", signer, ship_interval=0.05)
    await log.open()
    log.append(fetch(1))
    assert await log.flushed()

    async def end_claim_session() -> None:
        assert store._claim is not None
        pid = store._claim.get_server_pid()
        admin = await asyncpg.connect(pg_dsn)
        try:  # what a PostgreSQL restart does to the session
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        for _ in range(100):
            if store._claim.is_closed():
                return
            await asyncio.sleep(0.02)

    await end_claim_session()
    log.append(fetch(2))
    assert await log.flushed()  # the lock was taken again, then the record written
    assert store._claim is not None and not store._claim.is_closed()

    # Lost again, and meanwhile a second gateway started with the same id: this one stops
    # storing (its records stay in its spool) rather than fork the chain.
    await end_claim_session()
    twin = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool-b", "gw-lost", signer)
    await twin.open()
    log.append(fetch(3))
    assert not await log.flushed(timeout=4.0)
    assert not log.store_ok
    await twin.close()
    # The twin is gone and the lock could be ours again, but the twin signed checkpoints of
    # this chain (its start and its shutdown) under the numbers this one's would take: they
    # were dropped in silence before. Now this one ships nothing more and says so.
    assert not await log.flushed(timeout=4.0)
    assert log.chain_forked is not None and log.chain_forked.records is None
    assert log.chain_forked.checkpoints is not None
    assert not log.store_ok and not log.available
    await log.close()


async def _stored_chain(dsn: str, replica: str) -> list[tuple[int, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT seq, hash, body FROM fetch_records WHERE replica = $1 ORDER BY seq", replica
        )
    finally:
        await conn.close()
    return [(int(r["seq"]), str(r["hash"]), str(r["body"])) for r in rows]


async def test_a_gateway_that_lost_its_claim_to_a_twin_keeps_its_records_and_stops(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Gateway A loses PostgreSQL (and its claim) in an outage; B starts under the same replica
    id meanwhile, writes seq 6..10 and stops. A's own 6..10 (fetches its clients got) were
    dropped by ON CONFLICT DO NOTHING and its later records broke the chain. Now A finds the
    chain moved when it takes the claim back: it ships nothing more, keeps its records in its
    spool, turns unready and logs which rows are the other writer's."""
    signer, public = keys(tmp_path)
    url = urllib.parse.urlsplit(pg_dsn)
    relay = Relay((url.hostname or "127.0.0.1", url.port or 5432))
    await relay.start()
    relayed = urllib.parse.urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{relay.port}"))
    a = fetch_log(PostgresStore(relayed), tmp_path / "spool-a", "gw-twin", signer)
    await a.open()
    for i in range(5):
        a.append(fetch(i))
    assert await a.flushed()

    await relay.stop()  # A's sessions, its claim's among them, are gone
    for i in range(5, 10):
        a.append(fetch(i))
    b = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool-b", "gw-twin", signer)
    await b.open()
    assert b.seq == 5
    for i in range(100, 105):
        b.append(fetch(i))
    await b.close()
    b_chain = await _stored_chain(pg_dsn, "gw-twin")
    assert [seq for seq, _, _ in b_chain] == list(range(1, 11))

    await relay.start()  # A reaches PostgreSQL again and takes its claim back
    with capture_logs() as logs:
        for i in range(10, 15):
            a.append(fetch(i))
        assert not await a.flushed(timeout=4.0)
    assert a.chain_forked is not None and a.chain_forked.records == (6, 10)
    assert not a.store_ok and not a.available  # /readyz: 503
    assert REGISTRY.get_sample_value("crawlwarden_audit_chain_forked") == 1
    forked = [e for e in logs if e["event"] == "fetchlog_chain_forked"]
    assert forked and forked[0]["log_level"] == "error"
    assert forked[0]["other_records"] == (6, 10) and forked[0]["unshipped_from_seq"] == 6
    assert "records 6..10 and checkpoints #2..#3 of replica 'gw-twin'" in forked[0]["error"]
    a_seq = a.seq
    await a.close()
    await relay.stop()

    # Nothing of A's reached the store: B's chain stands as B left it, and verifies.
    assert await _stored_chain(pg_dsn, "gw-twin") == b_chain
    assert "records 1..10" in export_and_verify(pg_dsn, public, tmp_path / "e.jsonl")
    # A's records from seq 6 on are in its spool, for an operator to keep.
    spool = Spool(tmp_path / "spool-a" / "gw-twin")
    try:
        kept = [r.spooled.seq for r in spool.open().records]
    finally:
        spool.close()
    assert set(range(6, a_seq + 1)) <= set(kept)


async def test_a_claim_taken_back_after_a_commit_whose_answer_was_lost_goes_on(
    pg_dsn: str,
) -> None:
    """The head moved only by this gateway's own batch (committed, the acknowledgement lost
    with the connection): taking the claim back finds its own rows, and the retry goes on."""
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.claim("gw-ack")
    try:
        ours = [stored_row("gw-ack", seq, "ours") for seq in range(1, 7)]
        await store.write(ours[:3])
        committed = PostgresStore(pg_dsn)  # what the lost commit left in the table
        await committed.open()
        await committed.write(ours[3:5])
        await committed.close()
        assert store._claim is not None
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.fetchval("SELECT pg_terminate_backend($1)", store._claim.get_server_pid())
        finally:
            await admin.close()
        for _ in range(100):
            if store._claim.is_closed():
                break
            await asyncio.sleep(0.02)
        await store.write(ours[3:])  # the batch again, grown by one record since
        assert await store.last("gw-ack") == (6, ours[-1]["hash"])
    finally:
        await store.close()


async def test_a_record_stored_with_another_hash_fails_the_write_and_a_retry_does_not(
    pg_dsn: str,
) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await another_hash_fails_the_write_and_a_retry_does_not(store)
    finally:
        await store.close()


async def test_a_batch_that_does_not_follow_the_stored_chain_is_not_stored(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await a_batch_that_does_not_follow_the_stored_chain_is_refused(store)
    finally:
        await store.close()


async def test_pages_cover_every_replica_whatever_the_databases_collation(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    # With an ICU collation (cloud and container images), the store listed "gw-a" before
    # "Gw-b" while the cursor compared names by code point: pages skipped "Gw-b" entirely.
    name = f"crawlwarden_icu_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    finally:
        await admin.close()
    dsn = pg_fixtures.dsn_for(name)
    try:
        signer, _ = keys(tmp_path)
        for replica in ("gw-a", "Gw-b"):
            log = fetch_log(PostgresStore(dsn), tmp_path / "spool", replica, signer)
            await log.open()
            for i in range(3):
                log.append(fetch(i))
            await log.close()
        reader = PostgresStore(dsn, migrate_schema=False)
        await reader.open()
        try:
            spans = await plan(reader, RecordQuery())
            seen: list[tuple[str, int]] = []
            cursor = None
            for _ in range(20):
                pieces, cursor = page(spans, cursor, 2)
                seen += [
                    (item["replica"], item["seq"])
                    async for item in lines(reader, RecordQuery(), pieces)
                    if item["type"] == "record"
                ]
                if cursor is None:
                    break
        finally:
            await reader.close()
        assert sorted(seen) == sorted((r, s) for r in ("gw-a", "Gw-b") for s in (1, 2, 3))
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_a_stored_fetch_whose_spool_line_is_damaged_is_not_recorded_again(
    pg_dsn: str, tmp_path: Path
) -> None:
    # The replay looks the request up in the store (its id at its start time) before recording
    # it as interrupted: ts is a timestamptz here, and must match the record's.
    rec_id = await replay_over_a_damaged_stored_line(
        lambda: PostgresStore(pg_dsn), tmp_path / "spool", "gw-s"
    )
    records = [r async for r in aread_records(pg_dsn, RecordQuery(replica="gw-s"))]
    assert [(r["seq"], r["id"], r["reason"]) for r in records] == [(1, rec_id, "ok")]


async def test_a_record_postgresql_cannot_hold_is_set_aside_and_the_rest_stored(
    pg_dsn: str, tmp_path: Path
) -> None:
    # PostgreSQL text cannot hold a NUL (SQLite's can): the write of that record is refused
    # for good. It was retried forever with every later record behind it.
    log = fetch_log(PostgresStore(pg_dsn), tmp_path / "spool", "gw-n", None)
    await log.open()
    try:
        log.append(fetch(1))
        log.append(fetch(2, url="https://a.example/a\x00b"))
        log.append(fetch(3))
        assert await log.flushed(timeout=30), f"stuck at shipped_seq={log.shipped_seq}"
    finally:
        await log.close()
    records = [r async for r in aread_records(pg_dsn, RecordQuery(replica="gw-n"))]
    assert [r["seq"] for r in records] == [1, 3]
    assert log.set_aside == 1


@pytest.mark.parametrize("command", ["export", "report"])
def test_a_database_that_does_not_exist_is_named_not_a_traceback(
    pg_admin_dsn: str, command: str
) -> None:
    dsn = pg_fixtures.dsn_for(f"crawlwarden_absent_{uuid.uuid4().hex[:8]}")
    args = ("audit", "export") if command == "export" else ("report",)
    result = cli(*args, "--audit-dsn", dsn)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
