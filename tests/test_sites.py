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
    # The most specific pattern wins.
    assert d.site_for("a.img.archive-cdn.example").key == "deep"
    assert d.site_for("archive.example.org").settings.rate == "5/s"
    # Overrides are per key; the rest comes from defaults.
    assert d.site_for("archive.example.org").settings.burst == base_policy()["defaults"]["burst"]


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
