"""addons/stream_release.py against the installed mitmproxy's own classes.

The end-to-end proof (a real gateway's collector frees next to nothing per request) is in
tests/test_gateway_e2e.py; these pin down the parts: that this mitmproxy is the one the module
was written for, that state handlers still read and compare as mitmproxy's code expects, and
that a finished stream goes with its last reference.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterable

import h2.config
import h2.connection
import pytest
from mitmproxy import http
from mitmproxy import options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import ResponseHeaders
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.test import tflow

from addons import stream_release


def _context() -> Context:
    return Context(tflow.tclient_conn(), options.Options())


def test_the_installed_mitmproxy_is_the_one_it_was_written_for():
    # On a mitmproxy upgrade that changes these classes the gateway would start without the
    # change (and say so in its log): this test fails first.
    assert stream_release._looks_as_expected()
    assert stream_release.install() is True
    assert stream_release.install() is True  # once per process, twice is harmless


def test_a_streams_state_handlers_read_and_compare_as_before():
    stream_release.install()
    stream = http_layers.HttpStream(_context(), 1)
    assert stream.client_state == stream.state_uninitialized
    stream.client_state = stream.state_done
    stream.server_state = stream.state_errored
    assert stream.client_state == stream.state_done
    assert stream.client_state != stream.state_errored
    assert stream.server_state in (stream.state_done, stream.state_errored)
    assert stream.client_state.__self__ is stream
    assert "client_state=state_done" in repr(stream)
    # No method of itself kept: the stream's own attributes do not lead back to it.
    assert all(getattr(v, "__self__", None) is not stream for v in vars(stream).values())
    other = http_layers.HttpStream(_context(), 3)
    stream.client_state = other.state_done  # another object's method is kept as it is
    assert stream.client_state.__self__ is other


async def test_a_finished_stream_is_freed_by_its_last_reference():
    stream_release.install()
    layer = http_layers.HttpLayer(_context(), http_layers.HTTPMode.regular)
    assert isinstance(layer.streams, stream_release._Streams)
    stream = http_layers.HttpStream(layer.context.fork(), 1)
    stream.client_state = stream.state_wait_for_request_headers
    layer.streams[1] = stream
    gone = weakref.ref(stream)
    del stream
    was_enabled = gc.isenabled()
    gc.disable()  # freed by reference counting alone, or not at all
    try:
        layer.streams.pop(1)
        assert gone() is not None  # its last step may still run in this turn
        await asyncio.sleep(0)
        assert gone() is None
    finally:
        if was_enabled:
            gc.enable()


def test_a_closed_site_connection_is_forgotten_once_told_and_unnamed():
    # mitmproxy kept every closed connection to a site (and its layers) in the HTTP layer, the
    # tunnel's and the CONNECT's both, for the life of the scraper's connection.
    stream_release.install()
    layer = http_layers.HttpLayer(_context(), http_layers.HTTPMode.regular)
    server = tflow.tserver_conn()
    server.state = ConnectionState.CLOSED
    stream = http_layers.HttpStream(layer.context.fork(), 1)
    stream.context.server = server
    layer.streams[1] = stream
    layer.connections[server] = object()
    stream_release.forget_closed(layer, server)  # not told it closed yet: looked up then
    assert server in layer.connections
    stream_release.closed(layer, server)  # told, but a stream still names it
    assert server in layer.connections
    layer.streams.pop(1)  # that stream ends
    assert server not in layer.connections
    own = layer.context.server  # the layer's own (a tunnel's) stays
    own.state = ConnectionState.CLOSED
    layer.connections[own] = object()
    stream_release.closed(layer, own)
    assert own in layer.connections


def test_without_an_event_loop_a_finished_stream_is_left_to_the_collector():
    stream_release.install()
    layer = http_layers.HttpLayer(_context(), http_layers.HTTPMode.regular)
    stream = http_layers.HttpStream(layer.context.fork(), 1)
    layer.streams[1] = stream
    assert layer.streams.pop(1) is stream
    assert stream.context.layers[-1] is stream


def test_a_mitmproxy_without_its_sources_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch):
    def no_source(obj: object) -> str:
        raise OSError("could not get source code")

    monkeypatch.setattr(stream_release.inspect, "getsource", no_source)
    assert stream_release._looks_as_expected() is False


class _Scraper:
    """An HTTP/2 client (h2) talking to mitmproxy's `Http2Server` layer directly."""

    def __init__(self) -> None:
        client = tflow.tclient_conn()
        client.alpn = b"h2"
        opts = options.Options()
        Proxyserver().load(opts)  # (the HTTP/2 options)
        self.context = Context(client, opts)
        self.server = _http2.Http2Server(self.context)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self._feed(self.server.handle_event(events.Start()))
        self._send()

    def _feed(self, out: Iterable[commands.Command]) -> None:
        for command in out:
            if isinstance(command, commands.SendData):
                self.h2.receive_data(command.data)

    def _send(self) -> None:
        self._feed(
            self.server.handle_event(
                events.DataReceived(self.context.client, self.h2.data_to_send())
            )
        )

    def ask(self) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "site-a.test"),
            (":path", "/"),
        ]
        self.h2.send_headers(stream_id, headers, end_stream=True)
        self._send()
        return stream_id

    def answer(self, stream_id: int) -> None:
        response = http.Response.make(200, b"", {"content-length": "0"})
        self._feed(self.server.handle_event(ResponseHeaders(stream_id, response, end_stream=True)))
        self._send()  # (the scraper's acknowledgements)


def test_a_scrapers_http2_connection_forgets_the_streams_it_has_answered():
    # mitmproxy's Http2Server kept an entry per request answered for as long as the scraper's
    # connection lasted (a browser's or a crawler's connection lasts for hours).
    stream_release.install()
    scraper = _Scraper()
    for _ in range(50):
        scraper.answer(scraper.ask())
    assert len(scraper.server.streams) == 1  # the last, until the next stream
    # A stream still open keeps its place, and those after it until it closes.
    slow = scraper.ask()
    later = [scraper.ask() for _ in range(3)]
    for stream_id in later:
        scraper.answer(stream_id)
    newest = scraper.ask()
    assert list(scraper.server.streams) == [slow, *later, newest]
    scraper.answer(slow)
    assert list(scraper.server.streams) == [slow, *later, newest]
    scraper.answer(scraper.ask())
    assert list(scraper.server.streams) == [newest, newest + 2]
