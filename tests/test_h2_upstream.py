"""Sites that speak HTTP/2: a real nginx over TLS with h2, behind a real gateway.

Most sites a crawl meets answer in HTTP/2. mitmproxy then speaks HTTP/2 to the site (and to a
client that offers it): headers arrive lower-case, bodies without a Content-Length, and a
withheld stream is reset rather than a connection closed. The tests' own loopback sites speak
HTTP/1.1 only; this one is Debian's nginx (`.ci/nginx` installs it; without it these tests
skip, except under CI=true, where they fail). One test has an HTTP/2 site of its own (the h2
library), for what nginx does not do: take an upload slowly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from addons import stream_window
from addons.gateway import BUFFER_LIMIT
from tests.optout_fixtures import jpeg_with_xmp
from tests.optout_fixtures import xmp_packet
from tests.support import PROJECT
from tests.support import Gateway
from tests.support import H2Answer
from tests.support import H2Client
from tests.support import LocalCA
from tests.support import RawSite
from tests.support import curl
from tests.support import free_port
from tests.support import installed
from tests.support import policy_with
from tests.support import tls_tunnel
from tests.test_read_backpressure import _H2Reader
from tests.test_read_backpressure import _kib
from tests.test_upstream_proxies import UpstreamProxy

HEADERS = {"X-Crawl-Project": PROJECT}
# A policy's network for the sites here: *.test is 127.0.0.1, which the gateway may reach.
LOOPBACK = {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
OPTED_OUT = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED"))
PLAIN = jpeg_with_xmp(xmp_packet(None))
LARGE = bytes(range(256)) * (20 * 2**20 // 256)  # over the 16 MiB buffer: streamed
# A video the gateway streams (an answer up to BUFFER_LIMIT is held whole before it goes on, and
# its site's stream is over by then: nothing of it waits on the site).
VIDEO = BUFFER_LIMIT + 2**20
LARGE_OPTED_OUT = OPTED_OUT + b"\x00" * (20 * 2**20)  # streamed, its metadata at the front


def _nginx() -> str:
    return installed("nginx", ".ci/nginx installs Debian's nginx-light", "/usr/sbin/nginx")


@contextlib.contextmanager
def _scraper(gw: Gateway, authority: str) -> Iterator[_H2Reader]:
    """An HTTP/2 scraper (tests.test_read_backpressure's) in a CONNECT tunnel to `authority`."""
    with tls_tunnel(gw, authority, alpn="h2") as tls:
        yield _H2Reader(tls, authority)


@contextlib.contextmanager
def _egress_proxy(workdir: Path, name: str) -> Iterator[UpstreamProxy]:
    """A real upstream proxy (mitmdump passing TLS through) for egress.upstream_proxies."""
    proxy = UpstreamProxy(workdir, name)
    try:
        yield proxy
    finally:
        proxy.stop()


def _through(
    stack: contextlib.ExitStack, workdir: Path, via: str | None, policy: dict[str, Any]
) -> UpstreamProxy | None:
    """The gateway's traffic through a real upstream proxy named `via`, if any (started on
    `stack`, named in the policy's egress.upstream_proxies)."""
    if via is None:
        return None
    egress = stack.enter_context(_egress_proxy(workdir, via))
    policy["egress"] = {**policy["egress"], "upstream_proxies": [{"name": via, "url": egress.url}]}
    return egress


@dataclass
class H2Site:
    port: int
    access_log: Path
    few_port: int  # the same site, two streams at once on a connection

    def url(self, host: str, path: str) -> str:
        return f"https://{host}:{self.port}{path}"

    def connections(self, *paths: str) -> int:
        """How many of nginx's connections carried requests for these paths."""
        log = self.access_log.with_name("connections.log")
        lines = log.read_text().splitlines() if log.exists() else []
        return len({line.split(" ")[0] for line in lines if line.split(" ")[1] in paths})

    def requests(self) -> list[tuple[str, str, str]]:
        """(protocol, method, path) of each request nginx answered."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        return [tuple(line.split(" ", 2)) for line in lines]  # type: ignore[misc]


@pytest.fixture
def h2_site(tmp_path: Path, test_ca: LocalCA) -> Iterator[H2Site]:
    nginx = _nginx()
    root = tmp_path / "www"
    (root / "img").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "robots.txt").write_bytes(b"User-agent: *\nDisallow: /private/\n")
    (root / "img" / "plain.jpg").write_bytes(PLAIN)
    (root / "img" / "opted-out.jpg").write_bytes(OPTED_OUT)
    (root / "img" / "large.bin").write_bytes(LARGE)
    (root / "img" / "large-opted-out.jpg").write_bytes(LARGE_OPTED_OUT)
    (root / "private" / "p.jpg").write_bytes(PLAIN)
    (root / "page.html").write_bytes(
        b'<!doctype html><html><head><meta name="robots" content="noai"></head><body></body></html>'
    )
    port, few_port = free_port(), free_port()
    # Behind /hang/: a backend that takes nginx's request and never answers (the kernel accepts
    # the connection for a listener that never calls accept).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    log = tmp_path / "access.log"
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
http {{
    types {{ image/jpeg jpg; text/html html; text/plain txt; application/octet-stream bin; }}
    log_format proto '$server_protocol $request_method $request_uri';
    access_log {log} proto;
    log_format conn '$connection $request_uri';
    access_log {tmp_path}/connections.log conn;
    client_body_temp_path {tmp_path}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {test_ca.server_cert};
        ssl_certificate_key {test_ca.server_key};
        root {root};
        location /trickle/ {{ limit_rate 2k; }}
        location /hang/ {{ proxy_pass http://127.0.0.1:{silent.getsockname()[1]}; }}
    }}
    server {{
        # A site that takes two streams at once on a connection.
        listen 127.0.0.1:{few_port} ssl http2;
        http2_max_concurrent_streams 2;
        ssl_certificate {test_ca.server_cert};
        ssl_certificate_key {test_ca.server_key};
        root {root};
        location /trickle/ {{ limit_rate 2k; }}
    }}
}}
"""
    )
    with (tmp_path / "nginx.out").open("wb") as out:
        proc = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=out
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "nginx.out").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield H2Site(port, log, few_port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        silent.close()


def test_this_mitmproxy_speaks_http2_to_sites_as_the_stream_windows_assume() -> None:
    # Pinned: if mitmproxy's HTTP/2 layers change, the windows are left as they are (and the
    # gateway says so at start); the tests below would then see a paused stream hold others.
    assert stream_window._looks_as_expected()
    assert stream_window.install() and stream_window.install()


@pytest.fixture
def gateway(workdir: Path, test_ca: LocalCA) -> Iterator[Gateway]:
    respect = {"robots": True, "tdmrep": True, "noai": True, "image_metadata": True}
    policy = policy_with(defaults={"respect": respect})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        yield gw


@pytest.mark.parametrize("client", ["--http2", "--http1.1"])
def test_an_http2_site_is_checked_recorded_and_withheld_as_any_other(
    gateway: Gateway, h2_site: H2Site, client: str
):
    def get(path: str):
        return curl(
            h2_site.url("site-c.test", path),
            proxy=gateway.proxy_url(),
            cacert=gateway.ca_cert,
            headers=HEADERS,
            extra=[client],
            timeout=30,
        )

    plain = get("/img/plain.jpg")
    assert (plain.status, plain.body) == (200, PLAIN)
    assert plain.version == ("HTTP/2" if client == "--http2" else "HTTP/1.1")
    withheld = get("/img/opted-out.jpg")
    assert (withheld.status, withheld.headers["x-crawlwarden-reason"]) == (451, "image_optout")
    page = get("/page.html")
    assert (page.status, page.headers["x-crawlwarden-reason"]) == (451, "noai_directive")
    disallowed = get("/private/p.jpg")
    assert (disallowed.status, disallowed.headers["x-crawlwarden-reason"]) == (
        451,
        "robots_disallowed",
    )
    large = get("/img/large.bin")
    assert large.status == 200 and len(large.body) == len(LARGE)
    assert hashlib.sha256(large.body).digest() == hashlib.sha256(LARGE).digest()
    broken = get("/img/large-opted-out.jpg")  # streamed: the opt-out breaks the transfer
    assert len(broken.body) < len(LARGE_OPTED_OUT)

    answered = h2_site.requests()
    # The scraper's requests went on in the HTTP version it spoke (mitmproxy offers the site
    # what the client offered it); the gateway's own fetches (aiohttp) in HTTP/1.1.
    own = {"/robots.txt", "/.well-known/tdmrep.json"}
    spoken = "HTTP/2.0" if client == "--http2" else "HTTP/1.1"
    assert {proto for proto, _, path in answered if path not in own} == {spoken}, answered
    assert "/private/p.jpg" not in {path for _, _, path in answered}
    records = {
        r["url"].rsplit("/", 1)[1]: r
        for r in gateway.fetch_records()
        if r["kind"] == "fetch" and "/" in r["url"].split("//", 1)[1]
    }
    assert records["plain.jpg"]["content_sha256"] == hashlib.sha256(PLAIN).hexdigest()
    assert records["large.bin"]["content_sha256"] == hashlib.sha256(LARGE).hexdigest()
    assert (records["opted-out.jpg"]["decision"], records["opted-out.jpg"]["reason"]) == (
        "withheld",
        "image_optout",
    )
    assert (
        records["large-opted-out.jpg"]["decision"],
        records["large-opted-out.jpg"]["reason"],
    ) == ("withheld", "image_optout")
    assert records["p.jpg"]["reason"] == "robots_disallowed"


def test_a_stream_the_scraper_cancels_is_its_doing_not_the_sites(gateway: Gateway, h2_site: H2Site):
    # mitmproxy words a reset from either side "stream reset by client": with the site on
    # HTTP/2 too, every image a browser gave up on (lazy loading, a page left) was recorded as
    # the site's upstream_error and counted in crawlwarden_upstream_errors_total.
    authority = f"site-a.test:{h2_site.port}"
    with tls_tunnel(gateway, authority, alpn="h2") as tls:
        client = H2Client(tls)
        stream = client._start(
            "GET",
            authority,
            "/img/large.bin",
            (("x-crawl-project", PROJECT),),
            "https",
            end_stream=True,
        )
        answer = H2Answer({})
        while not answer.body and not answer.end:
            client._receive(stream, answer, timeout=None)  # the head and the first bytes
        assert answer.headers[":status"] == "200"
        client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        tls.sendall(client.conn.data_to_send())
        assert client.get(authority, "/img/plain.jpg", ("x-crawl-project", PROJECT)).body == PLAIN
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in gateway.fetch_records() if r["url"].endswith("/img/large.bin")]
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(r["decision"], r["reason"]) for r in records] == [("forwarded", "interrupted")]
    assert gateway.metric("crawlwarden_upstream_errors_total") == 0


