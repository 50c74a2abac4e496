"""Where takedown manifests and the report read fetch records: the `read_records` path of the
fetch-log stores, the same rows `crawlwarden audit export` writes out, from SQLite (a data dir)
or PostgreSQL (an audit DSN)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.audit.query import RecordQuery
from proxy.audit.report_query import ReportRows
from proxy.audit.report_query import postgres_report
from proxy.audit.report_query import sqlite_report
from proxy.audit.usage_query import UsageRows
from proxy.audit.usage_query import postgres_usage
from proxy.audit.usage_query import sqlite_usage

SQLITE_NAME = "fetchlog.sqlite3"

type Visit = Callable[[dict[str, Any]], None]


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a fetch log from the command line can fail with for a reason the user can
    act on (a bad argument, a missing file, a store it cannot reach, a database that does not
    exist or refuses the role, a SQLite file that is no database): said in one line, exit 2,
    not a traceback; in the admin API a 503."""
    import asyncpg

    return (ValueError, OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)


def unreadable() -> tuple[type[BaseException], ...]:
    """`read_errors`, and a fetch log of a newer schema than this gateway's: what the admin API
    answers 503 "the fetch log store cannot be read" for."""
    from proxy.audit.schema import SchemaTooNew

    return (SchemaTooNew, *read_errors())


async def in_worker[T](work: Callable[[threading.Event], T]) -> T:
    """`work(stop)` in a worker thread. If the caller is cancelled meanwhile (its client has
    gone, its time bound has passed), `stop` is set and the thread awaited before the
    cancellation goes on: a SQLite read no one waits for any more ends (`work` looks at `stop`)
    instead of running to its end on one of the few threads the gateway's own work shares
    (opt-out checks, content hashes), and what the caller lets go once it is cancelled (a
    team's one count at a time) is let go only once the read has stopped, as a PostgreSQL
    query is cancelled before its connection closes."""
    stop = threading.Event()
    worker = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        stop.set()
        # (what it ends with, "interrupted" or its rows, no one asked for any more)
        with contextlib.suppress(Exception):
            await asyncio.shield(worker)
        raise


@dataclass(frozen=True)
class RecordSource:
    data_dir: Path
    audit_dsn: str | None = None

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / SQLITE_NAME

    def describe(self) -> str:
        return "postgresql" if self.audit_dsn else f"sqlite:{self.sqlite_path}"

    async def scan(self, query: RecordQuery, visit: Visit) -> None:
        """Call `visit` with every record `query` selects, in chain order (replica, seq).

        SQLite is read in a worker thread (`visit` runs there; it must only touch its own
        state), PostgreSQL through a server-side cursor.
        """
        if self.audit_dsn:
            from proxy.audit.postgres_store import aread_records

            async for rec in aread_records(self.audit_dsn, query):
                visit(rec)
            return
        from proxy.audit.sqlite_store import read_records

        path = self._existing()

        def run(stop: threading.Event) -> None:
            for rec in read_records(path, query):
                if stop.is_set():
                    return
                visit(rec)

        await in_worker(run)

    async def team_usage(self, query: RecordQuery) -> UsageRows:
        """A team's usage groups, counted by the store (proxy/audit/usage_query.py)."""
        if self.audit_dsn:
            return await postgres_usage(self.audit_dsn, query)
        path = self._existing()
        return await in_worker(lambda stop: sqlite_usage(path, query, stop))

    async def report_rows(self, query: RecordQuery, optout_reasons: frozenset[str]) -> ReportRows:
        """The report's groups, counted by the store (proxy/audit/report_query.py)."""
        if self.audit_dsn:
            return await postgres_report(self.audit_dsn, query, optout_reasons)
        path = self._existing()
        return await in_worker(lambda stop: sqlite_report(path, query, optout_reasons, stop))

    def _existing(self) -> Path:
        path = self.sqlite_path
        if not path.exists():
            raise FileNotFoundError(
                f"no fetch log at {path}; pass the gateway's --data-dir or --audit-dsn"
            )
        return path

    def chain_reader(self) -> Any:
        """A read-only store for checkpoints (open() it, close() it)."""
        if self.audit_dsn:
            from proxy.audit.postgres_store import PostgresStore

            return PostgresStore(self.audit_dsn, migrate_schema=False, pool_size=2)
        from proxy.audit.sqlite_store import SQLiteStore

        return SQLiteStore(self.sqlite_path, readonly=True)
