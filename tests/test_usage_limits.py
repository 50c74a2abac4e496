"""What a team's usage requests may cost the fetch-log store (a real gateway, real PostgreSQL).

A team's usage over a long window is a scan of all its records in the window. A poll that gave
up (curl --max-time, a scraper's short timeout) left its query running to the end, and nothing
bounded how many ran at once: four abandoned requests kept eleven PostgreSQL backends busy
(fleet-scale probe), so one team's credentials could fill the server's connections that the
fleet's fetch-log writes need. Now a team counts one window at a time (429 for the
next meanwhile) and a request whose client has gone stops its query.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import asyncpg
import requests

from tests import pg_fixtures
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import policy_with
from tests.test_fleet import signing_keys

pg_admin_dsn = pg_fixtures.pg_admin_dsn
pg_dsn = pg_fixtures.pg_dsn

ROWS = 300_000
# A team's records, written as the gateway writes them (fields the usage reads included).
FILL = """
INSERT INTO fetch_records (replica, seq, id, ts, kind, site, team, project, decision, reason,
    url, content_sha256, hash, body)
SELECT 'syn', g, md5(g::text), now() - g * interval '1 second', 'fetch', 's' || (g % 40), $1,
    'p', 'forwarded', 'ok', 'https://s.test/' || g, NULL, md5(g::text),
    json_build_object('kind', 'fetch', 'decision', 'forwarded', 'method', 'GET', 'status', 200,
        'response_bytes', 1000, 'site', 's' || (g % 40), 'team', $1::text, 'project', 'p',
        'url', 'https://s.test/' || g, 'ts', 'x')::text
FROM generate_series(1, $2::int) AS g
"""
LONG = "/v1/usage?since=2000-01-01"


def usage_queries_running(dsn: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(
                await conn.fetchval(
                    # (this test's database only: other tests' run in theirs at once)
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND datname = current_database() "
                    "AND query LIKE 'SELECT site, project, decision, reason%' "
                    "AND backend_type = 'client backend'"
                )
            )
        finally:
            await conn.close()

    return asyncio.run(count())


def test_a_team_counts_one_window_at_a_time_and_a_request_given_up_stops_its_query(
    workdir: Path, pg_dsn: str
) -> None:
    private, _ = signing_keys(workdir)
    policy = policy_with(audit={"signing_key_file": str(private)})
    with Gateway(workdir, policy, extra_args=["--audit-dsn", pg_dsn]) as gw:

        async def fill() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(FILL, TEAM, ROWS)
                await conn.execute("ANALYZE fetch_records")
            finally:
                await conn.close()

        asyncio.run(fill())

        answers: list[requests.Response] = []
        first = threading.Thread(
            target=lambda: answers.append(
                requests.get(gw.admin + LONG, auth=(TEAM, TEAM_TOKEN), timeout=60)
            )
        )
        first.start()
        deadline = time.monotonic() + 10
        while usage_queries_running(pg_dsn) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.is_alive(), "the first count ended before the second request was sent"
        again = requests.get(gw.admin + LONG, auth=(TEAM, TEAM_TOKEN), timeout=10)
        assert again.status_code == 429 and again.headers["Retry-After"] == "5", again.text[:300]
        other = requests.get(gw.admin + LONG, auth=(OTHER_TEAM, OTHER_TOKEN), timeout=30)
        assert other.status_code == 200  # another team is not held up
        first.join(60)
        [answer] = answers
        assert answer.status_code == 200 and answer.json()["totals"]["requests"] == ROWS

        for _ in range(3):  # polls that give up, one after the other
            try:
                requests.get(gw.admin + LONG, auth=(TEAM, TEAM_TOKEN), timeout=0.5)
            except requests.Timeout:
                pass
        time.sleep(1.0)
        running = usage_queries_running(pg_dsn)
        assert running == 0, f"{running} usage queries still running for clients that left"
        # and the team can count again at once: the one it gave up on holds nothing
        assert requests.get(gw.admin + "/v1/usage", auth=(TEAM, TEAM_TOKEN), timeout=30).ok
