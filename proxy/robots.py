"""robots.txt (RFC 9309) for the crawler's product tokens, with IETF aipref Content-Usage rules.

Group selection is ours, path matching is protego's (its reading of the rules, held compact and
matched by index: `robots_access.py`):

- RFC 9309 2.2.1: a group applies when one of its user-agent lines names one of our product
  tokens (case-insensitive, the token being the value up to the first '/' or space); all such
  groups are combined into one. Only when none names us does the `*` group apply; with neither,
  nothing is disallowed. (protego itself would pick one group by substring score, so that
  "User-agent: Example" matched "ExampleBot"; we hand it only the lines that apply.)
- RFC 9309 2.2.2: the longest matching Allow/Disallow wins, Allow wins a tie, `*` and a trailing
  `$` are wildcards, percent-encoding is normalized, /robots.txt is always allowed: protego.
- draft-ietf-aipref-attach-05 section 3: `Content-Usage: <path> <expression>` rules in the same
  groups, longest match by the same rules; rules with equally long matches combine (most
  restrictive). They apply only to paths the group lets us crawl.
- RFC 9309 2.5: only the first 500 KiB are parsed (`PARSE_LIMIT`).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import quote
from urllib.parse import urlsplit

from proxy import aipref
from proxy.inputs import normalize_escapes
from proxy.robots_access import AccessRules

PARSE_LIMIT = 500 * 1024
# A Content-Usage rule's objects besides its pattern's text (held twice: whole, and in runs);
# measured 400-830 bytes
_USAGE_RULE_BYTES = 1024

# Misspellings that crawlers (and protego) have long accepted.
_DISALLOW = {"disallow", "dissallow", "dissalow", "disalow", "diasllow", "disallaw"}
_USER_AGENT = {"user-agent", "useragent", "user agent"}
_SITE_WIDE = {"sitemap", "sitemaps", "site-map", "host"}  # do not end a run of user-agent lines
_KNOWN = _DISALLOW | _USER_AGENT | _SITE_WIDE | {"allow", "crawl-delay", "content-usage"}


# -- path patterns (shared with TDMRep, which reuses the robots.txt notation) ----------------


def normalize_path(path: str, *, pattern: bool = False) -> str:
    """Percent-encoding normalized for comparison (RFC 9309 2.2.2, RFC 3986 2.1):
    escapes of unreserved characters are decoded, other escapes upper-cased, characters
    outside US-ASCII (UTF-8) and spaces encoded. In a pattern, `*` and `$` stay as they are."""
    path = normalize_escapes(path)
    safe = "/%:@!&'()+,;=?#[]-._~" + ("*$" if pattern else "$*")
    return quote(path, safe=safe)


class PathPattern:
    """A robots.txt path pattern: a prefix, `*` for any run of characters, `$` at the end to
    anchor. `length` is its specificity: the octets of the normalized pattern."""

    __slots__ = ("_anchored", "_runs", "length", "text")

    def __init__(self, text: str):
        self.text = normalize_path(text, pattern=True)
        self.length = len(self.text.encode())
        body, self._anchored = self.text, False
        if body.endswith("$"):
            body, self._anchored = body[:-1], True
        # The literal runs between the stars ("/a**b" is "/a*b"); only a final `$` anchors.
        self._runs = tuple(re.split(r"\*+", body))

    def matches(self, path: str) -> bool:
        """`path` must already be normalized (see `normalize_path`).

        Each run of the pattern is found at its leftmost place after the one before: as `*`
        matches any sequence (RFC 9309 2.2.3), the leftmost place leaves the most room for the
        runs after it, so there is never a reason to go back. One pass over the path, however
        many stars: a backtracking regex took seconds for `/*a*a*a*b` against 600 `a`s (and
        grows as the path length to the power of the stars), on the event loop."""
        first, *rest = self._runs
        if not rest:
            return path == first if self._anchored else path.startswith(first)
        if not path.startswith(first):
            return False
        at = len(first)
        *middle, last = rest
        for run in middle:
            found = path.find(run, at)
            if found < 0:
                return False
            at = found + len(run)
        if self._anchored:
            return len(path) - len(last) >= at and path.endswith(last)
        return path.find(last, at) >= 0

    def __repr__(self) -> str:
        return f"PathPattern({self.text!r})"


# -- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContentUsageRule:
    pattern: PathPattern
    preferences: aipref.UsagePreferences
    expression: str


@dataclass(frozen=True, slots=True)
class RobotsVerdict:
    """What robots.txt says about one path for our tokens."""

    allowed: bool
    group: str | None  # the token whose group applied, "*", or None (no group applied)
    content_usage: aipref.UsagePreferences = aipref.NO_PREFERENCE


@dataclass(slots=True)
class _Group:
    agents: list[str] = field(default_factory=list)
    rules: list[tuple[str, str]] = field(default_factory=list)


class RobotsRules:
    """A parsed robots.txt, reduced to the groups that apply to our product tokens."""

    def __init__(
        self,
        group: str | None,
        access: list[tuple[str, str]],
        content_usage: list[ContentUsageRule],
        crawl_delay: float | None,
    ):
        self.group = group
        self.crawl_delay = crawl_delay
        self.content_usage = content_usage
        self._access = AccessRules(access)
        self._usage_chars = sum(rule.pattern.length for rule in content_usage)
        # what the parsed rules take in memory, on the safe side (the parsed files' bound)
        self.held_bytes = self._access.held_bytes + sum(
            _USAGE_RULE_BYTES + 2 * sys.getsizeof(rule.pattern.text) for rule in content_usage
        )

    def work(self, path: str, readings: Sequence[str]) -> int:
        """What the verdicts on `path` and its other readings may cost, in nanoseconds (an
        estimate): Allow/Disallow rules are mostly found by index (`AccessRules.work`),
        Content-Usage rules are tried one by one."""
        longest = max(len(p) for p in (path, *readings))
        usage = 300 * len(self.content_usage) + longest * self._usage_chars // 2
        return (1 + len(readings)) * (self._access.work(longest) + usage)

    def verdict(self, path: str) -> RobotsVerdict:
        """`path` is the path and query of the request as sent (an absolute URL works too)."""
        # read once, as protego reads it: a URL taken apart here and again there lost an empty
        # query ("http://h/x?") and the "//" of a path ("http://h//x")
        allowed = self._access.can_fetch(path)
        if not path.startswith("/"):
            parts = urlsplit(path)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not allowed:
            return RobotsVerdict(False, self.group)
        return RobotsVerdict(True, self.group, self._usage_for(normalize_path(path)))

    def _usage_for(self, path: str) -> aipref.UsagePreferences:
        best = -1
        matched: list[aipref.UsagePreferences] = []
        for rule in self.content_usage:
            if rule.pattern.length < best or not rule.pattern.matches(path):
                continue
            if rule.pattern.length > best:
                best, matched = rule.pattern.length, []
            matched.append(rule.preferences)
        return aipref.combine(matched)


ALLOW_ALL = RobotsRules(None, [], [], None)
DISALLOW_ALL = RobotsRules("*", [("Disallow", "/")], [], None)


def product_token(user_agent_value: str) -> str:
    """The product token a user-agent line names: up to the first '/' or whitespace."""
    return re.split(r"[/\s]", user_agent_value.strip(), maxsplit=1)[0].lower()


def parse_robots(content: str | bytes, tokens: Iterable[str]) -> RobotsRules:
    """Parse robots.txt for a crawler with these product tokens (policy crawler.robots_tokens)."""
    if isinstance(content, bytes):
        content = content[:PARSE_LIMIT]
        if len(content) == PARSE_LIMIT and b"\n" in content:
            content = content[: content.rindex(b"\n")]  # never parse half a line
        content = content.decode("utf-8", errors="replace")
    content = content.removeprefix("\ufeff")
    ours = {t.strip().lower() for t in tokens if t.strip()}
    groups = _groups(content)
    mine = [g for g in groups if any(product_token(a) in ours for a in g.agents)]
    chosen = "token"
    if not mine:
        mine = [g for g in groups if any(a.strip().startswith("*") for a in g.agents)]
        chosen = "*"
    if not mine:
        return ALLOW_ALL
    if chosen == "token":
        named = sorted({product_token(a) for g in mine for a in g.agents} & ours)
        group = named[0]
    else:
        group = "*"
    access: list[tuple[str, str]] = []
    usage: list[ContentUsageRule] = []
    delays: list[float] = []
    for g in mine:
        for key, value in g.rules:
            if key == "allow":
                access.append(("Allow", value))
            elif key in _DISALLOW:
                access.append(("Disallow", value))
            elif key == "crawl-delay":
                delay = _delay(value)
                if delay is not None:
                    delays.append(delay)
            elif key == "content-usage":
                usage.append(_content_usage(value))
    # Several matching groups may each set a delay: the largest is the one that honours all.
    return RobotsRules(group, access, usage, max(delays) if delays else None)


def _groups(content: str) -> list[_Group]:
    groups: list[_Group] = []
    current: _Group | None = None
    last_was_agent = False
    for raw in content.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parsed = _directive(line)
        if parsed is None:
            continue
        key, value = parsed
        if key in _USER_AGENT:
            if current is None or not last_was_agent:
                current = _Group()
                groups.append(current)
            if value:
                current.agents.append(value)
            last_was_agent = True
            continue
        if key in _SITE_WIDE:
            continue
        last_was_agent = False
        if current is not None and value:
            current.rules.append((key, value))
    return groups


def _directive(line: str) -> tuple[str, str] | None:
    """`key: value`, or `key value` for a known key (lenient, as crawlers long have been)."""
    key, colon, value = line.partition(":")
    key = key.strip().lower()
    if colon and (key in _KNOWN or not value or value[:1].isspace()):
        return key, value.strip()
    words = line.split()  # the value's words joined by one space, as protego reads it
    for n in (2, 1):
        candidate = " ".join(words[:n]).lower()
        if candidate in _KNOWN and len(words) >= n:
            return candidate, " ".join(words[n:]).strip()
    return (key, value.strip()) if colon else None


def _delay(value: str) -> float | None:
    try:
        delay = float(value)
    except ValueError:
        return None
    return delay if math.isfinite(delay) and delay >= 0 else None


def _content_usage(value: str) -> ContentUsageRule:
    # attach-05 3.2: the path runs to the first SP or HTAB; the rest is the expression. A value
    # without a path (seen in the wild, and in early drafts) applies to the whole site.
    if value.startswith("/"):
        parts = value.split(None, 1)
        path, expression = parts[0], parts[1] if len(parts) > 1 else ""
    else:
        path, expression = "/", value
    return ContentUsageRule(PathPattern(path), aipref.parse_usage(expression), expression)
