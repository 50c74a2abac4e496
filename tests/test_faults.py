"""Faults under load against real gateway processes: Redis killed, PostgreSQL stopped, kill -9.

After each, the gateway serves again without a restart (or after its own restart for kill -9),
budgets are still exact, and no fetch record is missing (counted against the site's own count).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import yaml

from proxy.audit.log import FetchLog
from proxy.cli import address_problem
from proxy.cli import parse_args
from proxy.runtime import Settings
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import own_redis  # noqa: F401 - fixture
from tests.forked_gateways import run_command
from tests.pg_fixtures import pg_admin_dsn  # noqa: F401 - fixture
from tests.pg_fixtures import pg_dsn  # noqa: F401 - fixture
from tests.pg_server import TempPostgres
from tests.support import CRAWLWARDEN
from tests.support import IN_CI
from tests.support import PROJECT
from tests.support import ROOT
from tests.support import TEAM
from tests.support import Gateway
from tests.support import Reply
from tests.support import Site
from tests.support import free_port
from tests.support import policy_with
from tests.support import unwritable
from tests.support import wait_for
from tests.support import write_policy
from tests.test_fleet import export_and_verify
from tests.test_fleet import signing_keys

HEADERS = {"X-Crawl-Project": PROJECT}


class Load:
    """Clients sending unique URLs through one gateway until stopped; every answer is kept."""

    def __init__(self, gateway: Gateway, url_of, threads: int = 4):
        self.gateway = gateway
        self.url_of = url_of
        self.answers: list[tuple[str, int, str | None]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._n = 0
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _next(self) -> str:
        with self._lock:
            self._n += 1
            return self.url_of(self._n)

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            url = self._next()
            try:
                r = session.get(
                    url, proxies={"http": self.gateway.proxy_url()}, headers=HEADERS, timeout=10
                )
            except requests.RequestException:
                with self._lock:
                    self.errors += 1
                session = requests.Session()
                time.sleep(0.05)
                continue
            with self._lock:
                self.answers.append((url, r.status_code, r.headers.get("X-Crawlwarden-Reason")))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def since(self, index: int) -> list[tuple[str, int, str | None]]:
        with self._lock:
            return list(self.answers[index:])

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


# -- Redis -----------------------------------------------------------------------------------


@pytest.fixture
def redis_fleet(workdir: Path, own_redis: RedisServer) -> Iterator[tuple[Gateway, RedisServer]]:  # noqa: F811
    policy = policy_with(
        sites=[
            {"id": "closed", "match": ["closed.test"], "fail_mode": "closed"},
            {
                "id": "local",
                "match": ["local.test"],
                "fail_mode": "local",
                "requests_per_day": 400,
            },
        ]
    )
    with Gateway(workdir, policy, extra_args=["--redis-url", own_redis.url]) as gw:
        yield gw, own_redis


def test_redis_killed_mid_load_fails_closed_then_recovers_without_restart(
    redis_fleet: tuple[Gateway, RedisServer], site: Site
):
    gw, redis = redis_fleet
    with Load(gw, lambda n: site.url("closed.test", f"/c/{n}")) as load:
        assert wait_for(lambda: load.count() >= 20, timeout=20)
        redis.kill()
        mark = load.count()
        assert wait_for(lambda: any(s == 503 for _, s, _ in load.since(mark)), timeout=20)
        during = load.since(mark)
        refused = [r for _, s, r in during if s == 503]
        assert refused and set(refused) == {"store_unavailable"}
        redis.start()
        mark = load.count()
        assert wait_for(
            lambda: sum(1 for _, s, _ in load.since(mark) if s == 200) >= 10, timeout=30
        ), "the gateway did not go back to Redis by itself"
    assert gw.proc is not None and gw.proc.poll() is None  # never crashed
    # No fetch record is missing: every request the site saw is recorded as forwarded.
    records = [r for r in gw.fetch_records() if r["kind"] == "fetch"]
    forwarded = [r for r in records if r["decision"] == "forwarded"]
    assert len(forwarded) == site.count()
    assert len(records) == len(load.answers)
    metrics = requests.get(gw.admin + "/metrics", timeout=5).text
    assert 'crawlwarden_store_errors_total{store="redis"}' in metrics


def test_redis_killed_mid_load_local_mode_keeps_serving_within_its_share(
    redis_fleet: tuple[Gateway, RedisServer], site: Site
):
    gw, redis = redis_fleet
    with Load(gw, lambda n: site.url("local.test", f"/l/{n}"), threads=3) as load:
        assert wait_for(lambda: load.count() >= 30, timeout=20)
        redis.kill()
        mark = load.count()
        time.sleep(2)
        during = load.since(mark)
        assert sum(1 for _, s, _ in during if s == 200) > 0, "local mode stopped serving"
        assert not any(s == 503 for _, s, _ in during)
        redis.start()
        time.sleep(2)
    # The quota held overall: the site never saw more than its daily 400.
    assert site.count() <= 400
    answers = Counter(s for _, s, _ in load.answers)
    assert answers[200] == site.count()


def statuses_of(gw: Gateway, urls: list[str]) -> Counter[int]:
    """Each URL fetched once through `gw`, one after the other: how many got each status."""
    return Counter(
        requests.get(url, proxies={"http": gw.proxy_url()}, headers=HEADERS, timeout=10).status_code
        for url in urls
    )


def test_a_replica_that_starts_while_redis_is_down_takes_its_share_of_the_fleet_size(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    # It has seen no other replica: it used to count itself alone and take the whole quota,
    # and so did every replica started in the outage (3 replicas: 3x the site's quota).
    policy = policy_with(
        sites=[
            {"id": "local", "match": ["local.test"], "fail_mode": "local", "requests_per_day": 30}
        ]
    )
    own_redis.kill()  # not there when the gateway starts
    shared = ["--redis-url", own_redis.url, "--fleet-size", "3"]
    with Gateway(workdir, policy, extra_args=shared) as gw:
        statuses = statuses_of(gw, [site.url("local.test", f"/s/{n}") for n in range(20)])
    assert statuses == {200: 10, 429: 10}, statuses  # 30 / 3 replicas
    assert site.count() == 10


def test_budgets_survive_redis_losing_its_data(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    # A Redis restarted without persistence (or flushed) used to start every quota over,
    # silently: a site got its daily quota twice. The replicas write back what they last saw.
    policy = policy_with(sites=[{"id": "quota", "match": ["quota.test"], "requests_per_day": 20}])

    def ask(first: int, n: int) -> Counter[int]:
        return statuses_of(gw, [site.url("quota.test", f"/q/{k}") for k in range(first, first + n)])

    with Gateway(workdir, policy, extra_args=["--redis-url", own_redis.url]) as gw:
        assert ask(0, 12) == {200: 12}
        client = redis.Redis.from_url(own_redis.url)
        client.flushall()
        client.close()
        assert wait_for(lambda: gw.log_events("redis_data_lost"), timeout=15)
        assert ask(12, 12) == {200: 8, 429: 4}
        [lost] = gw.log_events("redis_data_lost")
        assert lost["restored_sites"] >= 1
    assert site.count() == 20


def test_embedded_counts_and_pauses_survive_a_restart(workdir: Path, site: Site):
    # Without Redis the counts lived in memory only: a restart (a new policy, an upgrade) gave
    # every site its day and month again, and forgot the pause a site had asked for (found by
    # a site owner's advocate's probe: `requests_per_day: 5` used up, then five more).
    site.routes["/busy"] = Reply(status=429, headers={"Retry-After": "3600"})
    policy = policy_with(
        sites=[
            {"id": "quota", "match": ["quota.test"], "requests_per_day": 5},
            {"id": "busy", "match": ["busy.test"]},
        ]
    )

    def ask(gw: Gateway, host: str, paths: list[str]) -> Counter[int]:
        return statuses_of(gw, [site.url(host, p) for p in paths])

    data = workdir / "kept-data"
    with Gateway(workdir, policy, data_dir=data) as gw:
        assert ask(gw, "quota.test", [f"/q/{k}" for k in range(3)]) == {200: 3}
        assert ask(gw, "busy.test", ["/busy"]) == {429: 1}
    assert (data / "budgets").is_dir()
    with Gateway(workdir, policy, data_dir=data) as gw:
        assert ask(gw, "quota.test", [f"/q/{k}" for k in range(3, 6)]) == {200: 2, 429: 1}
        assert ask(gw, "busy.test", ["/busy"]) == {429: 1}
        [restored] = gw.log_events("budget_counts_restored")
    assert site.count("/busy") == 1 and restored["sites"] == 2
    assert sorted(site.paths()) == ["/busy", *(f"/q/{k}" for k in range(5))]


def test_damaged_saved_counts_are_said_and_the_gateway_starts(workdir: Path, site: Site):
    data = workdir / "kept-data"
    (data / "budgets").mkdir(parents=True)
    (data / "budgets" / "gw.json").write_text('{"format": 1, "saved_at_us": 1, "sites": [[')
    with Gateway(workdir, policy_with(), data_dir=data) as gw:
        assert statuses_of(gw, [site.url("site-a.test", "/a")]) == {200: 1}
        [unreadable] = gw.log_events("budget_counts_unreadable")
    assert "JSONDecodeError" in unreadable["error"] and "zero" in unreadable["detail"]


RECOVERY_EVENTS = ("redis_data_lost", "budget_store_recovered")


def test_a_quota_counts_before_and_during_an_outage_that_lost_redis_data(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    # Redis restarted empty while a `fail_mode: local` replica counted on its own: the outage's
    # counts were added to the empty store first, then the floor of what the replica saw
    # before was written back with max(): the requests before the outage were forgotten (86
    # requests on a quota of 60 in the politeness probe).
    policy = policy_with(
        sites=[{"id": "lq", "match": ["lq.test"], "fail_mode": "local", "requests_per_day": 20}]
    )

    def ask(first: int, n: int) -> Counter[int]:
        return statuses_of(gw, [site.url("lq.test", f"/q/{k}") for k in range(first, first + n)])

    with Gateway(workdir, policy, extra_args=["--redis-url", own_redis.url]) as gw:
        assert ask(0, 8) == {200: 8}
        time.sleep(6)  # a heartbeat has seen the fleet's marker
        own_redis.kill()
        assert ask(8, 6) == {200: 6}  # counted here, on the replica's own share
        own_redis.start()  # empty: no marker, no counts
        assert wait_for(lambda: gw.log_events("budget_store_recovered"), timeout=20)
        assert wait_for(lambda: gw.log_events("redis_data_lost"), timeout=20)
        # The floor went back before the outage's counts were added on top of it.
        order = [e["event"] for e in gw.log_events() if e["event"] in RECOVERY_EVENTS]
        assert order.index("redis_data_lost") < order.index("budget_store_recovered"), order
        assert ask(14, 10) == {200: 6, 429: 4}
    assert site.count() == 20


# -- kill -9 ---------------------------------------------------------------------------------


def test_kill_9_under_load_loses_no_record(workdir: Path, site: Site, tmp_path: Path):
    site.routes["/slowish"] = Reply(body=b"z" * 512, delay=0.2)
    private, public = signing_keys(workdir)
    pg = TempPostgres()
    pg.start()
    try:
        policy = policy_with(
            audit={"signing_key_file": str(private), "checkpoint_every_records": 50}
        )
        gw = Gateway(workdir, policy, name="victim", extra_args=["--audit-dsn", pg.dsn]).start(60)
        with Load(gw, lambda n: site.url("site-a.test", f"/k/{n}"), threads=6) as load:
            assert wait_for(lambda: site.count() >= 40, timeout=30)
            gw.kill()  # SIGKILL: no drain, no flush
            time.sleep(0.5)
        seen = {s.path for s in site.seen}
        # Restart the same replica on the same data dir: its spool is replayed.
        gw.start(60)
        try:
            assert wait_for(lambda: len(_records(pg.dsn)) >= len(seen), timeout=30)
        finally:
            gw.stop()
        records = export_and_verify(pg.dsn, public, tmp_path / "after-kill.jsonl")
        fetches = {r["url"].split(str(site.port), 1)[1]: r for r in records if r["kind"] == "fetch"}
        missing = seen - set(fetches)
        assert not missing, f"{len(missing)} requests the site served have no record"
        interrupted = [r for r in fetches.values() if r["reason"] == "interrupted"]
        for rec in interrupted:
            assert rec["decision"] == "forwarded" and "stopped" in rec["note"]
        assert load.answers  # the clients did get answers before the kill
    finally:
        pg.destroy()


def test_a_replica_lost_before_it_signed_has_its_records_signed_by_a_witness(
    workdir: Path,
    site: Site,
    tmp_path: Path,
    pg_dsn: str,  # noqa: F811
):
    # A Deployment's pod killed (its node lost) between two checkpoints never runs again under
    # its id: its last records stayed unsigned for good, and `verify` of the fleet's log failed.
    private, public = signing_keys(workdir)
    signing = {"signing_key_file": str(private)}
    victim = Gateway(  # signs every 4 records, not by time
        workdir,
        policy_with(
            audit={**signing, "checkpoint_every_records": 4, "checkpoint_every_seconds": 3600}
        ),
        name="victim",
        extra_args=["--audit-dsn", pg_dsn],
    )
    witness = Gateway(  # looks every 10 s; signs after a checkpoint at most 14 s old
        workdir,
        policy_with(audit={**signing, "checkpoint_every_seconds": 2}),
        name="witness",
        extra_args=["--audit-dsn", pg_dsn],
    )
    victim.start(60)
    witness.start(60)
    try:
        urls = [site.url("site-a.test", f"/lost/{n}") for n in range(14)]
        assert statuses_of(victim, urls[:10]) == {200: 10}

        def stored() -> list[dict]:
            return [r for r in _records(pg_dsn) if r["replica"] == "victim"]

        assert wait_for(lambda: len(stored()) == 10, timeout=20)
        time.sleep(11)  # a witness pass while the victim runs: its chain is not taken
        assert not witness.log_events("witnessed")
        # Signed at 12 just before it dies (as a run signs every interval): 13 and 14 are not.
        assert statuses_of(victim, urls[10:]) == {200: 4}
        assert wait_for(lambda: len(stored()) == 14, timeout=20)
        victim.kill()  # SIGKILL: no shutdown checkpoint
        assert wait_for(lambda: witness.log_events("witnessed"), timeout=30)
        [event] = witness.log_events("witnessed")
        assert (event["replica"], event["through_seq"]) == ("victim", 14)
    finally:
        witness.stop()
    out = tmp_path / "fleet.jsonl"
    records = export_and_verify(pg_dsn, public, out)  # exit 0, no --allow-unsigned
    assert {r["url"] for r in records if r["replica"] == "victim"} == set(urls)
    assert [r for r in records if r["replica"] == "witness" and r["kind"] == "witness"]
    verified = run_command(
        [CRAWLWARDEN, "audit", "verify", str(out), "--public-key", str(public)],
        text=True,
    )
    assert "records 13..14 signed as stored by replica witness" in verified.stdout


def _records(dsn: str) -> list[dict]:
    out = run_command([CRAWLWARDEN, "audit", "export", "--audit-dsn", dsn], text=True)
    return [r for r in map(json.loads, out.stdout.splitlines()) if r.get("type") == "record"]


# -- PostgreSQL ------------------------------------------------------------------------------


def test_postgresql_stopped_mid_load_loses_no_record(workdir: Path, site: Site, tmp_path: Path):
    private, public = signing_keys(workdir)
    pg = TempPostgres()
    pg.start()
    try:
        policy = policy_with(audit={"signing_key_file": str(private)})
        with Gateway(workdir, policy, extra_args=["--audit-dsn", pg.dsn]) as gw:
            with Load(gw, lambda n: site.url("site-a.test", f"/pg/{n}"), threads=4) as load:
                assert wait_for(lambda: load.count() >= 30, timeout=20)
                pg.stop()
                mark = load.count()
                assert wait_for(lambda: load.count() >= mark + 50, timeout=30)
                # The spool takes the records: scrapers are still served.
                assert all(s == 200 for _, s, _ in load.since(mark))
                _, ready = gw.admin_request("GET", "/readyz")
                assert ready["fetch_log_store_ok"] is False
                pg.start()
                mark = load.count()
                assert wait_for(lambda: load.count() >= mark + 30, timeout=30)
            assert wait_for(lambda: gw.admin_request("GET", "/readyz")[1]["fetch_log_store_ok"])
            gw.signal(signal.SIGTERM)
            assert gw.proc is not None and gw.proc.wait(60) == 0
        records = export_and_verify(pg.dsn, public, tmp_path / "after-outage.jsonl")
        fetches = [r for r in records if r["kind"] == "fetch"]
        assert len(fetches) == len(load.answers) == site.count()
    finally:
        pg.destroy()


def test_a_stop_while_postgresql_is_unreachable_fits_the_charts_grace_period(
    workdir: Path, site: Site
):
    # SIGTERM during an outage: after the drain, the flush waits its whole timeout for the store
    # (FetchLog.close), then the gateway exits leaving the records in the spool. The chart's
    # default grace period must leave room for that after its preStop sleep and drain (it left
    # 25 s for a 30 s wait), and the spool ships at the next start on the same data dir.
    values = yaml.safe_load((ROOT / "helm" / "crawlwarden" / "values.yaml").read_text())
    after_drain = (
        values["terminationGracePeriodSeconds"]
        - values["preStopSleepSeconds"]
        - values["drainSeconds"]
    )
    flush = inspect.signature(FetchLog.close).parameters["timeout"].default
    drain = 1.0
    private, _ = signing_keys(workdir)
    policy = policy_with(audit={"signing_key_file": str(private)})
    pg = TempPostgres()
    pg.start()
    try:
        args = ["--audit-dsn", pg.dsn, "--drain-seconds", str(drain)]
        gw = Gateway(workdir, policy, name="pg-outage-stop", extra_args=args).start()
        proxies = {"http": gw.proxy_url()}
        for n in range(2):
            url = site.url("site-a.test", f"/before/{n}")
            assert requests.get(url, proxies=proxies, headers=HEADERS, timeout=10).ok
        pg.stop()
        during = [site.url("site-a.test", f"/during/{n}") for n in range(3)]
        for url in during:
            assert requests.get(url, proxies=proxies, headers=HEADERS, timeout=10).ok
        began = time.monotonic()
        gw.signal(signal.SIGTERM)
        time.sleep(drain + 2)
        gw.signal(signal.SIGHUP)  # during the flush: it used to end the process there
        assert gw.proc is not None and gw.proc.wait(flush + 60) == 0
        took = time.monotonic() - began
        assert took >= flush - 1, f"{took:.1f} s: the store was not waited for"
        assert took - drain < after_drain, (
            f"the stop took {took:.1f} s, {took - drain:.1f} s after a {drain} s drain; the "
            f"chart's defaults leave {after_drain} s after theirs before the kubelet kills"
        )
        [unshipped] = gw.log_events("fetchlog_unshipped_at_exit")
        assert unshipped["records"] >= len(during) and unshipped["kept_in"] == "spool"
        pg.start()
        with Gateway(workdir, policy, name="pg-outage-stop", extra_args=args):
            assert wait_for(lambda: set(during) <= {r["url"] for r in _records(pg.dsn)}, timeout=30)
    finally:
        pg.destroy()


def test_a_replica_whose_postgresql_is_unreachable_at_start_says_so_and_exits(workdir: Path):
    private, _ = signing_keys(workdir)
    policy = write_policy(
        workdir / "policy.yaml", policy_with(audit={"signing_key_file": str(private)})
    )
    closed = free_port()  # nothing listens there
    result = run_command(
        [
            CRAWLWARDEN,
            "run",
            "--policy",
            str(policy),
            "--data-dir",
            str(workdir / "data"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--admin",
            f"127.0.0.1:{free_port()}",
            "--audit-dsn",
            f"postgresql://crawler:s3cret@127.0.0.1:{closed}/fetchlog",
        ],
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"crawlwarden: cannot open the fetch log in PostgreSQL at 127.0.0.1:{closed}/fetchlog"
        " as crawler: "
    ), last
    assert "does not start without it" in last
    assert "s3cret" not in result.stderr + result.stdout


def test_a_sigterm_while_the_replica_starts_ends_it(workdir: Path):
    # In a pod the gateway is PID 1, which the kernel gives no default action for SIGTERM: a
    # pod deleted while it started (here: waiting for a PostgreSQL that accepts and never
    # answers) ignored it until the kubelet's SIGKILL. It needs a handler of its own then,
    # which a process that is not PID 1 shows by how it ends: exit 143 with a line, not killed.
    private, _ = signing_keys(workdir)
    policy = write_policy(
        workdir / "policy.yaml", policy_with(audit={"signing_key_file": str(private)})
    )
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        proc = subprocess.Popen(
            [
                *_run_command(policy, workdir / "data"),
                "--audit-dsn",
                f"postgresql://crawler@127.0.0.1:{port}/fetchlog",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            silent.settimeout(30)
            silent.accept()[0].close()  # it is past the exec into python -O, waiting for PG
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr[-2000:])
    assert stderr.strip().splitlines()[-1] == "crawlwarden: stopped by SIGTERM while starting"


def _run_command(
    policy: Path, data_dir: Path, listen_port: int | None = None, admin_port: int | None = None
) -> list[str]:
    return [
        CRAWLWARDEN,
        "run",
        "--policy",
        str(policy),
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{listen_port or free_port()}",
        "--admin",
        f"127.0.0.1:{admin_port or free_port()}",
        "--replica-id",
        "unwritable",
    ]


def _run_briefly(
    policy: Path, data_dir: Path, listen_port: int | None = None
) -> subprocess.CompletedProcess[str]:
    """A start that is expected to stop at once (exit 1, one line on stderr)."""
    return subprocess.run(
        _run_command(policy, data_dir, listen_port), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("credentials", "database", "says"),
    [
        ("crawler:not-the-password@", "0", "invalid username-password pair"),
        ("", "99", "DB index is out of range"),
    ],
    ids=["wrong-password", "no-such-database"],
)
def test_a_redis_that_refuses_the_gateway_stops_it_at_start(
    workdir: Path,
    own_redis: RedisServer,  # noqa: F811
    credentials: str,
    database: str,
    says: str,
):
    # A wrong password in the Redis URL (a bad Secret in a rollout): the replica started, said
    # it was ready, and refused every request 503 store_unavailable (an SRE's probe). An
    # outage is ridden out; a refusal is a setting to fix.
    policy = write_policy(workdir / "policy.yaml", policy_with())
    url = f"redis://{credentials}127.0.0.1:{own_redis.port}/{database}"
    result = subprocess.run(
        [*_run_command(policy, workdir / "data"), "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert '"started"' not in result.stderr and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crawlwarden: redis at 127.0.0.1:{own_redis.port} refused "), last
    assert says in last and "--redis-url" in last and "not-the-password" not in last


@pytest.mark.parametrize("signing_key", [False, True], ids=["key-made-in-data-dir", "key-given"])
def test_a_data_dir_the_gateway_cannot_write_is_one_line_naming_it(
    workdir: Path, signing_key: bool
):
    # A PersistentVolume whose ownership fsGroup did not fix: a 38-line traceback from the
    # key generation, or SQLite's bare "unable to open database file", was all one got.
    audit = {"signing_key_file": str(signing_keys(workdir)[0])} if signing_key else {}
    policy = write_policy(workdir / "policy.yaml", policy_with(audit=audit))
    data = workdir / "data"
    data.mkdir()
    with unwritable(data):
        result = _run_briefly(policy, data)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crawlwarden: cannot write to the data dir {data} ("), last
    assert "write access" in last and "fsGroup" in last and "--data-dir" in last


def test_a_data_dir_that_is_a_file_is_named_as_not_a_directory(workdir: Path):
    policy = write_policy(workdir / "policy.yaml", policy_with())
    data = workdir / "data"
    data.write_text("")
    result = _run_briefly(policy, data)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"crawlwarden: the data dir {data} is not a directory: choose another --data-dir"
    )


def test_a_proxy_port_in_use_is_one_line_naming_the_flag(workdir: Path):
    # mitmproxy's own error came after the gateway had logged "started", and named its
    # `--mode regular@PORT` option, which crawlwarden does not have.
    policy = write_policy(workdir / "policy.yaml", policy_with())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _run_briefly(policy, workdir / "data", listen_port=port)
    assert result.returncode == 1, result.stderr
    assert '"started"' not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crawlwarden: cannot listen on proxy address 127.0.0.1:{port}: "), last
    assert last.endswith("pick another --listen") and "in use" in last


# `crawlwarden run` with a change made first (PATCH, Python), to stage a start's races.
_STAGED_START = """
import asyncio, sys
import proxy.app as app
from mitmproxy.addons import proxyserver
{patch}
from proxy import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _staged_start(patch: str, args: list[str]) -> subprocess.Popen[str]:
    script = _STAGED_START.format(patch=patch)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONOPTIMIZE": "1"},  # (else `run` restarts itself under -O)
    )


