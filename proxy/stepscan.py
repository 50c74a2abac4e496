"""An incremental, bounded read of a byte stream, as a machine of steps.

The body of a response arrives in chunks of any size; a format's reader (`imagemeta`'s image
metadata, `epub`'s package document) names its states, and a `_step_<state>` method for each
that consumes what it can of the buffer and says whether to go on. The scan gives up past
`max_scan` bytes, and on a `ScanError` the format raises.
"""

from __future__ import annotations


class ScanError(Exception):
    """The bytes are not what the format says (or not what is read): the scan stops here."""


class StepScanner:
    """Feed the body in chunks; `feed()` returns True once the scan is done."""

    def __init__(self, state: str, *, max_scan: int):
        self.seen = 0
        self.done = False
        self._state = state  # the next `_step_<state>`
        self._max_scan = max_scan
        self._buf = bytearray()
        self._skip = 0  # bytes still to pass over, beyond the buffer

    def feed(self, chunk: bytes) -> bool:
        if self.done:
            return True
        self.seen += len(chunk)
        if self._skip:
            dropped = min(self._skip, len(chunk))
            self._skip -= dropped
            chunk = chunk[dropped:]
        self._buf += chunk
        try:
            self._advance()
        except ScanError as e:
            self._stop(str(e))
        if not self.done and self.seen >= self._max_scan:
            self._stop(self._not_found(self._max_scan))
        return self.done

    def _stop(self, error: str) -> None:
        """End the scan on an error: what was read so far is the result."""
        raise NotImplementedError

    def _not_found(self, limit: int) -> str:
        """Why the scan ended at its limit."""
        raise NotImplementedError

    def _advance(self) -> None:
        while not self.done and not self._skip:
            if not getattr(self, f"_step_{self._state}")():
                return

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _drop(self, n: int) -> None:
        """Pass over n bytes, those in the buffer and those still to come."""
        have = min(n, len(self._buf))
        del self._buf[:have]
        self._skip += n - have
