"""The insubstantiality report: per site and period, proof that collection stayed small.

Guideline "Necessity/minimisation": collection from one source stays insubstantial and does not
materially increase the site's traffic. The fetch-log store counts the rows `crawlwarden audit
export` writes (proxy/audit/report_query.py: SQL over the records' columns and JSON bodies, so
a month of a fleet is not read record by record through a replica), so every figure can be
recomputed from an export of the same period. Definitions (one site = one value of the
record's `site`; "reached the site" = a record of kind `fetch` whose decision is `forwarded` or
`withheld`):

- `requests`: records of kind `fetch` of the site, any decision.
- `forwarded`, `withheld`, `refused`, `served`: those records by decision (`served`: a
  scraper's robots.txt answered from the gateway's copy, the site not asked);
  `refused_by_reason`: refused records counted by `reason`.
- `sent_to_site`: forwarded + withheld, the scrapers' requests the site received.
- `gateway_fetches`, `gateway_bytes`: records of kind `gateway_fetch` (the gateway's own
  robots.txt and tdmrep.json reads) and the sum of their `response_bytes`.
- `bytes_received`: the sum of `response_bytes` of the records that reached the site, and of
  the site's WebSocket conversations (records of kind `websocket`: the messages the site sent
  after an upgrade, counted in `bytes_per_day` as the budgets count them; in `daily` bytes
  too, not in any request count).
- `distinct_urls`: distinct `url` values among the records that reached the site.
- "the site's traffic": the records that reached the site and the gateway's own reads of it
  (kind `gateway_fetch`, forwarded or withheld), as the site saw them and as the budgets count
  them.
- `active_days`: distinct UTC dates (`ts[:10]`) of the site's traffic.
- `daily`: per UTC date, the site's traffic (the chart's bars).
- `peak_minute`, `peak_requests_per_minute`: the UTC minute (`ts[:16]`) with most of the site's
  traffic, and that count (earliest minute on a tie).
- `rate`, `rate_per_minute`: the site's rate budget in the policy given to the report (its
  `rate` as requests per minute); `peak_rate_share` = peak_requests_per_minute / rate_per_minute.
  The budget also admits a `burst`, so a share slightly above 1 is possible within policy.
- `peak_day`, `peak_day_requests`, `requests_per_day`, `peak_day_request_share`: the UTC date
  with most of the site's traffic, that count, the site's daily request quota and the ratio;
  `peak_bytes_day`, `peak_day_bytes`, `bytes_per_day`, `peak_day_bytes_share`: the same for
  `response_bytes`. `highest_daily_quota_share` is the larger of the two shares.
- `optouts_honoured`: records of kind `fetch` refused or withheld for an opt-out reason
  (robots_disallowed, tdm_reserved, noai_directive, content_usage, image_optout);
  `optouts_by_reason` counts them by reason, `optout_signals` counts the signal names they carry.
- `site_429`, `site_503`: records of kind `fetch` or `gateway_fetch` that reached the site and
  whose `status` (the site's answer) is 429 or 503.
- `legal_bases`: `legal_basis` of the records that reached the site, counted.
- `policy_versions`: `policy_version` of every record of the site (both kinds), counted.
- A refused `CONNECT` answered 200 (a tunnel opened to nowhere: each request in it is refused
  and recorded on its own) is in no figure; the requests in it are.
- `refused_without_site` (totals only): records with no `site` (requests
  refused before a site was known: no valid credentials), plus the refusals that
  `unauthenticated_refusals` events counted (their note's `refused`).

The limits come from the policy given (the gateway's own for `GET /v1/reports/sites`, `--policy`
for the CLI); `policy_versions` shows which versions were in force when the records were made.
`checkpoints` ties the report to the signed log: per replica with records in the period, the
seq range of those records (events included), the newest signed checkpoint of that replica and
whether it covers the period's last record; verify it with `crawlwarden audit verify` on an
export of the same log.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import html
import io
import json
import sys
import time
from collections import Counter
from collections import defaultdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import TextIO

from proxy import units
from proxy.audit.checkpoint import CheckpointError
from proxy.audit.checkpoint import checkpoint_line
from proxy.audit.checkpoint import note_text
from proxy.audit.checkpoint import parse_text
from proxy.audit.dialect import REACHED_DECISIONS
from proxy.audit.query import RecordQuery
from proxy.audit.query import check_window
from proxy.audit.query import parse_time
from proxy.audit.record import utc_timestamp
from proxy.audit.report_query import ReportRows
from proxy.audit.schema import SchemaTooNew
from proxy.decision import Reason
from proxy.inputs import csv_cell
from proxy.policy import Policy
from proxy.record_source import RecordSource
from proxy.record_source import read_errors
from proxy.sites import SiteDirectory
from proxy.websocket import KIND as WEBSOCKET

FORMAT = "crawlwarden-insubstantiality-report/1"
# The HTML needs no script and may run none: readable as it is, and nothing to inject into.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
OPTOUT_REASONS = frozenset(
    {
        str(Reason.ROBOTS_DISALLOWED),
        str(Reason.TDM_RESERVED),
        str(Reason.NOAI_DIRECTIVE),
        str(Reason.CONTENT_USAGE),
        str(Reason.IMAGE_OPTOUT),
    }
)
CHART_DAYS = 92


@dataclass
class SiteTally:
    """One site's figures before they are shaped: the store's groups added up."""

    requests: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    gateway_fetches: int = 0
    gateway_bytes: int = 0
    bytes_received: int = 0
    distinct_urls: int = 0
    daily: Counter[str] = field(default_factory=Counter)
    daily_bytes: Counter[str] = field(default_factory=Counter)
    minutes: Counter[str] = field(default_factory=Counter)  # the busiest minute only
    optouts_by_reason: Counter[str] = field(default_factory=Counter)
    optout_signals: Counter[str] = field(default_factory=Counter)
    site_status: Counter[int] = field(default_factory=Counter)
    legal_bases: Counter[str] = field(default_factory=Counter)
    policy_versions: Counter[str] = field(default_factory=Counter)
    first_ts: str | None = None
    last_ts: str | None = None

    def add(
        self, kind: str, decision: str, reason: str | None, day: str, n: int, size: int
    ) -> None:
        """`n` records of one kind, decision and reason on one UTC day, `size` bytes."""
        reached = decision in REACHED_DECISIONS
        if kind == WEBSOCKET:  # bytes the site sent, no request
            self.bytes_received += size
            self.daily_bytes[day] += size
            return
        if kind == "gateway_fetch":
            self.gateway_fetches += n
            self.gateway_bytes += size
            if reached:  # the site's traffic, and the budgets', as a scraper's
                self.daily[day] += n
                self.daily_bytes[day] += size
            return
        self.requests += n
        self.decisions[decision] += n
        if decision == "refused":
            self.refused_by_reason[str(reason)] += n
        if decision in ("refused", "withheld") and str(reason) in OPTOUT_REASONS:
            self.optouts_by_reason[str(reason)] += n
        if reached:
            self.bytes_received += size
            self.daily[day] += n
            self.daily_bytes[day] += size


@dataclass
class Tally:
    sites: dict[str, SiteTally] = field(default_factory=lambda: defaultdict(SiteTally))
    without_site: int = 0
    replicas: dict[str, list[int]] = field(default_factory=dict)  # replica -> [first, last] seq
    first_ts: str | None = None
    last_ts: str | None = None

    @classmethod
    def of(cls, rows: ReportRows) -> Tally:
        tally = cls(
            without_site=rows.without_site + sum(map(_counted, rows.unauthenticated)),
            replicas={replica: [first, last] for replica, first, last in rows.replicas},
            first_ts=rows.first_ts,
            last_ts=rows.last_ts,
        )
        sites = tally.sites
        for site, kind, decision, reason, day, n, size, first, last in rows.groups:
            t = sites[site]
            t.add(kind, decision, reason, day, n, size)
            t.first_ts = first if t.first_ts is None or first < t.first_ts else t.first_ts
            t.last_ts = last if t.last_ts is None or last > t.last_ts else t.last_ts
        for site, minute, n in rows.peak_minutes:
            sites[site].minutes[minute] = n
        for site, n in rows.distinct_urls:
            sites[site].distinct_urls = n
        for site, signal, n in rows.signals:
            sites[site].optout_signals[signal] += n
        for site, status, n in rows.statuses:
            sites[site].site_status[status] += n
        for site, basis, n in rows.legal_bases:
            sites[site].legal_bases[basis] += n
        for site, version, n in rows.policy_versions:
            sites[site].policy_versions[version] += n
        return tally


def _counted(event: dict[str, Any]) -> int:
    """The refusals an `unauthenticated_refusals` event counted (its note says how many)."""
    try:
        refused = json.loads(event.get("note") or "")["refused"]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"record {event.get('replica')}/{event.get('seq')}: an unauthenticated_refusals "
            f"event whose note does not say how many were refused ({e!r}); run audit verify"
        ) from e
    if not isinstance(refused, int) or isinstance(refused, bool) or refused < 0:
        raise ValueError(
            f"record {event.get('replica')}/{event.get('seq')}: an unauthenticated_refusals "
            f"event whose note's refused is {refused!r}; run audit verify"
        )
    return refused


def _peak(counts: Counter[str]) -> tuple[str | None, int]:
    if not counts:
        return None, 0
    best = max(counts.values())
    return min(k for k, v in counts.items() if v == best), best


def _share(used: int, limit: float | None) -> float | None:
    if not limit:
        return None
    return round(used / limit, 6)


def site_figures(key: str, t: SiteTally, directory: SiteDirectory | None) -> dict[str, Any]:
    peak_minute, peak_rpm = _peak(t.minutes)
    peak_day, peak_day_requests = _peak(t.daily)
    peak_bytes_day, peak_day_bytes = _peak(t.daily_bytes)
    rate_text: str | None = None
    rate_per_minute: float | None = None
    burst: int | None = None
    requests_per_day: int | None = None
    bytes_per_day: int | None = None
    if directory is not None:
        settings = directory.by_key(key).settings
        rate = units.parse_rate(settings.rate)
        rate_text, rate_per_minute, burst = (
            rate.text,
            round(rate.per_second * 60, 6),
            settings.burst,
        )
        requests_per_day = settings.requests_per_day
        bytes_per_day = (
            None if settings.bytes_per_day is None else units.parse_size(settings.bytes_per_day)
        )
    request_share = _share(peak_day_requests, requests_per_day)
    bytes_share = _share(peak_day_bytes, bytes_per_day)
    shares = [s for s in (request_share, bytes_share) if s is not None]
    return {
        "site": key,
        "first_ts": t.first_ts,
        "last_ts": t.last_ts,
        "requests": t.requests,
        "forwarded": t.decisions["forwarded"],
        "withheld": t.decisions["withheld"],
        "refused": t.decisions["refused"],
        "served": t.decisions["served"],
        "refused_by_reason": dict(sorted(t.refused_by_reason.items())),
        "sent_to_site": t.decisions["forwarded"] + t.decisions["withheld"],
        "gateway_fetches": t.gateway_fetches,
        "gateway_bytes": t.gateway_bytes,
        "bytes_received": t.bytes_received,
        "distinct_urls": t.distinct_urls,
        "active_days": len(t.daily),
        "daily": dict(sorted(t.daily.items())),
        "peak_minute": peak_minute,
        "peak_requests_per_minute": peak_rpm,
        "rate": rate_text,
        "burst": burst,
        "rate_per_minute": rate_per_minute,
        "peak_rate_share": _share(peak_rpm, rate_per_minute),
        "peak_day": peak_day,
        "peak_day_requests": peak_day_requests,
        "requests_per_day": requests_per_day,
        "peak_day_request_share": request_share,
        "peak_bytes_day": peak_bytes_day,
        "peak_day_bytes": peak_day_bytes,
        "bytes_per_day": bytes_per_day,
        "peak_day_bytes_share": bytes_share,
        "highest_daily_quota_share": max(shares) if shares else None,
        "optouts_honoured": sum(t.optouts_by_reason.values()),
        "optouts_by_reason": dict(sorted(t.optouts_by_reason.items())),
        "optout_signals": dict(sorted(t.optout_signals.items())),
        "site_429": t.site_status[429],
        "site_503": t.site_status[503],
        "legal_bases": dict(sorted(t.legal_bases.items())),
        "policy_versions": dict(sorted(t.policy_versions.items())),
    }


async def _checkpoints(
    source: RecordSource, replicas: dict[str, list[int]]
) -> list[dict[str, Any]]:
    """The newest signed checkpoint of each replica with records in the period."""
    if not replicas:
        return []
    reader = source.chain_reader()
    await reader.open()
    out = []
    try:
        for replica, (first, last) in sorted(replicas.items()):
            stored = await reader.last_checkpoint(replica)
            entry: dict[str, Any] = {"replica": replica, "first_seq": first, "last_seq": last}
            if stored is None:
                entry.update(checkpoint=None, covers_period=False)
            else:
                try:
                    line = checkpoint_line(parse_text(note_text(stored["note"])), stored["note"])
                except CheckpointError:
                    line = {
                        "number": stored["number"],
                        "seq": stored["seq"],
                        "note": stored["note"],
                    }
                line.pop("type", None)
                entry.update(checkpoint=line, covers_period=int(line["seq"]) >= last)
            out.append(entry)
    finally:
        await reader.close()
    return out


async def build_report(
    source: RecordSource,
    *,
    since: str | None = None,
    until: str | None = None,
    policy: Policy | None = None,
    policy_version: str | None = None,
    policy_source: str | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict; `since`/`until` in the records' `ts` form."""
    rows = await source.report_rows(RecordQuery(since=since, until=until), OPTOUT_REASONS)
    tally = Tally.of(rows)
    # On a worker thread (the tally is complete): 20 000 sites' figures took half a second,
    # which in the admin API held every request the replica was deciding.
    sites = await asyncio.to_thread(_site_rows, tally, policy)
    totals = {
        name: sum(s[name] for s in sites)
        for name in (
            "requests",
            "forwarded",
            "withheld",
            "refused",
            "served",
            "sent_to_site",
            "gateway_fetches",
            "bytes_received",
            "optouts_honoured",
            "site_429",
            "site_503",
        )
    }
    totals["sites"] = len(sites)
    totals["refused_without_site"] = tally.without_site
    return {
        "report": FORMAT,
        "created": utc_timestamp(time.time()),
        "source": source.describe(),
        "period": {
            "since": since,
            "until": until,
            "first_record": tally.first_ts,
            "last_record": tally.last_ts,
        },
        "policy": {
            "version": policy_version,
            "source": policy_source,
            "note": None
            if policy is not None
            else "no policy given: budget limits and shares are not shown",
        },
        "sites": sites,
        "totals": totals,
        "checkpoints": await _checkpoints(source, tally.replicas),
    }


