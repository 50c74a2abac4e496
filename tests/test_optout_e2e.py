"""Rights holders' opt-outs through a real gateway, with curl and a real Scrapy spider.

The site is a real HTTP server on 127.0.0.1; it counts what reached it. A disallowed or reserved
path must never reach it, an opted-out page or image must never be delivered, and a licensed site
is collected where the policy says the signal does not apply.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.optout_fixtures import avif
from tests.optout_fixtures import c2pa_sign
from tests.optout_fixtures import epub
from tests.optout_fixtures import epub_reservation
from tests.optout_fixtures import gif
from tests.optout_fixtures import inkscape_svg
from tests.optout_fixtures import jpeg_with_xmp
from tests.optout_fixtures import pdf
from tests.optout_fixtures import png
from tests.optout_fixtures import png_chunk
from tests.optout_fixtures import png_xmp_chunk
from tests.optout_fixtures import svg
from tests.optout_fixtures import tdm_xmp_packet
from tests.optout_fixtures import tiff
from tests.optout_fixtures import training_mining
from tests.optout_fixtures import webp
from tests.optout_fixtures import xmp_packet
from tests.support import AUDITOR_TOKEN
from tests.support import PROJECT
from tests.support import RESPECT_ALL
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import VENV_BIN
from tests.support import CurlResult
from tests.support import Gateway
from tests.support import H2Client
from tests.support import LocalCA
from tests.support import RawSite
from tests.support import Reply
from tests.support import Seen
from tests.support import Site
from tests.support import curl
from tests.support import exchange
from tests.support import policy_with
from tests.support import tls_tunnel
from tests.support import wait_for

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

HEADERS = {"X-Crawl-Project": PROJECT}
# RFC 9309: TestBot obeys its own group only; the `*` group's /star-only/ does not bind it.
ROBOTS = b"""\
User-agent: *
Disallow: /star-only/

