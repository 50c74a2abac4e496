"""A fleet as the Helm chart runs it: 3 gateway processes, one Redis, one PostgreSQL, on loopback.

Scrapers are spread over the replicas. Budgets must hold exactly across replicas (one Lua script
per request against Redis TIME), site pauses are cluster-wide, and every fetch is in the shared,
signed fetch log with each replica's chain intact.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import redis_server  # noqa: F401 - fixture
from tests.forked_gateways import run_command
from tests.pg_fixtures import pg_admin_dsn  # noqa: F401 - fixture
from tests.pg_fixtures import pg_dsn  # noqa: F401 - fixture
from tests.support import CRAWLWARDEN
from tests.support import PROJECT
from tests.support import Gateway
from tests.support import Reply
from tests.support import Site
from tests.support import policy_with

HEADERS = {"X-Crawl-Project": PROJECT}

SITES = [
    {"id": "quota", "match": ["quota.test"], "requests_per_day": 100},
    {"id": "rate", "match": ["rate.test"], "rate": "20/s", "burst": 5},
    {"id": "conc", "match": ["conc.test"], "max_concurrency": 2},
    {"id": "pause", "match": ["pause.test"]},
]


@dataclass
class Answer:
    status: int
    reason: str | None
    retry_after: str | None
    replica: int
    at: float


def drive(
    gateways: list[Gateway],
    urls: list[str],
    threads: int,
    *,
    until: float | None = None,
    timeout: float = 30,
) -> list[Answer]:
    """Send every URL once (or loop over them until `until`), spread over the replicas."""
    answers: list[Answer] = []
    lock = threading.Lock()
    queue = list(urls)

    def worker(n: int) -> None:
        sessions = [requests.Session() for _ in gateways]
        i = n
        while True:
            with lock:
                if until is None:
                    if not queue:
                        return
                    url = queue.pop()
                elif time.monotonic() >= until:
                    return
                else:
                    url = urls[i % len(urls)]
            replica = i % len(gateways)
            i += 1
            try:
                r = sessions[replica].get(
                    url,
                    proxies={"http": gateways[replica].proxy_url()},
                    headers=HEADERS,
                    timeout=timeout,
                )
            except requests.RequestException:
                continue
            with lock:
                answers.append(
                    Answer(
                        r.status_code,
                        r.headers.get("X-Crawlwarden-Reason"),
                        r.headers.get("Retry-After"),
                        replica,
                        time.monotonic(),
                    )
                )

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    return answers


def signing_keys(directory: Path) -> tuple[Path, Path]:
    private, public = directory / "audit.key", directory / "audit.pub"
    run_command(
        [CRAWLWARDEN, "keys", "generate", "--private", str(private), "--public", str(public)],
        check=True,
    )
    return private, public


def export_and_verify(dsn: str, public: Path, out: Path) -> list[dict]:
    """Export the live log once every record in it is signed (each replica signs every second
    here), and verify it."""
    deadline = time.monotonic() + 20
    while True:
        run_command(
            [CRAWLWARDEN, "audit", "export", "--audit-dsn", dsn, "--output", str(out)],
            check=True,
        )
        verify = run_command(
            [CRAWLWARDEN, "audit", "verify", str(out), "--public-key", str(public)],
            text=True,
        )
        unsigned = "come after the last checkpoint" in verify.stdout.split("\n", 1)[0]
        if verify.returncode == 0 or not unsigned or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return [
        line
        for line in map(json.loads, out.read_text().splitlines())
        if line.get("type") == "record"
    ]


@pytest.fixture(scope="module")
def fleet_site() -> Iterator[Site]:
    with Site() as s:
        yield s


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,  # noqa: F811
    pg_admin_dsn: str,  # noqa: F811
) -> Iterator[tuple[list[Gateway], str, Path]]:
    import asyncpg

    from tests.pg_fixtures import dsn_for
    from tests.pg_fixtures import run_sync

    workdir = tmp_path_factory.mktemp("fleet")
    name = f"crawlwarden_fleet_{int(time.time() * 1000)}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    run_sync(create)
    dsn = dsn_for(name)
    private, public = signing_keys(workdir)
    policy = policy_with(
        sites=SITES,
        audit={
            "signing_key_file": str(private),
            "checkpoint_every_records": 200,
            "checkpoint_every_seconds": 1,
        },
    )
    gateways = [
        Gateway(
            workdir,
            policy,
            name=f"gw{i}",
            extra_args=["--redis-url", redis_server.url, "--audit-dsn", dsn],
        )
        for i in (1, 2, 3)
    ]
    try:
        for gw in gateways:
            gw.launch()
        for gw in gateways:
            gw.wait_ready(60)
        yield gateways, dsn, public
    finally:
        for gw in gateways:
            gw.stop()
        run_sync(drop)


def next_utc_midnight_in() -> float:
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (midnight - now).total_seconds()


def test_a_daily_quota_is_exact_across_three_replicas(fleet, fleet_site: Site):
    gateways, _, _ = fleet
    urls = [fleet_site.url("quota.test", f"/q/{i}") for i in range(600)]
    answers = drive(gateways, urls, threads=30)
    assert len(answers) == 600
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 100, 429: 500}, statuses
    assert sum(1 for p in fleet_site.paths() if p.startswith("/q/")) == 100
    refused = [a for a in answers if a.status == 429]
    assert {a.reason for a in refused} == {"quota_requests"}
    expected = next_utc_midnight_in()
    for a in refused:
        assert a.retry_after is not None
        assert abs(int(a.retry_after) - expected) <= 60  # points at the next UTC midnight
    # Every replica answered some of them.
    assert {a.replica for a in answers} == {0, 1, 2}
    status, usage = gateways[0].admin_request(
        "GET", "/v1/budgets?site=quota", token="auditor-secret-token"
    )
    assert status == 200
    assert usage["budgets"]["requests_per_day"]["used"] == 100
    assert usage["budgets"]["requests_per_day"]["remaining"] == 0


def test_a_rate_budget_holds_across_replicas(fleet, fleet_site: Site):
    gateways, _, _ = fleet
    seen_before = fleet_site.count()
    urls = [fleet_site.url("rate.test", f"/r/{i}") for i in range(50)]
    answers = drive(gateways, urls, threads=9, until=time.monotonic() + 10)
    times = sorted(s.at for s in fleet_site.seen[seen_before:] if s.path.startswith("/r/"))
    assert len(times) > 100
    window = times[-1] - times[0]
    # GCRA: the burst, then one every 50 ms. With a burst above 1, a request that arrives a
    # moment after its slot does not lose the slot, so saturation reaches the allowance.
    allowance = 5 + 20 * window
    assert abs(len(times) - allowance) <= 0.05 * allowance, (len(times), allowance)
    refused = [a for a in answers if a.status == 429]
    assert refused and {a.reason for a in refused} == {"rate_limited"}


def test_concurrency_never_exceeds_the_budget(fleet, fleet_site: Site):
    gateways, _, _ = fleet
    fleet_site.routes["/slow"] = Reply(body=b"slow", delay=0.4)
    fleet_site.max_active = 0
    urls = [fleet_site.url("conc.test", "/slow")] * 60
    answers = drive(gateways, urls, threads=12)
    assert fleet_site.max_active <= 2
    statuses = Counter(a.reason for a in answers if a.status == 429)
    assert statuses["concurrency"] > 0
    assert sum(1 for a in answers if a.status == 200) >= 2


def test_a_site_answering_429_is_paused_on_every_replica(fleet, fleet_site: Site):
    gateways, _, _ = fleet
    throttled: dict[str, float] = {}

    def once_429(seen) -> Reply:
        if "at" not in throttled:
            throttled["at"] = time.monotonic()
            return Reply(status=429, body=b"slow down", headers={"Retry-After": "2"})
        return Reply(body=b"ok")

    fleet_site.routes["/p"] = once_429
    start = len(fleet_site.seen)
    answers = drive(
        gateways, [fleet_site.url("pause.test", "/p")], threads=6, until=time.monotonic() + 4
    )
    t0 = throttled["at"]
    hits = [s.at for s in fleet_site.seen[start:] if s.path == "/p"]
    # Requests already on their way when the 429 left the site may still arrive a moment later;
    # after that, no replica sends anything until the 2 seconds the site asked for are over.
    during = [t - t0 for t in hits if t0 + 0.2 < t < t0 + 1.95]
    assert during == [], during
    assert any(t > t0 + 2 for t in hits)
    paused = [a for a in answers if a.reason == "site_paused"]
    assert {a.replica for a in paused} == {0, 1, 2}
    assert all(a.retry_after and 1 <= int(a.retry_after) <= 2 for a in paused)


def test_every_fetch_of_the_fleet_is_in_the_shared_log_and_each_chain_verifies(
    fleet, fleet_site: Site, tmp_path: Path
):
    gateways, dsn, public = fleet
    urls = [fleet_site.url(f"s{i % 7}.test", f"/log/{i}") for i in range(150)]
    answers = drive(gateways, urls, threads=9)
    assert Counter(a.status for a in answers) == {200: 150}
    time.sleep(1.5)  # group commits every 0.2 s
    records = export_and_verify(dsn, public, tmp_path / "export.jsonl")
    logged = [r for r in records if r["url"].split(str(fleet_site.port), 1)[-1].startswith("/log/")]
    assert len(logged) == 150
    assert {r["replica"] for r in logged} == {"gw1", "gw2", "gw3"}
    # Everything the site served, over every test of this fleet, has a forwarded record.
    fetches = [r for r in records if r["kind"] == "fetch" and r["decision"] == "forwarded"]
    assert len(fetches) == fleet_site.count()
