"""What a scraper sends, checked before any decision is taken on it.

mitmproxy parses HTTP and refuses what it cannot parse; what it accepts can still be hostile to the
gateway: a host written as a bare number (`2130706433`, `0x7f.1`, `0177.0.0.1`) that the system
resolver turns into 127.0.0.1 and that would be a site of its own for the budgets; an
`X-Crawl-Account` with control characters or bytes that are not UTF-8, which is written into the
signed fetch log; a request body the gateway would have to hold in memory. Each check here is a
pure function whose answer is a problem sentence (the scraper reads it in the 4xx) or None.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import NamedTuple

from proxy.idn import ascii_host
from proxy.idn import valid_a_label

# Header values the fetch log records (DESIGN.md "What a scraper sees").
RECORDED_HEADERS = ("x-crawl-project", "x-crawl-account")
MAX_RECORDED_VALUE = 256

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
# Control, format (bidi overrides, zero-width), surrogate (bytes that were not UTF-8) and
# line/paragraph separators: nothing an auditor should read in a recorded name.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


class HostCheck(NamedTuple):
    """A request's host, canonical (lower-case, punycode, bare IPv6), or why it is refused."""

    host: str | None
    problem: str | None


def check_host(raw: str) -> HostCheck:
    """Canonical form of a host from a request line, CONNECT target or Host header.

    Numeric hosts must be canonical IP literals. WHATWG URL parsing (and every browser) reads a
    host whose last label is a number as an IPv4 address, and so does the system resolver
    (inet_aton): `2130706433`, `0x7f.1`, `127.1` and `0177.0.0.1` are all 127.0.0.1. Admitting them
    would give one address many site keys (many budgets) and hide loopback from a reader of the
    fetch log, so they are refused, not resolved.
    """
    host = raw.strip()
    if host.startswith("["):
        if not host.endswith("]"):
            return HostCheck(None, f"{_quote(raw)} is not a valid IPv6 address")
        return _check_ipv6(host[1:-1])
    if ":" in host:
        return _check_ipv6(host)
    host = host.rstrip(".").lower()
    if not host:
        return HostCheck(None, "the request names no host")
    if not host.isascii():
        try:
            host = ascii_host(host)
        except UnicodeError:
            return HostCheck(None, f"{_quote(raw)} is not a valid internationalized host name")
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            canonical = str(ipaddress.IPv4Address(host))
        except ValueError:
            canonical = None
        if canonical != host:
            return HostCheck(
                None,
                f"{_quote(raw)} is a numeric host that is not a dotted-quad IPv4 address; "
                "write the address as a.b.c.d in decimal",
            )
        return HostCheck(host, None)
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        return HostCheck(None, f"{_quote(raw)} is not a valid host name")
    for label in labels:
        if label.startswith("xn--") and not valid_a_label(label):
            return HostCheck(None, f"{_quote(raw)} has a label that is not valid punycode")
    return HostCheck(host, None)


def _check_ipv6(text: str) -> HostCheck:
    if "%" in text:
        return HostCheck(None, "IPv6 zone identifiers name a local interface, not a site")
    try:
        return HostCheck(str(ipaddress.IPv6Address(text)), None)
    except ValueError:
        return HostCheck(None, f"{_quote(text)} is not a valid IPv6 address")


class RecordedValue(NamedTuple):
    """An X-Crawl-* value as the fetch log will record it (None: absent), or why it is refused."""

    value: str | None
    problem: str | None


def check_recorded_value(name: str, raw: str | None) -> RecordedValue:
    """`X-Crawl-Project` and `X-Crawl-Account` go into the signed fetch log as sent: they must be
    printable UTF-8 of at most 256 characters. Refused rather than cleaned, because a record
    must say what the scraper sent, not a guess of what it meant."""
    if raw is None:
        return RecordedValue(None, None)
    value = raw.strip()
    if not value:
        return RecordedValue(None, None)
    if len(value) > MAX_RECORDED_VALUE:
        return RecordedValue(None, f"{name} is longer than {MAX_RECORDED_VALUE} characters")
    if any(unicodedata.category(c) in _UNPRINTABLE for c in value):
        return RecordedValue(
            None,
            f"{name} must be printable UTF-8: no control characters, no bytes that are not UTF-8",
        )
    return RecordedValue(value, None)


