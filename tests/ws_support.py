"""Raw WebSocket parts for tests/test_websockets.py: a site scripted frame by frame, a raw
client."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import struct
import zlib
from collections.abc import Callable
from typing import Any

from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import RawSite
from tests.support import basic
from tests.support import tls_tunnel

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, mask: bool = False
) -> bytes:
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def read_frame(sock: socket.socket) -> tuple[bool, int, bool, bytes]:
    b0, b1 = recv_exact(sock, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", recv_exact(sock, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", recv_exact(sock, 8))
    key = recv_exact(sock, 4) if b1 & 0x80 else None
    payload = recv_exact(sock, n)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bool(b0 & 0x80), b0 & 0x0F, bool(b0 & 0x40), payload


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed in head")
        data += chunk
    return data


def deflate(payload: bytes) -> bytes:
    """permessage-deflate (no context takeover): the payload with the tail 00 00 ff ff cut."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


class RawWsSite(RawSite):
    """A WebSocket site on 127.0.0.1 whose every connection runs `script(sock, head)` after a
    101 (or without one when `answer` is False)."""

    def __init__(
        self,
        script: Callable[[socket.socket, bytes], None],
        *,
        extensions: str | None = None,
        answer: bool = True,
        robots: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.script = script
        self.tls = tls  # wss: the site's TLS
        self.robots = robots
        self.extensions = extensions
        self.answer = answer
        self.heads: list[bytes] = []
        self.errors: list[BaseException] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = read_head(conn)  # (byte by byte: nothing after the head is taken)
            self.heads.append(head)
            if head.split(b" ", 2)[1] == b"/robots.txt" and self.robots is not None:
                body = self.robots.encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                return
            if not self.answer:
                conn.recv(1)  # never answers
                return
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
            ext = f"Sec-WebSocket-Extensions: {self.extensions}\r\n" if self.extensions else ""
            conn.sendall(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
                ).encode()
            )
            self.script(conn, head)
        except BaseException as e:
            self.errors.append(e)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def url(self, host: str = "site-c.test", path: str = "/ws") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> RawWsSite:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def raw_client(
    gw_port: int,
    url: str,
    *,
    extensions: str | None = None,
    team: str = TEAM,
    token: str = TEAM_TOKEN,
    timeout: float = 10,
) -> tuple[socket.socket, bytes]:
    """An upgrade through the gateway (absolute form): the socket and the answer's head."""
    sock = socket.create_connection(("127.0.0.1", gw_port), timeout=timeout)
    hostport = url.split("/")[2]
    ext = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {url} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Proxy-Authorization: {basic(team, token)}\r\nX-Crawl-Project: {PROJECT}\r\n"
            f"{ext}\r\n"
        ).encode()
    )
    return sock, read_head(sock)


def tunnel_client(gw: Gateway, authority: str) -> tuple[ssl.SSLSocket, bytes]:
    """An upgrade to wss://`authority` inside a CONNECT tunnel through the gateway (TLS to the
    gateway's certificate for the site): the socket and the answer's head."""
    sock = tls_tunnel(gw, authority, alpn="http/1.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"X-Crawl-Project: {PROJECT}\r\n\r\n"
        ).encode()
    )
    return sock, read_head(sock)


def answer_close(sock: socket.socket) -> None:
    """A site's script's end: read until the client's close, and answer it."""
    while True:
        _, op, _, _ = read_frame(sock)
        if op == CLOSE:
            sock.sendall(frame(CLOSE, struct.pack("!H", 1000)))
            return


def client_close(sock: socket.socket, code: int = 1000) -> None:
    sock.sendall(frame(CLOSE, struct.pack("!H", code), mask=True))


def wait_close(sock: socket.socket) -> None:
    """Read frames until the close frame (or the end of the connection)."""
    try:
        while True:
            _, op, _, _ = read_frame(sock)
            if op == CLOSE:
                return
    except (ConnectionError, OSError):
        return


def closed_at_sigterm(gw: Gateway, sock: socket.socket) -> tuple[int, bytes]:
    """Stop the gateway (SIGTERM) with a WebSocket open on `sock`: the opcode and payload of
    the frame it sends the client then (its close), once it has exited; the socket closed."""
    gw.signal(signal.SIGTERM)
    _, op, _, payload = read_frame(sock)
    assert gw.proc is not None
    gw.proc.wait(40)
    sock.close()
    return op, payload
