"""The insubstantiality report against the fetch log it is made from.

A real gateway carries a traffic pattern with several sites, refusals of every kind, opt-outs and
a site that answers 429 and 503; the report's figures (API and CLI) must equal what the test
computes from `crawlwarden audit export` with its own code, its checkpoints must be the signed
ones of that export, and the HTML must open in a real headless Chromium with scripts off.
"""

from __future__ import annotations

import csv
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.report import chart_svg
from proxy.report import to_csv
from proxy.report import to_html
from tests.forked_gateways import run_command
from tests.support import AUDITOR_TOKEN
from tests.support import CRAWLWARDEN
from tests.support import PROJECT
from tests.support import Gateway
from tests.support import Reply
from tests.support import Site
from tests.support import curl
from tests.support import policy_with
from tests.test_report_support import figures_from_export
from tests.test_report_support import rendered_dom
from tests.test_report_support import screenshot

HEADERS = {"X-Crawl-Project": PROJECT}
ROBOTS = b"User-agent: TestBot\nDisallow: /private/\n"
SITE_A_QUOTA = 40
SHARED_FIGURES = (
    "requests",
    "forwarded",
    "withheld",
    "refused",
    "served",
    "refused_by_reason",
    "sent_to_site",
    "gateway_fetches",
    "gateway_bytes",
    "bytes_received",
    "distinct_urls",
    "active_days",
    "daily",
    "peak_minute",
    "peak_requests_per_minute",
    "peak_day",
    "peak_day_requests",
    "peak_bytes_day",
    "peak_day_bytes",
    "optouts_honoured",
    "optouts_by_reason",
    "optout_signals",
    "site_429",
    "site_503",
    "legal_bases",
    "policy_versions",
    "first_ts",
    "last_ts",
)


def report_policy() -> dict[str, Any]:
    return policy_with(
        sites=[
            {
                "id": "site-a",
                "match": ["site-a.test", "*.site-a.test"],
                "rate": "120/min",
                "burst": 3,
                "requests_per_day": SITE_A_QUOTA,
                "bytes_per_day": "1MB",
                "legal_basis": {"kind": "licence", "ref": "LIC-1", "expires": "2099-01-01"},
            },
            {
                "id": "site-b",
                "match": ["site-b.test"],
                "requests_per_day": 100,
                "respect": {"robots": True, "noai": True},
            },
        ],
        blocklist=[
            {
                "id": "tos-d",
                "match": ["site-d.test"],
                "reason": "Terms section 7 forbid automated collection",
                "source": "https://site-d.test/terms, read 2026-10-01",
            }
        ],
        audit={"checkpoint_every_records": 5, "checkpoint_every_seconds": 60},
    )


def drive_traffic(gw: Gateway, site: Site) -> None:
    """Several sites; rate refusals, a project refusal, robots.txt, a withheld noai image, a
    site that answers 429 then 503, a ToS blocklist refusal, and a request without credentials."""
    site.routes["/robots.txt"] = Reply(body=ROBOTS, headers={"Content-Type": "text/plain"})
    site.routes["/noai.jpg"] = Reply(
        body=b"jpeg", headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}
    )
    site.routes["/busy"] = Reply(status=429, body=b"slow down", headers={"Retry-After": "1"})
    site.routes["/down"] = Reply(status=503, body=b"maintenance", headers={"Retry-After": "1"})

    def get(host: str, path: str, **headers: str) -> int:
        return curl(
            site.url(host, path), proxy=gw.proxy_url(), headers={**HEADERS, **headers}
        ).status

    statuses = [get("site-a.test", p) for p in ("/img/0.jpg", "/img/0.jpg", "/img/1.jpg")]
    statuses += [get("img.site-a.test", f"/img/{i}.jpg") for i in range(2, 8)]
    assert 429 in statuses and statuses[:3] == [200, 200, 200]
    assert get("site-a.test", "/img/9.jpg", **{"X-Crawl-Project": "not-ours"}) == 403
    assert get("site-b.test", "/private/x.jpg") == 451
    assert get("site-b.test", "/ok.jpg") == 200
    assert get("site-b.test", "/robots.txt") == 200  # served from the gateway's copy
    assert get("site-b.test", "/noai.jpg") == 451
    assert get("site-c.test", "/busy") == 429
    assert get("site-c.test", "/later") == 429  # paused by the site's own 429
    time.sleep(1.3)
    assert get("site-c.test", "/down") == 503
    assert get("site-d.test", "/x") == 451
    # Over HTTPS: a tunnel opened to nowhere, its request refused (one fetch, two records).
    https = curl(
        f"https://site-d.test:{site.port}/y",
        proxy=gw.proxy_url(),
        headers=HEADERS,
        cacert=gw.ca_cert,
    )
    assert https.status == 451
    assert curl(site.url("site-a.test", "/"), proxy=gw.proxy).status == 407