User-agent: TestBot
Disallow: /private/
Disallow: /no-testbot/
Allow: /no-testbot/but-this/
"""
TDMREP = json.dumps(
    [
        {"location": "/reserved/*", "tdm-reservation": 1},
        {"location": "/open/*", "tdm-reservation": 0},
    ]
).encode()


@pytest.fixture
def gateway(workdir: Path, test_ca: LocalCA):
    policy = policy_with(
        defaults={"respect": RESPECT_ALL},
        sites=[
            {
                "id": "licensed",
                "match": ["*.licensed.test"],
                "legal_basis": {"kind": "licence", "ref": "LIC-7", "expires": "2099-01-01"},
                "respect": {"tdmrep": False, "noai": False, "image_metadata": False},
            }
        ],
    )
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        yield gw


def serve_optout_files(site: Site) -> None:
    site.routes["/robots.txt"] = Reply(body=ROBOTS, headers={"Content-Type": "text/plain"})
    site.routes["/.well-known/tdmrep.json"] = Reply(
        body=TDMREP, headers={"Content-Type": "application/json"}
    )


def fetch(gw: Gateway, site: Site, host: str, path: str):
    return curl(site.url(host, path), proxy=gw.proxy_url(), headers=HEADERS)


def test_robots_and_tdmrep_refuse_before_the_site_is_asked(gateway: Gateway, site: Site):
    serve_optout_files(site)
    cases = [
        ("/private/a.jpg", 451, "robots_disallowed"),
        ("/no-testbot/x", 451, "robots_disallowed"),
        ("/no-testbot/but-this/x", 200, None),
        ("/reserved/photo.jpg", 451, "tdm_reserved"),
        ("/open/photo.jpg", 200, None),
        ("/elsewhere", 200, None),
        ("/star-only/x", 200, None),
    ]
    for path, status, reason in cases:
        result = fetch(gateway, site, "www.site-a.test", path)
        assert result.status == status, (path, result.body)
        assert result.headers.get("x-crawlwarden-reason") == reason, path
    paths = site.paths()
    for path, status, _ in cases:
        assert paths[path] == (1 if status == 200 else 0), path
    # robots.txt and tdmrep.json were each fetched once, by the gateway, for the whole run.
    assert paths["/robots.txt"] == 1 and paths["/.well-known/tdmrep.json"] == 1
    records = gateway.fetch_records()
    own = [r for r in records if r["kind"] == "gateway_fetch"]
    assert {r["url"].rsplit("/", 1)[1] for r in own} == {"robots.txt", "tdmrep.json"}
    assert all(r["team"] is None and r["site"] == "site-a.test" for r in own)
    assert all(r["duration_ms"] > 0 and r["content_sha256"] for r in own)
    # What the site sent, and the basis it was read under (they were null).
    assert all(r["content_type"] and r["legal_basis"] for r in own), own
    refused = {
        r["url"].split(str(site.port), 1)[1]: r for r in records if r["decision"] == "refused"
    }
    assert "robots:disallow" in refused["/private/a.jpg"]["signals"]
    assert "tdmrep:reserved" in refused["/reserved/photo.jpg"]["signals"]
    # The gateway's own requests are in the site's request and byte counters (team `_none`).
    text = requests.get(gateway.admin + "/metrics", timeout=5).text
    own_requests = own_bytes = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("team") != "_none" or labels.get("site") != "site-a.test":
                continue
            if sample.name == "crawlwarden_requests_total":
                own_requests += sample.value
            elif sample.name == "crawlwarden_upstream_response_bytes_total":
                own_bytes += sample.value
    assert own_requests == 2
    assert own_bytes == sum(r["response_bytes"] for r in own)


def test_no_spelling_of_a_disallowed_path_reaches_the_site(gateway: Gateway, site: Site):
    # Servers read "/x/../private/", "//private/", "/private%2F" and "/private;x/" as /private/
    # (http.server here merges a leading "//"; nginx merges every run and decodes %2F; servlet
    # containers drop path parameters): so must the gateway.
    serve_optout_files(site)
    site.routes["/private/a.jpg"] = Reply(
        body=b"DISALLOWED", headers={"Content-Type": "image/jpeg"}
    )
    for path in [
        "/x/../private/a.jpg",
        "/robots.txt/../private/a.jpg",
        "/open/%2e%2e/private/a.jpg",
        "/./private/a.jpg",
        "//private/a.jpg",
        "/private%2Fa.jpg",
        "/open%2F..%2Fprivate/a.jpg",
        # Tomcat and Jetty drop a segment's ";" parameters, "..;" included.
        "/private;x/a.jpg",
        "/x/..;/private/a.jpg",
    ]:
        result = curl(
            site.url("www.site-a.test", path),
            proxy=gateway.proxy_url(),
            headers=HEADERS,
            extra=["--path-as-is"],  # curl would resolve dot segments itself
        )
        assert result.status == 451, (path, result.status, result.body[:80])
        assert result.headers.get("x-crawlwarden-reason") == "robots_disallowed", path
    for path in ["//reserved/photo.jpg", "/open/..%2freserved/photo.jpg"]:  # TDMRep likewise
        result = curl(site.url("www.site-a.test", path), proxy=gateway.proxy_url(), headers=HEADERS)
        assert result.headers.get("x-crawlwarden-reason") == "tdm_reserved", path
    assert [s.path for s in site.seen if "private" in s.path or "reserved" in s.path] == []
    # A resolved path is what the site is asked for and what the record says;
    # "//" that resolves to an allowed path is forwarded as sent.
    for path, forwarded in [
        ("/x/../open/a.jpg", "/open/a.jpg"),
        ("/open/%61%2e%6a%70%67", "/open/a.jpg"),  # escapes of unreserved characters decoded
        ("/ok//b.jpg", "/ok//b.jpg"),
    ]:
        result = curl(
            site.url("www.site-a.test", path),
            proxy=gateway.proxy_url(),
            headers=HEADERS,
            extra=["--path-as-is"],
        )
        assert result.status == 200, path
        assert site.seen[-1].path == forwarded
        records = [r for r in gateway.fetch_records() if r["url"].endswith(forwarded)]
        assert records and all(r["decision"] == "forwarded" for r in records)


def test_a_fragment_in_the_request_target_is_no_way_around_an_anchored_rule(
    gateway: Gateway, site: Site
):
    # `/a.jpg#x` (a raw request target: clients never send a fragment) was checked as sent, so a
    # TDMRep location or a Content-Usage rule ending in `$` did not match it, while the site,
    # which drops the fragment, served /a.jpg: delivered, and recorded as /a.jpg forwarded
    # (probe-optout). The fragment is dropped before anything is decided.
    site.routes["/robots.txt"] = Reply(
        body=b"User-agent: TestBot\nContent-Usage: /*.jpg$ train-ai=n\n"
    )
    site.routes["/.well-known/tdmrep.json"] = Reply(
        body=json.dumps([{"location": "/reserved/*.png$", "tdm-reservation": 1}]).encode(),
        headers={"Content-Type": "application/json"},
    )
    auth = "Basic " + base64.b64encode(f"{TEAM}:{TEAM_TOKEN}".encode()).decode()
    authority = f"site-a.test:{site.port}"
    for path, reason in [
        ("/a.jpg", "content_usage"),
        ("/a.jpg#x", "content_usage"),
        ("/reserved/b.png#", "tdm_reserved"),
        ("/open/../reserved/b.png#x", "tdm_reserved"),
    ]:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            answer = exchange(
                sock,
                f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Proxy-Authorization: {auth}\r\nX-Crawl-Project: {PROJECT}\r\n"
                "Connection: close\r\n\r\n",
            )
        assert answer.startswith(b"HTTP/1.1 451"), (path, answer[:200])
        assert f"x-crawlwarden-reason: {reason}".encode() in answer.lower(), path
    assert [s.path for s in site.seen if s.path.endswith((".jpg", ".png"))] == []
    # What is forwarded has no fragment either.
    result = fetch(gateway, site, "site-a.test", "/open/c.gif")
    assert result.status == 200
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            f"GET http://{authority}/open/d.gif#top HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {auth}\r\nX-Crawl-Project: {PROJECT}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        while sock.recv(65536):
            pass
    assert site.seen[-1].path == "/open/d.gif"


def test_a_scrapers_robots_txt_is_answered_from_the_cache(gateway: Gateway, site: Site):
    serve_optout_files(site)
    first = fetch(gateway, site, "site-a.test", "/robots.txt")
    second = fetch(gateway, site, "site-a.test", "/robots.txt")
    assert first.status == second.status == 200
    assert first.body == second.body == ROBOTS
    assert first.headers["x-crawlwarden-reason"] == "robots_cache"
    assert site.count("/robots.txt") == 1
    # Served, not refused (dashboards' refusals, the report) and not forwarded (the site was
    # not asked): with the hash and size of what the scraper got.
    ids = {first.headers["x-crawlwarden-request-id"], second.headers["x-crawlwarden-request-id"]}
    served = [r for r in gateway.fetch_records() if r["id"] in ids]
    assert [r["decision"] for r in served] == ["served", "served"]
    assert all(r["reason"] == "robots_cache" and r["status"] == 200 for r in served)
    assert all(r["response_bytes"] == len(ROBOTS) for r in served)
    assert all(r["content_sha256"] == hashlib.sha256(ROBOTS).hexdigest() for r in served)
    metrics = requests.get(f"{gateway.admin}/metrics", timeout=10).text
    assert 'decision="served",reason="robots_cache"' in metrics
    assert 'decision="refused",reason="robots_cache"' not in metrics


def test_a_head_of_robots_txt_from_the_cache_has_no_content(gateway: Gateway, site: Site):
    # It had the file as content: over HTTP/1 the scraper read those bytes as its next answer
    # on the connection (a robots.txt written as an HTTP response forged the next site's page),
    # and an HTTP/2 client takes DATA on a HEAD for a protocol error (probe h2).
    serve_optout_files(site)
    fetch(gateway, site, "site-a.test", "/robots.txt")  # in the cache
    auth = "Basic " + base64.b64encode(f"{TEAM}:{TEAM_TOKEN}".encode()).decode()
    authority = f"site-a.test:{site.port}"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            f"HEAD http://{authority}/robots.txt HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {auth}\r\nX-Crawl-Project: {PROJECT}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        head, _, extra = head.partition(b"\r\n\r\n")
        sock.settimeout(0.5)
        try:
            extra += sock.recv(4096)
        except TimeoutError:
            pass
        assert head.startswith(b"HTTP/1.1 200") and b"robots_cache" in head, head
        assert f"content-length: {len(ROBOTS)}".encode() in head.lower()  # the GET's
        assert extra == b""
    [rec] = [r for r in gateway.fetch_records() if r["method"] == "HEAD"]
    assert (rec["decision"], rec["content_sha256"], rec["response_bytes"]) == ("served", None, 0)


def test_a_robots_txt_redirect_is_no_way_to_fetch_what_the_gateway_refuses(
    workdir: Path, site: Site
):
    # A team controlling a domain answered its /robots.txt with a redirect: the gateway read
    # the target as the rules (RFC 9309 2.3.1.2) and then served its body to the team's own
    # GET /robots.txt from its cache: a blocklisted page, a page withheld for noai, the
    # gateway's own /metrics. Each hop is now checked, and only a file read from its own
    # origin is served from the cache.
    port = site.port
    policy = policy_with(
        defaults={"respect": RESPECT_ALL},
        blocklist=[
            {
                "id": "tos-blocked",
                "match": ["blocked.test"],
                "reason": "Terms forbid automated collection",
                "source": "https://blocked.test/terms",
            },
            {
                "id": "members",
                "match": [f"http://victim.test:{site.port}/private/"],
                "reason": "Members only",
                "source": "https://victim.test/terms",
            },
        ],
    )
    with Gateway(workdir, policy) as gw:
        targets = {
            "attacker1.test": f"http://blocked.test:{port}/photos/1.jpg",
            "attacker2.test": f"http://site-b.test:{port}/noai",
            "attacker3.test": f"http://site-a.test:{gw.admin_port}/metrics",
            # Every reading a scraper's request is checked by holds for a hop too.
            "attacker4.test": f"http://victim.test:{port}/x/..;/private/a.jpg",
            "attacker5.test": f"http://victim.test:{port}//private/a.jpg",
            "moved.test": f"http://moved.test:{port}/rules.txt",  # its own origin: served
        }

        def robots(seen: Seen) -> Reply:
            target = targets.get(seen.host.rsplit(":", 1)[0])
            if target is None:
                return Reply(body=b"User-agent: *\nAllow: /\n")
            return Reply(status=302, body=b"", headers={"Location": target})

        site.routes["/robots.txt"] = robots
        site.routes["/rules.txt"] = Reply(body=b"User-agent: *\nDisallow: /private/\n")
        site.routes["/photos/1.jpg"] = Reply(body=b"BLOCKED-SITE PHOTO")
        site.routes["/noai"] = Reply(body=b"NOAI PAGE", headers={"X-Robots-Tag": "noai"})
        answers = {}
        for name in targets:
            fetch(gw, site, f"{name}", "/")  # the gateway reads the origin's robots.txt
            answers[name] = fetch(gw, site, name, "/robots.txt")
        records = gw.fetch_records()
    for name in [t for t in targets if t.startswith("attacker")]:
        answer = answers[name]
        assert (answer.status, answer.headers.get("location")) == (302, targets[name]), name
        assert answer.headers.get("x-crawlwarden-reason") is None, name  # the site's answer
    assert answers["moved.test"].headers["x-crawlwarden-reason"] == "robots_cache"
    assert answers["moved.test"].body == b"User-agent: *\nDisallow: /private/\n"
    assert site.count("/photos/1.jpg") == 0  # the blocklisted site was never asked
    assert not [s.path for s in site.seen if "private" in s.path]
    # The hops not made are recorded as refused (not as fetches that failed), with the reason.
    own = {r["url"]: r for r in records if r["kind"] == "gateway_fetch"}
    refused = {
        u: (r["decision"], r["reason"]) for u, r in own.items() if r["decision"] != "forwarded"
    }
    assert refused == {
        targets["attacker1.test"]: ("refused", "tos_blocklist"),
        targets["attacker3.test"]: ("refused", "private_address"),
        targets["attacker4.test"]: ("refused", "tos_blocklist"),
        targets["attacker5.test"]: ("refused", "tos_blocklist"),
    }, refused


def test_rotating_subdomains_do_not_make_the_gateways_own_fetches_a_way_around_the_rate(
    workdir: Path, site: Site
):
    # Each subdomain is an origin with its own robots.txt and tdmrep.json, and the gateway reads
    # both before a request: those are requests to the site too, under its budget. Before, 60
    # names in 3 s had the site asked 126 times against a rate of 2/s.
    serve_optout_files(site)
    policy = policy_with(
        defaults={"respect": RESPECT_ALL},
        sites=[{"id": "rotated", "match": ["*.rot.test"], "rate": "2/s", "burst": 1}],
    )
    started = time.monotonic()
    with Gateway(workdir, policy) as gw:
        answers = [fetch(gw, site, f"n{k}.rot.test", "/elsewhere") for k in range(30)]
        elapsed = time.monotonic() - started
        records = gw.fetch_records()
    asked = site.count()  # the gateway's own requests and the scraper's that were forwarded
    assert asked <= 1 + 2 * elapsed + 1, (asked, elapsed)
    assert asked == sum(1 for r in records if r["decision"] == "forwarded"), records
    refused = [a for a in answers if a.status == 429]
    assert refused and all(a.json()["reason"] == "rate_limited" for a in refused)
    assert all(a.headers["retry-after"] for a in refused)
    waited_for_a_file = [
        a.json()["detail"] for a in refused if "must be read" in a.json()["detail"]
    ]
    assert waited_for_a_file, [a.json()["detail"] for a in refused]


def test_a_cold_site_under_200_concurrent_requests_is_asked_for_robots_txt_once(
    gateway: Gateway, site: Site
):
    serve_optout_files(site)
    site.routes["/robots.txt"] = Reply(body=ROBOTS, delay=0.5)  # slow: all requests pile up
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        session = requests.Session()
        for i in range(n):
            r = session.get(
                site.url("site-a.test", f"/cold/{threading.get_ident()}/{i}"),
                proxies={"http": gateway.proxy_url()},
                headers=HEADERS,
                timeout=60,
            )
            with lock:
                statuses.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(10,)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(statuses) == 200 and set(statuses) == {200}
    assert site.count("/robots.txt") == 1
    assert site.count("/.well-known/tdmrep.json") == 1


def test_unreachable_robots_txt_disallows_everything(gateway: Gateway, site: Site):
    site.routes["/robots.txt"] = Reply(status=503, body=b"down")
    result = fetch(gateway, site, "site-b.test", "/anything")
    assert result.status == 451
    assert result.json()["reason"] == "robots_disallowed"
    assert site.count("/anything") == 0


def test_a_429_to_the_gateways_own_robots_read_pauses_the_site(gateway: Gateway, site: Site):
    # The site asked the gateway itself to slow down: its other hosts went on being fetched
    # (51 requests in the 30 s it asked for, in the politeness probe).
    site.routes["/robots.txt"] = Reply(status=429, body=b"slow down", headers={"Retry-After": "30"})
    result = fetch(gateway, site, "site-b.test", "/anything")
    assert result.json()["reason"] == "robots_disallowed"  # unreachable: disallowed (RFC 9309)

    def paused_until() -> Any:
        _, body = gateway.admin_request("GET", "/v1/budgets?site=site-b.test", token=AUDITOR_TOKEN)
        return body["paused_until"]

    assert wait_for(lambda: paused_until() is not None, timeout=10)
    later = fetch(gateway, site, "img.site-b.test", "/x.jpg")
    assert (later.status, later.json()["reason"]) == (429, "site_paused")
    assert site.count("/x.jpg") == 0


class BrokenOff503(RawSite):
    """Answers robots.txt with a 503 head that asks for 30 s, then breaks the body off."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        head = self.read_head(conn)
        if not head:
            return
        self.paths.append(head.split(b"\r\n")[0].split()[1].decode())
        conn.sendall(b"HTTP/1.1 503 Busy\r\nRetry-After: 30\r\nContent-Length: 1000\r\n\r\nab")
        time.sleep(0.2)
        conn.close()


