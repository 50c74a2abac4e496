"""What the read backpressure (addons/read_backpressure.py) must leave alone, and what else
bounds what a peer can make the gateway hold: a request held for its budget with its body coming
stalls nothing else and is let go at once when its client leaves; a WebSocket flooded by its site
still takes the client's messages and close; pipelined junk, a site talking on after its answer,
a slow reader of a large body and a client's compressed frame stay bounded; an HTTP/2 scraper
that stops reading one download is not held for (directly and through an upstream proxy), and
cancels it. Real gateway processes, raw clients and sites (the first version of the
backpressure, which also counted HTTP streams, failed the first four)."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from addons.read_backpressure import MAX_UNREAD_ANSWERS
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import LocalCA
from tests.support import RawSite
from tests.support import Reply
from tests.support import Site
from tests.support import basic
from tests.support import policy_with
from tests.support import tls_tunnel
from tests.support import wait_for
from tests.ws_support import BINARY
from tests.ws_support import CLOSE
from tests.ws_support import TEXT
from tests.ws_support import RawWsSite
from tests.ws_support import client_close
from tests.ws_support import frame
from tests.ws_support import raw_client
from tests.ws_support import read_frame

MiB = 2**20


def _kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(field)


def _held_policy(
    host: str = "site-c.test", rate: str = "6/min", max_body: str | None = None
) -> dict[str, Any]:
    """After one request, the next to `host` is held ~10 s for its budget (on_exceed: delay)."""
    network = {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
    if max_body:
        network["max_request_body_bytes"] = max_body
    return policy_with(
        network=network,
        sites=[
            {
                "id": "held",
                "match": [host],
                "rate": rate,
                "burst": 1,
                "on_exceed": "delay",
                "max_delay": "60s",
            }
        ],
    )


def _http1(gw: Gateway, site: Site, path: str, extra: str = "", body: bytes = b"") -> bytes:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    with s:
        s.sendall(
            (
                f"POST http://site-c.test:{site.port}{path} HTTP/1.1\r\n"
                f"Host: site-c.test:{site.port}\r\nProxy-Authorization: {basic(TEAM, TEAM_TOKEN)}"
                f"\r\nX-Crawl-Project: {PROJECT}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n{extra}\r\n"
            ).encode()
            + body
        )
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _slow_get(gw: Gateway, site: Site, path: str, *, close: bool = False) -> socket.socket:
    """A GET of site-c.test's `path` through the gateway on a socket with a small receive
    buffer (an HTTP/1 scraper that reads as slowly as the test does)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    last = "Connection: close\r\n" if close else ""
    s.sendall(
        (
            f"GET http://site-c.test:{site.port}{path} HTTP/1.1\r\n"
            f"Host: site-c.test:{site.port}\r\n"
            f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n"
            f"X-Crawl-Project: {PROJECT}\r\n{last}\r\n"
        ).encode()
    )
    return s


