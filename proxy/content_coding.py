"""A response body with its Content-Encoding removed, as far as the opt-out scanners read it.

The scanners read a bounded prefix (`imagemeta.MAX_SCAN`, `optout.HTML_SCAN_LIMIT`), and a small
compressed body can expand a thousandfold or more: 1 MiB of gzip is a GiB of zeros, and brotli
and zstd go further (a "compression bomb", sent by any site). So a body is decoded piece by piece
and never past `limit` bytes of output, whatever the encoding.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

# Decoding errors of the supported codings, reported as ValueError.
_ERRORS = (zlib.error, brotli.error, zstd.ZstdError, EOFError)

Step = Callable[[bytes, int], bytes]  # (input, most output wanted) -> output


class BodyDecoder:
    """Feed a body's bytes as they come; get back decoded bytes, `limit` of them at most."""

    def __init__(self, step: Step, limit: int):
        self._step = step
        self.limit = limit
        self.produced = 0
        self.full = False  # the limit is reached: nothing more will be decoded

    @classmethod
    def of(cls, content_encoding: str, limit: int) -> BodyDecoder | None:
        """A decoder for this Content-Encoding; None for one it does not know (or a list of
        several: not seen from real sites, and not decoded)."""
        encoding = content_encoding.strip().lower()
        if encoding in ("", "identity"):
            return cls(_identity, limit)
        if encoding in ("gzip", "x-gzip"):
            return cls(_zlib(zlib.decompressobj(47)), limit)  # gzip or zlib header, as mitmproxy
        if encoding == "deflate":
            return cls(_Deflate(), limit)
        if encoding == "br":
            return cls(_brotli(brotli.Decompressor()), limit)
        if encoding == "zstd":
            return cls(_zstd(zstd.ZstdDecompressor()), limit)
        return None

    def feed(self, data: bytes) -> bytes:
        """The decoded bytes `data` adds, up to the limit. ValueError: not in its encoding."""
        if self.full:
            return b""
        wanted = self.limit - self.produced
        try:
            out = self._step(data, wanted)[:wanted]
        except _ERRORS as e:
            raise ValueError(f"the body is not valid in its Content-Encoding: {e}") from e
        self.produced += len(out)
        self.full = self.produced >= self.limit
        return out


def _identity(data: bytes, wanted: int) -> bytes:
    return data[:wanted]


def _zlib(decompressor: zlib._Decompress) -> Step:
    # max_length bounds the output; input past it stays unconsumed (and is never needed).
    return lambda data, wanted: decompressor.decompress(data, wanted)


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
        self._decompressor: zlib._Decompress | None = None
        self._head = b""

    def __call__(self, data: bytes, wanted: int) -> bytes:
        if self._decompressor is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._decompressor = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -15)
        return self._decompressor.decompress(data, wanted)
