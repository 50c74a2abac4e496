"""crawlwarden's benchmark: the gateway against bare mitmdump, on this machine, in one run.

    make bench                                   the full matrix (about 10 minutes)
    .venv/bin/python bench/run.py --quick        a smoke test (two targets, two cells, ~30 s)
    .venv/bin/python bench/run.py --soak [--rate N] [--soak-requests 100000]
    .venv/bin/python bench/run.py --replicas     one vs two gateway replicas sharing Redis

Everything listens on 127.0.0.1 and every loop is bounded in requests and in time. What runs:

- upstream: nginx (Debian's nginx-light; `make bench` installs it when missing), one worker,
  HTTP and HTTPS (a test CA made here), static JPEG-shaped bodies of 1 KiB and 100 KiB,
  /robots.txt allowing everything and an empty /.well-known/tdmrep.json.
- targets, all running at once and measured one after the other for each cell, so each ratio
  compares numbers taken a minute apart at most:
    bare        `mitmdump -q` with the gateway's mitmproxy options (proxy.app.mitmproxy_options)
                and mitmproxy's default addons; -q only silences the per-flow terminal output.
    bare-O      the same under python -O (PYTHONOPTIMIZE=1), as `crawlwarden run` runs: -O
                compiles out mitmproxy's debug-only checks, so this is the like-for-like floor.
    core        mitmproxy as the gateway builds it (the curated addons of
                proxy.app.gateway_addons), without the crawlwarden addon (bench/mitm_core.py),
                under -O too.
    embedded    `crawlwarden run` (which restarts itself under -O, proxy/cli.py): budgets in
                process, fetch log in SQLite.
    embedded-pg embedded, but the fetch log in PostgreSQL (fetch-log cost vs SQLite).
    shared      `crawlwarden run --redis-url --audit-dsn`: its own throwaway redis-server and a
                fresh database on 127.0.0.1:5432 (user postgres).
  Every gateway runs a policy with every opt-out check on (robots, TDMRep, noai, Content-Usage,
  image metadata), signed checkpoints every 1000 records, 8 sites s1..s8.bench.test as policy site
  rules (network.static_hosts -> 127.0.0.1) and budgets high enough that nothing is refused; the
  run checks that nothing was.
- cells: plain HTTP and HTTPS through CONNECT x 1 KiB and 100 KiB x 8 and 64 keep-alive
  connections, driven by bench/loadgen.py (a separate process; its own CPU is reported).

Per cell and target: requests/s, p50/p99 latency, the proxy's CPU seconds per 1000 requests and
peak RSS (from /proc), Redis commands per request (INFO commandstats), the gateway's own
governance p99 (crawlwarden_request_duration_seconds{phase="governance"}), and ratios to bare
(and to bare-O when it ran).
Results: bench/results/<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Appended, not put first: bench/micro.py imports this module, and a checkout given in
    # PYTHONPATH (an older version to compare with) must stay the one imported.
    sys.path.append(str(ROOT))

from proxy.app import mitmproxy_options  # noqa: E402
from proxy.runtime import Settings  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
VENV_BIN = Path(sys.executable).parent
TEAM, TOKEN, PROJECT = "bench", "bench-token", "bench"
SITES = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
GATEWAYS = ("embedded", "embedded-pg", "shared")
ALL_TARGETS = ("bare", "bare-O", "core", *GATEWAYS)
BODIES = {"1k": 1024, "100k": 100 * 1024, "500k": 500 * 1024}
# A refused cell asks for a blocklisted site: the gateway answers 451 itself, nothing leaves.
REFUSED_HOST = "www.stockco.example"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# -- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc/PID/stat."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its direct children (nginx: the master and its worker)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of all a process's threads, so far. A thread
    that waits for the GIL, and the event loop that wakes it at every system call, show here."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (Linux clear_refs 5), so each cell reports its own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """RSS of some processes every `interval` seconds, until stopped (bounded by `limit`)."""

    def __init__(self, pids: dict[str, int], interval: float, limit: int = 100_000):
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.limit = limit
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set() and len(self.samples) < self.limit:
            row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2)}
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    row[name] = rss_bytes(pid)
            self.samples.append(row)
            self._halt.wait(self.interval)

    def stop(self) -> list[dict[str, Any]]:
        self._halt.set()
        self.join(5)
        return self.samples


# -- certificates, files, policy --------------------------------------------------------------


def make_certs(directory: Path) -> dict[str, Path]:
    """A test CA and a server certificate for *.bench.test, localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crawlwarden bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("*.bench.test"),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    out = {"ca": directory / "ca.pem", "cert": directory / "server.pem"}
    out["key"] = directory / "server.key"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out


def page_body() -> bytes:
    """An HTML page as sites send them: a 3 KiB head, ~100 KiB of body markup, gzipped (the
    `page` body: the opt-out scan reads its head, decoded)."""
    head = (
        b'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>A page</title>'
        + b'<meta name="viewport" content="width=device-width, initial-scale=1">'
        + b'<link rel="stylesheet" href="/static/site.css">' * 40
        + b'<script src="/static/app.js" defer></script></head>'
    )
    item = b'<li class="item"><a href="/item/%d"><img src="/img/%d.jpg" alt="item %d"></a>'
    items = b"".join(item % (i, i, i) + b"<p>A line of text about it.</p></li>" for i in range(900))
    body = b"<body><main><ul>" + items + b"</ul></main></body></html>"
    return gzip.compress(head + body, mtime=0)


