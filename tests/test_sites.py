"""Site keys and site rules."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from proxy.policy import parse_policy
from proxy.sites import SiteDirectory
from proxy.sites import is_ip_literal
from proxy.sites import normalize_host
from proxy.sites import registrable_domain
from tests.support import base_policy


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("www.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("images.bbc.co.uk", "bbc.co.uk"),
        ("user.github.io", "user.github.io"),  # a private suffix: each user is a site
        ("site-a.test", "site-a.test"),
        ("cdn1.site-a.test", "site-a.test"),
        ("93.184.216.34", "93.184.216.34"),
        ("::1", "::1"),
        ("co.uk", "co.uk"),
    ],
)
def test_registrable_domain(host: str, key: str):
    assert registrable_domain(host) == key


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("WWW.Example.COM.", "www.example.com"),
        ("[::1]", "::1"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_normalize_host(raw: str, normal: str):
    assert normalize_host(raw) == normal


def directory(sites: list[dict]) -> SiteDirectory:
    policy = base_policy()
    policy["sites"] = sites
    return SiteDirectory(parse_policy(yaml.safe_dump(policy)).policy)


def test_site_rules_match_before_the_registrable_domain():
    d = directory(
        [
            {
                "id": "archive",
                "match": ["archive.example.org", "*.archive-cdn.example"],
                "rate": "5/s",
            },
            {"id": "deep", "match": ["*.img.archive-cdn.example"], "rate": "1/min"},
        ]
    )
    assert d.site_for("archive.example.org").key == "archive"
    assert d.site_for("www.example.org").key == "example.org"
    assert d.site_for("archive-cdn.example").key == "archive"
    assert d.site_for("x.y.archive-cdn.example").key == "archive"
    # The most specific pattern wins, whatever the order of the rules.
    assert d.site_for("a.img.archive-cdn.example").key == "deep"
    assert d.site_for("archive.example.org").settings.rate == "5/s"
    # Overrides are per key; the rest comes from defaults.
    assert d.site_for("archive.example.org").settings.burst == base_policy()["defaults"]["burst"]


def test_subdomains_beneath_a_named_host_share_its_budget_not_its_terms():
    # `www.`, `x1.` of a host a rule names fell back to the registrable domain and the
    # defaults: rotating subdomains escaped the rule's budget (1 a day: 8 served).
    licence = {"kind": "licence", "ref": "LIC-7"}
    d = directory(
        [
            {
                "id": "museum",
                "match": ["site-a.test"],
                "requests_per_day": 1,
                "legal_basis": licence,
                "respect": {"noai": True},
            },
            {"id": "archive", "match": ["archive.example.org"]},
            {"id": "cdn", "match": ["*.cdn.archive.example.org"]},
            {"id": "img", "match": ["img.archive.example.org"]},
            {"id": "bucket", "match": ["s3.amazonaws.com"], "legal_basis": licence},
        ]
    )
    named = d.site_for("site-a.test")
    for host in ("www.site-a.test", "x1.site-a.test", "a.b.site-a.test"):
        beneath = d.site_for(host)
        assert beneath.key == "museum" and beneath.settings.requests_per_day == 1, host
        # The named host's terms (a licence, its own signals) are not those beneath it: the
        # defaults' are.
        assert beneath.settings.legal_basis != named.settings.legal_basis
        assert beneath.settings.respect != named.settings.respect
        assert beneath.settings.legal_basis == beneath.fallback.legal_basis
        assert beneath.settings.respect == beneath.fallback.respect
    assert d.site_for("www.archive.example.org").key == "archive"
    assert d.site_for("x.cdn.archive.example.org").key == "cdn"  # a `*.` pattern beneath it
    assert d.site_for("x.img.archive.example.org").key == "img"  # a nearer name
    assert d.site_for("www.example.org").key == "example.org"  # not beneath the named host
    # The nearest pattern wins on the way up: a name beneath a broader `*.` rule.
    d2 = directory(
        [
            {"id": "cdn-wide", "match": ["*.archive-cdn.example"], "rate": "50/s"},
            {"id": "fragile", "match": ["slow.archive-cdn.example"], "rate": "1/min"},
        ]
    )
    assert d2.site_for("x1.slow.archive-cdn.example").key == "fragile"
    assert d2.site_for("x1.archive-cdn.example").key == "cdn-wide"
    # Never past the registrable domain: another owner's bucket is its own site.
    other = d.site_for("someone-elses.s3.amazonaws.com")
    assert other.key == "someone-elses.s3.amazonaws.com" and other.rule is None


def test_a_host_beneath_a_named_one_keeps_the_terms_of_a_pattern_that_gives_it():
    # `*.shop.test` respects noai and Content-Usage; `img.shop.test` has a budget of its own.
    # x.img.shop.test shares img.shop.test's budget (the nearer name), but it is still given by
    # `*.shop.test`: it got the defaults' signals (none respected), and its noai content was
    # delivered. README: the defaults' terms are for a host beneath a named one "that no
    # pattern gives".
    strict = {"noai": True, "content_usage": True}
    licence = {"kind": "licence", "ref": "LIC-SHOP"}
    d = directory(
        [
            {"id": "shop", "match": ["*.shop.test"], "respect": strict, "legal_basis": licence},
            {"id": "shop-img", "match": ["img.shop.test"], "rate": "2/s"},
            {"id": "museum", "match": ["site-a.test"], "legal_basis": licence},
        ]
    )
    day = dt.date(2026, 6, 1)
    for host in ("x.img.shop.test", "a.b.img.shop.test"):
        site = d.site_for(host)
        assert site.key == "shop-img" and site.settings.rate == "2/s", host
        basis, respect = site.terms_on(day)
        assert (basis.ref, respect.noai, respect.content_usage) == ("LIC-SHOP", True, True), host
    # No pattern gives www.site-a.test: the defaults' terms, as before.
    basis, respect = d.site_for("www.site-a.test").terms_on(day)
    assert basis.ref == "DSM Art. 4" and not respect.noai


def test_an_expired_licence_falls_back_to_the_default_basis_and_signals():
    d = directory(
        [
            {
                "id": "licensed",
                "match": ["lic.example"],
                "legal_basis": {"kind": "licence", "ref": "LIC-1", "expires": "2027-01-01"},
                "respect": {"noai": False},
            }
        ]
    )
    site = d.site_for("lic.example")
    basis, respect = site.terms_on(dt.date(2026, 12, 31))
    assert (basis.kind, basis.ref, respect.noai) == ("licence", "LIC-1", False)
    basis, respect = site.terms_on(dt.date(2027, 1, 2))
    assert basis.kind == "tdm_exception"
    assert respect == site.fallback.respect


def test_an_expired_defaults_licence_leaves_the_statutory_exception_with_every_signal():
    # It fell back to itself: the expired blanket licence was the basis forever, and a TDM
    # reservation never bound.
    policy = base_policy()
    policy["defaults"]["legal_basis"] = {
        "kind": "licence",
        "ref": "BLANKET-2019",
        "expires": "2020-01-01",
    }
    policy["defaults"]["respect"] = {"tdmrep": False, "noai": False}
    policy["sites"] = [
        {
            "id": "old",
            "match": ["old.example"],
            "legal_basis": {"kind": "licence", "ref": "LIC-OLD", "expires": "2020-06-01"},
        }
    ]
    d = SiteDirectory(parse_policy(yaml.safe_dump(policy)).policy)
    for host in ("plain.example", "old.example"):
        basis, respect = d.site_for(host).terms_on(dt.date(2026, 11, 29))
        assert (basis.kind, basis.ref) == ("tdm_exception", "DSM Art. 4"), host
        assert respect.tdmrep and respect.noai and respect.robots, host
    basis, _ = d.site_for("plain.example").terms_on(dt.date(2019, 12, 31))
    assert basis.ref == "BLANKET-2019"


def test_a_quota_a_site_rule_sets_to_null_is_unlimited_as_in_the_defaults():
    d = directory([{"id": "bulk", "match": ["bulk.example"], "requests_per_day": None}])
    assert d.site_for("bulk.example").settings.requests_per_day is None
    assert d.site_for("bulk.example").settings.bytes_per_day == base_policy()["defaults"].get(
        "bytes_per_day", "500MB"
    )


@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("127.0.0.1", True),
        ("203.0.113.5", True),
        ("::1", True),
        ("2001:db8::", True),  # ends in a colon
        ("::ffff:127.0.0.1", True),
        ("site-a.test", False),
        ("cdn.example1", False),  # a name ending in a digit
        ("", False),
    ],
)
def test_ip_literals_are_told_from_names(host: str, literal: bool):
    assert is_ip_literal(host) is literal


def test_a_budget_key_in_use_under_a_new_policy():
    # After a reload, the budget gauges follow the keys still in use (engine.use_policy_version).
    d = directory([{"id": "Archive", "match": ["archive.example"]}])
    assert d.in_use("Archive") is d.by_key("Archive")
    assert d.in_use("renamed") is None  # a rule id gone
    assert d.in_use("archive.example") is None  # a domain a rule takes now
    assert d.in_use("other.example") is d.site_for("other.example")
