"""The shared fetch-log store: PostgreSQL through asyncpg (`--audit-dsn postgresql://...`).

Every replica writes its own chain (primary key replica, seq) into the same tables, so replicas
never contend for a row. The schema migrates on start under a transaction-level advisory lock, so
replicas starting at once run each migration exactly once. Record bodies are stored as the exact
JSON text that was hashed (not jsonb, which would reorder keys and refuse U+0000).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncGenerator
from collections.abc import AsyncIterator
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from proxy.audit.checkpoint import note_hash
from proxy.audit.query import RecordQuery
from proxy.audit.query import to_datetime
from proxy.audit.record import record_json
from proxy.audit.schema import Schema
from proxy.audit.schema import SchemaTooNew
from proxy.audit.store import ChainForked
from proxy.audit.store import PurgePoint
from proxy.audit.store import ReplicaInUse
from proxy.audit.store import replicas_sql

log = structlog.get_logger("crawlwarden.audit.postgres")

# pg_advisory_xact_lock key for schema migrations ("cwfetchl" as a 64-bit integer).
MIGRATION_LOCK = 0x637766657463686C
COMPONENT = "fetchlog"

# Each entry migrates the schema from version i to i+1; never edit one that has shipped.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE fetch_records (
            replica text NOT NULL,
            seq bigint NOT NULL,
            id text NOT NULL,
            ts timestamptz NOT NULL,
            kind text NOT NULL,
            site text,
            team text,
            project text,
            decision text NOT NULL,
            reason text,
            url text NOT NULL,
            content_sha256 text,
            hash text NOT NULL,
            body text NOT NULL,
            PRIMARY KEY (replica, seq)
        )""",
        "CREATE INDEX fetch_records_ts ON fetch_records (ts)",
        "CREATE INDEX fetch_records_replica_ts ON fetch_records (replica, ts)",
        "CREATE INDEX fetch_records_site_ts ON fetch_records (site, ts)",
        "CREATE INDEX fetch_records_team_ts ON fetch_records (team, ts)",
        "CREATE INDEX fetch_records_project_ts ON fetch_records (project, ts)",
        """CREATE TABLE fetch_checkpoints (
            replica text NOT NULL,
            number bigint NOT NULL,
            seq bigint NOT NULL,
            time timestamptz NOT NULL,
            kind text NOT NULL,
            note text NOT NULL,
            PRIMARY KEY (replica, number)
        )""",
        "CREATE INDEX fetch_checkpoints_seq ON fetch_checkpoints (replica, seq)",
        """CREATE TABLE fetch_purges (
            replica text NOT NULL,
            seq bigint NOT NULL,
            number bigint NOT NULL,
            time timestamptz NOT NULL,
            note text NOT NULL,
            PRIMARY KEY (replica, seq)
        )""",
    ],
    [
        """CREATE TABLE fetch_witnesses (
            replica text NOT NULL,
            seq bigint NOT NULL,
            time timestamptz NOT NULL,
            note text NOT NULL,
            PRIMARY KEY (replica, seq)
        )""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT = """
INSERT INTO fetch_records
    (replica, seq, id, ts, kind, site, team, project, decision, reason, url, content_sha256,
     hash, body)
SELECT * FROM unnest(
    $1::text[], $2::bigint[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[])
ON CONFLICT (replica, seq) DO NOTHING
"""
_INSERT_CHECKPOINT = """
INSERT INTO fetch_checkpoints (replica, number, seq, time, kind, note)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[], $5::text[],
                     $6::text[])
ON CONFLICT (replica, number) DO NOTHING
"""
_INSERT_PURGE = """
INSERT INTO fetch_purges (replica, seq, number, time, note) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (replica, seq) DO NOTHING
"""
_INSERT_WITNESS = """
INSERT INTO fetch_witnesses (replica, seq, time, note) VALUES ($1, $2, $3, $4)
ON CONFLICT (replica, seq) DO NOTHING
"""
# Rows of a batch stored already with another hash (note): another writer's, not a retry's.
_OTHER_RECORDS = """
SELECT s.replica, s.seq FROM fetch_records s
JOIN unnest($1::text[], $2::bigint[], $3::text[]) AS w(replica, seq, hash)
    ON s.replica = w.replica AND s.seq = w.seq
WHERE s.hash <> w.hash ORDER BY s.replica, s.seq
"""
_OTHER_CHECKPOINTS = """
SELECT s.replica, s.number FROM fetch_checkpoints s
JOIN unnest($1::text[], $2::bigint[], $3::text[]) AS w(replica, number, note)
    ON s.replica = w.replica AND s.number = w.number
WHERE s.note <> w.note ORDER BY s.replica, s.number
"""
_BATCH = 1000
_MIN_SEQ = "SELECT min(seq) FROM fetch_records WHERE replica = $1"
_MAX_SEQ = "SELECT max(seq) FROM fetch_records WHERE replica = $1"


async def read_schema(db: asyncpg.Connection | asyncpg.Pool) -> Schema:
    """The schema the database is at, as it is (a reader does not migrate it; no version
    table: no gateway has opened it yet); SchemaTooNew when a newer crawlwarden migrated it."""
    if await db.fetchval("SELECT to_regclass('crawlwarden_schema_version')") is None:
        return Schema.at(0, MIGRATIONS)
    version = await db.fetchval(
        "SELECT version FROM crawlwarden_schema_version WHERE component = $1", COMPONENT
    )
    return Schema.at(int(version or 0), MIGRATIONS)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION, one replica at a time (advisory lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS crawlwarden_schema_version "
            "(component text PRIMARY KEY, version integer NOT NULL, "
            "migrated_at timestamptz NOT NULL DEFAULT now())"
        )
        version = await conn.fetchval(
            "SELECT version FROM crawlwarden_schema_version WHERE component = $1", COMPONENT
        )
        version = int(version or 0)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(version, SCHEMA_VERSION)
        for i in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[i]:
                await conn.execute(statement)
            log.info("fetchlog_schema_migrated", version=i + 1)
        await conn.execute(
            "INSERT INTO crawlwarden_schema_version (component, version) VALUES ($1, $2) "
            "ON CONFLICT (component) DO UPDATE SET version = $2, migrated_at = now()",
            COMPONENT,
            SCHEMA_VERSION,
        )
    return SCHEMA_VERSION


def _columns(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(14)]
    for r in records:
        values = (
            r["replica"],
            r["seq"],
            r["id"],
            to_datetime(r["ts"]),
            r.get("kind", "fetch"),
            r.get("site"),
            r.get("team"),
            r.get("project"),
            r["decision"],
            r.get("reason"),
            r["url"],
            r.get("content_sha256"),
            r["hash"],
            record_json(r),  # the spool line's text: not encoded a second time
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


def _checkpoint(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"number": int(row["number"]), "seq": int(row["seq"]), "note": str(row["note"])}


def _moved(before: tuple[int, str] | None, now: tuple[int, str] | None) -> bool:
    """Whether a chain's head went past where it was (a purge may take it back, or away)."""
    if now is None:
        return False
    return before is None or now[0] > before[0] or (now[0] == before[0] and now[1] != before[1])


def _rows(status: str) -> int:
    """Rows an INSERT wrote, from its command tag ("INSERT 0 n")."""
    return int(status.split()[-1])


def _span(rows: Sequence[Any], replica: str, key: str) -> tuple[int, int]:
    """First and last `key` of the rows of the first replica among them."""
    keys = [int(r[key]) for r in rows if r[replica] == rows[0][replica]]
    return keys[0], keys[-1]


def _replica_key(replica: str) -> int:
    """The advisory lock key of a replica id (64 bits of a hash; ids never collide in practice)."""
    return int.from_bytes(
        hashlib.sha256(f"crawlwarden-replica:{replica}".encode()).digest()[:8], "big", signed=True
    )


_CLAIM_TRIES, _CLAIM_PAUSE = 6, 0.5  # seconds
# How long a stop lets the connections close gracefully before cutting them.
_CLOSE_SECONDS = 3.0

_CLAIM_KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


class PostgresStore:
    """FetchStore and ChainReader over one PostgreSQL database."""

    def __init__(self, dsn: str, *, migrate_schema: bool = True, pool_size: int = 4):
        self.dsn = dsn
        self.migrate_schema = migrate_schema
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._claim: asyncpg.Connection | None = None
        self._claimed: str | None = None
        # The claimed chain's newest record (seq, hash) and checkpoint (number, note) as this
        # process saw or wrote them: a claim taken again must find them where they were.
        self._head: tuple[int, str] | None = None
        self._checkpoint_head: tuple[int, str] | None = None
        self.schema: Schema | None = None  # known once open

    def _db(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    def _has(self, table: str) -> bool:
        """Whether the database has the table (without migrate_schema, an older gateway's
        database may not)."""
        assert self.schema is not None, "store is not open"
        return self.schema.has(table)

    async def open(self) -> None:
        # No floor of connections kept open: asyncpg restores one in the background, and
        # during an outage it logged a warning with a traceback every few seconds, beside the
        # fetch log's own fetchlog_store_error. The connections it has stay open while used
        # (asyncpg closes them after 5 idle minutes); the first write after that connects.
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=self.pool_size, command_timeout=60
        )
        if not self.migrate_schema:
            try:
                self.schema = await read_schema(self._pool)
            except BaseException:
                await self._pool.close()
                self._pool = None
                raise
            return
        try:
            async with self._pool.acquire() as conn:
                self.schema = Schema.at(await migrate(conn), MIGRATIONS)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def claim(self, replica: str) -> None:
        """A session advisory lock on the replica id, held on a connection of its own for as
        long as the process runs (PostgreSQL drops it when the process or its connection dies).

        A connection lost later (a PostgreSQL restart) loses the lock; the next write takes it
        again first, and fails (the records stay in the spool) if another gateway took it."""
        self._claimed = replica
        key = _replica_key(replica)
        # Keepalives on this session: should the holder's node vanish (no FIN, no RST),
        # PostgreSQL ends the session and frees the id within about a minute, not the OS's
        # default two hours, so that the replica's replacement can start.
        conn = await asyncpg.connect(self.dsn, server_settings=_CLAIM_KEEPALIVES, timeout=10)
        try:
            # A running replica holds a gone one's chain for a moment (retention, a witness
            # note): should that one be coming back just then, it waits the moment out.
            for attempt in range(1, _CLAIM_TRIES + 1):
                held = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
                if held or attempt == _CLAIM_TRIES:
                    break
                await asyncio.sleep(_CLAIM_PAUSE)
        except BaseException:
            conn.terminate()
            raise
        if not held:
            await conn.close()
            raise ReplicaInUse(
                f"replica id {replica!r} is in use by another running gateway on this fetch log;"
                " give each replica its own --replica-id (if that gateway's machine is gone,"
                " PostgreSQL frees the id within about a minute)"
            )
        try:  # where the chain stands as it is taken (see _claim_again)
            head = await self.last(replica)
            last = await self.last_checkpoint(replica)
        except BaseException:
            conn.terminate()  # taken again, and looked at again, by the next write
            raise
        self._head = head
        self._checkpoint_head = None if last is None else (last["number"], last["note"])
        self._claim = conn

    async def _claim_again(
        self, records: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]]
    ) -> None:
        """Take back a claim lost with its connection, and make sure nobody wrote the chain
        meanwhile: another gateway may have started under this replica id while this one could
        not reach PostgreSQL (docs/kubernetes.md), and continued the chain from the same head.
        The head may have moved only by this batch (its commit went through, its
        acknowledgement was lost with the connection)."""
        replica = self._claimed
        assert replica is not None
        head, checkpoint_head = self._head, self._checkpoint_head
        self._claim = None
        await self.claim(replica)  # ReplicaInUse while the other one runs
        try:
            await self._check_head(replica, head, checkpoint_head, records, checkpoints)
        except ChainForked:
            raise
        except BaseException:
            # Not looked at: the next write takes the claim, and looks, again.
            self._head, self._checkpoint_head = head, checkpoint_head
            if self._claim is not None:
                self._claim.terminate()
                self._claim = None
            raise

    async def _check_head(
        self,
        replica: str,
        head: tuple[int, str] | None,
        checkpoint_head: tuple[int, str] | None,
        records: Sequence[dict[str, Any]],
        checkpoints: Sequence[dict[str, Any]],
    ) -> None:
        """ChainForked if the chain's head (`self._head`, `self._checkpoint_head`, as claim()
        found them) is past `head` (`checkpoint_head`) and not a row of this batch."""
        ours = {r["seq"]: r["hash"] for r in records if r["replica"] == replica}
        notes = {
            c["number"]: c["note"]
            for c in checkpoints
            if c["type"] == "checkpoint" and c["replica"] == replica
        }
        other_records = other_checkpoints = None
        now = self._head
        if _moved(head, now) and now is not None and ours.get(now[0]) != now[1]:
            after = 0 if head is None else head[0]
            rows = await self._db().fetch(
                "SELECT seq, hash FROM fetch_records WHERE replica = $1 AND seq > $2 "
                "ORDER BY seq LIMIT $3",
                replica,
                after,
                len(ours) + 1,
            )
            first = next((int(r["seq"]) for r in rows if ours.get(r["seq"]) != r["hash"]), now[0])
            other_records = (first, now[0])
        ck = self._checkpoint_head
        if _moved(checkpoint_head, ck) and ck is not None and notes.get(ck[0]) != ck[1]:
            other_checkpoints = (1 if checkpoint_head is None else checkpoint_head[0] + 1, ck[0])
        if other_records is not None or other_checkpoints is not None:
            raise ChainForked(replica, records=other_records, checkpoints=other_checkpoints)

    def _written(
        self, records: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]]
    ) -> None:
        """Move the claimed chain's known head past a batch that is stored."""
        for r in records:
            if r["replica"] == self._claimed and (self._head is None or r["seq"] > self._head[0]):
                self._head = (r["seq"], r["hash"])
        for c in checkpoints:
            if (
                c["type"] == "checkpoint"
                and c["replica"] == self._claimed
                and (self._checkpoint_head is None or c["number"] > self._checkpoint_head[0])
            ):
                self._checkpoint_head = (c["number"], c["note"])

    async def _let_go(self) -> None:
        """Give the replica id up: this process stops writing the chain (ChainForked), and the
        gateway that wrote it meanwhile may start again."""
        self._claimed = None
        if self._claim is not None:
            with contextlib.suppress(Exception):
                await self._claim.close()
            self._claim = None

    @contextlib.asynccontextmanager
    async def hold(self, replica: str) -> AsyncIterator[bool]:
        key = _replica_key(replica)
        async with self._db().acquire() as conn:
            held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    await conn.fetchval("SELECT pg_advisory_unlock($1)", key)

    async def close(self, timeout: float = _CLOSE_SECONDS) -> None:
        """Close the connections, giving them `timeout` in all to close gracefully, then cut
        them: one that never answers (PostgreSQL's host gone without a reset) must not hold the
        stop past the pod's grace period."""
        self._claimed = None
        claim, self._claim = self._claim, None
        pool, self._pool = self._pool, None

        async def close_claim(conn: asyncpg.Connection) -> None:
            try:
                await conn.close(timeout=timeout)
            except Exception:
                conn.terminate()

        async def close_pool(pool: asyncpg.Pool) -> None:
            try:
                # A close cancelled by the timeout terminates the pool (asyncpg): all cut.
                await asyncio.wait_for(pool.close(), timeout)
            except TimeoutError:
                pool.terminate()

        await asyncio.gather(
            *([close_claim(claim)] if claim is not None else []),
            *([close_pool(pool)] if pool is not None else []),
        )

    # -- writing (FetchStore) ----------------------------------------------------------------

    async def last(self, replica: str) -> tuple[int, str] | None:
        row = await self._db().fetchrow(
            "SELECT seq, hash FROM fetch_records WHERE replica = $1 ORDER BY seq DESC LIMIT 1",
            replica,
        )
        return None if row is None else (int(row["seq"]), str(row["hash"]))

    async def holds(self, replica: str, record_id: str, ts: str) -> bool:
        row = await self._db().fetchrow(
            "SELECT 1 FROM fetch_records WHERE replica = $1 AND ts = $2 AND id = $3 LIMIT 1",
            replica,
            to_datetime(ts),
            record_id,
        )
        return row is not None

    async def last_checkpoint(self, replica: str) -> dict[str, Any] | None:
        if not self._has("fetch_checkpoints"):
            return None
        row = await self._db().fetchrow(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = $1 "
            "ORDER BY number DESC LIMIT 1",
            replica,
        )
        return _checkpoint(row)

    async def last_purge(self, replica: str) -> dict[str, Any] | None:
        if not self._has("fetch_purges"):
            return None
        row = await self._db().fetchrow(
            "SELECT number, seq, note FROM fetch_purges WHERE replica = $1 "
            "ORDER BY seq DESC LIMIT 1",
            replica,
        )
        return _checkpoint(row)

    async def purge_note(self, replica: str, seq: int) -> dict[str, Any] | None:
        if not self._has("fetch_purges"):
            return None
        row = await self._db().fetchrow(
            "SELECT number, seq, note FROM fetch_purges WHERE replica = $1 AND seq = $2",
            replica,
            seq,
        )
        return _checkpoint(row)

    async def write(
        self, records: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]] = ()
    ) -> None:
        try:
            if self._claimed is not None and (self._claim is None or self._claim.is_closed()):
                await self._claim_again(records, checkpoints)  # lost with its connection
            await self._write(records, checkpoints)
        except ChainForked:
            await self._let_go()
            raise
        self._written(records, checkpoints)

    async def _write(
        self, records: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]]
    ) -> None:
        record_columns = _columns(records) if records else None
        checkpoint_columns: list[list[Any]] = [[], [], [], [], [], []]
        notes = [c for c in checkpoints if c["type"] in ("purge", "witness")]
        for c in checkpoints:
            if c["type"] != "checkpoint":
                continue
            for column, value in zip(
                checkpoint_columns,
                (c["replica"], c["number"], c["seq"], to_datetime(c["time"]), c["kind"], c["note"]),
                strict=True,
            ):
                column.append(value)
        first = (
            None
            if not records
            else (records[0]["replica"], records[0]["seq"], records[0]["prev_hash"])
        )
        try:
            await self._insert(record_columns, checkpoint_columns, notes, first)
        except asyncpg.UndefinedTableError:
            # The database was dropped and created again under the running fleet: its schema
            # is made again (the batch is retried from the spool), no restart needed.
            log.error("fetchlog_schema_missing", action="migrating again")
            if self.migrate_schema:
                async with self._db().acquire() as conn:
                    await migrate(conn)
            raise

    async def _insert(
        self,
        record_columns: list[list[Any]] | None,
        checkpoint_columns: list[list[Any]],
        notes: list[dict[str, Any]],
        first: tuple[str, int, str] | None = None,
    ) -> None:
        async with self._db().acquire() as conn, conn.transaction():
            # A row already there is skipped: a retry's (the same hash: nothing to do) or
            # another writer's (another hash: ChainForked, and the transaction rolls back).
            if record_columns is not None:
                status = await conn.execute(_INSERT, *record_columns)
                if _rows(status) < len(record_columns[0]):
                    other = await conn.fetch(
                        _OTHER_RECORDS, record_columns[0], record_columns[1], record_columns[12]
                    )
                    if other:
                        raise ChainForked(
                            other[0]["replica"], records=_span(other, "replica", "seq")
                        )
            if first is not None:
                replica, seq, prev_hash = first
                before = await conn.fetchval(
                    "SELECT hash FROM fetch_records WHERE replica = $1 AND seq = $2",
                    replica,
                    seq - 1,
                )
                # (none: the chain starts here, was purged up to here, or has a hole that
                # verify reports)
                if before is not None and before != prev_hash:
                    raise ChainForked(replica, unlinked=seq)
            if checkpoint_columns[0]:
                status = await conn.execute(_INSERT_CHECKPOINT, *checkpoint_columns)
                if _rows(status) < len(checkpoint_columns[0]):
                    other = await conn.fetch(
                        _OTHER_CHECKPOINTS,
                        checkpoint_columns[0],
                        checkpoint_columns[1],
                        checkpoint_columns[5],
                    )
                    if other:
                        raise ChainForked(
                            other[0]["replica"], checkpoints=_span(other, "replica", "number")
                        )
            for c in notes:  # purge and witness notes: a few a day
                if c["type"] == "witness":
                    await conn.execute(
                        _INSERT_WITNESS, c["replica"], c["seq"], to_datetime(c["time"]), c["note"]
                    )
                    continue
                await conn.execute(
                    _INSERT_PURGE,
                    c["replica"],
                    c["seq"],
                    c["number"],
                    to_datetime(c["time"]),
                    c["note"],
                )

    async def purge_point(self, replica: str, cutoff: str) -> PurgePoint | None:
        db = self._db()
        bounds = await db.fetchrow(
            "SELECT min(seq) AS first, max(seq) AS last FROM fetch_records WHERE replica = $1",
            replica,
        )
        if bounds is None or bounds["first"] is None:
            return None
        young = await db.fetchval(
            "SELECT min(seq) FROM fetch_records WHERE replica = $1 AND ts >= $2",
            replica,
            to_datetime(cutoff),
        )
        through = int(bounds["last"]) if young is None else int(young) - 1
        if through < int(bounds["first"]):
            return None
        hash_ = await db.fetchval(
            "SELECT hash FROM fetch_records WHERE replica = $1 AND seq = $2", replica, through
        )
        row = await db.fetchrow(
            "SELECT number, note FROM fetch_checkpoints WHERE replica = $1 AND seq <= $2 "
            "ORDER BY number DESC LIMIT 1",
            replica,
            through,
        )
        return PurgePoint(
            seq=through,
            hash=str(hash_),
            records=through - int(bounds["first"]) + 1,
            number=None if row is None else int(row["number"]),
            note_hash=None if row is None else note_hash(row["note"]),
        )

    async def purge(self, replica: str, through_seq: int, through_number: int | None) -> int:
        async with self._db().acquire() as conn, conn.transaction():
            status = await conn.execute(
                "DELETE FROM fetch_records WHERE replica = $1 AND seq <= $2", replica, through_seq
            )
            if through_number is not None:
                await conn.execute(
                    "DELETE FROM fetch_checkpoints WHERE replica = $1 AND number <= $2",
                    replica,
                    through_number,
                )
            # Older purge notes anchor records that are gone now; the newest one stays.
            await conn.execute(
                "DELETE FROM fetch_purges WHERE replica = $1 AND seq < $2", replica, through_seq
            )
            await conn.execute(
                "DELETE FROM fetch_witnesses WHERE replica = $1 AND seq <= $2", replica, through_seq
            )
        return int(status.split()[-1])

    # -- reading (ChainReader) ---------------------------------------------------------------

    async def replicas(self) -> list[str]:
        assert self.schema is not None, "store is not open"
        sql = replicas_sql(self.schema)
        if sql is None:
            return []
        rows = await self._db().fetch(sql)
        return [str(r[0]) for r in rows]

    async def seq_bounds(
        self, replica: str, since: str | None, until: str | None
    ) -> tuple[int, int] | None:
        db = self._db()
        if since is None:
            low = await db.fetchval(_MIN_SEQ, replica)
        else:
            low = await db.fetchval(
                "SELECT min(seq) FROM fetch_records WHERE replica = $1 AND ts >= $2",
                replica,
                to_datetime(since),
            )
        if until is None:
            high = await db.fetchval(_MAX_SEQ, replica)
        else:
            high = await db.fetchval(
                "SELECT max(seq) FROM fetch_records WHERE replica = $1 AND ts < $2",
                replica,
                to_datetime(until),
            )
        if low is None or high is None or low > high:
            return None
        return int(low), int(high)

    async def checkpoint_below(self, replica: str, seq: int) -> dict[str, Any] | None:
        if not self._has("fetch_checkpoints"):
            return None
        row = await self._db().fetchrow(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = $1 AND seq < $2 "
            "ORDER BY number DESC LIMIT 1",
            replica,
            seq,
        )
        return _checkpoint(row)

    async def checkpoint_from(self, replica: str, seq: int) -> dict[str, Any] | None:
        if not self._has("fetch_checkpoints"):
            return None
        row = await self._db().fetchrow(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = $1 AND seq >= $2 "
            "ORDER BY number LIMIT 1",
            replica,
            seq,
        )
        return _checkpoint(row)

    async def first_seq(self, replica: str) -> int | None:
        v = await self._db().fetchval(_MIN_SEQ, replica)
        return None if v is None else int(v)

    async def last_seq(self, replica: str) -> int | None:
        v = await self._db().fetchval(_MAX_SEQ, replica)
        return None if v is None else int(v)

    async def records(self, replica: str, first: int, last: int) -> AsyncIterator[dict[str, Any]]:
        after = first - 1
        while after < last:
            rows = await self._db().fetch(
                "SELECT seq, body FROM fetch_records WHERE replica = $1 AND seq > $2 "
                "AND seq <= $3 ORDER BY seq LIMIT $4",
                replica,
                after,
                last,
                _BATCH,
            )
            if not rows:
                return
            for row in rows:
                yield json.loads(row["body"])
            after = int(rows[-1]["seq"])

    async def checkpoints(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        if not self._has("fetch_checkpoints"):
            return []
        rows = await self._db().fetch(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = $1 "
            "AND seq >= $2 AND seq <= $3 ORDER BY number",
            replica,
            first,
            last,
        )
        return [c for c in map(_checkpoint, rows) if c is not None]

    async def witnesses(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        if not self._has("fetch_witnesses"):
            return []
        rows = await self._db().fetch(
            "SELECT seq, note FROM fetch_witnesses WHERE replica = $1 "
            "AND seq >= $2 AND seq <= $3 ORDER BY seq",
            replica,
            first,
            last,
        )
        return [{"seq": int(r["seq"]), "note": str(r["note"])} for r in rows]


async def aread_records(dsn: str, query: RecordQuery) -> AsyncGenerator[dict[str, Any]]:
    """Records matching `query` in chain order (replica, seq), streamed through a cursor."""
    conn = await asyncpg.connect(dsn)
    try:
        if not (await read_schema(conn)).has("fetch_records"):
            return
        where, params = query.sql_where(placeholder="$", time_param=to_datetime)
        sql = f"SELECT body FROM fetch_records {where} ORDER BY replica, seq"  # noqa: S608
        async with conn.transaction():
            async for row in conn.cursor(sql, *params, prefetch=_BATCH):
                yield json.loads(row["body"])
    finally:
        await conn.close()


def read_records(dsn: str, query: RecordQuery) -> Iterator[dict[str, Any]]:
    """The synchronous form of `aread_records` (CLI commands; not inside a running loop)."""
    loop = asyncio.new_event_loop()
    agen = aread_records(dsn, query)
    try:
        while True:
            try:
                rec = loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                break
            yield rec
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()