def test_a_503_to_the_gateways_own_read_pauses_the_site_though_its_body_broke_off(
    gateway: Gateway,
):
    # The status line is the site's answer: the read failing mid-body does not unsay it.
    upstream = BrokenOff503()
    try:
        first = curl(
            f"http://www.cut.test:{upstream.port}/a", proxy=gateway.proxy_url(), headers=HEADERS
        )
        assert first.json()["reason"] == "robots_disallowed"  # unreachable: disallowed
        later = curl(
            f"http://img.cut.test:{upstream.port}/b", proxy=gateway.proxy_url(), headers=HEADERS
        )
        assert (later.status, later.json()["reason"]) == (429, "site_paused")
        assert 25 <= int(later.headers["retry-after"]) <= 30
        assert upstream.paths == ["/robots.txt"]  # not even the other host's robots.txt
    finally:
        upstream.close()
    [own] = [r for r in gateway.fetch_records(site="cut.test") if r["kind"] == "gateway_fetch"]
    assert (own["status"], own["reason"], own["content_sha256"]) == (503, "upstream_error", None)


PAGE_NOAI = b"""<!doctype html><html><head><meta name="robots" content="noai, noimageai">
<title>x</title></head><body>secret words</body></html>"""
PAGE_TDM = (
    b"""<html><head><meta name="tdm-reservation" content="1"></head><body>text</body></html>"""
)