def check_against_export(report: dict[str, Any], records: list[dict[str, Any]]) -> None:
    sites = sorted({r["site"] for r in records if r["site"] and r["kind"] != "event"})
    by_site = {s["site"]: s for s in report["sites"]}
    assert sorted(by_site) == sites
    for key in sites:
        expected = figures_from_export(records, key)
        actual = {name: by_site[key][name] for name in SHARED_FIGURES}
        assert actual == {name: expected[name] for name in SHARED_FIGURES}, key
    assert report["totals"]["refused_without_site"] == sum(
        1 for r in records if r["kind"] == "fetch" and not r["site"]
    ) + sum(
        json.loads(r["note"])["refused"] for r in records if r["kind"] == "unauthenticated_refusals"
    )


@pytest.fixture
def traffic(workdir: Path, site: Site):
    """A gateway that has carried the traffic pattern: (gateway, export records, API report)."""
    with Gateway(workdir, report_policy()) as gw:
        drive_traffic(gw, site)
        records = gw.fetch_records()
        status, report = gw.admin_request("GET", "/v1/reports/sites?format=json", AUDITOR_TOKEN)
        assert status == 200, report
        yield gw, records, report


def test_report_figures_equal_counts_from_an_export(traffic):
    gw, records, report = traffic
    check_against_export(report, records)
    a = next(s for s in report["sites"] if s["site"] == "site-a")
    assert set(a["refused_by_reason"]) == {"rate_limited", "unknown_project"}
    assert a["legal_bases"] == {"licence:LIC-1": a["sent_to_site"]}
    assert (a["rate"], a["rate_per_minute"], a["burst"]) == ("120/min", 120.0, 3)
    assert a["requests_per_day"] == SITE_A_QUOTA
    assert a["peak_day_request_share"] == round(a["peak_day_requests"] / SITE_A_QUOTA, 6)
    assert a["peak_rate_share"] == round(a["peak_requests_per_minute"] / 120, 6)
    assert a["highest_daily_quota_share"] == max(
        a["peak_day_request_share"], a["peak_day_bytes_share"]
    )
    assert a["distinct_urls"] < a["sent_to_site"]  # /img/0.jpg twice
    b = next(s for s in report["sites"] if s["site"] == "site-b")
    assert b["optouts_by_reason"] == {"noai_directive": 1, "robots_disallowed": 1}
    assert b["withheld"] == 1 and b["gateway_fetches"] >= 1
    assert b["served"] == 1 and "robots_cache" not in b["refused_by_reason"]
    c = next(s for s in report["sites"] if s["site"] == "site-c.test")
    assert (c["site_429"], c["site_503"]) == (1, 1)
    assert c["refused_by_reason"] == {"site_paused": 1}
    d = next(s for s in report["sites"] if s["site"] == "site-d.test")
    # (the HTTPS fetch counted once: auditor probe 4 found its tunnel's record counted too)
    assert d["refused_by_reason"] == {"tos_blocklist": 2} and d["sent_to_site"] == 0
    assert d["requests"] == 2
    assert report["policy"]["version"] in a["policy_versions"]

    # A window: only the records from the site's 429 on.
    since = next(r["ts"] for r in records if r["url"].endswith("/busy"))
    status, windowed = gw.admin_request(
        "GET", f"/v1/reports/sites?format=json&since={since}", AUDITOR_TOKEN
    )
    assert status == 200
    check_against_export(windowed, [r for r in records if r["ts"] >= since])
    assert {s["site"] for s in windowed["sites"]} == {"site-c.test", "site-d.test"}

    status, text = gw.admin_request("GET", "/v1/reports/sites?format=csv", AUDITOR_TOKEN)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["site"] for r in rows if r["type"] == "site"] == [s["site"] for s in report["sites"]]
    # the totals and the period too, as the JSON and HTML forms have them (auditor probe)
    [totals] = [r for r in rows if r["type"] == "totals"]
    for name, value in report["totals"].items():
        assert totals[name] == str(value), name
    assert totals["first_ts"] == report["period"]["first_record"]
    assert totals["policy_version"] == report["policy"]["version"]
    assert any(r["type"] == "checkpoint" and r["replica"] == "gw" for r in rows)
    assert gw.admin_request("GET", "/v1/reports/sites", None)[0] == 401
    page = curl(
        gw.admin + "/v1/reports/sites?format=html",
        headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"},
    )
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert b"<svg" in page.body and b"site-c.test" in page.body


