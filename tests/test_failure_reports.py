"""A failed test shows the logs of the gateways it started (tests/conftest.py): a flake in CI is
otherwise gone with the run's temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import Gateway
from tests.support import policy_with

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


def _line(event: str, level: str = "info", **fields: object) -> str:
    return json.dumps({"event": event, "level": level, **fields})


def test_the_digest_keeps_the_warnings_and_the_last_lines(tmp_path: Path):
    gw = Gateway(tmp_path, policy_with())
    lines = [_line("started")]
    lines += [_line("decision", n=n) for n in range(100)]
    lines += [_line("budget_store_unavailable", "warning"), "Traceback (most recent call last):"]
    lines += [_line("decision", n=n) for n in range(100, 150)]
    lines += [_line("stopped", note="x" * 1000)]
    gw.log_file.write_text("\n".join(lines) + "\n")
    digest = gw.log_digest(lines=40, width=400).splitlines()
    assert digest[0] == "-- 2 warnings, errors and other lines before the last:"
    assert digest[1:3] == [lines[101], lines[102]]
    assert digest[3] == f"-- the last 40 of {len(lines)} lines:"
    assert digest[4:-1] == lines[-40:-1]
    assert digest[-1] == lines[-1][:400] + " [...]"


def test_a_failed_test_shows_its_gateways_log(pytester: pytest.Pytester):
    # The hook itself, in a run of its own: a test that fails after its gateway wrote a warning
    # (the gateway is not started: its log is written as a started one would have).
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_inner="""
        import json
        from tests.support import Gateway, LAUNCHED, policy_with

        def test_passes(workdir):
            gw = Gateway(workdir, policy_with(), name="quiet")
            LAUNCHED.add(gw)
            gw.log_file.write_text("not shown\\n")

        def test_fails(workdir):
            gw = Gateway(workdir, policy_with(), name="edge")
            LAUNCHED.add(gw)
            gw.log_file.write_text(
                json.dumps({"event": "budget_pause_follow_failed", "level": "warning"}) + "\\n"
            )
            assert False, "the site got 0 bytes"
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "gateway 'edge' log (" in out and "budget_pause_follow_failed" in out, out
    assert "gateway 'quiet' log" not in out and "not shown" not in out, out
