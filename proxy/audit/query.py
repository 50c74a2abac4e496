"""Filters over fetch records, shared by the CLI export, the admin API and the report."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.decision import Outcome


def parse_time(text: str) -> str:
    """An ISO 8601 date or time (naive means UTC) as the record's RFC 3339 `ts` form."""
    value = text.strip()
    try:
        if len(value) == 10:
            parsed = dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), dt.UTC)
        else:
            # (RFC 3339 5.6: "t" and "z" may be lower case)
            parsed = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
        utc = parsed.astimezone(dt.UTC)
    except (ValueError, OverflowError) as e:  # (9999-12-31T23:59-01:00 is past year 9999)
        raise ValueError(
            f"invalid time {text!r}: use e.g. 2026-11-28 or 2026-11-28T13:00:00Z"
        ) from e
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_window(since: str | None, until: str | None) -> None:
    """A window that ends before it starts selects nothing, and an export or report of it would
    read as a period without fetches: refused. (`since` and `until` as `parse_time` gives them,
    so comparing the text compares the times.)"""
    if since is not None and until is not None and since > until:
        raise ValueError(f"since {since} is after until {until}: the window holds no time")


# What a record's `decision` may be: an outcome of a request, or "event" (the gateway's own
# records: a purge, a witness, a signing key change).
DECISIONS = (*(str(o) for o in Outcome), "event")


@dataclass(frozen=True)
class RecordQuery:
    since: str | None = None  # inclusive, RFC 3339 as in `ts`
    until: str | None = None  # exclusive
    site: str | None = None
    team: str | None = None
    project: str | None = None
    decision: str | None = None
    replica: str | None = None
    after: tuple[str, int] | None = None  # cursor: (replica, seq) already seen
    # Only records whose URL holds one of these strings (a takedown's hosts): a cut the store
    # makes before any body is read, never a content filter of an export.
    url_contains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.decision is not None and self.decision not in DECISIONS:
            # Else every record would be redacted, as if none had been made.
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
        check_window(self.since, self.until)

    @property
    def content_filters(self) -> dict[str, str]:
        """The filters that pick records by content (not by time): they break chain contiguity."""
        pairs = (
            ("site", self.site),
            ("team", self.team),
            ("project", self.project),
            ("decision", self.decision),
        )
        return {k: v for k, v in pairs if v is not None}

    def matches(self, rec: dict[str, Any]) -> bool:
        """Whether a record passes the content filters (time is handled by the chain window)."""
        return all(rec.get(k) == v for k, v in self.content_filters.items())

    def describe(self) -> dict[str, str]:
        pairs = (
            ("since", self.since),
            ("until", self.until),
            ("replica", self.replica),
            *self.content_filters.items(),
        )
        return {k: v for k, v in pairs if v is not None}

    def sql_where(
        self, placeholder: str = "?", time_param: Callable[[str], Any] = str
    ) -> tuple[str, list[Any]]:
        """`time_param` converts the `ts` bounds (PostgreSQL wants datetimes for timestamptz)."""
        clauses: list[str] = []
        params: list[Any] = []

        def p() -> str:
            return placeholder if placeholder == "?" else f"${len(params)}"

        for column, op, value in (
            ("ts", ">=", None if self.since is None else time_param(self.since)),
            ("ts", "<", None if self.until is None else time_param(self.until)),
            ("site", "=", self.site),
            ("team", "=", self.team),
            ("project", "=", self.project),
            ("decision", "=", self.decision),
            ("replica", "=", self.replica),
        ):
            if value is not None:
                params.append(value)
                clauses.append(f"{column} {op} {p()}")
        if self.url_contains:
            likes = []
            for part in self.url_contains:
                # (`%` is no character of a host; `_` matches any one: a few more rows read)
                params.append(f"%{part}%")
                likes.append(f"url LIKE {p()}")
            clauses.append("(" + " OR ".join(likes) + ")")
        if self.after is not None:
            marks = []
            for cursor_part in (self.after[0], self.after[0], self.after[1]):
                params.append(cursor_part)
                marks.append(p())
            clauses.append(f"(replica > {marks[0]} OR (replica = {marks[1]} AND seq > {marks[2]}))")
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def to_datetime(ts: str) -> dt.datetime:
    """A record's RFC 3339 `ts` as an aware datetime (PostgreSQL timestamptz parameters)."""
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
