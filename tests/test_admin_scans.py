"""The admin API's scans of the fetch log, one at a time: while a report (an auditor's) or a
team's usage is being counted (on a replica; in shared mode anywhere in the fleet), the next
such request is a 429 with `Retry-After`, and the first still answers. A real gateway on a real
PostgreSQL fetch log; the scans are kept waiting by a lock on the records table, taken and let
go by `psql`."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import requests

from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import own_redis  # noqa: F401 - fixture
from tests.pg_fixtures import pg_admin_dsn  # noqa: F401 - fixture
from tests.pg_fixtures import pg_dsn  # noqa: F401 - fixture
from tests.support import AUDITOR_TOKEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import Site
from tests.support import policy_with
from tests.support import wait_for
from tests.test_fleet import signing_keys

_LOCKER = "crawlwarden-test-lock"


def _psql(dsn: str, sql: str) -> str:
    done = subprocess.run(
        ["psql", dsn, "-At", "-c", sql], capture_output=True, text=True, timeout=20, check=True
    )
    return done.stdout.strip()


class _Lock:
    """The fetch_records table locked (ACCESS EXCLUSIVE) by a psql session until let go."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.proc = subprocess.Popen(
            [
                "psql",
                dsn,
                "-c",
                "BEGIN; LOCK TABLE fetch_records IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PGAPPNAME": _LOCKER},
        )
        taken = (
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'fetch_records' AND l.mode = 'AccessExclusiveLock' AND l.granted"
        )
        assert wait_for(lambda: _psql(dsn, taken) == "1", timeout=10)

    def waiting(self, like: str) -> int:
        """Queries kept waiting by the lock whose text has `like` in it."""
        return int(
            _psql(
                self.dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() "  # (other tests' run in theirs at once)
                f"AND query LIKE '%{like}%'",  # (a constant of the test's)
            )
        )

    def let_go(self) -> None:
        # (its backend would hold the lock through pg_sleep with its client gone)
        _psql(
            self.dsn,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = '{_LOCKER}' AND datname = current_database()",
        )
        self.proc.kill()
        self.proc.wait(10)


def _in_thread(get: Any) -> tuple[threading.Thread, dict[str, requests.Response]]:
    out: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: out.setdefault("answer", get()))
    thread.start()
    return thread, out


def test_reports_and_usage_counts_are_made_one_at_a_time(
    workdir: Path,
    site: Site,
    pg_dsn: str,  # noqa: F811
) -> None:
    private, _ = signing_keys(workdir)
    policy = policy_with(audit={"signing_key_file": str(private)})
    with Gateway(workdir, policy, extra_args=["--audit-dsn", pg_dsn]) as gw:
        for team, token in ((TEAM, TEAM_TOKEN), (OTHER_TEAM, OTHER_TOKEN)):
            r = requests.get(
                site.url("site-a.test", f"/{team}"),
                proxies={"http": gw.proxy_url(team, token)},
                headers={"X-Crawl-Project": PROJECT} if team == TEAM else {},
                timeout=10,
            )
            assert r.status_code == 200, r.text
        fetched = "SELECT count(*) FROM fetch_records WHERE kind = 'fetch'"
        assert wait_for(lambda: _psql(pg_dsn, fetched) == "2", timeout=10)
        auditor = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}

        def report() -> requests.Response:
            return requests.get(gw.admin + "/v1/reports/sites", headers=auditor, timeout=60)

        def usage(team: str, token: str) -> requests.Response:
            return requests.get(gw.admin + "/v1/usage", auth=(team, token), timeout=60)

        lock = _Lock(pg_dsn)
        try:
            first, made = _in_thread(report)
            # (the report is one statement; pg_stat_activity keeps its first 1 KB of text)
            assert wait_for(lambda: lock.waiting("WITH r AS MATERIALIZED") == 1, timeout=20)
            second = report()
            assert second.status_code == 429, second.text
            assert second.headers["Retry-After"] == "5"
            assert "a report is being made" in second.json()["error"], second.text

            counting, counted = _in_thread(lambda: usage(TEAM, TEAM_TOKEN))
            assert wait_for(lambda: lock.waiting("GROUP BY site, project") == 1, timeout=20)
            again = usage(TEAM, TEAM_TOKEN)
            assert again.status_code == 429 and again.headers["Retry-After"] == "5", again.text
            other, other_counted = _in_thread(lambda: usage(OTHER_TEAM, OTHER_TOKEN))
            assert wait_for(lambda: lock.waiting("GROUP BY site, project") == 2, timeout=20)
        finally:
            lock.let_go()
        for thread in (first, counting, other):
            thread.join(60)
        assert made["answer"].status_code == 200, made["answer"].text
        assert {s["site"] for s in made["answer"].json()["sites"]} == {"site-a.test"}
        assert counted["answer"].status_code == 200, counted["answer"].text
        assert other_counted["answer"].status_code == 200, other_counted["answer"].text
        assert report().status_code == 200  # (the first one is done: the next one is taken)


