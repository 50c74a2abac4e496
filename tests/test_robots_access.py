"""robots.txt Allow/Disallow held compact: protego's verdicts, without the garbage collector's cost.

protego is the oracle: on generated rules and paths the compact rules answer as a Protego parse
of the same lines answers. The memory tests are what a broad crawl notices: a replica that keeps
thousands of large robots.txt files parsed must not give its collector hundreds of thousands of
objects to walk (a full collection stops the replica while it walks them).
"""

from __future__ import annotations

import gc

from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from protego import Protego

from proxy.robots import parse_robots
from proxy.robots_access import AccessRules

# Characters that matter to matching: separators, wildcards, escapes, what normalization decodes
# ('=', unreserved letters) or encodes (space, non-ASCII), and the index.html rule.
_PIECES = [
    "/",
    "a",
    "b",
    "A",
    "*",
    "$",
    "%",
    "%41",
    "%2f",
    "%2F",
    "%3D",
    "=",
    "?",
    "&",
    " ",
    "é",
    "%C3%A9",
    "index.html",
    "x.jpg",
    ".",
    "-",
    "~",
    "http://h",
    ":",
    "%24",
    "%",
]
_text = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)
_value = st.one_of(_text.map(lambda t: "/" + t), _text)
_line = st.tuples(st.sampled_from(["Allow", "Disallow"]), _value.map(str.strip)).filter(
    lambda line: bool(line[1])
)


def protego_allows(lines: list[tuple[str, str]], path: str) -> bool:
    text = "\n".join(["User-agent: *", *(f"{field}: {value}" for field, value in lines)])
    return Protego.parse(text).can_fetch(path, "crawlwarden")


@settings(max_examples=1500, deadline=None)
@given(st.lists(_line, max_size=12), st.lists(_value, min_size=1, max_size=6))
@example([("Disallow", "/a"), ("Allow", "/a")], ["/a", "/ab"])
@example([("Disallow", "/a*"), ("Allow", "/a")], ["/a", "/ab"])  # a tie across the two kinds
@example([("Disallow", "/"), ("Allow", "/index.html")], ["/", "/x"])
@example([("Disallow", "/a$"), ("Allow", "/a*b$")], ["/a", "/a$", "/a%24", "/acb", "/ab$"])
@example([("Disallow", "/*.jpg$"), ("Allow", "/pub/*")], ["/pub/x.jpg", "/x.jpg?s=1"])
@example([("Disallow", "/%3D"), ("Allow", "/=")], ["/=", "/%3d"])
@example([("Disallow", "/")], ["/robots.txt", "http://h/robots.txt", "/robots.txt?x"])
def test_the_verdict_is_protegos(lines: list[tuple[str, str]], paths: list[str]) -> None:
    rules = AccessRules(lines)
    for path in paths:
        assert rules.can_fetch(path) == protego_allows(lines, path), (lines, path)


def test_no_rules_allow_everything() -> None:
    assert AccessRules([]).can_fetch("/anything")
    assert AccessRules([]).count == 0


def test_reading_rules_leaves_nothing_for_the_collector() -> None:
    """protego's parse is a cycle (each rule set points back at its parser) of a few tracked
    objects per rule: every large file read waited in memory for a full collection, and made
    the collections walk it until then."""
    lines = [("Disallow", f"/private/{n}/") for n in range(5000)]
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        rules = AccessRules(lines)
        grew = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert rules.count == 5000
    assert grew < 50, f"{grew} objects left for the collector by reading 5000 rules"


