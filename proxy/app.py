"""`crawlwarden run`: mitmproxy and the admin API on one event loop.

The only module of `proxy/` that imports mitmproxy: it builds the master, sets the options every
replica must have, and owns the process life cycle (SIGHUP reloads, SIGTERM drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections.abc import Callable
from types import ModuleType

import structlog
from aiohttp import web
from mitmproxy import options
from mitmproxy.addons import core
from mitmproxy.addons import disable_h2c
from mitmproxy.addons import errorcheck
from mitmproxy.addons import next_layer
from mitmproxy.addons import proxyserver
from mitmproxy.addons import tlsconfig
from mitmproxy.master import Master

from addons import buffered_bytes
from addons import connection_tasks
from addons import h2_frames
from addons import interim
from addons import named_connections
from addons import read_backpressure
from addons import stream_release
from addons import stream_window
from addons import trailers
from addons import websocket_limit
from addons.gateway import Gateway
from addons.http_guard import Limits
from proxy.admin import make_app
from proxy.audit.api import ROUTES as AUDIT_ROUTES
from proxy.budgets.store import StoreMisconfigured
from proxy.policy_page import ROUTES as POLICY_PAGE_ROUTES
from proxy.report_api import ROUTES as REPORT_ROUTES
from proxy.runtime import FetchLogUnavailable
from proxy.runtime import Runtime
from proxy.runtime import Settings
from proxy.takedowns_api import ROUTES as TAKEDOWN_ROUTES
from proxy.usage_api import ROUTES as USAGE_ROUTES

log = structlog.get_logger("crawlwarden")

# The admin API's routes beyond proxy/admin.py's own.
ADMIN_ROUTES = [
    *AUDIT_ROUTES,
    *TAKEDOWN_ROUTES,
    *REPORT_ROUTES,
    *USAGE_ROUTES,
    *POLICY_PAGE_ROUTES,
]
# How long an admin API connection may go without a whole request (idle, or a head sent a
# line at a time) before it is closed.
ADMIN_IDLE_SECONDS = 10.0


def mitmproxy_options(settings: Settings, limits: Limits | None = None) -> dict[str, object]:
    """The mitmproxy options of a gateway (the benchmark gives bare mitmdump the same).

    `limits` are the policy's network limits (addons/http_guard.py): mitmproxy's inactivity
    timeout becomes a backstop just above them, so a connection that never sends a byte is
    closed too.
    """
    opts: dict[str, object] = {
        "mode": ["regular"],
        "listen_host": settings.listen_host,
        "listen_port": settings.listen_port,
        # A refused request must not even open a TCP connection to the site.
        "connection_strategy": "lazy",
        "confdir": str(settings.data_dir.resolve()),
        # Only HTTP(S) leaves the gateway: no raw TCP tunnels.
        "rawtcp": False,
        # Bodies of unknown length are buffered up to this size, then streamed (through the
        # gateway's stream: addons/client_events.py); known lengths above
        # addons.gateway.BUFFER_LIMIT are streamed by the addon itself.
        "stream_large_bodies": "32m",
    }
    if limits is not None:
        opts["tcp_timeout"] = limits.watchdog
    if settings.upstream_trusted_ca is not None:
        opts["ssl_verify_upstream_trusted_ca"] = str(settings.upstream_trusted_ca.resolve())
    return opts


def gateway_addons() -> list[object]:
    """mitmproxy's own addons that a gateway needs, and no others.

    Every addon is called on every hook of every flow, so the ~30 default ones (replay, export,
    cookies, map local/remote, onboarding, mitmproxy's own proxyauth and blocklist...) cost
    throughput for nothing. Left out on purpose: `block` (we authenticate every client ourselves
    and clients come from anywhere the network policy allows), `onboarding` (an unauthenticated
    app on mitm.it; the CA certificate is in the data dir).
    """
    return [
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        errorcheck.ErrorCheck(),
    ]


def settle_heap() -> int:
    """Take what start-up built (imports, policy, mitmproxy's and aiohttp's objects: ~130 000
    objects) out of the cyclic garbage collector's sight before traffic starts.

    They live as long as the process, yet every full collection walked them all: ~70 ms with
    the event loop stopped, a latency spike for every request in flight. Frozen, a full
    collection walks only what was made since (~3 ms in the benchmark). Frozen objects are still
    freed by reference counting; a cycle among them is not, and none of them is garbage.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# How long a thread that wants the GIL waits before it makes the holder let go (CPython's default
# is 5 ms). The event loop lets go of the GIL at every system call (socket, spool, log line); a
# thread waiting for it (the SQLite writer between two statements, a to_thread call) is woken
# each time, loses the race to the loop, and sleeps again until its wait runs out. Each of those
# wake-ups costs the loop a futex call and, on a virtual machine, an inter-processor interrupt.
# Measured (bench/README.md, embedded, http-1k-c8): with 0.1 ms, 8 % less CPU per request and
# 0.3-0.6 instead of 2-3 context switches; 5 us was worse again in bench/micro.py.
GIL_SWITCH_SECONDS = 0.0001


def set_gil_switch_interval() -> float:
    """Shorten the GIL switch interval for the gateway process (see GIL_SWITCH_SECONDS)."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    return sys.getswitchinterval()


async def listen_problem(host: str, port: int) -> str | None:
    """Why the proxy could not listen there (the port taken, the address not this host's), or
    None. Tried before mitmproxy binds: its own error names its `--mode regular@PORT` option,
    not ours, and comes after the gateway has said it started."""
    try:
        server = await asyncio.start_server(lambda r, w: None, host or None, port)
    except OSError as e:
        return e.strerror or str(e)
    server.close()
    await server.wait_closed()
    return None


async def serve(settings: Settings, start_reloads: Callable[[], int] | None = None) -> int:
    """Run a gateway until it is stopped. `start_reloads` says how many SIGHUPs came while it
    started (proxy/cli.py StartReloads): it reloads once for them when it has started."""
    runtime = Runtime.from_settings(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        await runtime.start()
    except (FetchLogUnavailable, StoreMisconfigured) as e:
        await runtime.stop()
        raise SystemExit(f"crawlwarden: {e}") from e

    installed = {module: _install(module, *said) for module, said in _PATCHES.items()}
    streams_released = installed[stream_release]
    master = Master(options.Options(), with_termlog=False)
    master.addons.add(*gateway_addons())
    limits = Limits.of(runtime.compiled.loaded.policy.network)
    master.options.update(**mitmproxy_options(settings, limits))
    gateway = Gateway(runtime)
    master.addons.add(gateway)

    # The proxy listens before the admin API does, so /readyz never says ready while it does
    # not (master.run below keeps the listener it finds). A port taken since the check (another
    # process starting) ends the start here too, before "started" is logged.
    problem = await listen_problem(settings.listen_host, settings.listen_port)
    if problem is None and not await master.addons.get("proxyserver").setup_servers():
        problem = await listen_problem(settings.listen_host, settings.listen_port)
        problem = problem or "it was taken while the gateway started"
    if problem is not None:
        await runtime.stop()
        raise SystemExit(
            f"crawlwarden: cannot listen on proxy address "
            f"{settings.listen_host}:{settings.listen_port}: {problem}; pick another --listen"
        )
    admin = web.AppRunner(
        make_app(runtime, extra_routes=ADMIN_ROUTES),
        access_log=None,
        handle_signals=False,
        # aiohttp's default keeps a connection that sends nothing, or a request head a line
        # at a time, for an hour: enough of them exhaust the process's file descriptors, the
        # proxy's included. This bounds the wait for a whole request head (a first one too).
        keepalive_timeout=ADMIN_IDLE_SECONDS,
    )
    await admin.setup()
    try:
        await web.TCPSite(admin, settings.admin_host, settings.admin_port).start()
    except OSError as e:
        await runtime.stop()
        raise SystemExit(
            f"crawlwarden: cannot listen on admin address "
            f"{settings.admin_host}:{settings.admin_port}: {e.strerror}; pick another --admin"
        ) from e

    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_term() -> None:
        if not stopping:
            stopping.append(asyncio.create_task(drain(runtime, master, settings, gateway)))

    reloads: set[asyncio.Task[object]] = set()

    def reload_done(task: asyncio.Task[object]) -> None:
        reloads.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # A policy error is answered inside the reload; this is a bug there: logged, not
            # left to "Task exception was never retrieved" at exit.
            log.error("policy_reload_crashed", error=repr(error), exc_info=error)

    def on_hup() -> None:
        # Parsed in a worker thread: a large policy would otherwise stall every request.
        task: asyncio.Task[object] = asyncio.create_task(runtime.reload_in_thread())
        reloads.add(task)
        task.add_done_callback(reload_done)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    frozen = settle_heap()
    switch_interval = set_gil_switch_interval()
    log.info(
        "started",
        replica=runtime.replica,
        proxy=f"{settings.listen_host}:{settings.listen_port}",
        admin=f"{settings.admin_host}:{settings.admin_port}",
        policy_version=runtime.policy_version,
        shared_state=bool(settings.redis_url),
        fetch_log="postgresql" if settings.audit_dsn else str(settings.sqlite_path),
        ca_cert=str(settings.data_dir / "mitmproxy-ca-cert.pem"),
        gc_frozen_objects=frozen,
        gil_switch_interval_us=round(switch_interval * 1e6),
        python_optimize=sys.flags.optimize,
        streams_released=streams_released,
    )
    # SIGHUPs from before the handler above: the file may have changed after it was read.
    if start_reloads is not None and (received := start_reloads()):
        log.info("policy_reload_requested_during_start", signals=received)
        await runtime.reload_in_thread()
    try:
        await master.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        # Stopping (the fetch log's flush may take 30 s): a reload has nothing left to apply
        # to, and SIGHUP's default would end the process before the flush.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for task in stopping:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await admin.cleanup()
        await runtime.stop()
    log.info("stopped", replica=runtime.replica, records=runtime.fetch_log.seq)
    return 0


# The gateway's changes to mitmproxy's (and wsproto's) classes, each installed at start-up where
# they still look as its module assumes: what differs, and what goes without it.
_PATCHES: dict[ModuleType, tuple[str, str]] = {
    interim: (
        "HTTP/1 client",
        "a site's interim (1xx) answer before its final one ends the exchange",
    ),
    buffered_bytes: (
        "HttpStream",
        "a buffered answer broken off before its end is recorded and charged as 0 bytes, and "
        "on an HTTP/2 connection to a site that requests share, silence is the connection's",
    ),
    websocket_limit: (
        "WebSocket layer",
        "a WebSocket message is held however large it grows, and open WebSockets are not "
        "closed and recorded at a stop",
    ),
    read_backpressure: (
        "connection handler",
        "what a fast WebSocket sender sends while a hook runs, and what an HTTP/2 scraper does "
        "not read yet, is held however much it is",
    ),
    stream_window: (
        "HTTP/2 client layer",
        "an HTTP/2 site sends each answer as fast as it can, whatever the scraper takes: a "
        "stream an HTTP/2 scraper pauses holds back the others on its site's connection, "
        "until it is reset at network.response_timeout",
    ),
    h2_frames: (
        "HTTP/2 frame library (hyperframe)",
        "every HTTP/2 frame received is hex-encoded whole for a trace line no one reads",
    ),
    connection_tasks: (
        "connection handler",
        "a connection the gateway closes while a hook waits, or while it waits for a free "
        "connection to its site, may never be told so: its request hangs until the scraper "
        "leaves, unanswered and unrecorded (a withheld image goes on downloading)",
    ),
    trailers: ("HTTP/1 layer", "a chunked answer with trailer fields may stop its exchange"),
    stream_release: (
        "HttpStream/HttpLayer",
        "finished requests are left to the cyclic garbage collector (more CPU, longer pauses), "
        "and a scraper's HTTP/2 connection keeps an entry for every request it was answered",
    ),
    named_connections: (
        "GetHttpConnection",
        "https:// requests sent without CONNECT open a connection each",
    ),
}


def _install(module: ModuleType, part: str, without: str) -> bool:
    """`module.install()`, said in the log when this mitmproxy does not look as it assumes."""
    done = bool(module.install())
    if not done:
        name = module.__name__.rsplit(".", 1)[-1]
        log.warning(
            f"{name}_not_installed",
            note=f"this mitmproxy's {part} differs from what addons/{name}.py expects: {without}",
        )
    return done


_HELD_ANSWER_SECONDS = 1.0
# How long a stop waits for the WebSockets it closes to be recorded.
_CONVERSATIONS_END_SECONDS = 1.0  # (in the chart's stopRestSeconds)


async def drain(runtime: Runtime, master: Master, settings: Settings, gateway: Gateway) -> None:
    """Stop taking connections, let requests in flight finish, then stop (fetch log flushed).

    Connections already open may still bring requests: while others are under way they are
    forwarded, each HTTP/1 answer closing its connection, so scrapers reconnect (to another
    replica). Once nothing is in flight or being decided, or the drain time is up, nothing more
    is forwarded (503 `draining`), and what is still under way is waited for: the site never
    sees a request whose record the stop would lose, and refusals are recorded before the fetch
    log closes. What is still in flight at the end is recorded as interrupted; WebSockets still
    open are closed (1001 "going away") and recorded.
    """
    runtime.draining = True
    try:
        log.info("draining", in_flight=runtime.in_flight, deciding=runtime.deciding)
        master.options.update(server=False)
        began = time.monotonic()
        deadline = began + settings.drain_seconds
        await runtime.wait_idle(settings.drain_seconds)
        runtime.stopping = True
        if await runtime.wait_idle(max(0.0, deadline - time.monotonic())):
            log.warning("drain_timeout", in_flight=runtime.in_flight, deciding=runtime.deciding)
            if gateway.release_held():
                # Their hooks answer 503 draining: a moment for those answers to go out.
                await runtime.wait_idle(_HELD_ANSWER_SECONDS)
            # Recorded with what came of their responses, before the fetch log closes.
            gateway.record_unfinished()
        else:
            # How long a drain takes, for terminationGracePeriodSeconds (docs/kubernetes.md).
            log.info("drained", seconds=round(time.monotonic() - began, 3))
        # WebSockets still open are no request in flight: ended now (1001), each recorded.
        if ended := await gateway.end_conversations(_CONVERSATIONS_END_SECONDS):
            log.info("websockets_closed", count=ended, code=1001)
    finally:
        # Whatever went wrong in the drain, the stop that was asked for happens (a drain that
        # raised used to leave the gateway running, deaf to every later SIGTERM).
        runtime.stopping = True
        master.shutdown()