def test_a_request_sharing_a_site_connection_with_a_stalled_one_goes_on_when_it_is_reset(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA
):
    # A scraper pauses a video and asks for a page; both go on one HTTP/2 connection to the
    # site, which waits for the video (addons/read_backpressure.py). At the response timeout
    # (3 s) the gateway closed that connection: the page was ended with the video (502
    # interrupted). Now only the video's stream is reset, to the site and to the scraper, and
    # the page comes whole on the same connection.
    (tmp_path / "www" / "video.bin").write_bytes(b"v" * (96 * 2**20))
    (tmp_path / "www" / "small.txt").write_bytes(b"s" * 200_000)
    authority = f"site-a.test:{h2_site.port}"
    policy = policy_with(network={**LOOPBACK, "response_timeout": "3s"})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _scraper(gw, authority) as scraper:
            first = scraper.get("/small.txt")  # (the connection to the site is made)
            scraper.read(5, until_ended={first})
            video = scraper.get("/video.bin", paused=True)
            scraper.read(1)
            page = scraper.get("/small.txt")
            scraper.read(10, until_ended={page, video})
            again = scraper.get("/small.txt")
            scraper.read(10, until_ended={again})
        records = [
            (r["url"].rsplit("/", 1)[1], r["reason"], r["note"])
            for r in gw.fetch_records()
            if r["url"].endswith((".txt", ".bin"))
        ]
        assert gw.metric("crawlwarden_upstream_errors_total") == 0
    stalled = "the client made no room for more of the answer for 3s"
    assert sorted((name, reason, bool(note)) for name, reason, note in records) == [
        ("small.txt", "ok", False),
        ("small.txt", "ok", False),
        ("small.txt", "ok", False),
        ("video.bin", "interrupted", True),
    ], records
    [note] = [note for name, _, note in records if name == "video.bin"]
    assert note.startswith(stalled) and "reset its stream" in note, note
    assert video in scraper.resets and page not in scraper.resets, scraper.resets
    assert scraper.heads[page][":status"] == "200" and scraper.got[page] == 200_000
    assert scraper.got[again] == 200_000 and first in scraper.ended
    # One HTTP/2 connection to the site carried all four: the gateway did not close it.
    assert h2_site.connections("/small.txt", "/video.bin") == 1


