"""Who is asking: scraper teams (proxy Basic auth) and admin API callers (bearer tokens).

Tokens are never kept in clear: the policy stores their SHA-256 (or names an environment variable,
hashed at load), and a presented token is hashed and compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import NamedTuple

from proxy.policy import Policy

_NO_DIGEST = bytes(32)


class BasicCredentials(NamedTuple):
    user: str
    password: str


def parse_basic(header: str | None) -> BasicCredentials | None:
    """`Basic base64(user:password)` -> credentials; anything else -> None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return BasicCredentials(user, password)


class ProxyUser(NamedTuple):
    """A proxy user name: `TEAM`, `TEAM+PROJECT` or `TEAM+PROJECT+ACCOUNT`.

    A browser adds headers to its cross-origin requests only after a CORS preflight that
    carries none of them, and a site refuses headers it does not know: a headless browser names
    its project (and site account) here instead of in X-Crawl-Project/-Account. Team names have
    no `+`; a project named here cannot have one either; the account is the rest."""

    team: str
    project: str | None
    account: str | None

    @classmethod
    def of(cls, user: str) -> ProxyUser:
        team, _, rest = user.partition("+")
        project, _, account = rest.partition("+")
        return cls(team, project or None, account or None)


@dataclass(frozen=True, slots=True)
class Identity:
    team: str
    projects: frozenset[str]
    upstream_proxy: str | None

    def allows_project(self, project: str | None) -> bool:
        """A team that lists projects must name one of them; an empty list admits any."""
        if not self.projects:
            return True
        return project is not None and project in self.projects


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated proxy client: its team, and the project and account its user name names."""

    identity: Identity
    project: str | None = None
    account: str | None = None


class TeamDirectory:
    def __init__(self, policy: Policy):
        # Each team's identity made once per policy, not per request.
        self._teams: dict[str, tuple[bytes, Caller]] = {
            t.name: (
                t.token_digest(),
                Caller(Identity(t.name, frozenset(t.projects), t.upstream_proxy)),
            )
            for t in policy.teams
        }

    def authenticate(self, header: str | None) -> Caller | None:
        creds = parse_basic(header)
        if creds is None:
            return None
        user = ProxyUser.of(creds.user)
        entry = self._teams.get(user.team)
        digest = hashlib.sha256(creds.password.encode()).digest()
        # Compare even for an unknown team, so timing does not tell which team names exist.
        ok = hmac.compare_digest(digest, entry[0] if entry else _NO_DIGEST)
        if not ok or entry is None:
            return None
        caller = entry[1]
        if user.project is None and user.account is None:
            return caller
        return Caller(caller.identity, user.project, user.account)


class AdminDirectory:
    """Bearer tokens of the admin API, each with a role (`admin`, `auditor` or `metrics`)."""

    def __init__(self, policy: Policy):
        self._tokens = [
            (t.token_digest(), t.role, t.name or f"admin_tokens[{i}]")
            for i, t in enumerate(policy.admin_tokens)
        ]
        # A token of role `metrics` closes /metrics to whoever has none (admin.metrics_endpoint)
        self.metrics_need_a_token = any(t.role == "metrics" for t in policy.admin_tokens)

    def role_of(self, authorization: str | None) -> str | None:
        holder = self.holder_of(authorization)
        return None if holder is None else holder[0]

    def holder_of(self, authorization: str | None) -> tuple[str, str] | None:
        """The role of a bearer token and which of the policy's `admin_tokens` it is (its
        `name`, else `admin_tokens[i]`); None for a token that is none of them."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        # surrogateescape: aiohttp hands a header's non-UTF-8 bytes over as surrogates (a 401, not
        # a 500 with a traceback for each such request)
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        holder = None
        for known, role, label in self._tokens:  # every one compared: timing tells nothing
            if hmac.compare_digest(digest, known):
                holder = (role, label)
        return holder
