"""A report or a team's usage counted from a SQLite fetch log stops when no one waits for it.

Both run their query on a worker thread. Until now a request whose client had gone (a reload of
the report page, a poll with a short timeout) or that passed its 60 s bound left the query
running to its end: a report of 300 000 records kept a core busy for 6 s after its auditor had
left, on one of the few threads the gateway's opt-out checks and content hashes share, and the
one-at-a-time rule let the next request start another beside it. PostgreSQL's queries were
already cancelled (tests/test_usage_limits.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from proxy.audit.dialect import sqlite_results
from proxy.audit.sqlite_store import connect
from proxy.audit.sqlite_store import migrate
from proxy.record_source import in_worker
from tests.support import AUDITOR_TOKEN
from tests.support import TEAM
from tests.support import Gateway
from tests.support import policy_with

ROWS = 300_000
# A team's records, written as the gateway writes them (the fields the report reads included).
FILL = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
INSERT INTO fetch_records (replica, seq, id, ts, kind, site, team, project, decision, reason,
    url, content_sha256, hash, body)
SELECT 'syn', n, hex(n), strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || n || ' seconds'),
    'fetch', 's' || (n % 40), :team, 'p', 'forwarded', 'ok', 'https://s.test/' || n, NULL, hex(n),
    json_object('kind', 'fetch', 'decision', 'forwarded', 'method', 'GET', 'status', 200,
        'response_bytes', 1000, 'site', 's' || (n % 40), 'team', :team, 'project', 'p',
        'url', 'https://s.test/' || n)
FROM g
"""


def fill(path: Path, rows: int) -> None:
    conn = connect(path)
    try:
        migrate(conn)
        conn.execute("BEGIN")
        conn.execute(FILL, {"team": TEAM, "rows": rows})
        conn.execute("COMMIT")
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """The process's user and system time so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


def test_a_report_whose_auditor_has_gone_stops_its_sqlite_query(workdir: Path) -> None:
    with Gateway(workdir, policy_with()) as gw:
        assert gw.proc is not None
        fill(gw.data_dir / "fetchlog.sqlite3", ROWS)
        auditor = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
        with pytest.raises(requests.Timeout):  # (the whole report takes ~6 s here)
            requests.get(gw.admin + "/v1/reports/sites", headers=auditor, timeout=0.5)
        time.sleep(1.0)  # (the gateway looks for its client every 0.25 s)
        before = cpu_seconds(gw.proc.pid)
        time.sleep(1.5)
        busy = cpu_seconds(gw.proc.pid) - before
        assert busy < 0.3, f"the gateway worked {busy:.2f} s of 1.5 s on a report no one waits for"
        # and the next report is made at once (the one given up holds nothing)
        again = requests.get(gw.admin + "/v1/reports/sites", headers=auditor, timeout=60)
        assert again.status_code == 200, again.text[:300]
        assert len(again.json()["sites"]) == 40


def test_a_query_told_to_stop_ends_as_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "fetchlog.sqlite3"
    fill(path, 50_000)
    stop = threading.Event()
    counted = "SELECT count(*) FROM fetch_records WHERE json_extract(body, '$.status') = 200"
    assert sqlite_results(path, {"n": (counted, [])}, stop) == {"n": [(50_000,)]}
    stop.set()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        sqlite_results(path, {"n": (counted, [])}, stop)


def test_a_cancelled_worker_is_waited_for_until_it_has_stopped() -> None:
    ended: list[bool] = []
    started = threading.Event()

    def work(stop: threading.Event) -> None:
        started.set()
        deadline = time.monotonic() + 30  # (bounded: a worker never told to stop ends anyway)
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        ended.append(stop.is_set())

    async def cancel_it() -> None:
        task = asyncio.ensure_future(in_worker(work))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended == [True], "the cancellation went on while the worker still ran"

    asyncio.run(cancel_it())
