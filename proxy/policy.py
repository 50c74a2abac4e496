"""The policy file: its schema, validation with field-level errors, and its version.

The keys are the contract of DESIGN.md ("Policy file"). Unknown keys are errors, so a typo never
silently turns a limit off.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from typing import Any
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator
from pydantic import BaseModel
from pydantic import BeforeValidator
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import ValidationInfo
from pydantic import field_validator
from pydantic import model_validator

from proxy import units
from proxy.idn import ascii_host
from proxy.suffixes import public_suffixes

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_MIN_HEADER_BYTES = 4096
_HOST_PATTERN = re.compile(r"^(\*\.)?([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?)+$")


def _rate(value: str) -> str:
    units.parse_rate(value)
    return value


def _duration(value: str | int | float) -> str | int | float:
    units.parse_duration(value)
    return value


def _size(value: str | int) -> str | int:
    units.parse_size(value)
    return value


def _address_text(value: Any) -> Any:
    """Addresses and networks as text only: YAML would otherwise hand over `false` or
    `2130706433`, which the ipaddress constructors take as integers (0.0.0.0, 127.0.0.1)."""
    if not isinstance(value, str):
        raise ValueError("write the address as text, e.g. '10.0.0.0/8' or '192.0.2.7'")
    return value


def _ip_text(parse: Callable[[str], Any], example: str) -> Callable[[Any], Any]:
    """A validator of an address or network given as text, checked here so that a wrong one is
    one error saying why ("has host bits set"), not one per member of the IPv4 | IPv6 union."""

    def check(value: Any) -> Any:
        _address_text(value)
        try:
            parse(value)
        except ValueError as e:
            raise ValueError(f"{e}: write {example}") from None
        return value

    return check


def _timeout(value: str | int | float) -> str | int | float:
    seconds = units.parse_duration(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid timeout {value!r}: must be above 0, e.g. '30s'")
    return value


def _header_limit(value: str | int) -> str | int:
    if units.parse_size(value) < _MIN_HEADER_BYTES:
        raise ValueError(f"{value!r} is too small: ordinary requests need at least 4KiB")
    return value


def _host_pattern(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not value.isascii():
        wildcard, name = ("*.", value[2:]) if value.startswith("*.") else ("", value)
        try:
            value = wildcard + ascii_host(name)
        except UnicodeError as e:
            raise ValueError(f"{value!r} is not a valid host name") from e
    if not _HOST_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a host name or '*.' plus a host name")
    if value.rpartition(".")[2].isdigit() and not _is_ipv4(value):
        # The gateway refuses such hosts (`2130706433`, `127.1`: other spellings of an address).
        raise ValueError(f"{value!r} is neither a host name nor an IPv4 address a.b.c.d")
    return value


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _site_pattern(value: str) -> str:
    """A site rule's pattern: a host pattern that does not span a public suffix."""
    if value.startswith("*.") and public_suffixes().is_public(value[2:]):
        raise ValueError(
            f"{value!r} covers every domain under the public suffix {value[2:]!r}: they would "
            "all be one site, one budget; name the domains"
        )
    return value


def _block_pattern(value: str) -> str:
    """A blocklist entry: a domain (with its subdomains) or an http(s) URL prefix."""
    if value.strip().lower().startswith(("http://", "https://")):
        value = value.strip()
        if not re.match(r"^https?://[^/\s?#]+", value, re.IGNORECASE):
            raise ValueError(f"{value!r} is not a URL prefix")
        return value
    return _host_pattern(value)


RateText = Annotated[str, AfterValidator(_rate)]


