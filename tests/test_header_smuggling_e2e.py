"""Request heads whose bytes a site's HTTP parser reads otherwise than mitmproxy does, through a
real gateway to real loopback servers (probe findings; see the docstring of each test).

mitmproxy reads a bare CR inside a header value as part of the value, and an obs-fold
(a line starting with SP or HT) as the continuation of the previous field, and sends both on to
the site byte for byte. RFC 9112 2.2 and 5.2 say a recipient must reject them or replace them
with SP before forwarding: a site's parser that takes a bare CR for a line end (Python's
http.server and everything built on it: its headers go through the email parser, which splits
lines at CR) reads the rest of the value as a header of its own, a `Host` or a `Content-Length`
the gateway never saw.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import RawSite
from tests.support import Site
from tests.support import basic
from tests.support import policy_with

AUTH = basic(TEAM, TEAM_TOKEN)
BLOCKLIST = [{"id": "tos-blocked", "match": ["blocked.test"], "reason": "ToS", "source": "test"}]


def _send(port: int, data: bytes, wait: float = 2.0) -> bytes:
    """Raw bytes to the proxy port; what comes back within `wait` (or until the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + wait
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            out += chunk
    return out


def test_a_bare_cr_in_a_header_value_names_no_other_host_to_the_site(workdir: Path) -> None:
    # `X-Foo: a<CR>Host: blocked.test`: the gateway checks, budgets and records site-a.test,
    # and Python's http.server (the site) reads a first Host header `blocked.test`, the
    # blocklisted site its address also serves. Either refused (400) or the CR gone.
    with Site() as site, Gateway(workdir, policy_with(blocklist=BLOCKLIST)) as gw:
        answer = _send(
            gw.port,
            (
                f"GET http://site-a.test:{site.port}/photo.jpg HTTP/1.1\r\n"
                f"Proxy-Authorization: {AUTH}\r\nX-Crawl-Project: {PROJECT}\r\n"
                f"X-Foo: a\rHost: blocked.test:{site.port}\r\n\r\n"
            ).encode(),
        )
        # refused as the JSON answer, with its reason, and recorded
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"X-Crawlwarden-Reason: bad_request" in answer, answer
        assert b"CR, LF or NUL" in answer, answer
        time.sleep(0.3)
        assert site.seen == []
        [record] = [r for r in gw.fetch_records() if r["kind"] == "fetch"]
        assert (record["decision"], record["reason"]) == ("refused", "bad_request")


def test_a_bare_cr_in_a_header_value_smuggles_no_request_to_the_site(workdir: Path) -> None:
    # `X-Foo: a<CR>Content-Length: 0` before the real Content-Length: mitmproxy reads the body
    # (a whole request for a robots-disallowed path of the blocklisted host), the site reads
    # Content-Length 0 and then the body as the next request: never checked, budgeted or
    # recorded.
    smuggled = "GET /private/smuggled.jpg HTTP/1.1\r\nHost: blocked.test\r\n\r\n"
    with Site() as site, Gateway(workdir, policy_with(blocklist=BLOCKLIST)) as gw:
        _send(
            gw.port,
            (
                f"POST http://site-a.test:{site.port}/upload HTTP/1.1\r\n"
                f"Proxy-Authorization: {AUTH}\r\nX-Crawl-Project: {PROJECT}\r\n"
                f"X-Foo: a\rContent-Length: 0\r\nContent-Length: {len(smuggled)}\r\n\r\n"
                f"{smuggled}"
            ).encode(),
        )
        time.sleep(0.5)
        paths = [s.path for s in site.seen]
        assert "/private/smuggled.jpg" not in paths, paths
        # Whatever reached the site has its fetch record.
        recorded = {r["url"].split(str(site.port), 1)[1] for r in gw.fetch_records()}
        assert set(paths) <= recorded, (paths, recorded)


class _HeadRecorder(RawSite):
    """Keeps the raw bytes of every request head it gets; answers each with 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        head = self.read_head(conn)
        with self._lock:
            self.heads.append(head.partition(b"\r\n\r\n")[0])
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except OSError:
            pass
        conn.close()


def test_an_obs_fold_or_a_bare_cr_never_reaches_the_site(workdir: Path) -> None:
    # RFC 9112 5.2: a proxy that receives an obs-fold must reject the message or replace it
    # with SP before forwarding; 2.2: likewise a bare CR. Forwarded as they came, a site whose
    # parser takes a folded line for a field of its own (or a CR for a line end) reads
    # `Transfer-Encoding: chunked` / `X-Original-URL` the gateway never saw (it drops the
    # latter when it comes as a field).
    site = _HeadRecorder()
    try:
        with Gateway(workdir, policy_with()) as gw:
            for extra in (
                "X-Foo: a\r\n Transfer-Encoding: chunked\r\n",
                "X-Foo: a\r\n\tX-Original-URL: /private/a.jpg\r\n",
                "X-Foo: a\rX-Original-URL: /private/a.jpg\r\n",
            ):
                _send(
                    gw.port,
                    (
                        f"GET http://site-a.test:{site.port}/open/a.jpg HTTP/1.1\r\n"
                        f"Proxy-Authorization: {AUTH}\r\nX-Crawl-Project: {PROJECT}\r\n"
                        f"{extra}\r\n"
                    ).encode(),
                    wait=1.5,
                )
            time.sleep(0.3)
            for head in site.heads:
                lines = head.split(b"\r\n")
                assert not [ln for ln in lines[1:] if ln[:1] in (b" ", b"\t")], head
                assert b"\r" not in b"".join(lines), head
    finally:
        site.close()


def test_underscore_spellings_of_dropped_fields_do_not_reach_a_wsgi_site(workdir: Path) -> None:
    # CGI and WSGI (PEP 3333) name a field HTTP_ + its name upper-cased with `-` as `_`, so
    # `X_Forwarded_Host` and `X-Forwarded-Host` are one variable to the application (Python's
    # wsgiref here, werkzeug's and gunicorn's before 22 alike, PHP under CGI). The gateway drops
    # X-Forwarded-Host, X-Original-URL, X-Forwarded-For, X-Real-IP... (README) by their hyphen
    # spellings only: the underscore ones reach the application as the very variables a
    # framework reads for the host (Django's USE_X_FORWARDED_HOST), the path or the client.
    from wsgiref.simple_server import WSGIRequestHandler
    from wsgiref.simple_server import make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    environs: list[dict[str, str]] = []

    def app(environ: dict[str, str], start_response: Any) -> list[bytes]:
        environs.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Gateway(workdir, policy_with()) as gw:
            _send(
                gw.port,
                (
                    f"GET http://site-a.test:{server.server_port}/open/a.jpg HTTP/1.1\r\n"
                    f"Proxy-Authorization: {AUTH}\r\nX-Crawl-Project: {PROJECT}\r\n"
                    "X_Forwarded_Host: blocked.test\r\nX_Original_URL: /private/a.jpg\r\n"
                    "X_Forwarded_For: 10.9.9.9\r\nX_Real_IP: 10.9.9.9\r\n"
                    "Connection: close\r\n\r\n"
                ).encode(),
            )
            time.sleep(0.3)
    finally:
        server.shutdown()
        server.server_close()
    assert len(environs) == 1, environs
    leaked = {
        k: v
        for k, v in environs[0].items()
        if k
        in (
            "HTTP_X_FORWARDED_HOST",
            "HTTP_X_ORIGINAL_URL",
            "HTTP_X_FORWARDED_FOR",
            "HTTP_X_REAL_IP",
        )
    }
    assert leaked == {}, leaked