@pytest.mark.parametrize(("via", "videos"), [(None, 1), ("egress-proxy", 1), (None, 10)])
def test_a_stream_the_scraper_pauses_holds_back_no_other_on_the_sites_connection(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA, via: str | None, videos: int
):
    # A browser pauses a video (or buffers several, as a gallery page does, each paused once
    # its buffer is full) and goes on loading the page's images from the same site, on one
    # HTTP/2 connection to it. The gateway gave the site's stream a 2 GiB window, the video
    # piled up in the scraper's send buffer, and 4 MiB ahead the gateway stopped reading the
    # site's connection: the images waited until the video was reset at the response timeout.
    # Now the site's stream gets only the window the scraper makes room for: the images come
    # at once, and a video read again after the pause comes whole on the same connection.
    for n in range(videos):
        (tmp_path / "www" / f"video{n}.bin").write_bytes(b"v" * VIDEO)
    (tmp_path / "www" / "small.txt").write_bytes(b"s" * 200_000)
    authority = f"site-a.test:{h2_site.port}"
    policy = policy_with(network={**LOOPBACK, "response_timeout": "20s"})
    with contextlib.ExitStack() as stack:
        _through(stack, workdir, via, policy)
        gw = stack.enter_context(Gateway(workdir, policy, trusted_ca=test_ca.ca_cert))
        scraper = stack.enter_context(_scraper(gw, authority))
        first = scraper.get("/small.txt")  # (the connection to the site is made)
        scraper.read(5, until_ended={first})
        paused = [scraper.get(f"/video{n}.bin", paused=True) for n in range(videos)]
        scraper.read(1)
        images = [scraper.get("/small.txt") for _ in range(3)]
        scraper.read(10, until_ended=set(images))
        assert set(images) <= scraper.ended, (scraper.got, scraper.ended)
        assert all(scraper.got[image] == 200_000 for image in images), scraper.got
        assert not set(paused) & scraper.ended, "a video was ended while paused"
        watched, *left = paused  # (the others left: this test client reads ~2 MB/s)
        for video in left:
            scraper.reset(video)
        scraper.resume(watched)
        scraper.read(60, until_ended={watched})
        records = {
            r["url"].rsplit("/", 1)[1]: (r["reason"], r["response_bytes"], r.get("upstream_proxy"))
            for r in gw.fetch_records()
            if r["url"].endswith(".bin")
        }
    assert watched not in scraper.resets and scraper.got[watched] == VIDEO, scraper.got
    assert records.pop("video0.bin") == ("ok", VIDEO, via), records
    assert sorted(records) == [f"video{n}.bin" for n in range(1, videos)], records
    assert all(reason == "interrupted" for reason, _, _ in records.values()), records
    assert h2_site.connections("/small.txt", *(f"/video{n}.bin" for n in range(videos))) == 1


