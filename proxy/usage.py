"""A team's own usage: what its requests did, per site and per project, from the fetch log.

`GET /v1/usage` answers it to the team itself (its proxy credentials): budgets, records and the
report are for auditors and admins, and a team pacing a crawl had nothing to read but its own
429s. The figures are the report's (proxy/report.py), over the team's records:

- `requests`: the team's records of kind `fetch`, any decision; `forwarded`, `withheld`,
  `refused`, `served`: those by decision; `sent_to_site`: forwarded + withheld (what reached
  the site).
- `refused_by_reason`: refused records counted by `reason`; `withheld_by_reason` likewise.
- `bytes_received`: the sum of `response_bytes` of the records that reached the site, and of
  the team's WebSocket conversations (records of kind `websocket`: what the site sent after an
  upgrade; bytes, no request).
- `last_refusal`: the newest refused record's `ts`, `reason`, `rule`, `status` and `url`.

The fetch-log store counts them (proxy/audit/usage_query.py: a busy team's day is millions of
records, which a replica reading them one by one spent its CPU on); this module adds its groups
up.

Sites are keyed by the record's `site` (a policy site id or a registrable domain; `null` for a
request refused before its site was known). A refused CONNECT answered 200 (a tunnel to
nowhere, each request in it recorded on its own) is counted once, as its requests, as in the
report. The budgets themselves are shared by every team: `GET /v1/budgets?site=S` shows them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from proxy.audit.usage_query import UsageGroup
from proxy.audit.usage_query import UsageRows

FORMAT = "crawlwarden-team-usage/1"
DECISIONS = ("forwarded", "withheld", "refused", "served")
LAST_REFUSAL_FIELDS = ("ts", "reason", "rule", "status", "url")


@dataclass
class Counts:
    """One team's records in one group (a site, a project, or all), added up."""

    requests: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    withheld_by_reason: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    last_refusal: dict[str, Any] | None = None
    _last_at: tuple[str, str, int] | None = None  # its ts, replica and seq: the newest wins

    def add(self, group: UsageGroup) -> None:
        self.requests += group.requests
        self.decisions[group.decision] += group.requests
        self.bytes_received += group.bytes_received  # (the store counts only what reached us)
        if group.requests and group.decision == "withheld":
            self.withheld_by_reason[str(group.reason)] += group.requests
        if group.requests and group.decision == "refused":
            self.refused_by_reason[str(group.reason)] += group.requests

    def refused(self, rec: dict[str, Any]) -> None:
        """A newest refusal of a part of this group: kept if it is the newest of the whole (on
        a tie in `ts`, the last in chain order, as the store picks within a part)."""
        at = (rec["ts"], rec.get("replica") or "", int(rec.get("seq") or 0))
        if self._last_at is None or at > self._last_at:
            self._last_at = at
            self.last_refusal = {name: rec.get(name) for name in LAST_REFUSAL_FIELDS}

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests}
        out.update({d: self.decisions[d] for d in DECISIONS})
        out["sent_to_site"] = self.decisions["forwarded"] + self.decisions["withheld"]
        out["bytes_received"] = self.bytes_received
        out["refused_by_reason"] = dict(sorted(self.refused_by_reason.items()))
        out["withheld_by_reason"] = dict(sorted(self.withheld_by_reason.items()))
        out["last_refusal"] = self.last_refusal
        return out


def team_usage(
    team: str, rows: UsageRows, *, since: str | None, until: str | None
) -> dict[str, Any]:
    """The answer of `GET /v1/usage`: the store's groups added up per site, per project and in
    all, with each one's newest refusal."""
    totals = Counts()
    sites: dict[str | None, Counts] = {}
    projects: dict[str | None, Counts] = {}
    for group in rows.groups:
        totals.add(group)
        sites.setdefault(group.site, Counts()).add(group)
        projects.setdefault(group.project, Counts()).add(group)
    for rec in rows.last_refusals:
        totals.refused(rec)
        sites[rec.get("site")].refused(rec)
        projects[rec.get("project")].refused(rec)
    return {
        "usage": FORMAT,
        "team": team,
        "period": {
            "since": since,
            "until": until,
            "first_record": min((g.first_ts for g in rows.groups), default=None),
            "last_record": max((g.last_ts for g in rows.groups), default=None),
        },
        "totals": totals.figures(),
        "sites": _rows("site", sites),
        "projects": _rows("project", projects),
    }


def _rows(name: str, groups: dict[str | None, Counts]) -> list[dict[str, Any]]:
    """One row per group, the busiest first (then by name; `null` last)."""
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1].requests, kv[0] is None, kv[0] or ""))
    return [{name: key, **counts.figures()} for key, counts in ordered]
