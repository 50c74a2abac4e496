"""No open proxy: every way into the gateway needs a team's token, wrong tokens get slower answers,
tokens leave no trace, and the keys the gateway writes are private. Against real gateways.

Each case connects from its own loopback address (127.0.0.0/8 is all loopback on Linux): the
wrong-credentials throttle counts per client address, and these cases are about the 407.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.forked_gateways import run_command
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import CRAWLWARDEN
from tests.support import OTHER_TEAM
from tests.support import OTHER_TOKEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import H2Client
from tests.support import LocalCA
from tests.support import Site
from tests.support import basic
from tests.support import policy_with

_addresses = (f"127.0.{i // 250}.{i % 250 + 2}" for i in itertools.count())


def fresh_address() -> str:
    """A loopback source address no earlier case used."""
    return next(_addresses)


def connect(port: int, source: str | None = None) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source or fresh_address(), 0)
    )
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """Bytes until the end of one response head and its Content-Length body, or the close."""
    raw = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        raw += chunk
        head, sep, body = raw.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(body) >= length:
                break
    return raw


def status_of(raw: bytes) -> int | None:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else None


def h2_get(
    sock: socket.socket,
    authority: str,
    path: str,
    *headers: tuple[str, str],
    scheme: str = "http",
) -> dict:
    """One HTTP/2 GET on an open connection: the response headers, or how the stream ended."""
    answer = H2Client(sock).get(authority, path, *headers, scheme=scheme)
    return {**answer.headers, **({"closed": True} if answer.end == "closed" else {})}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, test_ca: LocalCA) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("open-proxy")
    with Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw:
        yield gw


@pytest.fixture(scope="module")
def target() -> Iterator[Site]:
    with Site() as s:
        yield s


CREDENTIALS = {
    "none": None,
    "wrong token": basic(TEAM, "not-the-token"),
    "unknown team": basic("nobody", TEAM_TOKEN),
    "other team's token": basic(TEAM, OTHER_TOKEN),
    "not basic": f"Bearer {TEAM_TOKEN}",
    "not base64": "Basic !!!",
    "no colon": "Basic " + base64.b64encode(TEAM_TOKEN.encode()).decode(),
}


def _header(credentials: str | None) -> str:
    return "" if credentials is None else f"Proxy-Authorization: {credentials}\r\n"


@pytest.mark.parametrize("credentials", list(CREDENTIALS.values()), ids=list(CREDENTIALS))
def test_every_http1_form_without_valid_credentials_is_407(
    gateway: Gateway, target: Site, credentials: str | None
):
    authority = f"site-a.test:{target.port}"
    auth = _header(credentials)
    forms = {
        "absolute-form": f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n",
        "origin-form": f"GET / HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n",
        "CONNECT": f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n",
        "websocket upgrade": f"GET http://{authority}/ws HTTP/1.1\r\nHost: {authority}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n",
        "h2c upgrade": f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: AAMAAABkAAQAAP__\r\n{auth}\r\n",
        "HTTP/1.0": f"GET http://{authority}/ HTTP/1.0\r\n{auth}\r\n",
    }
    for form, request in forms.items():
        with connect(gateway.port) as sock:
            sock.sendall(request.encode())
            answer = read_answer(sock)
        assert status_of(answer) == 407, (form, answer[:200])
        assert b"Proxy-Authenticate: Basic" in answer, form
        assert b"X-Crawlwarden-Reason: auth_required" in answer, form
    assert target.connections == 0


def _tls_to_the_proxy(gateway: Gateway, *alpn: str) -> ssl.SSLSocket:
    """A connection to an HTTPS proxy URL (TLS to the proxy port), offering `alpn`."""
    context = ssl.create_default_context(cafile=str(gateway.ca_cert))
    context.set_alpn_protocols(list(alpn))
    return context.wrap_socket(connect(gateway.port), server_hostname="127.0.0.1")


def test_http2_without_credentials_is_407_or_refused(gateway: Gateway, target: Site):
    authority = f"site-a.test:{target.port}"
    # TLS to the proxy itself (an HTTPS proxy) speaks HTTP/1.1 whatever the client offers
    # (test_a_browser_with_an_https_proxy_url_gets_its_tunnels); a client that speaks HTTP/2 on
    # it all the same has its preface read as HTTP/1: 400, closed, nothing forwarded.
    with _tls_to_the_proxy(gateway, "h2") as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        assert status_of(read_answer(tls)) == 400
    # h2c with prior knowledge: the proxy port does not speak cleartext HTTP/2, so there is no
    # stream to carry a 407; the preface is refused as HTTP/1 and the connection closed.
    with connect(gateway.port) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        answer_raw = read_answer(sock)
    assert status_of(answer_raw) == 400
    # HTTP/2 inside a CONNECT tunnel: the CONNECT itself needs the credentials, so no tunnel
    # (and no TLS, no ALPN) ever starts without them.
    with connect(gateway.port) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        assert status_of(read_answer(sock)) == 407
    assert target.connections == 0


def test_a_browser_with_an_https_proxy_url_gets_its_tunnels(gateway: Gateway, target: Site):
    # HTTPS probe: Chromium with an https:// proxy URL offers h2 first; the proxy agreed on it,
    # and mitmproxy takes no CONNECT on an HTTP/2 stream (GOAWAY, no answer, no record): no
    # https:// page loaded at all. TLS to the proxy port now speaks HTTP/1.1, as mitmproxy means.
    authority = f"site-a.test:{target.port}"
    connect_head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    with _tls_to_the_proxy(gateway, "h2", "http/1.1") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        tls.sendall(f"{connect_head}\r\n".encode())
        assert status_of(read_answer(tls)) == 407  # no credentials, no tunnel
    with _tls_to_the_proxy(gateway, "h2", "http/1.1") as tls:
        tls.sendall(
            f"{connect_head}Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n\r\n".encode()
        )
        assert status_of(read_answer(tls)) == 200
        tls.sendall(
            f"GET /through-https-proxy HTTP/1.1\r\nHost: {authority}\r\n"
            f"X-Crawl-Project: {PROJECT}\r\n\r\n".encode()
        )
        assert status_of(read_answer(tls)) == 200
    assert target.count("/through-https-proxy") == 1


def test_with_valid_credentials_every_form_is_served(gateway: Gateway, target: Site):
    """The other side of the same coin: the forms above do work for a team."""
    authority = f"site-a.test:{target.port}"
    auth = f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\nX-Crawl-Project: {PROJECT}\r\n"
    for request in (
        f"GET http://{authority}/abs HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n",
        f"GET /origin HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n",
    ):
        with connect(gateway.port) as sock:
            sock.sendall(request.encode())
            assert status_of(read_answer(sock)) == 200
    assert target.count("/abs") == target.count("/origin") == 1


def test_http2_inside_a_tunnel_is_served_with_credentials(gateway: Gateway, test_ca: LocalCA):
    with Site(tls=test_ca) as tls_site:
        authority = f"site-c.test:{tls_site.port}"
        sock = connect(gateway.port)
        sock.sendall(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n\r\n".encode()
        )
        assert status_of(read_answer(sock)) == 200
        context = ssl.create_default_context(cafile=str(gateway.ca_cert))
        context.set_alpn_protocols(["h2"])
        with context.wrap_socket(sock, server_hostname="site-c.test") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            answer = h2_get(tls, authority, "/h2", ("x-crawl-project", PROJECT), scheme="https")
        assert answer[":status"] == "200"
        assert tls_site.count("/h2") == 1


# -- wrong credentials are slowed down ---------------------------------------------------------


def _timed_answer(port: int, source: str, request: str) -> tuple[int | None, float]:
    """The status of `request` sent from `source`, and how long its answer took."""
    started = time.monotonic()
    with connect(port, source) as sock:
        sock.sendall(request.encode())
        answer = read_answer(sock)
    return status_of(answer), time.monotonic() - started


def _timed(port: int, source: str, credentials: str | None, url: str) -> tuple[int | None, float]:
    return _timed_answer(
        port,
        source,
        f"GET {url} HTTP/1.1\r\nHost: x\r\n{_header(credentials)}"
        f"X-Crawl-Project: {PROJECT}\r\n\r\n",
    )


def test_repeated_wrong_credentials_from_one_address_are_slowed_down(
    gateway: Gateway, target: Site
):
    url = target.url("site-a.test", "/throttle")
    attacker = fresh_address()
    wrong = basic(TEAM, "guess")
    timings = []
    for _ in range(7):
        status, took = _timed(gateway.port, attacker, wrong, url)
        assert status == 407
        # A legitimate client on the same address is never held back, before or after.
        ok, quick = _timed(gateway.port, attacker, basic(TEAM, TEAM_TOKEN), url)
        assert ok == 200 and quick < 0.5, quick
        timings.append(took)
    # Three answered at once, then about 0.25 s, 0.5 s, 1 s, 2 s (proxy/auth_throttle.py; a
    # little less, as the count decays while the client waits).
    assert all(t < 0.2 for t in timings[:3]), timings
    for took, nominal in zip(timings[3:], (0.25, 0.5, 1.0, 2.0), strict=True):
        assert 0.85 * nominal <= took < nominal + 1.0, timings
    # Missing credentials are no guess: answered at once even now.
    status, took = _timed(gateway.port, attacker, None, url)
    assert status == 407 and took < 0.2
    # Another address is not affected.
    status, took = _timed(gateway.port, fresh_address(), wrong, url)
    assert status == 407 and took < 0.2
    # Parallel guesses do not multiply the rate: past 8 held answers, connections are dropped.
    results: list[int | None] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(_timed(gateway.port, attacker, wrong, url)[0])
        )
        for _ in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(407) <= 8 and results.count(None) >= 4, results
    assert gateway.proc is not None and gateway.proc.poll() is None


def _admin_timed(gateway: Gateway, source: str, token: str) -> tuple[int | None, float]:
    return _timed_answer(
        gateway.admin_port,
        source,
        f"GET /v1/takedowns HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n",
    )


def test_repeated_wrong_admin_tokens_from_one_address_are_slowed_down(gateway: Gateway):
    # Admin probe 4: 300 wrong bearer tokens took 0.07 s; the admin API now answers them as
    # the proxy port answers wrong credentials.
    attacker = fresh_address()
    timings = []
    for _ in range(6):
        status, took = _admin_timed(gateway, attacker, "guess")
        assert status == 401
        ok, quick = _admin_timed(gateway, attacker, AUDITOR_TOKEN)  # never held back
        assert ok == 200 and quick < 0.5, quick
        timings.append(took)
    assert all(t < 0.2 for t in timings[:3]), timings
    for took, nominal in zip(timings[3:], (0.25, 0.5, 1.0), strict=True):
        assert 0.85 * nominal <= took < nominal + 1.0, timings
    status, took = _admin_timed(gateway, fresh_address(), "guess")  # another address
    assert status == 401 and took < 0.2
    results: list[int | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(_admin_timed(gateway, attacker, "g")[0]))
        for _ in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(401) <= 8 and results.count(429) >= 4, results


# -- tokens leave no trace -------------------------------------------------------------------


def test_tokens_never_appear_in_logs_records_or_metrics(
    workdir: Path, target: Site, test_ca: LocalCA
):
    guesses = ["guess-one-7f3a", "guess-two-91bc"]
    with Site(tls=test_ca) as tls_site:
        gw = Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert).start()
        try:
            proxies_ok = {"http": gw.proxy_url(), "https": gw.proxy_url()}
            for i in range(3):
                requests.get(
                    target.url("site-a.test", f"/ok/{i}"),
                    proxies=proxies_ok,
                    headers={"X-Crawl-Project": PROJECT},
                    timeout=10,
                )
            requests.get(
                tls_site.url("site-c.test", "/tls"),
                proxies=proxies_ok,
                headers={"X-Crawl-Project": PROJECT},
                verify=str(gw.ca_cert),
                timeout=10,
            )
            requests.get(
                target.url("site-a.test", "/other"),
                proxies={"http": gw.proxy_url(OTHER_TEAM, OTHER_TOKEN)},
                timeout=10,
            )
            for guess in guesses:
                for request in (
                    f"GET {target.url('site-a.test', '/bad')} HTTP/1.1\r\n"
                    f"Proxy-Authorization: {basic(TEAM, guess)}\r\n\r\n",
                    f"CONNECT site-c.test:{tls_site.port} HTTP/1.1\r\n"
                    f"Proxy-Authorization: {basic(guess, TEAM_TOKEN)}\r\n\r\n",
                    # Tokens in places they do not belong, and in a request mitmproxy refuses.
                    f"GET {target.url('site-a.test', '/hdr')} HTTP/1.1\r\n"
                    f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n"
                    f"X-Crawl-Project: {PROJECT}\r\nAuthorization: Bearer {guess}\r\n\r\n",
                    f"GET {target.url('site-a.test', '/bad')} HTTP/1.1\r\n"
                    f"Proxy-Authorization {basic(TEAM, guess)}\r\n\r\n",
                ):
                    with connect(gw.port) as sock:
                        sock.sendall(request.encode())
                        read_answer(sock)
            for token in (ADMIN_TOKEN, AUDITOR_TOKEN, *guesses):
                gw.admin_request("POST", "/v1/policy/reload", token=token)
                gw.admin_request("GET", "/v1/fetches?limit=5", token=token)
            metrics = requests.get(gw.admin + "/metrics", timeout=5).text
        finally:
            gw.stop()
        export = run_command(
            [CRAWLWARDEN, "audit", "export", "--data-dir", str(gw.data_dir)],
            text=True,
            check=True,
        ).stdout
    secrets = [TEAM_TOKEN, OTHER_TOKEN, ADMIN_TOKEN, AUDITOR_TOKEN, *guesses]
    forms = set(secrets)
    for secret in secrets:
        forms.add(base64.b64encode(secret.encode()).decode())
        for team in (TEAM, OTHER_TEAM, "nobody"):
            forms.add(base64.b64encode(f"{team}:{secret}".encode()).decode())
            forms.add(base64.b64encode(f"{secret}:{TEAM_TOKEN}".encode()).decode())
    places = {"gateway log": gw.logs(), "fetch log export": export, "metrics": metrics}
    assert "decision" in places["gateway log"] and "vision-data" in export  # not empty
    leaks = [(place, form) for place, text in places.items() for form in forms if form in text]
    assert not leaks


# -- private keys ----------------------------------------------------------------------------


def test_private_keys_are_written_0600_whatever_the_umask(workdir: Path):
    gw = Gateway(workdir, policy_with())
    gw.args = ["sh", "-c", 'umask 000; exec "$0" "$@"', *gw.args]
    with gw:
        pass
    private = {
        "MITM CA key (PEM)": gw.data_dir / "mitmproxy-ca.pem",
        "MITM CA key (PKCS#12)": gw.data_dir / "mitmproxy-ca.p12",
        "fetch-log signing key": gw.data_dir / "audit-signing.key",
    }
    for what, path in private.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, what
    # The public halves may be read by anyone.
    assert stat.S_IMODE((gw.data_dir / "audit-signing.pub").stat().st_mode) & 0o044
    # A key pair from the CLI, likewise.
    key, pub = workdir / "k" / "audit.key", workdir / "k" / "audit.pub"
    key.parent.mkdir()
    run_command(
        [
            "sh",
            "-c",
            'umask 000; exec "$0" "$@"',
            CRAWLWARDEN,
            "keys",
            "generate",
            "--private",
            str(key),
            "--public",
            str(pub),
        ],
        check=True,
        env={**os.environ},
    )
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
