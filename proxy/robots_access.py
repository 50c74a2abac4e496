"""robots.txt Allow/Disallow matching, held compact.

Each rule is read as protego reads it (its normalization of percent-encoding, `*`, a final `$`
and `$` as a character, an allowed `index.html` allowing `/`), then held in a form Python's cyclic
garbage collector has no reason to visit, and matched by index:

- a broad crawl keeps thousands of robots.txt files parsed; protego holds each rule as a few
  objects that the collector tracks (a named tuple, a pattern object and its lists, a cycle
  through the parser), and a full collection walks every one of them: ~58 000 per 25 000-rule
  file, half a second for twenty such files, during which the whole replica stands still. Here a
  file is a few dicts of strings and booleans and tuples of strings, which CPython stops
  tracking, and reading it leaves no cycle behind.
- protego finds the first matching rule in a list sorted by length, walking it from the longest:
  milliseconds per request for a file of many rules. Here a rule without `*` or a final `$` is
  found by looking the request path's prefixes up in a dict (one lookup per distinct rule length),
  and the others are filed under their literal prefix (the text before the first `*`).

The verdict is protego's, by construction and by test (tests/test_robots_access.py holds the two
against each other on generated files and paths): the longest matching rule wins, an Allow wins a
tie, no matching rule allows.
"""

from __future__ import annotations

import sys
from itertools import groupby
from operator import itemgetter
from urllib.parse import urlparse

# protego's normalization of rules and of the paths they are matched against
from protego._utils import _quote_path
from protego._utils import _quote_pattern

# A rule with `*` or a final `$`: (length, allow, literal runs between the stars, anchored).
_Special = tuple[int, bool, tuple[str, ...], bool]
# Memory besides a rule's strings: a dict slot (plain), or its tuple, the int, the list slot
# and the dict slot when filed (measured 60-90 and 150-190 bytes; with room for dict growth)
_ENTRY_BYTES = 120
_RULE_BYTES = 260


