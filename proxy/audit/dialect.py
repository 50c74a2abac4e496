"""What differs between the fetch-log stores' SQL when they count records themselves (the team
usage, the report): how a field of the record's JSON body is read, how a time is cut to its
day or minute, and how a time comes back. The rest of the SQL is the same for both, and so is
how it runs: every statement of one answer in one snapshot (`sqlite_results`,
`postgres_results`).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.audit.query import RecordQuery
from proxy.audit.query import to_datetime

# A store's statements, by name (SQL, parameters), and their rows, by the same names.
type Statements = dict[str, tuple[str, list[Any]]]
type Results = dict[str, list[tuple[Any, ...]]]
# The decisions of a record that reached the site, and the SQL condition that says so.
REACHED_DECISIONS = frozenset({"forwarded", "withheld"})
REACHED = f"decision IN ({', '.join(repr(d) for d in sorted(REACHED_DECISIONS))})"


@dataclass(frozen=True)
class Dialect:
    placeholder: str
    # The body as JSON (`j`). PostgreSQL's `json`, not `jsonb`: a field read from the text
    # costs less than converting every body whole (a report of 100 000 records: 2.8 s, 4.1 s).
    parsed: str
    text: Callable[[str], str]  # a field of `j` as text
    number: Callable[[str], str]  # a field of `j` as a number
    day: str  # `ts` as its UTC date, YYYY-MM-DD (the records' ts[:10])
    minute: str  # `ts` as its UTC minute, YYYY-MM-DDTHH:MM (the records' ts[:16])
    time_param: Callable[[str], Any]
    # FROM-clause items: each element of the array field `signals` of `j`, as `e.value`
    signals: str

    def counted(
        self, query: RecordQuery, kinds: tuple[str, ...], fields: dict[str, str]
    ) -> tuple[str, list[Any]]:
        """The records of `kinds` the query selects as a subquery `r`: their columns, and
        `fields` (name: an expression over the parsed body `j`); without a refused CONNECT
        answered 200: a tunnel opened to nowhere, each request in it refused and recorded on its
        own (an HTTPS fetch would count twice)."""
        listed = ", ".join(f"'{kind}'" for kind in kinds)
        where, params = self.where(query, f"kind IN ({listed})")
        extra = "".join(f", {expression} AS {name}" for name, expression in fields.items())
        sql = (
            "(SELECT replica, seq, id, ts, kind, site, team, project, decision, reason, url, "  # noqa: S608
            f"body, j{extra} FROM (SELECT *, {self.parsed} AS j FROM fetch_records {where}) AS q "
            f"WHERE NOT (decision = 'refused' AND coalesce({self.text('method')}, '') = 'CONNECT' "
            f"AND coalesce({self.number('status')}, 0) = 200)) AS r"
        )
        return sql, params

    def where(self, query: RecordQuery, *more: str) -> tuple[str, list[Any]]:
        """The query's WHERE clause (its values as parameters), with `more` conditions."""
        where, params = query.sql_where(self.placeholder, self.time_param)
        clauses = [where.removeprefix("WHERE ")] if where else []
        clauses += more
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


SQLITE = Dialect(
    placeholder="?",
    parsed="body",
    text=lambda n: f"json_extract(j, '$.{n}')",
    number=lambda n: f"json_extract(j, '$.{n}')",
    day="substr(ts, 1, 10)",
    minute="substr(ts, 1, 16)",
    time_param=str,
    signals="json_each(CASE WHEN json_type(j, '$.signals') = 'array' "
    "THEN json_extract(j, '$.signals') ELSE '[]' END) AS e",
)
POSTGRES = Dialect(
    placeholder="$",
    parsed="body::json",
    text=lambda n: f"(j ->> '{n}')",
    number=lambda n: f"(j ->> '{n}')::bigint",
    day="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    minute="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI')",
    time_param=to_datetime,
    signals="json_array_elements_text(CASE WHEN json_typeof(j -> 'signals') = 'array' "
    "THEN j -> 'signals' ELSE '[]'::json END) AS e(value)",
)


def ts_text(value: Any) -> str:
    """A `ts` as the records write it (PostgreSQL hands over a datetime)."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)


def sqlite_results(
    path: Path, statements: Statements, stop: threading.Event | None = None
) -> Results | None:
    """The statements' rows from a SQLite fetch log, in one snapshot (a read transaction, WAL);
    None when it has no records table yet. Blocking: run it in a worker thread. Once `stop` is
    set, the statement running ends with sqlite3.OperationalError ("interrupted")."""
    from proxy.audit.sqlite_store import connect
    from proxy.audit.sqlite_store import read_schema

    conn = connect(path, readonly=True)
    try:
        if stop is not None:
            conn.set_progress_handler(stop.is_set, STOP_CHECK_STEPS)
        if not read_schema(conn).has("fetch_records"):
            return None
        conn.execute("BEGIN")
        try:
            return {
                name: [tuple(row) for row in conn.execute(sql, params)]
                for name, (sql, params) in statements.items()
            }
        finally:
            conn.rollback()
    finally:
        conn.close()


# How many of SQLite's virtual-machine steps a statement takes between two looks at `stop`
# (one Python call each: a report of 300 000 records makes ~10 000 of them, nothing measurable).
STOP_CHECK_STEPS = 10_000


async def postgres_results(dsn: str, statements: Statements) -> Results | None:
    """The statements' rows from a PostgreSQL fetch log, in one snapshot (a record stored
    meanwhile is in every statement's rows or in none); None when it has no records table."""
    import asyncpg

    from proxy.audit.postgres_store import read_schema

    conn = await asyncpg.connect(dsn)
    try:
        if not (await read_schema(conn)).has("fetch_records"):
            return None
        results: Results = {}
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for name, (sql, params) in statements.items():
                results[name] = [tuple(row) for row in await conn.fetch(sql, *params)]
        return results
    finally:
        await conn.close()