def _not_bool(example: str) -> Callable[[Any], Any]:
    """YAML `true` would pass as the number 1 (a 1-byte quota, a 1-second delay): refused,
    with an example of what the field takes."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a quantity: write e.g. {example}")
        return value

    return check


def _not_bool_count(value: Any) -> Any:
    # YAML `true`/`yes` would pass as the number 1 (a quota of one, records kept one day).
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number: write e.g. 1000")
    return value


Positive = Annotated[int, BeforeValidator(_not_bool_count), Field(ge=1)]
Count = Annotated[int, BeforeValidator(_not_bool_count), Field(ge=0)]
DurationText = Annotated[
    str | int | float, BeforeValidator(_not_bool("'10s'")), AfterValidator(_duration)
]
SizeText = Annotated[str | int, BeforeValidator(_not_bool("'500MB'")), AfterValidator(_size)]
TimeoutText = Annotated[str | int | float, AfterValidator(_timeout)]
HeaderLimitText = Annotated[str | int, AfterValidator(_header_limit)]


def _spool_limit(value: str | int) -> str | int:
    if units.parse_size(value) == 0:
        raise ValueError(
            "0 would refuse every request (503 audit_unavailable: the spool is always past it); "
            "it does not mean no limit. Give the disk the spool may take while the store is away, "
            "e.g. '1GB'"
        )
    return value


SpoolLimitText = Annotated[SizeText, AfterValidator(_spool_limit)]
NetworkText = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(_ip_text(ipaddress.ip_network, "a network, e.g. '10.0.0.0/8' or 'fd00::/8'")),
]
AddressText = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    BeforeValidator(
        _ip_text(ipaddress.ip_address, "an address, e.g. '192.0.2.7' or '2001:db8::7'")
    ),
]
HostPattern = Annotated[str, AfterValidator(_host_pattern)]
SitePattern = Annotated[str, AfterValidator(_host_pattern), AfterValidator(_site_pattern)]
BlockPattern = Annotated[str, AfterValidator(_block_pattern)]
NonEmpty = Annotated[str, Field(min_length=1)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Crawler(Model):
    user_agent: NonEmpty
    robots_tokens: list[NonEmpty] = Field(min_length=1)
    contact: str

    @field_validator("contact")
    @classmethod
    def _contact(cls, v: str) -> str:
        if not _EMAIL.match(v):
            raise ValueError("must be an e-mail address (sent upstream as From:)")
        return v

    @field_validator("user_agent")
    @classmethod
    def _user_agent(cls, v: str) -> str:
        if any(c in v for c in "\r\n\0"):
            raise ValueError("must be a single line")
        return v


class UpstreamProxy(Model):
    name: NonEmpty
    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+:\d+/?$", v):
            raise ValueError("must be http://host:port or https://host:port")
        try:
            host = urlsplit(v).hostname
        except ValueError:
            host = None  # a bracket left open: urllib refuses it
        if not host:
            raise ValueError("must be http://host:port or https://host:port")
        try:
            port = urlsplit(v).port
        except ValueError:
            port = None  # out of range: urllib refuses it
        if not port:
            raise ValueError("the port must be 1 to 65535")
        return v

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port


class Egress(Model):
    provider: NonEmpty
    public_ips: list[AddressText] = []
    upstream_proxies: list[UpstreamProxy] = []

    @model_validator(mode="after")
    def _unique_names(self) -> Egress:
        names = [p.name for p in self.upstream_proxies]
        if len(names) != len(set(names)):
            raise ValueError("upstream_proxies: names must be unique")
        return self


class Secret(Model):
    """A token given as its SHA-256 (hex) or as the name of an environment variable."""

    token_sha256: str | None = None
    token_env: str | None = None

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v):
            raise ValueError("must be 64 lower-case hex digits (sha256sum of the token)")
        return v

    @field_validator("token_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be an environment variable name")
        return v

    @model_validator(mode="after")
    def _exactly_one(self, info: ValidationInfo) -> Secret:
        if (self.token_sha256 is None) == (self.token_env is None):
            raise ValueError("give exactly one of token_sha256 or token_env")
        # `policy check --no-file-checks` (a policy checked away from the gateway, where its
        # secrets are not set) validates with read_env False: the variable is not looked at.
        read_env = (info.context or {}).get("read_env", True)
        if read_env and self.token_env is not None and not os.environ.get(self.token_env):
            raise ValueError(f"environment variable {self.token_env} is not set or empty")
        return self

    def token_digest(self) -> bytes:
        """The SHA-256 of the token, resolved from the environment when needed."""
        if self.token_sha256 is not None:
            return bytes.fromhex(self.token_sha256)
        assert self.token_env is not None
        return hashlib.sha256(os.environ[self.token_env].encode()).digest()


class Team(Secret):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    projects: list[NonEmpty] = []
    upstream_proxy: str | None = None


class AdminToken(Secret):
    # `metrics`: reads /metrics only; with one in the policy, /metrics needs a token (this,
    # an auditor's or an admin's) and is no longer public
    role: Literal["admin", "auditor", "metrics"]
    # Who holds it, as records of what it did name them (`filed_by.token_fingerprint`);
    # without a name, its place in the list (`admin_tokens[0]`). Never derived from the token.
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.@+-]+$")] | None = None


class Respect(Model):
    robots: bool = True
    tdmrep: bool = True
    noai: bool = True
    content_usage: bool = True
    image_metadata: bool = True


class RespectOverride(Model):
    robots: bool | None = None
    tdmrep: bool | None = None
    noai: bool | None = None
    content_usage: bool | None = None
    image_metadata: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """A flag left out takes the default's; `null` would say the same, silently."""
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None:
                    raise ValueError(
                        f"{key}: null is not a value here; write true or false, or leave the "
                        "key out for the default's"
                    )
        return data


