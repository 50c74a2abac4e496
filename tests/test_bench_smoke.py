"""The benchmark harness still runs end to end (`bench/run.py --quick`): bare mitmdump and an
embedded gateway behind a real nginx, over HTTP and HTTPS through CONNECT.

A smoke test only: it checks that every request was answered 200 and that the report has its
figures, never how fast anything was (timings belong to bench/README.md, not to CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support import installed


@pytest.mark.timeout(120)
def test_quick_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    # The benchmark's upstream; .ci/services installs it (make test).
    installed("nginx", ".ci/nginx installs Debian's nginx-light", "/usr/sbin/nginx")
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["matrix"]["summary"]
    assert set(summary) == {"http-1k-c8", "https-1k-c8"}
    for cell in summary.values():
        assert set(cell) == {"bare", "embedded"}
        for entry in cell.values():
            assert entry["rps"] > 0
            assert entry["non_200"] == 0 and entry["errors"] == 0
            assert entry["cpu_s_per_1000"] > 0 and entry["peak_rss_mb"] > 0
        gateway = cell["embedded"]
        assert gateway["refused_or_withheld"] == 0
        assert gateway["rps_vs_bare"] > 0
        assert gateway["governance_p99_ms"] is not None
    assert out.with_suffix(".md").read_text().count("| embedded |") == 2
