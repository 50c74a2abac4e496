"""The fetch log of one replica: chain, spool, signed checkpoints, shipping, retention.

Life of a record: `begin()` writes a forwarded request to the spool before it leaves the gateway;
`append()` chains the finished record (seq, prev_hash, hash) and writes it to the spool; the ship
loop writes spool contents to the store in group commits; the spool segment is deleted once all it
holds is stored. Every `checkpoint_every_records` records or `checkpoint_every_seconds` seconds
(idle or not) the chain head is signed (proxy/audit/checkpoint.py); checkpoints travel in the same
queue behind the records they cover, so the store never holds a checkpoint ahead of its records.

Up to `memory_records` records not yet stored wait in memory whole; past that (a store outage,
a replayed spool) the queue holds only their places in the spool, and the ship loop reads them
back from it: an outage costs spool disk up to `spool_max_bytes`, not memory.

A spool that cannot be written (its disk is full) loses no finished fetch: the record of a
forwarded request is kept (`keep_until_room`, its begin stays open meanwhile) and written before
anything else once the spool has room; a refusal is counted (RefusalsNotKept), as past the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import time
import uuid
from collections import Counter
from collections import deque
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import structlog

from proxy import metrics
from proxy.audit.checkpoint import Checkpoint
from proxy.audit.checkpoint import CheckpointError
from proxy.audit.checkpoint import checkpoint_line
from proxy.audit.checkpoint import names_key
from proxy.audit.checkpoint import note_hash
from proxy.audit.checkpoint import note_text
from proxy.audit.checkpoint import open_note
from proxy.audit.checkpoint import parse_text
from proxy.audit.keys import Signer
from proxy.audit.record import GENESIS_HASH
from proxy.audit.record import FetchRecord
from proxy.audit.record import SerializedRecord
from proxy.audit.record import chain_record
from proxy.audit.record import record_hash
from proxy.audit.record import utc_timestamp
from proxy.audit.spool import Replayed
from proxy.audit.spool import ReplayedRecord
from proxy.audit.spool import Spool
from proxy.audit.spool import Spooled
from proxy.audit.spool import SpoolReadError
from proxy.audit.spool import hold_spool
from proxy.audit.store import ChainForked
from proxy.audit.store import FetchStore
from proxy.audit.store import KeyGoneBack
from proxy.audit.store import refuses_item
from proxy.audit.unauthenticated import EVENT_KIND as UNAUTHENTICATED_REFUSALS
from proxy.audit.unauthenticated import UnauthenticatedRefusals
from proxy.decision import Outcome
from proxy.decision import Reason

__all__ = ["FetchLog", "FetchLogClosed", "FetchStore"]

log = structlog.get_logger("crawlwarden.audit")

DAY = 86400.0
_HASH = re.compile(r"[0-9a-f]{64}")
# The chains of replicas that no longer run are looked at every WITNESS_EVERY checkpoint
# intervals for records their replica never signed (witness_orphans): a few index probes each.
WITNESS_EVERY = 5
# ... and signed only while their last checkpoint is at most WITNESS_WITHIN intervals old: a run
# killed signed its last one at most an interval before it died, a witness looks within
# WITNESS_EVERY after that, and one more covers the chain's release (PostgreSQL frees a lost
# node's session within about a minute), the look's own time and clock skew. An older one is
# a chain that stopped long ago, which signed all it wrote (a shutdown checkpoint) unless it
# was killed with nobody to look in time: a database writer without the key would otherwise
# have the records after its last periodic checkpoint signed, rewritten, at any time later.
WITNESS_WITHIN = WITNESS_EVERY + 2
# ... and never less than this: a replica lost with its node is replaced by Kubernetes after
# about 5 minutes (a Deployment of one: no other replica to look), and its chain stays claimed
# until PostgreSQL ends its session (about a minute); a short checkpoint interval must not put
# such a kill out of reach (review). A new run looks first after one interval.
WITNESS_WINDOW_MIN_SECONDS = 900.0
# A record bears its request's start, which may precede its chain's last checkpoint by as long
# as a request may last (network.transfer_timeout, delays): so far back it may be dated.
WITNESS_RECORD_SLACK_SECONDS = 3600.0
# After a failed spool write (disk full), how often the spool is tried for room again.
SPOOL_RETRY_SECONDS = 1.0
# At a stop, how long the cancelled ship and fsync tasks get to end before the store is closed
# under them (and then again after it).
_CANCEL_SECONDS = 1.0
# Past spool_max_bytes nothing more is forwarded, but refusals are still recorded one by one
# up to this share of it more; past that they are counted (RefusalsNotKept), so the spool's
# size stays bounded whatever a flood of refused requests brings.
REFUSALS_HEADROOM = 0.10
# A queued item the store refuses for what it holds (refuses_item) is retried alone this many
# times, then set aside: logged whole, counted, and shipping goes on past it.
SET_ASIDE_AFTER = 5


@dataclass
class RefusalsNotKept:
    """Refusals past the spool's headroom: counted by team, site and reason, recorded as one
    `refusals_not_kept` event once the spool has room (or when the log closes)."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    first_ts: str | None = None
    last_ts: str | None = None

    def add(self, rec: FetchRecord) -> None:
        self.counts[(rec.team or "-", rec.site or "-", rec.reason)] += 1
        self.first_ts = self.first_ts or rec.ts
        self.last_ts = rec.ts

    def note(self) -> str:
        return json.dumps(
            {
                "why": "the spool was past audit.spool_max_bytes and its headroom, or could "
                "not be written (no room on its disk): these refused requests were counted, "
                "not recorded one by one",
                "refused": sum(self.counts.values()),
                "first_ts": self.first_ts,
                "last_ts": self.last_ts,
                "by_team_site_reason": [
                    {"team": t, "site": s, "reason": r, "count": n}
                    for (t, s, r), n in sorted(self.counts.items())
                ],
            },
            sort_keys=True,
        )


class FetchLogClosed(Exception):
    """A record offered after the fetch log closed (a flow that outlived the gateway's stop)."""