def _shared_mode(workdir: Path, dsn: str, redis: RedisServer) -> tuple[dict[str, Any], list[str]]:
    """A policy with a signing key of its own, and a gateway's arguments for shared mode."""
    private, _ = signing_keys(workdir)
    policy = policy_with(audit={"signing_key_file": str(private)})
    return policy, ["--audit-dsn", dsn, "--redis-url", redis.url]


def test_a_team_counts_one_window_at_a_time_across_the_fleet(
    workdir: Path,
    pg_dsn: str,  # noqa: F811
    own_redis: RedisServer,  # noqa: F811
) -> None:
    # A team polling through the fleet's Service reaches every replica: one count at a time
    # per replica still let it keep a PostgreSQL connection busy on each. In shared mode the
    # replicas now agree through Redis: the team's next count, on another replica, is a 429
    # too, as is a second report; another team's count goes on.
    policy, shared = _shared_mode(workdir, pg_dsn, own_redis)
    with (
        Gateway(workdir, policy, name="gw-a", extra_args=shared) as a,
        Gateway(workdir, policy, name="gw-b", extra_args=shared) as b,
    ):
        auditor = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}

        def usage(gw: Gateway, team: str, token: str) -> requests.Response:
            return requests.get(gw.admin + "/v1/usage", auth=(team, token), timeout=60)

        def report(gw: Gateway) -> requests.Response:
            return requests.get(gw.admin + "/v1/reports/sites", headers=auditor, timeout=60)

        lock = _Lock(pg_dsn)
        try:
            counting, counted = _in_thread(lambda: usage(a, TEAM, TEAM_TOKEN))
            assert wait_for(lambda: lock.waiting("GROUP BY site, project") == 1, timeout=20)
            elsewhere = usage(b, TEAM, TEAM_TOKEN)
            assert elsewhere.status_code == 429, elsewhere.text
            assert elsewhere.headers["Retry-After"] == "5"
            assert "being counted for an earlier request" in elsewhere.json()["error"]
            other, other_counted = _in_thread(lambda: usage(b, OTHER_TEAM, OTHER_TOKEN))
            assert wait_for(lambda: lock.waiting("GROUP BY site, project") == 2, timeout=20)

            first, made = _in_thread(lambda: report(b))
            assert wait_for(lambda: lock.waiting("WITH r AS MATERIALIZED") == 1, timeout=20)
            second = report(a)
            assert second.status_code == 429 and "a report is being made" in second.text
        finally:
            lock.let_go()
        for thread in (counting, other, first):
            thread.join(60)
        assert counted["answer"].status_code == 200, counted["answer"].text
        assert other_counted["answer"].status_code == 200, other_counted["answer"].text
        assert made["answer"].status_code == 200, made["answer"].text
        # let go once answered: the team counts again, on the other replica
        assert usage(b, TEAM, TEAM_TOKEN).status_code == 200
        assert report(a).status_code == 200


def test_without_redis_a_replica_counts_one_at_a_time_alone_and_says_so(
    workdir: Path,
    pg_dsn: str,  # noqa: F811
    own_redis: RedisServer,  # noqa: F811
) -> None:
    # Redis down: a team's usage stays readable (counted one at a time on this replica only),
    # and the log says the fleet-wide rule is off.
    policy, shared = _shared_mode(workdir, pg_dsn, own_redis)
    with Gateway(workdir, policy, extra_args=shared) as gw:
        own_redis.kill()
        answer = requests.get(gw.admin + "/v1/usage", auth=(TEAM, TEAM_TOKEN), timeout=60)
        assert answer.status_code == 200, answer.text
        [said] = gw.log_events("counting_unshared")
        assert said["count"] == f"usage:{TEAM}" and "ConnectionError" in said["error"], said