def _day(value: Any) -> Any:
    """A licence's last day, as a date: not a number (pydantic takes it for a Unix timestamp),
    nor a time (one with an offset was cut to its local day)."""
    if value is None or (isinstance(value, dt.date) and not isinstance(value, dt.datetime)):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        return value.strip()
    raise ValueError(f"{value!r} is not a date: write the last day it is in force, YYYY-MM-DD")


class LegalBasis(Model):
    kind: Literal["licence", "tdm_exception", "research_exception", "consent", "public_domain"]
    ref: NonEmpty
    expires: Annotated[dt.date | None, BeforeValidator(_day)] = None

    @model_validator(mode="after")
    def _licence_ref(self) -> LegalBasis:
        if self.expires is not None and self.kind not in ("licence", "consent"):
            raise ValueError("expires applies to a licence or consent only")
        return self


class Defaults(Model):
    rate: RateText = "1/s"
    burst: Positive = 1
    max_concurrency: Positive = 2
    requests_per_day: Count | None = 5000
    requests_per_month: Count | None = 50000
    bytes_per_day: SizeText | None = "500MB"
    on_exceed: Literal["reject", "delay"] = "reject"
    max_delay: DurationText = "10s"
    fail_mode: Literal["closed", "local"] = "closed"
    # Shared mode: a request may go before Redis has answered when this replica's view of the
    # site, a moment old, shows its budgets far from their limits (README, "Budgets"); false:
    # every request waits for Redis's answer.
    admit_ahead: bool = True
    respect: Respect = Respect()
    legal_basis: LegalBasis = LegalBasis(kind="tdm_exception", ref="DSM Art. 4")


# The basis when the policy's own has expired (a `defaults` licence past its date): the text and
# data mining exception, under which every opt-out binds.
STATUTORY_BASIS = LegalBasis(kind="tdm_exception", ref="DSM Art. 4")


def _site_id(value: str) -> str:
    if "." in value:
        raise ValueError(
            f"{value!r} has a dot: a site id is a budget and record key, and one with a dot "
            "could be a domain's own (a request to that domain would share this rule's budget); "
            f"write e.g. {value.replace('.', '-')!r}"
        )
    return value


