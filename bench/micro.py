"""CPU per request of crawlwarden's own layer, without mitmproxy's I/O: a steadier measure than
end-to-end throughput on a shared two-core machine, for before/after comparisons.

    .venv/bin/python bench/micro.py [--requests 5000] [--repeat 5]
    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/micro.py     (the same, older code)
    .venv/bin/python bench/micro.py --instructions       (instructions per request, ~3 min)

A real Runtime (embedded: budgets in process, SQLite fetch log, signed checkpoints, every opt-out
check on) and the real Gateway addon; mitmproxy test flows are passed through its hooks as
mitmproxy would (requestheaders, responseheaders, response) with a 1 KiB JPEG-shaped answer, so
each request costs what the gateway adds: authentication, site key, checks, budgets, the spool
begin line, opt-out reading, the fetch record, metrics and the decision log line (written to
/dev/null). Shipping to SQLite runs as it does in the gateway, and is waited for inside the
measured window. Also times the hot helper functions one by one.

Runs under python -O (it restarts itself so), as `crawlwarden run` does.

`--instructions` counts instead of timing: the same loop runs under valgrind's callgrind twice,
with 300 and 2300 measured requests, and the difference of the two instruction totals over
2000 is the instructions per request (all threads, start-up and warm-up cancelled out). It
repeats to about 0.3 % whatever else the machine is doing, where CPU time varies by 10 to 40 %
between runs on this shared machine: the measure for a before/after of a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: an older checkout given there wins

from bench.run import jpeg_body  # noqa: E402
from bench.run import policy  # noqa: E402
from tests.support import Reply  # noqa: E402
from tests.support import Site  # noqa: E402

AUTH = "Basic " + base64.b64encode(b"bench:bench-token").decode()


def this_bench() -> Any:
    """This checkout's bench/run.py, for its bodies: `bench.run` above is the one PYTHONPATH puts
    first, and an older checkout's has only the JPEG."""
    here = Path(__file__).parent / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run_here", here)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ANSWERS = {  # --answer: what the site sends, as (path, content type, Content-Encoding, body)
    "jpeg": ("/1k.jpg", b"image/jpeg", b"", lambda: jpeg_body(1024)),
    "page": ("/page.html", b"text/html; charset=utf-8", b"gzip", lambda: this_bench().page_body()),
    "photo": ("/photo.jpg", b"image/jpeg", b"", lambda: this_bench().photo_body()),
}


async def governance_loop(
    n: int, repeat: int, workdir: Path, port: int, answer: str = "jpeg"
) -> list[float]:
    from mitmproxy.test import tflow
    from mitmproxy.test import tutils

    from addons.gateway import Gateway
    from proxy.runtime import Runtime
    from proxy.runtime import Settings

    key = workdir / "audit.key"
    from proxy.audit.keys import generate_key_pair

    generate_key_pair(key, workdir / "audit.pub")
    pol = policy(key)
    policy_file = workdir / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(pol, sort_keys=False))
    settings = Settings(policy_file=policy_file, data_dir=workdir / "data", replica_id="micro")
    settings.data_dir.mkdir()
    rt = Runtime.from_settings(settings)
    await rt.start()
    gw = Gateway(rt)
    path, content_type, encoding, make_body = ANSWERS[answer]
    body = make_body()
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if encoding:
        headers.append((b"content-encoding", encoding))

    def make(i: int) -> tuple[Any, Any]:
        """A flow as mitmproxy hands it to requestheaders, and the site's answer for it."""
        site = i % 8 + 1
        req = tutils.treq(
            host=f"s{site}.bench.test",
            port=port,
            scheme=b"http",
            authority=b"",
            path=path.encode(),
            headers=(
                (b"host", f"s{site}.bench.test:{port}".encode()),  # as every HTTP/1.1 client
                (b"proxy-authorization", AUTH.encode()),
                (b"x-crawl-project", b"bench"),
            ),
            content=b"",
        )
        flow = tflow.tflow(req=req)
        flow.response = None
        flow.client_conn.peername = ("127.0.0.1", 40000 + i % 1000)
        resp = tutils.tresp(
            status_code=200,
            headers=tuple(headers),
            content=body,  # as sent: raw_content
        )
        return flow, resp

    async def one(flow: Any, resp: Any) -> None:
        await gw.requestheaders(flow)
        if flow.response is not None:
            raise RuntimeError(f"refused: {flow.response.status_code} {flow.response.content!r}")
        now = time.time()
        flow.request.timestamp_end = now
        resp.timestamp_start = resp.timestamp_end = now
        flow.response = resp
        gw.responseheaders(flow)
        await gw.response(flow)

    for i in range(300):  # warm-up: robots.txt and tdmrep.json fetched, caches filled
        await one(*make(i))
    await rt.fetch_log.flushed()
    per_request: list[float] = []
    for _ in range(repeat):
        flows = [make(i) for i in range(n)]  # built outside the measured window
        cpu0 = time.process_time()
        for i, (flow, resp) in enumerate(flows):
            await one(flow, resp)
            if i % 16 == 0:
                await asyncio.sleep(0)  # let the ship loop and the settle loop run
        await rt.fetch_log.flushed(timeout=60)
        per_request.append((time.process_time() - cpu0) / n * 1e6)
        del flows
    await rt.stop()
    return per_request


