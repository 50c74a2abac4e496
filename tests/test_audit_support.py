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

from proxy.audit.keys import Signer
from proxy.audit.keys import generate_key_pair
from proxy.audit.log import FetchLog
from proxy.audit.record import FetchRecord
from proxy.audit.record import utc_timestamp
from proxy.audit.store import FetchStore

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
    return subprocess.run(
        [CRAWLWARDEN, *map(str, args)],
        capture_output=True,
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
