"""What every fetch-log store (SQLite embedded, PostgreSQL shared) offers the log and the export."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from typing import Protocol

import asyncpg

from proxy.audit.schema import Schema

# The tables whose rows name a replica (a chain may have checkpoints and no records left).
_REPLICA_TABLES = ("fetch_records", "fetch_checkpoints")


def _distinct_replicas(tables: Sequence[str]) -> str:
    """Every replica in `tables`, in SQL both stores speak: one index probe per replica on the
    (replica, ...) primary keys instead of reading every row (retention asks every hour, on
    every replica, of a table that holds years of records)."""
    walks = ",\n".join(
        f"t{i}(replica) AS (SELECT min(replica) FROM {table} UNION ALL "  # noqa: S608 (constants)
        f"SELECT (SELECT min(replica) FROM {table} WHERE replica > t{i}.replica) "
        f"FROM t{i} WHERE t{i}.replica IS NOT NULL)"
        for i, table in enumerate(tables)
    )
    found = "\nUNION\n".join(
        f"SELECT replica FROM t{i} WHERE replica IS NOT NULL"  # noqa: S608 (constants)
        for i in range(len(tables))
    )
    return f"WITH RECURSIVE\n{walks}\n{found}\nORDER BY 1"


def replicas_sql(schema: Schema) -> str | None:
    """The replicas query for the tables the store's schema has (None: no tables yet)."""
    tables = [t for t in _REPLICA_TABLES if schema.has(t)]
    return _distinct_replicas(tables) if tables else None


@dataclass(frozen=True)
class PurgePoint:
    """Where retention may cut a replica's chain: records 1..seq, checkpoints 1..number."""

    seq: int
    hash: str  # of record `seq`: the next record's prev_hash
    records: int  # how many records the cut removes
    number: int | None  # last checkpoint whose seq <= `seq`, None when there is none
    note_hash: str | None  # SHA-256 of that checkpoint's signed note


