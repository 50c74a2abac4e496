"""Blocklist matching: domains with subdomains, URL prefixes, exact URLs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from proxy.blocklist import BlockEntry
from proxy.blocklist import Blocklist
from proxy.blocklist import Scope
from proxy.blocklist import entry_from_pattern
from proxy.blocklist import normalize_url
from proxy.decision import Reason
from proxy.governor import compile_policy
from proxy.inputs import other_readings
from proxy.policy import load_policy
from tests.support import base_policy
from tests.support import write_policy


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("HTTP://Example.COM", "http://example.com/"),
        ("https://example.com:443/a?b=1#frag", "https://example.com/a?b=1"),
        ("http://example.com:8080/A", "http://example.com:8080/A"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        # As a browser shows it: encoded as every client sends it.
        ("http://example.com/g/café.jpg", "http://example.com/g/caf%C3%A9.jpg"),
        ("http://example.com/my photo.jpg?q=a b", "http://example.com/my%20photo.jpg?q=a%20b"),
        ("http://example.com/caf%c3%a9.jpg", "http://example.com/caf%c3%a9.jpg"),  # kept
    ],
)
def test_normalize_url(raw: str, normal: str):
    assert normalize_url(raw) == normal


BLOCKLIST = Blocklist(
    [
        entry_from_pattern("tos", "stockco.example", "terms", "src"),
        entry_from_pattern("members", "https://forum.example/members/", "terms", "src"),
        entry_from_pattern("deep", "https://forum.example/members/vip/", "vip", "src"),
        BlockEntry(
            "td-1",
            Scope.URL,
            normalize_url("https://img.example/a.jpg"),
            "rh",
            "c",
            Reason.TAKEDOWN,
        ),
        entry_from_pattern("tilde", "https://forum.example/%7euser/", "terms", "src"),
        BlockEntry(
            "td-3",
            Scope.URL,
            normalize_url("https://img.example/g/café au lait.jpg"),
            "rh",
            "c",
            Reason.TAKEDOWN,
        ),
        BlockEntry(
            "td-2",
            Scope.URL,
            normalize_url("https://img.example/view?id=1"),
            "rh",
            "c",
            Reason.TAKEDOWN,
        ),
        BlockEntry(
            "td-4",
            Scope.URL,
            normalize_url("https://img.example/resize?w=800&h=600"),
            "rh",
            "c",
            Reason.TAKEDOWN,
        ),
    ]
)


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("https://stockco.example/", "tos"),
        ("https://cdn.images.stockco.example/x.jpg", "tos"),
        ("https://notstockco.example/", None),
        ("https://forum.example/members/alice", "members"),
        ("https://forum.example/members/vip/bob", "deep"),
        ("https://forum.example/member", None),
        ("http://forum.example/members/alice", None),  # the prefix names https
        ("https://img.example/a.jpg", "td-1"),
        ("https://img.example/a.jpg?w=800", "td-1"),  # the same file, resized or cache-busted
        ("https://img.example/a.jpg2", None),
        ("https://img.example/view?id=1", "td-2"),
        ("https://img.example/view?id=2", None),  # an entry with a query covers that query
        ("https://img.example/view?id=1&", "td-2"),  # ... however its parameters are written
        ("https://img.example/view?&&id=1", "td-2"),
        ("https://img.example/resize?h=600&w=800", "td-4"),
        ("https://img.example/resize?w=800&&h=600&", "td-4"),
        ("https://img.example/resize?w=800", None),
        ("https://img.example/resize?w=800&h=600&h=600", None),  # another parameter
        ("https://img.example/resize?w=800&h=600&x=1", None),
        ("https://img.example/view", None),
        ("https://forum.example/~user/x", "tilde"),  # the entry spells it %7e
        ("https://img.example/g/caf%C3%A9%20au%20lait.jpg", "td-3"),  # written as shown
    ],
)
def test_match_url(url: str, rule: str | None):
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    hit = BLOCKLIST.match_url(host, normalize_url(url))
    assert (hit.id if hit else None) == rule


def test_only_whole_domains_are_refused_at_connect_time():
    assert BLOCKLIST.match_host("a.stockco.example") is not None
    assert BLOCKLIST.match_host("forum.example") is None
    assert BLOCKLIST.match_host("img.example") is None


@pytest.mark.parametrize(
    ("url", "readings", "rule"),
    [
        ("https://forum.example//members/x", ("/members/x",), "members"),
        ("https://img.example/a%2Fb", ("/a.jpg",), "td-1"),  # an exact URL under one reading
        ("https://forum.example//about", ("/about",), None),
    ],
)
def test_urls_are_matched_under_every_reading_of_their_path(
    url: str, readings: tuple[str, ...], rule: str | None
):
    host = url.split("/")[2]
    hit = BLOCKLIST.match_url(host, url, readings)
    assert (hit.id if hit else None) == rule
    if rule is not None:
        assert BLOCKLIST.match_url(host, url) is None  # as sent, the URL alone escapes


@pytest.mark.parametrize(
    "entry", ["http://forum.test/search?q=secret", "http://forum.test/search?q=%73ecret"]
)
@pytest.mark.parametrize(
    "target", ["/search?q=secret", "/search?q=%73ecret", "/search?q=%73%65cret"]
)
def test_an_entry_with_a_query_matches_however_its_unreserved_characters_are_spelled(
    entry: str, target: str
):
    # `?q=%73ecret` is `?q=secret` to the site: it got past an entry for the latter.
    blocklist = Blocklist([entry_from_pattern("q", entry, "r", "s")])
    url = normalize_url("http://forum.test" + target)
    hit = blocklist.match_url("forum.test", url, other_readings(target))
    assert hit is not None and hit.id == "q"
    assert (
        blocklist.match_url("forum.test", normalize_url("http://forum.test/search?q=open")) is None
    )


def test_a_policy_url_prefix_covers_both_schemes(tmp_path: Path):
    # An entry written for https let the same content through over http (a takedown's did not).
    policy = base_policy()
    policy["blocklist"] = [
        {
            "id": "members-only",
            "match": ["https://site-a.test/members/", "http://site-b.test/members/"],
            "reason": "Member pages excluded by the terms",
            "source": "https://site-a.test/tos",
        }
    ]
    compiled = compile_policy(load_policy(write_policy(tmp_path / "p.yaml", policy)))
    blocklist = Blocklist(list(compiled.policy_blocklist))
    for url in (
        "https://site-a.test/members/x",
        "http://site-a.test/members/x",
        "http://site-b.test/members/x",
        "https://site-b.test/members/x",
    ):
        hit = blocklist.match_url(urlsplit(url).hostname or "", normalize_url(url))
        assert hit is not None and hit.id == "members-only", url
    assert blocklist.match_url("site-a.test", normalize_url("http://site-a.test/about")) is None
