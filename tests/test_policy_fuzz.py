"""Broken policies, generated: whatever an operator writes, loading it either succeeds or raises
InvalidPolicy with errors that name a field (or the YAML line) — never any other exception, and
never an error the CLI could not print on one line.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from proxy.policy import InvalidPolicy
from proxy.policy import LoadedPolicy
from proxy.policy import PolicyError
from proxy.policy import parse_policy
from tests.support import base_policy

type Path = tuple[str | int, ...]


def rich_policy() -> dict[str, Any]:
    """A valid policy using every section, so that mutations reach every validator."""
    policy = base_policy()
    policy["egress"]["upstream_proxies"] = [{"name": "pool-a", "url": "http://10.0.0.5:3128"}]
    policy["teams"][1]["upstream_proxy"] = "pool-a"
    policy["sites"] = [
        {
            "id": "licensed",
            "match": ["archive.test", "*.cdn.test"],
            "legal_basis": {"kind": "licence", "ref": "LIC-1", "expires": "2030-01-01"},
            "rate": "5/s",
            "max_delay": "2s",
            "bytes_per_day": "1GiB",
            "on_exceed": "delay",
            "respect": {"tdmrep": False},
        }
    ]
    policy["blocklist"] = [
        {
            "id": "tos",
            "match": ["blocked.test", "https://x.test/members/"],
            "reason": "r",
            "source": "s",
        }
    ]
    policy["network"].update(
        connect_timeout="5s",
        response_timeout=20,
        transfer_timeout="2m",
        idle_client_timeout="45s",
        max_request_header_bytes="32KiB",
        max_request_body_bytes=1000,
    )
    policy["retention"] = {"fetch_records_days": 30}
    policy["audit"]["spool_max_bytes"] = "100MB"
    return policy


def paths(node: Any, prefix: Path = ()) -> list[Path]:
    """Every key path of a nested policy, containers and leaves."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += paths(value, (*prefix, i))
    return out


BASE = rich_policy()
PATHS = paths(BASE)

odd_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "10 parsecs",
            "-1s",
            "1e400",
            "5/fortnight",
            "0/s",
            "0x10",
            "1GB/s",
            "",
            " ",
            "nan",
            "∞",
            "12.5.6",
            "10.0.0.0/33",
            "::/129",
            "*.*.test",
            "http://",
            "2030-02-30",
            "\x00",
        ]
    ),
)
odd_values = st.one_of(
    odd_scalars,
    st.lists(odd_scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), odd_scalars, max_size=3),
)


def mutate(policy: dict[str, Any], path: Path, operation: str, value: Any) -> None:
    parent: Any = policy
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    if operation == "delete":
        del parent[key]
    elif operation == "replace":
        parent[key] = value
    elif operation == "unknown key":
        target = parent[key]
        if isinstance(target, dict):
            target["surprise_" + str(value)[:10]] = value
        else:
            parent[key] = {"surprise": value}
    elif operation == "wrap in a list":
        parent[key] = [parent[key]]
    elif operation == "stringify":
        parent[key] = str(parent[key])
    elif operation == "duplicate":
        if isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = [parent[key], parent[key]]


def assert_clean_outcome(text: str) -> LoadedPolicy | InvalidPolicy:
    try:
        return parse_policy(text, source="fuzz.yaml")
    except InvalidPolicy as e:
        assert e.errors, "InvalidPolicy without errors"
        for err in e.errors:
            assert isinstance(err, PolicyError)
            assert isinstance(err.path, str) and isinstance(err.message, str) and err.message
            assert err.line is None or (isinstance(err.line, int) and err.line >= 1)
            # `crawlwarden policy check` prints one line per error.
            assert "\n" not in str(err)
        return e


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    mutations=st.lists(
        st.tuples(
            st.sampled_from(PATHS),
            st.sampled_from(
                ["delete", "replace", "unknown key", "wrap in a list", "stringify", "duplicate"]
            ),
            odd_values,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_policies_load_or_fail_with_field_errors(
    mutations: list[tuple[Path, str, Any]],
) -> None:
    policy = copy.deepcopy(BASE)
    first_path = mutations[0][0]
    for path, operation, value in mutations:
        try:
            mutate(policy, path, operation, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    text = yaml.safe_dump(policy, allow_unicode=True, sort_keys=False)
    outcome = assert_clean_outcome(text)
    if isinstance(outcome, InvalidPolicy) and len(mutations) == 1:
        # One mutation of valid YAML: the errors are about fields, not about the file.
        assert all(not e.message.startswith("not valid YAML") for e in outcome.errors)
        named = {e.path.split(".")[0] for e in outcome.errors if e.path}
        assert named or any(e.message for e in outcome.errors)
        assert not named or str(first_path[0]) in named or len(named) >= 1


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400))
def test_arbitrary_text_is_never_more_than_invalid(text: str) -> None:
    assert_clean_outcome(text)


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=4000),
    insert=st.text(alphabet=":-[]{}&*!|>'\"#%@`\t\n ,?\x00\ufeff", min_size=1, max_size=4),
)
def test_damaged_yaml_is_never_more_than_invalid(cut: int, insert: str) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False)
    cut %= len(text)
    assert_clean_outcome(text[:cut] + insert + text[cut:])
    assert_clean_outcome(text[:cut])


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,  # deeper than PyYAML's recursive composer can go
        "{a: " * 3000 + "1" + "}" * 3000,
        "? [1, 2]\n: 3\n",
        "!!python/object/apply:os.system ['true']\n",
        "version: 1\x00\n",
        "\ufeff",
        "- 1\n- 2\n",
    ],
    ids=["deep lists", "deep maps", "list key", "python tag", "NUL", "BOM only", "a list"],
)
def test_pathological_yaml_is_invalid(text: str) -> None:
    assert isinstance(assert_clean_outcome(text), InvalidPolicy)


def test_the_base_of_the_mutations_is_valid() -> None:
    assert isinstance(assert_clean_outcome(yaml.safe_dump(BASE)), LoadedPolicy)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("network", "connect_timeout"), "10 parsecs", "network.connect_timeout"),
        (("network", "max_request_body_bytes"), "lots", "network.max_request_body_bytes"),
        (("defaults", "rate"), "5/fortnight", "defaults.rate"),
        (("sites", 0, "bytes_per_day"), [1], "sites.0.bytes_per_day"),
        (("teams", 0, "token_sha256"), "abc", "teams.0.token_sha256"),
        (("blocklist", 0, "match", 1), "http://", "blocklist.0.match.1"),
        (("audit", "checkpoint_every_records"), 0, "audit.checkpoint_every_records"),
        # .inf is a YAML float: a checkpoint never signed.
        (("audit", "checkpoint_every_seconds"), float("inf"), "audit.checkpoint_every_seconds"),
    ],
)
def test_errors_name_the_mutated_field_and_its_line(path: Path, value: Any, expected: str) -> None:
    policy = copy.deepcopy(BASE)
    mutate(policy, path, "replace", value)
    outcome = assert_clean_outcome(yaml.safe_dump(policy, sort_keys=False))
    assert isinstance(outcome, InvalidPolicy)
    errors = [e for e in outcome.errors if e.path == expected]
    assert errors and all(e.line is not None for e in errors)