def test_large_files_kept_parsed_give_the_collector_next_to_nothing() -> None:
    body = "\n".join(
        ["User-agent: *"]
        + [f"Disallow: /d{n}/" for n in range(4000)]
        + [f"Allow: /d{n}/*.jpg$" for n in range(4000)]
        + [f"Disallow: /*/s{n}*x" for n in range(2000)]
    ).encode()
    gc.collect()
    before = len(gc.get_objects())
    kept = [parse_robots(body, ["examplebot"]) for _ in range(3)]
    # CPython stops tracking a tuple of strings when a collection first looks at it, and a tuple
    # of such tuples at the one after: in a replica, within its first few young collections.
    gc.collect()
    gc.collect()
    grew = len(gc.get_objects()) - before
    assert grew < 200, f"{grew} objects tracked for 3 files of 10 000 rules"
    rules = kept[0]
    assert not rules.verdict("/d7/page").allowed
    assert rules.verdict("/d7/photo.jpg").allowed
    assert not rules.verdict("/a/s12/x").allowed
    assert rules.verdict("/elsewhere").allowed


def test_widest_counts_the_rules_under_every_prefix_of_one_path() -> None:
    """A request is tried against the rules filed under each of its prefixes, not one: 900
    rules each under its own prefix ("/a", "/aa", ...) are all tried for "/aaa...". Counted as
    one, they were matched on the event loop: ~100 ms a request for an 8 KiB path."""
    lines = [("Disallow", "/" + "a" * k + "*zz") for k in range(900)]
    rules = AccessRules(lines)
    assert rules.widest == 900
    # prefixes that are not each other's: one request meets one of them
    assert AccessRules([("Disallow", f"/p{n}/x*") for n in range(900)]).widest == 1
    # "" (a rule starting with '*') is a prefix of every path
    mixed = [("Disallow", "*q"), ("Disallow", "/b*q"), ("Disallow", "/b*r"), ("Disallow", "/c*q")]
    assert AccessRules(mixed).widest == 3
    assert AccessRules(mixed).widest_chars == len("*q") + len("/b*q") + len("/b*r")


def test_the_work_estimate_sends_long_matches_off_the_loop() -> None:
    """What a match may cost decides where it runs (optout_checks.MATCH_OFF_LOOP_NS): the rules
    tried one by one, and how long the path is they are searched in. 1 000 rules of a 99-character
    run took 205 ms for an 8 KiB path of the run's first letter (str.find), with 1 000 rules
    counted as too few to leave the loop."""
    from proxy.optout_checks import MATCH_OFF_LOOP_NS

    def work(lines: list[str], path: str, readings: tuple[str, ...] = ()) -> int:
        return parse_robots("User-agent: *\n" + "\n".join(lines), ["x"]).work(path, readings)

    needles = [f"Disallow: /*{'a' * 98}b" for _ in range(1000)]
    assert work(needles, "/" + "a" * 8191) > MATCH_OFF_LOOP_NS
    assert work(needles, "/a") < MATCH_OFF_LOOP_NS
    nested = [f"Disallow: /{'a' * k}*{'a' * 97}ba" for k in range(900)]
    assert work(nested, "/" + "a" * 8191) > MATCH_OFF_LOOP_NS
    typical = [f"Disallow: /dir{k}/" for k in range(40)] + [
        f"Disallow: /*.php{k}$" for k in range(10)
    ]
    assert work(typical, "/dir3/photos/x.jpg?size=large") < MATCH_OFF_LOOP_NS / 50
    # every other reading of the path is matched too
    assert work(typical, "/x", ("/y", "/z")) == 3 * work(typical, "/x")
    plain = [f"Disallow: /s/d{k}/" for k in range(25_000)]  # found by index
    assert work(plain, "/s/d777/x") < MATCH_OFF_LOOP_NS / 100


def test_a_path_protego_cannot_read_is_matched_as_a_site_merging_slashes_serves_it() -> None:
    """protego reads "//a]" as the host "a]" and raises (urlsplit: "Invalid IPv6 URL"): the
    request was killed, not answered (probe-robots)."""
    rules = AccessRules([("Disallow", "/a")])
    assert not rules.can_fetch("//a]")
    assert not AccessRules([("Disallow", "/%5B")]).can_fetch("//[::1")
    assert AccessRules([("Disallow", "/private")]).can_fetch("//a]")
