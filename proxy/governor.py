"""The governor decides, per request, whether a fetch may leave the gateway.

Checks run cheapest first and need no network until the site's own signals (DESIGN.md, "Request
path", step 3): identity -> project -> blocklist/takedown -> target address (SSRF guard) ->
opt-out files (robots.txt, TDMRep) -> pauses and budgets.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

from proxy import inputs
from proxy.blocklist import BlockEntry
from proxy.blocklist import Blocklist
from proxy.blocklist import Scope
from proxy.blocklist import entry_from_pattern
from proxy.decision import ALLOW
from proxy.decision import Decision
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.identity import AdminDirectory
from proxy.identity import Caller
from proxy.identity import Identity
from proxy.identity import TeamDirectory
from proxy.policy import LegalBasis
from proxy.policy import LoadedPolicy
from proxy.policy import Policy
from proxy.policy import Respect
from proxy.sites import Site
from proxy.sites import SiteDirectory
from proxy.sites import is_ip_literal
from proxy.ssrf import AddressGuard
from proxy.ssrf import IPAddress
from proxy.ssrf import IPNetwork
from proxy.ssrf import OwnListeners
from proxy.ssrf import ResolutionError
from proxy.ssrf import Resolver
from proxy.takedowns import expand_schemes


@dataclass(frozen=True)
class CompiledPolicy:
    """A loaded policy with its lookups built once, at load time."""

    loaded: LoadedPolicy
    sites: SiteDirectory
    teams: TeamDirectory
    admins: AdminDirectory
    policy_blocklist: tuple[BlockEntry, ...]
    guard: AddressGuard
    ip_literals: tuple[IPNetwork, ...]  # network.allow_ip_literals
    resolver: Resolver
    upstream_proxy_addresses: frozenset[tuple[str, int]]

    @property
    def version(self) -> str:
        return self.loaded.version


def _blocklist_entries(policy: Policy) -> tuple[BlockEntry, ...]:
    """The policy's blocklist; a URL prefix covers the same content over http and https, as a
    takedown's does (an entry written for https only let the http URL through)."""
    entries: dict[tuple[Scope, str], BlockEntry] = {}
    for b in policy.blocklist:
        for pattern in b.match:
            is_url = pattern.lower().startswith(("http://", "https://"))
            for variant in expand_schemes(Scope.PREFIX if is_url else Scope.DOMAIN, [pattern]):
                entry = entry_from_pattern(b.id, variant, b.reason, b.source)
                entries.setdefault((entry.scope, entry.target), entry)
    return tuple(entries.values())


def compile_policy(loaded: LoadedPolicy, resolver: Resolver | None = None) -> CompiledPolicy:
    policy = loaded.policy
    return CompiledPolicy(
        loaded=loaded,
        sites=SiteDirectory(policy),
        teams=TeamDirectory(policy),
        admins=AdminDirectory(policy),
        policy_blocklist=_blocklist_entries(policy),
        guard=AddressGuard(policy.network.allow_private),
        ip_literals=tuple(policy.network.allow_ip_literals),
        resolver=resolver or Resolver(dict(policy.network.static_hosts)),
        upstream_proxy_addresses=frozenset(p.address for p in policy.egress.upstream_proxies),
    )


@dataclass(slots=True)
class RequestContext:
    """What the governor knows of one request; filled in as the checks go."""

    identity: Identity
    method: str
    scheme: str
    host: str  # normalized
    port: int
    url: str  # normalized, see blocklist.normalize_url
    path: str  # path and query as forwarded (inputs.canonical_target)
    site: Site
    basis: LegalBasis
    respect: Respect
    project: str | None = None
    account: str | None = None
    signals: list[str] = field(default_factory=list)
    # Other paths the site may serve for `path` (inputs.other_readings): checked as well.
    readings: tuple[str, ...] = ()
    # Seconds spent waiting for the site (its robots.txt, tdmrep.json) or for its budget
    # (delay mode): not the gateway's decision time (`request_duration_seconds{governance}`).
    waited: float = 0.0


type PrefetchCheck = Callable[[RequestContext], Awaitable[Decision | None]]


