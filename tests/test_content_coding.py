"""proxy/content_coding.py: bodies decoded as far as the scanners read, never further."""

from __future__ import annotations

import gzip
import itertools
import sys
import tracemalloc
import zlib
from typing import Any

import brotli
import pytest

from proxy.content_coding import PIECE
from proxy.content_coding import BodyDecoder
from proxy.content_coding import decodable_only

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

TEXT = b"<html><head><meta name='robots' content='noai'></head>" + b"x" * 5000


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODERS = {
    "identity": lambda data: data,
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": zlib.compress,
    "deflate-raw": _raw_deflate,
    "br": lambda data: brotli.compress(data, quality=1),
    "zstd": lambda data: zstd.compress(data, level=1),
}


def _all(decoder: BodyDecoder, data: bytes) -> bytes:
    """Everything `data` adds, up to the decoder's limit."""
    return b"".join(decoder.pieces(data))


def _encoding(name: str) -> str:
    return "deflate" if name == "deflate-raw" else name


@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_body_decodes_whole_in_pieces_of_any_size(name: str) -> None:
    encoded = ENCODERS[name](TEXT)
    for size in (1, 7, len(encoded)):
        decoder = BodyDecoder.of(_encoding(name), limit=1 << 20)
        assert decoder is not None
        out = b"".join(_all(decoder, encoded[i : i + size]) for i in range(0, len(encoded), size))
        assert out == TEXT and not decoder.full


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_a_compression_bomb_decodes_to_the_limit_and_no_further(name: str) -> None:
    bomb = ENCODERS[name](TEXT + bytes(256 * 2**20))  # 256 MiB of zeros, a few hundred KiB
    assert len(bomb) < 2**20
    decoder = BodyDecoder.of(name, limit=2**20)
    assert decoder is not None
    tracemalloc.start()
    try:
        out = b"".join(_all(decoder, bomb[i : i + 65536]) for i in range(0, len(bomb), 65536))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[: len(TEXT)] == TEXT and len(out) == 2**20 and decoder.full
    assert peak < 16 * 2**20, peak  # decoding all of it would take 256 MiB


@pytest.mark.parametrize("coding", ["none", "binary", "utf-8", "dcb", "identity"])
def test_a_coding_it_does_not_know_is_read_as_sent_as_a_browser_does(coding: str) -> None:
    # Chromium ignores a coding it does not know and renders the bytes: an opt-out in them was
    # delivered unread (found by a headless-browser team).
    decoder = BodyDecoder.of(coding, limit=100)
    assert _all(decoder, TEXT[:100]) == TEXT[:100]
    assert decoder.skipped == (() if coding == "identity" else (coding,))


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip, gzip", lambda b: gzip.compress(gzip.compress(b))),
        ("identity, gzip", gzip.compress),
        ("gzip, br", lambda b: brotli.compress(gzip.compress(b))),
    ],
)
def test_a_list_of_codings_is_undone_last_first(coding: str, encode: Any) -> None:
    decoder = BodyDecoder.of(coding, limit=1 << 20)
    assert _all(decoder, encode(TEXT)) == TEXT and decoder.skipped == ()


def test_what_is_broken_is_an_error() -> None:
    decoder = BodyDecoder.of(" GZIP ", limit=100)
    with pytest.raises(ValueError, match="Content-Encoding"):
        _all(decoder, b"this is not gzip at all")


@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_body_read_in_pieces_comes_whole_and_a_reader_may_stop_at_any_piece(name: str) -> None:
    body = bytes(range(256)) * 1024 + TEXT  # 256 KiB: brotli overshoots small output bounds
    encoded = ENCODERS[name](body)
    half = len(encoded) // 2
    decoder = BodyDecoder.of(_encoding(name), limit=1 << 20)
    assert decoder is not None
    # The reader stops after one piece (if the first half gives any): the rest of it waits.
    taken = list(itertools.islice(decoder.pieces(encoded[:half], size=1000), 1))
    taken += decoder.pieces(encoded[half:], size=1000)
    taken += decoder.pieces(b"", size=1000)
    assert b"".join(taken) == body
    assert max(map(len, taken)) <= 1000 and decoder.produced == len(body)


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_a_reader_that_needs_the_start_of_a_bomb_decodes_only_that(name: str) -> None:
    bomb = ENCODERS[name](TEXT + bytes(256 * 2**20))
    decoder = BodyDecoder.of(name, limit=16 * 2**20)
    assert decoder is not None
    tracemalloc.start()
    try:
        first = next(decoder.pieces(bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.startswith(TEXT) and len(first) == PIECE and decoder.produced == len(first)
    assert peak < 2 * 2**20, peak  # decoding it all would go on to the 16 MiB limit


@pytest.mark.parametrize(
    ("asked", "sent_on"),
    [
        ("gzip, deflate, br, zstd", "gzip, deflate, br, zstd"),
        ("gzip, deflate, br, zstd, dcb, dcz", "gzip, deflate, br, zstd"),  # Chrome, dictionary
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", "br;q=1.0, gzip;q=0.8"),
        ("compress, x-gzip", "x-gzip"),
        ("dcz", "identity"),
        ("*", "identity"),
        ("", "identity"),
    ],
)
def test_a_site_is_asked_only_for_codings_the_gateway_decodes(asked: str, sent_on: str) -> None:
    assert decodable_only(asked) == sent_on
