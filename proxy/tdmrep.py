"""TDMRep, the W3C TDM Reservation Protocol (Community Group Final Report, 10 May 2024).

Three places carry `tdm-reservation` (1: TDM rights reserved, 0: not reserved, anything else:
unset) and the optional `tdm-policy` URL:

- `/.well-known/tdmrep.json` on the origin (section "TDM File on the Origin Server"): an array
  of rules `{"location", "tdm-reservation", "tdm-policy"}`. A rule applies when its `location`
  pattern matches the path, with the robots.txt notation (`*` any run of characters, `$` end of
  path, prefix match, case-sensitive, percent-encoding normalized). "The most specific match is
  the first in sequence": rules are tried in array order and the first match is the answer; no
  match leaves the reservation unset.
- the `tdm-reservation` and `tdm-policy` response header fields;
- `<meta name="tdm-reservation">` and `<meta name="tdm-policy">` in HTML (read by
  `proxy.optout`).

The spec lets a header supersede the file and HTML metadata supersede the header. The gateway
is stricter: a reservation in the file refuses before fetching, and a reservation in any
later place withholds, whatever another place says (guideline "no data without consent").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from proxy.robots import PathPattern
from proxy.robots import normalize_path

WELL_KNOWN_PATH = "/.well-known/tdmrep.json"
PARSE_LIMIT = 500 * 1024
MAX_RULES = 10_000


@dataclass(frozen=True, slots=True)
class TdmDeclaration:
    """`reservation` is 1, 0 or None (unset); `policy` the tdm-policy URL if one was given."""

    reservation: int | None
    policy: str | None = None

    @property
    def reserved(self) -> bool:
        return self.reservation == 1


UNSET = TdmDeclaration(None)


@dataclass(frozen=True, slots=True)
class TdmRule:
    pattern: PathPattern
    declaration: TdmDeclaration


@dataclass(frozen=True, slots=True)
class TdmRules:
    """A parsed tdmrep.json; `error` says why a file was ignored (not JSON, not an array);
    `incomplete`, why only its first rules were read (a file past PARSE_LIMIT, more than
    MAX_RULES rules): a path none of those matches may be reserved by a rule not read."""

    rules: tuple[TdmRule, ...] = ()
    error: str | None = None
    incomplete: str | None = None

    @property
    def size(self) -> int:
        """Rules parsed (memory, matching time)."""
        return len(self.rules)

    def lookup(self, path: str) -> TdmDeclaration:
        """The declaration for the path (and query) of a request: the first rule that matches."""
        found = self.find(path)
        return UNSET if found is None else found

    def find(self, path: str) -> TdmDeclaration | None:
        """The first matching rule's declaration; None: no rule read matches."""
        normalized = normalize_path(path if path.startswith("/") else "/" + path)
        for rule in self.rules:
            if rule.pattern.matches(normalized):
                return rule.declaration
        return None


NO_RULES = TdmRules()


def parse_reservation(value: Any) -> int | None:
    """1 or 0, as a JSON integer or as the text of a header or meta tag; else unset."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in (0, 1) else None
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return None


def parse_policy(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()[:2048]
    return None


def parse_tdmrep(content: bytes | str, *, truncated: bool = False) -> TdmRules:
    """Parse /.well-known/tdmrep.json. Rules without a `location` are skipped; a rule whose
    reservation is not 0 or 1 still matches, with the reservation unset (spec: "other values are
    protocol errors ... consider that tdm-reservation is unset").

    A file cut off at PARSE_LIMIT (`truncated`: the fetch read no more of it) is not JSON, but
    its rules up to the cut are: they are read (a publisher's long file reserved nothing when it
    was ignored whole), and the rules say they are `incomplete`, as they do past MAX_RULES."""
    if isinstance(content, bytes):
        if len(content) > PARSE_LIMIT:
            content, truncated = content[:PARSE_LIMIT], True
        content = content.decode("utf-8", errors="replace")
    content = content.removeprefix("\ufeff")
    incomplete = f"it is larger than {PARSE_LIMIT} bytes, the most read" if truncated else None
    try:
        data = json.loads(content)
    except ValueError:
        leading = _leading_entries(content) if truncated else None
        if leading is None:
            return TdmRules(error="not JSON")
        data = leading
    if not isinstance(data, list):
        return TdmRules(error="not a JSON array of rules")
    if len(data) > MAX_RULES:
        incomplete = incomplete or f"it has more than {MAX_RULES} rules, the most read"
    rules: list[TdmRule] = []
    for entry in data[:MAX_RULES]:
        if not isinstance(entry, dict):
            continue
        location = entry.get("location")
        if not isinstance(location, str) or not location:
            continue
        if not location.startswith("/"):
            location = "/" + location
        declaration = TdmDeclaration(
            parse_reservation(entry.get("tdm-reservation")), parse_policy(entry.get("tdm-policy"))
        )
        rules.append(TdmRule(PathPattern(location), declaration))
    return TdmRules(tuple(rules), incomplete=incomplete)


def _leading_entries(text: str) -> list[Any] | None:
    """The whole entries at the start of a JSON array cut off before its end; None: it does
    not begin as one."""
    decoder = json.JSONDecoder()
    at = _space_end(text, 0)
    if text[at : at + 1] != "[":
        return None
    entries: list[Any] = []
    at += 1
    # One past the most read: parse_tdmrep then knows there were more. (Each step costs what
    # its entry does: a copy of the rest per entry made a cut 500 KiB file take 0.7 s.)
    while len(entries) <= MAX_RULES:
        try:
            entry, at = decoder.raw_decode(text, _space_end(text, at))
        except ValueError:
            return entries
        entries.append(entry)
        at = _space_end(text, at)
        if text[at : at + 1] != ",":
            return entries
        at += 1
    return entries


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's white space (RFC 8259 2)


def _space_end(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return at if match is None else match.end()


def from_headers(headers: list[tuple[str, str]]) -> TdmDeclaration:
    """The `tdm-reservation` and `tdm-policy` response header fields. Several reservation lines
    that disagree count as reserved if any says 1."""
    reservations: list[int] = []
    policy: str | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == "tdm-reservation":
            for part in value.split(","):
                parsed = parse_reservation(part)
                if parsed is not None:
                    reservations.append(parsed)
        elif lowered == "tdm-policy" and policy is None:
            policy = parse_policy(value)
    if not reservations:
        return TdmDeclaration(None, policy)
    return TdmDeclaration(max(reservations), policy)