class SiteRule(Model):
    id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_site_id)]
    match: list[SitePattern] = Field(min_length=1)
    rate: RateText | None = None
    burst: Positive | None = None
    max_concurrency: Positive | None = None
    requests_per_day: Count | None = None
    requests_per_month: Count | None = None
    bytes_per_day: SizeText | None = None
    on_exceed: Literal["reject", "delay"] | None = None
    max_delay: DurationText | None = None
    fail_mode: Literal["closed", "local"] | None = None
    admit_ahead: bool | None = None
    respect: RespectOverride = RespectOverride()
    legal_basis: LegalBasis | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings this rule gives (besides id, match and respect), each overriding the
        default's: every key it sets, a quota's `null` (no limit) included."""
        return {
            name: value
            for name, value in self
            if name not in ("id", "match", "respect")
            and (value is not None or name in self.model_fields_set)
        }

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """`null` means unlimited for a quota, as in `defaults`; anywhere else it would mean
        nothing (the default applies): an error, not a silent no-op."""
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key not in UNLIMITED_WHEN_NULL:
                    raise ValueError(
                        f"{key}: null is not a value here; write one, or leave the key out for "
                        "the default's"
                    )
        return data


# Site rule keys whose `null` means "no limit" (each a quota): given explicitly, they override
# the default's limit; any other key left out (or absent) takes the default's value.
UNLIMITED_WHEN_NULL = frozenset({"requests_per_day", "requests_per_month", "bytes_per_day"})


class BlocklistEntry(Model):
    id: Annotated[str, Field(min_length=1)]
    match: list[BlockPattern] = Field(min_length=1)
    reason: NonEmpty
    source: NonEmpty


class Network(Model):
    allow_private: list[NetworkText] = []
    # Targets named by an IP address (`http://203.0.113.5/a.jpg`) are refused unless in one of
    # these networks: a site's budget, blocklist entries and takedowns are kept by its name, and
    # its server usually answers for it under its address too.
    allow_ip_literals: list[NetworkText] = []
    static_hosts: dict[HostPattern, AddressText] = {}
    # mitmproxy has no per-request timeouts; addons/http_guard.py imposes these.
    connect_timeout: TimeoutText = "10s"  # TCP connect to a site or upstream proxy
    response_timeout: TimeoutText = "30s"  # the longest a site may stay silent mid-exchange
    transfer_timeout: TimeoutText = "5m"  # request complete to response complete
    idle_client_timeout: TimeoutText = "60s"  # a client with no request in flight is closed
    max_request_header_bytes: HeaderLimitText = "64KiB"
    max_request_body_bytes: SizeText = "1MiB"


class Retention(Model):
    fetch_records_days: Positive = 400


class Audit(Model):
    signing_key_file: str | None = None
    checkpoint_every_records: Positive = 1000
    checkpoint_every_seconds: Annotated[
        float, BeforeValidator(_not_bool_count), Field(gt=0, allow_inf_nan=False)
    ] = 60
    spool_max_bytes: SpoolLimitText = "1GB"


class Policy(Model):
    version: Literal[1]
    crawler: Crawler
    egress: Egress
    teams: list[Team] = Field(min_length=1)
    admin_tokens: list[AdminToken] = []
    defaults: Defaults = Defaults()
    sites: list[SiteRule] = []
    blocklist: list[BlocklistEntry] = []
    network: Network = Network()
    retention: Retention = Retention()
    audit: Audit = Audit()


def cross_section_errors(
    data: dict[str, Any], *, read_env: bool = True
) -> list[tuple[tuple[Any, ...], str]]:
    """What no single field shows, each at the path it is about: ids and names given twice,
    a token that would authenticate as two callers, a site pattern another rule already takes,
    a proxy nobody defines, a static host written twice. Reads the raw document, tolerating
    what field validation refuses, so that every error is reported in one run."""
    errors: list[tuple[tuple[Any, ...], str]] = []

    def items(key: str) -> list[tuple[int, dict[str, Any]]]:
        value = data.get(key)
        if not isinstance(value, list):
            return []
        return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]

    def unique(key: str, field: str, what: str) -> None:
        first: dict[Any, int] = {}
        for i, item in items(key):
            value = item.get(field)
            if not isinstance(value, str):
                continue
            if value in first:
                errors.append(((key, i, field), f"{what} {value!r} is also {key}.{first[value]}'s"))
            else:
                first[value] = i

    unique("teams", "name", "the name")
    unique("sites", "id", "the id")
    unique("blocklist", "id", "the id")

    # A token is who the caller is: one that is two callers' would record one as the other.
    holders: dict[str, tuple[Any, ...]] = {}
    for key in ("teams", "admin_tokens"):
        for i, item in items(key):
            for field in ("token_sha256", "token_env"):
                value = item.get(field)
                if not isinstance(value, str):
                    continue
                digest = _token_identity(field, value, read_env=read_env)
                if digest is None:
                    continue
                if digest in holders:
                    other = ".".join(map(str, holders[digest]))
                    errors.append(
                        (
                            (key, i, field),
                            f"the same token as {other}: a token must name one caller "
                            "(its fetches would be recorded under either)",
                        )
                    )
                else:
                    holders[digest] = (key, i)

    taken: dict[str, tuple[int, Any]] = {}
    for i, rule in items("sites"):
        patterns = rule.get("match")
        for k, raw in enumerate(patterns if isinstance(patterns, list) else []):
            if not isinstance(raw, str):
                continue
            try:
                pattern = _host_pattern(raw)
            except ValueError:
                continue  # the field's own error
            if pattern in taken and taken[pattern][0] != i:
                j, rid = taken[pattern]
                errors.append(
                    (
                        ("sites", i, "match", k),
                        f"{pattern!r} is also sites.{j} ({rid})'s, which takes it: this "
                        "pattern never applies here",
                    )
                )
            else:
                taken.setdefault(pattern, (i, rule.get("id")))

    egress = data.get("egress")
    proxies = egress.get("upstream_proxies") if isinstance(egress, dict) else None
    names = {
        p["name"]
        for p in (proxies if isinstance(proxies, list) else [])
        if isinstance(p, dict) and isinstance(p.get("name"), str)
    }
    for i, team in items("teams"):
        pinned = team.get("upstream_proxy")
        if isinstance(pinned, str) and pinned not in names:
            errors.append(
                (
                    ("teams", i, "upstream_proxy"),
                    f"team {team.get('name')!r} is pinned to upstream proxy {pinned!r}, which "
                    "egress.upstream_proxies does not define",
                )
            )

    network = data.get("network")
    hosts = network.get("static_hosts") if isinstance(network, dict) else None
    if isinstance(hosts, dict):
        seen: dict[str, str] = {}
        for raw in hosts:
            if not isinstance(raw, str):
                continue
            try:
                name = _host_pattern(raw)
            except ValueError:
                continue
            if name in seen:
                errors.append(
                    (
                        ("network", "static_hosts", raw),
                        f"the same host as {seen[name]!r} (names are case-insensitive)",
                    )
                )
            else:
                seen[name] = raw
    return errors


def _token_identity(field: str, value: str, *, read_env: bool = True) -> str | None:
    """What makes two token entries the same token: their SHA-256 (from the environment for
    token_env, or the variable's name if it is not set, that being the field's own error, or if
    the environment is not to be read)."""
    if field == "token_sha256":
        return value.lower()
    secret = os.environ.get(value) if read_env else None
    if not secret:
        return f"env:{value}"
    return hashlib.sha256(secret.encode()).hexdigest()


# -- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyError:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        """One line (`policy check` prints one per error): a key written with a line break or
        another control character in it is shown escaped."""
        where = f" (line {self.line})" if self.line else ""
        return f"{_one_line(self.path) or '(policy)'}: {_one_line(self.message)}{where}"


def _one_line(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class InvalidPolicy(Exception):
    def __init__(self, source: str, errors: list[PolicyError]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(map(str, errors)))


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    version: str
    source: str
    # What is valid but likely not what was meant (`policy check` prints them, a start or a
    # reload logs them): an expired licence, a quota of 0.
    warnings: tuple[PolicyError, ...] = ()


def canonical_version(policy: Policy) -> str:
    """SHA-256 of the canonical form: sorted keys, no whitespace, defaults filled in."""
    data = policy.model_dump(mode="json")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_policy(
    path: str | Path, *, check_files: bool = False, read_env: bool = True
) -> LoadedPolicy:
    """The policy in `path`, or InvalidPolicy with every error. `check_files` also reads the files
    it names, as this machine sees them (see `file_errors`); `read_env` False leaves the token
    environment variables (`token_env`) unread: unset or equal, they are no error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidPolicy(str(path), [PolicyError("", f"cannot read file: {e.strerror}")]) from e
    except UnicodeDecodeError as e:
        raise InvalidPolicy(str(path), [PolicyError("", "file is not UTF-8")]) from e
    return parse_policy(text, source=str(path), check_files=check_files, read_env=read_env)