def photo_body(size: int = 2 * 2**20) -> bytes:
    """A photo as stock sites send them (the `photo` body): a JPEG of `size` bytes whose APP1
    XMP packet carries ~8 KiB of keywords and rights, and no DataMining (nothing is withheld)."""
    keywords = b"".join(b"<rdf:li>keyword %d</rdf:li>" % i for i in range(300))
    xmp = (
        b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        b'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        b'xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/" xmpRights:Marked="True">'
        b"<dc:subject><rdf:Bag>" + keywords + b"</rdf:Bag></dc:subject>"
        b'<dc:rights><rdf:Alt><rdf:li xml:lang="x-default">(c) A Photographer</rdf:li>'
        b'</rdf:Alt></dc:rights></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    app1 = b"http://ns.adobe.com/xap/1.0/\x00" + xmp
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    jpeg = jpeg_body(size - len(segment))
    return jpeg[:2] + segment + jpeg[2:]  # after SOI


def body_path(body: str) -> str:
    return "/page.html" if body == "page" else f"/{body}.jpg"


def jpeg_body(size: int) -> bytes:
    """A JPEG-shaped body of exactly `size` bytes: SOI, APP0 JFIF, a comment, SOS, data, EOI.

    The gateway's image-metadata scanner walks its segments as it would a real photo's (and finds
    no XMP, IPTC or C2PA: nothing is withheld).
    """
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    comment = b"crawlwarden benchmark body"
    com = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    head = b"\xff\xd8" + app0 + com + sos
    filler = size - len(head) - 2
    assert filler > 0
    data = bytes((i * 7 + 13) % 255 for i in range(filler))  # never 0xff: no marker inside
    return head + data + b"\xff\xd9"


def policy(key_file: Path) -> dict[str, Any]:
    import hashlib

    on = {"robots": True, "tdmrep": True, "noai": True, "content_usage": True}
    return {
        "version": 1,
        "crawler": {
            "user_agent": "BenchBot/1.0 (+https://crawler.example/benchbot)",
            "robots_tokens": ["BenchBot"],
            "contact": "crawl-ops@crawler.example",
        },
        "egress": {"provider": "bench-transit", "public_ips": ["203.0.113.7"]},
        "teams": [
            {
                "name": TEAM,
                "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                "projects": [PROJECT],
            }
        ],
        "admin_tokens": [
            {"role": "admin", "token_sha256": hashlib.sha256(b"bench-admin").hexdigest()}
        ],
        "defaults": {
            "rate": "100000/s",
            "burst": 100000,
            "max_concurrency": 10000,
            "requests_per_day": 1_000_000_000,
            "requests_per_month": 10_000_000_000,
            "bytes_per_day": "10TB",
            "on_exceed": "reject",
            "respect": {**on, "image_metadata": True},
        },
        "sites": [{"id": f"site-{n}", "match": [f"s{n}.bench.test"]} for n in range(1, SITES + 1)],
        "blocklist": [
            {
                "id": "tos-stockco",
                "match": ["stockco.example"],
                "reason": "Terms of service section 7 prohibit automated collection",
                "source": "https://stockco.example/terms",
            }
        ],
        "network": {
            "allow_private": ["127.0.0.0/8"],
            "static_hosts": {"*.bench.test": "127.0.0.1"},
        },
        "audit": {
            "signing_key_file": str(key_file),
            "checkpoint_every_records": 1000,
            "checkpoint_every_seconds": 60,
            "spool_max_bytes": "4GB",
        },
    }


# -- services -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    cafile: Path | None = None
    admin_port: int | None = None
    connect_to_address: bool = False  # bare/core: send 127.0.0.1, keep the name in Host/SNI
    log_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    procs: list[Proc] = field(default_factory=list)
    upstream: dict[str, Any] = field(default_factory=dict)
    redis_port: int | None = None
    pg_db: str | None = None
    certs: dict[str, Path] = field(default_factory=dict)

    # upstream ---------------------------------------------------------------------------

    def start_upstream(self) -> None:
        root = self.work / "www"
        (root / ".well-known").mkdir(parents=True, exist_ok=True)
        for name, size in BODIES.items():
            (root / f"{name}.jpg").write_bytes(jpeg_body(size))
        (root / "page.html").write_bytes(page_body())
        (root / "photo.jpg").write_bytes(photo_body())
        (root / "robots.txt").write_text("User-agent: *\nAllow: /\n")
        (root / ".well-known" / "tdmrep.json").write_text("[]\n")
        http_port, https_port = free_port(), free_port()
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if nginx is None:
            raise SystemExit(
                "bench: nginx is not installed; `make bench` installs it (apt-get install "
                "nginx-light), or install it yourself"
            )
        conf = self.work / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 4096; }}
