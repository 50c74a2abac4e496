"""One gateway replica's state, shared by the proxy addon and the admin API.

Holds the policy in force (swapped atomically on reload), the governor, the fetch log and the
settings from the command line. Knows nothing of mitmproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import socket
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from redis.asyncio import Redis

from proxy import inputs
from proxy import metrics
from proxy import takedowns_history
from proxy.audit.keys import SigningKeyError
from proxy.audit.keys import load_signer
from proxy.audit.keys import read_private_key
from proxy.audit.log import FetchLog
from proxy.audit.log import FetchStore
from proxy.audit.query import RecordQuery
from proxy.audit.record import FetchRecord
from proxy.audit.record import utc_timestamp
from proxy.audit.sqlite_store import SQLiteStore
from proxy.audit.store import KeyGoneBack
from proxy.audit.store import ReplicaInUse
from proxy.blocklist import normalize_url
from proxy.budgets import Admission
from proxy.budgets import BudgetEngine
from proxy.budgets import BudgetStore
from proxy.budgets import MemoryBudgetStore
from proxy.budgets import RedisBudgetStore
from proxy.budgets import saved
from proxy.budgets.memory import wall_clock_us
from proxy.counting import Counting
from proxy.decision import Outcome
from proxy.decision import Reason
from proxy.governor import CompiledPolicy
from proxy.governor import Governor
from proxy.governor import RequestContext
from proxy.governor import compile_policy
from proxy.optout_checks import OptOutChecks
from proxy.originfiles import FetchRefused
from proxy.originfiles import OriginFetch
from proxy.originfiles import OriginFileCache
from proxy.originfiles import RedisCache
from proxy.originfiles import TargetRefusal
from proxy.originfiles import origin_of
from proxy.policy import InvalidPolicy
from proxy.policy import LoadedPolicy
from proxy.policy import PolicyError
from proxy.policy import load_policy
from proxy.record_source import RecordSource
from proxy.replicas import ReplicaRegistry
from proxy.sites import normalize_host
from proxy.ssrf import OwnListeners
from proxy.takedowns import BlockState
from proxy.takedowns import TakedownRegistry
from proxy.units import parse_size

log = structlog.get_logger("crawlwarden")

# Every key crawlwarden keeps in Redis starts with this; tests give each gateway fleet its own
# Redis server, so the prefix need not vary.
REDIS_PREFIX = "crawlwarden:"


@dataclass(frozen=True)
class Settings:
    """`crawlwarden run` options (each also CRAWLWARDEN_<FLAG> in the environment)."""

    policy_file: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    redis_url: str | None = None
    audit_dsn: str | None = None
    data_dir: Path = Path(".crawlwarden")
    replica_id: str = ""
    upstream_trusted_ca: Path | None = None
    drain_seconds: float = 30.0
    fleet_size: int = 1  # the fewest replicas assumed for `fail_mode: local` shares

    @property
    def replica(self) -> str:
        return self.replica_id or socket.gethostname()

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "fetchlog.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool" / self.replica


# Origins whose robots.txt Crawl-delay a replica keeps for its sites' rates, as bounded as the
# budget engine's other per-site tables (50 000 sites): past it all are forgotten, and set again
# from each origin's parsed robots.txt before its next request is admitted.
MAX_CRAWL_DELAY_ORIGINS = 50_000
# Sites whose last own read (robots.txt, tdmrep.json) is kept, to say so in a rate refusal
MAX_OWN_READS_TRACKED = 50_000


def _save(path: Path, sites: Sequence[tuple[str, saved.SiteCounts]], now_us: int) -> None:
    saved.write(path, saved.dump(sites, now_us))


class FetchLogUnavailable(Exception):
    """The fetch log's store cannot be opened at start-up."""


