"""Signed checkpoints of a replica's chain: the C2SP signed-note envelope, our own note text.

A checkpoint says, under the gateway's Ed25519 key: "at `time`, the chain of `replica` had `seq`
records and its last record's hash was `hash`; my previous checkpoint was `prev`". It is modelled on
C2SP tlog-checkpoint (origin, size, root hash lines, then extension lines) and on AWS CloudTrail's
digest files (each digest carries the hash of the previous one, so deleting a digest is seen). The
root is the hash of the last record of a linear chain, not an RFC 6962 Merkle root, so the origin
line names our own format and generic tlog tools must not read it as a Merkle tree head.

Note text (every line ends in U+000A; base64 is RFC 4648 standard with padding):

    crawlwarden.fetchlog/<replica>            origin; one chain per replica (percent-encoded)
    <seq>                                     records 1..seq are covered (decimal, 0 if none)
    <base64 of the 32-byte hash of record seq>  32 zero bytes when seq is 0
    checkpoint <number> <kind>                number counts this replica's checkpoints from 1;
                                              kind: start | periodic | shutdown
    time <RFC 3339 UTC>
    prev <base64 SHA-256 of the previous checkpoint's whole signed note>   zero bytes for #1

A purge note (retention, see FetchLog.purge) has the same shape with `purge <K>` as the fourth
line: records 1..seq and checkpoints 1..K were deleted; `hash` is record seq's hash (what record
seq+1's prev_hash must be) and `prev` is the SHA-256 of checkpoint K's note (what checkpoint K+1's
prev must be). Purge notes are not numbered checkpoints; they only anchor what remains.

A witness note (FetchLog.witness_orphans) has `witness <by>` as the fourth line: a replica that
stopped without signing its last records (killed, its node lost) left records ..seq stored, and
replica `by` (percent-encoded) read them, found them linked to what had been signed, and signed
`hash` for them. `prev` is the SHA-256 of the stopped replica's last checkpoint note. Witness
notes are not numbered either: they cover a prefix of that chain and never take its numbering.

Then, as in C2SP signed-note: an empty line and one signature line
`— crawlwarden-fetchlog <base64(key ID || Ed25519 signature over the note text)>`, with
key ID = SHA-256("crawlwarden-fetchlog" || 0x0A || 0x01 || 32-byte public key)[:4].
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.audit.keys import Signer
from proxy.audit.keys import Verifier
from proxy.audit.record import GENESIS_HASH

ORIGIN_PREFIX = "crawlwarden.fetchlog/"
KINDS = ("start", "periodic", "shutdown", "purge", "witness")
UNNUMBERED = ("purge", "witness")  # their fourth line is "<kind> <value>"
_DASH = "\u2014"
_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


class CheckpointError(ValueError):
    """A checkpoint note that is malformed or whose signature does not verify."""


def _encoded(replica: str) -> str:
    # Percent-encode anything that could break a note line or a C2SP origin (spaces, '+').
    return urllib.parse.quote(replica, safe="-._~:@")


def origin_for(replica: str) -> str:
    return ORIGIN_PREFIX + _encoded(replica)


def replica_of(origin: str) -> str:
    if not origin.startswith(ORIGIN_PREFIX):
        raise CheckpointError(f"origin {origin!r} is not a crawlwarden fetch log")
    return urllib.parse.unquote(origin[len(ORIGIN_PREFIX) :])


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _hex(b64: str, what: str) -> str:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CheckpointError(f"{what} is not base64") from e
    if len(raw) != 32:
        raise CheckpointError(f"{what} is not a 32-byte hash")
    return raw.hex()


def note_text(note: str) -> str:
    """The signed text of a note (everything before the empty line and the signatures)."""
    return note[: note.rfind("\n\n") + 1]


def note_hash(note: str) -> str:
    """SHA-256 (hex) of a whole signed note: what the next checkpoint's `prev` holds."""
    return hashlib.sha256(note.encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    replica: str
    number: int  # for a purge note: K, the last deleted checkpoint
    seq: int
    hash: str
    time: str
    prev: str = GENESIS_HASH
    kind: str = "periodic"
    by: str = ""  # a witness note: the replica that signed it

    def text(self) -> str:
        if self.kind not in KINDS:
            raise CheckpointError(f"unknown checkpoint kind {self.kind!r}")
        if not _RFC3339.match(self.time):
            raise CheckpointError(f"checkpoint time {self.time!r} is not RFC 3339 UTC")
        if self.kind == "purge":
            head = f"purge {self.number}"
        elif self.kind == "witness":
            head = f"witness {_encoded(self.by)}"
        else:
            head = f"checkpoint {self.number} {self.kind}"
        lines = [
            origin_for(self.replica),
            str(self.seq),
            _b64(self.hash),
            head,
            f"time {self.time}",
            f"prev {_b64(self.prev)}",
        ]
        return "".join(line + "\n" for line in lines)

    def sign(self, signer: Signer) -> str:
        """The signed note (text, empty line, signature line)."""
        text = self.text()
        signature = signer.verifier.key_id + signer.sign(text.encode())
        return f"{text}\n{_DASH} {signer.name} {base64.b64encode(signature).decode()}\n"


def parse_text(text: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) != 7 or lines[-1] != "":
        raise CheckpointError("checkpoint text must have exactly six lines")
    origin, seq, root, head, time_line, prev_line = lines[:6]
    replica = replica_of(origin)
    head_parts = head.split(" ")
    by = ""
    if head_parts[0] == "witness" and len(head_parts) == 2 and head_parts[1]:
        kind, by = "witness", urllib.parse.unquote(head_parts[1])
    elif head_parts[0] == "purge" and len(head_parts) == 2:
        kind = "purge"
    elif len(head_parts) == 3 and head_parts[0] == "checkpoint" and head_parts[2] in KINDS:
        kind = head_parts[2]
        if kind in UNNUMBERED:
            raise CheckpointError(f"a {kind} note uses the '{kind} <...>' line")
    else:
        raise CheckpointError("malformed 'checkpoint <number> <kind>' line")
    if not time_line.startswith("time ") or not _RFC3339.match(time_line[5:]):
        raise CheckpointError("malformed 'time' line")
    if not prev_line.startswith("prev "):
        raise CheckpointError("malformed 'prev' line")
    return Checkpoint(
        replica=replica,
        number=0 if kind == "witness" else _decimal(head_parts[1]),
        seq=_decimal(seq),
        hash=_hex(root, "the chain hash"),
        time=time_line[5:],
        prev=_hex(prev_line[5:], "prev"),
        kind=kind,
        by=by,
    )


def _decimal(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise CheckpointError(f"{text!r} is not a decimal number without leading zeros")
    return int(text)


def open_note(note: str, verifier: Verifier | Sequence[Verifier]) -> Checkpoint:
    """Verify a signed note with `verifier` (or any of several: keys rotated) and return its
    checkpoint; CheckpointError if not."""
    return open_note_by(note, [verifier] if isinstance(verifier, Verifier) else verifier)[0]


def names_key(note: str, verifier: Verifier) -> bool:
    """Whether a signed note has a signature line of `verifier`'s key (its name and key ID),
    read without verifying it (to find the notes a key signed among many)."""
    prefix = f"{_DASH} {verifier.name} "
    for line in note[note.rfind("\n\n") + 2 :].splitlines():
        if line.startswith(prefix):
            try:
                if base64.b64decode(line[len(prefix) :], validate=True)[:4] == verifier.key_id:
                    return True
            except (binascii.Error, ValueError):
                continue
    return False


def open_note_by(note: str, verifiers: Sequence[Verifier]) -> tuple[Checkpoint, int]:
    """`open_note` with several keys: the checkpoint, and the index of the key that signed it."""
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise CheckpointError("not a signed note (no empty line before the signatures)")
    text, sig_lines = note[: cut + 1], note[cut + 2 :].splitlines()
    checkpoint = parse_text(text)
    ids_seen = []
    for line in sig_lines:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _DASH:
            raise CheckpointError("malformed signature line")
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError) as e:
            raise CheckpointError("signature is not base64") from e
        if len(raw) < 5:
            raise CheckpointError("signature too short")
        ids_seen.append(f"{parts[1]}/{raw[:4].hex()}")
        # signed-note: a signature from an unknown (name, key ID) is ignored; from a known key
        # it must verify.
        known = next(
            (i for i, v in enumerate(verifiers) if parts[1] == v.name and raw[:4] == v.key_id),
            None,
        )
        if known is None:
            continue
        if not verifiers[known].verify(text.encode(), raw[4:]):
            raise CheckpointError("the signature does not verify: the checkpoint was altered")
        return checkpoint, known
    given = ", ".join(f"{v.name}/{v.key_id.hex()}" for v in verifiers)
    raise CheckpointError(
        f"not signed by the given public key{'s' if len(verifiers) > 1 else ''} (key {given}); "
        f"signed by {', '.join(ids_seen) or 'nobody'}: forged or signed with another key"
    )


def checkpoint_line(checkpoint: Checkpoint, note: str) -> dict[str, Any]:
    """The export/queue form: readable fields beside the note, which alone is authoritative."""
    line: dict[str, Any] = {
        "type": checkpoint.kind if checkpoint.kind in UNNUMBERED else "checkpoint",
        "replica": checkpoint.replica,
        "number": checkpoint.number,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "time": checkpoint.time,
        "kind": checkpoint.kind,
        "note": note,
    }
    if checkpoint.kind == "witness":
        del line["number"]
        line["by"] = checkpoint.by
    return line