http {{
    types {{ image/jpeg jpg; text/plain txt; application/json json; }}
    default_type application/octet-stream;
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {self.work}/nginx-tmp;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {self.certs["cert"]};
        ssl_certificate_key {self.certs["key"]};
        root {root};
        location = /robots.txt {{ default_type text/plain; }}
        location = /page.html {{
            default_type "text/html; charset=utf-8";
            add_header Content-Encoding gzip;
        }}
    }}
}}
"""
        )
        proc = subprocess.Popen(
            [nginx, "-p", str(self.work), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.work / "nginx.out").open("wb"),
        )
        wait_port(http_port, proc)
        wait_port(https_port, proc)
        self.procs.append(Proc("nginx", proc, http_port))
        self.upstream = {
            "server": "nginx",
            "version": _version([nginx, "-v"]),
            "http_port": http_port,
            "https_port": https_port,
            "pid": proc.pid,
        }
        log(f"upstream nginx on :{http_port} (http) and :{https_port} (https)")

    # shared state -------------------------------------------------------------------------

    def start_redis(self) -> None:
        port = free_port()
        rdir = self.work / "redis"
        rdir.mkdir()
        proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(rdir),
            ],
            stdout=(rdir / "redis.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port(port, proc)
        self.procs.append(Proc("redis", proc, port))
        self.redis_port = port
        log(f"redis-server on :{port}")

    def create_database(self) -> str:
        name = f"crawlwarden_bench_{os.getpid()}_{int(time.time())}"
        _psql(f'CREATE DATABASE "{name}"')
        self.pg_db = name
        log(f"PostgreSQL database {name}")
        return f"postgresql://postgres@127.0.0.1:5432/{name}"

    def drop_database(self) -> None:
        if self.pg_db:
            with contextlib.suppress(Exception):
                _psql(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')

    def redis_commands(self) -> dict[str, int]:
        """calls per command from INFO commandstats (the INFO call itself excluded)."""
        if self.redis_port is None:
            return {}
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.redis_port)
        try:
            stats = r.info("commandstats")
        finally:
            r.close()
        out = {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name in ("info",):
                continue
            out[name] = int(value["calls"])
        return out

    # proxies ------------------------------------------------------------------------------

    def start_bare(self, *, optimized: bool = False, name: str | None = None) -> Proc:
        """mitmdump as installed; `optimized`: under python -O, as `crawlwarden run` runs.
        `name` tells a second one apart (its own confdir and log)."""
        name = name or ("bare-O" if optimized else "bare")
        port = free_port()
        confdir = self.work / f"{name}-conf"
        settings = Settings(
            policy_file=Path("unused"),
            listen_port=port,
            data_dir=confdir,
            upstream_trusted_ca=self.certs["ca"],
        )
        confdir.mkdir()
        sets: list[str] = []
        for key, value in mitmproxy_options(settings).items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            sets += ["--set", f"{key}={value}"]
        logf = self.work / f"{name}.log"
        env = {**os.environ, "PYTHONOPTIMIZE": "1" if optimized else ""}
        proc = subprocess.Popen(
            [str(VENV_BIN / "mitmdump"), "-q", *sets],
            stdout=logf.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_port(port, proc)
        p = Proc(name, proc, port, confdir / "mitmproxy-ca-cert.pem", None, True, logf)
        self.procs.append(p)
        return p

    def start_core(self) -> Proc:
        port = free_port()
        confdir = self.work / "core-conf"
        logf = self.work / "core.log"
        proc = subprocess.Popen(
            [
                PY,
                str(BENCH / "mitm_core.py"),
                "--port",
                str(port),
                "--confdir",
                str(confdir),
                "--trusted-ca",
                str(self.certs["ca"]),
            ],
            stdout=logf.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            # Under -O as `crawlwarden run` is (proxy/cli.py): core -> gateway is governance alone.
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONOPTIMIZE": "1"},
        )
        wait_port(port, proc)
        p = Proc("core", proc, port, confdir / "mitmproxy-ca-cert.pem", None, True, logf)
        self.procs.append(p)
        return p

    def start_gateway(
        self,
        name: str,
        *,
        redis: bool,
        pg_dsn: str | None,
        policy_file: Path,
        source_tree: Path | None = None,
    ) -> Proc:
        port, admin = free_port(), free_port()
        data = self.work / f"{name}-data"
        logf = self.work / f"{name}.log"
        cmd = [
            str(VENV_BIN / "crawlwarden"),
            "run",
            "--policy",
            str(policy_file),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--data-dir",
            str(data),
            "--replica-id",
            name,
            "--upstream-trusted-ca",
            str(self.certs["ca"]),
        ]
        if redis:
            cmd += ["--redis-url", f"redis://127.0.0.1:{self.redis_port}/0"]
        if pg_dsn:
            cmd += ["--audit-dsn", pg_dsn]
        # The decision log line stays on: it is part of the cost, written to a file as a
        # container runtime would take it from stderr.
        env = dict(os.environ)
        wrapper = os.environ.get("BENCH_GATEWAY_WRAPPER")  # diagnostics: a script that runs
        if wrapper:  # proxy.cli.main() with the same arguments (e.g. under tracemalloc)
            cmd = [PY, wrapper, *cmd[1:]]
        if source_tree is not None:
            # Another checkout's proxy/ and addons/ (e.g. before an optimisation), same venv.
            env["PYTHONPATH"] = str(source_tree)
        proc = subprocess.Popen(cmd, stdout=logf.open("wb"), stderr=subprocess.STDOUT, env=env)
        p = Proc(name, proc, port, data / "mitmproxy-ca-cert.pem", admin, False, logf)
        self.procs.append(p)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{logf.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        wait_port(port, proc)
                        return p
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after 60s:\n{logf.read_text()[-3000:]}")

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        self.drop_database()


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "postgres", "-qAtc", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"


# -- the gateway's own metrics --------------------------------------------------------------


def scrape(p: Proc) -> dict[str, Any]:
    """The governance histogram's buckets and request counts by decision, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    if p.admin_port is None:
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets: dict[float, float] = {}
    decisions: dict[str, float] = {}
    redis_ops: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "crawlwarden_request_duration_seconds_bucket"
                and s.labels.get("phase") == "governance"
            ):
                buckets[float(s.labels["le"])] = s.value
            elif s.name == "crawlwarden_requests_total":
                key = f"{s.labels['decision']}:{s.labels['reason']}"
                decisions[key] = decisions.get(key, 0) + s.value
            elif s.name == "crawlwarden_redis_duration_seconds_count":
                redis_ops[s.labels["op"]] = s.value
    return {"buckets": buckets, "decisions": decisions, "redis_ops": redis_ops}


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> Any:
    """Prometheus' histogram_quantile over the difference of two scrapes (seconds)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(
                count - prev_count, 1e-9
            )
        prev_bound, prev_count = bound, count
    return None


def share_below(bound: float, before: dict[float, float], after: dict[float, float]) -> Any:
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if total <= 0:
        return None
    return (after.get(bound, 0.0) - before.get(bound, 0.0)) / total


# -- one measured cell ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    scheme: str
    body: str
    conns: int
    rate: float | None = None  # paced to this many requests/s (None: as fast as it goes)

    @property
    def name(self) -> str:
        paced = f"-r{self.rate:g}" if self.rate else ""
        return f"{self.scheme}-{self.body}-c{self.conns}{paced}"


def run_load(
    bench: Bench,
    targets: list[Proc],
    cell: Cell,
    *,
    warmup: float,
    duration: float,
    max_requests: int = 0,
    rate: float | None = None,
    rss_interval: float = 0.5,
    cafile: Path | None = None,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Drive one cell through one proxy (or spread over several replicas) and measure it."""
    up = bench.upstream
    port = up["https_port"] if cell.scheme == "https" else up["http_port"]
    refusal_cell = cell.scheme == "refused"
    first = targets[0]
    cmd = [
        PY,
        str(BENCH / "loadgen.py"),
        "--proxy",
        ",".join(f"127.0.0.1:{t.port}" for t in targets),
        "--scheme",
        "http" if refusal_cell else cell.scheme,
        "--target",
        f"{REFUSED_HOST}:80" if refusal_cell else f"s{{n}}.bench.test:{port}",
        "--path",
        body_path(cell.body),
        "--conns",
        str(cell.conns),
        "--sites",
        str(SITES),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        "--max-requests",
        str(max_requests),
        "--cafile",
        str(cafile or first.cafile),
        "--user",
        TEAM,
        "--token",
        TOKEN,
        "--project",
        PROJECT,
        "--sample-every",
        str(max(1.0, min(5.0, duration / 20))),
    ]
    if first.connect_to_address and not refusal_cell:
        cmd += ["--connect-to", f"127.0.0.1:{port}"]
    rate = rate or cell.rate
    if rate:
        cmd += ["--rate", str(rate)]
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert gen.stdout is not None
    line = gen.stdout.readline()
    if line.strip() != "warm":
        gen.wait(30)
        raise RuntimeError(f"loadgen failed: {line}{gen.stderr.read() if gen.stderr else ''}")
    pids = {t.name: t.pid for t in targets}
    load0 = os.getloadavg()
    cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
    switches0 = {n: context_switches(pid) for n, pid in pids.items()}
    for pid in pids.values():
        reset_peak_rss(pid)
    rss0 = {n: rss_bytes(pid) for n, pid in pids.items()}
    redis0 = bench.redis_commands()
    metrics0 = [scrape(t) for t in targets]
    other0 = {p.name: tree_cpu_seconds(p.pid) for p in bench.procs if p.name in ("nginx", "redis")}
    sampler = RssSampler(pids, rss_interval)
    sampler.start()
    spy = None
    if profile_dir is not None and len(targets) == 1:
        # Collapsed stacks of the measured window (py-spy samples without stopping the process).
        profile_dir.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [
                str(VENV_BIN / "py-spy"),
                "record",
                "--pid",
                str(first.pid),
                "--duration",
                str(max(1, int(duration))),
                # Blocking samples (the process pauses ~0.1 ms per sample): --nonblocking lost
                # most of the event loop's stacks here, which left the profile unreadable.
                "--rate",
                "100",
                "--format",
                "raw",
                "--output",
                str(profile_dir / f"{first.name}-{cell.name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    out, err = gen.communicate(timeout=warmup + duration + 120)
    if spy is not None:
        spy.wait(60)
    samples = sampler.stop()
    cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
    switches1 = {n: context_switches(pid) for n, pid in pids.items()}
    peaks = {n: peak_rss_bytes(pid) for n, pid in pids.items()}
    redis1 = bench.redis_commands()
    metrics1 = [scrape(t) for t in targets]
    other1 = {p.name: tree_cpu_seconds(p.pid) for p in bench.procs if p.name in ("nginx", "redis")}
    load1 = os.getloadavg()
    if gen.returncode != 0:
        raise RuntimeError(f"loadgen exited {gen.returncode}: {err[-2000:]}")
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    n = max(res["requests"], 1)
    cpu = sum(cpu1[k] - cpu0[k] for k in cpu1)
    res["proxy_cpu_s"] = round(cpu, 3)
    res["cpu_s_per_1000"] = round(cpu / n * 1000, 4)
    res["switches_per_request"] = round(sum(switches1[k] - switches0[k] for k in switches1) / n, 3)
    res["proxy_cpu_share"] = round(cpu / res["seconds"], 3) if res["seconds"] else None
    res["peak_rss_mb"] = round(max(peaks.values()) / 2**20, 1)
    res["rss_start_mb"] = round(sum(rss0.values()) / 2**20, 1)
    res["rss_samples"] = samples
    res["loadavg"] = [round(x, 2) for x in (*load0, *load1)]
    res["other_cpu_s"] = {k: round(other1[k] - other0.get(k, 0.0), 3) for k in other1}
    expected = "451" if refusal_cell else "200"
    res["non_200"] = sum(v for k, v in res["statuses"].items() if k != expected)
    if redis0 or redis1:
        delta = {k: v - redis0.get(k, 0) for k, v in redis1.items() if v - redis0.get(k, 0) > 0}
        res["redis_commands"] = delta
        # commandstats counts the commands a script runs too: all of them, and the script calls.
        res["redis_commands_per_request"] = round(sum(delta.values()) / n, 3)
        scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
        res["redis_script_calls_per_request"] = round(scripts / n, 3)
    if any(metrics1):
        buckets0: dict[float, float] = {}
        buckets1: dict[float, float] = {}
        refused = 0.0
        forwarded = 0.0
        refused_by: dict[str, int] = {}
        interrupted = 0.0
        redis_ops: dict[str, float] = {}
        for m0, m1 in zip(metrics0, metrics1, strict=True):
            for b, v in m0["buckets"].items():
                buckets0[b] = buckets0.get(b, 0.0) + v
            for b, v in m1["buckets"].items():
                buckets1[b] = buckets1.get(b, 0.0) + v
            for key, v in m1["decisions"].items():
                d = v - m0["decisions"].get(key, 0.0)
                if refusal_cell and key.startswith("refused:tos_blocklist"):
                    forwarded += d  # the expected outcome of this cell
                elif key == "refused:interrupted":
                    # The load generator closing its connections at the cell's end, requests
                    # in flight (up to one per connection): the scraper left, not a refusal.
                    interrupted += d
                elif key.startswith("refused") or key.startswith("withheld"):
                    refused += d
                    if d:
                        refused_by[key] = refused_by.get(key, 0) + int(d)
                elif key.startswith("forwarded"):
                    forwarded += d
            for op, v in m1["redis_ops"].items():
                redis_ops[op] = redis_ops.get(op, 0.0) + v - m0["redis_ops"].get(op, 0.0)
        p99 = histogram_quantile(0.99, buckets0, buckets1)
        p50 = histogram_quantile(0.50, buckets0, buckets1)
        res["governance_p50_ms"] = None if p50 is None else round(p50 * 1000, 3)
        res["governance_p99_ms"] = None if p99 is None else round(p99 * 1000, 3)
        below = share_below(0.002, buckets0, buckets1)
        res["governance_share_under_2ms"] = None if below is None else round(below, 5)
        res["gateway_refused_or_withheld"] = int(refused)
        res["gateway_refused_by_reason"] = refused_by
        res["gateway_interrupted"] = int(interrupted)
        res["gateway_forwarded"] = int(forwarded)
        res["redis_round_trips"] = {k: int(v) for k, v in redis_ops.items() if v}
        if redis_ops:
            # The gateway's own count of round trips (crawlwarden_redis_duration_seconds):
            # `admit` is the decision's; settlements are batched off the request path.
            res["redis_round_trips_per_request"] = round(sum(redis_ops.values()) / n, 3)
            res["redis_decision_round_trips_per_request"] = round(
                redis_ops.get("admit", 0.0) / n, 3
            )
    return res


# -- the matrix -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def read(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return ""

    lscpu = {}
    for line in read(["lscpu"]).splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
            lscpu[k.strip()] = v.strip()
    mem = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = f"{int(line.split()[1]) // 1024} MiB"
    from importlib import metadata

    return {
        "cpu": lscpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": metadata.version("mitmproxy"),
        "redis_server": _version(["redis-server", "--version"]),
        "postgresql": _version(["psql", "--version"]),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": read(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip(),
        # Others' uncommitted edits of the code under test, if any (a shared work tree).
        "uncommitted": read(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "proxy", "addons"]
        ).split("\n")[:-1],
    }


def cells_for(args: argparse.Namespace) -> list[Cell]:
    if args.quick:
        return [Cell("http", "1k", 8), Cell("https", "1k", 8)]
    bodies = args.bodies.split(",")
    cells = [
        Cell(s, b, c)
        for s in args.schemes.split(",")
        for b in bodies
        for c in (int(x) for x in args.conns.split(","))
        if s != "refused" or b == bodies[0]  # a refusal has no body from the site
    ]
    # Paced cells: latency and governance p99 below saturation (a closed loop at full speed
    # measures queueing in the event loop as much as the work).
    for r in (float(x) for x in args.paced.split(",") if x):
        cells += [Cell("http", "1k", 8, r), Cell("https", "1k", 8, r)]
    return cells


def ratio(a: Any, b: Any) -> Any:
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def add_ratios(table: dict[str, dict[str, Any]]) -> None:
    """Each target's figures as a ratio to bare mitmdump of the same cell and repeat, and to
    bare mitmdump under python -O (as the gateway runs) when it was measured too."""
    bare_o = table.get("bare-O")
    if bare_o is not None:
        for name, res in table.items():
            if name != "bare-O":
                res["vs_bare_o"] = {
                    "rps": ratio(res["rps"], bare_o["rps"]),
                    "cpu_per_1000": ratio(res["cpu_s_per_1000"], bare_o["cpu_s_per_1000"]),
                }
    bare = table.get("bare")
    if bare is None:
        return
    for name, res in table.items():
        if name == "bare":
            continue
        res["vs_bare"] = {
            "rps": ratio(res["rps"], bare["rps"]),
            "p50": ratio(res["p50_ms"], bare["p50_ms"]),
            "p99": ratio(res["p99_ms"], bare["p99_ms"]),
            "cpu_per_1000": ratio(res["cpu_s_per_1000"], bare["cpu_s_per_1000"]),
            "peak_rss": ratio(res["peak_rss_mb"], bare["peak_rss_mb"]),
        }


def run_matrix(bench: Bench, args: argparse.Namespace, policy_file: Path) -> dict[str, Any]:
    targets_wanted = ["bare", "embedded"] if args.quick else args.targets.split(",")
    modes = {t.partition("@")[0] for t in targets_wanted}
    pg_dsn = bench.create_database() if modes & {"embedded-pg", "shared"} else None
    if "shared" in modes:
        bench.start_redis()
    procs: dict[str, Proc] = {}
    trees = dict(t.split("=", 1) for t in args.trees.split(",") if t)
    for name in targets_wanted:
        log(f"starting {name}")
        mode, _, tree = name.partition("@")
        if tree and (mode not in GATEWAYS or tree not in trees):
            raise SystemExit(f"bench: {name!r}: give --trees {tree}=DIR and a gateway mode")
        if name in ("bare", "bare-O"):
            procs[name] = bench.start_bare(optimized=name == "bare-O")
        elif name == "core":
            procs[name] = bench.start_core()
        elif mode in GATEWAYS:
            procs[name] = bench.start_gateway(
                name.replace("@", "-at-"),
                redis=mode == "shared",
                pg_dsn=pg_dsn if mode in ("embedded-pg", "shared") else None,
                policy_file=policy_file,
                source_tree=Path(trees[tree]) if tree else None,
            )
        else:
            raise SystemExit(f"bench: unknown target {name!r}; known: {', '.join(ALL_TARGETS)}")
    cells = cells_for(args)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for cell in cells:
            table: dict[str, dict[str, Any]] = {}
            for name, p in procs.items():
                if cell.scheme == "refused" and p.admin_port is None:
                    continue  # mitmdump has no blocklist: nothing to compare
                res = run_load(
                    bench,
                    [p],
                    cell,
                    warmup=args.warmup,
                    duration=args.duration,
                    profile_dir=args.profile,
                )
                table[name] = res
                log(
                    f"rep {rep + 1} {cell.name:16} {name:12} {res['rps']:8.1f} req/s "
                    f"p50 {res['p50_ms']} p99 {res['p99_ms']} ms cpu/1k "
                    f"{res['cpu_s_per_1000']} s rss {res['peak_rss_mb']} MB non-200 "
                    f"{res['non_200']} err {res['error_count']} load {res['loadavg'][0]}"
                )
            add_ratios(table)
            runs.append({"repeat": rep + 1, "cell": cell.name, "targets": table})
    return {"runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and range) over repeats of each cell and target."""
    out: dict[str, Any] = {}
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for name, res in run["targets"].items():
            by.setdefault((run["cell"], name), []).append(res)
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "cpu_s_per_1000",
        "peak_rss_mb",
        "redis_commands_per_request",
        "redis_script_calls_per_request",
        "redis_round_trips_per_request",
        "redis_decision_round_trips_per_request",
        "governance_p50_ms",
        "governance_p99_ms",
        "governance_share_under_2ms",
        "client_cpu_share",
        "proxy_cpu_share",
    )
    for (cell, name), results in by.items():
        entry: dict[str, Any] = {"n": len(results)}
        for k in keys:
            values = [r[k] for r in results if r.get(k) is not None]
            if values:
                entry[k] = round(statistics.median(values), 4)
                if len(values) > 1:
                    entry[k + "_range"] = [min(values), max(values)]
        ratios = [r["vs_bare"]["rps"] for r in results if r.get("vs_bare", {}).get("rps")]
        if ratios:
            entry["rps_vs_bare"] = round(statistics.median(ratios), 3)
            if len(ratios) > 1:
                entry["rps_vs_bare_range"] = [min(ratios), max(ratios)]
        cpu_ratios = [
            r["vs_bare"]["cpu_per_1000"]
            for r in results
            if r.get("vs_bare", {}).get("cpu_per_1000")
        ]
        if cpu_ratios:
            entry["cpu_vs_bare"] = round(statistics.median(cpu_ratios), 3)
        for key, field_ in (("rps_vs_bare_o", "rps"), ("cpu_vs_bare_o", "cpu_per_1000")):
            values = [r["vs_bare_o"][field_] for r in results if r.get("vs_bare_o", {}).get(field_)]
            if values:
                entry[key] = round(statistics.median(values), 3)
        entry["non_200"] = sum(r["non_200"] for r in results)
        entry["errors"] = sum(r["error_count"] for r in results)
        entry["refused_or_withheld"] = sum(r.get("gateway_refused_or_withheld", 0) for r in results)
        out.setdefault(cell, {})[name] = entry
    return out


# -- replicas -------------------------------------------------------------------------------


def run_replicas(bench: Bench, args: argparse.Namespace, policy_file: Path) -> dict[str, Any]:
    """One shared-mode gateway vs two sharing Redis and PostgreSQL, same load split over both;
    and in the same minutes one bare mitmdump (under -O) vs two: what this host gives a second
    mitmproxy process doing nothing, the ceiling of the gateways' speedup here."""
    if bench.redis_port is None:
        bench.start_redis()
    dsn = (
        f"postgresql://postgres@127.0.0.1:5432/{bench.pg_db}"
        if bench.pg_db
        else bench.create_database()
    )
    a = bench.start_gateway("replica-a", redis=True, pg_dsn=dsn, policy_file=policy_file)
    b = bench.start_gateway("replica-b", redis=True, pg_dsn=dsn, policy_file=policy_file)
    bundle = bench.work / "replicas-ca.pem"
    bundle.write_bytes(a.cafile.read_bytes() + b.cafile.read_bytes())  # type: ignore[union-attr]
    bare_a = bench.start_bare(optimized=True, name="bare-O-a")
    bare_b = bench.start_bare(optimized=True, name="bare-O-b")
    bare_bundle = bench.work / "bare-replicas-ca.pem"
    bare_bundle.write_bytes(bare_a.cafile.read_bytes() + bare_b.cafile.read_bytes())  # type: ignore[union-attr]
    out: list[dict[str, Any]] = []
    cells = [Cell("http", "1k", 64), Cell("https", "1k", 64)]
    if args.quick:
        cells = cells[:1]

    def one_vs_two(pair: tuple[Proc, Proc], cell: Cell, cafile: Path) -> dict[str, Any]:
        one = run_load(
            bench, [pair[0]], cell, warmup=args.warmup, duration=args.duration, cafile=cafile
        )
        two = run_load(
            bench, list(pair), cell, warmup=args.warmup, duration=args.duration, cafile=cafile
        )
        return {"one": one, "two": two, "speedup": ratio(two["rps"], one["rps"])}

    for rep in range(args.repeat):
        for cell in cells:
            gateways = one_vs_two((a, b), cell, bundle)
            bare = one_vs_two((bare_a, bare_b), cell, bare_bundle)
            log(
                f"replicas {cell.name}: one {gateways['one']['rps']} req/s, two "
                f"{gateways['two']['rps']} req/s ({gateways['speedup']}x); bare-O one "
                f"{bare['one']['rps']}, two {bare['two']['rps']} ({bare['speedup']}x); non-200 "
                f"{sum(r[k]['non_200'] for r in (gateways, bare) for k in ('one', 'two'))}"
            )
            out.append({"repeat": rep + 1, "cell": cell.name, **gateways, "bare_o": bare})
    return {"runs": out}


# -- soak -----------------------------------------------------------------------------------


def run_soak(bench: Bench, args: argparse.Namespace, policy_file: Path) -> dict[str, Any]:
    """`--soak-requests` requests through one gateway, RSS sampled every `--rss-every` s."""
    target = args.soak_target
    redis = target == "shared"
    dsn = bench.create_database() if target in ("shared", "embedded-pg") else None
    if redis:
        bench.start_redis()
    if target in ("bare", "bare-O"):
        gw = bench.start_bare(optimized=target == "bare-O")
    elif target == "core":
        gw = bench.start_core()
    else:
        gw = bench.start_gateway(target, redis=redis, pg_dsn=dsn, policy_file=policy_file)
    scheme, body, conns = args.soak_cell.split("-")
    cell = Cell(scheme, body, int(conns.removeprefix("c")))
    # Bounded in time too: at most --soak-max-seconds, however slow the machine.
    res = run_load(
        bench,
        [gw],
        cell,
        warmup=args.warmup,
        duration=args.soak_max_seconds,
        max_requests=args.soak_requests,
        rate=args.rate,
        rss_interval=args.rss_every,
    )
    samples = [s[target] for s in res["rss_samples"] if target in s]
    first, last = samples[0], samples[-1]
    tenth = samples[len(samples) // 10] if len(samples) >= 10 else first
    res["soak"] = {
        "target": target,
        "cell": cell.name,
        "requests": res["requests"],
        "rate_asked": args.rate,
        "errors": res["error_count"],
        "non_200": res["non_200"],
        "rss_first_mb": round(first / 2**20, 1),
        "rss_last_mb": round(last / 2**20, 1),
        "rss_max_mb": round(max(samples) / 2**20, 1),
        "rss_growth_mb": round((last - first) / 2**20, 1),
        "rss_growth_after_first_tenth_mb": round((last - tenth) / 2**20, 1),
        "samples": len(samples),
    }
    log(f"soak: {json.dumps(res['soak'])}")
    return res


# -- output ---------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = [f"## {result['started']} ({result['mode']})", ""]
    m = result["machine"]
    lines.append(
        f"Machine: {m['cpu'].get('Model name', '?')}, {m['cpu'].get('CPU(s)', '?')} CPUs, "
        f"{m['memory']}, kernel {m['kernel']}, Python {m['python']}, mitmproxy {m['mitmproxy']}; "
        f"load average at start {m['loadavg_at_start']}."
    )
    lines.append("")
    matrix = result.get("matrix")
    if matrix:
        lines += [
            "| cell | target | req/s | x bare | x bare-O | p50 ms | p99 ms | CPU s/1000 req | "
            "x bare | peak RSS MB | Redis cmd/req (scripts; decision round trips) | gov. p99 ms | "
            "errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for cell, targets in matrix["summary"].items():
            for name, e in targets.items():
                lines.append(
                    f"| {cell} | {name} | {e.get('rps', '')} | {e.get('rps_vs_bare', '')} | "
                    f"{e.get('rps_vs_bare_o', '')} | {e.get('p50_ms', '')} | "
                    f"{e.get('p99_ms', '')} | "
                    f"{e.get('cpu_s_per_1000', '')} | {e.get('cpu_vs_bare', '')} | "
                    f"{e.get('peak_rss_mb', '')} | {_redis_cell(e)} | "
                    f"{e.get('governance_p99_ms', '')} | {e['non_200'] + e['errors']} |"
                )
        lines.append("")
    reps = result.get("replicas")
    if reps:
        lines += [
            "| replicas cell | one req/s | two req/s | speedup | bare-O one req/s | bare-O two "
            "req/s | bare-O speedup |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in reps["runs"]:
            bare = r.get("bare_o") or {"one": {"rps": ""}, "two": {"rps": ""}, "speedup": ""}
            lines.append(
                f"| {r['cell']} | {r['one']['rps']} | {r['two']['rps']} | {r['speedup']} | "
                f"{bare['one']['rps']} | {bare['two']['rps']} | {bare['speedup']} |"
            )
        lines.append("")
    soak = result.get("soak")
    if soak:
        lines.append("Soak: " + json.dumps(soak["soak"]))
        lines.append("")
    return "\n".join(lines)


def _redis_cell(e: dict[str, Any]) -> str:
    # Only targets that use Redis: the others' cells see the shared gateway's idle traffic.
    if "redis_decision_round_trips_per_request" not in e:
        return ""
    return (
        f"{e['redis_commands_per_request']} ({e.get('redis_script_calls_per_request', '')}; "
        f"{e.get('redis_decision_round_trips_per_request', '')})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 2 targets, 2 short cells")
    p.add_argument("--soak", action="store_true", help="only the soak (bounded, not for CI)")
    p.add_argument("--replicas", action="store_true", help="only one vs two replicas")
    p.add_argument("--no-replicas", action="store_true", help="skip the replica comparison")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma list of bare, bare-O, core, embedded, embedded-pg, shared; MODE@NAME runs a "
        "gateway "
        "mode from the checkout --trees names NAME",
    )
    p.add_argument("--trees", default="", help="NAME=DIR,...: other checkouts to compare")
    p.add_argument("--schemes", default="http,https", help="http, https, refused (451s)")
    p.add_argument(
        "--bodies",
        default="1k,100k",
        help="1k, 100k, 500k (JPEG-shaped), photo (2 MiB JPEG with XMP), page (gzipped HTML)",
    )
    p.add_argument("--conns", default="8,64")
    p.add_argument("--paced", default="", help="N,...: also http/https 1k c8 paced to N requests/s")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds per cell before measuring")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell")
    p.add_argument("--repeat", type=int, default=1, help="run the whole matrix N times")
    p.add_argument("--rate", type=float, default=None, help="soak: pace to N requests/s")
    p.add_argument("--soak-requests", type=int, default=100_000)
    p.add_argument("--soak-max-seconds", type=float, default=1800.0)
    p.add_argument("--soak-target", default="shared", choices=ALL_TARGETS)
    p.add_argument("--soak-cell", default="http-1k-c8", help="SCHEME-BODY-cCONNS")
    p.add_argument("--rss-every", type=float, default=2.0, help="soak: RSS sample interval (s)")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results JSON file, or a directory for it (default: bench/results/)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy collapsed stacks of each cell to DIR (one target at a time; needs py-spy: "
        ".venv/bin/pip install py-spy)",
    )
    args = p.parse_args(argv)
    if args.profile is not None and not (VENV_BIN / "py-spy").exists():
        p.error(f"--profile needs py-spy in {VENV_BIN}: {VENV_BIN / 'pip'} install py-spy")
    if args.quick:
        args.warmup, args.duration = min(args.warmup, 0.5), min(args.duration, 1.5)
        args.repeat = 1

    started = dt.datetime.now(dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="crawlwarden-bench-"))
    work.chmod(0o755)  # nginx workers read the bodies
    bench = Bench(args, work)
    mode = (
        "soak" if args.soak else "replicas" if args.replicas else "quick" if args.quick else "full"
    )
    result: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
    }
    log(f"work dir {work}; load average {os.getloadavg()}")
    try:
        bench.certs = make_certs(work / "certs")
        key = work / "audit.key"
        subprocess.run(
            [
                str(VENV_BIN / "crawlwarden"),
                "keys",
                "generate",
                "--private",
                str(key),
                "--public",
                str(work / "audit.pub"),
            ],
            check=True,
            capture_output=True,
        )
        policy_file = work / "policy.yaml"
        policy_file.write_text(yaml.safe_dump(policy(key), sort_keys=False))
        bench.start_upstream()
        if args.soak:
            result["soak"] = run_soak(bench, args, policy_file)
        elif args.replicas:
            result["replicas"] = run_replicas(bench, args, policy_file)
        else:
            result["matrix"] = run_matrix(bench, args, policy_file)
            if not args.quick and not args.no_replicas:
                result["replicas"] = run_replicas(bench, args, policy_file)
    finally:
        bench.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.output or RESULTS
    if args.output is None or out.is_dir():  # a directory: the usual file name in it
        out = out / f"{started.strftime('%Y%m%dT%H%M%SZ')}-{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    log(f"results in {out}")
    bad = _failures(result)
    for b in bad:
        log(f"FAILED: {b}")
    return 1 if bad else 0


def _failures(result: dict[str, Any]) -> list[str]:
    """Refusals, errors or non-200 answers make the run invalid (budgets must never refuse)."""
    bad = []
    for cell, targets in result.get("matrix", {}).get("summary", {}).items():
        for name, e in targets.items():
            if e["non_200"] or e["errors"] or e["refused_or_withheld"]:
                bad.append(
                    f"{cell} {name}: {e['non_200']} non-200, {e['errors']} errors, "
                    f"{e['refused_or_withheld']} refused/withheld"
                )
    for r in result.get("replicas", {}).get("runs", []):
        for label, pair in (("", r), (" bare-O", r.get("bare_o", {}))):
            for k in ("one", "two"):
                if k in pair and (pair[k]["non_200"] or pair[k]["error_count"]):
                    bad.append(
                        f"replicas{label} {r['cell']} {k}: {pair[k]['non_200']} non-200, "
                        f"{pair[k]['error_count']} errors"
                    )
    soak = result.get("soak")
    if soak and (soak["non_200"] or soak["error_count"]):
        bad.append(f"soak: {soak['non_200']} non-200, {soak['error_count']} errors")
    return bad


if __name__ == "__main__":
    sys.exit(main())
