"""A headless browser crawling through a real gateway: Chromium driven by Playwright.

Scraping teams render pages in headless browsers; the browser then fetches every image, script
and favicon a page names, and whatever its scripts ask for, each through the gateway. The
browser is Debian's `chromium` (`.ci/chromium` installs it; without it these tests skip, except
under CI=true, where they fail), driven by Playwright's Python package as
examples/playwright_crawl.py drives it: proxy credentials answered on the gateway's 407
challenge, the project in the proxy user name, the gateway's CA trusted by its public key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.optout_fixtures import png
from tests.optout_fixtures import png_xmp_chunk
from tests.optout_fixtures import xmp_packet
from tests.support import PROJECT
from tests.support import RESPECT_ALL
from tests.support import ROOT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import LocalCA
from tests.support import Reply
from tests.support import Seen
from tests.support import Site
from tests.support import policy_with
from tests.test_report_support import chromium

ROBOTS = b"User-agent: *\nDisallow: /private/\n"
PLAIN = png()
OPTED_OUT = png(before_idat=[png_xmp_chunk(xmp_packet("DMI-PROHIBITED"))])
GALLERY = b"""<!doctype html><html><head><title>Gallery</title></head><body>
<img id="plain" src="/img/plain.png">
<img id="private" src="/private/p.png">
<img id="opted-out" src="/img/opted-out.png">
</body></html>"""
NOAI_PAGE = b"""<!doctype html><html><head><meta name="robots" content="noai">
<title>Not for training</title></head><body><p>text</p></body></html>"""
HTML = {"Content-Type": "text/html; charset=utf-8"}


def _example() -> ModuleType:
    """examples/playwright_crawl.py, the module users copy: the test drives the browser with it."""
    spec = importlib.util.spec_from_file_location(
        "playwright_crawl", ROOT / "examples" / "playwright_crawl.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gateway(workdir: Path, test_ca: LocalCA) -> Iterator[Gateway]:
    chromium()  # skip (fail in CI) before starting anything
    policy = policy_with(defaults={"respect": RESPECT_ALL})
    policy["teams"][0]["projects"] = [PROJECT, "landscapes"]
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        yield gw


def _records(gateway: Gateway, site: Site) -> dict[str, dict[str, Any]]:
    """The fetch records of the site's pages, by path (the last one of a path; tunnels, which
    have none, left out)."""
    records = {}
    for r in gateway.fetch_records():
        path = r["url"].split(f":{site.port}", 1)[-1]
        if r["kind"] == "fetch" and path.startswith("/"):
            records[path] = r
    return records


def _only_test_sites_were_fetched(gateway: Gateway) -> None:
    """The browser's own traffic (update checks, account lookups) comes to the gateway without
    credentials and stays refused: nothing but the test's sites was looked up or fetched."""
    for r in gateway.fetch_records():
        host = r["url"].split("/")[2].rsplit(":", 1)[0]
        if not host.endswith(".test"):
            assert (r["decision"], r["reason"]) == ("refused", "auth_required"), r


def _serve_gallery(site: Site) -> None:
    site.routes.update(
        {
            "/robots.txt": Reply(body=ROBOTS, headers={"Content-Type": "text/plain"}),
            "/gallery.html": Reply(body=GALLERY, headers=HTML),
            "/noai.html": Reply(body=NOAI_PAGE, headers=HTML),
            "/img/plain.png": Reply(body=PLAIN, headers={"Content-Type": "image/png"}),
            "/img/opted-out.png": Reply(body=OPTED_OUT, headers={"Content-Type": "image/png"}),
            "/private/p.png": Reply(body=PLAIN, headers={"Content-Type": "image/png"}),
        }
    )


