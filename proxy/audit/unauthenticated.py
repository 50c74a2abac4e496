"""Refusals of requests no team's credentials were accepted for, past a rate per client address:
counted, then recorded as one `unauthenticated_refusals` event.

Anyone who reaches the proxy port can send requests without credentials, or with wrong ones:
each is refused (407 `auth_required`, or refused before its credentials were read: a malformed
request, a client gone), took nothing from any site and is no team's. Recorded one by one, such a
flood would grow the fetch log as fast as it is sent, and nothing else about it is worth a record
each. So each client address (`client_key`: an IPv4 address, or an IPv6 /64) has its first
`per_window` such refusals of a `window` recorded one by one (who tried, what, when); past that
they are counted by address and reason, and the counts are recorded as one event when the window
ends (looked at every second), when they name `event_clients` addresses, or when the fetch log
closes. A window records at most `recorded_per_window` one by one, of all addresses. Memory
stays bounded: past `max_clients` addresses, or `event_clients` pairs while the counts cannot be
written (a full disk), the rest are counted together as `_other`. A `kill -9` loses the counts
not yet recorded (at most a window's).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from dataclasses import field

from proxy.audit.record import FetchRecord
from proxy.auth_throttle import client_key

EVENT_KIND = "unauthenticated_refusals"


@dataclass(frozen=True, slots=True)
class UnauthenticatedLimits:
    per_window: int = 20  # refusals of one client address recorded one by one in a window
    window: float = 60.0  # seconds
    recorded_per_window: int = 10_000  # of all addresses (many /64s must not add up)
    event_clients: int = 1000  # (address, reason) pairs one event counts (its size is bounded)
    max_clients: int = 100_000  # addresses one window follows (its memory is bounded)


# Addresses past max_clients, and pairs past event_clients while the counts cannot be recorded
# (the spool's disk full): counted together, never recorded one by one.
OTHERS = "_other"


@dataclass
class UnauthenticatedRefusals:
    limits: UnauthenticatedLimits = UnauthenticatedLimits()
    started: float | None = None  # when the window began (its first refusal)
    recorded: Counter[str] = field(default_factory=Counter)  # client key -> recorded each
    recorded_total: int = 0
    counted: Counter[tuple[str, str]] = field(default_factory=Counter)  # (key, reason) -> n
    first_ts: str | None = None  # of the first and last refusal counted
    last_ts: str | None = None

    def admit(self, rec: FetchRecord, now: float) -> bool:
        """Whether the refusal is recorded on its own (else it was counted)."""
        limits = self.limits
        if self.started is None:
            self.started = now
        key = client_key(rec.client_ip)
        if key not in self.recorded and len(self.recorded) >= limits.max_clients:
            key = OTHERS
        elif (
            self.recorded[key] < limits.per_window
            and self.recorded_total < limits.recorded_per_window
        ):
            self.recorded[key] += 1
            self.recorded_total += 1
            return True
        pair = (key, rec.reason)
        if pair not in self.counted and len(self.counted) >= limits.event_clients:
            pair = (OTHERS, rec.reason)
        self.counted[pair] += 1
        self.first_ts = self.first_ts or rec.ts
        self.last_ts = rec.ts
        return False

    def due(self, now: float) -> bool:
        """Whether the counts are to be recorded now: the window is over, or they name as many
        addresses as one event may."""
        if self.started is None:
            return False
        return (
            now - self.started >= self.limits.window
            or len(self.counted) >= self.limits.event_clients
        )

    def recorded_event(self, now: float) -> None:
        """The counts were recorded: they start afresh, and so does an ended window."""
        self.counted.clear()
        self.first_ts = self.last_ts = None
        if self.started is not None and now - self.started < self.limits.window:
            return  # (an event that named event_clients addresses, mid-window)
        self.started = None
        self.recorded.clear()
        self.recorded_total = 0

    @property
    def total(self) -> int:
        return sum(self.counted.values())

    def note(self) -> str:
        """The event's note: what was counted, by client address and reason."""
        return json.dumps(
            {
                "why": "refusals of requests no team's credentials were accepted for, past "
                f"{self.limits.per_window} per client address in {self.limits.window:g} s "
                f"(or {self.limits.recorded_per_window} of all addresses): counted, not "
                f"recorded one by one; {OTHERS}: addresses past what one window follows",
                "refused": self.total,
                "first_ts": self.first_ts,
                "last_ts": self.last_ts,
                "by_client_reason": [
                    {"client": c, "reason": r, "count": n}
                    for (c, r), n in sorted(self.counted.items())
                ],
            },
            sort_keys=True,
        )
