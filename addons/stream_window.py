"""On an HTTP/2 connection to a site, each stream's window goes back to the site only as fast as
its scraper takes the answer.

mitmproxy gives each stream of its HTTP/2 connections to sites a window of 2 GiB and hands back
what it reads at once: a site sent an answer as fast as it could, whatever the scraper took. An
HTTP/2 scraper that gives one stream no window (a browser pausing a video) left that answer in
the stream's send buffer, until addons/read_backpressure.py stopped reading the site's whole
connection 4 MiB ahead: every other request on it (the page's images from the same CDN) waited
until HttpGuard reset the paused stream at `response_timeout`.

Now a stream to the site starts with a window of SITE_STREAM_WINDOW, and what came on it is handed
back only while the scraper's stream holds less than ROOM_BYTES in the gateway's send buffer.
A site sends a paused stream at most one window more and stops; the connection and its other
streams go on. HttpGuard, after each read of the scraper's connection (its WINDOW_UPDATE, a
stream's reset), hands back what the streams it has made room for held (`give_back`), and
counts a held stream's wait as the scraper's, as it does a site's connection not read for it:
`held_since`. The connection's own window goes back with the stream's; a held stream keeps at
most a window of it (the connection's is 2 GiB).

It matters for answers the gateway streams (over addons/gateway.py's BUFFER_LIMIT): one it holds
whole is read from the site to its end before any of it goes to the scraper, so nothing of it
waits in a send buffer while its site stream is open.

Only where the scraper speaks HTTP/2 to the gateway: an HTTP/1 scraper's request has its site
connection to itself, which read_backpressure holds when the scraper does not read, and its
streams keep mitmproxy's windows (no cap on a stream's speed to a distant site).

Installed once at start-up by the gateway (proxy/app.py), next to addons/read_backpressure.py;
only where mitmproxy's HTTP/2 layers still look as this assumes.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any

from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http2

from addons.patches import install_once

# The window of each stream to a site (the HTTP/2 setting the gateway sends): what a site may
# send on a stream ahead of its scraper. 1 MiB lets a stream run at 10 MiB/s to a site 100 ms
# away; browsers offer 6 MiB or more, so a scraper's window rarely holds a stream back.
SITE_STREAM_WINDOW = 2**20
# A stream's window goes back to the site while its scraper has less than this of it waiting in
# the gateway's send buffer.
ROOM_BYTES = 512 * 2**10
installed = False


@dataclass(slots=True)
class _Held:
    """What came on a site's stream and was not handed back, for the scraper's stream `their`."""

    ours: int  # the stream's id on the site's connection
    size: int  # flow-controlled bytes not handed back
    since: float  # (monotonic) held since, or since the scraper last took some of it
    waiting: int  # what the scraper's stream had waiting at the last look (or the last data)


class GiveBack(events.Event):
    """To a site's HTTP/2 layer (through its TLS and tunnel layers, which pass it on): send the
    WINDOW_UPDATE frames `give_back` queued."""


def _looks_as_expected() -> bool:
    client = getattr(_http2, "Http2Client", None)
    handle = getattr(_http2.Http2Connection, "handle_h2_event", None)
    if client is None or handle is None:
        return False
    return (
        "self.h2_conn.acknowledge_received_data(" in inspect.getsource(handle)
        and "self.their_stream_id = {}" in inspect.getsource(client.__init__)
        and "self.local_settings.initial_window_size = 2**31 - 1"
        in inspect.getsource(_http2.BufferedH2Connection.__init__)
        and "self.stream_buffers = " in inspect.getsource(_http2.BufferedH2Connection.__init__)
    )


def h2_under(top: layer.Layer | None) -> _http2.Http2Client | None:
    """The HTTP/2 layer of a connection to a site, under the layer an HTTP layer keeps for it
    (its TLS layer, an upstream proxy's tunnel), if it speaks HTTP/2."""
    while top is not None and not isinstance(top, _http2.Http2Client):
        top = getattr(top, "child_layer", None)
    return top


def _owner(site: _http2.Http2Client) -> http_layers.HttpLayer | None:
    """The HTTP layer that made this site connection: the one nearest above its layers (in a
    CONNECT tunnel, the tunnel's, not the CONNECT's, which also keeps the connection)."""
    found = site.__dict__.get("_crawlwarden_owner")
    if found is None:
        layers = reversed(site.context.layers)
        found = next((x for x in layers if isinstance(x, http_layers.HttpLayer)), None)
        site.__dict__["_crawlwarden_owner"] = found
    return found


def _scraper(site: _http2.Http2Client) -> _http2.Http2Server | None:
    """The scraper's HTTP/2 layer whose streams this site's connection answers."""
    http = _owner(site)
    scraper = http.connections.get(http.context.client) if http is not None else None
    return scraper if isinstance(scraper, _http2.Http2Server) else None


def _holds(site: _http2.Http2Client) -> dict[int, _Held]:
    return site.__dict__.setdefault("_crawlwarden_held", {})


def buffered(scraper: _http2.Http2Server, stream_id: int) -> int:
    """What the scraper's stream has waiting in the gateway's send buffer (mitmproxy's, for the
    stream's window)."""
    return sum(len(chunk.data) for chunk in scraper.h2_conn.stream_buffers.get(stream_id, ()))


def _held_sites(client: Any) -> dict[_http2.Http2Client, None]:
    """The site layers of a scraper's connection that hold some stream's window back."""
    return client.__dict__.setdefault("_crawlwarden_held_sites", {})


def _acknowledge(site: _http2.Http2Client, original: Any, size: int, ours: int) -> None:
    """h2's `acknowledge_received_data` for the site's connection: held back while the
    scraper's stream has ROOM_BYTES or more waiting."""
    scraper = _scraper(site)
    their = site.their_stream_id.get(ours)
    if scraper is None or their is None or not size:
        original(size, ours)
        return
    waiting = buffered(scraper, their)
    holds = _holds(site)
    held = holds.get(their)
    if waiting < ROOM_BYTES:
        if held is not None:
            del holds[their]
            size += held.size
        original(size, ours)
        return
    if held is None:
        holds[their] = _Held(ours, size, time.monotonic(), waiting)
        _held_sites(site.context.client)[site] = None
    else:
        held.size += size
        held.waiting = waiting  # (what the scraper takes is measured from here)


def give_back(http: http_layers.HttpLayer) -> layer.CommandGenerator[list[int]]:
    """After a read of the scraper's connection: hand back to the sites the windows of the
    streams the scraper now has room for (or has ended), and note when the others it took some
    of. Returns the scraper's stream ids whose windows went back."""
    sites: dict[_http2.Http2Client, None] | None = http.context.client.__dict__.get(
        "_crawlwarden_held_sites"
    )
    if not sites:
        return []
    given: list[int] = []
    now = time.monotonic()
    for site in list(sites):
        if _owner(site) is not http:
            continue  # (another HTTP layer's)
        top = http.connections.get(site.conn)
        if top is None:
            del sites[site]  # its connection is gone: nothing to hand back
            continue
        holds = _holds(site)
        scraper = _scraper(site)
        sent = False
        for their, held in list(holds.items()):
            waiting = buffered(scraper, their) if scraper is not None else 0
            if waiting >= ROOM_BYTES:
                if waiting < held.waiting:
                    held.since = now  # it took some: a slow reader is no stalled one
                held.waiting = waiting
                continue
            del holds[their]
            given.append(their)
            if "_handle_event" not in site.__dict__:  # (else its connection is done with)
                site.h2_conn.acknowledge_received_data(held.size, held.ours)
                sent = True
        if not holds:
            del sites[site]
        if sent:
            yield from http.event_to_child(top, GiveBack())
    return given


def windowed(site: _http2.Http2Client | None) -> bool:
    """Whether this HTTP/2 connection to a site gives each stream the window its scraper makes
    room for (its scraper speaks HTTP/2): a stream's answer then waits in the gateway at most
    ROOM_BYTES and a window."""
    return site is not None and "_crawlwarden_scraper_paced" in site.__dict__


def held_since(site: _http2.Http2Client | None, their: int | None) -> float | None:
    """Since when (monotonic) the site's stream for the scraper's stream `their` has had its
    window held back because the scraper took nothing of what waits for it; None if not."""
    if site is None or their is None:
        return None
    held = site.__dict__.get("_crawlwarden_held", {}).get(their)
    return None if held is None else held.since


def _send_given(site: _http2.Http2Client) -> layer.CommandGenerator[None]:
    data = site.h2_conn.data_to_send()
    if data:
        yield commands.SendData(site.conn, data)


@install_once(_looks_as_expected)
def install() -> None:
    """Give a site's HTTP/2 streams the window their scrapers make room for (once per
    process)."""
    global installed
    client_class = _http2.Http2Client
    original_init = client_class.__init__
    original_handle = client_class._handle_event

    @functools.wraps(original_init)
    def __init__(self: _http2.Http2Client, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.context.client.alpn != b"h2":
            return  # (an HTTP/1 scraper: read_backpressure holds its site connection)
        self.__dict__["_crawlwarden_scraper_paced"] = True
        settings = self.h2_conn.local_settings
        settings.initial_window_size = SITE_STREAM_WINDOW
        settings.acknowledge()  # (in force at once, as mitmproxy does with its own)
        self.h2_conn.acknowledge_received_data = functools.partial(  # type: ignore[method-assign]
            _acknowledge, self, self.h2_conn.acknowledge_received_data
        )

    @functools.wraps(original_handle)
    def _handle_event(
        self: _http2.Http2Client, event: events.Event
    ) -> layer.CommandGenerator[None]:
        if isinstance(event, GiveBack):
            return _send_given(self)
        return original_handle(self, event)

    client_class.__init__ = __init__  # type: ignore[method-assign]
    client_class._handle_event = _handle_event  # type: ignore[method-assign]
    installed = True
