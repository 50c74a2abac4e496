"""The embedded fetch-log store: SQLite in WAL mode, written from one thread off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from collections.abc import Iterator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from proxy.audit.checkpoint import note_hash
from proxy.audit.query import RecordQuery
from proxy.audit.record import record_json
from proxy.audit.schema import Schema
from proxy.audit.schema import SchemaTooNew
from proxy.audit.store import ChainForked
from proxy.audit.store import PurgePoint
from proxy.audit.store import replicas_sql

# Each entry migrates the schema from version i to i+1 (PRAGMA user_version is the schema
# version); never edit one that has shipped. Statements run one by one inside one transaction.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE fetch_records (
            replica TEXT NOT NULL,
            seq INTEGER NOT NULL,
            id TEXT NOT NULL,
            ts TEXT NOT NULL,
            kind TEXT NOT NULL,
            site TEXT,
            team TEXT,
            project TEXT,
            decision TEXT NOT NULL,
            reason TEXT,
            url TEXT NOT NULL,
            content_sha256 TEXT,
            hash TEXT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (replica, seq)
        )""",
        "CREATE INDEX fetch_records_ts ON fetch_records (ts)",
        "CREATE INDEX fetch_records_site_ts ON fetch_records (site, ts)",
        "CREATE INDEX fetch_records_team_ts ON fetch_records (team, ts)",
    ],
    [
        """CREATE TABLE fetch_checkpoints (
            replica TEXT NOT NULL,
            number INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            time TEXT NOT NULL,
            kind TEXT NOT NULL,
            note TEXT NOT NULL,
            PRIMARY KEY (replica, number)
        )""",
        "CREATE INDEX fetch_checkpoints_seq ON fetch_checkpoints (replica, seq)",
        """CREATE TABLE fetch_purges (
            replica TEXT NOT NULL,
            seq INTEGER NOT NULL,
            number INTEGER NOT NULL,
            time TEXT NOT NULL,
            note TEXT NOT NULL,
            PRIMARY KEY (replica, seq)
        )""",
        "CREATE INDEX fetch_records_replica_ts ON fetch_records (replica, ts)",
        "CREATE INDEX fetch_records_project_ts ON fetch_records (project, ts)",
    ],
    [
        """CREATE TABLE fetch_witnesses (
            replica TEXT NOT NULL,
            seq INTEGER NOT NULL,
            time TEXT NOT NULL,
            note TEXT NOT NULL,
            PRIMARY KEY (replica, seq)
        )""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT = """
INSERT OR IGNORE INTO fetch_records
    (replica, seq, id, ts, kind, site, team, project, decision, reason, url, content_sha256,
     hash, body)
VALUES """
_ROW_PLACES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ROW_FIELDS = _ROW_PLACES.count("?")
# Rows per INSERT statement. One statement for many rows, not executemany(): the sqlite3 module
# lets go of the GIL around every statement it steps, and the writer thread then waits for the
# event loop to hand it back once per row (thousands of thread switches a second under load).
_ROWS_PER_INSERT = 256
_INSERT_CHECKPOINT = """
INSERT OR IGNORE INTO fetch_checkpoints (replica, number, seq, time, kind, note)
VALUES (?, ?, ?, ?, ?, ?)
"""
_INSERT_PURGE = """
INSERT OR IGNORE INTO fetch_purges (replica, seq, number, time, note) VALUES (?, ?, ?, ?, ?)
"""
_INSERT_WITNESS = """
INSERT OR IGNORE INTO fetch_witnesses (replica, seq, time, note) VALUES (?, ?, ?, ?)
"""
_BATCH = 1000


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def read_schema(conn: sqlite3.Connection) -> Schema:
    """The schema the file is at, as it is (a reader does not migrate it); SchemaTooNew when
    a newer crawlwarden migrated it."""
    return Schema.at(int(conn.execute("PRAGMA user_version").fetchone()[0]), MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; safe when several processes start at once.

    The version is read inside BEGIN IMMEDIATE (the write lock), so a second process waits and
    then sees the migrated version. executescript() is not used: it commits on its own. A file
    a newer crawlwarden migrated is not written (SchemaTooNew), as in PostgreSQL: this code
    does not know what its newer tables and columns must hold.
    """
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SchemaTooNew(int(version), len(MIGRATIONS))
            if version == len(MIGRATIONS):
                conn.execute("COMMIT")
                return int(version)
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _row(rec: dict[str, Any]) -> tuple[Any, ...]:
    return (
        rec["replica"],
        rec["seq"],
        rec["id"],
        rec["ts"],
        rec.get("kind", "fetch"),
        rec.get("site"),
        rec.get("team"),
        rec.get("project"),
        rec["decision"],
        rec.get("reason"),
        rec["url"],
        rec.get("content_sha256"),
        rec["hash"],
        record_json(rec),
    )


def _checkpoint_row(c: dict[str, Any]) -> tuple[Any, ...]:
    return (c["replica"], c["number"], c["seq"], c["time"], c["kind"], c["note"])


def _check_stored(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """ChainForked if a record of `rows` (`_row`s) is stored with another hash."""
    other = []
    for replica, seq, *_, hash_, _body in rows:
        found = db.execute(
            "SELECT hash FROM fetch_records WHERE replica = ? AND seq = ?", (replica, seq)
        ).fetchone()
        if found is not None and found[0] != hash_:
            other.append((replica, seq))
    if other:
        seqs = [seq for replica, seq in other if replica == other[0][0]]
        raise ChainForked(other[0][0], records=(seqs[0], seqs[-1]))


def _check_link(db: sqlite3.Connection, first: dict[str, Any]) -> None:
    """ChainForked if the record before `first` is stored and is not the one it follows."""
    before = db.execute(
        "SELECT hash FROM fetch_records WHERE replica = ? AND seq = ?",
        (first["replica"], first["seq"] - 1),
    ).fetchone()
    # (none: the chain starts here, was purged up to here, or has a hole that verify reports)
    if before is not None and before[0] != first["prev_hash"]:
        raise ChainForked(first["replica"], unlinked=first["seq"])


def _check_stored_checkpoints(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """ChainForked if a checkpoint of `rows` (`_checkpoint_row`s) is stored with another note."""
    other = []
    for replica, number, _seq, _time, _kind, note in rows:
        found = db.execute(
            "SELECT note FROM fetch_checkpoints WHERE replica = ? AND number = ?", (replica, number)
        ).fetchone()
        if found is not None and found[0] != note:
            other.append((replica, number))
    if other:
        numbers = [n for replica, n in other if replica == other[0][0]]
        raise ChainForked(other[0][0], checkpoints=(numbers[0], numbers[-1]))


def _checkpoint(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"number": int(row[0]), "seq": int(row[1]), "note": str(row[2])}


class SQLiteStore:
    """The fetch log in one SQLite file; `readonly=True` for exports beside a running gateway."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self.schema: Schema | None = None  # known once open
        # One thread owns the connection: reads and writes never block the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetchlog-sqlite")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is not open"
        return self._conn

    def _has(self, table: str) -> bool:
        """Whether the file has the table (read-only, an older gateway's file may not)."""
        assert self.schema is not None, "store is not open"
        return self.schema.has(table)

    async def open(self) -> None:
        def _open() -> None:
            if self.readonly:
                if not self.path.exists():
                    raise FileNotFoundError(
                        f"no fetch log at {self.path}; pass the gateway's --data-dir or --audit-dsn"
                    )
                self._conn = connect(self.path, readonly=True)
                try:
                    self.schema = read_schema(self._conn)
                except BaseException:
                    self._conn.close()
                    self._conn = None
                    raise
            else:
                self._conn = connect(self.path)
                try:
                    self.schema = Schema.at(migrate(self._conn), MIGRATIONS)
                except BaseException:
                    self._conn.close()
                    self._conn = None
                    raise

        await self._run(_open)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)

    async def _one(self, sql: str, *params: Any) -> Any:
        return await self._run(lambda: self._db().execute(sql, params).fetchone())

    # -- writing (FetchStore) ----------------------------------------------------------------

    async def claim(self, replica: str) -> None:
        """Nothing to do: this file belongs to one data dir, and the replica's spool in that
        data dir is locked by the process that writes it (proxy/audit/spool.py)."""

    @contextlib.asynccontextmanager
    async def hold(self, replica: str) -> AsyncIterator[bool]:
        yield True  # as for claim(): the spool's lock on this data dir decides

    async def last(self, replica: str) -> tuple[int, str] | None:
        row = await self._one(
            "SELECT seq, hash FROM fetch_records WHERE replica = ? ORDER BY seq DESC LIMIT 1",
            replica,
        )
        return None if row is None else (int(row[0]), str(row[1]))

    async def holds(self, replica: str, record_id: str, ts: str) -> bool:
        row = await self._one(
            "SELECT 1 FROM fetch_records WHERE replica = ? AND ts = ? AND id = ? LIMIT 1",
            replica,
            ts,
            record_id,
        )
        return row is not None

    async def last_checkpoint(self, replica: str) -> dict[str, Any] | None:
        if not self._has("fetch_checkpoints"):
            return None
        row = await self._one(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = ? "
            "ORDER BY number DESC LIMIT 1",
            replica,
        )
        return _checkpoint(row)

    async def last_purge(self, replica: str) -> dict[str, Any] | None:
        if not self._has("fetch_purges"):
            return None
        row = await self._one(
            "SELECT number, seq, note FROM fetch_purges WHERE replica = ? "
            "ORDER BY seq DESC LIMIT 1",
            replica,
        )
        return _checkpoint(row)

    async def purge_note(self, replica: str, seq: int) -> dict[str, Any] | None:
        if not self._has("fetch_purges"):
            return None
        row = await self._one(
            "SELECT number, seq, note FROM fetch_purges WHERE replica = ? AND seq = ?",
            replica,
            seq,
        )
        return _checkpoint(row)

    async def write(
        self, records: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]] = ()
    ) -> None:
        rows = [_row(r) for r in records]
        checkpoint_rows = [_checkpoint_row(c) for c in checkpoints if c["type"] == "checkpoint"]
        purge_rows = [
            (c["replica"], c["seq"], c["number"], c["time"], c["note"])
            for c in checkpoints
            if c["type"] == "purge"
        ]
        witness_rows = [
            (c["replica"], c["seq"], c["time"], c["note"])
            for c in checkpoints
            if c["type"] == "witness"
        ]

        def _write() -> None:
            db = self._db()
            # (bounded by the library's limit on parameters per statement: 999 before 3.32)
            per_insert = min(
                _ROWS_PER_INSERT, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _ROW_FIELDS
            )
            db.execute("BEGIN")
            try:
                # A row already there is skipped: a retry's (the same hash: nothing to do) or
                # another writer's (another hash: ChainForked, and the transaction rolls back).
                inserted = 0
                for start in range(0, len(rows), per_insert):
                    chunk = rows[start : start + per_insert]
                    inserted += db.execute(
                        _INSERT + ",".join([_ROW_PLACES] * len(chunk)),
                        [value for row in chunk for value in row],
                    ).rowcount
                if inserted < len(rows):
                    _check_stored(db, rows)
                if records:
                    _check_link(db, records[0])
                # (only when there is something: each statement is one more GIL hand-over)
                if checkpoint_rows:
                    if db.executemany(_INSERT_CHECKPOINT, checkpoint_rows).rowcount < len(
                        checkpoint_rows
                    ):
                        _check_stored_checkpoints(db, checkpoint_rows)
                if purge_rows:
                    db.executemany(_INSERT_PURGE, purge_rows)
                if witness_rows:
                    db.executemany(_INSERT_WITNESS, witness_rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await self._run(_write)

    async def purge_point(self, replica: str, cutoff: str) -> PurgePoint | None:
        def _point() -> PurgePoint | None:
            db = self._db()
            first, last = db.execute(
                "SELECT MIN(seq), MAX(seq) FROM fetch_records WHERE replica = ?", (replica,)
            ).fetchone()
            if first is None:
                return None
            (young,) = db.execute(
                "SELECT MIN(seq) FROM fetch_records WHERE replica = ? AND ts >= ?",
                (replica, cutoff),
            ).fetchone()
            through = last if young is None else young - 1
            if through < first:
                return None
            (hash_,) = db.execute(
                "SELECT hash FROM fetch_records WHERE replica = ? AND seq = ?", (replica, through)
            ).fetchone()
            row = db.execute(
                "SELECT number, note FROM fetch_checkpoints WHERE replica = ? AND seq <= ? "
                "ORDER BY number DESC LIMIT 1",
                (replica, through),
            ).fetchone()
            return PurgePoint(
                seq=int(through),
                hash=str(hash_),
                records=int(through) - int(first) + 1,
                number=None if row is None else int(row[0]),
                note_hash=None if row is None else note_hash(row[1]),
            )

        result: PurgePoint | None = await self._run(_point)
        return result

    async def purge(self, replica: str, through_seq: int, through_number: int | None) -> int:
        def _purge() -> int:
            db = self._db()
            db.execute("BEGIN")
            try:
                n = db.execute(
                    "DELETE FROM fetch_records WHERE replica = ? AND seq <= ?",
                    (replica, through_seq),
                ).rowcount
                if through_number is not None:
                    db.execute(
                        "DELETE FROM fetch_checkpoints WHERE replica = ? AND number <= ?",
                        (replica, through_number),
                    )
                # Older purge notes anchor records that are gone now; the newest one stays.
                db.execute(
                    "DELETE FROM fetch_purges WHERE replica = ? AND seq < ?",
                    (replica, through_seq),
                )
                db.execute(
                    "DELETE FROM fetch_witnesses WHERE replica = ? AND seq <= ?",
                    (replica, through_seq),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return int(n)

        result: int = await self._run(_purge)
        return result

    # -- reading (ChainReader) ---------------------------------------------------------------

    async def replicas(self) -> list[str]:
        assert self.schema is not None, "store is not open"
        sql = replicas_sql(self.schema)
        if sql is None:
            return []

        def _replicas() -> list[str]:
            rows = self._db().execute(sql)
            return [str(r[0]) for r in rows]

        result: list[str] = await self._run(_replicas)
        return result

    async def seq_bounds(
        self, replica: str, since: str | None, until: str | None
    ) -> tuple[int, int] | None:
        low = await self._one(
            "SELECT MIN(seq) FROM fetch_records WHERE replica = ? AND ts >= ?",
            replica,
            since or "",
        )
        high = await self._one(
            "SELECT MAX(seq) FROM fetch_records WHERE replica = ? AND ts < ?",
            replica,
            until or "\uffff",
        )
        if low[0] is None or high[0] is None or low[0] > high[0]:
            return None
        return int(low[0]), int(high[0])

    async def checkpoint_below(self, replica: str, seq: int) -> dict[str, Any] | None:
        if not self._has("fetch_checkpoints"):
            return None
        row = await self._one(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = ? AND seq < ? "
            "ORDER BY number DESC LIMIT 1",
            replica,
            seq,
        )
        return _checkpoint(row)

    async def checkpoint_from(self, replica: str, seq: int) -> dict[str, Any] | None:
        if not self._has("fetch_checkpoints"):
            return None
        row = await self._one(
            "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = ? AND seq >= ? "
            "ORDER BY number LIMIT 1",
            replica,
            seq,
        )
        return _checkpoint(row)

    async def first_seq(self, replica: str) -> int | None:
        row = await self._one("SELECT MIN(seq) FROM fetch_records WHERE replica = ?", replica)
        return None if row[0] is None else int(row[0])

    async def last_seq(self, replica: str) -> int | None:
        row = await self._one("SELECT MAX(seq) FROM fetch_records WHERE replica = ?", replica)
        return None if row[0] is None else int(row[0])

    async def records(self, replica: str, first: int, last: int) -> AsyncIterator[dict[str, Any]]:
        after = first - 1
        while after < last:
            rows = await self._run(
                lambda a=after: (
                    self._db()
                    .execute(
                        "SELECT seq, body FROM fetch_records WHERE replica = ? AND seq > ? "
                        "AND seq <= ? ORDER BY seq LIMIT ?",
                        (replica, a, last, _BATCH),
                    )
                    .fetchall()
                )
            )
            if not rows:
                return
            for _seq, body in rows:
                yield json.loads(body)
            after = int(rows[-1][0])

    async def checkpoints(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        if not self._has("fetch_checkpoints"):
            return []

        def _checkpoints() -> list[dict[str, Any]]:
            rows = self._db().execute(
                "SELECT number, seq, note FROM fetch_checkpoints WHERE replica = ? "
                "AND seq >= ? AND seq <= ? ORDER BY number",
                (replica, first, last),
            )
            return [c for c in map(_checkpoint, rows) if c is not None]

        result: list[dict[str, Any]] = await self._run(_checkpoints)
        return result

    async def witnesses(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        if not self._has("fetch_witnesses"):
            return []

        def _witnesses() -> list[dict[str, Any]]:
            rows = self._db().execute(
                "SELECT seq, note FROM fetch_witnesses WHERE replica = ? "
                "AND seq >= ? AND seq <= ? ORDER BY seq",
                (replica, first, last),
            )
            return [{"seq": int(seq), "note": str(note)} for seq, note in rows]

        result: list[dict[str, Any]] = await self._run(_witnesses)
        return result


def read_records(path: Path, query: RecordQuery) -> Iterator[dict[str, Any]]:
    """Records matching `query` in chain order (replica, seq), straight from the database file."""
    conn = connect(path, readonly=True)
    try:
        if not read_schema(conn).has("fetch_records"):
            return
        where, params = query.sql_where(placeholder="?")
        sql = f"SELECT body FROM fetch_records {where} ORDER BY replica, seq"  # noqa: S608
        for (body,) in conn.execute(sql, params):
            yield json.loads(body)
    finally:
        conn.close()
