"""A bounded HTTP/1.1 load generator for proxies: keep-alive, plain HTTP or HTTPS through CONNECT.

Run as its own process by bench/run.py (so its CPU is measured apart from the proxy's):

    loadgen.py --proxy 127.0.0.1:8080 --scheme https --target s{n}.bench.test:8443 \
               --path /1k.jpg --conns 8 --sites 8 --warmup 2 --duration 10

Each connection sticks to one site (connection i -> site i mod --sites), as a scraper's
keep-alive connection does. Closed loop: each connection sends its next request when the last
answer has been read; with --rate the whole run is paced to that many requests per second
(latency is measured from the actual send, so a stalled proxy shows as lower throughput, not
as queueing delay). Stops at --duration or --max-requests, whichever comes first.

Protocol on stdout (one line each): `warm` when warm-up ends and measurement starts, then one
JSON object with the results of the measured window. Written with asyncio protocols rather than
streams: the client shares two cores with the proxy, so it must be cheap per request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import ssl
import sys
import time
from array import array
from collections import Counter

CRLF2 = b"\r\n\r\n"


class Stats:
    def __init__(self) -> None:
        self.measuring = False
        self.latencies = array("d")
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.warm_errors: Counter[str] = Counter()
        self.bytes = 0
        self.requests = 0  # measured, completed (any status)
        self.warm_requests = 0
        self.samples: list[tuple[float, int]] = []  # (time, completed) for the soak's timeline

    def done(self, status: int, latency: float, size: int) -> None:
        if self.measuring:
            self.requests += 1
            self.statuses[status] += 1
            self.latencies.append(latency)
            self.bytes += size
        else:
            self.warm_requests += 1

    def error(self, kind: str) -> None:
        if self.measuring:
            self.errors[kind] += 1
        else:
            self.warm_errors[kind] += 1


class Conn(asyncio.Protocol):
    """One keep-alive client connection; parses responses with Content-Length only."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, int]] | None = None
        self.head_only = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def _check(self) -> None:
        w = self.waiter
        if w is None or w.done():
            return
        end = self.buf.find(CRLF2)
        if end < 0:
            return
        head = bytes(self.buf[:end])
        status = int(head[9:12])
        if self.head_only:
            length = 0
        else:
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                if status in (204, 304) or 100 <= status < 200:
                    length = 0
                else:
                    w.set_exception(ValueError("response without Content-Length"))
                    return
            else:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop > 0 else None])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        del self.buf[:total]
        w.set_result((status, length))

    def request(self, data: bytes, head_only: bool = False) -> asyncio.Future[tuple[int, int]]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.head_only = head_only
        if self.closed:
            self.waiter.set_exception(ConnectionError("connection closed"))
            return self.waiter
        self.transport.write(data)
        self._check()
        return self.waiter


