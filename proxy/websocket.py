"""A WebSocket's messages after its upgrade, tallied for its record and the site's budget.

The upgrade (`101`) is a fetch with no content; what the site sends after it is content the
team received all the same. Its record (kind `websocket`, written when the connection ends) says
how many messages went each way and how many bytes, and its `content_sha256` is the SHA-256 of
the site's message payloads, in order, one after the other; the site's bytes count against its
`bytes_per_day`. Payloads as delivered: mitmproxy (wsproto) has undone permessage-deflate before
any hook sees a message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from dataclasses import field
from typing import Any

KIND = "websocket"


@dataclass(slots=True)
class Conversation:
    started: float
    from_site: int = 0
    from_site_bytes: int = 0
    from_client: int = 0
    from_client_bytes: int = 0
    # Bytes of a message a side had not finished when the conversation ended (never delivered,
    # not in the hash; counted: the site sent them, and its budget pays for them).
    unfinished_site_bytes: int = 0
    unfinished_client_bytes: int = 0
    _digest: Any = field(default_factory=hashlib.sha256)

    def add(self, *, from_client: bool, content: bytes) -> None:
        if from_client:
            self.from_client += 1
            self.from_client_bytes += len(content)
        else:
            self.from_site += 1
            self.from_site_bytes += len(content)
            self._digest.update(content)

    @property
    def site_bytes(self) -> int:
        """What the site sent: its messages and what came of one it had not finished."""
        return self.from_site_bytes + self.unfinished_site_bytes

    @property
    def client_bytes(self) -> int:
        return self.from_client_bytes + self.unfinished_client_bytes

    @property
    def sha256(self) -> str | None:
        """The site's messages' digest; None when it sent none (no content, as for a 204)."""
        return self._digest.hexdigest() if self.from_site else None

    def note(self, upgrade_id: str, ended: str) -> str:
        """The record's note; `ended`: how the conversation ended (`closed`)."""
        unfinished = "".join(
            f"; {n} byte(s) of a message {who} had not finished, not delivered (counted, not "
            "in content_sha256)"
            for n, who in (
                (self.unfinished_site_bytes, "the site"),
                (self.unfinished_client_bytes, "the client"),
            )
            if n
        )
        return (
            f"WebSocket opened by request {upgrade_id}: {self.from_site} message(s) from the "
            f"site, {self.from_client} from the client; {ended}; content_sha256 covers the "
            f"site's message payloads in order{unfinished}"
        )


def closed(code: int | None, reason: str | None, by_client: bool | None) -> str:
    """How a WebSocket ended, as its record's note says it."""
    if code is None:
        return "ended without a close frame (a connection closed or reset)"
    # (neither side: the gateway closed both, addons/websocket_limit.py)
    who = "the client" if by_client else "the site" if by_client is not None else "the gateway"
    said = f' "{reason}"' if reason else ""
    return f"closed by {who} with code {code}{said}"
