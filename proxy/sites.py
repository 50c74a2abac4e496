"""Site keys: which budget, rules and legal basis a host belongs to.

The key is the id of the policy site rule that matches the host most closely, else that of a
rule naming a host above it within its registrable domain (its budget, with the default terms),
else the registrable domain (eTLD+1, from the Public Suffix List shipped with `publicsuffixlist`,
no network). Rotating subdomains therefore does not escape a site's budget (guideline
"Necessity": traffic from one source stays insubstantial).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from proxy.idn import ascii_host
from proxy.policy import STATUTORY_BASIS
from proxy.policy import Defaults
from proxy.policy import LegalBasis
from proxy.policy import Policy
from proxy.policy import Respect
from proxy.policy import SiteRule
from proxy.suffixes import public_suffixes


def normalize_host(host: str) -> str:
    """Lower-case, no trailing dot, IDNA 2008 A-labels for non-ASCII names, bare IPv6."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host.isascii():
        host = ascii_host(host)
    return host


def is_ip_literal(host: str) -> bool:
    if not host or not (host[-1].isdigit() or ":" in host):
        return False  # asked per request: a name's last label mostly ends in a letter
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=65536)
def registrable_domain(host: str) -> str:
    """eTLD+1 of a normalized host; IP literals and bare public suffixes are their own site."""
    if is_ip_literal(host):
        return host
    return public_suffixes().privatesuffix(host) or host


@dataclass(frozen=True, slots=True)
class Site:
    """The resolved site of a request: its key and the settings that apply to it."""

    key: str
    rule: SiteRule | None
    settings: Defaults
    fallback: Defaults

    def terms_on(self, day: dt.date) -> tuple[LegalBasis, Respect]:
        """The legal basis in force on `day` and the opt-out signals it obliges us to respect.

        An expired licence is no basis: the default basis, and the default signals, apply again;
        if that one has expired too (a `defaults` licence), the statutory TDM exception does,
        with every signal respected.
        """
        basis = self.settings.legal_basis
        if not _expired(basis, day):
            return basis, self.settings.respect
        if not _expired(self.fallback.legal_basis, day):
            return self.fallback.legal_basis, self.fallback.respect
        return STATUTORY_BASIS, Respect()


def _expired(basis: LegalBasis, day: dt.date) -> bool:
    return basis.expires is not None and basis.expires < day


class HostPatterns[T]:
    """Host patterns of a policy: `name` matches that host, `*.name` matches name and below.

    The most specific pattern wins; between equal patterns, the first one in the policy.
    """

    def __init__(self) -> None:
        self._exact: dict[str, T] = {}
        self._suffix: dict[str, T] = {}

    def add(self, pattern: str, value: T) -> None:
        if pattern.startswith("*."):
            self._suffix.setdefault(pattern[2:], value)
        else:
            self._exact.setdefault(pattern, value)

    def __bool__(self) -> bool:
        return bool(self._exact or self._suffix)

    def lookup(self, host: str) -> T | None:
        """The value of the most specific pattern for `host`."""
        hit = self.covering(host, host)
        return None if hit is None else hit[0]

    def wildcard(self, host: str) -> T | None:
        """The value of the nearest `*.` pattern that gives `host` (name and every subdomain)."""
        if not self._suffix:
            return None
        name = host
        while True:
            if (hit := self._suffix.get(name)) is not None:
                return hit
            _, dot, name = name.partition(".")
            if not dot:
                return None

    def covering(self, host: str, within: str) -> tuple[T, bool] | None:
        """The nearest pattern for `host`, with `name` patterns covering the hosts beneath
        them down from `within` (its registrable domain): at each level up, the host itself,
        then a `*.` pattern, then a name above the host. The flag: covered from above by a
        name (`site-a.test` for `www.site-a.test`)."""
        if (hit := self._exact.get(host)) is not None:
            return hit, False
        below_within = host != within and host.endswith("." + within)
        if not self._suffix and not below_within:
            return None
        name = host
        while True:
            if (hit := self._suffix.get(name)) is not None:
                return hit, False
            if name != host and below_within and (hit := self._exact.get(name)) is not None:
                return hit, True
            if name == within:
                below_within = False  # no name above the registrable domain covers below it
            _, dot, name = name.partition(".")
            if not dot:
                return None


class SiteDirectory:
    """Maps hosts to sites for one policy. Built once per policy load."""

    def __init__(self, policy: Policy):
        self.defaults = policy.defaults
        self._rules = HostPatterns[SiteRule]()
        for rule in policy.sites:
            for pattern in rule.match:
                self._rules.add(pattern, rule)
        self._sites = {rule.id: self._site_for_rule(rule) for rule in policy.sites}
        # A host beneath one a rule names: that site's budget, not its terms (a licence or
        # an exemption for one host is not one for the hosts beneath it): the terms of a `*.`
        # pattern that gives the host, else the defaults'.
        self._beneath = {
            key: self._beneath_site(site, self.defaults) for key, site in self._sites.items()
        }
        self._beneath_given: dict[tuple[str, str], Site] = {}
        self._by_domain: dict[str, Site] = {}

    def _beneath_site(self, site: Site, terms: Defaults) -> Site:
        return Site(
            key=site.key,
            rule=site.rule,
            settings=site.settings.model_copy(
                update={"legal_basis": terms.legal_basis, "respect": terms.respect}
            ),
            fallback=self.defaults,
        )

    def _site_for_rule(self, rule: SiteRule) -> Site:
        overrides = rule.overrides()
        respect = self.defaults.respect.model_copy(
            update={k: v for k, v in rule.respect if v is not None}
        )
        settings = self.defaults.model_copy(update={**overrides, "respect": respect})
        return Site(key=rule.id, rule=rule, settings=settings, fallback=self.defaults)

    def site_for(self, host: str) -> Site:
        domain = registrable_domain(host)
        # Rotating subdomains of a named site (`www.`, `x1.`) does not escape its budget.
        if (hit := self._rules.covering(host, domain)) is not None:
            rule, beneath = hit
            if not beneath:
                return self._sites[rule.id]
            given = self._rules.wildcard(host)  # a broader `*.` rule that gives this host
            if given is None:
                return self._beneath[rule.id]
            pair = (rule.id, given.id)
            if (site := self._beneath_given.get(pair)) is None:
                site = self._beneath_given[pair] = self._beneath_site(
                    self._sites[rule.id], self._sites[given.id].settings
                )
            return site
        site = self._by_domain.get(domain)
        if site is None:
            if len(self._by_domain) > 50_000:
                self._by_domain.clear()
            site = Site(key=domain, rule=None, settings=self.defaults, fallback=self.defaults)
            self._by_domain[domain] = site
        return site

    def by_key(self, key: str) -> Site:
        """The site for a key: a rule id, or a domain that gets the defaults."""
        return self._sites.get(key) or self.site_for(key)

    def in_use(self, key: str) -> Site | None:
        """The site a budget key names under this policy, or None for a key no longer in use:
        a rule id gone (renamed, removed), or a domain a rule takes now. (A key without a dot
        that is no rule id is taken for a rule id gone: the rare single-label host's gauges
        come back with its next request.)"""
        if (rule := self._sites.get(key)) is not None:
            return rule
        if "." not in key:
            return None
        site = self.site_for(key)
        return site if site.key == key else None

    def rule_ids(self) -> list[str]:
        return list(self._sites)
