"""The fetch log's spool under file-system faults that come and go.

One failed open of a new segment when a stored one is retired (no file descriptors left, no
inodes) ended the ship loop: nothing more reached the store until a restart (found by the
review of the change that made `finish` tolerate the same failure).
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from proxy.audit import spool as spool_module
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys


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