def test_cli_report_is_tied_to_the_signed_log_and_opens_in_chromium(
    traffic, workdir: Path, tmp_path: Path
):
    gw, _, _ = traffic
    gw.stop()  # the shutdown checkpoint signs every record
    records = gw.fetch_records()
    source = ["--data-dir", str(gw.data_dir), "--policy", str(gw.policy_file)]

    def report(*args: str) -> str:
        return run_command([CRAWLWARDEN, "report", *source, *args], text=True, check=True).stdout

    data = json.loads(report("--format", "json"))
    check_against_export(data, records)

    export_file = tmp_path / "export.jsonl"
    run_command(
        [CRAWLWARDEN, "audit", "export", "--data-dir", str(gw.data_dir), "--output", export_file],
        check=True,
    )
    verified = run_command(
        [
            CRAWLWARDEN,
            "audit",
            "verify",
            export_file,
            "--public-key",
            gw.data_dir / "audit-signing.pub",
        ],
        text=True,
    )
    assert verified.returncode == 0, verified.stdout
    lines = [json.loads(line) for line in export_file.read_text().splitlines()]
    last = [c for c in lines if c["type"] == "checkpoint"][-1]
    [tie] = data["checkpoints"]
    assert tie["replica"] == "gw" and tie["covers_period"] is True
    assert tie["checkpoint"]["note"] == last["note"]
    assert tie["last_seq"] == max(r["seq"] for r in lines if r["type"] == "record")

    html_file = tmp_path / "report.html"
    run_command(
        [CRAWLWARDEN, "report", *source, "--format", "html", "--output", html_file],
        check=True,
    )
    page = html_file.read_text()
    assert "<script" not in page.lower()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page  # no script runs
    for text in ("Insubstantiality report", "site-a", "site-c.test", "Checkpoints"):
        assert text in page
    assert html.escape(last["note"]) in page  # the signed note itself, to check by hand
    assert page.count("<svg") == len(data["sites"])
    screenshot(f"file://{html_file}", tmp_path / "report.png", tmp_path / "chromium-profile")
    dom = rendered_dom(f"file://{html_file}", tmp_path / "chromium-profile")
    assert "Insubstantiality report" in dom and "quota 40/day" in dom

    rows = list(csv.DictReader(io.StringIO(report("--format", "csv"))))
    assert {r["site"] for r in rows if r["type"] == "site"} == {s["site"] for s in data["sites"]}

    # Without a policy the counts stay; the limits are left out, not guessed.
    bare = run_command(
        [CRAWLWARDEN, "report", "--data-dir", str(gw.data_dir), "--format", "json"],
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    bare_data = json.loads(bare.stdout)
    check_against_export(bare_data, records)
    assert all(
        s["rate"] is None and s["highest_daily_quota_share"] is None for s in bare_data["sites"]
    )
    missing = run_command(
        [CRAWLWARDEN, "report", "--data-dir", str(tmp_path / "nowhere")],
        text=True,
    )
    assert missing.returncode == 2 and "--data-dir" in missing.stderr


# -- rendering, without a gateway ----------------------------------------------------------


def _site(**changes: Any) -> dict[str, Any]:
    site = {
        "site": "a<b>.example",
        "daily": {"2026-11-01": 10, "2026-11-03": 30},
        "requests_per_day": 40,
        "first_ts": "2026-11-01T10:00:00.000000Z",
        "last_ts": "2026-11-03T10:00:00.000000Z",
    }
    return {**site, **changes}


def test_the_chart_shows_every_day_of_the_period_against_the_quota():
    svg = chart_svg(_site(), {"since": None, "until": None})
    assert svg.count("<rect") == 1 + 3  # the frame, and a bar for each day, 0 included
    assert "<title>2026-11-02: 0</title>" in svg
    assert "quota 40/day" in svg
    assert "a&lt;b&gt;.example" in svg
    windowed = chart_svg(
        _site(), {"since": "2026-10-30T00:00:00.000000Z", "until": "2026-11-05T00:00:00.000000Z"}
    )
    assert windowed.count("<rect") == 1 + 6  # Oct 30 .. Nov 4: `until` is exclusive
    unlimited = chart_svg(_site(requests_per_day=None), {"since": None, "until": None})
    assert "quota" not in unlimited.split("</title>", 1)[1]


def test_a_site_nothing_reached_reads_without_blanks():
    # (a site with only refusals read "0 at ;" and "0 on  of 5000": auditor probe)
    from proxy.report import SiteTally
    from proxy.report import site_figures

    quiet = SiteTally()
    quiet.add("fetch", "refused", "rate_limited", "2026-11-30", 1, 0)
    report = {
        "created": "2026-11-30T05:00:00.000000Z",
        "source": "sqlite:x",
        "period": {"since": None, "until": None, "first_record": None, "last_record": None},
        "policy": {"version": None},
        "totals": dict.fromkeys(
            ("sites", "sent_to_site", "forwarded", "withheld", "refused", "optouts_honoured"), 0
        )
        | {"site_429": 0, "site_503": 0, "refused_without_site": 0},
        "sites": [site_figures("quiet.test", quiet, None)],
        "checkpoints": [],
    }
    text = html.unescape(to_html(report))
    assert "peak requests per minute</dt><dd>0; no rate budget (no policy given)</dd>" in text
    assert "busiest day (requests)</dt><dd>0 of no quota" in text
    assert " at ;" not in text and " on  of" not in text and "(burst )" not in text


def test_html_and_csv_escape_what_the_log_holds():
    report = {
        "created": "2026-11-28T00:00:00.000000Z",
        "source": "sqlite:x",
        "period": {"since": None, "until": None, "first_record": None, "last_record": None},
        "policy": {"version": None},
        "totals": {
            "sites": 0,
            "sent_to_site": 0,
            "forwarded": 0,
            "withheld": 0,
            "refused": 0,
            "optouts_honoured": 0,
            "site_429": 0,
            "site_503": 0,
            "refused_without_site": 0,
        },
        "sites": [],
        "checkpoints": [
            {
                "replica": "<gw>",
                "first_seq": 1,
                "last_seq": 2,
                "checkpoint": None,
                "covers_period": False,
            }
        ],
    }
    page = to_html(report)
    assert "&lt;gw&gt;" in page and "<gw>" not in page
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert [r["type"] for r in rows] == ["totals", "checkpoint"]
    assert rows[1] == (
        {**dict.fromkeys(rows[0], ""), "type": "checkpoint", "replica": "<gw>", "first_seq": "1"}
        | {"last_seq": "2", "covers_period": "False"}
    )