class Runtime:
    def __init__(self, settings: Settings, compiled: CompiledPolicy):
        self.settings = settings
        self.replica = settings.replica
        self.governor = Governor(compiled)
        self.governor.own_listeners = OwnListeners(
            [
                (settings.listen_host, settings.listen_port, "proxy port"),
                (settings.admin_host, settings.admin_port, "admin API port"),
            ]
        )
        policy = compiled.loaded.policy
        self.fetch_log = FetchLog(
            self._make_store(),
            settings.spool_dir,
            self.replica,
            spool_max_bytes=_spool_limit(compiled),
            signer=load_signer(
                policy.audit.signing_key_file,
                settings.data_dir,
                shared_store=bool(settings.audit_dsn),
            ),
            checkpoint_every_records=policy.audit.checkpoint_every_records,
            checkpoint_every_seconds=policy.audit.checkpoint_every_seconds,
            retention_days=policy.retention.fetch_records_days,
        )
        self.site_labels = metrics.SiteLabels(compiled.sites.rule_ids())
        # Shared state: one Redis client for the origin-file cache and the replica registry;
        # the budget store keeps its own pool (its timeouts are short on purpose).
        self.redis: Redis | None = None
        cache: OriginFileCache | None = None
        budget_store: BudgetStore
        if settings.redis_url:
            self.redis = Redis.from_url(
                settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
            )
            cache = RedisCache(self.redis, prefix=f"{REDIS_PREFIX}originfile:")
            budget_store = RedisBudgetStore(settings.redis_url, key_prefix=f"{REDIS_PREFIX}b:")
        else:
            budget_store = MemoryBudgetStore()
        # Embedded mode: its counts kept in the data dir across restarts (proxy/budgets/saved.py).
        self._counts = budget_store if isinstance(budget_store, MemoryBudgetStore) else None
        self._counts_saving: asyncio.Task[None] | None = None
        self._saving_now: asyncio.Future[None] | None = None  # the save under way, if any
        self._own_reads: dict[str, float] = {}  # site key -> when its own read was admitted
        self.budgets = BudgetEngine(
            budget_store,
            site_label=lambda key: self.site_labels.label(key),
            site_label_held=lambda key: self.site_labels.peek(key),
        )
        self.replicas = ReplicaRegistry(
            self.redis, self.replica, self.budgets, REDIS_PREFIX, fleet_size=settings.fleet_size
        )
        # The usage counts and reports under way (one per team, one report; fleet-wide).
        self.counting = Counting(self.redis, f"{REDIS_PREFIX}counting:")
        # Takedowns and API blocklist entries, shared through Redis (proxy/takedowns.py).
        self.takedowns = TakedownRegistry(
            settings.data_dir,
            redis=self.redis,
            prefix=REDIS_PREFIX,
            events=self.fetch_log.new_event,
            on_change=self.governor.set_extra_blocks,
            history=self._takedown_history,
        )
        self.optouts = OptOutChecks(
            policy.crawler,
            compiled.resolver,
            compiled.guard,
            cache=cache,
            cafile=str(settings.upstream_trusted_ca) if settings.upstream_trusted_ca else None,
            on_fetch=self._record_gateway_fetch,
            gate=self._admit_gateway_fetch,
            target_check=self._gateway_fetch_refusal,
            own_listeners=self.governor.own_listeners,
            upstream_proxies=policy.egress.upstream_proxies,
            network=policy.network,
        )
        self.governor.prefetch_checks = [self.optouts.robots, self.optouts.tdmrep]
        # Site key -> origin -> robots.txt Crawl-delay, only origins that have one; at most
        # MAX_CRAWL_DELAY_ORIGINS origins in all (a broad crawl meets millions of sites).
        self._crawl_delays: dict[str, dict[str, float]] = {}
        self._crawl_delay_origins = 0
        self.in_flight = 0  # forwarded, not yet answered
        self.deciding = 0  # come in, neither forwarded nor recorded yet (refusals included)
        # SIGTERM: draining (no new connections; HTTP/1 answers close theirs), then stopping
        # (nothing more is forwarded) once nothing is in flight or the drain time is up.
        self.draining = False
        self.stopping = False
        self.started_at = time.time()
        self._reload_lock = asyncio.Lock()
        metrics.set_policy_version(compiled.version)

    def _site_label(self, key: str) -> str:
        return self.site_labels.label(key)  # site_labels is replaced on reload

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        loaded = load_policy(settings.policy_file)
        _log_warnings(loaded)
        return cls(settings, compile_policy(loaded))

    def _make_store(self) -> FetchStore:
        if self.settings.audit_dsn:
            from proxy.audit.postgres_store import PostgresStore

            return PostgresStore(self.settings.audit_dsn)
        return SQLiteStore(self.settings.sqlite_path)

    @property
    def compiled(self) -> CompiledPolicy:
        return self.governor.compiled

    @property
    def policy_version(self) -> str:
        return self.compiled.version

    async def start(self) -> None:
        try:
            await self.fetch_log.open()
        except (ReplicaInUse, KeyGoneBack) as e:
            raise FetchLogUnavailable(str(e)) from e
        except Exception as e:  # whatever the store's driver raises: say where, and why it matters
            reason = str(e) or type(e).__name__
            raise FetchLogUnavailable(
                f"cannot open the fetch log in {self.fetch_log_location()}: {reason}. A replica"
                " resumes its hash chain from the stored log before it records anything, so it"
                " does not start without it"
            ) from e
        await self.budgets.start()
        if self._counts is not None:
            await self._restore_counts(self._counts)
            self._counts_saving = asyncio.create_task(self._save_counts_every(saved.SAVE_INTERVAL))
        await self.replicas.start()
        await self.takedowns.start()

    async def _takedown_history(self) -> BlockState:
        """The takedowns and API blocklist changes the fetch log records (its change events)."""
        events: list[dict[str, Any]] = []

        def visit(rec: dict[str, Any]) -> None:
            if rec.get("kind") in takedowns_history.ITEM_OF_KIND:
                events.append(rec)

        source = RecordSource(self.settings.data_dir, self.settings.audit_dsn)
        with contextlib.suppress(FileNotFoundError):  # no log yet: no history
            await source.scan(RecordQuery(decision="event"), visit)
        return takedowns_history.state_from_events(events)

    @property
    def saved_counts_path(self) -> Path:
        return self.settings.data_dir / "budgets" / f"{self.replica}.json"

    async def _restore_counts(self, store: MemoryBudgetStore) -> None:
        path = self.saved_counts_path
        saved.remove_partials(path)  # of saves a kill -9 cut short
        data = saved.read(path)
        if data is None:
            return
        try:
            items = saved.parse(data, wall_clock_us())
        except saved.SavedCountsError as e:
            log.error(
                "budget_counts_unreadable",
                path=str(path),
                error=str(e),
                detail="every site's day and month start from zero in this run",
            )
            return
        await store.carry_over(items, at_least=True)
        log.info("budget_counts_restored", path=str(path), sites=len(items))

    async def _save_counts_every(self, interval: float) -> None:
        while True:
            took = await self._save_counts(sleep_first=interval)
            interval = max(saved.SAVE_INTERVAL, 10 * took)

    async def _save_counts(self, *, sleep_first: float = 0.0) -> float:
        """Save the counts (on a worker thread: a million sites take seconds); returns how
        long that took."""
        if sleep_first:
            await asyncio.sleep(sleep_first)
        assert self._counts is not None
        if self._saving_now is not None:
            # One save at a time: the loop's, cancelled at a stop, goes on in its thread.
            await asyncio.wait([self._saving_now])
        started = time.monotonic()
        sites, now = self._counts.sites(), wall_clock_us()
        self._saving_now = asyncio.ensure_future(
            asyncio.to_thread(_save, self.saved_counts_path, sites, now)
        )
        try:
            await asyncio.shield(self._saving_now)
        except OSError as e:
            log.warning(
                "budget_counts_not_saved",
                path=str(self.saved_counts_path),
                error=str(e),
                detail="a restart now would begin the sites' days and months at zero",
            )
        return time.monotonic() - started

    def fetch_log_location(self) -> str:
        """Where the fetch log is stored, for messages (never a password)."""
        dsn = self.settings.audit_dsn
        if not dsn:
            return f"SQLite at {self.settings.sqlite_path}"
        parts = urlsplit(dsn)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
        return f"PostgreSQL at {where}" + (f" as {parts.username}" if parts.username else "")

    async def stop(self) -> None:
        await self.takedowns.close()
        await self.replicas.close()
        await self.optouts.close()
        await self.budgets.close()  # settles bytes and releases leases still queued
        if self._counts_saving is not None:
            self._counts_saving.cancel()
            await asyncio.gather(self._counts_saving, return_exceptions=True)
            await self._save_counts()  # (settled by the close above)
        if self.redis is not None:
            await self.redis.aclose()
        await self.fetch_log.close()

    # -- budgets ---------------------------------------------------------------------------

    async def admit(self, ctx: RequestContext) -> Admission:
        """Consume the site's budgets for one request (all or none), after the opt-out checks.

        A robots.txt Crawl-delay for our tokens lowers the site's rate: the largest delay of
        any of the site's origins wins, as the slower rate is the polite one.
        """
        if ctx.respect.robots:
            self._use_crawl_delay(ctx.site.key, origin_of(ctx.scheme, ctx.host, ctx.port))
        admission = await self.budgets.admit(ctx.site)
        decision = admission.decision
        read_at = self._own_reads.get(ctx.site.key)
        if decision.reason is Reason.RATE_LIMITED and read_at is not None:
            # The site's first requests after its robots.txt and tdmrep.json reads: a scraper
            # pacing at the policy's rate was refused with no word of what took the slot.
            spec = self.budgets.spec(ctx.site)
            ago = time.monotonic() - read_at
            if ago < spec.interval_us * spec.burst / 1e6:
                detail = (
                    f"{decision.detail} (the gateway's own read of this site's robots.txt or "
                    f"tdmrep.json, {ago:.1f}s ago, counts against the same rate)"
                )
                admission = dataclasses.replace(
                    admission, decision=dataclasses.replace(decision, detail=detail)
                )
        return admission

    def _use_crawl_delay(self, key: str, origin: str) -> None:
        """The site's rate, slowed to the Crawl-delay of this origin's robots.txt if it has one
        (the gateway has read it: it is read before any request to the origin is admitted)."""
        delay = self.optouts.crawl_delay(origin) or None  # (0: none)
        known = self._crawl_delays.get(key)
        if delay == (known.get(origin) if known is not None else None):
            return
        if delay is not None:
            if known is None or origin not in known:
                if self._crawl_delay_origins >= MAX_CRAWL_DELAY_ORIGINS:
                    self._forget_crawl_delays()
                    known = None
                self._crawl_delay_origins += 1
            if known is None:
                known = self._crawl_delays[key] = {}
            known[origin] = delay
        elif known is not None:
            del known[origin]
            self._crawl_delay_origins -= 1
            if not known:
                del self._crawl_delays[key]
        self.budgets.set_min_interval(key, max((known or {}).values(), default=None))

    def _forget_crawl_delays(self) -> None:
        """Past MAX_CRAWL_DELAY_ORIGINS: forget every Crawl-delay kept. Each origin's is set
        again from its parsed robots.txt (read before any request is admitted) at its next
        request, before that request is admitted."""
        self._crawl_delays.clear()
        self._crawl_delay_origins = 0
        self.budgets.forget_min_intervals()

    async def _admit_gateway_fetch(self, url: str) -> Callable[[int], None]:
        """The site's budgets for one of the gateway's own requests (robots.txt, tdmrep.json):
        they reach the site as a scraper's do. Returns what settles it; FetchRefused when the
        budget has no room (a site's every subdomain has its own robots.txt: without this, a
        scraper rotating through them had the gateway send two requests per name, whatever the
        site's rate)."""
        # (Not slowed to the Crawl-delay the robots.txt read has just brought: a redirect hop
        # of tdmrep.json is gated too, and with the delay's burst of 1 no hop after the first
        # was ever admitted: the origin's requests were refused for good, review.)
        site = self.governor.site_for(normalize_host(urlsplit(url).hostname or ""))
        admission = await self.budgets.admit(site)
        if not admission.decision.allowed:
            raise FetchRefused(admission.decision)
        if len(self._own_reads) >= MAX_OWN_READS_TRACKED:
            self._own_reads.clear()
        self._own_reads[site.key] = time.monotonic()
        lease = admission.lease
        return lambda received: self.budgets.finish(lease, response_bytes=received)

    def _gateway_fetch_refusal(self, url: str) -> TargetRefusal | None:
        """Why the policy forbids one of the gateway's own requests (a redirect hop to a
        blocklisted or taken-down URL, say), or None: it asks no site what scrapers may not
        have, under every reading of the target a scraper's request is checked by."""
        parts = urlsplit(url)
        host = normalize_host(parts.hostname or "")
        origin = f"{parts.scheme}://{parts.netloc}"
        target = inputs.canonical_target(
            (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        )
        entry = self.governor.blocklist.match_url(
            host, normalize_url(origin + target), inputs.other_readings(target)
        )
        if entry is None:
            return None
        return TargetRefusal(
            str(entry.code),
            f"{url} is refused: {entry.reason} (source: {entry.source}; {entry.id})",
        )

    def _record_gateway_fetch(self, fetch: OriginFetch) -> None:
        """The gateway's own fetches (robots.txt, tdmrep.json) are fetch records too, as the
        gateway's: no team, the crawler's User-Agent, kind `gateway_fetch`, and the way they
        left (upstream proxy, local address)."""
        url, status, error = fetch.url, fetch.status, fetch.error
        host = normalize_host(urlsplit(url).hostname or "")
        policy = self.compiled.loaded.policy
        note = error
        if fetch.truncated:
            note = f"read up to the limit of {fetch.body_bytes} bytes: size and hash are of those"
        resolved = self.governor.site_for(host) if host else None
        site = resolved.key if resolved is not None else None
        if resolved is not None and status is not None:
            # A 429/503 to the gateway's own read asks the same as one to a scraper's request:
            # every replica pauses the site.
            self.budgets.site_answered(resolved, status, fetch.retry_after)
        basis = None
        if resolved is not None:  # read for the site's terms: under the site's basis
            terms, _ = resolved.terms_on(
                dt.datetime.fromtimestamp(fetch.started or time.time(), dt.UTC).date()
            )
            basis = f"{terms.kind}:{terms.ref}"
        if fetch.refused is not None:  # not made: a redirect hop the policy forbids
            decision, reason = str(Outcome.REFUSED), fetch.refused
        else:
            decision = str(Outcome.FORWARDED)
            reason = str(Reason.OK if error is None else Reason.UPSTREAM_ERROR)
        # In the request and byte counters as every request a site gets (team `_none`: no
        # team's), so that a site's panels show the load the gateway put on it.
        # Under the site's label (an open slot taken, as its first request would), but earning
        # it none: these reads come before a domain's first request (robots.txt, tdmrep.json),
        # so counted as requests every domain of a broad crawl earned a slot with its first.
        labels = self.site_labels
        site_label = labels.peek(site) if fetch.refused else labels.label(site)
        metrics.count_request(site_label, "_none", decision, reason)
        if fetch.body_bytes:
            metrics.count_response_bytes(site_label, "_none", fetch.body_bytes)
        if error is not None and fetch.refused is None:
            if (kind := metrics.upstream_error_kind(error)) is not None:
                metrics.UPSTREAM_ERRORS.labels(kind=kind).inc()
        self.fetch_log.append(
            FetchRecord(
                id=uuid.uuid4().hex,
                ts=utc_timestamp(fetch.started or time.time()),
                duration_ms=round(fetch.duration * 1000, 3),
                method="GET",
                url=url,
                kind="gateway_fetch",
                decision=decision,
                reason=reason,
                note=note,
                site=site,
                status=status,
                response_bytes=fetch.body_bytes,
                content_type=fetch.content_type,
                content_sha256=fetch.sha256,
                legal_basis=basis,
                egress_ip=fetch.egress_ip,
                egress_provider=policy.egress.provider,
                egress_public_ips=[str(ip) for ip in policy.egress.public_ips],
                upstream_proxy=fetch.upstream_proxy,
                policy_version=self.policy_version,
                user_agent=policy.crawler.user_agent,
            )
        )

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> tuple[str | None, list[PolicyError]]:
        """Load the policy file again. On any error the policy in force stays, unchanged: an
        invalid file, a file it names that the next start could not read (the signing key), or
        a change that only a restart applies (`restart_only_changes`).

        This reads and compiles the file on the calling thread: on the event loop, use
        `reload_in_thread`, as SIGHUP and the admin API do."""
        return self._apply(self._compile_file())

    async def reload_in_thread(self) -> tuple[str | None, list[PolicyError]]:
        """`reload`, with the file read, validated and compiled in a worker thread, then put in
        force on the event loop. A policy of a few thousand site rules and blocklist entries
        takes seconds to parse: on the event loop, every request of the replica waited for it.
        Reloads are applied one at a time, in the order they were asked."""
        async with self._reload_lock:
            return self._apply(await asyncio.to_thread(self._compile_file))

    def _compile_file(self) -> CompiledPolicy | list[PolicyError]:
        """The policy file compiled, or its errors. Touches nothing of the runtime (a worker
        thread runs it)."""
        try:
            return compile_policy(load_policy(self.settings.policy_file, check_files=True))
        except InvalidPolicy as e:
            return e.errors
        except Exception as e:  # a file validation let through: refused and counted, not a 500
            log.exception("policy_compile_failed")
            return [PolicyError("", f"the policy could not be applied ({type(e).__name__}: {e})")]

    def _apply(
        self, compiled: CompiledPolicy | list[PolicyError]
    ) -> tuple[str | None, list[PolicyError]]:
        if isinstance(compiled, list):
            return self._reload_refused(compiled, restart_needed=False)
        if changes := self.restart_only_changes(compiled):
            return self._reload_refused(changes, restart_needed=True)
        old = self.policy_version
        policy = compiled.loaded.policy
        self.governor.use_policy(compiled)
        self.optouts.use_policy(
            policy.crawler,
            compiled.resolver,
            compiled.guard,
            policy.egress.upstream_proxies,
            policy.network,
        )
        self.site_labels = metrics.SiteLabels(compiled.sites.rule_ids())
        self.budgets.use_policy_version(compiled.version, compiled.sites.in_use)
        self.fetch_log.spool_max_bytes = _spool_limit(compiled)
        self.fetch_log.checkpoint_every_records = policy.audit.checkpoint_every_records
        self.fetch_log.checkpoint_every_seconds = policy.audit.checkpoint_every_seconds
        self.fetch_log.retention_days = policy.retention.fetch_records_days
        metrics.set_policy_version(compiled.version)
        if compiled.version != old:
            self.fetch_log.new_event(
                "policy",
                f"policy {compiled.version} loaded from {self.settings.policy_file}, "
                f"replacing {old}",
                policy_version=compiled.version,
            )
        log.info("policy_reloaded", version=compiled.version, previous=old)
        _log_warnings(compiled.loaded)
        metrics.policy_reload_succeeded()
        return compiled.version, []

    def _reload_refused(
        self, errors: list[PolicyError], *, restart_needed: bool
    ) -> tuple[str | None, list[PolicyError]]:
        log.error(
            "policy_reload_failed",
            errors=[str(x) for x in errors],
            kept=self.policy_version,
            restart_needed=restart_needed,
        )
        metrics.policy_reload_failed()
        return None, errors

    def restart_only_changes(self, new: CompiledPolicy) -> list[PolicyError]:
        """What the new policy changes that the gateway reads at start only, each as an error
        saying so. Only the signing key is: the fetch log signs with the key it loaded at start,
        so a reload that took a new `audit.signing_key_file` (or a new key in the same file, a
        rotated Kubernetes Secret) would go on signing with the old one while reporting the new
        policy. Everything else a policy says is applied by `reload`."""
        field = "audit.signing_key_file"
        current = self.compiled.loaded.policy.audit.signing_key_file
        wanted = new.loaded.policy.audit.signing_key_file
        restart = "restart the gateway to apply it (the policy in force stays until then)"
        if not _same_file(current, wanted):
            before = current or f"the key made in the data dir ({self.settings.data_dir})"
            return [
                PolicyError(
                    field,
                    f"changed from {before} to {wanted or 'none'}: the gateway reads the signing "
                    f"key at start only, so it would go on signing with the old key; {restart}",
                )
            ]
        signer = self.fetch_log.signer
        if wanted and signer is not None:
            try:  # check_files has just read it: readable, an Ed25519 key, unless it changed
                key_id = read_private_key(Path(wanted)).verifier.key_id
            except SigningKeyError as e:
                return [PolicyError(field, str(e))]
            if key_id != signer.verifier.key_id:
                return [
                    PolicyError(
                        field,
                        f"{wanted} holds another key (key ID {key_id.hex()}) than the one the "
                        f"gateway read at start and signs with ({signer.verifier.key_id.hex()}); "
                        f"{restart}",
                    )
                ]
        return []

    # -- health ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.draining and self.fetch_log.available

    def record(self, rec: FetchRecord) -> dict[str, object] | None:
        """The record as chained; None for a refusal only counted (FetchLog.append)."""
        return self.fetch_log.append(rec)

    async def wait_idle(self, timeout: float) -> int:
        """Wait until no request is in flight or being decided; returns how many still are."""
        deadline = time.monotonic() + timeout
        while self.in_flight + self.deciding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight + self.deciding


def _same_file(a: str | None, b: str | None) -> bool:
    """Whether two `signing_key_file` values name one file (`audit.key`, `./audit.key`)."""
    if not a or not b:
        return not a and not b
    return os.path.abspath(a) == os.path.abspath(b)


def _spool_limit(compiled: CompiledPolicy) -> int:
    return parse_size(compiled.loaded.policy.audit.spool_max_bytes)


def _log_warnings(loaded: LoadedPolicy) -> None:
    """What `policy check` warns about, in the log of a start or a reload."""
    for warning in loaded.warnings:
        log.warning("policy_warning", path=warning.path, message=warning.message, line=warning.line)