def test_a_headless_browser_gets_a_page_and_only_the_images_it_may_take(
    gateway: Gateway, tls_site: Site, site: Site
):
    _serve_gallery(tls_site)
    _serve_gallery(site)
    gallery = tls_site.url("site-c.test", "/gallery.html")
    noai = tls_site.url("site-c.test", "/noai.html")
    plain_http = site.url("site-a.test", "/gallery.html")  # absolute-form, no tunnel
    pages = _example().crawl(
        [gallery, noai, plain_http],
        proxy=gateway.proxy,
        team=TEAM,
        token=TEAM_TOKEN,
        project=PROJECT,
        account="shop+reader-7",
        gateway_ca=gateway.ca_cert,
        browser=chromium(),
    )
    by_url = {p["url"]: p for p in pages}
    assert by_url[gallery]["status"] == 200
    assert by_url[gallery]["images"] == {
        tls_site.url("site-c.test", "/img/plain.png"): True,
        tls_site.url("site-c.test", "/private/p.png"): False,  # refused: robots.txt
        tls_site.url("site-c.test", "/img/opted-out.png"): False,  # withheld: its XMP
    }
    assert by_url[gallery]["refused"] == {
        tls_site.url("site-c.test", "/private/p.png"): "robots_disallowed",
        tls_site.url("site-c.test", "/img/opted-out.png"): "image_optout",
    }
    assert (by_url[noai]["status"], by_url[noai]["reason"]) == (451, "noai_directive")
    assert by_url[plain_http]["images"] == {
        site.url("site-a.test", "/img/plain.png"): True,
        site.url("site-a.test", "/private/p.png"): False,
        site.url("site-a.test", "/img/opted-out.png"): False,
    }
    assert tls_site.paths()["/private/p.png"] == site.paths()["/private/p.png"] == 0
    for seen in [*tls_site.seen, *site.seen]:
        received = {name.lower(): value for name, value in seen.headers.items()}
        # Chromium's Sec-CH-UA would name it beside the crawler's User-Agent.
        assert not any(name.startswith(("x-crawl-", "sec-ch-ua")) for name in received)
        assert "proxy-authorization" not in received
        assert received["user-agent"] == "TestBot/1.0 (+https://crawler.example/testbot)"

    records = _records(gateway, tls_site)
    plain = records["/img/plain.png"]
    assert (plain["decision"], plain["team"], plain["project"], plain["account"]) == (
        "forwarded",
        TEAM,
        PROJECT,
        "shop+reader-7",
    )
    assert plain["content_sha256"] == hashlib.sha256(PLAIN).hexdigest()
    assert records["/private/p.png"]["reason"] == "robots_disallowed"
    assert (records["/img/opted-out.png"]["decision"], records["/img/opted-out.png"]["reason"]) == (
        "withheld",
        "image_optout",
    )
    assert records["/gallery.html"]["id"] == by_url[gallery]["request_id"]
    assert {r["project"] for r in records.values()} == {PROJECT}
    over_http = _records(gateway, site)
    assert over_http["/img/plain.png"]["url"].startswith("http://site-a.test")
    assert over_http["/img/plain.png"]["decision"] == "forwarded"
    assert over_http["/img/opted-out.png"]["decision"] == "withheld"
    assert {r["project"] for r in over_http.values()} == {PROJECT}
    _only_test_sites_were_fetched(gateway)


def test_refusals_of_another_hosts_images_and_of_whole_domains_reach_the_scraper(
    workdir: Path, test_ca: LocalCA, tls_site: Site
):
    # Another host's image refused or withheld: Chromium blocks the gateway's JSON answer to an
    # <img> from another origin (ORB) before any `response` event; the example reads the reason
    # from the raw headers. A whole domain on the blocklist is refused at CONNECT, and its tunnel
    # opened to nowhere, so that the browser gets the 451 page rather than a failed tunnel.
    chromium()
    blocklist = [
        {"id": "tos-blocked", "match": ["blocked.test"], "reason": "Terms", "source": "its terms"}
    ]
    policy = policy_with(defaults={"respect": RESPECT_ALL}, blocklist=blocklist)
    _serve_gallery(tls_site)
    other = tls_site.url("site-d.test", "")
    cdn = tls_site.url("cdn.blocked.test", "")
    tls_site.routes["/mixed.html"] = Reply(
        body=f"""<!doctype html><html><body>
<img src="{other}/private/p.png"><img src="{other}/img/opted-out.png">
<img src="{other}/img/plain.png"><img src="{cdn}/img/plain.png"></body></html>""".encode(),
        headers=HTML,
    )
    mixed = tls_site.url("site-c.test", "/mixed.html")
    blocked = tls_site.url("blocked.test", "/gallery.html")
    with Gateway(workdir, policy, trusted_ca=test_ca.ca_cert) as gw:
        pages = _example().crawl(
            [mixed, blocked],
            proxy=gw.proxy,
            team=TEAM,
            token=TEAM_TOKEN,
            project=PROJECT,
            gateway_ca=gw.ca_cert,
            browser=chromium(),
        )
    by_url = {p["url"]: p for p in pages}
    assert by_url[mixed]["refused"] == {
        f"{other}/private/p.png": "robots_disallowed",
        f"{other}/img/opted-out.png": "image_optout",
        f"{cdn}/img/plain.png": "tos_blocklist",
    }
    assert by_url[mixed]["images"][f"{other}/img/plain.png"] is True
    assert (by_url[blocked]["status"], by_url[blocked]["reason"]) == (451, "tos_blocklist")
    assert all("blocked.test" not in seen.headers.get("Host", "") for seen in tls_site.seen)


# -- a page whose scripts ask another origin (an API, a CDN) --------------------------------


def _api(seen: Seen) -> Reply:
    """An API that allows any origin and a JSON body, and no header it does not know."""
    cors = {"Access-Control-Allow-Origin": "*"}
    if seen.method == "OPTIONS":
        allow = {
            "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "content-type",
        }
        return Reply(status=204, body=b"", headers={**cors, **allow})
    return Reply(body=b'{"n": 7}', headers={"Content-Type": "application/json", **cors})


APP = """<!doctype html><html><head><title>waiting</title></head><body><script>
const api = {api};
Promise.all([
  fetch(api).then(r => r.json()),
  fetch(api, {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: "{{}}"}})
    .then(r => r.json()),
]).then(([a, b]) => {{ document.title = "got " + (a.n + b.n); }},
        e => {{ document.title = "failed: " + e; }});
</script></body></html>"""


