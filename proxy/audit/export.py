"""`crawlwarden audit export`: fetch records as JSON lines or CSV."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from typing import TextIO

from proxy.audit.query import RecordQuery
from proxy.audit.query import parse_time
from proxy.audit.record import FIELD_NAMES

DEFAULT_DATA_DIR = Path(".crawlwarden")


def to_jsonl(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for rec in records:
        yield json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def to_csv(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    """One column per record field; `signals` joined with ';'. Header first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(FIELD_NAMES), extrasaction="ignore")
    writer.writeheader()
    yield buf.getvalue()
    for rec in records:
        buf.seek(0)
        buf.truncate()
        row = dict(rec)
        if isinstance(row.get("signals"), list):
            row["signals"] = ";".join(row["signals"])
        writer.writerow(row)
        yield buf.getvalue()


def query_from_args(args: argparse.Namespace) -> RecordQuery:
    return RecordQuery(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        site=args.site,
        team=args.team,
    )


def open_records(args: argparse.Namespace, query: RecordQuery) -> Iterator[dict[str, Any]]:
    if args.audit_dsn:
        from proxy.audit.postgres_store import read_records as read_pg

        return read_pg(args.audit_dsn, query)
    from proxy.audit.sqlite_store import read_records

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    path = data_dir / "fetchlog.sqlite3"
    if not path.exists():
        raise FileNotFoundError(
            f"no fetch log at {path}; pass the gateway's --data-dir or --audit-dsn"
        )
    return read_records(path, query)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        query = query_from_args(args)
        records = open_records(args, query)
    except (ValueError, FileNotFoundError) as e:
        print(f"crawlwarden audit export: {e}", file=sys.stderr)
        return 2
    render = to_csv if args.format == "csv" else to_jsonl
    counted = _Counter(records)
    out: TextIO = args.output.open("w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        for chunk in render(counted):
            out.write(chunk)
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {counted.count} records to {args.output}", file=sys.stderr)
    return 0


class _Counter:
    def __init__(self, records: Iterable[dict[str, Any]]):
        self._records = records
        self.count = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for rec in self._records:
            self.count += 1
            yield rec
