"""Policy validation: the contract's keys, field-level errors with line numbers, versions."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.policy import InvalidPolicy
from proxy.policy import parse_policy
from tests.forked_gateways import run_command
from tests.support import ADMIN_TOKEN
from tests.support import CRAWLWARDEN
from tests.support import OTHER_TOKEN
from tests.support import TEAM_TOKEN
from tests.support import base_policy
from tests.support import sha256_hex


def dump(policy: dict) -> str:
    return yaml.safe_dump(policy, sort_keys=False)


def errors_of(text: str) -> list[str]:
    with pytest.raises(InvalidPolicy) as e:
        parse_policy(text)
    return [str(err) for err in e.value.errors]


def test_the_base_policy_is_valid_and_versioned():
    loaded = parse_policy(dump(base_policy()))
    assert len(loaded.version) == 64
    # The version is of the canonical form: key order and formatting do not change it.
    reordered = dict(reversed(list(base_policy().items())))
    assert parse_policy(dump(reordered)).version == loaded.version
    changed = base_policy()
    changed["defaults"]["rate"] = "999/s"
    assert parse_policy(dump(changed)).version != loaded.version


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("defaults", "rate"), "fast", "defaults.rate: invalid rate 'fast'"),
        (("defaults", "rate"), "0/s", "defaults.rate: invalid rate '0/s'"),
        (("defaults", "max_delay"), "soon", "defaults.max_delay: invalid duration"),
        (("defaults", "bytes_per_day"), "lots", "defaults.bytes_per_day: invalid size"),
        (("defaults", "on_exceed"), "ignore", "defaults.on_exceed: Input should be 'reject'"),
        (("defaults", "burst"), 0, "defaults.burst: Input should be greater than or equal to 1"),
        (("crawler", "contact"), "nobody", "crawler.contact: must be an e-mail address"),
        (("crawler", "robots_tokens"), [], "crawler.robots_tokens: List should have at least 1"),
        (("teams",), [], "teams: List should have at least 1"),
        (("network", "allow_private"), ["not-a-cidr"], "network.allow_private.0:"),
        (("version",), 2, "version: Input should be 1"),
        # 0 (read as "no limit" in many tools) refused every request once reloaded, with no
        # warning (an SRE's reload probe).
        (("audit", "spool_max_bytes"), 0, "audit.spool_max_bytes: 0 would refuse every request"),
        (("audit", "spool_max_bytes"), "0MB", "audit.spool_max_bytes: 0 would refuse every"),
    ],
)
def test_field_errors_name_the_field(path: tuple, value: object, expected: str):
    policy = base_policy()
    target = policy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    errors = errors_of(dump(policy))
    assert any(e.startswith(expected) for e in errors), errors


def test_unknown_keys_are_errors_with_their_line():
    text = dump(base_policy()) + "extra_section:\n  foo: 1\n"
    line = text.splitlines().index("extra_section:") + 1
    assert errors_of(text) == [f"extra_section: unknown key (line {line})"]


def test_typo_inside_a_site_rule_is_named():
    policy = base_policy()
    policy["sites"] = [{"id": "a", "match": ["a.test"], "requests_per_dya": 5}]
    [error] = errors_of(dump(policy))
    assert error.startswith("sites.0.requests_per_dya: unknown key (line ")


def test_token_needs_exactly_one_source(monkeypatch: pytest.MonkeyPatch):
    policy = base_policy()
    policy["teams"][0] = {"name": "t", "projects": []}
    assert any("exactly one of token_sha256 or token_env" in e for e in errors_of(dump(policy)))
    policy["teams"][0] = {"name": "t", "token_env": "CW_TEST_TOKEN_UNSET"}
    monkeypatch.delenv("CW_TEST_TOKEN_UNSET", raising=False)
    assert any("CW_TEST_TOKEN_UNSET is not set" in e for e in errors_of(dump(policy)))
    monkeypatch.setenv("CW_TEST_TOKEN_UNSET", "s3cret")
    parse_policy(dump(policy))


def test_no_file_checks_leaves_token_environment_variables_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A policy checked in its repository's CI, where the secrets are not set: `token_env`
    # names that are unset, or set to one dummy value, failed the check (a new-user probe).
    policy = base_policy()
    policy["teams"][0] = {"name": "a", "token_env": "CW_CI_TOKEN_A", "projects": []}
    policy["teams"][1] = {"name": "b", "token_env": "CW_CI_TOKEN_B", "projects": []}
    path = tmp_path / "policy.yaml"
    path.write_text(dump(policy))

    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        return run_command([CRAWLWARDEN, "policy", "check", *flags, str(path)], text=True)

    monkeypatch.delenv("CW_CI_TOKEN_A", raising=False)
    monkeypatch.delenv("CW_CI_TOKEN_B", raising=False)
    assert "CW_CI_TOKEN_A is not set" in check().stderr
    unset = check("--no-file-checks")
    assert unset.returncode == 0, unset.stderr
    assert parse_policy(dump(policy), read_env=False).policy.teams[0].token_env == "CW_CI_TOKEN_A"
    monkeypatch.setenv("CW_CI_TOKEN_A", "dummy")
    monkeypatch.setenv("CW_CI_TOKEN_B", "dummy")
    assert "teams.1.token_env: the same token as teams.0" in check().stderr
    dummies = check("--no-file-checks")
    assert dummies.returncode == 0, dummies.stderr
    # Every other check stays: one variable named twice is still one token, a name that is
    # no variable name still an error.
    policy["teams"][1]["token_env"] = "CW_CI_TOKEN_A"
    policy["admin_tokens"][0] = {"role": "admin", "token_env": "not a name"}
    path.write_text(dump(policy))
    twice = check("--no-file-checks")
    assert twice.returncode == 2
    assert "teams.1.token_env: the same token as teams.0" in twice.stderr
    assert "admin_tokens.0.token_env: must be an environment variable name" in twice.stderr
    assert "--no-file-checks" in check("--help").stdout
    assert "environment" in " ".join(check("--help").stdout.split())


def test_duplicate_ids_and_dangling_proxy_pins_are_errors():
    policy = base_policy()
    policy["sites"] = [{"id": "a", "match": ["a.test"]}, {"id": "a", "match": ["b.test"]}]
    assert any(
        e.startswith("sites.1.id: the id 'a' is also sites.0's (line ")
        for e in errors_of(dump(policy))
    )
    policy = base_policy()
    policy["teams"][0]["upstream_proxy"] = "pool-z"
    assert any(
        e.startswith("teams.0.upstream_proxy:") and "pool-z" in e for e in errors_of(dump(policy))
    )


def test_every_error_is_reported_in_one_run_by_line():
    # A key written twice, a field error and errors across sections: each stage used to hide
    # the next, and those across sections had no path or line.
    policy = base_policy()
    policy["teams"].append(dict(policy["teams"][0]))  # the same name and token
    policy["sites"] = [
        {"id": "a", "match": ["a.test"], "burst": 0},
        {"id": "a", "match": ["a.test"]},
    ]
    text = (
        dump(policy)
        + "retention:\n  fetch_records_days: 10\nretention:\n  fetch_records_days: 20\n"
    )
    errors = errors_of(text)
    expected = [
        "teams.2.name: the name",
        "teams.2.token_sha256: the same token as teams.0",
        "sites.0.burst:",
        "sites.1.id: the id 'a' is also sites.0's",
        "sites.1.match.0: 'a.test' is also sites.0 (a)'s",
        "retention: key appears twice",
    ]
    for start in expected:
        assert any(e.startswith(start) and "(line " in e for e in errors), (start, errors)
    lines = [int(e.rsplit("(line ", 1)[1].rstrip(")")) for e in errors]
    assert lines == sorted(lines)


@pytest.mark.parametrize(
    ("where", "other"),
    [("teams", "teams"), ("admin_tokens", "admin_tokens"), ("admin_tokens", "teams")],
)
def test_a_token_names_one_caller(where: str, other: str, monkeypatch: pytest.MonkeyPatch):
    # Two teams with one token: either name authenticates with it, and fetches are recorded
    # under whichever comes first; an admin token listed twice took the last role.
    policy = base_policy()
    if where == "teams":
        entry: dict = {"name": "twin", "token_sha256": policy[other][0]["token_sha256"]}
    else:
        entry = {"role": "auditor", "token_sha256": policy[other][0]["token_sha256"]}
    policy[where].append(entry)
    index = len(policy[where]) - 1
    same = f"{where}.{index}.token_sha256: the same token as {other}.0"
    assert any(e.startswith(same) for e in errors_of(dump(policy)))
    # Given through the environment, it is the same token too.
    monkeypatch.setenv("CW_TWIN_TOKEN", {"teams": TEAM_TOKEN, "admin_tokens": ADMIN_TOKEN}[other])
    del entry["token_sha256"]
    entry["token_env"] = "CW_TWIN_TOKEN"
    same = f"{where}.{index}.token_env: the same token as {other}.0"
    assert any(e.startswith(same) for e in errors_of(dump(policy)))


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({"id": "other.test", "match": ["mirror.test"]}, "sites.0.id: 'other.test' has a dot"),
        ({"id": "all", "match": ["*.com"]}, "sites.0.match.0: '*.com' covers every domain"),
        ({"id": "num", "match": ["2130706433"]}, "sites.0.match.0: '2130706433' is neither"),
        ({"id": "n", "match": ["a.test"], "burst": True}, "sites.0.burst: true is not a number"),
        # A size's example is a size (it offered '10s' for a byte quota: docs probe).
        (
            {"id": "b", "match": ["a.test"], "bytes_per_day": True},
            "sites.0.bytes_per_day: true is not a quantity: write e.g. '500MB'",
        ),
        (
            {"id": "d", "match": ["a.test"], "max_delay": True},
            "sites.0.max_delay: true is not a quantity: write e.g. '10s'",
        ),
        ({"id": "n", "match": ["a.test"], "rate": None}, "sites.0: rate: null is not a value"),
    ],
)
def test_site_rules_that_would_not_do_what_they_say(site: dict, message: str):
    policy = base_policy()
    policy["sites"] = [site]
    errors = errors_of(dump(policy))
    assert any(e.startswith(message) for e in errors), errors


def test_ip_patterns_and_null_quotas_are_still_fine():
    policy = base_policy()
    policy["sites"] = [
        {"id": "lab", "match": ["10.1.2.3", "*.lab.test"], "requests_per_day": None},
    ]
    parse_policy(dump(policy))


def test_yaml_true_is_no_count():
    policy = base_policy()
    policy["retention"] = {"fetch_records_days": True}
    policy["defaults"]["requests_per_day"] = "yes"
    policy["defaults"]["burst"] = "On"
    policy["crawler"]["contact"] = "no"
    text = dump(policy).replace("'yes'", "yes").replace("'On'", "On").replace("'no'", "no")
    errors = errors_of(text)
    # Said as written, not as Python's True (`burst: yes` read "True is not a number": probe).
    assert any(e.startswith("retention.fetch_records_days: true is not a number") for e in errors)
    said = "defaults.requests_per_day: yes (read as a boolean) is not a number: write e.g. 1000"
    assert any(e.startswith(said) for e in errors), errors
    said = "defaults.burst: On (read as a boolean) is not a number"
    assert any(e.startswith(said) for e in errors), errors
    # pydantic's own message, which does not name the value, gets it after.
    said = "crawler.contact: Input should be a valid string (no was read as a boolean: write 'no'"
    assert any(e.startswith(said) for e in errors), errors


def test_a_missing_key_has_its_parents_line():
    # `crawler: Field required` came with no line, where every other error has one (probe).
    policy = base_policy()
    del policy["crawler"]
    del policy["teams"][1]["name"]
    text = "# the policy\n" + dump(policy)
    errors = errors_of(text)
    first = text.splitlines().index(next(x for x in text.splitlines() if not x.startswith("#")))
    assert f"crawler: required, and missing (line {first + 1})" in errors, errors
    # A key missing in a list item: that item's line.
    [item] = [n for n, x in enumerate(text.splitlines(), 1) if sha256_hex(OTHER_TOKEN) in x]
    assert f"teams.1.name: required, and missing (line {item})" in errors, errors


def test_static_hosts_written_twice_in_other_cases_are_an_error():
    policy = base_policy()
    policy["network"]["static_hosts"] = {"Demo.test": "127.0.0.1", "demo.test": "127.0.0.2"}
    assert any(
        e.startswith("network.static_hosts.demo.test: the same host as 'Demo.test'")
        for e in errors_of(dump(policy))
    )


def test_not_yaml_and_not_a_mapping():
    assert errors_of("version: [1\n")[0].startswith("(policy): not valid YAML")
    assert errors_of("- 1\n- 2\n") == ["(policy): the policy must be a YAML mapping"]


def test_blocklist_accepts_domains_and_url_prefixes_only():
    policy = base_policy()
    policy["blocklist"] = [
        {
            "id": "x",
            "match": ["Stock.Example.", "https://f.example/m/"],
            "reason": "r",
            "source": "s",
        }
    ]
    loaded = parse_policy(dump(policy))
    assert loaded.policy.blocklist[0].match == ["stock.example", "https://f.example/m/"]
    policy["blocklist"][0]["match"].append("HTTP://Forum.TEST:80/members/")  # any letter case
    parse_policy(dump(policy))
    bad = copy.deepcopy(policy)
    bad["blocklist"][0]["match"] = ["not a host"]
    assert any(e.startswith("blocklist.0.match.0:") for e in errors_of(dump(bad)))


def test_the_example_policy_is_valid():
    from proxy.policy import load_policy

    loaded = load_policy(Path(__file__).resolve().parent.parent / "examples" / "policy.yaml")
    assert loaded.policy.sites[0].id == "licensed-archive"


def test_a_key_written_twice_is_an_error_not_the_last_one_wins():
    text = dump(base_policy()).replace("defaults:\n", "defaults:\n  rate: 9000/s\n", 1)
    errors = errors_of(text)
    assert len(errors) == 1 and errors[0].startswith("defaults.rate: key appears twice")


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_delay", float("inf")), ("max_delay", True), ("bytes_per_day", True)],
)
def test_infinite_or_boolean_units_are_errors(key: str, value: object):
    policy = base_policy()
    policy["defaults"][key] = value
    assert any(e.startswith(f"defaults.{key}:") for e in errors_of(dump(policy)))


def test_check_files_reads_the_signing_key_the_next_start_would_read(tmp_path: Path):
    from proxy.audit.keys import generate_key_pair

    key = tmp_path / "audit.key"
    generate_key_pair(key)
    unreadable = tmp_path / "a-directory.key"
    unreadable.mkdir()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")

    def policy(key_file: Path) -> str:
        return dump({**base_policy(), "audit": {"signing_key_file": str(key_file)}})

    assert parse_policy(policy(key), check_files=True).policy.audit.signing_key_file == str(key)
    # Without check_files (a policy read on another machine) the file is not looked at.
    parse_policy(policy(tmp_path / "nowhere.key"))
    for bad, says in [
        (tmp_path / "nowhere.key", "No such file or directory"),
        (unreadable, "Is a directory"),
        (garbage, "is not an unencrypted PEM private key"),
    ]:
        with pytest.raises(InvalidPolicy) as e:
            parse_policy(policy(bad), check_files=True)
        [error] = e.value.errors
        assert error.path == "audit.signing_key_file" and error.line is not None
        assert str(bad) in error.message and says in error.message


def test_check_files_reports_the_signing_key_with_the_other_errors(tmp_path: Path):
    # A missing key file was reported only once every other error had been fixed: each fix
    # of a policy check then showed one more.
    data = {**base_policy(), "audit": {"signing_key_file": str(tmp_path / "nowhere.key")}}
    data["defaults"]["rate"] = "fast"
    with pytest.raises(InvalidPolicy) as e:
        parse_policy(dump(data), check_files=True)
    assert {error.path for error in e.value.errors} == {
        "defaults.rate",
        "audit.signing_key_file",
    }, e.value.errors


def test_an_expired_licence_and_a_quota_of_zero_are_warned_about(tmp_path: Path):
    # Valid, and not what was meant: the check said nothing (the licence had silently fallen
    # back; a quota of 0 refuses every request).
    data = base_policy()
    data["defaults"]["legal_basis"] = {"kind": "licence", "ref": "LIC-1", "expires": "2020-01-01"}
    data["sites"] = [{"id": "museum", "match": ["museum.test"], "requests_per_day": 0}]
    loaded = parse_policy(dump(data))
    warned = {w.path: w for w in loaded.warnings}
    assert set(warned) == {"defaults.legal_basis.expires", "sites.0.requests_per_day"}
    assert "expired on 2020-01-01" in warned["defaults.legal_basis.expires"].message
    assert all(w.line for w in loaded.warnings)
    path = tmp_path / "policy.yaml"
    path.write_text(dump(data))

    check = run_command([CRAWLWARDEN, "policy", "check", str(path)], text=True)
    assert check.returncode == 0, check.stderr
    assert check.stderr.count("warning: ") == 2
    assert not parse_policy(dump(base_policy())).warnings


@pytest.mark.parametrize(
    "expires",
    [20270101, 1798761600, "2027-01-01T00:00:00+05:00", "2027-01-01T12:00:00Z", "20270101"],
)
def test_a_licence_expires_on_a_day_written_as_a_date(expires: object):
    # An integer passed as a Unix timestamp (1798761600 is 2027-01-01) and a time with an
    # offset was cut to its local day: a licence's last day is a date, YYYY-MM-DD.
    policy = base_policy()
    policy["sites"] = [
        {
            "id": "s",
            "match": ["s.test"],
            "legal_basis": {"kind": "licence", "ref": "L", "expires": expires},
        }
    ]
    errors = errors_of(dump(policy))
    assert any(
        e.startswith("sites.0.legal_basis.expires:") and "YYYY-MM-DD" in e for e in errors
    ), errors


def test_a_site_pattern_that_takes_no_site_is_warned_about():
    # `*.github.io` is refused (every domain under a public suffix one site); `github.io` and
    # `co.uk` passed silently, and take no domain under them. An address outside
    # network.allow_ip_literals is refused (ip_literal) before its rule applies.
    policy = base_policy()
    policy["sites"] = [
        {"id": "pages", "match": ["github.io"]},
        {"id": "uk", "match": ["shop.test", "co.uk", "com"]},
        {"id": "box", "match": ["192.0.2.7"]},
        {"id": "lab", "match": ["198.51.100.7", "intranet"]},
    ]
    policy["network"]["allow_ip_literals"] = ["198.51.100.0/24"]
    warned = {w.path: w.message for w in parse_policy(dump(policy)).warnings}
    idle = {"sites.0.match.0", "sites.1.match.1", "sites.1.match.2", "sites.2.match.0"}
    assert set(warned) == idle, warned
    assert "public suffix" in warned["sites.0.match.0"]
    assert "allow_ip_literals" in warned["sites.2.match.0"]


def test_a_named_host_under_another_rules_wildcard_is_warned_about_when_it_sets_no_terms():
    # `*.shop.test` (a licence, every opt-out) and `img.shop.test` (a rate only): the hosts
    # beneath img.shop.test took the `*.` rule's terms, img.shop.test itself the defaults'
    # (review: `noai` withheld beneath it, delivered on it).
    policy = base_policy()
    policy["sites"] = [
        {"id": "shop", "match": ["*.shop.test"], "respect": {"noai": True}},
        {"id": "img", "match": ["img.shop.test", "other.test"], "rate": "1/s"},
        {"id": "own", "match": ["cdn.shop.test"], "respect": {"noai": False}},
    ]
    warned = {w.path: w.message for w in parse_policy(dump(policy)).warnings}
    assert set(warned) == {"sites.1.match.0"}, warned
    assert "*.shop.test (site shop)" in warned["sites.1.match.0"]


def test_an_expired_site_licence_warns_of_the_basis_that_applies_instead():
    # Under an expired `defaults` licence too, a site's expired licence falls back to the
    # statutory TDM exception (README), not to "the defaults' basis", as the warning said.
    data = base_policy()
    data["defaults"]["legal_basis"] = {"kind": "licence", "ref": "LIC-0", "expires": "2020-01-01"}
    data["sites"] = [
        {
            "id": "museum",
            "match": ["museum.test"],
            "legal_basis": {"kind": "licence", "ref": "LIC-1", "expires": "2020-06-01"},
        }
    ]
    warned = {w.path: w.message for w in parse_policy(dump(data)).warnings}
    message = warned["sites.0.legal_basis.expires"]
    assert "statutory TDM exception" in message and "defaults' basis" not in message, message
    # With a defaults basis in force, that one applies.
    data["defaults"]["legal_basis"] = {"kind": "tdm_exception", "ref": "DSM Art. 4"}
    warned = {w.path: w.message for w in parse_policy(dump(data)).warnings}
    assert "the defaults' basis" in warned["sites.0.legal_basis.expires"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:99999", "the port must be 1 to 65535"),
        ("http://127.0.0.1:0", "the port must be 1 to 65535"),
        ("http://[::1:3128", "must be http://host:port"),
    ],
)
def test_an_upstream_proxy_url_the_gateway_cannot_use_is_refused(url: str, message: str):
    # `policy check` said valid; `run` then crashed with a traceback and a reload answered 500,
    # uncounted by the reload-failure metrics (found by a policy author's probe).
    policy = base_policy()
    policy["egress"] = {"upstream_proxies": [{"name": "pool", "url": url}]}
    assert any(
        e.startswith("egress.upstream_proxies.0.url:") and message in e
        for e in errors_of(dump(policy))
    ), errors_of(dump(policy))


def test_null_in_a_sites_respect_is_an_error_not_the_default():
    # README: null in a site rule is refused except for a quota; inside `respect` it passed and
    # meant "the default's", with the same policy_version as the key left out.
    policy = base_policy()
    policy["sites"] = [{"id": "s", "match": ["s.test"], "respect": {"robots": None}}]
    errors = errors_of(dump(policy))
    assert any(e.startswith("sites.0.respect:") and "robots: null" in e for e in errors), errors


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        # One mistake, one line (DESIGN: "one line per error"): a value that fits no member of
        # a union was reported once per member ("not a valid IPv4 ...", "not a valid IPv6 ...").
        (("network", "static_hosts"), {"demo.test": "localhost"}, "'localhost' does not appear"),
        (("network", "allow_private"), ["10.0.0.1/8"], "10.0.0.1/8 has host bits set"),
        (("network", "allow_private"), ["127.0.0.1/33"], "'127.0.0.1/33' does not appear"),
        (("egress", "public_ips"), ["gw.example"], "'gw.example' does not appear"),
        (("network", "connect_timeout"), [1], "Input should be a valid string"),
    ],
)
def test_a_value_that_fits_no_member_of_a_union_is_one_error(
    path: tuple, value: object, expected: str
):
    policy = base_policy()
    target = policy
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    errors = errors_of(dump(policy))
    assert len(errors) == 1, errors
    assert expected in errors[0], errors


def test_public_ips_are_text_like_every_other_address():
    # YAML hands `2130706433` over as an integer, which ipaddress takes as 127.0.0.1: the
    # fetch records would have named that address as the egress one.
    policy = base_policy()
    policy.setdefault("egress", {})["public_ips"] = [2130706433]
    [error] = errors_of(dump(policy))
    assert error.startswith("egress.public_ips.0: write the address as text"), error


def test_a_key_with_a_line_break_is_one_line_of_the_error_list() -> None:
    # (found by tests/test_policy_fuzz.py: `policy check` prints one line per error)
    policy = base_policy()
    policy["crawler"]["surprise_\nx"] = 1
    with pytest.raises(InvalidPolicy) as caught:
        parse_policy(yaml.safe_dump(policy), source="p.yaml")
    [error] = caught.value.errors
    assert error.path == "crawler.surprise_\nx"  # as written, for the API's JSON
    assert str(error).startswith("crawler.surprise_\\nx: unknown key") and "\n" not in str(error)