def helpers() -> dict[str, float]:
    """Microseconds per call of the helpers on the hot path."""
    from proxy.audit.record import FetchRecord
    from proxy.audit.record import record_hash
    from proxy.audit.record import utc_timestamp
    from proxy.blocklist import normalize_url
    from proxy.originfiles import origin_of

    rec = FetchRecord(
        id="0" * 32,
        ts=utc_timestamp(time.time()),
        method="GET",
        url="https://s1.bench.test/1k.jpg",
        decision="forwarded",
        reason="ok",
        team="bench",
        signals=[],
        egress_public_ips=["203.0.113.7"],
        policy_version=hashlib.sha256(b"p").hexdigest(),
    )
    data = rec.to_dict()
    data.update(replica="r", seq=1, prev_hash="0" * 64, hash=None)
    cases = {
        "FetchRecord.to_dict": lambda: rec.to_dict(),
        "utc_timestamp": lambda: utc_timestamp(1764292923.123456),
        "record_hash": lambda: record_hash(data),
        "origin_of": lambda: origin_of("https", "s1.bench.test", 443),
        "normalize_url": lambda: normalize_url("https://s1.bench.test:443/a/b.jpg?x=1"),
    }
    out = {}
    for name, fn in cases.items():
        runs = timeit.repeat(fn, number=20000, repeat=5)
        out[name] = round(min(runs) / 20000 * 1e6, 3)
    return out


INSTRUCTION_RUNS = (300, 2300)  # measured requests per callgrind run; the difference counts


def instructions_per_request(answer: str) -> float:
    """Instructions per request: two callgrind runs of the loop alone, in parallel."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    runs = [
        subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                "-O",
                __file__,
                "--loop-only",
                "--requests",
                str(n),
                "--repeat",
                "1",
                "--answer",
                answer,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in INSTRUCTION_RUNS
    ]
    totals = []
    for proc in runs:
        _, err = proc.communicate()
        found = re.search(r"Collected : (\d+)", err)
        if proc.returncode != 0 or found is None:
            sys.exit(f"a callgrind run failed (exit {proc.returncode}):\n{err[-3000:]}")
        totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / (INSTRUCTION_RUNS[1] - INSTRUCTION_RUNS[0])


def main() -> None:
    if not sys.flags.optimize:
        # Measured as `crawlwarden run` runs: under python -O (proxy/cli.py, run_optimized).
        os.execv(sys.executable, [sys.executable, "-O", *sys.orig_argv[1:]])
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--answer", choices=ANSWERS, default="jpeg", help="what the site sends")
    p.add_argument("--instructions", action="store_true", help="count, under callgrind")
    p.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import proxy

    code = Path(proxy.__file__).parent.parent
    if args.instructions:
        print(f"code under test: {code}")
        per_request = instructions_per_request(args.answer)
        print(f"  gateway hooks, per request: {per_request / 1e6:.3f} M instructions")
        return
    if not args.loop_only:
        print(f"code under test: {code}")
        for name, us in helpers().items():
            print(f"  {name:22} {us:8.3f} us/call")
    devnull = open(os.devnull, "w")  # the decision lines go here
    sys.stderr = devnull
    from proxy import logs

    logs.configure()
    with tempfile.TemporaryDirectory(prefix="crawlwarden-micro-") as tmp, Site() as site:
        site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n")
        site.routes["/.well-known/tdmrep.json"] = Reply(
            body=b"[]", headers={"Content-Type": "application/json"}
        )
        loop = governance_loop(args.requests, args.repeat, Path(tmp), site.port, args.answer)
        runs = asyncio.run(loop)
    sys.stderr = sys.__stderr__
    if args.loop_only:
        return
    print(
        f"  gateway hooks, per request: median {statistics.median(runs):.1f} us CPU "
        f"(min {min(runs):.1f}, max {max(runs):.1f}; {args.repeat} x {args.requests})"
    )


if __name__ == "__main__":
    main()
