"""The read-only readers on a store at another schema version than this code's.

An auditor's tooling is upgraded before the fleet: `crawlwarden audit export` (and `report`)
then read a store an older gateway wrote and no newer gateway has migrated yet. A table the older
schema lacks reads as empty; a store newer than this code is refused in one line. The stores are
real (an SQLite file, a PostgreSQL database), put back to an older version the way the migrations
record it, and the CLI runs as a subprocess as an auditor runs it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from proxy.audit import postgres_store
from proxy.audit import sqlite_store
from proxy.audit.postgres_store import PostgresStore
from proxy.audit.schema import SchemaTooNew
from proxy.audit.schema import table_versions
from proxy.audit.sqlite_store import SQLiteStore
from proxy.audit.store import FetchStore
from tests import pg_fixtures
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import read_lines

# Fixtures of a fresh PostgreSQL database per test.
pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn

T0 = 1_790_000_000.0  # 2026-09-21
RECORDS = 25
# The schema before witness notes: what gateways before them wrote (and still write, in a
# fleet upgraded one replica at a time).
SQLITE_BEFORE_WITNESSES = table_versions(sqlite_store.MIGRATIONS)["fetch_witnesses"] - 1
PG_BEFORE_WITNESSES = table_versions(postgres_store.MIGRATIONS)["fetch_witnesses"] - 1


async def _write(store: FetchStore, spool: Path, key_dir: Path) -> Path:
    """Records of two replicas, a checkpoint every 10; returns the public key file."""
    signer, public = keys(key_dir)
    for n, replica in enumerate(("gw-a", "gw-b")):
        log = fetch_log(store if n == 0 else _again(store), spool, replica, signer)
        await log.open()
        for i in range(RECORDS):
            log.append(fetch(i, ts=T0 + i * 60 + n))
        await log.close()
    return public


def _again(store: FetchStore) -> FetchStore:
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path)
    assert isinstance(store, PostgresStore)
    return PostgresStore(store.dsn)


def sqlite_at(path: Path, version: int) -> None:
    """Put an SQLite fetch log back to `version`: drop the tables later migrations created and
    set PRAGMA user_version, where migrate() records the version."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for table, created in table_versions(sqlite_store.MIGRATIONS).items():
            if created > version:
                conn.execute(f"DROP TABLE {table}")
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


async def postgres_at(dsn: str, version: int) -> None:
    """The same for PostgreSQL: its version is the `fetchlog` row of crawlwarden_schema_version."""
    conn = await asyncpg.connect(dsn)
    try:
        for table, created in table_versions(postgres_store.MIGRATIONS).items():
            if created > version:
                await conn.execute(f"DROP TABLE {table}")
        await conn.execute(
            "UPDATE crawlwarden_schema_version SET version = $1 WHERE component = $2",
            version,
            postgres_store.COMPONENT,
        )
    finally:
        await conn.close()