def _site_rows(tally: Tally, policy: Policy | None) -> list[dict[str, Any]]:
    directory = SiteDirectory(policy) if policy is not None else None
    sites = [site_figures(key, t, directory) for key, t in tally.sites.items()]
    sites.sort(key=lambda s: (-s["sent_to_site"], s["site"]))
    return sites


# -- rendering -----------------------------------------------------------------------------

CSV_COLUMNS = [
    "type",
    "site",
    "first_ts",
    "last_ts",
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
    "peak_minute",
    "peak_requests_per_minute",
    "rate",
    "burst",
    "rate_per_minute",
    "peak_rate_share",
    "peak_day",
    "peak_day_requests",
    "requests_per_day",
    "peak_day_request_share",
    "peak_bytes_day",
    "peak_day_bytes",
    "bytes_per_day",
    "peak_day_bytes_share",
    "highest_daily_quota_share",
    "optouts_honoured",
    "optouts_by_reason",
    "optout_signals",
    "site_429",
    "site_503",
    "legal_bases",
    "policy_versions",
    "replica",
    "first_seq",
    "last_seq",
    "checkpoint_number",
    "checkpoint_seq",
    "checkpoint_hash",
    "checkpoint_time",
    "covers_period",
    # the `totals` row's own
    "sites",
    "refused_without_site",
    "since",
    "until",
    "policy_version",
]