def test_a_proxy_port_taken_while_the_gateway_starts_ends_the_start_before_started(
    workdir: Path,
):
    # Another process took the proxy port after the gateway's check and before mitmproxy
    # bound it (two gateways starting at once on a node). The gateway had logged "started"
    # and answered /readyz 200 from its admin API until mitmproxy's error ended it, so a
    # readiness probe, or a test, took another process's port for its proxy.
    policy = write_policy(workdir / "policy.yaml", policy_with())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        patch = (  # (the check passes once: the port taken right after it)
            "check = app.listen_problem\n"
            "checked = []\n"
            "async def once(host, port):\n"
            "    checked.append(port)\n"
            "    return None if len(checked) == 1 else await check(host, port)\n"
            "app.listen_problem = once"
        )
        proc = _staged_start(patch, _run_command(policy, workdir / "data", port))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert '"started"' not in err + out
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"crawlwarden: cannot listen on proxy address 127.0.0.1:{port}: "), last
    assert last.endswith("pick another --listen") and "in use" in last


def _readiness_during_a_slow_bind(policy: Path, data_dir: Path) -> list[tuple[bool, bool]] | None:
    """A gateway whose proxy port is bound 2 s late: (ready, proxy listening) at each answer of
    /readyz until it says ready. None: another process took one of its ports meanwhile (the
    gateway then stops with its one-line error), so the caller tries again with others."""
    port, admin = free_port(), free_port()
    patch = (
        "bind = proxyserver.Proxyserver.setup_servers\n"
        "async def slowly(self):\n"
        "    await asyncio.sleep(2.0)\n"
        "    return await bind(self)\n"
        "proxyserver.Proxyserver.setup_servers = slowly"
    )
    proc = _staged_start(patch, _run_command(policy, data_dir, port, admin))
    seen: list[tuple[bool, bool]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(ready for ready, _ in seen):
            if proc.poll() is not None:
                last = (proc.stderr.read() if proc.stderr else "").strip().splitlines()[-1:]
                assert last and "already in use" in last[0], last
                return None
            try:
                answer = requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=1)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                listening = True
            except OSError:
                listening = False
            seen.append((answer.status_code == 200, listening))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    return seen