class Pacer:
    """Request k may start at t0 + k / rate (None: no pacing)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.t0 = time.monotonic()
        self.k = 0

    async def wait(self) -> None:
        if not self.rate:
            return
        at = self.t0 + self.k / self.rate
        self.k += 1
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def open_conn(
    args: argparse.Namespace, proxy: str, target: str, sni: str, ctx: ssl.SSLContext | None
) -> Conn:
    loop = asyncio.get_running_loop()
    host, port = proxy.rsplit(":", 1)
    transport, conn = await loop.create_connection(Conn, host, int(port))
    if args.scheme == "https":
        connect = (
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{args.auth_header}\r\n\r\n"
        ).encode()
        status, _ = await asyncio.wait_for(conn.request(connect, head_only=True), args.timeout)
        if status != 200:
            transport.close()
            raise ConnectionError(f"CONNECT answered {status}")
        assert ctx is not None
        tls = await loop.start_tls(transport, conn, ctx, server_hostname=sni)
        assert tls is not None
        conn.transport = tls  # type: ignore[assignment]
    return conn


def build_request(args: argparse.Namespace, target: str, host_header: str) -> bytes:
    if args.scheme == "https":
        line = f"GET {args.path} HTTP/1.1\r\n"
        auth = ""  # the tunnel carries the identity
    else:
        line = f"GET http://{target}{args.path} HTTP/1.1\r\n"
        auth = args.auth_header + "\r\n"
    return (
        f"{line}Host: {host_header}\r\n{auth}X-Crawl-Project: {args.project}\r\n"
        "User-Agent: crawlwarden-bench\r\nAccept: */*\r\n\r\n"
    ).encode()


async def worker(
    i: int,
    args: argparse.Namespace,
    stats: Stats,
    pacer: Pacer,
    stop: asyncio.Event,
    budget: list[int],
    ctx: ssl.SSLContext | None,
) -> None:
    site = i % args.sites + 1
    proxies = args.proxy.split(",")
    proxy = proxies[i % len(proxies)]
    name = args.target.replace("{n}", str(site))
    # Bare mitmdump cannot resolve *.bench.test: it is sent the address, the Host (and SNI) keep
    # the name. The gateway maps the name itself (network.static_hosts).
    connect_to = args.connect_to.replace("{n}", str(site)) if args.connect_to else name
    request = build_request(args, connect_to, name)
    conn: Conn | None = None
    while not stop.is_set():
        if conn is None or conn.closed:
            try:
                conn = await asyncio.wait_for(
                    open_conn(args, proxy, connect_to, name.rsplit(":", 1)[0], ctx), args.timeout
                )
                conn.buf.clear()
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as e:
                stats.error(f"connect: {type(e).__name__}: {e}"[:120])
                conn = None
                await asyncio.sleep(0.05)
                continue
        await pacer.wait()
        if stop.is_set():
            break
        if args.max_requests and budget[0] <= 0:
            stop.set()
            break
        started = time.perf_counter()
        try:
            status, size = await asyncio.wait_for(conn.request(request), args.timeout)
        except (OSError, TimeoutError, ValueError) as e:
            stats.error(f"request: {type(e).__name__}: {e}"[:120])
            if conn.transport is not None:
                conn.transport.close()
            conn = None
            continue
        stats.done(status, time.perf_counter() - started, size)
        if stats.measuring and args.max_requests:
            budget[0] -= 1
    if conn is not None and conn.transport is not None:
        conn.transport.close()


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(args: argparse.Namespace) -> dict[str, object]:
    token = base64.b64encode(f"{args.user}:{args.token}".encode()).decode()
    args.auth_header = f"Proxy-Authorization: Basic {token}"
    ctx = None
    if args.scheme == "https":
        ctx = ssl.create_default_context(cafile=args.cafile)
    stats = Stats()
    stop = asyncio.Event()
    pacer = Pacer(args.rate)
    budget = [args.max_requests]
    tasks = [
        asyncio.create_task(worker(i, args, stats, pacer, stop, budget, ctx))
        for i in range(args.conns)
    ]
    await asyncio.sleep(args.warmup)
    stats.measuring = True
    print("warm", flush=True)
    cpu0, t0 = cpu_seconds(), time.monotonic()
    deadline = t0 + args.duration
    next_sample = t0
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_sample:
            stats.samples.append((round(now - t0, 3), stats.requests))
            next_sample = now + args.sample_every
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds() - cpu0
    stats.measuring = False
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(stats.latencies)
    ms = 1000.0
    return {
        "requests": stats.requests,
        "warmup_requests": stats.warm_requests,
        "seconds": round(elapsed, 3),
        "rps": round(stats.requests / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": _ms(percentile(lat, 0.50), ms),
        "p90_ms": _ms(percentile(lat, 0.90), ms),
        "p99_ms": _ms(percentile(lat, 0.99), ms),
        "max_ms": _ms(lat[-1] if lat else None, ms),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "errors": dict(stats.errors),
        "error_count": sum(stats.errors.values()),
        "warmup_errors": dict(stats.warm_errors),
        "body_bytes": stats.bytes,
        "client_cpu_s": round(cpu, 3),
        "client_cpu_share": round(cpu / elapsed, 3) if elapsed > 0 else 0.0,
        "timeline": stats.samples,
    }


def _ms(v: float | None, scale: float) -> float | None:
    return None if v is None else round(v * scale, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--proxy",
        required=True,
        help="HOST:PORT of the proxy (a comma list: spread connections over several)",
    )
    p.add_argument("--scheme", choices=("http", "https"), default="http")
    p.add_argument("--target", required=True, help="NAME:PORT of the site; {n} = site number")
    p.add_argument("--connect-to", default="", help="address for the request line / CONNECT")
    p.add_argument("--path", default="/1k.jpg")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--sites", type=int, default=8)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many (0: none)")
    p.add_argument("--rate", type=float, default=None, help="pace to N requests/s in total")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--cafile", default=None, help="the proxy's CA certificate (HTTPS)")
    p.add_argument("--user", default="bench")
    p.add_argument("--token", default="bench-token")
    p.add_argument("--project", default="bench")
    p.add_argument("--sample-every", type=float, default=5.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    result["pid"] = os.getpid()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
