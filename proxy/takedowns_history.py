"""Takedowns and API blocklist entries read back from the fetch log.

Every change to them is a signed event in the fetch log (`TakedownRegistry` writes it with the
item as JSON in its note). Redis holds the fleet's copy and each replica a file in its data dir;
when both are gone (Redis restarted without persistence or flushed, and every replica started
again on an empty data dir: the chart's default emptyDir), the fetch log in PostgreSQL still has
every change, and a replica that finds nothing reads them back from it. A takedown forgotten so
would have let the fleet fetch again what a rights holder had asked it not to, and said nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from proxy.takedowns import ApiBlock
from proxy.takedowns import BlockState
from proxy.takedowns import Confirmation
from proxy.takedowns import Takedown

log = structlog.get_logger("crawlwarden.takedowns")

# The event kinds of the changes, and the key of the item in their note.
ITEM_OF_KIND = {
    "takedown": "takedown",
    "takedown_confirmation": "confirmation",
    "blocklist_add": "entry",
    "blocklist_remove": "entry",
}


def state_from_events(events: Iterable[dict[str, Any]]) -> BlockState:
    """The items the fetch log's change events record (other records are passed over). An event
    whose note does not read is logged and left out, not fatal: the rest still bind."""
    state = BlockState()
    for rec in events:
        item = ITEM_OF_KIND.get(rec.get("kind", ""))
        if item is None or rec.get("decision") != "event":
            continue
        try:
            data = json.loads(rec.get("note") or "")[item]
            if item == "takedown":
                takedown = Takedown.from_dict(data)
                state.takedowns[takedown.id] = takedown
            elif item == "confirmation":
                confirmation = Confirmation.from_dict(data)
                state.confirmations[confirmation.key] = confirmation
            else:
                block = ApiBlock.from_dict(data)
                state.blocks[block.id] = _removed_first(state.blocks.get(block.id), block)
        except (ValueError, KeyError, TypeError) as e:
            log.error(
                "takedowns_event_unreadable",
                record=rec.get("id"),
                kind=rec.get("kind"),
                error=repr(e),
            )
    return state


@dataclass(frozen=True)
class Restored:
    state: BlockState
    takedowns: list[str]  # the ids the state lacked
    confirmations: int
    blocklist: list[str]

    def __bool__(self) -> bool:
        return bool(self.takedowns or self.confirmations or self.blocklist)


def restore(state: BlockState, found: BlockState) -> Restored:
    """`state` with what it lacks of `found`: nothing is ever deleted (a removed blocklist entry
    is a tombstone), so what one has and the other does not was lost. An entry removed in either
    stays removed: the removal was made (and recorded), whichever copy lost it."""
    merged = BlockState.from_json(state.to_json())
    takedowns = sorted(found.takedowns.keys() - merged.takedowns.keys())
    for takedown_id in takedowns:
        merged.takedowns[takedown_id] = found.takedowns[takedown_id]
    confirmations = found.confirmations.keys() - merged.confirmations.keys()
    for key in confirmations:
        merged.confirmations[key] = found.confirmations[key]
    blocklist = []
    for block_id, block in found.blocks.items():
        held = merged.blocks.get(block_id)
        kept = _removed_first(held, block)
        if kept is not held:
            merged.blocks[block_id] = kept
            blocklist.append(block_id)
    return Restored(merged, takedowns, len(confirmations), sorted(blocklist))


def _removed_first(held: ApiBlock | None, other: ApiBlock) -> ApiBlock:
    if held is None or (held.active and not other.active):
        return other
    return held
