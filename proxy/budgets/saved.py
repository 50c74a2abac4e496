"""Embedded mode's budget counts across restarts.

Without Redis the counts live in the gateway's memory: a restart (a new policy file, an
upgrade, a crash) began every site's day and month at zero and forgot the pauses sites had
asked for, so `requests_per_month` meant "per run". The counts of the current day and month
and the pauses still running are written to the data dir every SAVE_INTERVAL seconds and at
stop, and taken back at start. Counts of a day or month that has ended since are dropped; a
pause goes on for what was left of it. What a `kill -9` loses is at most the last interval's.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from typing import Protocol

from proxy.budgets.pause import PausePolicy
from proxy.budgets.store import Carryover

# Seconds between saves, at least; a save that takes long (a million sites: seconds, on a
# worker thread) waits ten times as long as it took before the next.
SAVE_INTERVAL = 10.0
_FORMAT = 1
MAX_PAUSE_US = int(PausePolicy().max_pause * 1_000_000)  # the longest pause a site gets


class SavedCountsError(ValueError):
    """A saved-counts file that cannot be read back (damaged, or of another format)."""


class SiteCounts(Protocol):
    """What is saved of a site's state (MemoryBudgetStore's, read on a worker thread)."""

    day: int
    day_requests: int
    day_bytes: int
    month: int
    month_requests: int
    paused_until: int


def dump(sites: Iterable[tuple[str, SiteCounts]], now_us: int) -> bytes:
    """The counts and running pauses of `sites` as saved. Periods that have ended since are
    saved as they are and dropped when read back (Carryover: only the current ones count)."""
    rows = []
    for key, s in sites:
        paused = max(0, s.paused_until - now_us)
        if s.day_requests or s.day_bytes or s.month_requests or paused:
            rows.append(
                [key, s.day, s.day_requests, s.day_bytes, s.month, s.month_requests, paused]
            )
    return json.dumps({"format": _FORMAT, "saved_at_us": now_us, "sites": rows}).encode()


def parse(data: bytes, now_us: int) -> list[Carryover]:
    """The counts saved in `data`, each pause shortened by the time since they were saved."""
    try:
        saved: Any = json.loads(data)
        if saved.get("format") != _FORMAT:
            raise SavedCountsError(f"format {saved.get('format')!r}, not {_FORMAT}")
        elapsed = max(0, now_us - int(saved["saved_at_us"]))
        out = []
        for site, day, day_requests, day_bytes, month, month_requests, paused in saved["sites"]:
            if not isinstance(site, str):
                raise SavedCountsError(f"a site key that is not text: {site!r}")
            counts = [int(n) for n in (day, day_requests, day_bytes, month, month_requests)]
            if min(counts) < 0:
                raise SavedCountsError(f"a negative count for {site}")
            day, day_requests, day_bytes, month, month_requests = counts
            pause = min(MAX_PAUSE_US, max(0, int(paused) - elapsed))  # (a damaged file)
            out.append(Carryover(site, day, day_requests, day_bytes, month, month_requests, pause))
        return out
    except SavedCountsError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SavedCountsError(f"{type(e).__name__}: {e}") from e


def write(path: Path, data: bytes) -> None:
    """Replace the file at `path` whole (a crash mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def read(path: Path) -> bytes | None:
    """The saved file's bytes; None if there is none (a first start)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def remove_partials(path: Path) -> None:
    """The temp files of saves to `path` that never finished (the process was killed)."""
    for partial in path.parent.glob(path.name + ".*.partial"):
        with contextlib.suppress(OSError):
            partial.unlink()
