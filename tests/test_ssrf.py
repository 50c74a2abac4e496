"""The SSRF guard as a pure function over every range, and resolution with a stub resolver."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from proxy.ssrf import AddressGuard
from proxy.ssrf import OwnListeners
from proxy.ssrf import ResolutionError
from proxy.ssrf import Resolver
from proxy.ssrf import classify


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this_network"),
        ("255.255.255.255", "broadcast"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("240.0.0.1", "reserved"),
        ("2001:db8::1", "reserved"),
        # IPv6 forms that carry an IPv4 address are judged by the address they reach.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::a00:1", "private"),
        ("2002:7f00:1::", "loopback"),
        ("::127.0.0.1", "loopback"),
        # Public addresses pass.
        ("93.184.216.34", None),
        ("8.8.8.8", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
        ("::ffff:93.184.216.34", None),
        ("100.128.0.1", None),
        ("172.32.0.1", None),
    ],
)
def test_classify(address: str, expected: str | None):
    assert classify(ipaddress.ip_address(address)) == expected


def test_allow_private_admits_only_its_networks():
    guard = AddressGuard([ipaddress.ip_network("127.0.0.0/8")])
    assert guard.check(ipaddress.ip_address("127.0.0.1")).allowed
    assert not guard.check(ipaddress.ip_address("10.0.0.1")).allowed
    assert guard.check(ipaddress.ip_address("10.0.0.1")).denied_class == "private"
    assert guard.check(ipaddress.ip_address("8.8.8.8")).allowed


async def test_static_hosts_answer_without_dns():
    async def no_dns(host: str) -> list:
        raise AssertionError(f"DNS lookup for {host}")

    resolver = Resolver(
        {"*.test": ipaddress.ip_address("127.0.0.1"), "exact.example": ipaddress.ip_address("::1")},
        lookup=no_dns,
    )
    assert await resolver.resolve("site-a.test") == [ipaddress.ip_address("127.0.0.1")]
    assert await resolver.resolve("a.b.test") == [ipaddress.ip_address("127.0.0.1")]
    assert await resolver.resolve("exact.example") == [ipaddress.ip_address("::1")]
    assert await resolver.resolve("10.0.0.1") == [ipaddress.ip_address("10.0.0.1")]
    assert await resolver.resolve("2001:db8::7") == [ipaddress.ip_address("2001:db8::7")]


async def test_a_name_resolving_to_a_private_address_is_caught_by_the_guard():
    async def stub(host: str) -> list:
        return [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("93.184.216.34")]

    resolver = Resolver(lookup=stub)
    addresses = await resolver.resolve("evil.example")
    # The gateway connects to the first address; it is the one checked.
    assert not AddressGuard().check(addresses[0]).allowed


async def test_the_checked_answer_is_the_one_used_even_if_dns_changes():
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    async def rebinding(host: str) -> list:
        return [ipaddress.ip_address(a) for a in next(answers)]

    resolver = Resolver(lookup=rebinding, ttl=60)
    first = await resolver.resolve("rebind.example")
    second = await resolver.resolve("rebind.example")
    assert first == second == [ipaddress.ip_address("93.184.216.34")]


async def test_unresolvable_names_raise():
    async def nx(host: str) -> list:
        raise ResolutionError(f"cannot resolve {host}")

    with pytest.raises(ResolutionError):
        await Resolver(lookup=nx).resolve("nx.example")


def test_remembered_verdicts_are_the_same_verdicts_and_stay_bounded():
    guard = AddressGuard([ipaddress.ip_network("10.1.0.0/16")])
    for text, allowed in [("10.1.2.3", True), ("10.2.0.1", False), ("8.8.8.8", True)]:
        ip = ipaddress.ip_address(text)
        assert guard.check(ip) == guard.check(ip) == AddressGuard(guard.allow_private).check(ip)
        assert guard.check(ip).allowed is allowed
    zoned = ipaddress.ip_address("fe80::1%eth0")
    assert not guard.check(ipaddress.ip_address("fe80::1")).allowed
    assert guard.check(zoned).address == zoned
    for i in range(AddressGuard.VERDICTS_KEPT + 10):
        guard.check(ipaddress.ip_address(i))
    assert len(guard._verdicts) <= AddressGuard.VERDICTS_KEPT


def test_the_gateways_own_listeners_are_known_whatever_they_are_bound_to():
    own = OwnListeners([("127.0.0.1", 8080, "proxy port"), ("0.0.0.0", 9090, "admin API port")])
    ip = ipaddress.ip_address
    assert own.listener_at(ip("127.0.0.1"), 8080) == "proxy port"
    assert own.listener_at(ip("::ffff:127.0.0.1"), 8080) == "proxy port"
    assert own.listener_at(ip("127.0.0.2"), 8080) is None  # another address than the bound one
    assert own.listener_at(ip("127.0.0.1"), 8081) is None
    # Bound to every address: any of this host's own, loopback or not, and no other host's.
    assert own.listener_at(ip("127.0.0.9"), 9090) == "admin API port"
    local = socket.gethostbyname(socket.gethostname())
    assert own.listener_at(ip(local), 9090) == "admin API port"
    assert own.listener_at(ip("192.0.2.1"), 9090) is None  # TEST-NET-1: never this host's
    assert OwnListeners([("localhost", 8080, "proxy port")]).listener_at(ip("127.0.0.1"), 8080)
