"""Fetch records, byte budgets and withholding against sites that frame their answers unusually.

Each test is a real gateway process and a real loopback site (RFC 2606 names through
`network.static_hosts`). Every fetch must leave a record whose `content_sha256` and
`response_bytes` are those of the body the site sent, charged to the site's `bytes_per_day`;
an answer withheld for an opt-out delivers none of its body.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.optout_fixtures import jpeg_with_xmp
from tests.optout_fixtures import xmp_packet
from tests.support import AUDITOR_TOKEN
from tests.support import PROJECT
from tests.support import RESPECT_ALL
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import RawSite
from tests.support import Reply
from tests.support import Site
from tests.support import basic
from tests.support import curl
from tests.support import policy_with

HEADERS = {"X-Crawl-Project": PROJECT}
BODY = b"the site's whole answer\n" * 200
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def gateway(workdir: Path) -> Iterator[Gateway]:
    with Gateway(workdir, policy_with(defaults={"respect": RESPECT_ALL})) as gw:
        yield gw


class ScriptedSite(RawSite):
    """Answers each request on a connection with `answers[path]` (raw bytes, sent as they are)
    and keeps the connection open; robots.txt, tdmrep.json and unknown paths get a 404."""

    def __init__(self, answers: dict[str, bytes]):
        self.answers = answers
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                conn.sendall(self.answers.get(path, NOT_FOUND))


def records_for(gateway: Gateway, path: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [
            r
            for r in gateway.fetch_records()
            if r.get("kind") == "fetch" and r["url"].split("?")[0].endswith(path)
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def bytes_used(gateway: Gateway, site: str) -> int:
    status, body = gateway.admin_request("GET", f"/v1/budgets?site={site}", token=AUDITOR_TOKEN)
    assert status == 200, body
    return int(body["budgets"]["bytes_per_day"]["used"])


# -- a scraper that gives up while the gateway still buffers the answer ----------------------

DECLARED = 12 * 2**20  # under the 16 MiB buffer: held whole by mitmproxy before the hooks see it
SENT = 8 * 2**20


class StallingSite(RawSite):
    """Declares DECLARED bytes, sends SENT of them, then says nothing more (a slow site)."""

    def __init__(self) -> None:
        self.sent = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            head = self.read_head(conn)
            while head and head.split(b" ", 2)[1] != b"/big.bin":
                conn.sendall(NOT_FOUND)  # robots.txt, tdmrep.json
                head = self.read_head(conn)
            if not head:
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % DECLARED
            )
            conn.sendall(b"x" * SENT)
            self.sent.set()
            conn.settimeout(30)
            try:
                conn.recv(1)  # until the gateway lets go of the connection
            except OSError:
                pass


def test_a_scraper_that_gives_up_before_the_body_is_whole_still_has_the_sites_bytes_charged(
    gateway: Gateway,
):
    # A scraper whose timeout is shorter than a slow site's answer (or one that hangs up on
    # purpose, again and again) must not have the site send megabytes that no budget counts:
    # bytes_per_day keeps the site's traffic insubstantial, whoever stopped reading.
    site = StallingSite()
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as client:
            client.sendall(
                f"GET http://site-a.test:{site.port}/big.bin HTTP/1.1\r\n"
                f"Host: site-a.test:{site.port}\r\n"
                f"Proxy-Authorization: {basic(TEAM, TEAM_TOKEN)}\r\n"
                f"X-Crawl-Project: {PROJECT}\r\n\r\n".encode()
            )
            assert site.sent.wait(20)
            time.sleep(1.5)  # the gateway has read what the site sent
        [record] = records_for(gateway, "/big.bin")
        assert record["reason"] == "interrupted", record
        # (a MiB of slack for what may still sit in the kernel's buffers)
        assert bytes_used(gateway, "site-a.test") >= SENT - 2**20  # was 0
        assert SENT - 2**20 <= record["response_bytes"] <= SENT, record  # was 0, no hash
    finally:
        site.close()


# -- chunked trailers (RFC 9112 7.1.2) -------------------------------------------------------


def test_a_chunked_answer_with_trailer_fields_is_delivered_and_recorded(gateway: Gateway):
    # Trailers are legal HTTP/1.1 (Go's net/http, Node's res.addTrailers, gRPC-web send them);
    # a proxy may drop them. mitmproxy raises NotImplementedError on them: the scraper got
    # nothing until response_timeout (30 s), and the record said 0 bytes, no hash, not charged,
    # blamed on the client ("interrupted") or on a silent site ("upstream_timeout").
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: Server-Timing\r\n\r\n"
        + b"%x\r\n" % len(BODY)
        + BODY
        + b"\r\n0\r\nServer-Timing: db;dur=53\r\n\r\n"
    )
    site = ScriptedSite({"/t.txt": answer})
    try:
        started = time.monotonic()
        got = curl(
            f"http://site-a.test:{site.port}/t.txt",
            proxy=gateway.proxy_url(),
            headers=HEADERS,
            timeout=15,
        )
        assert (got.status, got.body) == (200, BODY), (got.status, got.stderr, got.body[:200])
        assert time.monotonic() - started < 10
        [record] = records_for(gateway, "/t.txt")
        assert (record["decision"], record["reason"]) == ("forwarded", "ok"), record
        assert record["response_bytes"] == len(BODY)
        assert record["content_sha256"] == hashlib.sha256(BODY).hexdigest()
        assert bytes_used(gateway, "site-a.test") >= len(BODY)
    finally:
        site.close()


# -- interim answers whose lines end in a bare LF ----------------------------------------------


def test_an_interim_answer_with_bare_lf_lines_is_skipped_like_one_with_crlf(gateway: Gateway):
    # mitmproxy reads a response head whose lines end in a bare LF (its blank-line search is
    # \n\r?\n), but addons/interim.py looks for \r\n\r\n only: the 103 became the recorded
    # answer (status 103, the empty body's hash, forwarded ok), the site's real 200 and its
    # noai were dropped, and the scraper waited for an answer that never came.
    final = (
        b"HTTP/1.1 200 OK\nContent-Type: text/plain\nX-Robots-Tag: noai\n"
        b"Content-Length: %d\n\n" % len(BODY)
    )
    answer = b"HTTP/1.1 103 Early Hints\nLink: </s.css>; rel=preload\n\n" + final + BODY
    site = ScriptedSite({"/early.txt": answer, "/plain.txt": final + BODY})
    try:
        # The same final head without the 103 is read and withheld as it should be.
        plain = curl(
            f"http://site-a.test:{site.port}/plain.txt",
            proxy=gateway.proxy_url(),
            headers=HEADERS,
            timeout=10,
        )
        assert (plain.status, plain.headers.get("x-crawlwarden-reason")) == (
            451,
            "noai_directive",
        )
        got = curl(
            f"http://site-a.test:{site.port}/early.txt",
            proxy=gateway.proxy_url(),
            headers=HEADERS,
            timeout=10,
        )
        assert (got.status, got.headers.get("x-crawlwarden-reason")) == (451, "noai_directive"), (
            got.status,
            got.stderr,
        )
        [record] = records_for(gateway, "/early.txt")
        assert (record["status"], record["decision"]) == (200, "withheld"), record
        assert record["content_sha256"] == hashlib.sha256(BODY).hexdigest()
        assert record["response_bytes"] == len(BODY)
    finally:
        site.close()


# -- a Content-Encoding that does not hold ------------------------------------------------------


OPTED_OUT = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")) + b"\0" * 4096


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "deflate"])
def test_an_opted_out_image_whose_content_encoding_lies_is_not_delivered(
    gateway: Gateway, site: Site, coding: str
):
    # The site labels an uncompressed JPEG with a coding it is not in (a misconfigured
    # gzip_static, a CDN that decompressed without dropping the header). curl and wget (no
    # --compressed), requests' raw stream, Scrapy with HttpCompressionMiddleware off: all save
    # the bytes as sent, and those are the image with its IPTC "no AI training" in them. The
    # gateway tries the coding, fails on the first bytes and reads nothing ("not valid in its
    # coding, which is then not read"), so the image went out 200. A coding that does not
    # decode at all is a body to read as sent, as it already is for a coding it does not know.
    site.routes["/robots.txt"] = Reply(status=404, body=b"")
    site.routes["/.well-known/tdmrep.json"] = Reply(status=404, body=b"")
    site.routes["/photo.jpg"] = Reply(
        body=OPTED_OUT, headers={"Content-Type": "image/jpeg", "Content-Encoding": coding}
    )
    got = curl(site.url("site-a.test", "/photo.jpg"), proxy=gateway.proxy_url(), headers=HEADERS)
    assert OPTED_OUT[:2048] not in got.body
    assert (got.status, got.headers.get("x-crawlwarden-reason")) == (451, "image_optout")
    [record] = records_for(gateway, "/photo.jpg")
    assert (record["decision"], record["reason"]) == ("withheld", "image_optout"), record
    assert record["content_sha256"] == hashlib.sha256(OPTED_OUT).hexdigest()


# -- an answer without content whose Content-Length is past the buffer ------------------------


@pytest.mark.parametrize("size", [2 * 2**20, 20 * 2**20])
def test_a_head_of_a_large_opted_out_file_is_answered_451_not_dropped(gateway: Gateway, size: int):
    # A HEAD (or a 304) has no body whatever its Content-Length says, so mitmproxy holds its
    # head for the response hook. Past 16 MiB the gateway had set up its stream anyway, took
    # the answer for one whose status line had gone out, and killed the flow: the scraper got
    # an empty reply (curl: 52), not the 451 it gets for the same file under 16 MiB, and
    # retries what it takes for a network error.
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Robots-Tag: noai\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    site = ScriptedSite({"/file.txt": head})
    try:
        got = curl(
            f"http://site-a.test:{site.port}/file.txt",
            proxy=gateway.proxy_url(),
            headers=HEADERS,
            extra=["--head"],
            timeout=10,
        )
        assert (got.status, got.headers.get("x-crawlwarden-reason")) == (451, "noai_directive"), (
            got.returncode,
            got.stderr,
        )
        [record] = records_for(gateway, "/file.txt")
        assert (record["decision"], record["reason"]) == ("withheld", "noai_directive")
        assert (record["response_bytes"], record["content_sha256"]) == (0, None)
    finally:
        site.close()
