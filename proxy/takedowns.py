"""Takedowns and blocklist changes made through the admin API, in force on every replica.

A rights holder's takedown (guideline "Lawfulness": unlawfully retrieved content is removed at
the rights holder's request) blocks a URL, a URL prefix or a domain with reason `takedown`
(451), lists what was fetched that it covers (the manifest, read from the fetch log: before it
was filed, and on a replica it had not reached yet) and collects each team's deletion
confirmation. Blocklist entries added through the API work like the policy's ToS blocklist
(reason `tos_blocklist`) and can be removed again; policy entries cannot.

Where the state lives (the source of truth):

- Embedded mode (no `--redis-url`): `<data-dir>/takedowns.json`, written atomically (temporary
  file, fsync, rename) before the API answers; the replica is the fleet, so a change is in force
  as soon as it is written.
- Shared mode (`--redis-url`): Redis is the source of truth, under `crawlwarden:blockstate:`:
  hashes `takedowns`, `confirmations` and `blocklist` (JSON values; a removed blocklist entry
  stays as a tombstone), and a `version` counter raised by every change in the same MULTI. A
  change is published on `crawlwarden:blockstate:changed`; each replica re-reads the state when
  a message arrives (milliseconds) and, in case one was missed, whenever `version` differs at a
  resync every `resync_interval` seconds. Each replica mirrors the last state it saw in its
  `takedowns.json`: a replica that starts while Redis is unreachable enforces the mirror, and
  whenever Redis lacks an item a replica has seen (nothing is ever deleted: Redis was restarted
  without persistence, flushed, or evicted keys, maybe with a change written since) that
  replica writes its mirror back (HSETNX, tombstones included: the union errs on the side of
  blocking) and logs `takedowns_shared_state_lost`.
- The fetch log is the signed history, not the state: every change is an event record (kind
  `takedown`, `takedown_confirmation`, `blocklist_add`, `blocklist_remove`; `rule` is the
  takedown or entry id, `note` the change as JSON, with who made it). Retention purges old
  records; a takedown stays in force regardless.

Who made a change is the bearer token's role and a fingerprint, `sha256:` plus the first 12 hex
digits of the token's SHA-256 (the start of the policy's `token_sha256`), never the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import unicodedata
import uuid
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy import metrics
from proxy.audit.record import utc_timestamp
from proxy.blocklist import BlockEntry
from proxy.blocklist import Blocklist
from proxy.blocklist import Scope
from proxy.blocklist import normalize_url
from proxy.decision import Reason
from proxy.inputs import canonical_target
from proxy.inputs import check_host
from proxy.inputs import other_readings
from proxy.sites import normalize_host

log = structlog.get_logger("crawlwarden.takedowns")

STATE_FILE = "takedowns.json"
MAX_TARGETS = 1000
MAX_TEXT = 2000
FULL_RESYNC_EVERY = 12  # resyncs: with the default interval, everything is re-read every minute
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"^(?:{_LABEL}\.)+{_LABEL}$")
_TEAM = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class InvalidRequest(ValueError):
    """A request body the API answers with 400; the message names the field."""


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    pass


class StateUnavailable(RuntimeError):
    """The shared store cannot be written: nothing was changed."""


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: the token's role and which of the policy's `admin_tokens` it is (its
    `name`, or `admin_tokens[i]`). Nothing derived from the token: a hash of it, however cut,
    lets anyone who reads the record test guesses offline (admin probe 4)."""

    role: str
    token: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Actor:
        return cls(d["role"], d.get("token_fingerprint") or "unknown")

    def to_dict(self) -> dict[str, str]:
        # Under the key of old, which older replicas read (`Actor(**d)`): a new key would make
        # them drop a takedown filed through a new one during a rolling upgrade. Its value is
        # no hash any more (in state written before, it was a cut SHA-256 of the token).
        return {"role": self.role, "token_fingerprint": self.token}


