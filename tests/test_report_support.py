"""Helpers for the report and policy page tests: a real headless Chromium, and the report's
figures recomputed from export lines by code of the test's own (no import of proxy.report).

Chromium is Debian's `chromium` package (`.ci/chromium` installs it). Without it these tests
skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import struct
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support import installed

WINDOW = (1200, 1600)
OPTOUT_REASONS = {
    "robots_disallowed",
    "tdm_reserved",
    "noai_directive",
    "content_usage",
    "image_optout",
}


def chromium() -> str:
    found = shutil.which("chromium-browser")  # Ubuntu's name
    return found or installed("chromium", ".ci/chromium installs Debian's package")


def _browser(profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=180,
        env=env,
    )


def screenshot(target: str, out: Path, profile: Path) -> bytes:
    """Render `target` (a URL or file:// URL) in headless Chromium and save a PNG screenshot.

    The pages forbid every script themselves (Content-Security-Policy `default-src 'none'`), so
    what is rendered is what a reader without JavaScript sees."""
    proc = _browser(
        profile, f"--screenshot={out}", f"--window-size={WINDOW[0]},{WINDOW[1]}", target
    )
    assert proc.returncode == 0 and out.exists(), proc.stderr.decode(errors="replace")[-2000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == WINDOW
    # A blank page of this size compresses to a few kilobytes; text, tables and charts do not.
    assert len(data) > 30_000, f"the screenshot of {target} looks empty ({len(data)} bytes)"
    return data


def rendered_dom(target: str, profile: Path) -> str:
    """The DOM Chromium built for `target`."""
    proc = _browser(profile, "--dump-dom", target)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode()


# -- the report's figures, from export lines -----------------------------------------------


def _peak(counts: Counter[str]) -> tuple[str | None, int]:
    if not counts:
        return None, 0
    top = max(counts.values())
    return min(k for k, v in counts.items() if v == top), top


def figures_from_export(records: list[dict[str, Any]], site: str) -> dict[str, Any]:
    """The report's definitions (proxy/report.py docstring), applied to an export's records."""
    mine = [
        r
        for r in records
        if r.get("site") == site
        # a tunnel opened to nowhere: the requests in it have records of their own
        and not (r["method"] == "CONNECT" and r["decision"] == "refused" and r["status"] == 200)
    ]
    fetches = [r for r in mine if r["kind"] == "fetch"]
    gateway = [r for r in mine if r["kind"] == "gateway_fetch"]
    reached = [r for r in fetches if r["decision"] in ("forwarded", "withheld")]
    refused = [r for r in fetches if r["decision"] == "refused"]
    optouts = [
        r
        for r in fetches
        if r["decision"] in ("refused", "withheld") and r["reason"] in OPTOUT_REASONS
    ]
    # the site's traffic: what reached it, the gateway's own reads too (as the budgets count)
    traffic = reached + [r for r in gateway if r["decision"] in ("forwarded", "withheld")]
    # WebSocket conversations: the site's messages' bytes, no request
    websockets = [r for r in mine if r["kind"] == "websocket"]
    daily = Counter(r["ts"][:10] for r in traffic)
    daily_bytes: Counter[str] = Counter()
    for r in traffic + websockets:
        daily_bytes[r["ts"][:10]] += r["response_bytes"]
    peak_minute, peak_rpm = _peak(Counter(r["ts"][:16] for r in traffic))
    peak_day, peak_day_requests = _peak(daily)
    peak_bytes_day, peak_day_bytes = _peak(daily_bytes)
    answered = [
        r["status"] for r in fetches + gateway if r["decision"] in ("forwarded", "withheld")
    ]
    return {
        "site": site,
        "requests": len(fetches),
        "forwarded": sum(r["decision"] == "forwarded" for r in fetches),
        "withheld": sum(r["decision"] == "withheld" for r in fetches),
        "refused": len(refused),
        "served": sum(r["decision"] == "served" for r in fetches),
        "refused_by_reason": dict(sorted(Counter(r["reason"] for r in refused).items())),
        "sent_to_site": len(reached),
        "gateway_fetches": len(gateway),
        "gateway_bytes": sum(r["response_bytes"] for r in gateway),
        "bytes_received": sum(r["response_bytes"] for r in reached + websockets),
        "distinct_urls": len({r["url"] for r in reached}),
        "active_days": len(daily),
        "daily": dict(sorted(daily.items())),
        "peak_minute": peak_minute,
        "peak_requests_per_minute": peak_rpm,
        "peak_day": peak_day,
        "peak_day_requests": peak_day_requests,
        "peak_bytes_day": peak_bytes_day,
        "peak_day_bytes": peak_day_bytes,
        "optouts_honoured": len(optouts),
        "optouts_by_reason": dict(sorted(Counter(r["reason"] for r in optouts).items())),
        "optout_signals": dict(sorted(Counter(s for r in optouts for s in r["signals"]).items())),
        "site_429": answered.count(429),
        "site_503": answered.count(503),
        # (a record without one has none to count)
        "legal_bases": dict(
            sorted(Counter(r["legal_basis"] for r in reached if r["legal_basis"]).items())
        ),
        "policy_versions": dict(
            sorted(Counter(r["policy_version"] for r in mine if r["policy_version"]).items())
        ),
        "first_ts": min(r["ts"] for r in mine),
        "last_ts": max(r["ts"] for r in mine),
    }


def iso_minus(ts: str, seconds: float) -> str:
    t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00")) - dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
