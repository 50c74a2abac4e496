"""Fetch a page through crawlwarden with Python requests.

    .venv/bin/python examples/requests_client.py http://demo.test:8000/

Needs `make run` in another terminal (and, for the demo URL, `python3 -m http.server 8000
--bind 127.0.0.1 --directory examples/site`).
"""

from __future__ import annotations

import sys

import requests

PROXY = "http://vision-data:demo-token@127.0.0.1:8080"
# The gateway's CA (written by `crawlwarden run` into its data dir); needed for https:// URLs.
GATEWAY_CA = ".crawlwarden/mitmproxy-ca-cert.pem"


def main(url: str) -> int:
    response = requests.get(
        url,
        proxies={"http": PROXY, "https": PROXY},
        headers={"X-Crawl-Project": "faces-v2", "X-Crawl-Account": "demo-account"},
        # Pass verify= on the call: a REQUESTS_CA_BUNDLE in the environment overrides
        # session.verify, but not this argument.
        verify=GATEWAY_CA,
        timeout=30,
    )
    print(response.status_code, response.headers.get("X-Crawlwarden-Reason", "forwarded"))
    if response.headers.get("Content-Type", "").startswith("application/json"):
        print(response.text)
    return 0 if response.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "http://demo.test:8000/"))