def file_errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """What is wrong with the files the policy names, here and now: the signing key a gateway
    reads at start. `policy check` and a reload report it, since the same policy makes the next
    start exit 2 (in Kubernetes, the next pod restart crash-loops). Read from the document as
    written, so that it is reported with the policy's other errors. Relative paths are taken
    from the working directory, as the gateway takes them."""
    from proxy.audit.keys import SigningKeyError
    from proxy.audit.keys import read_private_key

    audit = data.get("audit")
    key_file = audit.get("signing_key_file") if isinstance(audit, dict) else None
    if not key_file or not isinstance(key_file, str):  # (one that is no text: a field error)
        return []
    try:
        read_private_key(Path(key_file))
    except SigningKeyError as e:
        return [(("audit", "signing_key_file"), str(e))]
    return []


def _compose_and_construct(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for the lines of errors) and its data, from one parse (two
    parses made a policy of 2 000 rules take seconds to check and to reload)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def parse_policy(
    text: str, source: str = "<policy>", *, check_files: bool = False, read_env: bool = True
) -> LoadedPolicy:
    try:
        node, data = _compose_and_construct(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
            line = text.count("\n", 0, e.position) + 1
            char = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "?")
            problem = f"character U+{char:04X} is not allowed"
        problem = " ".join(str(problem).split())  # one line per error (`policy check`)
        raise InvalidPolicy(source, [PolicyError("", f"not valid YAML: {problem}", line)]) from e
    except RecursionError as e:  # PyYAML composes recursively: "[[[[..." runs out of stack
        raise InvalidPolicy(source, [PolicyError("", "not valid YAML: nested too deeply")]) from e
    if not isinstance(data, dict):
        raise InvalidPolicy(source, [PolicyError("", "the policy must be a YAML mapping")])
    # Every error in one run: keys written twice (a limit written twice is a mistake to show,
    # not one to resolve silently), the fields', and those across sections; by line.
    lines, booleans, errors = _map_document(node)
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data, context={"read_env": read_env})
    except ValidationError as e:
        errors += _errors(e, lines, booleans)
    for loc, message in cross_section_errors(data, read_env=read_env):
        errors.append(PolicyError(".".join(map(str, loc)), message, _line_of(loc, lines)))
    if check_files:
        for loc, message in file_errors(data):
            errors.append(PolicyError(".".join(map(str, loc)), message, _line_of(loc, lines)))
    if errors or policy is None:
        errors.sort(key=lambda e: (e.line is None, e.line or 0))
        raise InvalidPolicy(source, errors)
    warnings = [
        PolicyError(".".join(map(str, loc)), message, _line_of(loc, lines))
        for loc, message in policy_warnings(policy)
    ]
    return LoadedPolicy(
        policy=policy, version=canonical_version(policy), source=source, warnings=tuple(warnings)
    )