@contextlib.contextmanager
def _a_video_site(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA, response_timeout: str
) -> Iterator[tuple[Gateway, _H2Reader]]:
    """A gateway (`network.response_timeout`) and an HTTP/2 scraper in a tunnel to the site,
    which serves a video the gateway streams at /video.bin."""
    (tmp_path / "www" / "video.bin").write_bytes(b"v" * VIDEO)
    policy = policy_with(network={**LOOPBACK, "response_timeout": response_timeout})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _scraper(gw, f"site-a.test:{h2_site.port}") as scraper:
            yield gw, scraper


def test_many_paused_streams_hold_no_more_than_the_gateways_bound(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA
):
    # A scraper opens 40 downloads on one HTTP/2 connection and reads none of them. Each
    # stream's site stops a window ahead (~1.5 MiB waiting in the gateway), and past 16 MiB of
    # such answers (addons/read_backpressure.py, MAX_HELD_AT_SITE) the site's connection is not
    # read: the gateway does not hold 40 x 1.5 MiB. The scraper then gives up on them, and the
    # connection still serves a page.
    with _a_video_site(workdir, tmp_path, h2_site, test_ca, "30s") as (gw, scraper):
        assert gw.proc is not None
        first = scraper.get("/img/plain.jpg")
        scraper.read(5, until_ended={first})
        before = _kib(gw.proc.pid, "VmRSS")
        videos = [scraper.get("/video.bin", paused=True) for _ in range(40)]
        scraper.read(4)
        held = _kib(gw.proc.pid, "VmRSS") - before
        for video in videos:
            scraper.reset(video)
        page = scraper.get("/img/plain.jpg")
        scraper.read(10, until_ended={page})
    print("the gateway's RSS grew by", held, "KiB with 40 paused downloads")
    assert held < 40 * 1024, held
    assert page in scraper.ended and scraper.got[page] == len(PLAIN), scraper.got


