"""The SSRF guard: which target addresses the gateway may connect to, and name resolution.

Like Smokescreen, we resolve the name ourselves, classify the address, and connect to exactly the
address we checked: there is no second lookup an attacker could answer differently (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.sites import HostPatterns

type IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
type IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Checked in order; the first class whose networks contain the address names it.
ADDRESS_CLASSES: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    # Cloud metadata endpoints: AWS/GCP/Azure/OpenStack, AWS IPv6 (Nitro), Alibaba, Oracle.
    (
        "metadata",
        _nets("169.254.169.254/32", "169.254.170.2/32", "fd00:ec2::254/128", "100.100.100.200/32"),
    ),
    ("unspecified", _nets("0.0.0.0/32", "::/128")),
    ("this_network", _nets("0.0.0.0/8")),
    ("loopback", _nets("127.0.0.0/8", "::1/128")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    ("link_local", _nets("169.254.0.0/16", "fe80::/10")),
    ("cgnat", _nets("100.64.0.0/10")),
    ("multicast", _nets("224.0.0.0/4", "ff00::/8")),
    ("broadcast", _nets("255.255.255.255/32")),
    (
        "reserved",
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # TEST-NET-1
            "198.18.0.0/15",  # benchmarking
            "198.51.100.0/24",  # TEST-NET-2
            "203.0.113.0/24",  # TEST-NET-3
            "240.0.0.0/4",  # future use
            "100::/64",  # discard-only
            "2001:db8::/32",  # documentation
            "fec0::/10",  # deprecated site-local
        ),
    ),
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries: mapped, compatible, NAT64, 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    packed = ip.packed
    if ip in _NAT64 or (packed[:12] == bytes(12) and int(ip) > 1):  # 64:ff9b::/96, ::a.b.c.d
        return ipaddress.IPv4Address(packed[12:])
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def classify(ip: IPAddress) -> str | None:
    """The class of a non-public address ("loopback", "private", ...), None for a public one.

    IPv6 forms that embed an IPv4 address (::ffff:127.0.0.1, 64:ff9b::10.0.0.1, 2002:7f00:1::)
    are judged by the IPv4 address they reach.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return classify(embedded)
    for name, networks in ADDRESS_CLASSES:
        if any(ip in net for net in networks if net.version == ip.version):
            return name
    if not ip.is_global:
        return "reserved"
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether `address` may be connected to, and if not, its class."""

    address: IPAddress
    denied_class: str | None

    @property
    def allowed(self) -> bool:
        return self.denied_class is None


class AddressGuard:
    # Verdicts remembered per address (asked on every request; the same few addresses recur).
    # One guard per compiled policy, so a reload that changes allow_private starts afresh.
    VERDICTS_KEPT = 4096

    def __init__(self, allow_private: Iterable[IPNetwork] = ()):
        self.allow_private = tuple(allow_private)
        self._verdicts: dict[IPAddress, Verdict] = {}

    def check(self, ip: IPAddress) -> Verdict:
        verdict = self._verdicts.get(ip)
        if verdict is not None:  # (an IPv6 address with a zone is a key of its own)
            return verdict
        cls = classify(ip)
        if cls is not None and any(
            ip in net for net in self.allow_private if net.version == ip.version
        ):
            cls = None
        verdict = Verdict(ip, cls)
        if len(self._verdicts) >= self.VERDICTS_KEPT:
            self._verdicts.clear()
        self._verdicts[ip] = verdict
        return verdict


type Lookup = Callable[[str], Awaitable[list[IPAddress]]]


class OwnListeners:
    """The gateway's own sockets (its proxy and admin ports): never a target, whatever
    `network.allow_private` admits. A policy that lets the guard through to 127.0.0.1 (tests,
    the demo) or to the pods' network would otherwise let any scraper reach the admin API
    (`/metrics`, and its token-guarded endpoints to guess at) or send a request round the
    gateway again."""

    def __init__(self, listeners: Iterable[tuple[str, int, str]] = ()):
        """`listeners`: (host as given to --listen/--admin, port, what it is)."""
        self._by_port: dict[int, list[tuple[frozenset[IPAddress] | None, str]]] = {}
        for host, port, name in listeners:
            self._by_port.setdefault(port, []).append((_bound_addresses(host), name))
        self._own = _own_addresses()

    def listener_at(self, address: IPAddress, port: int) -> str | None:
        """Which of the gateway's listeners (address, port) reaches, or None."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a socket to ::ffff:a.b.c.d reaches a.b.c.d
        for bound, name in self._by_port.get(port, ()):
            if bound is not None:
                if address in bound:
                    return name
            elif address.is_loopback or address in self._own:
                return name  # bound to every address: any of this host's
        return None


def _bound_addresses(host: str) -> frozenset[IPAddress] | None:
    """The addresses a listener bound to HOST accepts on; None: every address of the host."""
    found = _addresses_of(host)
    if any(ip.is_unspecified for ip in found):
        return None
    return frozenset(found)


def _own_addresses() -> frozenset[IPAddress]:
    """This host's addresses beside loopback, as its name resolves (a pod's IP, in
    Kubernetes): once, at start-up."""
    return frozenset(_addresses_of(socket.gethostname()))


def _addresses_of(host: str) -> set[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}


class ResolutionError(Exception):
    pass


async def system_lookup(host: str) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ResolutionError(f"cannot resolve {host}: {e.strerror}") from e
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


class Resolver:
    """Names to addresses: IP literals as they are, `network.static_hosts`, then DNS (cached)."""

    def __init__(
        self,
        static_hosts: dict[str, IPAddress] | None = None,
        lookup: Lookup = system_lookup,
        ttl: float = 30.0,
        cache_size: int = 4096,
    ):
        self._static = HostPatterns[IPAddress]()
        for pattern, ip in (static_hosts or {}).items():
            self._static.add(pattern, ip)
        self._lookup = lookup
        self._ttl = ttl
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, list[IPAddress]]] = OrderedDict()

    def static_address(self, host: str) -> IPAddress | None:
        """The address `network.static_hosts` gives a normalized host name, if any."""
        return self._static.lookup(host)

    async def resolve(self, host: str) -> list[IPAddress]:
        """All addresses of a normalized host name, in the order to try them."""
        if host[:1].isdigit() or ":" in host:  # only these can be IP literals
            try:
                return [ipaddress.ip_address(host)]
            except ValueError:
                pass
        if (ip := self._static.lookup(host)) is not None:
            return [ip]
        now = time.monotonic()
        hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
        addresses = await self._lookup(host)
        if not addresses:
            raise ResolutionError(f"{host} has no addresses")
        self._cache[host] = (now + self._ttl, addresses)
        self._cache.move_to_end(host)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return addresses
