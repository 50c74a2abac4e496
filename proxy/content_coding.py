"""A response body with its Content-Encoding removed, as far as the opt-out scanners read it.

The scanners read a bounded prefix (`imagemeta.MAX_SCAN`, `optout.HTML_SCAN_LIMIT`), and a small
compressed body can expand a thousandfold or more: 1 MiB of gzip is a GiB of zeros, and brotli
and zstd go further (a "compression bomb", sent by any site). So a body is decoded piece by piece
and never past `limit` bytes of output, whatever the encoding.
"""

from __future__ import annotations

import collections
import functools
import itertools
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
    # One stream: bytes after its end are an error (brotli.error), as in curl and brotli.decompress.
    return lambda data, wanted: decompressor.process(data, output_buffer_limit=wanted)


MAX_STREAMS = 1000  # gzip members or zstd frames read in one body (`_Streams`)


class _Streams:
    """A body that is a series of streams, each decoded after the one before: gzip members
    (RFC 1952 2.2) or zstd frames (RFC 8878 3). Clients decode them all (Python's gzip and zstd
    modules, urllib3, Scrapy; curl the zstd frames): an opt-out in a second member is on the
    page they read, so the gateway reads it too.

    The output bound holds across streams: a call gives `wanted` bytes at most, whichever
    streams they come from. The work is bounded too. A stream that decodes to nothing still
    costs a decompressor (a microsecond for zlib, ten for zstd): 16 MiB of empty zstd frames
    would hold the event loop for seconds, hence `MAX_STREAMS`, far past what a page is sent
    in. And a decompressor copies the input that follows its stream: the input goes to it a
    `PIECE` at a time, so that each stream's end copies that much, not the rest of the body."""

    name = "stream"

    def __init__(self) -> None:
        self._input: collections.deque[memoryview] = collections.deque()  # not decoded yet
        self._between = False  # a stream has ended, the next has not begun
        self._streams = 1
        self._ignored = False  # what follows the last stream is not one: left unread
        self._start()

    def __call__(self, data: bytes, wanted: int) -> bytes:
        if data and not self._ignored:
            self._input.append(memoryview(data))
        while True:
            if self._between:
                if not self._next_begins():
                    return b""
                if self._streams == MAX_STREAMS:
                    raise ValueError(
                        f"the body is sent in more than {MAX_STREAMS} {self.name}s: "
                        "those after them were not read"
                    )
                self._streams += 1
                self._start()
                self._between = False
            out = self._decode(b"", wanted)  # what the stream holds back first
            if not out and self._input and self._rest() is None:
                out = self._decode(self._take(), wanted)
            rest = self._rest()
            if rest is not None:
                if rest:
                    self._input.appendleft(memoryview(rest))
                self._between = True
            if out:
                return out
            if not self._between and not self._input:
                return b""

    def _take(self) -> memoryview:
        first = self._input.popleft()
        if len(first) > PIECE:
            self._input.appendleft(first[PIECE:])
            first = first[:PIECE]
        return first

    def _next_begins(self) -> bool:
        """Whether the input after a stream begins another (False: not yet known, or never)."""
        return bool(self._input)

    def _start(self) -> None:
        raise NotImplementedError

    def _decode(self, data: memoryview | bytes, wanted: int) -> bytes:
        """The stream's output for more input (b"": for what it holds)."""
        raise NotImplementedError

    def _rest(self) -> bytes | None:
        """None while the stream has not ended; then the input it was given past its end."""
        raise NotImplementedError


class _Gzip(_Streams):
    """gzip members. Between them NUL bytes are padding, skipped (as gzip(1) and Python's gzip
    do); after the last, bytes that do not begin a member are left unread, as urllib3 and Scrapy
    leave them (and as the gateway always has)."""

    name = "gzip member"

    def _start(self) -> None:
        self._member = zlib.decompressobj(47)  # gzip or zlib header, as mitmproxy

    def _decode(self, data: memoryview | bytes, wanted: int) -> bytes:
        out = self._member.decompress(data, wanted)
        tail = self._member.unconsumed_tail  # held back by the output bound: input again
        if tail:
            self._input.appendleft(memoryview(tail))
        return out

    def _rest(self) -> bytes | None:
        return self._member.unused_data if self._member.eof else None

    def _next_begins(self) -> bool:
        while self._input:  # a PIECE at a time: a lot of padding is a lot of bytes
            head = bytes(self._input[0][:PIECE])
            padding = len(head) - len(head.lstrip(b"\0"))
            rest = self._input.popleft()[padding:]
            if rest:
                self._input.appendleft(rest)
            if padding < len(head):
                break
        magic = b"".join(bytes(piece[:2]) for piece in itertools.islice(self._input, 2))[:2]
        if magic in (b"", b"\x1f"):
            return False  # not known yet
        if magic == b"\x1f\x8b":
            return True
        self._input.clear()
        self._ignored = True
        return False


class _Zstd(_Streams):
    """zstd frames (skippable ones decode to nothing). Bytes after a frame that do not begin
    another are an error, as in every zstd decoder."""

    name = "zstd frame"

    def _start(self) -> None:
        self._frame = zstd.ZstdDecompressor()

    def _decode(self, data: memoryview | bytes, wanted: int) -> bytes:
        if not data and self._frame.needs_input:
            return b""
        return self._frame.decompress(data, wanted)

    def _rest(self) -> bytes | None:
        return self._frame.unused_data if self._frame.eof else None


class _Deflate:
    """Deflate is zlib-wrapped by the RFC, raw from some servers: the first two bytes (a zlib
    header or not) decide. One stream (RFC 9110 8.4.1.2): what follows it is left unread, as
    zlib.decompress, urllib3 and curl leave it."""

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
    "gzip": _Gzip,
    "x-gzip": _Gzip,
    "deflate": _Deflate,
    "br": lambda: _brotli(brotli.Decompressor()),
    "zstd": _Zstd,
}
# The same, as a request's Accept-Encoding names them (`decodable_only`).
DECODED_CODINGS = frozenset(_STEPS)