def test_a_stream_its_scraper_reads_slowly_is_held_back_not_ended(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA
):
    # A scraper reads a download slowly (64 KiB every half second) on an HTTP/2 connection to
    # the site: its stream's window is held back at the site most of the time, but it makes
    # room now and then, so it is no stalled reader and is not ended at the response timeout
    # (2 s); once it reads at speed, the download comes whole.
    with _a_video_site(workdir, tmp_path, h2_site, test_ca, "2s") as (gw, scraper):
        video = scraper.get("/video.bin", paused=True)
        scraper.read(1)
        for _ in range(12):
            scraper.give(video, 64 * 2**10)
            scraper.read(0.5)
            assert video not in scraper.ended, f"ended after {scraper.got[video]} bytes"
        slowly = scraper.got[video]
        scraper.resume(video)
        scraper.read(30, until_ended={video})
        records = [
            (r["reason"], r["response_bytes"])
            for r in gw.fetch_records()
            if r["url"].endswith("/video.bin")
        ]
    assert slowly >= 65_535 + 12 * 64 * 2**10, slowly
    assert scraper.got[video] == VIDEO and video not in scraper.resets, scraper.got
    assert records == [("ok", VIDEO)], records


@pytest.mark.parametrize("via", [None, "egress-proxy"])
def test_a_stream_that_times_out_is_reset_alone_on_a_site_connection_others_share(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA, via: str | None
):
    # Two downloads from one site on one HTTP/2 connection to it: a long one that the site
    # sends at 2 KB/s, and a short one asked for later. At the long one's transfer timeout
    # (4 s) the gateway closed the connection: the short one, nearly done, was cut off with it
    # and recorded as the site's failure. Now only the long one's stream is reset, also when
    # the connection goes through an upstream proxy's tunnel (egress.upstream_proxies: the
    # site's HTTP/2 layer is then under the tunnel's layers).
    (tmp_path / "www" / "trickle").mkdir()
    (tmp_path / "www" / "trickle" / "long.bin").write_bytes(b"l" * 40_000)
    (tmp_path / "www" / "trickle" / "short.bin").write_bytes(b"s" * 4_000)
    authority = f"site-a.test:{h2_site.port}"
    policy = policy_with(network={**LOOPBACK, "transfer_timeout": "4s"})
    with contextlib.ExitStack() as stack:
        egress = _through(stack, workdir, via, policy)
        gw = stack.enter_context(Gateway(workdir, policy, trusted_ca=test_ca.ca_cert))
        with _scraper(gw, authority) as scraper:
            long = scraper.get("/trickle/long.bin")
            scraper.read(2.5)
            short = scraper.get("/trickle/short.bin")
            scraper.read(15, until_ended={long, short})
        records = {
            r["url"].rsplit("/", 1)[1]: (r["reason"], r["rule"], r.get("upstream_proxy"))
            for r in gw.fetch_records()
            if "/trickle/" in r["url"]
        }
        errors = gw.metric("crawlwarden_upstream_errors_total", kind="timeout")
        if egress is not None:
            assert f"server connect 127.0.0.1:{h2_site.port}" in egress.flows()
    assert records == {
        "long.bin": ("upstream_timeout", "network.transfer_timeout", via),
        "short.bin": ("ok", None, via),
    }, records
    assert errors == 1
    # (held whole until it ends, as every answer under 16 MiB: the scraper gets the gateway's)
    assert scraper.heads[long][":status"] == "504", scraper.heads[long]
    assert scraper.heads[long]["x-crawlwarden-reason"] == "upstream_timeout"
    assert scraper.heads[short][":status"] == "200" and scraper.got[short] == 4_000
    assert {long, short} <= scraper.ended and not scraper.resets
    assert h2_site.connections("/trickle/long.bin", "/trickle/short.bin") == 1


