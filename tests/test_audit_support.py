"""Helpers shared by the fetch-log tests (test_audit_*.py); this module holds no tests itself."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.keys import Signer
from proxy.audit.keys import generate_key_pair
from proxy.audit.log import FetchLog
from proxy.audit.record import FetchRecord
from proxy.audit.record import utc_timestamp
from proxy.audit.store import ChainForked
from proxy.audit.store import FetchStore
from tests.forked_gateways import run_command

CRAWLWARDEN = str(Path(sys.executable).parent / "crawlwarden")
SITES = ("a.example", "b.example", "c.example")
TEAMS = ("vision-data", "text-data")


def keys(directory: Path, name: str = "audit") -> tuple[Signer, Path]:
    """A real Ed25519 key pair on disk: the signer and the public key file."""
    public = directory / f"{name}.pub"
    return generate_key_pair(directory / f"{name}.key", public), public


def fetch(i: int, ts: float | None = None, **fields: Any) -> FetchRecord:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "ts": utc_timestamp(ts if ts is not None else time.time()),
        "method": "GET",
        "url": f"https://{SITES[i % 3]}/images/{i}.jpg",
        "decision": "forwarded" if i % 4 else "refused",
        "reason": "ok" if i % 4 else "rate_limited",
        "site": SITES[i % 3],
        "team": TEAMS[i % 2],
        "project": "faces-v2",
        "status": 200 if i % 4 else 429,
        "response_bytes": 1000 + i,
        "content_sha256": "ab" * 32,
        "signals": ["x-robots-tag:noai"] if i % 7 == 0 else [],
        "legal_basis": "tdm_exception:DSM Art. 4",
        "duration_ms": 12.5,
    }
    values.update(fields)
    return FetchRecord(**values)


def stored_row(replica: str, seq: int, note: str) -> dict[str, Any]:
    """A record as a store takes it, linked to the one before; its hash differs by `note`."""
    rec = fetch(seq, note=note).to_dict()
    rec.update(replica=replica, seq=seq, prev_hash=f"{note}{seq - 1}", hash=f"{note}{seq}")
    return rec


def fetch_log(
    store: FetchStore, spool: Path, replica: str, signer: Signer | None, **kw: Any
) -> FetchLog:
    kw.setdefault("checkpoint_every_records", 10)
    kw.setdefault("checkpoint_every_seconds", 3600.0)
    kw.setdefault("ship_interval", 0.05)
    return FetchLog(store, spool / replica, replica, signer=signer, **kw)


def cli(
    *args: str | Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`crawlwarden ARGS`; `env` adds to (or, as "", removes from) the environment."""
    environ = dict(os.environ)
    for name, value in (env or {}).items():
        if value:
            environ[name] = value
        else:
            environ.pop(name, None)
    return run_command(
        [CRAWLWARDEN, *map(str, args)],
        text=True,
        timeout=timeout,
        env=environ,
        cwd=cwd,
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_lines(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(i, separators=(",", ":")) + "\n" for i in items))
    return path


def damage_record_line(spool: Path, seq: int, old: bytes, new: bytes) -> None:
    """Change `old` to `new` once in the spool line of record `seq` (the disk, or a hand)."""
    for segment in sorted(spool.glob("segment-*.jsonl")):
        lines = segment.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b'{"k":"r"') and json.loads(line)["rec"]["seq"] == seq:
                assert old in line
                lines[i] = line.replace(old, new, 1)
                segment.write_bytes(b"\n".join(lines))
                return
    raise AssertionError(f"record {seq} is not in the spool")


async def replay_over_a_damaged_stored_line(
    make_store: Callable[[], FetchStore], spool: Path, replica: str
) -> str:
    """A forwarded fetch is stored; its spool line (still there: the segment is current) is
    damaged while the gateway is down; the log is opened on that spool and closed again.
    Returns the fetch's id."""
    log = fetch_log(make_store(), spool, replica, None)
    await log.open()
    rec = fetch(1)  # forwarded
    log.begin(rec)
    log.append(rec)
    assert await log.flushed()
    await log.close()
    damage_record_line(spool / replica, 1, b'"ts":', b'"tz":')
    again = fetch_log(make_store(), spool, replica, None)
    await again.open()
    await again.close()
    return rec.id


REPO = Path(__file__).resolve().parent.parent


async def start_writer(script: str, data: Path, signer: Signer) -> subprocess.Popen[str]:
    """`script` (a fetch log writer, tests' own code importable) as a real process, given the
    data dir and the key file; returns it once it has printed "ready"."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(data), str(signer.source)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    if line.strip() != "ready":
        proc.kill()  # before reading its stderr to the end: it would sleep on for an hour
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"the writer did not get ready: {line}{out}{err}")
    return proc


async def another_hash_fails_the_write_and_a_retry_does_not(store: FetchStore) -> None:
    """Either store: a row already stored is a retry's (the same hash: nothing to do) or
    another writer's (another hash: ChainForked, and nothing of the batch is stored)."""
    batch = [stored_row("gw-x", seq, "ours") for seq in range(1, 6)]
    await store.write(batch)
    await store.write(batch)  # a retry (replayed from the spool, a lost acknowledgement)
    assert await store.last("gw-x") == (5, batch[-1]["hash"])
    theirs = [stored_row("gw-x", seq, "theirs") for seq in range(4, 9)]
    with pytest.raises(ChainForked, match=r"records 4\.\.5 of replica 'gw-x'"):
        await store.write(theirs)
    assert await store.last("gw-x") == (5, batch[-1]["hash"])  # 6..8 not stored either
    rows = [r async for r in store.records("gw-x", 1, 5)]
    assert [r["note"] for r in rows] == ["ours"] * 5
    checkpoint = {
        "type": "checkpoint",
        "replica": "gw-x",
        "number": 1,
        "seq": 5,
        "time": "2026-01-01T00:00:00Z",
        "kind": "periodic",
        "note": "ours",
    }
    await store.write([], [checkpoint])
    await store.write([], [checkpoint])
    with pytest.raises(ChainForked, match=r"checkpoints #1\.\.#1"):
        await store.write([], [{**checkpoint, "note": "theirs"}])
    assert (await store.last_checkpoint("gw-x") or {})["note"] == "ours"


async def a_batch_that_does_not_follow_the_stored_chain_is_refused(store: FetchStore) -> None:
    """Either store: no stored row at the batch's seqs, yet its first record follows another
    record than the one stored before it: ChainForked, nothing stored; retries still pass."""
    await store.write([stored_row("gw-x", seq, "theirs") for seq in range(1, 6)])
    ours = [stored_row("gw-x", seq, "ours") for seq in range(6, 9)]
    with pytest.raises(ChainForked, match=r"record 5 that this gateway's record 6 does not"):
        await store.write(ours)
    assert await store.last("gw-x") == (5, "theirs5")
    await store.write([stored_row("gw-x", 1, "theirs")])  # a retry of an earlier batch
    await store.write([{**stored_row("gw-x", 6, "ours"), "prev_hash": "theirs5"}])
