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
closes. Memory stays bounded: past `max_clients` addresses a window ends early. A `kill -9` loses
the counts not yet recorded (at most a window's).
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
    event_clients: int = 1000  # addresses one event counts (its size stays bounded)
    max_clients: int = 100_000  # addresses one window follows (its memory stays bounded)


@dataclass
class UnauthenticatedRefusals:
    limits: UnauthenticatedLimits = UnauthenticatedLimits()
    started: float | None = None  # when the window began (its first refusal)
    recorded: Counter[str] = field(default_factory=Counter)  # client key -> recorded each
    counted: Counter[tuple[str, str]] = field(default_factory=Counter)  # (key, reason) -> n
    first_ts: str | None = None  # of the first and last refusal counted
    last_ts: str | None = None

    def admit(self, rec: FetchRecord, now: float) -> bool:
        """Whether the refusal is recorded on its own (else it was counted)."""
        if self.started is None:
            self.started = now
        key = client_key(rec.client_ip)
        if self.recorded[key] < self.limits.per_window:
            self.recorded[key] += 1
            return True
        self.counted[(key, rec.reason)] += 1
        self.first_ts = self.first_ts or rec.ts
        self.last_ts = rec.ts
        return False

    def due(self, now: float) -> bool:
        """Whether the counts are to be recorded now: the window is over, or they name as many
        addresses as one event may, or the window follows as many as it may."""
        if self.started is None:
            return False
        return (
            now - self.started >= self.limits.window
            or len(self.counted) >= self.limits.event_clients
            or len(self.recorded) >= self.limits.max_clients
        )

    def recorded_event(self, now: float) -> None:
        """The counts were recorded: they start afresh, and so does an ended window."""
        self.counted.clear()
        self.first_ts = self.last_ts = None
        if (
            self.started is not None
            and now - self.started < self.limits.window
            and len(self.recorded) < self.limits.max_clients
        ):
            return  # (an event that named event_clients addresses, mid-window)
        self.started = None
        self.recorded.clear()

    @property
    def total(self) -> int:
        return sum(self.counted.values())

    def note(self) -> str:
        """The event's note: what was counted, by client address and reason."""
        return json.dumps(
            {
                "why": "refusals of requests no team's credentials were accepted for, past "
                f"{self.limits.per_window} per client address in {self.limits.window:g} s: "
                "counted, not recorded one by one",
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
