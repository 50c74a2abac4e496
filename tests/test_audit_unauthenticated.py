"""Refusals of no team's past a rate per client address: counted, recorded as one event
(proxy/audit/unauthenticated.py), in the fetch log on a real SQLite store and through a real
gateway."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from proxy.audit.log import FetchLogClosed
from proxy.audit.sqlite_store import SQLiteStore
from proxy.audit.unauthenticated import UnauthenticatedLimits
from proxy.audit.unauthenticated import UnauthenticatedRefusals
from tests.support import Gateway
from tests.support import Site
from tests.support import policy_with
from tests.test_audit_log import stored
from tests.test_audit_support import cli
from tests.test_audit_support import fetch
from tests.test_audit_support import fetch_log


def refusal(client: str, reason: str = "auth_required"):
    return fetch(0, decision="refused", reason=reason, team=None, project=None, client_ip=client)


def counted_metric() -> float:
    return (
        REGISTRY.get_sample_value(
            "crawlwarden_audit_records_total", {"outcome": "counted_unauthenticated"}
        )
        or 0.0
    )


def test_each_address_has_its_share_of_a_window_recorded_one_by_one() -> None:
    counts = UnauthenticatedRefusals(UnauthenticatedLimits(per_window=3, window=60))
    admitted = [counts.admit(refusal("192.0.2.1"), 0.0) for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    assert counts.admit(refusal("192.0.2.2"), 1.0)  # another address has its own share
    # An IPv6 host has its whole /64 to rotate through: one share for it.
    assert [counts.admit(refusal(f"2001:db8::{i}"), 2.0) for i in range(1, 5)] == [
        True,
        True,
        True,
        False,
    ]
    assert not counts.admit(refusal("192.0.2.1", "bad_request"), 3.0)
    assert not counts.due(59.9)
    assert counts.due(60.0)
    note = json.loads(counts.note())
    assert note["refused"] == 4
    assert note["by_client_reason"] == [
        {"client": "192.0.2.1", "count": 2, "reason": "auth_required"},
        {"client": "192.0.2.1", "count": 1, "reason": "bad_request"},
        {"client": "2001:db8::/64", "count": 1, "reason": "auth_required"},
    ]
    counts.recorded_event(60.0)
    assert counts.total == 0 and not counts.due(10**6)
    assert counts.admit(refusal("192.0.2.1"), 61.0)  # a new window: a new share


def test_an_event_names_a_bounded_number_of_addresses_and_the_window_goes_on() -> None:
    counts = UnauthenticatedRefusals(
        UnauthenticatedLimits(per_window=1, window=60, event_clients=2, max_clients=3)
    )
    for client in ("192.0.2.1", "192.0.2.2"):
        assert counts.admit(refusal(client), 0.0)
        assert not counts.admit(refusal(client), 0.0)
    assert counts.due(1.0)  # two addresses counted: one event's worth
    counts.recorded_event(1.0)
    assert not counts.admit(refusal("192.0.2.1"), 2.0)  # still past its share of the window
    assert not counts.due(2.0)
    # Memory stays bounded (review): past max_clients addresses, and past event_clients pairs
    # while the counts cannot be written (a full disk: no event, so on counting), the rest
    # are counted together as _other, never recorded one by one.
    assert counts.admit(refusal("192.0.2.3"), 3.0)
    assert not counts.admit(refusal("192.0.2.4"), 3.0)
    assert not counts.admit(refusal("192.0.2.1", "bad_request"), 3.0)
    assert sorted(counts.counted.items()) == [
        (("192.0.2.1", "auth_required"), 1),
        (("_other", "auth_required"), 1),
        (("_other", "bad_request"), 1),
    ]
    assert len(counts.recorded) == 3
    counts.recorded_event(61.0)
    assert counts.admit(refusal("192.0.2.4"), 62.0)  # a new window follows it


def test_a_window_records_a_bounded_number_of_all_addresses() -> None:
    # More /64s than anyone should have: each had its own share, all recorded one by one.
    counts = UnauthenticatedRefusals(UnauthenticatedLimits(per_window=5, recorded_per_window=3))
    admitted = [counts.admit(refusal(f"2001:db8:0:{i}::1"), 0.0) for i in range(5)]
    assert admitted == [True, True, True, False, False]
    assert counts.total == 2


async def test_the_fetch_log_records_a_share_and_counts_the_rest_into_one_event(
    tmp_path: Path,
) -> None:
    now = [1_800_000_000.0]
    log = fetch_log(
        SQLiteStore(tmp_path / "fetchlog.sqlite3"),
        tmp_path / "spool",
        "gw",
        None,
        fsync_interval=0.05,
        clock=lambda: now[0],
    )
    before = counted_metric()
    await log.open()
    try:
        flood = [log.append(refusal("192.0.2.7")) for _ in range(50)]
        assert sum(d is not None for d in flood) == 20  # the rest counted, not raised
        assert all(log.append(refusal("192.0.2.8")) is not None for _ in range(3))
        # A team's refusals are always recorded one by one.
        team = [log.append(fetch(0, client_ip="192.0.2.7")) for _ in range(30)]
        assert all(d is not None for d in team)
        assert counted_metric() - before == 30
        now[0] += 60  # the window ends in quiet: recorded without waiting for a request
        for _ in range(100):
            if any(r["kind"] == "unauthenticated_refusals" for r in log._queue):
                break
            await asyncio.sleep(0.05)
        assert log.append(refusal("192.0.2.7")) is not None  # a new window, a new share
        for _ in range(25):
            log.append(refusal("192.0.2.7"))
        assert await log.flushed()
    finally:
        await log.close(timeout=2)  # records what the window under way counted
    with pytest.raises(FetchLogClosed):  # not counted into nothing (review)
        log.append(refusal("192.0.2.7"))
    records = stored(tmp_path, "gw")
    events = [r for r in records if r["kind"] == "unauthenticated_refusals"]
    assert [json.loads(e["note"])["by_client_reason"] for e in events] == [
        [{"client": "192.0.2.7", "count": 30, "reason": "auth_required"}],
        [{"client": "192.0.2.7", "count": 6, "reason": "auth_required"}],
    ]
    alone = [r for r in records if r["kind"] == "fetch" and r["team"] is None]
    assert len(alone) == 20 + 3 + 20
    assert counted_metric() - before == 36


def test_a_flood_without_credentials_through_the_gateway_is_counted_not_recorded_each(
    workdir: Path,
) -> None:
    with Site() as site, Gateway(workdir, policy_with()) as gw:
        request = (
            f"GET http://site-a.test:{site.port}/a.jpg HTTP/1.1\r\n"
            f"Host: site-a.test:{site.port}\r\n\r\n"
        ).encode()
        for source, n in (("127.0.3.7", 60), ("127.0.3.8", 5)):
            for _ in range(n):
                with socket.create_connection(
                    ("127.0.0.1", gw.port), timeout=10, source_address=(source, 0)
                ) as sock:
                    sock.sendall(request)
                    assert sock.recv(4096).startswith(b"HTTP/1.1 407 ")
        assert gw.metric("crawlwarden_audit_records_total", outcome="counted_unauthenticated") == 40
        assert site.connections == 0
        assert gw.stop() == 0
        records = gw.export()
    refused = [r for r in records if r.get("reason") == "auth_required"]
    assert sorted((r["client_ip"], r["team"], r["project"]) for r in refused) == sorted(
        [("127.0.3.7", None, None)] * 20 + [("127.0.3.8", None, None)] * 5
    )
    [event] = [r for r in records if r.get("kind") == "unauthenticated_refusals"]
    note = json.loads(event["note"])
    assert note["refused"] == 40
    assert note["by_client_reason"] == [
        {"client": "127.0.3.7", "count": 40, "reason": "auth_required"}
    ]
    # The report's figure of requests refused before a site was known has them all.
    report = cli("report", "--data-dir", gw.data_dir, "--format", "json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["totals"]["refused_without_site"] == 65
