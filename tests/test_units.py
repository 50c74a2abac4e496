from __future__ import annotations

import pytest

from proxy.units import parse_duration
from proxy.units import parse_rate
from proxy.units import parse_size


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("1/s", 1.0),
        ("5/s", 5.0),
        ("30/min", 0.5),
        ("3600/h", 1.0),
        ("0.5/s", 0.5),
        (" 2 / min ", 2 / 60),
    ],
)
def test_rates(text: str, per_second: float):
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "5", "5/day", "-1/s", "0/s", "fast"])
def test_bad_rates(text: str):
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10), ("500ms", 0.5), ("2m", 120), ("1h", 3600), (3, 3)]
)
def test_durations(text: str | int, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("500MB", 500_000_000), ("1GiB", 2**30), ("10kb", 10_000), (123, 123), ("1.5KiB", 1536)],
)
def test_sizes(text: str | int, size: int):
    assert parse_size(text) == size
