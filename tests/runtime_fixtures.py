"""A Runtime started in-process on a policy, and a client of its admin API (no gateway process):
what the admin API's tests set up alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from aiohttp.test_utils import TestServer

from proxy.admin import make_app
from proxy.app import ADMIN_ROUTES
from proxy.runtime import Runtime
from proxy.runtime import Settings
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import write_policy

# the admin API's two roles, as request headers
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, policy: dict[str, Any], replica_id: str
) -> AsyncIterator[Runtime]:
    settings = Settings(
        policy_file=write_policy(tmp_path / "policy.yaml", policy),
        data_dir=tmp_path / "data",
        replica_id=replica_id,
    )
    rt = Runtime.from_settings(settings)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


@contextlib.asynccontextmanager
async def admin_client(rt: Runtime) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(rt, ADMIN_ROUTES))) as client:
        yield client