class AccessRules:
    """Allow/Disallow rules of one robots.txt for our tokens, as protego read them."""

    __slots__ = (
        "_plain",
        "_plain_lengths",
        "_special",
        "_special_lengths",
        "count",
        "held_bytes",
        "widest",
        "widest_chars",
    )

    def __init__(self, lines: list[tuple[str, str]]):
        """`lines`: ("Allow" | "Disallow", value) in file order, the groups that apply to us."""
        plain: dict[str, bool] = {}
        # (literal prefix, rule) pairs, filed by prefix below: one list, not one per prefix (a
        # list is an object the collector tracks while it lives; tuples of strings are not)
        special: list[tuple[str, _Special]] = []
        count = held = 0
        for field, value in lines:
            allow = field == "Allow"
            for pattern in _patterns(value, allow):
                count += 1
                if "*" not in pattern and not pattern.endswith("$"):
                    # the same text as Allow and Disallow: Allow wins the tie
                    plain[pattern] = plain.get(pattern, False) or allow
                    held += sys.getsizeof(pattern) + _ENTRY_BYTES
                    continue
                anchored = pattern.endswith("$")
                body = pattern[:-1] if anchored else pattern
                runs = tuple(body.split("*"))  # ("**": an empty run, found anywhere)
                special.append((runs[0], (len(pattern), allow, runs, anchored)))
                held += sys.getsizeof(runs) + sum(map(sys.getsizeof, runs)) + _RULE_BYTES
        special.sort(key=itemgetter(0))
        self._plain = plain
        self._plain_lengths = tuple(sorted({len(p) for p in plain}, reverse=True))
        self._special: dict[str, tuple[_Special, ...]] = {
            prefix: tuple(rule for _, rule in filed)
            for prefix, filed in groupby(special, key=itemgetter(0))
        }
        self._special_lengths = tuple(sorted({len(p) for p in self._special}, reverse=True))
        self.count = count
        # what these rules take in memory (an estimate on the safe side: one robots.txt line
        # may be read as four patterns, and a character of it quoted as three)
        self.held_bytes = held + held // 4  # (and a quarter more: allocators round up)
        # the most rules one request may have to try one by one, and their characters: those
        # filed under each of the prefixes of one path ("Disallow: /*.gif$" and its like all
        # fall under "/", and a path under "/a/b/" meets the rules filed under "/a/" too)
        self.widest, self.widest_chars = _widest_chain(self._special)

    def work(self, path_length: int) -> int:
        """What matching a path this long may cost at most, in nanoseconds (an estimate, on the
        safe side of what was measured): each rule tried one by one (~300 ns) and the search for
        its runs in the path (str.find: up to the path's length times a run's, ~0.5 ns each);
        a dict lookup per distinct plain rule length (a slice of the path each)."""
        tried = 300 * self.widest + path_length * self.widest_chars // 2
        return tried + len(self._plain_lengths) * (100 + path_length // 8)

    def can_fetch(self, url: str) -> bool:
        """`url`: the path and query as sent, or an absolute URL (as protego's `can_fetch`)."""
        if "/robots.txt" in url and urlparse(url).path == "/robots.txt":
            return True  # RFC 9309 2.2.2 (and protego)
        if not self.count:
            return True
        try:
            path = _quote_path(url)
        except ValueError:
            # "//a]": protego reads what follows "//" as a host, and this one is not valid
            # (urlsplit: "Invalid IPv6 URL"); read as the path a site merging slashes serves
            path = _quote_path("/" + url.lstrip("/"))
        size = len(path)
        best, allowed = -1, True
        for length in self._plain_lengths:
            if length <= size:
                found = self._plain.get(path[:length])
                if found is not None:
                    best, allowed = length, found
                    break
        for length in self._special_lengths:
            if length > size:
                continue
            for priority, allow, runs, anchored in self._special.get(path[:length], ()):
                if (
                    priority < best
                    or (priority == best and allowed)
                    or not _matches(runs, anchored, path)
                ):
                    continue
                if priority > best:
                    best, allowed = priority, allow
                else:
                    allowed = allow  # a tie: only an Allow gets here (allowed was False)
        return allowed


def _patterns(value: str, allow: bool) -> list[str]:
    """The patterns protego reads one rule as (`_RuleSet.allow`, `_RuleSet.disallow`): a `$`
    is also read as a character; a value that normalizes to nothing is no rule; an allowed
    `.../index.html` allows `.../` too."""
    read = [value.replace("$", "%24"), value] if "$" in value else [value]
    patterns = []
    for text in read:
        pattern = _quote_pattern(text)
        if not pattern:
            continue
        patterns.append(pattern)
        if allow and pattern.endswith("/index.html"):
            patterns.append(pattern.removesuffix("index.html") + "$")
    return patterns


def _widest_chain(special: dict[str, tuple[_Special, ...]]) -> tuple[int, int]:
    """The most rules filed under prefixes that one path can start with (the largest sum over a
    prefix and the prefixes of it), and the most characters of such rules. `special` is in
    sorted order, in which every prefix of a key comes before it and the keys between the two
    all start with that prefix: the prefixes of the current key are the stack left after
    dropping those that are not."""
    widest = widest_chars = 0
    # (prefix, the rules under it and under its prefixes, their characters)
    chain: list[tuple[str, int, int]] = []
    for prefix, rules in special.items():
        while chain and not prefix.startswith(chain[-1][0]):
            chain.pop()
        below, below_chars = (chain[-1][1], chain[-1][2]) if chain else (0, 0)
        tried = len(rules) + below
        chars = sum(rule[0] for rule in rules) + below_chars
        chain.append((prefix, tried, chars))
        widest, widest_chars = max(widest, tried), max(widest_chars, chars)
    return widest, widest_chars


def _matches(runs: tuple[str, ...], anchored: bool, path: str) -> bool:
    """`path` starts with runs[0] (it was found under it). Each later run is found at its
    leftmost place after the one before (`*` matches any sequence), as protego does."""
    if len(runs) == 1:
        return path == runs[0] if anchored else True
    at = len(runs[0])
    for run in runs[1:-1]:
        found = path.find(run, at)
        if found < 0:
            return False
        at = found + len(run)
    last = runs[-1]
    if anchored:
        return len(path) - len(last) >= at and path.endswith(last)
    return path.find(last, at) >= 0
