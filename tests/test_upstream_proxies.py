"""egress.upstream_proxies: requests leave through a pool of real upstream proxies (mitmdump)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import VENV_BIN
from tests.support import Gateway
from tests.support import Site
from tests.support import free_port
from tests.support import policy_with
from tests.support import wait_for


class UpstreamProxy:
    """A bare mitmdump in regular mode that passes TLS through untouched and logs each flow."""

    def __init__(self, workdir: Path, name: str):
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.confdir = workdir / f"{name}-conf"
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "mitmdump"),
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                str(self.port),
                "--set",
                f"confdir={self.confdir}",
                "--set",
                "ignore_hosts=.*",
                "--set",
                "flow_detail=1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        assert wait_for(listening, timeout=20), self.log.read_text()

    def flows(self) -> str:
        time.sleep(0.2)
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def pool(workdir: Path) -> Iterator[dict[str, UpstreamProxy]]:
    proxies = {name: UpstreamProxy(workdir, name) for name in ("pool-a", "pool-b")}
    yield proxies
    for p in proxies.values():
        p.stop()


def test_requests_leave_through_the_pool_and_a_team_can_be_pinned(
    workdir: Path, site: Site, pool: dict[str, UpstreamProxy]
):
    policy = policy_with(
        egress={
            "provider": "test-transit",
            "public_ips": ["203.0.113.7"],
            "upstream_proxies": [
                {"name": name, "url": f"http://127.0.0.1:{p.port}"} for name, p in pool.items()
            ],
        }
    )
    policy["teams"][1]["upstream_proxy"] = "pool-b"
    with Gateway(workdir, policy) as gw:
        # Four separate connections from the first team: spread over the pool.
        for i in range(4):
            r = requests.get(
                site.url("site-a.test", f"/spread/{i}"),
                proxies={"http": gw.proxy_url()},
                headers={"X-Crawl-Project": PROJECT, "Connection": "close"},
                timeout=10,
            )
            assert r.status_code == 200
        # The pinned team always uses pool-b.
        for i in range(3):
            r = requests.get(
                site.url("site-a.test", f"/pinned/{i}"),
                proxies={"http": gw.proxy_url(OTHER_TEAM, OTHER_TOKEN)},
                headers={"Connection": "close"},
                timeout=10,
            )
            assert r.status_code == 200
        records = gw.fetch_records()
    by_path = {r["url"].split(str(site.port), 1)[1]: r for r in records}
    spread = [by_path[f"/spread/{i}"]["upstream_proxy"] for i in range(4)]
    assert sorted(spread) == ["pool-a", "pool-a", "pool-b", "pool-b"]
    assert {by_path[f"/pinned/{i}"]["upstream_proxy"] for i in range(3)} == {"pool-b"}
    assert all(r["egress_ip"] == "127.0.0.1" for r in records)
    # The site saw every request, each through one of the proxies.
    assert site.count() == 7
    assert site.connections == 7
    log_b = pool["pool-b"].flows()
    assert "127.0.0.1" in log_b