# Errors of a store write that say what was written is wrong, not that the store is down,
# locked or slow: a value one store cannot take (PostgreSQL text cannot hold a NUL), a field
# missing. Writing the same item again fails the same way.
_REFUSED_ITEM_ERRORS: tuple[type[BaseException], ...] = (
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


def refuses_item(error: BaseException) -> bool:
    """Whether a failed write was refused for what it wrote (retrying it cannot help), rather
    than for the store's state (unreachable, locked, timing out: retrying will)."""
    return isinstance(error, _REFUSED_ITEM_ERRORS)


class ReplicaInUse(Exception):
    """Another running gateway writes the same replica's chain (the same replica id)."""


class KeyGoneBack(Exception):
    """The gateway's signing key signed the replica's chain before another key took over: going
    on under it would leave a log `audit verify` rejects (an old key signing after the new one
    is what a forger with a leaked old key would do)."""


class ChainForked(Exception):
    """The store holds rows of this replica's chain that this gateway did not write: another
    gateway ran under the same replica id (while this one had lost its claim, or on another
    store) and continued the chain from the same head. What this gateway has from that point
    on cannot follow those rows; writing it would drop it, or break the chain after it."""

    def __init__(
        self,
        replica: str,
        *,
        records: tuple[int, int] | None = None,
        checkpoints: tuple[int, int] | None = None,
        unlinked: int | None = None,
    ):
        self.replica = replica
        self.records = records  # first and last seq of the other writer's records
        self.checkpoints = checkpoints  # first and last number of its checkpoints
        self.unlinked = unlinked  # a seq whose stored predecessor is not the one ours follows
        found = []
        if records is not None:
            found.append(f"records {records[0]}..{records[1]}")
        if checkpoints is not None:
            found.append(f"checkpoints #{checkpoints[0]}..#{checkpoints[1]}")
        if unlinked is not None:
            found.append(
                f"a record {unlinked - 1} that this gateway's record {unlinked} does not follow"
            )
        super().__init__(
            f"the store holds {' and '.join(found) or 'rows'} of replica {replica!r} that this "
            "gateway did not write: another gateway ran under the same replica id; this one "
            "keeps its own records from there in its spool and ships nothing more (stop the "
            "duplicate, then see docs/kubernetes.md, 'Two gateways under one replica id')"
        )


class FetchStore(Protocol):
    """Where records end up. Writes are idempotent: a replayed spool, or a batch retried after
    its commit's acknowledgement was lost, may send a record twice. A row stored already with
    another hash (or a checkpoint with another note) is not this gateway's, nor is a stored
    record the batch's first record does not follow: the whole write fails with ChainForked,
    and nothing of it is stored."""

    async def open(self) -> None:
        """Connect and migrate the schema (several replicas may start at once)."""
        ...

    async def claim(self, replica: str) -> None:
        """Hold the replica's chain for this process until close(), or raise ReplicaInUse.

        Two processes with one replica id would both continue the chain from the same head;
        the second one's writes then fail with ChainForked (never dropped in silence). A claim
        lost with its connection is taken again before the next write, which fails with
        ChainForked if another writer moved the chain's head meanwhile."""
        ...

    def hold(self, replica: str) -> AbstractAsyncContextManager[bool]:
        """Hold another replica's chain for a while (retention of a replica that is gone):
        True while held, False when a running gateway claims it."""
        ...

    async def replicas(self) -> list[str]:
        """Every replica with records or checkpoints."""
        ...

    async def last(self, replica: str) -> tuple[int, str] | None:
        """The highest (seq, hash) stored for a replica."""
        ...

    async def last_checkpoint(self, replica: str) -> dict[str, Any] | None:
        """The replica's checkpoint with the highest number: {"number", "seq", "note"}."""
        ...

    async def last_purge(self, replica: str) -> dict[str, Any] | None:
        """The replica's newest purge note: {"seq", "number", "note"}."""
        ...

    async def checkpoints(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        """Checkpoints whose seq is in first..last, by number: {"number", "seq", "note"}."""
        ...

    async def holds(self, replica: str, record_id: str, ts: str) -> bool:
        """Whether the replica's chain has a record with this id and `ts` (a request's records
        all carry its start time): one probe of the (replica, ts) index. Raises ValueError for
        a `ts` that is not a record's timestamp."""
        ...

    async def write(
        self, records: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Store records, checkpoints, purge notes (type "purge") and witness notes (type
        "witness") in one transaction; ChainForked (nothing stored) when a record or checkpoint
        of the batch is stored already with another hash or note, or when the record before the
        batch's first is stored and is not the one it follows (its prev_hash)."""
        ...

    async def witnesses(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        """Witness notes of the replica whose seq is in first..last, by seq: {"seq", "note"}."""
        ...

    def records(self, replica: str, first: int, last: int) -> AsyncIterator[dict[str, Any]]:
        """Records first..last in seq order."""
        ...

    async def purge_point(self, replica: str, cutoff: str) -> PurgePoint | None:
        """The longest prefix of the chain whose records are all older than `cutoff`."""
        ...

    async def purge(self, replica: str, through_seq: int, through_number: int | None) -> int:
        """Delete records 1..through_seq, checkpoints 1..through_number and the witness notes
        of those records; returns how many records."""
        ...

    async def close(self) -> None: ...


class ChainReader(Protocol):
    """Read access for export and the admin API (chain order, keyset pagination)."""

    async def replicas(self) -> list[str]: ...

    async def seq_bounds(
        self, replica: str, since: str | None, until: str | None
    ) -> tuple[int, int] | None:
        """Lowest seq with ts >= since and highest with ts < until (None: nothing in range)."""
        ...

    async def last_checkpoint(self, replica: str) -> dict[str, Any] | None:
        """The replica's checkpoint with the highest number: {"number", "seq", "note"}."""
        ...

    async def last_purge(self, replica: str) -> dict[str, Any] | None:
        """The replica's newest purge note: {"seq", "number", "note"}."""
        ...

    async def checkpoint_below(self, replica: str, seq: int) -> dict[str, Any] | None:
        """The newest checkpoint whose seq is < `seq`."""
        ...

    async def checkpoint_from(self, replica: str, seq: int) -> dict[str, Any] | None:
        """The oldest checkpoint whose seq is >= `seq`."""
        ...

    async def first_seq(self, replica: str) -> int | None: ...

    async def last_seq(self, replica: str) -> int | None: ...

    def records(self, replica: str, first: int, last: int) -> AsyncIterator[dict[str, Any]]:
        """Records first..last in seq order."""
        ...

    async def checkpoints(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        """Checkpoints whose seq is in first..last, by number: {"number", "seq", "note"}."""
        ...

    async def witnesses(self, replica: str, first: int, last: int) -> list[dict[str, Any]]:
        """Witness notes whose seq is in first..last, by seq: {"seq", "note"}."""
        ...

    async def purge_note(self, replica: str, seq: int) -> dict[str, Any] | None:
        """The purge note that cut the chain after record `seq`, if any."""
        ...

    async def close(self) -> None: ...