def policy_warnings(
    policy: Policy, today: dt.date | None = None
) -> list[tuple[tuple[Any, ...], str]]:
    """Valid settings that likely do not do what was meant, as of `today` (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    out: list[tuple[tuple[Any, ...], str]] = []
    where: list[tuple[tuple[Any, ...], Defaults | SiteRule]] = [(("defaults",), policy.defaults)]
    where += [(("sites", i), rule) for i, rule in enumerate(policy.sites)]
    defaults_basis = policy.defaults.legal_basis
    defaults_expired = defaults_basis.expires is not None and defaults_basis.expires < today
    for loc, terms in where:
        basis = terms.legal_basis
        if basis is not None and basis.expires is not None and basis.expires < today:
            # As Site.terms_on falls back: to the defaults' basis unless it has expired too.
            fallback = (
                "the statutory TDM exception, every signal respected, applies"
                if loc == ("defaults",) or defaults_expired
                else "the defaults' basis and signals apply"
            )
            out.append(
                (
                    (*loc, "legal_basis", "expires"),
                    f"the {basis.kind} {basis.ref!r} expired on {basis.expires}: {fallback} "
                    "instead",
                )
            )
        if isinstance(terms, SiteRule):
            out += [((*loc, "match", k), m) for k, m in _idle_patterns(terms, policy.network)]
            out += [((*loc, "match", k), m) for k, m in _under_a_wildcard(terms, policy.sites)]
        for quota in ("requests_per_day", "requests_per_month", "bytes_per_day"):
            value = getattr(terms, quota)
            if (
                value is not None
                and (units.parse_size(value) if quota == "bytes_per_day" else value) == 0
            ):
                out.append(
                    (
                        (*loc, quota),
                        "0 refuses every request (429); to refuse a site for good, use the "
                        "blocklist, which records why",
                    )
                )
    return out


def _under_a_wildcard(rule: SiteRule, rules: list[SiteRule]) -> list[tuple[int, str]]:
    """A host a rule names that another rule's `*.` pattern also gives, where the rule sets no
    terms of its own: the hosts beneath it take the `*.` rule's legal basis and opt-outs, the
    host itself the defaults' (a review found `noai` honoured beneath it and not on it)."""
    if rule.legal_basis is not None or rule.respect.model_fields_set:
        return []
    out = []
    for k, pattern in enumerate(rule.match):
        if pattern.startswith("*."):
            continue
        for other in rules:
            covering = [
                p
                for p in other.match
                if other is not rule
                and p.startswith("*.")
                and (pattern == p[2:] or pattern.endswith(p[1:]))
            ]
            if covering:
                out.append(
                    (
                        k,
                        f"{pattern} is also under {covering[0]} (site {other.id}): the hosts "
                        f"beneath {pattern} take that rule's legal basis and opt-outs, {pattern} "
                        "itself the defaults' (this rule sets neither): set legal_basis and "
                        "respect here to give it the same",
                    )
                )
                break
    return out