def _joined(counts: dict[str, int]) -> str:
    return ";".join(f"{k}={v}" for k, v in counts.items())


def to_csv(report: dict[str, Any]) -> str:
    """One `site` row per site (counters as `key=n;key=n`), a `totals` row (the period, the
    policy version, the totals, the refusals of no site), then one `checkpoint` row per
    replica. Daily counts are in the JSON form only."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()

    def write(row: dict[str, Any]) -> None:  # every cell as a spreadsheet may show it
        writer.writerow({k: csv_cell(v) if isinstance(v, str) else v for k, v in row.items()})

    for site in report["sites"]:
        row = {"type": "site", **site}
        for name in (
            "refused_by_reason",
            "optouts_by_reason",
            "optout_signals",
            "legal_bases",
            "policy_versions",
        ):
            row[name] = _joined(site[name])
        write(row)
    period = report["period"]
    write(
        {
            **report["totals"],
            "type": "totals",
            "first_ts": period["first_record"],
            "last_ts": period["last_record"],
            "since": period["since"],
            "until": period["until"],
            "policy_version": report["policy"]["version"],
        }
    )
    for c in report["checkpoints"]:
        cp = c["checkpoint"] or {}
        write(
            {
                "type": "checkpoint",
                "replica": c["replica"],
                "first_seq": c["first_seq"],
                "last_seq": c["last_seq"],
                "checkpoint_number": cp.get("number"),
                "checkpoint_seq": cp.get("seq"),
                "checkpoint_hash": cp.get("hash"),
                "checkpoint_time": cp.get("time"),
                "covers_period": c["covers_period"],
            }
        )
    return buf.getvalue()


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _when(word: str, value: str | None) -> str:
    """ " at 2026-11-30T04:08", or nothing for a site nothing reached ("0 at ;" it read)."""
    return "" if value is None else f"{word} {_e(value)}"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:.2f} %"


def _days(site: dict[str, Any], period: dict[str, Any]) -> list[str]:
    """The chart's UTC days: from the period's start (or the site's first record) to its end
    (or the site's last record), the last CHART_DAYS of them at most."""
    start_text = period.get("since") or site.get("first_ts")
    if period.get("until"):
        last = _to_datetime(period["until"]) - dt.timedelta(microseconds=1)  # until: exclusive
    elif site.get("last_ts"):
        last = _to_datetime(site["last_ts"])
    else:
        return []
    if not start_text:
        return []
    start, end = _to_datetime(start_text).date(), last.date()
    end = max(start, end)
    start = max(start, end - dt.timedelta(days=CHART_DAYS - 1))
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _to_datetime(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def chart_svg(site: dict[str, Any], period: dict[str, Any]) -> str:
    """Daily requests that reached the site (bars) against the daily request quota (line)."""
    days = _days(site, period)
    daily: dict[str, int] = site["daily"]
    quota = site["requests_per_day"]
    width, height, left, bottom, top = 640, 180, 56, 28, 14
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max([daily.get(d, 0) for d in days] + [0])
    scale_max = max(peak, quota or 0, 1) * 1.1
    n = max(len(days), 1)
    slot = plot_w / n
    bar_w = min(40.0, max(1.0, slot * 0.7))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Daily requests to {_e(site["site"])} against its daily quota">',
        f"<title>Daily requests to {_e(site['site'])}"
        f"{'' if quota is None else f' against the quota of {quota} per day'}</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#f6f8fa" '
        'stroke="#d0d7de"/>',
    ]
    for i, day in enumerate(days):
        value = daily.get(day, 0)
        h = plot_h * value / scale_max
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h - h
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="#2f6fb3"><title>{day}: {value}</title></rect>'
        )
        if value and n <= 31:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" font-size="10" '
                f'text-anchor="middle" fill="#1f2328">{value}</text>'
            )
    if quota is not None:
        qy = top + plot_h - plot_h * quota / scale_max
        parts.append(
            f'<line x1="{left}" y1="{qy:.1f}" x2="{left + plot_w}" y2="{qy:.1f}" '
            'stroke="#cf222e" stroke-width="2" stroke-dasharray="6 4"/>'
        )
        parts.append(
            f'<text x="{left + plot_w - 4}" y="{qy - 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#cf222e">quota {quota}/day</text>'
        )
    parts.append(
        f'<text x="{left - 6}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>'
        f'<text x="{left - 6}" y="{top + 10}" font-size="10" text-anchor="end">'
        f"{int(scale_max)}</text>"
    )
    if days:
        parts.append(
            f'<text x="{left}" y="{height - 8}" font-size="10">{days[0]}</text>'
            f'<text x="{left + plot_w}" y="{height - 8}" font-size="10" text-anchor="end">'
            f"{days[-1]}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:2em;color:#1f2328;max-width:72em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #d0d7de;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.n{text-align:right}
pre{background:#f6f8fa;padding:.5em;overflow-x:auto;font-size:.8em}.muted{color:#59636e}
dl.fig{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dl.fig dt{color:#59636e}
dl.fig dd{margin:0}
"""


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{_e(k)}: {v}" for k, v in counts.items())


def to_html(report: dict[str, Any]) -> str:
    period = report["period"]
    totals = report["totals"]
    since = period["since"] or period["first_record"] or "the first record"
    until = period["until"] or period["last_record"] or "the last record"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        "<title>crawlwarden insubstantiality report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Insubstantiality report</h1>",
        f"<p>Period: <strong>{_e(since)}</strong> to <strong>{_e(until)}</strong>. "
        f"Created {_e(report['created'])} from {_e(report['source'])}. "
        f"Budgets from policy version <code>{_e(report['policy']['version'] or 'none')}</code>."
        "</p>",
        "<p>Every figure is computed from the signed fetch log; the records of an export of "
        "the same period (<code>crawlwarden audit export --since ... --until ...</code>) whose "
        "<code>ts</code> is in the period give the same counts (the export adds, in full, the "
        "records between each chain's period and the checkpoints around it, which prove it), "
        "and the checkpoints below tie them to the signed chain.</p>",
        f"<p>{totals['sites']} sites; {totals['sent_to_site']} requests reached a site "
        f"({totals['forwarded']} forwarded, {totals['withheld']} withheld), "
        f"{totals['refused']} refused, {totals['optouts_honoured']} opt-outs honoured, "
        f"{totals['site_429']} answers 429 and {totals['site_503']} answers 503 from sites.</p>",
        "<h2>Summary</h2>",
        "<table><thead><tr><th>site</th><th>reached the site</th><th>refused</th>"
        "<th>bytes</th><th>distinct URLs</th><th>active days</th>"
        "<th>peak req/min (rate budget)</th><th>highest daily quota share</th>"
        "<th>opt-outs honoured</th><th>429 / 503</th></tr></thead><tbody>",
    ]
    for s in report["sites"]:
        budget = "n/a" if s["rate_per_minute"] is None else f"{s['rate_per_minute']:g}"
        out.append(
            f'<tr><td><a href="#site-{_e(s["site"])}">{_e(s["site"])}</a></td>'
            f'<td class="n">{s["sent_to_site"]}</td><td class="n">{s["refused"]}</td>'
            f'<td class="n">{s["bytes_received"]}</td><td class="n">{s["distinct_urls"]}</td>'
            f'<td class="n">{s["active_days"]}</td>'
            f'<td class="n">{s["peak_requests_per_minute"]} ({budget})</td>'
            f'<td class="n">{_pct(s["highest_daily_quota_share"])}</td>'
            f'<td class="n">{s["optouts_honoured"]}</td>'
            f'<td class="n">{s["site_429"]} / {s["site_503"]}</td></tr>'
        )
    out.append("</tbody></table>")
    for s in report["sites"]:
        out += [
            f'<h2 id="site-{_e(s["site"])}">{_e(s["site"])}</h2>',
            chart_svg(s, period),
            '<p class="muted">Bars: requests that reached the site per UTC day. Dashed line: '
            "the daily request quota.</p>",
            '<dl class="fig">',
        ]
        figures = [
            ("records", f"{_e(s['first_ts'])} to {_e(s['last_ts'])}"),
            ("requests", s["requests"]),
            ("forwarded", s["forwarded"]),
            ("withheld (opt-out in the response)", s["withheld"]),
            ("refused", f"{s['refused']} ({_counts(s['refused_by_reason'])})"),
            ("served from the gateway's robots.txt copy", s["served"]),
            ("bytes received", s["bytes_received"]),
            ("distinct URLs", s["distinct_urls"]),
            ("active days", s["active_days"]),
            (
                "peak requests per minute",
                f"{s['peak_requests_per_minute']}{_when(' at', s['peak_minute'])}; "
                + (
                    f"rate budget {_e(s['rate'])} (burst {_e(s['burst'])}) = "
                    f"{_e(s['rate_per_minute'])}/min; share {_pct(s['peak_rate_share'])}"
                    if s["rate"] is not None
                    else "no rate budget (no policy given)"
                ),
            ),
            (
                "busiest day (requests)",
                f"{s['peak_day_requests']}{_when(' on', s['peak_day'])} of "
                f"{_e(s['requests_per_day'] if s['requests_per_day'] is not None else 'no quota')}"
                f"; share {_pct(s['peak_day_request_share'])}",
            ),
            (
                "busiest day (bytes)",
                f"{s['peak_day_bytes']}{_when(' on', s['peak_bytes_day'])} of "
                f"{_e(s['bytes_per_day'] if s['bytes_per_day'] is not None else 'no quota')}"
                f"; share {_pct(s['peak_day_bytes_share'])}",
            ),
            ("highest share of a daily quota", _pct(s["highest_daily_quota_share"])),
            (
                "opt-out signals honoured",
                f"{s['optouts_honoured']} ({_counts(s['optouts_by_reason'])}); signals: "
                f"{_counts(s['optout_signals'])}",
            ),
            ("429 / 503 answers from the site", f"{s['site_429']} / {s['site_503']}"),
            ("gateway's own fetches (robots.txt, tdmrep.json)", s["gateway_fetches"]),
            ("legal basis", _counts(s["legal_bases"])),
            ("policy versions in force", _counts(s["policy_versions"])),
        ]
        out += [
            f"<dt>{_e(k)}</dt><dd>{v if isinstance(v, str) else _e(v)}</dd>" for k, v in figures
        ]
        out.append("</dl>")
    out.append("<h2>Checkpoints</h2>")
    out.append(
        "<p>Per replica: the records of the period and the newest checkpoint signed with the "
        "gateway's audit key (<code>GET /v1/audit/public-key</code>).</p>"
    )
    out.append(
        "<table><thead><tr><th>replica</th><th>records (seq)</th><th>checkpoint</th>"
        "<th>covers the period</th></tr></thead><tbody>"
    )
    for c in report["checkpoints"]:
        cp = c["checkpoint"]
        text = (
            "none signed yet"
            if cp is None
            else f"#{_e(cp.get('number'))} at seq {_e(cp.get('seq'))}, {_e(cp.get('time'))}"
            f"<pre>{_e(cp.get('note'))}</pre>"
        )
        out.append(
            f"<tr><td>{_e(c['replica'])}</td><td>{c['first_seq']}..{c['last_seq']}</td>"
            f"<td>{text}</td><td>{'yes' if c['covers_period'] else 'not yet'}</td></tr>"
        )
    out.append("</tbody></table>")
    if totals["refused_without_site"]:
        out.append(
            f"<p class='muted'>{totals['refused_without_site']} requests were refused before a "
            "site was known (no valid credentials); they are in no site's figures.</p>"
        )
    out.append("</body></html>\n")
    return "\n".join(out)


RENDERERS = {"json": to_json, "csv": to_csv, "html": to_html}
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv", "html": "text/html"}


# -- the CLI -------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.policy import InvalidPolicy
    from proxy.policy import load_policy

    policy = version = policy_source = None
    if args.policy:
        try:
            loaded = load_policy(args.policy)
        except InvalidPolicy as e:
            print(f"crawlwarden report: {e}", file=sys.stderr)
            return 2
        policy, version, policy_source = loaded.policy, loaded.version, str(args.policy)
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        check_window(since, until)
        source = RecordSource(args.data_dir or Path(".crawlwarden"), args.audit_dsn)
        report = asyncio.run(
            build_report(
                source,
                since=since,
                until=until,
                policy=policy,
                policy_version=version,
                policy_source=policy_source,
            )
        )
    except SchemaTooNew as e:
        print(f"crawlwarden report: {e}", file=sys.stderr)
        return 1
    except read_errors() as e:
        print(f"crawlwarden report: {e}", file=sys.stderr)
        return 2
    text = RENDERERS[args.format](report)
    if args.output:
        try:
            args.output.write_text(text, encoding="utf-8")
        except OSError as e:
            print(f"crawlwarden report: {e}", file=sys.stderr)
            return 2
        print(f"wrote the report on {len(report['sites'])} sites to {args.output}", file=sys.stderr)
    else:
        out: TextIO = sys.stdout
        out.write(text)
    return 0