def _image_cases() -> dict[str, Reply]:
    base_png = png()
    return {
        "/xmp.jpg": Reply(
            body=jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")),
            headers={"Content-Type": "image/jpeg"},
        ),
        "/xmp-element.png": Reply(
            body=png(before_idat=[png_xmp_chunk(xmp_packet("DMI-PROHIBITED", form="element"))]),
            headers={"Content-Type": "image/png"},
        ),
        # ImageMagick (and ExifTool before 11.63) put a PNG's XMP after its image data.
        "/xmp-late.png": Reply(
            body=png(after_idat=[png_xmp_chunk(xmp_packet("DMI-PROHIBITED-AIMLTRAINING"))]),
            headers={"Content-Type": "image/png"},
        ),
        "/xmp.webp": Reply(
            body=webp(xmp=xmp_packet("DMI-PROHIBITED-GENAIMLTRAINING")),
            headers={"Content-Type": "application/octet-stream"},
        ),
        "/c2pa.png": Reply(
            body=c2pa_sign(base_png, "image/png", [training_mining("c2pa", "notAllowed")]),
            headers={"Content-Type": "image/png"},
        ),
        # The C2PA SDK signs a simple-format WebP by appending a C2PA chunk (no VP8X).
        "/c2pa-simple.webp": Reply(
            body=c2pa_sign(
                webp(simple=True), "image/webp", [training_mining("c2pa", "notAllowed")]
            ),
            headers={"Content-Type": "image/webp"},
        ),
        "/noai-header.jpg": Reply(
            body=jpeg_with_xmp(xmp_packet(None)),
            headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noimageai"},
        ),
        "/xmp.avif": Reply(
            body=avif(xmp_packet("DMI-PROHIBITED-GENAIMLTRAINING")),
            headers={"Content-Type": "image/avif"},
        ),
        "/xmp.tiff": Reply(
            body=tiff(xmp_packet("DMI-PROHIBITED")), headers={"Content-Type": "image/tiff"}
        ),
        "/xmp.gif": Reply(
            body=gif(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")),
            headers={"Content-Type": "image/gif"},
        ),
        "/c2pa.avif": Reply(
            body=c2pa_sign(avif(), "image/avif", [training_mining("c2pa", "notAllowed")]),
            headers={"Content-Type": "image/avif"},
        ),
        "/reserved.pdf": Reply(
            body=pdf(tdm_xmp_packet("1", "https://rights.test/tdm.json")),
            headers={"Content-Type": "application/pdf"},
        ),
        "/reserved.epub": Reply(
            body=epub(epub_reservation("1", "https://rights.test/tdm.json"), descriptors=True),
            headers={"Content-Type": "application/epub+zip"},
        ),
        "/open.epub": Reply(
            body=epub(epub_reservation("0")), headers={"Content-Type": "application/epub+zip"}
        ),
        "/logo.svg": Reply(
            body=b'<svg xmlns="http://www.w3.org/2000/svg"><metadata>...</metadata></svg>',
            headers={"Content-Type": "image/svg+xml"},
        ),
        "/xmp.svg": Reply(
            body=svg(xmp_packet("DMI-PROHIBITED-GENAIMLTRAINING")),
            headers={"Content-Type": "image/svg+xml"},
        ),
        "/inkscape.svg": Reply(
            body=inkscape_svg("DMI-PROHIBITED-AIMLTRAINING"),
            headers={"Content-Type": "image/svg+xml"},
        ),
        # Codings a browser reads past (an unknown one) or undoes in turn (a list): Chromium
        # rendered these opted-out images.
        "/misnamed-coding.jpg": Reply(
            body=jpeg_with_xmp(xmp_packet("DMI-PROHIBITED")),
            headers={"Content-Type": "image/jpeg", "Content-Encoding": "none"},
        ),
        "/gzipped-twice.jpg": Reply(
            body=gzip.compress(gzip.compress(jpeg_with_xmp(xmp_packet("DMI-PROHIBITED")))),
            headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip, gzip"},
        ),
        "/icon.bmp": Reply(body=b"BM" + bytes(64), headers={"Content-Type": "image/bmp"}),
        "/page.html": Reply(body=PAGE_NOAI, headers={"Content-Type": "text/html"}),
        "/utf16.html": Reply(
            body=PAGE_NOAI.decode().encode("utf-16"), headers={"Content-Type": "text/html"}
        ),
        "/tdm.html": Reply(body=PAGE_TDM, headers={"Content-Type": "text/html; charset=utf-8"}),
        # A title's text is text (RCDATA): its "<body>" ends nothing.
        "/title.html": Reply(
            body=b"<!DOCTYPE html><html><head><title>Using the <body> element</title>"
            b'<meta name="tdm-reservation" content="1"></head><body>x</body></html>',
            headers={"Content-Type": "text/html"},
        ),
        # Between </head> and <body>, a meta tag is still the head's (HTML "after head" mode).
        "/after-head.html": Reply(
            body=b'<html><head><title>t</title></head>\n<meta name="robots" content="noai">'
            b"\n<body>x</body></html>",
            headers={"Content-Type": "text/html"},
        ),
        # No Content-Type: a browser sniffs a page, and so does the gateway.
        "/untyped": Reply(body=PAGE_NOAI, headers={}),
        "/usage.txt": Reply(
            body=b"no training",
            headers={"Content-Type": "text/plain", "Content-Usage": "train-ai=n"},
        ),
        "/allowed.png": Reply(
            body=c2pa_sign(base_png, "image/png", [training_mining("c2pa", "allowed")]),
            headers={"Content-Type": "image/png"},
        ),
        "/plain.jpg": Reply(
            body=jpeg_with_xmp(xmp_packet("DMI-ALLOWED")), headers={"Content-Type": "image/jpeg"}
        ),
    }


WITHHELD = {
    "/xmp.jpg": "image_optout",
    "/misnamed-coding.jpg": "image_optout",
    "/gzipped-twice.jpg": "image_optout",
    "/xmp-element.png": "image_optout",
    "/xmp-late.png": "image_optout",
    "/xmp.webp": "image_optout",
    "/xmp.avif": "image_optout",
    "/xmp.tiff": "image_optout",
    "/xmp.gif": "image_optout",
    "/xmp.svg": "image_optout",
    "/inkscape.svg": "image_optout",
    "/c2pa.avif": "image_optout",
    "/c2pa.png": "image_optout",
    "/c2pa-simple.webp": "image_optout",
    "/noai-header.jpg": "noai_directive",
    "/page.html": "noai_directive",
    "/utf16.html": "noai_directive",
    "/tdm.html": "tdm_reserved",
    "/title.html": "tdm_reserved",
    "/after-head.html": "noai_directive",
    "/untyped": "noai_directive",
    "/reserved.pdf": "tdm_reserved",
    "/reserved.epub": "tdm_reserved",
    "/usage.txt": "content_usage",
}


def test_opted_out_pages_and_images_are_never_delivered(gateway: Gateway, site: Site):
    cases = _image_cases()
    site.routes.update(cases)
    for path, reply in cases.items():
        result = fetch(gateway, site, "img.site-c.test", path)
        if path in WITHHELD:
            assert result.status == 451, path
            body = result.json()
            assert body["decision"] == "withheld" and body["reason"] == WITHHELD[path], path
            assert reply.body not in result.body
        else:
            assert result.status == 200, path
            assert result.body == reply.body
    records = {
        r["url"].split(str(site.port), 1)[1]: r
        for r in gateway.fetch_records()
        if r["kind"] == "fetch"
    }
    for path, reason in WITHHELD.items():
        rec = records[path]
        assert rec["decision"] == "withheld" and rec["reason"] == reason
        # Seen and discarded: the content hash of what the site sent is kept.
        assert rec["content_sha256"] == hashlib.sha256(cases[path].body).hexdigest()
        assert rec["status"] == 200 and rec["signals"]
    assert "c2pa:training-mining=allowed" in records["/allowed.png"]["signals"]
    assert records["/reserved.epub"]["signals"] == ["tdm-epub:reserved", "tdm-epub:policy"]
    assert records["/open.epub"]["signals"] == ["tdm-epub:not-reserved"]
    # What the gateway does not read is on the record, not passed over in silence:
    assert records["/icon.bmp"]["signals"] == ["image-metadata:unread"]
    assert records["/logo.svg"]["signals"] == []  # read: it carries no XMP


# Over what the gateway holds whole (16 MiB, so an opt-out can still become a 451) and over
# what mitmproxy buffers of a body of unknown length (32 MiB) before it streams it itself.
LARGE = 40 * 2**20


@pytest.mark.parametrize(
    ("chunked", "http2"),
    [(False, False), (True, False), (True, True)],
    ids=["content-length", "chunked", "chunked-http2"],
)
def test_bodies_too_large_to_hold_are_hashed_whole_and_opt_outs_in_them_still_bind(
    gateway: Gateway, site: Site, tls_site: Site, chunked: bool, http2: bool
):
    # Streamed: the status line goes out before the body is read, so an opt-out found in it
    # breaks the transfer instead of becoming a 451. Nothing of the image is delivered, and no
    # more of it is downloaded: the record has the bytes that came and their hash.
    padding = bytes(range(256)) * (LARGE // 256)
    free = jpeg_with_xmp(xmp_packet("DMI-ALLOWED")) + padding
    opted_out = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")) + padding
    origin = tls_site if http2 else site  # HTTP/2 from the scraper: inside a CONNECT tunnel
    origin.routes["/free.jpg"] = Reply(
        body=free, headers={"Content-Type": "image/jpeg"}, chunked=chunked
    )
    origin.routes["/opted-out.jpg"] = Reply(
        body=opted_out, headers={"Content-Type": "image/jpeg"}, chunked=chunked
    )

    def get(path: str) -> CurlResult:
        url = origin.url("site-c.test", path)
        extra = ["--http2"] if http2 else ["--http1.1"]
        return curl(
            url, proxy=gateway.proxy_url(), headers=HEADERS, cacert=gateway.ca_cert, extra=extra
        )

    delivered = get("/free.jpg")
    assert (delivered.status, delivered.returncode) == (200, 0), delivered.stderr
    assert delivered.version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert delivered.body == free
    broken = get("/opted-out.jpg")
    assert broken.returncode != 0  # a broken transfer: curl says so
    assert opted_out[:1024] not in broken.body and len(broken.body) < 2**20, len(broken.body)
    records = {r["url"].rsplit("/", 1)[1]: r for r in gateway.fetch_records()}
    assert records["free.jpg"]["decision"] == "forwarded"
    assert delivered.headers["x-crawlwarden-request-id"] == records["free.jpg"]["id"]
    assert records["free.jpg"]["content_sha256"] == hashlib.sha256(free).hexdigest()
    assert records["free.jpg"]["response_bytes"] == len(free)
    withheld = records["opted-out.jpg"]
    assert (withheld["decision"], withheld["reason"]) == ("withheld", "image_optout")
    _stopped_early(withheld, opted_out)


def _stopped_early(rec: dict[str, Any], body: bytes) -> None:
    """A withheld record of a streamed body: what came of it before the gateway stopped (a
    body of no declared length: after the 32 MiB mitmproxy buffers before it streams)."""
    came = rec["response_bytes"]
    assert 0 < came < len(body), (came, len(body))
    assert rec["content_sha256"] == hashlib.sha256(body[:came]).hexdigest()
    assert "downloaded no more of it" in rec["note"], rec["note"]


class CutOffSite(RawSite):
    """A site that declares a body of LARGE bytes, sends `bodies[path]` and closes (one
    request per connection)."""

    def __init__(self, bodies: dict[str, bytes]):
        self.bodies = bodies
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            head = self.read_head(conn)
            body = self.bodies.get(head.split(b" ", 2)[1].decode())
            if body is None:  # robots.txt, tdmrep.json: none
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            kind = b"image/png" if body.startswith(b"\x89PNG") else b"image/jpeg"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (kind, LARGE)
            )
            try:
                conn.sendall(body)
                conn.shutdown(socket.SHUT_WR)  # every byte sent goes out, then the end
            except OSError:
                return  # the gateway stopped downloading (a body it withholds)
            time.sleep(0.5)


def test_a_body_the_site_breaks_off_is_recorded_with_what_came_and_what_it_carried(
    gateway: Gateway,
):
    # The record had no size, no hash and no signals for a streamed body the site broke off,
    # and one whose opt-out the gateway had found (and delivered nothing of) said forwarded.
    padding = bytes(range(256)) * (20 * 2**20 // 256)
    bodies = {
        "/clean.jpg": jpeg_with_xmp(xmp_packet(None)) + padding,
        "/opted-out.jpg": jpeg_with_xmp(xmp_packet("DMI-PROHIBITED")) + padding,
        # Broken off before the scan could end (a PNG is read to IEND): held, never delivered.
        "/held.png": png(after_idat=[png_chunk(b"IDAT", bytes(2 * 2**20))])[:-12],
    }
    site = CutOffSite(bodies)
    try:
        answers = {
            path: curl(
                f"http://site-c.test:{site.port}{path}", proxy=gateway.proxy_url(), headers=HEADERS
            )
            for path in bodies
        }
    finally:
        site.close()
    records = {r["url"].rsplit("/", 1)[1]: r for r in gateway.fetch_records()}
    for path, body in bodies.items():
        rec = records[path.lstrip("/")]
        assert answers[path].returncode != 0, path  # a broken transfer
        assert rec["status"] == 200
        if path == "/opted-out.jpg":  # withheld: no more downloaded once the opt-out was read
            _stopped_early(rec, body)
            continue
        assert rec["response_bytes"] == len(body), path
        assert rec["content_sha256"] == hashlib.sha256(body).hexdigest(), path
    assert answers["/clean.jpg"].body == bodies["/clean.jpg"]  # delivered as it came
    clean = records["clean.jpg"]
    assert (clean["decision"], clean["reason"]) == ("forwarded", "upstream_error")
    opted_out = records["opted-out.jpg"]
    assert (opted_out["decision"], opted_out["reason"]) == ("withheld", "image_optout")
    assert "iptc-plus:DMI-PROHIBITED" in opted_out["signals"]
    assert answers["/opted-out.jpg"].body == b""  # nothing of it delivered
    held = records["held.png"]
    assert (held["decision"], held["reason"]) == ("forwarded", "upstream_error")
    assert held["signals"] == ["image-metadata:incomplete"]
    assert answers["/held.png"].body == b""


def test_a_book_too_large_to_hold_is_cut_off_by_its_package_documents_reservation(
    gateway: Gateway, site: Site
):
    # An EPUB is mostly images, after its package document: the reservation is read from the
    # first kilobytes, and the rest of the book is never delivered.
    images = (("OEBPS/images/plates.bin", bytes(range(256)) * (LARGE // 256)),)
    free = epub(epub_reservation("0"), after=images, stored=True)
    reserved = epub(epub_reservation("1"), after=images, stored=True)
    assert len(reserved) > LARGE
    site.routes["/free.epub"] = Reply(body=free, headers={"Content-Type": "application/epub+zip"})
    site.routes["/reserved.epub"] = Reply(
        body=reserved, headers={"Content-Type": "application/epub+zip"}
    )
    delivered = fetch(gateway, site, "books.site-c.test", "/free.epub")
    assert (delivered.status, delivered.returncode) == (200, 0) and delivered.body == free
    broken = fetch(gateway, site, "books.site-c.test", "/reserved.epub")
    assert broken.returncode != 0 and len(broken.body) < 2**20, len(broken.body)
    records = {r["url"].rsplit("/", 1)[1]: r for r in gateway.fetch_records()}
    assert records["free.epub"]["decision"] == "forwarded"
    withheld = records["reserved.epub"]
    assert (withheld["decision"], withheld["reason"]) == ("withheld", "tdm_reserved")
    _stopped_early(withheld, reserved)
    assert withheld["signals"] == ["tdm-epub:reserved"]


class CountingSite(RawSite):
    """A site that sends one declared body of `size` bytes, 1 MiB at a time, and counts what
    it got out before its connection was closed; over TLS with `tls`. `/slow` takes 8 s,
    `/brief` 3 s (both a byte a second), `/late` answers after 1.5 s of silence, `/silent`
    never answers."""

    def __init__(self, head: bytes, size: int, tls: ssl.SSLContext | None = None):
        self.head, self.size, self.tls = head, size, tls
        self.sent: list[int] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
        with conn:
            path = self.read_head(conn).split(b" ", 2)[1]
            if path.startswith(b"/slow"):
                _slowly(conn, b"s" * 8)
                return
            if path.startswith(b"/brief"):
                _slowly(conn, b"b" * 4, close=True)
                return
            if path.startswith(b"/late"):
                time.sleep(1.5)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
                return
            if path.startswith(b"/silent"):
                time.sleep(10)  # no answer
                return
            if not path.startswith(b"/photo"):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                % self.size
            )
            sent, chunk = 0, self.head + bytes(2**20 - len(self.head))
            try:
                while sent < self.size:
                    conn.sendall(chunk)
                    sent += len(chunk)
                    chunk = bytes(2**20)
            except OSError:
                pass
            self.sent.append(sent)


def _slowly(conn: socket.socket, body: bytes, close: bool = False) -> None:
    """A 200 whose body comes a byte a second (`close`: the connection closed after the last,
    which the head says)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    try:
        conn.sendall(head + (b"Connection: close\r\n" if close else b"") + b"\r\n")
        for i in range(len(body)):
            conn.sendall(body[i : i + 1])
            if not close or i < len(body) - 1:
                time.sleep(1)
    except OSError:
        pass


def test_a_site_stops_being_downloaded_once_its_streamed_image_is_withheld(gateway: Gateway):
    # A 256 MiB image whose opt-out is in its first bytes: the gateway withheld it (nothing
    # delivered) and then downloaded all 256 MiB from the site to throw it away, charged to
    # the site's bytes_per_day. It now closes the connection to the site once it withholds.
    size = 256 * 2**20
    site = CountingSite(jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")), size)
    try:
        answer = curl(
            f"http://site-c.test:{site.port}/photo.jpg", proxy=gateway.proxy_url(), headers=HEADERS
        )
        deadline = time.monotonic() + 20
        while not site.sent and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        site.close()
    assert answer.returncode != 0 and answer.body == b""
    [sent] = site.sent
    assert sent <= 32 * 2**20, f"the site got {sent / 2**20:.0f} MiB out"
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/photo.jpg")]
    assert (rec["decision"], rec["reason"]) == ("withheld", "image_optout")
    assert rec["response_bytes"] <= sent
    assert "downloaded no more of it" in rec["note"], rec["note"]


def _peak_rss(gw: Gateway) -> int:
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmHWM" in line)


def test_a_compression_bomb_is_read_as_far_as_its_head_and_no_further(gateway: Gateway, site: Site):
    # 256 MiB of zeros behind a noai page head, gzipped to ~250 KiB: a site can send that. The
    # gateway reads the head (and withholds the page) without decoding the rest into memory.
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    bomb = packer.compress(PAGE_NOAI + bytes(256 * 2**20)) + packer.flush()
    site.routes["/bomb.html"] = Reply(
        body=bomb, headers={"Content-Type": "text/html", "Content-Encoding": "gzip"}
    )
    fetch(gateway, site, "site-c.test", "/warm-up")
    before = _peak_rss(gateway)
    result = fetch(gateway, site, "site-c.test", "/bomb.html")
    grown = _peak_rss(gateway) - before
    assert result.status == 451 and result.json()["reason"] == "noai_directive"
    assert grown < 64 * 2**20, f"peak RSS grew {grown / 2**20:.0f} MiB"
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/bomb.html")]
    assert rec["content_sha256"] == hashlib.sha256(bomb).hexdigest()  # as sent, not decoded


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("zstd", zstd.compress)],
    ids=["gzip-members", "zstd-frames"],
)
def test_a_page_sent_in_two_members_is_read_in_both(
    gateway: Gateway, site: Site, coding: str, compress: Callable[[bytes], bytes]
):
    # RFC 1952 2.2 (RFC 8878 3): a body may be several gzip members (zstd frames), and clients
    # decode them all. The page's noai meta is in the second: the gateway read only the first
    # and delivered the page.
    head, rest = PAGE_NOAI[:15], PAGE_NOAI[15:]
    body = compress(head) + compress(rest)
    site.routes["/two.html"] = Reply(
        body=body, headers={"Content-Type": "text/html", "Content-Encoding": coding}
    )
    result = curl(
        site.url("site-c.test", "/two.html"),
        proxy=gateway.proxy_url(),
        headers={**HEADERS, "Accept-Encoding": coding},
    )
    assert result.status == 451 and result.json()["reason"] == "noai_directive"
    assert body not in result.body and b"secret words" not in result.body
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/two.html")]
    assert (rec["decision"], rec["reason"]) == ("withheld", "noai_directive")
    # The 451 names its record, as every answer through the gateway does.
    assert result.headers["x-crawlwarden-request-id"] == rec["id"]
    assert rec["content_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_page_whose_head_outruns_the_scan_says_so_on_its_record(gateway: Gateway, site: Site):
    # 200 KiB of inline script before the noai meta: the gateway reads 128 KiB of the head, so it
    # cannot see the meta; it delivers the page, and the record says what was not read.
    script = b"<script>" + b"var x = 1;\n" * 20_000 + b"</script>"
    page = b"<html><head>" + script + b'<meta name="robots" content="noai"></head><body>x'
    site.routes["/long-head.html"] = Reply(body=page, headers={"Content-Type": "text/html"})
    result = fetch(gateway, site, "site-c.test", "/long-head.html")
    assert result.status == 200 and result.body == page
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/long-head.html")]
    assert (rec["decision"], rec["signals"]) == ("forwarded", ["html-head:incomplete"])


def _ranged(body: bytes, content_type: str) -> Callable[[Seen], Reply]:
    """A site that honours `Range: bytes=FIRST-[LAST]` (206), as most static file servers do,
    and Netscape's `Request-Range` without one, as Apache httpd does."""

    def reply(seen: Seen) -> Reply:
        asked = {k.lower(): v for k, v in seen.headers.items()}
        wanted = asked.get("range", asked.get("request-range"))  # as Apache httpd reads them
        if wanted is None:
            return Reply(body=body, headers={"Content-Type": content_type})
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        end = int(last) + 1 if last else len(body)
        headers = {
            "Content-Type": content_type,
            "Content-Range": f"bytes {first}-{end - 1}/{len(body)}",
        }
        return Reply(status=206, body=body[int(first) : end], headers=headers)

    return reply


def test_a_range_request_cannot_take_around_a_bodys_opt_out(gateway: Gateway, site: Site):
    # The opt-outs of a page's head and of an image's metadata are in a body's first bytes: a
    # range past them would carry none (and its first bytes, only part of the metadata). Where
    # those signals bind, the gateway asks the site for the whole body, reads and hashes it;
    # the scraper gets 200 or 451 for the whole (RFC 9110 14.2: Range may be ignored).
    image = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING"))
    plain = jpeg_with_xmp(xmp_packet("DMI-ALLOWED"))
    site.routes["/ranged/opted-out.jpg"] = _ranged(image, "image/jpeg")
    site.routes["/ranged/plain.jpg"] = _ranged(plain, "image/jpeg")
    site.routes["/ranged/page.html"] = _ranged(PAGE_NOAI, "text/html")
    for host, path, wanted, header in [
        ("img.site-c.test", "/ranged/opted-out.jpg", f"bytes={len(image) // 2}-", "Range"),
        ("img.site-c.test", "/ranged/opted-out.jpg", "bytes=0-99", "Range"),
        ("img.site-c.test", "/ranged/page.html", f"bytes={len(PAGE_NOAI) - 20}-", "Range"),
        # (the tail past the metadata or the head was delivered: probe h1)
        ("img.site-c.test", "/ranged/opted-out.jpg", f"bytes={len(image) // 2}-", "Request-Range"),
        ("img.site-c.test", "/ranged/page.html", f"bytes={len(PAGE_NOAI) - 20}-", "Request-Range"),
    ]:
        result = curl(
            site.url(host, path), proxy=gateway.proxy_url(), headers={**HEADERS, header: wanted}
        )
        assert result.status == 451, (path, wanted, header, result.status)
        assert result.json()["decision"] == "withheld", (path, wanted, header)
    result = curl(
        site.url("img.site-c.test", "/ranged/plain.jpg"),
        proxy=gateway.proxy_url(),
        headers={**HEADERS, "Range": "bytes=10-"},
    )
    assert (result.status, result.body) == (200, plain)
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/ranged/plain.jpg")]
    assert rec["content_sha256"] == hashlib.sha256(plain).hexdigest()
    assert rec["response_bytes"] == len(plain)
    # Where no signal in a body binds (a licence), a range goes to the site as asked.
    result = curl(
        site.url("www.licensed.test", "/ranged/opted-out.jpg"),
        proxy=gateway.proxy_url(),
        headers={**HEADERS, "Range": "bytes=10-"},
    )
    assert (result.status, result.body) == (206, image[10:])


def test_a_part_of_a_body_the_gateway_did_not_ask_for_is_on_the_record(
    gateway: Gateway, site: Site
):
    # A 206 to a request without a range (a site answering some other way of asking for a
    # part): what the scan read in it counts, and the record says the rest went unread.
    plain = jpeg_with_xmp(xmp_packet("DMI-ALLOWED"))
    tail = {
        "Content-Type": "image/jpeg",
        "Content-Range": f"bytes 10-{len(plain) - 1}/{len(plain)}",
    }
    site.routes["/part/plain.jpg"] = Reply(status=206, body=plain[10:], headers=tail)
    result = fetch(gateway, site, "img.site-c.test", "/part/plain.jpg")
    assert (result.status, result.body) == (206, plain[10:])
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/part/plain.jpg")]
    assert rec["decision"] == "forwarded" and "body:partial" in rec["signals"]
    # A range the scraper asked for where no signal in a body binds: no such note.
    site.routes["/part/licensed.jpg"] = _ranged(plain, "image/jpeg")
    result = curl(
        site.url("www.licensed.test", "/part/licensed.jpg"),
        proxy=gateway.proxy_url(),
        headers={**HEADERS, "Range": "bytes=10-"},
    )
    assert result.status == 206
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/part/licensed.jpg")]
    assert "body:partial" not in rec["signals"]


class TransferCodedSite(RawSite):
    """A site that answers every page in gzip transfer coding, asked for or not (one request
    per connection), and keeps the request heads it got."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            head = self.read_head(conn)
            if not head.startswith(b"GET /page"):  # robots.txt, tdmrep.json: none
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            self.heads.append(head)
            body = gzip.compress(PAGE_NOAI)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            )


def test_a_transfer_coding_is_neither_asked_for_nor_left_unread(gateway: Gateway):
    # `TE: gzip` reached the site, and a page in gzip transfer coding (`Transfer-Encoding:
    # gzip, chunked`) was scanned still compressed: its noai meta unseen, the page delivered
    # (probe h3). TE is not passed on now, and a site that uses one unasked is read decoded.
    site = TransferCodedSite()
    try:
        result = curl(
            f"http://img.site-c.test:{site.port}/page.html",
            proxy=gateway.proxy_url(),
            headers={**HEADERS, "TE": "gzip"},
        )
        assert result.status == 451 and result.json()["reason"] == "noai_directive"
        [head] = site.heads
        assert b"\r\nte:" not in head.lower()
    finally:
        site.close()


def test_a_page_is_asked_for_in_a_coding_the_gateway_can_read(gateway: Gateway, site: Site):
    # Chrome asks for dcb/dcz (compressed against a dictionary it holds) where a site offers
    # them; the gateway could not read the page's head in those. The site is asked only for
    # codings the gateway decodes, and answers in one of them.
    def page(seen: Seen) -> Reply:
        asked = {k.lower(): v for k, v in seen.headers.items()}.get("accept-encoding", "")
        if "dcb" in asked:
            body, coding = b"\xff\xd8 not readable without the dictionary", "dcb"
        else:
            body, coding = zlib.compress(PAGE_NOAI, wbits=31), "gzip"
        return Reply(body=body, headers={"Content-Type": "text/html", "Content-Encoding": coding})

    site.routes["/dictionary.html"] = page
    chrome = "gzip, deflate, br, zstd, dcb, dcz"
    result = curl(
        site.url("img.site-c.test", "/dictionary.html"),
        proxy=gateway.proxy_url(),
        headers={**HEADERS, "Accept-Encoding": chrome, "Available-Dictionary": ":abc=:"},
    )
    assert result.status == 451 and result.json()["reason"] == "noai_directive"
    assert site.seen[-1].headers["Accept-Encoding"] == "gzip, deflate, br, zstd"


@pytest.mark.parametrize(
    ("coding", "body"),
    [("compress", b"\x1f\x9d\x90 LZW bytes"), ("gzip", b"\x1f\x8b\x08 broken gzip")],
)
def test_a_body_the_gateway_cannot_decode_is_delivered_and_its_record_says_so(
    gateway: Gateway, site: Site, coding: str, body: bytes
):
    # Sent unasked (or broken): the body's opt-outs cannot be read. Its header signals still
    # count; the record must not read as if the body had been read and found clean.
    site.routes["/undecodable.html"] = Reply(
        body=body, headers={"Content-Type": "text/html", "Content-Encoding": coding}
    )
    result = fetch(gateway, site, "img.site-c.test", "/undecodable.html")
    assert (result.status, result.body) == (200, body)
    [rec] = [r for r in gateway.fetch_records() if r["url"].endswith("/undecodable.html")]
    assert (rec["decision"], rec["signals"]) == ("forwarded", ["body:undecodable"])


def test_a_licensed_site_is_collected_where_its_signals_do_not_apply(gateway: Gateway, site: Site):
    cases = _image_cases()
    site.routes.update(cases)
    site.routes["/.well-known/tdmrep.json"] = Reply(
        body=json.dumps([{"location": "/*", "tdm-reservation": 1}]).encode()
    )
    for path in ("/xmp.jpg", "/c2pa.png", "/page.html", "/noai-header.jpg", "/tdm.html"):
        result = fetch(gateway, site, "cdn.licensed.test", path)
        assert result.status == 200, path
        assert result.body == cases[path].body
    # Content-Usage still binds: the licence's respect flags keep it.
    assert fetch(gateway, site, "cdn.licensed.test", "/usage.txt").status == 451
    records = [
        r for r in gateway.fetch_records() if r["kind"] == "fetch" and r["site"] == "licensed"
    ]
    delivered = [r for r in records if r["decision"] == "forwarded"]
    assert len(delivered) == 5
    assert all(r["legal_basis"] == "licence:LIC-7" for r in records)
    # Every signal seen is on the record even though the fetch was allowed.
    by_path = {r["url"].split(str(site.port), 1)[1]: r for r in delivered}
    assert any(s.startswith("iptc-plus:DMI-PROHIBITED") for s in by_path["/xmp.jpg"]["signals"])
    assert "meta-robots:noai" in by_path["/page.html"]["signals"]
    assert site.count("/.well-known/tdmrep.json") == 0  # tdmrep does not apply: not even asked


def test_a_licence_with_the_default_flags_does_not_read_tdmrep_json(workdir: Path, site: Site):
    # A TDM reservation never binds under a licence, whatever `respect.tdmrep` says: the file
    # is not asked for, nor charged to the site's budget (burst 2: robots.txt and the request).
    site.routes["/.well-known/tdmrep.json"] = Reply(
        body=json.dumps([{"location": "/*", "tdm-reservation": 1}]).encode()
    )
    policy = policy_with(
        defaults={"respect": RESPECT_ALL},
        sites=[
            {
                "id": "licensed",
                "match": ["licensed.test"],
                "legal_basis": {"kind": "licence", "ref": "LIC-8"},
                "rate": "1/h",
                "burst": 2,
            }
        ],
    )
    with Gateway(workdir, policy) as gw:
        result = fetch(gw, site, "licensed.test", "/a.jpg")
        assert result.status == 200, result.body
        assert site.count("/.well-known/tdmrep.json") == 0
        [rec] = [r for r in gw.fetch_records() if r["kind"] == "fetch"]
        assert (rec["decision"], rec["legal_basis"]) == ("forwarded", "licence:LIC-8")


def test_a_scrapy_spider_gets_neither_disallowed_nor_opted_out_content(
    gateway: Gateway, site: Site, workdir: Path
):
    serve_optout_files(site)
    site.routes.update(_image_cases())
    urls = [
        site.url("site-d.test", p)
        for p in (
            "/private/x",
            "/reserved/y.jpg",
            "/xmp.jpg",
            "/plain.jpg",
            "/page.html",
            "/open/z.jpg",
        )
    ]
    spider = workdir / "spider.py"
    spider.write_text(
        f"""
import scrapy

class S(scrapy.Spider):
    name = "s"
    custom_settings = {{"HTTPERROR_ALLOWED_CODES": [451], "RETRY_ENABLED": False,
                        "ROBOTSTXT_OBEY": False, "LOG_LEVEL": "WARNING"}}

    async def start(self):
        for url in {urls!r}:
            yield scrapy.Request(url, meta={{"proxy": {gateway.proxy_url()!r}}},
                                 headers={{"X-Crawl-Project": {PROJECT!r}}})

    def parse(self, response):
        yield {{"url": response.url, "status": response.status, "size": len(response.body),
               "reason": response.headers.get("X-Crawlwarden-Reason", b"").decode()}}
"""
    )
    out = workdir / "items.json"
    subprocess.run(
        [str(VENV_BIN / "scrapy"), "runspider", str(spider), "-O", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=workdir,
    )
    items = {i["url"].split(str(site.port), 1)[1]: i for i in json.loads(out.read_text())}
    assert items["/private/x"]["status"] == 451
    assert items["/reserved/y.jpg"]["reason"] == "tdm_reserved"
    assert items["/xmp.jpg"]["reason"] == "image_optout"
    assert items["/page.html"]["reason"] == "noai_directive"
    assert items["/plain.jpg"]["status"] == 200 and items["/open/z.jpg"]["status"] == 200
    paths = site.paths()
    assert paths["/private/x"] == 0 and paths["/reserved/y.jpg"] == 0


def test_a_rate_refusal_after_the_gateways_own_read_says_the_read_took_the_slot(
    workdir: Path, site: Site
):
    # A scraper pacing at the policy's rate on a new site was refused twice, the second time
    # with "the next request fits in 0.998s" and no word of the gateway's tdmrep.json read
    # that had just used the slot (onboarding probe).
    serve_optout_files(site)
    policy = policy_with(
        defaults={"respect": RESPECT_ALL},
        sites=[{"id": "paced", "match": ["paced.test"], "rate": "1/s", "burst": 1}],
    )
    details = []
    with Gateway(workdir, policy) as gw:
        for _ in range(6):
            answer = fetch(gw, site, "paced.test", "/elsewhere")
            if answer.status == 200:
                break
            assert answer.status == 429, answer.body
            details.append(answer.json()["detail"])
            time.sleep(1.05)
    assert answer.status == 200, details
    took_the_slot = [d for d in details if "must be read" not in d]
    assert took_the_slot, details
    assert all(
        "the gateway's own read of this site's robots.txt or tdmrep.json" in d
        for d in took_the_slot
    ), details


def test_through_an_upstream_proxy_a_withheld_image_stops_while_another_request_is_open(
    workdir: Path, test_ca: LocalCA
):
    # A browser on HTTP/2 in a CONNECT tunnel, its requests leaving through an upstream proxy,
    # each in a TCP connection of its own: a slow page under way, then a 256 MiB opted-out
    # image. HttpGuard matched the connections carrying a proxied request by the proxy's
    # address: the page's read as the image's too, so the image was downloaded whole (a
    # probe). mitmproxy's tunnel layer of the request's connection names its own.
    from tests.test_upstream_proxies import UpstreamProxy
    from tests.test_upstream_proxies import _through

    proxy = UpstreamProxy(workdir, "pool-a")
    site = CountingSite(
        jpeg_with_xmp(xmp_packet("DMI-PROHIBITED-AIMLTRAINING")),
        256 * 2**20,
        tls=test_ca.server_context_for("site-c.test"),
    )
    authority = f"site-c.test:{site.port}"
    try:
        policy = policy_with(defaults={"respect": RESPECT_ALL}, egress=_through({"pool-a": proxy}))
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            with tls_tunnel(gw, authority, alpn="h2", timeout=60) as tls:
                page, photo = H2Client(tls).get_together(
                    authority, [("/slow", 0), ("/photo.jpg", 1.0)], ("x-crawl-project", PROJECT)
                )
            assert wait_for(lambda: bool(site.sent), timeout=20)
            [rec] = [r for r in gw.fetch_records() if r["url"].endswith("/photo.jpg")]
    finally:
        site.close()
        proxy.stop()
    assert (page.end, page.body) == ("ended", b"s" * 8)  # the other request, untouched
    assert photo.end in ("reset", "closed") and photo.body == b"", (photo.end, len(photo.body))
    [sent] = site.sent
    assert sent <= 32 * 2**20, f"the site got {sent / 2**20:.0f} MiB out"
    assert (rec["decision"], rec["reason"]) == ("withheld", "image_optout")
    assert "downloaded no more of it" in rec["note"], rec["note"]


def test_through_an_upstream_proxy_a_silent_request_times_out_while_another_is_receiving(
    workdir: Path, test_ca: LocalCA
):
    # The same browser: a page that answers a byte a second, and a request its site never
    # answers, to be closed at network.response_timeout (3 s). HttpGuard took every
    # connection of the client to the proxy for the silent request's: the page's bytes kept
    # it from timing out until the page ended (8 s), and its close would have cut the page.
    from tests.test_upstream_proxies import UpstreamProxy
    from tests.test_upstream_proxies import _through

    proxy = UpstreamProxy(workdir, "pool-a")
    site = CountingSite(b"", 0, tls=test_ca.server_context_for("site-c.test"))
    authority = f"site-c.test:{site.port}"
    try:
        policy = policy_with(
            egress=_through({"pool-a": proxy}),
            network={
                "allow_private": ["127.0.0.0/8"],
                "static_hosts": {"*.test": "127.0.0.1"},
                "response_timeout": "3s",
            },
        )
        with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
            with tls_tunnel(gw, authority, alpn="h2", timeout=60) as tls:
                page, silent = H2Client(tls).get_together(
                    authority, [("/slow", 0), ("/silent", 0.5)], ("x-crawl-project", PROJECT)
                )
            records = {r["url"].rsplit("/", 1)[1]: r for r in gw.fetch_records()}
    finally:
        site.close()
        proxy.stop()
    assert silent.headers.get(":status") == "504", silent.headers
    assert records["silent"]["reason"] == "upstream_timeout"
    assert records["silent"]["duration_ms"] < 6000, records["silent"]["duration_ms"]
    assert (page.end, page.body) == ("ended", b"s" * 8)
    assert (records["slow"]["decision"], records["slow"]["reason"]) == ("forwarded", "ok")
