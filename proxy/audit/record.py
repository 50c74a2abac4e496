"""The fetch record and its canonical, hashable form."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from typing import Any

GENESIS_HASH = "0" * 64
CHAIN_LINK_FIELDS = frozenset({"prev_hash", "hash"})


@dataclass(slots=True)
class FetchRecord:
    """One request through the gateway, refused ones included.

    `status` is the site's answer for forwarded and withheld fetches, and the gateway's own
    answer for refused ones. `content_sha256` is the SHA-256 of the response body bytes exactly
    as the site sent them (Content-Encoding, if any, not removed). `egress_public_ips` are the
    provider's public addresses the policy declares; `egress_ip` is the local address the
    connection left from.
    """

    id: str
    ts: str
    method: str
    url: str
    decision: str
    reason: str
    kind: str = "fetch"
    team: str | None = None
    project: str | None = None
    account: str | None = None
    client_ip: str | None = None
    egress_ip: str | None = None
    egress_provider: str | None = None
    egress_public_ips: list[str] = field(default_factory=list)
    upstream_proxy: str | None = None
    site: str | None = None
    status: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    content_type: str | None = None
    content_sha256: str | None = None
    rule: str | None = None
    signals: list[str] = field(default_factory=list)
    legal_basis: str | None = None
    policy_version: str | None = None
    user_agent: str | None = None
    duration_ms: float = 0.0
    note: str | None = None
    # Chain fields, set by the fetch log when the record is appended.
    replica: str | None = None
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # What dataclasses.asdict gives (field order, lists copied), without its generic deep
        # copy: this runs twice for every forwarded request.
        return {
            "id": self.id,
            "ts": self.ts,
            "method": self.method,
            "url": self.url,
            "decision": self.decision,
            "reason": self.reason,
            "kind": self.kind,
            "team": self.team,
            "project": self.project,
            "account": self.account,
            "client_ip": self.client_ip,
            "egress_ip": self.egress_ip,
            "egress_provider": self.egress_provider,
            "egress_public_ips": list(self.egress_public_ips),
            "upstream_proxy": self.upstream_proxy,
            "site": self.site,
            "status": self.status,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "content_type": self.content_type,
            "content_sha256": self.content_sha256,
            "rule": self.rule,
            "signals": list(self.signals),
            "legal_basis": self.legal_basis,
            "policy_version": self.policy_version,
            "user_agent": self.user_agent,
            "duration_ms": self.duration_ms,
            "note": self.note,
            "replica": self.replica,
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FetchRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(FetchRecord))
if tuple(FetchRecord("", "", "", "", "", "").to_dict()) != FIELD_NAMES:  # checked once, at import
    raise AssertionError("FetchRecord.to_dict() is out of step with the dataclass fields")


class SerializedRecord(dict[str, Any]):
    """A chained record (a plain dict to every reader) that keeps the JSON text the spool got.

    The spool line and a store's `body` column are the same serialisation (compact separators,
    ensure_ascii=False); a store reuses `json_text` instead of encoding the record a second time.
    """

    __slots__ = ("json_text",)

    def __init__(self, data: dict[str, Any], json_text: str):
        super().__init__(data)
        self.json_text = json_text


def record_json(rec: dict[str, Any]) -> str:
    """The JSON text of a record as the spool and the stores' `body` column hold it."""
    text = getattr(rec, "json_text", None)
    if text is None:
        text = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
    return str(text)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def utc_timestamp(t: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-28T01:02:03.456789Z.

    The same text as datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), whose
    microseconds are rounded half to even, but the date and time of day are formatted once per
    second rather than once per call (several calls per request).
    """
    frac, whole = math.modf(t)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:  # before 1970
        whole -= 1.0
        micros += 1_000_000
    second = int(whole)
    cached = _second
    if cached[0] != second:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cached[0] = second
    return f"{cached[1]}.{micros:06d}Z"


def _canonical_text(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: dict[str, Any]) -> bytes:
    """The one serialisation that is hashed: sorted keys, no spaces, UTF-8."""
    return _canonical_text(data).encode()


def _body(data: dict[str, Any]) -> dict[str, Any]:
    """Every field but the links `prev_hash` and `hash`: what `body_sha256` digests."""
    return {k: v for k, v in data.items() if k not in CHAIN_LINK_FIELDS}


def body_sha256(data: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of every field but the links `prev_hash` and `hash`.

    `replica` and `seq` are part of the body, so a record cannot be moved to another place in the
    chain without changing its digest.
    """
    return hashlib.sha256(canonical_json(_body(data))).hexdigest()


def chain_hash(prev_hash: str, body_digest: str) -> str:
    """hash = SHA-256(raw 32 bytes of prev_hash || raw 32 bytes of body_sha256), hex.

    Two levels, so that an export can replace a record it must not show (another team's, another
    site's) by its digest alone and the chain still verifies end to end (proxy/audit/FORMATS.md).
    """
    return hashlib.sha256(bytes.fromhex(prev_hash) + bytes.fromhex(body_digest)).hexdigest()


def record_hash(data: dict[str, Any]) -> str:
    """The chain hash of a record: its `prev_hash` and the digest of everything else."""
    return chain_hash(data["prev_hash"], body_sha256(data))


def chain_record(data: dict[str, Any]) -> str:
    """Set the record's `hash` from its `prev_hash` and body; return its JSON text.

    The text is the canonical JSON that is hashed with the two links after it: the record is
    serialised once for both (any JSON reader takes it; the key order is not part of the format).
    Raises UnicodeEncodeError for text that is not UTF-8 (lone surrogates), as canonical_json.
    """
    text = _canonical_text(_body(data))  # canonical_json's text, kept to write it out too
    prev = data["prev_hash"]
    data["hash"] = digest = chain_hash(prev, hashlib.sha256(text.encode()).hexdigest())
    # Both links are hex (chain_hash has parsed them): nothing in them needs escaping.
    return f'{text[:-1]},"prev_hash":"{prev}","hash":"{digest}"}}'
