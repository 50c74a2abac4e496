"""Parsers for the human units a policy is written in: rates, durations and byte sizes."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|min|minute|h|hour)\s*$")
_PERIOD_SECONDS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0}
_PERIOD_SECONDS |= {"h": 3600.0, "hour": 3600.0}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class Rate(NamedTuple):
    """`count` requests per `period` seconds, as written in the policy ("5/s", "30/min")."""

    requests: float
    period: float
    text: str

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    @property
    def interval(self) -> float:
        """Seconds between two requests at this rate (GCRA's emission interval)."""
        return self.period / self.requests


def parse_rate(text: str) -> Rate:
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"invalid rate {text!r}: write n/s, n/min or n/h, e.g. '2/s'")
    count = float(m.group(1))
    if count <= 0:
        raise ValueError(f"invalid rate {text!r}: the count must be above 0")
    return Rate(count, _PERIOD_SECONDS[m.group(2)], text.strip())


def parse_duration(text: str | int | float) -> float:
    """Seconds from "10s", "500ms", "2m", "1h" or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: write e.g. '500ms', '10s', '2m' or '1h'")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise ValueError(f"invalid duration {text!r}: write e.g. '500ms', '10s', '2m' or '1h'")
        value = float(m.group(1)) * _DURATION_SECONDS[m.group(2) or "s"]
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"invalid duration {text!r}: must be a finite, non-negative time")
    return value


def parse_size(text: str | int) -> int:
    """Bytes from "500MB" (decimal), "1GiB" (binary) or a bare number of bytes."""
    if isinstance(text, bool):  # YAML `true` is no size, though Python counts it as 1
        raise ValueError(f"invalid size {text!r}: write e.g. '500MB', '1GiB' or a byte count")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise ValueError(f"invalid size {text!r}: write e.g. '500MB', '1GiB' or a byte count")
        value = int(float(m.group(1)) * _SIZE_FACTOR[(m.group(2) or "b").lower()])
    if value < 0:
        raise ValueError(f"invalid size {text!r}: must not be negative")
    return value
