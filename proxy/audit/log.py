"""The fetch log of one replica: chain, spool, and shipping to the store in group commits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import Protocol

import structlog

from proxy import metrics
from proxy.audit.record import GENESIS_HASH
from proxy.audit.record import FetchRecord
from proxy.audit.record import record_hash
from proxy.audit.record import utc_timestamp
from proxy.audit.spool import Spool
from proxy.decision import Outcome
from proxy.decision import Reason

log = structlog.get_logger("crawlwarden.audit")


class FetchStore(Protocol):
    """Where records end up (SQLite embedded, PostgreSQL shared). Writes are idempotent."""

    async def open(self) -> None: ...

    async def last(self, replica: str) -> tuple[int, str] | None:
        """The highest (seq, hash) stored for a replica."""
        ...

    async def write(self, records: list[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


class FetchLog:
    def __init__(
        self,
        store: FetchStore,
        spool_dir: Path,
        replica: str,
        *,
        spool_max_bytes: int = 10**9,
        batch_size: int = 1000,
        ship_interval: float = 0.2,
        fsync_interval: float = 1.0,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.store = store
        self.replica = replica
        self.spool = Spool(spool_dir)
        self.spool_max_bytes = spool_max_bytes
        self.batch_size = batch_size
        self.ship_interval = ship_interval
        self.fsync_interval = fsync_interval
        self.on_record = on_record
        self.seq = 0
        self.head = GENESIS_HASH
        self.shipped_seq = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.store_ok = True

    # -- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        await self.store.open()
        replayed = self.spool.open()
        stored = await self.store.last(self.replica)
        if stored is not None:
            self.seq, self.head = stored
            self.shipped_seq = stored[0]
        for rec in replayed.records:
            if rec["seq"] > self.seq:
                self.seq, self.head = rec["seq"], rec["hash"]
            if rec["seq"] > self.shipped_seq:
                self._queue.append(rec)
        for rec in replayed.unfinished:
            # Interrupted mid-flight (kill -9, crash): the request left, its answer is unknown.
            rec.update(
                decision=str(Outcome.FORWARDED),
                reason=str(Reason.INTERRUPTED),
                note="the gateway stopped before this request finished; its response is unknown",
            )
            self.append_dict(rec)
        if replayed.records or replayed.unfinished:
            log.info(
                "spool_replayed",
                replica=self.replica,
                to_ship=len(self._queue),
                interrupted=len(replayed.unfinished),
            )
        metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
        self._tasks = [
            asyncio.create_task(self._ship_loop(), name="fetchlog-ship"),
            asyncio.create_task(self._sync_loop(), name="fetchlog-fsync"),
        ]

    async def close(self, timeout: float = 30.0) -> None:
        """Ship everything still queued (waiting up to `timeout` for the store), then stop."""
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline and self._tasks:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._queue:
            log.error("fetchlog_unshipped_at_exit", records=len(self._queue), kept_in="spool")
        self.spool.close()
        await self.store.close()

    # -- writing ---------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False once the spool is past its limit: the gateway must then fail closed."""
        return self.spool.size < self.spool_max_bytes

    def begin(self, rec: FetchRecord) -> None:
        """Note a request that is about to be forwarded, before it leaves the gateway."""
        self.spool.begin(rec.to_dict())

    def append(self, rec: FetchRecord) -> dict[str, Any]:
        return self.append_dict(rec.to_dict())

    def append_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """Chain the record and put it in the spool; it reaches the store shortly after."""
        self.seq += 1
        data["replica"] = self.replica
        data["seq"] = self.seq
        data["prev_hash"] = self.head
        data["hash"] = None
        data["hash"] = self.head = record_hash(data)
        line = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        self.spool.finish(line, data["id"], self.seq)
        self._queue.append(data)
        metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
        if len(self._queue) >= self.batch_size:
            self._wake.set()
        if self.on_record is not None:
            self.on_record(data)
        return data

    def new_event(self, kind: str, note: str, **fields: Any) -> dict[str, Any]:
        """Append a record that is not a fetch: a takedown, a purge, a blocklist change."""
        now = time.time()
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
        return self.append(rec)

    # -- shipping --------------------------------------------------------------------------

    async def _ship_loop(self) -> None:
        backoff = self.ship_interval
        while True:
            if not self._queue:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.ship_interval)
                self._wake.clear()
                continue
            batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
            try:
                await self.store.write(batch)
            except Exception as e:  # any store failure: keep the spool, retry with backoff
                self.store_ok = False
                metrics.STORE_ERRORS.labels(store="audit").inc()
                metrics.AUDIT_RECORDS.labels(outcome="retry").inc(len(batch))
                log.warning("fetchlog_store_error", error=repr(e), queued=len(self._queue))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = self.ship_interval
            if not self.store_ok:
                log.info("fetchlog_store_recovered")
            self.store_ok = True
            for _ in batch:
                self._queue.popleft()
            self.shipped_seq = batch[-1]["seq"]
            metrics.AUDIT_RECORDS.labels(outcome="stored").inc(len(batch))
            metrics.AUDIT_QUEUE_DEPTH.set(len(self._queue))
            self.spool.retire(self.shipped_seq)
            metrics.AUDIT_SPOOL_BYTES.set(self.spool.size)
            if not self._queue and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.ship_interval)
                self._wake.clear()

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.fsync_interval)
            await asyncio.to_thread(self.spool.sync)

    async def flushed(self, timeout: float = 10.0) -> bool:
        """Wait until everything appended so far is in the store (tests, export-after-write)."""
        target = self.seq
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.shipped_seq < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.shipped_seq >= target


def _new_id() -> str:
    return uuid.uuid4().hex