def without_surrogates(text: str) -> str:
    """A target as a URL can be built from it: bytes that were not UTF-8 (mitmproxy hands them
    over as lone surrogates) as backslash escapes, the rest as it is (`normalize_url` then
    percent-encodes what a URL does not hold as is, as clients send it: a blocklist entry
    with a soft hyphen matches the request that has one)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def recordable(text: str) -> str:
    """Text from the wire as a record or a log line holds it when the request is recorded
    anyway (refused for it, say): every character that is not printable (control characters,
    which a terminal would act on when an auditor views an export; bytes that were not UTF-8,
    which mitmproxy hands over as lone surrogates) written as a backslash escape."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


# OWASP "CSV Injection": a cell a spreadsheet would take for a formula starts with one of these.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """Text as a CSV cell holds it, for the terminals and spreadsheets an auditor or a rights
    holder opens it in: `recordable`, and a cell that would start a formula (an
    `X-Crawl-Account` of `=HYPERLINK(...)`) behind a single quote, which spreadsheets show and
    do not evaluate (OWASP, CSV Injection). The fetch log itself keeps the value as sent."""
    text = recordable(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def agreed_value(header: RecordedValue, name: str, named: str | None) -> RecordedValue:
    """The project (or account) of a request: header `name`'s checked value, the proxy user
    name's (`named`, TEAM+PROJECT+ACCOUNT), or both if they are the same. Two different values
    are refused, not ranked: the record would otherwise name one the scraper may not have
    meant."""
    if named is None or header.problem is not None:
        return header
    from_user = check_recorded_value(f"the proxy user name's {name}", named)
    if from_user.problem is not None or header.value is None or header.value == from_user.value:
        return from_user
    return RecordedValue(
        None,
        f"X-Crawl-{name.capitalize()} says {_quote(header.value)} and the proxy user name "
        f"says {_quote(named)}; name the {name} in one of them",
    )


def target_problem(path: str) -> str | None:
    """A request target the fetch log cannot record faithfully: control characters, or bytes
    that are not UTF-8 (mitmproxy hands those over as lone surrogates). RFC 3986 wants them
    percent-encoded anyway."""
    if path and not path.startswith("/"):
        # `*` (OPTIONS *), or an HTTP/2 :path such as `@other.test/x`, which a URL built from
        # it would read as another host.
        return (
            f"the request target {_quote(path)} is not a path starting with '/' (origin-form, "
            "RFC 9112 3.2.1); the gateway fetches paths of a site, nothing else"
        )
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in path):
        return (
            "the request target has control characters or bytes that are not UTF-8; "
            "percent-encode them (RFC 3986)"
        )
    return None


# RFC 3986 2.3: escapes of these are the characters themselves (6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SEPARATOR_SPELLINGS = re.compile(r"%2F|%5C|\\", re.IGNORECASE)
_SLASH_RUN = re.compile(r"//+")
# A path segment's parameters (RFC 2396 3.3), which servlet containers drop before routing.
_PATH_PARAMETERS = re.compile(r";[^/]*")


def normalize_escapes(path: str) -> str:
    """Percent-escapes as RFC 3986 6.2.2 normalizes them: those of unreserved characters
    decoded (`%7E` is `~`, `%6D` is `m`), the others upper-cased (`%2f` is `%2F`)."""

    def normal(escape: re.Match[str]) -> str:
        octet = int(escape.group(1), 16)
        return chr(octet) if octet in _UNRESERVED else escape.group().upper()

    return _ESCAPE.sub(normal, path)


def canonical_target(target: str) -> str:
    """`target` (path and query) as the site's server will read its path: escapes normalized
    (`normalize_escapes`), then "." and ".." segments resolved (RFC 3986 5.2.4).

    curl, browsers, requests and Scrapy send paths with dot segments resolved; one that is not
    (`/x/../private/a`, `/open/%2e%2e/private/a`), or one that spells a character as an escape
    (`/%70rivate/a`), is served by the site as the canonical path, and the gateway must decide
    on, record and forward what the site will serve. The query is left as it is.

    A fragment (`#...`) is dropped: it is no part of a request target (RFC 9112 3.2, RFC 3986
    3.5), clients never send one, and servers ignore it (nginx, Apache, http.server), so
    `/photo.jpg#x` is /photo.jpg to the site, and must be to TDMRep locations and Content-Usage
    rules anchored with `$` too.
    """
    if "#" in target:
        target = target.partition("#")[0]
    if "%" not in target and "/." not in target:  # the usual path: nothing to do
        return target
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        return target
    if "%" in path:
        path = normalize_escapes(path)
    if "/." in path:
        path = _resolve_dot_segments(path)
    return path + sep + query


def _resolve_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    kept: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
            continue
        if last:
            kept.append("")  # "/a/b/.." is "/a/", not "/a"
    return "/" + "/".join(kept)


def other_readings(target: str) -> tuple[str, ...]:
    """Other paths a site's server may take `target` (a `canonical_target`) for, dot segments
    then resolved again: with `%2F`, `%5C` and `\\` read as "/" and runs of "/" merged
    (nginx's default `merge_slashes`, IIS, Python's http.server for a leading "//"); and with
    each segment's `;` parameters dropped (servlet containers, Tomcat and Jetty: `/private;x/a`
    is `/private/a`, and `/x/..;/private/a` is `/private/a`). Such a target is checked under
    each reading (robots.txt, TDMRep, the blocklist) and refused if any is refused, but
    forwarded as sent: "//", "%2F" and ";" are also in URLs that mean them. The query is read
    with its escapes of unreserved characters decoded too (`?q=%73ecret` is `?q=secret` to
    every framework that parses it)."""
    if "//" not in target and "%" not in target and "\\" not in target and ";" not in target:
        return ()
    path, sep, query = target.partition("?")
    paths: list[str] = [path]
    if "//" in path or _SEPARATOR_SPELLINGS.search(path) is not None:
        paths.append(_SLASH_RUN.sub("/", _SEPARATOR_SPELLINGS.sub("/", path)))
    if ";" in path:
        # (and the "//" that dropping one can leave merged, as Tomcat then does: `/;/private/a`)
        dropped = [_PATH_PARAMETERS.sub("", p) for p in paths]
        paths += dropped + [_SLASH_RUN.sub("/", p) for p in dropped if "//" in p]
    queries = [query]
    if "%" in query and (decoded := normalize_escapes(query)) != query:
        queries.append(decoded)
    readings: list[str] = []
    for i, p in enumerate(paths):
        for j, q in enumerate(queries):
            reading = canonical_target(p) + sep + q
            if (i or j) and reading != target and reading not in readings:
                readings.append(reading)
    return tuple(readings)


class BodyFraming(NamedTuple):
    """Whether a request's body can be taken: `too_large`, `length_required` and `unexpected`
    (a body on a method that has none) as problems."""

    too_large: str | None
    length_required: str | None
    unexpected: str | None = None


# Methods whose content has no meaning (RFC 9110 9.3.1, 9.3.2, 9.3.8): a site that never reads
# it takes the body for the next request on the connection (a "CL.0" desync), one the gateway
# never checked, budgeted or recorded.
BODILESS_METHODS = frozenset({"GET", "HEAD", "TRACE"})


# Fields a Connection header must not name: taking them out as hop-by-hop would change how the
# site frames the request (`Connection: Content-Length` sent a body the gateway had read as one
# request to the site as another) or which site it is.
NEVER_HOP_BY_HOP = frozenset(("content-length", "transfer-encoding", "host"))


def header_tokens(value: str | None) -> list[str]:
    """The comma-separated tokens of a header such as Connection, lower-cased."""
    return [t.strip().lower() for t in value.split(",") if t.strip()] if value else []


def connection_problem(value: str | None) -> str | None:
    """A Connection header naming a field that frames or routes the request (refused, 400)."""
    named = set(header_tokens(value)) & NEVER_HOP_BY_HOP
    if not named:
        return None
    return (
        f"the Connection header names {', '.join(sorted(named))}: a request's framing and host "
        "are not hop-by-hop (RFC 9110 7.6.1)"
    )


# CR, LF and NUL in a field (RFC 9110 5.5: "invalid and dangerous"; a recipient must reject the
# message or replace them with SP). mitmproxy keeps a bare CR inside a value and an obs-fold's
# line break (RFC 9112 5.2) as part of the value it continues, and sends both on as they came: a
# site whose parser ends a line at a bare CR (Python's http.server) or reads a folded line as a
# field of its own reads a `Host`, a `Content-Length` or an `X-Original-URL` the gateway never
# saw: another site under this one's checks, or a second request inside the first.
_FIELD_BREAKS = re.compile(rb"[\r\n\x00]")


def field_problem(fields: tuple[tuple[bytes, bytes], ...]) -> str | None:
    """Why a request's header fields are refused (400), if they are: a CR, LF or NUL in one."""
    for name, value in fields:
        if _FIELD_BREAKS.search(value) is not None or _FIELD_BREAKS.search(name) is not None:
            shown = name.decode("latin-1")[:64]
            return (
                f"the header field {shown!r} holds a CR, LF or NUL (a bare CR, or a line folded "
                "onto it: RFC 9110 5.5, RFC 9112 5.2); send each field on one line"
            )
    return None


