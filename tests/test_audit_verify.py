"""`crawlwarden audit export` + `audit verify` through the real CLI, on a real SQLite fetch log.

Each tampering an auditor must catch is done to a real export, and `audit verify` (a subprocess,
as an auditor runs it) must exit 1 naming the first bad record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.checkpoint import note_hash
from proxy.audit.checkpoint import note_text
from proxy.audit.checkpoint import parse_text
from proxy.audit.record import body_sha256
from proxy.audit.record import chain_hash
from proxy.audit.record import record_hash
from proxy.audit.sqlite_store import SQLiteStore
from tests.test_audit_support import CRAWLWARDEN
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log
from tests.test_audit_support import keys
from tests.test_audit_support import read_lines
from tests.test_audit_support import write_lines

DAY = 86400.0
T0 = 1_790_000_000.0  # 2026-09-21


async def _build(data_dir: Path, key_dir: Path) -> None:
    signer, _ = keys(key_dir)
    logs = []
    for replica in ("gw-a", "gw-b"):
        store = SQLiteStore(data_dir / "fetchlog.sqlite3")
        log = fetch_log(store, data_dir / "spool", replica, signer, checkpoint_every_records=10)
        await log.open()
        logs.append(log)
    for i in range(60):
        for n, log in enumerate(logs):
            log.append(fetch(i, ts=T0 + i * 60 + n))
    for log in logs:
        await log.close()


@pytest.fixture(scope="module")
def fetchlog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two replicas' chains in one SQLite file, 60 records each, a checkpoint every 10."""
    base = tmp_path_factory.mktemp("fetchlog")
    asyncio.run(_build(base / "data", base))
    export = base / "export.jsonl"
    result = cli("audit", "export", "--data-dir", base / "data", "--output", export)
    assert result.returncode == 0, result.stderr
    return {"data": base / "data", "export": export, "public": base / "audit.pub", "base": base}


def verify(path: Path, public: Path) -> subprocess.CompletedProcess[str]:
    return cli("audit", "verify", path, "--public-key", public)


def records(items: list[dict[str, Any]], replica: str = "gw-a") -> list[int]:
    """Indexes of the replica's record lines."""
    return [i for i, x in enumerate(items) if x["type"] == "record" and x["replica"] == replica]


def tampered(fetchlog: dict[str, Path], name: str, items: list[dict[str, Any]]) -> Path:
    return write_lines(fetchlog["base"] / f"{name}.jsonl", items)


