"""Trailer fields of a chunked HTTP/1 message, dropped where mitmproxy would crash on them.

A chunked body may end with trailer fields (RFC 9112 7.1.2: Go's net/http, Node's
`res.addTrailers`, gRPC-web send them). mitmproxy's HTTP/1 layer raises NotImplementedError on
them ("mitmproxy has crashed!"): the scraper got nothing until `network.response_timeout`, and
the fetch record said 0 bytes, no hash, nothing charged, blamed on the site's silence, though
the whole body had come. A recipient that removes the chunked coding may discard the trailer
fields (RFC 9110 6.5.1), as the gateway does here: the body is delivered, hashed and recorded
like any other; the trailers reach neither the scraper nor the record (logged at debug).

Installed once at start-up by the gateway (proxy/app.py), next to addons/interim.py; only where
mitmproxy still makes its body readers with `make_body_reader` and still refuses trailers.
"""

from __future__ import annotations

import inspect
from typing import Any

import h11
import structlog
from mitmproxy.proxy.layers.http import _http1

from addons.patches import install_once

log = structlog.get_logger("crawlwarden.trailers")


class TrailersDropped:
    """An h11 chunked-body reader whose end of message carries no trailer fields."""

    def __init__(self, reader: Any):
        self._reader = reader

    def __call__(self, buf: Any) -> Any:
        event = self._reader(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            log.debug(
                "trailers_dropped", fields=[name.decode("latin-1") for name, _ in event.headers]
            )
            return h11.EndOfMessage()
        return event

    def read_eof(self) -> Any:
        return self._reader.read_eof()


def _looks_as_expected() -> bool:
    make = getattr(_http1, "make_body_reader", None)
    connection = getattr(_http1, "Http1Connection", None)
    read_body = getattr(connection, "read_body", None)
    if make is None or read_body is None:
        return False
    return (
        "ChunkedReader()" in inspect.getsource(make)
        and "trailers are not implemented" in inspect.getsource(read_body)
        and "make_body_reader(" in inspect.getsource(_http1)
    )


@install_once(_looks_as_expected)
def install() -> None:
    """Wrap mitmproxy's chunked body readers (once per process)."""
    original = _http1.make_body_reader

    def make_body_reader(expected_size: int | None) -> Any:
        reader = original(expected_size)
        return TrailersDropped(reader) if expected_size is None else reader

    _http1.make_body_reader = make_body_reader
