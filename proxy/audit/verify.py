"""`crawlwarden audit verify FILE --public-key KEY`: prove an export intact, offline.

Two passes over the JSON-lines export (FORMATS.md): the first reads and verifies every signed
checkpoint and purge note, the second walks each replica's records in file order, recomputing
every hash and link and comparing the chain with the checkpoints. Exit 0 prints what was proven;
exit 1 names the first bad record (replica, seq, id, what is wrong) and lists the other problems.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from proxy.audit.checkpoint import UNNUMBERED
from proxy.audit.checkpoint import Checkpoint
from proxy.audit.checkpoint import CheckpointError
from proxy.audit.checkpoint import checkpoint_line
from proxy.audit.checkpoint import note_hash
from proxy.audit.checkpoint import open_note_by
from proxy.audit.export import FORMAT
from proxy.audit.keys import SigningKeyError
from proxy.audit.keys import Verifier
from proxy.audit.keys import load_public_key
from proxy.audit.record import GENESIS_HASH
from proxy.audit.record import body_sha256
from proxy.audit.record import chain_hash

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
_HEX64 = frozenset("0123456789abcdef")
_SIGNED_LINES = ("checkpoint", "purge", "witness")
# How long after a later key first signs a note the earlier one may still sign (a rolling
# restart of a fleet onto the new key): `audit verify --rotation-grace`.
ROTATION_GRACE = 3600.0


def _time(rfc3339: str) -> dt.datetime:
    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))


@dataclass(order=True)
class Problem:
    line: int
    replica: str | None = field(default=None, compare=False)
    seq: int | None = field(default=None, compare=False)
    id: str | None = field(default=None, compare=False)
    message: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = []
        if self.replica is not None:
            where.append(f"replica {self.replica}")
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.id:
            where.append(f"id {self.id}")
        return f"{' '.join(where) or 'export'}: {self.message} (line {self.line})"


@dataclass
class SignedPoint:
    line: int
    checkpoint: Checkpoint
    note_hash: str
    key: int = 0  # which of the given public keys signed it (in the order given)

    @property
    def name(self) -> str:
        c = self.checkpoint
        if c.kind == "witness":
            return f"the witness note of replica {c.by}"
        return f"checkpoint #{c.number}"


@dataclass
class Chain:
    """What the verifier learns about one replica's chain."""

    replica: str
    checkpoints: list[SignedPoint] = field(default_factory=list)  # numbered, in file order
    purges: list[SignedPoint] = field(default_factory=list)
    # Signed by another replica for records this one stored and never signed (it stopped).
    witnesses: list[SignedPoint] = field(default_factory=list)
    by_seq: dict[int, list[SignedPoint]] = field(default_factory=dict)
    first_seq: int | None = None
    first_prev: str | None = None
    first_line: int = 0
    first_id: str | None = None
    last_seq: int = 0
    last_line: int = 0
    last_hash: str = GENESIS_HASH
    last_id: str | None = None
    full: int = 0
    redacted: int = 0
    earliest: str | None = None
    latest: str | None = None
    gaps: list[tuple[int, int, Problem]] = field(default_factory=list)
    signed_up_to: int = 0  # the highest seq a checkpoint (or witness note) in the file covers
    unsigned: Problem | None = None  # the first record no checkpoint covers