class Governor:
    def __init__(self, compiled: CompiledPolicy):
        self.compiled = compiled
        self.extra_blocks: tuple[BlockEntry, ...] = ()  # takedowns and API blocklist entries
        self.blocklist = Blocklist(list(compiled.policy_blocklist))
        # Opt-out checks that may fetch (robots.txt, tdmrep.json), in order; see optout wiring.
        self.prefetch_checks: list[PrefetchCheck] = []
        self.own_listeners = OwnListeners()  # the runtime's: set when it knows its addresses

    # -- policy and blocklist --------------------------------------------------------------

    def use_policy(self, compiled: CompiledPolicy) -> None:
        self.compiled = compiled
        self._rebuild_blocklist()

    def set_extra_blocks(self, entries: list[BlockEntry]) -> None:
        self.extra_blocks = tuple(entries)
        self._rebuild_blocklist()

    def _rebuild_blocklist(self) -> None:
        self.blocklist = Blocklist([*self.compiled.policy_blocklist, *self.extra_blocks])

    # -- the decisions ---------------------------------------------------------------------

    def authenticate(self, proxy_authorization: str | None) -> Caller | None:
        return self.compiled.teams.authenticate(proxy_authorization)

    def site_for(self, host: str) -> Site:
        return self.compiled.sites.site_for(host)

    def context(
        self,
        identity: Identity,
        *,
        method: str,
        scheme: str,
        host: str,
        port: int,
        url: str,
        path: str,
        project: str | None,
        account: str | None,
        today: dt.date | None = None,
    ) -> RequestContext:
        site = self.site_for(host)
        basis, respect = site.terms_on(today or dt.datetime.now(dt.UTC).date())
        return RequestContext(
            identity=identity,
            method=method,
            scheme=scheme,
            host=host,
            port=port,
            url=url,
            path=path,
            site=site,
            basis=basis,
            respect=respect,
            project=project,
            account=account,
            readings=inputs.other_readings(path),
        )

    def check_host(self, host: str) -> Decision:
        """Refusals decidable from the host alone: used at CONNECT, before any TLS."""
        site = self.site_for(host)
        entry = self.blocklist.match_host(host)
        if entry is not None:
            return _blocked(entry, site.key)
        return ALLOW

    async def target_address(
        self, host: str, port: int, site: str
    ) -> tuple[IPAddress | None, Decision]:
        """The one address to connect to, or the refusal: resolve once, check, pin."""
        try:
            addresses = await self.compiled.resolver.resolve(host)
        except ResolutionError as e:
            return None, refuse(Reason.UNRESOLVABLE, str(e), site=site)
        return self.check_address(host, port, site, addresses[0])

    def still_pinned(
        self, host: str, port: int, site: str, address: IPAddress, static: IPAddress | None
    ) -> Decision:
        """A tunnel's pinned address under this policy (it was pinned under an earlier one):
        still admitted, and still where `network.static_hosts` sends the host (`static`: where
        it sent it then). A reload applies to open tunnels too."""
        if self.compiled.resolver.static_address(host) != static:
            return refuse(
                Reason.MISDIRECTED,
                f"the policy's network.static_hosts changed where {host} goes since this tunnel "
                "was opened; open a new one",
                site=site,
            )
        return self.check_address(host, port, site, address)[1]

    def check_address(
        self, host: str, port: int, site: str, address: IPAddress
    ) -> tuple[IPAddress | None, Decision]:
        """The address to connect to for `host` (as the guard reads it), or the refusal."""
        verdict = self.compiled.guard.check(address)
        if not verdict.allowed:
            return None, refuse(
                Reason.PRIVATE_ADDRESS,
                f"{host} resolves to {verdict.address}, a {verdict.denied_class} address "
                "that the policy's network.allow_private does not admit",
                rule="network.allow_private",
                site=site,
            )
        if (own := self.own_listeners.listener_at(verdict.address, port)) is not None:
            return None, refuse(
                Reason.PRIVATE_ADDRESS,
                f"{host}:{port} is this gateway's own {own}, never a site "
                "(whatever network.allow_private admits)",
                site=site,
            )
        if is_ip_literal(host) and not any(
            verdict.address in net
            for net in self.compiled.ip_literals
            if net.version == verdict.address.version
        ):
            return None, refuse(
                Reason.IP_LITERAL,
                f"{host} is an IP address: name the site by its domain name (its budget, "
                "blocklist entries and takedowns are kept by name), or admit the address in "
                "the policy's network.allow_ip_literals",
                rule="network.allow_ip_literals",
                site=site,
            )
        return verdict.address, ALLOW

    def connect_refusal(self, host: str, port: int) -> str | None:
        """Why a TCP connection to (host, port) must not be opened, or None.

        Allowed: a configured upstream proxy, or an IP literal the SSRF guard admits.
        """
        if (host, port) in self.compiled.upstream_proxy_addresses:
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return f"unpinned connection to {host}: the gateway connects to checked addresses only"
        verdict = self.compiled.guard.check(ip)
        if not verdict.allowed:
            return f"{ip} is a {verdict.denied_class} address"
        if (own := self.own_listeners.listener_at(verdict.address, port)) is not None:
            return f"{ip}:{port} is this gateway's own {own}"
        return None

    def check_request(self, ctx: RequestContext) -> Decision:
        """Refusals that need no network: project, blocklist and takedowns."""
        project = self.check_project(ctx.identity, ctx)
        return project if not project.allowed else self.check_blocked(ctx)

    def check_project(self, identity: Identity, ctx: RequestContext) -> Decision:
        """Whether `identity` (the request's team, as this policy has it) may name its project:
        also asked again for a request that waited across a reload."""
        if not identity.allows_project(ctx.project):
            named = (
                "named no project (X-Crawl-Project, or TEAM+PROJECT as the proxy user name)"
                if ctx.project is None
                else f"named the project {ctx.project!r}"
            )
            return refuse(
                Reason.UNKNOWN_PROJECT,
                f"team {identity.team} {named}; its projects are "
                + ", ".join(sorted(identity.projects)),
                rule=f"teams.{identity.team}.projects",
                site=ctx.site.key,
            )
        return ALLOW

    def check_blocked(self, ctx: RequestContext) -> Decision:
        """The blocklist and takedowns in force now (also again for a request that waited for
        its budget or a robots.txt while one was filed: `blocklist` is a new object then)."""
        entry = self.blocklist.match_url(ctx.host, ctx.url, ctx.readings)
        if entry is not None:
            return _blocked(entry, ctx.site.key)
        return ALLOW

    async def check_prefetch(self, ctx: RequestContext) -> Decision:
        """The site's machine-readable opt-outs that can be read before fetching."""
        for check in self.prefetch_checks:
            decision = await check(ctx)
            if decision is not None and not decision.allowed:
                return decision
        return ALLOW


def _blocked(entry: BlockEntry, site: str) -> Decision:
    return refuse(
        entry.code,
        f"{entry.reason} (source: {entry.source})",
        rule=entry.id,
        site=site,
    )