def _idle_patterns(rule: SiteRule, network: Network) -> list[tuple[int, str]]:
    """A site rule's patterns that take no site: a public suffix by name (`co.uk`: the domains
    under it are each their own site) and an address the gateway refuses to be named by."""
    out = []
    for k, pattern in enumerate(rule.match):
        if _is_ipv4(pattern):
            address = ipaddress.IPv4Address(pattern)
            if not any(address in net for net in network.allow_ip_literals):
                out.append(
                    (
                        k,
                        f"requests naming {pattern} are refused (ip_literal) unless "
                        "network.allow_ip_literals admits it: this pattern takes none",
                    )
                )
        # Suffixes the list names (`com`, `co.uk`, `github.io`), not a single label it does not
        # know (`intranet`, which is a site of its own).
        elif not pattern.startswith("*.") and public_suffixes().is_public(
            pattern, accept_unknown=False
        ):
            out.append(
                (
                    k,
                    f"{pattern!r} is a public suffix: this takes that host only, not the domains "
                    "under it (each is its own site); name them",
                )
            )
    return out


def _errors(
    exc: ValidationError,
    lines: dict[tuple[Any, ...], int],
    booleans: dict[tuple[Any, ...], str],
) -> list[PolicyError]:
    # A value that fits no member of a union gets an error per member, at one place: they are
    # one mistake, so one line ("Input should be a valid string, integer or number").
    # Only a union's errors (their raw place names the member) are merged; any other error is
    # a line of its own.
    by_place: dict[tuple[tuple[Any, ...], int | None], list[str]] = {}
    missing: set[tuple[Any, ...]] = set()
    for n, err in enumerate(exc.errors(include_url=False)):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required, and missing"
            missing.add(loc)
        elif isinstance(err["input"], bool) and loc in booleans:
            message = _as_written(message, err["input"], booleans[loc])
        messages = by_place.setdefault((loc, None if len(loc) < len(err["loc"]) else n), [])
        if message not in messages:
            messages.append(message)
    return [
        PolicyError(
            ".".join(map(str, loc)),
            _one_message(messages),
            # A missing key is at its parent's line (the document's first, for a section).
            _line_of(loc, lines, root=loc in missing),
        )
        for (loc, _), messages in by_place.items()
    ]


