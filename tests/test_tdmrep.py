"""TDMRep: the origin's tdmrep.json (order, wildcards), header fields, and the prefetch check."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from proxy import optout_checks
from proxy import tdmrep
from proxy.decision import Reason
from tests.optout_fixtures import make_checks
from tests.optout_fixtures import make_policy
from tests.optout_fixtures import off_the_main_thread
from tests.optout_fixtures import origin_server
from tests.optout_fixtures import request_context

RULES = json.dumps(
    [
        {"location": "/directory-a/", "tdm-reservation": 1},
        {
            "location": "/directory-b/html/",
            "tdm-reservation": 1,
            "tdm-policy": "https://provider.test/policies/policy.json",
        },
        {"location": "/directory-b/images/*.jpg", "tdm-reservation": 0},
        {"location": "/directory-b/", "tdm-reservation": 1},
        {"location": "/exact$", "tdm-reservation": 1},
        {"location": "/open/", "tdm-reservation": 0},
        {"location": "/open/closed/", "tdm-reservation": 1},  # never reached: /open/ is first
    ]
)


@pytest.mark.parametrize(
    ("path", "reservation", "policy"),
    [
        ("/directory-a/doc.pdf", 1, None),
        ("/directory-b/html/page.html", 1, "https://provider.test/policies/policy.json"),
        ("/directory-b/images/cat.jpg", 0, None),  # first match, before /directory-b/
        ("/directory-b/images/deep/cat.jpg", 0, None),  # * crosses "/"
        ("/directory-b/images/cat.png", 1, None),
        ("/directory-b/images/cat.jpg.txt", 0, None),  # no $: a prefix match
        ("/exact", 1, None),
        ("/exact/more", None, None),
        ("/open/closed/x", 0, None),  # the first matching rule wins, not the longest
        ("/Directory-a/doc.pdf", None, None),  # case-sensitive
        ("/elsewhere", None, None),  # no rule: unset
    ],
)
def test_first_matching_rule_in_array_order(
    path: str, reservation: int | None, policy: str | None
) -> None:
    declaration = tdmrep.parse_tdmrep(RULES).lookup(path)
    assert declaration.reservation == reservation
    assert declaration.policy == policy


def test_percent_encoded_unreserved_characters_match() -> None:
    rules = tdmrep.parse_tdmrep('[{"location": "/~user/", "tdm-reservation": 1}]')
    assert rules.lookup("/%7Euser/photo.jpg").reserved


@pytest.mark.timeout(30)
def test_a_location_of_many_stars_is_looked_up_in_one_pass() -> None:
    # A site's `/*a*a*a*b` against a path of 600 `a`s blocked the gateway's event loop for
    # seconds when locations were backtracking regexes; five stars and 20 000 `a`s, for years.
    rules = tdmrep.parse_tdmrep('[{"location": "/*a*a*a*a*a*b", "tdm-reservation": 1}]')
    assert rules.lookup("/" + "a" * 20_000).reservation is None
    assert rules.lookup("/" + "a" * 20_000 + "b").reserved


@pytest.mark.parametrize(
    ("value", "reservation"),
    [(1, 1), (0, 0), ("1", 1), (" 0 ", 0), (2, None), (True, None), (None, None), ("yes", None)],
)
def test_reservation_values(value: object, reservation: int | None) -> None:
    # Other values are protocol errors: the reservation is unset, and the rule still matches.
    content = json.dumps(
        [{"location": "/", "tdm-reservation": value}, {"location": "/", "tdm-reservation": 1}]
    )
    assert tdmrep.parse_tdmrep(content).lookup("/x").reservation == reservation


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("not json", "not JSON"),
        ('{"location": "/", "tdm-reservation": 1}', "not a JSON array of rules"),
    ],
)
def test_unusable_files_are_ignored(content: str | bytes, error: str) -> None:
    rules = tdmrep.parse_tdmrep(content)
    assert rules.error == error and rules.lookup("/").reservation is None


def test_rules_without_location_are_skipped() -> None:
    content = '[{"tdm-reservation": 1}, "junk", {"location": "images/", "tdm-reservation": 1}]'
    rules = tdmrep.parse_tdmrep(content)
    assert len(rules.rules) == 1 and rules.lookup("/images/a.png").reserved


def test_a_file_past_the_read_limit_keeps_the_rules_before_the_cut() -> None:
    # A tdmrep.json over 500 KiB was ignored whole, and one of more than 10 000 rules past its
    # 10 000th, without a word on the record: a publisher's long file reserved nothing
    # (probe-optout). The whole rules before the cut bind; the rest is `incomplete`.
    rules = [{"location": "/reserved/*", "tdm-reservation": 1}] + [
        {"location": f"/collections/c{i:05d}/*", "tdm-reservation": 1} for i in range(20_000)
    ]
    content = json.dumps(rules).encode()
    assert len(content) > tdmrep.PARSE_LIMIT
    parsed = tdmrep.parse_tdmrep(content)
    assert parsed.error is None and parsed.incomplete is not None
    assert parsed.lookup("/reserved/a.png").reserved
    assert parsed.lookup("/collections/c00100/a.png").reserved
    assert parsed.find("/collections/c19999/a.png") is None  # past the cut: not read
    # What the fetch read (a body cut at the limit), told it was cut: the same.
    cut = tdmrep.parse_tdmrep(content[: tdmrep.PARSE_LIMIT], truncated=True)

    def read(r: tdmrep.TdmRules) -> list[tuple[str, tdmrep.TdmDeclaration]]:
        return [(rule.pattern.text, rule.declaration) for rule in r.rules]

    assert read(cut) == read(parsed) and cut.incomplete == parsed.incomplete
    # Cut, and not even one whole rule: nothing read, incomplete.
    empty = tdmrep.parse_tdmrep(b"[" + b" " * tdmrep.PARSE_LIMIT + b"]")
    assert empty.rules == () and empty.error is None and empty.incomplete is not None
    # Under the size limit but more than MAX_RULES rules.
    many = [{"location": f"/c{i}/*", "tdm-reservation": 1} for i in range(tdmrep.MAX_RULES + 5)]
    capped = tdmrep.parse_tdmrep(json.dumps(many, separators=(",", ":")))
    assert len(capped.rules) == tdmrep.MAX_RULES and capped.incomplete is not None
    assert tdmrep.parse_tdmrep(RULES).incomplete is None


async def test_a_path_no_rule_read_matches_is_recorded_incomplete() -> None:
    rules = [{"location": "/reserved/*", "tdm-reservation": 1}] + [
        {"location": f"/collections/c{i:05d}/*", "tdm-reservation": 0} for i in range(20_000)
    ]
    async with origin_server({tdmrep.WELL_KNOWN_PATH: json.dumps(rules)}) as site:
        checks = make_checks()
        try:
            decision, signals = await tdm_decision(checks, site.origin() + "/reserved/a.png")
            assert decision is not None and decision.reason is Reason.TDM_RESERVED
            assert signals == ["tdmrep:reserved"]
            decision, signals = await tdm_decision(checks, site.origin() + "/c/a.png")
            assert decision is None and signals == ["tdmrep:incomplete"]
            decision, signals = await tdm_decision(
                checks, site.origin() + "/collections/c00001/a.png"
            )
            assert decision is None and signals == ["tdmrep:not-reserved"]
        finally:
            await checks.close()


@pytest.mark.parametrize(
    ("headers", "reservation", "policy"),
    [
        ([("TDM-Reservation", "1")], 1, None),
        (
            [("tdm-reservation", "0"), ("tdm-policy", "https://p.test/p.json")],
            0,
            "https://p.test/p.json",
        ),
        ([("tdm-reservation", "0"), ("tdm-reservation", "1")], 1, None),
        ([("tdm-reservation", "maybe")], None, None),
        ([], None, None),
    ],
)
def test_header_fields(
    headers: list[tuple[str, str]], reservation: int | None, policy: str | None
) -> None:
    declaration = tdmrep.from_headers(headers)
    assert (declaration.reservation, declaration.policy) == (reservation, policy)


# -- the prefetch check --------------------------------------------------------------------

LICENSED = [
    {
        "id": "licensed",
        "match": ["site-a.test"],
        "legal_basis": {"kind": "licence", "ref": "LIC-7", "expires": "2999-01-01"},
    }
]


async def tdm_decision(checks, url: str, policy=None):  # type: ignore[no-untyped-def]
    ctx = request_context(policy or make_policy(), url)
    return await checks.tdmrep(ctx), ctx.signals


async def test_a_reservation_in_the_file_refuses_before_fetching() -> None:
    async with origin_server({tdmrep.WELL_KNOWN_PATH: RULES}) as site:
        checks = make_checks()
        try:
            decision, signals = await tdm_decision(checks, site.origin() + "/directory-b/html/a")
            assert decision is not None and decision.reason is Reason.TDM_RESERVED
            assert decision.status == 451
            assert signals == ["tdmrep:reserved", "tdmrep:policy"]
            assert "https://provider.test/policies/policy.json" in decision.detail
            decision, signals = await tdm_decision(
                checks, site.origin() + "/directory-b/images/a.jpg"
            )
            assert decision is None and signals == ["tdmrep:not-reserved"]
            decision, signals = await tdm_decision(checks, site.origin() + "/elsewhere")
            assert decision is None and signals == []
        finally:
            await checks.close()
        assert site.hits[tdmrep.WELL_KNOWN_PATH] == 1
        assert site.hits["/directory-b/html/a"] == 0


@pytest.mark.parametrize(("rules", "off_loop"), [(100, False), (2000, True)])
async def test_a_large_tdmrep_json_is_parsed_and_matched_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, rules: int, off_loop: bool
) -> None:
    # 10 000 rules took 0.12 s to parse and 5 ms a request to match, on the event loop (as a
    # large robots.txt did, which held every team's requests: broad-crawl probe).
    threads = off_the_main_thread(
        monkeypatch, optout_checks, parse="_parse_tdmrep", match="_tdm_declaration"
    )
    body = json.dumps([{"location": f"/p{i}/*", "tdm-reservation": 1} for i in range(rules)])
    async with origin_server({tdmrep.WELL_KNOWN_PATH: body}) as site:
        checks = make_checks()
        try:
            reserved, _ = await tdm_decision(checks, f"{site.origin()}/p{rules - 1}/a.jpg")
            free, _ = await tdm_decision(checks, f"{site.origin()}/elsewhere")
        finally:
            await checks.close()
    assert reserved is not None and reserved.reason is Reason.TDM_RESERVED and free is None
    assert threads == {"parse": [off_loop], "match": [off_loop, off_loop]}


async def test_a_licence_is_the_answer_to_a_reservation() -> None:
    # A reservation never binds a licensed site, whatever `respect.tdmrep` says: the file
    # could not change the decision, so it is not asked for (nor charged to the site's budget).
    policy = make_policy(sites=LICENSED)
    async with origin_server({tdmrep.WELL_KNOWN_PATH: RULES}) as site:
        checks = make_checks(policy)
        try:
            decision, signals = await tdm_decision(checks, site.origin() + "/directory-a/x", policy)
        finally:
            await checks.close()
        assert site.hits[tdmrep.WELL_KNOWN_PATH] == 0
    assert decision is None and signals == []


async def test_an_expired_licence_falls_back_to_the_default_basis() -> None:
    sites = [
        {**LICENSED[0], "legal_basis": {"kind": "licence", "ref": "LIC-7", "expires": "2020-01-01"}}
    ]
    policy = make_policy(sites=sites)
    async with origin_server({tdmrep.WELL_KNOWN_PATH: RULES}) as site:
        checks = make_checks(policy)
        try:
            decision, _ = await tdm_decision(checks, site.origin() + "/directory-a/x", policy)
        finally:
            await checks.close()
    assert decision is not None and decision.reason is Reason.TDM_RESERVED


async def test_respect_tdmrep_false_does_not_even_ask_for_the_file() -> None:
    """A site whose policy does not respect TDMRep gets no tdmrep.json request from us: the
    file could not change the decision (politeness: no traffic for nothing)."""
    policy = make_policy(respect={"tdmrep": False})
    async with origin_server({tdmrep.WELL_KNOWN_PATH: RULES}) as site:
        checks = make_checks(policy)
        try:
            decision, signals = await tdm_decision(checks, site.origin() + "/directory-a/x", policy)
        finally:
            await checks.close()
        assert site.hits[tdmrep.WELL_KNOWN_PATH] == 0
    assert decision is None and signals == []


@pytest.mark.parametrize(
    "route",
    [
        web.Response(status=404),
        web.Response(status=500),
        web.Response(status=200, text="<html>soft 404</html>"),
    ],
)
async def test_no_usable_file_means_the_protocol_is_not_used(route: web.Response) -> None:
    async with origin_server({tdmrep.WELL_KNOWN_PATH: route}) as site:
        checks = make_checks()
        try:
            decision, signals = await tdm_decision(checks, site.origin() + "/a")
            await tdm_decision(checks, site.origin() + "/b")
        finally:
            await checks.close()
        assert site.hits[tdmrep.WELL_KNOWN_PATH] == 1  # cached like robots.txt, errors too
    assert decision is None and signals == []


def test_a_cut_file_is_read_no_further_than_one_rule_past_the_most_read():
    # Review: a cut file of minimal entries was read whole, each step copying the rest of the
    # text (0.7 s on the event loop for 500 KiB a site controls). One past MAX_RULES is enough
    # to know the file has more.
    text = "[" + '{"location": "/a"}, ' * (2 * tdmrep.MAX_RULES) + '{"loc'
    entries = tdmrep._leading_entries(text)
    assert entries is not None and len(entries) == tdmrep.MAX_RULES + 1
