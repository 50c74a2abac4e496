"""A replica whose whole chain another replica purged, run again many ways: restarted with clean
stops, killed (kill -9) with and without records, witnessed, purged again. No fork, no seq or
checkpoint number used twice, and verify passes after each step."""

from __future__ import annotations

from pathlib import Path

from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys

DAY = 86400.0
NOW = 1_790_000_000.0


def verify(tmp: Path, public: Path, name: str) -> str:
    out = tmp / f"{name}.jsonl"
    r = cli("audit", "export", "--data-dir", tmp, "--output", out)
    assert r.returncode == 0, r.stderr
    v = cli("audit", "verify", out, "--public-key", public)
    assert v.returncode == 0, (name, v.stdout, v.stderr)
    return v.stdout


async def kill9(log) -> None:
    """As a kill -9: tasks stop, nothing more is shipped or signed, the spool lock goes."""
    for t in log._tasks:
        t.cancel()
    for t in log._tasks:
        try:
            await t
        except BaseException:
            pass
    log._tasks = []
    log.spool.close()
    await log.store.close()


async def test_scenarios(tmp_path: Path) -> None:
    signer, public = keys(tmp_path)
    spool = tmp_path / "spool"
    store = lambda: SQLiteStore(tmp_path / "fetchlog.sqlite3")  # noqa: E731
    t = NOW - 500 * DAY
    gone = fetch_log(store(), spool, "gw-x", signer, clock=lambda: t)
    await gone.open()
    for i in range(25):
        gone.append(fetch(i, ts=t + i))
    await gone.close()
    verify(tmp_path, public, "v0")

    async def purge_orphans(now):
        other = fetch_log(store(), spool, "gw-y", signer, clock=lambda: now)
        await other.open()
        res = await other.purge_orphans(now=now, days=400)
        await other.close()
        return res

    print(await purge_orphans(NOW))
    verify(tmp_path, public, "v1")
    # restart many times with no records, clean stop
    for k in range(3):
        x = fetch_log(store(), spool, "gw-x", signer, clock=lambda: NOW)
        await x.open()
        assert x.seq == 25, x.seq
        await x.close()
        verify(tmp_path, public, f"v2-{k}")
    # restart, killed with no records
    x = fetch_log(store(), spool, "gw-x", signer, clock=lambda: NOW)
    await x.open()
    assert await x.flushed()
    await kill9(x)
    verify(tmp_path, public, "v3")
    # restart, write records, killed before a periodic checkpoint
    x = fetch_log(store(), spool, "gw-x", signer, clock=lambda: NOW)
    await x.open()
    for i in range(3):
        x.append(fetch(100 + i, ts=NOW))
    assert await x.flushed()
    await kill9(x)
    # witness by y
    y = fetch_log(store(), spool, "gw-y", signer, clock=lambda: NOW)
    await y.open()
    w = await y.witness_orphans()
    print("witness", w)
    await y.close()
    verify(tmp_path, public, "v4")
    # everything purged again later (all older)
    print(await purge_orphans(NOW + 500 * DAY))
    verify(tmp_path, public, "v5")
    # back again: records; kill -9 while store had them unshipped? clean stop here
    x = fetch_log(store(), spool, "gw-x", signer, clock=lambda: NOW + 500 * DAY)
    await x.open()
    print("resumed at", x.seq, x.checkpoint_number)
    for i in range(3):
        x.append(fetch(200 + i, ts=NOW + 500 * DAY))
    await x.close()
    print(verify(tmp_path, public, "v6"))
    # partial purge: some old, some young
    x = fetch_log(store(), spool, "gw-x", signer, clock=lambda: NOW + 900 * DAY)
    await x.open()
    for i in range(3):
        x.append(fetch(300 + i, ts=NOW + 900 * DAY))
    await x.close()
    print(await purge_orphans(NOW + 900 * DAY))
    print(verify(tmp_path, public, "v7"))
    x = fetch_log(store(), spool, "gw-x", signer, clock=lambda: NOW + 900 * DAY)
    await x.open()
    x.append(fetch(400, ts=NOW + 900 * DAY))
    await x.close()
    print(verify(tmp_path, public, "v8"))
