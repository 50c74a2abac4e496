"""Proxy credentials and admin bearer tokens."""

from __future__ import annotations

import pytest
import yaml

from proxy.identity import AdminDirectory
from proxy.identity import TeamDirectory
from proxy.identity import parse_basic
from proxy.policy import parse_policy
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import base_policy
from tests.support import basic

POLICY = parse_policy(yaml.safe_dump(base_policy())).policy


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer abc", "Basic", "Basic !!!", "Basic " + "dGVhbQ==", basic("", "x")],
)
def test_malformed_basic_is_none(header: str | None):
    assert parse_basic(header) is None


def test_teams_authenticate_with_their_own_token_only():
    teams = TeamDirectory(POLICY)
    caller = teams.authenticate(basic(TEAM, TEAM_TOKEN))
    assert caller is not None and (caller.project, caller.account) == (None, None)
    identity = caller.identity
    assert identity.team == TEAM
    assert identity.allows_project("faces-v2") and not identity.allows_project("other")
    assert not identity.allows_project(None)
    assert teams.authenticate(basic(TEAM, OTHER_TOKEN)) is None
    assert teams.authenticate(basic("ghost", TEAM_TOKEN)) is None
    other = teams.authenticate(basic(OTHER_TEAM, OTHER_TOKEN))
    assert other is not None
    assert other.identity.allows_project(None) and other.identity.allows_project("any")


@pytest.mark.parametrize(
    ("user", "project", "account"),
    [
        (TEAM, None, None),
        (f"{TEAM}+faces-v2", "faces-v2", None),
        (f"{TEAM}+faces-v2+shop+reader@example.test", "faces-v2", "shop+reader@example.test"),
        (f"{TEAM}++reader-7", None, "reader-7"),
        (f"{TEAM}+", None, None),
    ],
)
def test_the_proxy_user_name_may_name_the_project_and_account(
    user: str, project: str | None, account: str | None
):
    caller = TeamDirectory(POLICY).authenticate(basic(user, TEAM_TOKEN))
    assert caller is not None and caller.identity.team == TEAM
    assert (caller.project, caller.account) == (project, account)


def test_a_project_in_the_user_name_does_not_open_another_teams_door():
    teams = TeamDirectory(POLICY)
    assert teams.authenticate(basic(f"{TEAM}+faces-v2", OTHER_TOKEN)) is None
    assert teams.authenticate(basic(f"{OTHER_TEAM}+faces-v2", TEAM_TOKEN)) is None
    assert teams.authenticate(basic(f"{TEAM}-x+faces-v2", TEAM_TOKEN)) is None


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CW_TEAM_TOKEN", "from-env")
    policy = base_policy()
    policy["teams"] = [{"name": "envteam", "token_env": "CW_TEAM_TOKEN"}]
    teams = TeamDirectory(parse_policy(yaml.safe_dump(policy)).policy)
    assert teams.authenticate(basic("envteam", "from-env")) is not None
    assert teams.authenticate(basic("envteam", "other")) is None


def test_admin_roles():
    admins = AdminDirectory(POLICY)
    assert admins.role_of(f"Bearer {ADMIN_TOKEN}") == "admin"
    assert admins.role_of(f"bearer {AUDITOR_TOKEN}") == "auditor"
    assert admins.role_of("Bearer nope") is None
    assert admins.role_of(basic("a", ADMIN_TOKEN)) is None
    assert admins.role_of(None) is None


def test_an_admin_token_is_named_by_its_policy_entry_never_by_its_hash():
    policy = base_policy()
    policy["admin_tokens"][1]["name"] = "audit-team@example"
    admins = AdminDirectory(parse_policy(yaml.safe_dump(policy)).policy)
    assert admins.holder_of(f"Bearer {ADMIN_TOKEN}") == ("admin", "admin_tokens[0]")
    assert admins.holder_of(f"Bearer {AUDITOR_TOKEN}") == ("auditor", "audit-team@example")
    assert admins.holder_of("Bearer \udcff") is None  # non-UTF-8 bytes: no token, no error
