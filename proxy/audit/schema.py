"""The schema version a fetch-log store is at, and which tables that version has.

A gateway migrates its store when it opens it; a reader (`audit export`, `report`, the admin
API's exports) opens it read-only and does not. An auditor's newer tooling then reads a store
that an older gateway wrote: a table the older schema lacks was never written and reads as
empty. A store newer than this code is refused, once, when it is opened: a reader that skipped
a table it does not know would export a log that looks complete and is not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

_CREATE_TABLE = re.compile(r"\s*CREATE TABLE (\w+)", re.IGNORECASE)


class SchemaTooNew(RuntimeError):
    """The store was migrated by a newer crawlwarden than this one."""

    def __init__(self, version: int, known: int):
        super().__init__(
            f"the fetch log schema is at version {version}, newer than this crawlwarden "
            f"({known}); upgrade crawlwarden"
        )
        self.version = version
        self.known = known


def table_versions(migrations: Sequence[Sequence[str]]) -> dict[str, int]:
    """The schema version that created each table, read from the migrations themselves."""
    created = {}
    for i, statements in enumerate(migrations):
        for statement in statements:
            match = _CREATE_TABLE.match(statement)
            if match:
                created[match[1]] = i + 1
    return created


@dataclass(frozen=True)
class Schema:
    """A store's schema version (PRAGMA user_version, crawlwarden_schema_version)."""

    version: int
    created: Mapping[str, int]  # table -> the version that created it

    @classmethod
    def at(cls, version: int, migrations: Sequence[Sequence[str]]) -> Schema:
        """The schema at `version`, or SchemaTooNew past the last migration this code has."""
        if version > len(migrations):
            raise SchemaTooNew(version, len(migrations))
        return cls(version, table_versions(migrations))

    def has(self, table: str) -> bool:
        """Whether the table exists at this version (False: read it as empty)."""
        return self.version >= self.created[table]
