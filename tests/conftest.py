"""Shared fixtures: a test CA, loopback sites and gateway processes (see tests/support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
