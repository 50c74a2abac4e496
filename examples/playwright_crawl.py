"""Render pages through crawlwarden in headless Chromium, driven by Playwright.

    .venv/bin/python examples/playwright_crawl.py https://example.com/ [URL...]

(Playwright's Python package comes with the dev extra that `make run` installs.)

Needs `make run` in another terminal and a Chromium: Debian's `chromium` package here
(`--browser /usr/bin/chromium`, the default), or `playwright install chromium` where the
browser download is reachable. Prints, per page, its status, the gateway's reason for a refusal,
which of its images the browser received, and the gateway's reason for each of the page's
requests it refused or withheld.

Three things differ from curl or requests:

- Chromium does not take credentials in the proxy URL: Playwright answers the gateway's
  `407 Proxy-Authenticate: Basic` challenge with `username`/`password`.
- Chromium on Linux does not read a CA file. Rather than `ignore_https_errors=True` (which
  accepts any certificate, also one from whoever sits between the browser and the gateway),
  the gateway's CA is trusted by its public key: `--ignore-certificate-errors-spki-list` with
  the SHA-256 of the CA's SubjectPublicKeyInfo. Chromium honours that flag only with a profile
  directory of its own (`--user-data-dir`), which Playwright's `launch()` gives it.
- The project (and site account) go in the proxy user name, `TEAM+PROJECT[+ACCOUNT]`, not
  in X-Crawl-Project/-Account headers: a header added to every request (`extra_http_headers`)
  turns each of the page's cross-origin requests into one that needs a CORS preflight, and a
  browser sends a preflight without the headers added, so the gateway could not tell its
  project. Every request the page makes (images, scripts, the favicon) goes through the gateway
  and is checked and recorded on its own, with the project of the user name. An image the
  gateway refuses (451) or withholds is simply missing from the rendered page.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# The gateway's CA (written by `crawlwarden run` into its data dir).
GATEWAY_CA = Path(".crawlwarden/mitmproxy-ca-cert.pem")
# What each image element ended up with: the URL it loaded from and whether it decoded.
_IMAGES = """images => images.map(img => [img.currentSrc || img.src,
                                         img.complete && img.naturalWidth > 0])"""


def spki_pin(ca_file: str | Path) -> str:
    """Chromium's form of a public key pin: base64 of the SHA-256 of the SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def crawl(
    urls: list[str],
    *,
    proxy: str,
    team: str,
    token: str,
    project: str,
    account: str | None = None,
    gateway_ca: Path = GATEWAY_CA,
    browser: str | None = "/usr/bin/chromium",
    timeout_ms: float = 30_000,
) -> list[dict[str, Any]]:
    """Load each URL in a page; what the browser got, per page and per image, and which of the
    page's own requests the gateway refused or withheld, with its reason (seen here even where
    CORS hides the answer from the page's scripts, or ORB from the page itself)."""
    from playwright.sync_api import sync_playwright

    user = f"{team}+{project}" + (f"+{account}" if account else "")
    results = []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=browser,
            proxy={"server": proxy, "username": user, "password": token},
            args=[f"--ignore-certificate-errors-spki-list={spki_pin(gateway_ca)}"],
        )
        try:
            context = chromium.new_context()
            for url in urls:
                page = context.new_page()
                refused = _gateway_refusals(context, page)
                response = page.goto(url, wait_until="load", timeout=timeout_ms)
                assert response is not None  # None only for same-document navigations
                results.append(
                    {
                        "url": url,
                        "status": response.status,
                        "reason": response.headers.get("x-crawlwarden-reason"),
                        "request_id": response.headers.get("x-crawlwarden-request-id"),
                        "images": dict(page.eval_on_selector_all("img", _IMAGES)),
                        "refused": {u: r for u, r in refused.items() if u != url},
                    }
                )
                page.close()
        finally:
            chromium.close()
    return results


def _gateway_refusals(context: Any, page: Any) -> dict[str, str]:
    """The page's requests the gateway refused or withheld, URL -> reason, filled in as the page
    loads. Read from the DevTools protocol's raw response headers: Playwright's `response`
    event never fires for a refusal of another host's image, whose JSON answer Chromium's
    opaque response blocking (ORB) turns into `net::ERR_BLOCKED_BY_ORB`."""
    refused: dict[str, str] = {}
    urls: dict[str, str] = {}  # DevTools request id -> the URL it asks for now (redirects)
    cdp = context.new_cdp_session(page)

    def sent(event: dict[str, Any]) -> None:
        urls[event["requestId"]] = event["request"]["url"]

    def answered(event: dict[str, Any]) -> None:
        headers = {name.lower(): value for name, value in event["headers"].items()}
        reason = headers.get("x-crawlwarden-reason")
        if reason is not None and event["requestId"] in urls:
            refused[urls[event["requestId"]]] = reason

    cdp.on("Network.requestWillBeSent", sent)
    cdp.on("Network.responseReceivedExtraInfo", answered)
    cdp.send("Network.enable")
    return refused


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("urls", nargs="+")
    p.add_argument("--proxy", default="http://127.0.0.1:8080")
    p.add_argument("--team", default="vision-data")
    p.add_argument("--token", default="demo-token")
    p.add_argument("--project", default="faces-v2")
    p.add_argument("--account", default=None, help="the site account the browser logs in as")
    p.add_argument("--gateway-ca", type=Path, default=GATEWAY_CA)
    p.add_argument("--browser", default="/usr/bin/chromium", help="'' for Playwright's own")
    args = p.parse_args()
    pages = crawl(
        args.urls,
        proxy=args.proxy,
        team=args.team,
        token=args.token,
        project=args.project,
        account=args.account,
        gateway_ca=args.gateway_ca,
        browser=args.browser or None,
    )
    print(json.dumps(pages, indent=2))
    return 0 if all(page["status"] < 400 for page in pages) else 1


if __name__ == "__main__":
    sys.exit(main())
