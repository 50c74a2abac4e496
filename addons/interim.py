"""Interim (1xx) answers from an HTTP/1 site, skipped before the site's final answer.

RFC 9110 15.2: a client must parse any number of 1xx responses before the final one. mitmproxy's
HTTP/1 client reads the first response head it gets as the answer (mitmproxy#2229): a `103 Early
Hints` (or a `102 Processing`) before a `200` became the recorded answer, with no body, and the
real answer was dropped as "unexpected data from server": the scraper got the 103 and then a
closed connection, and the fetch record said `status 103`, forwarded, nothing hashed. Over
HTTP/2 mitmproxy already drops informational responses ("Swallowing HTTP/2 informational
response"); this does the same for HTTP/1: each complete interim head at the start of the
site's data is dropped (and logged) before mitmproxy reads the head after it. `101 Switching
Protocols` is final and kept; so is the `100 Continue` mitmproxy itself asks for, which it
handles before this point.

Installed once at start-up by the gateway (proxy/app.py), next to addons/stream_release.py; it
checks that mitmproxy's HTTP/1 client still reads its head the way this assumes, and changes
nothing otherwise.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Generator
from typing import Any

import structlog
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import _http1

from addons.patches import install_once

log = structlog.get_logger("crawlwarden.interim")

# An interim status line: HTTP/1.x 1xx, but not 101 (the last answer before another protocol).
_INTERIM = re.compile(rb"HTTP/1\.[01] 1(?!01)\d\d\b")


def _looks_as_expected() -> bool:
    client = getattr(_http1, "Http1Client", None)
    reader = getattr(client, "read_headers", None)
    if client is None or reader is None:
        return False
    source = inspect.getsource(reader)
    buffer = getattr(_http1, "ReceiveBuffer", None)
    return (
        "self.buf.maybe_extract_lines()" in source
        and "read_response_head" in source
        and hasattr(buffer, "maybe_extract_at_most")
    )


# The blank line that ends a head, as mitmproxy (h11) finds it: lines may end in a bare LF
# (RFC 9112 2.2). Looking for CRLF CRLF only, a bare-LF 103 was taken for the final answer.
_END_OF_HEAD = re.compile(rb"\n\r?\n")


def skip_interim(data: bytes) -> tuple[bytes, list[bytes]]:
    """`data` without the complete interim heads it begins with; and their status lines."""
    skipped = []
    while _INTERIM.match(data):
        end = _END_OF_HEAD.search(data)
        if end is None:
            break  # not all here yet: mitmproxy waits for more, and so do we
        skipped.append(data[: data.find(b"\n")].rstrip(b"\r"))
        data = data[end.end() :]
    return data, skipped


@install_once(_looks_as_expected)
def install() -> None:
    """Wrap mitmproxy's HTTP/1 client (once per process); False if it differs from expected."""
    original = _http1.Http1Client.read_headers

    @functools.wraps(original)
    def read_headers(
        self: _http1.Http1Client, event: events.ConnectionEvent
    ) -> Generator[Any, Any, None]:
        if isinstance(event, events.DataReceived) and self.request and self.buf:
            received = bytes(self.buf)
            data, skipped = skip_interim(received)
            if skipped:
                self.buf.maybe_extract_at_most(len(received) - len(data))  # dropped
                for line in skipped:
                    log.debug("interim_response_skipped", status_line=line.decode("latin-1"))
                if not data:
                    return  # the final answer is still to come
        yield from original(self, event)

    _http1.Http1Client.read_headers = read_headers  # type: ignore[method-assign]