def assert_detected(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("FAILED: "), first
    for word in words:
        assert word in first, (word, first)
    return first


def test_intact_export_verifies_and_says_what_it_proved(fetchlog: dict[str, Path]) -> None:
    result = verify(fetchlog["export"], fetchlog["public"])
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "OK:" in out
    assert "replica gw-a: records 1..60 (60 in full)" in out
    assert "replica gw-b: records 1..60 (60 in full)" in out
    # The one written at start, six every ten records and the one written at shutdown.
    assert "last checkpoint #8 at seq 60" in out
    assert "verified 2 replica(s), 120 records" in out
    assert "time span 2026-09-21T" in out
    assert "warning" not in out  # everything is signed: close() wrote a final checkpoint


def test_export_layout(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    assert items[0]["type"] == "export"
    assert items[0]["format"] == "crawlwarden-fetchlog-export/1"
    kinds = [x["type"] for x in items[1:]]
    assert kinds.count("record") == 120
    assert kinds.count("checkpoint") == 16
    # Each checkpoint comes right after the record it covers.
    for i, x in enumerate(items):
        if x["type"] == "checkpoint" and x["seq"] > 0:
            previous = items[i - 1]
            assert previous["seq"] == x["seq"] and previous["replica"] == x["replica"]
    # The run's start checkpoint comes first (nothing written yet), then records 1..10.
    text = note_text(items[1]["note"])
    assert text.startswith("crawlwarden.fetchlog/gw-a\n0\n")
    assert "\ncheckpoint 1 start\n" in text
    text = note_text(items[12]["note"])
    assert text.startswith("crawlwarden.fetchlog/gw-a\n10\n")
    assert "\ncheckpoint 2 periodic\n" in text


def test_edited_field_is_named(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    i = records(items)[24]
    items[i]["url"] = "https://elsewhere.example/"
    result = verify(tampered(fetchlog, "edit", items), fetchlog["public"])
    assert_detected(result, "replica gw-a", "seq 25", items[i]["id"], "modified")


def test_edited_field_with_recomputed_hash_breaks_the_next_link(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    i = records(items)[24]
    items[i]["status"] = 404
    body = {k: v for k, v in items[i].items() if k != "type"}
    items[i]["hash"] = record_hash(body)
    result = verify(tampered(fetchlog, "edit-rehash", items), fetchlog["public"])
    first = assert_detected(result, "replica gw-a", "seq 26", "prev_hash does not match")
    assert items[i]["id"] in first  # names the record before it too


def test_deleted_record_is_named(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    del items[records(items)[33]]
    result = verify(tampered(fetchlog, "delete", items), fetchlog["public"])
    assert_detected(result, "replica gw-a", "seq 35", "records seq 34..34 are missing")


def test_swapped_records_are_named(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    a, b = records(items, "gw-b")[41:43]
    items[a], items[b] = items[b], items[a]
    result = verify(tampered(fetchlog, "swap", items), fetchlog["public"])
    assert_detected(result, "replica gw-b", "reordered", "seq 43", "appears before seq 42")


def test_tail_dropped_before_last_checkpoint(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    for i in reversed(records(items)[-5:]):  # seq 56..60 of gw-a; its checkpoints stay
        del items[i]
    result = verify(tampered(fetchlog, "tail", items), fetchlog["public"])
    assert_detected(result, "replica gw-a", "seq 56", "tail removed", "records 56..60")


def test_file_cut_after_a_checkpoint_is_named_by_its_export_line(
    fetchlog: dict[str, Path],
) -> None:
    """A file cut short right after one of its checkpoints (a partial download, API pages
    lost) links and is signed as far as it goes; its export line says how far it should go."""
    items = read_lines(fetchlog["export"])
    # gw-b's lines after its checkpoint at seq 30 (records 31..60 and their checkpoints) gone.
    cut = next(
        i
        for i, x in enumerate(items)
        if x["type"] == "checkpoint" and x["replica"] == "gw-b" and x["seq"] == 30
    )
    items = items[: cut + 1]
    result = verify(tampered(fetchlog, "cut-after-checkpoint", items), fetchlog["public"])
    assert_detected(result, "replica gw-b", "seq 31", "records 31..60", "cut short")


def test_inserted_forged_record(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    i = records(items)[9]
    forged = dict(items[i], id="f" * 32, url="https://forged.example/", seq=11)
    forged["prev_hash"] = items[i]["hash"]
    forged["hash"] = record_hash({k: v for k, v in forged.items() if k != "type"})
    items.insert(i + 1, forged)  # a well-chained record squeezed in after seq 10
    result = verify(tampered(fetchlog, "insert", items), fetchlog["public"])
    first = assert_detected(result, "replica gw-a", "seq 11")
    assert "appears again" in result.stdout or "prev_hash does not match" in first


def test_records_changed_and_checkpoints_resigned_with_another_key(
    fetchlog: dict[str, Path], tmp_path: Path
) -> None:
    attacker, _ = keys(tmp_path, "attacker")
    items = read_lines(fetchlog["export"])
    # Rewrite gw-a's record 5 and re-chain and re-sign everything after it consistently.
    chain: dict[int, str] = {}
    prev_note = "0" * 64
    for x in items:
        if x.get("replica") != "gw-a":
            continue
        if x["type"] == "record":
            if x["seq"] == 5:
                x["url"] = "https://rewritten.example/"
            if x["seq"] > 1:
                x["prev_hash"] = chain[x["seq"] - 1]
            x["hash"] = record_hash({k: v for k, v in x.items() if k != "type"})
            chain[x["seq"]] = x["hash"]
        elif x["type"] == "checkpoint":
            old = parse_text(note_text(x["note"]))
            from proxy.audit.checkpoint import Checkpoint

            new = Checkpoint(
                replica=old.replica,
                number=old.number,
                seq=old.seq,
                hash=chain.get(old.seq, "0" * 64),
                time=old.time,
                prev=prev_note,
                kind=old.kind,
            )
            x["note"] = new.sign(attacker)
            x["hash"] = new.hash
            prev_note = note_hash(x["note"])
    result = verify(tampered(fetchlog, "resigned", items), fetchlog["public"])
    assert_detected(result, "replica gw-a", "not signed by the given public key")


def test_forged_checkpoint_text(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    i = next(i for i, x in enumerate(items) if x["type"] == "checkpoint" and x["seq"] == 30)
    items[i]["note"] = items[i]["note"].replace("\n30\n", "\n29\n", 1)
    result = verify(tampered(fetchlog, "forged-checkpoint", items), fetchlog["public"])
    assert_detected(result, "replica gw-a", "checkpoint #4", "signature does not verify")


@pytest.mark.parametrize(
    ("name", "value"), [("time", "2030-01-01T00:00:00.000000Z"), ("kind", "periodic")]
)
def test_edited_readable_field_of_a_checkpoint_line(
    fetchlog: dict[str, Path], name: str, value: str
) -> None:
    # The note alone is signed, but a reader takes the time and kind from the readable fields:
    # they must say what the note says.
    items = read_lines(fetchlog["export"])
    i = next(
        i
        for i, x in enumerate(items)
        if x["type"] == "checkpoint" and x["replica"] == "gw-a" and x["kind"] == "shutdown"
    )
    assert items[i][name] != value
    items[i][name] = value
    result = verify(tampered(fetchlog, f"checkpoint-{name}", items), fetchlog["public"])
    assert_detected(
        result, "replica gw-a", f"checkpoint #8: field {name} '{value}'", "the line was edited"
    )


def test_missing_checkpoint(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    i = next(
        i
        for i, x in enumerate(items)
        if x["type"] == "checkpoint" and x["replica"] == "gw-b" and x["number"] == 3
    )
    del items[i]
    result = verify(tampered(fetchlog, "missing-checkpoint", items), fetchlog["public"])
    assert_detected(result, "replica gw-b", "checkpoints #3..#3 are missing")


def test_an_export_stripped_of_its_checkpoints_proves_nothing(fetchlog: dict[str, Path]) -> None:
    # Without checkpoints nothing is signed: a record rewritten and the chain recomputed from it
    # links as well as the original. Such a file fails, unless unsigned records are accepted.
    items = [x for x in read_lines(fetchlog["export"]) if x["type"] != "checkpoint"]
    stripped = tampered(fetchlog, "no-checkpoints", items)
    first = assert_detected(verify(stripped, fetchlog["public"]), "replica gw-a", "seq 1")
    assert "none of its records is signed" in first
    accepted = cli(
        "audit", "verify", stripped, "--public-key", fetchlog["public"], "--allow-unsigned"
    )
    assert accepted.returncode == 0, accepted.stdout
    assert "warning: replica gw-b: no checkpoint in the export" in accepted.stdout
    forged: list[dict[str, Any]] = []
    prev = "0" * 64
    for x in items:
        if x["type"] == "record" and x["replica"] == "gw-a":
            if x["seq"] == 5:
                x["status"] = 404
            x["prev_hash"] = prev
            x["hash"] = prev = record_hash({k: v for k, v in x.items() if k != "type"})
        forged.append(x)
    rewritten = tampered(fetchlog, "rewritten-unsigned", forged)
    assert_detected(verify(rewritten, fetchlog["public"]), "none of its records is signed")


def test_records_after_the_last_checkpoint_are_not_proven(fetchlog: dict[str, Path]) -> None:
    items = read_lines(fetchlog["export"])
    # gw-a's checkpoints at seq 60 (#6, and #7 written at shutdown) dropped: 51..60 unsigned.
    items = [
        x
        for x in items
        if not (x["type"] == "checkpoint" and x["replica"] == "gw-a" and x["seq"] == 60)
    ]
    result = verify(tampered(fetchlog, "unsigned-tail", items), fetchlog["public"])
    first = assert_detected(result, "replica gw-a", "seq 51")
    assert "records 51..60 come after the last checkpoint" in first


def test_whole_replica_records_removed_but_checkpoints_left(fetchlog: dict[str, Path]) -> None:
    items = [
        x
        for x in read_lines(fetchlog["export"])
        if not (x["type"] == "record" and x["replica"] == "gw-b")
    ]
    result = verify(tampered(fetchlog, "no-records", items), fetchlog["public"])
    assert_detected(result, "replica gw-b", "has none of them")


@pytest.mark.parametrize(
    ("deleted", "words"),
    [
        ("replica = 'gw-a' AND seq > 52", ("replica gw-a", "tail removed")),
        ("replica = 'gw-b'", ("replica gw-b", "has none of them (deleted)")),
    ],
    ids=["tail", "whole-replica"],
)
def test_records_deleted_in_the_store_are_seen_in_a_new_export(
    fetchlog: dict[str, Path], tmp_path: Path, deleted: str, words: tuple[str, ...]
) -> None:
    # Deleted from the database, not from an export: the export stopped at the last stored
    # record (and left out a replica with none), dropping the checkpoints that signed the rest,
    # and verified.
    data = tmp_path / "data"
    shutil.copytree(fetchlog["data"], data)
    db = sqlite3.connect(data / "fetchlog.sqlite3")
    db.execute(f"DELETE FROM fetch_records WHERE {deleted}")
    db.commit()
    db.close()
    out = tmp_path / "after-delete.jsonl"
    result = cli("audit", "export", "--data-dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert_detected(verify(out, fetchlog["public"]), *words)


def test_wrong_public_key_is_a_usage_error_not_ok(
    fetchlog: dict[str, Path], tmp_path: Path
) -> None:
    result = verify(fetchlog["export"], tmp_path / "nope.pub")
    assert result.returncode == 2
    assert "cannot read the public key" in result.stderr


def test_site_filter_redacts_other_records_and_still_verifies(fetchlog: dict[str, Path]) -> None:
    out = fetchlog["base"] / "site.jsonl"
    result = cli(
        "audit", "export", "--data-dir", fetchlog["data"], "--site", "b.example", "--output", out
    )
    assert result.returncode == 0, result.stderr
    assert "no record matched" not in result.stderr
    items = read_lines(out)
    assert items[0]["filters"] == {"site": "b.example"} and items[0]["redacted"] is True
    # A site no record has (a host where the key is a rule id, a typo) says so (legal probe).
    nothing = cli(
        "audit",
        "export",
        "--data-dir",
        fetchlog["data"],
        "--site",
        "b.exmaple",
        "--output",
        fetchlog["base"] / "nothing.jsonl",
    )
    assert nothing.returncode == 0, nothing.stderr
    assert "no record matched site=b.exmaple; all 120 are redacted. A record's site is" in (
        nothing.stderr
    )
    full = [x for x in items if x["type"] == "record"]
    redacted = [x for x in items if x["type"] == "redacted"]
    assert full and all(x["site"] == "b.example" for x in full)
    assert len(full) + len(redacted) == 120
    assert all("url" not in x and "team" not in x for x in redacted)
    ok = verify(out, fetchlog["public"])
    assert ok.returncode == 0, ok.stdout
    assert f"({len(redacted)} redacted to digests by the export filters)" in ok.stdout
    assert "export filters: site=b.example" in ok.stdout
    # Without its export line (unsigned, so it may be taken out), nothing says a filter did it
    # (it said "by the export filters": auditor probe).
    headless = verify(tampered(fetchlog, "no-export-line", items[1:]), fetchlog["public"])
    assert headless.returncode == 0, headless.stdout
    assert "redacted to digests; the file has no export line naming filters" in headless.stdout

    # A redacted line is as binding as a record: changing its digest breaks the chain.
    i = next(i for i, x in enumerate(items) if x["type"] == "redacted" and x["seq"] == 21)
    items[i]["body_sha256"] = hashlib.sha256(b"other").hexdigest()
    bad = verify(tampered(fetchlog, "redacted-edit", items), fetchlog["public"])
    assert_detected(bad, "seq 21", "modified: its digest")
    # And dropping another site's record from a filtered export is still a deletion.
    items = read_lines(out)
    del items[next(i for i, x in enumerate(items) if x["type"] == "redacted" and x["seq"] == 21)]
    assert_detected(
        verify(tampered(fetchlog, "redacted-drop", items), fetchlog["public"]), "missing"
    )


def test_a_record_redacted_in_an_export_without_content_filters(
    fetchlog: dict[str, Path],
) -> None:
    # The chain still links, but an export without content filters redacts nothing: a record
    # shown as its digest alone had its content taken out of the file.
    items = read_lines(fetchlog["export"])
    assert items[0]["filters"] == {} and items[0]["redacted"] is False
    i = records(items)[24]
    rec = {k: v for k, v in items[i].items() if k != "type"}
    items[i] = {
        "type": "redacted",
        "replica": "gw-a",
        "seq": 25,
        "prev_hash": rec["prev_hash"],
        "body_sha256": body_sha256(rec),
        "hash": rec["hash"],
    }
    result = verify(tampered(fetchlog, "redacted-unfiltered", items), fetchlog["public"])
    assert_detected(result, "replica gw-a", "seq 25", "replaced by its digest")


def test_redacted_digest_matches_the_record(fetchlog: dict[str, Path]) -> None:
    full = {
        (x["replica"], x["seq"]): x for x in read_lines(fetchlog["export"]) if x["type"] == "record"
    }
    out = fetchlog["base"] / "team.jsonl"
    assert (
        cli(
            "audit",
            "export",
            "--data-dir",
            fetchlog["data"],
            "--team",
            "text-data",
            "--decision",
            "forwarded",
            "--output",
            out,
        ).returncode
        == 0
    )
    for x in read_lines(out):
        if x["type"] == "redacted":
            original = {k: v for k, v in full[(x["replica"], x["seq"])].items() if k != "type"}
            assert x["body_sha256"] == body_sha256(original)
            assert chain_hash(x["prev_hash"], x["body_sha256"]) == original["hash"]
    assert verify(out, fetchlog["public"]).returncode == 0


def test_time_window_is_widened_to_checkpoints_and_verifies(fetchlog: dict[str, Path]) -> None:
    out = fetchlog["base"] / "window.jsonl"
    # Records 25..34 of each replica by time; the export widens to checkpoints at 20 and 40.
    since = "2026-09-21T" + _clock(T0 + 24 * 60)
    until = "2026-09-21T" + _clock(T0 + 34 * 60)
    result = cli(
        "audit",
        "export",
        "--data-dir",
        fetchlog["data"],
        "--since",
        since,
        "--until",
        until,
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr
    items = read_lines(out)
    seqs = [x["seq"] for x in items if x["type"] == "record" and x["replica"] == "gw-a"]
    assert seqs == list(range(21, 41))
    ok = verify(out, fetchlog["public"])
    assert ok.returncode == 0, ok.stdout
    assert "replica gw-a: records 21..40" in ok.stdout
    # Cutting the window's first record is a deletion at the start: nothing anchors seq 22.
    del items[next(i for i, x in enumerate(items) if x.get("seq") == 21 and x["type"] == "record")]
    assert_detected(
        verify(tampered(fetchlog, "window-head", items), fetchlog["public"]),
        "records before seq 22 are missing",
    )


def _clock(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%SZ")


def test_csv_export_has_a_header_and_a_row_per_line(fetchlog: dict[str, Path]) -> None:
    result = cli(
        "audit",
        "export",
        "--data-dir",
        fetchlog["data"],
        "--format",
        "csv",
        "--team",
        "vision-data",
    )
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].startswith("type,id,ts,method,url")
    assert sum(1 for r in rows if r.startswith("record,")) == 60
    assert sum(1 for r in rows if r.startswith("checkpoint,")) == 16


def test_progress_bar_only_on_a_terminal(fetchlog: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    plain = cli("audit", "export", "--data-dir", fetchlog["data"], "--output", out)
    assert "exporting [" not in plain.stderr
    assert plain.stderr.strip() == f"wrote 120 records to {out}"
    filtered = cli(
        "audit", "export", "--data-dir", fetchlog["data"], "--output", out, "--team", "x"
    )
    assert filtered.stderr.strip().splitlines() == [
        f"wrote 120 records (0 in full, 120 redacted by the filters) to {out}",
        "crawlwarden audit export: no record matched team=x; all 120 are redacted.",
    ]
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [
                CRAWLWARDEN,
                "audit",
                "export",
                "--data-dir",
                str(fetchlog["data"]),
                "--output",
                str(out),
            ],
            stderr=slave,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"exporting [" in seen and b"120/120 records" in seen


def test_export_of_a_missing_data_dir_says_what_to_do(tmp_path: Path) -> None:
    result = cli("audit", "export", "--data-dir", tmp_path / "nothing")
    assert result.returncode == 2
    assert "pass the gateway's --data-dir or --audit-dsn" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("--since", "garbage"), ("--audit-dsn", "postgresql://postgres@127.0.0.1:1/none")],
    ids=["invalid-since", "store-unreachable"],
)
def test_a_failed_export_leaves_the_file_at_its_output_as_it_was(
    fetchlog: dict[str, Path], tmp_path: Path, args: tuple[str, ...]
) -> None:
    """An auditor keeps each export to compare the next one with: an export that fails before
    it has written anything must not have emptied the file it was to replace."""
    earlier = tmp_path / "export.jsonl"
    earlier.write_text("the earlier export\n", encoding="utf-8")
    source = () if "--audit-dsn" in args else ("--data-dir", fetchlog["data"])
    result = cli("audit", "export", *source, *args, "--output", earlier)
    assert result.returncode == 2, result.stderr
    assert earlier.read_text(encoding="utf-8") == "the earlier export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.jsonl"]  # nothing left over


def test_export_into_a_directory_that_does_not_exist_says_so(
    fetchlog: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "no-such-dir" / "export.jsonl"
    result = cli("audit", "export", "--data-dir", fetchlog["data"], "--output", out)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(out.parent) in result.stderr


def test_export_reads_the_fetch_log_its_environment_names(
    fetchlog: dict[str, Path], tmp_path: Path
) -> None:
    # As in a replica's pod: `kubectl exec ... crawlwarden audit export`, no flags, from a
    # directory without a .crawlwarden of its own.
    env = {"CRAWLWARDEN_DATA_DIR": str(fetchlog["data"]), "CRAWLWARDEN_AUDIT_DSN": ""}
    out = tmp_path / "env.jsonl"
    result = cli("audit", "export", "--output", out, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_lines(out)[1:] == read_lines(fetchlog["export"])[1:]  # (the header has times)
    # A flag given wins over the environment.
    elsewhere = cli("audit", "export", "--data-dir", tmp_path / "none", env=env, cwd=tmp_path)
    assert elsewhere.returncode == 2 and "no fetch log" in elsewhere.stderr
    report = cli("report", "--format", "json", env=env, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["sites"]


def test_a_key_written_twice_in_a_record_is_caught(fetchlog: dict[str, Path]) -> None:
    # The hashed record keeps the last value; a reader (or grep) that takes the first sees
    # another URL than the one signed.
    lines = fetchlog["export"].read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"type":"record"' in line and '"seq":10,' in line)
    lines[i] = lines[i].replace(
        '{"type":"record",', '{"type":"record","url":"http://evil.example/",', 1
    )
    edited = fetchlog["base"] / "duplicate-key.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    first = assert_detected(verify(edited, fetchlog["public"]), f"(line {i + 1})")
    assert "the key 'url' appears twice" in first


def test_a_csv_export_is_not_taken_for_a_tampered_one(fetchlog: dict[str, Path]) -> None:
    csv_export = fetchlog["base"] / "export.csv"
    made = cli(
        "audit", "export", "--data-dir", fetchlog["data"], "--format", "csv", "--output", csv_export
    )
    assert made.returncode == 0, made.stderr
    result = verify(csv_export, fetchlog["public"])
    assert result.returncode == 2 and "is a CSV export" in result.stderr, result.stdout


@pytest.mark.parametrize("command", ["verify", "export"])
def test_a_reader_that_went_away_is_no_crash(fetchlog: dict[str, Path], command: str) -> None:
    # `crawlwarden audit verify ... | head -3`: stdout is a pipe nobody reads any more.
    args = {
        "verify": ["verify", str(fetchlog["export"]), "--public-key", str(fetchlog["public"])],
        "export": ["export", "--data-dir", str(fetchlog["data"])],
    }[command]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [CRAWLWARDEN, "audit", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0  # verify: the verdict (intact), though nobody read it


def test_an_unknown_decision_filter_is_refused(fetchlog: dict[str, Path]) -> None:
    result = cli("audit", "export", "--data-dir", fetchlog["data"], "--decision", "bogus")
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr


@pytest.mark.parametrize("command", [("audit", "export"), ("report",)], ids=["export", "report"])
def test_a_window_that_ends_before_it_starts_is_refused(
    fetchlog: dict[str, Path], command: tuple[str, ...]
) -> None:
    """--since and --until given the wrong way round select nothing: an export or a report of
    no records would read as a period without fetches."""
    result = cli(
        *command, "--data-dir", fetchlog["data"], "--since", "2026-09-22", "--until", "2026-09-21"
    )
    assert result.returncode == 2, result.stdout[:200]
    assert "--since" not in result.stdout
    assert "is after until" in result.stderr


def test_keys_generate_writes_a_0600_private_key(tmp_path: Path) -> None:
    result = cli(
        "keys", "generate", "--private", tmp_path / "k.pem", "--public", tmp_path / "k.pub"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "k.pem").read_bytes()
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    again = cli("keys", "generate", "--private", tmp_path / "k.pem", "--public", tmp_path / "x")
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert json.dumps  # keep json imported for the helpers above


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("2026-11-28", "2026-11-28T00:00:00.000000Z"),
        ("2026-11-28T13:00:00Z", "2026-11-28T13:00:00.000000Z"),
        ("2026-11-28t13:00:00z", "2026-11-28T13:00:00.000000Z"),  # RFC 3339 5.6 allows it
        ("2026-11-28T14:00:00+01:00", "2026-11-28T13:00:00.000000Z"),
        ("2026-11-28T13:00", "2026-11-28T13:00:00.000000Z"),  # naive: UTC
    ],
)
def test_export_and_report_times_read_as_rfc_3339_allows(given: str, read: str) -> None:
    from proxy.audit.query import parse_time

    assert parse_time(given) == read
    with pytest.raises(ValueError, match="invalid time"):
        parse_time("28/11/2026")
