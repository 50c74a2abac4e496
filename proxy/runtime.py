"""One gateway replica's state, shared by the proxy addon and the admin API.

Holds the policy in force (swapped atomically on reload), the governor, the fetch log and the
settings from the command line. Knows nothing of mitmproxy.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from proxy import metrics
from proxy.audit.log import FetchLog
from proxy.audit.log import FetchStore
from proxy.audit.record import FetchRecord
from proxy.audit.sqlite_store import SQLiteStore
from proxy.governor import CompiledPolicy
from proxy.governor import Governor
from proxy.governor import compile_policy
from proxy.policy import InvalidPolicy
from proxy.policy import PolicyError
from proxy.policy import load_policy

log = structlog.get_logger("crawlwarden")


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

    @property
    def replica(self) -> str:
        return self.replica_id or socket.gethostname()

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "fetchlog.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool" / self.replica


class Runtime:
    def __init__(self, settings: Settings, compiled: CompiledPolicy):
        self.settings = settings
        self.replica = settings.replica
        self.governor = Governor(compiled)
        self.fetch_log = FetchLog(
            self._make_store(),
            settings.spool_dir,
            self.replica,
            spool_max_bytes=_spool_limit(compiled),
        )
        self.site_labels = metrics.SiteLabels(compiled.sites.rule_ids())
        self.in_flight = 0
        self.draining = False
        self.started_at = time.time()
        metrics.set_policy_version(compiled.version)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        return cls(settings, compile_policy(load_policy(settings.policy_file)))

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
        await self.fetch_log.open()

    async def stop(self) -> None:
        await self.fetch_log.close()

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> tuple[str | None, list[PolicyError]]:
        """Load the policy file again. On any error the policy in force stays, unchanged."""
        try:
            compiled = compile_policy(load_policy(self.settings.policy_file))
        except InvalidPolicy as e:
            log.error(
                "policy_reload_failed",
                errors=[str(x) for x in e.errors],
                kept=self.policy_version,
            )
            return None, e.errors
        old = self.policy_version
        self.governor.use_policy(compiled)
        self.fetch_log.spool_max_bytes = _spool_limit(compiled)
        self.site_labels = metrics.SiteLabels(compiled.sites.rule_ids())
        metrics.set_policy_version(compiled.version)
        if compiled.version != old:
            self.fetch_log.new_event(
                "policy",
                f"policy {compiled.version} loaded from {self.settings.policy_file}, "
                f"replacing {old}",
                policy_version=compiled.version,
            )
        log.info("policy_reloaded", version=compiled.version, previous=old)
        return compiled.version, []

    # -- health ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.draining and self.fetch_log.available

    def record(self, rec: FetchRecord) -> dict[str, object]:
        return self.fetch_log.append(rec)

    async def wait_idle(self, timeout: float) -> int:
        """Wait until no forwarded request is in flight; returns how many still are."""
        deadline = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight


def _spool_limit(compiled: CompiledPolicy) -> int:
    from proxy.units import parse_size

    return parse_size(compiled.loaded.policy.audit.spool_max_bytes)
