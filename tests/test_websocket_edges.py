"""WebSockets at the edges of this gateway's own rules: every conversation still open at a stop
is closed 1001 and recorded (many at once, in a CONNECT tunnel, through an upstream proxy, busy,
already closing, answered during the drain); permessage-deflate messages up to the 32 MiB limit
pass whole (with context takeover, exactly 32 MiB, two in a row) and one byte over is closed
1009, in one frame or in fragments. Real gateway processes, raw sites and clients."""

from __future__ import annotations

import hashlib
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.support import Gateway
from tests.support import LocalCA
from tests.support import policy_with
from tests.ws_support import BINARY
from tests.ws_support import CLOSE
from tests.ws_support import CONT
from tests.ws_support import PING
from tests.ws_support import PONG
from tests.ws_support import TEXT
from tests.ws_support import RawWsSite
from tests.ws_support import closed_at_sigterm
from tests.ws_support import frame
from tests.ws_support import raw_client
from tests.ws_support import read_frame
from tests.ws_support import tunnel_client


@pytest.fixture
def gateway(workdir: Path, test_ca: LocalCA):
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        yield gw


def records(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.export() if r.get("type", "record") == "record"]


def _stop(gw: Gateway) -> float:
    """SIGTERM, and how long the gateway took to exit."""
    began = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc is not None
    gw.proc.wait(40)
    return time.monotonic() - began


def _one_message_then_wait_close(sock: socket.socket, head: bytes) -> None:
    """A site's script: one message of 1000 bytes, then read until the close."""
    sock.sendall(frame(TEXT, b"w" * 1000))
    sock.settimeout(30)
    try:
        while True:
            _, op, _, _ = read_frame(sock)
            if op == CLOSE:
                return
    except OSError:
        return


def test_many_websockets_open_at_sigterm_are_all_closed_and_recorded(gateway: Gateway):
    n = 40

    socks = []
    with RawWsSite(_one_message_then_wait_close) as site:
        for _ in range(n):
            sock, head = raw_client(gateway.port, site.url(), timeout=30)
            assert head.startswith(b"HTTP/1.1 101"), head
            read_frame(sock)
            socks.append(sock)
        began = time.monotonic()
        gateway.signal(signal.SIGTERM)
        codes = []
        for sock in socks:
            try:
                _, op, _, payload = read_frame(sock)
                codes.append((op, payload[:2]))
            except OSError as e:
                codes.append(("err", str(e)))
        assert gateway.proc is not None
        gateway.proc.wait(40)
        took = time.monotonic() - began
        for s in socks:
            s.close()
    talked = [r for r in records(gateway) if r.get("kind") == "websocket"]
    print(
        "stop took",
        round(took, 2),
        "records",
        len(talked),
        "lost",
        len(gateway.log_events("websocket_not_recorded")),
        gateway.log_events("websockets_closed"),
    )
    assert all(c == (CLOSE, struct.pack("!H", 1001)) for c in codes), codes
    assert len(talked) == n, (len(talked), gateway.log_events("websocket_not_recorded")[:2])
    assert all(r["response_bytes"] == 1000 for r in talked)


def test_a_websocket_inside_a_connect_tunnel_at_sigterm_is_closed_and_recorded(
    gateway: Gateway, test_ca: LocalCA
):
    tls = test_ca.server_context_for("site-c.test")
    with RawWsSite(_one_message_then_wait_close, tls=tls) as site:
        sock, head = tunnel_client(gateway, f"site-c.test:{site.port}")
        assert head.startswith(b"HTTP/1.1 101"), head
        read_frame(sock)
        op, payload = closed_at_sigterm(gateway, sock)
    assert op == CLOSE and payload[:2] == struct.pack("!H", 1001), (op, payload[:40])
    [talked] = [r for r in records(gateway) if r.get("kind") == "websocket"]
    assert talked["response_bytes"] == 1000


