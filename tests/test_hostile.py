"""Hostile and malformed requests against a real gateway, table-driven (Smokescreen's style).

Each row is raw bytes on a socket, the status expected, the `X-Crawlwarden-Reason` (None: an
answer of mitmproxy's own, for what it cannot parse) and the reason of the fetch record and of
its canonical decision line (None: no request was parsed, so there is no fetch to record). While
the table runs, another client is served throughout; afterwards the fetch log exports and
verifies with its signatures, every record valid JSON.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.forked_gateways import run_command
from tests.support import ADMIN_TOKEN
from tests.support import AUDITOR_TOKEN
from tests.support import CRAWLWARDEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import H2Client
from tests.support import LocalCA
from tests.support import Site
from tests.support import basic
from tests.support import policy_with
from tests.support import tls_tunnel

AUTH = basic(TEAM, TEAM_TOKEN)


_FRAMING_RULES = {
    "headers_too_large": "network.max_request_header_bytes",
    "request_too_large": "network.max_request_body_bytes",
    "length_required": None,
}


@dataclass(frozen=True)
class Case:
    name: str
    request: str | bytes  # "{port}" is the site's port, "{auth}" valid credentials
    status: int
    reason: str | None  # X-Crawlwarden-Reason; None: mitmproxy's own error page
    recorded: str | None  # the fetch record's reason; None: no record
    reaches_site: bool = False
    body: bytes = b""

    def bytes(self, port: int) -> bytes:
        raw = self.request if isinstance(self.request, bytes) else self.request.encode("latin-1")
        return raw.replace(b"{port}", str(port).encode()).replace(b"{auth}", AUTH.encode())


def get(target: str, *headers: str, host: str | None = None) -> str:
    """An authenticated GET with extra header lines."""
    lines = [f"GET {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += ["Proxy-Authorization: {auth}", f"X-Crawl-Project: {PROJECT}", *headers]
    return "\r\n".join(lines) + "\r\n\r\n"


SITE = "http://site-a.test:{port}"
CASES = [
    # Request lines mitmproxy cannot parse: its own 400, before any hook.
    Case("garbage", "GARBAGE\r\n\r\n", 400, None, None),
    Case("nul in request line", "GET / HTTP/1.1\x00\r\n\r\n", 400, None, None),
    Case("no version", "GET " + SITE + "/\r\n\r\n", 400, None, None),
    Case("header without colon", "GET " + SITE + "/ HTTP/1.1\r\nNoColon\r\n\r\n", 400, None, None),
    Case(
        "request smuggling: Content-Length and Transfer-Encoding",
        "POST " + SITE + "/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
        "bad_request",
    ),
    # A length mitmproxy cannot take: its HTML page went out before any hook (the record said
    # bad_request, the answer did not).
    Case(
        "two different Content-Lengths",
        "POST " + SITE + "/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
        "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "a negative Content-Length",
        "POST " + SITE + "/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
        "Content-Length: -1\r\n\r\nabc",
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "a Content-Length list",
        "POST " + SITE + "/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
        "Content-Length: 3, 3\r\n\r\nabc",
        400,
        "bad_request",
        "bad_request",
    ),
    # Heads and bodies the gateway will not hold.
    Case(
        "head past the limit, still coming",
        b"GET http://site-a.test/ HTTP/1.1\r\nX-A: " + b"a" * 300_000,
        431,
        "headers_too_large",
        None,
    ),
    Case(
        "head past the limit, whole",
        get(SITE + "/", "X-A: " + "a" * 70_000),
        431,
        "headers_too_large",
        "headers_too_large",
    ),
    Case(
        "declared body too large",
        "POST " + SITE + "/up HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
        f"X-Crawl-Project: {PROJECT}\r\nContent-Length: 100000000\r\n\r\n",
        413,
        "request_too_large",
        "request_too_large",
        body=b"x" * 200_000,
    ),
    Case(
        "large body without credentials",
        "POST " + SITE + "/up HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
        407,
        "auth_required",
        "auth_required",
        body=b"x" * 200_000,
    ),
    Case(
        "chunked upload",
        "POST " + SITE + "/up HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
        f"X-Crawl-Project: {PROJECT}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        411,
        "length_required",
        "length_required",
    ),
    # CONNECT targets.
    Case("CONNECT without a port", "CONNECT nonsense HTTP/1.1\r\n\r\n", 400, None, None),
    Case("CONNECT to port 0", "CONNECT site-a.test:0 HTTP/1.1\r\n\r\n", 400, None, None),
    Case("CONNECT to port 99999", "CONNECT site-a.test:99999 HTTP/1.1\r\n\r\n", 400, None, None),
    Case("CONNECT to an empty label", "CONNECT a..test:443 HTTP/1.1\r\n\r\n", 400, None, None),
    Case(
        "CONNECT to a decimal IPv4",
        "CONNECT 2130706433:443 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "CONNECT to an IPv6 zone",
        "CONNECT [fe80::1%eth0]:443 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
        400,
        "bad_request",
        "bad_request",
    ),
    # Refused by the policy, and opened to nowhere: its requests would get the 403 (README).
    Case(
        "CONNECT to loopback IPv6",
        "CONNECT [::1]:443 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
        200,
        None,
        "private_address",
    ),
    # Numeric IPv4 forms: never resolved, never a site of their own.
    Case("decimal IPv4", get("http://2130706433:{port}/"), 400, "bad_request", "bad_request"),
    Case("hex IPv4", get("http://0x7f.1:{port}/"), 400, "bad_request", "bad_request"),
    Case(
        "hex IPv4, one number", get("http://0x7f000001:{port}/"), 400, "bad_request", "bad_request"
    ),
    Case("octal IPv4", get("http://0177.0.0.1:{port}/"), 400, "bad_request", "bad_request"),
    Case("short IPv4", get("http://127.1:{port}/"), 400, "bad_request", "bad_request"),
    Case(
        "numeric Host, origin-form",
        get("/", host="2130706433:{port}"),
        400,
        "bad_request",
        "bad_request",
    ),
    # IPv6 literals go through the SSRF guard (allow_private admits 127.0.0.0/8 only).
    Case("IPv6 loopback", get("http://[::1]:{port}/"), 403, "private_address", "private_address"),
    Case(
        "IPv4-mapped IPv6 loopback",
        get("http://[::ffff:127.0.0.1]:{port}/"),
        403,
        "private_address",
        "private_address",
    ),
    Case(
        "NAT64 IPv6 of loopback",
        get("http://[64:ff9b::7f00:1]:{port}/"),
        403,
        "private_address",
        "private_address",
    ),
    # Internationalized names.
    Case(
        "raw UTF-8 host in the request line",
        get("http://bücher.test:{port}/").encode(),
        400,
        None,
        None,
    ),
    Case("invalid punycode", get("http://xn--zz.test:{port}/"), 400, None, None),
    Case(
        "punycode host",
        get("http://xn--bcher-kva.test:{port}/idn"),
        200,
        None,
        "ok",
        reaches_site=True,
    ),
    Case(
        "UTF-8 Host header, origin-form",
        get("/idn-host", host="bücher.test:{port}").encode(),
        200,
        None,
        "ok",
        reaches_site=True,
    ),
    # X-Crawl-* values are recorded: printable UTF-8 or a clean refusal.
    Case(
        "NUL in X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: a\x00b"),
        400,
        *["bad_request"] * 2,
    ),
    Case(
        "CTL in X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: a\x01b\x7f"),
        400,
        *["bad_request"] * 2,
    ),
    Case(
        "bare CR in X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: a\rb"),
        400,
        *["bad_request"] * 2,
    ),
    Case(
        "obs-fold in X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: a", " b"),
        400,
        *["bad_request"] * 2,
    ),
    Case(
        "non-UTF-8 X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: \xff\xfe"),
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "non-UTF-8 X-Crawl-Project",
        get(SITE + "/").replace(PROJECT, "faces-\xff"),
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "bidi override in X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: acct\u202e").encode(),
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "long X-Crawl-Account",
        get(SITE + "/", "X-Crawl-Account: " + "a" * 300),
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "non-UTF-8 path, origin-form",
        get("/a\xffb", host="site-a.test:{port}"),
        400,
        "bad_request",
        "bad_request",
    ),
    Case(
        "UTF-8 X-Crawl-Account",
        get(SITE + "/utf8", "X-Crawl-Account: Zürich-7").encode(),
        200,
        None,
        "ok",
        reaches_site=True,
    ),
]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send_raw(port: int, data: bytes, body: bytes = b"", timeout: float = 10) -> Answer:
    """Send raw bytes, read one response (to its Content-Length, or to the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if body:
                s.sendall(body)
        except OSError:
            pass  # answered and closed before we finished sending: the answer is there
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return Answer(status, headers, rest)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Site() as s:
        yield s


def test_hostile_requests_get_a_clean_answer_and_a_valid_fetch_log(
    workdir: Path, site: Site
) -> None:
    gw = Gateway(workdir, policy_with()).start()
    served: list[int] = []
    stop = threading.Event()

    def other_client() -> None:
        session = requests.Session()
        session.proxies = {"http": gw.proxy_url()}
        while not stop.is_set():
            r = session.get(
                site.url("site-b.test", "/other"), headers={"X-Crawl-Project": PROJECT}, timeout=5
            )
            served.append(r.status_code)
            time.sleep(0.02)

    other = threading.Thread(target=other_client)
    other.start()
    expected_ids: dict[str, Case] = {}
    try:
        for case in CASES:
            before = site.count() - site.count("/other")
            started = time.monotonic()
            answer = send_raw(gw.port, case.bytes(site.port), case.body)
            assert answer.status == case.status, (case.name, answer.status, answer.body[:300])
            assert answer.headers.get("x-crawlwarden-reason") == case.reason, case.name
            assert time.monotonic() - started < 5, f"{case.name}: answered late"
            if case.reason is not None and case.status != 200:
                refusal = json.loads(answer.body)
                assert refusal["reason"] == case.reason and refusal["detail"], case.name
            reached = site.count() - site.count("/other") - before
            assert reached == (1 if case.reaches_site else 0), case.name
            if case.recorded is not None:
                expected_ids[answer.headers.get("x-crawlwarden-request-id", case.name)] = case
    finally:
        stop.set()
        other.join(10)
    assert served and set(served) == {200}, "another client was not served throughout"
    assert gw.proc is not None and gw.proc.poll() is None

    # Every request that was parsed has one record and one decision line; nothing else does.
    records = [r for r in gw.fetch_records() if not r["url"].endswith("/other")]
    assert len(records) == sum(1 for c in CASES if c.recorded is not None)
    by_id = {r["id"]: r for r in records}
    decisions = {e["id"]: e for e in gw.log_events("decision")}
    for request_id, case in expected_ids.items():
        if request_id == case.name:  # mitmproxy answered; matched by reason below
            continue
        rec = by_id[request_id]
        assert rec["reason"] == case.recorded, case.name
        assert decisions[request_id]["reason"] == case.recorded, case.name
    # Refused for their framing, but on the record as their site's, with the rule that refused.
    framed = {r["reason"]: r for r in records if r["reason"] in _FRAMING_RULES}
    assert set(framed) == set(_FRAMING_RULES)
    for reason, rule in _FRAMING_RULES.items():
        assert (framed[reason]["site"], framed[reason]["rule"]) == ("site-a.test", rule), reason
    smuggled = [r for r in records if r["method"] == "POST" and r["reason"] == "bad_request"]
    # (Content-Length with Transfer-Encoding, and the three lengths mitmproxy cannot take)
    assert len(smuggled) == 4 and {r["decision"] for r in smuggled} == {"refused"}
    # Refused values were not recorded; accepted UTF-8 was, as sent.
    assert {r["account"] for r in records if r["reason"] == "bad_request"} == {None}
    assert "Zürich-7" in {r["account"] for r in records}
    idn = [r for r in records if "/idn" in r["url"]]
    assert {r["site"] for r in idn} == {"xn--bcher-kva.test"}

    # The fetch log as an auditor gets it: exported, every line JSON, signatures intact.
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(40) == 0
    export = workdir / "hostile-export.jsonl"
    run_command(
        [CRAWLWARDEN, "audit", "export", "--data-dir", str(gw.data_dir), "--output", str(export)],
        check=True,
    )
    lines = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    assert sum(1 for line in lines if line.get("type") == "record") >= len(records)
    verify = run_command(
        [
            CRAWLWARDEN,
            "audit",
            "verify",
            str(export),
            "--public-key",
            str(gw.data_dir / "audit-signing.pub"),
        ],
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


# limit, body size, the upload's project header, then what it gets: status, reason, decision
UNSIZED = {
    "5MiB": (None, 5 * 2**20, PROJECT, 413, "request_too_large", "refused"),
    "40MiB": (None, 40 * 2**20, PROJECT, 413, "request_too_large", "refused"),
    "whole-in-one-frame": (1000, 5000, PROJECT, 413, "request_too_large", "refused"),
    # Refused from its head (no such project): that answer, not a crash on it at 32 MiB.
    "refused-40MiB": (None, 40 * 2**20, "no-such-project", 403, "unknown_project", "refused"),
}


@pytest.mark.parametrize("case", list(UNSIZED))
def test_an_http2_body_of_no_declared_length_is_held_to_the_limit(
    workdir: Path, test_ca: LocalCA, case: str
) -> None:
    """HTTP/2 lets a body come without Content-Length: it is refused once it passes
    network.max_request_body_bytes (1 MiB by default), not buffered on to mitmproxy's 32 MiB
    threshold and then streamed to the site; also when all of it arrives at once, before the
    gateway has looked. The connection serves on."""
    limit, size, project, status, reason, decision = UNSIZED[case]
    policy = policy_with()
    if limit is not None:
        policy["network"]["max_request_body_bytes"] = limit
    with (
        Site(tls=test_ca) as tls_site,
        Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw,
    ):
        authority = f"site-c.test:{tls_site.port}"
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            client = H2Client(tls)
            upload = ("x-crawl-project", project)
            answer, sent = client.post_without_length(authority, "/upload", b"u" * size, upload)
            after = client.get(authority, "/after", ("x-crawl-project", PROJECT))
        assert answer.end == "ended" and answer.headers[":status"] == str(status), answer
        assert answer.headers["x-crawlwarden-reason"] == reason
        if reason == "request_too_large":
            assert answer.json()["rule"] == "network.max_request_body_bytes"
        # A client still sending is then asked to stop, without an error (RFC 9113 section
        # 8.1); 5 MiB may have gone whole before the gateway read past the limit.
        if size > 5 * 2**20 or sent < size:  # (the small ones go whole, or may)
            assert answer.reset and sent < size, sent
        assert (after.end, after.headers[":status"]) == ("ended", "200")
        assert [s.path for s in tls_site.seen] == ["/after"]  # the upload never reached it
        records = {r["url"].rsplit("/", 1)[1]: r for r in gw.fetch_records()}
        refused = records["upload"]
        assert (refused["decision"], refused["reason"]) == (decision, reason)
        assert refused["id"] == answer.headers["x-crawlwarden-request-id"]
        assert records["after"]["reason"] == "ok"
        assert "mitmproxy has crashed" not in gw.logs()
        # Its budget was given back: nothing is left in flight.
        code, body = gw.admin_request("GET", "/v1/budgets?site=site-c.test", token=AUDITOR_TOKEN)
        assert code == 200 and body["budgets"]["concurrency"]["used"] == 0, body


# body size (declared), the upload's project and path, then what it gets: status, reason
DECLARED = {
    "over-the-limit-40MiB": (40 * 2**20, PROJECT, "/upload", 413, "request_too_large"),
    "unknown-project-512KiB": (2**19, "no-such-project", "/upload", 403, "unknown_project"),
    "members-only-40MiB": (40 * 2**20, PROJECT, "/members/upload", 451, "tos_blocklist"),
}


@pytest.mark.parametrize("case", list(DECLARED))
def test_a_refused_http2_upload_is_answered_before_its_body(
    workdir: Path, test_ca: LocalCA, case: str
) -> None:
    """An HTTP/2 request refused from its head while its declared body is still coming gets
    its refusal on that stream at once, then RST_STREAM NO_ERROR if it is still sending (RFC
    9113 section 8.1), not a bare reset; the body is not read, the connection serves on."""
    size, project, path, status, reason = DECLARED[case]
    with Site(tls=test_ca) as tls_site:
        authority = f"site-c.test:{tls_site.port}"
        policy = policy_with(
            blocklist=[
                {
                    "id": "members-only",
                    "match": [f"https://{authority}/members/"],
                    "reason": "Member pages excluded by the terms",
                    "source": "https://site-c.test/terms, read 2026-10-01",
                }
            ]
        )
        if reason != "request_too_large":
            policy["network"]["max_request_body_bytes"] = 64 * 2**20
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            with tls_tunnel(gw, authority, alpn="h2") as tls:
                client = H2Client(tls)
                upload = (("x-crawl-project", project), ("content-length", str(size)))
                answer, sent = client.post_without_length(authority, path, b"u" * size, *upload)
                after = client.get(authority, "/after", ("x-crawl-project", PROJECT))
            assert answer.end == "ended" and answer.headers[":status"] == str(status), answer
            assert answer.headers["x-crawlwarden-reason"] == reason
            if size > 2**20:
                assert answer.reset and sent < size / 2, sent  # asked to stop, and it did
            assert (after.end, after.headers[":status"]) == ("ended", "200")
            assert [s.path for s in tls_site.seen] == ["/after"]
            records = {r["url"].rsplit("/", 1)[1]: r for r in gw.fetch_records()}
            refused = records["upload"]
            assert (refused["decision"], refused["reason"], refused["status"]) == (
                "refused",
                reason,
                status,
            )
            assert refused["id"] == answer.headers["x-crawlwarden-request-id"]
            code, body = gw.admin_request(
                "GET", "/v1/budgets?site=site-c.test", token=AUDITOR_TOKEN
            )
            assert code == 200 and body["budgets"]["concurrency"]["used"] == 0, body


def test_a_refused_upload_inside_a_tls_tunnel_is_answered_before_its_body(
    workdir: Path, site: Site
) -> None:
    """HttpGuard answers through the tunnel's TLS layer, then stops reading the body."""
    seen = site.count()  # the site is the module's
    with Gateway(workdir, policy_with()) as gw:
        with tls_tunnel(gw, f"site-c.test:{site.port}", alpn="http/1.1", timeout=10) as tls:
            tls.sendall(
                f"POST /upload HTTP/1.1\r\nHost: site-c.test:{site.port}\r\n"
                f"X-Crawl-Project: {PROJECT}\r\nContent-Length: 100000000\r\n\r\n".encode()
            )
            started = time.monotonic()
            answer = tls.recv(65536)
            while b"\r\n\r\n" not in answer:
                answer += tls.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"X-Crawlwarden-Reason: request_too_large" in answer
        assert time.monotonic() - started < 3
        [rec] = gw.fetch_records()
        assert rec["reason"] == "request_too_large" and rec["decision"] == "refused"
    assert site.count() == seen


SMUGGLED = b"GET /private/secret.jpg HTTP/1.1\r\nHost: site-c.test\r\n\r\n"


def test_targets_that_would_carry_or_name_another_request_are_refused_in_a_tunnel(
    workdir: Path, test_ca: LocalCA
) -> None:
    # A GET whose body is a request: a site that does not read GET bodies (most) took it for
    # the next request on the connection, one never checked, budgeted or recorded. `*` and an
    # HTTP/2 :path without its '/' (`@site-b.test/photo.jpg`) crashed the hook (no answer, no
    # record) or were recorded as a fetch of another host.
    with (
        Site(tls=test_ca) as tls_site,
        Gateway(workdir, policy_with(), trusted_ca=test_ca.ca_cert) as gw,
    ):
        authority = f"site-c.test:{tls_site.port}"
        answers = []
        for request, body in [
            (
                f"GET /public HTTP/1.1\r\nHost: {authority}\r\nX-Crawl-Project: {PROJECT}\r\n"
                f"Content-Length: {len(SMUGGLED)}\r\n\r\n",
                SMUGGLED,
            ),
            (f"OPTIONS * HTTP/1.1\r\nHost: {authority}\r\nX-Crawl-Project: {PROJECT}\r\n\r\n", b""),
            # Content-Length named hop-by-hop: taken out, the body went on as another request.
            (
                f"POST /public HTTP/1.1\r\nHost: {authority}\r\nX-Crawl-Project: {PROJECT}\r\n"
                f"Connection: keep-alive, Content-Length\r\n"
                f"Content-Length: {len(SMUGGLED)}\r\n\r\n",
                SMUGGLED,
            ),
        ]:
            with tls_tunnel(gw, authority, alpn="http/1.1") as tls:
                tls.sendall(request.encode() + body)
                answers.append(tls.recv(65536).split(b"\r\n", 1)[0])
        with tls_tunnel(gw, authority, alpn="h2") as tls:
            client = H2Client(tls)
            forged = client.get(authority, "@site-b.test/photo.jpg", ("x-crawl-project", PROJECT))
            # A refused HEAD's answer had the refusal's JSON as DATA: a protocol error for an
            # HTTP/2 client (h2 raised), which never saw the reason.
            head = client.get(authority, "/x", ("x-crawl-project", "nope"), method="HEAD")
            # A HEAD refused for the body it brought: no content in that answer either.
            head_with_body, _ = client.post_without_length(
                authority, "/x", b"body", ("x-crawl-project", PROJECT), method="HEAD"
            )
            # HTTP/2 DATA on a GET (no content-length): mitmproxy sent it to the HTTP/1 site
            # after the head, where it was read as the next request.
            smuggled, _ = client.post_without_length(
                authority, "/public", SMUGGLED, ("x-crawl-project", PROJECT), method="GET"
            )
            # A POST's body of no declared length went to the HTTP/1 site after a head without
            # one: read there as another request too. It is forwarded with its length now.
            posted, _ = client.post_without_length(
                authority, "/upload", SMUGGLED, ("x-crawl-project", PROJECT)
            )
        assert answers == [b"HTTP/1.1 400 Bad Request"] * 3
        assert forged.headers[":status"] == "400", forged
        assert (head.headers[":status"], head.body) == ("403", b""), head
        assert head.headers["x-crawlwarden-reason"] == "unknown_project"
        assert (head_with_body.headers[":status"], head_with_body.body) == ("400", b"")
        assert smuggled.headers[":status"] == "400", smuggled
        assert posted.headers[":status"] == "200", posted
        time.sleep(0.5)
        # Nothing else reached the site, smuggled or not: the POST, its body as its body.
        assert [(s.method, s.path, s.body) for s in tls_site.seen] == [
            ("POST", "/upload", SMUGGLED)
        ]
        records = gw.fetch_records()
        assert len(records) == 8
        decided = [(r["decision"], r["reason"]) for r in records]
        assert decided.count(("refused", "bad_request")) == 6, decided
        # Each refusal with the status it was answered with (one sent in place of mitmproxy's
        # error page had none).
        assert all(r["status"] for r in records if r["decision"] == "refused"), records
        assert decided.count(("refused", "unknown_project")) == 1  # the HEAD
        assert decided.count(("forwarded", "ok")) == 1  # the POST
        assert not [r for r in records if "site-b.test" in r["url"].split("/")[2]]
        assert "hook_failed" not in gw.logs()


# -- the admin port --------------------------------------------------------------------------


def test_the_admin_port_gives_hostile_clients_4xx_answers_and_no_lasting_hold(workdir: Path):
    # Admin probe: connections that sent nothing, or a request head a line at a time, were kept
    # an hour (300 of them took the proxy down with the process's file descriptors); a
    # non-UTF-8 byte in Authorization, JSON nested 30 000 deep, a time past year 9999 were
    # 500s with tracebacks; an auditor's GET /v1/budgets?site=<any name> took a metric label.
    with Gateway(workdir, policy_with()) as gw:
        silent = socket.create_connection(("127.0.0.1", gw.admin_port), timeout=30)
        trickling = socket.create_connection(("127.0.0.1", gw.admin_port), timeout=1)
        trickling.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < 25:
            try:
                trickling.sendall(b"X-Slow: 1\r\n")
                if trickling.recv(100) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and closed_after < 15, closed_after
        assert silent.recv(100) == b""  # closed long before its 30 s timeout
        silent.close()
        trickling.close()

        def status(method: str, path: str, headers: bytes, body: bytes = b"") -> int:
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            length = f"Content-Length: {len(body)}\r\n\r\n".encode()
            return send_raw(gw.admin_port, head + headers + length, body).status

        assert status("GET", "/v1/takedowns", b"Authorization: Bearer \xff\r\n") == 401
        admin = f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n"
        nested = b"[" * 30_000 + b"]" * 30_000
        assert status("POST", "/v1/takedowns", admin.encode(), nested) == 400
        auditor = f"Authorization: Bearer {AUDITOR_TOKEN}\r\n".encode()
        for query in ("since=9999-12-31T23:59:59-01:00", "until=0001-01-01T00:00:00%2B01:00"):
            assert status("GET", f"/v1/fetches?{query}", auditor) == 400, query
            assert status("GET", f"/v1/reports/sites?{query}", auditor) == 400, query
        names = [f"made-up-{i}.example" for i in range(5)]
        for name in names:
            assert status("GET", f"/v1/budgets?site={name}", auditor) == 200
        metrics = requests.get(gw.admin + "/metrics", timeout=10).text
        assert not any(name in metrics for name in names)
    traces = [line for line in gw.logs().splitlines() if "Traceback" in line]
    assert traces == []
