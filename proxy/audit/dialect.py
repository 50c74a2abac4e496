"""What differs between the fetch-log stores' SQL when they count records themselves (the team
usage, the report): how the fields of a record's JSON body are read (in PostgreSQL all of them
in one parse), how a time is cut to its day or minute, how a time comes back, and how rows are
made one JSON value. The rest of the SQL is the same for both, and so is how it runs: every
statement of one answer in one snapshot (`sqlite_results`, `postgres_results`).
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


# What a field of a record's body is read as: `number` (a JSON integer), `text` (a JSON
# string), `json` (the value as JSON: an array, say).
type FieldKind = str
_PG_TYPES = {"number": "bigint", "text": "text", "json": "json"}


def _pg_fields(fields: dict[str, FieldKind]) -> tuple[str, dict[str, str]]:
    # One parse of the body for all of them: each `->>` parses the text again, and a record is
    # ~1 KB of JSON (a report of 300 000 records: 10.7 s with a `->>` per field, 4.4 s so). One
    # field alone is read with `->>`, which is the cheaper then (a team's usage: 1.05 s, 1.3 s).
    if len(fields) == 1:
        [(name, kind)] = fields.items()
        return "", {name: _pg_field(name, kind)}
    columns = ", ".join(f"{name} {_PG_TYPES[kind]}" for name, kind in fields.items())
    return f", json_to_record(body::json) AS x({columns})", {n: f"x.{n}" for n in fields}


def _pg_field(name: str, kind: FieldKind) -> str:
    if kind == "json":
        return f"(body::json -> '{name}')"
    return f"(body::json ->> '{name}')" + ("::bigint" if kind == "number" else "")


def _sqlite_fields(fields: dict[str, FieldKind]) -> tuple[str, dict[str, str]]:
    return "", {name: _sqlite_field(name, kind) for name, kind in fields.items()}


def _sqlite_field(name: str, kind: FieldKind) -> str:
    return f"json_extract(body, '$.{name}')"  # (its value as it is: a number, text, JSON text)


@dataclass(frozen=True)
class Dialect:
    placeholder: str
    # The FROM-clause item (after `fetch_records`) and an expression per field that read these
    # fields of each record's body.
    body_fields: Callable[[dict[str, FieldKind]], tuple[str, dict[str, str]]]
    # One field of a record's body, read on its own (for a condition few records reach).
    body_field: Callable[[str, FieldKind], str]
    day: str  # `ts` as its UTC date, YYYY-MM-DD (the records' ts[:10])
    minute: str  # `ts` as its UTC minute, YYYY-MM-DDTHH:MM (the records' ts[:16])
    # An aggregate of `ts` as the records write it (`ts_text`), inside the store's own JSON.
    ts_text: Callable[[str], str]
    time_param: Callable[[str], Any]
    # A FROM-clause item: each element of a `json` field (an array, else none), as `e.value`.
    elements: Callable[[str], str]
    # The JSON array of a subquery's rows, each a JSON array of the columns named.
    rows_json: Callable[[str, str], str]
    json_object: str  # the function that makes a JSON object of its (name, value) arguments

    def counted(
        self,
        query: RecordQuery,
        kinds: tuple[str, ...],
        columns: str,
        fields: dict[str, FieldKind] | None = None,
    ) -> tuple[str, list[Any]]:
        """The records of `kinds` the query selects: their `columns`, and `fields` of their
        body (name: kind) by name, each body parsed once; without a refused CONNECT answered
        200: a tunnel opened to nowhere, each request in it refused and recorded on its own (an
        HTTPS fetch would count twice)."""
        item, field = self.body_fields(fields) if fields else ("", {})
        method, status = self.body_field("method", "text"), self.body_field("status", "number")
        listed = ", ".join(f"'{kind}'" for kind in kinds)
        where, params = self.where(
            query,
            f"kind IN ({listed})",
            # (its own reads of the body: only a refused record's body is read for it)
            f"NOT (decision = 'refused' AND coalesce({method}, '') = 'CONNECT' "
            f"AND coalesce({status}, 0) = 200)",
        )
        named = "".join(f", {field[name]} AS {name}" for name in field)
        return f"SELECT {columns}{named} FROM fetch_records{item} {where}", params  # noqa: S608

    def where(self, query: RecordQuery, *more: str) -> tuple[str, list[Any]]:
        """The query's WHERE clause (its values as parameters), with `more` conditions."""
        where, params = query.sql_where(self.placeholder, self.time_param)
        clauses = [where.removeprefix("WHERE ")] if where else []
        clauses += more
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


SQLITE = Dialect(
    placeholder="?",
    body_fields=_sqlite_fields,
    body_field=_sqlite_field,
    day="substr(ts, 1, 10)",
    minute="substr(ts, 1, 16)",
    ts_text=lambda aggregate: aggregate,
    time_param=str,
    elements=lambda field: (
        f"json_each(CASE WHEN json_type({field}) = 'array' THEN {field} ELSE '[]' END) AS e"
    ),
    # (json(): a subquery's value is text to json_object, which would quote it)
    rows_json=lambda rows, columns: (
        f"json((SELECT json_group_array(json_array({columns})) FROM ({rows}) AS g))"  # noqa: S608
    ),
    json_object="json_object",
)
POSTGRES = Dialect(
    placeholder="$",
    body_fields=_pg_fields,
    body_field=_pg_field,
    day="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    minute="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI')",
    ts_text=lambda aggregate: (
        f"to_char({aggregate} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    ),
    time_param=to_datetime,
    elements=lambda field: (
        f"json_array_elements_text(CASE WHEN json_typeof({field}) = 'array' "
        f"THEN {field} ELSE '[]'::json END) AS e(value)"
    ),
    rows_json=lambda rows, columns: (
        f"(SELECT coalesce(json_agg(json_build_array({columns})), '[]') FROM ({rows}) AS g)"  # noqa: S608
    ),
    json_object="json_build_object",
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