def _upload_then_give_up(gw: Gateway, site: Site) -> int:
    """POST /upload of 8 MiB (held for its turn), as much of it as the gateway takes within
    3 s, then a reset (the scraper gives up): how much was sent."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    body = b"u" * (8 * MiB)
    s.sendall(
        (
            f"POST http://site-c.test:{site.port}/upload HTTP/1.1\r\n"
            f"Host: site-c.test:{site.port}\r\nProxy-Authorization: {basic(TEAM, TEAM_TOKEN)}"
            f"\r\nX-Crawl-Project: {PROJECT}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
    )
    s.settimeout(3)
    sent = 0
    try:
        while sent < len(body):
            sent += s.send(body[sent : sent + 65536])
    except TimeoutError:
        pass  # the gateway stopped reading
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset: nothing left to send
    return sent


def _a_get_then_held_posts(
    conn: h2.connection.H2Connection,
    tls: ssl.SSLSocket,
    authority: str,
    get: str,
    posts: str,
    size: int,
) -> tuple[int, dict[int, int]]:
    """On a new HTTP/2 connection: a GET of `get` (it takes the site's one token), then eight
    POSTs `posts`0..7 declaring `size` bytes each (held for their turns), their bodies still to
    send: the GET's stream, and each POST's stream -> bytes of it sent (0)."""
    conn.initiate_connection()
    project = ("x-crawl-project", PROJECT)
    pseudo = [(":scheme", "https"), (":authority", authority)]
    first = conn.get_next_available_stream_id()
    conn.send_headers(
        first, [(":method", "GET"), *pseudo, (":path", get), project], end_stream=True
    )
    tls.sendall(conn.data_to_send())
    time.sleep(0.3)
    ups = {}
    for i in range(8):
        sid = conn.get_next_available_stream_id()
        length = ("content-length", str(size))
        conn.send_headers(
            sid, [(":method", "POST"), *pseudo, (":path", f"{posts}{i}"), project, length]
        )
        ups[sid] = 0
    tls.sendall(conn.data_to_send())
    return first, ups


# -- nothing waits for a held request ------------------------------------------------------------


def test_an_http2_download_does_not_wait_for_another_stream_held_with_its_upload(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # A browser (HTTP/2 to the gateway) downloads /big (admitted) while it posts eight forms
    # of ~1 MB each (under the default 1 MiB body limit) that the site's budget holds
    # (on_exceed: delay, 12/min: turns 5 s apart). mitmproxy acknowledges every DATA frame at
    # once, so the held streams' bodies pile up in their paused layers; a backpressure that
    # counted them stopped reading the whole connection past 4 MiB (the client's
    # WINDOW_UPDATEs too): /big waited ~20 s for the uploads' turns.
    authority = f"site-c.test:{tls_site.port}"
    big = b"b" * (16 * MiB)
    tls_site.routes["/big"] = Reply(body=big, delay=1.0)
    upload = 1_000_000
    with Gateway(workdir, _held_policy(rate="12/min"), trusted_ca=test_ca.ca_cert) as gw:
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            big_id, ups = _a_get_then_held_posts(conn, tls, authority, "/big", "/upload/", upload)
            started = time.monotonic()
            got, big_done, up_events = 0, None, []
            tls.setblocking(False)
            while big_done is None and time.monotonic() - started < 25:
                for up_id, sent in ups.items():
                    if sent >= upload or any(e.stream_id == up_id for e in up_events):
                        continue
                    window = min(
                        conn.local_flow_control_window(up_id), conn.max_outbound_frame_size
                    )
                    if window > 0:
                        n = min(window, upload - sent)
                        conn.send_data(up_id, b"u" * n, end_stream=sent + n == upload)
                        ups[up_id] = sent + n
                data = conn.data_to_send()
                while data and time.monotonic() - started < 25:
                    try:
                        k = tls.send(data)
                        data = data[k:]
                    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        select.select([], [tls], [], 0.05)
                ready = tls.pending() or select.select([tls], [], [], 0.02)[0]
                if not ready:
                    continue
                try:
                    raw = tls.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                if not raw:
                    break
                for event in conn.receive_data(raw):
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                        if event.stream_id == big_id:
                            got += len(event.data)
                    elif getattr(event, "stream_id", None) in ups and not isinstance(
                        event, h2.events.WindowUpdated
                    ):
                        up_events.append(event)
                    if isinstance(event, h2.events.StreamEnded) and event.stream_id == big_id:
                        big_done = time.monotonic() - started
            tls.setblocking(True)
    sent = sum(ups.values())
    print("uploads sent", sent, "big got", got, "big done after", big_done, up_events[:3])
    assert got == len(big), (got, sent)
    # the site answers after 1 s, 16 MiB on loopback take well under a second more
    assert big_done is not None and big_done < 5, (big_done, sent)


def test_a_client_gone_while_its_upload_is_held_is_let_go_at_once(
    workdir: Path, site: Site, test_ca: LocalCA
):
    # README: a request held for its budget is let go at once when its client goes away,
    # having taken nothing (recorded refused `interrupted`), and never reaches the site. With an
    # upload of 8 MiB (network.max_request_body_bytes: 16MiB) behind the held request, a
    # backpressure that counted it stopped reading the client's connection past 4 MiB: the
    # client's leaving was seen only when the request's turn came (~10 s).
    policy = _held_policy(max_body="16MiB")
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        assert b" 200 " in _http1(gw, site, "/first").split(b"\r\n")[0]
        sent = _upload_then_give_up(gw, site)
        gone = time.monotonic()
        wait_for(
            lambda: any(r["url"].endswith("/upload") for r in gw.fetch_records(timeout=1)),
            timeout=15,
        )
        seen_after = time.monotonic() - gone
        time.sleep(2)
        records = [r for r in gw.fetch_records() if r["url"].endswith("/upload")]
    print("sent before giving up", sent, "recorded after", seen_after)
    print([(r["decision"], r["reason"], r.get("note")) for r in records])
    assert site.count("/upload") == 0, "a request from a client that had gone reached the site"
    assert [(r["decision"], r["reason"]) for r in records] == [("refused", "interrupted")]
    # let go (and recorded) at once, not when its turn came ~10 s later
    assert seen_after < 4, seen_after


def test_a_websocket_flooded_by_its_site_still_takes_the_clients_messages_and_close(
    workdir: Path, test_ca: LocalCA
):
    # The site sends 100 MiB of small messages at once; the client sends three messages of
    # its own and closes while reading. The close must get through and the conversation be
    # recorded, with the client's messages counted.
    count, size = 10_000, 10 * 1024
    got_client: list[bytes] = []

    def script(sock: socket.socket, head: bytes) -> None:
        sock.settimeout(60)
        reader_done = threading.Event()

        def read() -> None:
            try:
                while True:
                    _, op, _, payload = read_frame(sock)
                    if op == CLOSE:
                        sock.sendall(frame(CLOSE, struct.pack("!H", 1000)))
                        return
                    got_client.append(payload)
            except OSError:
                return
            finally:
                reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        batch = frame(BINARY, b"f" * size) * 100
        try:
            for _ in range(count // 100):
                if reader_done.is_set():
                    break
                sock.sendall(batch)
        except OSError:
            return
        reader_done.wait(30)

    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        pid = gw.proc.pid
        with RawWsSite(script) as site:
            sock, head = raw_client(gw.port, site.url(), timeout=30)
            assert head.startswith(b"HTTP/1.1 101"), head
            n = 0
            for i in range(3):
                sock.sendall(frame(TEXT, f"client-{i}".encode(), mask=True))
            # read a while, then close and read on to the close
            closed_at = None
            close_frame = None
            start = time.monotonic()
            while time.monotonic() - start < 40:
                _, op, _, _payload = read_frame(sock)
                n += 1
                if n == 2000:
                    client_close(sock)
                    closed_at = time.monotonic()
                if op == CLOSE:
                    close_frame = time.monotonic()
                    break
            sock.close()
            wait_for(
                lambda: any(r.get("kind") == "websocket" for r in gw.fetch_records(timeout=1)),
                timeout=10,
            )
            recs = [r for r in gw.fetch_records() if r.get("kind") == "websocket"]
        print(
            "frames read",
            n,
            "close answered after",
            close_frame and closed_at and close_frame - closed_at,
            "hwm",
            _kib(pid),
        )
    assert close_frame is not None
    assert got_client[:3] == [b"client-0", b"client-1", b"client-2"]
    assert len(recs) == 1, recs
    assert ", 3 from the client;" in recs[0]["note"], recs[0]["note"]


# -- what a peer can make the gateway hold ---------------------------------------------------


def test_pipelined_junk_behind_a_held_request_is_not_held_without_bound(
    workdir: Path, site: Site, test_ca: LocalCA
):
    # A request held ~10 s for its budget, then 96 MiB of pipelined requests behind it on the
    # same connection: they wait in mitmproxy's HTTP/1 parser, not in a paused layer's queue,
    # and HttpGuard closes the connection past network.max_request_header_bytes.
    with Gateway(workdir, _held_policy(), trusted_ca=test_ca.ca_cert) as gw:
        pid = gw.proc.pid
        assert b" 200 " in _http1(gw, site, "/first").split(b"\r\n")[0]
        before = _kib(pid)
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        head = (
            f"GET http://site-c.test:{site.port}/held HTTP/1.1\r\n"
            f"Host: site-c.test:{site.port}\r\nProxy-Authorization: {basic(TEAM, TEAM_TOKEN)}"
            f"\r\nX-Crawl-Project: {PROJECT}\r\n\r\n"
        ).encode()
        s.sendall(head)
        time.sleep(0.3)
        one = head.replace(b"/held", b"/p")
        chunk = one * (MiB // len(one))
        sent = 0
        s.settimeout(5)
        try:
            while sent < 96 * MiB:
                s.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            pass
        except ConnectionResetError:
            print("reset by the gateway after", sent / MiB, "MiB")
        time.sleep(1)
        peak = _kib(pid)
        s.close()
        print([e.get("event") for e in gw.log_events()][-8:])
    print("pipelined MiB sent", sent / MiB, "VmHWM before/after KiB", before, peak)
    assert peak - before < 64 * 1024, (before, peak, sent)


class _AfterResponse(RawSite):
    """A site that answers, then sends `extra` bytes more on the connection."""

    extra = 96 * MiB

    def serve(self, conn: socket.socket) -> None:
        try:
            self.read_head(conn)
            body = b"ok"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n" + body
            )
            junk = b"J" * MiB
            conn.settimeout(10)
            self.sent = 0
            for _ in range(self.extra // MiB):
                conn.sendall(junk)
                self.sent += len(junk)
            time.sleep(3)
        except OSError:
            return


def test_a_site_that_sends_on_after_its_answer_is_not_held_without_bound(
    workdir: Path, test_ca: LocalCA
):
    site = _AfterResponse()
    site.sent = 0
    try:
        with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
            pid = gw.proc.pid
            before = _kib(pid)
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=20)
            s.sendall(
                (
                    f"GET http://site-c.test:{site.port}/x HTTP/1.1\r\n"
                    f"Host: site-c.test:{site.port}\r\n"
                    f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n"
                    f"X-Crawl-Project: {PROJECT}\r\n\r\n"
                ).encode()
            )
            answer = s.recv(65536)
            time.sleep(6)
            peak = _kib(pid)
            s.close()
    finally:
        site.close()
    print("answer", answer[:40], "site sent after", site.sent / MiB, "MiB; VmHWM", before, peak)
    assert answer.startswith(b"HTTP/1.1 200")
    assert peak - before < 64 * 1024, (before, peak, site.sent)


def test_a_held_upload_whose_client_left_does_not_make_the_next_request_wait_its_turn(
    workdir: Path, site: Site, test_ca: LocalCA
):
    # README/_admit_held: a dead request must neither take the budget nor make live ones wait
    # behind it. A held 8 MiB upload (max_request_body_bytes: 16MiB) whose client resets: with
    # its connection not read past 4 MiB, it was not seen gone and kept its turn, 10 s after
    # /first, and the next scraper's request waited for the turn after (20 s).
    policy = _held_policy(max_body="16MiB")
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        assert b" 200 " in _http1(gw, site, "/first").split(b"\r\n")[0]
        first_at = time.monotonic()
        _upload_then_give_up(gw, site)
        time.sleep(0.5)
        answer = _http1(gw, site, "/live")
        live_after = time.monotonic() - first_at
    print("live answered", live_after, "s after /first:", answer.split(b"\r\n")[0])
    assert b" 200 " in answer.split(b"\r\n")[0]
    assert live_after < 14, live_after  # its own turn (10 s after /first), not the one after


def test_http2_uploads_cancelled_while_held_are_let_go_and_never_sent(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # README: a stream the browser resets while it is held is let go at once, having taken
    # nothing (recorded refused `interrupted`). Eight held form posts of ~1 MB each, then all
    # reset: with the connection not read past 4 MiB queued, none was recorded within 6 s.
    authority = f"site-c.test:{tls_site.port}"
    upload = 1_000_000
    with Gateway(workdir, _held_policy(rate="12/min"), trusted_ca=test_ca.ca_cert) as gw:
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            _, ups = _a_get_then_held_posts(conn, tls, authority, "/first", "/left/", upload)
            tls.settimeout(0.05)
            start = time.monotonic()
            while sum(ups.values()) < 8 * upload and time.monotonic() - start < 4:
                for sid, sent in ups.items():
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    n = min(window, upload - sent)
                    if n > 0:
                        conn.send_data(sid, b"u" * n)
                        ups[sid] = sent + n
                tls.sendall(conn.data_to_send())
                try:
                    raw = tls.recv(65536)
                    if raw:
                        conn.receive_data(raw)
                except (TimeoutError, ssl.SSLWantReadError):
                    pass
            for sid in ups:
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            tls.settimeout(10)
            tls.sendall(conn.data_to_send())
            reset_at = time.monotonic()
            ok = wait_for(
                lambda: len([r for r in gw.fetch_records(timeout=1) if "/left/" in r["url"]]) == 8,
                timeout=6,
            )
            took = time.monotonic() - reset_at
            records = [r for r in gw.fetch_records() if "/left/" in r["url"]]
    print("sent", sum(ups.values()), "all 8 recorded within 6 s:", ok, round(took, 1))
    print(sorted((r["decision"], r["reason"]) for r in records))
    assert ok, [(r["url"], r["decision"], r["reason"]) for r in records]


def test_a_large_streamed_body_reaches_a_slow_reader_whole(workdir: Path, test_ca: LocalCA):
    # 48 MiB (Content-Length) to a scraper reading ~12 MiB/s: whole, recorded, memory bounded.
    size = 48 * MiB
    with Site() as site:
        site.routes["/big"] = Reply(body=b"L" * size)
        with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
            pid = gw.proc.pid
            before = _kib(pid)
            s = _slow_get(gw, site, "/big", close=True)
            got = 0
            start = time.monotonic()
            while time.monotonic() - start < 40:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
                time.sleep(0.005)
            took = time.monotonic() - start
            s.close()
            peak = _kib(pid)
            records = [r for r in gw.fetch_records() if r["url"].endswith("/big")]
    print(
        "got", got, "in", round(took, 1), "s; VmHWM", before, peak, [r["reason"] for r in records]
    )
    assert got > size
    assert records and records[0]["response_bytes"] == size, records
    assert peak - before < 96 * 1024, (before, peak)


def test_a_clients_compressed_frame_is_not_inflated_past_the_limit(workdir: Path, test_ca: LocalCA):
    # The client-to-site direction of test_one_compressed_frame_is_not_inflated_past_the_limit:
    # ~1 MB on the wire from the scraper that inflates to 1 GiB of zeros.
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 24)
    wire = b"".join(c.compress(zeros) for _ in range(64)) + c.flush(zlib.Z_SYNC_FLUSH)
    wire = wire[:-4]
    site_got: list[int] = []

    def script(sock: socket.socket, head: bytes) -> None:
        try:
            _, op, _, _payload = read_frame(sock)
            site_got.append(op)
        except OSError:
            return

    ext = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        pid = gw.proc.pid
        before = _kib(pid)
        with RawWsSite(script, extensions=ext) as site:
            sock, head = raw_client(
                gw.port, site.url(), extensions="permessage-deflate", timeout=30
            )
            assert head.startswith(b"HTTP/1.1 101"), head
            sock.sendall(frame(BINARY, wire, rsv1=True, mask=True))
            _, op, _, payload = read_frame(sock)
            sock.close()
            time.sleep(0.5)
        peak = _kib(pid)
    print("client got", op, payload[:20], "site got", site_got, "VmHWM", before, peak, len(wire))
    assert op == CLOSE and payload[:2] == struct.pack("!H", 1009)
    assert peak - before < 128 * 1024, (before, peak)  # +64 MiB; +193 unbounded


# -- an HTTP/2 scraper that stops reading one download ------------------------------------------


class _H2Reader:
    """An HTTP/2 scraper in a CONNECT tunnel that reads some streams and not others: the
    connection's window given back for all it gets, a stream's own only if not `paused`."""

    def __init__(self, tls: ssl.SSLSocket, authority: str):
        self.tls = tls
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.head = [(":scheme", "https"), (":authority", authority)]
        self.head.append(("x-crawl-project", PROJECT))
        self.got: dict[int, int] = {}
        self.paused: set[int] = set()
        self.ended: set[int] = set()
        self.resets: set[int] = set()  # (ended by the gateway's RST_STREAM)
        self.heads: dict[int, dict[str, str]] = {}

    def get(self, path: str, *, paused: bool = False) -> int:
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, [(":method", "GET"), (":path", path), *self.head], True)
        self.tls.sendall(self.conn.data_to_send())
        self.got[stream] = 0
        if paused:
            self.paused.add(stream)
        return stream

    def resume(self, stream: int) -> None:
        """Read the stream again: its window back, and given from now on."""
        self.paused.discard(stream)
        self.conn.increment_flow_control_window(self.got[stream], stream)
        self.tls.sendall(self.conn.data_to_send())

    def give(self, stream: int, size: int) -> None:
        """Make room for `size` more bytes of a paused stream (a slow reader)."""
        self.conn.increment_flow_control_window(size, stream)
        self.tls.sendall(self.conn.data_to_send())

    def reset(self, stream: int) -> None:
        self.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        self.tls.sendall(self.conn.data_to_send())

    def read(self, seconds: float, *, until_ended: set[int] | None = None) -> None:
        """Read what comes for `seconds`, or until the streams `until_ended` have ended."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until_ended is not None and until_ended <= self.ended:
                return
            self.tls.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                raw = self.tls.recv(65536)
            except TimeoutError:
                return
            if not raw:
                return
            for event in self.conn.receive_data(raw):
                if isinstance(event, h2.events.DataReceived):
                    sid, length = event.stream_id, event.flow_controlled_length
                    self.got[sid] = self.got.get(sid, 0) + len(event.data)
                    if length and sid in self.paused:
                        self.conn.increment_flow_control_window(length)
                    elif length:
                        self.conn.acknowledge_received_data(length, sid)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ended.add(event.stream_id)
                    if isinstance(event, h2.events.StreamReset):
                        self.resets.add(event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived):
                    fields = {k.decode(): v.decode() for k, v in event.headers}
                    self.heads[event.stream_id] = fields
            self.tls.sendall(self.conn.data_to_send())


@contextlib.contextmanager
def _a_paused_video(
    workdir: Path, tls_site: Site, test_ca: LocalCA, policy: dict[str, Any]
) -> Iterator[tuple[Gateway, _H2Reader, int]]:
    """A gateway, and a scraper speaking HTTP/2 to it that has loaded a page of 300 000 bytes
    (/page, what any stream needs is in memory since), then asked for a 96 MiB video (/video)
    and gives its stream no window after the first (a browser pausing it): the gateway, the
    scraper and the video's stream."""
    tls_site.routes["/video"] = Reply(body=b"v" * (96 * MiB), headers={"Content-Type": "video/mp4"})
    tls_site.routes["/page"] = Reply(body=b"p" * 300_000)
    authority = f"site-a.test:{tls_site.port}"
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            scraper = _H2Reader(tls, authority)
            first = scraper.get("/page")
            scraper.read(5, until_ended={first})
            yield gw, scraper, scraper.get("/video", paused=True)


def _serves_on(scraper: _H2Reader) -> None:
    """The scraper's connection still serves a page."""
    page = scraper.get("/page")
    scraper.read(10, until_ended={page})
    assert page in scraper.ended and scraper.got[page] == 300_000, scraper.got


def _pause_a_video(
    workdir: Path, tls_site: Site, test_ca: LocalCA, policy: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """A scraper (HTTP/2 to the gateway) pauses a 96 MiB download for 5 s, loads a page
    meanwhile, then reads the download to its end: how much the gateway's memory grew while
    the download was paused (KiB), and the download's records."""
    with _a_paused_video(workdir, tls_site, test_ca, policy) as (gw, scraper, video):
        before = _kib(gw.proc.pid, "VmRSS")
        scraper.read(5)  # its first window, no more
        _serves_on(scraper)
        held = _kib(gw.proc.pid, "VmRSS") - before
        scraper.resume(video)
        scraper.read(40, until_ended={video})
        records = _records_of(gw, "/video")
    print("paused stream got", scraper.got, "gateway RSS +KiB while paused", held)
    assert scraper.got[video] == 96 * MiB, scraper.got
    return held, records


def test_an_http2_download_its_scraper_stops_reading_is_not_held_by_the_gateway(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # A browser pauses a video: it gives the stream no more window and goes on with other
    # requests on the same connection. mitmproxy read on from the site into the stream's send
    # buffer (the gateway's memory grew by 110 MiB of the 96 MiB video). The site's connection is
    # now read no further than 4 MiB ahead of the scraper; the page is served meanwhile, and
    # the video comes whole when read again.
    held, records = _pause_a_video(workdir, tls_site, test_ca, policy_with())
    assert records and records[0]["response_bytes"] == 96 * MiB, records
    assert held < 24 * 1024, held


def test_the_paused_download_through_an_upstream_proxy_is_not_held_either(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    from tests.test_upstream_proxies import UpstreamProxy

    proxy = UpstreamProxy(workdir, "pool-a")
    try:
        egress = {"upstream_proxies": [{"name": "pool-a", "url": f"http://127.0.0.1:{proxy.port}"}]}
        policy = policy_with(egress={"provider": "test-transit", **egress})
        held, records = _pause_a_video(workdir, tls_site, test_ca, policy)
    finally:
        proxy.stop()
    assert records and records[0]["upstream_proxy"] == "pool-a", records
    assert records[0]["response_bytes"] == 96 * MiB, records
    assert held < 24 * 1024, held


def test_a_paused_download_its_scraper_cancels_is_let_go_and_recorded(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # Paused, then cancelled (RST_STREAM): the site's connection is closed, the fetch recorded
    # with what came, and the scraper's connection serves on.
    with _a_paused_video(workdir, tls_site, test_ca, policy_with()) as (gw, scraper, video):
        scraper.read(3)
        scraper.reset(video)
        assert wait_for(lambda: _records_of(gw, "/video"), timeout=5), gw.logs()[-3000:]
        _serves_on(scraper)
        [record] = _records_of(gw, "/video")
    print({k: record[k] for k in ("decision", "reason", "response_bytes", "note")})
    assert record["reason"] == "interrupted" and record["response_bytes"] < 16 * MiB, record


def _stalling_policy() -> dict[str, Any]:
    network = {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
    return policy_with(network={**network, "response_timeout": "3s"})


def _records_of(gw: Gateway, path: str) -> list[dict[str, Any]]:
    return [r for r in gw.fetch_records(timeout=0.5) if r["url"].endswith(path)]


def _stalled(record: dict[str, Any]) -> None:
    """The record of a download its scraper stopped taking for the 3 s response timeout: the
    scraper's doing, not the site's silence, and not downloaded on."""
    print({k: record[k] for k in ("decision", "reason", "response_bytes", "note")})
    assert record["decision"] == "forwarded" and record["reason"] == "interrupted", record
    assert record["note"].startswith("the client made no room for more of the answer for 3s"), (
        record
    )
    assert 0 < record["response_bytes"] < 32 * MiB, record


def test_an_http2_stream_paused_past_the_response_timeout_is_the_scrapers_doing(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # The gateway stopped reading the site for the scraper: that is not the site's silence
    # (it was recorded `upstream_timeout`, "the site sent no more of the response body").
    with _a_paused_video(workdir, tls_site, test_ca, _stalling_policy()) as (gw, scraper, video):
        scraper.read(8, until_ended={video})
        assert video in scraper.ended, scraper.got  # (reset by the gateway)
        _serves_on(scraper)
        _stalled(_records_of(gw, "/video")[0])


def test_an_http1_scraper_that_stops_reading_is_closed_as_the_scrapers_doing(
    workdir: Path, site: Site, test_ca: LocalCA
):
    site.routes["/big"] = Reply(body=b"L" * (96 * MiB))
    with Gateway(workdir, _stalling_policy(), trusted_ca=test_ca.ca_cert) as gw:
        with _slow_get(gw, site, "/big"):
            assert wait_for(lambda: _records_of(gw, "/big"), timeout=10)
        _stalled(_records_of(gw, "/big")[0])


def test_http2_streams_read_slowly_are_not_cut_as_stalled(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # Two downloads on one connection, each read a little every half second: the first, 1 byte
    # at a time, keeps the gateway's buffer for the scraper over 4 MiB, so the second's site
    # connection waits all along, 16 KiB taken at a time. Each makes room, so neither is ended
    # as stalled past the 3 s response timeout (the wait was held as one from its start, and
    # both were), and both come whole when read on.
    size = 24 * MiB
    for path in ("/trickle", "/slow"):
        tls_site.routes[path] = Reply(body=b"v" * size, headers={"Content-Type": "video/mp4"})
    authority = f"site-a.test:{tls_site.port}"
    with Gateway(workdir, _stalling_policy(), trusted_ca=test_ca.ca_cert) as gw:
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            scraper = _H2Reader(tls, authority)
            trickle = scraper.get("/trickle", paused=True)
            scraper.read(1)
            slow = scraper.get("/slow", paused=True)
            for _ in range(14):  # 7 s
                if scraper.ended:
                    break
                scraper.conn.increment_flow_control_window(1, trickle)
                scraper.conn.increment_flow_control_window(16384, slow)
                tls.sendall(scraper.conn.data_to_send())
                scraper.read(0.5)
            assert not scraper.ended, scraper.got
            scraper.resume(trickle)
            scraper.resume(slow)
            scraper.read(40, until_ended={trickle, slow})
        records = {path: _records_of(gw, path)[0] for path in ("/trickle", "/slow")}
    assert scraper.got == {trickle: size, slow: size}, scraper.got
    assert {r["reason"] for r in records.values()} == {"ok"}, records


def test_an_http1_scraper_reading_slowly_is_not_cut_as_stalled(
    workdir: Path, site: Site, test_ca: LocalCA
):
    # 8000 bytes every 0.1 s: the gateway's buffers for the scraper (the socket's send queue
    # of some MiB on loopback) stay full, so the site's connection waits all along, but the
    # scraper takes some of them all the time. It was cut at the 3 s response timeout (as the
    # site's silence, then as the scraper's stall). (Much slower, the gateway would not see it:
    # TCP opens a window of 64 KiB again only once it has half of it.)
    site.routes["/big"] = Reply(body=b"L" * (40 * MiB))
    with Gateway(workdir, _stalling_policy(), trusted_ca=test_ca.ca_cert) as gw:
        with _slow_get(gw, site, "/big") as s:
            got, started = 0, time.monotonic()
            while time.monotonic() - started < 8:
                chunk = s.recv(8000)
                assert chunk, f"closed after {time.monotonic() - started:.1f} s, {got} bytes"
                got += len(chunk)
                time.sleep(0.1)
        records = _records_of(gw, "/big")
    print(got, records and {k: records[0][k] for k in ("reason", "response_bytes", "note")})
    assert records and records[0]["reason"] == "interrupted", records
    assert records[0]["note"] == "the client hung up while the answer was being delivered"


def test_an_http1_scraper_too_slow_for_the_transfer_timeout_is_the_scrapers_doing(
    workdir: Path, site: Site, test_ca: LocalCA
):
    # The same reader against a 3 s transfer_timeout: the exchange is ended then, but the site
    # had been waiting for the scraper (it was recorded upstream_timeout, "the exchange with
    # the site took longer").
    site.routes["/big"] = Reply(body=b"L" * (40 * MiB))
    network = {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
    policy = policy_with(network={**network, "transfer_timeout": "3s"})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _slow_get(gw, site, "/big") as s:
            started = time.monotonic()
            while time.monotonic() - started < 30 and s.recv(8000):
                time.sleep(0.1)
        records = _records_of(gw, "/big")
    print(records and {k: records[0][k] for k in ("reason", "response_bytes", "note")})
    assert records and records[0]["reason"] == "interrupted", records
    assert records[0]["note"].startswith("the client took longer than 3s to take the answer")


def test_whole_answers_an_http2_scraper_leaves_unread_are_let_go(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # Answers of up to 16 MiB are held whole until their end, then handed to the stream at
    # once: ten of 15 MiB the scraper did not read stayed in the gateway's memory (+314 MiB,
    # for as long as the connection lasted; ten more, as much again). Unread for the response
    # timeout (3 s), each stream is reset and its answer dropped (the memory is the gateway's
    # again: the next ten take it), recorded in the log; the one read slowly is not. (Past
    # 64 MiB unread, the others' sites are not read meanwhile, and those are ended at the
    # same timeout as the scraper's stall, recorded `interrupted`.)
    tls_site.routes["/still"] = Reply(body=b"s" * (15 * MiB), headers={"Content-Type": "image/png"})
    tls_site.routes["/page"] = Reply(body=b"p" * 1000)
    authority = f"site-a.test:{tls_site.port}"
    with Gateway(workdir, _stalling_policy(), trusted_ca=test_ca.ca_cert) as gw:
        pid = gw.proc.pid
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            scraper = _H2Reader(tls, authority)
            page = scraper.get("/page")
            scraper.read(5, until_ended={page})
            rss = []
            for _ in range(3):
                unread = [scraper.get("/still", paused=True) for _ in range(10)]
                scraper.read(15, until_ended=set(unread))
                rss.append(_kib(pid, "VmRSS"))
                assert set(unread) <= scraper.ended, (unread, scraper.ended)
            slow = scraper.get("/still", paused=True)
            for _ in range(16):  # 8 s
                scraper.conn.increment_flow_control_window(65536, slow)
                tls.sendall(scraper.conn.data_to_send())
                scraper.read(0.5)
            assert slow not in scraper.ended
            scraper.resume(slow)
            scraper.read(20, until_ended={slow})
        dropped = gw.log_events("unread_answer_dropped")
        reasons = [r["reason"] for r in _records_of(gw, "/still")]
    print("RSS after each ten", rss, "dropped", len(dropped), scraper.got[slow])
    assert scraper.got[slow] == 15 * MiB
    assert {e["bytes"] for e in dropped} == {15 * MiB - 65_535}, dropped
    # (at least five a round: four of them unread are under 64 MiB)
    assert 15 <= len(dropped) and reasons.count("ok") == len(dropped) + 1, (dropped, reasons)
    assert reasons.count("interrupted") == 30 - len(dropped), reasons
    assert rss[2] - rss[0] < 96 * 1024, rss  # (+300 MiB a round, held)


PHOTO = 4 * MiB  # held whole before it goes on (up to BUFFER_LIMIT)
# How many such answers, each read for its first window only, a connection takes before its
# next requests wait: the last one forwarded is the first to find more than the bound unread.
ANSWERED_UNREAD = MAX_UNREAD_ANSWERS // (PHOTO - 65_535) + 1


@contextlib.contextmanager
def _photo_scraper(gw: Gateway, tls_site: Site) -> Iterator[_H2Reader]:
    """An HTTP/2 scraper in a CONNECT tunnel to the site, which serves PHOTO at /photo."""
    tls_site.routes["/photo"] = Reply(body=b"p" * PHOTO, headers={"Content-Type": "image/jpeg"})
    authority = f"site-a.test:{tls_site.port}"
    with tls_tunnel(gw, authority, alpn="h2") as tls:
        yield _H2Reader(tls, authority)


def _photos_one_after_another(scraper: _H2Reader, count: int) -> list[int]:
    """The scraper asks for `count` photos, each once the one before has begun to come (or
    has not within 2 s), and reads none past its first window: their streams."""
    streams = []
    for _ in range(count):
        streams.append(scraper.get("/photo", paused=True))
        deadline = time.monotonic() + 2
        while not scraper.got[streams[-1]] and time.monotonic() < deadline:
            scraper.read(0.2)
    return streams


def _photos_whole(gw: Gateway, scraper: _H2Reader, streams: list[int]) -> list[Any]:
    """The scraper reads all of them: the records of the photos."""
    for stream in streams:
        scraper.paused.discard(stream)
        scraper.give(stream, PHOTO)
    scraper.read(60, until_ended=set(streams))
    assert {scraper.got[s] for s in streams} == {PHOTO}, scraper.got
    assert not set(streams) & scraper.resets, scraper.resets
    return [(r["reason"], r["response_bytes"]) for r in _records_of(gw, "/photo")]


def test_an_http2_scraper_reading_none_of_its_answers_has_no_more_fetched_for_it(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # Answers of up to 16 MiB are held whole, then handed to the scraper's stream at once (the
    # site is done with them). A scraper that asked for one photo after another and read none
    # made the gateway fetch and hold them all (60 of 4 MiB: +272 MiB). Past 64 MiB unread on
    # its connection its next requests wait before they reach the site; once it reads, they
    # go on, and every photo comes whole.
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        with _photo_scraper(gw, tls_site) as scraper:
            streams = _photos_one_after_another(scraper, ANSWERED_UNREAD + 4)
            scraper.read(2)
            answered = [s for s in streams if scraper.got[s]]
            fetched = sum(seen.path == "/photo" for seen in tls_site.seen)
            unread = gw.metric("crawlwarden_unread_answer_bytes")
            records = _photos_whole(gw, scraper, streams)
            unread_after = gw.metric("crawlwarden_unread_answer_bytes")
        held = gw.log_events("requests_held_for_unread_answers")
    print("answered", len(answered), "fetched", fetched, "held", held, unread, unread_after)
    assert unread == ANSWERED_UNREAD * (PHOTO - 65_535) and unread_after == 0, unread
    assert answered == streams[:ANSWERED_UNREAD] and fetched == ANSWERED_UNREAD
    assert records == [("ok", PHOTO)] * len(streams), records
    assert len(held) == 1 and held[0]["unread_bytes"] > MAX_UNREAD_ANSWERS, held


def test_answers_to_requests_an_http2_scraper_sent_together_stop_at_the_site_while_unread(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # Sent together, before any answer came, the requests all go to the site (up to five at
    # once on connections of their own). The gateway read every answer whole and handed it on:
    # all 30 photos held (+138 MiB RSS). Once 64 MiB of them wait unread, the site connections
    # bringing the others are not read (at most the four under way with the last one let
    # through may end meanwhile: 17 answered, +90 MiB); the scraper then reads, and every
    # photo comes whole.
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        assert gw.proc is not None
        with _photo_scraper(gw, tls_site) as scraper:
            first = scraper.get("/img")
            scraper.read(5, until_ended={first})
            before = _kib(gw.proc.pid, "VmRSS")
            streams = [scraper.get("/photo", paused=True) for _ in range(30)]
            scraper.read(4)
            grew = _kib(gw.proc.pid, "VmRSS") - before
            answered = sum(1 for s in streams if scraper.got[s])
            records = _photos_whole(gw, scraper, streams)
    print("answered", answered, "RSS grew by", grew, "KiB")
    assert answered <= ANSWERED_UNREAD + 4, answered
    assert records == [("ok", PHOTO)] * len(streams), records


def test_requests_held_for_their_turn_wait_for_the_scraper_to_read_too(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # The same in delay mode, the requests sent together: the site takes one at a time, so
    # each is let through once the one before has come whole, and all passed the bound while
    # nothing was unread. One whose turn comes while the connection holds more than the bound
    # unread waits (its slot taken) until the scraper reads, and is not sent meanwhile (sent,
    # its site's connection would be held for the scraper: one more fetched, 18).
    policy = policy_with(defaults={"on_exceed": "delay", "max_concurrency": 1, "max_delay": "60s"})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _photo_scraper(gw, tls_site) as scraper:
            streams = [scraper.get("/photo", paused=True) for _ in range(ANSWERED_UNREAD + 6)]
            scraper.read(6)
            fetched = sum(seen.path == "/photo" for seen in tls_site.seen)
            records = _photos_whole(gw, scraper, streams)
    print("fetched while unread", fetched)
    # (the slot is let go in the response hook, and the answer is in its stream's buffer
    # before the hook's end lets the next turn's admission run)
    assert fetched == ANSWERED_UNREAD, fetched
    assert records == [("ok", PHOTO)] * len(streams), records


def test_requests_held_for_unread_answers_go_on_once_the_gateway_drops_them(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # A scraper that never reads: its unread answers are dropped at the response timeout (10 s:
    # the photos before the bound must all come before the first is dropped, on a slow host
    # too), and the requests waiting behind them go on then, not never.
    network = {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}}
    policy = policy_with(network={**network, "response_timeout": "10s"})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        with _photo_scraper(gw, tls_site) as scraper:
            streams = _photos_one_after_another(scraper, ANSWERED_UNREAD)
            waiting = [scraper.get("/photo", paused=True) for _ in range(2)]
            scraper.read(1)
            before = {s: scraper.got[s] for s in waiting}
            scraper.read(20)
            fetched = sum(seen.path == "/photo" for seen in tls_site.seen)
        dropped = gw.log_events("unread_answer_dropped")
    print("before", before, "got", scraper.got, "dropped", len(dropped))
    assert all(scraper.got[s] == 65_535 for s in streams), scraper.got
    assert before == dict.fromkeys(waiting, 0), before
    assert all(scraper.got[s] == 65_535 for s in waiting), scraper.got
    assert fetched == len(streams) + 2 and len(dropped) >= ANSWERED_UNREAD, (fetched, dropped)


def test_requests_held_for_unread_answers_that_their_scraper_gives_up_are_never_sent(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # Held for the scraper to read (reject mode, where nothing else holds a request): one the
    # scraper cancels (RST_STREAM), and one still held when it closes its connection, are
    # recorded `interrupted` at once and never reach the site.
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        with _photo_scraper(gw, tls_site) as scraper:
            _photos_one_after_another(scraper, ANSWERED_UNREAD)
            cancelled, _still_held = (scraper.get("/photo", paused=True) for _ in range(2))
            scraper.read(1)
            scraper.reset(cancelled)
            scraper.read(1)
            while_open = [r["reason"] for r in _records_of(gw, "/photo")]
        wait_for(lambda: len(_records_of(gw, "/photo")) == ANSWERED_UNREAD + 2, timeout=10)
        records = [(r["decision"], r["reason"]) for r in _records_of(gw, "/photo")]
        fetched = sum(seen.path == "/photo" for seen in tls_site.seen)
    print(records)
    assert while_open == ["ok"] * ANSWERED_UNREAD + ["interrupted"], while_open
    assert records[-2:] == [("refused", "interrupted")] * 2, records
    assert fetched == ANSWERED_UNREAD, fetched


def test_an_http2_scrapers_connection_does_not_keep_the_answers_it_was_given(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # mitmproxy sends each request of an HTTP/2 scraper on a connection to the site of its own,
    # closes it after the answer, and kept it, its layers and its last request and answer (the
    # body too) for as long as the scraper's connection lasted (addons/stream_release.py): the
    # gateway grew by ~155 MiB for each ten 15 MiB images a browser was given.
    tls_site.routes["/still"] = Reply(body=b"s" * (15 * MiB), headers={"Content-Type": "image/png"})
    authority = f"site-a.test:{tls_site.port}"
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        pid = gw.proc.pid
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            scraper = _H2Reader(tls, authority)
            scraper.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
            scraper.conn.increment_flow_control_window(2**30)
            tls.sendall(scraper.conn.data_to_send())
            rss = []
            for _ in range(6):
                images = [scraper.get("/still") for _ in range(10)]
                scraper.read(30, until_ended=set(images))
                assert {scraper.got[i] for i in images} == {15 * MiB}, scraper.got
                rss.append(_kib(pid, "VmRSS"))
    print("RSS after each ten", rss)
    assert rss[-1] - rss[1] < 128 * 1024, rss  # (was +620 MiB)


def test_an_http2_scrapers_connection_does_not_keep_its_closed_site_connections(
    workdir: Path, tls_site: Site, test_ca: LocalCA
):
    # The same for small answers: each closed connection to the site, with its TLS and HTTP
    # layers, stayed in the scraper's connection's HTTP layer (~70 KB a request).
    tls_site.routes["/s"] = Reply(body=b"s" * 1000, headers={"Content-Type": "image/png"})
    authority = f"site-a.test:{tls_site.port}"
    busy = {"rate": "1000/s", "burst": 1000, "max_concurrency": 100}
    policy = policy_with(defaults={**busy, "requests_per_day": 10**6, "requests_per_month": 10**7})
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        pid = gw.proc.pid
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            scraper = _H2Reader(tls, authority)
            rss = []
            for _ in range(4):
                for _ in range(10):
                    images = [scraper.get("/s") for _ in range(20)]
                    scraper.read(30, until_ended=set(images))
                    assert {scraper.got[i] for i in images} == {1000}, scraper.got
                rss.append(_kib(pid, "VmRSS"))
    print("RSS after each 200 requests", rss)
    # Was +42 MiB for these 600. What is left is outside Python's objects and comes in two
    # sizes on a slow host: +2.6-4.4 MiB in most runs, +7.3-8.5 MiB in some (one of four before
    # stop 34's changes, four of ten after): an 8 MiB bound failed a CI run.
    assert rss[-1] - rss[0] < 16 * 1024, rss