def test_the_gateway_is_ready_only_once_its_proxy_listens(workdir: Path):
    # mitmproxy binds the proxy port when the gateway's main loop runs, after the admin API
    # is up: /readyz said 200 while the proxy port still refused connections (here for the 2 s
    # a slow bind takes; in a real start for a moment), and Kubernetes sent traffic to it.
    policy = write_policy(workdir / "policy.yaml", policy_with())
    for attempt in range(3):
        seen = _readiness_during_a_slow_bind(policy, workdir / f"data-{attempt}")
        if seen is not None:
            break
    assert seen and seen[-1] == (True, True), seen
    assert all(listening for ready, listening in seen if ready), seen


def test_the_same_port_for_proxy_and_admin_is_a_usage_error_naming_both_flags(workdir: Path):
    # The admin API took the port, the gateway logged "started", then mitmproxy failed to bind
    # and advised its own `--mode regular@PORT` (an SRE's start-up probe).
    policy = write_policy(workdir / "policy.yaml", policy_with())
    port = free_port()
    result = subprocess.run(
        _run_command(policy, workdir / "data", port, port),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert '"started"' not in result.stderr and "--mode" not in result.stderr
    assert result.stderr.strip() == (
        f"crawlwarden: --listen and --admin are both on port {port}: the proxy and the admin "
        "API need an address each"
    )


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--redis-url", "127.0.0.1:6379", "Redis URL must specify one of the following schemes"),
        ("--redis-url", "http://127.0.0.1:6379/0", "Redis URL must specify one of the following"),
        ("--redis-url", "redis://127.0.0.1:abc/0", "Port could not be cast to integer value"),
        ("--audit-dsn", "postgresql://u:secret@127.0.0.1:abc/x", "Port could not be cast"),
    ],
)
def test_a_malformed_store_url_is_a_usage_error_naming_the_flag(
    workdir: Path, flag: str, value: str, says: str
):
    # A Redis URL without its scheme (`redis-master:6379`, a common slip in a Helm value) or a
    # port that is not a number ended in a 30-line traceback (an SRE's start-up probe).
    policy = write_policy(workdir / "policy.yaml", policy_with())
    result = subprocess.run(
        [*_run_command(policy, workdir / "data", None), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crawlwarden: {flag} (CRAWLWARDEN_"), last
    assert says in last and "secret" not in last


@pytest.mark.parametrize(
    ("listen", "admin", "clash"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),  # the IPv4 wildcard holds every IPv4 address
        ("::", "127.0.0.1", True),  # the IPv6 wildcard is dual-stack
        ("0.0.0.0", "::1", False),  # (review: refused, though both bind)
        ("127.0.0.1", "127.0.0.2", False),
        ("localhost", "127.0.0.1", True),  # a name binds what it resolves to (review)
        ("localhost", "127.0.0.2", False),
        ("", "127.0.0.1", True),  # an empty host binds every address
    ],
)
def test_proxy_and_admin_on_one_port_clash_only_where_their_addresses_do(
    listen: str, admin: str, clash: bool
):
    settings = Settings(Path("p.yaml"), listen_host=listen, admin_host=admin, admin_port=8080)
    assert (address_problem(settings) is not None) is clash


@pytest.mark.parametrize(
    ("dsn", "bad"),
    [
        ("postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write", False),
        ("postgresql://u:p@db/name", False),
        ("postgresql://u@h1:5432,h2:abc/db", True),
    ],
)
def test_an_audit_dsn_with_several_hosts_is_taken(dsn: str, bad: bool):
    # Review: `urlsplit(...).port` refused the failover form asyncpg and libpq take.
    problem = address_problem(Settings(Path("p.yaml"), audit_dsn=dsn))
    assert (problem is not None) is bad, problem


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CRAWLWARDEN_DRAIN_SECONDS", "abc", "'abc' is not a number of seconds (0 or more)"),
        ("CRAWLWARDEN_DRAIN_SECONDS", "-1", "'-1' is not a number of seconds (0 or more)"),
        ("CRAWLWARDEN_LOG_LEVEL", "TRACE", "'TRACE' is not one of DEBUG, INFO, WARNING, ERROR"),
        ("CRAWLWARDEN_FLEET_SIZE", "0", "'0' is not a whole number of at least 1"),
        # (was "argument --listen: ..." from argparse, naming a flag the user never gave)
        ("CRAWLWARDEN_LISTEN", "8080", "'8080' is not HOST:PORT (e.g. 127.0.0.1:8080)"),
        ("CRAWLWARDEN_ADMIN", "x:0", "'x:0' is not HOST:PORT (e.g. 127.0.0.1:8080)"),
    ],
)
def test_a_bad_value_in_the_environment_is_a_usage_error_naming_it(
    workdir: Path, variable: str, value: str, says: str
):
    policy = write_policy(workdir / "policy.yaml", policy_with())
    env = {**os.environ, variable: value}
    result = run_command(
        [CRAWLWARDEN, "run", "--policy", str(policy), "--data-dir", str(workdir / "data")],
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"crawlwarden: {variable}: {says}"
    # Only `run` reads it: `policy check` (kubectl exec into that pod) and --help still work.
    check = run_command([CRAWLWARDEN, "policy", "check", str(policy)], text=True, env=env)
    assert check.returncode == 0, check.stderr


def test_the_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CRAWLWARDEN_LOG_LEVEL", "debug")
    assert parse_args(["run", "--policy", "p.yaml"]).log_level == "DEBUG"
    assert (
        parse_args(["run", "--policy", "p.yaml", "--log-level", "warning"]).log_level == "WARNING"
    )
    monkeypatch.delenv("CRAWLWARDEN_LOG_LEVEL")
    assert parse_args(["run", "--policy", "p.yaml"]).log_level == "INFO"


def test_a_full_fetch_log_spool_fails_closed_naming_its_key_and_loses_nothing(
    workdir: Path, site: Site
):
    # The store held by another writer (a long backup, a stuck PostgreSQL): records wait in
    # the spool, and past audit.spool_max_bytes nothing more is fetched until it drains.
    policy = policy_with(audit={"spool_max_bytes": "16KB"})
    with Gateway(workdir, policy, name="spoolfull") as gw:
        locker = sqlite3.connect(gw.data_dir / "fetchlog.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            refused = None
            for n in range(200):
                answer = requests.get(
                    site.url("spool.test", f"/s/{n}"),
                    proxies={"http": gw.proxy_url()},
                    headers=HEADERS,
                    timeout=10,
                )
                if answer.status_code != 200:
                    refused = answer
                    break
            assert refused is not None, "the spool never filled"
            assert refused.status_code == 503, refused.text
            assert refused.headers["x-crawlwarden-reason"] == "audit_unavailable"
            assert refused.headers["retry-after"] == "30"
            assert refused.json()["rule"] == "audit.spool_max_bytes"
            # The replica is not ready: the scraper's next connection goes to another one.
            assert refused.headers["connection"] == "close"
            forwarded = site.count()
            assert forwarded == n  # the refused one never reached the site
            # A flood of refusals (with and without credentials) while it is full: recorded
            # one by one up to 10 % past the limit, then only counted; the spool stays bounded.
            flood = 150
            for k in range(flood):
                requests.get(
                    site.url("spool.test", f"/flood/{k}"),
                    proxies={"http": gw.proxy_url() if k % 2 else gw.proxy},
                    headers=HEADERS,
                    timeout=10,
                )
            spool_bytes = gw.metric("crawlwarden_audit_spool_bytes")
            assert 16_000 <= spool_bytes <= 16_000 * 1.1 + 2_000, spool_bytes
            not_kept = gw.metric("crawlwarden_audit_records_total", outcome="not_kept")
            assert not_kept > 0
            assert site.count() == forwarded
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        refused_after: list[int] = []

        def fetches_again() -> bool:
            status = requests.get(
                site.url("spool.test", "/after"),
                proxies={"http": gw.proxy_url()},
                headers=HEADERS,
                timeout=10,
            ).status_code
            if status != 200:
                refused_after.append(status)
            return status == 200

        assert wait_for(fetches_again, timeout=30)
        records = gw.fetch_records(site="spool.test")
        not_kept = gw.metric("crawlwarden_audit_records_total", outcome="not_kept")
        # Refusals without credentials past their address's share: counted into an event of
        # their own when their window ends (tests/test_audit_unauthenticated.py).
        no_team = gw.metric("crawlwarden_audit_records_total", outcome="counted_unauthenticated")
    forwarded_paths = {r["url"].rsplit("/", 1)[1] for r in records if r["decision"] == "forwarded"}
    assert {str(k) for k in range(n)} <= forwarded_paths  # every fetch before it was kept
    assert any(r["reason"] == "audit_unavailable" for r in records)
    # What was only counted is on the record once the spool had room: every refusal is
    # either a record of its own or in the count.
    [summary] = [r for r in gw.export() if r.get("kind") == "refusals_not_kept"]
    counted = json.loads(summary["note"])
    assert counted["refused"] == not_kept
    # (the refusals without credentials have no site: not in `records`)
    kept = [
        r
        for r in gw.export()
        if r.get("type") == "record"
        and r["decision"] == "refused"
        and r["url"].split("/")[3] in ("flood", "after")
    ]
    assert no_team > 0
    assert len(kept) + not_kept + no_team == flood + len(refused_after)
    reasons = {(c["team"], c["reason"]) for c in counted["by_team_site_reason"]}
    assert reasons <= {(TEAM, "audit_unavailable"), ("-", "auth_required")}
    assert summary["reason"] == "spool_full" and summary["decision"] == "event"


def test_a_gateway_whose_log_reader_went_away_still_stops_on_sigterm(workdir: Path, site: Site):
    # `crawlwarden run | tee`, a log shipper that died: the drain's first log line raised
    # BrokenPipeError, the drain ended there, and every later SIGTERM was ignored (the gateway
    # went on serving). Log lines that cannot be written are dropped now.
    policy = write_policy(workdir / "policy.yaml", policy_with())
    admin = free_port()
    proc = subprocess.Popen(
        [*_run_command(policy, workdir / "data", admin_port=admin), "--drain-seconds", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for(lambda: _healthy(admin), timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()  # the reader goes away
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthy(admin_port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def test_a_sqlite_fetch_log_the_gateway_cannot_write_is_named(workdir: Path):
    policy = write_policy(workdir / "policy.yaml", policy_with())
    data = workdir / "data"
    with Gateway(workdir, policy_with(), name="unwritable", data_dir=data):
        pass  # a fetch log of its own, then stopped
    sqlite = data / "fetchlog.sqlite3"
    assert sqlite.exists()
    with unwritable(sqlite):
        result = _run_briefly(policy, data)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crawlwarden: cannot open the SQLite fetch log file {sqlite} "), last
    assert "write access" in last


def test_a_second_gateway_with_the_same_replica_id_and_data_dir_refuses_to_start(
    workdir: Path, site: Site
):
    with Gateway(workdir, policy_with(), name="gw-twin") as first:
        twin = run_command(
            [
                CRAWLWARDEN,
                "run",
                "--policy",
                str(first.policy_file),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--admin",
                f"127.0.0.1:{free_port()}",
                "--data-dir",
                str(first.data_dir),
                "--replica-id",
                "gw-twin",
            ],
            text=True,
            timeout=60,
        )
        assert twin.returncode == 1
        last = twin.stderr.strip().splitlines()[-1]
        assert last.startswith("crawlwarden: the spool ") and "is in use by another" in last, last
        # The first one is untouched and still records.
        result = requests.get(
            site.url("site-a.test", "/twin"), proxies={"http": first.proxy_url()}, headers=HEADERS
        )
        assert result.status_code == 200


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` at `path`, to fill up for real (root only: mount needs it)."""
    # Under CI=true a failure, never a silent skip (CI runs as root on this kind of machine).
    cannot = pytest.fail if IN_CI else pytest.skip
    if os.geteuid() != 0:
        cannot("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        cannot(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Fill the disk to its last byte; remove the returned file to free it again."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_neither_loses_a_delivered_answer_nor_needs_a_restart(
    workdir: Path, site: Site
):
    # Three faults of a disk that fills under the spool and frees again: an answer the
    # scraper received was recorded "interrupted, its response is unknown"; its open begin
    # then kept its spool segment for the life of the process, so with a small
    # audit.spool_max_bytes the gateway refused everything until restarted; and refusals
    # that could not be written left no trace (not even counted).
    gate = threading.Event()
    big = os.urandom(17 * 2**20)  # past the 16 MiB buffer: streamed, delivered as it comes
    small = b"small answer " * 400

    def held(body: bytes):
        def reply(_seen):
            gate.wait(20)
            return Reply(body=body)

        return reply

    site.routes["/small"] = held(small)
    site.routes["/big"] = held(big)
    policy = policy_with(audit={"spool_max_bytes": "64KB"})
    answers: dict[str, requests.Response] = {}
    refusals: list[str] = []  # request ids of the gateway's 503s
    with small_disk(workdir / "disk") as disk:
        with Gateway(workdir, policy, name="diskfull", data_dir=disk / "data") as gw:

            def fetch(path: str) -> requests.Response:
                answer = requests.get(
                    site.url("disk.test", path),
                    proxies={"http": gw.proxy_url()},
                    headers=HEADERS,
                    timeout=30,
                )
                if answer.status_code == 503:
                    refusals.append(answer.headers["x-crawlwarden-request-id"])
                return answer

            def held_fetch(path: str) -> None:
                # (a long URL: its record needs a page of the disk of its own, not the rest of
                # one the spool holds already)
                answers[path] = fetch(path + "?pad=" + "x" * 6000)

            clients = [threading.Thread(target=held_fetch, args=(p,)) for p in ("/small", "/big")]
            try:
                for client in clients:
                    client.start()
                assert wait_for(lambda: len(site.seen) == 2)  # both begun in the spool, forwarded
                filler = fill(disk)
                gate.set()
                for client in clients:
                    client.join(30)
                refused = [fetch(f"/while-full/{k}") for k in range(5)]
                filler.unlink()
                # A buffered answer is not delivered while its record cannot be written ...
                assert answers["/small"].status_code == 503, answers["/small"].text
                assert answers["/small"].headers["x-crawlwarden-reason"] == "audit_unavailable"
                # ... one streamed past the buffer had gone out: its record waits for room.
                assert answers["/big"].status_code == 200
                assert answers["/big"].content == big
                assert {r.headers["x-crawlwarden-reason"] for r in refused} == {"audit_unavailable"}
                # Room again: fetching resumes without a restart, and the spool is retired as it
                # is shipped, however often its limit is passed (a 503 while the store is behind
                # is the limit at work; one that lasts is a spool that is never retired).
                for k in range(150):  # some 4 times audit.spool_max_bytes of records
                    path = f"/after/{k}"
                    assert wait_for(lambda: fetch(path).status_code == 200, timeout=15), k  # noqa: B023
                # ready again once the spool is shipped (at the instant after the last fetch
                # it may be past its limit again: the limit at work; it failed so in CI once)
                assert wait_for(lambda: gw.admin_request("GET", "/readyz")[0] == 200, timeout=15)
            finally:  # a failed test leaves no request held, no disk full
                gate.set()
                (disk / "filler").unlink(missing_ok=True)
        records = {r["id"]: r for r in gw.export() if r.get("type") == "record"}
    kept = records[answers["/small"].headers["x-crawlwarden-request-id"]]
    assert (kept["decision"], kept["reason"], kept["status"]) == (
        "withheld",
        "audit_unavailable",
        200,
    )
    assert (kept["response_bytes"], kept["content_sha256"]) == (
        len(small),
        hashlib.sha256(small).hexdigest(),
    )
    streamed = records[answers["/big"].headers["x-crawlwarden-request-id"]]
    assert (streamed["decision"], streamed["status"]) == ("forwarded", 200)
    assert streamed["content_sha256"] == hashlib.sha256(big).hexdigest()
    assert not [r for r in records.values() if r["reason"] == "interrupted"]
    # Every refusal is on the record: one by one, or counted in a refusals_not_kept event.
    counted = [r for r in records.values() if r.get("kind") == "refusals_not_kept"]
    assert sum(json.loads(r["note"])["refused"] for r in counted) == len(
        [i for i in refusals if i not in records]
    )
    assert not {r.headers["x-crawlwarden-request-id"] for r in refused} & set(records)
