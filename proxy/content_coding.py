"""A response body with its Content-Encoding removed, as far as the opt-out scanners read it.

The scanners read a bounded prefix (`imagemeta.MAX_SCAN`, `optout.HTML_SCAN_LIMIT`), and a small
compressed body can expand a thousandfold or more: 1 MiB of gzip is a GiB of zeros, and brotli
and zstd go further (a "compression bomb", sent by any site). So a body is decoded piece by piece
and never past `limit` bytes of output, whatever the encoding.
"""

from __future__ import annotations

import collections
import functools
import sys
import zlib
from collections.abc import Callable
from collections.abc import Iterator

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

# Decoding errors of the supported codings, reported as ValueError.
_ERRORS = (zlib.error, brotli.error, zstd.ZstdError, EOFError)


@functools.lru_cache(maxsize=64)  # a scraper sends the same value with every request
def decodable_only(accept_encoding: str) -> str:
    """A request's Accept-Encoding with only the codings the gateway decodes, q-values kept, so
    that the site answers in one of them. Left out: `*`, and codings such as Chrome's `dcb`/`dcz`
    (compressed against a dictionary the gateway does not hold), in which a page's head or an
    image's metadata could not be read. Nothing left: `identity`."""
    kept = [
        item.strip()
        for item in accept_encoding.split(",")
        if item.split(";", 1)[0].strip().lower() in DECODED_CODINGS
    ]
    return ", ".join(kept) or "identity"


def undecodable(content_encoding: str) -> str:
    """What a body in this Content-Encoding is read as: a coding the gateway does not know is
    taken as none (`BodyDecoder.skipped`), as browsers take it."""
    return (
        f"its Content-Encoding {content_encoding.strip()!r} is not one the gateway decodes; "
        "the body was read as sent (as a browser reads it)"
    )


# (input, most output wanted) -> output. What is not decoded yet stays in the step: a call with
# b"" goes on decoding it, and b"" comes back once all input given so far is decoded.
Step = Callable[[bytes, int], bytes]

PIECE = 16 * 2**10  # the most a piece holds: a page head fits in one or two


class BodyDecoder:
    """Give a body's bytes as they come; get back decoded bytes, `limit` of them at most, in
    pieces, so that a reader which needs only the start decodes no more than that."""

    def __init__(self, step: Step, limit: int, skipped: tuple[str, ...] = ()):
        self._step = step
        self.skipped = skipped  # codings named but not known: read past, as browsers do
        self.limit = limit
        self.produced = 0
        self.full = False  # the limit is reached: nothing more will be decoded
        self._input: collections.deque[bytes] = collections.deque()
        self._spill = b""  # decoded past the last piece (brotli's output bound is loose)

    @classmethod
    def of(cls, content_encoding: str, limit: int) -> BodyDecoder:
        """A decoder for this Content-Encoding: each coding it lists undone, the last applied
        first (RFC 9110 8.4: `gzip, gzip` is gzipped twice). A coding it does not know
        (`none`, `binary`, `utf-8` from misconfigured servers, `dcb`...) is taken as none and
        named in `skipped`: a browser does the same, and renders what the bytes hold."""
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        known = [c for c in codings if c in _STEPS and c != "identity"]
        skipped = tuple(c for c in codings if c and c not in _STEPS)
        if not known:
            return cls(_Identity(), limit, skipped)
        if len(known) == 1:
            return cls(_STEPS[known[0]](), limit, skipped)
        return cls(_Chain([_STEPS[c]() for c in reversed(known)]), limit, skipped)

    def pieces(self, data: bytes, size: int = PIECE) -> Iterator[bytes]:
        """The decoded bytes `data` adds, in pieces of at most `size`. A reader may stop early:
        what it did not take is decoded by the next call. ValueError: not in its encoding."""
        if data:
            self._input.append(data)
        return self._decoded(size)

    def _decoded(self, size: int) -> Iterator[bytes]:
        while not self.full:
            wanted = min(size, self.limit - self.produced)
            out = self._spill or self._decode(b"", wanted)
            while not out and self._input:
                out = self._decode(self._input.popleft(), wanted)
            if not out:
                return
            out, self._spill = out[:wanted], out[wanted:]
            self.produced += len(out)
            self.full = self.produced >= self.limit
            yield out

    def _decode(self, data: bytes, wanted: int) -> bytes:
        try:
            return self._step(data, wanted)
        except _ERRORS as e:
            raise ValueError(f"the body is not valid in its Content-Encoding: {e}") from e


class _Identity:
    """No coding: the body's own bytes, in slices (a chunk that fits a piece goes on uncopied)."""

    def __init__(self) -> None:
        self._rest = b""
        self._at = 0

    def __call__(self, data: bytes, wanted: int) -> bytes:
        if data:
            self._rest, self._at = data, 0
        start, self._at = self._at, min(self._at + wanted, len(self._rest))
        out = self._rest[start : self._at]
        if self._at == len(self._rest):
            self._rest, self._at = b"", 0
        return out


class _Chain:
    """Several codings, undone in turn: each step's output is the next one's input."""

    def __init__(self, steps: list[Step]) -> None:
        self._steps = steps

    def __call__(self, data: bytes, wanted: int) -> bytes:
        for step in self._steps:
            data = step(data, wanted)
        return data


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._decompressor = zlib.decompressobj(wbits)

    def __call__(self, data: bytes, wanted: int) -> bytes:
        tail = self._decompressor.unconsumed_tail  # input held back by the last output bound
        return self._decompressor.decompress(tail + data if tail else data, wanted)


def _brotli(decompressor: brotli.Decompressor) -> Step:
    return lambda data, wanted: decompressor.process(data, output_buffer_limit=wanted)


def _zstd(decompressor: zstd.ZstdDecompressor) -> Step:
    def step(data: bytes, wanted: int) -> bytes:
        if decompressor.eof:
            return b""  # a second frame: the first one is what is read
        return decompressor.decompress(data, wanted)

    return step


class _Deflate:
    """Deflate is zlib-wrapped by the RFC, raw from some servers: the first two bytes (a zlib
    header or not) decide."""

    def __init__(self) -> None:
        self._zlib: _Zlib | None = None
        self._head = b""

    def __call__(self, data: bytes, wanted: int) -> bytes:
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._zlib = _Zlib(zlib.MAX_WBITS if zlib_header else -15)
        return self._zlib(data, wanted)


# Each Content-Encoding decoded, and how to make its step for one body.
_STEPS: dict[str, Callable[[], Step]] = {
    "identity": _Identity,
    "gzip": lambda: _Zlib(47),  # gzip or zlib header, as mitmproxy
    "x-gzip": lambda: _Zlib(47),
    "deflate": _Deflate,
    "br": lambda: _brotli(brotli.Decompressor()),
    "zstd": lambda: _zstd(zstd.ZstdDecompressor()),
}
# The same, as a request's Accept-Encoding names them (`decodable_only`).
DECODED_CODINGS = frozenset(_STEPS)
