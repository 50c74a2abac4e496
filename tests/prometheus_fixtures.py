"""A real Prometheus (and promtool) for the dashboard and alert tests.

The binaries come from Debian's `prometheus` package; `.ci/prometheus` installs it (`make test`
runs it through `.ci/services`). Without them the tests skip, except under CI=true, where they
fail: a dashboard nobody evaluated is not a tested dashboard.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import IN_CI
from tests.support import free_port


def prometheus_tool(name: str) -> str:
    """The path of `prometheus` or `promtool`; skip (fail in CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} is not installed: run .ci/prometheus (Debian: apt-get install prometheus)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


class Prometheus:
    """Our own `prometheus` process (not the system service): config, data and port of its own."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        targets: list[str],
        *,
        rule_files: list[Path] | None = None,
        interval: str = "1s",
        job: str = "crawlwarden",
    ):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "prometheus.yml"
        self.log_file = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files or []],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Prometheus:
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=log,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) of each element (a scalar has no labels)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise QueryError(f"{expr}: a {data['resultType']}, not an instant vector")
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float:
        """The one value of an expression, NaN when it returns nothing."""
        result = self.query(expr)
        if len(result) > 1:
            raise AssertionError(f"{expr} returned {len(result)} series; sum it or pick one")
        return result[0][1] if result else math.nan


class QueryError(Exception):
    pass
