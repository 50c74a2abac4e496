"""Real parts for tests: loopback HTTP(S) sites, a test CA, gateway processes, curl.

Everything listens on 127.0.0.1 only; sites are RFC 2606 names (site-a.test) that the policy's
network.static_hosts maps to 127.0.0.1, so no test makes a DNS lookup.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import hashlib
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.forked_gateways import ForkedProcess
from tests.forked_gateways import fork_gateway
from tests.forked_gateways import forks
from tests.forked_gateways import run_command

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CRAWLWARDEN = str(VENV_BIN / "crawlwarden")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TEAM = "vision-data"
TEAM_TOKEN = "vision-secret-token"
OTHER_TEAM = "text-data"
OTHER_TOKEN = "text-secret-token"
ADMIN_TOKEN = "admin-secret-token"
AUDITOR_TOKEN = "auditor-secret-token"
PROJECT = "faces-v2"
# `defaults.respect` with every opt-out signal respected.
RESPECT_ALL = {
    "robots": True,
    "tdmrep": True,
    "noai": True,
    "content_usage": True,
    "image_metadata": True,
}


def installed(name: str, how: str, *elsewhere: str) -> str:
    """The path of a program a test needs (on PATH, or one of `elsewhere`), or a skip saying
    `how` to get it; under CI=true a failure, never a silent skip."""
    import shutil

    import pytest

    found = shutil.which(name) or next((p for p in elsewhere if Path(p).exists()), None)
    if found is None:
        message = f"{name} is not installed ({how})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_HANDED_OUT: set[int] = set()


def exchange(sock: socket.socket, request: str) -> bytes:
    """Send one request that asks `Connection: close` over `sock`, and read the answer until the
    peer closes."""
    sock.sendall(request.encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def free_port() -> int:
    """A loopback port free now, and never one this process handed out before: the kernel may
    give the same one twice in a row (a gateway's proxy and admin ports, and it would not start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- policies --------------------------------------------------------------------------------


def base_policy() -> dict[str, Any]:
    """A permissive test policy: budgets far above what tests send, *.test on 127.0.0.1."""
    return {
        "version": 1,
        "crawler": {
            "user_agent": "TestBot/1.0 (+https://crawler.example/testbot)",
            "robots_tokens": ["TestBot"],
            "contact": "crawl-ops@crawler.example",
        },
        "egress": {"provider": "test-transit", "public_ips": ["203.0.113.7"]},
        "teams": [
            {"name": TEAM, "token_sha256": sha256_hex(TEAM_TOKEN), "projects": [PROJECT]},
            {"name": OTHER_TEAM, "token_sha256": sha256_hex(OTHER_TOKEN), "projects": []},
        ],
        "admin_tokens": [
            {"role": "admin", "token_sha256": sha256_hex(ADMIN_TOKEN)},
            {"role": "auditor", "token_sha256": sha256_hex(AUDITOR_TOKEN)},
        ],
        "defaults": {
            "rate": "1000/s",
            "burst": 1000,
            "max_concurrency": 200,
            "requests_per_day": 1_000_000,
            "requests_per_month": 10_000_000,
            "bytes_per_day": "10GB",
            "respect": {
                "robots": False,
                "tdmrep": False,
                "noai": False,
                "content_usage": False,
                "image_metadata": False,
            },
        },
        "sites": [],
        "blocklist": [],
        "network": {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}},
        "audit": {"checkpoint_every_records": 1000, "checkpoint_every_seconds": 60},
    }


def policy_with(**changes: Any) -> dict[str, Any]:
    """base_policy() with top-level keys replaced; `defaults` is merged, not replaced."""
    policy = base_policy()
    for key, value in changes.items():
        if key == "defaults":
            policy["defaults"] = {**policy["defaults"], **value}
        else:
            policy[key] = copy.deepcopy(value)
    return policy


