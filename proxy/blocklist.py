"""The blocklist: sites and URLs we must not fetch, with the reason and its source.

Entries come from the policy (terms of service that forbid automated collection: an opt-out from
the DSM Art. 4 exception) and from takedowns filed by rights holders. An entry matches a domain
with all its subdomains, a URL prefix, or one URL (without a query: with any query; with one:
with the same parameters, in any order).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

from proxy.decision import Reason
from proxy.inputs import canonical_target
from proxy.inputs import normalize_escapes
from proxy.sites import HostPatterns
from proxy.sites import normalize_host


class Scope(enum.StrEnum):
    DOMAIN = "domain"
    PREFIX = "prefix"
    URL = "url"


@dataclass(frozen=True, slots=True)
class BlockEntry:
    id: str
    scope: Scope
    target: str  # a normalized host for DOMAIN, a normalized URL otherwise
    reason: str
    source: str
    code: Reason = Reason.TOS_BLOCKLIST


_DEFAULT_PORTS = {"http": 80, "https": 443}


def authority(scheme: str, host: str, port: int | None) -> str:
    """`host[:port]` as a URL and a Host header write it: an IPv6 address bracketed, the
    scheme's default port left out. `host` normalized."""
    if ":" in host:
        host = f"[{host}]"
    return host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"


def normalize_url(url: str) -> str:
    """Scheme and host lower-case, default port dropped, empty path as "/"; path and query as
    a client sends them: what clients always percent-encode encoded (`encoded_as_sent`), the
    rest kept as is."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    netloc = authority(scheme, normalize_host(parts.hostname or ""), parts.port)
    path = encoded_as_sent(parts.path, _PATH_ENCODED) or "/"
    return urlunsplit((scheme, netloc, path, encoded_as_sent(parts.query, _QUERY_ENCODED), ""))


# What clients never send as is (WHATWG URL's path and query percent-encode sets but for `{}`,
# which curl sends as typed, and every character beyond ASCII, as UTF-8): a URL copied from a
# browser's address bar or a web page (`/café.jpg`, `/my photo.jpg`) names the same file as the
# request for `/caf%C3%A9.jpg`.
_PATH_ENCODED = re.compile(r'[^\x21-\x7e]|["<>`]')
_QUERY_ENCODED = re.compile(r'[^\x21-\x7e]|["<>]')


def encoded_as_sent(part: str, unsafe: re.Pattern[str]) -> str:
    if unsafe.search(part) is None:
        return part
    return unsafe.sub(lambda m: quote(m.group(), safe=""), part)


def entry_from_pattern(
    entry_id: str, pattern: str, reason: str, source: str, code: Reason = Reason.TOS_BLOCKLIST
) -> BlockEntry:
    """A policy pattern: "http(s)://..." is a URL prefix, anything else a domain."""
    if pattern.lower().startswith(("http://", "https://")):
        return BlockEntry(entry_id, Scope.PREFIX, normalize_url(pattern), reason, source, code)
    return BlockEntry(
        entry_id, Scope.DOMAIN, normalize_host(pattern.removeprefix("*.")), reason, source, code
    )


def _origin(url: str) -> str:
    """ "https://host:port" of a normalized URL."""
    end = url.find("/", url.find("//") + 2)
    return url if end < 0 else url[:end]


def _canonical(url: str) -> str:
    """An entry's URL as the site reads it: its path canonical, and the escapes of unreserved
    characters in its query decoded (a request's are matched both ways, `other_readings`)."""
    origin = _origin(url)
    if len(url) <= len(origin):
        return url
    path, sep, query = canonical_target(url[len(origin) :]).partition("?")
    return origin + path + sep + (normalize_escapes(query) if "%" in query else query)


def sorted_parameters(url: str) -> str:
    """`url` with its query as the multiset of parameters a site reads from it: the `&`-separated
    pairs sorted, empty ones dropped. Every framework that parses a query (PHP, Rails, Django,
    Flask, Express, servlets) reads `?w=800&h=600`, `?h=600&w=800`, `?w=800&&h=600` and
    `?w=800&h=600&` as the same parameters, so a URL entry with a query blocks them all."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    return base + sep + "&".join(sorted(pair for pair in query.split("&") if pair))


class Blocklist:
    """Immutable index of entries; build a new one to change it."""

    def __init__(self, entries: list[BlockEntry]):
        self.entries = tuple(entries)
        self._domains = HostPatterns[BlockEntry]()
        # URLs and prefixes by their canonical form, as requests are matched (the gateway
        # forwards `inputs.canonical_target` paths): `/%7Euser/` blocks `/~user/` too.
        self._prefixes: dict[str, list[tuple[str, BlockEntry]]] = {}  # by origin
        self._urls: dict[str, BlockEntry] = {}
        for e in self.entries:
            if e.scope is Scope.DOMAIN:
                self._domains.add("*." + e.target, e)
                continue
            target = _canonical(e.target)
            if e.scope is Scope.PREFIX:
                self._prefixes.setdefault(_origin(target), []).append((target, e))
            else:
                self._urls.setdefault(sorted_parameters(target), e)
        for prefixes in self._prefixes.values():
            # Longest prefix first, so the most specific entry names the refusal.
            prefixes.sort(key=lambda p: len(p[0]), reverse=True)

    def match_host(self, host: str) -> BlockEntry | None:
        """An entry that blocks every URL of this host (checked at CONNECT time)."""
        return self._domains.lookup(host)

    def match_url(self, host: str, url: str, readings: Sequence[str] = ()) -> BlockEntry | None:
        """`host` normalized; `url` as built by normalize_url; `readings`, other paths (and
        queries) the site may serve for the URL's (`inputs.other_readings`), matched too."""
        if (hit := self._domains.lookup(host)) is not None:
            return hit
        origin = _origin(url)
        if (hit := self._match_path(origin, url)) is not None or not readings:
            return hit
        for reading in readings:
            if (hit := self._match_path(origin, origin + reading)) is not None:
                return hit
        return None

    def _match_path(self, origin: str, url: str) -> BlockEntry | None:
        query = url.find("?")
        # A URL entry without a query covers its path with any query: `photo.jpg?w=800` or
        # `?v=2` is the same file on most sites. One with a query covers that query, its
        # parameters in any order (`sorted_parameters`).
        if not self._urls:
            hit = None
        elif query < 0:
            hit = self._urls.get(url)
        else:
            hit = self._urls.get(sorted_parameters(url)) or self._urls.get(url[:query])
        if hit is not None:
            return hit
        for target, e in self._prefixes.get(origin, ()):
            if url.startswith(target):
                return e
        return None

    def __len__(self) -> int:
        return len(self.entries)
