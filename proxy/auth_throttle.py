"""Slowing down wrong proxy credentials, per client address (the gateway is never an open proxy,
and guessing a team's token must not be cheap either).

Only *wrong* credentials count: a request without Proxy-Authorization is answered 407 at once,
since clients that authenticate on challenge send one of those first. A failure's 407 waits
longer the more failures the client address has made recently; the count decays by half every
`half_life` seconds. An authenticated request is never delayed and does not clear the count: a
client holding one team's token cannot launder a guess at another team's between its own
requests, and a scraper that fixed its token is not slowed by its earlier mistakes. Beyond
`max_waiting` answers held back for one address, further failures are dropped without an answer,
so parallel connections do not multiply the guessing rate.

In process, per replica, bounded to `max_clients` addresses (least recently failing forgotten).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    free_failures: float = 3  # this many recent failures are answered at once
    base_delay: float = 0.25  # the first delayed answer waits this long; each next one doubles
    max_delay: float = 4.0
    half_life: float = 60.0
    max_waiting: int = 8
    max_clients: int = 10_000


class Penalty(NamedTuple):
    """What to do with a failed authentication's 407: wait `delay` seconds, or `drop` it."""

    delay: float
    drop: bool


def client_key(address: str | None) -> str:
    """The unit a client is counted by: its IPv4 address, or the /64 of an IPv6 address (one
    host usually has a whole /64 to rotate through)."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Client:
    score: float
    at: float
    waiting: int = 0


class AuthThrottle:
    def __init__(
        self,
        settings: ThrottleSettings = ThrottleSettings(),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def failed(self, address: str | None) -> Penalty:
        """Count one wrong-credentials attempt; the answer's penalty. Call `answered` after
        a penalty that was not dropped."""
        s = self.settings
        key = client_key(address)
        now = self._clock()
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(0.0, now)
        client.score = self._decayed(client, now) + 1
        client.at = now
        self._clients.move_to_end(key)
        while len(self._clients) > s.max_clients:
            self._clients.popitem(last=False)
        if client.waiting >= s.max_waiting:
            return Penalty(0.0, True)
        client.waiting += 1
        return Penalty(self.delay_for(client.score), False)

    def answered(self, address: str | None) -> None:
        client = self._clients.get(client_key(address))
        if client is not None and client.waiting > 0:
            client.waiting -= 1

    def delay_for(self, score: float) -> float:
        s = self.settings
        over = score - s.free_failures
        if over <= 0:
            return 0.0
        return min(s.max_delay, s.base_delay * 2 ** (over - 1))

    def score(self, address: str | None) -> float:
        """Recent failures of an address, decayed to now (0 for one never seen)."""
        client = self._clients.get(client_key(address))
        return 0.0 if client is None else self._decayed(client, self._clock())

    def _decayed(self, client: _Client, now: float) -> float:
        elapsed = max(0.0, now - client.at)
        return client.score * 0.5 ** (elapsed / self.settings.half_life)