def write_policy(path: Path, policy: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


# -- a test certificate authority ------------------------------------------------------------


@dataclass
class LocalCA:
    """A CA and a server certificate for *.test, 127.0.0.1 and localhost, written as PEM files."""

    directory: Path
    ca_cert: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    _ca_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _ca_name: x509.Name = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crawlwarden test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self._ca_key, self._ca_name = ca_key, ca_name
        names = ["*.test", "localhost", *[f"site-{c}.test" for c in "abcdefgh"]]
        cert, key = self._leaf(names, with_loopback_ip=True)
        self.ca_cert = self.directory / "ca.pem"
        self.server_cert = self.directory / "server.pem"
        self.server_key = self.directory / "server.key"
        self.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.server_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx

    def server_context_for(self, *names: str) -> ssl.SSLContext:
        """A server context whose certificate (from this CA) names `names` and no address: a
        client that checked the address it connected to instead of the name would refuse it."""
        cert, key = self._leaf(list(names), with_loopback_ip=False)
        stem = "leaf-" + "-".join(n.replace("*", "star") for n in names)
        cert_file, key_file = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def _leaf(
        self, names: list[str], *, with_loopback_ip: bool
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        if with_loopback_ip:
            alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        return cert, key


# -- a loopback site -------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the site received it."""

    method: str
    path: str
    headers: dict[str, str]
    host: str
    body: bytes
    at: float = field(default_factory=time.monotonic)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"hello from the site\n"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/plain"})
    delay: float = 0.0
    chunked: bool = False  # Transfer-Encoding: chunked (1 MiB chunks), no Content-Length


class Site:
    """A real HTTP(S) server on 127.0.0.1 that counts connections and echoes what it received.

    Routes map a path to a Reply or a callable(Seen) -> Reply; unknown paths echo the request
    as JSON (method, path, headers), so tests can see exactly what reached the site.
    """

    def __init__(
        self,
        tls: LocalCA | None = None,
        *,
        names: tuple[str, ...] = (),
        address: tuple[str, int] = ("127.0.0.1", 0),
    ):
        """`names`: serve a certificate for these names only (no address) instead of the CA's
        usual one for every test name and 127.0.0.1. `address`: where to listen (another
        loopback address, or another site's port there)."""
        self.tls = tls
        self.routes: dict[str, Reply | Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(
                    self.command,
                    self.path,
                    {k: v for k, v in self.headers.items()},
                    self.headers.get("Host", ""),
                    body,
                )
                with site._lock:
                    site.seen.append(seen)
                    site.active += 1
                    site.max_active = max(site.max_active, site.active)
                try:
                    route = site.routes.get(self.path.split("?", 1)[0])
                    if route is None:
                        reply = Reply(
                            body=json.dumps(
                                {"method": seen.method, "path": seen.path, "headers": seen.headers}
                            ).encode(),
                            headers={"Content-Type": "application/json"},
                        )
                    elif callable(route):
                        reply = route(seen)
                    else:
                        reply = route
                    if reply.delay:
                        time.sleep(reply.delay)
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    if reply.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if self.command == "HEAD":
                        pass
                    elif reply.chunked:
                        for at in range(0, len(reply.body), 2**20):
                            chunk = reply.body[at : at + 2**20]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.wfile.write(reply.body)
                finally:
                    with site._lock:
                        site.active -= 1

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                with site._lock:
                    site.connections += 1
                if site.tls is not None:
                    sock = site._tls_context.wrap_socket(sock, server_side=True)
                return sock, addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that hang up are part of the tests

        if tls is not None:
            self._tls_context = tls.server_context_for(*names) if names else tls.server_context()
        self.server = Server(address, Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, host: str, path: str = "/") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def count(self, path: str | None = None) -> int:
        with self._lock:
            if path is None:
                return len(self.seen)
            return sum(1 for s in self.seen if s.path == path)

    def paths(self) -> Counter[str]:
        with self._lock:
            return Counter(s.path for s in self.seen)


class RawSite:
    """A TCP server on 127.0.0.1 that answers each connection with `serve(conn)` in a thread of
    its own: for sites that misbehave below HTTP (cut bodies, stalls, resets)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = int(self.sock.getsockname()[1])
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    @staticmethod
    def read_head(conn: socket.socket) -> bytes:
        """A request's head (and what came with it), up to the blank line or the close."""
        head = b""
        while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
            head += data
        return head

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


# -- a gateway process -----------------------------------------------------------------------


# Every Gateway launched, so that a test's own are stopped after it even when it failed
# before stopping them (conftest.py's `workdir` fixture).
LAUNCHED: weakref.WeakSet[Gateway] = weakref.WeakSet()


def our_team(policy: dict[str, Any]) -> dict[str, Any]:
    """TEAM's entry in a policy's `teams` (to change it before a start or a reload)."""
    [team] = [t for t in policy["teams"] if t["name"] == TEAM]
    return team


class Gateway:
    """`crawlwarden run` as a real process on free ports, with its stderr kept in a file."""

    def __init__(
        self,
        workdir: Path,
        policy: dict[str, Any],
        *,
        name: str = "gw",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        trusted_ca: Path | None = None,
        data_dir: Path | None = None,
    ):
        self.workdir = workdir
        self.name = name
        self.policy_file = write_policy(workdir / f"{name}-policy.yaml", policy)
        self.data_dir = data_dir or workdir / f"{name}-data"
        self.port = free_port()
        self.admin_port = free_port()
        self.log_file = workdir / f"{name}.log"
        self.args = [
            CRAWLWARDEN,
            "run",
            "--policy",
            str(self.policy_file),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin",
            f"127.0.0.1:{self.admin_port}",
            "--data-dir",
            str(self.data_dir),
            "--replica-id",
            name,
            *(["--upstream-trusted-ca", str(trusted_ca)] if trusted_ca else []),
            *(extra_args or []),
        ]
        # Started under -O as `crawlwarden run` restarts itself (proxy/cli.py), which spares each
        # start a second interpreter (test_the_gateway_restarts_itself_under_python_optimize
        # leaves it unset: that start is the command as users run it, and an exec, where the others
        # are forked from a process that has imported the gateway: tests/forked_gateways.py).
        self.env = {"PYTHONOPTIMIZE": "1", **os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy_url(self, user: str = TEAM, token: str = TEAM_TOKEN) -> str:
        return f"http://{user}:{token}@127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "mitmproxy-ca-cert.pem"

    def start(self, timeout: float = 30.0) -> Gateway:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Gateway:
        """Start the process without waiting (start several, then wait_ready each)."""
        if forks(self.args, self.env):
            self.proc = fork_gateway(self.args, self.env, self.log_file)
        else:
            log = self.log_file.open("ab")
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=self.env)
            log.close()
        LAUNCHED.add(self)
        return self

    def wait_ready(self, timeout: float = 30.0) -> Gateway:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        port_tries = 3
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if port_tries and self._lost_a_port_race():
                    port_tries -= 1
                    self.launch()
                    continue
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.admin + "/readyz", timeout=1) as r:
                    if r.status == 200 and self._proxy_listening():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.logs()}")

    def _lost_a_port_race(self) -> bool:
        """Whether the gateway exited because another process took a port free_port gave
        (something else on the machine bound it in between): if so, it gets new ones."""
        lines = self.logs().strip().splitlines()
        if not lines or "address already in use" not in lines[-1]:
            return False
        self.port, self.admin_port = free_port(), free_port()
        for flag, port in (("--listen", self.port), ("--admin", self.admin_port)):
            self.args[self.args.index(flag) + 1] = f"127.0.0.1:{port}"
        return True

    def _proxy_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None:
            self.assert_nothing_crashed()
            self.assert_nothing_left_undecided()

    def assert_nothing_left_undecided(self) -> None:
        """Every request that came in was forwarded or recorded by the stop: one the gateway
        lost count of would hold every drain for its whole --drain-seconds."""
        stuck = [e for e in self.log_events("drain_timeout") if e.get("deciding")]
        assert not stuck, stuck

    def assert_nothing_crashed(self) -> None:
        """No mitmproxy layer and no addon hook raised in this gateway's life: a crash there
        drops the connection (and maybe the record) while the test may still pass."""
        crashes = [
            e
            for e in self.log_events()
            if str(e.get("event", "")).startswith(("mitmproxy has crashed", "Addon error"))
        ]
        assert not crashes, json.dumps(crashes[:3], indent=1)[-4000:]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_digest(self, lines: int = 40, width: int = 400) -> str:
        """What a failed test shows of this gateway's log (tests/conftest.py): its last `lines`
        lines, and before them up to as many of its warnings, errors and lines that are not
        JSON (a traceback), each cut at `width` characters. A CI run's temporary directories
        are gone with its machine: this is what is left to tell a flake by."""
        every = self.logs().splitlines()
        tail = every[-lines:]
        notable = []
        for line in every[: len(every) - len(tail)]:
            try:
                level = json.loads(line).get("level")
            except (ValueError, AttributeError):
                level = "unparsed"
            if level in ("warning", "error", "critical", "unparsed"):
                notable.append(line)
        parts = []
        if notable:
            parts += [f"-- {len(notable)} warnings, errors and other lines before the last:"]
            parts += notable[-lines:]
        parts += [f"-- the last {len(tail)} of {len(every)} lines:", *tail]
        parts = [line if len(line) <= width else line[:width] + " [...]" for line in parts]
        return "\n".join(parts)

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if event is None or entry.get("event") == event:
                out.append(entry)
        return out

    def reload_with(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """The policy file as `change` leaves it, reloaded through the admin API (which must
        take it); the reload's answer (`policy_version`)."""
        policy = yaml.safe_load(self.policy_file.read_text())
        change(policy)
        self.policy_file.write_text(yaml.safe_dump(policy))
        status, body = self.admin_request("POST", "/v1/policy/reload", token=ADMIN_TOKEN)
        assert status == 200, body
        return body

    def admin_request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the gateway's /metrics (0 if it has none with those labels). As an
        auditor: /metrics is public, unless the policy has a metrics token (then it needs one)."""
        from prometheus_client.parser import text_string_to_metric_families

        asked = urllib.request.Request(
            self.admin + "/metrics", headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}
        )
        with urllib.request.urlopen(asked, timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return sample.value
        return 0.0

    def export(self, *args: str) -> list[dict[str, Any]]:
        out = run_command(
            [CRAWLWARDEN, "audit", "export", "--data-dir", str(self.data_dir), *args],
            check=True,
        ).stdout.decode()
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def fetch_records(self, timeout: float = 10.0, **filters: str) -> list[dict[str, Any]]:
        """Fetch records as `audit export` shows them (waiting for the store to catch up)."""
        args = [a for k, v in filters.items() for a in (f"--{k}", v)]
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.export(*args) if r.get("type", "record") == "record"]
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                return records
            time.sleep(0.3)
            again = [r for r in self.export(*args) if r.get("type", "record") == "record"]
            if len(again) == len(records):
                return again


# -- curl ------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]
    body: bytes
    returncode: int
    stderr: str
    version: str = ""  # of the last response: "HTTP/1.1", "HTTP/2"

    def json(self) -> Any:
        return json.loads(self.body)


def curl(
    url: str,
    *,
    proxy: str | None = None,
    headers: dict[str, str] | None = None,
    cacert: Path | None = None,
    method: str | None = None,
    data: bytes | None = None,
    timeout: float = 20,
    extra: list[str] | None = None,
) -> CurlResult:
    """Run the real curl; returns the last response's status, headers and body."""
    args = ["curl", "-sS", "--max-time", str(timeout), "-D", "-", "-o", "-"]
    args += ["--noproxy", ""]
    if proxy:
        args += ["-x", proxy]
    if cacert:
        args += ["--cacert", str(cacert)]
    if method:
        args += ["-X", method]
    if data is not None:
        args += ["--data-binary", "@-"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    args += extra or []
    args.append(url)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run(args, input=data, capture_output=True, timeout=timeout + 10, env=env)
    return _parse_curl(proc.stdout, proc.returncode, proc.stderr.decode(errors="replace"))


def _parse_curl(raw: bytes, returncode: int, stderr: str) -> CurlResult:
    status, headers, rest, version = 0, {}, raw, ""
    # With a proxy, curl prints the CONNECT response block first; keep the last block.
    while rest.startswith(b"HTTP/"):
        head, sep, body = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split()[0], int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        rest = body
        if not rest.startswith(b"HTTP/"):
            break
    return CurlResult(status, headers, rest, returncode, stderr, version)


def tls_tunnel(
    gateway: Gateway, authority: str, *, alpn: str, timeout: float = 30
) -> ssl.SSLSocket:
    """A CONNECT tunnel through the gateway to `authority` (the test team's credentials), with
    TLS inside it: the gateway's certificate checked for the host, `alpn` offered alone."""
    raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout)
    try:
        raw.sendall(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n\r\n".encode()
        )
        head = raw.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        context = ssl.create_default_context(cafile=str(gateway.ca_cert))
        context.set_alpn_protocols([alpn])
        tls = context.wrap_socket(raw, server_hostname=authority.rsplit(":", 1)[0])
    except BaseException:
        raw.close()
        raise
    assert tls.selected_alpn_protocol() == alpn
    return tls


# -- HTTP/2 ----------------------------------------------------------------------------------


@dataclass
class H2Answer:
    headers: dict[str, str]
    body: bytes = b""
    end: str = ""  # how the stream ended: "ended", "reset", or "closed" (the connection)
    reset: bool = False  # RST_STREAM came (after the answer, or instead of it)

    def json(self) -> Any:
        return json.loads(self.body)


class H2Client:
    """HTTP/2 on an open connection (TLS with ALPN h2, or h2c): requests one after another, all
    on that one connection, so a test can show it still serves after a stream failed."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()

    def get(
        self,
        authority: str,
        path: str,
        *headers: tuple[str, str],
        scheme: str = "https",
        method: str = "GET",
    ) -> H2Answer:
        """A GET (or another `method` without a body) and its whole answer."""
        stream = self._start(method, authority, path, headers, scheme, end_stream=True)
        answer = H2Answer({})
        while not answer.end:
            self._receive(stream, answer, timeout=None)
        return answer

    def post_without_length(
        self,
        authority: str,
        path: str,
        body: bytes,
        *headers: tuple[str, str],
        method: str = "POST",
    ) -> tuple[H2Answer, int]:
        """A POST (or `method`) whose body declares no length (no content-length), sent as flow
        control allows, on after an early answer too, until all is sent or the stream is reset:
        the answer, and how much was sent."""
        stream = self._start(method, authority, path, headers, "https", end_stream=False)
        answer, sent = H2Answer({}), 0
        while not (answer.reset or answer.end == "closed" or (answer.end and sent == len(body))):
            if sent < len(body):
                window = min(
                    self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size
                )
                if window > 0:
                    self.conn.send_data(stream, body[sent : sent + window])
                    sent += min(window, len(body) - sent)
                    if sent == len(body):
                        self.conn.end_stream(stream)
                    self.sock.sendall(self.conn.data_to_send())
                    self._receive(stream, answer, timeout=0)
                    continue
            self._receive(stream, answer, timeout=None)
        return answer, sent

    def _start(
        self,
        method: str,
        authority: str,
        path: str,
        headers: tuple[tuple[str, str], ...],
        scheme: str,
        *,
        end_stream: bool,
    ) -> int:
        stream = self.conn.get_next_available_stream_id()
        pseudo = [(":method", method), (":scheme", scheme), (":authority", authority)]
        self.conn.send_headers(stream, [*pseudo, (":path", path), *headers], end_stream=end_stream)
        self.sock.sendall(self.conn.data_to_send())
        return stream

    def get_together(
        self,
        authority: str,
        paths: list[tuple[str, float]],
        *headers: tuple[str, str],
        within: float = 60,
    ) -> list[H2Answer]:
        """GETs on streams of their own, each (path, seconds) sent that long after the one
        before, all open at once: their answers as they are after `within` seconds at most
        (`end` empty: not ended then)."""
        deadline = time.monotonic() + within
        answers: dict[int, H2Answer] = {}
        for path, after in paths:
            time.sleep(after)
            answers[self._start("GET", authority, path, headers, "https", end_stream=True)] = (
                H2Answer({})
            )
        while not all(a.end for a in answers.values()) and time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self._receive_all(answers, timeout=None)
            except TimeoutError:
                break
        return list(answers.values())

    def _receive(self, stream: int, answer: H2Answer, *, timeout: float | None) -> None:
        """Read what is there (waiting for it unless `timeout` is 0) into `answer`."""
        self._receive_all({stream: answer}, timeout=timeout)

    def _receive_all(self, answers: dict[int, H2Answer], *, timeout: float | None) -> None:
        """Read what is there (waiting for it unless `timeout` is 0) into the answers of the
        streams `answers` names."""
        if timeout == 0:
            ready, _, _ = select.select([self.sock], [], [], 0)
            pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
            if not ready and not pending:
                return
        data = self.sock.recv(65536)
        if not data:
            for answer in answers.values():
                answer.end = answer.end or "closed"
            return
        for event in self.conn.receive_data(data):
            stream = getattr(event, "stream_id", None)
            answer = answers.get(stream)  # type: ignore[arg-type]
            if answer is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                answer.headers.update({k.decode(): v.decode() for k, v in event.headers})
            elif isinstance(event, h2.events.DataReceived):
                answer.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded):
                answer.end = "ended"
            elif isinstance(event, h2.events.StreamReset):
                answer.end = answer.end or "reset"
                answer.reset = True
        self.sock.sendall(self.conn.data_to_send())


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """`path` (a directory or a file) that the gateway may not write: immutable for root (mode
    bits do not stop root), read-only mode bits otherwise."""
    import pytest

    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make {path} immutable here: {made.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        return
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        path.chmod(mode)