def export(source: list[str | Path], out: Path) -> list[dict[str, object]]:
    result = cli("audit", "export", *source, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return read_lines(out)


def assert_exported_and_verified(items: list[dict[str, object]], out: Path, public: Path) -> None:
    records = [x for x in items if x["type"] == "record"]
    assert len(records) == 2 * RECORDS
    assert any(x["type"] == "checkpoint" for x in items)
    assert not any(x["type"] == "witness" for x in items)  # an older gateway wrote none
    verified = cli("audit", "verify", out, "--public-key", public)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"verified 2 replica(s), {2 * RECORDS} records" in verified.stdout


async def test_export_of_an_sqlite_log_an_older_gateway_wrote(tmp_path: Path) -> None:
    data = tmp_path / "data"
    public = await _write(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", tmp_path)
    sqlite_at(data / "fetchlog.sqlite3", SQLITE_BEFORE_WITNESSES)

    for fmt in ("jsonl", "csv"):
        result = cli(
            "audit", "export", "--data-dir", data, "--format", fmt, "--output", tmp_path / fmt
        )
        assert result.returncode == 0, result.stderr
    out = tmp_path / "export.jsonl"
    assert_exported_and_verified(export(["--data-dir", data], out), out, public)
    # Not migrated by reading it: the gateway that opens it next does that.
    conn = sqlite3.connect(data / "fetchlog.sqlite3")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_BEFORE_WITNESSES
    finally:
        conn.close()


async def test_export_of_a_postgres_log_an_older_gateway_wrote(pg_dsn: str, tmp_path: Path) -> None:
    public = await _write(PostgresStore(pg_dsn), tmp_path / "spool", tmp_path)
    await postgres_at(pg_dsn, PG_BEFORE_WITNESSES)

    out = tmp_path / "export.jsonl"
    assert_exported_and_verified(export(["--audit-dsn", pg_dsn], out), out, public)
    site = tmp_path / "site.jsonl"
    items = export(["--audit-dsn", pg_dsn, "--site", "a.example"], site)
    assert any(x["type"] == "redacted" for x in items)
    assert cli("audit", "verify", site, "--public-key", public).returncode == 0


@pytest.mark.parametrize("version", range(sqlite_store.SCHEMA_VERSION))
async def test_every_older_sqlite_schema_exports_and_reports(tmp_path: Path, version: int) -> None:
    # Back to the first one: no checkpoints table (version 1), no tables at all (version 0).
    data = tmp_path / "data"
    await _write(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", tmp_path)
    sqlite_at(data / "fetchlog.sqlite3", version)

    items = export(["--data-dir", data], tmp_path / "export.jsonl")
    has = table_versions(sqlite_store.MIGRATIONS)
    records = [x for x in items if x["type"] == "record"]
    assert len(records) == (2 * RECORDS if version >= has["fetch_records"] else 0)
    checkpoints = [x for x in items if x["type"] == "checkpoint"]
    assert bool(checkpoints) == (version >= has["fetch_checkpoints"])
    report = cli("report", "--data-dir", data, "--format", "json", "--output", tmp_path / "r.json")
    assert report.returncode == 0, report.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_store_newer_than_this_code_is_one_line_not_a_traceback(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    if backend == "sqlite":
        await _write(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", tmp_path)
        known = sqlite_store.SCHEMA_VERSION
        conn = sqlite3.connect(data / "fetchlog.sqlite3", isolation_level=None)
        try:
            conn.execute(f"PRAGMA user_version = {known + 1}")
        finally:
            conn.close()
        source: list[str | Path] = ["--data-dir", data]
    else:
        dsn = request.getfixturevalue("pg_dsn")
        await _write(PostgresStore(dsn), tmp_path / "spool", tmp_path)
        known = postgres_store.SCHEMA_VERSION
        await postgres_at(dsn, known + 1)  # (drops nothing: no table is newer than that)
        source = ["--audit-dsn", dsn]

    message = (
        f"the fetch log schema is at version {known + 1}, newer than this crawlwarden "
        f"({known}); upgrade crawlwarden"
    )
    exported = cli("audit", "export", *source, "--output", tmp_path / "x.jsonl")
    assert exported.returncode == 1, exported.stderr
    assert exported.stderr.splitlines() == [f"crawlwarden audit export: {message}"]
    reported = cli("report", *source, "--format", "json", "--output", tmp_path / "r.json")
    assert reported.returncode == 1, reported.stderr
    assert reported.stderr.splitlines() == [f"crawlwarden report: {message}"]
    # Nor does a gateway of this version write it (SQLite used to, as if it were its own).
    writer = SQLiteStore(data / "fetchlog.sqlite3") if backend == "sqlite" else PostgresStore(dsn)
    with pytest.raises(SchemaTooNew, match="newer than this crawlwarden"):
        await writer.open()


async def test_a_table_an_older_schema_lacks_reads_as_empty(tmp_path: Path) -> None:
    data = tmp_path / "data"
    await _write(SQLiteStore(data / "fetchlog.sqlite3"), data / "spool", tmp_path)
    sqlite_at(data / "fetchlog.sqlite3", SQLITE_BEFORE_WITNESSES)
    reader = SQLiteStore(data / "fetchlog.sqlite3", readonly=True)
    await reader.open()
    try:
        assert reader.schema is not None and reader.schema.version == SQLITE_BEFORE_WITNESSES
        assert await reader.witnesses("gw-a", 1, RECORDS) == []
        assert await reader.replicas() == ["gw-a", "gw-b"]
        assert await reader.last_checkpoint("gw-a") is not None
    finally:
        await reader.close()