def test_a_withheld_stream_is_reset_alone_on_a_site_connection_others_share(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA
):
    # A 20 MiB image, streamed, whose opt-out is in its first bytes, while a slow download
    # shares the HTTP/2 connection to the site. The gateway stops a withheld download by
    # closing its connection to the site, which it would not do with another request on it:
    # the site sent all 20 MiB for nothing, charged to its bytes_per_day. Now the image's
    # stream alone is reset, and the other download goes on.
    (tmp_path / "www" / "trickle").mkdir()
    (tmp_path / "www" / "trickle" / "short.bin").write_bytes(b"s" * 6_000)
    authority = f"site-a.test:{h2_site.port}"
    respect = {"robots": True, "tdmrep": True, "noai": True, "image_metadata": True}
    policy = policy_with(defaults={"respect": respect}, network=LOOPBACK)
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _scraper(gw, authority) as scraper:
            short = scraper.get("/trickle/short.bin")
            scraper.read(0.5)
            image = scraper.get("/img/large-opted-out.jpg")
            scraper.read(15, until_ended={short, image})
        records = {
            r["url"].rsplit("/", 1)[1]: r
            for r in gw.fetch_records()
            if r["url"].endswith(("short.bin", ".jpg"))
        }
    rec = records["large-opted-out.jpg"]
    assert (rec["decision"], rec["reason"]) == ("withheld", "image_optout"), rec
    assert "downloaded no more of it" in rec["note"], rec["note"]
    assert 0 < rec["response_bytes"] < len(LARGE_OPTED_OUT) // 2, rec["response_bytes"]
    assert image in scraper.resets and scraper.got[image] == 0
    assert records["short.bin"]["reason"] == "ok"
    assert scraper.heads[short][":status"] == "200" and scraper.got[short] == 6_000
    assert h2_site.connections("/trickle/short.bin", "/img/large-opted-out.jpg") == 1


def test_a_stream_the_site_leaves_silent_times_out_while_it_sends_others(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA
):
    # The site sends one download at 2 KB/s and leaves another request unanswered, both on
    # one HTTP/2 connection to it. The silence was the connection's: the unanswered request
    # waited for the transfer timeout (30 s here). Now it is the stream's: 504 at the response
    # timeout (2 s), that stream reset alone, and the download goes on.
    (tmp_path / "www" / "trickle").mkdir()
    (tmp_path / "www" / "trickle" / "long.bin").write_bytes(b"l" * 16_000)
    authority = f"site-a.test:{h2_site.port}"
    policy = policy_with(network={**LOOPBACK, "response_timeout": "2s", "transfer_timeout": "30s"})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _scraper(gw, authority) as scraper:
            long = scraper.get("/trickle/long.bin")
            scraper.read(0.5)
            started = time.monotonic()
            silent = scraper.get("/hang/nothing")
            scraper.read(8, until_ended={silent})
            waited = time.monotonic() - started
            scraper.read(15, until_ended={long})
        records = {
            r["url"].rsplit("/", 1)[1]: (r["reason"], r["rule"])
            for r in gw.fetch_records()
            if "/trickle/" in r["url"] or "/hang/" in r["url"]
        }
    assert silent in scraper.ended and 1.9 <= waited <= 5, waited
    assert scraper.heads[silent][":status"] == "504", scraper.heads.get(silent)
    assert records == {
        "nothing": ("upstream_timeout", "network.response_timeout"),
        "long.bin": ("ok", None),
    }, records
    assert scraper.heads[long][":status"] == "200" and scraper.got[long] == 16_000
    assert h2_site.connections("/trickle/long.bin", "/hang/nothing") == 1


def test_a_request_waiting_for_a_stream_of_the_sites_connection_is_not_timed_out(
    workdir: Path, tmp_path: Path, h2_site: H2Site, test_ca: LocalCA
):
    # The site takes two streams at once on a connection; a scraper asks for three downloads
    # of 3 s each (2 KB/s). mitmproxy holds the third in its queue until a stream is free, 3 s
    # later. That wait was counted: as the stream's silence (2 s here: ended, never sent), or
    # in its transfer time (5 s: 3 s waiting and 3 s of its own). Now neither counts the wait.
    (tmp_path / "www" / "trickle").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "www" / "trickle" / f"{name}.bin").write_bytes(b"x" * 6_000)
    authority = f"site-a.test:{h2_site.few_port}"
    policy = policy_with(network={**LOOPBACK, "response_timeout": "2s", "transfer_timeout": "5s"})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _scraper(gw, authority) as scraper:
            a = scraper.get("/trickle/a.bin")
            scraper.read(0.5)  # (the site's SETTINGS, its two streams at once, have come)
            b = scraper.get("/trickle/b.bin")
            c = scraper.get("/trickle/c.bin")
            scraper.read(20, until_ended={a, b, c})
        records = {
            r["url"].rsplit("/", 1)[1]: r["reason"]
            for r in gw.fetch_records()
            if "/trickle/" in r["url"]
        }
    assert records == {"a.bin": "ok", "b.bin": "ok", "c.bin": "ok"}, records
    assert [scraper.heads[s][":status"] for s in (a, b, c)] == ["200"] * 3, scraper.heads
    assert [scraper.got[s] for s in (a, b, c)] == [6_000] * 3


