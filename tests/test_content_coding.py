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

from proxy.content_coding import MAX_STREAMS
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


def _decoded_in_reads(decoder: BodyDecoder, body: bytes) -> tuple[bytes, int]:
    """`body` decoded in 64 KiB reads, as the gateway gets it; and the peak memory it took."""
    tracemalloc.start()
    try:
        out = b"".join(_all(decoder, body[i : i + 65536]) for i in range(0, len(body), 65536))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


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
    out, peak = _decoded_in_reads(decoder, bomb)
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


# -- bodies sent as several gzip members or zstd frames --------------------------------------

HEAD, REST = TEXT[:20], TEXT[20:]  # the opt-out is in the second member
SKIPPABLE_FRAME = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"pad"

STREAMS = {
    "gzip": _gzip(HEAD) + _gzip(REST),
    "x-gzip": _gzip(HEAD) + _gzip(b"") + _gzip(REST),
    "gzip padded": _gzip(HEAD) + bytes(100_000) + _gzip(REST) + bytes(3),  # NULs between
    "gzip then junk": _gzip(HEAD) + _gzip(REST) + b"<html>not gzip</html>",
    "zstd": zstd.compress(HEAD) + zstd.compress(REST),
    "zstd skippable": zstd.compress(HEAD) + SKIPPABLE_FRAME + zstd.compress(REST),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_gzip_member_and_zstd_frame_is_decoded_as_clients_decode_them(name: str) -> None:
    # RFC 1952 2.2, RFC 8878 3: a series of members (frames). Python's gzip and zstd modules,
    # urllib3 and Scrapy decode them all: an opt-out in the second was delivered unread.
    body, coding = STREAMS[name], name.split()[0]
    reference = zstd.decompress if coding == "zstd" else gzip.decompress
    assert reference(body.removesuffix(b"<html>not gzip</html>")) == TEXT
    for size in (1, 7, 4096, len(body)):
        decoder = BodyDecoder.of(coding, limit=1 << 20)
        out = b"".join(_all(decoder, body[i : i + size]) for i in range(0, len(body), size))
        assert out == TEXT, size


@pytest.mark.parametrize("name", list(STREAMS))
def test_members_and_frames_come_in_pieces_and_a_reader_may_stop_at_any(name: str) -> None:
    body, coding = STREAMS[name], name.split()[0]
    decoder = BodyDecoder.of(coding, limit=1 << 20)
    taken = list(itertools.islice(decoder.pieces(body, size=10), 3))
    taken += decoder.pieces(b"", size=10)
    assert b"".join(taken) == TEXT and max(map(len, taken)) <= 10


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        pytest.param("zstd", zstd.compress(TEXT) + b"not a frame", id="zstd"),
        pytest.param("gzip", _gzip(HEAD) + b"\x1f\x8b-not-a-member", id="gzip"),
        pytest.param("br", brotli.compress(HEAD) + brotli.compress(REST), id="br"),  # 1 stream
    ],
)
def test_what_follows_a_stream_and_is_not_one_is_an_error(coding: str, body: bytes) -> None:
    # As in the codings' own decoders (and curl): the opt-outs are not read, and a record says so.
    with pytest.raises(ValueError, match="Content-Encoding"):
        _all(BodyDecoder.of(coding, limit=1 << 20), body)


def test_deflate_is_one_stream_and_what_follows_it_is_left_unread() -> None:
    # RFC 9110 8.4.1.2: one zlib stream. zlib.decompress, urllib3 and curl read no further.
    body = zlib.compress(HEAD) + zlib.compress(REST)
    assert zlib.decompress(body) == HEAD
    assert _all(BodyDecoder.of("deflate", limit=1 << 20), body) == HEAD


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_bomb_in_many_members_decodes_to_the_limit_and_no_further(coding: str) -> None:
    # The limit is on the body's decoded bytes, whichever members they come from.
    encode = _gzip if coding == "gzip" else lambda data: zstd.compress(data, level=1)
    member = encode(bytes(64 * 2**20))  # 64 MiB of zeros, 64 KiB or less
    bomb = encode(TEXT) + member * 4
    decoder = BodyDecoder.of(coding, limit=2**20)
    out, peak = _decoded_in_reads(decoder, bomb)
    assert out[: len(TEXT)] == TEXT and len(out) == 2**20 and decoder.full
    assert peak < 16 * 2**20, peak


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_body_of_more_members_than_any_page_is_read_up_to_them(coding: str) -> None:
    # Each member, even an empty one, costs a decompressor: 16 MiB of empty zstd frames would
    # hold the event loop for seconds. Past MAX_STREAMS the rest is not read, and that is said.
    encode = _gzip if coding == "gzip" else zstd.compress
    many = encode(HEAD) + encode(b"") * (MAX_STREAMS - 2)
    assert _all(BodyDecoder.of(coding, limit=1 << 20), many + encode(REST)) == TEXT
    decoder = BodyDecoder.of(coding, limit=1 << 20)
    with pytest.raises(ValueError, match=f"more than {MAX_STREAMS}"):
        _all(decoder, many + encode(b"") + encode(REST))
    assert decoder.produced == len(HEAD)


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
