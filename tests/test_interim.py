"""addons/interim.py: a site's 1xx answers skipped before its final one (HTTP/1 upstreams)."""

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
    ],
)
def test_interim_heads_are_skipped_and_nothing_else(
    data: bytes, rest: bytes | None, skipped: int
) -> None:
    left, lines = interim.skip_interim(data)
    assert left == (data if rest is None else rest)
    assert len(lines) == skipped


def test_this_mitmproxy_reads_its_heads_as_the_wrapper_assumes() -> None:
    # Pinned: if mitmproxy's HTTP/1 client changes, the wrapper stays out (and says so at start).
    assert interim._looks_as_expected()
    assert interim.install() and interim.install()  # once per process, then a no-op
