"""A team's own usage: what its requests did, per site and per project, from the fetch log.

`GET /v1/usage` answers it to the team itself (its proxy credentials): budgets, records and the
report are for auditors and admins, and a team pacing a crawl had nothing to read but its own
429s. The figures are the report's (proxy/report.py), over the team's records of kind `fetch`:

- `requests`: the team's records, any decision; `forwarded`, `withheld`, `refused`, `served`:
  those by decision; `sent_to_site`: forwarded + withheld (what reached the site).
- `refused_by_reason`: refused records counted by `reason`; `withheld_by_reason` likewise.
- `bytes_received`: the sum of `response_bytes` of the records that reached the site.
- `last_refusal`: the newest refused record's `ts`, `reason`, `rule`, `status` and `url`.

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

from proxy.report import REACHED
from proxy.report import tunnel_to_nowhere

FORMAT = "crawlwarden-team-usage/1"
DECISIONS = ("forwarded", "withheld", "refused", "served")


@dataclass
class Counts:
    """Running counts of one team's records in one group (a site, a project, or all)."""

    requests: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    withheld_by_reason: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    last_refusal: dict[str, Any] | None = None

    def add(self, rec: dict[str, Any]) -> None:
        decision = str(rec.get("decision"))
        self.requests += 1
        self.decisions[decision] += 1
        if decision in REACHED:
            self.bytes_received += int(rec.get("response_bytes") or 0)
        if decision == "withheld":
            self.withheld_by_reason[str(rec.get("reason"))] += 1
        if decision == "refused":
            self.refused_by_reason[str(rec.get("reason"))] += 1
            if self.last_refusal is None or rec["ts"] >= self.last_refusal["ts"]:
                self.last_refusal = {
                    name: rec.get(name) for name in ("ts", "reason", "rule", "status", "url")
                }

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests}
        out.update({d: self.decisions[d] for d in DECISIONS})
        out["sent_to_site"] = self.decisions["forwarded"] + self.decisions["withheld"]
        out["bytes_received"] = self.bytes_received
        out["refused_by_reason"] = dict(sorted(self.refused_by_reason.items()))
        out["withheld_by_reason"] = dict(sorted(self.withheld_by_reason.items()))
        out["last_refusal"] = self.last_refusal
        return out


@dataclass
class TeamUsage:
    """One team's records tallied as they stream past (`visit`), then `figures()`."""

    team: str
    totals: Counts = field(default_factory=Counts)
    sites: dict[str | None, Counts] = field(default_factory=dict)
    projects: dict[str | None, Counts] = field(default_factory=dict)
    first_ts: str | None = None
    last_ts: str | None = None

    def visit(self, rec: dict[str, Any]) -> None:
        # (the query selects the team's records; checked again: another team's never counts)
        if rec.get("team") != self.team or rec.get("kind", "fetch") != "fetch":
            return
        if tunnel_to_nowhere(rec):
            return
        ts = rec["ts"]
        self.first_ts = ts if self.first_ts is None or ts < self.first_ts else self.first_ts
        self.last_ts = ts if self.last_ts is None or ts > self.last_ts else self.last_ts
        self.totals.add(rec)
        for groups, key in ((self.sites, rec.get("site")), (self.projects, rec.get("project"))):
            counts = groups.get(key)
            if counts is None:
                counts = groups[key] = Counts()
            counts.add(rec)

    def figures(self, *, since: str | None, until: str | None) -> dict[str, Any]:
        return {
            "usage": FORMAT,
            "team": self.team,
            "period": {
                "since": since,
                "until": until,
                "first_record": self.first_ts,
                "last_record": self.last_ts,
            },
            "totals": self.totals.figures(),
            "sites": _rows("site", self.sites),
            "projects": _rows("project", self.projects),
        }


def _rows(name: str, groups: dict[str | None, Counts]) -> list[dict[str, Any]]:
    """One row per group, the busiest first (then by name; `null` last)."""
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1].requests, kv[0] is None, kv[0] or ""))
    return [{name: key, **counts.figures()} for key, counts in ordered]