def _as_written(message: str, value: bool, written: str) -> str:
    """`message` about a YAML boolean, naming it as the policy wrote it: `burst: yes` is a
    boolean to YAML 1.1 (so are no, on, off, y, n), and "True is not a number" named a value
    nobody wrote."""
    said = written if written.lower() in ("true", "false") else f"{written} (read as a boolean)"
    if message.startswith(f"{value!r} "):
        return said + message.removeprefix(repr(value))
    if written.lower() in ("true", "false"):
        return message
    if "valid string" in message:  # quoted, it is the text
        return f"{message} ({written} was read as a boolean: write '{written}' for the text)"
    return f"{message} ({written} was read as a boolean)"


def _one_message(messages: list[str]) -> str:
    if len(messages) == 1:
        return messages[0]
    prefix = "Input should be a valid "
    if all(m.startswith(prefix) for m in messages):
        kinds = [m.removeprefix(prefix) for m in messages]
        return prefix + ", ".join(kinds[:-1]) + " or " + kinds[-1]
    return "; or ".join(messages)


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the union member's type name into the location ("int", "str", ...).
    return isinstance(part, str) and (
        "[" in part or part in {"str", "int", "float", "bool", "IPv4Address", "IPv6Address"}
    )


def _line_of(
    loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int], *, root: bool = False
) -> int | None:
    """The line of `loc`, or of the nearest place above it the document has; `root` lets that be
    the document itself (its first line), for a key missing at the top."""
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(()) if root else None


def _map_document(
    node: yaml.Node | None,
) -> tuple[dict[tuple[Any, ...], int], dict[tuple[Any, ...], str], list[PolicyError]]:
    """One walk of the YAML document: the 1-based line of each key path, the text of each value
    YAML read as a boolean (`yes`, `on`...: errors name it as written), and every key that
    appears twice in its mapping (YAML would silently keep the last one)."""
    lines: dict[tuple[Any, ...], int] = {}
    booleans: dict[tuple[Any, ...], str] = {}
    duplicates: list[PolicyError] = []

    def walk(n: yaml.Node, path: tuple[Any, ...]) -> None:
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.ScalarNode) and n.tag == "tag:yaml.org,2002:bool":
            booleans[path] = n.value
        elif isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in n.value:
                child = (*path, key.value)
                if key.value in seen:
                    duplicates.append(
                        PolicyError(
                            ".".join(map(str, child)),
                            "key appears twice in its mapping",
                            key.start_mark.line + 1,
                        )
                    )
                seen.add(key.value)
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    return lines, booleans, duplicates