def _run_app(gateway: Gateway, site: Site, user: str, headers: dict[str, str]) -> str:
    """The app page's title once its two cross-origin requests are done: `got 14` or why not."""
    from playwright.sync_api import sync_playwright

    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n")
    site.routes["/app.html"] = Reply(
        # site-d.test: another origin than the page's (the same server answers both)
        body=APP.format(api=json.dumps(site.url("site-d.test", "/data.json"))).encode(),
        headers=HTML,
    )
    site.routes["/data.json"] = _api
    pin = _example().spki_pin(gateway.ca_cert)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(),
            proxy={"server": gateway.proxy, "username": user, "password": TEAM_TOKEN},
            args=[f"--ignore-certificate-errors-spki-list={pin}"],
        )
        try:
            page = browser.new_context(extra_http_headers=headers).new_page()
            page.goto(site.url("site-c.test", "/app.html"))
            page.wait_for_function("document.title != 'waiting'", timeout=15_000)
            return page.title()
        finally:
            browser.close()


def test_a_pages_cross_origin_requests_work_with_the_project_in_the_proxy_user_name(
    gateway: Gateway, tls_site: Site
):
    assert _run_app(gateway, tls_site, f"{TEAM}+{PROJECT}", {}) == "got 14"
    api = [s for s in tls_site.seen if s.path == "/data.json"]
    # The simple GET went as it is (in parallel, in any order); the JSON POST after the site's
    # yes to its preflight.
    methods = [s.method for s in api]
    assert sorted(methods) == ["GET", "OPTIONS", "POST"]
    assert methods.index("OPTIONS") < methods.index("POST")
    records = [r for r in gateway.fetch_records() if r["url"].endswith("/data.json")]
    assert sorted(r["method"] for r in records) == ["GET", "OPTIONS", "POST"]
    assert {(r["decision"], r["project"]) for r in records} == {("forwarded", PROJECT)}
    _only_test_sites_were_fetched(gateway)


def test_x_crawl_headers_added_by_the_browser_do_not_break_cross_origin_requests(
    gateway: Gateway, tls_site: Site
):
    """With X-Crawl-Project on every request as well, each cross-origin request needs a
    preflight asking the site for it; the gateway keeps the name from the site and allows it."""
    headers = {"X-Crawl-Project": PROJECT}
    assert _run_app(gateway, tls_site, f"{TEAM}+{PROJECT}", headers) == "got 14"
    preflights = [s for s in tls_site.seen if s.method == "OPTIONS"]
    # The GET needs one too now; Chromium may answer the second from its preflight cache.
    assert preflights
    for seen in preflights:
        asked = {k.lower(): v for k, v in seen.headers.items()}.get(
            "access-control-request-headers", ""
        )
        assert "x-crawl" not in asked.lower()


def test_a_browser_that_names_its_project_only_in_a_header_loses_cross_origin_requests(
    gateway: Gateway, tls_site: Site
):
    """Why the project goes in the user name: a preflight carries no added header, so the
    gateway refuses it (403 unknown_project) and the browser the request behind it."""
    assert _run_app(gateway, tls_site, TEAM, {"X-Crawl-Project": PROJECT}).startswith("failed")
    assert not [s for s in tls_site.seen if s.path == "/data.json"]
    refused = [r for r in gateway.fetch_records() if r["url"].endswith("/data.json")]
    assert {(r["method"], r["reason"]) for r in refused} == {("OPTIONS", "unknown_project")}


def test_the_ca_pin_is_chromiums_own_recipe(test_ca: LocalCA):
    """Chromium's documented way to get the value for --ignore-certificate-errors-spki-list, with
    openssl; the example accepts the CA file's path as a string (as the README calls it) too."""
    pipeline = (
        f"openssl x509 -pubkey -noout -in {test_ca.ca_cert} | openssl pkey -pubin -outform der"
        " | openssl dgst -sha256 -binary | base64"
    )
    expected = subprocess.run(
        ["sh", "-c", pipeline], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert _example().spki_pin(str(test_ca.ca_cert)) == expected


def test_each_browser_context_names_its_own_project(gateway: Gateway, tls_site: Site):
    """One browser, two contexts, each with its proxy user (README: one context per project)."""
    from playwright.sync_api import sync_playwright

    tls_site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nAllow: /\n")
    pin = _example().spki_pin(gateway.ca_cert)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), args=[f"--ignore-certificate-errors-spki-list={pin}"]
        )
        try:
            for project, account in ((PROJECT, "reader-1"), ("landscapes", "reader-2")):
                user = f"{TEAM}+{project}+{account}"
                context = browser.new_context(
                    proxy={"server": gateway.proxy, "username": user, "password": TEAM_TOKEN}
                )
                answer = context.new_page().goto(tls_site.url("site-c.test", f"/{account}"))
                assert answer is not None and answer.status == 200
                context.close()
        finally:
            browser.close()
    records = _records(gateway, tls_site)
    assert (records["/reader-1"]["project"], records["/reader-1"]["account"]) == (
        PROJECT,
        "reader-1",
    )
    assert (records["/reader-2"]["project"], records["/reader-2"]["account"]) == (
        "landscapes",
        "reader-2",
    )