def test_a_websocket_already_closing_at_sigterm_is_recorded_once(gateway: Gateway):
    # the client sent its close; the site never answers it
    def script(sock: socket.socket, head: bytes) -> None:
        sock.sendall(frame(TEXT, b"w" * 1000))
        time.sleep(30)

    with RawWsSite(script) as site:
        sock, head = raw_client(gateway.port, site.url(), timeout=30)
        assert head.startswith(b"HTTP/1.1 101"), head
        read_frame(sock)
        sock.sendall(frame(CLOSE, struct.pack("!H", 1000), mask=True))
        time.sleep(0.5)
        took = _stop(gateway)
        sock.close()
    talked = [r for r in records(gateway) if r.get("kind") == "websocket"]
    print("took", took, talked and talked[0].get("note"))
    assert len(talked) == 1, (talked, gateway.log_events("websocket_not_recorded"))
    assert took < 10


# -- permessage-deflate ------------------------------------------------------------------------

EXT_TAKEOVER = "permessage-deflate"


def _deflater() -> Any:
    return zlib.compressobj(6, zlib.DEFLATED, -15)


def _compressed(c: Any, payload: bytes) -> bytes:
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def _pattern(n: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 32  # 1 KiB, compresses well
    return (block * (n // len(block) + 1))[:n]


def _relay_compressed(
    gateway: Gateway, messages: list[list[tuple[int, bytes, bool]]], ext: str, expect: list[bytes]
) -> list[bytes]:
    """The site sends `messages` (each a list of (opcode, wire payload, rsv1) frames, fin on
    the last) with ext negotiated; the client reads what arrives, inflating each message."""

    def script(sock: socket.socket, head: bytes) -> None:
        try:
            for frames in messages:
                for i, (op, data, rsv1) in enumerate(frames):
                    sock.sendall(
                        frame(op, data, fin=(i == len(frames) - 1) or op in (PING,), rsv1=rsv1)
                    )
            time.sleep(20)
        except OSError:
            return

    got: list[bytes] = []
    with RawWsSite(script, extensions=ext) as site:
        sock, head = raw_client(gateway.port, site.url(), extensions=ext, timeout=60)
        assert head.startswith(b"HTTP/1.1 101"), head
        negotiated = [
            line for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-ext")
        ]
        takeover = b"no_context_takeover" not in b"".join(negotiated)
        d = zlib.decompressobj(-15)
        buf, compressed = b"", False
        try:
            while len(got) < len(expect):
                fin, op, rsv1, payload = read_frame(sock)
                if op in (PING, PONG):
                    continue
                if op == CLOSE:
                    got.append(b"CLOSE" + payload)
                    break
                if op != CONT:
                    compressed = rsv1
                buf += payload
                if fin:
                    if compressed:
                        if not takeover:
                            d = zlib.decompressobj(-15)
                        msg = d.decompress(buf + b"\x00\x00\xff\xff")
                    else:
                        msg = buf
                    got.append(msg)
                    buf = b""
        finally:
            sock.close()
    print("negotiated", negotiated, "got", [len(g) for g in got])
    return got


def test_context_takeover_messages_pass_whole(gateway: Gateway):
    c = _deflater()
    payloads = [_pattern(1000, i) for i in range(5)] + [_pattern(20 * 2**20, 99)]
    msgs = [[(BINARY, _compressed(c, p), True)] for p in payloads]
    got = _relay_compressed(gateway, msgs, EXT_TAKEOVER, payloads)
    assert [hashlib.sha256(g).hexdigest() for g in got] == [
        hashlib.sha256(p).hexdigest() for p in payloads
    ], [g[:40] for g in got]


def test_a_compressed_message_of_exactly_32mib_passes(gateway: Gateway):
    c = _deflater()
    payload = bytes(32 * 2**20)
    got = _relay_compressed(
        gateway, [[(BINARY, _compressed(c, payload), True)]], EXT_TAKEOVER, [payload]
    )
    assert len(got) == 1 and got[0] == payload, [g[:60] for g in got]


def test_an_uncompressed_message_of_exactly_32mib_passes(gateway: Gateway):
    payload = bytes(32 * 2**20)
    got = _relay_compressed(gateway, [[(BINARY, payload, False)]], EXT_TAKEOVER, [payload])
    assert len(got) == 1 and got[0] == payload, [g[:60] for g in got]


def test_busy_websockets_at_sigterm_are_recorded_within_the_stop(gateway: Gateway):
    # 8 conversations, each site sending 24 MiB messages without pause; half the scrapers
    # read nothing. SIGTERM in the middle.
    n = 8
    big = frame(BINARY, b"b" * (24 * 2**20))

    def script(sock: socket.socket, head: bytes) -> None:
        sock.settimeout(30)
        try:
            for _ in range(20):
                sock.sendall(big)
        except OSError:
            return

    socks = []
    stop_reading = threading.Event()

    def reader(s: socket.socket) -> None:
        try:
            while not stop_reading.is_set() and s.recv(2**20):
                pass
        except OSError:
            pass

    with RawWsSite(script) as site:
        for i in range(n):
            sock, head = raw_client(gateway.port, site.url(), timeout=30)
            assert head.startswith(b"HTTP/1.1 101"), head
            socks.append(sock)
            if i % 2 == 0:
                threading.Thread(target=reader, args=(sock,), daemon=True).start()
        time.sleep(2.0)
        began = time.monotonic()
        gateway.signal(signal.SIGTERM)
        assert gateway.proc is not None
        gateway.proc.wait(60)
        took = time.monotonic() - began
        stop_reading.set()
        for s in socks:
            s.close()
    talked = [r for r in records(gateway) if r.get("kind") == "websocket"]
    lost = gateway.log_events("websocket_not_recorded")
    print(
        "stop took",
        round(took, 2),
        "recorded",
        len(talked),
        "lost",
        len(lost),
        gateway.log_events("websockets_closed"),
    )
    assert len(talked) == n and not lost, (len(talked), len(lost))
    assert took < 12


def test_fragmented_compressed_over_the_limit_is_closed_1009(gateway: Gateway):
    c = _deflater()
    f1 = c.compress(bytes(20 * 2**20)) + c.flush(zlib.Z_SYNC_FLUSH)
    f2 = c.compress(bytes(20 * 2**20)) + c.flush(zlib.Z_SYNC_FLUSH)
    f2 = f2[:-4]
    got = _relay_compressed(
        gateway,
        [
            [(BINARY, _compressed(_deflater(), b"hello"), True)],
            [(BINARY, f1, True), (CONT, f2, False)],
        ],
        EXT_TAKEOVER,
        [b"hello", b"x"],
    )
    assert got[0] == b"hello"
    assert got[1].startswith(b"CLOSE" + struct.pack("!H", 1009)), got[1][:40]


@pytest.mark.parametrize("wss", [False, True], ids=["ws", "wss-in-connect"])
def test_a_websocket_through_an_upstream_proxy_at_sigterm_is_closed_and_recorded(
    workdir: Path, test_ca: LocalCA, wss: bool
):
    from tests.test_upstream_proxies import UpstreamProxy
    from tests.test_upstream_proxies import _through

    tls = test_ca.server_context_for("site-c.test") if wss else None
    proxy = UpstreamProxy(workdir, "pool-a")
    try:
        policy = policy_with(egress=_through({"pool-a": proxy}))
        with (
            Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw,
            RawWsSite(_one_message_then_wait_close, tls=tls) as site,
        ):
            if wss:
                sock, head = tunnel_client(gw, f"site-c.test:{site.port}")
            else:
                sock, head = raw_client(gw.port, site.url(), timeout=30)
            assert head.startswith(b"HTTP/1.1 101"), head
            read_frame(sock)
            op, payload = closed_at_sigterm(gw, sock)
            talked = [r for r in records(gw) if r.get("kind") == "websocket"]
            lost = gw.log_events("websocket_not_recorded")
    finally:
        proxy.stop()
    assert op == CLOSE and payload[:2] == struct.pack("!H", 1001), (op, payload[:60])
    assert len(talked) == 1 and not lost


def test_site_closing_client_silent_at_sigterm(gateway: Gateway):
    def script(sock: socket.socket, head: bytes) -> None:
        sock.sendall(frame(TEXT, b"w" * 1000))
        sock.sendall(frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
        time.sleep(30)

    with RawWsSite(script) as site:
        sock, head = raw_client(gateway.port, site.url(), timeout=30)
        assert head.startswith(b"HTTP/1.1 101"), head
        read_frame(sock)
        _, op, _, _payload = read_frame(sock)
        assert op == CLOSE
        time.sleep(0.5)
        took = _stop(gateway)
        sock.close()
    talked = [r for r in records(gateway) if r.get("kind") == "websocket"]
    print("took", took, [t.get("note") for t in talked], gateway.log_events("websockets_closed"))
    assert len(talked) == 1 and talked[0]["response_bytes"] == 1000
    assert took < 10


def test_a_compressed_message_one_byte_over_32mib_is_closed_1009(gateway: Gateway):
    c = _deflater()
    payload = bytes(32 * 2**20 + 1)
    got = _relay_compressed(
        gateway, [[(BINARY, _compressed(c, payload), True)]], EXT_TAKEOVER, [payload]
    )
    assert len(got) == 1 and got[0].startswith(b"CLOSE" + struct.pack("!H", 1009)), [
        g[:60] for g in got
    ]


def test_two_exact_32mib_compressed_messages_in_a_row_with_takeover_pass(gateway: Gateway):
    c = _deflater()
    payloads = [bytes(32 * 2**20), b"\x01" * (32 * 2**20)]
    got = _relay_compressed(
        gateway, [[(BINARY, _compressed(c, p), True)] for p in payloads], EXT_TAKEOVER, payloads
    )
    assert [len(g) for g in got] == [len(p) for p in payloads]
    assert got == payloads


class SlowUpgradeSite(RawWsSite):
    delay = 2.0

    def serve(self, conn: socket.socket) -> None:
        time.sleep(self.delay)  # (the request head waits in the socket)
        super().serve(conn)


def test_an_upgrade_answered_during_the_drain_is_closed_and_recorded(gateway: Gateway):
    with SlowUpgradeSite(_one_message_then_wait_close) as site:
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
        import base64
        import os

        from tests.support import PROJECT
        from tests.support import TEAM
        from tests.support import TEAM_TOKEN
        from tests.support import basic
        from tests.ws_support import read_head

        url = site.url()
        hostport = url.split("/")[2]
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET {url} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n"
                f"X-Crawl-Project: {PROJECT}\r\n\r\n"
            ).encode()
        )
        time.sleep(0.7)
        began = time.monotonic()
        gateway.signal(signal.SIGTERM)
        head = read_head(sock)
        frames = []
        try:
            while True:
                _, op, _, payload = read_frame(sock)
                frames.append((op, payload[:20]))
                if op == CLOSE:
                    break
        except OSError:
            pass
        assert gateway.proc is not None
        gateway.proc.wait(40)
        took = time.monotonic() - began
        sock.close()
    talked = [r for r in records(gateway) if r.get("kind") == "websocket"]
    print(
        "head",
        head[:40],
        "frames",
        frames,
        "took",
        round(took, 2),
        "recorded",
        len(talked),
        "lost",
        gateway.log_events("websocket_not_recorded"),
    )
    if head.startswith(b"HTTP/1.1 101"):
        assert len(talked) == 1 and not gateway.log_events("websocket_not_recorded")