def unexpected_body(method: str) -> str | None:
    """Why a body on `method` is refused, if it is (one of BODILESS_METHODS)."""
    if method not in BODILESS_METHODS:
        return None
    return (
        f"a {method} request with a body: a site that ignores it would read the body as another "
        "request; send data with POST"
    )


def check_body_framing(
    content_length: str | None, transfer_encoding: str | None, max_body: int, method: str = ""
) -> BodyFraming:
    """Request bodies must declare their length and stay within `network.max_request_body_bytes`.

    mitmproxy holds a body in memory until it is complete (up to its streaming threshold), for
    every request, refused ones included; a declared length lets the gateway refuse before
    reading any of it (RFC 9110 15.5.12 and 15.5.14). Content-Length syntax and conflicts with
    Transfer-Encoding are mitmproxy's to refuse (request smuggling); this sees valid framing only.
    A GET, HEAD or TRACE with a body is refused: it is how a request is smuggled past the gateway
    to a site that ignores such bodies.
    """
    if (
        transfer_encoding is not None
        or (content_length is not None and content_length.strip() not in ("", "0"))
    ) and (unexpected := unexpected_body(method)) is not None:
        return BodyFraming(None, None, unexpected)
    if transfer_encoding is not None and content_length is None:
        return BodyFraming(
            None,
            "request bodies need a Content-Length: the gateway does not take chunked uploads",
        )
    if content_length is not None:
        length = content_length.strip()
        if length.isdigit() and int(length) > max_body:
            return BodyFraming(
                f"the request body is {int(length)} bytes; the policy's "
                f"network.max_request_body_bytes is {max_body}",
                None,
            )
    return BodyFraming(None, None)


def _quote(text: str) -> str:
    """A host for a message: printable, short, and never a raw control character."""
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    return repr(shown[:80] + ("..." if len(shown) > 80 else ""))
