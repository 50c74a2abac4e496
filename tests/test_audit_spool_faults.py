"""The fetch log's spool under file-system faults that come and go.

One failed open of a new segment when a stored one is retired (no file descriptors left, no
inodes) ended the ship loop: nothing more reached the store until a restart (found by the
review of the change that made `finish` tolerate the same failure). A line damaged so that it
still parses held every later record out of the store (see below).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from proxy.audit import spool as spool_module
from proxy.audit.log import SPOOL_RETRY_SECONDS
from proxy.audit.spool import Spooled
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_log import OutageStore
from tests.test_audit_log import export_and_verify
from tests.test_audit_log import stored
from tests.test_audit_support import damage_record_line
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import replay_over_a_damaged_stored_line


async def test_one_failed_segment_open_does_not_stop_shipping(tmp_path: Path, monkeypatch) -> None:
    signer, _ = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw",
        signer,
        spool_max_bytes=16 * 1024,
    )  # rotate_at = 4 KB
    await log.open()
    real_open = os.open
    fail = {"left": 0}

    def flaky_open(path, flags, *a):
        if fail["left"] and str(path).endswith(".jsonl"):
            fail["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *a)

    monkeypatch.setattr(spool_module.os, "open", flaky_open)
    try:
        for i in range(10):  # > 4 KB in the current segment, all shipped
            log.append(fetch(i))
        fail["left"] = 1  # the next new segment cannot be opened, once
        assert await log.flushed(timeout=5)  # retire() then tries to rotate
        await asyncio.sleep(0.3)
        for i in range(10, 15):
            log.append(fetch(i))
        shipped = await log.flushed(timeout=5)
        dead = [t for t in log._tasks if t.done()]
        assert shipped, (
            f"shipped_seq={log.shipped_seq} seq={log.seq}; tasks ended: "
            f"{[(t.get_name(), t.exception()) for t in dead]}"
        )
    finally:
        await log.close(timeout=2)


# -- a damaged line that still parses ----------------------------------------------------------
#
# One changed byte in a key name ("ts" became "tz") while the gateway was down: the line parsed
# and carried the right seq, so replay and read-back took it; every ship attempt then failed on
# it (KeyError) and nothing after it reached the store, restart after restart. A record is
# checked by its hash (proxy/audit/FORMATS.md) and such a line is damaged like a torn one.


def lost_count() -> float:
    return REGISTRY.get_sample_value("crawlwarden_audit_records_total", {"outcome": "lost"}) or 0


async def test_a_replayed_line_that_parses_but_fails_its_hash_is_a_hole_not_a_stop(
    tmp_path: Path,
) -> None:
    signer, public = keys(tmp_path)
    store = OutageStore(tmp_path / "fetchlog.sqlite3")
    log = fetch_log(store, tmp_path / "spool", "gw-h", signer)
    await log.open()
    store.down = True
    sent = [fetch(i) for i in range(6)]
    for rec in sent:
        log.begin(rec)  # forwarded: each has its begin line before its record
        log.append(rec)
    await log.close(timeout=0.2)  # stopped during the outage: all 6 wait in the spool
    damage_record_line(tmp_path / "spool" / "gw-h", 3, b'"ts":', b'"tz":')

    lost = lost_count()
    again = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-h", signer
    )
    await again.open()
    try:
        assert await again.flushed(timeout=10), f"stuck at shipped_seq={again.shipped_seq}"
    finally:
        await again.close()
    records = stored(tmp_path, "gw-h")
    # Record 3 is gone; its request, begun and never finished as far as the spool can tell, is
    # recorded as interrupted rather than not at all.
    assert [r["seq"] for r in records] == [1, 2, 4, 5, 6, 7]
    assert (records[-1]["id"], records[-1]["reason"]) == (sent[2].id, "interrupted")
    assert lost_count() == lost + 1
    verified = export_and_verify(tmp_path, public, tmp_path / "e.jsonl", exit_code=1)
    assert "records seq 3..3 are missing" in verified


async def test_a_record_read_back_that_parses_but_fails_its_hash_is_a_hole_not_a_stop(
    tmp_path: Path,
) -> None:
    store = OutageStore(tmp_path / "fetchlog.sqlite3")
    log = fetch_log(store, tmp_path / "spool", "gw-b", None, memory_records=1)
    await log.open()
    store.down = True
    for i in range(5):
        log.append(fetch(i))
    place = log._queue[2]  # record 1 is held in memory, the others as their places
    assert isinstance(place, Spooled) and place.seq == 3
    damage_record_line(tmp_path / "spool" / "gw-b", 3, b'"ts":', b'"tz":')  # while it waits
    assert log.spool.read([place]) == [None]
    lost = lost_count()
    store.down = False
    try:
        assert await log.flushed(timeout=10), f"stuck at shipped_seq={log.shipped_seq}"
    finally:
        await log.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-b")] == [1, 2, 4, 5]
    assert lost_count() == lost + 1


async def test_a_stored_fetch_whose_spool_line_is_damaged_is_not_recorded_again(
    tmp_path: Path,
) -> None:
    # The replay found its begin and no readable record, and recorded the fetch a second time,
    # as interrupted (same id, next seq): reports counted it twice and verify passed.
    rec_id = await replay_over_a_damaged_stored_line(
        lambda: SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-s"
    )
    records = stored(tmp_path, "gw-s")
    assert [(r["seq"], r["id"], r["reason"]) for r in records] == [(1, rec_id, "ok")]


# -- an item the store refuses -------------------------------------------------------------------
#
# Any store error retried the same batch forever: one item the store cannot take (a field
# missing, a value PostgreSQL text cannot hold) held every later record out of it while
# /readyz said ready. Such an item is set aside after a few tries alone, visibly.


def set_aside_count() -> float:
    return (
        REGISTRY.get_sample_value("crawlwarden_audit_records_total", {"outcome": "set_aside"}) or 0
    )


async def test_a_record_the_store_refuses_is_set_aside_and_the_rest_stored(
    tmp_path: Path, capsys
) -> None:
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-x", None)
    await log.open()
    before = set_aside_count()
    try:
        log.append(fetch(1))
        bad = fetch(2).to_dict()
        del bad["decision"]  # a column the store requires
        log.append_dict(bad)
        for i in range(3, 8):
            log.append(fetch(i))
        assert await log.flushed(timeout=30), f"stuck at shipped_seq={log.shipped_seq}"
        log.append(fetch(8))
        assert await log.flushed(timeout=5)  # and shipping goes on as usual
    finally:
        await log.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-x")] == [1, 3, 4, 5, 6, 7, 8]
    assert log.set_aside == 1
    assert set_aside_count() == before + 1
    logged = capsys.readouterr().out
    assert "fetchlog_item_set_aside" in logged and bad["id"] in logged  # kept, in the log


async def test_a_store_that_is_down_sets_nothing_aside(tmp_path: Path) -> None:
    store = OutageStore(tmp_path / "fetchlog.sqlite3")
    log = fetch_log(store, tmp_path / "spool", "gw-y", None)
    await log.open()
    store.down = True
    try:
        for i in range(5):
            log.append(fetch(i))
        await asyncio.sleep(4)  # well past SET_ASIDE_AFTER attempts
        assert log.set_aside == 0 and len(log._queue) == 5
        store.down = False
        assert await log.flushed(timeout=15)
    finally:
        await log.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-y")] == [1, 2, 3, 4, 5]


async def test_a_damaged_last_record_line_keeps_its_seq_a_hole_verify_reports(
    tmp_path: Path,
) -> None:
    # A whole line was written, so its seq was handed out (and named in the decision log line):
    # the next record taking that seq again would hide that a record is missing.
    signer, public = keys(tmp_path)
    store = OutageStore(tmp_path / "fetchlog.sqlite3")
    log = fetch_log(store, tmp_path / "spool", "gw-t", signer)
    await log.open()
    store.down = True
    for i in range(5):
        log.append(fetch(i))
    await log.close(timeout=0.2)
    damage_record_line(tmp_path / "spool" / "gw-t", 5, b'"ts":', b'"tz":')

    lost = lost_count()
    again = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw-t",
        signer,
        batch_size=2,  # record 4 is stored before the damaged 5 is read: its segment must stay
    )
    await again.open()
    try:
        assert again.seq == 5
        again.append(fetch(6))
        assert await again.flushed(timeout=10), f"stuck at shipped_seq={again.shipped_seq}"
    finally:
        await again.close()
    assert [r["seq"] for r in stored(tmp_path, "gw-t")] == [1, 2, 3, 4, 6]
    assert lost_count() == lost + 1
    verified = export_and_verify(tmp_path, public, tmp_path / "e.jsonl", exit_code=1)
    assert "records seq 5..5 are missing" in verified


async def test_a_begin_whose_record_was_stored_from_a_retired_segment_is_not_recorded_again(
    tmp_path: Path,
) -> None:
    # No damage at all: a request's record line in a later segment, stored and retired, while
    # its begin's segment stays (another request in it never finished); then kill -9. The
    # replay found the begin alone and recorded that fetch a second time, as interrupted.
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-r", None)
    await log.open()
    log.spool.segment_bytes = 2048
    done, hanging = fetch(1), fetch(2)
    log.begin(hanging)  # never finishes: keeps segment 1
    log.begin(done)
    filler = iter(range(10, 100))
    while len(log.spool.segments) == 1:
        log.append(fetch(next(filler)))
    log.append(done)  # in segment 2
    while len(log.spool.segments) == 2:
        log.append(fetch(next(filler)))
    assert await log.flushed(timeout=10)
    assert [s.index for s in log.spool.segments] == [1, 3]  # segment 2 was all stored
    # kill -9: nothing more is shipped or recorded, the spool stays as it is
    for task in log._tasks:
        task.cancel()
    await asyncio.gather(*log._tasks, return_exceptions=True)
    log.spool.close()
    await log.store.close()

    again = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw-r", None)
    await again.open()
    await again.close()
    mine = [
        (r["id"], r["reason"]) for r in stored(tmp_path, "gw-r") if r["id"] in (done.id, hanging.id)
    ]
    assert sorted(mine) == sorted([(done.id, "ok"), (hanging.id, "interrupted")])


class DiskFull:
    """The spool's disk fills up and frees again: while `full`, every write to a file in the
    spool directory fails with ENOSPC (the segments, the room probe), as on a full disk."""

    def __init__(self, monkeypatch, spool: Path) -> None:
        self.full = False
        real_write = os.write

        def write(fd: int, data) -> int:
            if self.full and os.readlink(f"/proc/self/fd/{fd}").startswith(str(spool)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(spool_module.os, "write", write)


async def test_a_record_the_full_spool_could_not_take_is_written_once_it_has_room(
    tmp_path: Path, monkeypatch
) -> None:
    # A response finished while the disk was full: its record was lost and its begin stayed
    # open for the life of the process (recorded "interrupted, response unknown" at the stop),
    # which kept its segment from ever being retired: with a small spool limit, 503 to every
    # request until a restart.
    signer, _ = keys(tmp_path)
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw",
        signer,
        spool_max_bytes=16 * 1024,  # rotate_at = 4 KB
        fsync_interval=0.1,
    )
    disk = DiskFull(monkeypatch, tmp_path / "spool")
    await log.open()
    try:
        slow = fetch(1)
        log.begin(slow)
        disk.full = True
        finished = fetch(1, id=slow.id, status=200, response_bytes=5000)
        with pytest.raises(OSError):
            log.append(finished)
        log.keep_until_room(finished)
        assert not log.available
        seq = log.seq
        disk.full = False
        # Nothing asks (no request, no readiness probe): the fetch log looks for room itself.
        for _ in range(50):
            if log.seq > seq:
                break
            await asyncio.sleep(0.1)
        assert log.seq == seq + 1, "the record that waited for room was never written"
        assert log.spool.unfinished() == []
        assert log.available
        for i in range(2, 40):  # several times the limit, shipped as it goes
            log.append(fetch(i))
            await asyncio.sleep(0.01)
        assert await log.flushed(timeout=5)
        log.append(fetch(40))
        assert await log.flushed(timeout=5)
        assert log.spool.size < log.spool_max_bytes, "the segment of the blip was never retired"
        assert log.available
    finally:
        await log.close(timeout=2)
    [kept] = [r for r in stored(tmp_path, "gw") if r["id"] == slow.id]
    assert (kept["reason"], kept["status"], kept["response_bytes"]) == ("ok", 200, 5000)


async def test_refusals_the_full_spool_cannot_take_are_counted_and_recorded_later(
    tmp_path: Path, monkeypatch
) -> None:
    # They left no trace at all, unlike refusals past audit.spool_max_bytes.
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw", None)
    disk = DiskFull(monkeypatch, tmp_path / "spool")
    await log.open()
    try:
        log.append(fetch(1))
        disk.full = True
        with pytest.raises(OSError):
            log.append(fetch(2))  # a forwarded request's record: the caller keeps it
        refusals = [fetch(4 * k, reason="audit_unavailable") for k in range(1, 6)]
        assert [log.append(r) for r in refusals] == [None] * 5  # counted, nothing raised
        disk.full = False
        await asyncio.sleep(SPOOL_RETRY_SECONDS + 0.1)
        assert log.available
        assert await log.flushed(timeout=5)
    finally:
        await log.close(timeout=2)
    [event] = [r for r in stored(tmp_path, "gw") if r["kind"] == "refusals_not_kept"]
    note = json.loads(event["note"])
    assert note["refused"] == 5
    assert {(c["reason"], c["count"]) for c in note["by_team_site_reason"]} <= {
        ("audit_unavailable", n) for n in range(1, 6)
    }


async def test_a_forwarded_request_that_ends_refused_on_a_full_disk_is_recorded_not_counted(
    tmp_path: Path, monkeypatch
) -> None:
    # Begun (about to be forwarded), then refused before it left (its scraper gone before the
    # connection to the site was made) while the disk was full: the refusal was counted, its
    # begin stayed open, and the stop recorded the same request again as forwarded,
    # interrupted, response unknown (found in review).
    log = fetch_log(SQLiteStore(tmp_path / "fetchlog.sqlite3"), tmp_path / "spool", "gw", None)
    disk = DiskFull(monkeypatch, tmp_path / "spool")
    await log.open()
    try:
        begun = fetch(1)
        log.begin(begun)
        disk.full = True
        refused = fetch(1, id=begun.id, decision="refused", reason="interrupted", status=None)
        with pytest.raises(OSError):
            log.append(refused)  # not counted: the caller keeps it until the spool has room
        log.keep_until_room(refused)
        disk.full = False
        await asyncio.sleep(SPOOL_RETRY_SECONDS + 0.1)
        assert log.available
        assert log.spool.unfinished() == []
        assert await log.flushed(timeout=5)
    finally:
        await log.close(timeout=2)
    records = [r for r in stored(tmp_path, "gw") if r["id"] == begun.id]
    assert [(r["decision"], r["reason"]) for r in records] == [("refused", "interrupted")]
    assert not [r for r in stored(tmp_path, "gw") if r["kind"] == "refusals_not_kept"]


async def test_a_small_spool_rotates_under_steady_load_with_requests_always_under_way(
    tmp_path: Path,
) -> None:
    # With audit.spool_max_bytes under one segment, the current segment was rotated only when
    # no request begun in it was under way, which under steady load it rarely is: the spool
    # grew to its limit and the gateway answered 503 with a healthy store (fault probe r7).
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw",
        None,
        spool_max_bytes=16 * 1024,  # rotate_at = 4 KB
    )
    await log.open()
    try:
        under_way = fetch(1)
        log.begin(under_way)  # one request always under way in the current segment
        for i in range(2, 120):
            if i % 10 == 0:  # the one under way ends, another begins
                log.append(fetch(i, id=under_way.id))
                under_way = fetch(i + 1000)
                log.begin(under_way)
            else:
                log.append(fetch(i))
            assert await log.flushed(timeout=5)
            assert log.available, f"refusing at record {i}: spool {log.spool.size} bytes"
    finally:
        await log.close(timeout=2)
