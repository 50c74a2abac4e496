"""addons/interim.py (a site's 1xx answers skipped before its final one, HTTP/1 upstreams), and the
other HTTP/1 patches it stands beside (addons/trailers.py, addons/buffered_bytes.py)."""

from __future__ import annotations

import pytest

from addons import interim

FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "rest", "skipped"),
    [
        (b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n" + FINAL, FINAL, 1),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 102 Processing\r\n\r\n" + FINAL, FINAL, 2),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", None, 0),  # final
        (b"HTTP/1.1 103 Early Hints\r\nLink: <a>", None, 0),  # not all here: wait
        (FINAL, FINAL, 0),
        (b"HTTP/1.1 1030 Odd\r\n\r\n", None, 0),  # not a status code
        # lines ending in a bare LF, as mitmproxy reads them (RFC 9112 2.2): probe finding
        (b"HTTP/1.1 103 Early Hints\nLink: <a>\n\n" + FINAL, FINAL, 1),
        (b"HTTP/1.1 103 Early Hints\n\r\n" + FINAL, FINAL, 1),
        (b"HTTP/1.1 103 Early Hints\nLink: <a>\n", None, 0),  # not all here: wait
    ],
)
def test_interim_heads_are_skipped_and_nothing_else(
    data: bytes, rest: bytes | None, skipped: int
) -> None:
    left, lines = interim.skip_interim(data)
    assert left == (data if rest is None else rest)
    assert len(lines) == skipped
    assert all(
        line.startswith(b"HTTP/1.") and line.isascii() and b"\r" not in line for line in lines
    )


def test_this_mitmproxy_reads_its_heads_as_the_wrapper_assumes() -> None:
    # Pinned: if mitmproxy's HTTP/1 client changes, the wrapper stays out (and says so at start).
    assert interim._looks_as_expected()
    assert interim.install() and interim.install()  # once per process, then a no-op


def test_this_mitmproxy_reads_chunked_bodies_as_the_trailer_wrapper_assumes() -> None:
    from addons import trailers

    assert trailers._looks_as_expected()
    assert trailers.install() and trailers.install()


def test_this_mitmproxy_buffers_answers_as_the_byte_counter_assumes() -> None:
    from addons import buffered_bytes

    assert buffered_bytes._looks_as_expected()
    assert buffered_bytes.install() and buffered_bytes.install()