@dataclass
class Report:
    chains: dict[str, Chain] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Records no checkpoint covers: after every other problem (a forged checkpoint, say, is the
    # news; that the records it claimed to cover are then unsigned follows from it).
    unsigned: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    header: dict[str, Any] | None = None
    keys_used: set[int] = field(default_factory=set)

    def chain(self, replica: str) -> Chain:
        if replica not in self.chains:
            self.chains[replica] = Chain(replica)
        return self.chains[replica]

    def problem(
        self, line: int, message: str, rec: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        rec = rec or {}
        self.problems.append(
            Problem(
                line,
                kw.get("replica", rec.get("replica")),
                kw.get("seq", rec.get("seq")),
                kw.get("id", rec.get("id")),
                message,
            )
        )


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose every key is once: with a key twice, a reader that keeps the first
    value sees another record than the one hashed (which kept the last)."""
    item = dict(pairs)
    if len(item) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"the key {key!r} appears twice")
            seen.add(key)
    return item


def _read(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    with path.open("r", encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                item = json.loads(text, object_pairs_hook=_no_duplicates)
            except _DuplicateKey as e:
                yield number, None, f"modified: {e}"
                continue
            except ValueError:
                yield number, None, "not JSON"
                continue
            if not isinstance(item, dict):
                yield number, None, "not a JSON object"
                continue
            yield number, item, ""


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def verify_file(
    path: Path,
    verifier: Verifier | Sequence[Verifier],
    *,
    allow_unsigned: bool = False,
    rotation_grace: float = ROTATION_GRACE,
) -> Report:
    """`allow_unsigned`: records no checkpoint covers are a warning, not a problem (they are
    chained, but nothing proves that the chain itself was not rewritten)."""
    report = Report()
    verifiers = [verifier] if isinstance(verifier, Verifier) else list(verifier)
    _pass_signed(path, verifiers, report)
    for chain in report.chains.values():
        chain.signed_up_to = max(
            (p.checkpoint.seq for p in chain.checkpoints + chain.witnesses), default=0
        )
    _pass_records(path, report)
    _check_header_replicas(report)
    for chain in report.chains.values():
        _check_witness_anchors(chain, report)
        _finish_chain(chain, report, allow_unsigned=allow_unsigned)
    _check_keys(verifiers, report, rotation_grace)
    report.problems.sort()
    report.problems += sorted(report.unsigned)
    return report


def _is_window(header: dict[str, Any] | None) -> bool:
    """Whether the export is a time window (--since): the only export whose chains may start
    right after a checkpoint. The header is not signed: this holds against a database writer
    (whose deletions an honest export then shows), not against one who edits the file."""
    filters = (header or {}).get("filters")
    return isinstance(filters, dict) and filters.get("since") is not None


def _check_header_replicas(report: Report) -> None:
    """Every replica the export line lists has lines in the file. The header is not signed, so
    this catches a file cut short or pages lost on the way, not a forger (who would edit it)."""
    listed = (report.header or {}).get("replicas")
    if not isinstance(listed, list):
        return
    for span in listed:
        if not isinstance(span, dict) or not isinstance(span.get("replica"), str):
            continue
        if span["replica"] not in report.chains:
            report.problem(
                1,
                f"the export lists replica {span['replica']} (seq {span.get('first')}.."
                f"{span.get('last')}) but the file has none of its lines: lines were removed "
                "or pages lost",
                replica=span["replica"],
            )
            continue
        # A file cut right after one of its checkpoints links and is signed as far as it goes:
        # only the export line says that it should have gone further. (Cut before a checkpoint
        # still in the file, it is "tail removed", named with that checkpoint.)
        chain = report.chains[span["replica"]]
        last = span.get("last")
        if (
            chain.first_seq is not None
            and chain.signed_up_to <= chain.last_seq
            and isinstance(last, int)
            and not isinstance(last, bool)
            and chain.last_seq < last
        ):
            report.problem(
                chain.last_line,
                f"the export lists records {span.get('first')}..{last} of this replica but "
                f"the file ends at seq {chain.last_seq}: records {chain.last_seq + 1}..{last} "
                "are missing (the file was cut short or pages lost)",
                replica=span["replica"],
                seq=chain.last_seq + 1,
            )


def _check_keys(verifiers: list[Verifier], report: Report, grace: float) -> None:
    """Several keys (rotated) are given in the order they were used, and each signs something:
    in a chain, no checkpoint signed by an earlier key follows one signed by a later key; no
    note is signed by a key later than `grace` seconds after a later key first signed one (a
    leaked old key cannot vouch for what came after the rotation, in any chain); and a key that
    signs nothing proves nothing (a log re-signed with the old key alone would pass otherwise).
    A forger with an old key can still date what it signs before the rotation."""
    if len(verifiers) < 2:
        return
    notes = [
        point
        for chain in report.chains.values()
        for point in chain.checkpoints + chain.purges + chain.witnesses
    ]
    first: dict[int, dt.datetime] = {}
    for point in notes:
        at = _time(point.checkpoint.time)
        if point.key not in first or at < first[point.key]:
            first[point.key] = at
    for point in notes:
        later = [first[k] for k in first if k > point.key]
        if not later:
            continue
        ended = min(later) + dt.timedelta(seconds=grace)
        if _time(point.checkpoint.time) > ended:
            report.problem(
                point.line,
                f"{point.name} is signed by public key {point.key + 1} at "
                f"{point.checkpoint.time}, after a later key had taken over ({min(later)} "
                f"+ {grace:g} s): an old key signing after the rotation is a forgery "
                "(--rotation-grace for a longer rollout)",
                replica=point.checkpoint.replica,
                seq=point.checkpoint.seq,
            )
    for chain in report.chains.values():
        latest: SignedPoint | None = None
        for point in chain.checkpoints:
            if latest is not None and point.key < latest.key:
                report.problem(
                    point.line,
                    f"checkpoint #{point.checkpoint.number} is signed by public key "
                    f"{point.key + 1} after checkpoint #{latest.checkpoint.number} was signed by "
                    f"key {latest.key + 1}: give the keys in the order they were used; an old "
                    "key signing after the new one is a forgery",
                    replica=chain.replica,
                    seq=point.checkpoint.seq,
                )
            if latest is None or point.key > latest.key:
                latest = point
    for index, v in enumerate(verifiers):
        if index not in report.keys_used:
            report.problem(
                1,
                f"public key {index + 1} (key ID {v.key_id.hex()}) signs nothing in the file: "
                "give only the keys the log was signed with",
            )


def _pass_signed(path: Path, verifiers: list[Verifier], report: Report) -> None:
    for line, item, error in _read(path):
        if item is None:
            report.problem(line, f"unreadable line ({error})")
            continue
        kind = item.get("type")
        if kind == "export":
            if report.header is None:
                report.header = item
            continue
        if kind not in _SIGNED_LINES:
            continue
        note = item.get("note")
        if not isinstance(note, str):
            report.problem(line, f"{kind} line without a signed note", item)
            continue
        try:
            checkpoint, key = open_note_by(note, verifiers)
        except CheckpointError as e:
            report.problem(line, f"{kind} #{item.get('number')}: {e}", item)
            continue
        if kind != (checkpoint.kind if checkpoint.kind in UNNUMBERED else "checkpoint"):
            report.problem(line, f"line type {kind} holds a {checkpoint.kind} note", item)
            continue
        point = SignedPoint(line, checkpoint, note_hash(note), key)
        report.keys_used.add(key)
        # Every readable field the note carries (a reader takes `time` and `kind` from them).
        for name, value in checkpoint_line(checkpoint, note).items():
            if name not in ("type", "note") and name in item and item[name] != value:
                report.problem(
                    line,
                    f"{point.name}: field {name} {item[name]!r} differs from its "
                    f"signed note ({value!r}): the line was edited",
                    replica=checkpoint.replica,
                    seq=checkpoint.seq,
                )
        chain = report.chain(checkpoint.replica)
        if checkpoint.kind == "purge":
            chain.purges.append(point)
        elif checkpoint.kind == "witness":
            chain.witnesses.append(point)
            chain.by_seq.setdefault(checkpoint.seq, []).append(point)
        else:
            chain.checkpoints.append(point)
            chain.by_seq.setdefault(checkpoint.seq, []).append(point)


def _pass_records(path: Path, report: Report) -> None:
    for line, item, _ in _read(path):
        if item is None:
            continue
        kind = item.get("type")
        if kind == "export" or kind in _SIGNED_LINES:
            continue
        if kind not in ("record", "redacted"):
            report.problem(line, f"unknown line type {kind!r}: inserted or damaged", item)
            continue
        _check_record(line, item, report)


def _check_record(line: int, item: dict[str, Any], report: Report) -> None:
    rec = dict(item)
    kind = rec.pop("type")
    replica, seq = rec.get("replica"), rec.get("seq")
    if not isinstance(replica, str) or not isinstance(seq, int) or isinstance(seq, bool):
        report.problem(line, "record without a replica and an integer seq", rec)
        return
    claimed, prev = rec.get("hash"), rec.get("prev_hash")
    if (
        not isinstance(claimed, str)
        or not isinstance(prev, str)
        or not (_is_hash(claimed) and _is_hash(prev))
    ):
        report.problem(line, "record without valid hash and prev_hash fields", rec)
        return
    chain = report.chain(replica)
    if kind == "redacted":
        digest = rec.get("body_sha256")
        if (
            not isinstance(digest, str)
            or not _is_hash(digest)
            or set(rec)
            != {
                "replica",
                "seq",
                "prev_hash",
                "body_sha256",
                "hash",
            }
        ):
            report.problem(line, "malformed redacted line", rec)
            return
        if report.header is not None and report.header.get("redacted") is not True:
            # Only content filters redact: here a record's content was taken out of the file.
            report.problem(
                line,
                "a redacted line in an export without content filters (its export line says "
                '"redacted": false): the record was replaced by its digest',
                rec,
            )
        chain.redacted += 1
    else:
        digest = body_sha256(rec)
        chain.full += 1
        ts = rec.get("ts")
        if isinstance(ts, str):
            chain.earliest = ts if chain.earliest is None else min(chain.earliest, ts)
            chain.latest = ts if chain.latest is None else max(chain.latest, ts)
    if chain_hash(prev, digest) != claimed:
        what = "its digest" if kind == "redacted" else "its content"
        report.problem(line, f"modified: {what} does not match its hash", rec)

    if chain.first_seq is None:
        chain.first_seq, chain.first_prev, chain.first_line = seq, prev, line
        chain.first_id = rec.get("id")
    elif seq == chain.last_seq + 1:
        if prev != chain.last_hash:
            report.problem(
                line,
                f"prev_hash does not match the hash of seq {chain.last_seq} "
                f"(id {chain.last_id}): a record was modified, replaced or inserted between them",
                rec,
            )
    elif seq > chain.last_seq + 1:
        gap = Problem(
            line,
            replica,
            seq,
            rec.get("id"),
            f"records seq {chain.last_seq + 1}..{seq - 1} are missing before this one (deleted)",
        )
        chain.gaps.append((chain.last_seq + 1, seq - 1, gap))
        report.problems.append(gap)
    else:
        for low, high, gap in chain.gaps:
            if low <= seq <= high:
                # The "missing" record is here after all, out of place: a reordering.
                if gap in report.problems:
                    report.problems.remove(gap)
                report.problem(
                    gap.line,
                    f"reordered: seq {gap.seq} (id {gap.id}) appears before seq {seq} "
                    f"(id {rec.get('id')}, line {line})",
                    replica=replica,
                    seq=gap.seq,
                    id=gap.id,
                )
                break
        else:
            report.problem(
                line,
                f"seq {seq} appears again after seq {chain.last_seq}: inserted or duplicated",
                rec,
            )
        return
    chain.last_seq, chain.last_hash, chain.last_id = seq, claimed, rec.get("id")
    chain.last_line = line
    if chain.unsigned is None and seq > chain.signed_up_to:
        chain.unsigned = Problem(line, replica, seq, rec.get("id"))
    for point in chain.by_seq.get(seq, []):
        if point.checkpoint.hash != claimed:
            report.problem(
                line,
                f"{point.name} (line {point.line}) signed another hash for this seq: this "
                "record or one before it was altered, inserted or removed",
                rec,
            )


def _check_witness_anchors(chain: Chain, report: Report) -> None:
    """Every witness note continues (its `prev`) from a checkpoint of its chain in the file, or
    from the one the purge note says retention deleted. Its signature alone does not prove what
    the witness read as the chain's last checkpoint: a database writer could plant a checkpoint
    row, have the tail witnessed after it, and delete the row again (a witness older than the
    one that opens that checkpoint with its key signed whatever the row said). Every export
    holds the anchor, a --since window too: it starts at the newest checkpoint below its first
    record (or the purge note), holds only witness notes at or after that record, and a note's
    anchor is the chain's last checkpoint before the records it signs, so that checkpoint or a
    later one."""
    present = {p.note_hash for p in chain.checkpoints} | {p.checkpoint.prev for p in chain.purges}
    for point in chain.witnesses:
        w = point.checkpoint
        if w.prev in present:
            continue
        report.problem(
            point.line,
            f"{point.name} continues from the signed note with SHA-256 {w.prev} (its prev), "
            f"which is no checkpoint of replica {chain.replica} in the export nor the one its "
            "purge note deleted: the checkpoint it was signed after was removed (or planted "
            "and removed)",
            replica=chain.replica,
            seq=w.seq,
        )


def _finish_chain(chain: Chain, report: Report, *, allow_unsigned: bool = False) -> None:
    replica = chain.replica
    purge_anchor = None
    if chain.first_seq is None:
        signed = [p for p in chain.checkpoints + chain.witnesses if p.checkpoint.seq > 0]
        purged = max((p.checkpoint.seq for p in chain.purges), default=0)
        for point in signed:
            if point.checkpoint.seq > purged:
                report.problem(
                    point.line,
                    f"{point.name} covers records up to seq "
                    f"{point.checkpoint.seq} but the export has none of them (deleted)",
                    replica=replica,
                    seq=point.checkpoint.seq,
                )
                break
        return
    first, prev = chain.first_seq, chain.first_prev
    # -- the start of the chain must be anchored: genesis, a checkpoint, or a purge note.
    window = False
    if first == 1:
        if prev != GENESIS_HASH:
            report.problem(
                chain.first_line,
                "the first record's prev_hash is not the genesis hash",
                replica=replica,
                seq=first,
                id=chain.first_id,
            )
    else:
        below = [p for p in chain.by_seq.get(first - 1, []) if p.checkpoint.hash == prev]
        purges = [
            p for p in chain.purges if p.checkpoint.seq == first - 1 and p.checkpoint.hash == prev
        ]
        if purges:
            purge_anchor = purges[-1].checkpoint
        elif below and _is_window(report.header):
            window = True
        elif below:
            # Only a time window (--since) starts after a checkpoint: a whole export starts at
            # seq 1 or right after the purge note, so the records before this one were deleted
            # (from the store, or from the file).
            cut = max((p.checkpoint.seq for p in chain.purges), default=0)
            report.problem(
                chain.first_line,
                f"records before seq {first} are missing: seq {cut + 1}..{first - 1} are "
                "neither in this export without --since nor cut by a purge note (records "
                "deleted at the start)",
                replica=replica,
                seq=first,
                id=chain.first_id,
            )
            window = True
        else:
            report.problem(
                chain.first_line,
                f"records before seq {first} are missing: no checkpoint or purge note "
                "anchors this first record's prev_hash (records deleted at the start)",
                replica=replica,
                seq=first,
                id=chain.first_id,
            )
            window = True
    # -- the numbered checkpoints form their own chain (CloudTrail-style previous digest).
    previous: SignedPoint | None = None
    for point in chain.checkpoints:
        c = point.checkpoint
        if previous is None:
            if not window and c.number > 1:
                expected = purge_anchor.number if purge_anchor is not None else 0
                if c.number != expected + 1 or (purge_anchor and c.prev != purge_anchor.prev):
                    report.problem(
                        point.line,
                        f"checkpoints #{expected + 1}..#{c.number - 1} are missing from the start",
                        replica=replica,
                        seq=c.seq,
                    )
            elif c.number == 1 and c.prev != GENESIS_HASH:
                report.problem(point.line, "checkpoint #1 has a prev", replica=replica)
        else:
            p = previous.checkpoint
            if c.number <= p.number:
                report.problem(
                    point.line,
                    f"checkpoint #{c.number} comes after #{p.number}: reordered or duplicated",
                    replica=replica,
                    seq=c.seq,
                )
                continue
            if c.number > p.number + 1:
                report.problem(
                    point.line,
                    f"checkpoints #{p.number + 1}..#{c.number - 1} are missing (deleted)",
                    replica=replica,
                    seq=c.seq,
                )
            elif c.prev != previous.note_hash:
                report.problem(
                    point.line,
                    f"checkpoint #{c.number} does not follow checkpoint #{p.number}",
                    replica=replica,
                    seq=c.seq,
                )
            if c.seq < p.seq:
                report.problem(
                    point.line,
                    f"checkpoint #{c.number} covers fewer records than #{p.number}",
                    replica=replica,
                    seq=c.seq,
                )
        previous = point
        # -- a signed checkpoint beyond the last record: the tail was cut off.
        if c.seq > chain.last_seq:
            report.problem(
                point.line,
                f"the export ends at seq {chain.last_seq} but checkpoint #{c.number} "
                f"({c.time}) covers seq {c.seq}: records {chain.last_seq + 1}..{c.seq} are "
                "missing (tail removed)",
                replica=replica,
                seq=chain.last_seq + 1,
            )
    for point in chain.witnesses:
        if point.checkpoint.seq > chain.last_seq:
            report.problem(
                point.line,
                f"the export ends at seq {chain.last_seq} but {point.name} covers seq "
                f"{point.checkpoint.seq}: records {chain.last_seq + 1}..{point.checkpoint.seq} "
                "are missing (tail removed)",
                replica=replica,
                seq=chain.last_seq + 1,
            )
    unsigned = chain.unsigned
    if unsigned is None:
        return
    # A chain is only as good as the signature over it: records past the last checkpoint can
    # be rewritten, their hashes recomputed, and still link.
    if not chain.checkpoints:
        what = "no checkpoint in the export: none of its records is signed"
    else:
        what = (
            f"records {unsigned.seq}..{chain.last_seq} come after the last checkpoint: "
            "chained but not yet signed (a gateway signs every checkpoint_every_seconds; "
            "export again later, or up to an --until in the past, to prove them)"
        )
    if allow_unsigned:
        report.warnings.append(f"replica {replica}: {what}")
    else:
        unsigned.message = (
            f"{what}; nothing proves them untouched (--allow-unsigned accepts them as unproven)"
        )
        report.unsigned.append(unsigned)


def summary(report: Report, path: Path, verifiers: Sequence[Verifier]) -> list[str]:
    keys = "; ".join(f"public key ID {v.key_id.hex()}, SHA-256 {v.fingerprint}" for v in verifiers)
    out = [f"OK: {path} is intact ({keys})"]
    header = report.header or {}
    filters = header.get("filters") or {}
    if filters:
        described = ", ".join(f"{k}={v}" for k, v in filters.items())
        out.append(f"export filters: {described}")
    total = redacted = 0
    earliest: str | None = None
    latest: str | None = None
    for name in sorted(report.chains):
        c = report.chains[name]
        if c.first_seq is None:
            out.append(f"replica {name}: no records, {len(c.checkpoints)} checkpoint(s)")
            continue
        total += c.full + c.redacted
        redacted += c.redacted
        if c.earliest:
            earliest = c.earliest if earliest is None else min(earliest, c.earliest)
        if c.latest:
            latest = c.latest if latest is None else max(latest, c.latest)
        last = c.checkpoints[-1].checkpoint if c.checkpoints else None
        signed = (
            f"last checkpoint #{last.number} at seq {last.seq}, {last.time}"
            if last
            else "no checkpoint"
        )
        witness = max(c.witnesses, key=lambda p: p.checkpoint.seq, default=None)
        if witness is not None and witness.checkpoint.seq > (last.seq if last else 0):
            w = witness.checkpoint
            signed += (
                f"; records {(last.seq if last else 0) + 1}..{w.seq} signed as stored by "
                f"replica {w.by} at {w.time} (this replica stopped without signing them)"
            )
        part = f"replica {name}: records {c.first_seq}..{c.last_seq} ({c.full} in full"
        part += f", {c.redacted} redacted)" if c.redacted else ")"
        out.append(f"{part}, {c.earliest or '-'} .. {c.latest or '-'}; {signed}")
    out.append(
        f"verified {len(report.chains)} replica(s), {total} records"
        + (
            f" ({redacted} redacted to digests by the export filters)"
            if redacted and report.header is not None
            # (an export line taken out of the file: nothing says a filter did it)
            else f" ({redacted} redacted to digests; the file has no export line naming filters)"
            if redacted
            else ""
        )
        + (f", time span {earliest} .. {latest}" if earliest else "")
    )
    if redacted:
        out.append(
            f"note: {redacted} redacted record(s) are proven in the chain, but that they did not "
            "match the export's filters is the exporter's word (their content is not in the file)"
        )
    out.extend(f"warning: {w}" for w in report.warnings)
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        verifiers = [load_public_key(key) for key in args.public_key]
    except SigningKeyError as e:
        print(f"crawlwarden audit verify: {e}", file=sys.stderr)
        return EXIT_USAGE
    path: Path = args.file
    if not path.is_file():
        print(f"crawlwarden audit verify: no file {path}", file=sys.stderr)
        return EXIT_USAGE
    with path.open("rb") as f:
        opening = f.readline(4096)
    if opening.startswith(b"type,"):
        print(
            f"crawlwarden audit verify: {path} is a CSV export, which cannot be verified (CSV "
            "loses JSON types, so hashes cannot be recomputed); export with --format jsonl",
            file=sys.stderr,
        )
        return EXIT_USAGE
    report = verify_file(
        path,
        verifiers,
        allow_unsigned=args.allow_unsigned,
        rotation_grace=ROTATION_GRACE if args.rotation_grace is None else args.rotation_grace,
    )
    header = report.header
    if header is not None and header.get("format") != FORMAT:
        print(
            f"crawlwarden audit verify: {path} has format {header.get('format')!r}; "
            f"this version reads {FORMAT}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not report.chains and not report.problems:
        print(
            f"crawlwarden audit verify: {path} holds no records (an export of a period with "
            "none?): nothing to verify, nothing vouched for",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if report.problems:
        lines = [f"FAILED: {report.problems[0]}"]
        if len(report.problems) > 1:
            lines.append(f"{len(report.problems)} problems in all:")
            lines += [f"  {problem}" for problem in report.problems[:50]]
            if len(report.problems) > 50:
                lines.append(f"  ... and {len(report.problems) - 50} more")
        return _say(lines, EXIT_TAMPERED)
    return _say(summary(report, path, verifiers), EXIT_OK)


def _say(lines: list[str], verdict: int) -> int:
    """Print the lines; the verdict is the exit status even if the reader went away before
    reading them all (`| head -3`)."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return verdict
