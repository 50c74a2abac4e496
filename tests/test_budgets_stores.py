"""The two budget stores, held to the same behaviour: in-process and a real redis-server.

Store methods take a `now_us` for tests, so these run on a controlled clock: the Lua script is
driven through midnights and month ends exactly like the Python store. A property-based test
then runs random operation sequences on both and demands identical answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from proxy.budgets import MemoryBudgetStore
from proxy.budgets import PausePolicy
from proxy.budgets import RedisBudgetStore
from proxy.budgets import saved
from proxy.budgets import scripts
from proxy.budgets.gcra import utc_day
from proxy.budgets.gcra import utc_month
from proxy.budgets.redis_store import site_keys
from proxy.budgets.spec import Budget
from proxy.budgets.spec import BudgetSpec
from proxy.budgets.store import BudgetStore
from proxy.budgets.store import Carryover
from proxy.budgets.store import Settlement
from tests.budget_fixtures import RedisServer
from tests.budget_fixtures import key_prefix  # noqa: F401
from tests.budget_fixtures import redis_server  # noqa: F401

S = 1_000_000


def at(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp()) * S


NOON = at("2026-06-15T12:00:00+00:00")


def make_spec(**changes: Any) -> BudgetSpec:
    spec = BudgetSpec(
        key=f"{uuid.uuid4().hex[:8]}.test",
        interval_us=S // 1000,  # 1000/s: out of the way unless a test sets it
        burst=1000,
        rate_text="1000/s",
        max_concurrency=1000,
        requests_per_day=None,
        requests_per_month=None,
        bytes_per_day=None,
    )
    return replace(spec, **changes)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[BudgetStore]:  # noqa: F811
    s: BudgetStore
    if request.param == "memory":
        s = MemoryBudgetStore(lease_ttl=30.0)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisBudgetStore(server.url, key_prefix=key_prefix, lease_ttl=30.0)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def admit_n(store: BudgetStore, spec: BudgetSpec, n: int, now: int) -> list[bool]:
    return [(await store.admit(spec, f"l{i}-{now}", now_us=now)).allowed for i in range(n)]


# -- all or nothing --------------------------------------------------------------------------


async def test_a_refused_request_consumes_nothing(store: BudgetStore):
    spec = make_spec(interval_us=S, burst=5, requests_per_day=2, max_concurrency=10)
    assert await admit_n(store, spec, 2, NOON) == [True, True]
    refused = await store.admit(spec, "third", now_us=NOON)
    assert (refused.allowed, refused.budget) == (False, Budget.REQUESTS_PER_DAY)
    snap = await store.snapshot(spec.key, now_us=NOON)
    # The rate (two slots), the concurrency (two leases) and the counts moved for two only.
    assert snap.tat_us == NOON + 2 * S
    assert (snap.in_flight, snap.day_requests, snap.month_requests) == (2, 2, 2)


async def test_concurrency_refusal_consumes_no_rate_or_quota(store: BudgetStore):
    spec = make_spec(interval_us=S, burst=5, max_concurrency=1, requests_per_day=10)
    assert (await store.admit(spec, "a", now_us=NOON)).allowed
    refused = await store.admit(spec, "b", now_us=NOON)
    assert (refused.allowed, refused.budget) == (False, Budget.CONCURRENCY)
    assert refused.wait_us == S  # the short estimate, not the lease's 30 s
    snap = await store.snapshot(spec.key, now_us=NOON)
    assert (snap.tat_us, snap.day_requests, snap.in_flight) == (NOON + S, 1, 1)


async def test_a_charged_request_consumes_everything_and_names_what_it_went_past(
    store: BudgetStore,
):
    # A request admitted ahead of the store's word had gone: counted whatever the answer.
    spec = make_spec(interval_us=S, burst=1, max_concurrency=1, requests_per_day=1)
    assert (await store.admit(spec, "a", now_us=NOON)).allowed
    charged = await store.admit(spec, "b", now_us=NOON, charge=True)
    assert (charged.allowed, charged.charged) == (False, True)
    assert charged.budget is Budget.REQUESTS_PER_DAY  # of the three, the one freeing up last
    assert charged.snapshot == await store.snapshot(spec.key, now_us=NOON)
    # Its rate slot is the next one, its lease held, both counts raised.
    assert charged.snapshot.tat_us == NOON + 2 * S
    snap = charged.snapshot
    assert (snap.in_flight, snap.day_requests, snap.month_requests) == (2, 2, 2)
    # A charged request the budgets allow is an ordinary admission.
    other = make_spec()
    fine = await store.admit(other, "c", now_us=NOON, charge=True)
    assert (fine.allowed, fine.charged, fine.snapshot.day_requests) == (True, False, 1)


async def test_refusal_names_the_budget_that_frees_up_last(store: BudgetStore):
    evening = at("2026-06-15T23:00:00+00:00")
    spec = make_spec(interval_us=10 * S, burst=1, requests_per_day=1)
    assert (await store.admit(spec, "a", now_us=evening)).allowed
    # Both the rate (10 s) and the day quota (1 h) refuse: the quota is what the scraper must
    # wait for.
    refused = await store.admit(spec, "b", now_us=evening + S)
    assert refused.budget is Budget.REQUESTS_PER_DAY
    assert refused.wait_us == 3600 * S - S


async def test_ties_go_to_the_first_budget_in_check_order(store: BudgetStore):
    """Day requests and day bytes both run out at midnight: the request quota is named."""
    spec = make_spec(requests_per_day=0, bytes_per_day=0)
    refused = await store.admit(spec, "a", now_us=NOON)
    assert refused.budget is Budget.REQUESTS_PER_DAY


# -- quotas ----------------------------------------------------------------------------------


async def test_daily_quota_is_exact_and_renews_at_utc_midnight(store: BudgetStore):
    late = at("2026-06-15T23:59:50+00:00")
    spec = make_spec(requests_per_day=3)
    assert await admit_n(store, spec, 4, late) == [True, True, True, False]
    refused = await store.admit(spec, "x", now_us=late + 2 * S)
    assert refused.budget is Budget.REQUESTS_PER_DAY
    assert refused.wait_us == 8 * S  # to 00:00:00 UTC
    assert (await store.admit(spec, "y", now_us=late + 10 * S - 1)).allowed is False
    assert (await store.admit(spec, "z", now_us=late + 10 * S)).allowed is True
    snap = await store.snapshot(spec.key, now_us=late + 10 * S)
    assert (snap.day_requests, snap.month_requests) == (1, 4)


@pytest.mark.parametrize(
    ("now", "renews"),
    [
        ("2028-02-29T12:00:00+00:00", "2028-03-01T00:00:00+00:00"),
        ("2026-12-31T23:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("2026-04-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00"),
    ],
)
async def test_monthly_quota_renews_on_the_first_of_the_next_month(
    store: BudgetStore, now: str, renews: str
):
    spec = make_spec(requests_per_month=2)
    assert await admit_n(store, spec, 2, at(now)) == [True, True]
    refused = await store.admit(spec, "x", now_us=at(now) + S)
    assert refused.budget is Budget.REQUESTS_PER_MONTH
    assert refused.wait_us == at(renews) - at(now) - S
    assert (await store.admit(spec, "y", now_us=at(renews))).allowed


async def test_byte_quota_refuses_once_spent(store: BudgetStore):
    spec = make_spec(bytes_per_day=1000)
    assert (await store.admit(spec, "a", now_us=NOON)).allowed
    assert (await store.admit(spec, "b", now_us=NOON)).allowed
    await store.settle([Settlement(spec.key, "a", 600)], now_us=NOON + S)
    assert (await store.admit(spec, "c", now_us=NOON + S)).allowed  # 600 < 1000
    # The responses in flight overshoot the quota: bytes are only known afterwards.
    await store.settle(
        [Settlement(spec.key, "b", 600), Settlement(spec.key, "c", 600)], now_us=NOON + 2 * S
    )
    refused = await store.admit(spec, "d", now_us=NOON + 3 * S)
    assert refused.budget is Budget.BYTES_PER_DAY
    assert refused.wait_us == utc_day(NOON).end - NOON - 3 * S
    snap = await store.snapshot(spec.key, now_us=NOON + 3 * S)
    assert (snap.day_bytes, snap.in_flight) == (1800, 0)
    assert (await store.admit(spec, "e", now_us=utc_day(NOON).end)).allowed


async def test_carry_over_adds_to_current_periods_only(store: BudgetStore):
    spec = make_spec(requests_per_day=10)
    assert await admit_n(store, spec, 2, NOON) == [True, True]
    day, month = utc_day(NOON).id, utc_month(NOON).id
    await store.carry_over(
        [
            Carryover(spec.key, day, 7, 500, month, 7, paused_for_us=3 * S),
            Carryover(spec.key, day - 1, 50, 50, month - 1, 50),  # periods that are over
        ],
        now_us=NOON,
    )
    snap = await store.snapshot(spec.key, now_us=NOON)
    assert (snap.day_requests, snap.day_bytes, snap.month_requests) == (9, 500, 9)
    assert snap.paused_until_us == NOON + 3 * S
    assert await admit_n(store, spec, 1, NOON + 4 * S) == [True]
    assert await admit_n(store, spec, 1, NOON + 4 * S) == [False]


async def test_carry_over_at_least_raises_the_counts_and_never_lowers_them(store: BudgetStore):
    # What replicas write back after Redis lost its data: each its last view, the largest wins.
    spec = make_spec(requests_per_day=10)
    assert await admit_n(store, spec, 4, NOON) == [True] * 4
    day, month = utc_day(NOON).id, utc_month(NOON).id
    for seen in (7, 3):  # two replicas' views, in either order
        await store.carry_over(
            [Carryover(spec.key, day, seen, 100 * seen, month, seen)], now_us=NOON, at_least=True
        )
    snap = await store.snapshot(spec.key, now_us=NOON)
    assert (snap.day_requests, snap.day_bytes, snap.month_requests) == (7, 700, 7)


# -- concurrency leases ----------------------------------------------------------------------


async def test_leases_are_released_and_expire(store: BudgetStore):
    spec = make_spec(max_concurrency=2)
    assert await admit_n(store, spec, 3, NOON) == [True, True, False]
    await store.settle([Settlement(spec.key, f"l0-{NOON}", 0)], now_us=NOON)
    assert (await store.admit(spec, "after-release", now_us=NOON)).allowed
    assert (await store.admit(spec, "full", now_us=NOON)).allowed is False
    # Nobody releases: the leases lapse after lease_ttl (30 s), as a dead replica's would.
    assert (await store.admit(spec, "still-full", now_us=NOON + 30 * S - 1)).allowed is False
    assert await admit_n(store, spec, 3, NOON + 30 * S) == [True, True, False]


async def test_renewed_leases_do_not_lapse(store: BudgetStore):
    spec = make_spec(max_concurrency=1)
    assert (await store.admit(spec, "long", now_us=NOON)).allowed
    await store.renew([(spec.key, "long")], now_us=NOON + 20 * S)
    assert (await store.admit(spec, "x", now_us=NOON + 40 * S)).allowed is False
    assert (await store.admit(spec, "y", now_us=NOON + 50 * S)).allowed is True
    # A lapsed lease is not brought back by a late renewal.
    await store.renew([(spec.key, "long")], now_us=NOON + 51 * S)
    snap = await store.snapshot(spec.key, now_us=NOON + 51 * S)
    assert snap.in_flight == 1


# -- pauses ----------------------------------------------------------------------------------


async def test_pause_with_retry_after(store: BudgetStore):
    spec = make_spec()
    policy = PausePolicy()
    assert await store.pause(spec.key, 2.0, policy, now_us=NOON) == 2.0
    refused = await store.admit(spec, "a", now_us=NOON + S)
    assert (refused.allowed, refused.paused, refused.budget) == (False, True, None)
    assert refused.wait_us == S
    # A shorter pause never cuts a longer one short.
    assert await store.pause(spec.key, 0.5, policy, now_us=NOON + S) == 1.0
    assert (await store.admit(spec, "b", now_us=NOON + 2 * S)).allowed


async def test_pause_backs_off_without_retry_after(store: BudgetStore):
    spec = make_spec()
    policy = PausePolicy(base=5.0, cap=20.0, reset_after=60.0)
    now = NOON
    lengths = []
    for _ in range(5):
        left = await store.pause(spec.key, None, policy, now_us=now)
        lengths.append(left)
        # Answers to requests sent before the pause began do not escalate it.
        assert await store.pause(spec.key, None, policy, now_us=now + S) == left - 1
        now += int(left * S)
    assert lengths == [5.0, 10.0, 20.0, 20.0, 20.0]
    # Quiet for reset_after after the last pause ended: back to base.
    assert await store.pause(spec.key, None, policy, now_us=now + 60 * S) == 5.0


# -- the two stores agree --------------------------------------------------------------------


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 3)),
        st.tuples(st.just("settle"), st.integers(0, 2_000)),
        st.tuples(st.just("pause"), st.sampled_from([None, 1.0, 4.0])),
        st.tuples(st.just("renew"), st.just(0)),
        st.tuples(st.just("wait"), st.integers(1, 3 * S)),
        st.tuples(st.just("wait"), st.sampled_from([30 * S, 3600 * S, 86_400 * S])),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(
    ops=_ops,
    start=st.integers(at("2026-01-30T00:00:00+00:00"), at("2026-03-02T00:00:00+00:00")),
    interval=st.integers(1_000, 2 * S),
    burst=st.integers(1, 4),
    max_concurrency=st.integers(1, 3),
    day=st.one_of(st.none(), st.integers(0, 6)),
    month=st.one_of(st.none(), st.integers(0, 10)),
    size=st.one_of(st.none(), st.integers(0, 3000)),
)
def test_memory_and_redis_stores_agree(
    redis_server: RedisServer,  # noqa: F811
    ops: list[tuple[str, Any]],
    start: int,
    interval: int,
    burst: int,
    max_concurrency: int,
    day: int | None,
    month: int | None,
    size: int | None,
):
    """Random sequences of admissions, settlements, pauses and time: identical answers."""
    spec = make_spec(
        interval_us=interval,
        burst=burst,
        max_concurrency=max_concurrency,
        requests_per_day=day,
        requests_per_month=month,
        bytes_per_day=size,
    )
    policy = PausePolicy(base=1.0, cap=4.0, reset_after=10.0)

    async def run() -> None:
        memory = MemoryBudgetStore(lease_ttl=30.0)
        redis = RedisBudgetStore(redis_server.url, key_prefix="agree:", lease_ttl=30.0)
        live: list[str] = []
        now = start
        try:
            for n, (op, arg) in enumerate(ops):
                if op == "wait":
                    now += arg
                    continue
                if op == "admit":
                    for i in range(arg + 1):
                        lease = f"{n}-{i}"
                        a = await memory.admit(spec, lease, now_us=now)
                        b = await redis.admit(spec, lease, now_us=now)
                        assert a == b, (op, n)
                        if a.allowed:
                            live.append(lease)
                elif op == "settle":
                    item = [Settlement(spec.key, live.pop(0) if live else None, arg)]
                    await memory.settle(item, now_us=now)
                    await redis.settle(item, now_us=now)
                elif op == "renew":
                    leases = [(spec.key, lease) for lease in live]
                    await memory.renew(leases, now_us=now)
                    await redis.renew(leases, now_us=now)
                elif op == "pause":
                    a_left = await memory.pause(spec.key, arg, policy, now_us=now)
                    b_left = await redis.pause(spec.key, arg, policy, now_us=now)
                    assert a_left == b_left, (op, n)
                assert await memory.snapshot(spec.key, now_us=now) == await redis.snapshot(
                    spec.key, now_us=now
                ), (op, n)
        finally:
            await redis.close()

    asyncio.run(run())


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.integers(0, 4_102_444_800 * S - 1)
        | st.sampled_from(
            [
                at("2028-02-29T23:59:59+00:00") + S - 1,
                at("2100-03-01T00:00:00+00:00"),
                at("2000-02-29T00:00:00+00:00"),
                at("2026-12-31T23:59:59+00:00"),
                0,
            ]
        ),
        min_size=1,
        max_size=50,
    )
)
def test_lua_calendar_matches_python(redis_server: RedisServer, moments: list[int]):  # noqa: F811
    async def run() -> None:
        redis = RedisBudgetStore(redis_server.url)
        try:
            for now in moments:
                got = await redis._eval(scripts.CALENDAR, (), [now])
                assert list(got) == [*utc_day(now), *utc_month(now)], now
        finally:
            await redis.close()

    asyncio.run(run())


# -- Redis specifics -------------------------------------------------------------------------


def test_all_keys_of_a_site_share_one_hash_tag():
    keys = site_keys("cw:", "images.example.com")
    assert all(k.startswith("cw:{images.example.com}:") for k in keys)
    # Braces in a key would end the tag early; they are escaped.
    assert all("{a%7Db}" in k for k in site_keys("cw:", "a}b"))


async def test_scripts_survive_a_flushed_script_cache(redis_server: RedisServer, key_prefix: str):  # noqa: F811
    """NOSCRIPT (a restarted or failed-over Redis): the store sends the script again."""
    store = RedisBudgetStore(redis_server.url, key_prefix=key_prefix)
    await store.start()
    try:
        spec = make_spec(max_concurrency=1)
        assert (await store.admit(spec, "a")).allowed
        await store._redis.script_flush()
        await store.settle([Settlement(spec.key, "a", 10)])  # pipelined path
        await store._redis.script_flush()
        assert (await store.admit(spec, "b")).allowed  # single-call path
        snap = await store.snapshot(spec.key)
        assert (snap.in_flight, snap.day_bytes, snap.day_requests) == (1, 10, 2)
    finally:
        await store.close()


async def test_one_round_trip_per_admission(redis_server: RedisServer, key_prefix: str):  # noqa: F811
    """What Redis receives from the store per admission: one EVALSHA, nothing else."""
    store = RedisBudgetStore(redis_server.url, key_prefix=key_prefix)
    watcher = RedisBudgetStore(redis_server.url)
    await store.start()
    try:
        spec = make_spec(requests_per_day=1000, max_concurrency=5)
        await store.admit(spec, "warm")
        seen: list[str] = []
        async with watcher._redis.monitor() as monitor:
            for i in range(20):
                await store.admit(spec, f"l{i}")
            await store._redis.echo("done")
            while True:
                command = await asyncio.wait_for(monitor.next_command(), 5)
                if command["client_type"] == "lua":
                    continue  # the script's own calls, inside the one round trip
                seen.append(command["command"].split()[0].upper())
                if seen[-1] == "ECHO":
                    break
        assert seen == ["EVALSHA"] * 20 + ["ECHO"]
    finally:
        await store.close()
        await watcher.close()


# -- counts Redis lost: floors written back and what was counted since --------------------------


@pytest.fixture
async def shared(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[RedisBudgetStore]:  # noqa: F811
    store = RedisBudgetStore(redis_server.url, key_prefix=key_prefix)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def floor_of(spec: BudgetSpec, seen: Any) -> Carryover:
    """What a replica writes back after a loss: its last view, with the generation it saw."""
    return Carryover(
        spec.key,
        utc_day(seen.now_us).id,
        seen.day_requests,
        seen.day_bytes,
        utc_month(seen.now_us).id,
        seen.month_requests,
        0,
        seen.day_generation,
        seen.month_generation,
    )


async def _lose_counts(store: RedisBudgetStore, spec: BudgetSpec) -> None:
    k = store.keys(spec.key)
    await store._redis.delete(k.day, k.month)  # Redis restarted empty, for this site


async def _views_of_two_replicas(store: RedisBudgetStore, spec: BudgetSpec) -> tuple[Any, Any]:
    """Replica a last saw the site after 40 admissions, replica b after 60."""
    verdicts = [await store.admit(spec, f"v{i}", now_us=NOON + i) for i in range(60)]
    assert all(v.allowed for v in verdicts)
    return verdicts[39].snapshot, verdicts[59].snapshot


async def test_a_floor_written_back_never_swallows_outage_counts_added_before_it(
    shared: RedisBudgetStore,
):
    # Politeness probe (F3): Redis came back empty after an outage in `fail_mode: local`. The
    # replica that had seen less wrote its floor (40) and added its outage's 10; the other then
    # wrote its floor (60) with max(), which swallowed the first one's 10: 70 counted for 80.
    spec = make_spec(requests_per_day=1000)
    seen_a, seen_b = await _views_of_two_replicas(shared, spec)
    await _lose_counts(shared, spec)
    day, month = utc_day(NOON).id, utc_month(NOON).id
    for seen in (seen_a, seen_b):  # each replica's recovery: its floor, then its outage
        await shared.carry_over([floor_of(spec, seen)], now_us=NOON + S, at_least=True)
        await shared.carry_over([Carryover(spec.key, day, 10, 0, month, 10)], now_us=NOON + S)
    snap = await shared.snapshot(spec.key, now_us=NOON + S)
    assert (snap.day_requests, snap.month_requests) == (80, 80)
    # Written back again (a second heartbeat, a second replica's view): nothing changes.
    for seen in (seen_b, seen_a, snap):
        await shared.carry_over([floor_of(spec, seen)], now_us=NOON + S, at_least=True)
    again = await shared.snapshot(spec.key, now_us=NOON + S)
    assert (again.day_requests, again.month_requests) == (80, 80)


async def test_admissions_after_a_loss_stay_counted_under_a_later_floor(shared: RedisBudgetStore):
    # The same through ADMIT's own floor: a's admissions after the loss were counted from a's
    # view (40); b's first admission raised the count to b's view (60) with max(): a's 5 gone.
    spec = make_spec(requests_per_day=1000)
    seen_a, seen_b = await _views_of_two_replicas(shared, spec)
    await _lose_counts(shared, spec)
    for i in range(5):
        verdict = await shared.admit(spec, f"a{i}", now_us=NOON + S + i, seen=seen_a)
        seen_a = verdict.snapshot
    assert seen_a.day_requests == 45
    verdict = await shared.admit(spec, "b", now_us=NOON + 2 * S, seen=seen_b)
    assert (verdict.snapshot.day_requests, verdict.snapshot.month_requests) == (66, 66)
    # a, still holding a view of the generation since the loss, adds nothing more to it.
    verdict = await shared.admit(spec, "a5", now_us=NOON + 3 * S, seen=seen_a)
    assert verdict.snapshot.day_requests == 67


async def test_a_count_redis_took_back_to_an_older_snapshot_is_raised_once(
    shared: RedisBudgetStore,
):
    # Redis loaded an older snapshot: the same generation, below what a replica saw. Raised to
    # that view, and a lower view of the same old generation adds nothing on top.
    spec = make_spec(requests_per_day=1000)
    seen_a, seen_b = await _views_of_two_replicas(shared, spec)
    k = shared.keys(spec.key)
    await shared._redis.hset(k.day, mapping={"n": 30})  # the snapshot: 30 of the 60
    verdict = await shared.admit(spec, "b", now_us=NOON + S, seen=seen_b)
    assert verdict.snapshot.day_requests == 61
    assert verdict.snapshot.day_generation != seen_b.day_generation
    verdict = await shared.admit(spec, "a", now_us=NOON + S, seen=seen_a)
    assert verdict.snapshot.day_requests == 62


async def test_a_floor_an_older_script_wrote_back_is_not_counted_twice(shared: RedisBudgetStore):
    # Review: in a rolling upgrade, Redis lost its data and an older replica wrote back its view
    # (40) with no generation; a newer replica with the same view took the 40 there for counts
    # since the loss and added its own on top: 80 for 40, the quota refused early.
    spec = make_spec(requests_per_day=1000)
    seen_a, _ = await _views_of_two_replicas(shared, spec)
    k = shared.keys(spec.key)
    await _lose_counts(shared, spec)
    await shared._redis.hset(k.day, mapping={"p": utc_day(NOON).id, "n": 40, "b": 0})
    verdict = await shared.admit(spec, "a", now_us=NOON + S, seen=seen_a)
    assert verdict.snapshot.day_requests == 41


async def test_a_generation_left_from_another_day_is_no_floor(shared: RedisBudgetStore):
    # An older replica's script starts a day by setting p, n and b only: yesterday's generation
    # and floor stay in the hash. They must not count for today.
    spec = make_spec(requests_per_day=1000)
    seen_a, seen_b = await _views_of_two_replicas(shared, spec)
    k = shared.keys(spec.key)
    day = utc_day(NOON).id
    await shared._redis.hset(
        k.day, mapping={"p": day, "n": 3, "b": 0, "g": f"{day - 1}:old", "f": 50, "fb": 0}
    )
    assert (await shared.snapshot(spec.key, now_us=NOON + S)).day_generation == ""
    verdict = await shared.admit(spec, "a", now_us=NOON + S, seen=seen_a)
    # Today's 3 were counted without a generation (yesterday's is none): they may hold an
    # older script's write-back of the same view, so the larger stands, 40, + this one
    # (review: adding would count a view twice). Yesterday's floor of 50 counts for nothing.
    assert verdict.snapshot.day_requests == 41
    # From here on the count has a generation, its floor 40: b's view (60) raises the floor.
    verdict = await shared.admit(spec, "b", now_us=NOON + S, seen=seen_b)
    assert verdict.snapshot.day_requests == 62


# -- the in-process store's bound -------------------------------------------------------------


async def test_the_in_process_store_never_forgets_counts_that_still_decide():
    # A scraper that went through as many other sites as the store holds reset every idle
    # site's quota in embedded mode (5 a day, then 5 more). Only spent sites are forgotten; a
    # store full of sites that matter refuses the new one instead.
    from proxy.budgets.memory import BudgetStoreFull

    store = MemoryBudgetStore(max_sites=50)
    victim = make_spec(requests_per_day=5)
    assert await admit_n(store, victim, 6, NOON) == [True] * 5 + [False]
    await store.settle([Settlement(victim.key, f"l{i}-{NOON}", 0) for i in range(5)], now_us=NOON)
    later = NOON + 60 * S
    for i in range(49):
        other = make_spec(requests_per_day=5)
        assert (await store.admit(other, f"o{i}", now_us=later)).allowed
    with pytest.raises(BudgetStoreFull, match="in-process budget store is full"):
        await store.admit(make_spec(), "one-too-many", now_us=later)
    assert not (await store.admit(victim, "again", now_us=later)).allowed
    # Within the 10 s after a full look, no new look; after it, still none spent today.
    with pytest.raises(BudgetStoreFull):
        await store.admit(make_spec(), "n2", now_us=later + 11 * S)
    # The next day the day counts are spent, not the month's: still full.
    tomorrow = NOON + 24 * 3600 * S
    with pytest.raises(BudgetStoreFull):
        await store.admit(make_spec(), "n3", now_us=tomorrow)
    snap = await store.snapshot(victim.key, now_us=tomorrow)
    assert (snap.day_requests, snap.month_requests) == (0, 5)
    # A new month: every count is spent, room again.
    next_month = at("2026-07-01T00:00:01+00:00")
    assert (await store.admit(make_spec(), "n4", now_us=next_month)).allowed


async def test_the_in_process_store_forgets_spent_sites_to_make_room():
    store = MemoryBudgetStore(max_sites=10)
    last_month = at("2026-05-20T12:00:00+00:00")
    for i in range(10):
        spec = make_spec(requests_per_day=5)
        assert (await store.admit(spec, f"a{i}", now_us=last_month)).allowed
        await store.settle([Settlement(spec.key, f"a{i}", 10)], now_us=last_month)
    # Last month's counts decide nothing now: every one of them goes for the new site.
    assert (await store.admit(make_spec(), "new", now_us=NOON)).allowed
    assert len(store._sites) == 1
    # A site whose lease is still held is not spent, whatever its counts.
    held = make_spec()
    assert (await store.admit(held, "held", now_us=last_month)).allowed
    store.max_sites = 2
    with pytest.raises(Exception, match="full"):
        await store.admit(make_spec(), "x", now_us=last_month + S)


async def test_saved_counts_come_back_with_the_pause_shortened_and_ended_periods_dropped() -> None:
    # Embedded mode's counts across a restart (proxy/budgets/saved.py).
    saved_at = int(dt.datetime(2026, 3, 31, 23, 0, tzinfo=dt.UTC).timestamp() * 1e6)
    before = MemoryBudgetStore(clock=lambda: saved_at)
    before_day, before_month = utc_day(saved_at).id, utc_month(saved_at).id
    await before.carry_over(
        [
            Carryover("a.test", before_day, 4, 1000, before_month, 40, paused_for_us=7_200_000_000),
            Carryover("b.test", before_day, 1, 10, before_month, 9),
        ]
    )
    data = saved.dump(before.sites(), saved_at)
    same_day = saved_at + 1_800_000_000  # half an hour later, the same day and month
    after = MemoryBudgetStore(clock=lambda: same_day)
    await after.carry_over(saved.parse(data, same_day), at_least=True)
    a = await after.snapshot("a.test")
    assert (a.day_requests, a.day_bytes, a.month_requests) == (4, 1000, 40)
    assert a.paused_until_us == same_day + 5_400_000_000  # two hours asked, half an hour gone
    next_month = saved_at + 7_200_000_000  # 01:00 on 1 April: a new day and a new month
    later = MemoryBudgetStore(clock=lambda: next_month)
    await later.carry_over(saved.parse(data, next_month), at_least=True)
    b = await later.snapshot("b.test")
    assert (b.day_requests, b.month_requests, b.paused_until_us) == (0, 0, 0)
    with pytest.raises(saved.SavedCountsError, match="negative"):
        saved.parse(data.replace(b'"b.test", ', b'"b.test", -'), same_day)


def test_saved_counts_written_by_two_saves_at_once_stay_whole(tmp_path: Path) -> None:
    # A stop's last save ran beside the periodic one still in its thread: both wrote one
    # `.partial` file, and the next start read a mix of the two, or the last save failed (review).
    path = tmp_path / "budgets" / "gw.json"
    payloads = [json.dumps({"n": n, "pad": "x" * 200_000}).encode() for n in range(2)]
    for _ in range(20):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(saved.write, path, p) for p in payloads]:
                done.result()
        assert path.read_bytes() in payloads
    assert [p.name for p in path.parent.iterdir()] == ["gw.json"]
    (path.parent / "gw.json.x1y2.partial").write_bytes(b"cut short by a kill -9")
    saved.remove_partials(path)
    assert [p.name for p in path.parent.iterdir()] == ["gw.json"]


def test_a_saved_pause_longer_than_any_pause_is_cut_to_the_longest() -> None:
    now = 1_900_000_000_000_000
    data = json.dumps(
        {"format": 1, "saved_at_us": now, "sites": [["a.test", 1, 0, 0, 1, 0, 10**15]]}
    ).encode()
    [item] = saved.parse(data, now)
    assert item.paused_for_us == PausePolicy().max_pause * 1_000_000
