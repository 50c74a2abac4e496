"""The embedded fetch-log store: SQLite in WAL mode, written from one thread off the event loop."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from proxy.audit.query import RecordQuery

# Each entry migrates the schema from version i to i+1; never edit one that has shipped.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE fetch_records (
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
    );
    CREATE INDEX fetch_records_ts ON fetch_records (ts);
    CREATE INDEX fetch_records_site_ts ON fetch_records (site, ts);
    CREATE INDEX fetch_records_team_ts ON fetch_records (team, ts);
    """,
]

_INSERT = """
INSERT OR IGNORE INTO fetch_records
    (replica, seq, id, ts, kind, site, team, project, decision, reason, url, content_sha256,
     hash, body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for i in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executescript(MIGRATIONS[i].replace("\n    ", "\n"))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # executescript commits implicitly; the version bump is its own statement.
        conn.execute(f"PRAGMA user_version = {i + 1}")
    return len(MIGRATIONS)


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
        json.dumps(rec, separators=(",", ":"), ensure_ascii=False),
    )


class SQLiteStore:
    def __init__(self, path: Path):
        self.path = path
        self._conn: sqlite3.Connection | None = None
        # One thread owns the connection: writes never block the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetchlog-sqlite")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        def _open() -> None:
            self._conn = connect(self.path)
            migrate(self._conn)

        await self._run(_open)

    async def last(self, replica: str) -> tuple[int, str] | None:
        def _last() -> tuple[int, str] | None:
            assert self._conn is not None
            row = self._conn.execute(
                "SELECT seq, hash FROM fetch_records WHERE replica = ? ORDER BY seq DESC LIMIT 1",
                (replica,),
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        result: tuple[int, str] | None = await self._run(_last)
        return result

    async def write(self, records: list[dict[str, Any]]) -> None:
        rows = [_row(r) for r in records]

        def _write() -> None:
            assert self._conn is not None
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(_INSERT, rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

        await self._run(_write)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)


def read_records(path: Path, query: RecordQuery) -> Iterator[dict[str, Any]]:
    """Records matching `query` in chain order (replica, seq), straight from the database file."""
    conn = connect(path, readonly=True)
    try:
        where, params = query.sql_where(placeholder="?")
        sql = f"SELECT body FROM fetch_records {where} ORDER BY replica, seq"  # noqa: S608
        for (body,) in conn.execute(sql, params):
            yield json.loads(body)
    finally:
        conn.close()