@dataclass(frozen=True, slots=True)
class Takedown:
    id: str
    filed: str  # RFC 3339 UTC, as a record's ts
    rights_holder: str
    contact: str
    scope: Scope
    targets: tuple[str, ...]  # normalized: hosts for DOMAIN, URLs otherwise
    reason: str
    filed_by: Actor

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "filed": self.filed,
            "rights_holder": self.rights_holder,
            "contact": self.contact,
            "scope": str(self.scope),
            "targets": list(self.targets),
            "reason": self.reason,
            "filed_by": self.filed_by.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Takedown:
        return cls(
            id=d["id"],
            filed=d["filed"],
            rights_holder=d["rights_holder"],
            contact=d["contact"],
            scope=Scope(d["scope"]),
            targets=tuple(d["targets"]),
            reason=d["reason"],
            filed_by=Actor.from_dict(d["filed_by"]),
        )

    def entries(self) -> list[BlockEntry]:
        return [
            BlockEntry(
                self.id,
                self.scope,
                target,
                f"takedown requested by {self.rights_holder}: {self.reason}",
                f"takedown {self.id} filed {self.filed}",
                Reason.TAKEDOWN,
            )
            for target in expand_schemes(self.scope, self.targets)
        ]


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A team's statement that it deleted what a takedown's manifest listed for it."""

    id: str
    takedown: str
    team: str
    deleted: int
    at: str
    by: Actor

    @property
    def key(self) -> str:
        return f"{self.takedown}/{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "takedown": self.takedown,
            "team": self.team,
            "deleted": self.deleted,
            "at": self.at,
            "by": self.by.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Confirmation:
        return cls(
            id=d["id"],
            takedown=d["takedown"],
            team=d["team"],
            deleted=int(d["deleted"]),
            at=d["at"],
            by=Actor.from_dict(d["by"]),
        )


@dataclass(frozen=True, slots=True)
class ApiBlock:
    """A blocklist entry added through the API; `removed` set once it is taken out again."""

    id: str
    added: str
    scope: Scope
    targets: tuple[str, ...]
    reason: str
    source: str
    added_by: Actor
    removed: str | None = None
    removed_by: Actor | None = None

    @property
    def active(self) -> bool:
        return self.removed is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "origin": "api",
            "active": self.active,
            "added": self.added,
            "scope": str(self.scope),
            "targets": list(self.targets),
            "reason": self.reason,
            "source": self.source,
            "added_by": self.added_by.to_dict(),
            "removed": self.removed,
            "removed_by": None if self.removed_by is None else self.removed_by.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ApiBlock:
        return cls(
            id=d["id"],
            added=d["added"],
            scope=Scope(d["scope"]),
            targets=tuple(d["targets"]),
            reason=d["reason"],
            source=d["source"],
            added_by=Actor.from_dict(d["added_by"]),
            removed=d.get("removed"),
            removed_by=Actor.from_dict(d["removed_by"]) if d.get("removed_by") else None,
        )

    def entries(self) -> list[BlockEntry]:
        if not self.active:
            return []
        return [
            BlockEntry(self.id, self.scope, target, self.reason, self.source)
            for target in expand_schemes(self.scope, self.targets)
        ]


# -- request bodies ------------------------------------------------------------------------


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{name}: a non-empty string is required")
    if len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name}: at most {MAX_TEXT} characters")
    return value.strip()


def normalize_target(scope: Scope, target: str) -> str:
    """A domain as a normalized host (a leading "*." dropped: a domain covers its subdomains);
    a URL or prefix as `normalize_url` writes it (http or https only)."""
    text = target.strip()
    if scope is Scope.DOMAIN:
        if "/" in text or ":" in text:
            raise InvalidRequest(
                f"targets: {target!r} is not a domain; use scope url or prefix for URLs"
            )
        try:
            host = normalize_host(text.removeprefix("*."))
        except UnicodeError as e:
            raise InvalidRequest(f"targets: {target!r} is not a valid host name") from e
        if not _HOST.match(host):
            raise InvalidRequest(f"targets: {target!r} is not a domain such as example.com")
        return host
    if any(unicodedata.category(c) == "Cc" for c in text):
        # urlsplit drops tabs and line breaks (WHATWG URL): `/a.jpg\nfoo` would be stored as
        # `/a.jpgfoo`, a URL nobody asked to block.
        raise InvalidRequest(
            f"targets: {target!r} has a control character; percent-encode it (RFC 3986)"
        )
    try:
        parts = urlsplit(text)
        hostname = parts.hostname
        url = normalize_url(text) if parts.scheme.lower() in ("http", "https") and hostname else ""
    except (ValueError, UnicodeError) as e:  # `http://[::1/x`, `http://[a.test]/`, port 99999
        raise InvalidRequest(f"targets: {target!r} is not a valid URL: {e}") from e
    if not url or hostname is None:
        raise InvalidRequest(f"targets: {target!r} is not an http(s) URL")
    # The host as the gateway reads a request's (inputs.check_host): a target whose host no
    # request can have (`exa mple.test`, `0x7f.1`) would block nothing.
    if (problem := check_host(hostname).problem) is not None:
        raise InvalidRequest(f"targets: {target!r} is not a valid URL: {problem}")
    return url


def _scope_and_targets(body: dict[str, Any]) -> tuple[Scope, tuple[str, ...]]:
    try:
        scope = Scope(str(body.get("scope")))
    except ValueError as e:
        raise InvalidRequest("scope: one of url, prefix, domain") from e
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets:
        raise InvalidRequest("targets: a non-empty list of URLs, URL prefixes or domains")
    if len(targets) > MAX_TARGETS:
        raise InvalidRequest(f"targets: at most {MAX_TARGETS} per request")
    if not all(isinstance(t, str) and t.strip() for t in targets):
        raise InvalidRequest("targets: every target is a non-empty string")
    normalized = tuple(dict.fromkeys(normalize_target(scope, t) for t in targets))
    return scope, normalized


def expand_schemes(scope: Scope, targets: Iterable[str]) -> list[str]:
    """A URL or prefix covers the same content over http and https: both are blocked."""
    out: list[str] = []
    for target in targets:
        out.append(target)
        if scope is Scope.DOMAIN:
            continue
        parts = urlsplit(target)
        other = "https" if parts.scheme == "http" else "http"
        twin = normalize_url(urlunsplit((other, parts.netloc, parts.path, parts.query, "")))
        if twin not in out:
            out.append(twin)
    return out


# -- the state -----------------------------------------------------------------------------


@dataclass
class BlockState:
    version: int = 0
    takedowns: dict[str, Takedown] = field(default_factory=dict)
    confirmations: dict[str, Confirmation] = field(default_factory=dict)  # by Confirmation.key
    blocks: dict[str, ApiBlock] = field(default_factory=dict)

    def entries(self) -> list[BlockEntry]:
        out: list[BlockEntry] = []
        for td in sorted(self.takedowns.values(), key=lambda t: (t.filed, t.id)):
            out.extend(td.entries())
        for block in sorted(self.blocks.values(), key=lambda b: (b.added, b.id)):
            out.extend(block.entries())
        return out

    def confirmations_of(self, takedown_id: str) -> list[Confirmation]:
        found = [c for c in self.confirmations.values() if c.takedown == takedown_id]
        return sorted(found, key=lambda c: (c.at, c.id))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "takedowns": {k: v.to_dict() for k, v in self.takedowns.items()},
            "confirmations": {k: v.to_dict() for k, v in self.confirmations.items()},
            "blocklist": {k: v.to_dict() for k, v in self.blocks.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockState:
        return cls(
            version=int(data.get("version", 0)),
            takedowns={k: Takedown.from_dict(v) for k, v in (data.get("takedowns") or {}).items()},
            confirmations={
                k: Confirmation.from_dict(v) for k, v in (data.get("confirmations") or {}).items()
            },
            blocks={k: ApiBlock.from_dict(v) for k, v in (data.get("blocklist") or {}).items()},
        )


def load_state_file(path: Path) -> BlockState:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return BlockState()
    return BlockState.from_json(json.loads(raw))


def save_state_file(path: Path, state: BlockState) -> None:
    """Temporary file, fsync, rename, fsync of the directory: the old or the new state, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(state.to_json(), indent=1, sort_keys=True, ensure_ascii=False)
    with tmp.open("w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


type EventWriter = Callable[..., dict[str, Any]]


class TakedownRegistry:
    """The takedowns and API blocklist entries of a fleet, as one replica sees and changes them.

    `on_change(entries)` receives every blocking entry (takedowns and active API entries) each
    time the state changes; the runtime hands them to `Governor.set_extra_blocks`. `events`
    is `FetchLog.new_event`, so that every change is a signed record.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        redis: Redis | None,
        prefix: str,
        events: EventWriter,
        on_change: Callable[[list[BlockEntry]], None],
        history: Callable[[], Awaitable[BlockState]] | None = None,
        resync_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.path = data_dir / STATE_FILE
        # what the fetch log's change events say (takedowns_history.py): read when this replica
        # finds neither its file nor the fleet's state, which a loss of both looks like
        self.history = history
        self.restored: asyncio.Task[None] | None = None
        self.redis = redis
        self.events = events
        self.on_change = on_change
        self.resync_interval = resync_interval
        self.clock = clock
        self.state = BlockState()
        self.shared_ok = redis is None
        base = f"{prefix}blockstate:"
        self._k_version = base + "version"
        self._k_takedowns = base + "takedowns"
        self._k_confirmations = base + "confirmations"
        self._k_blocks = base + "blocklist"
        self.channel = base + "changed"
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Enforce the local copy at once, then (shared) Redis's state and its changes; when
        neither is there, what the fetch log says (in the background: a large log is not read
        before the replica serves)."""
        had_file = await asyncio.to_thread(self.path.exists)
        try:
            local = await asyncio.to_thread(load_state_file, self.path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("takedowns_state_unreadable", path=str(self.path), error=repr(e))
            local = BlockState()
            had_file = False  # (a file that does not read is lost as much as one not there)
        self._apply(local)
        if self.redis is None:
            if not had_file:
                self._restore_from_history()
            return
        try:
            await asyncio.wait_for(self.sync(), timeout=5.0)
            # Set by the first replica of a fleet, and again after every read of the history:
            # gone, Redis lost its data (a fleet that never filed a takedown has it too).
            if not await self.redis.exists(self._k_version):
                self._restore_from_history()
        except (RedisError, OSError, TimeoutError, ValueError) as e:
            metrics.STORE_ERRORS.labels(store="redis").inc()
            log.error(
                "takedowns_shared_state_unavailable",
                error=repr(e),
                enforcing="the local copy",
                takedowns=len(local.takedowns),
            )
            if not had_file:
                self._restore_from_history()
        self._task = asyncio.create_task(self._follow(), name="takedowns-follow")

    def _restore_from_history(self) -> None:
        if self.history is not None and self.restored is None:
            self.restored = asyncio.create_task(self._restore(), name="takedowns-history")

    async def _restore(self) -> None:
        """Add what the fetch log records and this replica lacks; write it back to Redis."""
        assert self.history is not None
        from proxy.takedowns_history import restore

        try:
            found = await self.history()
        except Exception as e:  # the log may be unreachable now: say so, keep what there is
            log.error("takedowns_history_unreadable", error=repr(e))
            return
        async with self._lock:
            restored = restore(self.state, found)
            if restored:
                log.error(
                    "takedowns_restored_from_fetch_log",
                    takedowns=restored.takedowns,
                    confirmations=restored.confirmations,
                    blocklist=restored.blocklist,
                )
                self._apply(restored.state)
            try:  # (also when nothing was found: the next start need not read the log again)
                await asyncio.to_thread(save_state_file, self.path, self.state)
            except OSError as e:
                log.error("takedowns_state_unwritable", path=str(self.path), error=repr(e))
            if self.redis is None:
                return
            try:
                if restored:
                    await self.sync()  # writes back what Redis lacks (_write_back)
                await self.redis.set(self._k_version, 0, nx=True)
            except (RedisError, OSError, TimeoutError) as e:
                # the next sync writes it back (this replica has it now)
                log.warning("takedowns_write_back_deferred", error=repr(e))

    async def close(self) -> None:
        if self.restored is not None and not self.restored.done():
            self.restored.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.restored
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _apply(self, state: BlockState) -> None:
        self.state = state
        self.on_change(state.entries())

    # -- following the shared state --------------------------------------------------------

    async def _follow(self) -> None:
        """Subscribe, then read the state (so no change between the two is missed); re-read on
        every message; every `resync_interval` seconds compare the version (a missed message),
        and every FULL_RESYNC_EVERY of those re-read everything regardless."""
        assert self.redis is not None
        backoff = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self.sync()
                backoff = 0.5
                next_resync = time.monotonic() + self.resync_interval
                rounds = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        await self.sync()
                    elif time.monotonic() >= next_resync:
                        rounds += 1
                        await self.sync(full=rounds % FULL_RESYNC_EVERY == 0)
                        next_resync = time.monotonic() + self.resync_interval
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever happens (Redis, bad data), keep following
                metrics.STORE_ERRORS.labels(store="redis").inc()
                self.shared_ok = False
                log.warning("takedowns_follow_failed", error=repr(e), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()

    async def _read_shared(self) -> BlockState:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self._k_version)
            pipe.hgetall(self._k_takedowns)
            pipe.hgetall(self._k_confirmations)
            pipe.hgetall(self._k_blocks)
            version, takedowns, confirmations, blocks = await pipe.execute()
        return BlockState(
            version=int(version or 0),
            takedowns=_parse_items(takedowns, Takedown.from_dict),
            confirmations=_parse_items(confirmations, Confirmation.from_dict),
            blocks=_parse_items(blocks, ApiBlock.from_dict),
        )

    async def sync(self, *, full: bool = True) -> None:
        """Make the local state Redis's; first write back what Redis lost of our copy.

        `full=False` first compares the version alone and stops there when it is ours."""
        assert self.redis is not None
        if not full:
            current = await self.redis.get(self._k_version)
            self.shared_ok = True
            if current is not None and int(current) == self.state.version:
                return
        shared = await self._read_shared()
        self.shared_ok = True
        if self._missing_from(shared):
            await self._write_back(shared)
            shared = await self._read_shared()
        if shared.to_json() == self.state.to_json():
            return
        self._apply(shared)
        await asyncio.to_thread(save_state_file, self.path, shared)
        log.info(
            "takedowns_synced",
            version=shared.version,
            takedowns=len(shared.takedowns),
            blocklist=sum(b.active for b in shared.blocks.values()),
        )

    def _missing_from(self, shared: BlockState) -> bool:
        """Whether Redis lacks an item this replica has seen. Nothing is ever deleted (a
        takedown stays, a removed blocklist entry is a tombstone, confirmations accumulate),
        so a missing item means Redis lost data: restarted without persistence, flushed, or
        evicting keys, also when a change has been written to it since (its version then says
        nothing of what it lost)."""
        local = self.state
        return (
            not local.takedowns.keys() <= shared.takedowns.keys()
            or not local.confirmations.keys() <= shared.confirmations.keys()
            or not local.blocks.keys() <= shared.blocks.keys()
        )

    async def _write_back(self, shared: BlockState) -> None:
        """Write the items Redis lost back from this replica's copy (HSETNX: an item Redis has,
        a tombstone say, stays as it is; the union errs on the side of blocking), and raise the
        version so that every replica re-reads."""
        assert self.redis is not None
        local = self.state
        lost = {
            "takedowns": sorted(local.takedowns.keys() - shared.takedowns.keys()),
            "confirmations": len(local.confirmations.keys() - shared.confirmations.keys()),
            "blocklist": sorted(local.blocks.keys() - shared.blocks.keys()),
        }
        metrics.STORE_ERRORS.labels(store="redis").inc()
        log.error("takedowns_shared_state_lost", written_back=lost, version=local.version)
        async with self.redis.pipeline(transaction=True) as pipe:
            for td in local.takedowns.values():
                pipe.hsetnx(self._k_takedowns, td.id, json.dumps(td.to_dict()))
            for c in local.confirmations.values():
                pipe.hsetnx(self._k_confirmations, c.key, json.dumps(c.to_dict()))
            for b in local.blocks.values():
                pipe.hsetnx(self._k_blocks, b.id, json.dumps(b.to_dict()))
            pipe.set(self._k_version, local.version, nx=True)
            pipe.incr(self._k_version)
            *_, version = await pipe.execute()
        await self.redis.publish(self.channel, str(version))

    # -- changes ---------------------------------------------------------------------------

    def _with(self, key: str, field_name: str, value: dict[str, Any], version: int) -> BlockState:
        """The current state with one item written and the version set."""
        state = BlockState.from_json(self.state.to_json())
        state.version = version
        if key == self._k_takedowns:
            state.takedowns[field_name] = Takedown.from_dict(value)
        elif key == self._k_confirmations:
            state.confirmations[field_name] = Confirmation.from_dict(value)
        else:
            state.blocks[field_name] = ApiBlock.from_dict(value)
        return state

    async def _commit(self, key: str, field_name: str, value: dict[str, Any]) -> None:
        """Write one item: to Redis (then everyone re-reads), or to the local file.

        StateUnavailable means nothing was written. Once Redis has the item it is in force for
        the fleet: failures after that (publish, re-read) only delay other replicas until their
        next resync, and this replica applies the item itself.
        """
        if self.redis is None:
            state = self._with(key, field_name, value, self.state.version + 1)
            try:
                await asyncio.to_thread(save_state_file, self.path, state)
            except OSError as e:
                raise StateUnavailable(f"{self.path} cannot be written: {e}") from e
            self._apply(state)
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, field_name, json.dumps(value))
                pipe.incr(self._k_version)
                _, version = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            metrics.STORE_ERRORS.labels(store="redis").inc()
            raise StateUnavailable(f"the shared store (Redis) cannot be written: {e}") from e
        try:
            await self.redis.publish(self.channel, str(version))
            await self.sync()
        except (RedisError, OSError, TimeoutError) as e:
            metrics.STORE_ERRORS.labels(store="redis").inc()
            log.warning("takedowns_publish_failed", error=repr(e), version=int(version))
            state = self._with(key, field_name, value, int(version))
            self._apply(state)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(save_state_file, self.path, state)

    async def file_takedown(self, body: dict[str, Any], by: Actor) -> Takedown:
        scope, targets = _scope_and_targets(body)
        td = Takedown(
            id=_new_id("td"),
            filed=utc_timestamp(self.clock()),
            rights_holder=_text(body, "rights_holder"),
            contact=_text(body, "contact"),
            scope=scope,
            targets=targets,
            reason=_text(body, "reason"),
            filed_by=by,
        )
        async with self._lock:
            await self._commit(self._k_takedowns, td.id, td.to_dict())
            self.events(
                "takedown",
                _note("takedown filed", {"takedown": td.to_dict()}),
                rule=td.id,
            )
        log.info(
            "takedown_filed",
            id=td.id,
            scope=str(scope),
            targets=len(targets),
            by=by.token,
        )
        return td

    async def confirm(self, takedown_id: str, body: dict[str, Any], by: Actor) -> Confirmation:
        if takedown_id not in self.state.takedowns:
            raise NotFound(f"no takedown {takedown_id}")
        team = body.get("team")
        if not isinstance(team, str) or not _TEAM.match(team):
            raise InvalidRequest("team: the team's name, as in the manifest")
        deleted = body.get("deleted")
        if not isinstance(deleted, int) or isinstance(deleted, bool) or deleted < 0:
            raise InvalidRequest("deleted: the number of items deleted, a whole number >= 0")
        c = Confirmation(
            id=_new_id("cf"),
            takedown=takedown_id,
            team=team,
            deleted=deleted,
            at=utc_timestamp(self.clock()),
            by=by,
        )
        async with self._lock:
            await self._commit(self._k_confirmations, c.key, c.to_dict())
            self.events(
                "takedown_confirmation",
                _note("deletion confirmed", {"confirmation": c.to_dict()}),
                rule=takedown_id,
                team=team,
            )
        return c

    async def add_block(self, body: dict[str, Any], by: Actor) -> ApiBlock:
        scope, targets = _scope_and_targets(body)
        block = ApiBlock(
            id=_new_id("bl"),
            added=utc_timestamp(self.clock()),
            scope=scope,
            targets=targets,
            reason=_text(body, "reason"),
            source=_text(body, "source"),
            added_by=by,
        )
        async with self._lock:
            await self._commit(self._k_blocks, block.id, block.to_dict())
            self.events(
                "blocklist_add",
                _note("blocklist entry added", {"entry": block.to_dict()}),
                rule=block.id,
            )
        return block

    async def remove_block(self, block_id: str, by: Actor) -> ApiBlock:
        async with self._lock:
            if self.redis is not None:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await self.sync()
            block = self.state.blocks.get(block_id)
            if block is None:
                raise NotFound(f"no blocklist entry {block_id} was added through the API")
            if not block.active:
                raise Conflict(f"blocklist entry {block_id} was removed at {block.removed}")
            removed = replace(block, removed=utc_timestamp(self.clock()), removed_by=by)
            await self._commit(self._k_blocks, removed.id, removed.to_dict())
            self.events(
                "blocklist_remove",
                _note("blocklist entry removed", {"entry": removed.to_dict()}),
                rule=removed.id,
            )
        return removed


def _parse_items[T](raw: dict[bytes, bytes], parse: Callable[[dict[str, Any]], T]) -> dict[str, T]:
    """Items of a Redis hash; one that does not parse is left out and logged, not fatal."""
    out: dict[str, T] = {}
    for key, value in raw.items():
        name = key.decode(errors="replace")
        try:
            out[name] = parse(json.loads(value))
        except (ValueError, KeyError, TypeError) as e:
            log.error("takedowns_item_unreadable", item=name, error=repr(e))
    return out


def _note(what: str, data: dict[str, Any]) -> str:
    """An event's note: JSON, so an auditor can read the change back out of an export."""
    return json.dumps({"change": what, **data}, sort_keys=True, ensure_ascii=False)


# -- the manifest --------------------------------------------------------------------------

MANIFEST_DECISIONS = frozenset({"forwarded", "withheld"})
MANIFEST_FIELDS = (
    "id",
    "replica",
    "seq",
    "ts",
    "team",
    "project",
    "account",
    "url",
    "decision",
    "status",
    "content_sha256",
)


def covers(takedown: Takedown) -> Callable[[dict[str, Any]], bool]:
    """Whether a fetch record is in a takedown's manifest: a scraper's fetch (kind `fetch`)
    that reached the site (forwarded or withheld; not a robots.txt served from the gateway's
    copy) whose URL the takedown blocks (the same
    Blocklist matching as enforcement, every reading of its path included), whenever it was
    made. Before the takedown was filed, or after it while the takedown was still on its way to
    the replica that forwarded it (or that replica could not reach the shared state): either
    way the team has the content and must delete it. A fetch refused, before or after, took
    nothing and is not listed."""
    match = covering([takedown])
    return lambda rec: bool(match(rec))


def covering(takedowns: Sequence[Takedown]) -> Callable[[dict[str, Any]], list[str]]:
    """The ids of the takedowns (of `takedowns`) whose manifests list a fetch record (see
    `covers`). The record's URL is read once for all of them: read once per takedown, listing
    20 takedowns over 150 000 records took 26 s (a broad-crawl probe)."""
    indexes = [(td.id, Blocklist(td.entries())) for td in takedowns]
    # Most records are covered by none: one lookup in all the takedowns' entries tells.
    anyone = Blocklist([entry for td in takedowns for entry in td.entries()])

    def match(rec: dict[str, Any]) -> list[str]:
        if rec.get("kind", "fetch") != "fetch" or rec.get("decision") not in MANIFEST_DECISIONS:
            return []
        url = rec.get("url") or ""
        parts = urlsplit(url)
        if not parts.hostname:
            return []
        target = canonical_target((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        try:
            origin = normalize_url(urlunsplit((parts.scheme, parts.netloc, "", "", "")))
            url = origin.removesuffix("/") + target
            host = normalize_host(parts.hostname)
            readings = other_readings(target)
            if anyone.match_url(host, url, readings) is None:
                return []
            return [i for i, index in indexes if index.match_url(host, url, readings) is not None]
        except (ValueError, UnicodeError):
            return []

    return match


def hosts_of(takedowns: Sequence[Takedown]) -> tuple[str, ...]:
    """The hosts the takedowns name: every URL their manifests list holds one of them (a
    record's URL is normalized as their targets are; a domain's subdomains end with it)."""
    hosts = {
        target if td.scope is Scope.DOMAIN else urlsplit(target).hostname or ""
        for td in takedowns
        for target in td.targets
    }
    return tuple(sorted(h for h in hosts if h))


def manifest_row(rec: dict[str, Any]) -> dict[str, Any]:
    return {name: rec.get(name) for name in MANIFEST_FIELDS}


def teams_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({r["team"] for r in rows if r.get("team")})