class FetchLog:
    def __init__(
        self,
        store: FetchStore,
        spool_dir: Path,
        replica: str,
        *,
        spool_max_bytes: int = 10**9,
        batch_size: int = 1000,
        memory_records: int = 10_000,
        ship_interval: float = 0.2,
        fsync_interval: float = 1.0,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        signer: Signer | None = None,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 60.0,
        retention_days: int | None = None,
        purge_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.replica = replica
        self.spool = Spool(spool_dir)
        self._spool_max_bytes = 0
        self.spool_max_bytes = spool_max_bytes
        self.batch_size = batch_size
        self.memory_records = memory_records
        self.ship_interval = ship_interval
        self.fsync_interval = fsync_interval
        self.on_record = on_record
        self.signer = signer
        self.checkpoint_every_records = checkpoint_every_records
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self.retention_days = retention_days
        self.purge_interval = purge_interval
        self.clock = clock
        self.seq = 0
        self.head = GENESIS_HASH
        self.shipped_seq = 0
        # Checkpoint chain: the last one issued; and how far retention has cut the chain.
        self.checkpoint_number = 0
        self.checkpoint_prev = GENESIS_HASH
        self.checkpoint_seq = 0
        self.shipped_checkpoint = 0
        self.purged_seq = 0
        self.purged_number = 0
        self._purged_hash = GENESIS_HASH  # record purged_seq's hash (the purge note's)
        # What the store still lacks, in order: records (in memory, or their places in the
        # spool past `memory_records`), checkpoints and purge notes.
        self._queue: deque[dict[str, Any] | Spooled] = deque()
        self.held_in_memory = 0  # records of the queue held whole
        # (seq, when it entered the spool) of each queued record: the fetch log lag metric.
        self._pending: deque[tuple[int, float]] = deque()
        self._wake = asyncio.Event()
        self._retry_counted = 0  # records at the head of the queue counted as retry already
        self._checkpoint_wake = asyncio.Event()
        self._checkpointed_at = time.monotonic()  # the last checkpoint (or the start)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.closed = False
        self._spool_error: OSError | None = None
        self._spool_failed_at = 0.0  # monotonic: when a write last failed, or room was looked for
        self._not_kept: RefusalsNotKept | None = None
        self.unauthenticated = UnauthenticatedRefusals()
        # Finished records of forwarded requests the spool had no room for, in order: written
        # first once it has room. At most one per begin still open in the spool, and no begin is
        # written while any waits (`begin`): bounded by the requests under way at the failure.
        self._unwritten: deque[dict[str, Any]] = deque()
        self.store_ok = True
        # Another gateway wrote this replica's chain in the store: nothing more is shipped
        # (the records stay in the spool) and the log takes no more records (unready).
        self.chain_forked: ChainForked | None = None
        self.set_aside = 0  # items the store refused, left out of it (see _set_aside)
        # What this replica's witness looks saw of other chains: the highest checkpoint number
        # of each, and how far it witnessed each. A database writer who deletes a checkpoint (a
        # shutdown one) or a witness note seen here, to have the chain witnessed (again, as it
        # wants it), is refused. `_refused`: the head seq of each chain refused (logged once).
        self._checkpoints_seen: dict[str, int] = {}
        self._witnessed: dict[str, int] = {}
        self._refused: dict[str, int] = {}

    # -- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the store, replay the spool, resume the chain where it stopped."""
        await self.store.open()
        await self.store.claim(self.replica)
        replayed = self.spool.open()
        stored = await self.store.last(self.replica)
        try:
            await self._check_replayed(replayed, stored)
        except ChainForked as e:
            # Before any of it is skipped as stored, or retired: the spool stays as it is.
            log.error(
                "fetchlog_chain_forked",
                replica=self.replica,
                other_records=e.records,
                kept_in=str(self.spool.directory),
                error=str(e),
            )
            # Closed here, before close() could record the spool's unfinished requests as
            # interrupted on top of a chain it never resumed.
            self._closing = self.closed = True
            self.spool.close()
            await self.store.close()
            raise
        if stored is not None:
            self.seq, self.head = stored
            self.shipped_seq = stored[0]
        key_changed = await self._resume_checkpoints()
        if key_changed is not None and (gone_back := await self._signed_before()) is not None:
            self._closing = self.closed = True
            self.spool.close()
            await self.store.close()
            raise KeyGoneBack(gone_back)
        if self.purged_seq > self.seq:
            # Every stored record of this chain was purged (retention, by another replica while
            # this one did not run): it goes on after the purge note, never from genesis again,
            # and records of its spool at or below it were stored (and purged) already.
            self.seq = self.shipped_seq = self.purged_seq
            self.head = self._purged_hash
        gap_reported = False
        for rec in self._with_damaged_places(replayed):
            seq = rec.spooled.seq
            if seq <= self.shipped_seq:
                continue
            if seq != self.seq + 1:
                # A damaged spool line: the chain has a hole that verify will report. Say so now.
                metrics.AUDIT_RECORDS.labels(outcome="lost").inc(seq - self.seq - 1)
                if not gap_reported:
                    log.error("spool_chain_gap", replica=self.replica, after=self.seq, next=seq)
                    gap_reported = True
            self.seq, self.head = seq, rec.hash
            self._queue.append(rec.spooled)  # read back from the spool when shipped
            self._pending.append((seq, _parse_ts(rec.ts) or self.clock()))
        interrupted = 0
        for began in replayed.unfinished:
            if await self._stored_already(began):
                continue
            # Interrupted mid-flight (kill -9, crash): the request left, its answer is unknown.
            self._append_interrupted(began)
            interrupted += 1
        if key_changed is not None:
            self.new_event("signing_key", key_changed, reason="signing_key_changed")
        if replayed.records or replayed.unfinished:
            log.info(
                "spool_replayed",
                replica=self.replica,
                to_ship=len(self._queue),
                interrupted=interrupted,
                damaged_lines=replayed.damaged_lines,
            )
        if self.signer is None:
            log.warning("fetchlog_unsigned", replica=self.replica, checkpoints=False)
        metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
        self.spool.retire(self.shipped_seq)  # segments of earlier runs that are all stored
        # Read at scrape time: a stuck store shows as a lag that grows between ship attempts,
        # and the spool as it is (it trailed the refusals of a full spool by a second).
        metrics.AUDIT_SPOOL_BYTES.set_function(lambda: float(self.spool.size))
        metrics.AUDIT_LAG.set_function(self.lag_seconds)
        metrics.AUDIT_AVAILABLE.set_function(lambda: 1.0 if self.available else 0.0)
        self._tasks = [
            asyncio.create_task(self._ship_loop(), name="fetchlog-ship"),
            asyncio.create_task(self._sync_loop(), name="fetchlog-fsync"),
        ]
        if self.signer is not None:
            self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="fetchlog-ckpt"))
            self._tasks.append(asyncio.create_task(self._witness_loop(), name="fetchlog-witness"))
        if self.retention_days is not None:
            self._tasks.append(asyncio.create_task(self._purge_loop(), name="fetchlog-purge"))
        if self.signer is not None:
            # Signed at once: this run's records are then after a checkpoint of its own, so a
            # run killed before its first periodic one (or restarted after a clean stop) is
            # witnessed like any other (witness_orphans).
            self.checkpoint("start")

    async def _check_replayed(self, replayed: Replayed, stored: tuple[int, str] | None) -> None:
        """ChainForked if the spool holds records the store has other ones at: another gateway
        wrote this replica's chain while this one's records waited in its spool (it lost its
        claim, then stopped). Replay would skip them as stored and retire them."""
        if stored is None:
            return
        mine = {r.spooled.seq: r for r in replayed.records if r.spooled.seq <= stored[0]}
        if not mine:
            return
        theirs: dict[int, str] = {}
        top = max(mine)
        # The chain links each record to the one before: the newest one agreeing is enough.
        async for rec in self.store.records(self.replica, top, top):
            theirs[rec["seq"]] = rec["hash"]
        if theirs.get(top, mine[top].hash) == mine[top].hash:
            return
        async for rec in self.store.records(self.replica, min(mine), top):
            theirs[rec["seq"]] = rec["hash"]
        differ = [r for seq, r in sorted(mine.items()) if theirs.get(seq, r.hash) != r.hash]
        # A spool line damaged on disk (its hash no longer its record's) is no other writer's.
        lines = await asyncio.to_thread(self.spool.read, [r.spooled for r in differ])
        forked = [
            r.spooled.seq
            for r, line in zip(differ, lines, strict=True)
            if line is not None and record_hash(line[0]) == line[0].get("hash") == r.hash
        ]
        if forked:
            raise ChainForked(self.replica, records=(forked[0], stored[0]))

    async def _resume_checkpoints(self) -> str | None:
        """Pick the checkpoint chain up where it stopped; returns what to record if the
        signing key is no longer the one that signed it."""
        last = await self.store.last_checkpoint(self.replica)
        changed = None
        if last is not None:
            previous = parse_text(note_text(last["note"]))
            self.checkpoint_number = self.shipped_checkpoint = previous.number
            self.checkpoint_prev = note_hash(last["note"])
            self.checkpoint_seq = previous.seq
            changed = self._key_change(last["note"], previous.number)
        purge = await self.store.last_purge(self.replica)
        if purge is not None:
            self.purged_seq, self.purged_number = purge["seq"], purge["number"]
            anchor = parse_text(note_text(purge["note"]))
            self._purged_hash = anchor.hash
            if purge["number"] > self.checkpoint_number:
                # Its checkpoints were all purged too: number on from the purge note, whose
                # `prev` is what the next checkpoint's must be.
                self.checkpoint_number = self.shipped_checkpoint = purge["number"]
                self.checkpoint_prev = anchor.prev
                self.checkpoint_seq = purge["seq"]
                changed = changed or self._key_change(purge["note"], purge["number"])
        return changed

    def _with_damaged_places(self, replayed: Replayed) -> list[ReplayedRecord]:
        """The replayed records, with the places of whole lines that fail their hash where no
        intact line has their seq. Such a line was written in full, so its seq was handed out
        (the decision log line names it): the chain keeps it, and reading it back reports it
        lost, a hole verify reports, rather than a later record taking its seq. A seq it claims
        is believed only where damage cannot have made it up: a hash that is a hash, and no
        further than one seq per damaged line past the replay's last record."""
        records = {rec.spooled.seq: rec for rec in replayed.records}
        reach = max([self.shipped_seq, *records]) + len(replayed.damaged)
        for seq, rec in replayed.damaged.items():
            if seq not in records and seq <= reach and _HASH.fullmatch(rec.hash):
                records[seq] = rec
                self.spool.keep(rec.spooled)
        return [records[seq] for seq in sorted(records)]

    async def _stored_already(self, began: dict[str, Any]) -> bool:
        """Whether the store holds a record of a request whose begin the replay found
        unfinished. Its record line may be damaged, or in a segment retired before the begin's
        (another request kept that one open): recording it again as interrupted would count one
        fetch twice, under one id."""
        try:
            held = await self.store.holds(self.replica, str(began["id"]), str(began["ts"]))
        except (KeyError, ValueError):  # a begin without a readable time: not looked up
            return False
        if held:
            log.warning("spool_begin_already_stored", replica=self.replica, id=began["id"])
        return held

    async def _signed_before(self, window: int = 1_000_000) -> str | None:
        """With the key changed: where the key now in use signed an earlier checkpoint of this
        chain (a key gone back to), said as the reason not to start; None if it never did.
        The chain's checkpoints are read a window of seqs at a time; each signature's key ID
        is compared before anything is verified."""
        assert self.signer is not None
        verifier = self.signer.verifier
        first = 0
        while first <= self.checkpoint_seq:
            for point in await self.store.checkpoints(self.replica, first, first + window - 1):
                if not names_key(point["note"], verifier):
                    continue
                try:
                    open_note(point["note"], verifier)
                except CheckpointError:
                    continue
                return (
                    f"the signing key now in use (key ID {verifier.key_id.hex()}) signed "
                    f"checkpoint #{point['number']} of replica {self.replica}'s fetch log, and "
                    f"another key signed checkpoint #{self.checkpoint_number} since: a log that "
                    "goes back to an earlier key fails `audit verify` (an old key signing after "
                    "the new one is what a forger with a leaked key would do). Give the gateway "
                    "the key that signed last, or a new one (crawlwarden keys generate)"
                )
            first += window
        return None

    def _key_change(self, note: str, number: int) -> str | None:
        """A note the current key did not sign: the key was changed (an embedded gateway given
        `audit.signing_key_file`, a rotated fleet key). The chain goes on under the new key;
        an auditor then verifies with both public keys, and the change is on the record."""
        if self.signer is None:
            return None
        try:
            open_note(note, self.signer.verifier)
        except CheckpointError as e:
            now = self.signer.verifier.key_id.hex()
            log.warning(
                "signing_key_changed", replica=self.replica, checkpoint=number, now=now, why=str(e)
            )
            return (
                f"the signing key changed: checkpoints up to #{number} of this replica are not "
                f"signed by the key now in use (key ID {now}); verify the log with every public "
                f"key it was signed with (audit verify --public-key OLD --public-key NEW) ({e})"
            )
        return None

    async def close(self, timeout: float = 30.0) -> None:
        """Sign the head, ship everything queued (waiting up to `timeout`), then stop."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):  # logged by _spool_failed
            self._catch_up()
        if self._unwritten:
            # The disk had no room until the end: their begins stay in the spool, and the next
            # run of this replica records them interrupted.
            log.error("fetchlog_unwritten_at_exit", records=len(self._unwritten), kept_in="spool")
        unfinished = self.spool.unfinished()
        if unfinished:
            # Still in flight when the gateway stopped (its drain ran out): recorded now, not
            # left in the spool for a next run of this replica that may never come.
            log.warning("fetchlog_unfinished_at_exit", records=len(unfinished))
            try:
                for began in unfinished:
                    self._append_interrupted(began)
            except OSError:
                pass  # logged by _spool_failed; the begins stay in the spool for the next run
        with contextlib.suppress(OSError):  # logged by _spool_failed; lost then (logged)
            self._record_unauthenticated(self.clock(), closing=True)
        if self.unauthenticated.total:
            log.error(
                "fetchlog_unauthenticated_refusals_not_recorded", refused=self.unauthenticated.total
            )
        if self.signer is not None and self._tasks:
            self.checkpoint("shutdown")
        self._wake.set()
        deadline = time.monotonic() + timeout
        while (
            self._queue
            and time.monotonic() < deadline
            and self._tasks
            and self.chain_forked is None
        ):
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A write on a connection that never answers (PostgreSQL's host gone without a
            # reset) would hold its cancellation for the store's command timeout: the store's
            # bounded close cuts such connections, which ends it.
            _, stuck = await asyncio.wait(self._tasks, timeout=_CANCEL_SECONDS)
            if stuck:
                await self.store.close()
                await asyncio.wait(stuck, timeout=_CANCEL_SECONDS)
        else:
            stuck = set()
        self._tasks = []
        if self._queue:
            log.error("fetchlog_unshipped_at_exit", records=len(self._queue), kept_in="spool")
        self.spool.close()
        self.closed = True
        if not stuck:  # (else closed above, once: SQLite's store cannot close twice)
            await self.store.close()

    # -- writing ---------------------------------------------------------------------------

    @property
    def checkpoint_every_seconds(self) -> float:
        return self._checkpoint_every_seconds

    @checkpoint_every_seconds.setter
    def checkpoint_every_seconds(self, value: float) -> None:
        """A reload may shorten the interval: the idle timer, which was started with the old
        one (an hour, say), starts again with the new one, so the next checkpoint comes within
        it rather than when the old one runs out."""
        shorter = value < getattr(self, "_checkpoint_every_seconds", value)
        self._checkpoint_every_seconds = value
        if shorter and (wake := getattr(self, "_checkpoint_wake", None)) is not None:
            wake.set()

    @property
    def spool_max_bytes(self) -> int:
        return self._spool_max_bytes

    @spool_max_bytes.setter
    def spool_max_bytes(self, value: int) -> None:
        self._spool_max_bytes = value
        metrics.AUDIT_SPOOL_LIMIT_BYTES.set(value)

    def lag_seconds(self) -> float:
        """Age of the oldest record not yet in the store; 0 when all are stored."""
        if not self._pending:
            return 0.0
        return max(0.0, self.clock() - self._pending[0][1])

    @property
    def available(self) -> bool:
        """False while the spool is past its limit or cannot be written: fail closed then.
        After a failed write (disk full) it looks for room again every SPOOL_RETRY_SECONDS.
        False for good once the store holds another gateway's rows of this chain."""
        if self.chain_forked is not None:
            return False
        if self._spool_unwritable():
            return False
        return self.spool.size < self.spool_max_bytes

    def _spool_writable_again(self) -> bool:
        """Whether the spool has room again (looked for every SPOOL_RETRY_SECONDS); if so, what
        waited for it is written first (`_catch_up`)."""
        now = time.monotonic()
        if self.closed or now - self._spool_failed_at < SPOOL_RETRY_SECONDS:
            return False
        self._spool_failed_at = now
        if not self.spool.has_room():
            return False
        error, self._spool_error = self._spool_error, None
        waited = len(self._unwritten)
        try:
            self._catch_up()
        except OSError:
            return False  # filled up again (logged by _spool_failed)
        log.warning("fetchlog_spool_writable_again", error=repr(error), records_written=waited)
        return True

    def _spool_unwritable(self) -> bool:
        """A write failed and the spool has not had room since: no line is tried meanwhile."""
        return self._spool_error is not None and not self._spool_writable_again()

    def _catch_up(self) -> None:
        """Write what waited for the spool to have room: the finished records it could not
        take, then the refusals only counted (once the spool is below its limit). A failed
        write raises (logged by _spool_failed); what is not written yet waits on."""
        while self._unwritten:
            self.append_dict(self._unwritten[0])
            self._unwritten.popleft()
        if self._not_kept is not None and self.spool.size < self.spool_max_bytes:
            self._record_not_kept()

    def begin(self, rec: FetchRecord) -> None:
        """Note a request that is about to be forwarded, before it leaves the gateway. Raises
        OSError while the spool cannot be written, or cannot write the records that wait."""
        self._catch_up()  # (so nothing is forwarded while they wait: they stay bounded)
        try:
            self.spool.begin(rec.to_dict())
        except OSError as e:
            self._spool_failed(e)
            raise

    def append(self, rec: FetchRecord) -> dict[str, Any] | None:
        """Chain and spool the record; None for a refusal only counted (RefusalsNotKept): the
        spool is past its limit and its headroom, or cannot be written (its disk is full).
        Raises OSError for any other record the spool cannot take (`keep_until_room`)."""
        if rec.decision != Outcome.REFUSED or rec.kind != "fetch" or self.has_begun(rec.id):
            # A record that must be written: a fetch that reached the site, an event, or a
            # request begun (forwarded) that ended refused before it left (its begin closes
            # only with its record, or a stop would record it forwarded, response unknown).
            # Those that waited for room go first.
            self._catch_up()
            if self._not_kept is not None and self.spool.size < self.spool_max_bytes:
                self._record_not_kept()
            return self.append_dict(rec.to_dict())
        if rec.team is None and not self._admit_unauthenticated(rec):
            return None
        if not self._spool_unwritable():
            # A failed write (logged by _spool_failed) counts the refusal, as past the headroom.
            with contextlib.suppress(OSError):
                if self._not_kept is not None and self.spool.size < self.spool_max_bytes:
                    self._record_not_kept()
                if self.spool.size < self.spool_max_bytes * (1 + REFUSALS_HEADROOM):
                    return self.append_dict(rec.to_dict())
        self._count_not_kept(rec)
        return None

    def _admit_unauthenticated(self, rec: FetchRecord) -> bool:
        """Whether a refusal of no team's is recorded on its own, not counted (past its client
        address's share of the window: proxy/audit/unauthenticated.py)."""
        if self.closed:  # (its counts were recorded as the log closed: this one would be lost)
            raise FetchLogClosed(f"the fetch log is closed; record {rec.id} not written")
        now = self.clock()
        with contextlib.suppress(OSError):  # logged by _spool_failed; the counts wait
            self._record_unauthenticated(now)  # the window that ended
        if self.unauthenticated.admit(rec, now):
            return True
        metrics.AUDIT_RECORDS.labels(outcome="counted_unauthenticated").inc()
        return False

    def _record_unauthenticated(self, now: float, *, closing: bool = False) -> None:
        """Record the unauthenticated refusals counted, once due (or closing). While the spool
        cannot be written they wait (and go on being counted); a failed write raises."""
        counts = self.unauthenticated
        if not (closing or counts.due(now)) or self._spool_unwritable():
            return
        if counts.total:
            self.new_event(UNAUTHENTICATED_REFUSALS, counts.note())
        counts.recorded_event(now)

    def has_begun(self, rec_id: str) -> bool:
        """Whether the request's begin is in the spool, waiting for its record."""
        return self.spool.has_begun(rec_id)

    def keep_until_room(self, rec: FetchRecord) -> None:
        """Keep the finished record of a forwarded request that the spool had no room for (a
        failed `append`): it is written before anything else once the spool has room, and its
        begin stays open until then (a stop before that records it interrupted)."""
        if self.closed:
            raise FetchLogClosed(f"the fetch log is closed; record {rec.id} not written")
        self._unwritten.append(rec.to_dict())
        log.warning("fetchlog_record_waits_for_room", id=rec.id, waiting=len(self._unwritten))

    def _count_not_kept(self, rec: FetchRecord) -> None:
        """A refusal counted, not recorded on its own (recorded in one `refusals_not_kept`)."""
        if self._not_kept is None:
            self._not_kept = RefusalsNotKept()
            log.error(
                "fetchlog_refusals_not_kept",
                spool_bytes=self.spool.size,
                spool_error=repr(self._spool_error) if self._spool_error else None,
                note="refusals are counted, not recorded one by one, until the spool has room",
            )
        self._not_kept.add(rec)
        metrics.AUDIT_RECORDS.labels(outcome="not_kept").inc()

    def _record_not_kept(self) -> None:
        assert self._not_kept is not None
        # A failed write (logged by _spool_failed) raises before the counts are let go: they
        # stay for the next try.
        self.new_event("refusals_not_kept", self._not_kept.note(), reason="spool_full")
        self._not_kept = None

    def append_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """Chain the record and put it in the spool; it reaches the store shortly after.

        The chain state moves only once the spool has the line: a failed write (disk full)
        raises and leaves no hole in the chain.
        """
        if self.closed:
            raise FetchLogClosed(f"the fetch log is closed; record {data.get('id')} not written")
        seq = self.seq + 1
        data["replica"] = self.replica
        data["seq"] = seq
        data["prev_hash"] = self.head
        data["hash"] = None
        try:
            text = chain_record(data)
        except UnicodeEncodeError:
            # Bytes that were not UTF-8 reach us as lone surrogates, which no UTF-8 JSON can
            # carry. Callers refuse such input; should one slip through, the record is kept
            # with those bytes written out as \xNN rather than lost.
            _make_utf8(data)
            text = chain_record(data)
        try:
            place = self.spool.finish(text.encode(), data["id"], seq)
        except OSError as e:
            self._spool_failed(e)
            raise
        # The store writes the same text as its body column: serialised once, not twice.
        data = SerializedRecord(data, text)
        self.seq, self.head = seq, data["hash"]
        if self.held_in_memory < self.memory_records:
            self._queue.append(data)
            self.held_in_memory += 1
        else:
            self._queue.append(place)  # the store is behind: memory stays bounded
        self._pending.append((seq, self.clock()))
        metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
        if len(self._queue) >= self.batch_size:
            self._wake.set()
        if self.on_record is not None:
            self.on_record(data)
        if (
            self.signer is not None
            and self.seq - self.checkpoint_seq >= self.checkpoint_every_records
        ):
            self.checkpoint()
        return data

    def _append_interrupted(self, began: dict[str, Any]) -> None:
        """A forwarded request's begin, recorded as interrupted: it left, its answer is unknown."""
        began.update(
            decision=str(Outcome.FORWARDED),
            reason=str(Reason.INTERRUPTED),
            note="the gateway stopped before this request finished; its response is unknown",
        )
        self.append_dict(began)

    def _spool_failed(self, error: OSError) -> None:
        self._spool_error = error
        self._spool_failed_at = time.monotonic()
        metrics.AUDIT_RECORDS.labels(outcome="spool_error").inc()
        log.error("fetchlog_spool_write_failed", error=repr(error), spool=str(self.spool.directory))

    def new_event(self, kind: str, note: str, **fields: Any) -> dict[str, Any]:
        """Append a record that is not a fetch: a takedown, a purge, a blocklist change."""
        now = self.clock()
        rec = FetchRecord(
            id=fields.pop("id", None) or _new_id(),
            ts=utc_timestamp(now),
            method="-",
            url=fields.pop("url", ""),
            decision=fields.pop("decision", "event"),
            reason=fields.pop("reason", kind),
            kind=kind,
            note=note,
            **fields,
        )
        return self.append_dict(rec.to_dict())  # events are always kept

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, kind: str = "periodic") -> dict[str, Any] | None:
        """Sign the chain head now; the checkpoint is stored right after the records it covers."""
        self._checkpointed_at = time.monotonic()
        if self.signer is None:
            return None
        checkpoint = Checkpoint(
            replica=self.replica,
            number=self.checkpoint_number + 1,
            seq=self.seq,
            hash=self.head,
            time=utc_timestamp(self.clock()),
            prev=self.checkpoint_prev,
            kind=kind,
        )
        note = checkpoint.sign(self.signer)
        self.checkpoint_number = checkpoint.number
        self.checkpoint_prev = note_hash(note)
        self.checkpoint_seq = checkpoint.seq
        item = checkpoint_line(checkpoint, note)
        self._queue.append(item)
        self._wake.set()
        self._checkpoint_wake.set()  # restart the idle timer
        return item

    async def _checkpoint_loop(self) -> None:
        while True:
            self._checkpoint_wake.clear()
            left = self.checkpoint_every_seconds - (time.monotonic() - self._checkpointed_at)
            if left <= 0:
                # T seconds without a checkpoint, idle or not: sign the head (even unchanged,
                # so a later export shows the log was alive and had not grown). Also at once
                # when a reload shortened T below the time since the last one.
                self.checkpoint()
                continue
            with contextlib.suppress(TimeoutError):
                # Woken by a checkpoint made elsewhere (records), or a reload that shortened T.
                await asyncio.wait_for(self._checkpoint_wake.wait(), left)

    # -- retention -------------------------------------------------------------------------

    async def purge(
        self, now: float | None = None, days: int | None = None
    ) -> dict[str, Any] | None:
        """Delete this replica's records older than the retention period (a chain prefix).

        Crash-safe order: the purge record and a signed purge note (records 1..P and
        checkpoints 1..K deleted; record P's hash; checkpoint K's note hash) are stored first,
        then the rows are deleted; a crash in between leaves rows that the next run deletes.
        The cut is a prefix of the chain: a record stays while any record before it is younger
        than the cutoff (a long request that started earlier finishes later), so a few records
        may outlive the period by the length of a request.
        """
        cutoff = self._cutoff(now, days)
        if cutoff is None:
            return None

        def noted(seq: int, number: int) -> None:  # the purge note is stored: never cut twice
            self.purged_seq, self.purged_number = seq, number

        return await self._purge_chain(
            self.replica, cutoff, self.purged_seq, self.purged_number, "", noted
        )

    async def purge_orphans(
        self, now: float | None = None, days: int | None = None
    ) -> list[dict[str, Any]]:
        """Apply retention to the chains of replicas that no longer run.

        Each replica purges its own chain; a replica that is gone (a Deployment's old pod, a
        renamed host) never will. A chain is taken over only while no running gateway holds its
        replica id (the store's lock, and the spool's lock on this data dir), and is held for
        the purge. Its purge note is signed for its chain, the purge record goes in ours.
        """
        cutoff = self._cutoff(now, days)
        if cutoff is None:
            return []
        done = []
        for replica in await self.store.replicas():
            if replica == self.replica:
                continue
            async with self._hold_chain(replica) as held:
                if not held:
                    continue
                last = await self.store.last_purge(replica)
                seq, number = (last["seq"], last["number"]) if last else (0, 0)
                result = await self._purge_chain(
                    replica, cutoff, seq, number, " (that replica no longer runs)"
                )
            if result is not None:
                done.append(result)
        return done

    # -- witnesses ---------------------------------------------------------------------------

    async def witness_orphans(self) -> list[dict[str, Any]]:
        """Sign the stored records that replicas which no longer run never signed.

        A replica killed, or lost with its node, before its next checkpoint leaves its last
        records unsigned for good when it never runs again under its id (a Deployment's pod
        names). A running replica that can hold that chain (no gateway claims it) reads them,
        checks that they link to what was signed, and signs a witness note for them: not a
        numbered checkpoint of that chain, so it never forks the replica's own should it come
        back (it covers a prefix that replica's later checkpoints extend). The witness record
        goes in our chain. Records that do not link are not signed (logged, a store error).

        What a witness signs is what the store held, so the rule is narrow: only a chain whose
        last checkpoint is a start or periodic one of its own (never signed: rows put in the
        store by hand; a shutdown checkpoint: that replica signed all it wrote) signed at most
        WITNESS_WITHIN checkpoint intervals ago, and never less than WITNESS_WINDOW_MIN_SECONDS
        (older: it stopped long ago, and a missing shutdown checkpoint may have been deleted),
        whose records after it are dated around it, and only once after it: rows appended to a
        dead chain later stay unsigned. Every run signs a start checkpoint when it opens the
        log, so a run killed at once is witnessed too. A chain refused is logged
        (`witness_refused`); its records stay unsigned.
        """
        if self.signer is None:
            return []
        done = []
        for replica in await self.store.replicas():
            if replica == self.replica:
                continue
            async with self._hold_chain(replica) as held:
                if not held:
                    continue  # a running gateway writes it
                try:
                    item = await self._witness(replica)
                except Exception as e:  # a damaged note: that chain, not every other one
                    metrics.STORE_ERRORS.labels(store="audit").inc()
                    log.error("witness_failed", replica=replica, error=repr(e))
                    continue
                if item is None:
                    continue
                done.append(item)
                self.checkpoint()  # sign the witness record itself
                # Stored before the chain is let go: another replica holding it next sees the
                # note, and signs no second one.
                if not await self.flushed(timeout=30.0):
                    log.warning("witness_deferred", reason="store unavailable")
                else:  # (a note still queued is not one the store lost)
                    self._witnessed[replica] = item["through_seq"]
        return done

    async def _witness(self, replica: str) -> dict[str, Any] | None:
        assert self.signer is not None
        stored = await self.store.last(replica)
        if stored is None:
            return None
        seq, head = stored
        last = await self.store.last_checkpoint(replica)
        if last is None:
            return None  # never signed: nothing says a gateway wrote it (rows put in by hand)
        try:
            # Its kind, time and number as signed: a database writer can put any text in the
            # row (a periodic checkpoint signed a moment ago), or another chain's note.
            checkpoint = _own_note(last["note"], replica, self.signer)
        except CheckpointError as e:
            self._refuse(replica, seq, f"its last checkpoint is not one it signed ({e})")
            return None
        seen = self._checkpoints_seen.get(replica, 0)
        if checkpoint.number < seen:
            # Numbers only grow (retention cuts from the first; a replica that comes back
            # numbers on): the one an earlier look saw was deleted since.
            self._refuse(replica, seq, f"its checkpoint #{seen} seen earlier is gone")
            return None
        self._checkpoints_seen[replica] = checkpoint.number
        if checkpoint.kind not in ("start", "periodic"):
            return None  # it stopped and signed all it wrote: rows after that are not its
        signed_seq, signed_hash, prev = checkpoint.seq, checkpoint.hash, note_hash(last["note"])
        purge = await self.store.last_purge(replica)
        if purge is not None and purge["seq"] > signed_seq:
            try:
                signed_seq, signed_hash = (
                    purge["seq"],
                    _own_note(purge["note"], replica, self.signer).hash,
                )
            except CheckpointError as e:
                self._refuse(replica, seq, f"its purge note is not one signed for it ({e})")
                return None
        if seq <= signed_seq:
            return None
        if await self.store.witnesses(replica, signed_seq + 1, seq):
            # Witnessed once since its own last signature: records stored after that are not
            # its own (it would have signed them on coming back), and are left unsigned.
            return None
        if self._witnessed.get(replica, 0) > signed_seq:
            self._refuse(replica, seq, "the witness note this replica signed for it is gone")
            return None
        # By the checkpoint's own signed time, which no database writer can change: a chain
        # that ran recently, not one whose shutdown checkpoint may have been deleted since.
        now, interval = self.clock(), self.checkpoint_every_seconds
        window = max(WITNESS_WITHIN * interval, WITNESS_WINDOW_MIN_SECONDS)
        signed_at = _parse_ts(checkpoint.time)
        if signed_at is None or not now - window <= signed_at <= now + interval:
            self._refuse(
                replica,
                seq,
                f"its last checkpoint (#{checkpoint.number}, {checkpoint.time}) was not signed "
                f"within the last {window:g} s: that replica stopped long before this look",
            )
            return None
        expected, link = signed_seq + 1, signed_hash
        async for rec in self.store.records(replica, signed_seq + 1, seq):
            if (
                rec.get("seq") != expected
                or rec.get("prev_hash") != link
                or (record_hash(rec) != rec.get("hash"))
            ):
                metrics.STORE_ERRORS.labels(store="audit").inc()
                log.error(
                    "witness_refused",
                    replica=replica,
                    seq=rec.get("seq"),
                    expected_seq=expected,
                    reason="the stored records do not link to what that replica signed",
                )
                return None
            # A record bears its request's start: one under way at the checkpoint is chained
            # after it with an older time, so a window back, not the checkpoint's own time.
            ts = _parse_ts(rec.get("ts"))
            earliest = signed_at - window - WITNESS_RECORD_SLACK_SECONDS
            if ts is None or not earliest <= ts <= now + interval:
                self._refuse(
                    replica,
                    seq,
                    f"record {rec.get('seq')} is dated {rec.get('ts')!r}, not around its "
                    f"last checkpoint ({checkpoint.time})",
                )
                return None
            expected, link = expected + 1, rec["hash"]
        if expected != seq + 1 or link != head:
            return None  # the store changed while it was read; the next pass looks again
        note = Checkpoint(
            replica=replica,
            number=0,
            seq=seq,
            hash=head,
            time=utc_timestamp(self.clock()),
            prev=prev,
            kind="witness",
            by=self.replica,
        )
        item = checkpoint_line(note, note.sign(self.signer))
        self._queue.append(item)
        self.new_event(
            "witness",
            f"replica {replica} no longer runs and never signed its records "
            f"{signed_seq + 1}..{seq}; they link to what it signed and are signed as stored "
            "(witness note)",
            reason="witness",
        )
        log.warning(
            "witnessed", replica=replica, by=self.replica, records=seq - signed_seq, through_seq=seq
        )
        return {"replica": replica, "from_seq": signed_seq + 1, "through_seq": seq}

    def _refuse(self, replica: str, seq: int, reason: str) -> None:
        """Log why a chain's unsigned records are not witnessed: they stay unsigned, and verify
        reports them. Once per chain head, not at every look."""
        if self._refused.get(replica) == seq:
            return
        self._refused[replica] = seq
        log.error("witness_refused", replica=replica, through_seq=seq, reason=reason)

    async def _witness_loop(self) -> None:
        wait = self.checkpoint_every_seconds  # the first look soon: a replacement's, say
        while True:
            await asyncio.sleep(wait)
            # (read each round: a reload may change checkpoint_every_seconds)
            wait = WITNESS_EVERY * self.checkpoint_every_seconds
            try:
                await self.witness_orphans()
            except Exception as e:  # the next round tries again; the gateway goes on
                metrics.STORE_ERRORS.labels(store="audit").inc()
                log.warning("witness_failed", error=repr(e))

    @contextlib.asynccontextmanager
    async def _hold_chain(self, replica: str) -> AsyncIterator[bool]:
        directory = self.spool.directory.parent / replica  # its spool, if it ran here
        spool_lock = None
        if directory.is_dir():
            spool_lock = hold_spool(directory)
            if spool_lock is None:
                yield False  # it runs on this data dir
                return
        try:
            async with self.store.hold(replica) as held:
                yield held
        finally:
            if spool_lock is not None:
                os.close(spool_lock)

    def _cutoff(self, now: float | None, days: int | None) -> str | None:
        days = days if days is not None else self.retention_days
        if days is None:
            return None
        return utc_timestamp((now if now is not None else self.clock()) - days * DAY)

    async def _purge_chain(
        self,
        replica: str,
        cutoff: str,
        purged_seq: int,
        purged_number: int,
        why: str,
        noted: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any] | None:
        point = await self.store.purge_point(replica, cutoff)
        if point is None:
            return None
        if point.seq <= purged_seq:
            # The purge note exists already; an earlier run stopped before deleting.
            deleted = await self.store.purge(replica, purged_seq, purged_number or None)
            return {
                "replica": replica,
                "deleted": deleted,
                "through_seq": purged_seq,
                "through_number": purged_number,
                "cutoff": cutoff,
            }
        number = purged_number
        checkpoint_prev = GENESIS_HASH if number == 0 else None
        if point.number is not None and point.number >= number:
            number, checkpoint_prev = point.number, point.note_hash
        if checkpoint_prev is None:  # no checkpoint left at or below the cut: keep the old anchor
            last = await self.store.last_purge(replica)
            checkpoint_prev = parse_text(note_text(last["note"])).prev if last else GENESIS_HASH
        item: dict[str, Any] | None = None
        if self.signer is not None:
            note = Checkpoint(
                replica=replica,
                number=number,
                seq=point.seq,
                hash=point.hash,
                time=utc_timestamp(self.clock()),
                prev=checkpoint_prev,
                kind="purge",
            )
            item = checkpoint_line(note, note.sign(self.signer))
        event = self.new_event(
            "purge",
            f"retention: records up to seq {point.seq} of replica {replica}{why} "
            f"({point.records} stored) are older than {cutoff} and are deleted, with "
            f"checkpoints up to #{number}; a signed purge note anchors what remains",
            reason="retention",
        )
        if item is not None:
            self._queue.append(item)
        self.checkpoint()  # sign the purge record itself
        if not await self.flushed(timeout=30.0):
            log.warning("purge_deferred", replica=replica, reason="store unavailable")
            return None
        if noted is not None:
            noted(point.seq, number)
        deleted = await self.store.purge(replica, point.seq, number or None)
        log.info(
            "purged",
            replica=replica,
            by=self.replica,
            records=deleted,
            through_seq=point.seq,
            checkpoints_through=number,
            cutoff=cutoff,
            event_seq=event["seq"],
        )
        return {
            "replica": replica,
            "deleted": deleted,
            "through_seq": point.seq,
            "through_number": number,
            "cutoff": cutoff,
        }

    async def _purge_loop(self) -> None:
        await asyncio.sleep(min(60.0, self.purge_interval))
        while True:
            try:
                await self.purge()
                await self.purge_orphans()
            except Exception as e:  # retention retries next round; the gateway goes on
                metrics.STORE_ERRORS.labels(store="audit").inc()
                log.warning("purge_failed", error=repr(e))
            await asyncio.sleep(self.purge_interval)

    # -- shipping --------------------------------------------------------------------------

    async def _ship_loop(self) -> None:
        backoff = self.ship_interval
        # A batch the store refuses for an item in it is halved until that item is alone: the
        # items before it are stored, and the item itself is set aside after SET_ASIDE_AFTER
        # refusals. A store that is down refuses nothing for its items: everything waits.
        limit = self.batch_size
        refused = 0
        while True:
            if not self._queue:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.ship_interval)
                self._wake.clear()
                continue
            size = min(limit, self.batch_size, len(self._queue))
            batch = [self._queue[i] for i in range(size)]
            try:
                items = await self._read_back(batch)
                records = [item for item in items if "type" not in item]
                checkpoints = [item for item in items if "type" in item]  # and purge notes
                await self.store.write(records, checkpoints)
            except ChainForked as e:
                self._forked(e)
                return  # a retry would be refused again, or break the chain after their rows
            except Exception as e:  # any store failure: keep the spool, retry with backoff
                self.store_ok = False
                metrics.STORE_ERRORS.labels(store="audit").inc()
                # Each record that has to wait for a retry counts once, however many it takes.
                waiting = sum(map(_is_record, batch))
                metrics.AUDIT_RECORDS.labels(outcome="retry").inc(
                    max(0, waiting - self._retry_counted)
                )
                self._retry_counted = max(self._retry_counted, waiting)
                if isinstance(e, SpoolReadError):  # nothing is skipped: the chain has no holes
                    log.error("fetchlog_spool_read_failed", error=str(e), queued=len(self._queue))
                else:
                    log.warning("fetchlog_store_error", error=repr(e), queued=len(self._queue))
                    if refuses_item(e):
                        if len(batch) > 1:
                            limit = max(1, len(batch) // 2)
                        else:
                            refused += 1
                            # Never a purge note: the purge deletes the records it stands
                            # for only once it is stored.
                            if refused >= SET_ASIDE_AFTER and not _is_purge(batch[0]):
                                await self._set_aside(batch[0], e)
                                refused, limit = 0, self.batch_size
                                continue
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = self.ship_interval
            limit, refused = min(self.batch_size, limit * 2), 0
            if not self.store_ok:
                log.info("fetchlog_store_recovered", queued=len(self._queue))
            self.store_ok = True
            self._retry_counted = max(0, self._retry_counted - sum(map(_is_record, batch)))
            for item in batch:
                self._queue.popleft()
                if isinstance(item, SerializedRecord):
                    self.held_in_memory -= 1
            # Done with every record of the batch: stored, or lost on disk (`_read_back`).
            done = [i.seq if isinstance(i, Spooled) else i["seq"] for i in batch if _is_record(i)]
            if done:
                self._shipped(done[-1])
            numbered = [c["number"] for c in checkpoints if c["type"] == "checkpoint"]
            if numbered:
                self.shipped_checkpoint = numbered[-1]
            metrics.AUDIT_RECORDS.labels(outcome="stored").inc(len(records))
            metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
            self.spool.retire(self.shipped_seq, rotate_at=min(1 << 20, self.spool_max_bytes // 4))
            if not self._queue and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.ship_interval)
                self._wake.clear()

    def _forked(self, error: ChainForked) -> None:
        """Stop shipping: the store holds rows of this chain another gateway wrote under this
        replica id. What this one has from there on stays in its spool (bounded by
        spool_max_bytes: the log takes nothing more), for an operator to keep."""
        self.chain_forked = error
        self.store_ok = False
        metrics.STORE_ERRORS.labels(store="audit").inc()
        metrics.AUDIT_CHAIN_FORKED.set(1)
        log.error(
            "fetchlog_chain_forked",
            replica=self.replica,
            other_records=error.records,
            other_checkpoints=error.checkpoints,
            unlinked_seq=error.unlinked,
            unshipped_from_seq=self.shipped_seq + 1,
            unshipped_through_seq=self.seq,
            kept_in=str(self.spool.directory),
            error=str(error),
        )

    def _shipped(self, seq: int) -> None:
        self.shipped_seq = seq
        while self._pending and self._pending[0][0] <= seq:
            self._pending.popleft()

    async def _set_aside(self, item: dict[str, Any] | Spooled, error: Exception) -> None:
        """Leave out of the store the item at the head of the queue, which it refused
        SET_ASIDE_AFTER times for what it holds: one bad item must not hold every later record
        back for good. Not silent: its whole text goes to the error log (to put it in by hand
        once the cause is known), `crawlwarden_audit_records_total{outcome="set_aside"}` and
        /readyz count it, and a record set aside is a hole that `audit verify` reports."""
        self._queue.popleft()
        text: str | None = None
        if isinstance(item, Spooled):
            with contextlib.suppress(SpoolReadError):  # it was read a moment ago
                read = (await asyncio.to_thread(self.spool.read, [item]))[0]
                text = read[1] if read is not None else None
        else:
            if isinstance(item, SerializedRecord):
                self.held_in_memory -= 1
            text = json.dumps(item, separators=(",", ":"), ensure_ascii=False, default=str)
        self.set_aside += 1
        metrics.AUDIT_RECORDS.labels(outcome="set_aside").inc()
        metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
        if _is_record(item):
            seq = item.seq if isinstance(item, Spooled) else item.get("seq")
            self._retry_counted = max(0, self._retry_counted - 1)
            if isinstance(seq, int):
                self._shipped(seq)
        elif not isinstance(item, Spooled) and item.get("type") == "checkpoint":
            self.shipped_checkpoint = item["number"]  # or flushed() waits for it forever
        log.error(
            "fetchlog_item_set_aside",
            replica=self.replica,
            seq=item.seq if isinstance(item, Spooled) else item.get("seq"),
            type=None if isinstance(item, Spooled) else item.get("type", "record"),
            error=repr(error),
            item=text,
            refused=SET_ASIDE_AFTER,
        )

    async def _read_back(self, batch: list[dict[str, Any] | Spooled]) -> list[dict[str, Any]]:
        """The batch with the records held as spool places read back (off the event loop)."""
        places = [item for item in batch if isinstance(item, Spooled)]
        if not places:
            return batch  # type: ignore[return-value]  # no Spooled in it
        found = iter(await asyncio.to_thread(self.spool.read, places))
        out: list[dict[str, Any]] = []
        for item in batch:
            if not isinstance(item, Spooled):
                out.append(item)
            elif (read := next(found)) is not None:
                out.append(SerializedRecord(*read))
            else:
                # Damaged on disk since it was written: as replay after a restart would, go on
                # without it. The chain has a hole there that `audit verify` reports.
                metrics.AUDIT_RECORDS.labels(outcome="lost").inc()
                log.error("spool_chain_gap", replica=self.replica, lost=item.seq, damaged=True)
        return out

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.fsync_interval)
            await asyncio.to_thread(self.spool.sync)
            if self._spool_error is not None:
                # What waits for room is written once there is, without waiting for a request.
                self._spool_writable_again()
            with contextlib.suppress(OSError):  # logged by _spool_failed; the counts wait
                self._record_unauthenticated(self.clock())  # a window that ended in quiet

    async def flushed(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is in the store (tests, purge, export)."""
        target_seq, target_checkpoint = self.seq, self.checkpoint_number
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if self.shipped_seq >= target_seq and self.shipped_checkpoint >= target_checkpoint:
                return True
            await asyncio.sleep(0.02)
        return False


def _own_note(note: str, replica: str, signer: Signer) -> Checkpoint:
    """A stored note of `replica`'s chain, signed by `signer`'s key (a witness trusts no other),
    as signed; CheckpointError if it is not."""
    checkpoint = open_note(note, signer.verifier)
    if checkpoint.replica != replica:
        raise CheckpointError(f"the note is replica {checkpoint.replica!r}'s")
    return checkpoint


def _is_purge(item: dict[str, Any] | Spooled) -> bool:
    return not isinstance(item, Spooled) and item.get("type") == "purge"


def _is_record(item: dict[str, Any] | Spooled) -> bool:
    """A queued record (whole or as its spool place), not a checkpoint or purge note."""
    return isinstance(item, Spooled) or "type" not in item


def _new_id() -> str:
    return uuid.uuid4().hex


def _parse_ts(value: Any) -> float | None:
    """A record's `ts` (utc_timestamp's form) as a Unix time, if it reads."""
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _make_utf8(data: dict[str, Any]) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    for key, value in data.items():
        data[key] = clean(value)
