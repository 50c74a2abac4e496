"""Shared fixtures: a test CA, loopback sites and gateway processes (see tests/support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import LAUNCHED
from tests.support import LocalCA
from tests.support import Site


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def site() -> Iterator[Site]:
    with Site() as s:
        yield s


@pytest.fixture
def tls_site(test_ca: LocalCA) -> Iterator[Site]:
    with Site(tls=test_ca) as s:
        yield s


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # A test that failed before stopping its gateways leaves no process behind.
    for gw in [g for g in LAUNCHED if g.workdir == tmp_path]:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # A failed test shows the logs of the gateways it started (Gateway.log_digest): a flake in
    # CI is otherwise gone with the run's temporary directory.
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and tmp_path is not None:
        for gw in [g for g in LAUNCHED if g.workdir == tmp_path]:
            report.sections.append((f"gateway {gw.name!r} log ({gw.log_file})", gw.log_digest()))
    return report
