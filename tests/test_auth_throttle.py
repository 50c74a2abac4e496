"""proxy/auth_throttle.py with an injectable clock: the delay grows, decays, is bounded."""

from __future__ import annotations

import pytest

from proxy.auth_throttle import AuthThrottle
from proxy.auth_throttle import ThrottleSettings
from proxy.auth_throttle import client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failures(throttle: AuthThrottle, address: str, n: int) -> list[float]:
    delays = []
    for _ in range(n):
        penalty = throttle.failed(address)
        assert not penalty.drop
        throttle.answered(address)
        delays.append(penalty.delay)
    return delays


def test_the_first_failures_are_free_then_each_doubles_up_to_the_bound() -> None:
    throttle = AuthThrottle(ThrottleSettings(), Clock())
    assert failures(throttle, "10.1.1.1", 10) == [0, 0, 0, 0.25, 0.5, 1, 2, 4, 4, 4]


def test_addresses_are_counted_apart() -> None:
    throttle = AuthThrottle(ThrottleSettings(), Clock())
    failures(throttle, "10.1.1.1", 8)
    assert failures(throttle, "10.1.1.2", 3) == [0, 0, 0]


def test_the_count_halves_every_half_life() -> None:
    clock = Clock()
    throttle = AuthThrottle(ThrottleSettings(half_life=60), clock)
    failures(throttle, "10.1.1.1", 8)
    assert throttle.score("10.1.1.1") == pytest.approx(8)
    clock.now += 60
    assert throttle.score("10.1.1.1") == pytest.approx(4)
    clock.now += 600
    assert throttle.score("10.1.1.1") < 0.01
    assert failures(throttle, "10.1.1.1", 1) == [0]  # a scraper that fixed its token long ago


def test_parallel_failures_beyond_the_bound_are_dropped() -> None:
    throttle = AuthThrottle(ThrottleSettings(max_waiting=3), Clock())
    held = [throttle.failed("10.1.1.1") for _ in range(3)]
    assert not any(p.drop for p in held)
    assert throttle.failed("10.1.1.1").drop
    throttle.answered("10.1.1.1")
    assert not throttle.failed("10.1.1.1").drop


def test_memory_is_bounded_to_the_most_recent_addresses() -> None:
    throttle = AuthThrottle(ThrottleSettings(max_clients=100), Clock())
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._clients) == 100
    assert throttle.score("10.0.0.0") == 0  # forgotten
    assert throttle.score("10.0.3.231") == 1


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "?"),
    ],
)
def test_an_ipv6_client_is_counted_by_its_64(address: str | None, key: str) -> None:
    assert client_key(address) == key
