"""Policy validation: the contract's keys, field-level errors with line numbers, versions."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from proxy.policy import InvalidPolicy
from proxy.policy import parse_policy
from tests.support import base_policy


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


def test_duplicate_ids_and_dangling_proxy_pins_are_errors():
    policy = base_policy()
    policy["sites"] = [{"id": "a", "match": ["a.test"]}, {"id": "a", "match": ["b.test"]}]
    assert any("'a' appears twice" in e for e in errors_of(dump(policy)))
    policy = base_policy()
    policy["teams"][0]["upstream_proxy"] = "pool-z"
    assert any("pool-z" in e for e in errors_of(dump(policy)))


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
