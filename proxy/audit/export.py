"""`crawlwarden audit export` and the line stream behind `GET /v1/fetches` (FORMATS.md).

An export is JSON lines: a header, then per replica (sorted by name) its records in chain order,
each checkpoint right after the record it covers, so one file is enough for `audit verify`.
Time filters select a window of each chain, widened to the checkpoints around it; content
filters (site, team, project, decision) keep the chain whole and replace each record they leave
out by a redacted line that carries only its digest.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import csv
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import TextIO

from proxy.audit.checkpoint import CheckpointError
from proxy.audit.checkpoint import checkpoint_line
from proxy.audit.checkpoint import note_text
from proxy.audit.checkpoint import parse_text
from proxy.audit.query import RecordQuery
from proxy.audit.query import parse_time
from proxy.audit.record import FIELD_NAMES
from proxy.audit.record import body_sha256
from proxy.audit.record import utc_timestamp
from proxy.audit.schema import SchemaTooNew
from proxy.audit.store import ChainReader
from proxy.inputs import csv_cell

DEFAULT_DATA_DIR = Path(".crawlwarden")
FORMAT = "crawlwarden-fetchlog-export/1"
HASH_SCHEME = "sha256(prev_hash || sha256(canonical_json(record - prev_hash - hash)))"


@dataclass(frozen=True)
class ReplicaSpan:
    """The part of one replica's chain an export covers: records first..last."""

    replica: str
    first: int
    last: int
    anchored_by_purge: bool  # first-1 was cut by retention: the purge note anchors `first`

    @property
    def size(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: this replica's record `seq` (the API's opaque `cursor`)."""

    replica: str
    seq: int

    def encode(self) -> str:
        raw = json.dumps([self.replica, self.seq], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            replica, seq = json.loads(raw)
            if not isinstance(replica, str) or not isinstance(seq, int):
                raise TypeError
        except (binascii.Error, ValueError, TypeError) as e:
            raise ValueError(f"invalid cursor {text!r}: pass back the one a page returned") from e
        return cls(replica, seq)


_NO_END = 2**63 - 1  # the highest seq a store holds (PostgreSQL bigint)


async def plan(reader: ChainReader, query: RecordQuery) -> list[ReplicaSpan]:
    """Which records of each replica the export covers (decided before anything is streamed).

    Replicas in name order (code point order: the store's collation may sort otherwise, and
    the API's cursors compare names). Without `since`, a span starts at seq 1 or right after
    the purge note (retention), and without `until` it reaches the newest checkpoint or witness
    note of its chain, even where the store has no records that far (or none at all): records
    deleted from the store then show in `verify` as missing at the start or as a removed tail,
    not as a shorter log that verifies."""
    spans = []
    for replica in sorted(await reader.replicas()):
        if query.replica is not None and replica != query.replica:
            continue
        stored_first = await reader.first_seq(replica)
        if stored_first is None:
            if query.since is None and query.until is None:
                gone = await _signed_without_records(reader, replica)
                if gone is not None:
                    spans.append(gone)
            continue  # otherwise checkpoints only (an idle replica): nothing to check
        bounds = await reader.seq_bounds(replica, query.since, query.until)
        if bounds is None:
            continue
        low, high = bounds
        if query.since is not None:
            # Start right after the newest checkpoint below the window: the first record's
            # prev_hash is then signed, and no record at the start can go missing unseen.
            below = await reader.checkpoint_below(replica, low)
            low = max(stored_first, below["seq"] + 1) if below else stored_first
            anchored_by_purge = low == stored_first and low > 1
        else:
            # A whole chain starts at seq 1, or right after the purge note that cut its start,
            # even where the store has no records that far: records deleted from its start show
            # in `verify` as missing (beside the checkpoints still stored that signed them), not
            # as a shorter log that verifies.
            purge = await reader.last_purge(replica)
            low = min(stored_first, purge["seq"] + 1 if purge is not None else 1)
            anchored_by_purge = low > 1
        if query.until is not None:
            # End at the first checkpoint at or after the window, so the last record is signed
            # (or at a witness note, for the last records of a replica that stopped unsigned).
            after = await reader.checkpoint_from(replica, high)
            if after is None:
                witnessed = await reader.witnesses(replica, high, _NO_END)
                after = witnessed[0] if witnessed else None
            if after is not None:
                high = max(high, after["seq"])
        else:
            high = max(high, await _signed_to(reader, replica))
        spans.append(ReplicaSpan(replica, low, high, anchored_by_purge))
    return spans


async def _signed_to(reader: ChainReader, replica: str) -> int:
    """The highest seq a checkpoint or witness note of the chain signs (0: none)."""
    newest = await reader.last_checkpoint(replica)
    signed = newest["seq"] if newest is not None else 0
    witnessed = await reader.witnesses(replica, signed + 1, _NO_END)
    return witnessed[-1]["seq"] if witnessed else signed


async def _signed_without_records(reader: ChainReader, replica: str) -> ReplicaSpan | None:
    """A chain whose records are all gone from the store though a checkpoint signs some that
    retention did not delete: a span of no records that `verify` reports as deleted."""
    signed = await _signed_to(reader, replica)
    purge = await reader.last_purge(replica)
    purged = purge["seq"] if purge is not None else 0
    if signed <= purged:
        return None  # idle, or every record cut by retention
    return ReplicaSpan(replica, purged + 1, signed, purge is not None)


def page(
    spans: list[ReplicaSpan], start: Cursor | None, limit: int | None
) -> tuple[list[tuple[ReplicaSpan, int, int]], Cursor | None]:
    """The (span, first seq, last seq) pieces of a page of `limit` records; the next cursor."""
    pieces: list[tuple[ReplicaSpan, int, int]] = []
    left = limit
    for span in spans:
        first = span.first
        if start is not None:
            if span.replica < start.replica:
                continue
            if span.replica == start.replica:
                first = max(first, start.seq)
            if first > span.last:
                continue
        if left is not None and left <= 0:
            return pieces, Cursor(span.replica, first)
        last = span.last if left is None else min(span.last, first + left - 1)
        pieces.append((span, first, last))
        if left is not None:
            left -= last - first + 1
            if last < span.last:
                return pieces, Cursor(span.replica, last + 1)
    return pieces, None


def header(query: RecordQuery, spans: list[ReplicaSpan], source: str) -> dict[str, Any]:
    return {
        "type": "export",
        "format": FORMAT,
        "created": utc_timestamp(time.time()),
        "source": source,
        "filters": query.describe(),
        "redacted": bool(query.content_filters),
        "hash": HASH_SCHEME,
        "replicas": [{"replica": s.replica, "first": s.first, "last": s.last} for s in spans],
    }


def redact(rec: dict[str, Any]) -> dict[str, Any]:
    """A record the filters leave out: its place in the chain and digest, nothing it says."""
    return {
        "type": "redacted",
        "replica": rec["replica"],
        "seq": rec["seq"],
        "prev_hash": rec["prev_hash"],
        "body_sha256": body_sha256(rec),
        "hash": rec["hash"],
    }


def _checkpoint_item(stored: dict[str, Any], kind: str = "checkpoint") -> dict[str, Any]:
    note = stored["note"]
    try:
        return checkpoint_line(parse_text(note_text(note)), note)
    except CheckpointError:
        # Damaged in the store: export it as it is; verify will name it.
        return {"type": kind, **stored}


async def lines(
    reader: ChainReader,
    query: RecordQuery,
    pieces: list[tuple[ReplicaSpan, int, int]],
) -> AsyncIterator[dict[str, Any]]:
    """Records (or redacted lines) and checkpoints of the given pieces, in export order."""
    filtered = bool(query.content_filters)
    for span, first, last in pieces:
        if first == span.first and span.anchored_by_purge:
            purge = await reader.purge_note(span.replica, first - 1)
            if purge is not None:
                yield _checkpoint_item(purge)
        # The checkpoint right below the span belongs to its first piece.
        low = first - 1 if first == span.first else first
        pending = [_checkpoint_item(c) for c in await reader.checkpoints(span.replica, low, last)]
        witnesses = await reader.witnesses(span.replica, first, last)
        pending += [_checkpoint_item(w, "witness") for w in witnesses]
        # In seq order; at one seq, checkpoints by number (an idle log signs one head often).
        pending.sort(key=lambda item: (item["seq"], item["type"], item.get("number", 0)))
        pending.reverse()
        while pending and pending[-1]["seq"] < first:
            yield pending.pop()
        async for rec in reader.records(span.replica, first, last):
            if filtered and not query.matches(rec):
                yield redact(rec)
            else:
                yield {"type": "record", **rec}
            while pending and pending[-1]["seq"] <= rec["seq"]:
                yield pending.pop()
        while pending:  # only if records went missing from the store meanwhile
            yield pending.pop()


# -- rendering ---------------------------------------------------------------------------

CSV_COLUMNS = ["type", *FIELD_NAMES, "body_sha256", "checkpoint_note"]


def to_jsonl(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    for item in items:
        yield json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n"


def csv_header() -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=CSV_COLUMNS).writeheader()
    return buf.getvalue()


def csv_row(item: dict[str, Any]) -> str:
    """One CSV row; list fields (`signals`, `egress_public_ips`) joined with ';'. Export
    headers have no row."""
    if item.get("type") == "export":
        return ""
    row = dict(item)
    row.setdefault("type", "record")
    if row["type"] in ("checkpoint", "purge", "witness"):
        row = {
            "type": row["type"],
            "replica": row.get("replica"),
            "seq": row.get("seq"),
            "hash": row.get("hash"),
            "ts": row.get("time"),
            "checkpoint_note": row.get("note"),
        }
    for name in ("signals", "egress_public_ips"):
        if isinstance(row.get(name), list):
            row[name] = ";".join(row[name])
    for name, value in row.items():
        if isinstance(value, str):
            # A CSV is read in terminals and spreadsheets: no control character from the wire
            # (an escape sequence in a URL) and no formula reaches them as is.
            row[name] = csv_cell(value)
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(row)
    return buf.getvalue()


def to_csv(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Records (plain dicts or export lines) as CSV, header first."""
    yield csv_header()
    for item in items:
        text = csv_row(item)
        if text:
            yield text


# -- the CLI -----------------------------------------------------------------------------


def query_from_args(args: argparse.Namespace) -> RecordQuery:
    return RecordQuery(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        site=args.site,
        team=args.team,
        project=getattr(args, "project", None),
        decision=getattr(args, "decision", None),
    )


def open_reader(args: argparse.Namespace) -> tuple[Any, str]:
    """A ChainReader for --audit-dsn or --data-dir, and a description for the header."""
    if args.audit_dsn:
        from proxy.audit.postgres_store import PostgresStore

        return PostgresStore(args.audit_dsn, migrate_schema=False, pool_size=2), "postgresql"
    from proxy.audit.sqlite_store import SQLiteStore

    path = (args.data_dir or DEFAULT_DATA_DIR) / "fetchlog.sqlite3"
    return SQLiteStore(path, readonly=True), f"sqlite:{path}"


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = stream.isatty()
        self.done = 0
        self._shown = 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._shown > 0.1:
            self._shown = now
            self._draw()

    def _draw(self) -> None:
        share = min(1.0, self.done / self.total)
        bar = "#" * int(share * 30)
        self.stream.write(f"\rexporting [{bar:<30}] {self.done}/{self.total} records")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Counted:
    """Records written: in full, and redacted to their digests by the content filters."""

    full: int = 0
    redacted: int = 0

    def __str__(self) -> str:
        total = self.full + self.redacted
        if not self.redacted:
            return f"{total} records"
        return f"{total} records ({self.full} in full, {self.redacted} redacted by the filters)"


async def run_export(
    args: argparse.Namespace, out: TextIO, progress_stream: TextIO = sys.stderr
) -> Counted:
    query = query_from_args(args)
    reader, source = open_reader(args)
    await reader.open()
    try:
        spans = await plan(reader, query)
        pieces, _ = page(spans, None, None)
        progress = Progress(sum(s.size for s in spans), progress_stream)
        write: Callable[[dict[str, Any]], str]
        if args.format == "csv":
            out.write(csv_header())
            write = csv_row
        else:
            out.write(next(to_jsonl([header(query, spans, source)])))

            def write(item: dict[str, Any]) -> str:
                return json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n"

        count = Counted()
        async for item in lines(reader, query, pieces):
            out.write(write(item))
            if item["type"] == "record":
                count.full += 1
                progress.step()
            elif item["type"] == "redacted":
                count.redacted += 1
                progress.step()
        progress.finish()
        return count
    finally:
        await reader.close()


def cmd_export(args: argparse.Namespace) -> int:
    from proxy.record_source import read_errors

    # Written beside --output and renamed over it once whole: an export that fails (a store it
    # cannot reach, an invalid --since) leaves the file there as it was, an auditor's earlier
    # export perhaps, not emptied or cut short.
    partial = (
        args.output.with_name(f".{args.output.name}.{os.getpid()}.partial") if args.output else None
    )
    try:
        out: TextIO = (
            partial.open("w", encoding="utf-8", newline="") if partial is not None else sys.stdout
        )
        try:
            count = asyncio.run(run_export(args, out))
        finally:
            if partial is not None:
                out.close()
        if partial is not None:
            os.replace(partial, args.output)
            partial = None
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours. Point stdout at /dev/null so
        # the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SchemaTooNew as e:
        print(f"crawlwarden audit export: {e}", file=sys.stderr)
        return 1
    except read_errors() as e:
        print(f"crawlwarden audit export: {e}", file=sys.stderr)
        return 2
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    if args.output:
        print(f"wrote {count} to {args.output}", file=sys.stderr)
    filters = query_from_args(args).content_filters
    if filters and count.redacted and not count.full:
        # Every record redacted: a host given where the site is named by its policy rule id,
        # or a typo, looks like an export of a log with nothing of it (legal probe).
        named = ", ".join(f"{k}={v}" for k, v in filters.items())
        how = (
            " A record's site is the policy rule id that matched its host (its host where none"
            " did): `crawlwarden report` lists the sites in the log."
            if "site" in filters
            else ""
        )
        print(
            f"crawlwarden audit export: no record matched {named}; all {count.redacted} are "
            f"redacted.{how}",
            file=sys.stderr,
        )
    return 0
