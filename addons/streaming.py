"""A streamed response body: hashed as it passes, held back until its opt-outs are read.

Bodies above the buffering limit are streamed (never held whole in memory). mitmproxy has sent the
status line by then, so an opt-out found in the body cannot turn into a 451: the body is then not
delivered at all, and the addon kills the flow so the scraper sees a broken transfer, not content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from proxy.content_coding import BodyDecoder
from proxy.content_coding import undecodable
from proxy.optout_checks import Assessment
from proxy.optout_checks import BodyScan

# The most a body is held back while its metadata is read (the scanner's own bound is lower).
HOLD_LIMIT = 16 * 2**20
# What passes on while the body is held or withheld. Not b"": mitmproxy sends each chunk it is
# given as it is, and an empty chunk of a chunked HTTP/1 body is its end.
NOTHING: tuple[bytes, ...] = ()


class ResponseStream:
    """The `flow.response.stream` callable of one response."""

    def __init__(
        self,
        scan: BodyScan | None,
        content_encoding: str,
        assess: Callable[[BodyScan], Assessment],
    ):
        self.hasher = hashlib.sha256()
        self.received = 0
        self.scan = scan
        self._assess = assess
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.assessment: Assessment | None = None
        self._decoder = BodyDecoder.of(content_encoding, HOLD_LIMIT)
        if self._decoder.skipped and scan is not None:
            scan.read_as_sent(undecodable(content_encoding))

    @property
    def withheld(self) -> bool:
        return self.assessment is not None and self.assessment.decision is not None

    def __call__(self, chunk: bytes) -> tuple[bytes, ...]:
        """The chunks to send on for one chunk received (b"" at the end of the body)."""
        end = chunk == b""
        self.hasher.update(chunk)
        self.received += len(chunk)
        if self.withheld:
            return NOTHING
        if self.scan is None or self.assessment is not None:
            return (chunk,) if chunk else NOTHING
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        done = self._read(chunk)
        decoder_full = self._decoder.full
        if not done and (end or decoder_full or self._held_bytes >= HOLD_LIMIT):
            # Nothing more can be learnt (or held): decide on what was read.
            self.scan.finish()
            done = True
        if not done:
            return NOTHING
        self.assessment = self._assess(self.scan)
        held, self._held = b"".join(self._held), []
        return NOTHING if self.withheld or not held else (held,)

    def _read(self, chunk: bytes) -> bool:
        """Scan the chunk, decoded no further than the scan reads: a compression bomb stops at
        HOLD_LIMIT decoded bytes in all, a page at its head."""
        assert self.scan is not None
        try:
            return self.scan.read(chunk, self._decoder)
        except ValueError as e:
            self.scan.cannot_decode(str(e))
            return True

    def cut_short(self) -> Assessment | None:
        """The site broke off the body: the assessment of what was read of it (the held part,
        never delivered, included). None: nothing was to be read."""
        if self.assessment is None and self.scan is not None:
            self.scan.finish()
            self.assessment = self._assess(self.scan)
            self._held = []
        return self.assessment

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()
