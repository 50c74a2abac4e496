"""A takedown's manifest is read from the records whose URL holds one of its hosts (the store
cuts them by their url column before any body is read): the manifests must be exactly those a
read of the whole log gives, on SQLite and on PostgreSQL, for domains and their subdomains,
URLs and prefixes over http and https, ports, IDNs, IPv6 addresses, and the path readings a
site's server may take (`//`, `;` parameters, escapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.audit.postgres_store import PostgresStore
from proxy.audit.query import RecordQuery
from proxy.audit.sqlite_store import SQLiteStore
from proxy.blocklist import Scope
from proxy.record_source import SQLITE_NAME
from proxy.record_source import RecordSource
from proxy.takedowns import Actor
from proxy.takedowns import Takedown
from proxy.takedowns import covering
from proxy.takedowns import hosts_of
from proxy.takedowns import normalize_target
from tests import pg_fixtures
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log

pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn

URLS = [
    "https://photos.example/a.jpg",
    "https://img.photos.example/b.jpg",  # a subdomain
    "http://photos.example:8080/c.jpg",  # a port
    "https://notphotos.example/d.jpg",  # another domain that ends alike
    "https://photos.example.evil.test/e.jpg",
    "https://xn--bcher-kva.example/private/f.jpg",  # bücher.example
    "http://[2001:db8::1]:8443/g.jpg",
    "https://art.example/gallery/private//h.jpg",
    "https://art.example/gallery/private;jsessionid=1/i.jpg",
    "https://art.example/gallery/%70rivate/j.jpg",
    "https://art.example/gallery/public/k.jpg",
    "https://other.example/gallery/private/l.jpg",
]

TAKEDOWNS = [
    (Scope.DOMAIN, ["photos.example"]),
    (Scope.URL, ["https://bücher.example/private/f.jpg"]),
    (Scope.PREFIX, ["http://[2001:db8::1]:8443/"]),
    (Scope.PREFIX, ["https://art.example/gallery/private/"]),
]


def takedowns() -> list[Takedown]:
    return [
        Takedown(
            id=f"td-{i}",
            filed="2026-06-01T00:00:00.000000Z",
            rights_holder="RH",
            contact="c@example",
            scope=scope,
            targets=tuple(normalize_target(scope, t) for t in targets),
            reason="r",
            filed_by=Actor("admin", "sha256:0"),
        )
        for i, (scope, targets) in enumerate(TAKEDOWNS)
    ]


async def write(store: Any, tmp_path: Path) -> None:
    log = fetch_log(store, tmp_path / "spool", "gw-t", None)
    await log.open()
    for i, url in enumerate(URLS * 2):
        log.append(fetch(i, url=url, decision="forwarded" if i % 5 else "withheld", reason="ok"))
    log.append(fetch(99, url=URLS[0], decision="refused", reason="rate_limited"))
    await log.close()


async def manifests(source: RecordSource, query: RecordQuery) -> dict[str, list[int]]:
    every = takedowns()
    match = covering(every)
    out: dict[str, list[int]] = {td.id: [] for td in every}

    def visit(rec: dict[str, Any]) -> None:
        for takedown_id in match(rec):
            out[takedown_id].append(rec["seq"])

    await source.scan(query, visit)
    return out


async def check_the_cut_changes_no_manifest(source: RecordSource) -> None:
    whole = await manifests(source, RecordQuery())
    cut = await manifests(source, RecordQuery(url_contains=hosts_of(takedowns())))
    assert cut == whole
    # what the log holds, so that the comparison compares something: every takedown covers
    # records, and the cut left out some of the log
    assert all(whole.values()), whole
    assert len(whole["td-0"]) == 6  # photos.example, its subdomain and its port, twice each
    assert len(whole["td-3"]) == 6  # private, //private, ;-parameter and %70rivate, twice each
    left: list[int] = []
    await source.scan(RecordQuery(url_contains=hosts_of(takedowns())), lambda r: left.append(1))
    assert len(left) < len(URLS) * 2


def test_the_hosts_of_takedowns() -> None:
    assert hosts_of(takedowns()) == (
        "2001:db8::1",
        "art.example",
        "photos.example",
        "xn--bcher-kva.example",
    )


async def test_sqlite_cuts_the_log_without_changing_a_manifest(tmp_path: Path) -> None:
    await write(SQLiteStore(tmp_path / "data" / SQLITE_NAME), tmp_path)
    await check_the_cut_changes_no_manifest(RecordSource(tmp_path / "data"))


async def test_postgresql_cuts_the_log_without_changing_a_manifest(
    tmp_path: Path, pg_dsn: str
) -> None:
    await write(PostgresStore(pg_dsn), tmp_path)
    await check_the_cut_changes_no_manifest(RecordSource(tmp_path, pg_dsn))