class _SlowReadingH2Site(RawSite):
    """An HTTP/2 site of the test's own (nginx takes a whole upload at once): `/long` sends
    20 000 bytes, 1 000 every 0.3 s; an upload's body it takes at about 160 KB/s (its
    stream's window given back 32 KiB every 0.2 s), then answers 200 "read"."""

    def __init__(self, tls: ssl.SSLContext):
        tls.set_alpn_protocols(["h2"])
        self.tls = tls
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            conn = self.tls.wrap_socket(conn, server_side=True)
        except OSError:
            return
        config = h2.config.H2Configuration(client_side=False)
        h2c = h2.connection.H2Connection(config)
        h2c.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384}
        )
        h2c.initiate_connection()
        long: dict[int, int] = {}  # stream -> bytes sent of /long
        unacked: dict[int, int] = {}  # upload stream -> bytes not yet given back
        deadline = time.monotonic() + 30
        last_tick = 0.0
        with conn:
            conn.settimeout(0.05)
            while time.monotonic() < deadline:
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    events = h2c.receive_data(data)
                except TimeoutError:
                    events = []
                except (OSError, h2.exceptions.ProtocolError):
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        path = dict(event.headers).get(b":path", b"")
                        if path == b"/long":
                            h2c.send_headers(
                                event.stream_id, [(":status", "200"), ("content-length", "20000")]
                            )
                            long[event.stream_id] = 0
                    elif isinstance(event, h2.events.DataReceived):
                        unacked[event.stream_id] = (
                            unacked.get(event.stream_id, 0) + event.flow_controlled_length
                        )
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in unacked:
                        h2c.send_headers(
                            event.stream_id, [(":status", "200"), ("content-length", "4")]
                        )
                        h2c.send_data(event.stream_id, b"read", end_stream=True)
                now = time.monotonic()
                if now - last_tick >= 0.2:
                    last_tick = now
                    for stream, left in list(unacked.items()):
                        if left:
                            given = min(left, 32768)
                            h2c.acknowledge_received_data(given, stream)
                            unacked[stream] = left - given
                    for stream, sent in list(long.items()):
                        if sent < 20_000 and h2c.local_flow_control_window(stream) >= 1000:
                            h2c.send_data(stream, b"l" * 1000, end_stream=sent + 1000 == 20_000)
                            long[stream] = sent + 1000
                try:
                    conn.sendall(h2c.data_to_send())
                except OSError:
                    return


def test_a_request_still_being_sent_to_the_site_is_not_its_silence(workdir: Path, test_ca: LocalCA):
    # An upload of 600 KB that the site takes at about 160 KB/s (4 s), on an HTTP/2 connection
    # to it that a slow download shares. A request's silence there is its own: it must not
    # count while the request is still going out (2 s here), only from when it is all sent.
    site = _SlowReadingH2Site(test_ca.server_context_for("site-c.test"))
    authority = f"site-c.test:{site.port}"
    policy = policy_with(network={**LOOPBACK, "response_timeout": "2s"})
    try:
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            with tls_tunnel(gw, authority, alpn="h2", timeout=30) as tls:
                client = H2Client(tls)
                project = ("x-crawl-project", PROJECT)
                client._start("GET", authority, "/long", (project,), "https", end_stream=True)
                time.sleep(0.5)
                started = time.monotonic()
                answer, sent = client.post_without_length(
                    authority, "/upload", b"u" * 600_000, project
                )
                took = time.monotonic() - started
            records = {r["url"].rsplit("/", 1)[1]: r["reason"] for r in gw.fetch_records()}
    finally:
        site.close()
    assert sent == 600_000
    assert (answer.end, answer.headers.get(":status"), answer.body) == ("ended", "200", b"read"), (
        answer.body,
        took,
    )
    assert took > 3, took  # (the site did take it slowly)
    assert records["upload"] == "ok", records
